from __future__ import annotations

import asyncio
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlmodel import Session, col, select

from controller.api.deps import DeviceManager, Reader, RuntimeDep
from controller.api.errors import ApiError
from controller.domain.clock import rfc3339
from controller.domain.provisioning import SERIAL
from controller.domain.telemetry import METRIC_PATTERN
from controller.services.auth import Principal
from controller.store.models import (
    DeliveryRow,
    DeviceAvailabilityRow,
    DeviceRow,
    OperationResultRow,
    RuleRow,
)
from drivers.coap import parse_address
from drivers.modbus_field import LinkUrlError, link_endpoint

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])

DeviceKind = Literal["speaker", "led_screen", "sensor", "wired_zone"]
Transport = Literal["mqtt", "modbus", "coap", "serial"]
_IDENTIFIER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_KIND_PREFIX = {"speaker": "spk", "led_screen": "led", "sensor": "sen", "wired_zone": "wz"}


class CommLossIn(BaseModel):
    """What a speaker does with its cached programme while its link is down (docs/protocol.md §1.10)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["keep", "stop_after"] = "keep"
    after_s: int | None = Field(default=None, gt=0, le=30 * 86_400)

    @model_validator(mode="after")
    def _limit_matches_policy(self) -> CommLossIn:
        if self.policy == "stop_after" and self.after_s is None:
            raise ValueError("after_s: stop_after needs the number of seconds after which to stop")
        if self.policy == "keep" and self.after_s is not None:
            raise ValueError("after_s: only the stop_after policy takes a limit")
        return self


class MetricIn(BaseModel):
    """One quantity a sensor reports: its unit and the physical range outside which a reading is refused."""

    model_config = ConfigDict(extra="forbid")

    unit: str | None = Field(default=None, min_length=1, max_length=16)
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _range_is_ordered(self) -> MetricIn:
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError("max must be above min")
        return self


class ModbusRegisterIn(BaseModel):
    """One metric in a Modbus sensor's registers (docs/protocol.md §3.5): value = raw × scale + offset."""

    model_config = ConfigDict(extra="forbid")

    metric: Annotated[str, StringConstraints(pattern=METRIC_PATTERN)]
    table: Literal["input", "holding"] = "input"
    address: int = Field(ge=0, le=0xFFFF)
    type: Literal["int16", "uint16", "int32", "float32"] = "uint16"
    byte_order: Literal["big", "little"] = "big"
    word_order: Literal["big", "little"] = "big"
    scale: float = Field(default=1.0, allow_inf_nan=False)
    offset: float = Field(default=0.0, allow_inf_nan=False)
    unit: str | None = Field(default=None, min_length=1, max_length=16)

    @field_validator("scale")
    @classmethod
    def _scale_not_zero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0")
        return value


class ModbusIn(BaseModel):
    """Where a Modbus device answers: a sensor's registers to poll, or the zones of an amplifier box that
    a wired-zone device switches around each play (docs/protocol.md §3.4)."""

    model_config = ConfigDict(extra="forbid")

    link: str = Field(
        min_length=1,
        max_length=300,
        description="tcp://host:port, rtu:///dev/ttyUSB0?baud=9600 or rtu+tcp://host:port?baud=9600",
    )
    unit: int = Field(default=1, ge=1, le=247)
    poll_interval_s: float = Field(default=10.0, ge=0.1, le=86_400, allow_inf_nan=False)
    registers: list[ModbusRegisterIn] = Field(default_factory=list, max_length=200)
    zones: list[Annotated[int, Field(ge=1, le=64)]] = Field(default_factory=list, max_length=64)
    volume: int | None = Field(default=None, ge=0, le=100, description="amplifier volume set before a play")

    @field_validator("link")
    @classmethod
    def _usable_link(cls, value: str) -> str:
        try:
            link_endpoint(value)
        except LinkUrlError as error:
            raise ValueError(str(error)) from error
        return value

    @model_validator(mode="after")
    def _metrics_once(self) -> ModbusIn:
        names = [r.metric for r in self.registers]
        if len(set(names)) != len(names):
            raise ValueError("registers: each metric appears once")
        return self


