"""The CoAP driver (drivers/coap.py) against the simulated sensor (firmware_sim/coap_sensor.py) over
real UDP, and both against libcoap's command-line tools as independent peers (docs/protocol.md §5)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiocoap import error as coap_error

from drivers.base import (
    DeviceCommand,
    DeviceState,
    DeviceTimeout,
    DeviceUnreachable,
    InboundEvent,
    MalformedPayload,
    ProtocolError,
    TelemetryReading,
)
from drivers.coap import (
    CoapClientError,
    CoapDriver,
    CoapSensor,
    CoapServerError,
    CoapTiming,
    MetricLimits,
    OutOfRangeError,
    PayloadError,
    ReadingResource,
    decode_reading,
    encode_command,
    parse_address,
    parse_link_format,
    reading_resources,
)
from firmware_sim import coap_sensor
from firmware_sim.coap_sensor import (
    BadRequestError,
    CoapSensorSimulator,
    SensorConfig,
    parse_command,
    parse_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 10.0
COAP_CLIENT = "/usr/bin/coap-client-notls"
COAP_SERVER = "/usr/bin/coap-server-notls"
integration = pytest.mark.integration

# Short RFC 7252 §4.8 parameters, so that a silent sensor fails in ~2 s instead of the RFC's 93 s.
FAST = CoapTiming(
    ack_timeout_s=0.1,
    ack_random_factor=1.5,
    max_retransmit=3,
    reregister_initial_s=0.1,
    reregister_max_s=0.4,
    notification_grace_s=0.5,
)
LIMITS = {
    "water_level": MetricLimits("m", 0.0, 6.0),
    "rainfall": MetricLimits("mm", 0.0, 120.0),
    "air_quality": MetricLimits("VN_AQI", 0.0, 500.0),
}
WATER_LEVEL = "/sensors/water_level"


def command(address: str, document: dict[str, object], *, expires_in_s: float = 60.0) -> DeviceCommand:
    return DeviceCommand(
        address=address,
        command_id=f"cmd-{time.monotonic_ns()}",
        document=document,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_s),
    )


class EventLog:
    """Collects a driver's events in the background, so a test can wait for one without sleeping."""

    def __init__(self, driver: CoapDriver) -> None:
        self.seen: list[InboundEvent] = []
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(driver))

    async def _collect(self, driver: CoapDriver) -> None:
        async for event in driver.events():
            self.seen.append(event)
            self._changed.set()

    def mark(self) -> int:
        return len(self.seen)

    async def wait_for(
        self, predicate: Callable[[InboundEvent], bool], *, since: int = 0, timeout: float = WAIT_S
    ) -> InboundEvent:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.seen[since:]:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    async def reading(self, metric: str, *, since: int = 0, value: float | None = None) -> TelemetryReading:
        event = await self.wait_for(
            lambda event: (
                isinstance(event, TelemetryReading)
                and event.metric == metric
                and (value is None or event.value == pytest.approx(value))
            ),
            since=since,
        )
        assert isinstance(event, TelemetryReading)
        return event

    def readings(self, metric: str, *, since: int = 0) -> list[TelemetryReading]:
        return [
            event
            for event in self.seen[since:]
            if isinstance(event, TelemetryReading) and event.metric == metric
        ]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def sensor() -> AsyncIterator[CoapSensorSimulator]:
    config = SensorConfig(walk_interval_s=0.05, report_interval_s=0.5)
    async with CoapSensorSimulator(config) as simulated:
        yield simulated


@pytest.fixture
async def driver(sensor: CoapSensorSimulator) -> AsyncIterator[CoapDriver]:
    async with CoapDriver([CoapSensor(sensor.address, limits=LIMITS)], timing=FAST) as coap:
        yield coap


@pytest.fixture
async def bare_driver() -> AsyncIterator[CoapDriver]:
    """A driver observing nothing, so that only the test's own requests reach the sensor."""
    async with CoapDriver(timing=FAST) as coap:
        yield coap


@pytest.fixture
async def events(driver: CoapDriver) -> AsyncIterator[EventLog]:
    log = EventLog(driver)
    yield log
    await log.close()


# Pure: link format, payloads, command documents, timing


LIBCOAP_WELL_KNOWN_CORE = (
    '</>;title="General Info";ct=0,</time>;if="clock";rt="ticks";title="Internal Clock";ct=0;obs,'
    '</async>;ct=0,</example_data>;title="Example Data";ct=0;obs'
)


