"""The programme as an iCalendar feed: text escaping, folding, CRLF, and the rule read back by
python-dateutil, an implementation independent of both the writer and `schedules.recurrence`."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from dateutil.rrule import rrulestr
from hypothesis import given
from hypothesis import strategies as st

from schedules.ics import (
    PRIORITY_LABELS,
    ProgrammeEvent,
    escape_text,
    fold_line,
    programme_calendar,
    unfold,
)
from schedules.recurrence import expand, first_occurrence, validate_schedule_time
from tests.support.scenario import upload
from tests.support.system import ControllerHandle

HANOI = ZoneInfo("Asia/Ho_Chi_Minh")
STAMP = datetime(2026, 5, 1, 3, 4, 5, tzinfo=UTC)
LONG_NAME = (
    "Thông báo khẩn của Ủy ban nhân dân phường về việc phòng, chống bão số 3; "
    "đề nghị bà con nhân dân khẩn trương gia cố nhà cửa, chằng chống tường rào, "
    "di dời người và tài sản đến nơi an toàn trước 18 giờ"
)


# --- an independent reader: RFC 5545 content lines, written here from the RFC, not from the writer


def physical_lines(text: str) -> list[str]:
    assert text.endswith("\r\n")
    return text[:-2].split("\r\n")


def content_lines(text: str) -> list[tuple[str, dict[str, str], str]]:
    """(NAME, {PARAM: value}, raw value) for each unfolded content line."""
    result = []
    for line in re.sub(r"\r\n[ \t]", "", text).split("\r\n"):
        if not line:
            continue
        head, _, value = line.partition(":")
        name, *params = head.split(";")
        result.append((name, dict(p.split("=", 1) for p in params), value))
    return result


def unescape(value: str) -> str:
    return re.sub(r"\\([\\;,nN])", lambda m: "\n" if m.group(1) in "nN" else m.group(1), value)


def components(text: str, kind: str) -> list[list[tuple[str, dict[str, str], str]]]:
    found: list[list[tuple[str, dict[str, str], str]]] = []
    current: list[tuple[str, dict[str, str], str]] | None = None
    for line in content_lines(text):
        if line[0] == "BEGIN" and line[2] == kind:
            current = []
        elif line[0] == "END" and line[2] == kind and current is not None:
            found.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return found


def prop(component: list[tuple[str, dict[str, str], str]], name: str) -> str:
    (value,) = [v for n, _, v in component if n == name]
    return value


def dateutil_starts(
    event: list[tuple[str, dict[str, str], str]], start: datetime, end: datetime
) -> list[datetime]:
    """The event's starts in [start, end), expanded by python-dateutil from its own lines."""
    wanted = [
        f"{n}{''.join(f';{k}={v}' for k, v in p.items())}:{v}"
        for n, p, v in event
        if n in {"DTSTART", "RRULE", "EXDATE"}
    ]
    if not any(line.startswith("RRULE") for line in wanted):
        wanted.append("RRULE:FREQ=DAILY;COUNT=1")  # no rule: DTSTART is the one instance (RFC 5545)
    rules = rrulestr("\n".join(wanted), forceset=True)
    return [moment for moment in rules.between(start, end, inc=True) if moment < end]


def event_for(
    rrule: str | None,
    dtstart: str,
    exdates: tuple[str, ...] = (),
    *,
    name: str = "Bản tin sáng",
    priority_class: str = "normal",
    duration_s: float = 90.5,
) -> ProgrammeEvent:
    """A ProgrammeEvent built the way the route builds it from a stored schedule."""
    timing = validate_schedule_time(rrule, dtstart, "Asia/Ho_Chi_Minh", exdates)
    start = first_occurrence(timing.rule, timing.dtstart) or timing.first_occurrence
    return ProgrammeEvent(
        schedule_id="0b5c6f9e-1d2a-4c8e-9a51-3f0d7e6b2a10",
        name=name,
        priority_class=priority_class,
        sub_priority=7,
        start=start,
        duration=timedelta(seconds=duration_s),
        rule=timing.rule,
        exdates=timing.exdates,
        targets=("Phường An (hn.a)", "thiết bị spk-a1-1"),
        repeats=2,
        reach="whole",
    )


def calendar(*events: ProgrammeEvent, area_name: str = "Tổ dân phố 1") -> str:
    return programme_calendar(area_name=area_name, events=events, dtstamp=STAMP, timezone="Asia/Ho_Chi_Minh")


