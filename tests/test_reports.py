"""Proof of play: play counts per device and ward, the broadcast log, their CSV, and their checks."""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, insert
from sqlmodel import Session

from controller.domain.areas import Area, AreaTree
from controller.services.auth import Principal, Role
from controller.services.reports import DeviceLine, PlaysReport, PlayTotals, ReportService, plays_csv, ward_of
from controller.store.db import create_db_engine, migrate
from controller.store.models import (
    AreaRow,
    BroadcastRow,
    DeliveryEventRow,
    DeliveryRow,
    DeviceRow,
    MediaRow,
    OccurrenceRow,
)
from tests.support.scenario import SPEAKERS, all_ended, all_in, seed, send, upload
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle

HANOI = ZoneInfo("Asia/Ho_Chi_Minh")
BOM = b"\xef\xbb\xbf"
COUNTS = ("scheduled", "played_ok", "interrupted", "missed", "failed", "cancelled", "pending", "resumed")
ADMIN = Principal(key_id="test", name="test", role=Role.ADMIN, ward_code=None)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _window(start: datetime, end: datetime, **extra: str) -> dict[str, str]:
    return {"from": _iso(start), "to": _iso(end), **extra}


def _soon(seconds: int) -> str:
    moment = datetime.now(HANOI).replace(microsecond=0) + timedelta(seconds=seconds)
    return moment.replace(tzinfo=None).isoformat()


