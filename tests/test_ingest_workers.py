"""MQTT telemetry through the ingest worker processes (controller/ingest_worker.py), end to end: a real
Mosquitto (auth + ACL, a shared subscription), the controller and its workers, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.broker import TestBroker
from tests.support.mqtt_sensor import SensorClient
from tests.support.scenario import seed
from tests.support.system import ControllerHandle, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)
SENSORS = ("gauge-1", "gauge-2", "gauge-3", "gauge-4")


def register(controller: ControllerHandle, address: str) -> None:
    with controller.client() as client:
        response = client.post(
            "/api/v1/devices",
            json={
                "id": f"sen-{address}",
                "kind": "sensor",
                "area": "hn.b",
                "address": address,
                "config": {"metrics": {"water_level": {"unit": "m", "min": 0, "max": 10}}},
            },
        )
    assert response.status_code == 201, response.text


def stored_minutes(controller: ControllerHandle, address: str) -> list[int]:
    """The minutes after T0 of the readings stored for one sensor, in order, duplicates kept."""
    with controller.client() as client:
        response = client.get(
            f"/api/v1/devices/sen-{address}/telemetry",
            params={"from": "2026-11-24T00:00:00Z", "to": "2026-11-25T00:00:00Z"},
        )
    assert response.status_code == 200, response.text
    series = response.json()["series"]
    points = series[0]["points"] if series else []
    return [int((datetime.fromisoformat(p["at"]) - T0).total_seconds() // 60) for p in points]


def metric(controller: ControllerHandle, name: str) -> float:
    with controller.client() as client:
        text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def ingest_workers(controller: ControllerHandle) -> list[int]:
    """The process ids of the controller's ingest workers."""
    assert controller.process is not None
    pid = controller.process.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if b"controller.ingest_worker" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def publish_minutes(sensors: dict[str, SensorClient], minutes: range) -> None:
    for minute in minutes:
        for sensor in sensors.values():
            sensor.readings(T0 + timedelta(minutes=minute), water_level=1.0 + minute / 100)


def test_workers_share_the_sensors_store_each_reading_once_and_a_killed_worker_loses_nothing(
    tmp_path: Path, database_url: str, mosquitto: TestBroker
) -> None:
    # First without workers: the controller's persistent session then holds the telemetry subscription,
    # which a later run with workers must drop (or every reading would be stored twice).
    controller = ControllerHandle(
        workdir=tmp_path,
        database_url=database_url,
        broker=mosquitto,
        extra_env={"WARDCAST_TELEMETRY__INGEST_WORKERS": "0"},
    )
    controller.start()
    sensors = {address: SensorClient(mosquitto, address) for address in SENSORS}
    try:
        seed(controller)
        for address in SENSORS[:3]:
            register(controller, address)
        publish_minutes(sensors, range(5))
        wait_until(
            lambda: all(len(stored_minutes(controller, a)) == 5 for a in SENSORS[:3]),
            "the controller storing the readings itself",
        )
        assert not ingest_workers(controller)
        controller.stop()

        controller.extra_env["WARDCAST_TELEMETRY__INGEST_WORKERS"] = "2"
        controller.start()
        assert len(ingest_workers(controller)) == 2
        # A sensor registered while the workers run: its readings are stored from the first one.
        register(controller, SENSORS[3])
        publish_minutes(sensors, range(5, 25))
        wait_until(
            lambda: all(len(stored_minutes(controller, a)) == 25 for a in SENSORS[:3]),
            "the workers storing the readings",
        )
        # A worker killed as a crash would: the supervisor starts another, and the broker kept what
        # arrived meanwhile for the worker's persistent session.
        killed = ingest_workers(controller)[0]
        os.kill(killed, signal.SIGKILL)
        publish_minutes(sensors, range(25, 40))
        wait_until(
            lambda: len(ingest_workers(controller)) == 2 and killed not in ingest_workers(controller),
            "the supervisor restarting the killed worker",
        )
        wait_until(
            lambda: all(len(stored_minutes(controller, a)) >= 40 for a in SENSORS[:3]),
            "every reading stored after the restart",
        )
        for address in SENSORS[:3]:
            assert stored_minutes(controller, address) == list(range(40)), address
        assert stored_minutes(controller, SENSORS[3]) == list(range(5, 40))
        assert metric(controller, "wardcast_telemetry_written_total") == 3 * 35 + 35
        with controller.client() as client:
            latest = client.get(f"/api/v1/devices/sen-{SENSORS[3]}/telemetry/latest").json()["metrics"]
        assert latest[0]["value"] == pytest.approx(1.39)
        assert latest[0]["at"] == "2026-11-24T06:39:00Z"
    finally:
        for sensor in sensors.values():
            sensor.close()
        controller.stop()
    log = (tmp_path / "controller.log").read_text()
    assert "an ingest worker exited; restarting it" in log


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_refuses_bad_readings_and_payloads_counting_them(
    controller: ControllerHandle, mosquitto: TestBroker
) -> None:
    seed(controller)
    register(controller, "gauge-1")
    sensor = SensorClient(mosquitto, "gauge-1")
    stranger = SensorClient(mosquitto, "not-registered")
    try:
        sensor.readings(T0, water_level=65.535)  # beyond the physical range of 0 … 10 m
        sensor.raw(b"{not json")
        stranger.readings(T0, water_level=1.0)
        sensor.readings(T0 + timedelta(minutes=1), water_level=2.0)
        wait_until(lambda: stored_minutes(controller, "gauge-1") == [1], "the good reading stored")
        wait_until(
            lambda: (
                metric(controller, 'wardcast_rejected_payloads_total{reason="malformed"}') == 1
                and metric(controller, 'wardcast_rejected_payloads_total{reason="unknown_device"}') == 1
                and metric(controller, 'wardcast_telemetry_readings_total{outcome="rejected"}') == 1
            ),
            "the worker's counters on the controller's /metrics",
        )
        with controller.client() as client:
            latest = client.get("/api/v1/devices/sen-gauge-1/telemetry/latest").json()["metrics"]
        assert latest[0]["value"] == 2.0
        assert latest[0]["rejected_count"] == 1
        assert "65.535 is above the physical range" in latest[0]["last_rejected"]["reason"]
    finally:
        sensor.close()
        stranger.close()
