"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from controller.api.errors import install_error_handlers
from controller.api.routes import areas, broadcasts, calendar, devices, media, reports, schedules, system

if TYPE_CHECKING:
    from controller.app import Runtime


def create_app(runtime: Runtime, *, manage_runtime: bool = True) -> FastAPI:
    """An app bound to `runtime`; with `manage_runtime` the app starts and stops it in its lifespan."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_runtime:
            await runtime.start()
        try:
            yield
        finally:
            if manage_runtime:
                await runtime.stop()

    app = FastAPI(
        title="Wardcast",
        summary="Targeted announcements for a city's grassroots public-address system",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    for module in (areas, devices, media, broadcasts, schedules, reports, calendar, system):
        app.include_router(module.router)
    return app