def test_link_format_is_parsed_into_resources() -> None:
    resources = {resource.path: resource for resource in parse_link_format(LIBCOAP_WELL_KNOWN_CORE)}
    assert set(resources) == {"/", "/time", "/async", "/example_data"}
    clock = resources["/time"]
    assert (clock.resource_types, clock.interfaces, clock.content_formats) == (("ticks",), ("clock",), (0,))
    assert clock.observable
    assert clock.title == "Internal Clock"
    assert not resources["/async"].observable
    several = parse_link_format(
        '<sensors/rain>;rt="wardcast.reading core.s";ct="50 60";obs,<coap://elsewhere/x>;rt="wardcast.reading"'
    )
    assert [resource.path for resource in several] == ["/.well-known/sensors/rain"]
    assert several[0].resource_types == ("wardcast.reading", "core.s")
    assert several[0].content_formats == (50, 60)
    assert reading_resources(several) == (ReadingResource("/.well-known/sensors/rain"),)
    assert parse_link_format("") == ()


@pytest.mark.parametrize("document", ["garbage", "</x", '</x>;ct="fifty"'])
def test_link_format_garbage_is_a_value_error(document: str) -> None:
    with pytest.raises(ValueError, match=r"link format|ct must be numeric"):
        parse_link_format(document)


def _decode(
    payload: bytes, *, content_format: int | None = 50, resource: ReadingResource | None = None
) -> TelemetryReading:
    return decode_reading(
        "coap://sensor",
        resource or ReadingResource(WATER_LEVEL),
        payload,
        content_format,
        limits=LIMITS["water_level"],
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_reading_documents_decode() -> None:
    reading = _decode(b'{"v":1,"value":1.8,"unit":"m","at":"2026-11-24T03:00:00.250Z"}')
    assert (reading.address, reading.metric, reading.value, reading.unit) == (
        "coap://sensor",
        "water_level",
        1.8,
        "m",
    )
    assert reading.at == datetime(2026, 11, 24, 3, 0, 0, 250_000, tzinfo=UTC)
    # Without "v", "unit" and "at": version 1, the configured unit, the arrival time.
    bare = _decode(b'{"value": 2}', content_format=None)
    assert (bare.value, bare.unit, bare.at) == (2.0, "m", datetime(2026, 1, 1, tzinfo=UTC))
    text = _decode(b" 2.15\n", content_format=0, resource=ReadingResource("/t", "text", metric="level"))
    assert (text.metric, text.value, text.unit) == ("level", 2.15, "m")


@pytest.mark.parametrize(
    ("payload", "content_format", "reason"),
    [
        (coap_sensor.GARBAGE_PAYLOAD, 50, "not UTF-8"),
        (b"{value: 1", 50, "not JSON"),
        (b"[1.8]", 50, "not a JSON object"),
        (b'{"unit": "m"}', 50, "value is missing or not a number"),
        (b'{"value": true}', 50, "value is missing or not a number"),
        (b'{"value": "1.8"}', 50, "value is missing or not a number"),
        (b'{"value": NaN}', 50, "not finite"),
        (b'{"v": 2, "value": 1.8}', 50, "wire version 2"),
        (b'{"value": 1.8, "at": "yesterday"}', 50, "not an ISO-8601 time"),
        (b'{"value": 1.8, "at": "2026-11-24T03:00:00"}', 50, "no UTC offset"),
        (b'{"value": 1.8}', 0, "content-format 0"),
    ],
)
def test_undecodable_readings_name_the_reason(payload: bytes, content_format: int, reason: str) -> None:
    with pytest.raises(PayloadError, match=re.escape(reason)) as caught:
        _decode(payload, content_format=content_format)
    assert not isinstance(caught.value, OutOfRangeError)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"value": 6.5, "unit": "m"}', "outside its physical range 0..6"),
        (b'{"value": -0.1}', "outside"),
        (b'{"value": 180, "unit": "cm"}', "unit 'cm' where 'm' is expected"),
    ],
)
def test_implausible_readings_are_out_of_range(payload: bytes, reason: str) -> None:
    with pytest.raises(OutOfRangeError, match=re.escape(reason)):
        _decode(payload)