class SerialSignIn(BaseModel):
    """An LED sign on a serial line (docs/protocol.md §4): the line, and the sign's address on it."""

    model_config = ConfigDict(extra="forbid")

    port: str = Field(
        min_length=1, max_length=300, description="/dev/ttyUSB0, or socket://host:port for a serial server"
    )
    sign_address: str = Field(pattern=r"^[0-9A-F]{2}$", description="the sign's RS-485 address, 01-FF")
    baud: Literal[1200, 2400, 4800, 9600, 19200, 38400] = 9600
    framing: Literal["7E1", "8N1"] = "7E1"
    rows: int = Field(default=16, ge=7, le=64)

    @field_validator("sign_address")
    @classmethod
    def _own_address(cls, value: str) -> str:
        if value == "00":
            raise ValueError("00 is every sign at once; give the sign's own address")
        return value


class DeviceConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metrics: dict[Annotated[str, StringConstraints(pattern=METRIC_PATTERN)], MetricIn] = Field(
        default_factory=dict, max_length=200
    )
    modbus: ModbusIn | None = None
    coap: CoapIn | None = None
    serial: SerialSignIn | None = None


def _identifier(value: str | None) -> str | None:
    if value is not None and not _IDENTIFIER.fullmatch(value):
        raise ValueError("use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit")
    return value


def _address(value: str | None, info: ValidationInfo) -> str | None:
    """A CoAP sensor's address is where it answers (coap://host:port); any other, an identifier."""
    if value is not None and (info.data.get("transport") == "coap" or value.startswith("coap:")):
        try:
            parse_address(value)
        except ValueError as error:
            raise ValueError(f"a CoAP sensor's address is coap://host[:port] ({error})") from error
        return value
    return _identifier(value)


class CoapReadingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(pattern=r"^/[^?#\s]*$", max_length=200)
    format: Literal["json", "text"] = "json"
    metric: Annotated[str, StringConstraints(pattern=METRIC_PATTERN)] | None = None


class CoapIn(BaseModel):
    """The readings a CoAP sensor is observed on (docs/protocol.md §5); none: discovered."""

    model_config = ConfigDict(extra="forbid")

    readings: list[CoapReadingIn] = Field(default_factory=list, max_length=100)


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
    serial: str | None = Field(default=None, pattern=SERIAL.pattern, description="the maker's serial number")
    comm_loss: CommLossIn = Field(default_factory=CommLossIn)
    config: DeviceConfigIn = Field(default_factory=DeviceConfigIn)

    _check_id = field_validator("id")(_identifier)
    _check_address = field_validator("address")(_address)


class DevicePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    area: str | None = None
    name: str | None = Field(default=None, max_length=200)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    address: str | None = None
    enabled: bool | None = None
    comm_loss: CommLossIn | None = None
    config: DeviceConfigIn | None = None

    _check_address = field_validator("address")(_address)


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
    # From the device's latest state (docs/protocol.md §1.5); null until it said so.
    rssi_dbm: int | None
    firmware: str | None
    volume: int | None
    self_test: dict[str, Any] | None
    status: dict[str, Any]
    comm_loss: dict[str, Any]
    config: dict[str, Any]
    serial: str | None = None
    credentials_issued_at: str | None = None
    decommissioned_at: str | None = None


class ProvisionedDeviceOut(DeviceOut):
    bundle: dict[str, Any] | None = Field(
        description="the provisioning bundle of an MQTT device (docs/protocol.md §1.13); its password is "
        "shown here once and stored only hashed"
    )


