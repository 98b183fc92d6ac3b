"""RFC 5545 recurrence rules for ward programmes: parse, print, expand, validate.

Pure and dependency-free (stdlib + zoneinfo), so that the property tests can hold it against
python-dateutil as an independent implementation.

Supported rule parts: FREQ (DAILY, WEEKLY, MONTHLY, YEARLY), INTERVAL, COUNT, UNTIL, BYDAY,
BYMONTHDAY, BYMONTH, BYHOUR, BYMINUTE, BYSETPOS, WKST (any weekday). Refused with a named error:
FREQ=HOURLY/MINUTELY/SECONDLY, BYSECOND, BYYEARDAY, BYWEEKNO, and anything RFC 5545 forbids
(COUNT with UNTIL, ordinals in BYDAY outside MONTHLY/YEARLY, BYMONTHDAY with WEEKLY, BYSETPOS alone).

Semantic choices, where RFC 5545 leaves room or where the oracle (dateutil) departs from it:

- A DTSTART that the rule does not produce is not an occurrence, and COUNT counts only the
  occurrences the rule produces. RFC 5545 calls such a recurrence set undefined; this is what
  dateutil does, and it keeps a ward from hearing a bulletin on a day its rule excludes.
  `ScheduleTime.dtstart_is_occurrence` lets the API warn about it.
- BYDAY lists are a union: `BYDAY=MO,-1FR` is every Monday plus the last Friday. (dateutil
  intersects plain and ordinal weekdays; the property tests do not mix them.)
- BYSETPOS in a WEEKLY rule picks from the whole week that holds DTSTART, days before DTSTART
  included, as RFC 5545 defines the set. (dateutil truncates that first week at DTSTART.)
- Occurrences are wall-clock times in the zone of DTSTART. A wall time that falls in a DST gap is
  read with the offset in force before the gap, so it plays later by the gap's length; a wall
  time that occurs twice means the first of the two (both as RFC 5545 §3.3.5 says). Two wall
  times that land on one instant give one occurrence. Asia/Ho_Chi_Minh has no DST.
- UNTIL is inclusive. A UTC UNTIL (`...Z`) bounds the instant, a floating UNTIL bounds the wall
  time in the schedule's zone, and a date-only UNTIL includes that whole local day.
- EXDATE removes an occurrence whose local wall time equals it exactly; an aware EXDATE is first
  converted to the schedule's zone. EXDATE never changes what COUNT counts.
- Resolution is one second: microseconds of DTSTART are dropped, as iCalendar has none.
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import MINYEAR, UTC, date, datetime, time, tzinfo
from enum import IntEnum, StrEnum
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "DEFAULT_EXPANSION_LIMIT",
    "Frequency",
    "RecurrenceError",
    "RecurrenceRule",
    "ScheduleTime",
    "Weekday",
    "WeekdayRule",
    "expand",
    "first_occurrence",
    "next_after",
    "parse_local_time",
    "parse_rrule",
    "parse_timezone",
    "validate_schedule_time",
]

DEFAULT_EXPANSION_LIMIT = 100_000

DAYS_PER_WEEK = 7
MONTHS_PER_YEAR = 12
MAX_MONTH_DAY = 31
MAX_HOUR = 23
MAX_MINUTE = 59
MAX_SET_POSITION = 366
MAX_WEEKDAY_ORDINAL_IN_MONTH = 5
MAX_WEEKDAY_ORDINAL_IN_YEAR = 53

# The Gregorian calendar, weekdays included, repeats exactly every 400 years: 146097 days,
# 20871 weeks, 4800 months. A rule whose periods show no candidate over one full cycle never will.
_CYCLE_DAYS = 146_097
_CYCLE_WEEKS = _CYCLE_DAYS // DAYS_PER_WEEK
_CYCLE_YEARS = 400
_CYCLE_MONTHS = _CYCLE_YEARS * MONTHS_PER_YEAR

# A DST gap moves a wall time later by at most a day (Pacific/Apia skipped 2011-12-30 whole), so
# windows are widened by this much in wall-clock days before the exact instant comparison.
_WALL_CLOCK_MARGIN_DAYS = 2

_LAST_ORDINAL = date.max.toordinal()
_EARLIEST_INSTANT = datetime.min.replace(tzinfo=UTC)
_LATEST_INSTANT = datetime.max.replace(tzinfo=UTC)
_Member = TypeVar("_Member")
_END_OF_DAY = time(23, 59, 59, 999_999)


class RecurrenceError(ValueError):
    """A rule or schedule time that cannot be accepted; `field` names the offending part."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail

    def __reduce__(self) -> tuple[type[RecurrenceError], tuple[str, str]]:
        # The default reduce would rebuild from the message alone; keep field and detail apart.
        return (type(self), (self.field, self.detail))


class Frequency(StrEnum):
    DAILY = "DAILY"
    WEEKLY = "WEEKLY"
    MONTHLY = "MONTHLY"
    YEARLY = "YEARLY"