def _schedule(controller: ControllerHandle, media_id: str, name: str, area: str, dtstart: str) -> str:
    body = {
        "name": name,
        "targets": {"areas": [area]},
        "content": {"media_ids": [media_id]},
        "dtstart": dtstart,
    }
    with controller.client() as client:
        response = client.post("/api/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    schedule_id: str = response.json()["id"]
    return schedule_id


def _csv_rows(body: bytes) -> list[dict[str, str]]:
    assert body.startswith(BOM), body[:20]
    return list(csv.DictReader(io.StringIO(body[len(BOM) :].decode("utf-8"))))


def _balanced(line: dict[str, Any]) -> bool:
    ends = ("played_ok", "interrupted", "missed", "failed", "cancelled", "pending")
    return int(line["scheduled"]) == sum(int(line[name]) for name in ends)


# -- end to end: real controller, Mosquitto and simulated speakers ------------------------------------
@pytest.mark.integration
def test_the_report_and_the_log_tell_what_each_speaker_played(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    short, bulletin, long_notice, lost = (upload(controller, s) for s in (2.0, 1.0, 120.0, 0.5))
    start = datetime.now(UTC) - timedelta(seconds=1)
    with EventWatcher(controller) as watcher:
        # A scheduled bulletin on tổ 1, an announcement on tổ 2, a notice cancelled mid-play on thôn Nà Pài.
        morning = _schedule(controller, bulletin, "Bản tin sáng", "hn.a.t1", _soon(3))
        done = send(controller, short, targets={"areas": ["hn.a.t2"]})
        watcher.wait_for(all_ended(str(done["id"]), 2, "completed"), what="the announcement completed")
        cancelled = send(controller, long_notice, targets={"areas": ["hn.b.t1"]})
        cancelled_id = str(cancelled["id"])
        watcher.wait_for(all_in(cancelled_id, 2, "playing"), what="the notice playing")
        with controller.client() as client:
            assert client.post(f"/api/v1/broadcasts/{cancelled_id}/cancel").status_code == 200
        watcher.wait_for(all_ended(cancelled_id, 2, "cancelled"), what="the notice cancelled")
        watcher.wait_for(
            lambda events: any(
                e.get("type") == "delivery" and e["device_id"] == "spk-a1-1" and e["state"] == "completed"
                for e in events
            ),
            timeout=60,
            what="the scheduled bulletin to fire and complete",
        )
        fired = next(
            e["broadcast_id"]
            for e in watcher.events
            if e.get("type") == "delivery" and e["device_id"] == "spk-a1-1"
        )
        watcher.wait_for(all_ended(fired, 2, "completed"), what="the bulletin completed on both speakers")
        # An occurrence of another schedule on tổ 3 that was missed while the controller was down.
        lost_schedule = _schedule(controller, lost, "Lịch bị lỡ", "hn.a.t3", "2030-01-07T06:00")
        engine = create_db_engine(controller.database_url)
        try:
            with Session(engine) as session:
                session.add(
                    OccurrenceRow(
                        schedule_id=lost_schedule,
                        planned_at=datetime.now(UTC),
                        outcome="missed",
                        recorded_at=datetime.now(UTC),
                        detail="the controller was not running at the planned time",
                    )
                )
                session.commit()
        finally:
            engine.dispose()
        middle = datetime.now(UTC)
        # Once the same speakers finish a later broadcast, their "stopped" reports (played
        # seconds of the cancelled notice) are stored: reports travel in order.
        later = send(controller, short, targets={"areas": ["hn.b.t1"]})
        watcher.wait_for(all_ended(str(later["id"]), 2, "completed"), what="the later broadcast completed")
    end = datetime.now(UTC) + timedelta(seconds=1)

    with controller.client() as client:
        response = client.get("/api/v1/reports/plays", params=_window(start, middle, area="hn"))
        assert response.status_code == 200, response.text
        report = response.json()
        later_report = client.get("/api/v1/reports/plays", params=_window(start, end, area="hn.b.t1")).json()
        log = client.get("/api/v1/reports/plays/log", params=_window(start, middle, area="hn")).json()
        device_csv = client.get(
            "/api/v1/reports/plays", params=_window(start, middle, area="hn", format="csv")
        )
        ward_csv = client.get(
            "/api/v1/reports/plays",
            params=_window(start, middle, area="hn", level="ward"),
            headers={"Accept": "text/csv"},
        )
        log_csv = client.get(
            "/api/v1/reports/plays/log",
            params=_window(start, middle, area="hn"),
            headers={"Accept": "text/csv"},
        )
        details = {
            broadcast_id: client.get(f"/api/v1/broadcasts/{broadcast_id}").json()
            for broadcast_id in (str(done["id"]), fired, cancelled_id)
        }

    # Per device.
    devices = {line["device_id"]: line for line in report["devices"]}
    assert set(devices) == {f"spk-{address}" for group in SPEAKERS.values() for address in group}
    assert all(_balanced(line) for line in devices.values())
    for device_id, played in (("spk-a2-1", 2.0), ("spk-a2-2", 2.0), ("spk-a1-1", 1.0), ("spk-a1-2", 1.0)):
        line = devices[device_id]
        assert (line["scheduled"], line["played_ok"]) == (1, 1), line
        assert line["played_s"] == pytest.approx(played, abs=0.3)
        assert line["requested_s"] == pytest.approx(played)
        assert line["ward"] == "hn.a" and line["ward_name"] == "Phường An"
    missed = devices["spk-a3-1"]
    assert (missed["scheduled"], missed["missed"], missed["played_s"]) == (1, 1, 0)
    assert missed["requested_s"] == pytest.approx(0.5)
    for device_id in ("spk-b1-1", "spk-b1-2"):
        line = devices[device_id]
        assert (line["scheduled"], line["cancelled"], line["played_ok"]) == (1, 1, 0), line
        assert 0 < line["played_s"] < 120 and line["requested_s"] == pytest.approx(120)
        assert line["area_name"] == "Thôn Nà Pài" and line["ward_name"] == "Xã Bình"
    assert devices["spk-b2-1"]["scheduled"] == 0 and devices["spk-b2-1"]["area_name"] == "Thôn Khuổi Đắng"

    # Per ward: the sums of their devices.
    wards = {ward["code"]: ward for ward in report["wards"]}
    assert set(wards) == {"hn.a", "hn.b"}
    ward_a, ward_b = wards["hn.a"], wards["hn.b"]
    assert (ward_a["name"], ward_a["devices"], ward_a["scheduled"]) == ("Phường An", 5, 5)
    assert (ward_a["played_ok"], ward_a["missed"], ward_a["cancelled"]) == (4, 1, 0)
    assert ward_a["played_s"] == pytest.approx(6.0, abs=0.6) and ward_a["requested_s"] == pytest.approx(6.5)
    assert (ward_b["name"], ward_b["devices"], ward_b["scheduled"], ward_b["cancelled"]) == (
        "Xã Bình",
        3,
        2,
        2,
    )
    assert ward_b["requested_s"] == pytest.approx(240)
    assert report["totals"]["scheduled"] == 7 and report["totals"]["played_ok"] == 4
    assert (report["area"], report["area_name"]) == ("hn", "Thành phố Thử")

    # A wider window on one group: the later broadcast counts too, and only that group's ward shows.
    assert [ward["code"] for ward in later_report["wards"]] == ["hn.b"]
    assert later_report["wards"][0]["devices"] == 2
    for line in later_report["devices"]:
        assert (line["scheduled"], line["played_ok"], line["cancelled"]) == (2, 1, 1)
        assert line["requested_s"] == pytest.approx(122)

    # CSV: a BOM, then one row per device (or ward) that a spreadsheet reads with its accents intact.
    assert device_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in device_csv.headers["content-disposition"]
    rows = {row["device_id"]: row for row in _csv_rows(device_csv.content)}
    assert set(rows) == set(devices)
    assert rows["spk-a2-1"]["area_name"] == "Tổ dân phố 2" and rows["spk-a2-1"]["played_ok"] == "1"
    assert rows["spk-b1-1"]["ward_name"] == "Xã Bình" and rows["spk-b1-1"]["cancelled"] == "1"
    assert float(rows["spk-b1-1"]["requested_s"]) == pytest.approx(120)
    ward_rows = _csv_rows(ward_csv.content)
    assert [(row["code"], row["name"], row["scheduled"]) for row in ward_rows] == [
        ("hn.a", "Phường An", "5"),
        ("hn.b", "Xã Bình", "2"),
    ]

    # The log: one row per delivery with its times, and one for the missed occurrence.
    expected = {
        d["id"]: (broadcast_id, d) for broadcast_id, detail in details.items() for d in detail["deliveries"]
    }
    by_delivery = {row["delivery_id"]: row for row in log["rows"]}
    assert log["count"] == 7 and set(by_delivery) == {*expected, None}
    for delivery_id, (broadcast_id, delivery) in expected.items():
        row = by_delivery[delivery_id]
        assert row["broadcast_id"] == broadcast_id and row["device_id"] == delivery["device_id"]
        assert row["state"] == delivery["state"]
        queued, started, ended = (
            datetime.fromisoformat(row[k]) for k in ("queued_at", "started_at", "ended_at")
        )
        assert queued <= started <= ended
        events = {e["state"]: e["at"] for e in delivery["events"]}
        assert row["started_at"] == events["playing"] and row["ended_at"] == events[delivery["state"]]
        assert row["requested_s"] == pytest.approx({str(done["id"]): 2.0, fired: 1.0}.get(broadcast_id, 120))
        if broadcast_id == fired:
            assert row["schedule_id"] == morning and row["schedule_name"] == "Bản tin sáng"
            assert row["planned_at"] is not None
        else:
            assert row["schedule_id"] is None and row["planned_at"] is None
    lost_row = by_delivery[None]
    assert (lost_row["state"], lost_row["schedule_name"], lost_row["device_id"]) == (
        "missed",
        "Lịch bị lỡ",
        "spk-a3-1",
    )
    assert lost_row["started_at"] is None and "was missed" in lost_row["detail"]

    csv_log = _csv_rows(log_csv.content)
    assert len(csv_log) == 7
    bulletin_rows = [row for row in csv_log if row["schedule_name"] == "Bản tin sáng"]
    assert len(bulletin_rows) == 2 and all(row["area_name"] == "Tổ dân phố 1" for row in bulletin_rows)
    assert all(row["started_at"].endswith("+07:00") for row in bulletin_rows)
    assert {row["delivery_id"] for row in csv_log} == {*expected, ""}


# -- checks: every refusal names its field ---------------------------------------------------------
START = datetime(2026, 12, 1, tzinfo=HANOI)


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/api/v1/reports/plays", "/api/v1/reports/plays/log"])
@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"area": "nowhere", "from": _iso(START), "to": _iso(START + timedelta(days=1))}, 404, "area"),
        ({"area": "hn", "from": _iso(START), "to": _iso(START)}, 422, "to"),
        ({"area": "hn", "from": _iso(START), "to": _iso(START - timedelta(hours=1))}, 422, "to"),
        ({"area": "hn", "from": _iso(START), "to": _iso(START + timedelta(days=367))}, 422, "to"),
        ({"area": "hn", "from": "2026-12-01T00:00:00", "to": _iso(START + timedelta(days=1))}, 422, "from"),
        ({"area": "hn", "from": _iso(START), "to": "2026-12-02T00:00:00"}, 422, "to"),
        ({"area": "hn", "from": "yesterday", "to": _iso(START + timedelta(days=1))}, 422, "from"),
        ({"from": _iso(START), "to": _iso(START + timedelta(days=1))}, 422, "area"),
        ({"area": "hn", "to": _iso(START + timedelta(days=1))}, 422, "from"),
        (
            {"area": "hn", "from": _iso(START), "to": _iso(START + timedelta(days=1)), "format": "xls"},
            422,
            "format",
        ),
    ],
)
def test_bad_report_parameters_name_the_field(
    api: ControllerHandle, path: str, params: dict[str, str], status: int, field: str
):
    with api.client() as client:
        response = client.get(path, params=params)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


