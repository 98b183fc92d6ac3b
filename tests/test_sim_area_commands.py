"""Area commands on the simulated speaker (docs/protocol.md §1.12) against a real Mosquitto.

The controller's side is the probe of tests/sim_harness.py, which here also publishes on area command
topics. The ids a speaker must derive are computed in this file from the text of §1.12 (UUIDv5 of the
area command's id), not taken from the simulator. The speakers reach the broker through a TCP relay
that a test can cut, as in tests/test_sim_programme.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim.playlog import read_play_log
from firmware_sim.programme import MalformedProgrammeError, parse_programme
from firmware_sim.speaker import BrokerSettings, SimulatedSpeaker, SpeakerRuntime
from tests.sim_harness import (
    MEDIA_S,
    TEST_COMMAND_KEY,
    ControllerProbe,
    play_command,
    programme_document,
    sign_document,
    started,
)
from tests.support.broker import TestBroker
from tests.support.proxy import LinkRelay

SPEED = 20.0
WAIT_S = 10.0
# A speaker's areas as §1.12 lists them: its residential group, then every area above it to the root.
AREAS = ["tdp-03", "phuong-an-cuu", "hue"]

OpenRuntime = Callable[..., Awaitable[SpeakerRuntime]]


class AreaProbe(ControllerProbe):
    """The controller's probe, able to publish on area command topics as well."""

    async def send_area(self, area: str, command: dict[str, Any], *, signed: bool = True) -> dict[str, Any]:
        """Publishes the area command on `area`'s topic, signed as the controller does unless told not to."""
        document = sign_document(command) if signed else command
        await self.send_area_raw(area, json.dumps(document).encode())
        return document

    async def send_area_raw(self, area: str, payload: bytes) -> None:
        await self._client.publish(f"wardcast/v1/area/{area}/cmd", payload, qos=1)


@pytest.fixture
async def probe(mosquitto: TestBroker) -> AsyncIterator[AreaProbe]:
    async with AreaProbe(mosquitto) as area_probe:
        yield area_probe


@pytest.fixture
def proxy(mosquitto: TestBroker) -> Iterator[LinkRelay]:
    with LinkRelay(mosquitto.host, mosquitto.port) as relay:
        yield relay


def broker_settings(broker: TestBroker, host: str, port: int, **options: Any) -> BrokerSettings:
    return BrokerSettings(
        host=host,
        port=port,
        username=broker.simulator.username,
        password=broker.simulator.password,
        # A restored link is found again within a fraction of a second.
        reconnect_first_delay_s=0.05,
        reconnect_max_delay_s=0.2,
        **options,
    )


@pytest.fixture
async def open_runtime(
    mosquitto: TestBroker, proxy: LinkRelay, play_log_path: Path
) -> AsyncIterator[OpenRuntime]:
    async with contextlib.AsyncExitStack() as stack:

        async def open_runtime(**options: Any) -> SpeakerRuntime:
            settings = broker_settings(mosquitto, proxy.host, proxy.port, **options)
            return await stack.enter_async_context(
                SpeakerRuntime(settings, speed=SPEED, play_log=play_log_path, command_key=TEST_COMMAND_KEY)
            )

        yield open_runtime


@pytest.fixture
async def runtime(open_runtime: OpenRuntime) -> SpeakerRuntime:
    return await open_runtime()


def area_play(area: str, media: tuple[str, str], **options: Any) -> dict[str, Any]:
    """An area command (§1.12): a `play` without `device` and `correlation_id`, with `area`."""
    url, sha256 = media
    command = play_command("unused", url, sha256, duration_s=MEDIA_S, **options)
    del command["device"], command["correlation_id"]
    command["area"] = area
    return command


def derived_ids(area_command_id: str, address: str) -> tuple[str, str]:
    """The command id and correlation id a speaker derives from an area command's id (§1.12 step 2)."""
    namespace = uuid.UUID(area_command_id)
    return str(uuid.uuid5(namespace, f"command:{address}")), str(uuid.uuid5(namespace, f"delivery:{address}"))


