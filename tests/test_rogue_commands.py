"""Signed commands end to end (docs/protocol.md §1.15): a rogue client holding the controller's own broker
account publishes forged, unsigned, re-signed, tampered, expired, replayed and misdirected commands and
programmes to device and area topics. The real fleet plays none of them and reports each refusal with its
reason; the controller's deliveries stay as they were; a normal broadcast still plays.

The database adds nothing to these checks: SQLite only.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from controller.domain.command_signing import Target
from controller.services.command_signing import CommandSigner, CountingSequence
from tests.support.broker import TestBroker
from tests.support.scenario import SPEAKERS, all_ended, seed, send, upload
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle, wait_until
from tests.test_area_fanout import wait_for_followers

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

GROUP = "hn.a.t1"
VICTIM, NEIGHBOUR = "a1-1", "a1-2"
WAIT_S = 60.0


@dataclass
class Rogue:
    """A client with the controller's own broker account: it reads and writes every topic."""

    broker: TestBroker
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _client: mqtt.Client | None = None

    def __enter__(self) -> Rogue:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rogue-{uuid.uuid4().hex[:8]}")
        client.username_pw_set(self.broker.controller.username, self.broker.controller.password)
        subscribed = threading.Event()
        client.on_message = self._on_message
        client.on_subscribe = lambda *_args: subscribed.set()
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        client.subscribe([("wardcast/v1/dev/+/+", 1), ("wardcast/v1/area/+/cmd", 1)])
        assert subscribed.wait(10), "the broker did not let the rogue subscribe"
        self._client = client
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._client is not None
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append((message.topic, bytes(message.payload)))
            self._changed.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        assert self._client is not None
        self._client.publish(topic, payload, qos=1).wait_for_publish(10)

    def wait_for(self, predicate: Any, what: str) -> Any:
        with self._changed:
            found = self._changed.wait_for(lambda: predicate(self.messages), timeout=WAIT_S)
        assert found, f"timed out waiting for {what}"
        return found

    def plays_on(self, topic_suffix: str) -> list[tuple[str, bytes]]:
        return [
            (topic, payload)
            for topic, payload in self.messages
            if topic.endswith(topic_suffix) and json.loads(payload).get("type") == "play"
        ]

    def refusals(self) -> set[tuple[str, str, str]]:
        """(address, command id, reason) of every `rejected` report that names a check (§1.15.5)."""
        found = set()
        for topic, payload in self.messages:
            if topic.endswith("/ack"):
                report = json.loads(payload)
                if report["state"] == "rejected" and "reason" in report:
                    found.add((topic.split("/")[3], report["command_id"], report["reason"]))
        return found


def derived_id(area_command_id: str, address: str) -> str:
    return str(uuid.uuid5(uuid.UUID(area_command_id), f"command:{address}"))


