"""The Modbus driver (drivers/modbus_field.py) against the simulated amplifier I/O box (docs/protocol.md
§3.4-§3.5): sensors polled into readings in every encoding, degraded and back, the wired-zone sequence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from drivers.base import DeviceCommand, DeviceState, InboundEvent, ProtocolError, TelemetryReading
from drivers.modbus_codec import RegisterFormat
from drivers.modbus_field import (
    LinkUrlError,
    ModbusDriver,
    ModbusSensor,
    RegisterPoint,
    link_endpoint,
    read_blocks,
)
from firmware_sim.modbus_box import BoxConfig, ModbusBox, ModbusTcpServer, RtuPtyLine

pytestmark = pytest.mark.integration

UNIT = 1
WAIT_S = 10.0
TIMEOUT_S = 0.5

# The box's water level in each of its encodings (protocol §3.5), and the other quantities.
WATER_LEVELS = (
    RegisterPoint(
        "water_level_u16",
        "input",
        105,
        RegisterFormat("w", "uint16", byte_order="little", scale=0.001, offset=-1.0),
        "m",
    ),
    RegisterPoint("water_level_abcd", "holding", 200, RegisterFormat("w", "float32"), "m"),
    RegisterPoint(
        "water_level_cdab", "holding", 202, RegisterFormat("w", "float32", word_order="little"), "m"
    ),
    RegisterPoint(
        "water_level_badc", "holding", 204, RegisterFormat("w", "float32", byte_order="little"), "m"
    ),
    RegisterPoint(
        "water_level_dcba",
        "holding",
        206,
        RegisterFormat("w", "float32", byte_order="little", word_order="little"),
        "m",
    ),
    RegisterPoint("water_level_i16", "holding", 208, RegisterFormat("w", "int16", scale=0.01), "m"),
)
OTHERS = (
    RegisterPoint("amplifier_temperature", "input", 0, RegisterFormat("t", "int16", scale=0.1), "°C"),
    RegisterPoint("mains_voltage", "input", 1, RegisterFormat("v", "uint16", scale=0.1), "V"),
    RegisterPoint("air_quality", "input", 101, RegisterFormat("a", "int32"), "VN_AQI"),
    RegisterPoint(
        "air_quality_cdab", "input", 103, RegisterFormat("a", "int32", word_order="little"), "VN_AQI"
    ),
)


@pytest.fixture
def box() -> ModbusBox:
    return ModbusBox(BoxConfig(unit=UNIT, amplifier_warmup_s=0.0))


@pytest.fixture
async def tcp_url(box: ModbusBox) -> AsyncIterator[str]:
    async with ModbusTcpServer([box]) as server:
        yield f"tcp://{server.host}:{server.port}"


@pytest.fixture
async def driver() -> AsyncIterator[ModbusDriver]:
    async with ModbusDriver(timeout_s=TIMEOUT_S, warmup_timeout_s=2.0) as modbus:
        yield modbus


async def next_events(driver: ModbusDriver, count: int) -> list[InboundEvent]:
    events = driver.events()
    return [await asyncio.wait_for(anext(events), WAIT_S) for _ in range(count)]


async def readings_until(driver: ModbusDriver, done: set[str]) -> dict[str, TelemetryReading]:
    found: dict[str, TelemetryReading] = {}
    events = driver.events()
    while not done <= set(found):
        event = await asyncio.wait_for(anext(events), WAIT_S)
        if isinstance(event, TelemetryReading):
            found[event.metric] = event
    return found


def test_adjacent_registers_are_read_together_and_gaps_split_the_reads() -> None:
    blocks = read_blocks(WATER_LEVELS + OTHERS)
    assert [(b.table, b.start, b.count) for b in blocks] == [
        ("holding", 200, 9),  # 200-208: five encodings back to back
        ("input", 0, 2),
        ("input", 101, 5),  # 101-105; 100 (rainfall) is not asked for
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "scheme"),
        ("tcp://", "host"),
        ("rtu:", "rtu:///dev"),
        ("rtu+tcp://h", "host:port"),
        ("rtu:///dev/x?baud=fast", "baud"),
    ],
)
def test_a_bad_link_url_is_refused_naming_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(LinkUrlError, match=message):
        link_endpoint(url)


async def test_every_encoding_of_the_water_level_reads_the_same_value(
    box: ModbusBox, tcp_url: str, driver: ModbusDriver
) -> None:
    box.set_value("water_level", 1.8)
    box.set_value("air_quality", 62)
    await driver.add_sensor(ModbusSensor("box-1", tcp_url, UNIT, WATER_LEVELS + OTHERS, poll_interval_s=0.2))
    readings = await readings_until(driver, {p.metric for p in WATER_LEVELS + OTHERS})
    for point in WATER_LEVELS:
        assert readings[point.metric].value == pytest.approx(1.8, abs=1e-3), point.metric
        assert readings[point.metric].unit == "m" and readings[point.metric].problem is None
    assert readings["air_quality"].value == readings["air_quality_cdab"].value == 62
    assert 20 <= readings["amplifier_temperature"].value <= 70
    # A level beyond what the 16-bit gauge register holds reads as saturated: flagged, not believed.
    box.set_value("water_level", 80.0)
    saturated = await readings_until(driver, {"water_level_u16"})
    while saturated["water_level_u16"].problem is None:
        saturated = await readings_until(driver, {"water_level_u16"})
    assert "saturated" in (saturated["water_level_u16"].problem or "")


async def test_a_silent_box_is_reported_offline_once_and_online_when_it_answers(
    box: ModbusBox, tcp_url: str, driver: ModbusDriver
) -> None:
    await driver.add_sensor(ModbusSensor("box-1", tcp_url, UNIT, OTHERS[:2], poll_interval_s=0.05))
    events = driver.events()

    async def next_state() -> DeviceState:
        while True:
            event = await asyncio.wait_for(anext(events), WAIT_S)
            if isinstance(event, DeviceState):
                return event

    first = await next_state()
    assert first.online and first.attributes == {"degraded": False}
    box.faults.drop_fraction = 1.0
    down = await next_state()
    assert not down.online and down.attributes["degraded"]
    assert "did not answer within 0.5 s" in str(down.attributes["error"])
    # The polls keep failing; the next state the driver reports is the recovery, nothing in between.
    box.faults.clear()
    up = await next_state()
    assert up.online
    assert not driver.link_of("box-1").degraded(UNIT)


async def test_the_sensor_polls_over_rtu_on_a_serial_line(box: ModbusBox, driver: ModbusDriver) -> None:
    box.set_value("water_level", 2.5)
    async with RtuPtyLine([box], baud=19_200) as line:
        await driver.add_sensor(
            ModbusSensor("box-rtu", f"rtu://{line.slave_path}?baud=19200", UNIT, WATER_LEVELS, 0.2)
        )
        readings = await readings_until(driver, {"water_level_abcd", "water_level_i16"})
        await driver.remove("box-rtu")
    assert readings["water_level_abcd"].value == pytest.approx(2.5)
    assert readings["water_level_i16"].value == pytest.approx(2.5)


def zone_command(**document: object) -> DeviceCommand:
    return DeviceCommand("amp-1", "c-1", document, datetime.now(UTC) + timedelta(minutes=1))


async def test_the_wired_zone_sequence_powers_switches_checks_and_switches_off(
    box: ModbusBox, tcp_url: str, driver: ModbusDriver
) -> None:
    await driver.add_box("amp-1", tcp_url, UNIT)
    ack = await driver.send(zone_command(op="zones_on", zones=[2, 3], volume=80), timeout=WAIT_S)
    assert ack.command_id == "c-1"
    assert box.amplifier_powered and box.volume == 80
    assert box.zone_coils[1:3] == (True, True) and not box.zone_coils[0]
    assert box.audio_live
    # Off, keeping the amplifier for another zone still in use; then off altogether.
    await driver.send(zone_command(op="zones_off", zones=[2], amplifier_off=False), timeout=WAIT_S)
    assert box.amplifier_powered and box.zone_coils[1:3] == (False, True)
    await driver.send(zone_command(op="zones_off", zones=[3], amplifier_off=True), timeout=WAIT_S)
    assert not box.amplifier_powered and not any(box.zone_coils)


async def test_a_fault_a_stuck_relay_and_a_bad_command_fail_with_a_reason(
    box: ModbusBox, tcp_url: str, driver: ModbusDriver
) -> None:
    await driver.add_box("amp-1", tcp_url, UNIT)
    box.stick_zone_relay(3, closed=False)  # zone 4's relay burnt open
    with pytest.raises(ProtocolError, match=r"zones \[4\]"):
        await driver.send(zone_command(op="zones_on", zones=[4]), timeout=WAIT_S)
    box.stick_zone_relay(3, None)
    box.amplifier_fault = True
    with pytest.raises(ProtocolError, match="amplifier_fault"):
        await driver.send(zone_command(op="zones_on", zones=[1]), timeout=WAIT_S)
    for document, field in [
        ({"op": "zones_on", "zones": []}, "zones"),
        ({"op": "zones_on", "zones": [65]}, "zones"),
        ({"op": "zones_on", "zones": [1], "volume": 101}, "volume"),
        ({"op": "dance", "zones": [1]}, "op"),
    ]:
        with pytest.raises(ProtocolError, match=field):
            await driver.send(zone_command(**document), timeout=WAIT_S)
    with pytest.raises(ProtocolError, match="not a Modbus amplifier box"):
        await driver.send(DeviceCommand("nobody", "c", {}, datetime.now(UTC)), timeout=WAIT_S)
