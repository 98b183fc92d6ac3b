"""The simulated MQTT sensor (docs/protocol.md §1.6) against a real Mosquitto with the device ACL, alone
and in a fleet started from the command line; and its control document."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import signal
import statistics
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest

from controller.broker import mosquitto_password_hash
from firmware_sim import fleet
from firmware_sim.device import BrokerSettings, DeviceRuntime
from firmware_sim.fleet import FleetConfig, devices_from_csv
from firmware_sim.mqtt_sensor import QUANTITIES, SensorConfigError, SensorControl, SimulatedMqttSensor
from tests.sim_harness import (
    TEST_COMMAND_KEY,
    TEST_COMMAND_KEY_TEXT,
    ControllerProbe,
    DeviceTopicsProbe,
    play_command,
    start_fleet_cli,
    stop_command,
)
from tests.support.broker import TestBroker

T = TypeVar("T")
WAIT_S = 20.0
INTERVAL_S = 0.2
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
SHUTDOWN = {"v": 1, "online": False, "reason": "shutdown"}


class TelemetryProbe(DeviceTopicsProbe):
    """The controller's side: every telemetry document and state, by address, as they arrive."""

    def __init__(self, broker: TestBroker) -> None:
        super().__init__(broker, ("telemetry", "state"), "telemetry-probe")
        self.telemetry: dict[str, list[dict[str, Any]]] = {}

    def _record(self, address: str, leaf: str, document: dict[str, Any]) -> None:
        if leaf == "telemetry":
            self.telemetry.setdefault(address, []).append(document)
        else:
            super()._record(address, leaf, document)

    async def documents(self, address: str, count: int) -> list[dict[str, Any]]:
        """The first `count` telemetry documents of `address`, once they have arrived."""

        def enough() -> list[dict[str, Any]] | None:
            received = self.telemetry.get(address, [])
            return received[:count] if len(received) >= count else None

        return await self.wait_until(enough)

    async def reading(self, address: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first reading of `address` (any document) for which `predicate` holds."""

        def found() -> dict[str, Any] | None:
            return next(
                (
                    reading
                    for document in self.telemetry.get(address, [])
                    for reading in document["readings"]
                    if predicate(reading)
                ),
                None,
            )

        return await self.wait_until(found)

    async def state(self, address: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((s for s in reversed(self.states.get(address, [])) if predicate(s)), None)

        return await self.wait_until(found)


@pytest.fixture
async def telemetry_probe(mosquitto: TestBroker) -> AsyncIterator[TelemetryProbe]:
    async with TelemetryProbe(mosquitto) as probe:
        yield probe


@pytest.fixture
async def runtime(mosquitto: TestBroker) -> AsyncIterator[DeviceRuntime]:
    broker = BrokerSettings(
        host=mosquitto.host,
        port=mosquitto.port,
        username=mosquitto.simulator.username,
        password=mosquitto.simulator.password,
    )
    async with DeviceRuntime(broker, command_key=TEST_COMMAND_KEY) as device_runtime:
        yield device_runtime


async def started_sensor(runtime: DeviceRuntime, address: str, **options: Any) -> SimulatedMqttSensor:
    sensor = runtime.add(SimulatedMqttSensor(runtime, address, **options))
    await sensor.start(timeout=WAIT_S)
    return sensor


def device_time(document: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(document["at"])


@pytest.mark.integration
async def test_a_sensor_publishes_well_formed_telemetry_at_its_interval(
    mosquitto: TestBroker, runtime: DeviceRuntime, telemetry_probe: TelemetryProbe
) -> None:
    sensor = await started_sensor(
        runtime, "sen-river", metrics=("water_level", "rainfall"), interval_s=INTERVAL_S
    )
    documents = await telemetry_probe.documents("sen-river", 8)

    for document in documents:
        assert set(document) == {"v", "at", "readings"}
        assert document["v"] == 1
        assert TIMESTAMP.fullmatch(document["at"])
        assert [reading["metric"] for reading in document["readings"]] == ["water_level", "rainfall"]
        for reading in document["readings"]:
            quantity = QUANTITIES[reading["metric"]]
            assert set(reading) == {"metric", "value", "unit"}
            assert reading["unit"] == quantity.unit
            assert isinstance(reading["value"], int | float)
            assert quantity.minimum <= reading["value"] <= quantity.maximum
    levels = [document["readings"][0]["value"] for document in documents]
    assert len(set(levels)) > 1, "the water level should walk"
    # On a fixed grid: the device's own timestamps are one interval apart (a loaded machine adds jitter
    # to single gaps, not to their median).
    gaps = [
        (device_time(later) - device_time(earlier)).total_seconds()
        for earlier, later in itertools.pairwise(documents)
    ]
    assert 0.75 * INTERVAL_S <= statistics.median(gaps) <= 1.5 * INTERVAL_S
    assert sensor.documents_published >= 8

    # The retained state, as a subscriber that comes later sees it.
    async with TelemetryProbe(mosquitto) as latecomer:
        state = await latecomer.state("sen-river", lambda _state: True)
    assert state["online"] is True
    assert state["kind"] == "sensor"
    assert state["metrics"] == ["water_level", "rainfall"]
    assert state["interval_s"] == INTERVAL_S
    assert state["playing"] is None
    assert TIMESTAMP.fullmatch(state["at"])

    await sensor.stop()
    assert await telemetry_probe.state("sen-river", lambda s: not s["online"]) == SHUTDOWN


@pytest.mark.integration
async def test_a_forced_value_shows_up_until_the_walk_resumes(
    runtime: DeviceRuntime, telemetry_probe: TelemetryProbe
) -> None:
    # A long interval: every document of this test is asked for with publish_now().
    sensor = await started_sensor(runtime, "sen-flood", metrics=("water_level",), interval_s=3600)
    sensor.set_value("water_level", 5.5)
    assert sensor.publish_now()
    assert (await telemetry_probe.reading("sen-flood", lambda r: r["value"] == 5.5))["unit"] == "m"
    # Outside the plausible range too, so that the controller's range checks can be exercised.
    sensor.set_value("water_level", 9.75)
    sensor.publish_now()
    await telemetry_probe.reading("sen-flood", lambda r: r["value"] == 9.75)
    sensor.publish_now()
    await telemetry_probe.documents("sen-flood", 3)
    assert telemetry_probe.telemetry["sen-flood"][2]["readings"][0]["value"] == 9.75  # held

    sensor.resume_walk("water_level")
    for _ in range(3):
        sensor.publish_now()
    later = (await telemetry_probe.documents("sen-flood", 6))[3:]
    values = [document["readings"][0]["value"] for document in later]
    assert all(value <= QUANTITIES["water_level"].maximum for value in values)
    assert len(set(values)) > 1
    with pytest.raises(SensorConfigError, match="measures water_level"):
        sensor.set_value("rainfall", 1.0)


@pytest.mark.integration
async def test_the_acl_lets_a_sensor_publish_only_on_its_own_topics(
    mosquitto: TestBroker, runtime: DeviceRuntime, telemetry_probe: TelemetryProbe
) -> None:
    sensor = await started_sensor(runtime, "sen-a", interval_s=3600)
    assert sensor.publish_now()
    await telemetry_probe.documents("sen-a", 1)

    # Another device, on its own account (username = its address, docs/protocol.md §1.7), tries to speak
    # for sen-a, then publishes on its own topic.
    impostor_password = secrets.token_urlsafe(18)
    await asyncio.to_thread(
        mosquitto.broker.set_device_credentials, {"sen-c": mosquitto_password_hash(impostor_password)}
    )
    marker = {"v": 1, "at": "2026-01-01T00:00:00Z", "readings": [{"metric": "water_level", "value": 42.0}]}
    async with aiomqtt.Client(
        mosquitto.host,
        mosquitto.port,
        username="sen-c",
        password=impostor_password,
        identifier="sen-a-impostor",
    ) as impostor:
        await impostor.publish("wardcast/v1/dev/sen-a/telemetry", json.dumps(marker).encode(), qos=1)
        await impostor.publish("wardcast/v1/dev/sen-a/state", b'{"v":1,"online":false}', qos=1, retain=True)
        await impostor.publish("wardcast/v1/dev/sen-c/telemetry", json.dumps(marker).encode(), qos=1)
    # One connection's messages reach a subscriber in order: once the last one is in, the refused
    # ones would have been seen before it.
    await telemetry_probe.reading("sen-c", lambda r: r["value"] == 42.0)
    [document] = telemetry_probe.telemetry["sen-a"]  # its own, and nothing from the impostor
    assert document["readings"][0]["value"] != marker["readings"][0]["value"]
    assert all(state["online"] for state in telemetry_probe.states["sen-a"])


@pytest.mark.integration
async def test_a_sensor_acknowledges_a_stop_and_rejects_other_commands(
    runtime: DeviceRuntime, probe: ControllerProbe
) -> None:
    await started_sensor(runtime, "sen-air", metrics=("air_quality", "pm2_5"), interval_s=3600)
    stop = stop_command("sen-air", "*")
    play = play_command("sen-air", "http://127.0.0.1:9/media/x", "0" * 64, duration_s=1.0)
    await probe.send(stop)
    await probe.send(play)

    stopped = await probe.final_report(stop["id"], timeout=WAIT_S)
    assert stopped["state"] == "completed"
    assert "nothing to stop" in stopped["detail"]
    rejected = await probe.final_report(play["id"], timeout=WAIT_S)
    assert rejected["state"] == "rejected"
    assert rejected["detail"].startswith("type:")


@pytest.mark.integration
async def test_cli_fleet_runs_the_sensors_of_a_csv_and_follows_its_control_file(
    mosquitto: TestBroker, telemetry_probe: TelemetryProbe, tmp_path: Path
) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text("address,kind\nspk-a,speaker\nsen-1,sensor\nsen-2,sensor\nsen-3,SENSOR\n")
    control, stats = tmp_path / "control.json", tmp_path / "stats.jsonl"
    process = await start_fleet_cli(
        mosquitto,
        "--csv",
        str(devices),
        "--kinds",
        "sensor",
        "--processes",
        "2",
        "--sensor-interval",
        "3600",  # nothing but the control file makes them publish within the test
        "--sensor-metrics",
        "water_level,air_quality",
        "--control",
        str(control),
        "--stats",
        str(stats),
        "--stats-interval",
        "0.2",
    )
    assert process.stdout is not None
    try:
        assert (await asyncio.wait_for(process.stdout.readline(), WAIT_S)).decode() == "READY 3\n"
        await telemetry_probe.state("sen-3", lambda state: state["online"] and state["interval_s"] == 3600)
        document = {"sensor_interval_s": INTERVAL_S, "forced": {"sen-2": {"air_quality": 321}}}
        staging = tmp_path / "control.json.new"
        staging.write_text(json.dumps(document))
        staging.replace(control)  # whole, at once: what the fleet's docstring asks of a writer
        forced = await telemetry_probe.reading(
            "sen-2", lambda r: r == {**r, "metric": "air_quality", "value": 321}
        )
        assert forced["unit"] == "VN_AQI"
        for address in ("sen-1", "sen-3"):
            await telemetry_probe.documents(address, 3)
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(process.wait(), WAIT_S)

    assert exit_code == 0
    assert "spk-a" not in telemetry_probe.states
    await telemetry_probe.wait_until(
        lambda: all(telemetry_probe.states[a][-1] == SHUTDOWN for a in ("sen-1", "sen-2", "sen-3"))
    )
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    last_by_process = {line["pid"]: line for line in lines}
    assert len(last_by_process) == 2
    assert sum(line["sensors"] for line in last_by_process.values()) == 3
    published = sum(line["published"] for line in last_by_process.values())
    assert published >= sum(len(telemetry_probe.telemetry[a]) for a in ("sen-1", "sen-2", "sen-3"))
    assert all(line["acknowledged"] >= line["published"] for line in last_by_process.values())


def test_the_control_document_is_checked_and_applied_whole() -> None:
    assert SensorControl.parse("") == SensorControl()
    control = SensorControl.parse('{"sensor_interval_s": 2, "forced": {"sen-1": {"rainfall": 80}}}')
    assert control.interval_s == 2.0
    assert control.forced == {"sen-1": {"rainfall": 80.0}}
    for text, message in [
        ("[1]", "JSON object"),
        ("{", "not JSON"),
        ('{"sensor_interval_s": 0}', "above 0"),
        ('{"sensor_interval_s": true}', "must be a number"),
        ('{"forced": {"sen-1": {"rainfall": "high"}}}', "finite numbers"),
        ('{"forced": [1]}', "forced must map"),
    ]:
        with pytest.raises(SensorConfigError, match=message):
            SensorControl.parse(text)


def test_sensors_are_listed_by_kind_and_travel_to_workers(tmp_path: Path) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text("address,kind\nspk-1,speaker\nsen-1,sensor\nled-1,led_screen\n")
    assert devices_from_csv(devices, ("sensor",)) == [("sen-1", "sensor")]
    assert devices_from_csv(devices) == [("spk-1", "speaker")]
    config = FleetConfig(
        broker=BrokerSettings(host="127.0.0.1"),
        command_key=TEST_COMMAND_KEY_TEXT,
        addresses=("spk-1",),
        sensors=("sen-1", "sen-2"),
        sensor_interval_s=0.5,
        sensor_metrics=("rainfall", "noise"),
        seed=7,
        control=tmp_path / "control.json",
        stats=tmp_path / "stats.jsonl",
    )
    assert FleetConfig.from_json(config.to_json()) == config
    assert config.devices()[-1] == ("sen-2", "sensor")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--count", "1", "--sensor-interval", "0"], "above 0"),
        (["--count", "1", "--sensor-metrics", "water_level,humidity"], "humidity"),
        (["--count", "1", "--stats-interval", "0"], "--stats-interval"),
        (["--kinds", "sensor"], "no devices to simulate"),
    ],
)
def test_cli_sensor_usage_errors_exit_2(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet.main(arguments) == 2
    assert message in capsys.readouterr().err