# --- text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("Bản tin, sáng; tối", "Bản tin\\, sáng\\; tối"),
        ("C:\\loa\\tổ 1", "C:\\\\loa\\\\tổ 1"),
        ("dòng 1\ndòng 2\r\ndòng 3\rdòng 4", "dòng 1\\ndòng 2\\ndòng 3\\ndòng 4"),
        ("\\n is not a newline", "\\\\n is not a newline"),
        ("chuông\x07 và tab\t", "chuông và tab\t"),
        ("giờ: 06:00", "giờ: 06:00"),
    ],
)
def test_text_is_escaped_as_rfc5545_says(raw: str, escaped: str):
    assert escape_text(raw) == escaped


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from("\\;,\n")))
def test_escaping_round_trips(raw: str):
    assert unescape(escape_text(raw)) == raw


def assert_short_whole_lines(text: str, limit: int = 75) -> None:
    """Every physical line at most `limit` octets, and each one valid UTF-8 on its own."""
    for chunk in text.encode().split(b"\r\n"):
        assert len(chunk) <= limit, chunk
        chunk.decode()  # raises if a fold split a UTF-8 sequence


def assert_folded_well(folded: str) -> None:
    assert_short_whole_lines(folded)
    assert all(chunk.startswith(" ") for chunk in folded.split("\r\n")[1:])


def test_a_long_vietnamese_summary_folds_at_75_octets_and_unfolds_back():
    line = f"SUMMARY:{escape_text(LONG_NAME + ' [Khẩn cấp]')}"
    assert len(line.encode()) > 3 * 75
    folded = fold_line(line)
    assert folded.count("\r\n") >= 3
    assert_folded_well(folded)
    assert unfold(folded) == line
    assert re.sub(r"\r\n[ \t]", "", folded) == line  # the RFC's unfolding, not ours
    assert unescape(unfold(folded).removeprefix("SUMMARY:")) == LONG_NAME + " [Khẩn cấp]"


def test_a_short_line_is_not_folded():
    line = "SUMMARY:" + "ư" * 33  # 8 + 66 = 74 octets
    assert fold_line(line) == line
    assert fold_line(line + "a") == line + "a"  # exactly 75
    assert fold_line(line + "ư") == line + "\r\n ư"


@given(st.text(min_size=1, max_size=400))
def test_any_text_folds_within_the_limit_and_unfolds_back(text: str):
    line = "DESCRIPTION:" + escape_text(text)
    folded = fold_line(line)
    assert_folded_well(folded)
    assert unfold(folded) == line


def test_decomposed_diacritics_stay_with_their_letter():
    name = unicodedata.normalize("NFD", LONG_NAME)
    folded = fold_line(f"SUMMARY:{name}")
    assert_folded_well(folded)
    for chunk in folded.split("\r\n")[1:]:
        assert not unicodedata.combining(chunk[1]), chunk
    assert unfold(folded) == f"SUMMARY:{name}"


def test_every_line_ends_in_crlf_and_none_is_too_long():
    text = calendar(event_for("FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA", "2030-01-07T06:00", name=LONG_NAME))
    assert text.endswith("\r\n")
    assert "\n" not in text.replace("\r\n", "") and "\r" not in text.replace("\r\n", "")
    assert_short_whole_lines(text)


# --- the calendar -------------------------------------------------------------------------------


def test_the_calendar_has_its_header_time_zone_and_event():
    event = event_for(
        "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA",
        "2030-01-07T06:00",
        ("2030-01-09T06:00",),
        name="Bản tin sáng, thứ 2–7; phường An",
        priority_class="priority",
    )
    text = calendar(event)
    lines = content_lines(text)
    assert [line[:1] + line[2:] for line in lines[:5]] == [
        ("BEGIN", "VCALENDAR"),
        ("VERSION", "2.0"),
        ("PRODID", "-//Wardcast//Programme//VI"),
        ("CALSCALE", "GREGORIAN"),
        ("METHOD", "PUBLISH"),
    ]
    assert ("X-WR-CALNAME", {}, "Lịch phát thanh – Tổ dân phố 1") in lines
    assert ("X-WR-TIMEZONE", {}, "Asia/Ho_Chi_Minh") in lines
    (zone,) = components(text, "VTIMEZONE")
    assert zone == [
        ("TZID", {}, "Asia/Ho_Chi_Minh"),
        ("BEGIN", {}, "STANDARD"),
        ("DTSTART", {}, "19700101T000000"),
        ("TZOFFSETFROM", {}, "+0700"),
        ("TZOFFSETTO", {}, "+0700"),
        ("TZNAME", {}, "ICT"),
        ("END", {}, "STANDARD"),
    ]
    (vevent,) = components(text, "VEVENT")
    assert prop(vevent, "UID") == "0b5c6f9e-1d2a-4c8e-9a51-3f0d7e6b2a10@wardcast"
    assert prop(vevent, "DTSTAMP") == "20260501T030405Z"
    assert ("DTSTART", {"TZID": "Asia/Ho_Chi_Minh"}, "20300107T060000") in vevent
    assert ("DTEND", {"TZID": "Asia/Ho_Chi_Minh"}, "20300107T060131") in vevent  # 90.5 s, rounded up
    assert prop(vevent, "RRULE") == "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA"
    assert ("EXDATE", {"TZID": "Asia/Ho_Chi_Minh"}, "20300109T060000") in vevent
    assert unescape(prop(vevent, "SUMMARY")) == "Bản tin sáng, thứ 2–7; phường An [Ưu tiên]"
    description = unescape(prop(vevent, "DESCRIPTION"))
    assert (
        "Phường An (hn.a)" in description and "mức phụ 7" in description and "Số lần phát: 2" in description
    )
    assert prop(vevent, "CATEGORIES") == "Ưu tiên"
    assert prop(vevent, "PRIORITY") == "5"
    assert prop(vevent, "STATUS") == "CONFIRMED"


