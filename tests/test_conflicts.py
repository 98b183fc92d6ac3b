from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schedules.conflicts import (
    DayWindows,
    Interval,
    PlannedSchedule,
    Resolution,
    find_conflicts,
    overlapping,
    utc_seconds_of_day,
)
from schedules.recurrence import ScheduleTime, expand, validate_schedule_time

T0 = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)


def slots(*minutes: int, length: int = 10) -> list[Interval]:
    return [Interval(T0 + timedelta(minutes=m), T0 + timedelta(minutes=m + length)) for m in minutes]


def planned(
    sid: str,
    cls: str = "normal",
    sub: int = 0,
    devices: tuple[str, ...] = ("d1", "d2"),
    intervals: list[Interval] | None = None,
    order: int | None = None,
) -> PlannedSchedule:
    band = {"normal": 0, "priority": 1, "emergency": 2}[cls]
    return PlannedSchedule(
        sid,
        f"Lịch {sid}",
        cls,
        band * 256 + sub,
        frozenset(devices),
        intervals if intervals is not None else slots(0),
        order,
    )


def test_same_priority_normal_items_clash_and_name_devices_and_times():
    report = find_conflicts(planned("new", devices=("d1", "d3")), [planned("old")])
    assert report.blocking
    (clash,) = report.clashes
    assert clash.schedule_id == "old"
    assert clash.devices == ("d1",)
    assert clash.times == (Interval(T0, T0 + timedelta(minutes=10)),)


def test_no_shared_device_or_no_overlap_is_no_clash():
    assert not find_conflicts(planned("new", devices=("d9",)), [planned("old")]).blocking
    assert not find_conflicts(planned("new", intervals=slots(10)), [planned("old")]).blocking


def test_emergency_never_conflicts():
    assert not find_conflicts(planned("new", "emergency"), [planned("old")]).blocking
    assert not find_conflicts(planned("new"), [planned("old", "emergency")]).blocking


def test_different_priorities_need_an_explicit_resolution():
    report = find_conflicts(planned("new", "priority"), [planned("old")])
    assert report.blocking and "resolution=priority" in report.clashes[0].why
    settled = find_conflicts(planned("new", "priority"), [planned("old")], Resolution.PRIORITY)
    assert not settled.blocking and settled.settled


def test_two_priority_items_of_a_ward_are_settled_by_their_order():
    old = planned("old", "priority", order=1)
    assert find_conflicts(planned("new", "priority", order=2), [old]).blocking
    assert not find_conflicts(planned("new", "priority", order=2), [old], Resolution.ORDER).blocking
    assert find_conflicts(planned("new", "priority", order=1), [old], Resolution.ORDER).blocking
    assert find_conflicts(planned("new", "normal"), [planned("old", "normal")], Resolution.ORDER).blocking


intervals = st.lists(st.tuples(st.integers(0, 500), st.integers(1, 60)), max_size=15).map(
    lambda pairs: sorted(
        {Interval(T0 + timedelta(minutes=s), T0 + timedelta(minutes=s + n)) for s, n in pairs},
        key=lambda i: (i.start, i.end),
    )
)


def _disjoint(items: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for item in items:
        if merged and item.start < merged[-1].end:
            continue
        merged.append(item)
    return merged


@given(intervals, intervals)
def test_overlapping_agrees_with_brute_force(a, b):
    a, b = _disjoint(a), _disjoint(b)
    brute = sorted(
        (
            Interval(max(x.start, y.start), min(x.end, y.end))
            for x in a
            for y in b
            if max(x.start, y.start) < min(x.end, y.end)
        ),
        key=lambda i: i.start,
    )
    assert overlapping(a, b) == brute


@pytest.mark.parametrize("cls", ["normal", "priority"])
def test_a_schedule_never_clashes_with_itself(cls):
    assert not find_conflicts(planned("same", cls), [planned("same", cls)]).blocking


# -- the time-of-day prefilter may let too much through, never too little ------------------------------

_ZONES = st.sampled_from(["Asia/Ho_Chi_Minh", "Europe/Berlin", "America/New_York", "UTC"])
_RULES = st.sampled_from(
    [
        None,
        "FREQ=DAILY",
        "FREQ=DAILY;INTERVAL=3",
        "FREQ=WEEKLY;BYDAY=MO,WE,FR",
        "FREQ=DAILY;BYHOUR=6,17;BYMINUTE=0,30",
        "FREQ=MONTHLY;BYDAY=-1FR",
    ]
)
# Wall times in the schedule's own zone, naive on purpose (as a DTSTART is written).
_WALL_TIMES = st.datetimes(
    min_value=datetime(2026, 1, 1),  # noqa: DTZ001
    max_value=datetime(2026, 4, 15),  # noqa: DTZ001
).map(lambda moment: moment.replace(second=0, microsecond=0))


@given(_RULES, _WALL_TIMES, _ZONES, _RULES, _WALL_TIMES, _ZONES, st.integers(1, 7200), st.integers(1, 7200))
def test_day_windows_never_hide_a_real_overlap(
    rule_a, start_a, zone_a, rule_b, start_b, zone_b, len_a, len_b
):
    window_start = datetime(2026, 3, 1, tzinfo=UTC)
    window_end = window_start + timedelta(days=60)

    def timing(rule: str | None, start: datetime, zone: str) -> ScheduleTime:
        return validate_schedule_time(rule, start.isoformat(), zone, ())

    def intervals(time: ScheduleTime, length_s: int) -> list[Interval]:
        starts = expand(time.rule, time.dtstart, start=window_start, end=window_end, exdates=time.exdates)
        return [Interval(s, s + timedelta(seconds=length_s)) for s in starts]

    a, b = timing(rule_a, start_a, zone_a), timing(rule_b, start_b, zone_b)
    a_intervals, b_intervals = intervals(a, len_a), intervals(b, len_b)
    if overlapping(_disjoint(a_intervals), _disjoint(b_intervals)):
        seconds = utc_seconds_of_day(b, window_start, window_end)
        assert DayWindows.of(a_intervals).may_overlap(seconds, len_b)