def test_command_documents_become_put_and_post() -> None:
    configure = encode_command({"op": "configure", "config": {"report_interval_s": 10}})
    assert (configure.method, configure.path, configure.content_format) == ("PUT", "/config", 50)
    assert json.loads(configure.payload) == {"v": 1, "report_interval_s": 10}
    identify = encode_command({"op": "command", "action": "identify", "duration_s": 5})
    assert (identify.method, identify.path) == ("POST", "/command")
    assert json.loads(identify.payload) == {"v": 1, "action": "identify", "duration_s": 5}
    elsewhere = encode_command({"op": "configure", "path": "/example_data", "config": {"a": 1}})
    assert elsewhere.path == "/example_data"
    sensor = CoapSensor("coap://127.0.0.1", config_path="/cfg", command_path="/do")
    assert encode_command({"op": "command", "action": "reboot"}, sensor).path == "/do"


@pytest.mark.parametrize(
    ("document", "member"),
    [
        ({}, "op"),
        ({"op": "delete"}, "op"),
        ({"op": "configure"}, "config"),
        ({"op": "configure", "config": {}}, "config"),
        ({"op": "configure", "config": {"x": float("nan")}}, "config"),
        ({"op": "command"}, "action"),
        ({"op": "command", "action": "identify", "path": "relative"}, "resource path"),
    ],
)
def test_bad_command_documents_name_the_member(document: dict[str, object], member: str) -> None:
    with pytest.raises(ValueError, match=member):
        encode_command(document)


def test_timing_follows_rfc_7252() -> None:
    defaults = CoapTiming()
    assert (defaults.ack_timeout_s, defaults.ack_random_factor, defaults.max_retransmit) == (2.0, 1.5, 4)
    assert defaults.max_transmit_wait_s == pytest.approx(93.0)
    assert defaults.exchange_timeout_s == pytest.approx(95.0)
    tuning = FAST.transport_tuning()
    assert (tuning.ACK_TIMEOUT, tuning.MAX_RETRANSMIT) == (0.1, 3)
    assert math.isclose(tuning.MAX_TRANSMIT_WAIT, 2.25)
    with pytest.raises(ValueError, match="ack_random_factor"):
        CoapTiming(ack_random_factor=0.5)
    with pytest.raises(ValueError, match="expected coap://"):
        parse_address("http://127.0.0.1")
    assert parse_address("coap://[::1]") == ("::1", 5683)
    with pytest.raises(ValueError, match="empty"):
        MetricLimits("m", 5.0, 1.0)


def test_simulator_validates_bodies_naming_the_member() -> None:
    assert parse_config(b'{"report_interval_s": 5, "future": 1}') == {"report_interval_s": 5}
    for body, member in [
        (b'{"report_interval_s": "x"}', "report_interval_s"),
        (b'{"report_interval_s": 0}', "report_interval_s"),
        (b'{"label": 7}', "label"),
        (b'{"v": 2, "label": "x"}', "v:"),
        (b'{"other": 1}', "no config member"),
        (b"\xff", "body"),
    ]:
        with pytest.raises(BadRequestError, match=member):
            parse_config(body)
    assert parse_command(b'{"action": "identify"}') == "identify"
    with pytest.raises(BadRequestError, match="action: unknown 'dance'"):
        parse_command(b'{"action": "dance"}')


# Driver ↔ simulator, over UDP


@integration
async def test_discovery_lists_the_sensor_resources(sensor: CoapSensorSimulator, driver: CoapDriver) -> None:
    resources = {
        resource.path: resource for resource in await driver.discover(sensor.address, timeout=WAIT_S)
    }
    for quantity in sensor.quantities:
        reading = resources[f"/sensors/{quantity}"]
        assert reading.resource_types == ("wardcast.reading",)
        assert reading.interfaces == ("core.s",)
        assert reading.content_formats == (50,)
        assert reading.observable
    assert resources["/config"].resource_types == ("wardcast.config",)
    assert resources["/command"].resource_types == ("wardcast.command",)
    assert not resources["/config"].observable


