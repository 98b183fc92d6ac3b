"""Clashes between schedules that share a device, found before a schedule is saved.

Pure: the caller gives each schedule's devices, priority and occurrence intervals; this module says
which pairs overlap and whether the request said how to settle them (DESIGN.md §2, Circular 39):
- emergency never conflicts: it takes the device;
- different priorities clash unless the request accepts that the higher one preempts the lower;
- two `priority` items of one ward may be settled by the staff's explicit order;
- two `normal` items at the same priority always clash: the ward picks another slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

MAX_REPORTED_TIMES = 10
MAX_REPORTED_DEVICES = 20


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
        )
        (report.clashes if why else report.settled).append(clash)
    return report
