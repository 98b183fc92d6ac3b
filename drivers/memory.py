"""An in-memory `Driver` for domain and dispatcher tests: no broker, full control over failures.

A test reads what was sent from `sent` (or waits for it with `wait_sent`), plays the devices by
calling `push`, and drives the error paths with `fail_with` / `set_link`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

from drivers.base import (
    Ack,
    DeviceCommand,
    DeviceTimeout,
    DeviceUnreachable,
    Driver,
    InboundEvent,
    LinkListener,
    LinkState,
    ObservableLink,
    ProtocolError,
)

Failure = Literal["unreachable", "timeout", "protocol"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class MemoryDriver:
    """Implements `Driver` and `ObservableLink`; every accepted command is appended to `sent`."""

    def __init__(self, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.sent: list[DeviceCommand] = []
        self._clock = clock
        self._failure: Failure | None = None
        self._failures_left: int | None = None
        self._events: asyncio.Queue[InboundEvent | None] = asyncio.Queue()
        self._sent_changed = asyncio.Condition()
        self._up = asyncio.Event()
        self._up.set()
        self._listeners: list[LinkListener] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._events.put_nowait(None)

    # -- Driver ------------------------------------------------------------------------------------

    async def send(self, command: DeviceCommand, *, timeout: float) -> Ack:
        if not self._up.is_set():
            raise DeviceUnreachable(f"command {command.command_id}: the link is down")
        failure = self._take_failure()
        if failure == "unreachable":
            raise DeviceUnreachable(f"command {command.command_id}: injected unreachable")
        if failure == "timeout":
            raise DeviceTimeout(f"command {command.command_id}: injected timeout after {timeout} s")
        if failure == "protocol":
            raise ProtocolError(f"command {command.command_id}: injected protocol error")
        async with self._sent_changed:
            self.sent.append(command)
            self._sent_changed.notify_all()
        now = self._clock()
        return Ack(command_id=command.command_id, accepted_at=now, published_at=now)

    async def events(self) -> AsyncIterator[InboundEvent]:
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)
                return
            yield event

    async def ping(self) -> bool:
        return self._up.is_set()

    # -- ObservableLink ----------------------------------------------------------------------------

    def add_link_listener(self, listener: LinkListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    async def wait_connected(self) -> None:
        await self._up.wait()

    # -- test controls -----------------------------------------------------------------------------

    def push(self, *events: InboundEvent) -> None:
        """Deliver events as if devices had published them."""
        for event in events:
            self._events.put_nowait(event)

    def fail_with(self, failure: Failure | None, *, times: int | None = None) -> None:
        """Make the next `times` sends (every send when `None`) fail; `fail_with(None)` heals."""
        if times is not None and times < 1:
            raise ValueError("times: expected >= 1, or None for every send")
        self._failure = failure
        self._failures_left = times

    def set_link(self, state: LinkState) -> None:
        """Take the link down (sends raise `DeviceUnreachable`) or bring it back, telling listeners."""
        if (state == "connected") == self._up.is_set():
            return
        if state == "connected":
            self._up.set()
        else:
            self._up.clear()
        for listener in list(self._listeners):
            listener(state)

    async def wait_sent(self, count: int) -> list[DeviceCommand]:
        """Wait until at least `count` commands were accepted; wrap it in a timeout."""
        async with self._sent_changed:
            await self._sent_changed.wait_for(lambda: len(self.sent) >= count)
            return list(self.sent)

    def _take_failure(self) -> Failure | None:
        failure = self._failure
        if failure is not None and self._failures_left is not None:
            self._failures_left -= 1
            if self._failures_left <= 0:
                self._failure = None
                self._failures_left = None
        return failure


if TYPE_CHECKING:

    def _implements(driver: MemoryDriver) -> tuple[Driver, ObservableLink]:
        return driver, driver
