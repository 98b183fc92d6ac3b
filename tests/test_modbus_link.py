"""The Modbus link layer (drivers/modbus.py) against the simulated I/O box (docs/protocol.md §3)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from drivers.base import DeviceTimeout, DeviceUnreachable
from drivers.modbus import ModbusExceptionResponse, ModbusLink, inter_frame_gap_s
from drivers.modbus_codec import RegisterFormat
from firmware_sim.modbus_box import BoxConfig, ModbusBox, ModbusTcpServer, RtuOverTcpServer, RtuPtyLine

UNIT = 1
TIMEOUT = 2.0
WAIT_S = 10.0


@pytest.fixture
def box() -> ModbusBox:
    return ModbusBox(BoxConfig(unit=UNIT, amplifier_warmup_s=0.0))


@pytest.fixture
async def tcp_link(box: ModbusBox) -> AsyncIterator[ModbusLink]:
    async with ModbusTcpServer([box]) as server, ModbusLink.tcp(server.host, server.port) as link:
        yield link


# The register codec, without a wire


@pytest.mark.parametrize(
    ("fmt", "registers", "value"),
    [
        (RegisterFormat("t", "int16", scale=0.1), (0x0140,), 32.0),
        (RegisterFormat("t", "int16", scale=0.1), (0xFFF6,), -1.0),
        (RegisterFormat("v", "uint16", scale=0.1), (0x0898,), 220.0),
        (RegisterFormat("w", "uint16", byte_order="little", scale=0.001, offset=-1.0), (0xF00A,), 1.8),
        (RegisterFormat("a", "int32"), (0x0000, 0x003E), 62.0),
        (RegisterFormat("a", "int32", word_order="little"), (0x003E, 0x0000), 62.0),
        (RegisterFormat("a", "int32"), (0xFFFF, 0xFFFE), -2.0),
        (RegisterFormat("w", "float32"), (0x3FE6, 0x6666), 1.8),
        (RegisterFormat("w", "float32", word_order="little"), (0x6666, 0x3FE6), 1.8),
        (RegisterFormat("w", "float32", byte_order="little"), (0xE63F, 0x6666), 1.8),
        (RegisterFormat("w", "float32", byte_order="little", word_order="little"), (0x6666, 0xE63F), 1.8),
    ],
)
def test_codec_decodes_and_encodes_the_protocol_examples(
    fmt: RegisterFormat, registers: tuple[int, ...], value: float
) -> None:
    assert fmt.decode(registers) == pytest.approx(value, abs=1e-6)
    assert fmt.encode(value) == registers


def test_codec_refuses_values_that_do_not_fit_and_names_the_field() -> None:
    with pytest.raises(ValueError, match="volume"):
        RegisterFormat("volume", "uint16").encode(-1)
    with pytest.raises(ValueError, match="temperature"):
        RegisterFormat("temperature", "int16", scale=0.1).encode(3276.8)
    with pytest.raises(ValueError, match="level"):
        RegisterFormat("level", "float32").encode(float("nan"))
    with pytest.raises(ValueError, match="level"):
        RegisterFormat("level", "int32").decode([1])
    assert RegisterFormat("t", "int16").at_limit([0x7FFF])
    assert not RegisterFormat("t", "int16").at_limit([0x0140])


def test_gap_is_t35() -> None:
    assert inter_frame_gap_s(9600) == pytest.approx(0.00401, abs=1e-5)
    assert inter_frame_gap_s(115_200) == pytest.approx(0.00175)


# Over TCP


async def test_reads_and_writes_round_trip_over_tcp(box: ModbusBox, tcp_link: ModbusLink) -> None:
    await tcp_link.write_register(UNIT, 0, 73, timeout=TIMEOUT)
    assert await tcp_link.read_holding_registers(UNIT, 0, timeout=TIMEOUT) == (73,)
    assert box.volume == 73
    await tcp_link.write_coils(UNIT, 0, [True, False, True], timeout=TIMEOUT)
    await tcp_link.write_coil(UNIT, 100, True, timeout=TIMEOUT)
    assert await tcp_link.read_coils(UNIT, 0, 3, timeout=TIMEOUT) == (True, False, True)
    assert await tcp_link.read_coils(UNIT, 100, timeout=TIMEOUT) == (True,)
    assert box.zone_coils[:3] == (True, False, True)
    await box.wait_until(lambda: box.amplifier_ready, WAIT_S)
    fault, ready, _live = await tcp_link.read_discrete_inputs(UNIT, 0, 3, timeout=TIMEOUT)
    assert (fault, ready) == (False, True)
    await tcp_link.write_registers(UNIT, 0, [12], timeout=TIMEOUT)
    assert box.volume == 12


async def test_sensor_values_in_every_word_order(box: ModbusBox, tcp_link: ModbusLink) -> None:
    box.set_value("water_level", 2.5)
    box.set_value("air_quality", 62)
    holding = await tcp_link.read_holding_registers(UNIT, 200, 9, timeout=TIMEOUT)
    orders = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]
    for index, (byte_order, word_order) in enumerate(orders):
        fmt = RegisterFormat("water_level", "float32", byte_order=byte_order, word_order=word_order)
        assert fmt.decode(holding[2 * index : 2 * index + 2]) == pytest.approx(2.5, abs=1e-6)
    assert RegisterFormat("water_level", "int16", scale=0.01).decode(holding[8:]) == pytest.approx(2.5)
    inputs = await tcp_link.read_input_registers(UNIT, 101, 5, timeout=TIMEOUT)
    assert RegisterFormat("aq", "int32").decode(inputs[0:2]) == 62
    assert RegisterFormat("aq", "int32", word_order="little").decode(inputs[2:4]) == 62
    level = RegisterFormat("water_level", "uint16", byte_order="little", scale=0.001, offset=-1.0)
    assert level.decode(inputs[4:]) == pytest.approx(2.5)


async def test_exception_responses_are_typed(box: ModbusBox, tcp_link: ModbusLink) -> None:
    box.faults.inject_exception(2, function=3, address=0, count=1)
    with pytest.raises(ModbusExceptionResponse) as caught:
        await tcp_link.read_holding_registers(UNIT, 0, timeout=TIMEOUT)
    assert (caught.value.code, caught.value.name) == (2, "illegal data address")
    with pytest.raises(ModbusExceptionResponse) as caught:
        await tcp_link.write_register(UNIT, 0, 101, timeout=TIMEOUT)
    assert (caught.value.code, caught.value.name, caught.value.function) == (3, "illegal data value", 6)
    assert box.volume != 101
    assert not tcp_link.degraded(UNIT)  # it answered


async def test_dropped_request_times_out_and_degrades_then_recovers(
    box: ModbusBox, tcp_link: ModbusLink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.modbus")
    assert await tcp_link.read_holding_registers(UNIT, 0, timeout=TIMEOUT) == (50,)
    box.faults.drop_requests(2)
    started = time.monotonic()
    with pytest.raises(DeviceTimeout):
        await tcp_link.read_holding_registers(UNIT, 0, timeout=0.3)
    assert time.monotonic() - started < 0.3 + 0.5
    assert tcp_link.degraded(UNIT)
    assert tcp_link.degraded_units == frozenset({UNIT})
    with pytest.raises(DeviceTimeout):
        await tcp_link.write_register(UNIT, 0, 60, timeout=0.3)
    assert box.volume == 50  # a dropped request is not applied
    records = [record for record in caplog.records if record.name == "drivers.modbus"]
    assert [record.levelno for record in records] == [logging.WARNING, logging.DEBUG]
    # The timed-out TCP request leaves no stray reply behind: the next request is answered.
    assert await tcp_link.read_holding_registers(UNIT, 0, timeout=TIMEOUT) == (50,)
    assert not tcp_link.degraded(UNIT)


async def test_closed_server_is_unreachable(box: ModbusBox) -> None:
    async with ModbusTcpServer([box]) as server:
        port = server.port
        async with ModbusLink.tcp(server.host, port) as link:
            assert await link.read_coils(UNIT, 0, timeout=TIMEOUT) == (False,)
    async with ModbusLink.tcp("127.0.0.1", port) as link:
        with pytest.raises(DeviceUnreachable):
            await link.read_coils(UNIT, 0, timeout=TIMEOUT)
        assert link.degraded(UNIT)


async def test_server_closing_under_a_connected_link(box: ModbusBox) -> None:
    server = ModbusTcpServer([box])
    async with server, ModbusLink.tcp(server.host, server.port) as link:
        assert await link.read_coils(UNIT, 0, timeout=TIMEOUT) == (False,)
        await server.__aexit__(None, None, None)
        with pytest.raises((DeviceUnreachable, DeviceTimeout)):
            await link.read_coils(UNIT, 0, timeout=0.5)
        with pytest.raises(DeviceUnreachable):
            await link.read_coils(UNIT, 0, timeout=0.5)


async def test_writes_jump_ahead_of_polls(box: ModbusBox, tcp_link: ModbusLink) -> None:
    box.faults.reply_delay_s = 0.05
    first = asyncio.create_task(tcp_link.read_holding_registers(UNIT, 0, timeout=TIMEOUT))
    await box.wait_until(lambda: box.counters.requests >= 1, WAIT_S)
    polls = [asyncio.create_task(tcp_link.read_holding_registers(UNIT, 0, timeout=TIMEOUT)) for _ in range(3)]
    await tcp_link.wait_waiting(3, WAIT_S)
    write = asyncio.create_task(tcp_link.write_register(UNIT, 0, 88, timeout=TIMEOUT))
    await tcp_link.wait_waiting(4, WAIT_S)
    assert await first == (50,)  # already on the wire when the write came
    await write
    # Every poll queued before the write was served after it: they all read the new volume.
    assert [await poll for poll in polls] == [(88,)] * 3


# Over RTU


async def test_round_trip_over_rtu_on_a_pty(box: ModbusBox) -> None:
    async with (
        RtuPtyLine([box], baud=19_200) as line,
        ModbusLink.serial(line.slave_path, baud=19_200) as link,
    ):
        assert link.gap_s == pytest.approx(inter_frame_gap_s(19_200))
        await link.write_register(UNIT, 0, 42, timeout=TIMEOUT)
        assert await link.read_holding_registers(UNIT, 0, timeout=TIMEOUT) == (42,)
        box.set_value("water_level", 1.8)
        registers = await link.read_holding_registers(UNIT, 202, 2, timeout=TIMEOUT)
        assert RegisterFormat("w", "float32", word_order="little").decode(registers) == pytest.approx(1.8)
        await link.write_coils(UNIT, 0, [True, True], timeout=TIMEOUT)
        assert await link.read_coils(UNIT, 0, 2, timeout=TIMEOUT) == (True, True)
        assert line.counters.crc_errors == 0


async def test_rtu_over_tcp_exception_and_timeout(box: ModbusBox) -> None:
    async with (
        RtuOverTcpServer([box]) as server,
        ModbusLink.serial(f"socket://{server.host}:{server.port}") as link,
    ):
        box.set_value("amplifier_temperature", 32.0)
        box.set_value("mains_voltage", 220.0)
        assert await link.read_input_registers(UNIT, 0, 2, timeout=TIMEOUT) == (0x0140, 0x0898)
        with pytest.raises(ModbusExceptionResponse) as caught:
            await link.read_input_registers(UNIT, 0, 3, timeout=TIMEOUT)
        assert caught.value.code == 2
        box.faults.drop_requests(1)
        with pytest.raises(DeviceTimeout):
            await link.read_input_registers(UNIT, 0, timeout=0.3)
        assert link.degraded(UNIT)
        assert await link.read_coils(UNIT, 100, timeout=TIMEOUT) == (False,)
        assert not link.degraded(UNIT)


async def test_a_late_rtu_reply_is_never_taken_as_the_answer_to_the_next_request(box: ModbusBox) -> None:
    box.set_value("water_level", 1.8)
    async with (
        RtuPtyLine([box], baud=19_200) as line,
        ModbusLink.serial(line.slave_path, baud=19_200, late_reply_s=0.5) as link,
    ):
        box.faults.reply_delay_s = 0.3
        with pytest.raises(DeviceTimeout):
            await link.read_holding_registers(UNIT, 200, 2, timeout=0.1)
        box.faults.reply_delay_s = 0.0
        # Same unit, same function, asked at once: the float's registers arrive 0.2 s later and must
        # not be taken for the volume.
        assert await link.read_holding_registers(UNIT, 0, timeout=TIMEOUT) == (50,)
        assert await link.read_holding_registers(UNIT, 200, 2, timeout=TIMEOUT) == (0x3FE6, 0x6666)
