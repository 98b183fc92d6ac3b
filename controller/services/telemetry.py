"""One pipeline for sensor readings from every transport (issue 5).

Readings are checked against the device's physical range, handed to the rules, and queued; a writer
task stores them in batches (one multi-row INSERT per batch, and one upsert of the latest value per
metric). Raw readings older than the retention are folded into fixed buckets (count, sum, min, max) and
deleted; old buckets are removed in turn. Queries merge both, so a chart over a year still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from prometheus_client import Counter, Gauge
from sqlalchemy import CursorResult, Engine, delete, func, insert, text
from sqlalchemy import select as sql_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from controller.domain.clock import Clock, rfc3339
from controller.domain.telemetry import (
    METRIC_PATTERN,
    Bucket,
    MetricSpec,
    bucket_start_ms,
    epoch_ms,
    from_epoch_ms,
    metric_specs,
)
from controller.services.errors import ServiceError
from controller.settings import TelemetrySettings
from controller.store.models import DeviceRow, TelemetryLatestRow, TelemetryRollupRow, TelemetryRow

log = structlog.get_logger(__name__)

READINGS = Counter("wardcast_telemetry_readings_total", "Sensor readings", ["outcome"])
PENDING = Gauge("wardcast_telemetry_pending", "Readings waiting to be written")
_ACCEPTED = READINGS.labels("accepted")  # looked up once: it is counted for every reading
WRITTEN = Counter("wardcast_telemetry_written_total", "Readings stored in the telemetry table")
# Folding works through this much raw time per transaction, so that memory stays bounded.
_FOLD_WINDOW_MS = 3600 * 1000
_REJECTED_REASON_CHARS = 300
_MAX_UNIT_CHARS = 16
_METRIC = re.compile(METRIC_PATTERN)

ReadingListener = Callable[[str, str, float, datetime], None]

# PostgreSQL: the latest value per (device, metric) of a whole batch, never replacing a newer one.
_LATEST_FROM_ARRAYS = text(
    """
    INSERT INTO telemetry_latest (device_id, metric, value, unit, at, rejected_count)
    SELECT device_id, metric, value, unit, to_timestamp(at_ms / 1000.0), 0
    FROM unnest(
        CAST(:devices AS text[]), CAST(:metrics AS text[]), CAST(:values AS float8[]),
        CAST(:units AS text[]), CAST(:ats AS bigint[])
    ) AS batch(device_id, metric, value, unit, at_ms)
    ON CONFLICT (device_id, metric) DO UPDATE
    SET value = excluded.value, unit = excluded.unit, at = excluded.at
    WHERE telemetry_latest.at IS NULL OR telemetry_latest.at <= excluded.at
    """
)


class TelemetryQueryError(ServiceError):
    """A telemetry request that cannot be answered (422 naming the field)."""


@dataclass(frozen=True, slots=True)
class Reading:
    device_id: str
    metric: str
    value: float
    unit: str | None
    at_ms: int


@dataclass(slots=True)
class _Rejection:
    count: int
    at: datetime
    reason: str


Rejections = dict[tuple[str, str], _Rejection]


class ReadingQueue:
    """Range checks and the queue of readings waiting to be written: no I/O, no event loop.

    The controller's pipeline and the ingest worker processes (controller/ingest_worker.py) share it;
    it is not thread-safe, its owner serialises access.
    """

    def __init__(self, settings: TelemetrySettings) -> None:
        self._settings = settings
        self._specs: dict[str, dict[str, MetricSpec]] = {}
        self.pending: list[Reading] = []
        self.rejections: Rejections = {}
        self._dropping = False

    def load(self, rows: Iterable[tuple[str, Mapping[str, Any] | None]]) -> None:
        """(device id, stored configuration) of every device."""
        self._specs = {device_id: metric_specs(config or {}) for device_id, config in rows}

    def device_changed(self, device_id: str, config: Mapping[str, Any] | None) -> None:
        if config is None:
            self._specs.pop(device_id, None)
        else:
            self._specs[device_id] = metric_specs(config)

    def accept(self, device_id: str, metric: str, value: float, unit: str | None, at: datetime) -> bool:
        """Queue one reading; False when it was refused (out of range, or the queue is full)."""
        if not _METRIC.fullmatch(metric):
            READINGS.labels("rejected").inc()
            log.warning("sensor reading with an unusable metric name refused", device_id=device_id)
            return False
        spec = self._specs.get(device_id, {}).get(metric)
        problem = (spec or MetricSpec()).problem(value)
        if problem is None and unit is not None and len(unit) > _MAX_UNIT_CHARS:
            problem = f"unit {unit[:20]!r}… is longer than {_MAX_UNIT_CHARS} characters"
        if problem is not None:
            self.reject(device_id, metric, problem, at)
            return False
        if len(self.pending) >= self._settings.max_pending:
            READINGS.labels("dropped").inc()
            if not self._dropping:
                self._dropping = True
                log.error(
                    "telemetry backlog full: readings are dropped until the database catches up",
                    pending=len(self.pending),
                )
            return False
        if spec is not None and spec.unit is not None:
            unit = spec.unit
        self.pending.append(Reading(device_id, metric, value, unit, epoch_ms(at)))
        _ACCEPTED.inc()
        return True

    def reject(self, device_id: str, metric: str, reason: str, at: datetime) -> None:
        """A reading that cannot be true: counted and kept as the metric's last refusal, never stored."""
        READINGS.labels("rejected").inc()
        key = (device_id, metric)
        earlier = self.rejections.get(key)
        if earlier is None:
            log.warning("sensor reading refused", device_id=device_id, metric=metric, reason=reason)
            self.rejections[key] = _Rejection(1, at, reason)
        else:
            earlier.count += 1
            earlier.at, earlier.reason = at, reason

    @property
    def has_work(self) -> bool:
        return bool(self.pending or self.rejections)

    def take(self) -> tuple[list[Reading], Rejections]:
        """The next batch and the refusals so far, removed from the queue (`put_back` on failure)."""
        size = self._settings.batch_size
        batch, self.pending = self.pending[:size], self.pending[size:]
        rejections, self.rejections = self.rejections, {}
        return batch, rejections

    def put_back(self, batch: list[Reading], rejections: Rejections) -> None:
        """A batch whose write failed goes back to the front, ahead of what arrived meanwhile."""
        self.pending[:0] = batch
        for key, rejection in rejections.items():
            newer = self.rejections.get(key)
            if newer is None:
                self.rejections[key] = rejection
            else:
                newer.count += rejection.count

    def written(self, count: int) -> None:
        WRITTEN.inc(count)
        PENDING.set(len(self.pending))
        if self._dropping and len(self.pending) < self._settings.max_pending // 2:
            self._dropping = False
            log.info("telemetry backlog drained; readings are accepted again")


