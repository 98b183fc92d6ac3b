"""In-process publish/subscribe of delivery and device changes, feeding server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog

log = structlog.get_logger(__name__)
_SUBSCRIBER_BACKLOG = 10_000


class EventBus:
    """Fan-out to subscribers; a subscriber that falls too far behind is dropped, never the publisher."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def publish(self, event: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("event subscriber too slow, disconnecting it")
                self._subscribers.discard(queue)
                # Make room for the end marker, so that the stream ends instead of hanging silently.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any] | None]]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=_SUBSCRIBER_BACKLOG)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        for queue in list(self._subscribers):
            if not queue.full():
                queue.put_nowait(None)
        self._subscribers.clear()
