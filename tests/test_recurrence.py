"""The recurrence engine: ward programmes, every error's field, and python-dateutil as an oracle.

dateutil is a second, independent RFC 5545 implementation; the property tests generate rules and
windows and require both to agree. The generators stay clear of the two places where dateutil
departs from RFC 5545 on purpose-built rules (documented in schedules/recurrence.py, and pinned
here by unit tests): BYDAY mixing plain and ordinal weekdays, and BYSETPOS in the first week of a
WEEKLY rule whose DTSTART is not on WKST.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as datetime_module
import pickle
import time as clock
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from dateutil import rrule as dateutil_rrule
from hypothesis import event, given, settings
from hypothesis import strategies as st

from schedules.recurrence import (
    Frequency,
    RecurrenceError,
    RecurrenceRule,
    Weekday,
    WeekdayRule,
    expand,
    first_occurrence,
    next_after,
    parse_rrule,
    validate_schedule_time,
)

HCM = ZoneInfo("Asia/Ho_Chi_Minh")
BERLIN = ZoneInfo("Europe/Berlin")
WEEKDAY_CODES = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, zone: ZoneInfo = HCM) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=zone)


def occurrences(
    text: str | None,
    dtstart: datetime,
    start: datetime,
    end: datetime,
    exdates: Sequence[datetime] = (),
) -> list[datetime]:
    rule = None if text is None else parse_rrule(text)
    return expand(rule, dtstart, start=start, end=end, exdates=exdates)


def days_of(moments: Sequence[datetime]) -> list[date]:
    return [moment.date() for moment in moments]


# --- ward programmes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("hour", "minute"), [(6, 0), (17, 30)])
def test_bulletins_monday_to_saturday(hour: int, minute: int) -> None:
    dtstart = at(2025, 6, 2, hour, minute)  # a Monday
    found = occurrences("FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA", dtstart, at(2025, 6, 1), at(2025, 6, 15))
    assert len(found) == 12
    assert all(moment.weekday() != calendar.SUNDAY for moment in found)
    assert {(moment.hour, moment.minute) for moment in found} == {(hour, minute)}
    assert all(moment.tzinfo is HCM and moment.utcoffset() == timedelta(hours=7) for moment in found)


def test_thursday_evening() -> None:
    found = occurrences("FREQ=WEEKLY;BYDAY=TH", at(2025, 6, 5, 19), at(2025, 6, 1), at(2025, 7, 1))
    assert found == [at(2025, 6, day, 19) for day in (5, 12, 19, 26)]


def test_weekly_without_byday_repeats_dtstart_weekday() -> None:
    found = occurrences("FREQ=WEEKLY", at(2025, 6, 5, 19), at(2025, 6, 1), at(2025, 6, 20))
    assert found == [at(2025, 6, day, 19) for day in (5, 12, 19)]


def test_last_friday_of_each_month() -> None:
    found = occurrences("FREQ=MONTHLY;BYDAY=-1FR", at(2025, 1, 1, 8), at(2025, 1, 1), at(2026, 1, 1))
    last_fridays = [(1, 31), (2, 28), (3, 28), (4, 25), (5, 30), (6, 27), (7, 25), (8, 29), (9, 26), (10, 31)]
    assert days_of(found) == [date(2025, month, day) for month, day in [*last_fridays, (11, 28), (12, 26)]]


def test_second_monday_of_each_month() -> None:
    found = occurrences("FREQ=MONTHLY;BYDAY=2MO", at(2025, 1, 1, 8), at(2025, 1, 1), at(2025, 7, 1))
    assert days_of(found) == [
        date(2025, month, day) for month, day in [(1, 13), (2, 10), (3, 10), (4, 14)]
    ] + [
        date(2025, 5, 12),
        date(2025, 6, 9),
    ]


def test_last_weekday_of_the_month_by_setpos() -> None:
    found = occurrences(
        "FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-1", at(2025, 1, 1, 16), at(2025, 1, 1), at(2025, 9, 1)
    )
    # May 31 and Aug 31 fall on a weekend, so the last weekday is the Friday before.
    assert days_of(found) == [
        date(2025, month, day) for month, day in [(1, 31), (2, 28), (3, 31), (4, 30), (5, 30), (6, 30)]
    ] + [date(2025, 7, 31), date(2025, 8, 29)]


def test_rfc5545_example_third_tuesday_wednesday_or_thursday() -> None:
    # RFC 5545 §3.8.5.3: "the third instance into the month of one of Tuesday, Wednesday, or Thursday".
    dtstart = at(1997, 9, 4, 9)
    found = occurrences("FREQ=MONTHLY;COUNT=3;BYDAY=TU,WE,TH;BYSETPOS=3", dtstart, dtstart, at(1998, 1, 1))
    assert days_of(found) == [date(1997, 9, 4), date(1997, 10, 7), date(1997, 11, 6)]


@pytest.mark.parametrize(
    ("week_start", "expected_days"),
    [("MO", [5, 10, 19, 24]), ("SU", [5, 17, 19, 31])],
)
def test_rfc5545_example_week_start_changes_biweekly_days(week_start: str, expected_days: list[int]) -> None:
    dtstart = at(1997, 8, 5, 9)
    text = f"FREQ=WEEKLY;INTERVAL=2;COUNT=4;BYDAY=TU,SU;WKST={week_start}"
    assert days_of(occurrences(text, dtstart, dtstart, at(1997, 10, 1))) == [
        date(1997, 8, day) for day in expected_days
    ]


def test_bymonthday_31_skips_short_months() -> None:
    found = occurrences("FREQ=MONTHLY;BYMONTHDAY=31", at(2025, 1, 31, 7), at(2025, 1, 1), at(2026, 1, 1))
    assert [moment.month for moment in found] == [1, 3, 5, 7, 8, 10, 12]


def test_monthly_without_bymonthday_keeps_dtstart_day_and_skips_short_months() -> None:
    found = occurrences("FREQ=MONTHLY", at(2025, 1, 30, 7), at(2025, 1, 1), at(2025, 6, 1))
    assert days_of(found) == [date(2025, 1, 30), date(2025, 3, 30), date(2025, 4, 30), date(2025, 5, 30)]


def test_bymonthday_minus_one_is_the_last_day() -> None:
    found = occurrences("FREQ=MONTHLY;BYMONTHDAY=-1", at(2024, 1, 31, 7), at(2024, 1, 1), at(2024, 5, 1))
    assert days_of(found) == [date(2024, 1, 31), date(2024, 2, 29), date(2024, 3, 31), date(2024, 4, 30)]


@pytest.mark.parametrize(
    "text", ["FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29", "FREQ=MONTHLY;BYMONTH=2;BYMONTHDAY=29", "FREQ=YEARLY"]
)
def test_february_29_only_in_leap_years(text: str) -> None:
    dtstart = at(2024, 2, 29, 7)
    found = occurrences(text, dtstart, dtstart, at(2033, 1, 1))
    assert days_of(found) == [date(2024, 2, 29), date(2028, 2, 29), date(2032, 2, 29)]


def test_count_counts_from_dtstart_not_from_the_window() -> None:
    dtstart = at(2025, 6, 2, 6)
    assert len(occurrences("FREQ=DAILY;COUNT=5", dtstart, dtstart, at(2026, 1, 1))) == 5
    assert days_of(occurrences("FREQ=DAILY;COUNT=5", dtstart, at(2025, 6, 5), at(2026, 1, 1))) == [
        date(2025, 6, 5),
        date(2025, 6, 6),
    ]
    assert occurrences("FREQ=DAILY;COUNT=5", dtstart, at(2025, 6, 7), at(2026, 1, 1)) == []


def test_count_is_not_reduced_by_exdates() -> None:
    dtstart = at(2025, 6, 2, 6)
    found = occurrences("FREQ=DAILY;COUNT=3", dtstart, dtstart, at(2026, 1, 1), exdates=[at(2025, 6, 3, 6)])
    assert days_of(found) == [date(2025, 6, 2), date(2025, 6, 4)]


@pytest.mark.parametrize(
    "until",
    [
        "20250605T060000",  # floating: wall time in the schedule's zone
        "20250604T230000Z",  # the same instant in UTC
        "20250605",  # a date: that whole local day
    ],
)
def test_until_is_inclusive(until: str) -> None:
    dtstart = at(2025, 6, 2, 6)
    found = occurrences(f"FREQ=DAILY;UNTIL={until}", dtstart, dtstart, at(2026, 1, 1))
    assert found[-1] == at(2025, 6, 5, 6)
    assert len(found) == 4


def test_until_one_second_early_excludes_the_last_day() -> None:
    dtstart = at(2025, 6, 2, 6)
    found = occurrences("FREQ=DAILY;UNTIL=20250604T225959Z", dtstart, dtstart, at(2026, 1, 1))
    assert found[-1] == at(2025, 6, 4, 6)


def test_exdates_match_local_wall_time_naive_or_aware() -> None:
    dtstart = at(2025, 9, 1, 6)
    holiday = datetime(2025, 9, 2, 6, 0)  # noqa: DTZ001 - a naive EXDATE is a local wall time
    same_instant_in_utc = at(2025, 9, 3, 6).astimezone(UTC)
    not_an_occurrence = at(2025, 9, 4, 7)
    found = occurrences(
        "FREQ=DAILY",
        dtstart,
        dtstart,
        at(2025, 9, 6),
        exdates=[holiday, same_instant_in_utc, not_an_occurrence],
    )
    assert days_of(found) == [date(2025, 9, 1), date(2025, 9, 4), date(2025, 9, 5)]


def test_window_is_half_open() -> None:
    dtstart = at(2025, 6, 2, 6)
    assert days_of(occurrences("FREQ=DAILY", dtstart, at(2025, 6, 3, 6), at(2025, 6, 5, 6))) == [
        date(2025, 6, 3),
        date(2025, 6, 4),
    ]


def test_window_in_another_zone_compares_instants() -> None:
    dtstart = at(2025, 6, 2, 6)
    start = at(2025, 6, 2, 23, 0, zone=ZoneInfo("UTC"))  # 06:00 on June 3 in Hà Nội
    found = occurrences("FREQ=DAILY", dtstart, start, start + timedelta(days=1))
    assert found == [at(2025, 6, 3, 6)]
    assert found[0].tzinfo is HCM


def test_one_off_is_dtstart_when_in_window_and_not_excluded() -> None:
    dtstart = at(2025, 6, 2, 6)
    assert occurrences(None, dtstart, at(2025, 6, 1), at(2025, 6, 3)) == [dtstart]
    assert occurrences(None, dtstart, at(2025, 6, 2, 6, 1), at(2025, 6, 3)) == []
    assert occurrences(None, dtstart, at(2025, 6, 1), at(2025, 6, 3), exdates=[dtstart]) == []
    assert next_after(None, dtstart, at(2025, 6, 1)) == dtstart
    assert next_after(None, dtstart, dtstart) is None


def test_dtstart_off_the_rule_is_not_an_occurrence_and_not_counted() -> None:
    sunday = at(2025, 6, 1, 6)
    found = occurrences("FREQ=WEEKLY;BYDAY=MO;COUNT=2", sunday, sunday, at(2026, 1, 1))
    assert days_of(found) == [date(2025, 6, 2), date(2025, 6, 9)]


def test_byday_list_is_a_union_of_plain_and_ordinal_weekdays() -> None:
    found = occurrences("FREQ=MONTHLY;BYDAY=MO,-1FR", at(2025, 6, 1, 8), at(2025, 6, 1), at(2025, 7, 1))
    assert days_of(found) == [date(2025, 6, day) for day in (2, 9, 16, 23, 27, 30)]


def test_weekly_bysetpos_picks_from_the_whole_first_week() -> None:
    # The first week's set is Mon 2 / Wed 4 / Fri 6; its first member precedes DTSTART (RFC 5545).
    wednesday = at(2025, 6, 4, 8)
    found = occurrences("FREQ=WEEKLY;BYDAY=MO,WE,FR;BYSETPOS=1", wednesday, wednesday, at(2025, 6, 20))
    assert days_of(found) == [date(2025, 6, 9), date(2025, 6, 16)]


def test_byhour_and_byminute_multiply_and_bysetpos_picks_among_them() -> None:
    dtstart = at(2025, 6, 2, 6)
    assert [
        (moment.hour, moment.minute)
        for moment in occurrences("FREQ=DAILY;BYHOUR=6,17;BYMINUTE=0,30", dtstart, dtstart, at(2025, 6, 3))
    ] == [(6, 0), (6, 30), (17, 0), (17, 30)]
    assert [
        (moment.hour, moment.minute)
        for moment in occurrences(
            "FREQ=DAILY;BYHOUR=6,17;BYMINUTE=0,30;BYSETPOS=1,-1", dtstart, dtstart, at(2025, 6, 3)
        )
    ] == [(6, 0), (17, 30)]


def test_yearly_ordinal_counts_in_the_year_unless_bymonth_narrows_it() -> None:
    dtstart = at(2025, 1, 1, 8)
    # The 20th Monday of 2025 is May 19; the last Monday of May is May 26.
    assert days_of(occurrences("FREQ=YEARLY;BYDAY=20MO", dtstart, dtstart, at(2026, 1, 1))) == [
        date(2025, 5, 19)
    ]
    assert days_of(occurrences("FREQ=YEARLY;BYMONTH=5;BYDAY=-1MO", dtstart, dtstart, at(2026, 1, 1))) == [
        date(2025, 5, 26)
    ]


def test_next_after_is_strictly_after() -> None:
    rule = parse_rrule("FREQ=WEEKLY;BYDAY=TH")
    dtstart = at(2025, 6, 5, 19)
    assert next_after(rule, dtstart, dtstart) == at(2025, 6, 12, 19)
    assert next_after(rule, dtstart, dtstart - timedelta(seconds=1)) == dtstart
    assert next_after(rule, dtstart, dtstart, exdates=[at(2025, 6, 12, 19)]) == at(2025, 6, 19, 19)
    assert next_after(parse_rrule("FREQ=WEEKLY;COUNT=2"), dtstart, at(2025, 6, 12, 19)) is None


def test_first_occurrence_is_dtstart_only_when_the_rule_produces_it() -> None:
    thursday_rule = parse_rrule("FREQ=WEEKLY;BYDAY=TH")
    assert first_occurrence(thursday_rule, at(2025, 6, 5, 19)) == at(2025, 6, 5, 19)
    assert first_occurrence(thursday_rule, at(2025, 6, 4, 19)) == at(2025, 6, 5, 19)
    assert first_occurrence(thursday_rule, at(2025, 6, 5, 19), exdates=[at(2025, 6, 5, 19)]) == at(
        2025, 6, 12, 19
    )
    assert first_occurrence(parse_rrule("FREQ=MONTHLY;BYMONTH=2;BYMONTHDAY=30"), at(2025, 6, 5, 19)) is None


def test_the_ends_of_the_calendar_do_not_overflow() -> None:
    rule = parse_rrule("FREQ=DAILY;COUNT=3")
    dtstart = at(2025, 6, 2, 6)
    forever = (datetime.min.replace(tzinfo=HCM), datetime.max.replace(tzinfo=HCM))
    assert len(expand(rule, dtstart, start=forever[0], end=forever[1])) == 3
    assert next_after(rule, dtstart, forever[0]) == dtstart
    west = ZoneInfo("America/New_York")
    assert (
        expand(None, at(9999, 12, 31, 23, zone=west), start=at(9999, 12, 31, zone=west), end=forever[1]) == []
    )


def test_expansion_beyond_the_limit_is_an_error_not_a_truncation() -> None:
    dtstart = at(2025, 1, 1, 6)
    with pytest.raises(RecurrenceError) as caught:
        expand(parse_rrule("FREQ=DAILY"), dtstart, start=dtstart, end=at(2026, 1, 1), limit=100)
    assert caught.value.field == "window"


@pytest.mark.parametrize("name", ["dtstart", "start", "end"])
def test_naive_datetimes_are_refused(name: str) -> None:
    moments = {"dtstart": at(2025, 1, 1, 6), "start": at(2025, 1, 1), "end": at(2025, 2, 1)}
    moments[name] = moments[name].replace(tzinfo=None)
    with pytest.raises(RecurrenceError) as caught:
        expand(parse_rrule("FREQ=DAILY"), moments["dtstart"], start=moments["start"], end=moments["end"])
    assert caught.value.field == name


def test_a_window_decades_after_dtstart_does_not_walk_from_dtstart() -> None:
    # Walking day by day from year 1 would take seconds; jumping to the window takes microseconds.
    dtstart = datetime(1, 1, 1, 6, tzinfo=UTC)
    started = clock.perf_counter()
    found = expand(parse_rrule("FREQ=DAILY"), dtstart, start=at(9000, 1, 1), end=at(9000, 3, 2))
    assert clock.perf_counter() - started < 1.0
    assert len(found) == 60


# --- DST zones: RFC 5545 §3.3.5 ---------------------------------------------------------------


def test_wall_time_in_a_dst_gap_plays_after_the_gap() -> None:
    dtstart = at(2025, 3, 28, 2, 30, zone=BERLIN)
    found = occurrences("FREQ=DAILY", dtstart, dtstart, at(2025, 4, 1, zone=BERLIN))
    assert [moment.isoformat() for moment in found] == [
        "2025-03-28T02:30:00+01:00",
        "2025-03-29T02:30:00+01:00",
        "2025-03-30T03:30:00+02:00",  # 02:30 does not exist that night
        "2025-03-31T02:30:00+02:00",
    ]


def test_repeated_wall_time_means_the_first_one() -> None:
    dtstart = at(2025, 10, 25, 2, 30, zone=BERLIN)
    found = occurrences("FREQ=DAILY", dtstart, dtstart, at(2025, 10, 28, zone=BERLIN))
    assert [moment.isoformat() for moment in found] == [
        "2025-10-25T02:30:00+02:00",
        "2025-10-26T02:30:00+02:00",
        "2025-10-27T02:30:00+01:00",
    ]


def test_wall_times_collapsing_in_a_dst_gap_give_one_occurrence() -> None:
    dtstart = at(2025, 3, 30, 0, 30, zone=BERLIN)
    found = occurrences("FREQ=DAILY;BYHOUR=2,3;BYMINUTE=30", dtstart, dtstart, at(2025, 3, 31, zone=BERLIN))
    assert [moment.isoformat() for moment in found] == ["2025-03-30T03:30:00+02:00"]


def test_a_gap_can_move_an_occurrence_past_the_next_periods_first() -> None:
    # Samoa skipped 2011-12-30 whole: Friday's 10:00 lands on Saturday 10:00, after Saturday's 09:00,
    # which belongs to the next week (WKST=SA). Both expand and next_after must still order them.
    apia = ZoneInfo("Pacific/Apia")
    rule = parse_rrule("FREQ=WEEKLY;WKST=SA;BYDAY=FR,SA;BYHOUR=9,10;BYSETPOS=1,-1")
    dtstart = at(2011, 12, 24, 9, zone=apia)
    found = expand(rule, dtstart, start=dtstart, end=at(2012, 1, 7, zone=apia))
    assert [moment.isoformat() for moment in found] == [
        "2011-12-24T09:00:00-10:00",
        "2011-12-31T09:00:00+14:00",
        "2011-12-31T10:00:00+14:00",
        "2012-01-06T10:00:00+14:00",
    ]
    assert next_after(rule, dtstart, at(2011, 12, 29, 12, zone=apia)) == at(2011, 12, 31, 9, zone=apia)


# --- parsing, printing and errors ---------------------------------------------------------------


def test_parse_builds_the_rule() -> None:
    rule = parse_rrule(
        "rrule:freq=monthly;interval=2;byday=+2mo,-1fr;bysetpos=1;wkst=su;until=20251231T170000z"
    )
    assert rule == RecurrenceRule(
        frequency=Frequency.MONTHLY,
        interval=2,
        until=datetime(2025, 12, 31, 17, tzinfo=UTC),
        by_weekday=(WeekdayRule(Weekday.FR, -1), WeekdayRule(Weekday.MO, 2)),
        by_set_position=(1,),
        week_start=Weekday.SU,
    )


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("BYDAY=SA,MO,TU,MO;FREQ=WEEKLY", "FREQ=WEEKLY;BYDAY=MO,TU,SA"),
        ("FREQ=MONTHLY;BYDAY=-1FR", "FREQ=MONTHLY;BYDAY=-1FR"),
        ("FREQ=MONTHLY;BYSETPOS=-1;BYDAY=FR,TH,WE,TU,MO", "FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-1"),
        ("FREQ=DAILY;INTERVAL=1;WKST=MO", "FREQ=DAILY"),
        ("FREQ=DAILY;UNTIL=20251231", "FREQ=DAILY;UNTIL=20251231"),
        ("FREQ=DAILY;UNTIL=20251231T235959", "FREQ=DAILY;UNTIL=20251231T235959"),
        ("FREQ=YEARLY;BYMONTHDAY=+29,-1;BYMONTH=2;COUNT=3", "FREQ=YEARLY;COUNT=3;BYMONTH=2;BYMONTHDAY=-1,29"),
        ("  FREQ=WEEKLY ; BYDAY=TH ;", "FREQ=WEEKLY;BYDAY=TH"),
    ],
)
def test_to_text_is_canonical_and_round_trips(text: str, canonical: str) -> None:
    rule = parse_rrule(text)
    assert rule.to_text() == canonical
    assert parse_rrule(rule.to_text()) == rule


def test_aware_until_in_another_zone_is_printed_in_utc() -> None:
    rule = RecurrenceRule(Frequency.DAILY, until=at(2025, 6, 5, 6))
    assert rule.to_text() == "FREQ=DAILY;UNTIL=20250604T230000Z"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "rrule"),
        ("RRULE:", "rrule"),
        ("FREQ=DAILY;COUNT", "rrule"),
        ("BYDAY=MO", "rrule.FREQ"),
        ("FREQ=HOURLY", "rrule.FREQ"),
        ("FREQ=FORTNIGHTLY", "rrule.FREQ"),
        ("FREQ=DAILY;FREQ=WEEKLY", "rrule.FREQ"),
        ("FREQ=DAILY;INTERVAL=0", "rrule.INTERVAL"),
        ("FREQ=DAILY;INTERVAL=-2", "rrule.INTERVAL"),
        ("FREQ=DAILY;INTERVAL=two", "rrule.INTERVAL"),
        ("FREQ=DAILY;COUNT=0", "rrule.COUNT"),
        ("FREQ=DAILY;COUNT=", "rrule.COUNT"),
        ("FREQ=DAILY;COUNT=3;UNTIL=20250101", "rrule.COUNT"),
        ("FREQ=DAILY;UNTIL=20250230", "rrule.UNTIL"),
        ("FREQ=DAILY;UNTIL=2025-01-01", "rrule.UNTIL"),
        ("FREQ=DAILY;UNTIL=20250101T250000Z", "rrule.UNTIL"),
        ("FREQ=DAILY;UNTIL=20250101T0600", "rrule.UNTIL"),
        ("FREQ=WEEKLY;BYDAY=2MO", "rrule.BYDAY"),
        ("FREQ=DAILY;BYDAY=-1FR", "rrule.BYDAY"),
        ("FREQ=MONTHLY;BYDAY=6MO", "rrule.BYDAY"),
        ("FREQ=YEARLY;BYMONTH=5;BYDAY=-6MO", "rrule.BYDAY"),
        ("FREQ=YEARLY;BYDAY=54MO", "rrule.BYDAY"),
        ("FREQ=MONTHLY;BYDAY=0MO", "rrule.BYDAY"),
        ("FREQ=MONTHLY;BYDAY=XX", "rrule.BYDAY"),
        ("FREQ=MONTHLY;BYDAY=MO,,TU", "rrule.BYDAY"),
        ("FREQ=MONTHLY;BYDAY=MO;BYDAY=TU", "rrule.BYDAY"),
        ("FREQ=MONTHLY;BYMONTHDAY=0", "rrule.BYMONTHDAY"),
        ("FREQ=MONTHLY;BYMONTHDAY=32", "rrule.BYMONTHDAY"),
        ("FREQ=MONTHLY;BYMONTHDAY=-32", "rrule.BYMONTHDAY"),
        ("FREQ=WEEKLY;BYMONTHDAY=1", "rrule.BYMONTHDAY"),
        ("FREQ=MONTHLY;BYMONTH=0", "rrule.BYMONTH"),
        ("FREQ=MONTHLY;BYMONTH=13", "rrule.BYMONTH"),
        ("FREQ=DAILY;BYHOUR=24", "rrule.BYHOUR"),
        ("FREQ=DAILY;BYMINUTE=60", "rrule.BYMINUTE"),
        ("FREQ=MONTHLY;BYSETPOS=1", "rrule.BYSETPOS"),
        ("FREQ=MONTHLY;BYDAY=MO;BYSETPOS=0", "rrule.BYSETPOS"),
        ("FREQ=MONTHLY;BYDAY=MO;BYSETPOS=367", "rrule.BYSETPOS"),
        ("FREQ=DAILY;WKST=XX", "rrule.WKST"),
        ("FREQ=DAILY;COLOR=RED", "rrule.COLOR"),
        ("FREQ=DAILY;BYSECOND=0", "rrule.BYSECOND"),
        ("FREQ=YEARLY;BYWEEKNO=1", "rrule.BYWEEKNO"),
        ("FREQ=YEARLY;BYYEARDAY=1", "rrule.BYYEARDAY"),
    ],
)
def test_every_rule_error_names_its_part(text: str, field: str) -> None:
    with pytest.raises(RecurrenceError) as caught:
        parse_rrule(text)
    assert caught.value.field == field
    assert caught.value.detail
    assert str(caught.value).startswith(f"{field}: ")


def test_rules_built_in_code_are_checked_like_parsed_ones() -> None:
    with pytest.raises(RecurrenceError) as caught:
        RecurrenceRule(Frequency.WEEKLY, by_weekday=(WeekdayRule(Weekday.MO, 1),))
    assert caught.value.field == "rrule.BYDAY"


def test_recurrence_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(RecurrenceError("rrule.BYDAY", "bad")))  # noqa: S301 - our own bytes
    assert (error.field, error.detail) == ("rrule.BYDAY", "bad")


# --- schedule validation ----------------------------------------------------------------------


def test_validate_a_ward_schedule() -> None:
    checked = validate_schedule_time(
        "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA", "2025-06-01T17:30", "Asia/Ho_Chi_Minh", ["2025-06-02T17:30"]
    )
    assert checked.dtstart == at(2025, 6, 1, 17, 30)
    assert checked.zone is HCM
    assert checked.exdates == (at(2025, 6, 2, 17, 30),)
    assert checked.first_occurrence == at(2025, 6, 3, 17, 30)  # Sunday is off the rule, Monday excluded
    assert not checked.dtstart_is_occurrence


@pytest.mark.parametrize("rrule_text", [None, "", "   "])
def test_validate_a_one_off(rrule_text: str | None) -> None:
    checked = validate_schedule_time(rrule_text, "2025-06-02T06:00:00+07:00", "Asia/Ho_Chi_Minh", [])
    assert checked.rule is None
    assert checked.first_occurrence == checked.dtstart == at(2025, 6, 2, 6)
    assert checked.dtstart_is_occurrence


def test_validate_accepts_a_datetime_in_the_zone() -> None:
    checked = validate_schedule_time("FREQ=DAILY", at(2025, 6, 2, 6), "Asia/Ho_Chi_Minh", [])
    assert checked.dtstart == at(2025, 6, 2, 6)


def test_validate_takes_the_fold_that_the_offset_names() -> None:
    checked = validate_schedule_time(None, "2025-10-26T02:30+01:00", "Europe/Berlin", [])
    assert checked.dtstart.fold == 1
    assert checked.dtstart.utcoffset() == timedelta(hours=1)


@pytest.mark.parametrize(
    ("rrule_text", "dtstart", "zone", "exdates", "field"),
    [
        ("FREQ=DAILY", "2025-06-02T06:00", "Mars/Olympus_Mons", [], "timezone"),
        ("FREQ=DAILY", "2025-06-02T06:00", "", [], "timezone"),
        ("FREQ=DAILY", "2025-06-02T06:00", "Asia", [], "timezone"),
        ("FREQ=DAILY", "tomorrow at six", "Asia/Ho_Chi_Minh", [], "dtstart"),
        ("FREQ=DAILY", "2025-06-02", "Asia/Ho_Chi_Minh", [], "dtstart"),
        ("FREQ=DAILY", "2025-06-02T06:00+00:00", "Asia/Ho_Chi_Minh", [], "dtstart"),
        ("FREQ=DAILY", "2025-06-02T06:00:00.500", "Asia/Ho_Chi_Minh", [], "dtstart"),
        ("FREQ=DAILY", "2025-03-30T02:30", "Europe/Berlin", [], "dtstart"),
        ("FREQ=DAILY", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", ["2025-06-03T06:00", "soon"], "exdates[1]"),
        ("FREQ=DAILY;BYDAY=2MO", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", [], "rrule.BYDAY"),
        ("FREQ=DAILY;UNTIL=20250601", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", [], "rrule.UNTIL"),
        ("FREQ=DAILY;UNTIL=20250602T055959", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", [], "rrule.UNTIL"),
        ("FREQ=DAILY;UNTIL=20250601T225959Z", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", [], "rrule.UNTIL"),
        ("FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", [], "rrule"),
        (
            "FREQ=YEARLY;INTERVAL=4;BYMONTH=2;BYMONTHDAY=29",
            "2025-06-02T06:00",
            "Asia/Ho_Chi_Minh",
            [],
            "rrule",
        ),
        ("FREQ=DAILY;BYHOUR=6;BYSETPOS=2", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", [], "rrule"),
        ("FREQ=DAILY;BYDAY=MO;UNTIL=20250607", "2025-06-03T06:00", "Asia/Ho_Chi_Minh", [], "rrule"),
        ("FREQ=DAILY;COUNT=1", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", ["2025-06-02T06:00"], "exdates"),
        (None, "2025-06-02T06:00", "Asia/Ho_Chi_Minh", ["2025-06-02T06:00"], "exdates"),
    ],
)
def test_every_schedule_error_names_its_field(
    rrule_text: str | None, dtstart: str, zone: str, exdates: list[str], field: str
) -> None:
    with pytest.raises(RecurrenceError) as caught:
        validate_schedule_time(rrule_text, dtstart, zone, exdates)
    assert caught.value.field == field


def test_an_until_on_dtstart_itself_is_valid() -> None:
    checked = validate_schedule_time(
        "FREQ=DAILY;UNTIL=20250601T230000Z", "2025-06-02T06:00", "Asia/Ho_Chi_Minh", []
    )
    assert checked.first_occurrence == at(2025, 6, 2, 6)


# --- property tests against python-dateutil -----------------------------------------------------

ORACLE_ZONES = (HCM, ZoneInfo("UTC"))


@dataclass(frozen=True)
class RuleCase:
    """A generated rule; `oracle_text` and `oracle_until` say the same thing in dateutil's terms."""

    text: str
    frequency: str
    dtstart: datetime
    oracle_text: str
    oracle_until: datetime | None