def derived_command(area_command: dict[str, Any], address: str) -> dict[str, Any]:
    """The command the controller sends a speaker directly instead of through an area (same ids)."""
    command_id, correlation_id = derived_ids(area_command["id"], address)
    command = {member: value for member, value in area_command.items() if member != "area"}
    return command | {"id": command_id, "correlation_id": correlation_id, "device": address}


def areas_programme(address: str, areas: object) -> dict[str, Any]:
    return programme_document(address, []) | {"areas": areas}


async def follow(speaker: SimulatedSpeaker, probe: AreaProbe, areas: list[str]) -> None:
    """Gives the speaker a programme listing `areas` and waits until the broker granted them all."""
    await probe.publish_programme(speaker.address, areas_programme(speaker.address, areas))
    await speaker.wait_until(lambda s: s.areas == tuple(areas) and not s.areas_subscribing, WAIT_S)


def published_areas(probe: AreaProbe, address: str) -> list[list[str]]:
    """The `areas` of every online state the speaker published, in order."""
    return [state["areas"] for state in probe.states.get(address, []) if state["online"]]


async def test_speaker_follows_the_areas_its_programme_lists_and_reports_them_in_its_state(
    runtime: SpeakerRuntime, probe: AreaProbe
) -> None:
    speaker = await started(runtime)
    assert (await probe.state("spk-1", lambda state: state["online"]))["areas"] == []

    await follow(speaker, probe, AREAS)

    state = await probe.state("spk-1", lambda state: state["online"] and state["areas"] == AREAS)
    assert state["playing"] is None
    assert speaker.followed_areas == tuple(AREAS)
    # One state on connect, one once the broker granted the areas; none while it was asked.
    assert published_areas(probe, "spk-1") == [[], AREAS]


