"""The programme a speaker keeps for when its link drops, and how the controller reconciles what it played.

End to end: a real Mosquitto, the controller, a simulated fleet whose only way to the broker is a relay
the test cuts (as a 4G link drops), and the reports API that must count every play once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.support.broker import TestBroker
from tests.support.proxy import LinkRelay
from tests.support.scenario import running_fleet, schedule_history, seed, upload
from tests.support.system import ControllerHandle, FleetHandle, wait_until

pytestmark = pytest.mark.integration

HANOI = ZoneInfo("Asia/Ho_Chi_Minh")
WAIT_S = 60.0


@pytest.fixture
def relay(mosquitto: TestBroker) -> Iterator[LinkRelay]:
    with LinkRelay(mosquitto.host, mosquitto.port) as link:
        yield link


@pytest.fixture
def cut_off_fleet(
    tmp_path: Path, mosquitto: TestBroker, relay: LinkRelay, controller: ControllerHandle
) -> Iterator[FleetHandle]:
    with running_fleet(
        tmp_path / "fleet", mosquitto, command_key=controller.command_key, mqtt_url=relay.url
    ) as handle:
        yield handle


def _local(moment: datetime) -> str:
    return moment.astimezone(HANOI).replace(tzinfo=None, microsecond=0).isoformat()


def _create(controller: ControllerHandle, media_id: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Bản tin",
        "content": {"media_ids": [media_id]},
        "rrule": None,
        **fields,
    }
    with controller.client() as client:
        response = client.post("/api/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def _programme_published(controller: ControllerHandle, device_id: str, planned: datetime) -> bool:
    with controller.client() as client:
        found = client.get(f"/api/v1/devices/{device_id}/programme").json()
    assert "document" in found, found
    starts = [datetime.fromisoformat(i["start_at"]) for i in found["document"]["items"]]
    return bool(found["published"]) and planned in starts


def _plays(fleet: FleetHandle, broadcast_id: str, event: str) -> list[dict[str, Any]]:
    return [p for p in fleet.plays() if p.get("broadcast_id") == broadcast_id and p.get("event") == event]


def _broadcast(controller: ControllerHandle, broadcast_id: str) -> dict[str, Any]:
    with controller.client() as client:
        response = client.get(f"/api/v1/broadcasts/{broadcast_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_a_speaker_cut_off_plays_its_cached_programme_and_the_plays_are_reconciled(
    controller: ControllerHandle, cut_off_fleet: FleetHandle, relay: LinkRelay
) -> None:
    # Normal items expire 2 s after their planned time, so the controller concludes `expired` long
    # before the speakers come back; priority items stay queued in the broker for the speaker.
    controller.stop()
    controller.extra_env = {
        "WARDCAST_SCHEDULES__GRACE_S__NORMAL": "2",
        "WARDCAST_SCHEDULES__DEVICE_PROGRAMME_DEBOUNCE_S": "0.1",
    }
    controller.start()
    seed(controller)
    media_id = upload(controller, 1.0)
    planned = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=12)
    normal = _create(
        controller, media_id, name="Thôn Nà Pài", targets={"areas": ["hn.b.t1"]}, dtstart=_local(planned)
    )
    urgent = _create(
        controller,
        media_id,
        name="Thôn Khuổi Đắng",
        targets={"areas": ["hn.b.t2"]},
        dtstart=_local(planned),
        priority="priority",
    )
    for device_id in ("spk-b1-1", "spk-b1-2", "spk-b2-1"):
        wait_until(
            lambda d=device_id: _programme_published(controller, d, planned), f"{device_id}'s programme"
        )
    # The retained programme reaches a connected speaker at once; its media is fetched before the cut.
    wait_until(
        lambda: all(
            any(e["address"] == a and e["items"] >= 1 for e in cut_off_fleet.programmes())
            for a in ("b1-1", "b1-2", "b2-1")
        ),
        "the speakers to hold their programme",
    )
    relay.cut()
    # The occurrences fire while the speakers are cut off: the controller cannot reach them.
    wait_until(lambda: len(schedule_history(controller, normal["id"])) == 1, "the normal occurrence to fire")
    wait_until(
        lambda: len(schedule_history(controller, urgent["id"])) == 1, "the priority occurrence to fire"
    )
    (normal_fired,) = schedule_history(controller, normal["id"])
    (urgent_fired,) = schedule_history(controller, urgent["id"])
    normal_id, urgent_id = normal_fired["broadcast_id"], urgent_fired["broadcast_id"]
    wait_until(
        lambda: {d["state"] for d in _broadcast(controller, normal_id)["deliveries"]} == {"expired"},
        "the controller to conclude the normal deliveries expired",
    )
    # Meanwhile every cut-off speaker played its item from its cache, on time.
    wait_until(
        lambda: len(_plays(cut_off_fleet, normal_id, "completed")) == 2, "b1-1 and b1-2 to play offline"
    )
    wait_until(lambda: len(_plays(cut_off_fleet, urgent_id, "completed")) == 1, "b2-1 to play offline")
    relay.restore()
    wait_until(
        lambda: {d["state"] for d in _broadcast(controller, normal_id)["deliveries"]} == {"completed"},
        "the offline plays to be reconciled",
    )
    wait_until(
        lambda: {d["state"] for d in _broadcast(controller, urgent_id)["deliveries"]} == {"completed"},
        "the priority delivery to complete",
    )
    for broadcast_id, count in ((normal_id, 2), (urgent_id, 1)):
        started = _plays(cut_off_fleet, broadcast_id, "playing")
        assert len(started) == count, started  # once each: the live command was recognised as a duplicate
        assert all(p.get("offline") is True for p in started)
        lateness = [(datetime.fromisoformat(p["at"]) - planned).total_seconds() for p in started]
        assert all(-0.5 <= late <= 3 for late in lateness), lateness
    # The log keeps the controller's inference and the device's facts, each with its source.
    for delivery in _broadcast(controller, normal_id)["deliveries"]:
        sources = {(e["state"], e["source"]) for e in delivery["events"]}
        assert ("expired", "controller") in sources, delivery
        assert {("playing", "device-offline"), ("completed", "device-offline")} <= sources, delivery
    window = {
        "area": "hn.b",
        "from": (planned - timedelta(hours=1)).isoformat(),
        "to": (planned + timedelta(hours=1)).isoformat(),
    }
    with controller.client() as client:
        report = client.get("/api/v1/reports/plays", params=window).json()
    assert report["totals"]["scheduled"] == 3, report["totals"]
    assert report["totals"]["played_ok"] == 3, report["totals"]


def test_a_controller_killed_during_a_programme_plays_nothing_twice_and_loses_nothing(
    controller: ControllerHandle, fleet: FleetHandle
) -> None:
    seed(controller)
    media_id = upload(controller, 40.0)  # 2 s at the fleet's speed ×20: long enough to kill it mid-play
    now = datetime.now(UTC).replace(microsecond=0)
    first = _create(
        controller,
        media_id,
        name="Đang phát",
        targets={"areas": ["hn.a.t1"]},
        dtstart=_local(now + timedelta(seconds=4)),
    )
    second_at = now + timedelta(seconds=9)
    second = _create(
        controller, media_id, name="Lúc tắt", targets={"areas": ["hn.a.t2"]}, dtstart=_local(second_at)
    )
    wait_until(lambda: len(schedule_history(controller, first["id"])) == 1, "the first occurrence to fire")
    (fired,) = schedule_history(controller, first["id"])
    first_id = fired["broadcast_id"]
    wait_until(
        lambda: len(_plays(fleet, first_id, "playing")) == 2, "both speakers of group 1 to start playing"
    )
    controller.kill()
    # The second occurrence falls while the controller is down: this waits for the wall clock.
    threading.Event().wait(max(0.0, (second_at - datetime.now(UTC)).total_seconds() + 1))
    controller.start()  # catches up before it reports READY
    wait_until(
        lambda: {d["state"] for d in _broadcast(controller, first_id)["deliveries"]} == {"completed"},
        "the first occurrence's completions, reported while the controller was down",
    )
    (late,) = schedule_history(controller, second["id"])
    assert late["outcome"] == "fired"
    second_id = late["broadcast_id"]
    wait_until(
        lambda: {d["state"] for d in _broadcast(controller, second_id)["deliveries"]} == {"completed"},
        "the second occurrence, played late within its grace time",
    )
    controller.stop()
    controller.start()  # and a second restart changes nothing
    assert (
        len(schedule_history(controller, first["id"])) == 1
        and len(schedule_history(controller, second["id"])) == 1
    )
    for broadcast_id, addresses in ((first_id, {"a1-1", "a1-2"}), (second_id, {"a2-1", "a2-2"})):
        started = [p["address"] for p in _plays(fleet, broadcast_id, "playing")]
        assert sorted(started) == sorted(addresses), started  # each speaker exactly once
