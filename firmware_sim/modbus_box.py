"""A simulated amplifier I/O box on Modbus (docs/protocol.md §3): wired horn zones, amplifier power and
volume, sensors, and the faults a field device shows.

    python -m firmware_sim modbus-box --tcp 127.0.0.1:1502 --rtu-pty --unit 1

prints `READY tcp=127.0.0.1:1502 rtu-pty=/dev/pts/7 units=1` on stdout once every endpoint listens,
and runs until SIGTERM or SIGINT, then exits 0.

The layers stay apart: `modbus_wire` holds the bytes (PDU, RTU frame, MBAP header, register codec);
`ModbusBox` is the device (its register map, its state, its faults) and sees only PDUs; the transports
(`ModbusTcpServer`, `RtuPtyLine`, `RtuOverTcpServer`) delimit frames, pick the addressed box and send
its reply. Several boxes may share one transport, as slaves share an RS-485 pair. The same box may be
served by several transports at once (a box with an Ethernet port and an RS-485 port).

Tests drive everything through the Python API: `box.faults` flips fault injection at runtime,
`box.set_value` sets a sensor reading, and `wait_until` waits for a change without sleeping.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import sys
import termios
import time
import tty
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Self, TypeVar

from firmware_sim.lifecycle import stop_on_signals
from firmware_sim.modbus_wire import (
    ADDRESS_SPACE,
    BROADCAST_ADDRESS,
    EXCEPTION_FLAG,
    MAX_EXCEPTION_CODE,
    MAX_PDU_LENGTH,
    MAX_RTU_FRAME_LENGTH,
    MAX_SLAVE_ADDRESS,
    MBAP_HEADER_LENGTH,
    MODBUS_PROTOCOL_ID,
    TCP_DIRECT_UNIT_ID,
    CrcMismatchError,
    DataType,
    Endian,
    ExceptionCode,
    FrameError,
    FunctionCode,
    MbapHeader,
    ModbusExceptionError,
    ReadRequest,
    RegisterEncoding,
    Request,
    WriteCoilsRequest,
    WriteRegistersRequest,
    decode_request,
    exception_response,
    inter_frame_silence_s,
    mbap_frame,
    read_bits_response,
    read_registers_response,
    request_function,
    rtu_frame,
    split_rtu_frame,
    write_response,
)
from firmware_sim.signals import ChangeSignal

logger = logging.getLogger(__name__)

# The register map (docs/protocol.md §3.4). PDU addresses, 0-based.
ZONE_COIL_BASE: Final = 0
AMPLIFIER_POWER_COIL: Final = 100
AMPLIFIER_FAULT_INPUT: Final = 0
AMPLIFIER_READY_INPUT: Final = 1
AUDIO_LIVE_INPUT: Final = 2
ZONE_FEEDBACK_INPUT_BASE: Final = 100
VOLUME_REGISTER: Final = 0
VOLUME_MAX: Final = 100
# Zone coils 0..63 stay below the amplifier coil, zone feedback inputs 100..163 clear of the rest.
MAX_ZONES: Final = 64
DEFAULT_ZONES: Final = 8
DEFAULT_VOLUME: Final = 50
DEFAULT_AMPLIFIER_WARMUP_S: Final = 1.0
DEFAULT_WALK_INTERVAL_S: Final = 1.0
DEFAULT_BAUD: Final = 9600
# A box nobody polled for hours moves at most this many walk steps at once, so that the first request
# after a long pause is not slowed by the catching up.
MAX_WALK_CATCH_UP_STEPS: Final = 1000
# What a line keeps for a reader that does not read (an unplugged RS-485 cable) before it drops bytes.
MAX_PENDING_LINE_OUTPUT: Final = 4096
_BITS_IN_BYTE: Final = 8

RegisterTable = Literal["holding", "input"]
Clock = Callable[[], float]
_V = TypeVar("_V")


class BoxConfigError(ValueError):
    """A box configuration that contradicts the register map or itself."""


# Sensors


@dataclass(frozen=True, slots=True)
class Quantity:
    """A physical quantity a sensor of the box measures, moving by a random walk within its range."""

    name: str
    unit: str
    initial: float
    minimum: float
    maximum: float
    # The largest change in one walk step, either way.
    step: float


@dataclass(frozen=True, slots=True)
class SensorChannel:
    """Where and how a quantity appears in the registers; one quantity may appear in several."""

    quantity: str
    table: RegisterTable
    address: int
    encoding: RegisterEncoding

    @property
    def addresses(self) -> range:
        return range(self.address, self.address + self.encoding.register_count)


DEFAULT_QUANTITIES: Final = (
    Quantity("amplifier_temperature", "°C", 32.0, 20.0, 70.0, 0.2),
    Quantity("mains_voltage", "V", 220.0, 198.0, 242.0, 0.5),
    Quantity("water_level", "m", 1.80, 0.0, 6.0, 0.02),
    Quantity("rainfall", "mm", 0.0, 0.0, 120.0, 0.5),
    Quantity("air_quality", "VN_AQI", 62.0, 0.0, 500.0, 2.0),
)


DEFAULT_CHANNELS: Final = (
    SensorChannel("amplifier_temperature", "input", 0, RegisterEncoding(DataType.INT16, scale=0.1)),
    SensorChannel("mains_voltage", "input", 1, RegisterEncoding(DataType.UINT16, scale=0.1)),
    SensorChannel("rainfall", "input", 100, RegisterEncoding(DataType.UINT16, scale=0.1)),
    SensorChannel("air_quality", "input", 101, RegisterEncoding(DataType.INT32)),
    SensorChannel("air_quality", "input", 103, RegisterEncoding(DataType.INT32, word_order=Endian.LITTLE)),
    SensorChannel(
        "water_level",
        "input",
        105,
        RegisterEncoding(DataType.UINT16, Endian.LITTLE, scale=0.001, offset=-1.0),
    ),
    SensorChannel("water_level", "holding", 200, RegisterEncoding(DataType.FLOAT32)),
    SensorChannel(
        "water_level", "holding", 202, RegisterEncoding(DataType.FLOAT32, word_order=Endian.LITTLE)
    ),
    SensorChannel(
        "water_level", "holding", 204, RegisterEncoding(DataType.FLOAT32, byte_order=Endian.LITTLE)
    ),
    SensorChannel(
        "water_level", "holding", 206, RegisterEncoding(DataType.FLOAT32, Endian.LITTLE, Endian.LITTLE)
    ),
    SensorChannel("water_level", "holding", 208, RegisterEncoding(DataType.INT16, scale=0.01)),
)


@dataclass(frozen=True, slots=True)
class BoxConfig:
    """One box: its unit id, its wiring and its sensors (registers: docs/protocol.md §3.4–§3.5)."""

    unit: int = 1
    zones: int = DEFAULT_ZONES
    initial_volume: int = DEFAULT_VOLUME
    # Seconds from powering the amplifier until it is ready to sound (its soft start).
    amplifier_warmup_s: float = DEFAULT_AMPLIFIER_WARMUP_S
    quantities: tuple[Quantity, ...] = DEFAULT_QUANTITIES
    channels: tuple[SensorChannel, ...] = DEFAULT_CHANNELS
    # Seeds the sensors' random walk and the fraction-based faults: the same seed, the same run.
    seed: int = 1
    walk_interval_s: float = DEFAULT_WALK_INTERVAL_S

    def __post_init__(self) -> None:
        if not 1 <= self.unit <= MAX_SLAVE_ADDRESS:
            raise BoxConfigError(f"unit {self.unit} is not a slave address (1..{MAX_SLAVE_ADDRESS})")
        if not 1 <= self.zones <= MAX_ZONES:
            raise BoxConfigError(f"zones {self.zones} outside 1..{MAX_ZONES}")
        if not 0 <= self.initial_volume <= VOLUME_MAX:
            raise BoxConfigError(f"initial_volume {self.initial_volume} outside 0..{VOLUME_MAX}")
        if self.amplifier_warmup_s < 0:
            raise BoxConfigError("amplifier_warmup_s must not be negative")
        if not self.walk_interval_s > 0:
            raise BoxConfigError("walk_interval_s must be greater than 0")
        names = [quantity.name for quantity in self.quantities]
        if len(set(names)) != len(names):
            raise BoxConfigError(f"quantity names repeat: {names}")
        for quantity in self.quantities:
            if not quantity.minimum <= quantity.initial <= quantity.maximum or quantity.step < 0:
                raise BoxConfigError(f"quantity {quantity.name}: initial outside its range or negative step")
        taken: dict[tuple[RegisterTable, int], str] = {("holding", VOLUME_REGISTER): "volume"}
        for channel in self.channels:
            if channel.quantity not in names:
                raise BoxConfigError(
                    f"channel at {channel.table} {channel.address}: no quantity {channel.quantity}"
                )
            if channel.address < 0 or channel.addresses.stop > ADDRESS_SPACE:
                raise BoxConfigError(f"channel {channel.quantity} at {channel.address}: outside 0..65535")
            for address in channel.addresses:
                owner = taken.get((channel.table, address))
                if owner is not None:
                    raise BoxConfigError(
                        f"{channel.table} register {address}: both {owner} and {channel.quantity}"
                    )
                taken[(channel.table, address)] = channel.quantity


# Fault injection


@dataclass(slots=True)
class InjectedException:
    """Answer `code` to requests of `function` (any when None) that cover `address` (any when None),
    for the next `remaining` matching requests (until cleared when None)."""

    code: int
    function: int | None = None
    address: int | None = None
    remaining: int | None = None

    def matches(self, function: int, address: int, quantity: int) -> bool:
        return (self.function is None or self.function == function) and (
            self.address is None or address <= self.address < address + quantity
        )


class FaultPlan:
    """What goes wrong with a box, flipped at runtime (tests) or set at start (command line).

    Counted faults (`drop_requests(3)`) apply to the next requests and are used up; fractions apply to
    every request at random from the box's seed. A dropped request is never executed (the box did not
    hear it); a dropped reply follows an executed request (the reply was lost on the way back), which
    is what a controller must not repeat blindly.
    """

    def __init__(self, seed: int) -> None:
        self._random = random.Random(f"faults-{seed}")
        self._drop_fraction = 0.0
        self._bad_crc_fraction = 0.0
        self._reply_delay_s = 0.0
        self._requests_to_drop = 0
        self._replies_to_drop = 0
        self._crcs_to_corrupt = 0
        self._exceptions: list[InjectedException] = []

    @property
    def drop_fraction(self) -> float:
        """The share of requests the box does not hear (0 to 1)."""
        return self._drop_fraction

    @drop_fraction.setter
    def drop_fraction(self, fraction: float) -> None:
        self._drop_fraction = _fraction("drop_fraction", fraction)

    @property
    def bad_crc_fraction(self) -> float:
        """The share of RTU replies sent with a wrong CRC (0 to 1); Modbus TCP has no CRC."""
        return self._bad_crc_fraction

    @bad_crc_fraction.setter
    def bad_crc_fraction(self, fraction: float) -> None:
        self._bad_crc_fraction = _fraction("bad_crc_fraction", fraction)

    @property
    def reply_delay_s(self) -> float:
        """Seconds the box waits before each reply, holding up the requests behind it."""
        return self._reply_delay_s

    @reply_delay_s.setter
    def reply_delay_s(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"reply_delay_s {seconds} must be a finite number ≥ 0")
        self._reply_delay_s = seconds

    def drop_requests(self, count: int = 1) -> None:
        self._requests_to_drop += _count("drop_requests", count)

    def drop_replies(self, count: int = 1) -> None:
        self._replies_to_drop += _count("drop_replies", count)

    def corrupt_crc(self, count: int = 1) -> None:
        self._crcs_to_corrupt += _count("corrupt_crc", count)

    def inject_exception(
        self,
        code: int,
        *,
        function: int | None = None,
        address: int | None = None,
        count: int | None = None,
    ) -> InjectedException:
        """From now on, answer `code` instead of executing matching requests; the newest rule that
        matches wins."""
        if not 1 <= code <= MAX_EXCEPTION_CODE:
            raise ValueError(f"exception code {code} outside 1..{MAX_EXCEPTION_CODE}")
        injected = InjectedException(
            code, function, address, None if count is None else _count("count", count)
        )
        self._exceptions.append(injected)
        return injected

    def clear(self) -> None:
        """Back to a healthy box."""
        self._drop_fraction = self._bad_crc_fraction = self._reply_delay_s = 0.0
        self._requests_to_drop = self._replies_to_drop = self._crcs_to_corrupt = 0
        self._exceptions.clear()

    def take_request_drop(self) -> bool:
        if self._requests_to_drop:
            self._requests_to_drop -= 1
            return True
        return self._happens(self._drop_fraction)

    def take_reply_drop(self) -> bool:
        if self._replies_to_drop:
            self._replies_to_drop -= 1
            return True
        return False

    def take_crc_corruption(self) -> bool:
        if self._crcs_to_corrupt:
            self._crcs_to_corrupt -= 1
            return True
        return self._happens(self._bad_crc_fraction)

    def take_exception(self, function: int, address: int, quantity: int) -> int | None:
        for injected in reversed(self._exceptions):
            if injected.matches(function, address, quantity):
                if injected.remaining is not None:
                    injected.remaining -= 1
                    if injected.remaining == 0:
                        self._exceptions.remove(injected)
                return injected.code
        return None

    def _happens(self, fraction: float) -> bool:
        # Drawn only when the fault is on, so that switching one fault on does not shift the others.
        return fraction > 0 and self._random.random() < fraction


def _fraction(name: str, fraction: float) -> float:
    if not 0 <= fraction <= 1:
        raise ValueError(f"{name} {fraction} outside 0..1")
    return fraction


def _count(name: str, count: int) -> int:
    if count < 1:
        raise ValueError(f"{name} count {count} must be at least 1")
    return count


# The box


@dataclass(slots=True)
class BoxCounters:
    # PDUs that reached the box (its own unit id, or a broadcast), whatever became of them.
    requests: int = 0
    replies: int = 0
    exception_replies: int = 0
    dropped_requests: int = 0
    dropped_replies: int = 0
    corrupted_crcs: int = 0
    broadcast_writes: int = 0
    # Broadcast reads and PDUs without a function code, which get no answer.
    ignored: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    pdu: bytes
    delay_s: float = 0.0


@dataclass(slots=True)
class _Reading:
    quantity: Quantity
    value: float
    # A reading set through the API stays where it was put instead of walking on.
    pinned: bool = False


class ModbusBox:
    """One amplifier I/O box at one unit id, seen as PDUs in and PDUs out; transports serve it."""

    def __init__(self, config: BoxConfig | None = None, *, clock: Clock = time.monotonic) -> None:
        self.config = config if config is not None else BoxConfig()
        self.faults = FaultPlan(self.config.seed)
        self.counters = BoxCounters()
        self._clock = clock
        self._zone_coils = [False] * self.config.zones
        self._amplifier_powered_since: float | None = None
        self._volume = self.config.initial_volume
        self._amplifier_fault = False
        self._stuck_relays: dict[int, bool] = {}
        self._readings = {
            quantity.name: _Reading(quantity, quantity.initial) for quantity in self.config.quantities
        }
        self._walk = random.Random(f"walk-{self.config.seed}")
        self._walk_started_at = clock()
        self._walk_steps_taken = 0
        self._changes = ChangeSignal()

    @property
    def unit(self) -> int:
        return self.config.unit

    # State, as tests and the command line see it

    @property
    def zone_coils(self) -> tuple[bool, ...]:
        """The commanded state of each zone relay, zone 1 first."""
        return tuple(self._zone_coils)

    @property
    def zone_relays_closed(self) -> tuple[bool, ...]:
        """What the relays' feedback contacts report: the coil, unless a relay is stuck."""
        return tuple(self._stuck_relays.get(zone, coil) for zone, coil in enumerate(self._zone_coils))

    @property
    def amplifier_powered(self) -> bool:
        return self._amplifier_powered_since is not None

    @property
    def amplifier_ready(self) -> bool:
        """Powered for at least the warm-up time."""
        since = self._amplifier_powered_since
        return since is not None and self._clock() - since >= self.config.amplifier_warmup_s

    @property
    def amplifier_fault(self) -> bool:
        return self._amplifier_fault

    @amplifier_fault.setter
    def amplifier_fault(self, fault: bool) -> None:
        self._amplifier_fault = fault
        self._changes.notify()

    @property
    def volume(self) -> int:
        return self._volume

    @property
    def sounding_zones(self) -> tuple[int, ...]:
        """The zones (0-based) whose horns carry audio now: relay closed, amplifier ready and healthy,
        volume above 0. A zone switched on while the amplifier is off stays silent."""
        if not self.amplifier_ready or self._amplifier_fault or self._volume == 0:
            return ()
        return tuple(zone for zone, closed in enumerate(self.zone_relays_closed) if closed)

    @property
    def audio_live(self) -> bool:
        return bool(self.sounding_zones)

    def stick_zone_relay(self, zone: int, closed: bool | None) -> None:
        """A welded (`True`) or burnt (`False`) relay contact on `zone` (0-based), which the feedback
        input then reports whatever the coil says; `None` repairs it."""
        if not 0 <= zone < self.config.zones:
            raise ValueError(f"zone {zone} outside 0..{self.config.zones - 1}")
        if closed is None:
            self._stuck_relays.pop(zone, None)
        else:
            self._stuck_relays[zone] = closed
        self._changes.notify()

    def value(self, quantity: str) -> float:
        """The current reading of `quantity`, in its unit."""
        self._advance_walk()
        return self._reading(quantity).value

    def set_value(self, quantity: str, value: float) -> None:
        """Puts `quantity` at `value` and keeps it there until `resume_walk`. A value beyond what a
        channel's data type holds reads as that type's limit."""
        if not math.isfinite(value):
            raise ValueError(f"{quantity}: {value} is not a finite reading")
        self._advance_walk()
        reading = self._reading(quantity)
        reading.value, reading.pinned = value, True
        self._changes.notify()

    def resume_walk(self, quantity: str) -> None:
        self._reading(quantity).pinned = False

    def step_walk(self, steps: int = 1) -> None:
        """Moves every reading that is not pinned by `steps` walk steps now, besides those the clock
        brings."""
        for _ in range(steps):
            self._walk_one_step()
        self._changes.notify()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Returns once `condition()` holds after a request or an API call changed the box."""
        await self._changes.wait_until(condition, timeout)

    # Requests

    def process(self, pdu: bytes, *, broadcast: bool = False) -> Reply | None:
        """The reply to a request PDU, or None when the box stays silent (a broadcast, a dropped
        request or reply, a PDU without a function code)."""
        self._advance_walk()
        self.counters.requests += 1
        try:
            return self._answer(pdu, broadcast=broadcast)
        finally:
            self._changes.notify()

    def rtu_reply_frame(self, pdu: bytes) -> bytes:
        """The RTU frame carrying `pdu` from this box, with its CRC spoiled when a fault says so."""
        frame = rtu_frame(self.unit, pdu)
        if self.faults.take_crc_corruption():
            self.counters.corrupted_crcs += 1
            frame = frame[:-2] + bytes((frame[-2] ^ 0xFF, frame[-1]))
        return frame

    def _answer(self, pdu: bytes, *, broadcast: bool) -> Reply | None:
        if self.faults.take_request_drop():
            self.counters.dropped_requests += 1
            return None
        try:
            function = request_function(pdu)
        except FrameError:
            self.counters.ignored += 1
            return None
        try:
            request = decode_request(pdu)
            if broadcast and isinstance(request, ReadRequest):
                # Modbus over Serial Line §2.2: a broadcast carries writes only; a read has nobody to answer.
                self.counters.ignored += 1
                return None
            response = self._execute(request)
        except ModbusExceptionError as refusal:
            logger.debug("unit %s refuses %s: %s", self.unit, pdu.hex(), refusal)
            response = exception_response(function, refusal.code)
        if broadcast:
            self.counters.broadcast_writes += 1
            return None
        if self.faults.take_reply_drop():
            self.counters.dropped_replies += 1
            return None
        self.counters.replies += 1
        if response[0] & EXCEPTION_FLAG:
            self.counters.exception_replies += 1
        return Reply(response, self.faults.reply_delay_s)

    def _execute(self, request: Request) -> bytes:
        injected = self.faults.take_exception(request.function, request.address, request.quantity)
        if injected is not None:
            raise ModbusExceptionError(request.function, injected, "injected fault")
        if isinstance(request, ReadRequest):
            addresses = range(request.address, request.address + request.quantity)
            if request.function is FunctionCode.READ_COILS:
                return read_bits_response(request.function, _pick(self._coil_image(), addresses, request))
            if request.function is FunctionCode.READ_DISCRETE_INPUTS:
                return read_bits_response(
                    request.function, _pick(self._discrete_input_image(), addresses, request)
                )
            table: RegisterTable = (
                "holding" if request.function is FunctionCode.READ_HOLDING_REGISTERS else "input"
            )
            return read_registers_response(
                request.function, _pick(self._register_image(table), addresses, request)
            )
        if isinstance(request, WriteCoilsRequest):
            self._write_coils(request)
        else:
            self._write_registers(request)
        return write_response(request)

    def _write_coils(self, request: WriteCoilsRequest) -> None:
        writable = {*range(ZONE_COIL_BASE, ZONE_COIL_BASE + self.config.zones), AMPLIFIER_POWER_COIL}
        addresses = range(request.address, request.address + request.quantity)
        if not writable.issuperset(addresses):
            raise _illegal_address(request)
        for address, on in zip(addresses, request.values, strict=True):
            if address == AMPLIFIER_POWER_COIL:
                self._power_amplifier(on=on)
            else:
                self._zone_coils[address - ZONE_COIL_BASE] = on

    def _power_amplifier(self, *, on: bool) -> None:
        if not on:
            self._amplifier_powered_since = None
        elif self._amplifier_powered_since is None:
            # Switching on an amplifier that is on does not restart its warm-up.
            self._amplifier_powered_since = self._clock()

    def _write_registers(self, request: WriteRegistersRequest) -> None:
        # The volume is the only writable register; the sensor registers are read-only.
        if request.address != VOLUME_REGISTER or request.quantity != 1:
            raise _illegal_address(request)
        volume = request.values[0]
        if volume > VOLUME_MAX:
            raise ModbusExceptionError(
                request.function, ExceptionCode.ILLEGAL_DATA_VALUE, f"volume {volume} outside 0..{VOLUME_MAX}"
            )
        self._volume = volume

    def _coil_image(self) -> dict[int, bool]:
        image = {ZONE_COIL_BASE + zone: on for zone, on in enumerate(self._zone_coils)}
        image[AMPLIFIER_POWER_COIL] = self.amplifier_powered
        return image

    def _discrete_input_image(self) -> dict[int, bool]:
        image = {
            AMPLIFIER_FAULT_INPUT: self._amplifier_fault,
            AMPLIFIER_READY_INPUT: self.amplifier_ready,
            AUDIO_LIVE_INPUT: self.audio_live,
        }
        for zone, closed in enumerate(self.zone_relays_closed):
            image[ZONE_FEEDBACK_INPUT_BASE + zone] = closed
        return image

    def _register_image(self, table: RegisterTable) -> dict[int, int]:
        image = {VOLUME_REGISTER: self._volume} if table == "holding" else {}
        for channel in self.config.channels:
            if channel.table == table:
                registers = channel.encoding.encode(self._readings[channel.quantity].value)
                image.update(zip(channel.addresses, registers, strict=True))
        return image

    # Sensors

    def _reading(self, quantity: str) -> _Reading:
        try:
            return self._readings[quantity]
        except KeyError:
            raise KeyError(
                f"no quantity {quantity!r}; the box measures {', '.join(self._readings)}"
            ) from None

    def _advance_walk(self) -> None:
        due = int((self._clock() - self._walk_started_at) / self.config.walk_interval_s)
        for _ in range(min(due - self._walk_steps_taken, MAX_WALK_CATCH_UP_STEPS)):
            self._walk_one_step()
        self._walk_steps_taken = max(self._walk_steps_taken, due)

    def _walk_one_step(self) -> None:
        for reading in self._readings.values():
            quantity = reading.quantity
            # Drawn for pinned readings too, so that pinning one does not change the others' course.
            change = self._walk.uniform(-quantity.step, quantity.step)
            if reading.pinned:
                continue
            moved = reading.value + change
            # Reflected at the ends of the range, so that a reading does not stick to a limit.
            if moved > quantity.maximum:
                moved = 2 * quantity.maximum - moved
            if moved < quantity.minimum:
                moved = 2 * quantity.minimum - moved
            reading.value = min(quantity.maximum, max(quantity.minimum, moved))


def _pick(image: Mapping[int, _V], addresses: range, request: ReadRequest) -> tuple[_V, ...]:
    try:
        return tuple(image[address] for address in addresses)
    except KeyError:
        raise _illegal_address(request) from None


def _illegal_address(request: Request) -> ModbusExceptionError:
    last = request.address + request.quantity - 1
    return ModbusExceptionError(
        request.function,
        ExceptionCode.ILLEGAL_DATA_ADDRESS,
        f"addresses {request.address}..{last} not all mapped",
    )


# Transports


class _UnitTable:
    """The boxes behind one transport, by unit id."""

    def __init__(self, boxes: Sequence[ModbusBox]) -> None:
        if not boxes:
            raise BoxConfigError("a transport needs at least one box")
        self.boxes = tuple(boxes)
        self._by_unit: dict[int, ModbusBox] = {}
        for box in self.boxes:
            if self._by_unit.setdefault(box.unit, box) is not box:
                raise BoxConfigError(f"two boxes with unit {box.unit} on one transport")

    def for_tcp(self, unit_id: int) -> ModbusBox | None:
        """The box a Modbus TCP request is for. A lone box also answers 255 and 0, the unit ids of a
        server addressed directly by its IP address (Modbus Messaging Implementation Guide)."""
        box = self._by_unit.get(unit_id)
        if box is None and unit_id in {TCP_DIRECT_UNIT_ID, 0} and len(self.boxes) == 1:
            return self.boxes[0]
        return box

    def for_rtu(self, address: int) -> ModbusBox | None:
        return self._by_unit.get(address)


@dataclass(slots=True)
class LineCounters:
    # Frames delimited on the line (RTU) or MBAP frames read (TCP).
    frames: int = 0
    crc_errors: int = 0
    # Too short, too long, or an MBAP protocol id other than Modbus.
    malformed_frames: int = 0
    # Frames for a unit id no box of this transport has; a slave stays silent on those.
    for_other_units: int = 0
    broadcasts: int = 0
    # Reply bytes lost because nobody read the line.
    lost_output_bytes: int = 0


class _RtuSession:
    """One RTU byte stream (a pty line, one RTU-over-TCP connection): frames delimited by silence and
    answered one at a time, as on a half-duplex RS-485 pair."""

    def __init__(
        self,
        units: _UnitTable,
        counters: LineCounters,
        changes: ChangeSignal,
        silence_s: float,
        send: Callable[[bytes], None],
    ) -> None:
        self._units = units
        self._counters = counters
        self._changes = changes
        self._silence_s = silence_s
        self._send = send
        self._buffer = bytearray()
        self._end_of_frame: asyncio.TimerHandle | None = None
        self._frames: asyncio.Queue[bytes] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._answer_frames())

    async def close(self) -> None:
        if self._end_of_frame is not None:
            self._end_of_frame.cancel()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    def feed(self, data: bytes) -> None:
        """Bytes as they arrive; a frame ends after `silence_s` without any."""
        if self._end_of_frame is not None:
            self._end_of_frame.cancel()
        # One byte past the longest frame is enough to know that the frame is too long.
        self._buffer += data[: MAX_RTU_FRAME_LENGTH + 1 - len(self._buffer)]
        self._end_of_frame = asyncio.get_running_loop().call_later(self._silence_s, self._close_frame)

    def _close_frame(self) -> None:
        self._end_of_frame = None
        frame = bytes(self._buffer)
        self._buffer.clear()
        self._frames.put_nowait(frame)

    async def _answer_frames(self) -> None:
        while True:
            frame = await self._frames.get()
            try:
                outgoing = self._route(frame)
            except Exception:
                # A bug in the box must not silence the whole line: log it, go on with the next frame.
                logger.exception("RTU frame %s could not be handled", frame.hex())
                continue
            finally:
                self._changes.notify()
            if outgoing is None:
                continue
            box, reply = outgoing
            if reply.delay_s > 0:
                await asyncio.sleep(reply.delay_s)
            self._send(box.rtu_reply_frame(reply.pdu))

    def _route(self, frame: bytes) -> tuple[ModbusBox, Reply] | None:
        self._counters.frames += 1
        try:
            address, pdu = split_rtu_frame(frame)
        except CrcMismatchError as error:
            # Modbus over Serial Line §2.5.1: a frame with a wrong CRC is discarded without a reply.
            self._counters.crc_errors += 1
            logger.debug("RTU frame %s dropped: %s", frame.hex(), error)
            return None
        except FrameError as error:
            self._counters.malformed_frames += 1
            logger.debug("RTU frame %s dropped: %s", frame.hex(), error)
            return None
        if address == BROADCAST_ADDRESS:
            self._counters.broadcasts += 1
            for listener in self._units.boxes:
                listener.process(pdu, broadcast=True)
            return None
        box = self._units.for_rtu(address)
        if box is None:
            self._counters.for_other_units += 1
            return None
        reply = box.process(pdu)
        return None if reply is None else (box, reply)


class RtuPtyLine:
    """Modbus RTU on a pseudo-terminal: a client opens `slave_path` (e.g. /dev/pts/7) as its serial port.

    A pty has no baud rate of its own: `baud` sets the inter-frame silence t3.5 the line waits for
    before it takes the bytes received as a frame; `min_silence_s` raises it for a client that writes
    a frame in pieces.
    """

    def __init__(
        self, boxes: Sequence[ModbusBox], *, baud: int = DEFAULT_BAUD, min_silence_s: float = 0.0
    ) -> None:
        self._units = _UnitTable(boxes)
        self.baud = baud
        self.silence_s = max(inter_frame_silence_s(baud), min_silence_s)
        self.counters = LineCounters()
        self._changes = ChangeSignal()
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._slave_path: str | None = None
        self._session: _RtuSession | None = None
        self._pending_output = bytearray()
        self._writer_registered = False

    @property
    def slave_path(self) -> str:
        if self._slave_path is None:
            raise RuntimeError("the line is not open")
        return self._slave_path

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Returns once `condition()` holds after a frame was handled on the line."""
        await self._changes.wait_until(condition, timeout)

    async def __aenter__(self) -> Self:
        master_fd, slave_fd = os.openpty()
        self._master_fd, self._slave_fd = master_fd, slave_fd
        try:
            # Raw, so that the line discipline neither echoes replies back nor eats bytes such as 0x03
            # or 0x0a; held open by the line itself, so that the master never reads EIO between clients.
            tty.setraw(slave_fd)
            _set_line_speed(slave_fd, self.baud)
            os.set_blocking(master_fd, False)
            self._slave_path = os.ttyname(slave_fd)
            self._session = _RtuSession(self._units, self.counters, self._changes, self.silence_s, self._send)
            self._session.start()
            asyncio.get_running_loop().add_reader(master_fd, self._read_available)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._master_fd is not None:
            loop.remove_reader(self._master_fd)
            loop.remove_writer(self._master_fd)
        if self._session is not None:
            await self._session.close()
            self._session = None
        for descriptor in (self._master_fd, self._slave_fd):
            if descriptor is not None:
                os.close(descriptor)
        self._master_fd = self._slave_fd = None

    def _read_available(self) -> None:
        if self._master_fd is None or self._session is None:
            return
        try:
            data = os.read(self._master_fd, MAX_RTU_FRAME_LENGTH)
        except BlockingIOError:
            return
        if data:
            self._session.feed(data)

    def _send(self, frame: bytes) -> None:
        room = MAX_PENDING_LINE_OUTPUT - len(self._pending_output)
        if len(frame) > room:
            self.counters.lost_output_bytes += len(frame)
            logger.warning("nobody reads %s: a reply of %d bytes is lost", self._slave_path, len(frame))
            return
        self._pending_output += frame
        self._flush_output()

    def _flush_output(self) -> None:
        if self._master_fd is None:
            return
        try:
            written = os.write(self._master_fd, self._pending_output)
        except BlockingIOError:
            written = 0
        del self._pending_output[:written]
        loop = asyncio.get_running_loop()
        if self._pending_output and not self._writer_registered:
            loop.add_writer(self._master_fd, self._flush_output)
            self._writer_registered = True
        elif not self._pending_output and self._writer_registered:
            loop.remove_writer(self._master_fd)
            self._writer_registered = False