@pytest.mark.parametrize(
    ("priority_class", "rfc_priority"), [("emergency", "1"), ("priority", "5"), ("normal", "9")]
)
def test_priority_classes_map_to_rfc5545_priorities_and_vietnamese_labels(
    priority_class: str, rfc_priority: str
):
    (vevent,) = components(
        calendar(event_for(None, "2030-01-07T06:00", priority_class=priority_class)), "VEVENT"
    )
    assert prop(vevent, "PRIORITY") == rfc_priority
    assert unescape(prop(vevent, "SUMMARY")) == f"Bản tin sáng [{PRIORITY_LABELS[priority_class]}]"
    assert not [n for n, _, _ in vevent if n in {"RRULE", "EXDATE"}]


def test_an_empty_programme_is_still_a_valid_calendar():
    text = calendar()
    assert components(text, "VEVENT") == []
    assert len(components(text, "VTIMEZONE")) == 1


def test_a_zone_with_daylight_saving_lists_its_transitions():
    start = datetime(2030, 1, 7, 6, 0, tzinfo=ZoneInfo("Europe/Paris"))
    event = ProgrammeEvent("x", "Paris", "normal", 0, start, timedelta(minutes=1))
    text = calendar(event)
    paris = next(z for z in components(text, "VTIMEZONE") if prop(z, "TZID") == "Europe/Paris")
    assert ("DTSTART", {}, "20300331T020000") in paris  # 01:00 UTC, read in CET
    assert ("TZOFFSETTO", {}, "+0200") in paris and ("TZNAME", {}, "CEST") in paris


def test_a_floating_or_date_until_is_written_in_utc():
    (floating,) = components(
        calendar(event_for("FREQ=DAILY;UNTIL=20300110T060000", "2030-01-07T06:00")), "VEVENT"
    )
    assert prop(floating, "RRULE") == "FREQ=DAILY;UNTIL=20300109T230000Z"
    (whole_day,) = components(calendar(event_for("FREQ=DAILY;UNTIL=20300110", "2030-01-07T06:00")), "VEVENT")
    assert prop(whole_day, "RRULE") == "FREQ=DAILY;UNTIL=20300110T165959Z"


@pytest.mark.parametrize(
    ("rrule", "dtstart", "exdates"),
    [
        ("FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA", "2030-01-07T06:00", ("2030-01-09T06:00",)),
        ("FREQ=WEEKLY;BYDAY=MO", "2030-01-09T17:30", ()),  # DTSTART (a Wednesday) not on the rule
        ("FREQ=WEEKLY;INTERVAL=2;BYDAY=TU,TH;COUNT=7", "2030-01-03T19:00", ("2030-01-15T19:00",)),
        ("FREQ=MONTHLY;BYDAY=-1FR;UNTIL=20301231", "2030-01-01T08:00", ()),
        ("FREQ=MONTHLY;BYMONTHDAY=31;INTERVAL=2", "2030-02-01T07:15", ()),
        (
            "FREQ=DAILY;BYHOUR=6,17;BYMINUTE=0,30;UNTIL=20300120T170000",
            "2030-01-10T06:00",
            ("2030-01-11T17:30",),
        ),
        ("FREQ=YEARLY;BYMONTH=9;BYMONTHDAY=2", "2030-01-01T07:00", ()),
        (None, "2030-04-30T07:00", ()),
    ],
)
def test_dateutil_expands_the_feed_to_the_schedules_occurrences(
    rrule: str | None, dtstart: str, exdates: tuple[str, ...]
):
    timing = validate_schedule_time(rrule, dtstart, "Asia/Ho_Chi_Minh", exdates)
    start, end = datetime(2029, 12, 1, tzinfo=HANOI), datetime(2033, 1, 1, tzinfo=HANOI)
    expected = list(expand(timing.rule, timing.dtstart, start=start, end=end, exdates=timing.exdates))
    (vevent,) = components(calendar(event_for(rrule, dtstart, exdates)), "VEVENT")
    assert dateutil_starts(vevent, start, end) == expected
    assert expected


