"""The console's pages: sign-in and sign-out, the dashboard, and its live event stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sse_starlette.sse import EventSourceResponse

from controller.console.dashboard import DeviceStatus, build_dashboard, device_status
from controller.console.i18n import LANGUAGE_COOKIE, Translator, requested_language
from controller.console.session import (
    ConsoleSession,
    SessionCodec,
    csrf_ok,
    load_or_create_secret,
    new_session,
)
from controller.services.auth import Principal
from controller.services.users import get_user, principal_of, sign_in
from controller.store.models import UserRow

if TYPE_CHECKING:
    from controller.app import Runtime

_HERE = Path(__file__).parent
_templates = Jinja2Templates(directory=_HERE / "templates")
router = APIRouter(include_in_schema=False)


def install_console(app: FastAPI, runtime: Runtime) -> None:
    app.state.console_sessions = SessionCodec(load_or_create_secret(runtime.settings.data_dir))
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="console-static")
    app.include_router(router)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _local_zone(runtime: Runtime) -> ZoneInfo:
    """The city's zone (`timezone` in config.yaml), in which people read times."""
    return ZoneInfo(runtime.settings.timezone)


def _codec(request: Request) -> SessionCodec:
    codec: SessionCodec = request.app.state.console_sessions
    return codec


async def _signed_in(request: Request) -> tuple[ConsoleSession, UserRow] | None:
    session = _codec(request).read(request)
    if session is None or session.user_id is None:
        return None
    # Read on every request: a deleted user's cookie stops working at once.
    user = await asyncio.to_thread(get_user, _runtime(request).engine, session.user_id)
    return None if user is None else (session, user)


def _render(
    request: Request,
    name: str,
    context: dict[str, Any],
    session: ConsoleSession,
    *,
    status_code: int = 200,
) -> HTMLResponse:
    language, chosen = requested_language(request)
    response = _templates.TemplateResponse(
        request,
        name,
        {**context, "t": Translator(language), "lang": language, "csrf": session.csrf},
        status_code=status_code,
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    _codec(request).write(request, response, session)
    if chosen:
        response.set_cookie(LANGUAGE_COOKIE, language, max_age=365 * 86400, samesite="strict", httponly=True)
    return response


def _login_page(
    request: Request,
    session: ConsoleSession,
    *,
    username: str = "",
    error: str | None = None,
    error_field: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return _render(
        request,
        "login.html",
        {"username": username, "error": error, "error_field": error_field},
        session,
        status_code=status_code,
    )


@router.get("/login")
async def login_form(request: Request) -> Response:
    if await _signed_in(request) is not None:
        return RedirectResponse("/", status_code=303)
    return _login_page(request, _codec(request).read(request) or new_session())


@router.post("/login")
async def login(request: Request) -> Response:
    session = _codec(request).read(request)
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
    runtime = _runtime(request)
    result = await asyncio.to_thread(sign_in, runtime.engine, username, password, runtime.clock.now())
    if result.user is None:
        if result.locked_until is not None:
            until = result.locked_until.astimezone(_local_zone(runtime)).strftime("%H:%M")
            error, field = t("login.error.locked", until=until), "username"
        else:
            error, field = t("login.error.wrong"), "password"
        return _login_page(
            request, session, username=username, error=error, error_field=field, status_code=401
        )
    response = RedirectResponse("/", status_code=303)
    _codec(request).write(request, response, new_session(result.user.id))
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session = _codec(request).read(request)
    form = await request.form()
    if not csrf_ok(session, form.get("csrf")):
        return Response("CSRF token missing or wrong", status_code=403)
    response = RedirectResponse("/login", status_code=303)
    _codec(request).write(request, response, new_session())
    return response


@router.get("/")
async def dashboard(request: Request) -> Response:
    signed_in = await _signed_in(request)
    if signed_in is None:
        return RedirectResponse("/login", status_code=303)
    session, user = signed_in
    board = await asyncio.to_thread(build_dashboard, _runtime(request), principal_of(user))
    return _render(
        request, "dashboard.html", {"board": board, "user": user, "statuses": list(DeviceStatus)}, session
    )


@router.get("/console/alarms")
async def alarms_fragment(request: Request) -> Response:
    """The dashboard's alarm list alone, which the page refreshes (htmx) every 30 s."""
    signed_in = await _signed_in(request)
    if signed_in is None:
        return Response(status_code=401)
    session, user = signed_in
    board = await asyncio.to_thread(build_dashboard, _runtime(request), principal_of(user))
    return _render(request, "_alarms.html", {"board": board}, session)


@router.get("/console/events")
async def console_events(request: Request) -> Response:
    """The dashboard's live feed: the API's event stream, authorised by the session cookie and confined
    to the devices the user may see."""
    signed_in = await _signed_in(request)
    if signed_in is None:
        return Response(status_code=401)
    runtime = _runtime(request)
    principal: Principal = principal_of(signed_in[1])
    visible = await asyncio.to_thread(runtime.visible_device_ids, principal)

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
        "at": runtime.clock.now().astimezone(_local_zone(runtime)).isoformat(),
    }
