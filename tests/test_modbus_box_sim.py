"""The simulated Modbus amplifier I/O box (firmware_sim/modbus_box.py, docs/protocol.md §3).

The clients here are written in the test from the specifications (MBAP, RTU frames, a bitwise CRC-16),
not taken from the simulator, and Debian's `mbpoll` (libmodbus) checks both transports as an
independent peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import tty
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from firmware_sim import __main__ as sim_main
from firmware_sim import modbus_box
from firmware_sim.modbus_box import (
    BoxConfig,
    BoxConfigError,
    ModbusBox,
    ModbusTcpServer,
    RtuOverTcpServer,
    RtuPtyLine,
    SensorChannel,
)
from firmware_sim.modbus_wire import (
    DataType,
    Endian,
    RegisterEncoding,
    crc16,
    inter_frame_silence_s,
    rtu_frame,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 10.0

READ_COILS, READ_INPUTS, READ_HOLDING, READ_INPUT_REGISTERS = 0x01, 0x02, 0x03, 0x04
WRITE_COIL, WRITE_REGISTER, WRITE_COILS, WRITE_REGISTERS = 0x05, 0x06, 0x0F, 0x10


# A client written from the specifications, independent of the simulator's framing


def spec_crc16(data: bytes) -> int:
    """CRC-16/MODBUS bit by bit, as Modbus over Serial Line V1.02 §6.2.2 describes it."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu(address: int, pdu: bytes) -> bytes:
    body = bytes([address]) + pdu
    crc = spec_crc16(body)
    return body + bytes([crc & 0xFF, crc >> 8])


def split_checked(frame: bytes) -> tuple[int, bytes]:
    crc = spec_crc16(frame[:-2])
    assert frame[-2:] == bytes([crc & 0xFF, crc >> 8]), f"bad CRC in {frame.hex()}"
    return frame[0], frame[1:-2]


def read_pdu(function: int, address: int, quantity: int) -> bytes:
    return struct.pack(">BHH", function, address, quantity)


def write_coil_pdu(address: int, on: bool) -> bytes:
    return struct.pack(">BHH", WRITE_COIL, address, 0xFF00 if on else 0x0000)


def write_register_pdu(address: int, value: int) -> bytes:
    return struct.pack(">BHH", WRITE_REGISTER, address, value)


def registers_of(reply: bytes) -> tuple[int, ...]:
    assert reply[1] == len(reply) - 2
    return struct.unpack(f">{reply[1] // 2}H", reply[2:])


