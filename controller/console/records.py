"""The console's records: the device map, the broadcast log, the ward report and user management.

The pages are shells: their scripts read and act through the JSON API as the signed-in user (which
confines a ward's staff to their ward). The server renders only what the page needs to start: the
areas the user may see (for filters and names), the devices' live status, and the labels."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from controller.console.dashboard import DeviceStatus, build_dashboard
from controller.console.i18n import catalogue, requested_language
from controller.console.pages import Viewer, areas_in_view, local_zone, render, runtime_of, viewer
from controller.services.auth import Action, Principal
from controller.services.users import CONSOLE_ROLES, MIN_PASSWORD_LENGTH

if TYPE_CHECKING:
    from controller.app import Runtime

router = APIRouter(include_in_schema=False)

WARD_KINDS = frozenset({"ward", "commune"})
PRIORITIES = ("normal", "priority", "emergency")
DEVICE_KINDS = ("speaker", "led_screen", "sensor", "wired_zone")


@dataclass(frozen=True, slots=True)
class AreaOption:
    code: str
    name: str
    kind: str
    depth: int
    parent: str | None


def _areas(runtime: Runtime, principal: Principal) -> list[AreaOption]:
    """The areas the user may see, depth-first (their ward's subtree only, when confined to a ward)."""
    return [
        AreaOption(area.code, area.name, area.kind, depth, area.parent_code)
        for area, depth in areas_in_view(runtime, principal)
    ]


def _wards(areas: list[AreaOption]) -> list[AreaOption]:
    """The wards and communes among `areas`; a tree with none: the areas just below its roots."""
    found = [area for area in areas if area.kind in WARD_KINDS]
    return found or [area for area in areas if area.depth == 1] or areas[:1]


def _labels(request: Request) -> dict[str, str]:
    """The catalogue entries the record pages' scripts use (no text in scripts)."""
    language = requested_language(request)[0]
    prefixes = ("records.", "status.", "device.kind.")
    return {key: text for key, text in catalogue(language).items() if key.startswith(prefixes)}


def _offset(runtime: Runtime) -> str:
    """The city's UTC offset now (+07:00): a date picked on the page is a day in the city's zone."""
    offset = runtime.clock.now().astimezone(local_zone(runtime)).strftime("%z")
    return f"{offset[:3]}:{offset[3:5]}"


def _page_context(request: Request, who: Viewer) -> dict[str, Any]:
    runtime = runtime_of(request)
    areas = _areas(runtime, who.principal)
    return {
        "areas": areas,
        "wards": _wards(areas),
        "scope": who.principal.device_wards() is not None,
        "config": {
            "labels": _labels(request),
            "timezone": runtime.settings.timezone,
            "offset": _offset(runtime),
            "areas": {area.code: area.name for area in areas},
            "parents": {area.code: area.parent for area in areas},
            "today": runtime.clock.now().astimezone(local_zone(runtime)).date().isoformat(),
            "can_cancel": who.may(Action.CANCEL),
            "me": who.user.id,
        },
    }


@router.get("/map")
async def map_page(request: Request, who: Annotated[Viewer, Depends(viewer(Action.READ))]) -> Response:
    runtime = runtime_of(request)
    board = await asyncio.to_thread(build_dashboard, runtime, who.principal)
    context = _page_context(request, who)
    # The live status the API's device list does not carry (playing), as the dashboard shows it.
    context["config"]["statuses"] = {d.id: d.status.value for a in board.areas for d in a.devices}
    context["config"]["kinds"] = list(DEVICE_KINDS)
    context.update({"kinds": DEVICE_KINDS, "statuses": list(DeviceStatus)})
    return render(request, "records_map.html", context, who.session, viewer=who)


@router.get("/log")
async def log_page(request: Request, who: Annotated[Viewer, Depends(viewer(Action.READ))]) -> Response:
    context = _page_context(request, who)
    context["priorities"] = PRIORITIES
    return render(request, "records_log.html", context, who.session, viewer=who)


@router.get("/report")
async def report_page(request: Request, who: Annotated[Viewer, Depends(viewer(Action.READ))]) -> Response:
    context = _page_context(request, who)
    return render(request, "records_report.html", context, who.session, viewer=who)


@router.get("/users")
async def users_page(
    request: Request, who: Annotated[Viewer, Depends(viewer(Action.MANAGE_KEYS))]
) -> Response:
    context = _page_context(request, who)
    context.update({"roles": [role.value for role in CONSOLE_ROLES], "min_password": MIN_PASSWORD_LENGTH})
    context["config"]["min_password"] = MIN_PASSWORD_LENGTH
    return render(request, "records_users.html", context, who.session, viewer=who)
