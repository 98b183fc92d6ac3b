"""The Modbus driver (DESIGN.md §3, docs/protocol.md §3): sensors polled into readings, and the wired
zones of amplifier boxes switched for a broadcast.

One `ModbusLink` per physical link (a TCP endpoint, a serial line, RTU over TCP), shared by every device
on it, so that its lock, its RTU gap and its write-before-poll order hold across devices. A sensor is
polled every `poll_interval_s` with as few requests as its register map allows (adjacent registers of a
table in one read); each value becomes a `TelemetryReading`, a value at the limit of its data type
(a saturated transmitter) a reading with a `problem`. A device whose poll fails is reported offline
and degraded once, and online again when it answers.

`send` takes the zone commands of docs/protocol.md §3.4 as documents:
`{"op": "zones_on", "zones": [3], "volume": 80}` runs steps 1-5 of the broadcast sequence and
`{"op": "zones_off", "zones": [3], "amplifier_off": true}` step 7 (step 6, the audio itself, is played
by the speaker endpoint bound to the amplifier).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

from drivers.base import (
    Ack,
    DeviceCommand,
    DeviceState,
    DeviceTimeout,
    DriverError,
    InboundEvent,
    ProtocolError,
    TelemetryReading,
)
from drivers.modbus import DEFAULT_BAUD, MAX_READ_REGISTERS, ModbusLink, SerialEndpoint, TcpEndpoint
from drivers.modbus_codec import RegisterFormat

log = logging.getLogger(__name__)

Table = Literal["input", "holding"]
AMPLIFIER_COIL = 100
AMPLIFIER_STATUS_INPUT = 0  # fault, ready, audio_live (§3.4)
ZONE_FEEDBACK_BASE = 100
VOLUME_REGISTER = 0
MAX_ZONES = 64
MAX_VOLUME = 100
_EVENT_BACKLOG = 100_000
_MAX_START_SPREAD_S = 5.0


class LinkUrlError(ValueError):
    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"link {url!r}: {detail}")


def link_endpoint(url: str) -> TcpEndpoint | SerialEndpoint:
    """`tcp://host:port` (Modbus TCP), `rtu:///dev/ttyUSB0?baud=9600` (RTU on a serial line) or
    `rtu+tcp://host:port?baud=9600` (RTU frames carried over TCP, a serial server)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    try:
        baud = int(query.get("baud", [str(DEFAULT_BAUD)])[0])
    except ValueError as error:
        raise LinkUrlError(url, "baud must be a whole number") from error
    if baud <= 0:
        raise LinkUrlError(url, "baud must be positive")
    if parts.scheme == "tcp":
        if not parts.hostname:
            raise LinkUrlError(url, "give tcp://host:port")
        return TcpEndpoint(parts.hostname, parts.port or 502)
    if parts.scheme == "rtu":
        if not parts.path:
            raise LinkUrlError(url, "give rtu:///dev/ttyX")
        return SerialEndpoint(parts.path, baud)
    if parts.scheme == "rtu+tcp":
        if not parts.hostname or not parts.port:
            raise LinkUrlError(url, "give rtu+tcp://host:port")
        return SerialEndpoint(f"socket://{parts.hostname}:{parts.port}", baud)
    raise LinkUrlError(url, "the scheme is tcp, rtu or rtu+tcp")


@dataclass(frozen=True, slots=True)
class RegisterPoint:
    """One metric of a sensor: where it sits and how it is encoded (docs/protocol.md §3.5)."""

    metric: str
    table: Table
    address: int
    format: RegisterFormat
    unit: str | None = None

    @property
    def end(self) -> int:
        return self.address + self.format.count


@dataclass(frozen=True, slots=True)
class ModbusSensor:
    address: str
    """The device's address in the controller's directory."""
    link: str
    unit: int
    points: tuple[RegisterPoint, ...]
    poll_interval_s: float = 10.0


