"""Turning schedules into broadcasts at their planned instants, exactly once, across restarts.

The occurrence row, keyed by (schedule, planned instant), is written in the same transaction as the
broadcast it starts; a second attempt for the same occurrence (after a crash, say) hits the key and
plays nothing. At start, occurrences that should have fired while the controller was down play late
if their class's grace time allows, and are recorded `missed` with the reason otherwise.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from controller.domain.clock import Clock
from controller.services.auth import Principal, Role
from controller.services.broadcasts import BroadcastRequest, BroadcastService, OccurrenceAlreadyFired
from controller.services.device_programmes import occurrence_grace
from controller.services.errors import ServiceError
from controller.services.schedules import ScheduleSpec, next_planned, schedule_time
from controller.settings import SchedulesSettings
from controller.store.models import OccurrenceRow, ScheduleRow
from schedules.recurrence import expand
from schedules.runtime import OccurrenceScheduler

log = structlog.get_logger(__name__)

OCCURRENCES = Counter("wardcast_schedule_occurrences_total", "Schedule occurrences by outcome", ["outcome"])
FIRING_DELAY = Histogram(
    "wardcast_schedule_firing_delay_seconds",
    "From an occurrence's planned instant to its broadcast being accepted",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 60, 600),
)


class ScheduleRunner:
    def __init__(
        self, engine: Engine, broadcasts: BroadcastService, settings: SchedulesSettings, clock: Clock
    ) -> None:
        self._engine = engine
        self._broadcasts = broadcasts
        self._settings = settings
        self._clock = clock
        self._scheduler = OccurrenceScheduler(self._fire)

    def grace(self, priority_class: str) -> timedelta:
        return occurrence_grace(self._settings, priority_class)

    async def start(self) -> None:
        self._scheduler.start()
        rows = await asyncio.to_thread(self._enabled_schedules)
        now = self._clock.now()
        for row in rows:
            await self._catch_up(row, now)
            self._plan_next(row, after=now)
        log.info("schedules planned", schedules=len(rows), jobs=self._scheduler.job_count)

    def stop(self) -> None:
        self._scheduler.shutdown()

    async def replan(self, schedule_id: str) -> None:
        """After a schedule was created, changed or deleted."""
        row = await asyncio.to_thread(self._load, schedule_id)
        if row is None or not row.enabled:
            self._scheduler.plan(schedule_id, None)
            return
        self._plan_next(row, after=self._clock.now())

    def planned_at(self, schedule_id: str) -> datetime | None:
        return self._scheduler.planned_at(schedule_id)

    # -- internals -------------------------------------------------------------------------------
    def _enabled_schedules(self) -> list[ScheduleRow]:
        with Session(self._engine) as session:
            return list(session.exec(select(ScheduleRow).where(col(ScheduleRow.enabled))).all())

    def _load(self, schedule_id: str) -> ScheduleRow | None:
        with Session(self._engine) as session:
            return session.get(ScheduleRow, schedule_id)

    def _plan_next(self, row: ScheduleRow, *, after: datetime) -> None:
        self._scheduler.plan(row.id, next_planned(row, after))

    async def _fire(self, schedule_id: str, planned_at: datetime) -> None:
        row = await asyncio.to_thread(self._load, schedule_id)
        if row is None or not row.enabled:
            return
        await self._play(row, planned_at)
        self._plan_next(row, after=planned_at)

    async def _play(self, row: ScheduleRow, planned_at: datetime) -> None:
        spec = ScheduleSpec.from_row(row)
        # A bulletin for 06:00 must not reach a speaker that comes back online at noon.
        expires_at = planned_at + self.grace(row.priority_class)
        request = BroadcastRequest(
            targets=spec.targets,
            media_ids=spec.media_ids,
            priority=spec.priority,
            repeats=spec.repeats,
            max_duration_s=spec.max_duration_s,
            expires_at=expires_at,
            gap_s=spec.gap_s,
            on_preempted=spec.on_preempted,
            occurrence=(row.id, planned_at),
        )
        principal = Principal(
            key_id=row.created_by or "schedule", name=f"schedule {row.name}", role=Role.ADMIN, ward_code=None
        )
        try:
            accepted = await self._broadcasts.create(request, principal)
        except OccurrenceAlreadyFired:
            log.info("occurrence already fired", schedule_id=row.id, planned_at=planned_at.isoformat())
            return
        except ServiceError as error:
            await asyncio.to_thread(
                self._record, row.id, planned_at, "failed", f"{error.field}: {error.detail}"
            )
            log.warning(
                "occurrence could not fire", schedule_id=row.id, field=error.field, detail=error.detail
            )
            return
        delay = (self._clock.now() - planned_at).total_seconds()
        FIRING_DELAY.observe(max(delay, 0.0))
        OCCURRENCES.labels("fired").inc()
        log.info(
            "occurrence fired",
            schedule_id=row.id,
            planned_at=planned_at.isoformat(),
            broadcast_id=accepted.id,
            devices=accepted.device_count,
            delay_s=round(delay, 3),
        )

    async def _catch_up(self, row: ScheduleRow, now: datetime) -> None:
        since = max(row.updated_at, now - timedelta(days=self._settings.catch_up_days))
        if since >= now:
            return
        timing = schedule_time(ScheduleSpec.from_row(row))
        due = expand(timing.rule, timing.dtstart, start=since, end=now, exdates=timing.exdates)
        if not due:
            return
        recorded = await asyncio.to_thread(self._recorded_since, row.id, since)
        grace = self.grace(row.priority_class)
        for moment in due:
            planned_at = moment.astimezone(now.tzinfo)
            if planned_at in recorded:
                continue
            if now - planned_at <= grace:
                log.info(
                    "playing a missed occurrence late", schedule_id=row.id, planned_at=planned_at.isoformat()
                )
                await self._play(row, planned_at)
            else:
                detail = (
                    f"the controller was not running at the planned time and the {row.priority_class} "
                    f"grace time of {int(grace.total_seconds())} s had passed"
                )
                await asyncio.to_thread(self._record, row.id, planned_at, "missed", detail)

    def _recorded_since(self, schedule_id: str, since: datetime) -> set[datetime]:
        with Session(self._engine) as session:
            return set(
                session.exec(
                    select(OccurrenceRow.planned_at).where(
                        OccurrenceRow.schedule_id == schedule_id, col(OccurrenceRow.planned_at) >= since
                    )
                ).all()
            )

    def _record(self, schedule_id: str, planned_at: datetime, outcome: str, detail: str) -> None:
        with Session(self._engine) as session:
            session.add(
                OccurrenceRow(
                    schedule_id=schedule_id,
                    planned_at=planned_at,
                    outcome=outcome,
                    recorded_at=self._clock.now(),
                    detail=detail[:500],
                )
            )
            try:
                session.commit()
            except IntegrityError:
                session.rollback()  # recorded by an earlier attempt: exactly once holds
                return
        OCCURRENCES.labels(outcome).inc()
