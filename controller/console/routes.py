"""The console's pages: sign-in and sign-out, the dashboard, and its live event stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from controller.console import announce, emergency, manage, records, tech
from controller.console.dashboard import DeviceStatus, build_dashboard, device_status
from controller.console.i18n import Translator, requested_language
from controller.console.pages import (
    Viewer,
    anonymous_session,
    install_page_guards,
    local_zone,
    render,
    runtime_of,
    session_codec,
    signed_in,
    viewer,
)
from controller.console.session import (
    ConsoleSession,
    SessionCodec,
    csrf_ok,
    load_or_create_secret,
    new_session,
)
from controller.services.users import sign_in

if TYPE_CHECKING:
    from controller.app import Runtime

_HERE = Path(__file__).parent
router = APIRouter(include_in_schema=False)
# Each part of the console has its router (controller/console/<part>.py); they are mounted here.
PAGE_ROUTERS: tuple[APIRouter, ...] = (
    router,
    announce.router,
    records.router,
    emergency.router,
    tech.router,
    manage.router,
)


def install_console(app: FastAPI, runtime: Runtime) -> None:
    app.state.console_sessions = SessionCodec(load_or_create_secret(runtime.settings.data_dir))
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="console-static")
    install_page_guards(app)
    for page_router in PAGE_ROUTERS:
        app.include_router(page_router)


def _login_page(
    request: Request,
    session: ConsoleSession,
    *,
    username: str = "",
    error: str | None = None,
    error_field: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return render(
        request,
        "login.html",
        {
            "username": username,
            "error": error,
            "error_field": error_field,
            "next": _local_target(request.query_params.get("next")),
        },
        session,
        status_code=status_code,
    )


def _local_target(target: object) -> str:
    """Where to go after signing in: a path of this console only (never another site)."""
    if isinstance(target, str) and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


@router.get("/login")
async def login_form(request: Request) -> Response:
    if await signed_in(request) is not None:
        return RedirectResponse(_local_target(request.query_params.get("next")), status_code=303)
    return _login_page(request, anonymous_session(request))


@router.post("/login")
async def login(request: Request) -> Response:
    session = session_codec(request).read(request)
    form = await request.form()
    username = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    t = Translator(requested_language(request)[0])
    if session is None or not csrf_ok(session, form.get("csrf")):
        return _login_page(
            request, new_session(), username=username, error=t("login.error.csrf"), status_code=403
        )
    if not username:
        return _login_page(
            request,
            session,
            error=t("login.error.username_required"),
            error_field="username",
            status_code=422,
        )
    if not password:
        return _login_page(
            request,
            session,
            username=username,
            error=t("login.error.password_required"),
            error_field="password",
            status_code=422,
        )
    runtime = runtime_of(request)
    result = await asyncio.to_thread(sign_in, runtime.engine, username, password, runtime.clock.now())
    if result.user is None:
        if result.locked_until is not None:
            until = result.locked_until.astimezone(local_zone(runtime)).strftime("%H:%M")
            error, field = t("login.error.locked", until=until), "username"
        else:
            error, field = t("login.error.wrong"), "password"
        return _login_page(
            request, session, username=username, error=error, error_field=field, status_code=401
        )
    response = RedirectResponse(_local_target(form.get("next")), status_code=303)
    session_codec(request).write(request, response, new_session(result.user))
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session = session_codec(request).read(request)
    form = await request.form()
    if not csrf_ok(session, form.get("csrf")):
        return Response("CSRF token missing or wrong", status_code=403)
    response = RedirectResponse("/login", status_code=303)
    session_codec(request).write(request, response, new_session())
    return response


@router.get("/")
async def dashboard(request: Request, who: Annotated[Viewer, Depends(viewer())]) -> Response:
    board = await asyncio.to_thread(build_dashboard, runtime_of(request), who.principal)
    return render(
        request, "dashboard.html", {"board": board, "statuses": list(DeviceStatus)}, who.session, viewer=who
    )


@router.get("/console/alarms")
async def alarms_fragment(request: Request, who: Annotated[Viewer, Depends(viewer())]) -> Response:
    """The dashboard's alarm list alone, which the page refreshes (htmx) every 30 s."""
    board = await asyncio.to_thread(build_dashboard, runtime_of(request), who.principal)
    return render(request, "_alarms.html", {"board": board}, who.session, viewer=who)


@router.get("/console/events")
async def console_events(request: Request) -> Response:
    """The dashboard's live feed: the API's event stream, authorised by the session cookie and confined
    to the devices the user may see."""
    who = await signed_in(request)
    if who is None:
        return Response(status_code=401)
    runtime = runtime_of(request)
    visible = await asyncio.to_thread(runtime.visible_device_ids, who.principal)

    async def stream() -> AsyncIterator[dict[str, Any]]:
        async with runtime.bus.subscribe() as queue:
            yield {"event": "ready", "data": "{}"}
            while True:
                event = await queue.get()
                if event is None or await request.is_disconnected():
                    return
                if event.get("type") not in {"device", "delivery"}:
                    continue
                if visible is not None and event.get("device_id") not in visible:
                    continue
                yield {"event": event["type"], "data": json.dumps(_live(runtime, event), ensure_ascii=False)}

    return EventSourceResponse(stream(), ping=15)


def _live(runtime: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    """Only what the page needs: which device, and what its status became (None: unchanged)."""
    status: DeviceStatus | None = None
    if event["type"] == "device":
        playing = runtime.tracker.playing_on(str(event.get("device_id"))) is not None
        status = device_status(online=bool(event.get("online")), playing=playing)
    elif event.get("state") == "playing":
        status = DeviceStatus.PLAYING
    elif event.get("state") in {"completed", "interrupted", "failed", "expired", "cancelled"}:
        status = DeviceStatus.ONLINE
    return {
        "device_id": event.get("device_id"),
        "status": status,
        "at": runtime.clock.now().astimezone(local_zone(runtime)).isoformat(),
    }