class Weekday(IntEnum):
    """Numbered like `date.weekday()`."""

    MO = 0
    TU = 1
    WE = 2
    TH = 3
    FR = 4
    SA = 5
    SU = 6


@dataclass(frozen=True, slots=True)
class WeekdayRule:
    """One BYDAY entry: every `weekday`, or with `ordinal` the nth (negative: nth from the end)."""

    weekday: Weekday
    ordinal: int | None = None

    def to_text(self) -> str:
        return f"{'' if self.ordinal is None else self.ordinal}{self.weekday.name}"


def _weekday_rule_order(entry: WeekdayRule) -> tuple[bool, int, int]:
    # Plain weekdays first, then ordinals: MO,TU,WE,TH,FR,-1FR reads the way people write it.
    return (entry.ordinal is not None, entry.ordinal or 0, entry.weekday)


@dataclass(frozen=True, slots=True)
class RecurrenceRule:
    """A validated RRULE; lists are stored sorted and without repeats, so equal rules compare equal.

    `until` is a `date` (whole local day), a naive `datetime` (floating wall time in the schedule's
    zone) or an aware `datetime` (an instant, printed in UTC).
    """

    frequency: Frequency
    interval: int = 1
    count: int | None = None
    until: date | datetime | None = None
    by_weekday: tuple[WeekdayRule, ...] = ()
    by_month_day: tuple[int, ...] = ()
    by_month: tuple[int, ...] = ()
    by_hour: tuple[int, ...] = ()
    by_minute: tuple[int, ...] = ()
    by_set_position: tuple[int, ...] = ()
    week_start: Weekday = Weekday.MO

    def __post_init__(self) -> None:
        # Checked here rather than in the parser so that a rule built in code holds the same invariants.
        if not isinstance(self.frequency, Frequency):
            raise RecurrenceError("rrule.FREQ", f"{self.frequency!r} is not a Frequency")
        if self.interval < 1:
            raise RecurrenceError("rrule.INTERVAL", f"must be 1 or more, got {self.interval}")
        if self.count is not None and self.count < 1:
            raise RecurrenceError("rrule.COUNT", f"must be 1 or more, got {self.count}")
        if self.count is not None and self.until is not None:
            raise RecurrenceError("rrule.COUNT", "COUNT and UNTIL must not both be given (RFC 5545)")
        self._check_weekdays()
        _check_each("rrule.BYMONTHDAY", self.by_month_day, -MAX_MONTH_DAY, MAX_MONTH_DAY, signed=True)
        if self.by_month_day and self.frequency is Frequency.WEEKLY:
            raise RecurrenceError("rrule.BYMONTHDAY", "does not apply to FREQ=WEEKLY (RFC 5545)")
        _check_each("rrule.BYMONTH", self.by_month, 1, MONTHS_PER_YEAR, signed=False)
        _check_each("rrule.BYHOUR", self.by_hour, 0, MAX_HOUR, signed=False)
        _check_each("rrule.BYMINUTE", self.by_minute, 0, MAX_MINUTE, signed=False)
        _check_each("rrule.BYSETPOS", self.by_set_position, -MAX_SET_POSITION, MAX_SET_POSITION, signed=True)
        has_other_by_part = any(
            (self.by_weekday, self.by_month_day, self.by_month, self.by_hour, self.by_minute)
        )
        if self.by_set_position and not has_other_by_part:
            raise RecurrenceError(
                "rrule.BYSETPOS", "needs another BYxxx part (BYDAY, BYMONTHDAY, BYMONTH, BYHOUR, BYMINUTE)"
            )
        object.__setattr__(self, "by_weekday", tuple(sorted(set(self.by_weekday), key=_weekday_rule_order)))
        for name in ("by_month_day", "by_month", "by_hour", "by_minute", "by_set_position"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name)))))
        object.__setattr__(self, "week_start", Weekday(self.week_start))

    def _check_weekdays(self) -> None:
        counts_in_month = self.frequency is Frequency.MONTHLY or bool(self.by_month)
        for entry in self.by_weekday:
            if entry.ordinal is None:
                continue
            if self.frequency in (Frequency.DAILY, Frequency.WEEKLY):
                raise RecurrenceError(
                    "rrule.BYDAY",
                    f"{entry.to_text()}: an ordinal weekday needs FREQ=MONTHLY or FREQ=YEARLY (RFC 5545)",
                )
            bound = MAX_WEEKDAY_ORDINAL_IN_MONTH if counts_in_month else MAX_WEEKDAY_ORDINAL_IN_YEAR
            if entry.ordinal == 0 or abs(entry.ordinal) > bound:
                scope = "a month" if counts_in_month else "a year"
                raise RecurrenceError(
                    "rrule.BYDAY",
                    f"{entry.to_text()}: the ordinal must be 1..{bound} or -{bound}..-1 within {scope}",
                )

    @property
    def has_ordinal_weekdays(self) -> bool:
        return any(entry.ordinal is not None for entry in self.by_weekday)

    def to_text(self) -> str:
        """The canonical RRULE value (no `RRULE:` prefix); `parse_rrule` reads it back to an equal rule."""
        parts = [f"FREQ={self.frequency.value}"]
        if self.interval != 1:
            parts.append(f"INTERVAL={self.interval}")
        if self.count is not None:
            parts.append(f"COUNT={self.count}")
        if self.until is not None:
            parts.append(f"UNTIL={_format_until(self.until)}")
        lists = (
            ("BYMONTH", self.by_month),
            ("BYMONTHDAY", self.by_month_day),
            ("BYDAY", tuple(entry.to_text() for entry in self.by_weekday)),
            ("BYHOUR", self.by_hour),
            ("BYMINUTE", self.by_minute),
            ("BYSETPOS", self.by_set_position),
        )
        parts.extend(f"{name}={','.join(str(value) for value in values)}" for name, values in lists if values)
        if self.week_start is not Weekday.MO:
            parts.append(f"WKST={self.week_start.name}")
        return ";".join(parts)


