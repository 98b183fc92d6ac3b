from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, status
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select
from starlette.datastructures import UploadFile

from controller.api.deps import MediaUploader, Reader, RuntimeDep
from controller.api.errors import ApiError
from controller.services.errors import ServiceError
from controller.services.media import MediaRejected, StoredMedia, record_media
from controller.services.tts import SpeechSynthesizer, speech_media_id
from controller.store.models import MediaRow

router = APIRouter(tags=["media"])

_CHUNK = 64 * 1024
# Multipart framing around the file; a body larger than the limit plus this cannot hold a valid file.
_MULTIPART_OVERHEAD = 64 * 1024


class MediaOut(BaseModel):
    id: str
    sha256: str
    duration_s: float
    content_type: str
    size_bytes: int
    filename: str | None


def _out(row: MediaRow) -> MediaOut:
    return MediaOut(
        id=row.id,
        sha256=row.sha256,
        duration_s=row.duration_s,
        content_type=row.content_type,
        size_bytes=row.size_bytes,
        filename=row.filename,
    )


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_CHUNK):
        yield chunk


@router.post(
    "/api/v1/media",
    status_code=status.HTTP_201_CREATED,
    response_model=MediaOut,
    responses={200: {"description": "the same audio was uploaded before"}},
)
async def upload_media(request: Request, runtime: RuntimeDep, _principal: MediaUploader) -> JSONResponse:
    """Upload WAV, MP3 or OGG audio as multipart field `file`; it is decoded to check it and time it."""
    limit = runtime.media_store.max_bytes
    declared_length = request.headers.get("content-length")
    if (
        declared_length is not None
        and declared_length.isdigit()
        and int(declared_length) > limit + _MULTIPART_OVERHEAD
    ):
        raise ApiError(
            413, "too_large", "file", f"upload is {int(declared_length)} bytes; the limit is {limit} bytes"
        )
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(
            415, "unsupported_media_type", "file", "send the audio as multipart/form-data field 'file'"
        )
    form = await request.form(max_files=1, max_fields=5)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid", "file", "multipart field 'file' is missing")
        try:
            stored = await runtime.media_store.ingest(
                _chunks(upload), filename=upload.filename, declared_type=upload.content_type
            )
        except MediaRejected as error:
            if "limit" in error.detail:
                raise ApiError(413, "too_large", error.field, error.detail) from error
            raise ApiError(422, "invalid", error.field, error.detail) from error
    finally:
        await form.close()
    row, created = await asyncio.to_thread(record_media, runtime.engine, stored)
    return JSONResponse(_out(row).model_dump(), status_code=201 if created else 200)


@router.get("/api/v1/media", response_model=list[MediaOut])
async def list_media(runtime: RuntimeDep, _principal: Reader) -> list[MediaOut]:
    """The media library, newest first (uploads and the speech made for schedules)."""

    def query() -> list[MediaRow]:
        with Session(runtime.engine) as session:
            return list(session.exec(select(MediaRow).order_by(col(MediaRow.created_at).desc())).all())

    return [_out(row) for row in await asyncio.to_thread(query)]


@router.get("/api/v1/media/{media_id}", response_model=MediaOut)
async def get_media(media_id: str, runtime: RuntimeDep, _principal: Reader) -> MediaOut:
    def get() -> MediaRow | None:
        with Session(runtime.engine) as session:
            return session.get(MediaRow, media_id)

    row = await asyncio.to_thread(get)
    if row is None:
        raise ApiError(404, "not_found", "id", f"unknown media {media_id!r}")
    return _out(row)


@router.get("/media/{sha256}", tags=["devices"])
async def serve_media(sha256: str, runtime: RuntimeDep) -> FileResponse:
    """The audio itself, for devices (docs/protocol.md §1.8); supports Range requests."""

    def lookup() -> MediaRow | None:
        with Session(runtime.engine) as session:
            return session.exec(select(MediaRow).where(MediaRow.sha256 == sha256)).first()

    row = await asyncio.to_thread(lookup)
    if row is None or not runtime.media_store.exists(sha256):
        raise ApiError(404, "not_found", "sha256", f"no media with SHA-256 {sha256}")
    return FileResponse(
        runtime.media_store.path_for(sha256),
        media_type=row.content_type,
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


class SpeechPreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=100_000, description="the words to speak, as a schedule's `content.tts`")


@router.post(
    "/api/v1/tts/preview",
    response_class=FileResponse,
    responses={200: {"content": {"audio/wav": {}}, "description": "the spoken text (WAV)"}},
)
async def preview_speech(
    body: SpeechPreviewIn, runtime: RuntimeDep, _principal: MediaUploader
) -> FileResponse:
    """The Vietnamese speech of `text`, as a schedule with `content.tts` would play it, to listen to
    before saving. The audio is kept as media (header `X-Media-Id`, duration in `X-Duration-S`), so
    that the schedule made from the same text reuses it instead of speaking it again."""
    recorded: list[StoredMedia] = []

    def record(stored: StoredMedia) -> str:
        recorded.append(stored)
        row, _created = record_media(runtime.engine, stored)
        return row.id

    try:
        media_id = await speech_media_id(
            body.text,
            synthesizer=SpeechSynthesizer(runtime.settings.tts),
            store=runtime.media_store,
            record=record,
        )
    except ServiceError as error:  # named after this request's field, not a schedule's content.tts
        name = "unavailable" if error.status == status.HTTP_503_SERVICE_UNAVAILABLE else "invalid"
        raise ApiError(error.status, name, "text", error.detail) from error
    stored = recorded[-1]
    return FileResponse(
        runtime.media_store.path_for(stored.sha256),
        media_type="audio/wav",
        headers={
            "X-Media-Id": media_id,
            "X-Duration-S": f"{stored.duration_s:.3f}",
            "Cache-Control": "no-store",
        },
    )