@pytest.mark.integration
def test_a_full_year_is_allowed_and_an_empty_window_reports_zeros(api: ControllerHandle):
    with api.client() as client:
        response = client.get(
            "/api/v1/reports/plays", params=_window(START, START + timedelta(days=366), area="hn.b")
        )
    assert response.status_code == 200, response.text
    report = response.json()
    assert [ward["code"] for ward in report["wards"]] == ["hn.b"]
    assert {line["device_id"] for line in report["devices"]} == {"spk-b1-1", "spk-b1-2", "spk-b2-1"}
    assert report["totals"]["scheduled"] == 0 and report["totals"]["played_percent"] is None


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/api/v1/reports/plays", "/api/v1/reports/plays/log"])
def test_ward_staff_see_only_their_ward(api: ControllerHandle, path: str):
    token = api.api_key("ward_staff", ward="hn.a")
    window = _window(START, START + timedelta(days=7))
    with api.client(token) as client:
        for area in ("hn", "hn.b", "hn.b.t1"):
            response = client.get(path, params={**window, "area": area})
            assert response.status_code == 403, response.text
            assert response.json()["field"] == "area"
        for area in ("hn.a", "hn.a.t1"):
            response = client.get(path, params={**window, "area": area})
            assert response.status_code == 200, response.text
            assert response.json()["area"] == area