def wire_time(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def forged_play(template: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A command like a real one, with a fresh id, as an attacker would write it."""
    forged = {name: value for name, value in copy.deepcopy(template).items() if name != "sig"}
    return forged | {"id": str(uuid.uuid4()), "broadcast_id": "rogue"} | changes


def test_a_rogue_with_full_broker_access_makes_nothing_play(
    controller: ControllerHandle, fleet: FleetHandle, mosquitto: TestBroker
) -> None:
    seed(controller)
    media_id = upload(controller, 0.5)
    group = SPEAKERS[GROUP]
    with Rogue(mosquitto) as rogue, EventWatcher(controller) as watcher:
        wait_for_followers(controller, {f"spk-{address}": ["hn.a.t1", "hn.a", "hn"] for address in group})
        # Two real broadcasts: to the group (one area command) and to one speaker (a device command),
        # the second expiring soon, so that a copy of it is stale by the time it is replayed.
        to_group = send(controller, media_id, targets={"areas": [GROUP]})
        soon = (datetime.now(UTC) + timedelta(seconds=4)).isoformat()
        to_one = send(controller, media_id, targets={"devices": [f"spk-{VICTIM}"]}, expires_at=soon)
        for broadcast, count in ((to_group, len(group)), (to_one, 1)):
            watcher.wait_for(all_ended(str(broadcast["id"]), count, "completed"), what="the real broadcasts")
        (area_topic, area_bytes), *_ = rogue.plays_on(f"area/{GROUP}/cmd")
        (device_topic, device_bytes), *_ = rogue.plays_on(f"dev/{VICTIM}/cmd")
        area_command, device_command = json.loads(area_bytes), json.loads(device_bytes)
        plays_before = len(fleet.plays())

        impostor = CommandSigner(Ed25519PrivateKey.generate(), CountingSequence(10**9))

        def resigned(document: dict[str, Any], target: Target) -> dict[str, Any]:
            return asyncio.run(impostor.sign_command(document, target))

        victim_topic = f"wardcast/v1/dev/{VICTIM}/cmd"
        expired = datetime.now(UTC) - timedelta(minutes=1)
        unsigned_play = forged_play(device_command)
        unsigned_expired = forged_play(
            device_command, issued_at=wire_time(expired - timedelta(minutes=5)), expires_at=wire_time(expired)
        )
        unsigned_area = forged_play(area_command)
        impostor_play = resigned(forged_play(device_command), Target("device", VICTIM))
        impostor_area = resigned(forged_play(area_command), Target("area", GROUP))
        claims_the_controllers_key = resigned(forged_play(device_command), Target("device", VICTIM))
        claims_the_controllers_key["sig"]["kid"] = device_command["sig"]["kid"]
        tampered_play = copy.deepcopy(device_command)
        tampered_play["media"]["url"] = "http://rogue.invalid/media/" + tampered_play["media"]["sha256"]
        tampered_area = copy.deepcopy(area_command)
        tampered_area["priority"] = {"class": "emergency", "sub": 255, "rank": 767}
        programme = {
            "v": 1,
            "id": str(uuid.uuid4()),
            "device": VICTIM,
            "generated_at": wire_time(datetime.now(UTC)),
            "valid_from": wire_time(datetime.now(UTC)),
            "valid_until": wire_time(datetime.now(UTC) + timedelta(hours=1)),
            "comm_loss": {"policy": "keep"},
            "areas": [],
            "items": [],
        }
        impostor_programme = asyncio.run(impostor.sign_programme(programme))

        # The stale device command has expired by now: wait for it, not a sleep.
        wait_until(lambda: datetime.now(UTC) > datetime.fromisoformat(soon), "the real command to expire", 10)
        attacks: list[tuple[str, bytes, set[tuple[str, str, str]]]] = [
            (victim_topic, encode(unsigned_play), {(VICTIM, unsigned_play["id"], "unsigned")}),
            (victim_topic, encode(unsigned_expired), {(VICTIM, unsigned_expired["id"], "unsigned")}),
            (area_topic, encode(unsigned_area), _everyone(group, unsigned_area["id"], "unsigned")),
            (victim_topic, encode(impostor_play), {(VICTIM, impostor_play["id"], "unknown_key")}),
            (area_topic, encode(impostor_area), _everyone(group, impostor_area["id"], "unknown_key")),
            (
                victim_topic,
                encode(claims_the_controllers_key),
                {(VICTIM, claims_the_controllers_key["id"], "bad_signature")},
            ),
            (victim_topic, encode(tampered_play), {(VICTIM, device_command["id"], "payload_mismatch")}),
            (area_topic, encode(tampered_area), _everyone(group, area_command["id"], "payload_mismatch")),
            # Byte-for-byte copies of real commands (the device one expired meanwhile): replays.
            (device_topic, device_bytes, {(VICTIM, device_command["id"], "replayed")}),
            (area_topic, area_bytes, _everyone(group, area_command["id"], "replayed")),
            # A real command for one speaker, copied onto its neighbour's topic.
            (
                f"wardcast/v1/dev/{NEIGHBOUR}/cmd",
                device_bytes,
                {(NEIGHBOUR, device_command["id"], "wrong_target")},
            ),
            (
                f"wardcast/v1/dev/{VICTIM}/schedule",
                encode(impostor_programme),
                {(VICTIM, impostor_programme["id"], "unknown_key")},
            ),
        ]
        expected: set[tuple[str, str, str]] = set()
        for topic, payload, refusals in attacks:
            rogue.publish(topic, payload)
            expected |= refusals
        rogue.wait_for(
            lambda _messages: expected <= rogue.refusals(), "every forgery to be refused and reported"
        )

        # Nothing the rogue sent was taken: no report but the refusals, no new entry in the play log.
        assert not [entry for entry in fleet.plays()[plays_before:] if entry["event"] != "rejected"]
        with controller.client() as api:
            for broadcast in (to_group, to_one):
                deliveries = api.get(f"/api/v1/broadcasts/{broadcast['id']}").json()["deliveries"]
                # The refused copies bore the real commands' ids; the real deliveries stand.
                assert {d["state"] for d in deliveries} == {"completed"}, deliveries
            metrics = api.get("/metrics").text
        assert 'wardcast_device_refusals_total{reason="replayed"} 3.0' in metrics

        # The controller's own commands still play.
        after = send(controller, media_id, targets={"areas": ["hn"]})
        watcher.wait_for(
            all_ended(str(after["id"]), sum(map(len, SPEAKERS.values())), "completed"),
            timeout=WAIT_S,
            what="a normal broadcast after the attack",
        )


def _everyone(addresses: list[str], area_command_id: str, reason: str) -> set[tuple[str, str, str]]:
    """Each follower refuses an area command under its own derived id (§1.12 step 2)."""
    return {(address, derived_id(area_command_id, address), reason) for address in addresses}


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()
