"""The console's management pages: areas, API keys and factory secrets, telemetry rules and alarms, the
media library and the audit log, and a hub that lists those the user may open. The pages are laid out
here; their data and actions go through the JSON API (static/manage.js)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from controller.console.pages import Viewer, render, viewer
from controller.services.auth import Action

router = APIRouter(include_in_schema=False)

# (path, catalogue key of the title, key of the description, actions that open it: any of them)
MANAGE_PAGES: tuple[tuple[str, str, str, frozenset[Action]], ...] = (
    ("/areas", "manage.areas.title", "manage.areas.about", frozenset({Action.READ})),
    ("/media", "manage.media.title", "manage.media.about", frozenset({Action.READ})),
    ("/rules", "manage.rules.title", "manage.rules.about", frozenset({Action.READ})),
    ("/users", "manage.users.title", "manage.users.about", frozenset({Action.MANAGE_KEYS})),
    ("/keys", "manage.keys.title", "manage.keys.about", frozenset({Action.MANAGE_KEYS})),
    ("/audit", "manage.audit.title", "manage.audit.about", frozenset({Action.MANAGE_AREAS})),
)

Reader = Annotated[Viewer, Depends(viewer(Action.READ))]


def _page(request: Request, name: str, who: Viewer) -> Response:
    return render(request, f"manage/{name}.html", {}, who.session, viewer=who)


@router.get("/manage")
async def hub(request: Request, who: Reader) -> Response:
    pages = [(path, title, about) for path, title, about, any_of in MANAGE_PAGES if any(map(who.may, any_of))]
    return render(request, "manage/hub.html", {"pages": pages}, who.session, viewer=who)


@router.get("/areas")
async def areas(request: Request, who: Reader) -> Response:
    return _page(request, "areas", who)


@router.get("/media")
async def media(request: Request, who: Reader) -> Response:
    return _page(request, "media", who)


@router.get("/rules")
async def rules(request: Request, who: Reader) -> Response:
    return _page(request, "rules", who)


@router.get("/keys")
async def keys(request: Request, who: Annotated[Viewer, Depends(viewer(Action.MANAGE_KEYS))]) -> Response:
    return _page(request, "keys", who)


@router.get("/audit")
async def audit(request: Request, who: Annotated[Viewer, Depends(viewer(Action.MANAGE_AREAS))]) -> Response:
    """Admins and operators (the API shows them everyone's entries)."""
    return _page(request, "audit", who)
