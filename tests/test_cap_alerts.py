"""CAP 1.2 through `POST /api/v1/alerts/cap`, end to end: Alert, Update, Cancel, Exercise, System, errors.

The messages are written by hand from the CAP 1.2 specification (OASIS, 2010).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.scenario import all_ended, place_speakers, seed
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle

pytestmark = pytest.mark.integration

SENDER = "ioc@backan.gov.vn"


def _cap_time(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "-00:00")


def _info(language: str, headline: str, area: str, *, expires: datetime, severity: str = "Extreme") -> str:
    return f"""
  <info>
    <language>{language}</language>
    <category>Met</category>
    <event>{headline}</event>
    <urgency>Immediate</urgency>
    <severity>{severity}</severity>
    <certainty>Observed</certainty>
    <expires>{_cap_time(expires)}</expires>
    <senderName>Trung tâm Điều hành thông minh</senderName>
    <headline>{headline}</headline>
    <description>Nước sông Cầu lên nhanh.</description>
    <instruction>Di chuyển lên chỗ cao.</instruction>
    {area}
  </info>"""


def _geocode_area(code: str) -> str:
    return f"""<area>
      <areaDesc>Khu vực {code}</areaDesc>
      <geocode><valueName>WARDCAST_AREA</valueName><value>{code}</value></geocode>
    </area>"""


def _cap(
    identifier: str,
    *,
    status: str = "Actual",
    msg_type: str = "Alert",
    infos: str = "",
    references: str | None = None,
    sent: datetime | None = None,
) -> bytes:
    refs = f"<references>{references}</references>" if references else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">
  <identifier>{identifier}</identifier>
  <sender>{SENDER}</sender>
  <sent>{_cap_time(sent or datetime.now(UTC))}</sent>
  <status>{status}</status>
  <msgType>{msg_type}</msgType>
  <scope>Public</scope>
  {refs}
  {infos}
</alert>""".encode()


def _post(controller: ControllerHandle, body: bytes, content_type: str = "application/cap+xml") -> Any:
    with controller.client() as client:
        return client.post("/api/v1/alerts/cap", content=body, headers={"Content-Type": content_type})


