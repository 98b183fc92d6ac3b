"""Proof of play as JSON or CSV: play counts per device and ward, and the ward's broadcast log.

The definitions of every count and column are in `controller/services/reports.py`.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Header, Query, Response
from pydantic import AwareDatetime

from controller.api.deps import Reader, RuntimeDep
from controller.services.reports import ReportService, log_csv, plays_csv

router = APIRouter(prefix="/api/v1/reports", tags=["reports"])

AreaParam = Annotated[
    str, Query(min_length=1, max_length=64, description="area code; the report covers its whole subtree")
]
FromParam = Annotated[
    AwareDatetime,
    Query(alias="from", description="inclusive, ISO 8601 with an offset, e.g. 2026-12-01T00:00:00+07:00"),
]
ToParam = Annotated[AwareDatetime, Query(alias="to", description="exclusive; at most 366 days after `from`")]
FormatParam = Annotated[
    Literal["json", "csv"] | None,
    Query(alias="format", description="overrides the Accept header; CSV is UTF-8 with a byte order mark"),
]
AcceptHeader = Annotated[str | None, Header()]
_CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": "JSON, or CSV when asked"}
}


def _wants_csv(fmt: str | None, accept: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    return accept is not None and "text/csv" in accept.lower()


def _json_response(document: dict[str, Any]) -> Response:
    return Response(content=json.dumps(document, ensure_ascii=False), media_type="application/json")


def _csv_response(body: bytes, kind: str, area: str, start: datetime, end: datetime) -> Response:
    # Area codes are [A-Za-z0-9_.-], so the file name needs no quoting beyond the quotes.
    name = f"{kind}-{area}-{start:%Y%m%d}-{end:%Y%m%d}.csv"
    return Response(
        content=body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/plays", responses=_CSV_RESPONSE)
async def plays_report(
    runtime: RuntimeDep,
    principal: Reader,
    area: AreaParam,
    start: FromParam,
    end: ToParam,
    fmt: FormatParam = None,
    level: Annotated[
        Literal["device", "ward"], Query(description="CSV rows: one per device or one per ward")
    ] = "device",
    accept: AcceptHeader = None,
) -> Response:
    """Per device and per ward: scheduled, played OK, interrupted, missed, failed, cancelled and pending
    play requests, and played vs requested seconds, for broadcasts created (and schedule occurrences
    planned) in [from, to)."""
    window: tuple[datetime, datetime] = (start, end)
    service = ReportService(runtime.engine)
    report = await asyncio.to_thread(service.plays, area, *window, principal)
    if _wants_csv(fmt, accept):
        return _csv_response(plays_csv(report, level=level), f"plays-{level}", area, *window)
    return _json_response(report.as_dict())


@router.get("/plays/log", responses=_CSV_RESPONSE)
async def plays_log(
    runtime: RuntimeDep,
    principal: Reader,
    area: AreaParam,
    start: FromParam,
    end: ToParam,
    fmt: FormatParam = None,
    accept: AcceptHeader = None,
) -> Response:
    """The broadcast log: one row per delivery (and per device a missed schedule occurrence would have
    reached), with its schedule, priority, queued, started and ended times, final state and seconds."""
    window: tuple[datetime, datetime] = (start, end)
    service = ReportService(runtime.engine)
    log = await asyncio.to_thread(service.log, area, *window, principal)
    if _wants_csv(fmt, accept):
        zone = ZoneInfo(runtime.settings.timezone)
        body = await asyncio.to_thread(log_csv, log, zone)
        return _csv_response(body, "broadcast-log", area, *window)
    # Tens of thousands of rows: render off the event loop.
    return await asyncio.to_thread(lambda: _json_response(log.as_dict()))