# -- the service on its own: resumed chains, ward rules, and scale -------------------------------------
@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    migrate(engine)
    try:
        yield engine
    finally:
        engine.dispose()


WARD_TREE = [
    {"code": "c", "name": "Thành phố Thử", "kind": "city", "parent_code": None},
    {"code": "c.w", "name": "Phường Hòa", "kind": "ward", "parent_code": "c"},
    {"code": "c.w.g", "name": "Tổ 1", "kind": "group", "parent_code": "c.w"},
]


def _store_fleet(engine: Engine, now: datetime, devices: int) -> list[str]:
    ids = [f"spk-{index}" for index in range(devices)]
    with engine.begin() as connection:
        connection.execute(insert(AreaRow), WARD_TREE)
        connection.execute(
            insert(DeviceRow),
            [
                {
                    "id": device_id,
                    "kind": "speaker",
                    "area_code": "c.w.g",
                    "transport": "mqtt",
                    "address": device_id,
                    "status": {},
                    "created_at": now,
                }
                for device_id in ids
            ],
        )
        connection.execute(
            insert(MediaRow),
            [
                {
                    "id": "m",
                    "sha256": "0" * 64,
                    "content_type": "audio/wav",
                    "format": "wav",
                    "duration_s": 60.0,
                    "size_bytes": 1,
                    "created_at": now,
                }
            ],
        )
    return ids