def bits_of(reply: bytes, count: int) -> list[bool]:
    return [bool(reply[2 + index // 8] >> (index % 8) & 1) for index in range(count)]


class TcpClient:
    """Modbus TCP with a hand-made MBAP header; replies are matched by transaction id in the tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.transaction_id = 0

    @classmethod
    async def connect(cls, port: int) -> TcpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, pdu: bytes, unit: int = 1, protocol_id: int = 0) -> int:
        self.transaction_id += 1
        header = struct.pack(">HHHB", self.transaction_id, protocol_id, len(pdu) + 1, unit)
        self.writer.write(header + pdu)
        return self.transaction_id

    async def receive(self) -> tuple[int, int, bytes]:
        """(transaction id, unit id, PDU) of the next reply."""
        header = await asyncio.wait_for(self.reader.readexactly(7), WAIT_S)
        transaction_id, protocol_id, length, unit = struct.unpack(">HHHB", header)
        assert protocol_id == 0
        return transaction_id, unit, await asyncio.wait_for(self.reader.readexactly(length - 1), WAIT_S)

    async def request(self, pdu: bytes, unit: int = 1) -> bytes:
        sent = self.send(pdu, unit)
        transaction_id, reply_unit, reply = await self.receive()
        assert (transaction_id, reply_unit) == (sent, unit)
        return reply

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class RtuMaster:
    """Reads RTU replies by their length, as a master does: exception 5 bytes, reads by byte count,
    writes 8 bytes."""

    def __init__(self, incoming: asyncio.StreamReader, transmit: Callable[[bytes], object]) -> None:
        self.incoming = incoming
        self.transmit = transmit

    def send(self, frame: bytes) -> None:
        self.transmit(frame)

    async def receive(self, count: int) -> bytes:
        return await asyncio.wait_for(self.incoming.readexactly(count), WAIT_S)

    async def receive_frame(self) -> bytes:
        head = await self.receive(2)
        function = head[1]
        if function & 0x80:
            return head + await self.receive(3)
        if function in {READ_COILS, READ_INPUTS, READ_HOLDING, READ_INPUT_REGISTERS}:
            byte_count = await self.receive(1)
            return head + byte_count + await self.receive(byte_count[0] + 2)
        return head + await self.receive(6)

    async def request(self, address: int, pdu: bytes) -> bytes:
        self.send(rtu(address, pdu))
        reply_address, reply = split_checked(await self.receive_frame())
        assert reply_address == address
        return reply


class PtyClient(RtuMaster):
    """A master on the pty's slave side, as a program opening /dev/pts/N would be."""

    def __init__(self, path: str) -> None:
        super().__init__(asyncio.StreamReader(), self._write)
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        termios.tcflush(self.fd, termios.TCIOFLUSH)
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.incoming.feed_data(os.read(self.fd, 512))

    def _write(self, frame: bytes) -> None:
        assert os.write(self.fd, frame) == len(frame)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


class RtuTcpClient(RtuMaster):
    """Raw RTU frames over TCP, as a `socket://` serial port sends them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer.write)
        self.writer = writer

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class ManualClock:
    """Stands still unless told, so that readings do not walk between two reads of a test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Fixtures


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def box(clock: ManualClock) -> ModbusBox:
    return ModbusBox(BoxConfig(unit=1), clock=clock)


@pytest.fixture
async def tcp_server(box: ModbusBox) -> AsyncIterator[ModbusTcpServer]:
    async with ModbusTcpServer([box]) as server:
        yield server


@pytest.fixture
async def tcp(tcp_server: ModbusTcpServer) -> AsyncIterator[TcpClient]:
    client = await TcpClient.connect(tcp_server.port)
    yield client
    await client.close()


@pytest.fixture
async def line(box: ModbusBox) -> AsyncIterator[RtuPtyLine]:
    async with RtuPtyLine([box], baud=9600) as pty_line:
        yield pty_line


@pytest.fixture
async def pty(line: RtuPtyLine) -> AsyncIterator[PtyClient]:
    client = PtyClient(line.slave_path)
    yield client
    client.close()


@pytest.fixture(scope="session")
def mbpoll() -> str:
    """Debian's mbpoll, installed when missing; the interop tests fail (never skip) without it."""
    found = shutil.which("mbpoll")
    if found is not None:
        return found
    installer = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "ensure-system-packages.sh"), "mbpoll"],
        capture_output=True,
        text=True,
        check=False,
    )
    found = shutil.which("mbpoll")
    if found is None:
        pytest.fail(
            "the Modbus interop tests need Debian's mbpoll, and it could not be installed "
            f"(scripts/ensure-system-packages.sh mbpoll exited {installer.returncode}: "
            f"{(installer.stderr or installer.stdout).strip()})"
        )
    return found