@integration
async def test_observe_yields_changing_readings_with_units(
    sensor: CoapSensorSimulator, driver: CoapDriver, events: EventLog
) -> None:
    online = await events.wait_for(lambda event: isinstance(event, DeviceState))
    assert isinstance(online, DeviceState)
    assert (online.address, online.online, online.attributes["degraded"]) == (sensor.address, True, False)
    levels: set[float] = set()
    while len(levels) < 3:
        reading = await events.reading("water_level", since=events.mark())
        assert reading.unit == "m"
        assert 0.0 <= reading.value <= 6.0
        levels.add(reading.value)
    for metric, unit in [
        ("rainfall", "mm"),
        ("air_quality", "VN_AQI"),
        ("pm2_5", "µg/m³"),
        ("temperature", "°C"),
    ]:
        assert (await events.reading(metric)).unit == unit
    assert driver.health(sensor.address).registrations >= len(sensor.quantities)
    assert not driver.degraded(sensor.address)


@integration
async def test_a_set_value_shows_up_and_stays(sensor: CoapSensorSimulator, events: EventLog) -> None:
    await events.reading("water_level")
    mark = events.mark()
    sensor.set_value("water_level", 3.4)
    await events.reading("water_level", since=mark, value=3.4)
    # The pinned value keeps coming with the report interval while the other quantities walk on.
    mark = events.mark()
    await events.wait_for(lambda _: len(events.readings("water_level", since=mark)) >= 2, since=mark)
    assert {reading.value for reading in events.readings("water_level", since=mark)} == {3.4}


@integration
async def test_confirmable_put_and_post_are_acked(sensor: CoapSensorSimulator, driver: CoapDriver) -> None:
    configure = command(
        sensor.address, {"op": "configure", "config": {"report_interval_s": 2, "label": "Cầu Rồng"}}
    )
    ack = await driver.send(configure, timeout=WAIT_S)
    assert ack.command_id == configure.command_id
    assert ack.published_at <= ack.accepted_at
    assert (sensor.report_interval_s, sensor.label) == (2.0, "Cầu Rồng")
    assert sensor.max_age_s == 3
    identify = command(sensor.address, {"op": "command", "action": "identify"})
    assert (await driver.send(identify, timeout=WAIT_S)).command_id == identify.command_id
    assert (sensor.counters.commands, sensor.counters.identifies) == (1, 1)
    current = await driver.request(sensor.address, "GET", "/config", timeout=WAIT_S)
    assert json.loads(current.payload) == {"v": 1, "report_interval_s": 2.0, "label": "Cầu Rồng"}


@integration
async def test_bad_config_is_a_protocol_error_naming_the_code_and_field(
    sensor: CoapSensorSimulator, driver: CoapDriver
) -> None:
    bad = command(sensor.address, {"op": "configure", "config": {"report_interval_s": "often"}})
    with pytest.raises(ProtocolError, match=r"4\.00 Bad Request: report_interval_s") as caught:
        await driver.send(bad, timeout=WAIT_S)
    assert isinstance(caught.value, CoapClientError)
    assert (caught.value.code, caught.value.method, caught.value.path) == ("4.00", "PUT", "/config")
    assert isinstance(caught.value.__cause__, coap_error.ResponseWrappingError)
    assert sensor.report_interval_s == 0.5
    assert sensor.counters.rejected_requests == 1
    assert not driver.degraded(sensor.address)  # it answered as it should: the request was wrong
    with pytest.raises(CoapClientError, match=r"4\.00 Bad Request: action: unknown"):
        await driver.send(command(sensor.address, {"op": "command", "action": "dance"}), timeout=WAIT_S)
    expired = command(sensor.address, {"op": "command", "action": "identify"}, expires_in_s=-1)
    with pytest.raises(ProtocolError, match="expired"):
        await driver.send(expired, timeout=WAIT_S)
    with pytest.raises(ProtocolError, match="op: expected"):
        await driver.send(command(sensor.address, {"op": "dance"}), timeout=WAIT_S)
    with pytest.raises(ProtocolError, match="expected coap://"):
        await driver.send(
            command("mqtt://127.0.0.1", {"op": "command", "action": "identify"}), timeout=WAIT_S
        )
    assert sensor.counters.commands == 0


