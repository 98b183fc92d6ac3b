"""Schedules through the API: validation by field, occurrences, programme, clashes, and firing."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.support.scenario import all_ended, schedule_history, seed, upload
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle

pytestmark = pytest.mark.integration

HANOI = ZoneInfo("Asia/Ho_Chi_Minh")


def schedule(api: ControllerHandle, media_id: str, **fields: Any) -> Any:
    body: dict[str, Any] = {
        "name": "Bản tin sáng",
        "targets": {"areas": ["hn.a"]},
        "content": {"media_ids": [media_id]},
        "dtstart": "2030-01-07T06:00",
        "rrule": "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA",
        **fields,
    }
    with api.client() as client:
        return client.post("/api/v1/schedules", json=body)


def test_a_weekly_programme_and_its_occurrences(api: ControllerHandle):
    media_id = upload(api, 0.5)
    created = schedule(api, media_id, name="Bản tin sáng thứ 2-7")
    assert created.status_code == 201, created.text
    schedule_id = created.json()["id"]
    assert created.json()["first_occurrence"]["start_utc"] == "2030-01-06T23:00:00Z"
    with api.client() as client:
        occurrences = client.get(
            f"/api/v1/schedules/{schedule_id}/occurrences",
            params={"start": "2030-01-07T00:00:00+07:00", "end": "2030-01-14T00:00:00+07:00"},
        ).json()
        assert [o["start_local"] for o in occurrences] == [
            f"2030-01-{day:02d}T06:00:00+07:00" for day in (7, 8, 9, 10, 11, 12)
        ]
        programme = client.get(
            "/api/v1/areas/hn.a.t1/programme",
            params={"start": "2030-01-07T00:00:00+07:00", "end": "2030-01-08T00:00:00+07:00"},
        ).json()
        mine = [item for item in programme if item["schedule_id"] == schedule_id]
        assert len(mine) == 1 and mine[0]["reach"] == "whole"
        shown = client.get(f"/api/v1/schedules/{schedule_id}").json()
        assert (
            shown["rrule"] == "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA"
            and shown["timezone"] == "Asia/Ho_Chi_Minh"
        )
        assert client.delete(f"/api/v1/schedules/{schedule_id}").status_code == 204
        assert client.get(f"/api/v1/schedules/{schedule_id}").status_code == 404


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"rrule": "FREQ=HOURLY;BYDAY=XX"}, "rrule"),
        ({"rrule": "FREQ=WEEKLY;BYDAY=XX"}, "rrule.BYDAY"),
        ({"rrule": "FREQ=WEEKLY;COUNT=3;UNTIL=20300201T000000Z"}, "rrule"),
        ({"rrule": "FREQ=DAILY;UNTIL=20291231T000000Z"}, "rrule.UNTIL"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"dtstart": "tomorrow at six"}, "dtstart"),
        ({"content": {"media_ids": []}}, "content.media_ids"),
        ({"content": {"media_ids": ["nope"]}}, "content.media_ids[0]"),
        ({"targets": {"areas": ["nowhere"]}}, "targets.areas[0]"),
        ({"rrule": "FREQ=MONTHLY;BYMONTHDAY=31;BYMONTH=2"}, "rrule"),
        ({"content": {"tts": "  \n "}}, "content.tts"),
    ],
)
def test_bad_schedules_name_the_field_and_store_nothing(
    api: ControllerHandle, fields: dict[str, Any], field: str
):
    media_id = upload(api, 0.5)
    with api.client() as client:
        before = client.get("/api/v1/schedules").json()
    response = schedule(api, media_id, **fields)
    assert response.status_code == 422, response.text
    assert response.json()["field"].startswith(field), response.json()
    with api.client() as client:
        assert client.get("/api/v1/schedules").json() == before


def test_a_schedule_spoken_by_text_to_speech(api: ControllerHandle):
    media_id = upload(api, 0.5)
    created = schedule(api, media_id, name="Loa tự đọc", dtstart="2030-02-04T06:00")
    assert created.status_code == 201, created.text
    schedule_id = created.json()["id"]
    text = "Xin chào bà con. Chiều nay 5 giờ, phường phun thuốc diệt muỗi."
    with api.client() as client:
        patched = client.patch(f"/api/v1/schedules/{schedule_id}", json={"content": {"tts": text}})
        assert patched.status_code == 200, patched.text
        (spoken_id,) = client.get(f"/api/v1/schedules/{schedule_id}").json()["content"]["media_ids"]
        assert spoken_id != media_id
        spoken = client.get(f"/api/v1/media/{spoken_id}").json()
        assert spoken["content_type"] == "audio/wav" and spoken["duration_s"] > 1.0, spoken
        assert client.delete(f"/api/v1/schedules/{schedule_id}").status_code == 204


def test_a_window_too_large_is_refused(api: ControllerHandle):
    media_id = upload(api, 0.5)
    schedule_id = schedule(api, media_id, dtstart="2031-03-02T06:00", name="Xa").json()["id"]
    with api.client() as client:
        response = client.get(
            f"/api/v1/schedules/{schedule_id}/occurrences",
            params={"start": "2030-01-01T00:00:00+07:00", "end": "2035-01-01T00:00:00+07:00"},
        )
        client.delete(f"/api/v1/schedules/{schedule_id}")
    assert response.status_code == 422 and response.json()["field"] == "end"


def test_clashes_are_refused_unless_resolved(api: ControllerHandle):
    media_id = upload(api, 0.5)
    # Within the 60-day conflict horizon: a Thursday 19:00 two to three weeks ahead.
    day = datetime.now(HANOI).date() + timedelta(days=14)
    day += timedelta(days=(3 - day.weekday()) % 7)
    evening = f"{day.isoformat()}T19:00"
    first = schedule(api, media_id, name="Lịch A", dtstart=evening, rrule="FREQ=WEEKLY;BYDAY=TH")
    assert first.status_code == 201, first.text
    one_off = {"dtstart": evening, "rrule": None, "targets": {"areas": ["hn.a.t1"]}}
    clash = schedule(api, media_id, name="Lịch B", **one_off)
    assert clash.status_code == 409, clash.text
    body = clash.json()
    assert body["clashes"][0]["schedule_id"] == first.json()["id"]
    assert body["clashes"][0]["times"][0]["start"].startswith(f"{day.isoformat()}T19:00:00")
    assert set(body["clashes"][0]["devices"]) == {"spk-a1-1", "spk-a1-2"}
    higher = schedule(api, media_id, name="Lịch C", priority="priority", **one_off)
    assert higher.status_code == 409
    resolved = schedule(api, media_id, name="Lịch C", priority="priority", resolution="priority", **one_off)
    assert resolved.status_code == 201, resolved.text
    assert resolved.json()["settled_clashes"][0]["schedule_id"] == first.json()["id"]
    elsewhere = schedule(
        api, media_id, name="Lịch D", dtstart=evening, rrule=None, targets={"areas": ["hn.b"]}
    )
    assert elsewhere.status_code == 201, elsewhere.text
    emergency = schedule(api, media_id, name="Lịch E", priority="emergency", **one_off)
    assert emergency.status_code == 201, emergency.text
    with api.client() as client:
        for response in (first, resolved, elsewhere, emergency):
            client.delete(f"/api/v1/schedules/{response.json()['id']}")


def test_a_dry_run_lists_clashes_and_next_occurrences_and_stores_nothing(api: ControllerHandle):
    media_id = upload(api, 0.5)
    day = datetime.now(HANOI).date() + timedelta(days=10)
    evening = f"{day.isoformat()}T20:00"
    first = schedule(api, media_id, name="Lịch có sẵn", dtstart=evening, rrule="FREQ=DAILY;COUNT=3")
    assert first.status_code == 201, first.text
    body: dict[str, Any] = {
        "name": "Thử trước",
        "targets": {"areas": ["hn.a.t1"]},
        "content": {"media_ids": [media_id]},
        "dtstart": evening,
        "rrule": "FREQ=DAILY;COUNT=2",
    }
    with api.client() as client:
        before = len(client.get("/api/v1/schedules").json())
        checked = client.post("/api/v1/schedules/check", json=body)
        assert checked.status_code == 200, checked.text
        result = checked.json()
        assert result["ok"] is False
        (clash,) = result["clashes"]
        assert clash["schedule_id"] == first.json()["id"] and clash["name"] == "Lịch có sẵn"
        assert clash["remedy"] == "time" and clash["overlap_count"] == 2
        assert set(clash["devices"]) == {"spk-a1-1", "spk-a1-2"}
        assert result["device_count"] == 2 and result["devices"] == ["spk-a1-1", "spk-a1-2"]
        assert [o["start_local"] for o in result["next_occurrences"]] == [
            f"{day.isoformat()}T20:00:00+07:00",
            f"{(day + timedelta(days=1)).isoformat()}T20:00:00+07:00",
        ]
        # A higher priority may settle it, and the dry run says so.
        settled = client.post(
            "/api/v1/schedules/check", json={**body, "priority": "priority", "resolution": "priority"}
        ).json()
        assert settled["ok"] is True and settled["settled_clashes"][0]["schedule_id"] == first.json()["id"]
        higher = client.post("/api/v1/schedules/check", json={**body, "priority": "priority"}).json()
        assert higher["clashes"][0]["remedy"] == "priority"
        # Errors are the same as creating's, by field; a past one-off is valid but never plays.
        bad = client.post("/api/v1/schedules/check", json={**body, "rrule": "FREQ=HOURLY"})
        assert bad.status_code == 422 and bad.json()["field"].startswith("rrule")
        past = client.post(
            "/api/v1/schedules/check", json={**body, "dtstart": "2020-01-01T06:00", "rrule": None}
        ).json()
        assert past["ok"] is True and past["next_occurrences"] == []
        assert len(client.get("/api/v1/schedules").json()) == before  # nothing stored
        staff = api.api_key("ward_staff", "hn.a")
    with api.client(staff) as client:
        forged = client.post("/api/v1/schedules/check", json={**body, "targets": {"areas": ["hn.b.t1"]}})
        assert forged.status_code == 403 and forged.json()["field"] == "targets.areas[0]"
        emergency = client.post("/api/v1/schedules/check", json={**body, "priority": "emergency"})
        assert emergency.status_code == 403 and emergency.json()["field"] == "priority"
    with api.client() as client:
        client.delete(f"/api/v1/schedules/{first.json()['id']}")


def test_the_tts_preview_speaks_vietnamese_and_names_the_field_of_a_bad_text(api: ControllerHandle):
    text = "Thông báo: ngày mai phun thuốc muỗi tại tổ dân phố 1"
    with api.client() as client:
        spoken = client.post("/api/v1/tts/preview", json={"text": text})
        assert spoken.status_code == 200, spoken.text
        assert spoken.headers["content-type"] == "audio/wav"
        assert spoken.content[:4] == b"RIFF" and float(spoken.headers["X-Duration-S"]) > 1.0
        media = client.get(f"/api/v1/media/{spoken.headers['X-Media-Id']}").json()
        assert media["duration_s"] == pytest.approx(float(spoken.headers["X-Duration-S"]), abs=0.01)
        # The schedule made from the same text plays the same audio (made once).
        again = client.post("/api/v1/tts/preview", json={"text": text})
        assert again.headers["X-Media-Id"] == spoken.headers["X-Media-Id"]
        for bad in ("", "   ", "x" * 5001):
            refused = client.post("/api/v1/tts/preview", json={"text": bad})
            assert refused.status_code == 422 and refused.json()["field"] == "text", refused.text
    technician = api.api_key("technician")
    with api.client(technician) as client:
        assert client.post("/api/v1/tts/preview", json={"text": text}).status_code == 403


def _soon(seconds: int) -> str:
    moment = datetime.now(HANOI).replace(microsecond=0) + timedelta(seconds=seconds)
    return moment.replace(tzinfo=None).isoformat()


def test_a_schedule_fires_on_time_on_its_group(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    media_id = upload(controller, 1.0)
    with EventWatcher(controller) as watcher:
        created = schedule(controller, media_id, targets={"areas": ["hn.b.t1"]}, dtstart=_soon(3), rrule=None)
        assert created.status_code == 201, created.text
        schedule_id = created.json()["id"]
        watcher.wait_for(
            lambda events: any(e.get("type") == "delivery" for e in events),
            timeout=30,
            what="the occurrence to fire",
        )
        broadcast_id = next(e["broadcast_id"] for e in watcher.events if e.get("type") == "delivery")
        watcher.wait_for(all_ended(broadcast_id, 2, "completed"), what="the group's 2 speakers completed")
    (entry,) = schedule_history(controller, schedule_id)
    assert entry["outcome"] == "fired" and entry["broadcast_id"] == broadcast_id
    played = {
        p["address"] for p in fleet.plays() if p["broadcast_id"] == broadcast_id and p["event"] == "playing"
    }
    assert played == {"b1-1", "b1-2"}
    # The programme carries the occurrence's proof of play, counted over the area's devices.
    planned = datetime.fromisoformat(created.json()["first_occurrence"]["start_utc"])
    window = {
        "start": (planned - timedelta(hours=1)).isoformat(),
        "end": (planned + timedelta(hours=1)).isoformat(),
    }
    with controller.client() as client:
        group = client.get("/api/v1/areas/hn.b.t1/programme", params=window).json()
        other = client.get("/api/v1/areas/hn.b.t2/programme", params=window).json()
    (item,) = [i for i in group if i["schedule_id"] == schedule_id]
    assert item["result"]["outcome"] == "fired" and item["result"]["broadcast_id"] == broadcast_id
    assert (item["result"]["devices"], item["result"]["played"], item["result"]["failed"]) == (2, 2, 0)
    assert [i for i in other if i["schedule_id"] == schedule_id] == []


def test_occurrences_missed_while_down_play_late_within_grace_or_are_recorded_missed(
    controller: ControllerHandle, fleet: FleetHandle, tmp_path: Path
):
    seed(controller)
    media_id = upload(controller, 0.5)
    soon = schedule(
        controller, media_id, name="Trong hạn", targets={"areas": ["hn.b.t1"]}, dtstart=_soon(2), rrule=None
    )
    late = schedule(
        controller,
        media_id,
        name="Quá hạn",
        targets={"areas": ["hn.b.t2"]},
        dtstart=_soon(2),
        rrule=None,
        priority="priority",
    )
    assert soon.status_code == 201 and late.status_code == 201
    planned = datetime.fromisoformat(soon.json()["first_occurrence"]["start_utc"])
    controller.kill()
    # The outage must outlast the planned instant: this waits for the wall clock, not for a component.
    threading.Event().wait(max(0.0, (planned - datetime.now(UTC)).total_seconds() + 2.5))
    controller.extra_env = {"WARDCAST_SCHEDULES__GRACE_S__PRIORITY": "1"}
    controller.start()  # catches up before it reports READY
    (played,) = schedule_history(controller, soon.json()["id"])
    (missed,) = schedule_history(controller, late.json()["id"])
    assert played["outcome"] == "fired"
    assert missed["outcome"] == "missed" and "grace time of 1 s" in missed["detail"]
