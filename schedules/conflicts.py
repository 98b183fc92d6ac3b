"""Clashes between schedules that share a device, found before a schedule is saved.

Pure: the caller gives each schedule's devices, priority and occurrence intervals; this module says
which pairs overlap and whether the request said how to settle them (DESIGN.md §2, Circular 39):
- emergency never conflicts: it takes the device;
- different priorities clash unless the request accepts that the higher one preempts the lower;
- two `priority` items of one ward may be settled by the staff's explicit order;
- two `normal` items at the same priority always clash: the ward picks another slot.

`DayWindows` and `utc_seconds_of_day` let a caller skip expanding a stored schedule whose starts cannot
come near the new schedule's intervals: a necessary condition on the time of day, never a verdict.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from schedules.recurrence import ScheduleTime

MAX_REPORTED_TIMES = 10
MAX_REPORTED_DEVICES = 20
DAY_S = 86_400
# Widens every window on each side, so that floating-point rounding can only let more through.
_MARGIN_S = 0.01


class Resolution(StrEnum):
    NONE = "none"
    PRIORITY = "priority"  # the higher priority preempts; the lower resumes or is missed, per its policy
    ORDER = "order"  # two priority-class items of one ward play in their `ward_order`


@dataclass(frozen=True, slots=True)
class Interval:
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class PlannedSchedule:
    id: str
    name: str
    priority_class: str
    rank: int
    devices: frozenset[str]
    intervals: Sequence[Interval]
    ward_order: int | None = None


@dataclass(frozen=True, slots=True)
class Clash:
    schedule_id: str
    schedule_name: str
    devices: tuple[str, ...]
    device_count: int
    times: tuple[Interval, ...]
    overlap_count: int
    why: str
    # How the request could settle it: "priority" (resolution=priority), "order" (distinct ward_order
    # with resolution=order), "time" (another time: nothing else settles it), "" when settled.
    remedy: str = ""


@dataclass(slots=True)
class ConflictReport:
    clashes: list[Clash] = field(default_factory=list)
    settled: list[Clash] = field(default_factory=list)

    @property
    def blocking(self) -> bool:
        return bool(self.clashes)


def overlapping(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """The overlaps of two sorted interval lists, in one merge pass."""
    found: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start = max(a[i].start, b[j].start)
        end = min(a[i].end, b[j].end)
        if start < end:
            found.append(Interval(start, end))
        if a[i].end <= b[j].end:
            i += 1
        else:
            j += 1
    return found


def _why_unsettled(candidate: PlannedSchedule, other: PlannedSchedule, resolution: Resolution) -> str | None:
    """None when the clash is settled; otherwise the reason it still blocks."""
    if "emergency" in (candidate.priority_class, other.priority_class):
        return None
    if candidate.rank != other.rank:
        if resolution is Resolution.PRIORITY:
            return None
        return "different priorities: send resolution=priority to let the higher one preempt"
    if candidate.priority_class == "priority":
        if (
            resolution is Resolution.ORDER
            and candidate.ward_order is not None
            and other.ward_order is not None
            and candidate.ward_order != other.ward_order
        ):
            return None
        return (
            "two priority items at the same priority: give both a distinct ward_order with resolution=order"
        )
    return "same priority: choose another time"


def _remedy(candidate: PlannedSchedule, other: PlannedSchedule) -> str:
    if candidate.rank != other.rank:
        return "priority"
    return "order" if candidate.priority_class == "priority" else "time"


def find_conflicts(
    candidate: PlannedSchedule, others: Sequence[PlannedSchedule], resolution: Resolution = Resolution.NONE
) -> ConflictReport:
    report = ConflictReport()
    for other in others:
        if other.id == candidate.id:
            continue
        shared = candidate.devices & other.devices
        if not shared:
            continue
        overlaps = overlapping(candidate.intervals, other.intervals)
        if not overlaps:
            continue
        why = _why_unsettled(candidate, other, resolution)
        clash = Clash(
            schedule_id=other.id,
            schedule_name=other.name,
            devices=tuple(sorted(shared))[:MAX_REPORTED_DEVICES],
            device_count=len(shared),
            times=tuple(overlaps[:MAX_REPORTED_TIMES]),
            overlap_count=len(overlaps),
            why=why or "settled",
            remedy=_remedy(candidate, other) if why else "",
        )
        (report.clashes if why else report.settled).append(clash)
    return report


# -- a quick necessary condition on the time of day -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DayWindows:
    """Where in the UTC day a schedule's intervals lie: (second of the day it starts, length) pairs.

    A daily rule's 60 intervals are one pair. `may_overlap` is False only when no interval of `length_s`
    starting at any of the given seconds of any day can overlap one of them.
    """

    spans: frozenset[tuple[float, float]]

    @classmethod
    def of(cls, intervals: Iterable[Interval]) -> DayWindows:
        return cls(
            frozenset(
                (interval.start.timestamp() % DAY_S, (interval.end - interval.start).total_seconds())
                for interval in intervals
            )
        )

    def may_overlap(self, seconds_of_day: Iterable[float], length_s: float) -> bool:
        seconds = tuple(seconds_of_day)
        for start, length in self.spans:
            # [s, s + length_s) meets [start, start + length) iff s is in (start - length_s, start + length).
            reach = length + length_s + 2 * _MARGIN_S
            if reach >= DAY_S:
                return True
            opens = start - length_s - _MARGIN_S
            if any((second - opens) % DAY_S <= reach for second in seconds):
                return True
        return False


def utc_seconds_of_day(timing: ScheduleTime, start: datetime, end: datetime) -> frozenset[float]:
    """Every second of the UTC day at which `timing` can start an occurrence between `start` and `end`.

    Its wall times are DTSTART's, or the BYHOUR × BYMINUTE combinations at DTSTART's second (as
    schedules.recurrence produces them); each becomes an instant at one of the UTC offsets its zone uses
    around the window (a wall time in a DST gap is read with the offset before the gap, also one of them).
    """
    dtstart = timing.dtstart
    rule = timing.rule
    hours = (rule.by_hour or (dtstart.hour,)) if rule is not None else (dtstart.hour,)
    minutes = (rule.by_minute or (dtstart.minute,)) if rule is not None else (dtstart.minute,)
    walls = [hour * 3600 + minute * 60 + dtstart.second for hour in hours for minute in minutes]
    offsets = _utc_offsets(
        timing.zone, _hour_floor(start) - timedelta(days=2), _hour_floor(end) + timedelta(days=3)
    )
    return frozenset((wall - offset) % DAY_S for wall in walls for offset in offsets)


def _hour_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@functools.lru_cache(maxsize=256)
def _utc_offsets(zone: ZoneInfo, start: datetime, end: datetime) -> frozenset[float]:
    """The UTC offsets (seconds) `zone` uses from `start` to `end`, sampled hourly (tzdata has no offset
    that lasts less than an hour)."""
    found: set[float] = set()
    moment = start
    while moment <= end:
        offset = moment.astimezone(zone).utcoffset()
        found.add(offset.total_seconds() if offset is not None else 0.0)
        moment += timedelta(hours=1)
    return frozenset(found)
