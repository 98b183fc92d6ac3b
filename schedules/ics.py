"""An area's programme as an iCalendar (RFC 5545) feed that calendar apps can subscribe to.

Pure: the standard library and `schedules.recurrence` only, no store or controller. The caller
gives the schedules as `ProgrammeEvent`s and gets back the whole `VCALENDAR` as a `str` (the
HTTP layer encodes it as UTF-8).

Choices, where RFC 5545 leaves room or where calendar apps disagree:

- One `VEVENT` per schedule (UID `<schedule id>@wardcast`), recurring by the schedule's canonical
  RRULE, so a subscriber sees the rule itself rather than a window of expanded instances.
- `DTSTART` is the schedule's first occurrence as the rule produces it (EXDATEs aside), not the
  DTSTART the operator typed: RFC 5545 leaves a recurrence set undefined when DTSTART is not on
  the rule, and Google, Outlook and Apple all then show DTSTART as an extra instance that Wardcast
  never plays. Moving DTSTART within the rule's own first period keeps INTERVAL, COUNT and BYSETPOS
  meaning the same set (`RecurrenceRule` semantics).
- A floating or date-only UNTIL is written as the UTC instant it stands for (the end of that local
  day for a date), because RFC 5545 requires a UTC UNTIL when DTSTART carries a TZID. Otherwise the
  RRULE is `RecurrenceRule.to_text()` unchanged.
- `DTEND` is DTSTART plus the planned play length (playlist x repeats + gaps, capped), rounded up
  to whole seconds: iCalendar has no fractions, and the event must cover the whole play.
- `PRIORITY` uses RFC 5545's three-level mapping (§3.8.1.9: 1-4 high, 5 medium, 6-9 low):
  emergency (khẩn cấp) = 1, priority (ưu tiên) = 5, normal (thông thường) = 9. The sub-priority
  (0-255) has no room there; it is stated in DESCRIPTION.
- Each zone used gets a `VTIMEZONE`. A zone without transitions over the span of the feed
  (Asia/Ho_Chi_Minh since 1975) is one STANDARD observance from 19700101T000000; a zone with DST
  lists its observed transitions explicitly (DTSTART + RDATE) up to `TRANSITION_HORIZON_YEARS`
  after the latest event or DTSTAMP. TZNAME is the zone's abbreviation, or `ICT` where tzdata only
  has a numeric one (+07) for Indochina Time.
- Text is escaped per §3.3.11 (backslash, semicolon, comma, newline; other control characters,
  which TEXT forbids, are dropped). Lines end in CRLF and are folded at 75 octets of UTF-8 (§3.1),
  never inside a UTF-8 sequence and, where a line allows it, never between a letter and its
  combining diacritic (Vietnamese typed in decomposed form).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import cast
from zoneinfo import ZoneInfo

from schedules.recurrence import RecurrenceRule

__all__ = [
    "ICAL_PRIORITY",
    "PRIORITY_LABELS",
    "PRODID",
    "TRANSITION_HORIZON_YEARS",
    "ProgrammeEvent",
    "escape_text",
    "fold_line",
    "programme_calendar",
    "unfold",
]

PRODID = "-//Wardcast//Programme//VI"
MAX_LINE_OCTETS = 75
CRLF = "\r\n"
TRANSITION_HORIZON_YEARS = 20

PRIORITY_LABELS = {"normal": "Thông thường", "priority": "Ưu tiên", "emergency": "Khẩn cấp"}
ICAL_PRIORITY = {"emergency": 1, "priority": 5, "normal": 9}
REACH_LABELS = {
    "whole": "cả khu vực",
    "part": "một phần khu vực (khu vực con hoặc thiết bị bên trong)",
}

_EPOCH_LOCAL = "19700101T000000"
_SCAN_STEP = timedelta(days=1)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NUMERIC_ABBREVIATION = re.compile(r"[+-]\d")
_ICT = timedelta(hours=7)
# tzdata dropped invented abbreviations in 2017 and names these zones "+07"; calendars show TZNAME.
_KNOWN_ABBREVIATIONS = {
    ("Asia/Ho_Chi_Minh", _ICT): "ICT",
    ("Asia/Saigon", _ICT): "ICT",
    ("Asia/Bangkok", _ICT): "ICT",
    ("Asia/Phnom_Penh", _ICT): "ICT",
    ("Asia/Vientiane", _ICT): "ICT",
}


@dataclass(frozen=True, slots=True)
class ProgrammeEvent:
    """One schedule as a calendar event.

    `start` is the first occurrence, aware, with a `ZoneInfo` (its key becomes the TZID);
    `exdates` are aware too. `priority_class` is `normal`, `priority` or `emergency`. `targets`
    are human-readable lines such as `Phường An (hn.a)`. `reach` is `whole` when the schedule
    covers the whole area, `part` when it reaches only some of it, or None.
    """

    schedule_id: str
    name: str
    priority_class: str
    sub_priority: int
    start: datetime
    duration: timedelta
    rule: RecurrenceRule | None = None
    exdates: tuple[datetime, ...] = ()
    targets: tuple[str, ...] = ()
    repeats: int = 1
    reach: str | None = None
    last_modified: datetime | None = None
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.start.tzinfo, ZoneInfo):
            raise TypeError(f"event {self.schedule_id}: start must carry a ZoneInfo, got {self.start!r}")
        if self.priority_class not in PRIORITY_LABELS:
            raise ValueError(f"event {self.schedule_id}: unknown priority class {self.priority_class!r}")
        if self.duration < timedelta(0):
            raise ValueError(f"event {self.schedule_id}: negative duration {self.duration}")
        if any(moment.tzinfo is None for moment in self.exdates):
            raise ValueError(f"event {self.schedule_id}: EXDATEs must be aware")

    @property
    def zone(self) -> ZoneInfo:
        return cast("ZoneInfo", self.start.tzinfo)  # checked in __post_init__


# --- text ---------------------------------------------------------------------------------------


def escape_text(value: str) -> str:
    """A TEXT value (RFC 5545 §3.3.11): `\\`, `;`, `,` and newlines escaped, other controls dropped."""
    text = value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return _CONTROL.sub("", text)


def _clusters(line: str) -> list[str]:
    """The line cut before every character that is not a combining mark."""
    clusters: list[str] = []
    for char in line:
        if clusters and unicodedata.combining(char):
            clusters[-1] += char
        else:
            clusters.append(char)
    return clusters


def fold_line(line: str, limit: int = MAX_LINE_OCTETS) -> str:
    """`line` folded (RFC 5545 §3.1) so that no physical line exceeds `limit` octets of UTF-8.

    Continuation lines start with one space, which counts toward the limit. Folds fall between
    characters, never inside a UTF-8 sequence, and between a letter and its combining marks only
    when a cluster alone is longer than a line. The result has no trailing CRLF.
    """
    if len(line.encode()) <= limit:
        return line
    pieces: list[str] = []
    current = ""
    size = 0
    room = limit
    for cluster in _clusters(line):
        units = [cluster] if len(cluster.encode()) <= limit - 1 else list(cluster)
        for unit in units:
            octets = len(unit.encode())
            if size + octets > room:
                pieces.append(current)
                current, size, room = "", 0, limit - 1
            current += unit
            size += octets
    pieces.append(current)
    return (CRLF + " ").join(pieces)


def unfold(text: str) -> str:
    """Undo `fold_line`: drop every CRLF that is followed by one space or tab (RFC 5545 §3.1)."""
    return re.sub(r"\r\n[ \t]", "", text)


# --- values -------------------------------------------------------------------------------------


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _local(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%Y%m%dT%H%M%S")


def _offset(offset: timedelta) -> str:
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}{hours:02d}{minutes:02d}" + (f"{secs:02d}" if secs else "")


def _rule_text(rule: RecurrenceRule, zone: ZoneInfo) -> str:
    """The rule with a floating or date-only UNTIL turned into the UTC instant it stands for."""
    until = rule.until
    if until is None or (isinstance(until, datetime) and until.tzinfo is not None):
        return rule.to_text()
    # A floating UNTIL is a wall time in the zone; a date includes that whole local day.
    instant = until.replace(tzinfo=zone) if isinstance(until, datetime) else local_day_end(until, zone)
    return replace(rule, until=instant.astimezone(UTC)).to_text()


def _play_length(duration: timedelta) -> timedelta:
    return timedelta(seconds=max(1, math.ceil(duration.total_seconds())))


# --- time zones ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Observance:
    daylight: bool
    offset_from: timedelta
    offset_to: timedelta
    name: str


def _state(zone: ZoneInfo, instant: datetime) -> tuple[timedelta, bool, str]:
    local = instant.astimezone(zone)
    offset = local.utcoffset() or timedelta(0)
    name = local.tzname() or _offset(offset)
    if _NUMERIC_ABBREVIATION.match(name):
        name = _KNOWN_ABBREVIATIONS.get((zone.key, offset), name)
    return offset, bool(local.dst()), name


def _transitions(zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Every instant in (start, end] where the zone's offset, DST flag or name changes."""
    found: list[datetime] = []
    before = start.replace(microsecond=0)
    state = _state(zone, before)
    while before < end:
        after = min(before + _SCAN_STEP, end)
        if _state(zone, after) != state:
            low, high = before, after  # state(low) == state, state(high) != state
            while high - low > timedelta(seconds=1):
                middle = low + timedelta(seconds=(high - low).total_seconds() // 2)
                if _state(zone, middle) == state:
                    low = middle
                else:
                    high = middle
            found.append(high)
            state = _state(zone, high)
        before = after
    return found


def _vtimezone(zone: ZoneInfo, start: datetime, end: datetime) -> list[str]:
    offset, daylight, name = _state(zone, start)
    groups: dict[_Observance, list[str]] = {}
    previous = offset
    for instant in _transitions(zone, start, end):
        after, after_daylight, after_name = _state(zone, instant)
        # A transition's onset is the local time just before it, read with the offset it leaves.
        onset = (instant.astimezone(UTC) + previous).strftime("%Y%m%dT%H%M%S")
        groups.setdefault(_Observance(after_daylight, previous, after, after_name), []).append(onset)
        previous = after
    lines = ["BEGIN:VTIMEZONE", f"TZID:{zone.key}"]
    lines += _observance(_Observance(daylight, offset, offset, name), [_EPOCH_LOCAL])
    for observance, onsets in groups.items():
        lines += _observance(observance, onsets)
    lines.append("END:VTIMEZONE")
    return lines


def _observance(observance: _Observance, onsets: Sequence[str]) -> list[str]:
    kind = "DAYLIGHT" if observance.daylight else "STANDARD"
    lines = [
        f"BEGIN:{kind}",
        f"DTSTART:{onsets[0]}",
        f"TZOFFSETFROM:{_offset(observance.offset_from)}",
        f"TZOFFSETTO:{_offset(observance.offset_to)}",
        f"TZNAME:{escape_text(observance.name)}",
    ]
    if len(onsets) > 1:
        lines.append(f"RDATE:{','.join(onsets[1:])}")
    lines.append(f"END:{kind}")
    return lines


# --- the calendar -------------------------------------------------------------------------------


def _description(event: ProgrammeEvent) -> str:
    label = PRIORITY_LABELS[event.priority_class]
    lines = [f"Mức ưu tiên: {label}, mức phụ {event.sub_priority}"]
    if event.targets:
        lines.append(f"Phát tới: {'; '.join(event.targets)}")
    lines.append(f"Số lần phát: {event.repeats}")
    if event.reach is not None:
        lines.append(f"Phạm vi: {REACH_LABELS.get(event.reach, event.reach)}")
    return "\n".join(lines)


def _vevent(event: ProgrammeEvent, dtstamp: datetime) -> list[str]:
    zone = event.zone
    label = PRIORITY_LABELS[event.priority_class]
    end = event.start.astimezone(UTC) + _play_length(event.duration)
    categories = (label, *event.categories)
    lines = [
        "BEGIN:VEVENT",
        f"UID:{event.schedule_id}@wardcast",
        f"DTSTAMP:{_utc(dtstamp)}",
        f"DTSTART;TZID={zone.key}:{_local(event.start, zone)}",
        f"DTEND;TZID={zone.key}:{_local(end, zone)}",
    ]
    if event.rule is not None:
        lines.append(f"RRULE:{_rule_text(event.rule, zone)}")
    if event.exdates:
        values = ",".join(_local(moment, zone) for moment in sorted(event.exdates))
        lines.append(f"EXDATE;TZID={zone.key}:{values}")
    lines += [
        f"SUMMARY:{escape_text(f'{event.name} [{label}]')}",
        f"DESCRIPTION:{escape_text(_description(event))}",
        f"CATEGORIES:{','.join(escape_text(category) for category in categories)}",
        f"PRIORITY:{ICAL_PRIORITY[event.priority_class]}",
        "STATUS:CONFIRMED",
        "TRANSP:OPAQUE",
    ]
    if event.last_modified is not None:
        lines.append(f"LAST-MODIFIED:{_utc(event.last_modified)}")
    lines.append("END:VEVENT")
    return lines


def _zone_spans(
    events: Iterable[ProgrammeEvent], default_zone: ZoneInfo, dtstamp: datetime
) -> dict[str, tuple[ZoneInfo, datetime, datetime]]:
    """For each zone used: the zone and the UTC span its VTIMEZONE must describe."""
    spans: dict[str, tuple[ZoneInfo, datetime, datetime]] = {}
    stamp = dtstamp.astimezone(UTC)
    spans[default_zone.key] = (default_zone, stamp, stamp)
    for event in events:
        moments = [event.start.astimezone(UTC), *(moment.astimezone(UTC) for moment in event.exdates)]
        zone, low, high = spans.get(event.zone.key, (event.zone, min(moments), max(moments)))
        spans[event.zone.key] = (zone, min(low, *moments), max(high, *moments))
    horizon = timedelta(days=366 * TRANSITION_HORIZON_YEARS)
    return {
        key: (zone, low - timedelta(days=1), max(high, stamp) + horizon)
        for key, (zone, low, high) in spans.items()
    }


def programme_calendar(
    *,
    area_name: str,
    events: Sequence[ProgrammeEvent],
    dtstamp: datetime,
    timezone: str,
    refresh: timedelta = timedelta(hours=1),
) -> str:
    """The VCALENDAR of an area's programme; `dtstamp` is when the feed is made (aware, any zone).

    `timezone` is the calendar's default zone (X-WR-TIMEZONE); it gets a VTIMEZONE even when no
    event uses it. `refresh` is the poll interval suggested to subscribers (RFC 7986 and the
    Outlook/Apple X-PUBLISHED-TTL).
    """
    if dtstamp.tzinfo is None:
        raise ValueError("dtstamp must be aware")
    default_zone = ZoneInfo(timezone)
    minutes = max(1, int(refresh.total_seconds() // 60))
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        f"PRODID:{PRODID}",
        "CALSCALE:GREGORIAN",
        "METHOD:PUBLISH",
        f"X-WR-CALNAME:{escape_text(f'Lịch phát thanh – {area_name}')}",
        f"NAME:{escape_text(f'Lịch phát thanh – {area_name}')}",
        f"X-WR-TIMEZONE:{default_zone.key}",
        f"REFRESH-INTERVAL;VALUE=DURATION:PT{minutes}M",
        f"X-PUBLISHED-TTL:PT{minutes}M",
    ]
    for zone, low, high in _zone_spans(events, default_zone, dtstamp).values():
        lines += _vtimezone(zone, low, high)
    ordered = sorted(events, key=lambda event: (event.start.astimezone(UTC), event.schedule_id))
    for event in ordered:
        lines += _vevent(event, dtstamp)
    lines.append("END:VCALENDAR")
    return "".join(fold_line(line) + CRLF for line in lines)


def local_day_end(day: date, zone: ZoneInfo) -> datetime:
    """The last whole second of a local day, aware (what a date-only UNTIL includes)."""
    return datetime.combine(day, time(23, 59, 59), tzinfo=zone)
