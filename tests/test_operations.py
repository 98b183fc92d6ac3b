"""Remote operations end to end (issue 6): volume, test tone, reboot and configuration on one device
and on a group, with real Mosquitto, the controller and simulated speakers in their own processes.
Each command is acknowledged and answered; the per-device results, the audit rows and what the
speakers report in their state are checked. Tests wait on the event stream, never on sleeps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.scenario import SPEAKERS, seed
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle, wait_until

pytestmark = pytest.mark.integration

ALL = [address for group in SPEAKERS.values() for address in group]


@pytest.fixture
def fleet(tmp_path: Path, controller: ControllerHandle) -> Iterator[FleetHandle]:
    workdir = tmp_path / "fleet"
    workdir.mkdir()
    handle = FleetHandle(
        controller.broker, workdir, ALL, controller.command_key, control=workdir / "control.json"
    )
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def operate(controller: ControllerHandle, watcher: EventWatcher, body: dict[str, Any]) -> dict[str, Any]:
    """Sends an operation and returns it once every device's result has ended."""
    with controller.client() as client:
        response = client.post("/api/v1/operations", json=body)
        assert response.status_code == 201, response.text
        operation_id = response.json()["id"]
        watcher.wait_for(
            lambda events: any(
                e.get("type") == "operation_finished" and e["operation_id"] == operation_id for e in events
            ),
            what=f"operation {body['type']} finished",
        )
        result: dict[str, Any] = client.get(f"/api/v1/operations/{operation_id}").json()
    return result


def device(controller: ControllerHandle, device_id: str) -> dict[str, Any]:
    with controller.client() as client:
        found: dict[str, Any] = client.get(f"/api/v1/devices/{device_id}").json()
    return found