async def test_area_command_plays_on_every_follower_with_ids_derived_for_each(
    runtime: SpeakerRuntime, probe: AreaProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    speakers = [await started(runtime, address) for address in ("spk-1", "spk-2")]
    for speaker in speakers:
        await follow(speaker, probe, AREAS)

    # One publish on the root area reaches both.
    command = area_play("hue", media, mode="drill")
    await probe.send_area("hue", command)

    for speaker in speakers:
        command_id, correlation_id = derived_ids(command["id"], speaker.address)
        completed = await probe.report(command_id, "completed")
        assert probe.states_of(command_id) == ["delivered", "playing", "completed"]
        reports = probe.reports_for(command_id)
        assert {report["correlation_id"] for report in reports} == {correlation_id}
        assert {report["_address"] for report in reports} == {speaker.address}, "its own ack topic"
        assert completed["played_s"] == pytest.approx(MEDIA_S)
    assert probe.reports_for(command["id"]) == [], "nobody reports under the area command's own id"
    played = [entry for entry in read_play_log(play_log_path) if entry["event"] == "playing"]
    assert sorted(str(entry["address"]) for entry in played) == ["spk-1", "spk-2"]
    # Every other member as received: the broadcast and the mode.
    assert {(entry["broadcast_id"], entry["mode"]) for entry in played} == {
        (command["broadcast_id"], "drill")
    }


async def test_the_same_derived_command_sent_directly_as_well_plays_once(
    runtime: SpeakerRuntime, probe: AreaProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    speaker = await started(runtime)
    await follow(speaker, probe, ["hue"])

    # Through the area first, then directly (the controller did not see the area in the state yet).
    through_area = area_play("hue", media)
    command_id, _ = derived_ids(through_area["id"], "spk-1")
    await probe.send_area("hue", through_area)
    await probe.report(command_id, "completed")
    await probe.send(derived_command(through_area, "spk-1"))
    await probe.wait_until(lambda: probe.states_of(command_id).count("completed") == 2)
    assert probe.states_of(command_id) == ["delivered", "playing", "completed", "completed"]
    first, repeated = probe.reports_for(command_id)[2:]
    assert repeated == first

    # Directly first, then through the area.
    direct_first = area_play("hue", media)
    other_id, _ = derived_ids(direct_first["id"], "spk-1")
    await probe.send(derived_command(direct_first, "spk-1"))
    await probe.report(other_id, "completed")
    await probe.send_area("hue", direct_first)
    await probe.wait_until(lambda: probe.states_of(other_id).count("completed") == 2)
    assert probe.states_of(other_id) == ["delivered", "playing", "completed", "completed"]

    playing = [entry["command_id"] for entry in read_play_log(play_log_path) if entry["event"] == "playing"]
    assert playing == [command_id, other_id], "each played once"


async def test_area_commands_not_meant_for_the_speaker_are_ignored_without_a_report(
    runtime: SpeakerRuntime, probe: AreaProbe, media: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="firmware_sim.speaker")
    speaker = await started(runtime)
    await follow(speaker, probe, ["tdp-03", "hue"])
    anonymous = area_play("hue", media)
    del anonymous["area"]
    on_hue_topic = [
        area_play("tdp-03", media),  # names another area than the topic's
        anonymous,
        area_play("hue", media) | {"type": "stop", "target": "*", "reason": "cancelled"},
        area_play("hue", media) | {"id": "alert-2026-11-24-001"},  # no ids can be derived
    ]

    await probe.send_area("tdp-07", area_play("tdp-07", media))  # an area it does not follow
    for command in on_hue_topic:
        await probe.send_area("hue", command)
    for payload in (b"{not json", b"[1, 2]"):
        await probe.send_area_raw("hue", payload)
    # Sent last on the same topic, so it arrives after every message above.
    sentinel = area_play("hue", media)
    sentinel_id, _ = derived_ids(sentinel["id"], "spk-1")
    await probe.send_area("hue", sentinel)

    assert (await probe.final_report(sentinel_id))["state"] == "completed"
    assert {report["command_id"] for report in probe.reports} == {sentinel_id}
    ignored = [record for record in caplog.records if "ignored a command on area hue" in record.getMessage()]
    assert len(ignored) == len(on_hue_topic) + 2
    assert all(record.levelno == logging.INFO for record in ignored)


async def test_an_area_command_is_validated_as_the_speakers_own_command(
    runtime: SpeakerRuntime, probe: AreaProbe, media: tuple[str, str]
) -> None:
    speaker = await started(runtime)
    await follow(speaker, probe, ["hue"])
    malformed = area_play("hue", media)
    malformed["priority"]["rank"] = 7
    late = area_play("hue", media, now=datetime.now(UTC) - timedelta(seconds=120), expires_in_s=60)

    await probe.send_area("hue", malformed)
    await probe.send_area("hue", late)

    malformed_id, malformed_correlation_id = derived_ids(malformed["id"], "spk-1")
    rejected = await probe.final_report(malformed_id)
    assert (rejected["state"], rejected["correlation_id"]) == ("rejected", malformed_correlation_id)
    assert rejected["detail"].startswith("priority.rank")
    late_id, _ = derived_ids(late["id"], "spk-1")
    assert (await probe.final_report(late_id))["state"] == "expired"
    assert probe.states_of(late_id) == ["expired"]


async def test_areas_no_longer_listed_stop_at_once_and_a_cleared_programme_follows_none(
    runtime: SpeakerRuntime, probe: AreaProbe, media: tuple[str, str]
) -> None:
    speaker = await started(runtime)
    await follow(speaker, probe, AREAS)
    moved = ["tdp-04", "phuong-an-cuu", "hue"]  # the speaker moved to another residential group

    await follow(speaker, probe, moved)

    await probe.state("spk-1", lambda state: state["areas"] == moved)
    # The dropped group goes at once; the new one comes only once the broker granted it.
    assert published_areas(probe, "spk-1") == [[], AREAS, ["phuong-an-cuu", "hue"], moved]
    old_group = area_play("tdp-03", media)
    new_group = area_play("tdp-04", media)
    await probe.send_area("tdp-03", old_group)
    await probe.send_area("tdp-04", new_group)
    new_id, _ = derived_ids(new_group["id"], "spk-1")
    assert (await probe.final_report(new_id))["state"] == "completed"
    old_id, _ = derived_ids(old_group["id"], "spk-1")
    assert probe.reports_for(old_id) == []

    # A signed programme listing no areas: an empty payload, unsigned, would change nothing (§1.15).
    await probe.publish_programme("spk-1", areas_programme("spk-1", []))
    await speaker.wait_until(lambda s: s.followed_areas == () and s.areas == (), WAIT_S)
    await probe.state("spk-1", lambda state: state["areas"] == [])
    after_clearing = area_play("hue", media)
    await probe.send_area("hue", after_clearing)
    direct = play_command("spk-1", *media, duration_s=MEDIA_S)
    await probe.send(direct)
    assert (await probe.final_report(direct["id"]))["state"] == "completed"
    assert probe.reports_for(derived_ids(after_clearing["id"], "spk-1")[0]) == []


async def test_a_malformed_areas_member_leaves_the_followed_areas_as_they_were(
    runtime: SpeakerRuntime, probe: AreaProbe
) -> None:
    speaker = await started(runtime)
    await follow(speaker, probe, AREAS)

    await probe.publish_programme("spk-1", areas_programme("spk-1", ["tdp-03", "hue/#"]))
    await speaker.wait_until(lambda s: s.programme.documents == 2, WAIT_S)

    assert (speaker.programme.last_ignored or "").startswith("areas[1]")
    assert speaker.areas == tuple(AREAS)
    assert speaker.areas_subscribing == ()


async def test_area_commands_queued_while_the_link_was_down_play_after_reconnecting(
    runtime: SpeakerRuntime, probe: AreaProbe, proxy: LinkRelay, media: tuple[str, str]
) -> None:
    speaker = await started(runtime)
    await follow(speaker, probe, ["tdp-03", "hue"])

    proxy.cut()
    await speaker.wait_until(lambda s: s.offline_since is not None, WAIT_S)
    # The broker keeps it in the speaker's persistent session, and hands it over on reconnection,
    # possibly before it answers the speaker's new subscriptions.
    command = area_play("hue", media)
    await probe.send_area("hue", command)
    proxy.restore()

    command_id, _ = derived_ids(command["id"], "spk-1")
    assert (await probe.final_report(command_id))["state"] == "completed"
    await speaker.wait_until(lambda s: s.connected and not s.areas_subscribing, WAIT_S)
    assert speaker.areas == ("tdp-03", "hue")
    states = probe.states["spk-1"]
    reconnected = states[[state["online"] for state in states].index(False) :]
    assert reconnected[0]["reason"] == "will"
    assert {tuple(state["areas"]) for state in reconnected[1:]} == {("tdp-03", "hue")}, (
        "every state after reconnecting reports the areas, the connect state included"
    )


async def test_areas_are_subscribed_again_when_the_broker_forgot_the_session(
    open_runtime: OpenRuntime, probe: AreaProbe, media: tuple[str, str]
) -> None:
    # MQTT 5 with a session that ends with the connection: the broker keeps no subscription, so
    # only the speaker's own subscribing on reconnection brings the area commands back.
    runtime = await open_runtime(protocol="5", session_expiry_s=0)
    speaker = await started(runtime)
    await follow(speaker, probe, ["hue"])

    speaker.drop_connection()
    await probe.wait_until(
        lambda: [state["online"] for state in probe.states.get("spk-1", [])][-2:] == [False, True]
    )
    await speaker.wait_until(lambda s: s.connected and not s.areas_subscribing, WAIT_S)
    assert speaker.areas == ("hue",)
    command = area_play("hue", media)
    await probe.send_area("hue", command)

    command_id, _ = derived_ids(command["id"], "spk-1")
    assert (await probe.final_report(command_id))["state"] == "completed"


def refuse_subscription(monkeypatch: pytest.MonkeyPatch, client: mqtt.Client, refused_topic: str) -> None:
    """Makes the client hear the broker refuse `refused_topic` in every SUBACK. Mosquitto 2.0 grants
    a subscription its ACL denies (and withholds the messages), so a refusal has to be staged."""
    topics_by_mid: dict[int, list[str]] = {}
    subscribe, on_subscribe = client.subscribe, client.on_subscribe

    def recording_subscribe(topics: list[tuple[str, int]]) -> tuple[Any, int | None]:
        result, mid = subscribe(topics)
        if mid is not None:
            topics_by_mid[mid] = [topic for topic, _ in topics]
        return result, mid

    def refusing_on_subscribe(
        paho_client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        topics = topics_by_mid.pop(mid, [])
        refused = ReasonCode(PacketTypes.SUBACK, identifier=0x80)
        codes = [
            refused if topic == refused_topic else code
            for topic, code in zip(topics, reason_codes, strict=True)
        ]
        on_subscribe(paho_client, userdata, mid, codes, properties)

    monkeypatch.setattr(client, "subscribe", recording_subscribe)
    monkeypatch.setattr(client, "on_subscribe", refusing_on_subscribe)


async def test_an_area_the_broker_refuses_is_logged_and_not_accepted(
    runtime: SpeakerRuntime,
    probe: AreaProbe,
    media: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.ERROR, logger="firmware_sim.speaker")
    speaker = await started(runtime)
    assert speaker._client is not None
    refuse_subscription(monkeypatch, speaker._client, "wardcast/v1/area/tdp-03/cmd")

    await probe.publish_programme("spk-1", areas_programme("spk-1", ["tdp-03", "hue"]))
    await speaker.wait_until(
        lambda s: s.followed_areas == ("tdp-03", "hue") and not s.areas_subscribing, WAIT_S
    )

    assert speaker.areas == ("hue",)
    await probe.state("spk-1", lambda state: state["areas"] == ["hue"])
    assert any("refused the subscription to area tdp-03" in r.getMessage() for r in caplog.records)
    command = area_play("hue", media)
    await probe.send_area("hue", command)
    assert (await probe.final_report(derived_ids(command["id"], "spk-1")[0]))["state"] == "completed"


# The pure part: the `areas` member of the programme document


@pytest.mark.parametrize(
    ("areas", "expected"),
    [(None, ()), ([], ()), (AREAS, tuple(AREAS))],
    ids=["absent", "empty", "group-first"],
)
def test_the_areas_member_is_read_in_its_order(areas: list[str] | None, expected: tuple[str, ...]) -> None:
    document = programme_document("spk-1", [])
    if areas is not None:
        document["areas"] = areas
    programme = parse_programme(json.dumps(document).encode(), "spk-1")
    assert programme is not None
    assert programme.areas == expected


@pytest.mark.parametrize(
    ("areas", "member"),
    [
        ("hue", "areas"),
        (None, "areas"),
        ([""], "areas[0]"),
        (["hue", 3], "areas[1]"),
        (["tdp/03"], "areas[0]"),
        (["hue", "+"], "areas[1]"),
        (["hue", "tdp-03", "hue"], "areas[2]"),
    ],
    ids=["not-an-array", "null", "empty-code", "not-a-string", "level-separator", "wildcard", "twice"],
)
def test_a_malformed_areas_member_is_named(areas: object, member: str) -> None:
    payload = json.dumps(areas_programme("spk-1", areas)).encode()
    with pytest.raises(MalformedProgrammeError) as malformed:
        parse_programme(payload, "spk-1")
    assert malformed.value.member == member
