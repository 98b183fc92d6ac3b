"""Availability end to end (issue 6): real Mosquitto, the controller and simulated speakers in their own
processes. A killed device goes offline by its Last Will, a silent one by its kind's timeout; each
transition is recorded with its time, an alarm is raised when a device stays offline and cleared when
it returns. Tests wait on the event stream, never on sleeps."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import TestBroker
from tests.support.scenario import SPEAKERS, seed
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle, wait_until

pytestmark = pytest.mark.integration

HEARTBEAT_S = 1.0
TIMEOUT_S = 3.0
ALARM_AFTER_S = 2.0
ALL = [address for group in SPEAKERS.values() for address in group]
LONER = "a3-1"  # runs in a process of its own, so that it can be killed alone


@pytest.fixture
def controller(tmp_path: Path, database_url: str, mosquitto: TestBroker) -> Iterator[ControllerHandle]:
    handle = ControllerHandle(
        workdir=tmp_path,
        database_url=database_url,
        broker=mosquitto,
        extra_env={
            "WARDCAST_AVAILABILITY__SPEAKER__HEARTBEAT_S": str(HEARTBEAT_S),
            "WARDCAST_AVAILABILITY__SPEAKER__TIMEOUT_S": str(TIMEOUT_S),
            "WARDCAST_AVAILABILITY__SPEAKER__ALARM_AFTER_S": str(ALARM_AFTER_S),
        },
    )
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def fleet_of(tmp_path: Path, controller: ControllerHandle, name: str, addresses: list[str]) -> FleetHandle:
    workdir = tmp_path / name
    workdir.mkdir()
    return FleetHandle(
        controller.broker,
        workdir,
        addresses,
        controller.command_key,
        heartbeat_s=HEARTBEAT_S,
        control=workdir / "control.json",
    )


def transitions(events: list[dict[str, Any]], device_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "availability" and e["device_id"] == device_id]


def alarms(events: list[dict[str, Any]], device_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("type") == "alarm" and e["source"] == "availability" and e["device_id"] == device_id
    ]


def listed_devices(controller: ControllerHandle) -> list[dict[str, Any]]:
    with controller.client() as client:
        devices: list[dict[str, Any]] = client.get("/api/v1/devices").json()
    return devices


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_a_killed_device_goes_offline_by_its_last_will_raises_an_alarm_and_clears_it_on_return(
    controller: ControllerHandle, mosquitto: TestBroker, tmp_path: Path
):
    seed(controller)
    others = fleet_of(tmp_path, controller, "others", [a for a in ALL if a != LONER])
    loner = fleet_of(tmp_path, controller, "loner", [LONER])
    device_id = f"spk-{LONER}"
    with EventWatcher(controller) as watcher:
        others.start()
        loner.start()
        try:
            watcher.wait_for(
                lambda events: all(any(t["online"] for t in transitions(events, f"spk-{a}")) for a in ALL),
                what="all 8 speakers online",
            )

            # The online flag and last_seen come with the transition; firmware, RSSI and volume with the
            # device's status, which another batch writes a moment later: wait for both.
            def reported_status(device: dict[str, Any]) -> bool:
                return device["firmware"] == "sim-1.0.0" and isinstance(device["rssi_dbm"], int)

            wait_until(
                lambda: all(map(reported_status, listed_devices(controller))), "every speaker's status"
            )
            for device in listed_devices(controller):
                assert device["online"] is True
                assert device["last_seen"] is not None
                assert device["volume"] == 70
                assert "self_test" in device and device["self_test"] is None

            loner.kill()  # SIGKILL: the socket closes without DISCONNECT, the broker publishes the will
            watcher.wait_for(
                lambda events: any(not t["online"] for t in transitions(events, device_id)),
                timeout=45 * 1.5,
                what="the killed speaker offline",
            )
            offline = next(t for t in transitions(watcher.events, device_id) if not t["online"])
            assert offline["reason"] == "will"
            watcher.wait_for(
                lambda events: any(a["state"] == "active" for a in alarms(events, device_id)),
                timeout=ALARM_AFTER_S + 10,
                what="an availability alarm",
            )
            raised = alarms(watcher.events, device_id)[0]
            assert when(raised["raised_at"]) >= when(offline["at"])

            loner.start()
            watcher.wait_for(
                lambda events: any(a["state"] == "cleared" for a in alarms(events, device_id)),
                what="the alarm cleared once the speaker is back",
            )
        finally:
            loner.stop()
            others.stop()
    with controller.client() as client:
        history = client.get(f"/api/v1/devices/{device_id}/availability").json()
        listed_alarms = client.get("/api/v1/alarms").json()
        audit = client.get("/api/v1/audit", params={"subject": raised["id"]}).json()
    steps = [(t["online"], t["reason"]) for t in history["transitions"]]
    assert steps[:3] == [(True, "state"), (False, "will"), (True, "state")]
    times = [when(t["at"]) for t in history["transitions"]]
    assert times == sorted(times)
    mine = [a for a in listed_alarms if a["id"] == raised["id"]]
    assert mine and mine[0]["source"] == "availability" and mine[0]["state"] == "cleared"
    assert mine[0]["rule_id"] is None
    assert [entry["action"] for entry in audit] == ["alarm.raise", "alarm.clear"]


def test_a_device_that_stays_connected_but_stops_heartbeating_goes_offline_within_its_timeout(
    controller: ControllerHandle, mosquitto: TestBroker, tmp_path: Path
):
    seed(controller)
    fleet = fleet_of(tmp_path, controller, "fleet", ["a1-1", "a1-2"])
    device_id = "spk-a1-1"
    with EventWatcher(controller) as watcher:
        fleet.start()
        try:
            watcher.wait_for(
                lambda events: any(t["online"] for t in transitions(events, device_id)), what="online"
            )
            fleet.set_control({"faults": {"a1-1": ["silent"]}})
            watcher.wait_for(
                lambda events: any(not t["online"] for t in transitions(events, device_id)),
                timeout=TIMEOUT_S + HEARTBEAT_S + 10,
                what="the silent speaker offline",
            )
            offline = next(t for t in transitions(watcher.events, device_id) if not t["online"])
            assert offline["reason"] == "timeout"
            # Noticed as its timeout ran out, not at some later sweep.
            assert (when(offline["detected_at"]) - when(offline["at"])).total_seconds() < 0.5
            watcher.wait_for(
                lambda events: any(a["state"] == "active" for a in alarms(events, device_id)),
                timeout=ALARM_AFTER_S + 10,
                what="an availability alarm",
            )
            fleet.set_control({})
            watcher.wait_for(
                lambda events: any(a["state"] == "cleared" for a in alarms(events, device_id)),
                what="back online, alarm cleared",
            )
            # The other speaker kept heartbeating all along.
            assert all(t["online"] for t in transitions(watcher.events, "spk-a1-2"))
            fleet.stop()
            watcher.wait_for(
                lambda events: any(t["reason"] == "shutdown" for t in transitions(events, device_id)),
                what="offline by a clean shutdown",
            )
        finally:
            fleet.stop()
    with controller.client() as client:
        history = client.get(f"/api/v1/devices/{device_id}/availability").json()
        device = client.get(f"/api/v1/devices/{device_id}").json()
    assert [(t["online"], t["reason"]) for t in history["transitions"]] == [
        (True, "state"),
        (False, "timeout"),
        (True, "state"),
        (False, "shutdown"),
    ]
    assert device["online"] is False


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_availability_history_checks_its_window(controller: ControllerHandle):
    seed(controller)
    with controller.client() as client:
        backwards = client.get(
            "/api/v1/devices/spk-a1-1/availability",
            params={"from": "2026-11-25T00:00:00Z", "to": "2026-11-24T00:00:00Z"},
        )
        unknown = client.get("/api/v1/devices/nope/availability")
    assert backwards.status_code == 422 and backwards.json()["field"] == "from"
    assert unknown.status_code == 404