def test_each_remote_operation_on_one_device_and_on_a_group(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    wait_until(lambda: all(device(controller, f"spk-{a}")["online"] for a in ALL), "all speakers online")
    with EventWatcher(controller) as watcher:
        # Volume on one device, then on a ward (5 speakers).
        one = operate(
            controller,
            watcher,
            {"type": "set_volume", "targets": {"devices": ["spk-a1-1"]}, "params": {"volume": 40}},
        )
        assert one["status"] == "completed" and one["device_count"] == 1
        (result,) = one["results"]
        assert result["state"] == "completed" and result["result"] == {"volume": 40}
        assert result["sent_at"] and result["delivered_at"] and result["ended_at"]
        wait_until(lambda: device(controller, "spk-a1-1")["volume"] == 40, "the state reports volume 40")
        ward = operate(
            controller,
            watcher,
            {"type": "set_volume", "targets": {"areas": ["hn.a"]}, "params": {"volume": 55}},
        )
        assert ward["counts"] == {"completed": 5}
        assert {r["device_id"] for r in ward["results"]} == {f"spk-{a}" for a in ALL if a.startswith("a")}

        # Test tone on a commune whose one speaker has a dead amplifier.
        fleet.set_control({"faults": {"b1-2": ["amplifier"]}})
        tone = _tone_until_fault_seen(controller, watcher)
        by_device = {r["device_id"]: r for r in tone["results"]}
        assert tone["status"] == "partial"
        assert by_device["spk-b1-2"]["state"] == "failed"
        assert by_device["spk-b1-2"]["result"] == {"self_test": "fail", "fault": "amplifier"}
        assert "amplifier" in by_device["spk-b1-2"]["detail"]
        for healthy in ("spk-b1-1", "spk-b2-1"):
            assert by_device[healthy]["state"] == "completed"
            assert by_device[healthy]["result"] == {"self_test": "pass"}
        wait_until(
            lambda: (device(controller, "spk-b1-2")["self_test"] or {}).get("result") == "fail",
            "the failed self-test in the device list",
        )

        # Configuration: quiet hours, comm-loss policy and heartbeat, echoed in the state.
        configured = operate(
            controller,
            watcher,
            {
                "type": "configure",
                "targets": {"areas": ["hn.a.t1"]},
                "params": {
                    "quiet_hours": {"start": "22:00", "end": "05:30"},
                    "comm_loss": {"policy": "stop_after", "after_s": 600},
                    "heartbeat_s": 30,
                },
            },
        )
        assert configured["counts"] == {"completed": 2}
        expected = {
            "quiet_hours": {"start": "22:00", "end": "05:30", "utc_offset_min": 420},
            "comm_loss": {"policy": "stop_after", "after_s": 600},
            "heartbeat_s": 30,
        }
        assert configured["results"][0]["result"] == {"config": expected}
        wait_until(
            lambda: device(controller, "spk-a1-2")["status"].get("config") == expected, "the config echoed"
        )
        assert device(controller, "spk-a1-2")["comm_loss"] == {"policy": "stop_after", "after_s": 600}

        # Reboot: the Last Will marks it offline, it comes back online with its programme kept.
        wait_until(
            lambda: device(controller, "spk-a2-1")["status"].get("programme") is not None,
            "the speaker reporting the programme it holds",
        )
        before = device(controller, "spk-a2-1")["status"].get("programme")
        rebooted = operate(controller, watcher, {"type": "reboot", "targets": {"devices": ["spk-a2-1"]}})
        assert rebooted["status"] == "completed"
        assert "booted_at" in rebooted["results"][0]["result"]
        steps = [
            (e["online"], e["reason"])
            for e in watcher.events
            if e.get("type") == "availability" and e["device_id"] == "spk-a2-1"
        ]
        assert steps == [(False, "will"), (True, "state")]
        assert device(controller, "spk-a2-1")["status"].get("programme") == before

    with controller.client() as client:
        audit = client.get("/api/v1/audit", params={"subject": one["id"]}).json()
        listed = client.get("/api/v1/operations").json()
    assert [entry["action"] for entry in audit] == ["operation.set_volume", "operation.finished"]
    assert audit[0]["detail"]["device_count"] == 1
    assert {op["type"] for op in listed} == {"set_volume", "test_tone", "configure", "reboot"}

    # The CLI: one command, results shown, exit 0 when every device did it.
    done = controller.cli("device", "volume", "35", "--device", "spk-b2-1", *api_args(controller))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "completed" in done.stdout
    shown = controller.cli("device", "show", "spk-a2-1", *api_args(controller))
    assert shown.returncode == 0, shown.stderr
    assert "will" in shown.stdout and "dBm" in shown.stdout
    listed_cli = controller.cli("device", "list", "--area", "hn.b", *api_args(controller))
    assert "fail" in listed_cli.stdout and "sim-1.0.0" in listed_cli.stdout


def _tone_until_fault_seen(controller: ControllerHandle, watcher: EventWatcher) -> dict[str, Any]:
    """The fleet reads its control file within a quarter of a second; a test tone sent before that
    would pass. Tone again until the injected fault shows (at most a few times)."""
    for _ in range(20):
        tone = operate(
            controller,
            watcher,
            {"type": "test_tone", "targets": {"areas": ["hn.b"]}, "params": {"duration_s": 1}},
        )
        if tone["status"] != "completed":
            return tone
    pytest.fail("the amplifier fault never showed in a self-test")


def api_args(controller: ControllerHandle) -> list[str]:
    return ["--api", controller.base_url, "--token", controller.token]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_operation_input_errors_name_the_field(controller: ControllerHandle):
    seed(controller)
    with controller.client() as client:
        client.post(
            "/api/v1/devices",
            json={"id": "led-1", "kind": "led_screen", "area": "hn.a.t1", "address": "led-1"},
        )

        def refused(body: dict[str, Any]) -> tuple[int, str]:
            response = client.post("/api/v1/operations", json=body)
            return response.status_code, response.json()["field"]

        spk = {"devices": ["spk-a1-1"]}
        assert refused({"type": "set_volume", "targets": spk, "params": {"volume": 101}}) == (
            422,
            "params.volume",
        )
        assert refused({"type": "set_volume", "targets": spk, "params": {"volume": "loud"}}) == (
            422,
            "params.volume",
        )
        assert refused(
            {"type": "configure", "targets": spk, "params": {"quiet_hours": {"start": "22h", "end": "05:00"}}}
        ) == (422, "params.quiet_hours.start")
        assert refused(
            {"type": "configure", "targets": spk, "params": {"comm_loss": {"policy": "stop_after"}}}
        ) == (
            422,
            "params.comm_loss.after_s",
        )
        assert refused({"type": "test_tone", "targets": spk, "params": {"duration_s": 60}}) == (
            422,
            "params.duration_s",
        )
        assert refused({"type": "explode", "targets": spk}) == (422, "type")
        assert refused({"type": "reboot", "targets": {}}) == (422, "targets")
        assert refused({"type": "reboot", "targets": {"devices": ["nope"]}}) == (404, "targets.devices[0]")
        assert refused(
            {"type": "set_volume", "targets": {"devices": ["led-1"]}, "params": {"volume": 5}}
        ) == (
            422,
            "targets.devices[0]",
        )
        assert refused({"type": "reboot", "targets": {"areas": ["nowhere"]}}) == (422, "targets.areas[0]")
        assert client.get("/api/v1/operations/nope").status_code == 404
    cli = controller.cli("device", "volume", "150", "--device", "spk-a1-1", *api_args(controller))
    assert cli.returncode == 1 and "params.volume" in cli.stderr + cli.stdout


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_technician_lists_only_its_wards_operations_and_one_devices_own(controller: ControllerHandle):
    seed(controller)
    technician = controller.api_key_with_wards("technician", ["hn.a"])
    with controller.client() as client:
        tone = {"type": "test_tone", "params": {"duration_s": 2}}
        inside = client.post("/api/v1/operations", json={**tone, "targets": {"devices": ["spk-a1-1"]}})
        outside = client.post("/api/v1/operations", json={**tone, "targets": {"devices": ["spk-b1-1"]}})
        group = client.post("/api/v1/operations", json={**tone, "targets": {"areas": ["hn.a.t1"]}})
        assert {inside.status_code, outside.status_code, group.status_code} == {201}
    with controller.client(technician) as client:
        listed = client.get("/api/v1/operations").json()
        assert [o["id"] for o in listed] == [group.json()["id"], inside.json()["id"]]
        assert client.get(f"/api/v1/operations/{outside.json()['id']}").status_code == 404
        mine = client.get("/api/v1/operations", params={"device": "spk-a1-2"}).json()
        assert [o["id"] for o in mine] == [group.json()["id"]]
        assert mine[0]["device_result"]["device_id"] == "spk-a1-2"
        assert sum(mine[0]["counts"].values()) == 1  # that device's result alone
        assert client.get("/api/v1/operations", params={"device": "spk-b1-1"}).json() == []
        # Acting outside its wards: another ward's device is unknown to it, another ward's area forbidden.
        device = client.post("/api/v1/operations", json={**tone, "targets": {"devices": ["spk-b1-1"]}})
        assert (device.status_code, device.json()["field"]) == (404, "targets.devices[0]")
        area = client.post("/api/v1/operations", json={**tone, "targets": {"areas": ["hn.b"]}})
        assert (area.status_code, area.json()["field"]) == (403, "targets.areas[0]")
        assert "'hn.a'" in area.json()["detail"]
        own = client.post("/api/v1/operations", json={**tone, "targets": {"areas": ["hn.a.t3"]}})
        assert own.status_code == 201, own.text