def _typed(status: dict[str, Any], name: str, kind: type) -> Any:
    value = status.get(name)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _out(row: DeviceRow) -> DeviceOut:
    status = row.status or {}
    return DeviceOut(
        rssi_dbm=_typed(status, "rssi_dbm", int),
        firmware=_typed(status, "firmware", str),
        volume=_typed(status, "volume", int),
        self_test=_typed(status, "self_test", dict),
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
        comm_loss={"policy": row.comm_loss_policy, "after_s": row.comm_loss_after_s},
        config=row.config,
        serial=row.serial,
        credentials_issued_at=rfc3339(row.credentials_issued_at) if row.credentials_issued_at else None,
        decommissioned_at=rfc3339(row.decommissioned_at) if row.decommissioned_at else None,
    )


def _check_transport(kind: str, transport: str, config: DeviceConfigIn | None) -> None:
    modbus = config.modbus if config is not None else None
    if kind == "wired_zone":
        # The device is the receiver at the amplifier's input (MQTT); Modbus switches its zones.
        if transport != "mqtt":
            raise ApiError(422, "invalid", "transport", "a wired zone is played by its MQTT receiver")
        if modbus is None or not modbus.zones:
            raise ApiError(422, "invalid", "config.modbus.zones", "a wired zone needs its box and zones")
        if modbus.registers:
            raise ApiError(422, "invalid", "config.modbus.registers", "a wired zone polls no registers")
        return
    if transport == "modbus" and kind != "sensor":
        raise ApiError(422, "invalid", "transport", "over Modbus: sensors, or wired zones (kind wired_zone)")
    if transport == "modbus" and modbus is None:
        raise ApiError(422, "invalid", "config.modbus", "a Modbus sensor needs its link, unit and registers")
    if transport == "modbus" and modbus is not None and not modbus.registers:
        raise ApiError(422, "invalid", "config.modbus.registers", "name at least one register to poll")
    if modbus is not None and modbus.zones:
        raise ApiError(422, "invalid", "config.modbus.zones", "only a wired_zone device switches zones")
    if transport != "modbus" and modbus is not None:
        raise ApiError(422, "invalid", "config.modbus", f"a {transport} {kind} has no Modbus settings")
    serial = config.serial if config is not None else None
    if transport == "serial" and kind != "led_screen":
        raise ApiError(422, "invalid", "transport", "over a serial line: LED signs (kind led_screen)")
    if transport == "serial" and serial is None:
        raise ApiError(422, "invalid", "config.serial", "a serial sign needs its port and sign_address")
    if transport != "serial" and serial is not None:
        raise ApiError(422, "invalid", "config.serial", f"a {transport} {kind} has no serial settings")
    if transport == "coap" and kind != "sensor":
        raise ApiError(422, "invalid", "transport", "over CoAP: sensors")
    if transport != "coap" and config is not None and config.coap is not None:
        raise ApiError(422, "invalid", "config.coap", f"a {transport} {kind} has no CoAP settings")


def _visible_areas(runtime: Any, principal: Principal) -> frozenset[str] | None:
    """The areas whose devices the key may see and manage (its ward or assigned wards); None: all."""
    wards = principal.device_wards()
    if wards is None:
        return None
    tree = runtime.area_tree()
    return frozenset(code for ward in wards if ward in tree for code in tree.subtree_codes(ward))


def _check_area(runtime: Any, principal: Principal, code: str, field: str) -> None:
    tree = runtime.area_tree()
    if code not in tree:
        raise ApiError(422, "invalid", field, f"unknown area {code!r}")
    wards = principal.device_wards()
    if wards is not None and not any(ward in tree and tree.is_within(code, ward) for ward in wards):
        named = ", ".join(repr(ward) for ward in sorted(wards))
        noun = "ward" if len(wards) == 1 else "wards"
        raise ApiError(403, "forbidden", field, f"area {code!r} is outside {noun} {named} of this key")


def _get_visible(session: Session, runtime: Any, principal: Principal, device_id: str) -> DeviceRow:
    row = session.get(DeviceRow, device_id)
    visible = _visible_areas(runtime, principal)
    if row is None or (visible is not None and row.area_code not in visible):
        raise ApiError(404, "not_found", "id", f"unknown device {device_id!r}")
    return row


# Commands to these transports go through one router that tells them apart by address alone.
_ROUTED_TOGETHER = ("mqtt", "serial")