@integration
async def test_503_and_404_are_typed_errors(
    sensor: CoapSensorSimulator, bare_driver: CoapDriver, caplog: pytest.LogCaptureFixture
) -> None:
    driver = bare_driver
    caplog.set_level(logging.DEBUG, logger="drivers.coap")
    sensor.faults.answer("5.03", path="/config", count=2)
    configure = command(sensor.address, {"op": "configure", "config": {"report_interval_s": 3}})
    for _ in range(2):
        with pytest.raises(CoapServerError, match=r"5\.03 Service Unavailable") as caught:
            await driver.send(configure, timeout=WAIT_S)
        assert caught.value.code == "5.03"
        assert isinstance(caught.value.__cause__, coap_error.ResponseWrappingError)
        assert driver.degraded(sensor.address)
    records = [record for record in caplog.records if record.name == "drivers.coap"]
    assert [record.levelno for record in records] == [logging.WARNING, logging.DEBUG]  # loud once, then quiet
    assert driver.health(sensor.address).error_responses == 2
    assert (await driver.send(configure, timeout=WAIT_S)).command_id == configure.command_id
    assert not driver.degraded(sensor.address)
    sensor.faults.answer("4.04", path="/command", count=1)
    with pytest.raises(CoapClientError, match=r"4\.04 Not Found") as missing:
        await driver.send(command(sensor.address, {"op": "command", "action": "identify"}), timeout=WAIT_S)
    assert missing.value.code == "4.04"
    with pytest.raises(CoapClientError, match=r"4\.04"):
        await driver.request(sensor.address, "GET", "/no/such/resource", timeout=WAIT_S)
    assert sensor.counters.injected_answers == 3


@integration
async def test_lost_datagrams_are_retransmitted_and_deduplicated(
    sensor: CoapSensorSimulator, bare_driver: CoapDriver
) -> None:
    driver = bare_driver
    heard = sensor.counters.requests_heard
    sensor.faults.drop_requests(2)
    await driver.send(
        command(sensor.address, {"op": "configure", "config": {"report_interval_s": 4}}), timeout=WAIT_S
    )
    assert sensor.counters.dropped_requests == 2
    assert sensor.counters.requests_heard - heard == 3  # the first transmission and two retransmissions
    assert (sensor.counters.config_changes, sensor.report_interval_s) == (1, 4.0)
    # A lost reply: the retransmitted request is answered from aiocoap's duplicate cache, not run again.
    sensor.faults.drop_replies(1)
    await driver.send(command(sensor.address, {"op": "command", "action": "identify"}), timeout=WAIT_S)
    assert sensor.counters.dropped_replies == 1
    assert sensor.counters.identifies == 1
    assert not driver.degraded(sensor.address)