async def run_mbpoll(mbpoll: str, *arguments: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        mbpoll, *arguments, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode is not None
    return process.returncode, output.decode()


def mbpoll_values(output: str) -> dict[int, str]:
    """mbpoll prints each reference as `[ref]: <tab>value`."""
    found = re.findall(r"^\[(\d+)\]:\s+(\S+)", output, re.MULTILINE)
    return {int(reference): value for reference, value in found}


# Pure framing


def test_crc16_matches_the_specification_examples() -> None:
    # Modbus over Serial Line V1.02 §6.2.2: slave 0x02, function 0x07 gives CRC 0x1241, sent 0x41 0x12.
    assert crc16(bytes([0x02, 0x07])) == 0x1241
    assert rtu_frame(0x02, bytes([0x07])) == bytes([0x02, 0x07, 0x41, 0x12])
    # The Modicon reference guide's read of holding registers 108–110 at slave 17.
    assert rtu_frame(0x11, bytes.fromhex("03006b0003")).hex() == "1103006b00037687"
    for sample in (b"", b"\x01", bytes(range(256)), b"wardcast"):
        assert crc16(sample) == spec_crc16(sample)


def test_inter_frame_silence_is_three_and_a_half_characters_or_fixed_above_19200() -> None:
    assert inter_frame_silence_s(9600) == pytest.approx(3.5 * 11 / 9600)
    assert inter_frame_silence_s(19_200) == pytest.approx(3.5 * 11 / 19_200)
    assert inter_frame_silence_s(115_200) == pytest.approx(0.00175)


@pytest.mark.parametrize(
    ("byte_order", "word_order", "notation", "order"),
    [
        (Endian.BIG, Endian.BIG, "ABCD", [0, 1, 2, 3]),
        (Endian.BIG, Endian.LITTLE, "CDAB", [2, 3, 0, 1]),
        (Endian.LITTLE, Endian.BIG, "BADC", [1, 0, 3, 2]),
        (Endian.LITTLE, Endian.LITTLE, "DCBA", [3, 2, 1, 0]),
    ],
)
def test_32_bit_values_follow_byte_and_word_order(
    byte_order: Endian, word_order: Endian, notation: str, order: list[int]
) -> None:
    for data_type, packing, value in ((DataType.FLOAT32, ">f", 1.8), (DataType.INT32, ">i", -123_456)):
        encoding = RegisterEncoding(data_type, byte_order, word_order)
        abcd = struct.pack(packing, value)
        wire = bytes(abcd[index] for index in order)
        assert encoding.notation == notation
        assert encoding.encode(value) == struct.unpack(">2H", wire)


def test_16_bit_values_scale_offset_and_saturate() -> None:
    temperature = RegisterEncoding(DataType.INT16, scale=0.1)
    assert temperature.encode(-5.5) == (0xFFC9,)
    assert temperature.encode(5000.0) == (0x7FFF,)
    gauge = RegisterEncoding(DataType.UINT16, Endian.LITTLE, scale=0.001, offset=-1.0)
    assert gauge.notation == "BA"
    assert gauge.encode(1.8) == (0xF00A,)
    assert gauge.encode(-2.0) == (0,)
    with pytest.raises(ValueError, match="no word order"):
        RegisterEncoding(DataType.UINT16, word_order=Endian.LITTLE)
    with pytest.raises(ValueError, match="finite"):
        gauge.encode(math.nan)


def test_box_configuration_refuses_overlapping_registers() -> None:
    clash = SensorChannel("water_level", "holding", 0, RegisterEncoding(DataType.UINT16))
    with pytest.raises(BoxConfigError, match="holding register 0: both volume and water_level"):
        BoxConfig(channels=(clash,))
    with pytest.raises(BoxConfigError, match="zones 65"):
        BoxConfig(zones=65)
    with pytest.raises(BoxConfigError, match="unit 248"):
        BoxConfig(unit=248)


# The box's behaviour (PDUs straight into the box)


def answer(box: ModbusBox, pdu: bytes) -> bytes:
    reply = box.process(pdu)
    assert reply is not None
    return reply.pdu


def test_a_zone_sounds_only_with_the_amplifier_ready_healthy_and_turned_up(
    box: ModbusBox, clock: ManualClock
) -> None:
    answer(box, write_coil_pdu(2, on=True))  # zone 3
    assert box.zone_relays_closed[2]
    assert bits_of(answer(box, read_pdu(READ_INPUTS, 0, 3)), 3) == [False, False, False]
    assert bits_of(answer(box, read_pdu(READ_INPUTS, 102, 1)), 1) == [True]
    assert box.sounding_zones == ()

    answer(box, write_coil_pdu(100, on=True))
    assert box.amplifier_powered
    assert not box.amplifier_ready  # warming up
    clock.advance(1.0)
    assert bits_of(answer(box, read_pdu(READ_INPUTS, 0, 3)), 3) == [False, True, True]
    assert box.sounding_zones == (2,)

    box.amplifier_fault = True
    assert bits_of(answer(box, read_pdu(READ_INPUTS, 0, 3)), 3) == [True, True, False]
    box.amplifier_fault = False
    answer(box, write_register_pdu(0, 0))
    assert not box.audio_live
    answer(box, write_register_pdu(0, 40))
    assert box.audio_live

    # A welded relay keeps its zone sounding after the coil opens, and the feedback input says so.
    box.stick_zone_relay(2, closed=True)
    answer(box, write_coil_pdu(2, on=False))
    assert box.zone_coils[2] is False
    assert bits_of(answer(box, read_pdu(READ_INPUTS, 102, 1)), 1) == [True]
    box.stick_zone_relay(2, None)
    assert not box.audio_live

    # Switching the amplifier on again does not restart its warm-up; switching it off does.
    answer(box, write_coil_pdu(100, on=True))
    assert box.amplifier_ready
    answer(box, write_coil_pdu(100, on=False))
    answer(box, write_coil_pdu(100, on=True))
    assert not box.amplifier_ready


def test_readings_walk_with_time_and_stay_where_a_test_puts_them(clock: ManualClock) -> None:
    box = ModbusBox(BoxConfig(seed=7), clock=clock)
    twin = ModbusBox(BoxConfig(seed=7), clock=clock)
    before = registers_of(answer(box, read_pdu(READ_INPUT_REGISTERS, 100, 6)))
    clock.advance(30.0)
    after = registers_of(answer(box, read_pdu(READ_INPUT_REGISTERS, 100, 6)))
    assert after != before
    assert registers_of(answer(twin, read_pdu(READ_INPUT_REGISTERS, 100, 6))) == after  # same seed
    for name in ("water_level", "air_quality", "rainfall", "mains_voltage", "amplifier_temperature"):
        quantity = next(quantity for quantity in box.config.quantities if quantity.name == name)
        assert quantity.minimum <= box.value(name) <= quantity.maximum

    box.set_value("water_level", 3.25)
    clock.advance(30.0)
    assert box.value("water_level") == 3.25
    assert struct.unpack(
        ">f", struct.pack(">2H", *registers_of(answer(box, read_pdu(READ_HOLDING, 200, 2))))
    )[0] == pytest.approx(3.25)
    box.resume_walk("water_level")
    clock.advance(30.0)
    assert box.value("water_level") != 3.25
    with pytest.raises(KeyError, match="no quantity 'salinity'"):
        box.set_value("salinity", 1.0)


def test_fractions_of_faults_follow_the_seed() -> None:
    def dropped_pattern() -> list[bool]:
        box = ModbusBox(BoxConfig(seed=3), clock=ManualClock())
        box.faults.drop_fraction = 0.5
        return [box.process(read_pdu(READ_HOLDING, 0, 1)) is None for _ in range(40)]

    pattern = dropped_pattern()
    assert pattern == dropped_pattern()
    assert 5 < sum(pattern) < 35
    with pytest.raises(ValueError, match="drop_fraction"):
        ModbusBox().faults.drop_fraction = 1.5


# Modbus TCP with a raw socket


async def test_every_function_code_round_trips_over_tcp(tcp: TcpClient, box: ModbusBox) -> None:
    assert await tcp.request(write_coil_pdu(2, on=True)) == write_coil_pdu(2, on=True)
    assert await tcp.request(read_pdu(READ_COILS, 0, 8)) == bytes([READ_COILS, 1, 0b0000_0100])

    pattern = [True, False, True, True, False, False, False, True]
    packed = sum(1 << index for index, on in enumerate(pattern) if on)
    multiple_coils = struct.pack(">BHHBB", WRITE_COILS, 0, 8, 1, packed)
    assert await tcp.request(multiple_coils) == struct.pack(">BHH", WRITE_COILS, 0, 8)
    assert list(box.zone_coils) == pattern
    assert bits_of(await tcp.request(read_pdu(READ_COILS, 0, 8)), 8) == pattern
    assert bits_of(await tcp.request(read_pdu(READ_INPUTS, 100, 8)), 8) == pattern
    assert await tcp.request(read_pdu(READ_COILS, 100, 1)) == bytes([READ_COILS, 1, 0])

    assert await tcp.request(write_register_pdu(0, 80)) == write_register_pdu(0, 80)
    assert box.volume == 80
    assert await tcp.request(struct.pack(">BHHBH", WRITE_REGISTERS, 0, 1, 2, 30)) == struct.pack(
        ">BHH", WRITE_REGISTERS, 0, 1
    )
    assert registers_of(await tcp.request(read_pdu(READ_HOLDING, 0, 1))) == (30,)

    box.set_value("water_level", 2.5)
    box.set_value("amplifier_temperature", -5.5)
    holding = registers_of(await tcp.request(read_pdu(READ_HOLDING, 200, 9)))
    as_bytes = struct.pack(">9H", *holding)
    assert struct.unpack(">f", as_bytes[0:4])[0] == 2.5  # ABCD
    assert struct.unpack(">f", as_bytes[6:8] + as_bytes[4:6])[0] == 2.5  # CDAB
    assert struct.unpack("<f", as_bytes[12:16])[0] == 2.5  # DCBA
    assert struct.unpack(">h", as_bytes[16:18])[0] == 250  # int16 × 0.01 m
    inputs = registers_of(await tcp.request(read_pdu(READ_INPUT_REGISTERS, 0, 2)))
    assert struct.unpack(">h", struct.pack(">H", inputs[0]))[0] == -55
    assert inputs[1] == 2200
    air = registers_of(await tcp.request(read_pdu(READ_INPUT_REGISTERS, 101, 5)))
    assert air[:2] == (0, 62)
    assert air[2:4] == (62, 0)
    assert air[4] == struct.unpack("<H", struct.pack(">H", 3500))[0]  # (2.5 + 1.0) / 0.001, byte-swapped


@pytest.mark.parametrize(
    ("pdu", "exception"),
    [
        (bytes([0x07]), 0x01),
        (bytes([0x2B, 0x0E, 0x01, 0x00]), 0x01),
        (read_pdu(READ_COILS, 0, 0), 0x03),
        (read_pdu(READ_COILS, 0, 2001), 0x03),
        (read_pdu(READ_INPUTS, 0, 2001), 0x03),
        (read_pdu(READ_HOLDING, 0, 126), 0x03),
        (read_pdu(READ_INPUT_REGISTERS, 0, 0), 0x03),
        (bytes([READ_HOLDING, 0, 0, 0]), 0x03),
        (read_pdu(READ_COILS, 8, 1), 0x02),
        (read_pdu(READ_COILS, 7, 2), 0x02),
        (read_pdu(READ_INPUTS, 3, 1), 0x02),
        (read_pdu(READ_HOLDING, 1, 1), 0x02),
        (read_pdu(READ_HOLDING, 0, 2), 0x02),
        (read_pdu(READ_HOLDING, 0xFFFF, 2), 0x02),
        (read_pdu(READ_INPUT_REGISTERS, 0, 3), 0x02),
        (struct.pack(">BHH", WRITE_COIL, 0, 0x1234), 0x03),
        (write_coil_pdu(50, on=True), 0x02),
        (write_register_pdu(0, 101), 0x03),
        (write_register_pdu(200, 1), 0x02),
        (struct.pack(">BHHB", WRITE_COILS, 0, 0, 0), 0x03),
        (struct.pack(">BHHBB", WRITE_COILS, 0, 9, 1, 0xFF), 0x03),
        (struct.pack(">BHHB", WRITE_COILS, 0, 101, 13) + bytes(13), 0x02),
        (struct.pack(">BHHBH", WRITE_REGISTERS, 0, 124, 2, 0), 0x03),
        (struct.pack(">BHHB", WRITE_REGISTERS, 0, 0, 0), 0x03),
        (struct.pack(">BHHBHH", WRITE_REGISTERS, 0, 2, 4, 10, 10), 0x02),
        (struct.pack(">BHHBH", WRITE_REGISTERS, 0, 1, 2, 500), 0x03),
    ],
)
async def test_bad_requests_get_the_exception_the_specification_names(
    tcp: TcpClient, box: ModbusBox, pdu: bytes, exception: int
) -> None:
    assert await tcp.request(pdu) == bytes([pdu[0] | 0x80, exception])
    assert (box.volume, box.zone_coils, box.amplifier_powered) == (50, (False,) * 8, False)
    assert box.counters.exception_replies == 1


async def test_tcp_unit_ids_reach_their_box_and_other_units_get_no_reply(
    tcp: TcpClient, tcp_server: ModbusTcpServer
) -> None:
    for unit in (1, 0, 255):
        assert await tcp.request(read_pdu(READ_HOLDING, 0, 1), unit=unit) == bytes([READ_HOLDING, 2, 0, 50])
    tcp.send(write_register_pdu(0, 7), unit=9)
    await tcp_server.wait_until(lambda: tcp_server.counters.for_other_units == 1, WAIT_S)
    answered = tcp.send(read_pdu(READ_HOLDING, 0, 1))
    transaction_id, _, reply = await tcp.receive()
    assert (transaction_id, reply) == (answered, bytes([READ_HOLDING, 2, 0, 50]))


async def test_a_tcp_endpoint_serves_several_units(clock: ManualClock) -> None:
    first, second = (ModbusBox(BoxConfig(unit=unit), clock=clock) for unit in (1, 2))
    async with ModbusTcpServer([first, second]) as server:
        client = await TcpClient.connect(server.port)
        try:
            await client.request(write_register_pdu(0, 11), unit=2)
            assert (first.volume, second.volume) == (50, 11)
            client.send(read_pdu(READ_HOLDING, 0, 1), unit=255)  # ambiguous with two boxes: nobody answers
            await server.wait_until(lambda: server.counters.for_other_units == 1, WAIT_S)
            assert await client.request(read_pdu(READ_HOLDING, 0, 1), unit=1) == bytes(
                [READ_HOLDING, 2, 0, 50]
            )
        finally:
            await client.close()
    with pytest.raises(BoxConfigError, match="two boxes with unit 1"):
        ModbusTcpServer([first, ModbusBox(BoxConfig(unit=1))])


async def test_mbap_frames_of_another_protocol_are_ignored_and_a_bad_length_hangs_up(
    tcp: TcpClient, tcp_server: ModbusTcpServer
) -> None:
    tcp.send(read_pdu(READ_HOLDING, 0, 1), protocol_id=1)
    answered = tcp.send(read_pdu(READ_HOLDING, 0, 1))
    assert (await tcp.receive())[0] == answered
    assert tcp_server.counters.malformed_frames == 1
    tcp.writer.write(struct.pack(">HHHB", 9, 0, 300, 1))
    assert await asyncio.wait_for(tcp.reader.read(), WAIT_S) == b""


# Modbus RTU on a pseudo-terminal, with a master written here


async def test_rtu_over_a_pty_reads_and_writes(pty: PtyClient, line: RtuPtyLine, box: ModbusBox) -> None:
    assert line.slave_path.startswith("/dev/pts/")
    assert await pty.request(1, read_pdu(READ_HOLDING, 0, 1)) == bytes([READ_HOLDING, 2, 0, 50])
    assert await pty.request(1, write_coil_pdu(100, on=True)) == write_coil_pdu(100, on=True)
    assert box.amplifier_powered
    assert await pty.request(1, read_pdu(READ_HOLDING, 0, 2)) == bytes([READ_HOLDING | 0x80, 0x02])


async def test_rtu_frames_with_a_bad_crc_get_no_reply(
    pty: PtyClient, line: RtuPtyLine, box: ModbusBox
) -> None:
    damaged = bytearray(rtu(1, write_register_pdu(0, 99)))
    damaged[-1] ^= 0x01
    pty.send(bytes(damaged))
    await line.wait_until(lambda: line.counters.crc_errors == 1, WAIT_S)
    # Had the damaged frame been answered, its reply would come before this one.
    assert await pty.request(1, read_pdu(READ_HOLDING, 0, 1)) == bytes([READ_HOLDING, 2, 0, 50])
    assert box.counters.requests == 1


async def test_rtu_broadcast_writes_reach_every_box_without_a_reply(clock: ManualClock) -> None:
    first, second = (ModbusBox(BoxConfig(unit=unit), clock=clock) for unit in (1, 2))
    async with RtuPtyLine([first, second]) as bus:
        client = PtyClient(bus.slave_path)
        try:
            client.send(rtu(0, write_register_pdu(0, 70)))
            await second.wait_until(lambda: second.volume == 70, WAIT_S)
            assert first.volume == 70
            client.send(rtu(0, read_pdu(READ_HOLDING, 0, 1)))  # a broadcast read: nobody answers
            await bus.wait_until(lambda: bus.counters.broadcasts == 2, WAIT_S)
            client.send(rtu(3, read_pdu(READ_HOLDING, 0, 1)))  # a slave that is not on this line
            await bus.wait_until(lambda: bus.counters.for_other_units == 1, WAIT_S)
            assert await client.request(2, read_pdu(READ_HOLDING, 0, 1)) == bytes([READ_HOLDING, 2, 0, 70])
            assert (first.counters.replies, second.counters.replies) == (0, 1)
        finally:
            client.close()


async def test_rtu_frames_are_delimited_by_silence(clock: ManualClock) -> None:
    box = ModbusBox(clock=clock)
    frame = rtu(1, read_pdu(READ_HOLDING, 0, 1))
    async with RtuPtyLine([box]) as fast_line:
        client = PtyClient(fast_line.slave_path)
        try:
            # A pause longer than t3.5 in the middle of a frame makes two broken frames.
            client.send(frame[:3])
            await fast_line.wait_until(lambda: fast_line.counters.frames == 1, WAIT_S)
            client.send(frame[3:])
            await fast_line.wait_until(lambda: fast_line.counters.frames == 2, WAIT_S)
            assert fast_line.counters.malformed_frames + fast_line.counters.crc_errors == 2
            assert box.counters.requests == 0
        finally:
            client.close()
    async with RtuPtyLine([box], min_silence_s=0.5) as patient_line:
        client = PtyClient(patient_line.slave_path)
        try:
            # Byte by byte, well within the configured silence: one frame.
            for byte in frame:
                client.send(bytes([byte]))
            reply_address, reply = split_checked(await client.receive_frame())
            assert (reply_address, reply) == (1, bytes([READ_HOLDING, 2, 0, 50]))
            assert patient_line.counters.frames == 1
        finally:
            client.close()


async def test_rtu_over_tcp_round_trips(box: ModbusBox) -> None:
    async with RtuOverTcpServer([box]) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        client = RtuTcpClient(reader, writer)
        try:
            assert await client.request(1, write_coil_pdu(0, on=True)) == write_coil_pdu(0, on=True)
            assert box.zone_coils[0]
            assert await client.request(1, read_pdu(READ_INPUTS, 100, 2)) == bytes([READ_INPUTS, 1, 0b01])
        finally:
            await client.close()


# Fault injection


async def test_a_dropped_request_times_out_and_is_not_applied(
    tcp: TcpClient, box: ModbusBox, tcp_server: ModbusTcpServer
) -> None:
    box.faults.drop_requests(1)
    tcp.send(write_register_pdu(0, 90))
    await box.wait_until(lambda: box.counters.dropped_requests == 1, WAIT_S)
    answered = tcp.send(read_pdu(READ_HOLDING, 0, 1))
    assert await tcp.receive() == (answered, 1, bytes([READ_HOLDING, 2, 0, 50]))


async def test_a_dropped_reply_times_out_but_the_write_is_applied(tcp: TcpClient, box: ModbusBox) -> None:
    box.faults.drop_replies(1)
    tcp.send(write_register_pdu(0, 90))
    await box.wait_until(lambda: box.counters.dropped_replies == 1, WAIT_S)
    assert box.volume == 90
    assert await tcp.request(read_pdu(READ_HOLDING, 0, 1)) == bytes([READ_HOLDING, 2, 0, 90])


async def test_an_injected_exception_answers_the_matching_requests(tcp: TcpClient, box: ModbusBox) -> None:
    box.faults.inject_exception(0x04, function=READ_HOLDING, address=201, count=2)
    assert await tcp.request(read_pdu(READ_HOLDING, 200, 2)) == bytes([0x83, 0x04])
    assert await tcp.request(read_pdu(READ_HOLDING, 0, 1)) == bytes([READ_HOLDING, 2, 0, 50])
    assert await tcp.request(read_pdu(READ_HOLDING, 201, 1)) == bytes([0x83, 0x04])
    assert (await tcp.request(read_pdu(READ_HOLDING, 200, 2)))[0] == READ_HOLDING  # count used up
    box.faults.inject_exception(0x06, function=WRITE_COIL)
    assert await tcp.request(write_coil_pdu(100, on=True)) == bytes([0x85, 0x06])
    assert not box.amplifier_powered
    box.faults.clear()
    assert await tcp.request(write_coil_pdu(100, on=True)) == write_coil_pdu(100, on=True)


async def test_a_corrupted_crc_reply_is_detected_by_the_master(pty: PtyClient, box: ModbusBox) -> None:
    box.faults.corrupt_crc(1)
    pty.send(rtu(1, read_pdu(READ_HOLDING, 0, 1)))
    damaged = await pty.receive_frame()
    with pytest.raises(AssertionError, match="bad CRC"):
        split_checked(damaged)
    assert damaged[:-2] == bytes([1, READ_HOLDING, 2, 0, 50])
    assert await pty.request(1, read_pdu(READ_HOLDING, 0, 1)) == bytes([READ_HOLDING, 2, 0, 50])
    assert box.counters.corrupted_crcs == 1


async def test_a_delayed_reply_arrives_late(tcp: TcpClient, box: ModbusBox) -> None:
    box.faults.reply_delay_s = 0.3
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await tcp.request(read_pdu(READ_HOLDING, 0, 1)) == bytes([READ_HOLDING, 2, 0, 50])
    assert loop.time() - started >= 0.3


# Interop with Debian's mbpoll (libmodbus), an independent master


async def test_mbpoll_reads_and_writes_over_tcp(
    mbpoll: str, tcp_server: ModbusTcpServer, box: ModbusBox
) -> None:
    tcp_options = ["-m", "tcp", "-p", str(tcp_server.port), "-a", "1"]
    status, output = await run_mbpoll(
        mbpoll, *tcp_options, "-r", "1", "-c", "1", "-t", "4", "-1", "127.0.0.1"
    )
    assert status == 0, output
    assert mbpoll_values(output) == {1: "50"}

    # mbpoll numbers references from 1: reference 1 is PDU address 0.
    status, output = await run_mbpoll(mbpoll, *tcp_options, "-r", "1", "-t", "0", "127.0.0.1", "1", "0", "1")
    assert status == 0, output
    assert box.zone_coils[:3] == (True, False, True)
    status, output = await run_mbpoll(
        mbpoll, *tcp_options, "-r", "1", "-c", "4", "-t", "0", "-1", "127.0.0.1"
    )
    assert status == 0, output
    assert mbpoll_values(output) == {1: "1", 2: "0", 3: "1", 4: "0"}

    status, output = await run_mbpoll(mbpoll, *tcp_options, "-0", "-r", "0", "-t", "4", "127.0.0.1", "64")
    assert status == 0, output
    assert box.volume == 64

    status, output = await run_mbpoll(mbpoll, *tcp_options, "-r", "2", "-t", "4", "-1", "127.0.0.1")
    assert "Illegal data address" in output


async def test_mbpoll_reads_the_water_level_as_float32_in_both_word_orders(
    mbpoll: str, tcp_server: ModbusTcpServer, box: ModbusBox
) -> None:
    box.set_value("water_level", 3.4)
    box.set_value("air_quality", 151)
    tcp_options = ["-m", "tcp", "-p", str(tcp_server.port), "-a", "1", "-1"]
    status, output = await run_mbpoll(mbpoll, *tcp_options, "-r", "201", "-t", "4:float", "-B", "127.0.0.1")
    assert status == 0, output
    assert float(mbpoll_values(output)[201]) == pytest.approx(3.4, abs=1e-6)  # ABCD
    status, output = await run_mbpoll(mbpoll, *tcp_options, "-r", "203", "-t", "4:float", "127.0.0.1")
    assert status == 0, output
    assert float(mbpoll_values(output)[203]) == pytest.approx(3.4, abs=1e-6)  # CDAB, mbpoll's default
    status, output = await run_mbpoll(mbpoll, *tcp_options, "-r", "102", "-t", "3:int", "-B", "127.0.0.1")
    assert status == 0, output
    assert mbpoll_values(output) == {102: "151"}
    status, output = await run_mbpoll(mbpoll, *tcp_options, "-r", "104", "-t", "3:int", "127.0.0.1")
    assert status == 0, output
    assert mbpoll_values(output) == {104: "151"}


async def test_mbpoll_reads_and_writes_over_rtu_on_the_pty(
    mbpoll: str, line: RtuPtyLine, box: ModbusBox
) -> None:
    rtu_options = ["-m", "rtu", "-b", "9600", "-P", "none", "-a", "1"]
    box.set_value("water_level", 1.25)
    status, output = await run_mbpoll(
        mbpoll, *rtu_options, "-r", "201", "-c", "9", "-t", "4", "-1", line.slave_path
    )
    assert status == 0, output
    expected = [
        channel.encoding.encode(1.25) for channel in box.config.channels if channel.table == "holding"
    ]
    flattened = [register for registers in expected for register in registers]
    assert [int(value) for value in mbpoll_values(output).values()] == flattened

    status, output = await run_mbpoll(mbpoll, *rtu_options, "-r", "1", "-t", "4", line.slave_path, "77")
    assert status == 0, output
    assert box.volume == 77
    status, output = await run_mbpoll(mbpoll, *rtu_options, "-r", "101", "-t", "0", line.slave_path, "1")
    assert status == 0, output
    assert box.amplifier_powered
    status, output = await run_mbpoll(
        mbpoll, *rtu_options, "-r", "201", "-t", "4:float", "-B", "-1", line.slave_path
    )
    assert status == 0, output
    assert float(mbpoll_values(output)[201]) == 1.25
    assert line.counters.crc_errors == 0


# The command line


async def test_cli_prints_ready_serves_every_endpoint_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firmware_sim",
        "modbus-box",
        "--tcp",
        "127.0.0.1:0",
        "--rtu-pty",
        "--rtu-tcp",
        "127.0.0.1:0",
        "--unit",
        "1,5",
        "--volume",
        "33",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        ready = (await asyncio.wait_for(process.stdout.readline(), WAIT_S)).decode()
        match = re.fullmatch(
            r"READY tcp=127\.0\.0\.1:(\d+) rtu-pty=(/dev/pts/\d+) rtu-tcp=127\.0\.0\.1:(\d+) units=1,5\n",
            ready,
        )
        assert match is not None, ready
        tcp_port, pty_path, rtu_port = int(match[1]), match[2], int(match[3])

        client = await TcpClient.connect(tcp_port)
        try:
            assert await client.request(read_pdu(READ_HOLDING, 0, 1), unit=5) == bytes(
                [READ_HOLDING, 2, 0, 33]
            )
        finally:
            await client.close()
        pty = PtyClient(pty_path)
        try:
            assert await pty.request(1, write_register_pdu(0, 44)) == write_register_pdu(0, 44)
        finally:
            pty.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", rtu_port)
        rtu_client = RtuTcpClient(reader, writer)
        try:
            assert await rtu_client.request(1, read_pdu(READ_HOLDING, 0, 1)) == bytes(
                [READ_HOLDING, 2, 0, 44]
            )
        finally:
            await rtu_client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        remaining = await asyncio.wait_for(process.stdout.read(), WAIT_S)
        exit_code = await asyncio.wait_for(process.wait(), WAIT_S)
    assert remaining == b""
    assert exit_code == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "at least one endpoint"),
        (["--tcp", "127.0.0.1"], "is not HOST:PORT"),
        (["--rtu-pty", "--unit", "1,x"], "--unit"),
        (["--rtu-pty", "--unit", "1,1"], "distinct"),
        (["--rtu-pty", "--unit", "300"], "unit 300"),
        (["--rtu-pty", "--drop-fraction", "2"], "--drop-fraction"),
        (["--rtu-pty", "--zones", "0"], "zones 0"),
    ],
)
def test_cli_usage_errors_exit_2(
    arguments: Sequence[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert modbus_box.main(arguments) == 2
    assert message in capsys.readouterr().err


def test_the_package_usage_lists_the_modbus_box(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main.main(["--help"]) == 0
    assert "modbus-box" in capsys.readouterr().err
