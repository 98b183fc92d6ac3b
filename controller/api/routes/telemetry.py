"""Sensor readings: a device's time series and latest values; threshold rules and their alarms."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import Session, col, select

from controller.api.deps import Reader, RuleManager, RuntimeDep
from controller.api.errors import ApiError
from controller.domain.clock import rfc3339
from controller.domain.telemetry import METRIC_PATTERN
from controller.domain.thresholds import Direction, Threshold, ThresholdError
from controller.services.auth import Principal
from controller.store.models import DeviceRow, RuleRow

router = APIRouter(tags=["telemetry"])

_STEP = re.compile(r"^(\d{1,9})\s*(s|m|h|d)?$")
_SECONDS_PER = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_DEFAULT_RANGE = timedelta(hours=24)


def _step_seconds(step: str | None) -> int | None:
    if step is None:
        return None
    match = _STEP.fullmatch(step.strip())
    if match is None or int(match.group(1)) == 0:
        raise ApiError(422, "invalid", "step", "give a positive number of seconds, or 30s, 5m, 1h, 1d")
    return int(match.group(1)) * _SECONDS_PER[match.group(2) or "s"]


def _visible_device(runtime: Any, principal: Principal, device_id: str, field: str = "id") -> DeviceRow:
    with Session(runtime.engine) as session:
        row = session.get(DeviceRow, device_id)
    wards = principal.device_wards()  # a ward's staff: its ward; a technician: its assigned wards
    if row is not None and wards is not None:
        tree = runtime.area_tree()
        if not any(row.area_code in tree.subtree_codes(ward) for ward in wards if ward in tree):
            row = None
    if row is None:
        raise ApiError(404 if field == "id" else 422, "not_found", field, f"unknown device {device_id!r}")
    return row


@router.get("/api/v1/devices/{device_id}/telemetry")
async def device_telemetry(
    device_id: str,
    runtime: RuntimeDep,
    principal: Reader,
    start: Annotated[
        AwareDatetime | None, Query(alias="from", description="RFC 3339; default: to − 24 h")
    ] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to", description="RFC 3339; default: now")] = None,
    step: Annotated[
        str | None, Query(description="bucket length (seconds, or 30s, 5m, 1h, 1d); none: raw readings")
    ] = None,
    metric: Annotated[list[str] | None, Query(description="only these metrics (repeatable)")] = None,
) -> dict[str, Any]:
    step_s = _step_seconds(step)

    def query() -> dict[str, Any]:
        _visible_device(runtime, principal, device_id)
        to = end or runtime.clock.now()
        since = start or to - _DEFAULT_RANGE
        return runtime.telemetry.store.series(
            device_id, start=since, end=to, step_s=step_s, metrics=frozenset(metric or ())
        )

    return await asyncio.to_thread(query)


@router.get("/api/v1/devices/{device_id}/telemetry/latest")
async def device_latest_readings(device_id: str, runtime: RuntimeDep, principal: Reader) -> dict[str, Any]:
    def query() -> dict[str, Any]:
        _visible_device(runtime, principal, device_id)
        return {"device_id": device_id, "metrics": runtime.telemetry.store.latest(device_id)}

    return await asyncio.to_thread(query)


# -- rules --------------------------------------------------------------------------------------


class RuleBroadcastIn(BaseModel):
    """The alert a rule sends when it raises: spoken (TTS) and shown on the LED screens of `areas`."""

    model_config = ConfigDict(extra="forbid")

    areas: list[str] = Field(min_length=1, max_length=100)
    headline: str = Field(min_length=1, max_length=200)
    text: str = Field(default="", max_length=5000)
    priority_class: Literal["priority", "emergency"] = "emergency"
    mode: Literal["live", "drill"] = "live"
    repeats: int = Field(default=1, ge=1, le=10)


class RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    device_id: str = Field(min_length=1, max_length=64)
    metric: Annotated[str, StringConstraints(pattern=METRIC_PATTERN)]
    direction: Direction = Direction.ABOVE
    raise_at: float = Field(allow_inf_nan=False)
    clear_at: float = Field(allow_inf_nan=False)
    for_s: float = Field(default=0.0, ge=0, le=7 * 86_400, allow_inf_nan=False)
    clear_for_s: float = Field(default=0.0, ge=0, le=7 * 86_400, allow_inf_nan=False)
    action: Literal["none", "broadcast", "draft"] = "none"
    broadcast: RuleBroadcastIn | None = None
    enabled: bool = True


def _check_rule(runtime: Any, principal: Principal, body: RuleIn) -> None:
    if body.action != "none" and body.broadcast is None:
        raise ApiError(422, "invalid", "broadcast", f"action {body.action!r} needs the broadcast to send")
    try:
        Threshold(body.direction, body.raise_at, body.clear_at, body.for_s, body.clear_for_s)
    except ThresholdError as error:
        raise ApiError(422, "invalid", error.field, error.detail) from error
    device = _visible_device(runtime, principal, body.device_id, field="device_id")
    metrics = device.config.get("metrics") or {}
    if device.kind != "sensor":
        raise ApiError(422, "invalid", "device_id", f"device {device.id!r} is a {device.kind}, not a sensor")
    if metrics and body.metric not in metrics:
        raise ApiError(
            422,
            "invalid",
            "metric",
            f"sensor {device.id!r} reports {', '.join(sorted(metrics))}, not {body.metric!r}",
        )
    if body.broadcast is not None:
        tree = runtime.area_tree()
        for index, code in enumerate(body.broadcast.areas):
            if code not in tree:
                raise ApiError(422, "invalid", f"broadcast.areas[{index}]", f"unknown area {code!r}")


def _rule_out(row: RuleRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "device_id": row.device_id,
        "metric": row.metric,
        "direction": row.direction,
        "raise_at": row.raise_at,
        "clear_at": row.clear_at,
        "for_s": row.for_s,
        "clear_for_s": row.clear_for_s,
        "action": row.action,
        "broadcast": row.broadcast,
        "enabled": row.enabled,
        "created_at": rfc3339(row.created_at),
    }


def _apply(row: RuleRow, body: RuleIn) -> None:
    row.name = body.name
    row.device_id = body.device_id
    row.metric = body.metric
    row.direction = body.direction.value
    row.raise_at, row.clear_at = body.raise_at, body.clear_at
    row.for_s, row.clear_for_s = body.for_s, body.clear_for_s
    row.action = body.action
    row.broadcast = body.broadcast.model_dump() if body.broadcast else None
    row.enabled = body.enabled


@router.get("/api/v1/rules")
async def list_rules(runtime: RuntimeDep, principal: Reader) -> list[dict[str, Any]]:
    def query() -> list[dict[str, Any]]:
        visible = runtime.visible_device_ids(principal)
        with Session(runtime.engine) as session:
            rows = session.exec(select(RuleRow).order_by(col(RuleRow.name))).all()
        return [_rule_out(r) for r in rows if visible is None or r.device_id in visible]

    return await asyncio.to_thread(query)


@router.post("/api/v1/rules", status_code=status.HTTP_201_CREATED)
async def create_rule(body: RuleIn, runtime: RuntimeDep, principal: RuleManager) -> dict[str, Any]:
    def create() -> RuleRow:
        _check_rule(runtime, principal, body)
        row = RuleRow(
            id=str(uuid.uuid4()),
            name="",
            device_id="",
            metric="",
            direction="",
            raise_at=0.0,
            clear_at=0.0,
            for_s=0.0,
            action="none",
            created_by=principal.key_id,
            created_at=runtime.clock.now(),
        )
        _apply(row, body)
        with Session(runtime.engine) as session:
            session.add(row)
            session.add(runtime.audit.entry(principal, "rule.create", subject=row.id, detail=_rule_out(row)))
            session.commit()
            session.refresh(row)
        return row

    row = await asyncio.to_thread(create)
    runtime.rules.rule_changed(row)
    return _rule_out(row)


@router.get("/api/v1/rules/{rule_id}")
async def get_rule(rule_id: str, runtime: RuntimeDep, principal: Reader) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        visible = runtime.visible_device_ids(principal)
        with Session(runtime.engine) as session:
            row = session.get(RuleRow, rule_id)
        if row is None or (visible is not None and row.device_id not in visible):
            raise ApiError(404, "not_found", "id", f"unknown rule {rule_id!r}")
        return _rule_out(row)

    return await asyncio.to_thread(get)


@router.put("/api/v1/rules/{rule_id}")
async def replace_rule(
    rule_id: str, body: RuleIn, runtime: RuntimeDep, principal: RuleManager
) -> dict[str, Any]:
    def replace() -> RuleRow:
        _check_rule(runtime, principal, body)
        with Session(runtime.engine) as session:
            row = session.get(RuleRow, rule_id)
            if row is None:
                raise ApiError(404, "not_found", "id", f"unknown rule {rule_id!r}")
            _apply(row, body)
            session.add(row)
            session.add(runtime.audit.entry(principal, "rule.update", subject=row.id, detail=_rule_out(row)))
            session.commit()
            session.refresh(row)
        return row

    row = await asyncio.to_thread(replace)
    runtime.rules.rule_changed(row)
    return _rule_out(row)


@router.delete("/api/v1/rules/{rule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_rule(rule_id: str, runtime: RuntimeDep, principal: RuleManager) -> Response:
    """A rule with alarms in its history is disabled, not deleted, so that the history keeps its rule."""

    def remove() -> None:
        with Session(runtime.engine) as session:
            row = session.get(RuleRow, rule_id)
            if row is None:
                raise ApiError(404, "not_found", "id", f"unknown rule {rule_id!r}")
            if runtime.rules.has_alarms(session, rule_id):
                row.enabled = False
                session.add(row)
            else:
                session.delete(row)
            session.add(runtime.audit.entry(principal, "rule.delete", subject=rule_id))
            session.commit()

    await asyncio.to_thread(remove)
    runtime.rules.rule_removed(rule_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/api/v1/alarms")
async def list_alarms(
    runtime: RuntimeDep,
    principal: Reader,
    state: Literal["active", "cleared"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[dict[str, Any]]:
    def query() -> list[dict[str, Any]]:
        visible = runtime.visible_device_ids(principal)
        return runtime.rules.alarms(state=state, limit=limit, devices=visible)

    return await asyncio.to_thread(query)