def _refuse_address_clash(session: Session, transport: str, address: str) -> None:
    transports = _ROUTED_TOGETHER if transport in _ROUTED_TOGETHER else (transport,)
    clash = session.exec(
        select(DeviceRow).where(col(DeviceRow.transport).in_(transports), DeviceRow.address == address)
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


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ProvisionedDeviceOut)
async def create_device(
    body: DeviceIn, runtime: RuntimeDep, principal: DeviceManager
) -> ProvisionedDeviceOut:
    """Register a device. An MQTT device gets its own broker account at once (username = its address)
    and its provisioning bundle in the answer, the only time its password is shown."""
    provisioning = runtime.provisioning

    def create() -> ProvisionedDeviceOut:
        _check_area(runtime, principal, body.area, "area")
        _check_transport(body.kind, body.transport, body.config)
        device_id = body.id or f"{_KIND_PREFIX[body.kind]}-{secrets.token_hex(4)}"
        if body.transport == "coap" and body.address is None:
            raise ApiError(
                422, "invalid", "address", "a CoAP sensor's address is where it answers: coap://host:port"
            )
        address = body.address or device_id
        if body.transport == "mqtt":
            provisioning.check_address(address, "address" if body.address else "id")
        with Session(runtime.engine) as session:
            if session.get(DeviceRow, device_id) is not None:
                raise ApiError(409, "conflict", "id", f"device {device_id!r} already exists")
            _refuse_address_clash(session, body.transport, address)
            if (
                body.serial is not None
                and session.exec(select(DeviceRow.id).where(DeviceRow.serial == body.serial)).first()
            ):
                raise ApiError(409, "conflict", "serial", f"serial {body.serial!r} is already registered")
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
                serial=body.serial,
                comm_loss_policy=body.comm_loss.policy,
                comm_loss_after_s=body.comm_loss.after_s,
                config=body.config.model_dump(exclude_none=True),
                created_at=datetime.now(UTC),
            )
            password = provisioning.issue_credentials(row) if body.transport == "mqtt" else None
            session.add(row)
            session.commit()
            session.refresh(row)
            bundle = provisioning.bundle(row, password) if password is not None else None
            return ProvisionedDeviceOut(**_out(row).model_dump(), bundle=bundle)

    device = await asyncio.to_thread(create)
    if device.bundle is not None:
        await runtime.broker_access.sync()
    runtime.device_registered(
        device.transport,
        device.address,
        device.id,
        device.config,
        enabled=device.enabled,
        kind=device.kind,
        created=True,
    )
    runtime.device_programmes_changed()
    return device


@router.get("/{device_id}", response_model=DeviceOut)
async def get_device(device_id: str, runtime: RuntimeDep, principal: Reader) -> DeviceOut:
    def get() -> DeviceOut:
        with Session(runtime.engine) as session:
            return _out(_get_visible(session, runtime, principal, device_id))

    return await asyncio.to_thread(get)


