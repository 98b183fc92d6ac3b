"""Each speaker's programme for the next hours, retained on its `schedule` topic (docs/protocol.md §1.10).

A speaker whose 4G link drops plays on from this cache. The documents are rebuilt from the database (the
source of truth) shortly after any change of schedules or devices and at least every
`device_programme_refresh_s`, and only the ones whose items changed, or whose window is half used, are
published again. A rebuild of a large city costs a few seconds of CPU, so rebuilds are spaced out to at
least five times their own duration: the programme may lag a burst of changes by seconds, never the
firing of occurrences, which does not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.domain.clock import Clock
from controller.domain.fanout import area_path
from controller.domain.planner import DeviceEntry, TargetError, resolve_targets
from controller.domain.priority import PriorityClass
from controller.domain.programme import (
    CommLoss,
    CommLossPolicy,
    PlayContent,
    ProgrammeItem,
    occurrence_broadcast_id,
    occurrence_delivery_ids,
    play_command,
    programme_document,
)
from controller.services.broadcasts import AUDIO_DEVICE_KINDS, SPEAKER_KIND
from controller.services.media import media_document
from controller.services.schedules import ScheduleSpec, schedule_time
from controller.services.targets import load_area_tree
from controller.settings import SchedulesSettings
from controller.store.models import DeviceRow, MediaRow, ScheduleRow
from schedules.recurrence import expand

log = structlog.get_logger(__name__)

PROGRAMMES_PUBLISHED = Counter("wardcast_device_programmes_published_total", "Programme documents published")
PROGRAMME_BUILD = Histogram(
    "wardcast_device_programme_build_seconds",
    "Time to rebuild every speaker's programme from the database",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30),
)
_PUBLISH_CONCURRENCY = 200
_PUBLISH_TIMEOUT_S = 10.0
_SPACING_FACTOR = 5

# Publishes one retained document on a device's schedule topic; None clears it.
RetainedPublisher = Callable[[str, Mapping[str, Any] | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Published:
    digest: str
    valid_until: datetime


@dataclass(frozen=True, slots=True)
class BuiltProgramme:
    address: str
    document: dict[str, Any]
    digest: str
    valid_until: datetime


def occurrence_grace(settings: SchedulesSettings, priority_class: str) -> timedelta:
    """How late an occurrence may still start: its command's expiry, live or from a device's cache."""
    seconds: int = getattr(settings.grace_s, PriorityClass(priority_class).value)
    return timedelta(seconds=seconds)


class DeviceProgrammes:
    def __init__(
        self,
        engine: Engine,
        settings: SchedulesSettings,
        clock: Clock,
        *,
        media_base_url: str,
        publish: RetainedPublisher,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._media_base_url = media_base_url
        self._publish = publish
        self._published: dict[str, _Published] = {}
        self._changed = asyncio.Event()
        self._changed.set()  # the first round publishes everything
        self.rounds = 0

    def changed(self) -> None:
        """Schedules or devices changed: rebuild soon."""
        self._changed.set()

    def link_restored(self) -> None:
        """A broker that restarted without persistence lost the retained documents: publish all again."""
        self._published.clear()
        self._changed.set()

    async def run(self) -> None:
        refresh = self._settings.device_programme_refresh_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=refresh)
            # Collects the rest of a burst of changes into this round.
            await asyncio.sleep(self._settings.device_programme_debounce_s)
            self._changed.clear()
            started = self._clock.now()
            try:
                await self.publish_round()
            except Exception:  # a round that failed is retried on the next change or refresh
                log.exception("publishing device programmes failed")
                self._changed.set()
            spent = (self._clock.now() - started).total_seconds()
            await asyncio.sleep(spent * _SPACING_FACTOR)

    async def publish_round(self) -> int:
        """Rebuild every programme and publish those that changed; returns how many were published."""
        now = self._clock.now()
        with PROGRAMME_BUILD.time():
            built = await asyncio.to_thread(self.build, now)
        due = [programme for programme in built if self._needs_publishing(programme, now)]
        gone = set(self._published) - {programme.address for programme in built}
        semaphore = asyncio.Semaphore(_PUBLISH_CONCURRENCY)

        async def publish_one(address: str, programme: BuiltProgramme | None) -> bool:
            async with semaphore:
                try:
                    # None: the device was removed; only the broker's retained copy is emptied.
                    await self._publish(address, None if programme is None else programme.document)
                except Exception as error:  # noqa: BLE001  (the driver's errors; retried next round)
                    log.warning("device programme not published", address=address, error=str(error))
                    self._changed.set()
                    return False
            if programme is None:
                self._published.pop(address, None)
            else:
                self._published[address] = _Published(programme.digest, programme.valid_until)
            PROGRAMMES_PUBLISHED.inc()
            return True

        results = await asyncio.gather(
            *(publish_one(p.address, p) for p in due), *(publish_one(address, None) for address in gone)
        )
        self.rounds += 1
        published = sum(results)
        if published:
            log.info("device programmes published", published=published, devices=len(built))
        return published

    def published_digest(self, address: str) -> str | None:
        held = self._published.get(address)
        return None if held is None else held.digest

    def _needs_publishing(self, programme: BuiltProgramme, now: datetime) -> bool:
        held = self._published.get(programme.address)
        if held is None or held.digest != programme.digest:
            return True
        half = timedelta(hours=self._settings.device_programme_hours / 2)
        return held.valid_until - now < half

    # -- building (in a worker thread) ------------------------------------------------------------
    def build(self, now: datetime, *, only_device: str | None = None) -> list[BuiltProgramme]:
        """Every MQTT speaker's programme document from `now` for `device_programme_hours`."""
        valid_from = now.astimezone(UTC)
        valid_until = valid_from + timedelta(hours=self._settings.device_programme_hours)
        with Session(self._engine) as session:
            tree = load_area_tree(session)
            # A wired zone's receiver keeps no programme: played offline, its relays would stay open.
            speakers = select(DeviceRow).where(DeviceRow.kind == SPEAKER_KIND)
            device_rows = session.exec(speakers).all()
            schedules = session.exec(select(ScheduleRow).where(col(ScheduleRow.enabled))).all()
            media = {row.id: row for row in session.exec(select(MediaRow)).all()}
        entries = [
            DeviceEntry(row.id, row.kind, row.area_code, row.address, row.transport, row.enabled)
            for row in device_rows
        ]
        by_area: dict[str, list[DeviceEntry]] = defaultdict(list)
        for entry in entries:
            by_area[entry.area_code].append(entry)
        by_id = {entry.id: entry for entry in entries}
        items: dict[str, list[ProgrammeItem]] = defaultdict(list)
        for row in schedules:
            spec = ScheduleSpec.from_row(row)
            playlist = [media.get(media_id) for media_id in spec.media_ids]
            if any(item is None for item in playlist):
                continue  # its occurrences fail at firing time too, with the reason recorded
            timing = schedule_time(spec)
            starts = expand(
                timing.rule, timing.dtstart, start=valid_from, end=valid_until, exdates=timing.exdates
            )
            if not starts:
                continue
            candidates = [
                device
                for code in spec.targets.areas
                if code in tree
                for inside in tree.subtree_codes(code)
                for device in by_area.get(inside, ())
            ]
            candidates += [by_id[d] for d in spec.targets.devices if d in by_id]
            try:
                devices = resolve_targets(spec.targets, tree, candidates, kinds=AUDIO_DEVICE_KINDS)
            except TargetError:
                continue  # the same error stops its occurrences at firing time
            content = PlayContent(
                priority=spec.priority,
                media=[media_document(item, self._media_base_url) for item in playlist if item is not None],
                repeats=spec.repeats,
                max_duration_s=spec.max_duration_s,
                gap_s=spec.gap_s,
            )
            grace = occurrence_grace(self._settings, row.priority_class)
            for start in starts:
                planned_at = start.astimezone(UTC)
                if planned_at < valid_from:
                    continue
                broadcast_id = occurrence_broadcast_id(row.id, planned_at)
                for device in devices:
                    if device.transport != "mqtt" or (only_device is not None and device.id != only_device):
                        continue
                    command = play_command(
                        content,
                        broadcast_id=broadcast_id,
                        ids=occurrence_delivery_ids(row.id, planned_at, device.id),
                        address=device.address,
                        issued_at=valid_from,
                        expires_at=planned_at + grace,
                    )
                    items[device.id].append(ProgrammeItem(planned_at, command))
        built: list[BuiltProgramme] = []
        for device_row in device_rows:
            if device_row.transport != "mqtt" or (only_device is not None and device_row.id != only_device):
                continue
            comm_loss = CommLoss(CommLossPolicy(device_row.comm_loss_policy), device_row.comm_loss_after_s)
            enabled = device_row.enabled
            # A disabled speaker gets a programme with no items and no areas: an empty payload would
            # clear it too, but a device cannot tell who sent an empty payload, so it ignores one.
            document = programme_document(
                address=device_row.address,
                generated_at=valid_from,
                valid_from=valid_from,
                valid_until=valid_until,
                comm_loss=comm_loss,
                items=items.get(device_row.id, ()) if enabled else (),
                areas=area_path(tree, device_row.area_code) if enabled else (),
            )
            digest = _digest(document) if enabled else "cleared"
            built.append(BuiltProgramme(device_row.address, document, digest, valid_until))
        return built


def _digest(document: Mapping[str, Any]) -> str:
    """What the device would act on: the items (without `issued_at`) and the comm-loss policy."""
    essence = {
        "comm_loss": document["comm_loss"],
        "areas": document["areas"],
        "items": [
            (item["start_at"], {k: v for k, v in item["command"].items() if k != "issued_at"})
            for item in document["items"]
        ],
    }
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()
