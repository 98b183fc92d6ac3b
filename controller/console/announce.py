"""The staff's main flow: a new announcement (targets from the area tree or a polygon on the map, audio
or Vietnamese text-to-speech with a preview, priority class, one-off or recurring with an RRULE editor,
clashes shown before saving) and the calendar, a week of the ward's programme with proof of play.

The page scripts create schedules through the JSON API (`POST /api/v1/schedules/check` then
`POST /api/v1/schedules`); the calendar renders the occurrences API's data on the server
(`ScheduleService.programme`, the same call as `GET /api/v1/areas/{code}/programme`) and htmx
refreshes the week every few seconds while it holds the present."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from sqlmodel import Session, col, select

from controller.console.i18n import catalogue, requested_language
from controller.console.pages import Viewer, areas_in_view, local_zone, render, runtime_of, viewer
from controller.services.auth import Action, Principal
from controller.services.broadcasts import AUDIO_DEVICE_KINDS
from controller.store.models import DeviceRow

if TYPE_CHECKING:
    from controller.app import Runtime

router = APIRouter(include_in_schema=False)

WEEKDAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")  # RFC 5545 names, Monday first as in Vietnam
# The calendar refreshes itself this often while the week shown holds the present.
REFRESH_S = 3


@dataclass(frozen=True, slots=True)
class TargetArea:
    code: str
    name: str
    kind: str
    depth: int
    devices: int  # speakers in the area and below it
    parent: str | None


def target_areas(runtime: Runtime, principal: Principal) -> list[TargetArea]:
    """The areas the user may aim at, depth-first (a ward's staff: their ward only), each with the
    number of speakers it reaches. Blocking (database)."""
    in_view = areas_in_view(runtime, principal)
    with Session(runtime.engine) as session:
        placed = session.exec(
            select(DeviceRow.area_code).where(
                col(DeviceRow.enabled).is_(True),
                col(DeviceRow.decommissioned_at).is_(None),
                col(DeviceRow.kind).in_(AUDIO_DEVICE_KINDS),
            )
        ).all()
    totals: dict[str, int] = {}
    for code in placed:
        totals[code] = totals.get(code, 0) + 1
    # Children come after their parent depth-first: going backwards, each area's total is complete
    # when it is added to its parent's.
    for area, depth in reversed(in_view):
        if depth > 0 and area.parent_code is not None:
            totals[area.parent_code] = totals.get(area.parent_code, 0) + totals.get(area.code, 0)
    return [
        TargetArea(area.code, area.name, area.kind, depth, totals.get(area.code, 0), area.parent_code)
        for area, depth in in_view
    ]


def script_labels(language: str) -> dict[str, str]:
    """The page script's texts: this part's catalogue entries (the script fills in `{name}`)."""
    return {key: text for key, text in catalogue(language).items() if key.startswith("announce.")}


def may_draw(principal: Principal) -> bool:
    """Drawing an area on the map is for the city's operators, not for a ward's staff."""
    return principal.may(Action.BROADCAST_EMERGENCY) or principal.device_wards() is None


@router.get("/announcements/new")
async def new_announcement(
    request: Request, who: Annotated[Viewer, Depends(viewer(Action.BROADCAST))]
) -> Response:
    runtime = runtime_of(request)
    areas = await asyncio.to_thread(target_areas, runtime, who.principal)
    now = runtime.clock.now()
    return render(
        request,
        "announce.html",
        {
            "areas": areas,
            "may_emergency": who.may(Action.BROADCAST_EMERGENCY),
            "may_draw": may_draw(who.principal),
            "timezone": runtime.settings.timezone,
            "server_now_ms": int(now.timestamp() * 1000),
            "today": now.astimezone(local_zone(runtime)).date().isoformat(),
            "weekdays": WEEKDAYS,
            "labels": script_labels(requested_language(request)[0]),
        },
        who.session,
        viewer=who,
    )


# -- the calendar ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CalendarEntry:
    schedule_id: str
    name: str
    start: datetime  # local
    priority: str
    reach: str
    status: str
    result: dict[str, Any] | None


@dataclass(slots=True)
class CalendarDay:
    day: date
    today: bool
    entries: list[CalendarEntry] = field(default_factory=list)


def monday_of(day: date) -> date:
    return day - timedelta(days=day.weekday())


def parse_week(value: str | None, today: date) -> date:
    """The Monday of the week holding `value` (YYYY-MM-DD), or of today's week when it is not a date."""
    try:
        chosen = date.fromisoformat(value) if value else today
    except ValueError:
        chosen = today
    return monday_of(chosen)


def entry_status(result: dict[str, Any] | None, start: datetime, now: datetime) -> str:
    """What the calendar says of one occurrence: upcoming, due (its time has come, nothing recorded yet),
    pending (sent, not playing yet), playing, played (on every device of the area), partial, not_played,
    none (no device of the area was reached), missed or failed (the occurrence never became a broadcast)."""
    if result is None:
        return "upcoming" if start > now else "due"
    if result["outcome"] != "fired":
        return "missed" if result["outcome"] == "missed" else "failed"
    devices = result.get("devices") or 0
    if result.get("playing"):
        return "playing"
    if result.get("pending"):
        return "pending"
    if devices == 0:
        return "none"
    played = result.get("played", 0)
    if played == devices:
        return "played"
    return "partial" if played else "not_played"


def build_week(
    runtime: Runtime, principal: Principal, area_code: str, monday: date
) -> tuple[list[CalendarDay], bool]:
    """The seven days from `monday` with the occurrences that reach the area, and whether the week
    holds the present (then the page refreshes it). Blocking (database)."""
    zone = local_zone(runtime)
    start = datetime.combine(monday, time(), tzinfo=zone)
    end = datetime.combine(monday + timedelta(days=7), time(), tzinfo=zone)
    items = runtime.schedules.programme(area_code, start, end, principal)
    now = runtime.clock.now()
    today = now.astimezone(zone).date()
    days = [CalendarDay(monday + timedelta(days=n), monday + timedelta(days=n) == today) for n in range(7)]
    for item in items:
        moment = datetime.fromisoformat(item["start_local"]).astimezone(zone)
        instant = datetime.fromisoformat(item["start_utc"]).astimezone(UTC)
        result = item.get("result")
        days[(moment.date() - monday).days].entries.append(
            CalendarEntry(
                schedule_id=item["schedule_id"],
                name=item["name"],
                start=moment,
                priority=item["priority"],
                reach=item["reach"],
                status=entry_status(result, instant, now),
                result=result,
            )
        )
    return days, start <= now < end


async def _week_context(request: Request, who: Viewer) -> dict[str, Any] | None:
    """None when the area asked for is not one the user may see."""
    runtime = runtime_of(request)
    areas = await asyncio.to_thread(target_areas, runtime, who.principal)
    codes = {area.code for area in areas}
    area_code = request.query_params.get("area") or (areas[0].code if areas else None)
    if area_code is None:
        return {"areas": [], "area": None, "days": [], "live": False}
    if area_code not in codes:
        return None
    today = runtime.clock.now().astimezone(local_zone(runtime)).date()
    monday = parse_week(request.query_params.get("week"), today)
    days, live = await asyncio.to_thread(build_week, runtime, who.principal, area_code, monday)
    return {
        "areas": areas,
        "area": next(area for area in areas if area.code == area_code),
        "monday": monday,
        "previous": monday - timedelta(days=7),
        "next": monday + timedelta(days=7),
        "this_week": monday_of(today),
        "days": days,
        "live": live,
        "refresh_s": REFRESH_S,
    }


@router.get("/calendar")
async def calendar(request: Request, who: Annotated[Viewer, Depends(viewer(Action.READ))]) -> Response:
    context = await _week_context(request, who)
    if context is None:
        return render(request, "forbidden.html", {}, who.session, viewer=who, status_code=403)
    return render(request, "calendar.html", context, who.session, viewer=who)


@router.get("/console/calendar/week")
async def calendar_week(request: Request, who: Annotated[Viewer, Depends(viewer(Action.READ))]) -> Response:
    """The week alone, which the calendar page refreshes (htmx) while it holds the present."""
    context = await _week_context(request, who)
    if context is None:
        return Response("forbidden", status_code=403)
    return render(request, "_calendar_week.html", context, who.session, viewer=who)
