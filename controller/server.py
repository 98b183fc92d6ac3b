"""Running the controller under uvicorn, in-process, so that `serve` and `demo` share one path."""

from __future__ import annotations

import asyncio

import uvicorn

from controller.api.app import create_app
from controller.app import Runtime
from controller.logs import configure_logging
from controller.settings import Settings


class ControllerServer:
    """The HTTP server and the runtime it carries; `started` is set once the API answers."""

    def __init__(self, settings: Settings) -> None:
        configure_logging(settings.logging)
        self.settings = settings
        self.runtime = Runtime(settings)
        config = uvicorn.Config(
            create_app(self.runtime),
            host=settings.http.host,
            port=settings.http.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    async def serve(self) -> None:
        await self.server.serve()
        if not self.server.started:
            raise SystemExit("the controller failed to start; see the log above")

    async def start(self) -> asyncio.Task[None]:
        """Serve in a task and return it once the API answers; raise SystemExit if startup failed."""
        serving = asyncio.create_task(self.serve())
        # uvicorn exposes a `started` flag, not an event, so it is polled.
        while not self.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if serving.done():
            await serving
        return serving

    def request_stop(self) -> None:
        self.server.should_exit = True


async def run_server(settings: Settings) -> None:
    """Serve until stopped; print `READY <base url>` on stdout once the API answers (for supervisors)."""
    controller = ControllerServer(settings)
    serving = await controller.start()
    print(f"READY {settings.http.base_url()}", flush=True)  # noqa: T201
    await serving