@st.composite
def dtstarts(draw: st.DrawFn) -> datetime:
    zone = draw(st.sampled_from(ORACLE_ZONES))
    year = draw(st.one_of(st.integers(1995, 2045), st.sampled_from([2000, 2024, 2028, 2100])))
    month = draw(st.integers(1, 12))
    last = calendar.monthrange(year, month)[1]
    day = draw(st.one_of(st.integers(1, last), st.sampled_from([last, last - 1, min(29, last)])))
    second = draw(st.one_of(st.just(0), st.integers(0, 59)))
    return datetime(year, month, day, draw(st.integers(0, 23)), draw(st.integers(0, 59)), second, tzinfo=zone)


def sometimes(draw: st.DrawFn) -> bool:
    """One time in three: stacking every BYxxx part at once would leave most rules nearly empty."""
    return draw(st.sampled_from([False, False, True]))


def _int_list(values: st.SearchStrategy[int], max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(values, min_size=1, max_size=max_size, unique=True)


@st.composite
def rule_cases(draw: st.DrawFn) -> RuleCase:
    frequency = draw(st.sampled_from(["DAILY", "WEEKLY", "MONTHLY", "YEARLY"]))
    dtstart = draw(dtstarts())
    parts: list[str] = []
    interval = draw(st.integers(1, 4))
    if interval > 1 or draw(st.booleans()):
        parts.append(f"INTERVAL={interval}")
    by_month = draw(_int_list(st.integers(1, 12), 4)) if sometimes(draw) else []
    weekday_styles = ["none", "plain", "ordinal"] if frequency in ("MONTHLY", "YEARLY") else ["none", "plain"]
    weekday_style = draw(st.sampled_from(weekday_styles))
    by_day: list[str] = []
    if weekday_style == "plain":
        by_day = draw(st.lists(st.sampled_from(WEEKDAY_CODES), min_size=1, max_size=7, unique=True))
    elif weekday_style == "ordinal":
        bound = 5 if frequency == "MONTHLY" or by_month else 53
        ordinals = st.one_of(
            st.integers(1, min(bound, 5)), st.integers(-min(bound, 5), -1), st.integers(-bound, bound)
        )
        entries = draw(
            st.lists(st.tuples(ordinals.filter(bool), st.sampled_from(WEEKDAY_CODES)), min_size=1, max_size=3)
        )
        by_day = [f"{draw(st.sampled_from(['', '+'])) if n > 0 else ''}{n}{code}" for n, code in entries]
    month_days: list[int] = []
    if frequency != "WEEKLY" and sometimes(draw):
        month_days = draw(
            _int_list(
                st.one_of(st.integers(1, 31), st.integers(-31, -1), st.sampled_from([28, 29, 30, 31, -1])), 3
            )
        )
    by_hour = draw(_int_list(st.integers(0, 23), 2)) if sometimes(draw) else []
    by_minute = draw(_int_list(st.integers(0, 59), 2)) if sometimes(draw) else []
    set_positions: list[int] = []
    if (by_month or by_day or month_days or by_hour or by_minute) and sometimes(draw):
        set_positions = draw(_int_list(st.one_of(st.integers(1, 6), st.integers(-6, -1)), 2))
    by_parts: list[tuple[str, Sequence[int | str]]] = [
        ("BYMONTH", by_month),
        ("BYDAY", by_day),
        ("BYMONTHDAY", month_days),
        ("BYHOUR", by_hour),
        ("BYMINUTE", by_minute),
        ("BYSETPOS", set_positions),
    ]
    for name, values in by_parts:
        if values:
            parts.append(f"{name}={','.join(str(value) for value in values)}")
    week_start = draw(st.sampled_from(WEEKDAY_CODES))
    if week_start != "MO" or draw(st.booleans()):
        parts.append(f"WKST={week_start}")
    if frequency == "WEEKLY" and set_positions:
        # dateutil cuts the first week short at DTSTART; start on WKST so both read the same set.
        back = (dtstart.weekday() - WEEKDAY_CODES.index(week_start)) % 7
        dtstart -= timedelta(days=back)

    oracle_parts = list(parts)
    oracle_until = None
    ending = draw(st.sampled_from(["none", "count", "until-utc", "until-floating", "until-date"]))
    if ending == "count":
        parts.append(f"COUNT={draw(st.integers(1, 40))}")
        oracle_parts.append(parts[-1])
    elif ending != "none":
        horizon = {"DAILY": 200, "WEEKLY": 700, "MONTHLY": 2000, "YEARLY": 4000}[frequency]
        minutes = draw(st.one_of(st.just(0), st.integers(-1440, 1440)))
        # Often soon after DTSTART, where most windows look, so that the UNTIL boundary gets compared.
        until_days = draw(st.one_of(st.integers(-3, 40), st.integers(-3, horizon)))
        until = dtstart + timedelta(days=until_days, minutes=minutes)
        if ending == "until-utc":
            parts.append(f"UNTIL={until.astimezone(UTC):%Y%m%dT%H%M%SZ}")
            oracle_parts.append(parts[-1])
        elif ending == "until-floating":
            parts.append(f"UNTIL={until:%Y%m%dT%H%M%S}")
            oracle_until = until
        else:
            parts.append(f"UNTIL={until:%Y%m%d}")
            oracle_until = datetime.combine(until.date(), time(23, 59, 59), tzinfo=until.tzinfo)
    text = ";".join([f"FREQ={frequency}", *draw(st.permutations(parts))])
    if draw(st.booleans()):
        text = text.lower()
    return RuleCase(text, frequency, dtstart, ";".join([f"FREQ={frequency}", *oracle_parts]), oracle_until)


@contextlib.contextmanager
def dateutil_calendar_ending(year: int) -> Iterator[None]:
    """Make dateutil stop searching after `year` instead of 9999.

    A rule that selects nothing (BYMONTH=2;BYMONTHDAY=30) sends dateutil to year 9999 before it
    gives up, day by day for a DAILY rule: seconds per example. Every instant the tests compare is
    before `year`, so this changes dateutil's cost, not its answers.
    """
    shortened = types.ModuleType("datetime")
    shortened.__dict__.update(vars(datetime_module), MAXYEAR=year)
    vars(dateutil_rrule)["datetime"] = shortened
    try:
        yield
    finally:
        vars(dateutil_rrule)["datetime"] = datetime_module


def oracle(
    case: RuleCase, start: datetime, end: datetime, exdates: Sequence[datetime] = ()
) -> list[datetime]:
    """dateutil's occurrences in [start, end)."""
    rule = dateutil_rrule.rrulestr(case.oracle_text, dtstart=case.dtstart)
    assert isinstance(rule, dateutil_rrule.rrule)
    if case.oracle_until is not None:
        rule = rule.replace(until=case.oracle_until)
    recurrence_set = dateutil_rrule.rruleset()
    recurrence_set.rrule(rule)
    for moment in exdates:
        recurrence_set.exdate(moment)
    with dateutil_calendar_ending(end.year + 1), warnings.catch_warnings():
        warnings.simplefilter("error")
        return [moment for moment in recurrence_set.between(start, end, inc=True) if moment < end]


@st.composite
def windows(draw: st.DrawFn, case: RuleCase) -> tuple[datetime, datetime]:
    offset_days, length_days = {
        "DAILY": (400, 60),
        "WEEKLY": (800, 180),
        "MONTHLY": (2500, 800),
        "YEARLY": (6000, 3000),
    }[case.frequency]
    days = draw(st.one_of(st.just(0), st.integers(-40, 60), st.integers(-40, offset_days)))
    start = case.dtstart + timedelta(days=days, minutes=draw(st.one_of(st.just(0), st.integers(0, 1439))))
    # Mostly whole days and more, so that windows hold something; sometimes mere minutes.
    length = timedelta(days=draw(st.integers(1, length_days)), minutes=draw(st.integers(0, 1439)))
    if draw(st.sampled_from(["days"] * 9 + ["minutes"])) == "minutes":
        length = timedelta(minutes=draw(st.integers(0, 1439)))
    return start, start + length


def isoformats(moments: Sequence[datetime]) -> list[str]:
    return [moment.isoformat() for moment in moments]


@settings(max_examples=400)
@given(case=rule_cases(), data=st.data())
def test_expand_agrees_with_dateutil(case: RuleCase, data: st.DataObject) -> None:
    start, end = data.draw(windows(case))
    rule = parse_rrule(case.text)
    expected = oracle(case, start, end)
    assert isoformats(expand(rule, case.dtstart, start=start, end=end)) == isoformats(expected)
    event(f"{case.frequency} {'empty' if not expected else 'some' if len(expected) < 20 else 'many'}")

    excluded = data.draw(st.lists(st.sampled_from(expected), max_size=5)) if expected else []
    # An EXDATE given in another zone names the same local time once converted.
    excluded = [moment.astimezone(UTC) if data.draw(st.booleans()) else moment for moment in excluded]
    expected_after_exdates = oracle(case, start, end, excluded)
    found = expand(rule, case.dtstart, start=start, end=end, exdates=excluded)
    assert isoformats(found) == isoformats(expected_after_exdates)
    assert all(moment.tzinfo is case.dtstart.tzinfo for moment in found)


@settings(max_examples=150)
@given(case=rule_cases(), data=st.data())
def test_next_after_agrees_with_dateutil(case: RuleCase, data: st.DataObject) -> None:
    after = case.dtstart + timedelta(
        days=data.draw(st.integers(-10, 1000)), minutes=data.draw(st.integers(0, 1439))
    )
    horizon = after + timedelta(days=5 * 366)
    expected = [moment for moment in oracle(case, after, horizon) if moment > after]
    found = next_after(parse_rrule(case.text), case.dtstart, after)
    if expected:
        assert found == expected[0]
        assert found is not None
        assert found.isoformat() == expected[0].isoformat()
    else:
        assert found is None or found >= horizon


@settings(max_examples=200)
@given(case=rule_cases())
def test_canonical_text_round_trips_and_means_the_same(case: RuleCase) -> None:
    rule = parse_rrule(case.text)
    canonical = rule.to_text()
    assert parse_rrule(canonical) == rule
    assert parse_rrule(canonical).to_text() == canonical
    assert parse_rrule(f"RRULE:{canonical}") == rule