def _check_each(field: str, values: tuple[int, ...], low: int, high: int, *, signed: bool) -> None:
    for value in values:
        if not low <= value <= high or (signed and value == 0):
            allowed = f"1..{high} or {low}..-1" if signed else f"{low}..{high}"
            raise RecurrenceError(field, f"{value} is outside {allowed}")


def _format_until(until: date | datetime) -> str:
    if not isinstance(until, datetime):
        return until.strftime("%Y%m%d")
    if until.tzinfo is None:
        return until.strftime("%Y%m%dT%H%M%S")
    return until.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


# --- parsing ----------------------------------------------------------------------------------

_BY_PARTS = frozenset({"BYDAY", "BYMONTHDAY", "BYMONTH", "BYHOUR", "BYMINUTE", "BYSETPOS"})
_SUPPORTED_PARTS = frozenset({"FREQ", "INTERVAL", "COUNT", "UNTIL", "WKST"}) | _BY_PARTS
_UNSUPPORTED_PARTS = {
    "BYSECOND": "BYSECOND is not supported: programmes are scheduled to the minute",
    "BYYEARDAY": "BYYEARDAY is not supported: use BYMONTH with BYMONTHDAY",
    "BYWEEKNO": "BYWEEKNO is not supported: use BYMONTH with BYDAY or BYMONTHDAY",
}
_FREQUENCY_NAMES = "DAILY, WEEKLY, MONTHLY or YEARLY"
_UNSUPPORTED_FREQUENCIES = frozenset({"HOURLY", "MINUTELY", "SECONDLY"})
_UNSIGNED = re.compile(r"\d{1,9}")
_SIGNED = re.compile(r"[+-]?\d{1,9}")
_BYDAY_ENTRY = re.compile(r"(?P<ordinal>[+-]?\d{1,2})?(?P<weekday>MO|TU|WE|TH|FR|SA|SU)")
_UNTIL_VALUE = re.compile(
    r"(?P<year>\d{4})(?P<month>\d{2})(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2})(?P<minute>\d{2})(?P<second>\d{2})(?P<utc>Z)?)?"
)
_RRULE_PREFIX = "RRULE:"


def parse_rrule(text: str) -> RecurrenceRule:
    """Parse an RFC 5545 RRULE value such as `FREQ=MONTHLY;BYDAY=-1FR`.

    An `RRULE:` prefix is accepted. Part names and keywords are case-insensitive (RFC 5545 §2);
    blanks around parts and an empty part (a trailing `;`) are tolerated. Raises `RecurrenceError`
    whose `field` is `rrule` or `rrule.<PART>`.
    """
    body = text.strip()
    if body[: len(_RRULE_PREFIX)].upper() == _RRULE_PREFIX:
        body = body[len(_RRULE_PREFIX) :].strip()
    if not body:
        raise RecurrenceError("rrule", "empty rule; expected for example FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA")
    values: dict[str, str] = {}
    for part in body.split(";"):
        if not part.strip():
            continue
        name, equals, value = part.partition("=")
        name = name.strip().upper()
        if not equals or not name:
            raise RecurrenceError("rrule", f"{part.strip()!r} is not NAME=VALUE")
        if name not in _SUPPORTED_PARTS:
            detail = _UNSUPPORTED_PARTS.get(name, "unknown rule part")
            raise RecurrenceError(f"rrule.{name}", detail)
        if name in values:
            raise RecurrenceError(f"rrule.{name}", "given more than once")
        value = value.strip()
        if not value:
            raise RecurrenceError(f"rrule.{name}", "has no value")
        values[name] = value
    if "FREQ" not in values:
        raise RecurrenceError("rrule.FREQ", f"FREQ is required ({_FREQUENCY_NAMES})")
    return RecurrenceRule(
        frequency=_parse_frequency(values["FREQ"]),
        interval=_parse_int("rrule.INTERVAL", values.get("INTERVAL", "1"), signed=False),
        count=_parse_int("rrule.COUNT", values["COUNT"], signed=False) if "COUNT" in values else None,
        until=_parse_until(values["UNTIL"]) if "UNTIL" in values else None,
        by_weekday=_parse_weekdays(values["BYDAY"]) if "BYDAY" in values else (),
        by_month_day=_parse_int_list("rrule.BYMONTHDAY", values.get("BYMONTHDAY"), signed=True),
        by_month=_parse_int_list("rrule.BYMONTH", values.get("BYMONTH"), signed=False),
        by_hour=_parse_int_list("rrule.BYHOUR", values.get("BYHOUR"), signed=False),
        by_minute=_parse_int_list("rrule.BYMINUTE", values.get("BYMINUTE"), signed=False),
        by_set_position=_parse_int_list("rrule.BYSETPOS", values.get("BYSETPOS"), signed=True),
        week_start=_parse_weekday("rrule.WKST", values["WKST"]) if "WKST" in values else Weekday.MO,
    )


