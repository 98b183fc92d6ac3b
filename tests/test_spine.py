"""The spine of issue 2 end to end: API → dispatcher → real Mosquitto → simulated speakers → events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import TestBroker
from tests.support.scenario import ORDER, SPEAKERS, all_ended, all_in, seed, send, upload
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle, wait_until

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

    # The controller records `cancelled` when it cancels; each device then reports `stopped`.
    def stopped() -> set[str]:
        return {
            p["address"]
            for p in fleet.plays()
            if p.get("broadcast_id") == broadcast_id and p["event"] == "stopped"
        }

    wait_until(lambda: stopped() == {"b1-1", "b1-2", "b2-1"}, "the three speakers to report they stopped")
    plays = [p for p in fleet.plays() if p.get("broadcast_id") == broadcast_id]
    assert not [p for p in plays if p["event"] == "completed"]


def test_an_offline_speaker_never_plays_an_expired_command(
    controller: ControllerHandle, fleet: FleetHandle, mosquitto: TestBroker, tmp_path: Path
):
    seed(controller)
    late = FleetHandle(mosquitto, tmp_path / "late", ["a3-1"], controller.command_key)
    late.workdir.mkdir()
    fleet.stop()  # a3-1 is part of the main fleet; run it alone so it can go offline by itself
    others = FleetHandle(
        mosquitto,
        tmp_path / "others",
        [a for group in SPEAKERS.values() for a in group if a != "a3-1"],
        controller.command_key,
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


def test_an_emergency_preempts_and_the_notice_plays_again_afterwards(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    long_notice = upload(controller, 60.0)  # 3 s at the fleet's 20× speed
    alarm = upload(controller, 1.0)
    with EventWatcher(controller) as watcher:
        normal = send(controller, long_notice, targets={"areas": ["hn.a.t1"]})
        watcher.wait_for(all_in(str(normal["id"]), 2, "playing"), what="the normal notice playing")
        emergency = send(controller, alarm, targets={"areas": ["hn.a.t1"]}, priority="emergency")
        watcher.wait_for(all_ended(str(emergency["id"]), 2, "completed"), what="the emergency completed")

        def resumed_and_completed(events: list[dict[str, object]]) -> bool:
            ended = [e for e in events if e.get("broadcast_id") == normal["id"] and e["state"] == "completed"]
            return len(ended) == 2

        watcher.wait_for(resumed_and_completed, what="the notice played again to the end")
    with controller.client() as client:
        detail = client.get(f"/api/v1/broadcasts/{normal['id']}").json()
    by_device: dict[str, list[dict[str, object]]] = {}
    for delivery in detail["deliveries"]:
        by_device.setdefault(str(delivery["device_id"]), []).append(delivery)
    assert set(by_device) == {"spk-a1-1", "spk-a1-2"}
    for deliveries in by_device.values():
        first = next(d for d in deliveries if d["resumes"] is None)
        again = next(d for d in deliveries if d["resumes"] == first["id"])
        assert first["state"] == "interrupted" and "preempted by" in str(first["detail"])
        assert again["state"] == "completed"
    # The device was told to stop (stop first), so it reported `stopped`, never both playing at once.
    plays = [p for p in fleet.plays() if p["broadcast_id"] == normal["id"]]
    assert {p["address"] for p in plays if p["event"] == "stopped"} == {"a1-1", "a1-2"}


def test_a_preempted_broadcast_with_policy_missed_is_not_played_again(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    long_notice = upload(controller, 60.0)
    alarm = upload(controller, 1.0)
    with EventWatcher(controller) as watcher:
        normal = send(controller, long_notice, targets={"areas": ["hn.a.t2"]}, on_preempted="missed")
        watcher.wait_for(all_in(str(normal["id"]), 2, "playing"), what="the normal notice playing")
        emergency = send(controller, alarm, targets={"areas": ["hn.a.t2"]}, priority="emergency")
        watcher.wait_for(all_ended(str(emergency["id"]), 2, "completed"), what="the emergency completed")
        watcher.wait_for(all_ended(str(normal["id"]), 2, "interrupted"), what="the notice interrupted")
    with controller.client() as client:
        detail = client.get(f"/api/v1/broadcasts/{normal['id']}").json()
    assert len(detail["deliveries"]) == 2
    assert all("policy: missed" in str(d["detail"]) for d in detail["deliveries"])


def _publish_as(broker: TestBroker, client_id: str, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.username_pw_set(broker.simulator.username, broker.simulator.password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_malformed_and_unknown_device_payloads_are_counted_not_fatal(
    controller: ControllerHandle, mosquitto: TestBroker
):
    seed(controller)
    with EventWatcher(controller) as watcher:
        _publish_as(mosquitto, "stranger", [("wardcast/v1/dev/stranger/state", b'{"v":1,"online":true}')])
        _publish_as(
            mosquitto,
            "a1-1",
            [
                ("wardcast/v1/dev/a1-1/ack", b"{not json"),
                ("wardcast/v1/dev/a1-1/ack", b'{"v": 9}'),
                ("wardcast/v1/dev/a1-1/state", b'{"v":1,"online":true,"at":"2026-01-01T00:00:00Z"}'),
            ],
        )
        # Mosquitto forwards to one subscriber in the order it received: once the valid state is
        # seen, the garbage before it has been handled, and the controller is still processing.
        watcher.wait_for(
            lambda events: any(e.get("type") == "device" and e["device_id"] == "spk-a1-1" for e in events),
            what="the valid state after the garbage",
        )
    with controller.client() as api:
        assert api.get("/healthz").status_code == 200
        metrics = api.get("/metrics").text
    counts = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("wardcast_rejected_payloads_total{")
    }
    assert counts.get('reason="malformed"', 0) >= 2
    assert counts.get('reason="unknown_device"', 0) >= 1
