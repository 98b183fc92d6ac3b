"""The telemetry pipeline (controller/services/telemetry.py) on SQLite and PostgreSQL: batched writes,
latest values, physical ranges, folding into buckets, and the queries the API answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import Session, func, select

from controller.services.telemetry import TelemetryPipeline, TelemetryQueryError
from controller.settings import TelemetrySettings
from controller.store.db import create_db_engine, migrate
from controller.store.models import AreaRow, DeviceRow, TelemetryRollupRow, TelemetryRow
from tests.support.system import database_url  # noqa: F401  (the SQLite/PostgreSQL fixture)

T0 = datetime(2026, 11, 24, 0, 0, tzinfo=UTC)
WAIT_S = 10.0
SENSOR = "sen-river"
RIVER_CONFIG = {
    "metrics": {"water_level": {"unit": "m", "min": 0.0, "max": 10.0}, "rainfall": {"unit": "mm"}}
}


@dataclass
class SteppedClock:
    moment: datetime = T0

    def now(self) -> datetime:
        return self.moment


@pytest.fixture
async def pipeline(database_url: str) -> AsyncIterator[TelemetryPipeline]:  # noqa: F811
    engine = create_db_engine(database_url)
    migrate(engine)
    with Session(engine) as session:
        session.add(AreaRow(code="hn", name="Thành phố", kind="city"))
        session.add(
            DeviceRow(
                id=SENSOR,
                kind="sensor",
                area_code="hn",
                transport="mqtt",
                address="river",
                config=RIVER_CONFIG,
                created_at=T0,
            )
        )
        session.commit()
    settings = TelemetrySettings(batch_size=100, raw_retention_hours=24, rollup_step_s=300)
    telemetry = TelemetryPipeline(engine, SteppedClock(), settings)
    telemetry.load()
    try:
        yield telemetry
    finally:
        engine.dispose()


def reconfigured(telemetry: TelemetryPipeline, settings: TelemetrySettings) -> TelemetryPipeline:
    """Another pipeline on the same database, with other settings."""
    other = TelemetryPipeline(telemetry.store._engine, SteppedClock(), settings)
    other.load()
    return other


def count_rows(telemetry: TelemetryPipeline, table: type[TelemetryRow] | type[TelemetryRollupRow]) -> int:
    with Session(telemetry.store._engine) as session:
        return session.exec(select(func.count()).select_from(table)).one()


async def test_readings_are_stored_in_batches_with_the_latest_value_per_metric(
    pipeline: TelemetryPipeline,
) -> None:
    for second in range(250):
        assert pipeline.accept(
            SENSOR, "water_level", 1.0 + second / 1000, None, T0 + timedelta(seconds=second)
        )
    pipeline.accept(SENSOR, "rainfall", 2.5, "mm", T0)
    await pipeline.flush()
    assert pipeline.written == 251
    assert count_rows(pipeline, TelemetryRow) == 251
    latest = {m["metric"]: m for m in pipeline.store.latest(SENSOR)}
    assert latest["water_level"]["value"] == pytest.approx(1.249)
    assert latest["water_level"]["unit"] == "m"  # from the device's configuration
    assert latest["water_level"]["at"] == "2026-11-24T00:04:09Z"
    assert latest["rainfall"]["value"] == 2.5 and not latest["rainfall"]["degraded"]

    # A late reading does not replace a newer latest value.
    pipeline.accept(SENSOR, "water_level", 0.5, None, T0)
    await pipeline.flush()
    latest = {m["metric"]: m for m in pipeline.store.latest(SENSOR)}
    assert latest["water_level"]["value"] == pytest.approx(1.249)


async def test_a_reading_out_of_its_physical_range_is_refused_counted_and_marks_the_metric_degraded(
    pipeline: TelemetryPipeline,
) -> None:
    pipeline.accept(SENSOR, "water_level", 1.8, None, T0)
    assert not pipeline.accept(SENSOR, "water_level", 65.535, None, T0 + timedelta(seconds=1))
    assert not pipeline.accept(SENSOR, "water_level", -1.0, None, T0 + timedelta(seconds=2))
    assert not pipeline.accept(SENSOR, "water_level", float("nan"), None, T0 + timedelta(seconds=3))
    assert not pipeline.accept(SENSOR, "bad metric!", 1.0, None, T0)
    assert not pipeline.accept(SENSOR, "rainfall", 1.0, "a unit far too long to store", T0)
    await pipeline.flush()
    assert count_rows(pipeline, TelemetryRow) == 1  # only the good one
    water = next(m for m in pipeline.store.latest(SENSOR) if m["metric"] == "water_level")
    assert water["value"] == 1.8
    assert water["rejected_count"] == 3
    assert water["degraded"]
    assert "not a finite number" in water["last_rejected"]["reason"]
    # A good reading afterwards: healthy again, the count stays as history.
    pipeline.accept(SENSOR, "water_level", 1.9, None, T0 + timedelta(seconds=4))
    await pipeline.flush()
    water = next(m for m in pipeline.store.latest(SENSOR) if m["metric"] == "water_level")
    assert not water["degraded"] and water["rejected_count"] == 3


async def test_raw_and_bucketed_series(pipeline: TelemetryPipeline) -> None:
    for minute in range(20):
        pipeline.accept(SENSOR, "water_level", minute / 2, None, T0 + timedelta(minutes=minute))
    await pipeline.flush()
    raw = pipeline.store.series(SENSOR, start=T0, end=T0 + timedelta(minutes=3), step_s=None)
    assert raw["series"] == [
        {
            "metric": "water_level",
            "unit": "m",
            "points": [
                {"at": "2026-11-24T00:00:00Z", "value": 0.0},
                {"at": "2026-11-24T00:01:00Z", "value": 0.5},
                {"at": "2026-11-24T00:02:00Z", "value": 1.0},
            ],
        }
    ]
    buckets = pipeline.store.series(SENSOR, start=T0, end=T0 + timedelta(hours=1), step_s=600)
    (series,) = buckets["series"]
    assert series["points"] == [
        {"at": "2026-11-24T00:00:00Z", "mean": 2.25, "min": 0.0, "max": 4.5, "count": 10},
        {"at": "2026-11-24T00:10:00Z", "mean": 7.25, "min": 5.0, "max": 9.5, "count": 10},
    ]
    with pytest.raises(TelemetryQueryError) as caught:
        pipeline.store.series(SENSOR, start=T0, end=T0 + timedelta(days=365), step_s=1)
    assert caught.value.field == "step"
    with pytest.raises(TelemetryQueryError) as caught:
        pipeline.store.series(SENSOR, start=T0, end=T0, step_s=None)
    assert caught.value.field == "to"


async def test_old_readings_are_folded_into_buckets_and_queries_see_both(pipeline: TelemetryPipeline) -> None:
    # Two days of one reading a minute; the raw retention is 24 h, buckets are 5 minutes.
    for minute in range(2 * 24 * 60):
        pipeline.accept(SENSOR, "water_level", float(minute % 10), None, T0 + timedelta(minutes=minute))
    await pipeline.flush()
    now = T0 + timedelta(days=2)
    folded, removed = pipeline.store.maintain(now)
    assert folded == 24 * 60 and removed == 0
    assert count_rows(pipeline, TelemetryRow) == 24 * 60
    assert count_rows(pipeline, TelemetryRollupRow) == 24 * 60 // 5
    # The whole two days in hours: the first day from buckets, the second from raw readings, alike.
    hours = pipeline.store.series(SENSOR, start=T0, end=now, step_s=3600)["series"][0]["points"]
    assert len(hours) == 48
    assert all(h["count"] == 60 and h["mean"] == pytest.approx(4.5) for h in hours)
    assert all(h["min"] == 0.0 and h["max"] == 9.0 for h in hours)

    # A late reading for a folded bucket merges into it.
    pipeline.accept(SENSOR, "water_level", 100.0 / 20, None, T0 + timedelta(seconds=30))
    pipeline.accept(SENSOR, "water_level", 9.5, None, T0 + timedelta(seconds=40))
    await pipeline.flush()
    pipeline.store.maintain(now)
    first = pipeline.store.series(SENSOR, start=T0, end=T0 + timedelta(minutes=5), step_s=300)["series"][0][
        "points"
    ]
    assert first == [
        {"at": "2026-11-24T00:00:00Z", "mean": pytest.approx(24.5 / 7), "min": 0.0, "max": 9.5, "count": 7}
    ]

    # Buckets past their own retention go.
    short = reconfigured(
        pipeline, TelemetrySettings(raw_retention_hours=24, rollup_step_s=300, rollup_retention_days=1)
    )
    # A day later the second day is folded too, and both days of buckets are past one day's retention.
    assert short.store.maintain(now + timedelta(days=1)) == (24 * 60, 2 * 24 * 60 // 5)
    assert count_rows(pipeline, TelemetryRollupRow) == 0


async def test_the_backlog_is_bounded_and_says_so(pipeline: TelemetryPipeline) -> None:
    pipeline = reconfigured(pipeline, TelemetrySettings(max_pending=1000, batch_size=5000))
    accepted = sum(
        pipeline.accept(SENSOR, "rainfall", 1.0, None, T0 + timedelta(milliseconds=i)) for i in range(1500)
    )
    assert accepted == 1000
    await pipeline.flush()
    assert count_rows(pipeline, TelemetryRow) == 1000
    assert pipeline.accept(SENSOR, "rainfall", 1.0, None, T0)