@dataclass(frozen=True, slots=True)
class _Block:
    """One read request: adjacent registers of one table, and the points inside it."""

    table: Table
    start: int
    count: int
    points: tuple[RegisterPoint, ...]


def read_blocks(points: Sequence[RegisterPoint]) -> list[_Block]:
    """Group points into as few reads as the map allows: only registers that touch are read together,
    because a box answers exception 02 to a read that spans an unmapped address (§3.5)."""
    blocks: list[_Block] = []
    ordered = sorted(points, key=lambda p: (p.table, p.address))
    for table, group in itertools.groupby(ordered, key=lambda p: p.table):
        current: list[RegisterPoint] = []
        for point in group:
            if current and (
                point.address > max(p.end for p in current)
                or point.end - current[0].address > MAX_READ_REGISTERS
            ):
                blocks.append(_block(table, current))
                current = []
            current.append(point)
        if current:
            blocks.append(_block(table, current))
    return blocks


def _block(table: Table, points: list[RegisterPoint]) -> _Block:
    start = points[0].address
    return _Block(table, start, max(p.end for p in points) - start, tuple(points))


@dataclass(slots=True)
class _Poller:
    sensor: ModbusSensor
    task: asyncio.Task[None] | None = None
    online: bool | None = None


@dataclass(frozen=True, slots=True)
class ZoneStatus:
    amplifier_fault: bool
    amplifier_ready: bool
    audio_live: bool
    zones_closed: tuple[bool, ...]


@dataclass
class _LinkEntry:
    link: ModbusLink
    users: set[str] = field(default_factory=set)


