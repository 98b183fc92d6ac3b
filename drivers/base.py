"""The one small protocol every transport driver implements (DESIGN.md §3).

Drivers know nothing of priorities, retries or the database: they turn a `DeviceCommand` into bytes
on a wire, report the broker's or device's answer as an `Ack`, and yield what devices say on their
own as `InboundEvent`s. Library exceptions never leave a driver; they are translated here into the
`DriverError` family, chained from the original.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Protocol, Self


class DriverError(Exception):
    """Base of every error a driver raises."""


class DeviceTimeout(DriverError):  # noqa: N818  # the name is the contract; "Error" adds nothing
    """The broker or device did not answer within the timeout."""


class DeviceUnreachable(DriverError):  # noqa: N818
    """The link to the broker or device is down."""


class ProtocolError(DriverError):
    """The peer answered with, or a command would put on the wire, something the wire spec does not allow."""


@dataclass(frozen=True, slots=True)
class DeviceCommand:
    """A command addressed to one device (or one area topic), already encoded as a wire document."""

    address: str
    command_id: str
    document: Mapping[str, Any]
    expires_at: datetime
    area: str | None = None
    """Set for an area command (docs/protocol.md §1.12): it goes on the area's topic, not a device's."""


@dataclass(frozen=True, slots=True)
class Ack:
    """What the transport confirmed for one `send`.

    `published_at` is when the command went on the wire (after any wait for a free publish slot);
    `accepted_at` is when the broker (MQTT PUBACK) or the device (Modbus reply, CoAP ACK) confirmed it.
    Device-level progress arrives later as `InboundEvent`s.
    """

    command_id: str
    accepted_at: datetime
    published_at: datetime


@dataclass(frozen=True, slots=True)
class CommandReport:
    """A device's report on a command it received (delivered, playing, completed, ...)."""

    address: str
    command_id: str
    correlation_id: str
    state: str
    at: datetime
    detail: str | None = None
    played_s: float | None = None
    truncated: bool = False
    """On `completed`: playback was cut at the command's `max_duration_s` (proof of play needs it)."""
    offline: bool = False
    """The device started the command from its cached programme while it had no link (protocol §1.10)."""
    result: Mapping[str, Any] | None = None
    """What a remote operation did (protocol §1.14): the volume set, a self-test's verdict, …"""
    reason: str | None = None
    """On `rejected` and `expired`: the check that failed, a code of docs/protocol.md §1.15.5
    (`bad_signature`, `replayed`, ...); `detail` says it in words."""
    firmware: str | None = None
    """On a firmware update's final report: the version the device runs now (protocol §1.16)."""
    rolled_back: bool = False
    """On a firmware update's `failed`: the device went back to its previous version."""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device's availability and status document."""

    address: str
    online: bool
    at: datetime | None
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TelemetryReading:
    address: str
    metric: str
    value: float
    unit: str | None
    at: datetime
    problem: str | None = None
    """Set when the driver knows the value cannot be true (a transmitter saturated at the end of its
    span, a sensor's own error flag): the reading is counted and refused, never stored."""


@dataclass(frozen=True, slots=True)
class MalformedPayload:
    """A payload that could not be decoded; counted and logged by the caller, never raised."""

    address: str | None
    topic: str
    reason: str


InboundEvent = CommandReport | DeviceState | TelemetryReading | MalformedPayload

LinkState = Literal["connected", "disconnected"]
LinkListener = Callable[[LinkState], None]


class Driver(Protocol):
    """Every transport: an async context manager with `send`, `events` and `ping`."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send(self, command: DeviceCommand, *, timeout: float) -> Ack:
        """Send one command; raise `DeviceTimeout`, `DeviceUnreachable` or `ProtocolError`."""
        ...

    def events(self) -> AsyncIterator[InboundEvent]:
        """Inbound events, for as long as the driver is open (across reconnects)."""
        ...

    async def ping(self) -> bool:
        """True when the link is up right now."""
        ...


class ObservableLink(Protocol):
    """A driver whose link comes and goes on its own (a broker connection): the dispatcher resumes
    sending when it comes back instead of polling `ping()`."""

    def add_link_listener(self, listener: LinkListener) -> Callable[[], None]:
        """Call `listener` on every change of the link state; returns a function that removes it."""
        ...

    async def wait_connected(self) -> None:
        """Return as soon as the link is up (at once if it already is)."""
        ...
