"""Provisioning (issue 6): device CSV imports, credentials and bundles (JSON or QR PNG), decommissioning,
factory secrets, zero-touch claims, and API keys."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from controller.api.deps import KeyManager, Provisioner, RuntimeDep
from controller.api.errors import ApiError
from controller.api.routes.devices import DeviceOut, _out
from controller.domain.clock import rfc3339
from controller.domain.provisioning import bundle_qr_png
from controller.services.auth import ApiKeyError, create_api_key, list_api_keys, revoke_api_key
from controller.store.models import ApiKeyRow

router = APIRouter(prefix="/api/v1", tags=["provisioning"])

_CSV_BODY = "the CSV file as the raw body (Content-Type text/csv)"


class ImportOut(BaseModel):
    created: int
    rejected: list[dict[str, Any]] = Field(description="each refused row: {row, field, detail}")
    devices: list[DeviceOut]
    bundles: list[dict[str, Any]] = Field(description="one provisioning bundle per created device")


class CredentialsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: list[str] = Field(min_length=1, max_length=100_000)


class ClaimOut(BaseModel):
    id: str
    serial: str
    kind: str
    firmware: str | None
    requested_at: str
    expires_at: str


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    area: str
    device_id: str | None = Field(default=None, description="default: {kind prefix}-{serial}")
    name: str | None = Field(default=None, max_length=200)


class ApprovedOut(BaseModel):
    device: DeviceOut
    answered: bool = Field(description="whether the sealed bundle was handed to the broker for the device")


class SecretsOut(BaseModel):
    registered: int
    rejected: list[dict[str, Any]]


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    role: Literal["admin", "operator", "ward_staff", "technician", "ioc"]
    ward: str | None = Field(default=None, description="a ward_staff key's ward")
    wards: list[str] = Field(default_factory=list, description="a technician's assigned wards")


class ApiKeyOut(BaseModel):
    id: str
    name: str
    role: str
    ward: str | None
    wards: list[str]
    created_at: str
    revoked_at: str | None
    token: str | None = Field(default=None, description="shown once, when the key is created")


async def _csv_body(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in {"text/csv", "application/csv", "text/plain", ""}:
        raise ApiError(415, "unsupported_media_type", "Content-Type", f"send {_CSV_BODY}")
    data = await request.body()
    if not data.strip():
        raise ApiError(422, "invalid", "file", "the CSV is empty")
    return data


@router.post("/devices/import", response_model=ImportOut, tags=["devices"])
async def import_devices(
    request: Request,
    runtime: RuntimeDep,
    principal: Provisioner,
    atomic: Annotated[bool, Query(description="all rows or none: any refused row imports nothing")] = False,
) -> ImportOut:
    """Register MQTT devices from a CSV (`kind,area[,id,address,serial,name,lat,lon]`), checked row by row.

    Valid rows are created, each with its broker account, and the broker reloads once for the whole
    file; refused rows are listed with their row number and column. With `atomic=true` one refused row
    refuses the file (422, listing every refused row) and nothing is stored.
    """
    data = await _csv_body(request)
    report = await asyncio.to_thread(
        runtime.provisioning.import_devices, data, principal, runtime.area_tree(), atomic=atomic
    )
    if report.created:
        await runtime.broker_access.sync()
        for row in report.created:
            runtime.device_registered(
                row.transport, row.address, row.id, row.config, kind=row.kind, created=True
            )
        runtime.device_programmes_changed()
    return ImportOut(
        created=len(report.created),
        rejected=[problem.as_dict() for problem in report.rejected],
        devices=[_out(row) for row in report.created],
        bundles=report.bundles,
    )


@router.post("/devices/credentials", tags=["devices"])
async def reissue_many(
    body: CredentialsIn, runtime: RuntimeDep, principal: Provisioner
) -> list[dict[str, Any]]:
    """New broker passwords for several devices at once (one broker reload); their old passwords are
    refused from the answer on. Returns one bundle per device, in order."""
    bundles = await asyncio.to_thread(
        runtime.provisioning.reissue, body.devices, principal, runtime.area_tree()
    )
    await runtime.broker_access.sync()
    return bundles


@router.post(
    "/devices/{device_id}/credentials",
    tags=["devices"],
    responses={200: {"content": {"application/json": {}, "image/png": {}}}},
)
async def reissue(
    device_id: str,
    runtime: RuntimeDep,
    principal: Provisioner,
    fmt: Annotated[
        Literal["json", "png"], Query(alias="format", description="png: the bundle as a QR code")
    ] = "json",
) -> Any:
    """Rotate the device's broker password and return its new bundle (JSON, or a QR code PNG); the old
    password is refused from the answer on, and a connection made with it is closed."""
    (bundle,) = await asyncio.to_thread(
        runtime.provisioning.reissue, [device_id], principal, runtime.area_tree()
    )
    await runtime.broker_access.sync()
    if fmt == "png":
        return Response(await asyncio.to_thread(bundle_qr_png, bundle), media_type="image/png")
    return bundle


class BundleQrIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: dict[str, Any] = Field(description="a provisioning bundle this controller just returned")


@router.post(
    "/provisioning/qr",
    tags=["devices"],
    responses={200: {"content": {"image/png": {}}}},
    response_class=Response,
)
async def bundle_qr(body: BundleQrIn, _principal: Provisioner) -> Response:
    """The QR code (PNG) of a bundle the caller already holds (the answer of a registration, import or
    re-issue), so that a console can show it without rotating the password a second time. Nothing is
    stored or looked up: the picture holds exactly the JSON sent."""
    try:
        png = await asyncio.to_thread(bundle_qr_png, body.bundle)
    except ValueError as error:  # segno: too much data for one QR code
        raise ApiError(422, "invalid", "bundle", f"does not fit in one QR code ({error})") from error
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/devices/{device_id}/decommission", response_model=DeviceOut, tags=["devices"])
async def decommission(device_id: str, runtime: RuntimeDep, principal: Provisioner) -> DeviceOut:
    """Take a device out of service: its broker account is removed (the broker refuses it, and closes
    its open connection, before this answers), it is disabled, and its history is kept."""
    row = await asyncio.to_thread(
        runtime.provisioning.decommission, device_id, principal, runtime.area_tree()
    )
    await runtime.broker_access.sync()
    runtime.device_registered(row.transport, row.address, row.id, row.config, enabled=False, kind=row.kind)
    runtime.device_programmes_changed()
    return _out(row)


@router.post("/factory-secrets", response_model=SecretsOut)
async def register_factory_secrets(
    request: Request,
    runtime: RuntimeDep,
    _principal: KeyManager,
    atomic: Annotated[bool, Query(description="all rows or none")] = False,
) -> SecretsOut:
    """Register devices' factory secrets (CSV `serial,factory_secret`, the secret in hex) so that they can
    claim themselves (docs/protocol.md §1.13). Only keys derived from each secret are stored."""
    data = await _csv_body(request)
    registered, problems = await asyncio.to_thread(
        runtime.provisioning.register_factory_secrets, data, atomic=atomic
    )
    return SecretsOut(registered=registered, rejected=[p.as_dict() for p in problems])


@router.get("/claims", response_model=list[ClaimOut])
async def pending_claims(runtime: RuntimeDep, _principal: Provisioner) -> list[ClaimOut]:
    """Claim requests waiting for a technician, within their claim window."""
    rows = await asyncio.to_thread(runtime.provisioning.pending_claims)
    return [
        ClaimOut(
            id=row.id,
            serial=row.serial,
            kind=row.kind,
            firmware=row.firmware,
            requested_at=rfc3339(row.requested_at),
            expires_at=rfc3339(row.expires_at),
        )
        for row in rows
    ]


@router.post("/claims/{claim_id}/approve", response_model=ApprovedOut)
async def approve_claim(
    claim_id: str, body: ApproveIn, runtime: RuntimeDep, principal: Provisioner
) -> ApprovedOut:
    """Approve a pending claim into an area: the device is registered with its own broker account, and
    its bundle goes to it encrypted with a key derived from its factory secret."""
    approved = await asyncio.to_thread(
        lambda: runtime.provisioning.approve_claim(
            claim_id,
            area=body.area,
            device_id=body.device_id,
            name=body.name,
            principal=principal,
            tree=runtime.area_tree(),
        )
    )
    await runtime.broker_access.sync()  # the account exists before the device learns its password
    row = approved.device
    runtime.device_registered(row.transport, row.address, row.id, row.config, kind=row.kind, created=True)
    runtime.device_programmes_changed()
    answered = runtime.claims is not None and await runtime.claims.publish(approved.serial, approved.response)
    return ApprovedOut(device=_out(row), answered=answered)


def _key_out(row: ApiKeyRow, token: str | None = None) -> ApiKeyOut:
    return ApiKeyOut(
        id=row.id,
        name=row.name,
        role=row.role,
        ward=row.ward_code,
        wards=list(row.wards or []),
        created_at=rfc3339(row.created_at),
        revoked_at=rfc3339(row.revoked_at) if row.revoked_at else None,
        token=token,
    )


@router.post("/apikeys", response_model=ApiKeyOut, status_code=201)
async def create_key(body: ApiKeyIn, runtime: RuntimeDep, _principal: KeyManager) -> ApiKeyOut:
    try:
        row, token = await asyncio.to_thread(
            create_api_key,
            runtime.engine,
            name=body.name,
            role=body.role,
            ward_code=body.ward,
            wards=body.wards,
        )
    except ApiKeyError as error:
        raise ApiError(422, "invalid", error.field, error.detail) from error
    return _key_out(row, token)


@router.get("/apikeys", response_model=list[ApiKeyOut])
async def list_keys(runtime: RuntimeDep, _principal: KeyManager) -> list[ApiKeyOut]:
    return [_key_out(row) for row in await asyncio.to_thread(list_api_keys, runtime.engine)]


@router.post("/apikeys/{key_id}/revoke", response_model=ApiKeyOut)
async def revoke_key(key_id: str, runtime: RuntimeDep, _principal: KeyManager) -> ApiKeyOut:
    try:
        row = await asyncio.to_thread(revoke_api_key, runtime.engine, key_id, runtime.clock.now())
    except ApiKeyError as error:
        raise ApiError(404, "not_found", error.field, error.detail) from error
    return _key_out(row)
