"""What the dashboard shows, computed here so that templates only lay it out: the area tree (a user's
wards only, when confined to wards), each area's devices with their status, counts, active alarms."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from controller.console.pages import areas_in_view
from controller.services.auth import Principal
from controller.store.models import DeviceRow

if TYPE_CHECKING:
    from controller.app import Runtime


class DeviceStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    PLAYING = "playing"


def device_status(*, online: bool, playing: bool) -> DeviceStatus:
    if playing:
        return DeviceStatus.PLAYING
    return DeviceStatus.ONLINE if online else DeviceStatus.OFFLINE


@dataclass(frozen=True, slots=True)
class DeviceView:
    id: str
    kind: str
    name: str
    status: DeviceStatus


@dataclass(slots=True)
class AreaView:
    code: str
    name: str
    kind: str
    depth: int
    devices: list[DeviceView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Dashboard:
    areas: list[AreaView]  # depth-first, parents before children
    counts: dict[DeviceStatus, int]
    alarms: list[dict[str, Any]]
    scope: list[str]  # the names of the wards the user is confined to; empty: the whole city


def build_dashboard(runtime: Runtime, principal: Principal) -> Dashboard:
    """Blocking (database): call it from a worker thread."""
    tree = runtime.area_tree()
    wards = principal.device_wards()
    areas = [
        AreaView(area.code, area.name, area.kind, depth) for area, depth in areas_in_view(runtime, principal)
    ]
    by_code = {area.code: area for area in areas}
    with Session(runtime.engine) as session:
        rows = session.exec(
            select(DeviceRow)
            .where(col(DeviceRow.enabled).is_(True), col(DeviceRow.decommissioned_at).is_(None))
            .order_by(col(DeviceRow.id))
        ).all()
    counts = dict.fromkeys(DeviceStatus, 0)
    visible: set[str] = set()
    for row in rows:
        area = by_code.get(row.area_code)
        if area is None:
            continue
        status = device_status(online=row.online, playing=runtime.tracker.playing_on(row.id) is not None)
        area.devices.append(DeviceView(row.id, row.kind, row.name or row.id, status))
        counts[status] += 1
        visible.add(row.id)
    alarms = runtime.rules.alarms(state="active", limit=50, devices=frozenset(visible) if wards else None)
    return Dashboard(areas, counts, alarms, [tree.get(code).name for code in sorted(wards or ())])