class TelemetryStore:
    """The telemetry tables: batch writes, retention, and reading back. Synchronous (worker threads)."""

    def __init__(self, engine: Engine, clock: Clock, settings: TelemetrySettings) -> None:
        self._engine = engine
        self._clock = clock
        self._settings = settings

    def device_configs(self) -> list[tuple[str, Mapping[str, Any] | None]]:
        with Session(self._engine) as session:
            return [
                (device_id, config)
                for device_id, config in session.exec(select(DeviceRow.id, DeviceRow.config))
            ]

    def write(self, batch: list[Reading], rejections: Mapping[tuple[str, str], _Rejection]) -> None:
        """One transaction: the raw rows, the latest value per metric, and the refusals."""
        latest: dict[tuple[str, str], Reading] = {}
        for reading in batch:
            key = (reading.device_id, reading.metric)
            known = latest.get(key)
            if known is None or reading.at_ms >= known.at_ms:
                latest[key] = reading
        with Session(self._engine) as session:
            if batch:
                self._insert_raw(session, batch)
            self._upsert_latest(session, latest.values())
            self._upsert_rejections(session, rejections)
            session.commit()

    def _insert_raw(self, session: Session, batch: list[Reading]) -> None:
        if session.get_bind().dialect.name == "postgresql":
            # COPY streams the rows in one round trip; an INSERT per row costs ~3 × more.
            driver_connection: Any = session.connection().connection.driver_connection
            with (
                driver_connection.cursor() as cursor,
                cursor.copy("COPY telemetry (device_id, metric, at_ms, value) FROM STDIN") as copy,
            ):
                for r in batch:
                    copy.write_row((r.device_id, r.metric, r.at_ms, r.value))
            return
        session.execute(
            insert(TelemetryRow.__table__),  # type: ignore[attr-defined]
            [
                {"device_id": r.device_id, "metric": r.metric, "at_ms": r.at_ms, "value": r.value}
                for r in batch
            ],
        )

    def _insert(self, session: Session) -> Any:
        dialect = session.get_bind().dialect.name
        return postgresql.insert if dialect == "postgresql" else sqlite.insert

    def _upsert_latest(self, session: Session, readings: Iterable[Reading]) -> None:
        ordered = sorted(readings, key=lambda r: (r.device_id, r.metric))  # one lock order for every writer
        if not ordered:
            return
        if session.get_bind().dialect.name == "postgresql":
            # One set-based statement over arrays: an executemany upsert costs a server round of
            # planning and locking per row, which kept a writer at ~50 µs a reading.
            session.execute(
                _LATEST_FROM_ARRAYS,
                {
                    "devices": [r.device_id for r in ordered],
                    "metrics": [r.metric for r in ordered],
                    "values": [r.value for r in ordered],
                    "units": [r.unit for r in ordered],
                    "ats": [r.at_ms for r in ordered],
                },
            )
            return
        rows = [
            {
                "device_id": r.device_id,
                "metric": r.metric,
                "value": r.value,
                "unit": r.unit,
                "at": from_epoch_ms(r.at_ms),
                "rejected_count": 0,
            }
            for r in ordered
        ]
        statement = sqlite.insert(TelemetryLatestRow)
        excluded = statement.excluded
        table = TelemetryLatestRow.__table__  # type: ignore[attr-defined]
        newer = (table.c.at.is_(None)) | (table.c.at <= excluded.at)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["device_id", "metric"],
                set_={"value": excluded.value, "unit": excluded.unit, "at": excluded.at},
                where=newer,
            ),
            rows,
        )

    def _upsert_rejections(self, session: Session, rejections: Mapping[tuple[str, str], _Rejection]) -> None:
        rows = [
            {
                "device_id": device_id,
                "metric": metric,
                "rejected_count": rejection.count,
                "rejected_at": rejection.at,
                "rejected_reason": rejection.reason[:_REJECTED_REASON_CHARS],
            }
            for (device_id, metric), rejection in sorted(rejections.items())
        ]
        if not rows:
            return
        statement = self._insert(session)(TelemetryLatestRow)
        excluded = statement.excluded
        table = TelemetryLatestRow.__table__  # type: ignore[attr-defined]
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["device_id", "metric"],
                set_={
                    "rejected_count": table.c.rejected_count + excluded.rejected_count,
                    "rejected_at": excluded.rejected_at,
                    "rejected_reason": excluded.rejected_reason,
                },
            ),
            rows,
        )

    # -- retention -------------------------------------------------------------------------------
    def maintain(self, now: datetime | None = None) -> tuple[int, int]:
        """Fold raw readings older than the retention into buckets, drop expired buckets.
        Returns (raw readings folded, buckets removed)."""
        now = now or self._clock.now()
        step_s = self._settings.rollup_step_s
        cutoff_ms = bucket_start_ms(
            epoch_ms(now - timedelta(hours=self._settings.raw_retention_hours)), step_s
        )
        folded = 0
        while True:
            with Session(self._engine) as session:
                oldest = session.exec(select(func.min(TelemetryRow.at_ms))).one()
                if oldest is None or oldest >= cutoff_ms:
                    break
                window_end = min(cutoff_ms, bucket_start_ms(oldest, step_s) + _FOLD_WINDOW_MS)
                folded += self._fold(session, window_end, step_s)
                session.commit()
        expiry_ms = epoch_ms(now - timedelta(days=self._settings.rollup_retention_days))
        with Session(self._engine) as session:
            removed = _affected(
                session.execute(
                    delete(TelemetryRollupRow).where(col(TelemetryRollupRow.bucket_ms) < expiry_ms)
                )
            )
            session.commit()
        if folded or removed:
            log.info("telemetry retention", folded=folded, buckets_removed=removed)
        return folded, removed

    def _fold(self, session: Session, before_ms: int, step_s: int) -> int:
        step_ms = step_s * 1000
        bucket = col(TelemetryRow.at_ms) // step_ms * step_ms
        groups = session.execute(
            sql_select(
                col(TelemetryRow.device_id),
                col(TelemetryRow.metric),
                bucket,
                func.count(),
                func.sum(TelemetryRow.value),
                func.min(TelemetryRow.value),
                func.max(TelemetryRow.value),
            )
            .where(col(TelemetryRow.at_ms) < before_ms)
            .group_by(TelemetryRow.device_id, TelemetryRow.metric, bucket)
        ).all()
        rows = [
            {
                "device_id": device_id,
                "metric": metric,
                "step_s": step_s,
                "bucket_ms": int(start),
                "count": count,
                "total": total,
                "minimum": minimum,
                "maximum": maximum,
            }
            for device_id, metric, start, count, total, minimum, maximum in groups
        ]
        if rows:
            statement = self._insert(session)(TelemetryRollupRow)
            excluded = statement.excluded
            table = TelemetryRollupRow.__table__  # type: ignore[attr-defined]
            # SQLite's two-argument min/max are PostgreSQL's least/greatest.
            sqlite_like = session.get_bind().dialect.name == "sqlite"
            smaller, larger = (func.min, func.max) if sqlite_like else (func.least, func.greatest)
            # A late reading for a bucket folded earlier merges into it rather than replacing it.
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=["device_id", "metric", "step_s", "bucket_ms"],
                    set_={
                        "count": table.c.count + excluded.count,
                        "total": table.c.total + excluded.total,
                        "minimum": smaller(table.c.minimum, excluded.minimum),
                        "maximum": larger(table.c.maximum, excluded.maximum),
                    },
                ),
                rows,
            )
        return _affected(session.execute(delete(TelemetryRow).where(col(TelemetryRow.at_ms) < before_ms)))

    # -- reading back ----------------------------------------------------------------------------
    def latest(self, device_id: str) -> list[dict[str, Any]]:
        with Session(self._engine) as session:
            rows = session.exec(
                select(TelemetryLatestRow)
                .where(TelemetryLatestRow.device_id == device_id)
                .order_by(col(TelemetryLatestRow.metric))
            ).all()
        return [_latest_out(row) for row in rows]

    def series(
        self,
        device_id: str,
        *,
        start: datetime,
        end: datetime,
        step_s: int | None,
        metrics: frozenset[str] | None = None,
    ) -> dict[str, Any]:
        """Readings of `device_id` in [start, end): raw points, or buckets of `step_s` (mean, min, max,
        count) merged from raw readings and folded buckets."""
        if end <= start:
            raise TelemetryQueryError("to", "must be after from")
        start_ms, end_ms = epoch_ms(start), epoch_ms(end)
        limit = self._settings.max_points
        if step_s is not None and (end_ms - start_ms) // (step_s * 1000) > limit:
            raise TelemetryQueryError(
                "step", f"gives more than {limit} buckets over this range; choose a longer step"
            )
        with Session(self._engine) as session:
            units = dict(
                session.exec(
                    select(TelemetryLatestRow.metric, TelemetryLatestRow.unit).where(
                        TelemetryLatestRow.device_id == device_id
                    )
                ).all()
            )
            if step_s is None:
                series = self._raw(session, device_id, start_ms, end_ms, metrics, limit)
            else:
                series = self._bucketed(session, device_id, start_ms, end_ms, step_s, metrics)
        return {
            "device_id": device_id,
            "from": rfc3339(start),
            "to": rfc3339(end),
            "step_s": step_s,
            "series": [
                {"metric": metric, "unit": units.get(metric), "points": points}
                for metric, points in sorted(series.items())
            ],
        }

    def _raw(
        self,
        session: Session,
        device_id: str,
        start_ms: int,
        end_ms: int,
        metrics: frozenset[str] | None,
        limit: int,
    ) -> dict[str, list[dict[str, Any]]]:
        query = (
            select(TelemetryRow.metric, TelemetryRow.at_ms, TelemetryRow.value)
            .where(
                TelemetryRow.device_id == device_id,
                col(TelemetryRow.at_ms) >= start_ms,
                col(TelemetryRow.at_ms) < end_ms,
            )
            .order_by(col(TelemetryRow.at_ms), col(TelemetryRow.id))
            .limit(limit + 1)
        )
        if metrics:
            query = query.where(col(TelemetryRow.metric).in_(metrics))
        rows = session.exec(query).all()
        if len(rows) > limit:
            raise TelemetryQueryError(
                "step", f"more than {limit} readings in this range: give a step to get buckets"
            )
        series: dict[str, list[dict[str, Any]]] = {}
        for metric, at_ms, value in rows:
            series.setdefault(metric, []).append({"at": rfc3339(from_epoch_ms(at_ms)), "value": value})
        return series

    def _bucketed(
        self,
        session: Session,
        device_id: str,
        start_ms: int,
        end_ms: int,
        step_s: int,
        metrics: frozenset[str] | None,
    ) -> dict[str, list[dict[str, Any]]]:
        step_ms = step_s * 1000
        buckets: dict[tuple[str, int], Bucket] = {}

        def add(metric: str, start: int, bucket: Bucket) -> None:
            key = (metric, bucket_start_ms(int(start), step_s))
            known = buckets.get(key)
            if known is None:
                buckets[key] = bucket
            else:
                known.merge(bucket)

        raw_bucket = col(TelemetryRow.at_ms) // step_ms * step_ms
        raw = (
            sql_select(
                col(TelemetryRow.metric),
                raw_bucket,
                func.count(),
                func.sum(TelemetryRow.value),
                func.min(TelemetryRow.value),
                func.max(TelemetryRow.value),
            )
            .where(
                col(TelemetryRow.device_id) == device_id,
                col(TelemetryRow.at_ms) >= start_ms,
                col(TelemetryRow.at_ms) < end_ms,
            )
            .group_by(TelemetryRow.metric, raw_bucket)
        )
        folded = sql_select(
            col(TelemetryRollupRow.metric),
            col(TelemetryRollupRow.bucket_ms),
            col(TelemetryRollupRow.count),
            col(TelemetryRollupRow.total),
            col(TelemetryRollupRow.minimum),
            col(TelemetryRollupRow.maximum),
        ).where(
            col(TelemetryRollupRow.device_id) == device_id,
            col(TelemetryRollupRow.bucket_ms) >= start_ms,
            col(TelemetryRollupRow.bucket_ms) < end_ms,
        )
        if metrics:
            raw = raw.where(col(TelemetryRow.metric).in_(metrics))
            folded = folded.where(col(TelemetryRollupRow.metric).in_(metrics))
        for query in (raw, folded):
            for metric, start, count, total, minimum, maximum in session.execute(query).all():
                add(metric, start, Bucket(count, total, minimum, maximum))
        series: dict[str, list[dict[str, Any]]] = {}
        for (metric, start), bucket in sorted(buckets.items()):
            series.setdefault(metric, []).append(
                {
                    "at": rfc3339(from_epoch_ms(start)),
                    "mean": bucket.mean,
                    "min": bucket.minimum,
                    "max": bucket.maximum,
                    "count": bucket.count,
                }
            )
        return series


