"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response

from controller.api.errors import install_error_handlers
from controller.api.routes import (
    alerts,
    areas,
    broadcasts,
    calendar,
    devices,
    firmware,
    media,
    operations,
    provisioning,
    reports,
    schedules,
    system,
    telemetry,
    users,
)
from controller.console.routes import install_console
from controller.services.auth import Principal, Role

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

    @app.middleware("http")
    async def audit_ioc_calls(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Every call made with an `ioc` key goes to the audit log, with its outcome (issue 4)."""
        response = await call_next(request)
        principal = getattr(request.state, "principal", None)
        unauthenticated_alert_call = principal is None and request.url.path.startswith("/api/v1/alerts")
        if unauthenticated_alert_call or (isinstance(principal, Principal) and principal.role is Role.IOC):
            await asyncio.to_thread(
                runtime.audit.record,
                principal,
                "api.call",
                subject=request.url.path[:100],
                outcome="ok" if response.status_code < 400 else "refused",  # noqa: PLR2004
                detail={"method": request.method, "path": request.url.path, "status": response.status_code},
                remote=request.client.host if request.client else None,
            )
        return response

    for module in (
        areas,
        provisioning,
        devices,
        operations,
        telemetry,
        media,
        firmware,
        broadcasts,
        schedules,
        alerts,
        reports,
        calendar,
        system,
        users,
    ):
        app.include_router(module.router)
    install_console(app, runtime)
    return app
