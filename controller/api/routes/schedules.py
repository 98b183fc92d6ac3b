from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from fastapi import APIRouter, Query, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from controller.api.deps import Broadcaster, Reader, RuntimeDep
from controller.api.routes.broadcasts import TargetsIn
from controller.domain.planner import Targets
from controller.domain.priority import SUB_PRIORITY_MAX, Priority, PriorityClass
from controller.services.media import StoredMedia, record_media
from controller.services.schedules import ScheduleSpec, schedule_time
from controller.services.tts import SpeechSynthesizer, speech_media_id
from schedules.conflicts import Resolution

if TYPE_CHECKING:
    from controller.app import Runtime

router = APIRouter(tags=["schedules"])


class ScheduleContentIn(BaseModel):
    """Media played in order (`media_ids`), or a text for Vietnamese text-to-speech (`tts`)."""

    model_config = ConfigDict(extra="forbid")

    media_ids: list[str] | None = Field(default=None, max_length=50)
    tts: str | None = Field(default=None, max_length=5000)

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if (self.media_ids is None) == (self.tts is None):
            raise ValueError("give either media_ids or tts")
        return self


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    targets: TargetsIn
    content: ScheduleContentIn
    priority: PriorityClass = PriorityClass.NORMAL
    sub_priority: int = Field(default=0, ge=0, le=SUB_PRIORITY_MAX)
    repeats: int = Field(default=1, ge=1, le=20)
    gap_s: float = Field(default=0, ge=0, le=600)
    max_duration_s: float = Field(default=1800, gt=0, le=4 * 3600)
    dtstart: str = Field(description="local date-time in `timezone`, e.g. 2026-12-01T06:00")
    rrule: str | None = Field(default=None, description="RFC 5545 RRULE without the RRULE: prefix")
    exdates: list[str] = Field(default_factory=list, max_length=1000)
    timezone: str | None = None
    enabled: bool = True
    ward_order: int | None = Field(default=None, ge=0, le=10_000)
    on_preempted: Literal["resume", "missed"] = "resume"
    resolution: Resolution = Resolution.NONE


class SchedulePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    targets: TargetsIn | None = None
    content: ScheduleContentIn | None = None
    priority: PriorityClass | None = None
    sub_priority: int | None = Field(default=None, ge=0, le=SUB_PRIORITY_MAX)
    repeats: int | None = Field(default=None, ge=1, le=20)
    gap_s: float | None = Field(default=None, ge=0, le=600)
    max_duration_s: float | None = Field(default=None, gt=0, le=4 * 3600)
    dtstart: str | None = None
    rrule: str | None = None
    exdates: list[str] | None = None
    timezone: str | None = None
    enabled: bool | None = None
    ward_order: int | None = Field(default=None, ge=0, le=10_000)
    on_preempted: Literal["resume", "missed"] | None = None
    resolution: Resolution = Resolution.NONE


async def _media_ids(content: ScheduleContentIn, runtime: Runtime) -> tuple[str, ...]:
    """The media to play; a `tts` text is spoken by espeak-ng and stored as media (once per text)."""
    if content.tts is None:
        return tuple(content.media_ids or ())

    def record(stored: StoredMedia) -> str:
        row, _created = record_media(runtime.engine, stored)
        return row.id

    media_id = await speech_media_id(
        content.tts,
        synthesizer=SpeechSynthesizer(runtime.settings.tts),
        store=runtime.media_store,
        record=record,
    )
    return (media_id,)


def _spec(body: ScheduleIn, default_timezone: str, media_ids: tuple[str, ...]) -> ScheduleSpec:
    return ScheduleSpec(
        name=body.name,
        targets=Targets(areas=tuple(body.targets.areas), devices=tuple(body.targets.devices)),
        media_ids=media_ids,
        priority=Priority(body.priority, body.sub_priority),
        repeats=body.repeats,
        gap_s=body.gap_s,
        max_duration_s=body.max_duration_s,
        dtstart=body.dtstart,
        rrule=body.rrule,
        exdates=tuple(body.exdates),
        timezone=body.timezone or default_timezone,
        enabled=body.enabled,
        ward_order=body.ward_order,
        on_preempted=body.on_preempted,
    )


def _changes(body: SchedulePatch, media_ids: tuple[str, ...]) -> dict[str, Any]:
    """The patched fields as ScheduleSpec fields; priority is merged by the caller."""
    given = body.model_dump(exclude_unset=True, exclude={"resolution"})
    changes: dict[str, Any] = {}
    for key, value in given.items():
        if key == "targets":
            changes["targets"] = Targets(areas=tuple(value["areas"]), devices=tuple(value["devices"]))
        elif key == "content":
            changes["media_ids"] = media_ids
        elif key == "exdates":
            changes["exdates"] = tuple(value)
        elif key not in {"priority", "sub_priority"}:
            changes[key] = value
    return changes


