from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel, ConfigDict
from sqlmodel import Session

from controller.api.deps import AreaManager, Reader, RuntimeDep
from controller.api.errors import ApiError
from controller.domain.area_import import ImportFormat, parse_areas
from controller.domain.areas import Area, AreaTree
from controller.services.targets import load_area_tree
from controller.store.models import AreaRow

router = APIRouter(prefix="/api/v1/areas", tags=["areas"])

_YAML_TYPES = {"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"}
_CSV_TYPES = {"text/csv", "application/csv"}


class AreaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str
    name: str
    kind: str
    parent: str | None = None
    lat: float | None = None
    lon: float | None = None
    admin_code: str | None = None


class AreaOut(BaseModel):
    code: str
    name: str
    kind: str
    parent: str | None
    lat: float | None
    lon: float | None
    admin_code: str | None


class ImportResult(BaseModel):
    created: int
    updated: int
    unchanged: int


def _out(area: Area) -> AreaOut:
    return AreaOut(
        code=area.code,
        name=area.name,
        kind=area.kind,
        parent=area.parent_code,
        lat=area.lat,
        lon=area.lon,
        admin_code=area.admin_code,
    )


def _save(runtime: Any, areas: list[Area], *, upsert: bool) -> ImportResult:
    """Validate the import against the whole stored tree, then write it in one transaction."""
    with Session(runtime.engine) as session:
        tree = load_area_tree(session)
        merged: AreaTree = tree.with_areas(areas, upsert=upsert)
        created = updated = unchanged = 0
        # Parents first, so that foreign keys hold at every insert.
        order = {area.code: index for index, area in enumerate(merged.areas())}
        depth = {area.code: len(merged.ancestors(area.code)) for area in areas}
        for area in sorted(areas, key=lambda a: (depth[a.code], order[a.code])):
            existing = session.get(AreaRow, area.code)
            values: dict[str, Any] = {
                "name": area.name,
                "kind": area.kind,
                "parent_code": area.parent_code,
                "lat": area.lat,
                "lon": area.lon,
                "admin_code": area.admin_code,
            }
            if existing is None:
                session.add(AreaRow(code=area.code, **values))
                created += 1
            elif tree.find(area.code) == area:
                unchanged += 1
            else:
                for key, value in values.items():
                    setattr(existing, key, value)
                updated += 1
            session.flush()
        session.commit()
    return ImportResult(created=created, updated=updated, unchanged=unchanged)


@router.get("", response_model=list[AreaOut])
async def list_areas(runtime: RuntimeDep, _principal: Reader) -> list[AreaOut]:
    tree = await asyncio.to_thread(runtime.area_tree)
    return [_out(area) for area in tree.areas()]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AreaOut)
async def create_area(body: AreaIn, runtime: RuntimeDep, _principal: AreaManager) -> AreaOut:
    area = Area(
        code=body.code,
        name=body.name,
        kind=body.kind,
        parent_code=body.parent,
        lat=body.lat,
        lon=body.lon,
        admin_code=body.admin_code,
    )
    tree = await asyncio.to_thread(runtime.area_tree)
    if area.code in tree:
        raise ApiError(409, "conflict", "code", f"area {area.code!r} already exists")
    await asyncio.to_thread(_save, runtime, [area], upsert=False)
    runtime.invalidate_areas()
    return _out(area)


@router.post("/import", response_model=ImportResult)
async def import_areas(
    request: Request,
    runtime: RuntimeDep,
    _principal: AreaManager,
    upsert: Annotated[bool, Query(description="update areas whose code exists")] = False,
    fmt: Annotated[Literal["yaml", "csv"] | None, Query(alias="format")] = None,
) -> ImportResult:
    """Import a YAML tree or a CSV (`code,name,kind,parent,lat,lon,admin_code`), all or nothing.

    Send the file as the raw body (Content-Type text/csv or application/yaml) or as multipart field `file`.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    guessed: ImportFormat | None
    if content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "invalid", "file", "multipart field 'file' is missing")
        data = await upload.read()
        filename = (upload.filename or "").lower()
        guessed = (
            "csv" if filename.endswith(".csv") else "yaml" if filename.endswith((".yaml", ".yml")) else None
        )
        await form.close()
    else:
        data = await request.body()
        guessed = "csv" if content_type in _CSV_TYPES else "yaml" if content_type in _YAML_TYPES else None
    chosen = fmt or guessed
    if chosen is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            "format",
            "send text/csv or application/yaml, a .csv/.yaml file, or ?format=csv|yaml",
        )
    areas = parse_areas(data, chosen)
    result = await asyncio.to_thread(_save, runtime, areas, upsert=upsert)
    runtime.invalidate_areas()
    return result
