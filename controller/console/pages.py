"""What every console page shares: who is signed in (a dependency that sends strangers to the login
page and refuses roles a page is not for), the navigation each role sees, and rendering a template with
the translator, the language, the CSRF token and the session cookie."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from controller.console.i18n import LANGUAGE_COOKIE, Translator, requested_language
from controller.console.session import ConsoleSession, SessionCodec, new_session, session_user
from controller.domain.areas import Area
from controller.services.auth import Action, Principal
from controller.services.users import principal_of
from controller.store.models import UserRow

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from controller.app import Runtime

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")


@dataclass(frozen=True, slots=True)
class NavItem:
    href: str
    label: str  # catalogue key
    # Shown to a user who may do any of these; empty: to every signed-in user.
    any_of: frozenset[Action] = frozenset()


NAVIGATION: tuple[NavItem, ...] = (
    NavItem("/", "nav.dashboard"),
    NavItem("/map", "nav.map", frozenset({Action.READ})),
    NavItem("/announcements/new", "nav.announce", frozenset({Action.BROADCAST})),
    NavItem("/calendar", "nav.calendar", frozenset({Action.READ})),
    NavItem("/log", "nav.log", frozenset({Action.READ})),
    NavItem("/report", "nav.report", frozenset({Action.READ})),
    NavItem("/devices", "nav.devices", frozenset({Action.PROVISION, Action.MANAGE_DEVICES})),
    NavItem("/claims", "nav.claims", frozenset({Action.PROVISION})),
    NavItem("/rollouts", "nav.rollouts", frozenset({Action.PROVISION, Action.MANAGE_FIRMWARE})),
    NavItem("/emergency", "nav.emergency", frozenset({Action.BROADCAST_EMERGENCY})),
    NavItem("/manage", "nav.manage"),
)


@dataclass(frozen=True, slots=True)
class Viewer:
    """The signed-in user of a page request."""

    session: ConsoleSession
    user: UserRow
    principal: Principal

    def may(self, action: Action) -> bool:
        return self.principal.may(action)

    def navigation(self) -> list[NavItem]:
        return [item for item in NAVIGATION if not item.any_of or any(map(self.may, item.any_of))]


class NotSignedInError(Exception):
    """Raised by `viewer()`: the request goes to the login page (a fragment or script call gets 401)."""


class NotAllowedError(Exception):
    """Raised by `viewer()`: the user's role may not open the page."""

    def __init__(self, viewer: Viewer) -> None:
        super().__init__("forbidden")
        self.viewer = viewer


def areas_in_view(runtime: Runtime, principal: Principal) -> list[tuple[Area, int]]:
    """The areas a user sees, depth-first with their depth: the subtrees of the wards they are confined
    to, or the whole city. Blocking (reads the area tree)."""
    tree = runtime.area_tree()
    wards = principal.device_wards()
    roots = sorted(code for code in wards if code in tree) if wards else [area.code for area in tree.roots()]
    return tree.depth_first(roots)


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def local_zone(runtime: Runtime) -> ZoneInfo:
    """The city's zone (`timezone` in config.yaml), in which people read times."""
    return ZoneInfo(runtime.settings.timezone)


def session_codec(request: Request) -> SessionCodec:
    codec: SessionCodec = request.app.state.console_sessions
    return codec


async def signed_in(request: Request) -> Viewer | None:
    session = session_codec(request).read(request)
    user = await asyncio.to_thread(session_user, runtime_of(request).engine, session)
    return None if user is None or session is None else Viewer(session, user, principal_of(user))


def viewer(*any_of: Action) -> Callable[[Request], Coroutine[Any, Any, Viewer]]:
    """A dependency: the signed-in user, who must be allowed one of `any_of` (none given: anyone)."""

    async def _check(request: Request) -> Viewer:
        found = await signed_in(request)
        if found is None:
            raise NotSignedInError
        if any_of and not any(map(found.may, any_of)):
            raise NotAllowedError(found)
        return found

    return _check


def render(
    request: Request,
    name: str,
    context: dict[str, Any],
    session: ConsoleSession,
    *,
    viewer: Viewer | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    language, chosen = requested_language(request)
    response = TEMPLATES.TemplateResponse(
        request,
        name,
        {
            **context,
            "t": Translator(language),
            "lang": language,
            "csrf": session.csrf,
            "user": viewer.user if viewer else context.get("user"),
            "viewer": viewer,
            "navigation": viewer.navigation() if viewer else [],
            # What the user may do, by action name (`may.broadcast`), to show only the controls they can use.
            "may": {action.value: viewer.may(action) for action in Action} if viewer else {},
            "path": request.url.path,
            "map_settings": runtime_of(request).settings.console.map,
        },
        status_code=status_code,
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    session_codec(request).write(request, response, session)
    if chosen:
        response.set_cookie(LANGUAGE_COOKIE, language, max_age=365 * 86400, samesite="strict", httponly=True)
    return response


def install_page_guards(app: FastAPI) -> None:
    @app.exception_handler(NotSignedInError)
    async def _to_login(request: Request, _: NotSignedInError) -> Response:
        if request.method != "GET" or request.headers.get("HX-Request"):
            return Response("sign in first", status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        login = "/login" if target == "/" else f"/login?next={quote(target, safe='')}"
        return RedirectResponse(login, status_code=303)

    @app.exception_handler(NotAllowedError)
    async def _forbidden(request: Request, error: NotAllowedError) -> Response:
        who = error.viewer
        return render(request, "forbidden.html", {}, who.session, viewer=who, status_code=403)


def anonymous_session(request: Request) -> ConsoleSession:
    return session_codec(request).read(request) or new_session()
