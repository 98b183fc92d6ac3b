"""APScheduler drives the firing; the database stays the source of truth.

One job per schedule, at its next planned instant. The job store is in memory on purpose: it is
rebuilt from the database at every start, so there is never a second copy of the programme to
drift from the first.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

FireCallback = Callable[[str, datetime], Awaitable[None]]


class OccurrenceScheduler:
    def __init__(self, fire: FireCallback, *, misfire_grace_s: int = 3600) -> None:
        self._fire = fire
        self._scheduler = AsyncIOScheduler(
            timezone="UTC",
            job_defaults={"coalesce": False, "max_instances": 1, "misfire_grace_time": misfire_grace_s},
            logger=logging.getLogger("apscheduler"),
        )

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def plan(self, schedule_id: str, at: datetime | None) -> None:
        """Fire `schedule_id` at `at` (an aware instant), replacing its planned job; None unplans it."""
        if at is None:
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(schedule_id)
            return
        self._scheduler.add_job(
            self._fire,
            trigger=DateTrigger(run_date=at),
            args=(schedule_id, at),
            id=schedule_id,
            replace_existing=True,
        )

    def planned_at(self, schedule_id: str) -> datetime | None:
        job = self._scheduler.get_job(schedule_id)
        run_at: datetime | None = job.next_run_time if job is not None else None
        return run_at

    @property
    def job_count(self) -> int:
        return len(self._scheduler.get_jobs())
