"""The spine of issue 2 end to end: API → dispatcher → real Mosquitto → simulated speakers → events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.broker import TestBroker
from tests.support.scenario import ORDER, SPEAKERS, all_ended, all_in, seed, send, upload
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle

pytestmark = pytest.mark.integration


def test_a_group_broadcast_plays_on_exactly_that_groups_speakers(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    media_id = upload(controller, 2.0)
    with EventWatcher(controller) as watcher:
        accepted = send(
            controller, media_id, targets={"areas": ["hn.a.t2"]}, priority="priority", sub_priority=7
        )
        assert accepted["device_count"] == 2
        watcher.wait_for(all_ended(str(accepted["id"]), 2, "completed"), what="both deliveries completed")

    played = {p["address"] for p in fleet.plays() if p["event"] == "playing"}
    assert played == {"a2-1", "a2-2"}
    with controller.client() as client:
        detail = client.get(f"/api/v1/broadcasts/{accepted['id']}").json()
    assert detail["state"] == "finished"
    assert {d["device_id"] for d in detail["deliveries"]} == {"spk-a2-1", "spk-a2-2"}
    for delivery in detail["deliveries"]:
        states = [e["state"] for e in delivery["events"]]
        assert states == [*ORDER, "completed"], states
        stamps = [datetime.fromisoformat(e["at"]) for e in delivery["events"]]
        assert stamps == sorted(stamps)
        assert delivery["played_s"] == pytest.approx(2.0, abs=0.3)


def test_cancel_stops_playback_everywhere(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    media_id = upload(controller, 120.0)  # 6 s at the fleet's 20× speed: long enough to cancel mid-play
    with EventWatcher(controller) as watcher:
        accepted = send(controller, media_id, targets={"areas": ["hn.b"]})
        broadcast_id = str(accepted["id"])
        watcher.wait_for(all_in(broadcast_id, 3, "playing"), what="playing on the commune's 3 speakers")
        with controller.client() as client:
            response = client.post(f"/api/v1/broadcasts/{broadcast_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["cancelled_deliveries"] == 3
        watcher.wait_for(all_ended(broadcast_id, 3, "cancelled"), what="all cancelled")

    plays = [p for p in fleet.plays() if p.get("broadcast_id") == broadcast_id]
    assert {p["address"] for p in plays if p["event"] == "stopped"} == {"b1-1", "b1-2", "b2-1"}
    assert not [p for p in plays if p["event"] == "completed"]


def test_an_offline_speaker_never_plays_an_expired_command(
    controller: ControllerHandle, fleet: FleetHandle, mosquitto: TestBroker, tmp_path: Path
):
    seed(controller)
    late = FleetHandle(mosquitto, tmp_path / "late", ["a3-1"])
    late.workdir.mkdir()
    fleet.stop()  # a3-1 is part of the main fleet; run it alone so it can go offline by itself
    others = FleetHandle(
        mosquitto, tmp_path / "others", [a for group in SPEAKERS.values() for a in group if a != "a3-1"]
    )
    others.workdir.mkdir()
    others.start()
    late.start()
    late.stop()  # the broker now holds a3-1's persistent session and queues its commands
    media_id = upload(controller, 1.0)
    expires_at = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    try:
        with EventWatcher(controller) as watcher:
            stale = send(controller, media_id, targets={"areas": ["hn.a.t3"]}, expires_at=expires_at)
            watcher.wait_for(all_ended(str(stale["id"]), 1, "expired"), what="the offline delivery expired")
            late.start()
            fresh = send(controller, media_id, targets={"areas": ["hn.a.t3"]})
            watcher.wait_for(all_ended(str(fresh["id"]), 1, "completed"), what="a fresh command completed")
    finally:
        late.stop()
        others.stop()
    plays = late.plays()
    assert not [
        p for p in plays if p.get("broadcast_id") == stale["id"] and p["event"] in {"playing", "completed"}
    ]
    assert [p for p in plays if p.get("broadcast_id") == fresh["id"] and p["event"] == "completed"]