# --- the route ----------------------------------------------------------------------------------

FEED = "/api/v1/areas/{code}/programme.ics"


def _create(api: ControllerHandle, media_id: str, **fields: Any) -> str:
    body: dict[str, Any] = {
        "name": "Bản tin sáng, thứ 2–7; Phường An",
        "targets": {"areas": ["hn.a"]},
        "content": {"media_ids": [media_id]},
        "dtstart": "2030-01-07T06:00",
        "rrule": "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA",
        **fields,
    }
    with api.client() as client:
        response = client.post("/api/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    schedule_id: str = response.json()["id"]
    return schedule_id


def _without_stamps(text: str) -> str:
    return re.sub(r"DTSTAMP:\d{8}T\d{6}Z\r\n", "", text)


@pytest.mark.integration
def test_the_area_feed_through_the_api(api: ControllerHandle):
    media_id = upload(api, 0.5)
    weekly = _create(api, media_id)
    elsewhere = _create(
        api, media_id, name="Xã Bình", targets={"areas": ["hn.b"]}, dtstart="2030-02-04T06:00"
    )
    disabled = _create(api, media_id, name="Tạm dừng", enabled=False, dtstart="2030-03-04T06:00")
    path = FEED.format(code="hn.a.t1")
    try:
        with api.client() as client:
            response = client.get(path)
            window = {"start": "2030-01-01T00:00:00+07:00", "end": "2030-03-01T00:00:00+07:00"}
            occurrences = client.get(f"/api/v1/schedules/{weekly}/occurrences", params=window).json()
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/calendar; charset=utf-8"
        assert response.headers["content-disposition"] == 'inline; filename="hn.a.t1.ics"'
        text = response.content.decode("utf-8")
        assert_short_whole_lines(text)
        assert ("X-WR-CALNAME", {}, "Lịch phát thanh – Tổ dân phố 1") in content_lines(text)
        uids = [prop(event, "UID") for event in components(text, "VEVENT")]
        assert f"{weekly}@wardcast" in uids
        assert f"{elsewhere}@wardcast" not in uids and f"{disabled}@wardcast" not in uids
        (event,) = [e for e in components(text, "VEVENT") if prop(e, "UID") == f"{weekly}@wardcast"]
        assert unescape(prop(event, "SUMMARY")) == "Bản tin sáng, thứ 2–7; Phường An [Thông thường]"
        assert ("DTEND", {"TZID": "Asia/Ho_Chi_Minh"}, "20300107T060001") in event
        start, end = (datetime.fromisoformat(window[k]) for k in ("start", "end"))
        assert [m.isoformat() for m in dateutil_starts(event, start, end)] == [
            o["start_local"] for o in occurrences
        ]
        assert len(occurrences) == 46

        by_query = httpx.get(api.base_url + path, params={"token": api.token}, timeout=30)
        assert by_query.status_code == 200, by_query.text
        assert _without_stamps(by_query.text) == _without_stamps(text)

        assert httpx.get(api.base_url + path, params={"token": "wrong"}, timeout=30).status_code == 401
        assert httpx.get(api.base_url + path, timeout=30).status_code == 401
        with api.client(token="wrong") as client:
            assert client.get(path).status_code == 401
            assert client.get(path, params={"token": api.token}).status_code == 401  # the header wins
        with api.client() as client:
            unknown = client.get(FEED.format(code="nowhere"))
        assert unknown.status_code == 404 and unknown.json()["field"] == "code"

        other_ward = api.api_key("ward_staff", ward="hn.b")
        assert httpx.get(api.base_url + path, params={"token": other_ward}, timeout=30).status_code == 403
        ward = api.api_key("ward_staff", ward="hn.a")
        assert httpx.get(api.base_url + path, params={"token": ward}, timeout=30).status_code == 200
    finally:
        with api.client() as client:
            for schedule_id in (weekly, elsewhere, disabled):
                client.delete(f"/api/v1/schedules/{schedule_id}")


def test_dtstart_is_moved_onto_the_rule_so_apps_show_no_extra_instance():
    (vevent,) = components(calendar(event_for("FREQ=WEEKLY;BYDAY=MO", "2030-01-09T17:30")), "VEVENT")
    assert ("DTSTART", {"TZID": "Asia/Ho_Chi_Minh"}, "20300114T173000") in vevent