class TelemetryPipeline:
    """Readings of the controller's own drivers (Modbus, CoAP, serial, and MQTT when no ingest worker
    runs): checked and queued on the event loop, written in batches by a worker thread."""

    def __init__(self, engine: Engine, clock: Clock, settings: TelemetrySettings) -> None:
        self._settings = settings
        self.queue = ReadingQueue(settings)
        self.store = TelemetryStore(engine, clock, settings)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._listeners: list[ReadingListener] = []
        self.written = 0
        """Readings stored so far (for benchmarks and tests)."""

    # -- configuration ---------------------------------------------------------------------------
    def load(self) -> None:
        self.queue.load(self.store.device_configs())

    def device_changed(self, device_id: str, config: Mapping[str, Any] | None) -> None:
        self.queue.device_changed(device_id, config)

    def add_listener(self, listener: ReadingListener) -> None:
        """`listener(device_id, metric, value, at)` hears every accepted reading (the rules)."""
        self._listeners.append(listener)

    # -- intake ----------------------------------------------------------------------------------
    def accept(self, device_id: str, metric: str, value: float, unit: str | None, at: datetime) -> bool:
        """Take one reading; False when it was refused (out of range, or the queue is full)."""
        if not self.queue.accept(device_id, metric, value, unit, at):
            self._wake_writer()
            return False
        self._idle.clear()
        if len(self.queue.pending) >= self._settings.batch_size:
            self._wake.set()
        for listener in self._listeners:
            listener(device_id, metric, value, at)
        return True

    def reject(self, device_id: str, metric: str, reason: str, at: datetime) -> None:
        self.queue.reject(device_id, metric, reason, at)
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self.queue.rejections:
            self._idle.clear()
            self._wake.set()

    # -- writing ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Write batches, and fold and expire old readings every `maintenance_interval_s`."""
        next_maintenance = time.monotonic() + self._settings.maintenance_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._settings.flush_interval_s)
            self._wake.clear()
            await self.flush()
            if time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + self._settings.maintenance_interval_s
                try:
                    await asyncio.to_thread(self.store.maintain)
                except SQLAlchemyError:
                    log.exception("telemetry retention pass failed; it runs again later")

    async def flush(self) -> None:
        """Write everything accepted so far (a failed write keeps the readings for the next try)."""
        while self.queue.has_work:
            batch, rejections = self.queue.take()
            try:
                await asyncio.to_thread(self.store.write, batch, rejections)
            except SQLAlchemyError:
                self.queue.put_back(batch, rejections)
                log.exception("writing readings failed; retrying", batch=len(batch))
                await asyncio.sleep(self._settings.flush_interval_s)
                continue
            self.written += len(batch)
            self.queue.written(len(batch))
        self._idle.set()

    async def wait_written(self, timeout: float) -> None:
        """Until every reading accepted so far is stored (tests, benchmarks, shutdown)."""
        self._wake.set()
        await asyncio.wait_for(self._idle.wait(), timeout)


def _affected(result: Any) -> int:
    """Rows a DELETE removed (typed access to the cursor result's count)."""
    cursor: CursorResult[Any] = result
    return cursor.rowcount


def _latest_out(row: TelemetryLatestRow) -> dict[str, Any]:
    # A refusal newer than the last good value means the sensor is sending nonsense right now.
    degraded = row.rejected_at is not None and (row.at is None or row.rejected_at >= row.at)
    return {
        "metric": row.metric,
        "value": row.value,
        "unit": row.unit,
        "at": rfc3339(row.at) if row.at else None,
        "rejected_count": row.rejected_count,
        "last_rejected": (
            {"at": rfc3339(row.rejected_at), "reason": row.rejected_reason} if row.rejected_at else None
        ),
        "degraded": degraded,
    }
