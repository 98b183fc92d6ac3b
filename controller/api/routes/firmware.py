"""Firmware images and staged rollouts (issue 6; docs/protocol.md §1.16)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from controller.api.deps import FirmwareManager, Reader, RuntimeDep
from controller.api.errors import ApiError
from controller.services.firmware import ImageUpload, image_out
from controller.services.rollouts import RolloutRequest

router = APIRouter(tags=["firmware"])

_CHUNK = 256 * 1024
_MULTIPART_OVERHEAD = 64 * 1024


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_CHUNK):
        yield chunk


def _text_field(form: Any, name: str, *, required: bool = True) -> str | None:
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ApiError(422, "invalid", name, f"multipart field {name!r} is missing")
        return None
    if not isinstance(value, str):
        raise ApiError(422, "invalid", name, f"multipart field {name!r} must be text, not a file")
    return value.strip()


@router.post("/api/v1/firmware", status_code=status.HTTP_201_CREATED)
async def upload_image(request: Request, runtime: RuntimeDep, principal: FirmwareManager) -> dict[str, Any]:
    """Upload an image as multipart: `file`, `kind`, `version`, `signature` (base64 Ed25519 over the
    image's SHA-256 digest) and optionally `sha256` (hex; checked against the bytes)."""
    limit = runtime.firmware_images.max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + _MULTIPART_OVERHEAD:
        raise ApiError(
            413, "too_large", "file", f"upload is {int(declared)} bytes; the limit is {limit} bytes"
        )
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "file", "send the image as multipart/form-data")
    form = await request.form(max_files=1, max_fields=10)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid", "file", "multipart field 'file' is missing")
        sha256 = _text_field(form, "sha256", required=False)
        metadata = ImageUpload(
            kind=_text_field(form, "kind") or "",
            version=_text_field(form, "version") or "",
            signature=_text_field(form, "signature", required=False) or "",
            sha256=sha256.lower() if sha256 is not None else None,
            filename=upload.filename,
            uploaded_by=principal.key_id,
        )
        row = await runtime.firmware_images.ingest(
            _chunks(upload), metadata, runtime.settings.firmware.public_keys()
        )
    finally:
        await form.close()
    await asyncio.to_thread(
        runtime.audit.record,
        principal,
        "firmware.upload",
        subject=row.id,
        detail={"kind": row.kind, "version": row.version, "sha256": row.sha256, "key_id": row.key_id},
    )
    return image_out(row)


@router.get("/api/v1/firmware")
async def list_images(runtime: RuntimeDep, _principal: Reader) -> list[dict[str, Any]]:
    return [image_out(row) for row in await asyncio.to_thread(runtime.firmware_images.list_images)]


@router.get("/api/v1/firmware/{image_id}")
async def get_image(image_id: str, runtime: RuntimeDep, _principal: Reader) -> dict[str, Any]:
    row = await asyncio.to_thread(runtime.firmware_images.get, image_id)
    if row is None:
        raise ApiError(404, "not_found", "id", f"unknown firmware image {image_id!r}")
    return image_out(row)


@router.get("/firmware/rollouts/{rollout_id}/image", tags=["devices"])
async def download_image(
    rollout_id: str, runtime: RuntimeDep, token: Annotated[str, Query(max_length=100)] = ""
) -> FileResponse:
    """The image for the devices of a rollout (docs/protocol.md §1.16): the rollout's token in the URL
    is the credential; Range requests let a device resume."""
    path, image = await asyncio.to_thread(runtime.rollouts.download, rollout_id, token)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{image.kind}-{image.version}.bin",
        headers={"Cache-Control": "private, no-store", "X-Firmware-SHA256": image.sha256},
    )


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    image_id: str
    kind: str | None = Field(default=None, description="default: the image's kind")
    area: str | None = Field(default=None, description="only devices in this area's subtree")
    from_version: str | None = Field(default=None, description="only devices running this firmware now")
    first_group: int | None = Field(default=None, ge=1, description="the canary group's size in devices")
    first_group_percent: float | None = Field(default=None, gt=0, le=100)
    groups: int = Field(default=1, ge=1, le=1000, description="how many groups, the canary included")
    success_threshold: float = Field(default=1.0, gt=0, le=1)
    error_threshold: float = Field(default=0.1, gt=0, le=1)
    maintenance_window: str | None = Field(
        default=None,
        description="HH:MM-HH:MM local time; absent: firmware.maintenance_window; null: any time",
    )
    start_timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    download_timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    install_timeout_s: float | None = Field(default=None, gt=0, le=86_400)


@router.post("/api/v1/rollouts", status_code=status.HTTP_201_CREATED)
async def create_rollout(body: RolloutIn, runtime: RuntimeDep, principal: FirmwareManager) -> dict[str, Any]:
    first_group = body.first_group
    if first_group is None and body.first_group_percent is None:
        first_group = 1
    request = RolloutRequest(
        name=body.name,
        image_id=body.image_id,
        kind=body.kind,
        area=body.area,
        from_version=body.from_version,
        first_group=first_group,
        first_group_percent=body.first_group_percent,
        groups=body.groups,
        success_threshold=body.success_threshold,
        error_threshold=body.error_threshold,
        maintenance_window=body.maintenance_window,
        window_given="maintenance_window" in body.model_fields_set,
        start_timeout_s=body.start_timeout_s,
        download_timeout_s=body.download_timeout_s,
        install_timeout_s=body.install_timeout_s,
    )
    return await runtime.rollouts.create(request, principal)


@router.get("/api/v1/rollouts")
async def list_rollouts(runtime: RuntimeDep, _principal: Reader) -> list[dict[str, Any]]:
    return await asyncio.to_thread(runtime.rollouts.list_rollouts)


@router.get("/api/v1/rollouts/{rollout_id}")
async def show_rollout(rollout_id: str, runtime: RuntimeDep, _principal: Reader) -> dict[str, Any]:
    """The rollout with each group's counts and ratios and each device's state and history."""
    return await asyncio.to_thread(runtime.rollouts.describe, rollout_id)


@router.post("/api/v1/rollouts/{rollout_id}/pause")
async def pause_rollout(rollout_id: str, runtime: RuntimeDep, principal: FirmwareManager) -> dict[str, Any]:
    return await runtime.rollouts.pause(rollout_id, principal)


@router.post("/api/v1/rollouts/{rollout_id}/resume")
async def resume_rollout(rollout_id: str, runtime: RuntimeDep, principal: FirmwareManager) -> dict[str, Any]:
    """Go on from a pause; the groups that stopped the rollout are accepted as they are."""
    return await runtime.rollouts.resume(rollout_id, principal)


@router.post("/api/v1/rollouts/{rollout_id}/abort")
async def abort_rollout(rollout_id: str, runtime: RuntimeDep, principal: FirmwareManager) -> dict[str, Any]:
    """No device starts from now on; updates already running may finish."""
    return await runtime.rollouts.abort(rollout_id, principal)
