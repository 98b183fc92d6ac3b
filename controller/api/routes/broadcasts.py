from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from fastapi import APIRouter, Query, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from controller.api.deps import Broadcaster, Canceller, Reader, RuntimeDep
from controller.domain.planner import Targets
from controller.domain.priority import SUB_PRIORITY_MAX, Priority, PriorityClass
from controller.services.broadcasts import BroadcastRequest

router = APIRouter(prefix="/api/v1/broadcasts", tags=["broadcasts"])


class TargetsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    areas: list[str] = Field(default_factory=list, max_length=1000)
    devices: list[str] = Field(default_factory=list, max_length=10000)


class ContentIn(BaseModel):
    """One audio file (`media_id`) or several played in order as one item (`media_ids`)."""

    model_config = ConfigDict(extra="forbid")

    media_id: str | None = None
    media_ids: list[str] | None = Field(default=None, min_length=1, max_length=50)

    @model_validator(mode="after")
    def _exactly_one_form(self) -> Self:
        if (self.media_id is None) == (self.media_ids is None):
            raise ValueError("give either media_id or media_ids")
        return self

    def playlist(self) -> tuple[str, ...]:
        return (self.media_id,) if self.media_id is not None else tuple(self.media_ids or ())


class BroadcastIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: TargetsIn
    content: ContentIn
    priority: PriorityClass = PriorityClass.NORMAL
    sub_priority: int = Field(default=0, ge=0, le=SUB_PRIORITY_MAX)
    repeats: int = Field(default=1, ge=1, le=20)
    gap_s: float = Field(default=0, ge=0, le=600)
    max_duration_s: float = Field(default=600, gt=0, le=4 * 3600)
    expires_at: AwareDatetime | None = None
    mode: Literal["live", "drill"] = "live"
    on_preempted: Literal["resume", "missed"] = Field(
        default="resume", description="if a higher priority takes the device: play again afterwards, or not"
    )


class AcceptedOut(BaseModel):
    id: str
    device_count: int


class CancelOut(BaseModel):
    id: str
    cancelled_deliveries: int


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AcceptedOut)
async def create_broadcast(body: BroadcastIn, runtime: RuntimeDep, principal: Broadcaster) -> AcceptedOut:
    expires_at: datetime | None = body.expires_at
    accepted = await runtime.broadcasts.create(
        BroadcastRequest(
            targets=Targets(areas=tuple(body.targets.areas), devices=tuple(body.targets.devices)),
            media_ids=body.content.playlist(),
            gap_s=body.gap_s,
            on_preempted=body.on_preempted,
            priority=Priority(body.priority, body.sub_priority),
            repeats=body.repeats,
            max_duration_s=body.max_duration_s,
            expires_at=expires_at,
            mode=body.mode,
        ),
        principal,
    )
    return AcceptedOut(id=accepted.id, device_count=accepted.device_count)


@router.get("")
async def list_broadcasts(
    runtime: RuntimeDep,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="skip this many (paging)")] = 0,
    start: Annotated[
        AwareDatetime | None, Query(alias="from", description="created at or after, ISO 8601 with an offset")
    ] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to", description="created before (exclusive)")] = None,
    area: Annotated[
        str | None, Query(min_length=1, max_length=64, description="reached a device in this area's subtree")
    ] = None,
    priority: PriorityClass | None = None,
) -> list[dict[str, Any]]:
    """Broadcasts newest first, with their counts per delivery state, content (media file names; a
    text-to-speech item's starts with "TTS") and who created them; filtered, then paged."""
    result: list[dict[str, Any]] = await asyncio.to_thread(
        lambda: runtime.broadcasts.recent(
            principal, limit=limit, offset=offset, start=start, end=end, area=area, priority=priority
        )
    )
    return result


@router.get("/{broadcast_id}")
async def get_broadcast(broadcast_id: str, runtime: RuntimeDep, principal: Reader) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(runtime.broadcasts.describe, broadcast_id, principal)
    return result


@router.post("/{broadcast_id}/cancel", response_model=CancelOut)
async def cancel_broadcast(broadcast_id: str, runtime: RuntimeDep, principal: Canceller) -> CancelOut:
    ended = await runtime.broadcasts.cancel(broadcast_id, principal)
    return CancelOut(id=broadcast_id, cancelled_deliveries=ended)
