"""Field-bus sensors registered through the API: Modbus sensors polled by the controller from a simulated
box in its own process over Modbus TCP (the box killed and started again), and a CoAP sensor observed
from the CoAP sensor simulator; their readings on the telemetry API."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.scenario import seed
from tests.support.system import ControllerHandle, ManagedProcess, free_tcp_port, start_process, wait_until

pytestmark = pytest.mark.integration


def start_box(workdir: Path, port: int = 0) -> tuple[ManagedProcess, int]:
    process = start_process(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "modbus-box",
            "--tcp",
            f"127.0.0.1:{port}",
            "--walk-interval",
            "0.1",
        ],
        dict(os.environ),
        workdir / "modbus-box.log",
        "the simulated Modbus box",
    )
    match = re.search(r"tcp=127\.0\.0\.1:(\d+)", process.ready_line)
    assert match, process.ready_line
    return process, int(match.group(1))


@pytest.fixture
def box(tmp_path: Path) -> Iterator[tuple[ManagedProcess, int]]:
    process, port = start_box(tmp_path)
    try:
        yield process, port
    finally:
        process.terminate()


def river_box(port: int) -> dict[str, Any]:
    return {
        "id": "sen-box",
        "kind": "sensor",
        "area": "hn.b",
        "transport": "modbus",
        "config": {
            "metrics": {"water_level": {"unit": "m", "min": 0, "max": 6}},
            "modbus": {
                "link": f"tcp://127.0.0.1:{port}",
                "unit": 1,
                "poll_interval_s": 0.2,
                "registers": [
                    {
                        "metric": "water_level",
                        "table": "holding",
                        "address": 202,
                        "type": "float32",
                        "word_order": "little",
                        "unit": "m",
                    },
                    {"metric": "mains_voltage", "address": 1, "scale": 0.1, "unit": "V"},
                    {"metric": "rainfall", "address": 100, "scale": 0.1, "unit": "mm"},
                ],
            },
        },
    }


def latest(controller: ControllerHandle) -> dict[str, dict[str, Any]]:
    with controller.client() as client:
        metrics = client.get("/api/v1/devices/sen-box/telemetry/latest").json()["metrics"]
    return {m["metric"]: m for m in metrics}


def device(controller: ControllerHandle) -> dict[str, Any]:
    with controller.client() as client:
        found: dict[str, Any] = client.get("/api/v1/devices/sen-box").json()
    return found


def test_a_modbus_sensor_is_polled_into_telemetry_and_goes_offline_and_back_with_its_box(
    controller: ControllerHandle, box: tuple[ManagedProcess, int], tmp_path: Path
) -> None:
    seed(controller)
    process, port = box
    with controller.client() as client:
        response = client.post("/api/v1/devices", json=river_box(port))
    assert response.status_code == 201, response.text
    wait_until(lambda: len(latest(controller)) == 3, "readings of all three registers", timeout=30)
    readings = latest(controller)
    assert 0 <= readings["water_level"]["value"] <= 6 and readings["water_level"]["unit"] == "m"
    assert 198 <= readings["mains_voltage"]["value"] <= 242 and readings["mains_voltage"]["unit"] == "V"
    wait_until(lambda: device(controller)["online"], "the sensor online")
    first_level_at = readings["water_level"]["at"]
    wait_until(
        lambda: latest(controller)["water_level"]["at"] != first_level_at, "a later reading", timeout=30
    )

    process.kill()
    # The online flag and the driver's status are written by two batches (availability, tracker): wait
    # for both rather than read the second the instant the first is seen.
    wait_until(
        lambda: (found := device(controller))["online"] is False and found["status"]["degraded"] is True,
        "the sensor offline and degraded once its box died",
        timeout=30,
    )
    restarted, _ = start_box(tmp_path, port)
    try:
        wait_until(lambda: device(controller)["online"], "the sensor online again", timeout=30)
    finally:
        restarted.terminate()
    with controller.client() as client:
        series = client.get("/api/v1/devices/sen-box/telemetry", params={"metric": "water_level"}).json()
    (water,) = series["series"]
    assert len(water["points"]) >= 2


# Input checks and transport plumbing: the database adds nothing here (SQLite only, to keep CI short).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_modbus_settings_are_refused_naming_the_field(controller: ControllerHandle) -> None:
    seed(controller)
    port = free_tcp_port()
    cases = [
        ({"link": "ftp://x"}, "config.modbus.link"),
        ({"unit": 0}, "config.modbus.unit"),
        ({"registers": []}, "config.modbus.registers"),
        ({"registers": [{"metric": "w", "address": 70000}]}, "config.modbus.registers[0].address"),
        ({"registers": [{"metric": "w", "address": 1, "type": "int64"}]}, "config.modbus.registers[0].type"),
        ({"registers": [{"metric": "w", "address": 1, "scale": 0}]}, "config.modbus.registers[0].scale"),
    ]
    with controller.client() as client:
        for change, field in cases:
            body = river_box(port)
            body["config"]["modbus"].update(change)
            response = client.post("/api/v1/devices", json=body)
            assert response.status_code == 422, (field, response.text)
            assert response.json()["field"] == field, response.text
        no_settings = {**river_box(port), "config": {}}
        response = client.post("/api/v1/devices", json=no_settings)
        assert response.status_code == 422 and response.json()["field"] == "config.modbus"
        speaker = {**river_box(port), "kind": "speaker"}
        response = client.post("/api/v1/devices", json=speaker)
        assert response.status_code == 422 and response.json()["field"] == "transport"
        assert client.get("/api/v1/devices/sen-box").status_code == 404


# Input checks and transport plumbing: the database adds nothing here (SQLite only, to keep CI short).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_coap_sensor_is_observed_into_telemetry(controller: ControllerHandle, tmp_path: Path) -> None:
    seed(controller)
    sensor = start_process(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "coap-sensor",
            "--quantities",
            "water_level,rainfall",
            "--report-interval",
            "0.5",
            "--walk-interval",
            "0.2",
        ],
        dict(os.environ),
        tmp_path / "coap-sensor.log",
        "the simulated CoAP sensor",
    )
    try:
        match = re.search(r"coap=(127\.0\.0\.1:\d+)", sensor.ready_line)
        assert match, sensor.ready_line
        address = f"coap://{match.group(1)}"
        with controller.client() as client:
            response = client.post(
                "/api/v1/devices",
                json={
                    "id": "sen-coap",
                    "kind": "sensor",
                    "area": "hn.a",
                    "transport": "coap",
                    "address": address,
                    "config": {"metrics": {"water_level": {"unit": "m", "min": 0, "max": 6}}},
                },
            )
            assert response.status_code == 201, response.text
            bad = client.post(
                "/api/v1/devices",
                json={"kind": "sensor", "area": "hn.a", "transport": "coap", "address": "coap://"},
            )
            assert bad.status_code == 422 and bad.json()["field"] == "address", bad.text

        def coap_latest() -> dict[str, Any]:
            with controller.client() as client:
                metrics = client.get("/api/v1/devices/sen-coap/telemetry/latest").json()["metrics"]
            return {m["metric"]: m for m in metrics}

        # Discovered through /.well-known/core, observed: both quantities arrive, with their units.
        wait_until(lambda: {"water_level", "rainfall"} <= set(coap_latest()), "both readings", timeout=30)
        readings = coap_latest()
        assert readings["water_level"]["unit"] == "m" and 0 <= readings["water_level"]["value"] <= 6
        assert readings["rainfall"]["unit"] == "mm"
        with controller.client() as client:
            assert client.get("/api/v1/devices/sen-coap").json()["online"]
    finally:
        sensor.terminate()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# Input checks and transport plumbing: the database adds nothing here (SQLite only, to keep CI short).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_field_simulators_start_from_the_registry_and_the_controller_reads_them(
    controller: ControllerHandle, tmp_path: Path
) -> None:
    seed(controller)
    modbus_port, sign_port, coap_port = free_tcp_port(), free_tcp_port(), free_udp_port()
    with controller.client() as client:
        for body in (
            river_box(modbus_port),
            {
                "id": "sen-air",
                "kind": "sensor",
                "area": "hn.a",
                "transport": "coap",
                "address": f"coap://127.0.0.1:{coap_port}",
            },
            {
                "id": "led-a1",
                "kind": "led_screen",
                "area": "hn.a.t1",
                "transport": "serial",
                "config": {
                    "serial": {
                        "port": f"socket://127.0.0.1:{sign_port}",
                        "sign_address": "01",
                        "framing": "8N1",
                    }
                },
            },
        ):
            response = client.post("/api/v1/devices", json=body)
            assert response.status_code == 201, response.text
    simulators = start_process(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "field-devices",
            "--from-api",
            controller.base_url,
            "--token",
            controller.token,
        ],
        dict(os.environ),
        tmp_path / "field-devices.log",
        "the field-device simulators",
    )
    try:
        assert simulators.ready_line == "READY modbus=1 coap=1 signs=1 skipped=0"

        def online(device_id: str) -> bool:
            with controller.client() as client:
                found: bool = client.get(f"/api/v1/devices/{device_id}").json()["online"]
            return found

        wait_until(lambda: len(latest(controller)) == 3, "the Modbus sensor's readings", timeout=30)
        wait_until(lambda: online("sen-box") and online("sen-air"), "both sensors online", timeout=30)
        # The sign was registered before its line existed: it is set up on its first command.
        with controller.client() as client:
            alert = client.post(
                "/api/v1/alerts",
                json={
                    "headline": "Thử",
                    "text": "Thử bảng tin.",
                    "targets": {"devices": ["led-a1"]},
                    "mode": "drill",
                },
            )
            assert alert.status_code == 201, alert.text
            broadcast_id = alert.json()["broadcast_id"]

        def sign_state() -> str:
            with controller.client() as client:
                deliveries = client.get(f"/api/v1/broadcasts/{broadcast_id}").json()["deliveries"]
            state: str = deliveries[0]["state"]
            return state

        wait_until(lambda: sign_state() == "playing", "the sign showing the drill", timeout=30)
    finally:
        simulators.terminate()