@integration
async def test_a_silent_sensor_times_out_degrades_and_recovers(
    sensor: CoapSensorSimulator, driver: CoapDriver, events: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.coap")
    # Every registration done, so that the command is the only exchange in flight (NSTART = 1).
    await sensor.wait_until(lambda: all(sensor.observers(name) == 1 for name in sensor.quantities), WAIT_S)
    await events.reading("water_level")
    mark = events.mark()
    sensor.faults.silent = True
    started = time.monotonic()
    with pytest.raises(DeviceTimeout) as caught:
        await driver.send(command(sensor.address, {"op": "command", "action": "identify"}), timeout=WAIT_S)
    elapsed = time.monotonic() - started
    # Given up by aiocoap after MAX_TRANSMIT_WAIT (first timeout 0.10–0.15 s, doubled three times),
    # long before the caller's own 10 s; the slack is for a loaded machine.
    assert FAST.ack_timeout_s * 15 * 0.9 <= elapsed <= FAST.max_transmit_wait_s + 1.0
    assert isinstance(caught.value.__cause__, coap_error.ConRetransmitsExceeded)
    assert driver.degraded(sensor.address)
    offline = await events.wait_for(
        lambda event: isinstance(event, DeviceState) and not event.online, since=mark
    )
    assert isinstance(offline, DeviceState)
    assert offline.attributes["degraded"] is True
    warnings = [r for r in caplog.records if r.name == "drivers.coap" and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the repeats (re-registrations failing too) are logged at debug level
    assert driver.health(sensor.address).timeouts >= 1

    sensor.faults.silent = False
    mark = events.mark()
    online = await events.wait_for(lambda event: isinstance(event, DeviceState) and event.online, since=mark)
    assert isinstance(online, DeviceState)
    assert online.attributes["degraded"] is False
    await events.reading("water_level", since=mark)
    assert not driver.degraded(sensor.address)
    assert driver.health(sensor.address).online is True


@integration
async def test_unreachable_sensor_is_device_unreachable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"coap://127.0.0.1:{port}"  # nobody listens there now: ICMP port unreachable
    async with CoapDriver(timing=FAST) as coap:
        with pytest.raises(DeviceUnreachable) as caught:
            await coap.send(command(address, {"op": "command", "action": "identify"}), timeout=WAIT_S)
        assert isinstance(caught.value.__cause__, coap_error.NetworkError)
        assert coap.degraded(address)
        assert coap.health(address).online is False
    assert not await coap.ping()


@integration
async def test_out_of_range_and_garbage_payloads_are_malformed_and_counted(
    sensor: CoapSensorSimulator, driver: CoapDriver, events: EventLog
) -> None:
    await events.reading("water_level")
    mark = events.mark()
    sensor.set_value("water_level", 9.5)
    malformed = await events.wait_for(lambda event: isinstance(event, MalformedPayload), since=mark)
    assert isinstance(malformed, MalformedPayload)
    assert malformed.address == sensor.address
    assert malformed.topic == sensor.address + WATER_LEVEL
    assert "outside its physical range" in malformed.reason
    assert driver.degraded(sensor.address)
    assert driver.health(sensor.address).out_of_range >= 1

    sensor.set_value("water_level", 2.0)
    await events.reading("water_level", since=mark, value=2.0)
    assert not driver.degraded(sensor.address)

    mark = events.mark()
    sensor.faults.garbage_payloads(1, path=WATER_LEVEL)
    sensor.set_value("water_level", 2.5)
    garbage = await events.wait_for(lambda event: isinstance(event, MalformedPayload), since=mark)
    assert isinstance(garbage, MalformedPayload)
    assert "not UTF-8" in garbage.reason
    assert driver.health(sensor.address).malformed_payloads == 1
    assert sensor.counters.garbage_payloads == 1
    await events.reading("water_level", since=mark, value=2.5)
    # Never a reading outside the range.
    assert all(reading.value <= 6.0 for reading in events.readings("water_level"))


@integration
async def test_an_error_notification_ends_the_observation_and_it_is_registered_again(
    sensor: CoapSensorSimulator, driver: CoapDriver, events: EventLog
) -> None:
    count = len(sensor.quantities)
    await driver.wait_until(lambda: driver.health(sensor.address).registrations == count, WAIT_S)
    sensor.faults.answer("5.03", path=WATER_LEVEL, count=1)
    mark = events.mark()
    sensor.set_value("water_level", 1.25)  # its notification is the injected 5.03
    await driver.wait_until(lambda: driver.health(sensor.address).error_responses == 1, WAIT_S)
    await events.reading("water_level", since=mark, value=1.25)
    assert driver.health(sensor.address).registrations == count + 1  # only that one again
    assert not driver.degraded(sensor.address)


@integration
async def test_observe_is_registered_again_after_the_sensor_reboots(
    sensor: CoapSensorSimulator, driver: CoapDriver, events: EventLog
) -> None:
    await events.reading("water_level")
    await sensor.wait_until(lambda: sensor.observers("water_level") == 1, WAIT_S)
    registrations = driver.health(sensor.address).registrations
    await driver.send(command(sensor.address, {"op": "command", "action": "reboot"}), timeout=WAIT_S)
    await sensor.wait_until(lambda: sensor.counters.reboots == 1 and sensor.running, WAIT_S)
    # The rebooted sensor has forgotten its observers; the driver finds out when Max-Age runs out.
    await sensor.wait_until(lambda: sensor.observers("water_level") == 1, WAIT_S)
    mark = events.mark()
    sensor.set_value("water_level", 4.2)
    await events.reading("water_level", since=mark, value=4.2)
    assert driver.health(sensor.address).registrations >= registrations + len(sensor.quantities)


@integration
async def test_a_sensor_that_was_off_goes_offline_and_comes_back(
    sensor: CoapSensorSimulator, driver: CoapDriver, events: EventLog
) -> None:
    await events.reading("water_level")
    mark = events.mark()
    await sensor.stop()  # a power cut: its port answers ICMP port unreachable
    offline = await events.wait_for(
        lambda event: isinstance(event, DeviceState) and not event.online, since=mark
    )
    assert isinstance(offline, DeviceState)
    assert driver.health(sensor.address).unreachable >= 1
    assert driver.degraded(sensor.address)
    mark = events.mark()
    await sensor.start()  # the same port, no observers
    await events.wait_for(lambda event: isinstance(event, DeviceState) and event.online, since=mark)
    sensor.set_value("water_level", 0.75)
    await events.reading("water_level", since=mark, value=0.75)
    assert not driver.degraded(sensor.address)


@integration
async def test_configured_paths_skip_discovery_and_text_readings_decode() -> None:
    config = SensorConfig(
        quantities=coap_sensor.DEFAULT_QUANTITIES[:1], walk_interval_s=0.05, report_interval_s=0.5
    )
    async with CoapSensorSimulator(config) as simulated:
        configured = CoapSensor(simulated.address, readings=(ReadingResource(WATER_LEVEL, metric="level"),))
        async with CoapDriver([configured], timing=FAST) as coap:
            log = EventLog(coap)
            try:
                reading = await log.reading("level")
                assert reading.unit == "m"
            finally:
                await log.close()
        assert simulated.counters.readings_served >= 1


# Interop with libcoap (independent peers)


def libcoap_binary(path: str) -> str:
    """libcoap's command-line tools (Debian's libcoap3-bin), installed when missing; the interop tests
    fail (never skip) without them."""
    if shutil.which(path) is not None:
        return path
    installer = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "ensure-system-packages.sh"), "libcoap3-bin"],
        capture_output=True,
        text=True,
        check=False,
    )
    if shutil.which(path) is None:
        pytest.fail(
            f"the CoAP interop tests need {path} from Debian's libcoap3-bin, and it could not be installed "
            f"(scripts/ensure-system-packages.sh libcoap3-bin exited {installer.returncode}: "
            f"{(installer.stderr or installer.stdout).strip()})"
        )
    return path