class ModbusDriver:
    """Sensors and amplifier boxes on any number of links; the `Driver` protocol of drivers/base.py."""

    def __init__(
        self,
        *,
        timeout_s: float = 1.0,
        warmup_timeout_s: float = 10.0,
        on_poll: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        """`on_poll(address, seconds, ok)` hears how long each poll of a sensor took (metrics, benchmarks)."""
        self._on_poll = on_poll
        self._timeout_s = timeout_s
        self._warmup_timeout_s = warmup_timeout_s
        self._links: dict[str, _LinkEntry] = {}
        self._pollers: dict[str, _Poller] = {}
        self._boxes: dict[str, tuple[str, int]] = {}
        self._events: asyncio.Queue[InboundEvent] = asyncio.Queue(maxsize=_EVENT_BACKLOG)
        self._dropping = False
        self.dropped_events = 0
        self._open = False

    async def __aenter__(self) -> Self:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        for address in list(self._pollers):
            await self.remove(address)
        for address in list(self._boxes):
            await self.remove(address)

    # -- devices ---------------------------------------------------------------------------------
    def _link(self, url: str, user: str) -> ModbusLink:
        entry = self._links.get(url)
        if entry is None:
            entry = self._links[url] = _LinkEntry(ModbusLink(link_endpoint(url), name=url))
        entry.users.add(user)
        return entry.link

    async def _release(self, url: str, user: str) -> None:
        entry = self._links.get(url)
        if entry is None:
            return
        entry.users.discard(user)
        if not entry.users:
            del self._links[url]
            await entry.link.close()

    async def add_sensor(self, sensor: ModbusSensor) -> None:
        """Start polling `sensor` (replacing an earlier configuration of the same address)."""
        link_endpoint(sensor.link)  # a bad URL fails here, before anything changes
        await self.remove(sensor.address)
        link = self._link(sensor.link, sensor.address)
        poller = self._pollers[sensor.address] = _Poller(sensor)
        poller.task = asyncio.create_task(self._poll_forever(poller, link), name=f"modbus-{sensor.address}")

    async def add_box(self, address: str, link: str, unit: int) -> None:
        """An amplifier box whose zones `send` switches."""
        link_endpoint(link)
        await self.remove(address)
        self._link(link, address)
        self._boxes[address] = (link, unit)

    async def remove(self, address: str) -> None:
        poller = self._pollers.pop(address, None)
        if poller is not None:
            if poller.task is not None:
                poller.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller.task
            await self._release(poller.sensor.link, address)
        box = self._boxes.pop(address, None)
        if box is not None:
            await self._release(box[0], address)

    # -- polling ---------------------------------------------------------------------------------
    async def _poll_forever(self, poller: _Poller, link: ModbusLink) -> None:
        sensor = poller.sensor
        blocks = read_blocks(sensor.points)
        loop = asyncio.get_running_loop()
        # Sensors added together (a restart, a bulk import) start at spread-out moments, not all at once.
        next_poll = loop.time() + random.uniform(0, min(sensor.poll_interval_s, _MAX_START_SPREAD_S))
        await asyncio.sleep(next_poll - loop.time())
        while True:
            await self.poll_once(poller, link, blocks)
            next_poll += sensor.poll_interval_s
            # A poll that overran its interval is not made up for: the next starts at once, once.
            next_poll = max(next_poll, loop.time())
            await asyncio.sleep(next_poll - loop.time())  # the poll period itself, not synchronisation

    async def poll_once(self, poller: _Poller, link: ModbusLink, blocks: Sequence[_Block]) -> None:
        sensor = poller.sensor
        at = datetime.now(UTC)
        started = time.perf_counter()
        readings: list[TelemetryReading] = []
        try:
            for block in blocks:
                read = link.read_input_registers if block.table == "input" else link.read_holding_registers
                registers = await read(sensor.unit, block.start, block.count, timeout=self._timeout_s)
                readings.extend(_decode(sensor.address, block, registers, at))
        except DriverError as error:
            if self._on_poll is not None:
                self._on_poll(sensor.address, time.perf_counter() - started, False)
            if poller.online is not False:
                poller.online = False
                self._emit(
                    DeviceState(
                        sensor.address,
                        online=False,
                        at=at,
                        attributes={"degraded": True, "error": str(error)[:300]},
                    )
                )
            return
        if self._on_poll is not None:
            self._on_poll(sensor.address, time.perf_counter() - started, True)
        if poller.online is not True:
            poller.online = True
            self._emit(DeviceState(sensor.address, online=True, at=at, attributes={"degraded": False}))
        for reading in readings:
            self._emit(reading)

    def _emit(self, event: InboundEvent) -> None:
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped_events += 1
            if not self._dropping:
                self._dropping = True
                log.warning("modbus events are not consumed: dropping them (%s first)", type(event).__name__)
        else:
            self._dropping = False

    # -- the Driver protocol ---------------------------------------------------------------------
    async def events(self) -> AsyncIterator[InboundEvent]:
        while True:
            yield await self._events.get()

    async def ping(self) -> bool:
        return self._open

    async def send(self, command: DeviceCommand, *, timeout: float) -> Ack:
        box = self._boxes.get(command.address)
        if box is None:
            raise ProtocolError(f"{command.address!r} is not a Modbus amplifier box known to this driver")
        link = self._links[box[0]].link
        unit = box[1]
        document = command.document
        published_at = datetime.now(UTC)
        zones = _zones(document)
        operation = document.get("op")
        async with asyncio.timeout(timeout):
            if operation == "zones_on":
                await self.zones_on(link, unit, zones, volume=_volume(document))
            elif operation == "zones_off":
                await self.zones_off(link, unit, zones, amplifier_off=bool(document.get("amplifier_off")))
            else:
                raise ProtocolError(f"op: {operation!r} is not zones_on or zones_off")
        return Ack(command.command_id, accepted_at=datetime.now(UTC), published_at=published_at)

    # -- the wired-zone sequence (docs/protocol.md §3.4) ------------------------------------------
    async def zones_on(
        self, link: ModbusLink, unit: int, zones: Sequence[int], *, volume: int | None = None
    ) -> ZoneStatus:
        """Steps 1-5: volume, amplifier on, wait until ready (a fault fails), zones on, read back."""
        timeout = self._timeout_s
        if volume is not None:
            await link.write_register(unit, VOLUME_REGISTER, volume, timeout=timeout)
        await link.write_coil(unit, AMPLIFIER_COIL, True, timeout=timeout)
        await self._wait_ready(link, unit)
        for zone in zones:
            await link.write_coil(unit, zone - 1, True, timeout=timeout)
        status = await self.zone_status(link, unit, zones)
        stuck = [zone for zone, closed in zip(zones, status.zones_closed, strict=True) if not closed]
        if stuck:
            raise ProtocolError(f"zones {stuck}: the relay did not close (its feedback contact reads open)")
        if not status.audio_live:
            raise ProtocolError("audio_live: the box reports that nothing can be heard")
        return status

    async def zones_off(
        self, link: ModbusLink, unit: int, zones: Sequence[int], *, amplifier_off: bool
    ) -> None:
        """Step 7: the zones off, then the amplifier when no other zone of it is in use."""
        for zone in zones:
            await link.write_coil(unit, zone - 1, False, timeout=self._timeout_s)
        if amplifier_off:
            await link.write_coil(unit, AMPLIFIER_COIL, False, timeout=self._timeout_s)

    async def zone_status(self, link: ModbusLink, unit: int, zones: Sequence[int]) -> ZoneStatus:
        fault, ready, live = await link.read_discrete_inputs(
            unit, AMPLIFIER_STATUS_INPUT, 3, timeout=self._timeout_s
        )
        closed: list[bool] = []
        for zone in zones:
            (feedback,) = await link.read_discrete_inputs(
                unit, ZONE_FEEDBACK_BASE + zone - 1, 1, timeout=self._timeout_s
            )
            closed.append(feedback)
        return ZoneStatus(fault, ready, live, tuple(closed))

    async def _wait_ready(self, link: ModbusLink, unit: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._warmup_timeout_s
        pause = 0.05
        while True:
            fault, ready, _live = await link.read_discrete_inputs(
                unit, AMPLIFIER_STATUS_INPUT, 3, timeout=self._timeout_s
            )
            if fault:
                raise ProtocolError("amplifier_fault: the amplifier reports a fault")
            if ready:
                return
            if loop.time() >= deadline:
                raise DeviceTimeout(f"amplifier_ready: not ready {self._warmup_timeout_s} s after power on")
            await asyncio.sleep(pause)  # polling the box's warm-up: the box has no way to tell us
            pause = min(pause * 2, 0.5)

    def link_of(self, address: str) -> ModbusLink:
        """The link a configured device is on (for callers that drive a box step by step)."""
        poller = self._pollers.get(address)
        url = poller.sensor.link if poller is not None else self._boxes[address][0]
        return self._links[url].link


def _decode(address: str, block: _Block, registers: Sequence[int], at: datetime) -> list[TelemetryReading]:
    readings = []
    for point in block.points:
        offset = point.address - block.start
        words = registers[offset : offset + point.format.count]
        value = point.format.decode(words)
        problem = None
        if point.format.at_limit(words):
            problem = f"{value} is at the limit of its {point.format.data_type}: the transmitter is saturated"
        elif not math.isfinite(value):
            problem = f"{value} is not a finite number"
        readings.append(TelemetryReading(address, point.metric, value, point.unit, at, problem=problem))
    return readings


def _zones(document: Any) -> list[int]:
    zones = document.get("zones")
    if (
        not isinstance(zones, list)
        or not zones
        or not all(type(z) is int and 1 <= z <= MAX_ZONES for z in zones)
    ):
        raise ProtocolError(f"zones: a non-empty list of zone numbers 1-{MAX_ZONES}")
    return zones


def _volume(document: Any) -> int | None:
    volume = document.get("volume")
    if volume is None:
        return None
    if type(volume) is not int or not 0 <= volume <= MAX_VOLUME:
        raise ProtocolError(f"volume: a whole number 0-{MAX_VOLUME}")
    return volume