def _broadcast(broadcast_id: str, at: datetime) -> dict[str, Any]:
    return {
        "id": broadcast_id,
        "media_id": "m",
        "priority_class": "normal",
        "sub_priority": 0,
        "rank": 0,
        "mode": "live",
        "repeats": 1,
        "max_duration_s": 600.0,
        "playlist_tail": [],
        "gap_s": 0.0,
        "planned_play_s": 60.0,
        "on_preempted": "resume",
        "targets": {"areas": ["c.w"]},
        "created_at": at,
        "expires_at": at + timedelta(hours=1),
    }


def _delivery(
    broadcast_id: str,
    device_id: str,
    state: str,
    at: datetime,
    played_s: float | None,
    resumes: str | None = None,
) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "broadcast_id": broadcast_id,
        "device_id": device_id,
        "command_id": str(uuid.uuid4()),
        "state": state,
        "state_at": at,
        "detail": None,
        "played_s": played_s,
        "resumes_delivery_id": resumes,
    }


def test_a_preempted_delivery_played_again_counts_once(engine: Engine):
    now = datetime.now(UTC)
    (device,) = _store_fleet(engine, now, 1)
    resumed, dropped = str(uuid.uuid4()), str(uuid.uuid4())
    first = _delivery(resumed, device, "interrupted", now, 20.0)
    again = _delivery(resumed, device, "completed", now, None, resumes=first["id"])
    lost = _delivery(dropped, device, "interrupted", now, 5.0)
    with engine.begin() as connection:
        connection.execute(insert(BroadcastRow), [_broadcast(resumed, now), _broadcast(dropped, now)])
        connection.execute(insert(DeliveryRow), [first])
        connection.execute(insert(DeliveryRow), [again, lost])
        connection.execute(
            insert(DeliveryEventRow),
            [
                {"delivery_id": d["id"], "state": "queued", "at": now, "source": "controller", "detail": None}
                for d in (first, again, lost)
            ],
        )
    report = ReportService(engine).plays("c", now - timedelta(hours=1), now + timedelta(hours=1), ADMIN)
    (line,) = report.devices
    totals = line.totals.as_dict()
    assert {name: totals[name] for name in COUNTS} == {
        "scheduled": 2,
        "played_ok": 1,
        "interrupted": 1,
        "missed": 0,
        "failed": 0,
        "cancelled": 0,
        "pending": 0,
        "resumed": 1,
    }
    # Requested once per request; played: 20 s before the preemption, 60 s again, 5 s of the dropped one.
    assert totals["requested_s"] == pytest.approx(120) and totals["played_s"] == pytest.approx(85)
    log = ReportService(engine).log("c.w", now - timedelta(hours=1), now + timedelta(hours=1), ADMIN)
    assert len(log.entries) == 3
    assert [e.resumes_delivery_id for e in log.entries if e.delivery_id == again["id"]] == [first["id"]]


