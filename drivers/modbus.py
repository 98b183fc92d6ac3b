"""Modbus link layer (docs/protocol.md §3, DESIGN.md §3 and §6): one `ModbusLink` per physical link.

A link is a TCP endpoint or a serial line (a device path such as a pty, or `socket://host:port` for RTU
carried over TCP). One request is on the wire at a time; on RTU the link leaves the inter-frame silence
t3.5 between requests. Writes jump ahead of polls waiting for the link. pymodbus stays inside this
module: its exceptions and error replies are translated here into the `DriverError` family, chained from
the original, and nothing of pymodbus is returned.

The link does no retries (pymodbus is built with `retries=0`); the dispatcher decides.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType
from typing import Self

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from drivers.base import DeviceTimeout, DeviceUnreachable, DriverError, ProtocolError

log = logging.getLogger(__name__)

DEFAULT_BAUD = 9600
DEFAULT_TIMEOUT_S = 1.0
# Modbus over Serial Line V1.02 §2.5.1.1: 11 bits per RTU character; fixed timing above 19,200 bit/s.
_BITS_PER_CHARACTER = 11
_FIXED_TIMING_ABOVE_BAUD = 19_200
_FIXED_SILENCE_S = 0.00175
# Protocol limits (Application Protocol V1.1b3 §6); beyond them the box answers exception 03.
MAX_READ_BITS = 2000
MAX_READ_REGISTERS = 125
MAX_WRITE_COILS = 1968
MAX_WRITE_REGISTERS = 123


def inter_frame_gap_s(baud: int) -> float:
    """t3.5 at `baud`: the silence a master leaves between its RTU frames (docs/protocol.md §3.2)."""
    if baud <= 0:
        raise ValueError(f"baud rate {baud} is not positive")
    if baud > _FIXED_TIMING_ABOVE_BAUD:
        return _FIXED_SILENCE_S
    return 3.5 * _BITS_PER_CHARACTER / baud


class ExceptionCode(IntEnum):
    ILLEGAL_FUNCTION = 1
    ILLEGAL_DATA_ADDRESS = 2
    ILLEGAL_DATA_VALUE = 3
    SERVER_DEVICE_FAILURE = 4


_EXCEPTION_NAMES = {
    ExceptionCode.ILLEGAL_FUNCTION: "illegal function",
    ExceptionCode.ILLEGAL_DATA_ADDRESS: "illegal data address",
    ExceptionCode.ILLEGAL_DATA_VALUE: "illegal data value",
    ExceptionCode.SERVER_DEVICE_FAILURE: "server device failure",
}


def exception_name(code: int) -> str:
    """The Application Protocol's name for an exception code (`exception 0xNN` for the others)."""
    try:
        return _EXCEPTION_NAMES[ExceptionCode(code)]
    except ValueError:
        return f"exception 0x{code:02x}"


class ModbusExceptionResponse(ProtocolError):  # noqa: N818  # the wire calls it an exception response
    """The device answered with a Modbus exception response: it is alive but refused the request."""

    def __init__(self, code: int, *, function: int, unit: int) -> None:
        self.code = code
        self.name = exception_name(code)
        self.function = function
        self.unit = unit
        super().__init__(
            f"unit {unit}: function 0x{function:02x} answered exception {code:02d} ({self.name})"
        )


class Priority(IntEnum):
    """Lower goes first: a pending write goes before any pending poll."""

    WRITE = 0
    POLL = 1


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    host: str
    port: int = 502


@dataclass(frozen=True, slots=True)
class SerialEndpoint:
    """RTU on a serial port: a device path, or `socket://host:port` for RTU over TCP."""

    port: str
    baud: int = DEFAULT_BAUD
    min_gap_s: float = 0.0
    # After a request timed out, how long its reply may still arrive (the device's longest answer).
    late_reply_s: float = 1.0

    @property
    def gap_s(self) -> float:
        return max(inter_frame_gap_s(self.baud), self.min_gap_s)


Endpoint = TcpEndpoint | SerialEndpoint