@pytest.fixture(scope="session")
def coap_client() -> str:
    return libcoap_binary(COAP_CLIENT)


@pytest.fixture(scope="session")
def coap_server_binary() -> str:
    return libcoap_binary(COAP_SERVER)


class LibcoapServer:
    """libcoap's example server on a port the system picks; its log is drained so it never blocks."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.address = f"coap://127.0.0.1:{port}"
        self.log: list[str] = []
        assert process.stdout is not None
        self._drain = asyncio.get_running_loop().create_task(self._read(process.stdout))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.log.append(line.decode(errors="replace"))


@pytest.fixture
async def libcoap_server(coap_server_binary: str) -> AsyncIterator[LibcoapServer]:
    # -p 0 and verbosity 7: the server logs the UDP endpoint it was given, so no port is guessed.
    process = await asyncio.create_subprocess_exec(
        coap_server_binary,
        "-A",
        "127.0.0.1",
        "-p",
        "0",
        "-v",
        "7",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                line = (await process.stdout.readline()).decode(errors="replace")
                if not line:
                    pytest.fail(f"coap-server exited before listening: {''.join(seen)}")
                seen.append(line)
                found = re.search(r"created UDP\s+endpoint 127\.0\.0\.1:(\d+)", line)
                if found:
                    break
        server = LibcoapServer(process, int(found[1]))
        yield server
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), WAIT_S)


@integration
async def test_driver_discovers_observes_and_puts_to_libcoap_server(libcoap_server: LibcoapServer) -> None:
    address = libcoap_server.address
    async with CoapDriver([CoapSensor(address)], timing=FAST) as coap:
        resources = {resource.path: resource for resource in await coap.discover(address, timeout=WAIT_S)}
        assert {"/time", "/example_data"} <= set(resources)
        assert resources["/time"].observable
        assert resources["/time"].resource_types == ("ticks",)

        # /time is text, not the profile's JSON: read through the raw observation API.
        payloads: list[str] = []
        async with coap.observe(address, "/time", timeout=WAIT_S) as notifications:
            assert notifications.observing
            async with asyncio.timeout(WAIT_S):
                async for notification in notifications:
                    assert notification.code == "2.05"
                    assert notification.max_age_s >= 1
                    payloads.append(notification.text())
                    if len(payloads) == 3:
                        break
        assert all(re.fullmatch(r"\w{3} \d{2} \d{2}:\d{2}:\d{2}", payload) for payload in payloads), payloads
        assert len(set(payloads)) >= 2  # the clock ticks once a second

        configure = command(
            address, {"op": "configure", "path": "/example_data", "config": {"report_interval_s": 7}}
        )
        ack = await coap.send(configure, timeout=WAIT_S)
        assert ack.command_id == configure.command_id
        stored = await coap.request(address, "GET", "/example_data", timeout=WAIT_S)
        assert json.loads(stored.payload) == {"v": 1, "report_interval_s": 7}
        with pytest.raises(CoapClientError, match=r"4\.04"):
            await coap.request(address, "GET", "/no-such-resource", timeout=WAIT_S)
        assert not coap.degraded(address)


async def run_coap_client(coap_client: str, *arguments: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        coap_client, "-B", "5", *arguments, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode is not None
    return process.returncode, output.decode()


@integration
async def test_libcoap_client_reads_observes_and_configures_the_simulator(
    sensor: CoapSensorSimulator, coap_client: str
) -> None:
    base = f"coap://127.0.0.1:{sensor.port}"
    code, listing = await run_coap_client(coap_client, "-m", "get", f"{base}/.well-known/core")
    assert code == 0, listing
    resources = {resource.path: resource for resource in parse_link_format(listing.strip())}
    assert {f"/sensors/{quantity}" for quantity in sensor.quantities} <= set(resources)
    assert resources[WATER_LEVEL].observable
    assert "wardcast.reading" in resources[WATER_LEVEL].resource_types

    sensor.set_value("water_level", 1.75)
    code, body = await run_coap_client(coap_client, "-m", "get", f"{base}{WATER_LEVEL}")
    assert code == 0, body
    document = json.loads(body)
    assert (document["v"], document["value"], document["unit"]) == (1, 1.75, "m")
    assert datetime.fromisoformat(document["at"]).tzinfo is not None

    code, stream = await run_coap_client(coap_client, "-w", "-s", "3", f"{base}/sensors/rainfall")
    assert code == 0, stream
    notifications = [json.loads(line) for line in stream.splitlines() if line.startswith("{")]
    assert len(notifications) >= 3
    assert len({notification["value"] for notification in notifications}) >= 2

    code, output = await run_coap_client(
        coap_client, "-m", "put", "-e", '{"report_interval_s": 5, "label": "Phường 1"}', f"{base}/config"
    )
    assert code == 0, output
    assert (sensor.report_interval_s, sensor.label) == (5.0, "Phường 1")
    _, refused = await run_coap_client(
        coap_client, "-m", "put", "-e", '{"report_interval_s": -1}', f"{base}/config"
    )
    assert "4.00" in refused
    assert "report_interval_s" in refused
    assert sensor.report_interval_s == 5.0


@integration
async def test_cli_prints_ready_answers_libcoap_and_stops_on_sigterm(coap_client: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firmware_sim.coap_sensor",
        "--bind",
        "127.0.0.1:0",
        "--quantities",
        "water_level,rainfall",
        "--report-interval",
        "2",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        ready = (await asyncio.wait_for(process.stdout.readline(), WAIT_S)).decode()
        match = re.fullmatch(r"READY coap=127\.0\.0\.1:(\d+)\n", ready)
        assert match is not None, ready
        code, body = await run_coap_client(coap_client, f"coap://127.0.0.1:{match[1]}/sensors/rainfall")
        assert code == 0, body
        assert json.loads(body)["unit"] == "mm"
        _, missing = await run_coap_client(coap_client, f"coap://127.0.0.1:{match[1]}/sensors/pm2_5")
        assert "4.04" in missing
    finally:
        process.send_signal(signal.SIGTERM)
        remaining = await asyncio.wait_for(process.stdout.read(), WAIT_S)
        exit_code = await asyncio.wait_for(process.wait(), WAIT_S)
    assert remaining == b""
    assert exit_code == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--bind", "127.0.0.1"], "is not HOST:PORT"),
        (["--quantities", "water_level,snow"], "unknown snow"),
        (["--report-interval", "0"], "report_interval_s"),
        (["--drop-fraction", "2"], "--drop-fraction"),
    ],
)
def test_cli_refuses_bad_arguments(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert coap_sensor.main(arguments) == 2
    assert message in capsys.readouterr().err


def test_timeout_figures_are_consistent() -> None:
    # The silent-sensor test relies on the first retransmission's bounds (RFC 7252 §4.2).
    assert FAST.max_transmit_wait_s == pytest.approx(0.1 * 15 * 1.5)
    assert math.isclose(FAST.exchange_timeout_s, FAST.max_transmit_wait_s + FAST.ack_timeout_s)