@router.get("/{device_id}/availability")
async def get_device_availability(
    device_id: str,
    runtime: RuntimeDep,
    principal: Reader,
    start: Annotated[
        AwareDatetime | None, Query(alias="from", description="RFC 3339; default: to − 7 days")
    ] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to", description="RFC 3339; default: now")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    """Every online/offline transition of the device in [from, to), oldest first, each dated when it
    happened (`at`: the device's state time, or the instant its timeout ran out) and when the controller
    noticed it (`detected_at`), with the reason: `state`, `will` (Last Will), `shutdown`, `timeout`."""
    until = end or runtime.clock.now()
    since = start or until - timedelta(days=7)
    if since >= until:
        raise ApiError(422, "invalid", "from", "must be before to")

    def get() -> dict[str, Any]:
        with Session(runtime.engine) as session:
            row = _get_visible(session, runtime, principal, device_id)
        return {
            "device_id": row.id,
            "online": row.online,
            "last_seen": rfc3339(row.last_seen) if row.last_seen else None,
            "from": rfc3339(since),
            "to": rfc3339(until),
            "transitions": runtime.availability.history(device_id, since, until, limit),
        }

    return await asyncio.to_thread(get)


@router.get("/{device_id}/programme")
async def get_device_programme(device_id: str, runtime: RuntimeDep, principal: Reader) -> dict[str, Any]:
    """The programme the speaker keeps for when its link drops (docs/protocol.md §1.10), as built now,
    and whether the broker holds exactly that (`published`)."""

    def get() -> DeviceRow:
        with Session(runtime.engine) as session:
            return _get_visible(session, runtime, principal, device_id)

    row = await asyncio.to_thread(get)
    programmes = runtime.device_programmes
    if programmes is None:
        raise ApiError(503, "unavailable", "id", "the controller is still starting")
    built = await asyncio.to_thread(programmes.build, runtime.clock.now(), only_device=device_id)
    if not built:
        detail = f"device {device_id!r} is not an MQTT speaker: it keeps no programme"
        raise ApiError(422, "invalid", "id", detail)
    (programme,) = built
    return {
        "device_id": row.id,
        "document": programme.document,
        "published": programmes.published_digest(programme.address) == programme.digest,
    }


@router.patch("/{device_id}", response_model=DeviceOut)
async def patch_device(
    device_id: str, body: DevicePatch, runtime: RuntimeDep, principal: DeviceManager
) -> DeviceOut:
    def patch() -> DeviceOut:
        changes = body.model_dump(exclude_unset=True)
        with Session(runtime.engine) as session:
            row = _get_visible(session, runtime, principal, device_id)
            if row.decommissioned_at is not None:
                raise ApiError(
                    409, "conflict", "id", f"device {device_id!r} is decommissioned; its record is history"
                )
            if "area" in changes:
                _check_area(runtime, principal, changes["area"], "area")
                row.area_code = changes.pop("area")
            if "address" in changes and changes["address"] != row.address:
                _refuse_address_clash(session, row.transport, changes["address"])
                if row.transport == "mqtt":
                    # The broker username follows the address (the password stays the same).
                    runtime.provisioning.check_address(changes["address"])
            if "comm_loss" in changes:
                comm_loss = changes.pop("comm_loss")
                if comm_loss is None:
                    raise ApiError(422, "invalid", "comm_loss", "give a policy, or leave comm_loss out")
                row.comm_loss_policy = comm_loss["policy"]
                row.comm_loss_after_s = comm_loss.get("after_s")
            if "config" in changes:
                config = changes.pop("config")
                if config is None:
                    raise ApiError(422, "invalid", "config", "give a configuration, or leave config out")
                _check_transport(row.kind, row.transport, body.config)
                row.config = body.config.model_dump(exclude_none=True) if body.config else {}
            for key, value in changes.items():
                setattr(row, key, value)
            session.add(row)
            session.commit()
            session.refresh(row)
            return _out(row)

    device = await asyncio.to_thread(patch)
    if device.transport == "mqtt" and "address" in body.model_fields_set:
        await runtime.broker_access.sync()
    runtime.device_registered(
        device.transport,
        device.address,
        device.id,
        device.config,
        enabled=device.enabled,
        kind=device.kind,
    )
    runtime.device_programmes_changed()
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
            if session.exec(select(RuleRow.id).where(RuleRow.device_id == device_id)).first():
                raise ApiError(409, "conflict", "id", "threshold rules watch this device; delete them first")
            if session.exec(
                select(OperationResultRow.command_id).where(OperationResultRow.device_id == device_id)
            ).first():
                raise ApiError(
                    409,
                    "conflict",
                    "id",
                    'the device has an operations log; disable it with PATCH {"enabled": false} to keep it',
                )
            for transition in session.exec(
                select(DeviceAvailabilityRow).where(DeviceAvailabilityRow.device_id == device_id)
            ).all():
                session.delete(transition)
            session.delete(row)
            session.commit()

    await asyncio.to_thread(delete)
    await runtime.broker_access.sync()
    runtime.device_removed(device_id)
    runtime.device_programmes_changed()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
