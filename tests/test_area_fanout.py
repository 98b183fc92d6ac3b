"""Area fan-out end to end (docs/protocol.md §1.12): a real Mosquitto, the controller, a simulated fleet,
and a spy on every command topic that counts what the controller put on the wire."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import TestBroker
from tests.support.scenario import SPEAKERS, all_ended, place_speakers, seed, send, upload
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle, wait_until

pytestmark = pytest.mark.integration

PATHS = {group: [group, group.rsplit(".", 1)[0], "hn"] for group in SPEAKERS}


class CommandSpy:
    """Every command published on a device's or an area's `cmd` topic, as (topic, document)."""

    def __init__(self, broker: TestBroker) -> None:
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-command-spy")
        self._client.username_pw_set(broker.controller.username, broker.controller.password)
        self._client.on_connect = lambda client, *_: client.subscribe(
            [("wardcast/v1/area/+/cmd", 1), ("wardcast/v1/dev/+/cmd", 1)]
        )
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("the command spy could not subscribe")

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.commands.append((message.topic, json.loads(message.payload)))

    def of(self, broadcast_id: str) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(t, d) for t, d in self.commands if d.get("broadcast_id") == broadcast_id]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@pytest.fixture
def spy(mosquitto: TestBroker) -> Iterator[CommandSpy]:
    watcher = CommandSpy(mosquitto)
    yield watcher
    watcher.close()


def wait_for_followers(controller: ControllerHandle, expected: dict[str, list[str]]) -> None:
    """Until each listed device says it follows exactly these areas (its state, as the API shows it)."""

    def following() -> bool:
        with controller.client() as client:
            devices = {d["id"]: d for d in client.get("/api/v1/devices").json()}
        return all(devices[device]["status"].get("areas") == areas for device, areas in expected.items())

    wait_until(following, "the speakers follow their areas", timeout=30)


def everyone_follows_their_path() -> dict[str, list[str]]:
    return {f"spk-{a}": PATHS[group] for group, addresses in SPEAKERS.items() for a in addresses}


def plays_of(fleet: FleetHandle, broadcast_id: str) -> list[str]:
    return sorted(
        p["address"] for p in fleet.plays() if p["broadcast_id"] == broadcast_id and p["event"] == "playing"
    )


def test_a_city_wide_broadcast_is_one_publish_and_plays_once_on_every_speaker(
    controller: ControllerHandle, fleet: FleetHandle, spy: CommandSpy
):
    seed(controller)
    wait_for_followers(controller, everyone_follows_their_path())
    media_id = upload(controller, 0.5)
    with EventWatcher(controller) as watcher:
        broadcast = send(controller, media_id, targets={"areas": ["hn"]})
        broadcast_id = str(broadcast["id"])
        watcher.wait_for(all_ended(broadcast_id, 8, "completed"), what="all eight speakers completed")
    commands = spy.of(broadcast_id)
    assert [topic for topic, _ in commands] == ["wardcast/v1/area/hn/cmd"]
    area_command = commands[0][1]
    assert (
        area_command["area"] == "hn" and "device" not in area_command and "correlation_id" not in area_command
    )
    everyone = sorted(a for addresses in SPEAKERS.values() for a in addresses)
    assert plays_of(fleet, broadcast_id) == everyone
    with controller.client() as client:
        shown = client.get(f"/api/v1/broadcasts/{broadcast_id}").json()
    assert {d["state"] for d in shown["deliveries"]} == {"completed"}
    assert len(shown["deliveries"]) == 8


def test_a_disabled_speaker_closes_its_areas_and_only_whole_areas_go_by_topic(
    controller: ControllerHandle, fleet: FleetHandle, spy: CommandSpy
):
    seed(controller)
    wait_for_followers(controller, everyone_follows_their_path())
    with controller.client() as client:
        response = client.patch("/api/v1/devices/spk-a3-1", json={"enabled": False})
        assert response.status_code == 200, response.text
    media_id = upload(controller, 0.5)
    with EventWatcher(controller) as watcher:
        broadcast = send(controller, media_id, targets={"areas": ["hn"]})
        broadcast_id = str(broadcast["id"])
        watcher.wait_for(all_ended(broadcast_id, 7, "completed"), what="the seven enabled speakers completed")
    topics = sorted(topic for topic, _ in spy.of(broadcast_id))
    assert topics == [
        "wardcast/v1/area/hn.a.t1/cmd",
        "wardcast/v1/area/hn.a.t2/cmd",
        "wardcast/v1/area/hn.b/cmd",
    ]
    assert "a3-1" not in plays_of(fleet, broadcast_id)
    assert len(plays_of(fleet, broadcast_id)) == 7
    # Its cleared programme makes it follow nothing, which it says in its state.
    wait_for_followers(controller, {"spk-a3-1": []})


def test_an_alert_to_a_polygon_goes_to_each_device_by_itself(
    controller: ControllerHandle, fleet: FleetHandle, spy: CommandSpy
):
    seed(controller)
    place_speakers(controller)
    wait_for_followers(controller, everyone_follows_their_path())
    polygon = {
        "type": "Polygon",
        "coordinates": [
            [[105.828, 22.148], [105.838, 22.148], [105.838, 22.153], [105.828, 22.153], [105.828, 22.148]]
        ],
    }
    with EventWatcher(controller) as watcher, controller.client() as client:
        response = client.post(
            "/api/v1/alerts",
            json={
                "headline": "Diễn tập",
                "text": "Nước lên.",
                "targets": {"polygon": polygon},
                "mode": "drill",
            },
        )
        assert response.status_code == 201, response.text
        broadcast_id = client.get(f"/api/v1/alerts/{response.json()['id']}").json()["broadcast_id"]
        watcher.wait_for(all_ended(broadcast_id, 4, "completed"), what="the four speakers completed")
    topics = sorted(topic for topic, _ in spy.of(broadcast_id))
    assert topics == [f"wardcast/v1/dev/{a}/cmd" for a in ("a1-1", "a1-2", "a2-1", "a2-2")]
    assert plays_of(fleet, broadcast_id) == ["a1-1", "a1-2", "a2-1", "a2-2"]


def test_an_alert_preempts_an_area_broadcast_which_resumes_on_each_speaker(
    controller: ControllerHandle, fleet: FleetHandle, spy: CommandSpy
):
    seed(controller)
    wait_for_followers(controller, everyone_follows_their_path())
    # Long enough that the alert (its speech made by espeak-ng first) still finds the notice playing
    # on a loaded machine.
    long_media = upload(controller, 12.0)
    with EventWatcher(controller) as watcher:
        notice = send(controller, long_media, targets={"areas": ["hn.b"]}, on_preempted="resume")
        notice_id = str(notice["id"])
        watcher.wait_for(
            lambda events: (
                {
                    e["device_id"]
                    for e in events
                    if e.get("type") == "delivery"
                    and e["broadcast_id"] == notice_id
                    and e["state"] == "playing"
                }
                >= {"spk-b1-1", "spk-b1-2", "spk-b2-1"}
            ),
            what="the notice playing on the commune's speakers",
        )
        with controller.client() as client:
            response = client.post(
                "/api/v1/alerts",
                json={
                    "headline": "Cảnh báo lũ",
                    "text": "Nước lên nhanh.",
                    "targets": {"areas": ["hn.b.t1"]},
                    "mode": "drill",
                },
            )
        assert response.status_code == 201, response.text
        watcher.wait_for(
            all_ended(notice_id, 3, "completed"), what="the notice completed everywhere", timeout=90
        )
    assert next(topic for topic, _ in spy.of(notice_id)) == "wardcast/v1/area/hn.b/cmd"
    with controller.client() as client:
        shown = client.get(f"/api/v1/broadcasts/{notice_id}").json()
    resumed = [d for d in shown["deliveries"] if d.get("resumes")]
    assert {d["device_id"] for d in resumed} == {"spk-b1-1", "spk-b1-2"}, shown["deliveries"]
    direct_resumes = [t for t, d in spy.of(notice_id) if t.startswith("wardcast/v1/dev/")]
    assert sorted(direct_resumes) == ["wardcast/v1/dev/b1-1/cmd", "wardcast/v1/dev/b1-2/cmd"]