class _Gate:
    """Hands the link to one holder at a time; waiting writes before waiting polls, FIFO within each."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._sequence = itertools.count()
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, future in self._waiting if not future.done())

    async def acquire(self, priority: Priority) -> None:
        if not self._busy and not self._waiting:
            self._busy = True
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (int(priority), next(self._sequence), future)
        heapq.heappush(self._waiting, entry)
        self._notify()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            else:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                self._notify()
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)  # stays busy: ownership passes to the waiter
                self._notify()
                return
        self._busy = False
        self._notify()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()


@dataclass(slots=True)
class _Health:
    failing: bool = False
    failures: int = 0


class ModbusLink:
    """One physical Modbus link and the units on it; an async context manager.

    Every operation takes the unit id and a timeout (seconds for the exchange on the wire, after the
    link became free) and raises `DeviceTimeout`, `DeviceUnreachable`, `ModbusExceptionResponse` or
    `ProtocolError`. A unit whose request fails is `degraded` until it answers again; the first failure
    is logged as a warning, the repeats at debug level.
    """

    def __init__(self, endpoint: Endpoint, *, name: str | None = None, connect_timeout: float = 3.0) -> None:
        self.endpoint = endpoint
        self.name = name if name is not None else _describe(endpoint)
        self._connect_timeout = connect_timeout
        self._gate = _Gate()
        self._health: dict[int, _Health] = {}
        self._last_frame_end: float | None = None
        self._quiet_until = 0.0
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._closed = False

    @classmethod
    def tcp(cls, host: str, port: int = 502) -> ModbusLink:
        return cls(TcpEndpoint(host, port))

    @classmethod
    def serial(
        cls, port: str, *, baud: int = DEFAULT_BAUD, min_gap_s: float = 0.0, late_reply_s: float = 1.0
    ) -> ModbusLink:
        return cls(SerialEndpoint(port, baud, min_gap_s, late_reply_s))

    async def __aenter__(self) -> Self:
        self._closed = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        self._drop_client()

    @property
    def gap_s(self) -> float:
        """The silence left between requests: t3.5 on RTU, none on Modbus TCP."""
        return self.endpoint.gap_s if isinstance(self.endpoint, SerialEndpoint) else 0.0

    @property
    def waiting(self) -> int:
        """Requests waiting for the link (not counting the one on the wire)."""
        return self._gate.waiting

    async def wait_waiting(self, count: int, timeout: float) -> None:
        """Return once at least `count` requests wait for the link; TimeoutError after `timeout`."""
        await self._gate.wait_until(lambda: self._gate.waiting >= count, timeout)

    def degraded(self, unit: int) -> bool:
        """True while the unit's last request on this link failed (no answer, link down, bad reply)."""
        health = self._health.get(unit)
        return health is not None and health.failing

    @property
    def degraded_units(self) -> frozenset[int]:
        return frozenset(unit for unit, health in self._health.items() if health.failing)

    # Typed operations

    async def read_coils(
        self, unit: int, address: int, count: int = 1, *, timeout: float
    ) -> tuple[bool, ...]:
        _check_range("count", count, 1, MAX_READ_BITS)
        reply = await self._exchange(
            unit, 0x01, Priority.POLL, timeout, _call("read_coils", address, count=count)
        )
        return _bits(reply, count, unit)

    async def read_discrete_inputs(
        self, unit: int, address: int, count: int = 1, *, timeout: float
    ) -> tuple[bool, ...]:
        _check_range("count", count, 1, MAX_READ_BITS)
        reply = await self._exchange(
            unit, 0x02, Priority.POLL, timeout, _call("read_discrete_inputs", address, count=count)
        )
        return _bits(reply, count, unit)

    async def read_holding_registers(
        self, unit: int, address: int, count: int = 1, *, timeout: float
    ) -> tuple[int, ...]:
        _check_range("count", count, 1, MAX_READ_REGISTERS)
        reply = await self._exchange(
            unit, 0x03, Priority.POLL, timeout, _call("read_holding_registers", address, count=count)
        )
        return _registers(reply, count, unit)

    async def read_input_registers(
        self, unit: int, address: int, count: int = 1, *, timeout: float
    ) -> tuple[int, ...]:
        _check_range("count", count, 1, MAX_READ_REGISTERS)
        reply = await self._exchange(
            unit, 0x04, Priority.POLL, timeout, _call("read_input_registers", address, count=count)
        )
        return _registers(reply, count, unit)

    async def write_coil(self, unit: int, address: int, value: bool, *, timeout: float) -> None:
        await self._exchange(unit, 0x05, Priority.WRITE, timeout, _call("write_coil", address, value))

    async def write_coils(self, unit: int, address: int, values: Sequence[bool], *, timeout: float) -> None:
        _check_range("number of coils", len(values), 1, MAX_WRITE_COILS)
        await self._exchange(unit, 0x0F, Priority.WRITE, timeout, _call("write_coils", address, list(values)))

    async def write_register(self, unit: int, address: int, value: int, *, timeout: float) -> None:
        _check_range("register value", value, 0, 0xFFFF)
        await self._exchange(unit, 0x06, Priority.WRITE, timeout, _call("write_register", address, value))

    async def write_registers(
        self, unit: int, address: int, values: Sequence[int], *, timeout: float
    ) -> None:
        _check_range("number of registers", len(values), 1, MAX_WRITE_REGISTERS)
        for value in values:
            _check_range("register value", value, 0, 0xFFFF)
        await self._exchange(
            unit, 0x10, Priority.WRITE, timeout, _call("write_registers", address, list(values))
        )

    # The edge

    async def _exchange(
        self,
        unit: int,
        function: int,
        priority: Priority,
        timeout: float,
        call: Callable[[AsyncModbusTcpClient | AsyncModbusSerialClient, int], Awaitable[ModbusPDU]],
    ) -> ModbusPDU:
        _check_range("unit id", unit, 0, 255)
        if self._closed:
            raise DeviceUnreachable(f"{self.name}: the link is closed")
        await self._gate.acquire(priority)
        try:
            reply = await self._on_wire(unit, function, timeout, call)
        except ModbusExceptionResponse:
            self._answered(unit)
            raise
        except DriverError as error:
            self._failed(unit, error)
            raise
        finally:
            self._gate.release()
        self._answered(unit)
        return reply

    async def _on_wire(
        self,
        unit: int,
        function: int,
        timeout: float,
        call: Callable[[AsyncModbusTcpClient | AsyncModbusSerialClient, int], Awaitable[ModbusPDU]],
    ) -> ModbusPDU:
        client = await self._connected()
        await self._keep_gap()
        try:
            async with asyncio.timeout(timeout):
                reply = await call(client, unit)
        except TimeoutError as error:
            self._forget_late_reply()
            raise DeviceTimeout(f"{self.name}: unit {unit} did not answer within {timeout:g} s") from error
        except ConnectionException as error:
            self._drop_client()
            raise DeviceUnreachable(f"{self.name}: link down ({error})") from error
        except ModbusIOException as error:
            # pymodbus's own timeout or a reply for another unit or transaction.
            self._forget_late_reply()
            raise DeviceTimeout(f"{self.name}: unit {unit}: no matching answer ({error})") from error
        except ModbusException as error:
            raise ProtocolError(f"{self.name}: unit {unit}: {error}") from error
        except OSError as error:
            self._drop_client()
            raise DeviceUnreachable(f"{self.name}: link down ({error})") from error
        finally:
            self._last_frame_end = asyncio.get_running_loop().time()
        if reply.isError():
            code = int(getattr(reply, "exception_code", 0))
            if code == 0:
                raise ProtocolError(f"{self.name}: unit {unit}: malformed error reply to 0x{function:02x}")
            raise ModbusExceptionResponse(code, function=function, unit=unit)
        if reply.function_code != function:
            raise ProtocolError(
                f"{self.name}: unit {unit}: reply function 0x{reply.function_code:02x} to 0x{function:02x}"
            )
        return reply

    async def _connected(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        if self._client is not None and self._client.connected:
            return self._client
        self._drop_client()
        client = self._make_client()
        try:
            async with asyncio.timeout(self._connect_timeout):
                connected = await client.connect()
        except (TimeoutError, OSError, ModbusException) as error:
            client.close()
            raise DeviceUnreachable(f"{self.name}: cannot connect ({error})") from error
        if not connected:
            client.close()
            raise DeviceUnreachable(f"{self.name}: cannot connect")
        self._client = client
        self._last_frame_end = None
        return client

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        # The timeout here is only pymodbus's backstop: each request runs under the caller's own.
        # reconnect_delay 0: no background reconnects; the link connects again on the next request.
        if isinstance(self.endpoint, TcpEndpoint):
            return AsyncModbusTcpClient(
                self.endpoint.host,
                port=self.endpoint.port,
                timeout=3600,
                retries=0,
                reconnect_delay=0,
                name=self.name,
            )
        return AsyncModbusSerialClient(
            self.endpoint.port,
            framer=FramerType.RTU,
            baudrate=self.endpoint.baud,
            timeout=3600,
            retries=0,
            reconnect_delay=0,
            name=self.name,
        )

    def _forget_late_reply(self) -> None:
        """RTU frames carry no transaction id: a reply arriving after its request timed out would be
        taken as the answer to the next request of the same unit and function. So after a timeout
        the line stays quiet for `late_reply_s` (a reply arriving meanwhile finds no request waiting
        and is discarded) before the next request goes out. Modbus TCP matches replies by transaction
        id instead."""
        if isinstance(self.endpoint, SerialEndpoint):
            self._quiet_until = asyncio.get_running_loop().time() + self.endpoint.late_reply_s

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _keep_gap(self) -> None:
        quiet = self._quiet_until - asyncio.get_running_loop().time()
        if quiet > 0:
            await asyncio.sleep(quiet)  # line timing (a late reply's window), not synchronisation
        gap = self.gap_s
        if gap <= 0 or self._last_frame_end is None:
            return
        remaining = self._last_frame_end + gap - asyncio.get_running_loop().time()
        if remaining > 0:
            await asyncio.sleep(remaining)  # line timing, not synchronisation

    def _failed(self, unit: int, error: DriverError) -> None:
        health = self._health.setdefault(unit, _Health())
        health.failures += 1
        if health.failing:
            log.debug("modbus %s unit %d still failing (%d): %s", self.name, unit, health.failures, error)
            return
        health.failing = True
        log.warning("modbus %s unit %d failed, marked degraded: %s", self.name, unit, error)

    def _answered(self, unit: int) -> None:
        health = self._health.get(unit)
        if health is None or not health.failing:
            return
        log.info("modbus %s unit %d answers again after %d failures", self.name, unit, health.failures)
        health.failing = False
        health.failures = 0


def _call(
    method: str, address: int, *args: object, **kwargs: object
) -> Callable[[AsyncModbusTcpClient | AsyncModbusSerialClient, int], Awaitable[ModbusPDU]]:
    _check_range("address", address, 0, 0xFFFF)

    def run(client: AsyncModbusTcpClient | AsyncModbusSerialClient, unit: int) -> Awaitable[ModbusPDU]:
        bound: Callable[..., Awaitable[ModbusPDU]] = getattr(client, method)
        return bound(address, *args, device_id=unit, **kwargs)

    return run


def _bits(reply: ModbusPDU, count: int, unit: int) -> tuple[bool, ...]:
    bits = list(reply.bits)
    # The reply packs bits into whole bytes; more than ⌈count / 8⌉ bytes' worth is malformed.
    if not count <= len(bits) < count + 8:
        raise ProtocolError(f"unit {unit}: asked for {count} bits, the reply carries {len(bits)}")
    return tuple(bool(bit) for bit in bits[:count])


def _registers(reply: ModbusPDU, count: int, unit: int) -> tuple[int, ...]:
    registers = list(reply.registers)
    if len(registers) != count:
        raise ProtocolError(f"unit {unit}: asked for {count} registers, the reply carries {len(registers)}")
    return tuple(int(register) for register in registers)


def _check_range(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{field} {value} outside {low}..{high}")


def _describe(endpoint: Endpoint) -> str:
    if isinstance(endpoint, TcpEndpoint):
        return f"tcp://{endpoint.host}:{endpoint.port}"
    return f"rtu:{endpoint.port}@{endpoint.baud}"