def _alert(controller: ControllerHandle, alert_id: str) -> dict[str, Any]:
    with controller.client() as client:
        response = client.get(f"/api/v1/alerts/{alert_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_alert_update_and_cancel_follow_the_references(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    expires = datetime.now(UTC) + timedelta(hours=1)
    sent = datetime.now(UTC) - timedelta(seconds=5)
    english = _info("en-US", "Flood warning", _geocode_area("hn.b.t1"), expires=expires)
    vietnamese = _info("vi-VN", "Cảnh báo lũ", _geocode_area("hn.b.t1"), expires=expires)
    first = _post(controller, _cap("LU-001", infos=english + vietnamese, sent=sent))
    assert first.status_code == 201, first.text
    assert first.json()["device_count"] == 2
    shown = _alert(controller, first.json()["id"])
    assert shown["headline"] == "Cảnh báo lũ" and shown["language"] == "vi-VN"  # Vietnamese preferred
    assert shown["priority"] == "emergency" and shown["mode"] == "live"
    again = _post(controller, _cap("LU-001", infos=english + vietnamese, sent=sent))
    assert again.status_code in {200, 409}  # the same identifier: the same alert, or refused if changed
    reference = f"{SENDER},LU-001,{_cap_time(sent)}"
    update = _post(
        controller,
        _cap(
            "LU-002",
            msg_type="Update",
            references=reference,
            infos=_info("vi-VN", "Lũ lan rộng", _geocode_area("hn.b"), expires=expires),
        ),
    )
    assert update.status_code == 201, update.text
    assert update.json()["device_count"] == 3 and update.json()["cancelled"] == [first.json()["id"]]
    assert _alert(controller, first.json()["id"])["status"] == "superseded"
    cancel = _post(
        controller,
        _cap("LU-003", msg_type="Cancel", references=f"{SENDER},LU-002,{_cap_time(datetime.now(UTC))}"),
    )
    assert cancel.status_code == 201, cancel.text
    assert cancel.json()["cancelled"] == [update.json()["id"]]
    assert _alert(controller, update.json()["id"])["status"] == "cancelled"


def test_an_identical_message_sent_twice_is_one_alert(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    body = _cap(
        "LU-010",
        infos=_info(
            "vi-VN", "Cảnh báo", _geocode_area("hn.a.t3"), expires=datetime.now(UTC) + timedelta(hours=1)
        ),
    )
    first, again = _post(controller, body), _post(controller, body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]


def test_an_exercise_is_a_drill_and_system_or_draft_play_nothing(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    expires = datetime.now(UTC) + timedelta(hours=1)
    with EventWatcher(controller) as watcher:
        drill = _post(
            controller,
            _cap(
                "DT-001",
                status="Exercise",
                infos=_info("vi-VN", "Diễn tập", _geocode_area("hn.b.t2"), expires=expires),
            ),
        )
        assert drill.status_code == 201, drill.text
        shown = _alert(controller, drill.json()["id"])
        assert shown["mode"] == "drill"
        watcher.wait_for(all_ended(shown["broadcast_id"], 1, "completed"), what="the drill played")
    plays = [p for p in fleet.plays() if p["broadcast_id"] == shown["broadcast_id"]]
    assert plays and all(p["mode"] == "drill" for p in plays)
    for status in ("System", "Draft"):
        recorded = _post(
            controller,
            _cap(
                f"SY-{status}",
                status=status,
                infos=_info("vi-VN", "Kiểm tra", _geocode_area("hn.b.t2"), expires=expires),
            ),
        )
        assert recorded.status_code == 201, recorded.text
        assert recorded.json()["status"] == "recorded" and recorded.json()["device_count"] == 0
    live_update = _post(
        controller,
        _cap(
            "DT-002",
            msg_type="Update",
            references=f"{SENDER},DT-001,{_cap_time(datetime.now(UTC))}",
            infos=_info("vi-VN", "Thật", _geocode_area("hn.b.t2"), expires=expires),
        ),
    )
    assert live_update.status_code == 400 and live_update.json()["field"] == "alert/status", live_update.text


def test_a_cap_polygon_reaches_the_speakers_inside_it(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    place_speakers(controller)
    # CAP writes lat,lon pairs; around hn.a.t3 (22.156, 105.830) only.
    polygon = "22.155,105.829 22.155,105.831 22.157,105.831 22.157,105.829 22.155,105.829"
    area = f"<area><areaDesc>Tổ 3</areaDesc><polygon>{polygon}</polygon></area>"
    response = _post(
        controller,
        _cap("PG-001", infos=_info("vi-VN", "Sạt lở", area, expires=datetime.now(UTC) + timedelta(hours=1))),
    )
    assert response.status_code == 201, response.text
    assert {d["device_id"] for d in _alert(controller, response.json()["id"])["deliveries"]} == {"spk-a3-1"}


def test_invalid_or_expired_cap_is_refused_naming_the_element(controller: ControllerHandle):
    seed(controller)
    future = datetime.now(UTC) + timedelta(hours=1)
    no_event = _cap(
        "BAD-1",
        infos=_info("vi-VN", "X", _geocode_area("hn.a"), expires=future).replace("<event>X</event>", ""),
    )
    response = _post(controller, no_event)
    assert response.status_code == 400 and response.json()["field"] == "alert/info[0]/event", response.text
    expired = _cap(
        "BAD-2",
        infos=_info("vi-VN", "Cũ", _geocode_area("hn.a"), expires=datetime.now(UTC) - timedelta(minutes=5)),
    )
    response = _post(controller, expired)
    assert response.status_code == 400 and response.json()["field"] == "alert/info[0]/expires", response.text
    nowhere = _cap(
        "BAD-3", infos=_info("vi-VN", "Đâu?", "<area><areaDesc>?</areaDesc></area>", expires=future)
    )
    response = _post(controller, nowhere)
    assert response.status_code == 400 and response.json()["field"] == "alert/info[0]/area", response.text
    assert _post(controller, b"<alert", "application/xml").status_code == 400
    assert _post(controller, b"{}", "application/json").status_code == 415
    with controller.client() as client:
        assert client.get("/api/v1/broadcasts").json() == []
