"""In-process publish/subscribe of delivery and device changes, feeding server-sent events."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Up to this many pending events a subscriber gets every one of them, in order.
_EXACT_BACKLOG = 2_000
# Beyond it, a newer event about the same delivery or device replaces the pending one (a follower
# behind a city-wide alert skips intermediate states but never misses where each delivery ended);
# past this many pending entries even so, the subscriber is dropped, never the publisher.
_COALESCED_BACKLOG = 200_000


def _coalescing_key(event: dict[str, Any]) -> Hashable | None:
    kind = event.get("type")
    if kind == "delivery" and "delivery_id" in event:
        return ("delivery", event["delivery_id"])
    if kind == "device" and "device_id" in event:
        return ("device", event["device_id"])
    return None


class Subscription:
    """One subscriber's pending events; `get()` returns the next one, or None once it was dropped."""

    def __init__(self) -> None:
        self._pending: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        self._unique = itertools.count()
        self._ready = asyncio.Event()
        self._ended = False

    def offer(self, event: dict[str, Any]) -> bool:
        """Queue `event`; False when the subscriber is too far behind and has been ended."""
        if self._ended:
            return False
        key = _coalescing_key(event) if len(self._pending) >= _EXACT_BACKLOG else None
        if key is not None and key in self._pending:
            self._pending[key] = event  # keeps its place in the order: the delivery's latest state
        elif len(self._pending) >= _COALESCED_BACKLOG:
            self.end(discard_pending=True)
            return False
        else:
            self._pending[key if key is not None else ("event", next(self._unique))] = event
        self._ready.set()
        return True

    def end(self, *, discard_pending: bool = False) -> None:
        """No more events: what is pending is still handed out first, unless discarded."""
        self._ended = True
        if discard_pending:
            self._pending.clear()
        self._ready.set()

    async def get(self) -> dict[str, Any] | None:
        while not self._pending:
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        _, event = self._pending.popitem(last=False)
        return event


class EventBus:
    """Fan-out to subscribers; a subscriber that falls too far behind is dropped, never the publisher."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def publish(self, event: dict[str, Any]) -> None:
        for subscription in list(self._subscribers):
            if not subscription.offer(event):
                log.warning("event subscriber too slow, disconnecting it")
                self._subscribers.discard(subscription)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        subscription = Subscription()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    def close(self) -> None:
        for subscription in list(self._subscribers):
            subscription.end()
        self._subscribers.clear()
