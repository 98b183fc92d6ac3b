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
from controller.services.schedules import ScheduleService, ScheduleSpec, schedule_time
from controller.services.targets import chunks
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


def programme_feed(
    engine: Engine,
    schedules: ScheduleService,
    code: str,
    principal: Principal,
    *,
    timezone: str,
    now: datetime,
) -> str:
    """The calendar of every enabled schedule that reaches the area (the selection of
    `ScheduleService.programme`), one recurring event per schedule instead of expanded occurrences."""
    with Session(engine) as session:
        tree, reaching = schedules.schedules_reaching(session, code, principal)
        reach_of = dict(reaching)
        rows = [
            row
            for chunk in chunks(reach_of)
            for row in session.exec(select(ScheduleRow).where(col(ScheduleRow.id).in_(chunk))).all()
        ]
        named = {d for row in rows for d in row.targets.get("devices", [])}
        device_names = {
            device_id: name
            for chunk in chunks(named)
            for device_id, name in session.exec(
                select(DeviceRow.id, DeviceRow.name).where(col(DeviceRow.id).in_(chunk))
            ).all()
            if name
        }
        durations = dict(session.exec(select(MediaRow.id, MediaRow.duration_s)).all())
    area = tree.get(code)  # schedules_reaching checked that it exists
    events: list[ProgrammeEvent] = []
    for row in sorted(rows, key=lambda r: (r.created_at, r.id)):
        reach = reach_of[row.id]
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
        runtime.schedules,
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
