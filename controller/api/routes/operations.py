"""Remote operations on devices (issue 6): set volume, reboot, test tone, push configuration."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict, Field

from controller.api.deps import DeviceManager, Reader, RuntimeDep
from controller.services.operations import OperationRequest

router = APIRouter(prefix="/api/v1/operations", tags=["operations"])


class OperationTargetsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: list[str] = Field(default_factory=list, max_length=10_000)
    areas: list[str] = Field(default_factory=list, max_length=1000)


class OperationIn(BaseModel):
    """`params` by type: set_volume `{volume: 0-100}`; reboot none; test_tone `{duration_s: (0, 30]}`
    (default 3); configure any of `{quiet_hours: {start: "HH:MM", end: "HH:MM"} | null,
    comm_loss: {policy: keep} | {policy: stop_after, after_s: N}, heartbeat_s: 5-3600}`."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="set_volume | reboot | test_tone | configure")
    targets: OperationTargetsIn
    params: dict[str, Any] = Field(default_factory=dict)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_operation(
    body: OperationIn, runtime: RuntimeDep, principal: DeviceManager
) -> dict[str, Any]:
    """One command per device reached, each acknowledged and answered by the device; follow them with
    `GET /api/v1/operations/{id}` or the event stream (`type: operation`)."""
    request = OperationRequest(
        type=body.type,
        devices=tuple(body.targets.devices),
        areas=tuple(body.targets.areas),
        params=body.params,
    )
    return await runtime.operations.create(request, principal, runtime.area_tree())


@router.get("")
async def list_operations(
    runtime: RuntimeDep,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    device: Annotated[
        str | None, Query(max_length=200, description="only operations that reached this device")
    ] = None,
) -> list[dict[str, Any]]:
    """The latest operations, newest first. With `device`: each with that device's own result
    (`device_result`), its counts and status for that device alone."""
    visible = await asyncio.to_thread(runtime.visible_device_ids, principal)
    return await asyncio.to_thread(runtime.operations.recent, limit, visible, device)


@router.get("/{operation_id}")
async def get_operation(operation_id: str, runtime: RuntimeDep, principal: Reader) -> dict[str, Any]:
    """The operation with each device's result: state, when it was sent, delivered and ended, and what
    the device reported (`result`)."""
    visible = runtime.visible_device_ids(principal)
    return await asyncio.to_thread(runtime.operations.describe, operation_id, visible)