def _parse_frequency(value: str) -> Frequency:
    keyword = value.upper()
    if keyword in _UNSUPPORTED_FREQUENCIES:
        raise RecurrenceError("rrule.FREQ", f"{keyword} is not supported; use {_FREQUENCY_NAMES}")
    try:
        return Frequency(keyword)
    except ValueError:
        raise RecurrenceError("rrule.FREQ", f"{value!r} is not a frequency; use {_FREQUENCY_NAMES}") from None


def _parse_int(field: str, value: str, *, signed: bool) -> int:
    pattern = _SIGNED if signed else _UNSIGNED
    if not pattern.fullmatch(value):
        expected = "a whole number, optionally signed" if signed else "a whole number"
        raise RecurrenceError(field, f"{value!r} is not {expected}")
    return int(value)


def _parse_int_list(field: str, value: str | None, *, signed: bool) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(_parse_int(field, item.strip(), signed=signed) for item in value.split(","))


def _parse_weekday(field: str, value: str) -> Weekday:
    try:
        return Weekday[value.upper()]
    except KeyError:
        raise RecurrenceError(field, f"{value!r} is not a weekday (MO, TU, WE, TH, FR, SA, SU)") from None


def _parse_weekdays(value: str) -> tuple[WeekdayRule, ...]:
    entries = []
    for item in value.split(","):
        match = _BYDAY_ENTRY.fullmatch(item.strip().upper())
        if match is None:
            raise RecurrenceError("rrule.BYDAY", f"{item.strip()!r} is not a weekday such as MO, 2MO or -1FR")
        ordinal = match["ordinal"]
        if ordinal is not None and int(ordinal) == 0:
            raise RecurrenceError("rrule.BYDAY", f"{item.strip()!r}: the ordinal must not be 0")
        entries.append(WeekdayRule(Weekday[match["weekday"]], None if ordinal is None else int(ordinal)))
    return tuple(entries)


def _parse_until(value: str) -> date | datetime:
    match = _UNTIL_VALUE.fullmatch(value.upper())
    if match is None:
        raise RecurrenceError(
            "rrule.UNTIL", f"{value!r} is not YYYYMMDD, YYYYMMDDTHHMMSS or YYYYMMDDTHHMMSSZ"
        )
    try:
        day = date(int(match["year"]), int(match["month"]), int(match["day"]))
        if match["hour"] is None:
            return day
        wall = datetime.combine(day, time(int(match["hour"]), int(match["minute"]), int(match["second"])))
    except ValueError as exc:
        raise RecurrenceError("rrule.UNTIL", f"{value!r} is not a real date and time ({exc})") from None
    return wall.replace(tzinfo=UTC) if match["utc"] else wall


# --- expansion --------------------------------------------------------------------------------


def expand(
    rule: RecurrenceRule | None,
    dtstart: datetime,
    *,
    start: datetime,
    end: datetime,
    exdates: Iterable[datetime] = (),
    limit: int = DEFAULT_EXPANSION_LIMIT,
) -> list[datetime]:
    """Every occurrence in [start, end), ascending, as aware datetimes in the zone of `dtstart`.

    `rule=None` is a one-off: `dtstart` itself. Without COUNT, expansion starts at the period that
    holds `start`; with COUNT it counts from DTSTART but stops at `end`. More than `limit`
    occurrences raise `RecurrenceError` (field `window`) instead of silently truncating.
    """
    _require_aware("start", start)
    _require_aware("end", end)
    occurrences = _Occurrences(rule, dtstart, exdates)
    start_instant, end_instant = _instant(start), _instant(end)
    if start_instant >= end_instant:
        return []
    last_day = _wall_day_ordinal(end, occurrences.zone) + _WALL_CLOCK_MARGIN_DAYS
    found: dict[datetime, datetime] = {}
    for period_first_day, batch in occurrences.batches(from_day=_wall_day_ordinal(start, occurrences.zone)):
        if period_first_day > last_day:
            break
        for occurrence, instant in batch:
            if start_instant <= instant < end_instant:
                found.setdefault(instant, occurrence)
        if len(found) > limit:
            raise RecurrenceError(
                "window", f"more than {limit} occurrences between {start.isoformat()} and {end.isoformat()}"
            )
    return [found[instant] for instant in sorted(found)]


