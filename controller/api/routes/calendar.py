"""An area's programme as an iCalendar feed for Google Calendar, Outlook, Apple Calendar, Thunderbird."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.api.deps import RuntimeDep, get_principal, get_runtime
from controller.api.errors import ApiError
from controller.domain.areas import AreaTree
from controller.services.auth import Action, Principal
from controller.services.broadcasts import load_area_tree
from controller.services.schedules import ScheduleError, ScheduleSpec, schedule_time
from controller.services.tracker import expected_play_seconds
from controller.store.models import DeviceRow, MediaRow, ScheduleRow
from schedules.ics import ProgrammeEvent, programme_calendar
from schedules.recurrence import first_occurrence

router = APIRouter(tags=["schedules"])

_bearer = HTTPBearer(auto_error=False, description="An API key made with `wardcast apikey create`")
_query_token = APIKeyQuery(
    name="token",
    auto_error=False,
    description="The same API key as a query parameter, for calendar apps that cannot send headers",
)
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")
_CALENDAR_TYPE = "text/calendar; charset=utf-8"


async def feed_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    token: Annotated[str | None, Depends(_query_token)],
) -> Principal:
    """A reader from `Authorization: Bearer` or, when no such header is sent, from `?token=`."""
    if credentials is not None or not token:
        principal = await get_principal(request, credentials)
    else:
        found = await get_runtime(request).authenticate(token)
        if found is None:
            raise ApiError(401, "unauthorized", "token", "unknown or revoked token")
        principal = found
    if not principal.may(Action.READ):
        raise ApiError(403, "forbidden", None, f"role {principal.role} may not read")
    return principal


FeedReader = Annotated[Principal, Depends(feed_reader)]


def _target_lines(
    targets: dict[str, list[str]], tree: AreaTree, device_names: dict[str, str]
) -> tuple[str, ...]:
    lines: list[str] = []
    for code in targets.get("areas", []):
        area = tree.find(code)
        lines.append(f"{area.name} ({code})" if area is not None else code)
    for device_id in targets.get("devices", []):
        name = device_names.get(device_id)
        lines.append(f"thiết bị {name} ({device_id})" if name else f"thiết bị {device_id}")
    return tuple(lines)


def _play_length(spec: ScheduleSpec, durations: dict[str, float]) -> timedelta:
    """The planned play length, as the conflict check plans it; the cap when media have gone."""
    if all(media_id in durations for media_id in spec.media_ids):
        seconds = expected_play_seconds(
            [durations[m] for m in spec.media_ids], spec.repeats, spec.gap_s, spec.max_duration_s
        )
    else:
        seconds = spec.max_duration_s
    return timedelta(seconds=seconds)


def programme_feed(engine: Engine, code: str, principal: Principal, *, timezone: str, now: datetime) -> str:
    """The calendar of every enabled schedule that reaches the area: the selection of
    `ScheduleService.programme` (aimed at the area, an area above it, an area below it or devices
    inside it), one recurring event per schedule instead of expanded occurrences."""
    with Session(engine) as session:
        tree = load_area_tree(session)
        area = tree.find(code)
        if area is None:
            raise ScheduleError("code", f"unknown area {code!r}", status=404)
        if principal.ward_code is not None and not (
            tree.is_within(code, principal.ward_code) or tree.is_within(principal.ward_code, code)
        ):
            raise ScheduleError("code", f"area {code!r} is outside ward {principal.ward_code!r}", status=403)
        above = {code} | {a.code for a in tree.ancestors(code)}
        below = tree.subtree_codes(code) - {code}
        devices = session.exec(select(DeviceRow.id, DeviceRow.area_code, DeviceRow.name)).all()
        rows = session.exec(
            select(ScheduleRow).where(col(ScheduleRow.enabled)).order_by(col(ScheduleRow.created_at))
        ).all()
        durations = dict(session.exec(select(MediaRow.id, MediaRow.duration_s)).all())
    device_area = {device_id: area_code for device_id, area_code, _ in devices}
    device_names = {device_id: name for device_id, _, name in devices if name}
    events: list[ProgrammeEvent] = []
    for row in rows:
        areas = set(row.targets.get("areas", []))
        device_areas = {device_area.get(d) for d in row.targets.get("devices", [])}
        if areas & above:
            reach = "whole"
        elif areas & below or device_areas & (below | {code}):
            reach = "part"
        else:
            continue
        spec = ScheduleSpec.from_row(row)
        timing = schedule_time(spec)
        # The rule's own first start (EXDATEs aside): see `schedules.ics` on DTSTART.
        start = first_occurrence(timing.rule, timing.dtstart) or timing.first_occurrence
        events.append(
            ProgrammeEvent(
                schedule_id=row.id,
                name=row.name,
                priority_class=row.priority_class,
                sub_priority=row.sub_priority,
                start=start,
                duration=_play_length(spec, durations),
                rule=timing.rule,
                exdates=timing.exdates,
                targets=_target_lines(row.targets, tree, device_names),
                repeats=row.repeats,
                reach=reach,
                last_modified=row.updated_at,
            )
        )
    return programme_calendar(area_name=area.name, events=events, dtstamp=now, timezone=timezone)


@router.get(
    "/api/v1/areas/{code}/programme.ics",
    response_class=Response,
    responses={200: {"content": {"text/calendar": {"schema": {"type": "string"}}}}},
)
async def area_programme_ics(code: str, runtime: RuntimeDep, principal: FeedReader) -> Response:
    """The area's programme as an iCalendar (RFC 5545) feed to subscribe to: one recurring event per
    enabled schedule that reaches the area (the selection of `/api/v1/areas/{code}/programme`).

    Authentication: `Authorization: Bearer <token>` as everywhere, or, because calendar apps that
    subscribe to a URL (Google Calendar, Outlook, Apple Calendar) cannot send headers, the same API
    key as `?token=<token>` on this route only. A header, when sent, wins. A URL with a token is a
    credential (the controller writes no access log, but a reverse proxy may): give each subscriber
    its own key with the fewest rights, scoped to its ward (`wardcast apikey create --ward <code>`),
    and revoke that key to cut a leaked feed off.
    """
    text = await asyncio.to_thread(
        programme_feed,
        runtime.engine,
        code,
        principal,
        timezone=runtime.settings.timezone,
        now=runtime.clock.now(),
    )
    filename = _UNSAFE_FILENAME.sub("_", code) or "programme"
    return Response(
        content=text.encode("utf-8"),
        media_type=_CALENDAR_TYPE,
        headers={
            "Content-Disposition": f'inline; filename="{filename}.ics"',
            "Cache-Control": "private, max-age=300",
        },
    )