@router.post("/api/v1/schedules", status_code=status.HTTP_201_CREATED)
async def create_schedule(body: ScheduleIn, runtime: RuntimeDep, principal: Broadcaster) -> dict[str, Any]:
    if body.content.tts is not None:
        # Speech takes seconds to make and is kept: refuse a bad time rule before making it.
        schedule_time(_spec(body, runtime.settings.timezone, ()))
    spec = _spec(body, runtime.settings.timezone, await _media_ids(body.content, runtime))
    result: dict[str, Any] = await asyncio.to_thread(
        runtime.schedules.create, spec, principal, body.resolution
    )
    await runtime.replan_schedule(result["id"])
    return result


@router.post("/api/v1/schedules/check")
async def check_schedule(body: ScheduleIn, runtime: RuntimeDep, principal: Broadcaster) -> dict[str, Any]:
    """A dry run of `POST /api/v1/schedules`: the same checks and errors (by field), nothing stored.
    Instead of a 409 the answer lists the `clashes` creating it would refuse (`ok` false), the
    `settled_clashes` its `resolution` settles, the devices it reaches and its `next_occurrences`.
    A `tts` text is spoken (and kept, as creating it would) to know how long it plays."""
    if body.content.tts is not None:
        schedule_time(_spec(body, runtime.settings.timezone, ()))
    spec = _spec(body, runtime.settings.timezone, await _media_ids(body.content, runtime))
    result: dict[str, Any] = await asyncio.to_thread(
        runtime.schedules.check, spec, principal, body.resolution
    )
    return result


@router.get("/api/v1/schedules")
async def list_schedules(runtime: RuntimeDep, principal: Reader) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await asyncio.to_thread(runtime.schedules.list_visible, principal)
    return result


@router.get("/api/v1/schedules/{schedule_id}")
async def get_schedule(schedule_id: str, runtime: RuntimeDep, principal: Reader) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(runtime.schedules.describe, schedule_id, principal)
    return result


@router.patch("/api/v1/schedules/{schedule_id}")
async def patch_schedule(
    schedule_id: str, body: SchedulePatch, runtime: RuntimeDep, principal: Broadcaster
) -> dict[str, Any]:
    media_ids = await _media_ids(body.content, runtime) if body.content is not None else ()
    changes = _changes(body, media_ids)
    if body.priority is not None or body.sub_priority is not None:
        current = await asyncio.to_thread(runtime.schedules.describe, schedule_id, principal)
        changes["priority"] = Priority(
            body.priority or PriorityClass(current["priority"]),
            body.sub_priority if body.sub_priority is not None else current["sub_priority"],
        )
    result: dict[str, Any] = await asyncio.to_thread(
        runtime.schedules.update, schedule_id, changes, principal, body.resolution
    )
    await runtime.replan_schedule(schedule_id)
    return result


@router.delete("/api/v1/schedules/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_schedule(schedule_id: str, runtime: RuntimeDep, principal: Broadcaster) -> Response:
    await asyncio.to_thread(runtime.schedules.delete, schedule_id, principal)
    await runtime.replan_schedule(schedule_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/api/v1/schedules/{schedule_id}/history")
async def schedule_history(schedule_id: str, runtime: RuntimeDep, principal: Reader) -> list[dict[str, Any]]:
    """Each occurrence so far: `fired` (with its broadcast), `missed` or `failed`, with the reason."""
    result: list[dict[str, Any]] = await asyncio.to_thread(runtime.schedules.history, schedule_id, principal)
    return result


Window = Annotated[AwareDatetime, Query(description="ISO 8601 with an offset, e.g. 2026-12-01T00:00+07:00")]


@router.get("/api/v1/schedules/{schedule_id}/occurrences")
async def schedule_occurrences(
    schedule_id: str, start: Window, end: Window, runtime: RuntimeDep, principal: Reader
) -> list[dict[str, str]]:
    """Exactly the RFC 5545 expansion in [start, end)."""
    window: tuple[datetime, datetime] = (start, end)
    result: list[dict[str, str]] = await asyncio.to_thread(
        runtime.schedules.occurrences, schedule_id, *window, principal
    )
    return result


@router.get("/api/v1/areas/{code}/programme")
async def area_programme(
    code: str, start: Window, end: Window, runtime: RuntimeDep, principal: Reader
) -> list[dict[str, Any]]:
    """Every occurrence that reaches the area, its own and its ancestors' (and, marked `part`, its
    sub-areas' and its devices'). `result` is null until the occurrence is recorded, then its proof
    of play: `outcome` fired / missed / failed (`detail` says why), and for a fired one the devices of
    this area its broadcast reached, counted by what became of each: played, playing, pending,
    interrupted, missed (expired), failed, cancelled."""
    result: list[dict[str, Any]] = await asyncio.to_thread(
        runtime.schedules.programme, code, start, end, principal
    )
    return result
