"""Who follows which area topic, by the devices' own word (docs/protocol.md §1.12).

A speaker lists in its retained state the areas whose commands it accepts; the broadcast path reads
the snapshot to choose area topics (controller.domain.fanout). Kept in memory from the state
reports and seeded from the last stored state at start, since retained states arrive only once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, select

from controller.store.models import DeviceRow

log = structlog.get_logger(__name__)


class AreaFollowers:
    def __init__(self) -> None:
        self._areas_of: dict[str, tuple[str, ...]] = {}
        self._snapshot: dict[str, frozenset[str]] | None = {}

    def load(self, engine: Engine) -> None:
        with Session(engine) as session:
            rows = session.exec(select(DeviceRow.id, DeviceRow.status)).all()
        for device_id, status in rows:
            self.update(device_id, status)

    def update(self, device_id: str, status: Mapping[str, Any]) -> None:
        """Take a device's state; a state without `areas` (a Last Will) leaves what it follows as it
        was, since its broker session keeps the subscriptions while it is away."""
        if "areas" not in status:
            return
        areas = status["areas"]
        if not isinstance(areas, list) or not all(isinstance(code, str) for code in areas):
            log.warning("state member `areas` is not a list of area codes", device_id=device_id)
            return
        followed = tuple(areas)
        if self._areas_of.get(device_id, ()) == followed:
            return
        if followed:
            self._areas_of[device_id] = followed
        else:
            self._areas_of.pop(device_id, None)
        self._snapshot = None

    def by_area(self) -> Mapping[str, frozenset[str]]:
        """Area code → the devices that say they follow it. Rebuilt only after a change, and never
        changed in place afterwards, so a worker thread may read it while states keep arriving."""
        if self._snapshot is None:
            building: dict[str, set[str]] = {}
            for device_id, areas in self._areas_of.items():
                for code in areas:
                    building.setdefault(code, set()).add(device_id)
            self._snapshot = {code: frozenset(devices) for code, devices in building.items()}
        return self._snapshot
