"""A simulator served from its own event loop in a thread, so that a synchronous end-to-end test can
watch and change its state while the controller (another process) talks to it over a real socket."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

WAIT_S = 30.0
Server = TypeVar("Server", bound=AbstractAsyncContextManager[Any])


class ServedInThread(Generic[Server]):
    """`with ServedInThread(lambda: ModbusTcpServer([box])) as served: served.server.port …`"""

    def __init__(self, make: Callable[[], Server]) -> None:
        self._make = make
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._server: Server | None = None
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._serve(),), daemon=True
        )

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self._make() as server:
            self._server = server
            self._ready.set()
            await self._stop.wait()

    @property
    def server(self) -> Server:
        assert self._server is not None
        return self._server

    def __enter__(self) -> ServedInThread[Server]:
        self._thread.start()
        assert self._ready.wait(WAIT_S), "the simulator did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_S)
        self._loop.close()

    def when(
        self,
        wait_until: Callable[[Callable[[], bool], float], Awaitable[None]],
        condition: Callable[[], bool],
    ) -> Future[None]:
        """A future completing once `condition` holds, checked by the simulator's own `wait_until`
        (after each change it makes); arm it before the action that should cause the change."""
        return asyncio.run_coroutine_threadsafe(_awaited(wait_until(condition, WAIT_S)), self._loop)

    def call(self, action: Callable[[], None]) -> None:
        """Run `action` on the simulator's loop (its state is not shared across threads otherwise)."""
        asyncio.run_coroutine_threadsafe(_run(action), self._loop).result(WAIT_S)


async def _awaited(waiting: Awaitable[None]) -> None:
    await waiting


async def _run(action: Callable[[], None]) -> None:
    action()
