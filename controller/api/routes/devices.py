from __future__ import annotations

import asyncio
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Session, col, select

from controller.api.deps import DeviceManager, Reader, RuntimeDep
from controller.api.errors import ApiError
from controller.domain.clock import rfc3339
from controller.services.auth import Principal
from controller.store.models import DeliveryRow, DeviceRow

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])

DeviceKind = Literal["speaker", "led_screen", "sensor"]
Transport = Literal["mqtt"]
_IDENTIFIER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_KIND_PREFIX = {"speaker": "spk", "led_screen": "led", "sensor": "sen"}


def _identifier(value: str | None) -> str | None:
    if value is not None and not _IDENTIFIER.fullmatch(value):
        raise ValueError("use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit")
    return value


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    kind: DeviceKind
    area: str
    name: str | None = Field(default=None, max_length=200)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    transport: Transport = "mqtt"
    address: str | None = None
    enabled: bool = True

    _check_id = field_validator("id", "address")(_identifier)


class DevicePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    area: str | None = None
    name: str | None = Field(default=None, max_length=200)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    address: str | None = None
    enabled: bool | None = None

    _check_address = field_validator("address")(_identifier)


class DeviceOut(BaseModel):
    id: str
    kind: str
    name: str | None
    area: str
    online: bool
    last_seen: str | None
    transport: str
    address: str
    lat: float | None
    lon: float | None
    enabled: bool
    status: dict[str, Any]


def _out(row: DeviceRow) -> DeviceOut:
    return DeviceOut(
        id=row.id,
        kind=row.kind,
        name=row.name,
        area=row.area_code,
        online=row.online,
        last_seen=rfc3339(row.last_seen) if row.last_seen else None,
        transport=row.transport,
        address=row.address,
        lat=row.lat,
        lon=row.lon,
        enabled=row.enabled,
        status=row.status,
    )


def _visible_areas(runtime: Any, principal: Principal) -> frozenset[str] | None:
    if principal.ward_code is None:
        return None
    subtree: frozenset[str] = runtime.area_tree().subtree_codes(principal.ward_code)
    return subtree


def _check_area(runtime: Any, principal: Principal, code: str, field: str) -> None:
    tree = runtime.area_tree()
    if code not in tree:
        raise ApiError(422, "invalid", field, f"unknown area {code!r}")
    if principal.ward_code is not None and not tree.is_within(code, principal.ward_code):
        raise ApiError(403, "forbidden", field, f"area {code!r} is outside ward {principal.ward_code!r}")


def _get_visible(session: Session, runtime: Any, principal: Principal, device_id: str) -> DeviceRow:
    row = session.get(DeviceRow, device_id)
    visible = _visible_areas(runtime, principal)
    if row is None or (visible is not None and row.area_code not in visible):
        raise ApiError(404, "not_found", "id", f"unknown device {device_id!r}")
    return row


def _refuse_address_clash(session: Session, transport: str, address: str) -> None:
    clash = session.exec(
        select(DeviceRow).where(DeviceRow.transport == transport, DeviceRow.address == address)
    ).first()
    if clash is not None:
        raise ApiError(409, "conflict", "address", f"address {address!r} is used by {clash.id!r}")


@router.get("", response_model=list[DeviceOut])
async def list_devices(
    runtime: RuntimeDep,
    principal: Reader,
    area: Annotated[str | None, Query(description="an area code; its whole subtree is listed")] = None,
    kind: DeviceKind | None = None,
    online: bool | None = None,
) -> list[DeviceOut]:
    def query() -> list[DeviceOut]:
        tree = runtime.area_tree()
        if area is not None and area not in tree:
            raise ApiError(422, "invalid", "area", f"unknown area {area!r}")
        statement = select(DeviceRow).order_by(col(DeviceRow.id))
        if kind is not None:
            statement = statement.where(DeviceRow.kind == kind)
        if online is not None:
            statement = statement.where(DeviceRow.online == online)
        scopes = [
            s
            for s in (_visible_areas(runtime, principal), tree.subtree_codes(area) if area else None)
            if s is not None
        ]
        with Session(runtime.engine) as session:
            rows = session.exec(statement).all()
        return [_out(r) for r in rows if all(r.area_code in scope for scope in scopes)]

    return await asyncio.to_thread(query)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeviceOut)
async def create_device(body: DeviceIn, runtime: RuntimeDep, principal: DeviceManager) -> DeviceOut:
    def create() -> DeviceOut:
        _check_area(runtime, principal, body.area, "area")
        device_id = body.id or f"{_KIND_PREFIX[body.kind]}-{secrets.token_hex(4)}"
        address = body.address or device_id
        with Session(runtime.engine) as session:
            if session.get(DeviceRow, device_id) is not None:
                raise ApiError(409, "conflict", "id", f"device {device_id!r} already exists")
            _refuse_address_clash(session, body.transport, address)
            row = DeviceRow(
                id=device_id,
                kind=body.kind,
                name=body.name,
                area_code=body.area,
                lat=body.lat,
                lon=body.lon,
                transport=body.transport,
                address=address,
                enabled=body.enabled,
                created_at=datetime.now(UTC),
            )
            session.add(row)
            session.commit()
            session.refresh(row)
            return _out(row)

    device = await asyncio.to_thread(create)
    runtime.device_registered(device.transport, device.address, device.id)
    return device


@router.get("/{device_id}", response_model=DeviceOut)
async def get_device(device_id: str, runtime: RuntimeDep, principal: Reader) -> DeviceOut:
    def get() -> DeviceOut:
        with Session(runtime.engine) as session:
            return _out(_get_visible(session, runtime, principal, device_id))

    return await asyncio.to_thread(get)


@router.patch("/{device_id}", response_model=DeviceOut)
async def patch_device(
    device_id: str, body: DevicePatch, runtime: RuntimeDep, principal: DeviceManager
) -> DeviceOut:
    def patch() -> DeviceOut:
        changes = body.model_dump(exclude_unset=True)
        with Session(runtime.engine) as session:
            row = _get_visible(session, runtime, principal, device_id)
            if "area" in changes:
                _check_area(runtime, principal, changes["area"], "area")
                row.area_code = changes.pop("area")
            if "address" in changes and changes["address"] != row.address:
                _refuse_address_clash(session, row.transport, changes["address"])
            for key, value in changes.items():
                setattr(row, key, value)
            session.add(row)
            session.commit()
            session.refresh(row)
            return _out(row)

    device = await asyncio.to_thread(patch)
    runtime.device_registered(device.transport, device.address, device.id)
    return device


@router.delete("/{device_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_device(device_id: str, runtime: RuntimeDep, principal: DeviceManager) -> Response:
    def delete() -> None:
        with Session(runtime.engine) as session:
            row = _get_visible(session, runtime, principal, device_id)
            if session.exec(select(DeliveryRow.id).where(DeliveryRow.device_id == device_id)).first():
                raise ApiError(
                    409,
                    "conflict",
                    "id",
                    "the device has a broadcast log; disable it with "
                    'PATCH {"enabled": false} to keep its history',
                )
            session.delete(row)
            session.commit()

    await asyncio.to_thread(delete)
    runtime.directory.remove(device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