def test_the_ward_of_a_device_is_its_ward_or_commune_else_the_area_below_the_root():
    tree = AreaTree(
        [
            Area("p", "Tỉnh Thử", "province"),
            Area("p.d", "Huyện Thử", "district", "p"),
            Area("p.d.g", "Thôn A", "group", "p.d"),
            Area("p.d.x", "Xã B", "commune", "p.d"),
            Area("p.d.x.g", "Thôn C", "group", "p.d.x"),
        ]
    )
    assert ward_of(tree, "p.d.x.g").code == "p.d.x"
    assert ward_of(tree, "p.d.x").code == "p.d.x"
    assert ward_of(tree, "p.d.g").code == "p.d"  # no ward or commune above it: the district
    assert ward_of(tree, "p").code == "p"


def test_a_ward_with_fifty_thousand_deliveries_answers_in_well_under_a_second(engine: Engine):
    now = datetime.now(UTC)
    devices = _store_fleet(engine, now, 100)
    broadcasts, deliveries, events = [], [], []
    states = ["completed"] * 8 + ["expired", "cancelled"]
    for index in range(500):
        broadcast_id, at = str(uuid.uuid4()), now - timedelta(days=10) + timedelta(minutes=20 * index)
        broadcasts.append(_broadcast(broadcast_id, at))
        for position, device_id in enumerate(devices):
            state = states[(index + position) % len(states)]
            delivery = _delivery(broadcast_id, device_id, state, at + timedelta(seconds=70), None)
            deliveries.append(delivery)
            events.append({"delivery_id": delivery["id"], "state": "queued", "at": at})
            events.append({"delivery_id": delivery["id"], "state": state, "at": at + timedelta(seconds=70)})
            if state == "completed":
                events.append(
                    {"delivery_id": delivery["id"], "state": "playing", "at": at + timedelta(seconds=5)}
                )
    with engine.begin() as connection:
        connection.execute(insert(BroadcastRow), broadcasts)
        for offset in range(0, len(deliveries), 10_000):
            connection.execute(insert(DeliveryRow), deliveries[offset : offset + 10_000])
        for offset in range(0, len(events), 20_000):
            connection.execute(
                insert(DeliveryEventRow),
                [{**e, "source": "device", "detail": None} for e in events[offset : offset + 20_000]],
            )
    service = ReportService(engine)
    window = (now - timedelta(days=30), now)

    began = time.perf_counter()
    report = service.plays("c.w", *window, ADMIN)
    elapsed = time.perf_counter() - began
    assert report.totals.scheduled == 50_000
    assert (report.totals.played_ok, report.totals.missed, report.totals.cancelled) == (40_000, 5_000, 5_000)
    assert report.totals.requested_s == pytest.approx(3_000_000)
    assert report.totals.played_s == pytest.approx(40_000 * 60)
    assert elapsed < 1.0, f"the report took {elapsed:.2f} s"  # about 0.1 s on a 2-core machine

    began = time.perf_counter()
    log = service.log("c.w", *window, ADMIN)
    elapsed = time.perf_counter() - began
    assert len(log.entries) == 50_000
    assert elapsed < 5.0, f"the log took {elapsed:.2f} s"  # about 0.6-0.9 s on a 2-core machine


def test_csv_cells_never_run_as_formulas_and_keep_their_accents():
    tree = AreaTree([Area("c", "Thành phố", "city"), Area("c.w", '=HYPERLINK("x")', "ward", "c")])
    ward = tree.get("c.w")
    line = DeviceLine("spk-1", "@SUM(A1)", ward, ward, PlayTotals(scheduled=1, played_ok=1))
    start = datetime(2026, 12, 1, tzinfo=UTC)
    report = PlaysReport(tree.get("c"), start, start + timedelta(days=1), line.totals, [], [line])
    (row,) = _csv_rows(plays_csv(report, level="device"))
    assert (row["name"], row["area_name"], row["ward_name"]) == (
        "'@SUM(A1)",
        '\'=HYPERLINK("x")',
        '\'=HYPERLINK("x")',
    )
    assert row["scheduled"] == "1" and row["played_percent"] == ""