def _set_line_speed(descriptor: int, baud: int) -> None:
    # Only informative on a pty (a client reading the port's settings sees the line's baud rate).
    speed = getattr(termios, f"B{baud}", None)
    if speed is None:
        return
    attributes = termios.tcgetattr(descriptor)
    attributes[4] = attributes[5] = speed
    termios.tcsetattr(descriptor, termios.TCSANOW, attributes)


class _StreamServer(abc.ABC):
    """A TCP listener whose connections each run `_serve_connection` until the peer leaves."""

    def __init__(self, boxes: Sequence[ModbusBox], host: str, port: int) -> None:
        self._units = _UnitTable(boxes)
        self._host = host
        self._requested_port = port
        self.counters = LineCounters()
        self._changes = ChangeSignal()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port it listens on (the one the system chose when asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Returns once `condition()` holds after a frame was handled by this server."""
        await self._changes.wait_until(condition, timeout)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, self._host, self._requested_port)
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in self._connections:
            connection.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of our own rather than a coroutine callback: the stream machinery reports a cancelled
        # callback task as an unhandled error, and shutting down cancels the connections.
        connection = asyncio.get_running_loop().create_task(self._run_connection(reader, writer))
        self._connections.add(connection)
        connection.add_done_callback(self._connections.discard)

    async def _run_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client left, possibly in the middle of a frame
        except Exception:
            # Unretrieved, it would surface only when the task is collected; hang up on this client only.
            logger.exception("a Modbus connection failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @abc.abstractmethod
    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers the frames of one connection until the peer leaves."""


class ModbusTcpServer(_StreamServer):
    """Modbus TCP: MBAP header + PDU. Requests of one connection are answered in order."""

    def __init__(self, boxes: Sequence[ModbusBox], host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(boxes, host, port)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            header = MbapHeader.unpack(await reader.readexactly(MBAP_HEADER_LENGTH))
            if not 2 <= header.length <= MAX_PDU_LENGTH + 1:  # noqa: PLR2004 - unit id + function code
                # Without a believable length the stream cannot be resynchronised: hang up.
                self.counters.malformed_frames += 1
                self._changes.notify()
                logger.warning(
                    "MBAP length %d outside 2..%d: closing the connection", header.length, MAX_PDU_LENGTH + 1
                )
                return
            pdu = await reader.readexactly(header.pdu_length)
            reply = self._handle(header, pdu)
            self._changes.notify()
            if reply is None:
                continue
            if reply.delay_s > 0:
                await asyncio.sleep(reply.delay_s)
            writer.write(mbap_frame(header.transaction_id, header.unit_id, reply.pdu))
            await writer.drain()

    def _handle(self, header: MbapHeader, pdu: bytes) -> Reply | None:
        self.counters.frames += 1
        if header.protocol_id != MODBUS_PROTOCOL_ID:
            self.counters.malformed_frames += 1
            return None
        box = self._units.for_tcp(header.unit_id)
        if box is None:
            self.counters.for_other_units += 1
            return None
        return box.process(pdu)


class RtuOverTcpServer(_StreamServer):
    """Raw RTU frames over TCP (what a serial-to-Ethernet converter in transparent mode carries, and a
    `socket://` serial port in pymodbus or pyserial opens): each connection is a line of its own."""

    def __init__(
        self,
        boxes: Sequence[ModbusBox],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        baud: int = DEFAULT_BAUD,
        min_silence_s: float = 0.0,
    ) -> None:
        super().__init__(boxes, host, port)
        self.silence_s = max(inter_frame_silence_s(baud), min_silence_s)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _RtuSession(self._units, self.counters, self._changes, self.silence_s, writer.write)
        session.start()
        try:
            while data := await reader.read(MAX_RTU_FRAME_LENGTH):
                session.feed(data)
        finally:
            await session.close()


# Command line

READY_PREFIX: Final = "READY"
_EXIT_OK: Final = 0
_EXIT_FAILED: Final = 1
_EXIT_USAGE: Final = 2


@dataclass(frozen=True, slots=True)
class BoxServiceConfig:
    """Everything `python -m firmware_sim modbus-box` runs: the boxes and where they listen."""

    boxes: tuple[BoxConfig, ...]
    tcp: tuple[tuple[str, int], ...] = ()
    rtu_over_tcp: tuple[tuple[str, int], ...] = ()
    rtu_pty: bool = False
    baud: int = DEFAULT_BAUD
    min_silence_s: float = 0.0
    drop_fraction: float = 0.0
    bad_crc_fraction: float = 0.0
    reply_delay_s: float = 0.0


def build_parser(prog: str = "python -m firmware_sim modbus-box") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A simulated amplifier I/O box (wired horn zones, amplifier, sensors) speaking Modbus "
        "TCP and RTU (docs/protocol.md §3). Prints READY with its endpoints, runs until SIGTERM.",
    )
    endpoints = parser.add_argument_group("endpoints (at least one)")
    endpoints.add_argument(
        "--tcp", action="append", default=[], metavar="HOST:PORT", help="Modbus TCP (port 0: any free port)"
    )
    endpoints.add_argument("--rtu-pty", action="store_true", help="Modbus RTU on a new pseudo-terminal")
    endpoints.add_argument(
        "--rtu-tcp",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="raw RTU frames over TCP (socket://)",
    )
    line = parser.add_argument_group("RTU line")
    line.add_argument("--baud", type=int, default=DEFAULT_BAUD, help="sets t3.5 (default: %(default)s)")
    line.add_argument(
        "--min-silence-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="a longer inter-frame silence than t3.5",
    )
    boxes = parser.add_argument_group("boxes")
    boxes.add_argument(
        "--unit",
        default="1",
        metavar="N[,N…]",
        help="unit ids; several boxes share the endpoints (default: 1)",
    )
    boxes.add_argument(
        "--zones", type=int, default=DEFAULT_ZONES, help="zone relays per box (default: %(default)s)"
    )
    boxes.add_argument(
        "--volume", type=int, default=DEFAULT_VOLUME, help="volume at power-on (default: %(default)s)"
    )
    boxes.add_argument(
        "--amplifier-warmup",
        type=float,
        default=DEFAULT_AMPLIFIER_WARMUP_S,
        metavar="S",
        help="seconds from amplifier power-on to ready (default: %(default)s)",
    )
    boxes.add_argument("--seed", type=int, default=1, help="each box walks from seed + unit id (default: 1)")
    boxes.add_argument(
        "--walk-interval",
        type=float,
        default=DEFAULT_WALK_INTERVAL_S,
        metavar="S",
        help="seconds between sensor walk steps (default: %(default)s)",
    )
    faults = parser.add_argument_group("faults (every box)")
    faults.add_argument("--drop-fraction", type=float, default=0.0, help="share of requests not answered")
    faults.add_argument(
        "--bad-crc-fraction", type=float, default=0.0, help="share of RTU replies with a bad CRC"
    )
    faults.add_argument(
        "--reply-delay-ms", type=float, default=0.0, metavar="MS", help="delay before each reply"
    )
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def parse_endpoint(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port)."""
    host, separator, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) <= 0xFFFF:  # noqa: PLR2004
        raise BoxConfigError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def config_from_arguments(arguments: argparse.Namespace) -> BoxServiceConfig:
    if not (arguments.tcp or arguments.rtu_tcp or arguments.rtu_pty):
        raise BoxConfigError("give at least one endpoint: --tcp, --rtu-pty or --rtu-tcp")
    try:
        units = [int(unit) for unit in arguments.unit.split(",") if unit.strip()]
    except ValueError:
        raise BoxConfigError(f"--unit takes comma-separated unit ids, not {arguments.unit!r}") from None
    if not units or len(set(units)) != len(units):
        raise BoxConfigError(f"--unit needs distinct unit ids, not {arguments.unit!r}")
    if arguments.baud <= 0:
        raise BoxConfigError("--baud must be greater than 0")
    for name in ("drop_fraction", "bad_crc_fraction"):
        _fraction(f"--{name.replace('_', '-')}", getattr(arguments, name))
    if arguments.reply_delay_ms < 0 or arguments.min_silence_ms < 0:
        raise BoxConfigError("--reply-delay-ms and --min-silence-ms must not be negative")
    boxes = tuple(
        BoxConfig(
            unit=unit,
            zones=arguments.zones,
            initial_volume=arguments.volume,
            amplifier_warmup_s=arguments.amplifier_warmup,
            seed=arguments.seed + unit,
            walk_interval_s=arguments.walk_interval,
        )
        for unit in units
    )
    return BoxServiceConfig(
        boxes=boxes,
        tcp=tuple(parse_endpoint(endpoint) for endpoint in arguments.tcp),
        rtu_over_tcp=tuple(parse_endpoint(endpoint) for endpoint in arguments.rtu_tcp),
        rtu_pty=arguments.rtu_pty,
        baud=arguments.baud,
        min_silence_s=arguments.min_silence_ms / 1000,
        drop_fraction=arguments.drop_fraction,
        bad_crc_fraction=arguments.bad_crc_fraction,
        reply_delay_s=arguments.reply_delay_ms / 1000,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m firmware_sim modbus-box ARGS`; returns the exit status."""
    parser = build_parser()
    try:
        arguments = parser.parse_args(argv)
        try:
            config = config_from_arguments(arguments)
        except ValueError as error:  # BoxConfigError, and a fraction out of range
            parser.error(str(error))
    except SystemExit as exit_request:  # argparse exits on --help and on usage errors
        return exit_request.code if isinstance(exit_request.code, int) else _EXIT_USAGE
    logging.basicConfig(
        level=arguments.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s: %(message)s",
    )
    return asyncio.run(serve(config))


async def serve(config: BoxServiceConfig, stop: asyncio.Event | None = None) -> int:
    """Runs the boxes on their endpoints until `stop` is set or SIGTERM/SIGINT arrives; prints the
    READY line once every endpoint listens."""
    stop = stop if stop is not None else asyncio.Event()
    boxes = [ModbusBox(box_config) for box_config in config.boxes]
    for box in boxes:
        box.faults.drop_fraction = config.drop_fraction
        box.faults.bad_crc_fraction = config.bad_crc_fraction
        box.faults.reply_delay_s = config.reply_delay_s
    with stop_on_signals(stop):
        async with contextlib.AsyncExitStack() as endpoints:
            announced: list[str] = []
            try:
                for host, port in config.tcp:
                    server = await endpoints.enter_async_context(ModbusTcpServer(boxes, host, port))
                    announced.append(f"tcp={_endpoint_text(host, server.port)}")
                if config.rtu_pty:
                    line = await endpoints.enter_async_context(
                        RtuPtyLine(boxes, baud=config.baud, min_silence_s=config.min_silence_s)
                    )
                    announced.append(f"rtu-pty={line.slave_path}")
                for host, port in config.rtu_over_tcp:
                    rtu_server = await endpoints.enter_async_context(
                        RtuOverTcpServer(
                            boxes, host, port, baud=config.baud, min_silence_s=config.min_silence_s
                        )
                    )
                    announced.append(f"rtu-tcp={_endpoint_text(host, rtu_server.port)}")
            except OSError as error:
                logger.error("cannot open an endpoint: %s", error)  # noqa: TRY400 - the message says it all
                return _EXIT_FAILED
            units = ",".join(str(box.unit) for box in boxes)
            sys.stdout.write(f"{READY_PREFIX} {' '.join(announced)} units={units}\n")
            sys.stdout.flush()
            await stop.wait()
    return _EXIT_OK


def _endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