def next_after(
    rule: RecurrenceRule | None,
    dtstart: datetime,
    after: datetime,
    exdates: Iterable[datetime] = (),
) -> datetime | None:
    """The first occurrence strictly after `after`, or None when the schedule has no more."""
    _require_aware("after", after)
    occurrences = _Occurrences(rule, dtstart, exdates)
    return occurrences.earliest(from_day=_wall_day_ordinal(after, occurrences.zone), after=_instant(after))


def first_occurrence(
    rule: RecurrenceRule | None, dtstart: datetime, exdates: Iterable[datetime] = ()
) -> datetime | None:
    """The schedule's first occurrence (DTSTART itself only if the rule produces it), or None."""
    occurrences = _Occurrences(rule, dtstart, exdates)
    return occurrences.earliest(from_day=occurrences.start_day, after=None)


def _require_aware(name: str, value: datetime) -> tzinfo:
    zone = value.tzinfo
    if zone is None or value.utcoffset() is None:
        raise RecurrenceError(name, f"must be timezone-aware, got {value.isoformat()}")
    return zone


def _wall_day_ordinal(moment: datetime, zone: tzinfo) -> int:
    try:
        return moment.astimezone(zone).toordinal()
    except OverflowError:
        # Only a moment within a day of the calendar's ends overflows; the end bounds it just as well.
        return 0 if moment.year == MINYEAR else _LAST_ORDINAL + 1


def _instant(moment: datetime) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return _EARLIEST_INSTANT if moment.year == MINYEAR else _LATEST_INSTANT


def _wall_time(moment: datetime, zone: tzinfo) -> datetime:
    """The naive wall time of `moment` in `zone`; a naive `moment` already is one."""
    local = moment if moment.tzinfo is None else moment.astimezone(zone)
    return local.replace(tzinfo=None, fold=0)


def _materialize(wall: datetime, zone: tzinfo) -> tuple[datetime, datetime] | None:
    """The aware occurrence for a wall time and its instant in UTC; None beyond years 1 to 9999 in UTC."""
    local = wall.replace(tzinfo=zone)  # fold=0: the first of two repeated wall times
    try:
        instant = local.astimezone(UTC)
        real = instant.astimezone(zone)
    except OverflowError:
        return None
    # Only a wall time inside a DST gap fails the round trip; `real` is where it actually lands.
    return (local if real.replace(tzinfo=None) == wall else real), instant


_Batch = list[tuple[datetime, datetime]]


class _Occurrences:
    """The occurrences of one rule from one DTSTART, produced period by period."""

    def __init__(self, rule: RecurrenceRule | None, dtstart: datetime, exdates: Iterable[datetime]) -> None:
        self.zone = _require_aware("dtstart", dtstart)
        self._start_wall = dtstart.replace(tzinfo=None, microsecond=0, fold=0)
        self.start_day = self._start_wall.toordinal()
        self._excluded = frozenset(_wall_time(moment, self.zone) for moment in exdates)
        self._rule = rule
        self._periods = None if rule is None else _PeriodCandidates(rule, self._start_wall)
        self._until_instant: datetime | None = None
        self._until_wall: datetime | None = None
        if rule is not None and isinstance(rule.until, datetime) and rule.until.tzinfo is not None:
            self._until_instant = rule.until.astimezone(UTC)
        elif rule is not None and isinstance(rule.until, datetime):
            self._until_wall = rule.until
        elif rule is not None and rule.until is not None:
            self._until_wall = datetime.combine(rule.until, _END_OF_DAY)

    def _is_excluded(self, wall: datetime, occurrence: datetime) -> bool:
        return wall in self._excluded or occurrence.replace(tzinfo=None, fold=0) in self._excluded

    def batches(self, *, from_day: int) -> Iterator[tuple[int, _Batch]]:
        """(first wall day ordinal of the period, occurrences in it), period after period.

        Periods wholly before `from_day` are skipped unless COUNT needs them counted.
        """
        if self._rule is None or self._periods is None:
            materialized = _materialize(self._start_wall, self.zone)
            if materialized is not None and not self._is_excluded(self._start_wall, materialized[0]):
                yield self.start_day, [materialized]
            return
        periods = self._periods
        remaining = self._rule.count
        if remaining is None:
            first_period = periods.first_period_from(from_day - _WALL_CLOCK_MARGIN_DAYS)
        else:
            first_period = 0
        last_day = self._last_wall_day()
        for period_first_day, walls in periods.walk(first_period):
            if last_day is not None and period_first_day > last_day:
                return
            batch: _Batch = []
            finished = False
            for wall in walls:
                if wall < self._start_wall:
                    continue
                materialized = _materialize(wall, self.zone)
                if materialized is None:
                    continue
                occurrence, instant = materialized
                if self._is_past_until(wall, instant):
                    finished = True
                    break
                if remaining is not None:
                    remaining -= 1
                    finished = remaining == 0
                if not self._is_excluded(wall, occurrence):
                    batch.append((occurrence, instant))
                if finished:
                    break
            batch.sort(key=lambda pair: pair[1])
            yield period_first_day, batch
            if finished:
                return

    def earliest(self, *, from_day: int, after: datetime | None) -> datetime | None:
        """The first occurrence strictly after the instant `after` (None: the very first)."""
        best: tuple[datetime, datetime] | None = None
        periods_since_found = 0
        for _, batch in self.batches(from_day=from_day):
            for occurrence, instant in batch:
                if (after is None or instant > after) and (best is None or instant < best[1]):
                    best = (occurrence, instant)
            if best is not None:
                periods_since_found += 1
                # One more period is read because a DST gap can push a wall time past the next period's first.
                if periods_since_found > 1:
                    break
        return None if best is None else best[0]

    def _last_wall_day(self) -> int | None:
        if self._until_instant is not None:
            return _wall_day_ordinal(self._until_instant, self.zone) + _WALL_CLOCK_MARGIN_DAYS
        if self._until_wall is not None:
            return self._until_wall.toordinal() + _WALL_CLOCK_MARGIN_DAYS
        return None

    def _is_past_until(self, wall: datetime, instant: datetime) -> bool:
        if self._until_instant is not None:
            return instant > self._until_instant
        return self._until_wall is not None and wall > self._until_wall


class _PeriodCandidates:
    """The wall times a rule selects in each of its periods (day, week, month or year).

    Period 0 holds DTSTART; period p starts p × INTERVAL days, weeks (from WKST), months or years
    later. Any period is reached by arithmetic, so expanding a window never walks from DTSTART.
    """

    def __init__(self, rule: RecurrenceRule, start_wall: datetime) -> None:
        self._frequency = rule.frequency
        self._interval = rule.interval
        self._set_positions = rule.by_set_position
        months = frozenset(rule.by_month)
        month_days = rule.by_month_day
        plain_weekdays = frozenset(entry.weekday for entry in rule.by_weekday if entry.ordinal is None)
        # RFC 5545 fills in the missing parts from DTSTART: the same weekday, day of month, month.
        if not rule.by_weekday and not month_days:
            if rule.frequency is Frequency.WEEKLY:
                plain_weekdays = frozenset({Weekday(start_wall.weekday())})
            elif rule.frequency is Frequency.MONTHLY:
                month_days = (start_wall.day,)
            elif rule.frequency is Frequency.YEARLY:
                month_days = (start_wall.day,)
                months = months or frozenset({start_wall.month})
        self._months = months
        self._year_months = tuple(sorted(months)) or tuple(range(1, MONTHS_PER_YEAR + 1))
        self._positive_month_days = frozenset(day for day in month_days if day > 0)
        self._negative_month_days = frozenset(day for day in month_days if day < 0)
        self._filters_month_days = bool(month_days)
        self._plain_weekdays = plain_weekdays
        self._ordinal_weekdays = tuple(
            (entry.weekday, entry.ordinal) for entry in rule.by_weekday if entry.ordinal is not None
        )
        self._filters_weekdays = bool(plain_weekdays or self._ordinal_weekdays)
        self._ordinals_count_in_month = rule.frequency is Frequency.MONTHLY or bool(rule.by_month)
        self._times = tuple(
            sorted(
                time(hour, minute, start_wall.second)
                for hour in rule.by_hour or (start_wall.hour,)
                for minute in rule.by_minute or (start_wall.minute,)
            )
        )
        # A DAILY period is one day, so BYSETPOS picks the same times on every day that matches.
        self._daily_times = _pick_positions(self._times, self._set_positions)
        self._month_cache: dict[int, tuple[int, ...]] = {}

        # Filters on weekdays alone repeat every week, so a shorter cycle proves a rule empty sooner.
        only_weekdays_filter = not months and not month_days
        start_day = start_wall.date()
        if rule.frequency is Frequency.DAILY:
            self._origin = start_day.toordinal()
            cycle = DAYS_PER_WEEK if only_weekdays_filter else _CYCLE_DAYS
        elif rule.frequency is Frequency.WEEKLY:
            self._week_start = int(rule.week_start)
            self._origin = start_day.toordinal() - (start_day.weekday() - self._week_start) % DAYS_PER_WEEK
            cycle = 1 if only_weekdays_filter else _CYCLE_WEEKS
        elif rule.frequency is Frequency.MONTHLY:
            self._origin = start_day.year * MONTHS_PER_YEAR + start_day.month - 1
            cycle = _CYCLE_MONTHS
        else:
            self._origin = start_day.year
            cycle = _CYCLE_YEARS
        self._cycle_periods = cycle // math.gcd(cycle, rule.interval)

    def first_period_from(self, day_ordinal: int) -> int:
        """The first period that holds a day on or after `day_ordinal` (periods start at 0)."""
        day = date.fromordinal(min(max(day_ordinal, 1), _LAST_ORDINAL))
        if self._frequency is Frequency.DAILY:
            offset, unit = day.toordinal() - self._origin, self._interval
        elif self._frequency is Frequency.WEEKLY:
            week_first_day = day.toordinal() - (day.weekday() - self._week_start) % DAYS_PER_WEEK
            offset, unit = week_first_day - self._origin, self._interval * DAYS_PER_WEEK
        elif self._frequency is Frequency.MONTHLY:
            offset, unit = day.year * MONTHS_PER_YEAR + day.month - 1 - self._origin, self._interval
        else:
            offset, unit = day.year - self._origin, self._interval
        return max(0, -(-offset // unit))

    def walk(self, first_period: int) -> Iterator[tuple[int, list[datetime]]]:
        """(first day ordinal, selected wall times) for each period from `first_period` on.

        Ends at the calendar's end (year 9999) or once a whole calendar cycle of periods has
        selected nothing, because then no later period can select anything either.
        """
        if self._frequency is Frequency.DAILY and not self._daily_times:
            return
        period = first_period
        last_productive = first_period
        while period - last_productive <= self._cycle_periods:
            first_day = self._period_first_day(period)
            if first_day is None:
                return
            walls, next_period = self._select(period, first_day)
            if walls:
                last_productive = period
            yield first_day, walls
            period = next_period

    def _period_first_day(self, period: int) -> int | None:
        if self._frequency is Frequency.DAILY:
            ordinal = self._origin + period * self._interval
        elif self._frequency is Frequency.WEEKLY:
            ordinal = self._origin + period * self._interval * DAYS_PER_WEEK
        else:
            if self._frequency is Frequency.MONTHLY:
                year, month_index = divmod(self._origin + period * self._interval, MONTHS_PER_YEAR)
            else:
                year, month_index = self._origin + period * self._interval, 0
            if year > date.max.year:
                return None
            return date(year, month_index + 1, 1).toordinal()
        return ordinal if ordinal <= _LAST_ORDINAL else None

    def _select(self, period: int, first_day: int) -> tuple[list[datetime], int]:
        """The wall times period `period` selects, and the next period worth looking at."""
        if self._frequency is Frequency.DAILY:
            return self._select_daily(period, first_day)
        if self._frequency is Frequency.WEEKLY:
            days = [
                date.fromordinal(ordinal)
                for ordinal in range(first_day, min(first_day + DAYS_PER_WEEK, _LAST_ORDINAL + 1))
            ]
            days = [day for day in days if day.day in self._matching_days(day.year, day.month)]
        elif self._frequency is Frequency.MONTHLY:
            first = date.fromordinal(first_day)
            days = [first.replace(day=number) for number in self._matching_days(first.year, first.month)]
        else:
            year = date.fromordinal(first_day).year
            days = [
                date(year, month, number)
                for month in self._year_months
                for number in self._matching_days(year, month)
            ]
        candidates = [datetime.combine(day, moment) for day in days for moment in self._times]
        return _pick_positions(candidates, self._set_positions), period + 1

    def _select_daily(self, period: int, first_day: int) -> tuple[list[datetime], int]:
        day = date.fromordinal(first_day)
        matching = self._matching_days(day.year, day.month)
        if matching and day.day in matching:
            return [datetime.combine(day, moment) for moment in self._daily_times], period + 1
        if matching:
            return [], period + 1
        # Nothing matches this month (BYMONTH, or BYMONTHDAY=31 in a short month): jump past it.
        next_month_first_day = first_day - day.day + 1 + calendar.monthrange(day.year, day.month)[1]
        return [], max(period + 1, -(-(next_month_first_day - self._origin) // self._interval))

    def _matching_days(self, year: int, month: int) -> tuple[int, ...]:
        """Days of the month that pass BYMONTH, BYMONTHDAY and BYDAY, ascending."""
        key = year * MONTHS_PER_YEAR + month
        cached = self._month_cache.get(key)
        if cached is None:
            cached = self._month_cache[key] = tuple(self._compute_matching_days(year, month))
        return cached

    def _compute_matching_days(self, year: int, month: int) -> Iterator[int]:
        if self._months and month not in self._months:
            return
        first_weekday, days_in_month = calendar.monthrange(year, month)
        days_before_month = date(year, month, 1).toordinal() - date(year, 1, 1).toordinal()
        days_in_year = 366 if calendar.isleap(year) else 365
        for day in range(1, days_in_month + 1):
            if self._filters_month_days and not (
                day in self._positive_month_days or day - days_in_month - 1 in self._negative_month_days
            ):
                continue
            if self._filters_weekdays:
                weekday = (first_weekday + day - 1) % DAYS_PER_WEEK
                if weekday not in self._plain_weekdays and not self._matches_ordinal(
                    weekday,
                    day if self._ordinals_count_in_month else days_before_month + day,
                    days_in_month if self._ordinals_count_in_month else days_in_year,
                ):
                    continue
            yield day

    def _matches_ordinal(self, weekday: int, day_in_scope: int, scope_length: int) -> bool:
        """Whether the day is one of the ordinal weekdays (2MO, -1FR) counted in its month or year."""
        from_start = (day_in_scope - 1) // DAYS_PER_WEEK + 1
        from_end = (scope_length - day_in_scope) // DAYS_PER_WEEK + 1
        return any(
            wanted == weekday and (ordinal == from_start if ordinal > 0 else -ordinal == from_end)
            for wanted, ordinal in self._ordinal_weekdays
        )


def _pick_positions(candidates: Sequence[_Member], positions: tuple[int, ...]) -> list[_Member]:
    """BYSETPOS: the 1-based (negative: from the end) members of a period's sorted set."""
    if not positions:
        return list(candidates)
    size = len(candidates)
    picked = {position - 1 if position > 0 else size + position for position in positions}
    return [candidates[index] for index in sorted(picked) if 0 <= index < size]


# --- schedule validation ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleTime:
    """A schedule's timing, checked: the rule (None for a one-off), aware DTSTART and EXDATEs."""

    rule: RecurrenceRule | None
    dtstart: datetime
    zone: ZoneInfo
    exdates: tuple[datetime, ...]
    first_occurrence: datetime

    @property
    def dtstart_is_occurrence(self) -> bool:
        """False when DTSTART is not on the rule, so the first broadcast is later than DTSTART."""
        return self.first_occurrence == self.dtstart


def validate_schedule_time(
    rrule_text: str | None,
    dtstart_local: str | datetime,
    timezone: str,
    exdates: Iterable[str | datetime] = (),
) -> ScheduleTime:
    """Check a schedule's timing as an operator entered it; every error names its field.

    Fields: `timezone`, `dtstart`, `exdates[i]`, `rrule` / `rrule.<PART>`. A blank or missing rule
    is a one-off. The rule must yield at least one occurrence, and one that EXDATE leaves in place.
    """
    zone = parse_timezone(timezone)
    dtstart = parse_local_time(dtstart_local, zone, field="dtstart")
    excluded = tuple(
        parse_local_time(value, zone, field=f"exdates[{index}]") for index, value in enumerate(exdates)
    )
    rule = None if rrule_text is None or not rrule_text.strip() else parse_rrule(rrule_text)
    if rule is not None and rule.until is not None and _until_precedes(rule.until, dtstart):
        raise RecurrenceError(
            "rrule.UNTIL", f"UNTIL {_format_until(rule.until)} is before DTSTART {dtstart.isoformat()}"
        )
    if first_occurrence(rule, dtstart) is None:
        raise RecurrenceError("rrule", "the rule yields no occurrence")
    first = first_occurrence(rule, dtstart, excluded)
    if first is None:
        raise RecurrenceError("exdates", "the EXDATEs remove every occurrence")
    return ScheduleTime(rule, dtstart, zone, excluded, first)


def _until_precedes(until: date | datetime, dtstart: datetime) -> bool:
    if not isinstance(until, datetime):
        return until < dtstart.date()
    if until.tzinfo is None:
        return until < dtstart.replace(tzinfo=None)
    return until < dtstart


def parse_timezone(name: str) -> ZoneInfo:
    """An IANA zone such as `Asia/Ho_Chi_Minh`; anything else is an error on field `timezone`."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        detail = f"{name!r} is not an IANA time zone such as Asia/Ho_Chi_Minh"
        raise RecurrenceError("timezone", detail) from None


_HAS_TIME_OF_DAY = re.compile(r"\d[T ]\d")


def parse_local_time(value: str | datetime, zone: ZoneInfo, *, field: str) -> datetime:
    """A local wall time in `zone`, as an aware datetime.

    ISO 8601 without an offset is the wall time in `zone`. An offset (or an aware datetime) is
    accepted only when it is the zone's own offset at that wall time: a schedule is a wall-clock
    promise to a ward, so `06:00+00:00` is refused rather than silently turned into 13:00. Wall
    times that DST skips are refused; a repeated one takes the fold its offset names (else the first).
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            parsed = None
        if parsed is None or not _HAS_TIME_OF_DAY.search(text):
            raise RecurrenceError(field, f"{value!r} is not a local date-time such as 2025-06-02T06:00")
    else:
        parsed = value
    if parsed.microsecond:
        raise RecurrenceError(field, f"{parsed.isoformat()}: give whole seconds")
    wall = parsed.replace(tzinfo=None)
    candidates = [wall.replace(tzinfo=zone, fold=fold) for fold in (0, 1)]
    if parsed.tzinfo is None:
        chosen = candidates[0]
    else:
        offset = parsed.utcoffset()
        matching = [candidate for candidate in candidates if candidate.utcoffset() == offset]
        if not matching:
            raise RecurrenceError(
                field,
                f"{parsed.isoformat()}: the offset is not {zone.key}'s ({candidates[0].strftime('%z')}) "
                "at that time; give the local time without an offset",
            )
        chosen = matching[0]
    if chosen.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != wall:
        raise RecurrenceError(field, f"{wall.isoformat()} does not exist in {zone.key} (the clocks skip it)")
    return chosen
