"""Alerts for the IOC through the API, end to end: a real Mosquitto, the controller, a simulated fleet."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from tests.support.broker import TestBroker
from tests.support.scenario import all_ended, all_in, place_speakers, seed, upload
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle, wait_until

pytestmark = pytest.mark.integration


def _alert(controller: ControllerHandle, token: str, **fields: Any) -> Any:
    body: dict[str, Any] = {
        "headline": "Cảnh báo lũ",
        "text": "Nước sông Cầu đang lên nhanh, người dân di chuyển lên chỗ cao.",
        "targets": {"areas": ["hn.b.t1"]},
        **fields,
    }
    headers = {"Idempotency-Key": fields.pop("idempotency_key")} if "idempotency_key" in fields else {}
    body.pop("idempotency_key", None)
    with controller.client(token) as client:
        return client.post("/api/v1/alerts", json=body, headers=headers)


def test_an_alert_plays_on_exactly_its_group_and_is_audited(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    ioc = controller.api_key("ioc")
    with EventWatcher(controller) as watcher:
        response = _alert(controller, ioc)
        assert response.status_code == 201, response.text
        alert = response.json()
        assert alert["device_count"] == 2 and alert["status"] == "active"
        with controller.client(ioc) as client:
            broadcast_id = client.get(f"/api/v1/alerts/{alert['id']}").json()["broadcast_id"]
        watcher.wait_for(all_ended(broadcast_id, 2, "completed"), what="the alert completed on both speakers")
    with controller.client(ioc) as client:
        shown = client.get(f"/api/v1/alerts/{alert['id']}").json()
    assert shown["counts"] == {"completed": 2}
    assert {d["device_id"] for d in shown["deliveries"]} == {"spk-b1-1", "spk-b1-2"}
    played = {
        p["address"] for p in fleet.plays() if p["broadcast_id"] == broadcast_id and p["event"] == "playing"
    }
    assert played == {"b1-1", "b1-2"}
    assert all(p["mode"] == "live" for p in fleet.plays() if p["broadcast_id"] == broadcast_id)
    with controller.client() as client:
        audit = client.get("/api/v1/audit").json()
    created = [e for e in audit if e["action"] == "alert.create"]
    assert created and created[-1]["subject"] == alert["id"] and created[-1]["role"] == "ioc"
    calls = [e for e in audit if e["action"] == "api.call" and e["detail"]["path"] == "/api/v1/alerts"]
    assert calls and calls[-1]["detail"]["status"] == 201


def test_a_polygon_over_two_groups_reaches_exactly_their_speakers(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    place_speakers(controller)
    # Around hn.a.t1 (22.150, 105.830) and hn.a.t2 (22.150, 105.836), not hn.a.t3 (22.156, 105.830).
    polygon = {
        "type": "Polygon",
        "coordinates": [
            [[105.828, 22.148], [105.838, 22.148], [105.838, 22.153], [105.828, 22.153], [105.828, 22.148]]
        ],
    }
    response = _alert(controller, controller.token, targets={"polygon": polygon})
    assert response.status_code == 201, response.text
    assert response.json()["device_count"] == 4
    with controller.client() as client:
        shown = client.get(f"/api/v1/alerts/{response.json()['id']}").json()
    assert {d["device_id"] for d in shown["deliveries"]} == {"spk-a1-1", "spk-a1-2", "spk-a2-1", "spk-a2-2"}
    circle = _alert(
        controller, controller.token, targets={"circle": {"lat": 22.156, "lon": 105.830, "radius_m": 150}}
    )
    assert circle.status_code == 201 and circle.json()["device_count"] == 1, circle.text
    nowhere = _alert(
        controller, controller.token, targets={"circle": {"lat": 10.0, "lon": 106.0, "radius_m": 500}}
    )
    assert nowhere.status_code == 400 and nowhere.json()["field"] == "targets.circle", nowhere.text
    with controller.client() as client:
        client.post("/api/v1/alerts/cancel-all")


def test_a_drill_always_starts_with_its_prefix_and_says_so(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    with EventWatcher(controller) as watcher:
        response = _alert(controller, controller.token, mode="drill", targets={"areas": ["hn.b.t2"]})
        assert response.status_code == 201, response.text
        with controller.client() as client:
            shown = client.get(f"/api/v1/alerts/{response.json()['id']}").json()
            broadcast = client.get(f"/api/v1/broadcasts/{shown['broadcast_id']}").json()
            media = [client.get(f"/api/v1/media/{m}").json() for m in broadcast["media_ids"]]
        watcher.wait_for(all_ended(shown["broadcast_id"], 1, "completed"), what="the drill completed")
    assert broadcast["mode"] == "drill"
    assert media[0]["filename"] == "drill-prefix.wav"
    assert media[1]["filename"].startswith("TTS Đây là tin diễn tập"), media[1]
    assert len(media) == 3  # the prefix tone, the drill announcement, then the text
    plays = [p for p in fleet.plays() if p["broadcast_id"] == shown["broadcast_id"]]
    assert plays and all(p["mode"] == "drill" for p in plays)


def test_the_same_idempotency_key_returns_the_same_alert_never_a_second_broadcast(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    ioc = controller.api_key("ioc")
    first = _alert(controller, ioc, idempotency_key="lu-song-cau-2026-11-24-01")
    again = _alert(controller, ioc, idempotency_key="lu-song-cau-2026-11-24-01")
    assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
    assert first.json()["id"] == again.json()["id"]
    changed = _alert(controller, ioc, idempotency_key="lu-song-cau-2026-11-24-01", headline="Khác")
    assert changed.status_code == 409 and changed.json()["field"] == "Idempotency-Key", changed.text
    with controller.client() as client:
        broadcasts = [b for b in client.get("/api/v1/broadcasts").json() if b.get("mode") == "live"]
        client.post("/api/v1/alerts/cancel-all")
    assert len([b for b in broadcasts if b["targets"]["areas"] == ["hn.b.t1"]]) == 1


def test_keys_roles_scope_and_bad_targets_are_refused_and_nothing_is_sent(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    with controller.client("wc_not-a-key") as client:
        assert client.post("/api/v1/alerts", json={}).status_code == 401
    technician = controller.api_key("technician")
    refused = _alert(controller, technician)
    assert refused.status_code == 403, refused.text
    ward_ioc = controller.api_key("ioc", ward="hn.a")
    outside = _alert(controller, ward_ioc, targets={"areas": ["hn.b.t1"]})
    assert outside.status_code == 403 and outside.json()["field"] == "targets.areas[0]", outside.text
    unknown = _alert(controller, controller.token, targets={"areas": ["hn.zz"]})
    assert unknown.status_code == 400 and unknown.json()["field"] == "targets.areas[0]", unknown.text
    open_ring = {
        "type": "Polygon",
        "coordinates": [[[105.8, 22.1], [105.9, 22.1], [105.9, 22.2], [105.8, 22.2]]],
    }
    bad_polygon = _alert(controller, controller.token, targets={"polygon": open_ring})
    assert bad_polygon.status_code == 400 and bad_polygon.json()["field"].startswith("targets.polygon")
    past = _alert(controller, controller.token, expires_at="2020-01-01T00:00:00+07:00")
    assert past.status_code == 422 and past.json()["field"] == "expires_at", past.text
    with controller.client() as client:
        assert client.get("/api/v1/broadcasts").json() == []  # nothing was sent


def test_an_ioc_key_is_rate_limited(controller: ControllerHandle):
    controller.stop()
    controller.extra_env = {"WARDCAST_ALERTS__RATE_LIMIT_PER_MINUTE": "3"}
    controller.start()
    ioc = controller.api_key("ioc")
    with controller.client(ioc) as client:
        statuses = [client.get("/api/v1/areas").status_code for _ in range(4)]
        limited = client.get("/api/v1/areas")
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    assert int(limited.headers["Retry-After"]) >= 1


def test_cancel_all_stops_every_speaker_at_once(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    long_media = upload(controller, 120.0)  # 6 s at the fleet's speed ×20
    with EventWatcher(controller) as watcher:
        first = _alert(controller, controller.token, media_id=long_media, targets={"areas": ["hn.a"]})
        second = _alert(controller, controller.token, media_id=long_media, targets={"areas": ["hn.b"]})
        assert first.status_code == 201 and second.status_code == 201
        with controller.client() as client:
            ids = [
                client.get(f"/api/v1/alerts/{r.json()['id']}").json()["broadcast_id"] for r in (first, second)
            ]
        watcher.wait_for(all_in(ids[0], 5, "playing"), what="ward A playing")
        watcher.wait_for(all_in(ids[1], 3, "playing"), what="ward B playing")
        with controller.client() as client:
            result = client.post("/api/v1/alerts/cancel-all")
        assert result.status_code == 200, result.text
        assert sorted(result.json()["alerts"]) == sorted(r.json()["id"] for r in (first, second))
        watcher.wait_for(all_ended(ids[0], 5, "cancelled"), what="ward A stopped")
        watcher.wait_for(all_ended(ids[1], 3, "cancelled"), what="ward B stopped")
    # The controller records `cancelled` when it cancels; each device then reports `stopped`.
    wait_until(
        lambda: (
            len({p["address"] for p in fleet.plays() if p["broadcast_id"] in ids and p["event"] == "stopped"})
            == 8
        ),
        "every speaker to report it stopped",
    )
    with controller.client() as client:
        statuses = {client.get(f"/api/v1/alerts/{r.json()['id']}").json()["status"] for r in (first, second)}
        audit = client.get("/api/v1/audit", params={"action": "alert.cancel_all"}).json()
    assert statuses == {"cancelled"} and len(audit) == 1


def test_the_audit_log_cannot_be_changed(controller: ControllerHandle):
    seed(controller)
    with controller.client() as client:
        client.post("/api/v1/alerts/cancel-all")  # one audit entry at least
    engine = create_engine(controller.database_url)
    try:
        for statement in ("UPDATE audit_log SET action = 'forged'", "DELETE FROM audit_log"):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def test_led_screens_in_the_area_show_the_headline_and_a_drill_says_so(
    controller: ControllerHandle, tmp_path: Path, mosquitto: TestBroker
):
    seed(controller)
    with controller.client() as client:
        for address in ("led-b1-1", "led-b1-2"):
            created = client.post(
                "/api/v1/devices",
                json={"id": address, "kind": "led_screen", "area": "hn.b.t1", "address": address},
            )
            assert created.status_code == 201, created.text
    screens = FleetHandle(
        mosquitto,
        tmp_path / "fleet",
        ["b1-1", "b1-2"],
        controller.command_key,
        screens=["led-b1-1", "led-b1-2"],
    )
    screens.workdir.mkdir()
    screens.start()
    try:
        with EventWatcher(controller) as watcher:
            live = _alert(controller, controller.token)
            assert live.status_code == 201 and live.json()["device_count"] == 4, live.text
            with controller.client() as client:
                live_broadcast = client.get(f"/api/v1/alerts/{live.json()['id']}").json()["broadcast_id"]
            watcher.wait_for(
                all_in(live_broadcast, 4, "playing"), what="2 speakers playing, 2 screens showing"
            )
            drill = _alert(controller, controller.token, mode="drill", headline="Sơ tán")
            assert drill.status_code == 201, drill.text
            with controller.client() as client:
                drill_broadcast = client.get(f"/api/v1/alerts/{drill.json()['id']}").json()["broadcast_id"]
            watcher.wait_for(all_in(drill_broadcast, 4, "playing"), what="the drill on every device")
            with controller.client() as client:
                assert client.post("/api/v1/alerts/cancel-all").status_code == 200
            watcher.wait_for(all_ended(drill_broadcast, 4, "cancelled"), what="the drill taken down")
        shown = [p for p in screens.plays() if p["event"] == "playing" and p["address"].startswith("led-")]
        headlines = {(p["broadcast_id"], p["headline"]) for p in shown}
        assert (live_broadcast, "Cảnh báo lũ") in headlines
        assert (drill_broadcast, "DIỄN TẬP: Sơ tán") in headlines
        assert all(p["mode"] == "drill" for p in shown if p["broadcast_id"] == drill_broadcast)
        wait_until(
            lambda: (
                {
                    p["address"]
                    for p in screens.plays()
                    if p["event"] == "stopped" and p["address"].startswith("led-")
                }
                == {"led-b1-1", "led-b1-2"}
            ),
            "both screens to take the drill down",
        )
    finally:
        screens.stop()


class _CallbackReceiver(ThreadingHTTPServer):
    """The IOC's end of the webhook: answers 500 to the first call, then 200, and keeps what it got."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls += 1
                status = 500 if outer.calls == 1 else 200
                if status == 200:
                    outer.received.append((dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ARG002 - silences the base class
                return

        super().__init__(("127.0.0.1", 0), Handler)


def test_progress_callbacks_are_signed_retried_and_end_with_the_outcome(
    controller: ControllerHandle, fleet: FleetHandle
):
    secret = "webhook-secret-for-the-test"
    controller.stop()
    controller.extra_env = {"WARDCAST_ALERTS__WEBHOOK_SECRET": secret}
    controller.start()
    seed(controller)
    receiver = _CallbackReceiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/wardcast"
        response = _alert(controller, controller.token, webhook_url=url)
        assert response.status_code == 201, response.text

        def finished() -> bool:
            return any(json.loads(body)["finished"] for _, body in receiver.received)

        wait_until(finished, "a last callback saying every delivery ended")
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert receiver.calls > len(receiver.received)  # the 500 was retried
    for headers, body in receiver.received:
        stamp, signature = (part.split("=", 1)[1] for part in headers["X-Wardcast-Signature"].split(","))
        expected = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected)
    last = json.loads(receiver.received[-1][1])
    assert last["alert_id"] == response.json()["id"] and last["counts"] == {"completed": 2}


def test_a_webhook_needs_a_signing_secret(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    response = _alert(controller, controller.token, webhook_url="http://127.0.0.1:9/hook")
    assert response.status_code == 422 and response.json()["field"] == "webhook_url", response.text


def test_a_city_wide_live_alert_waits_for_a_second_person(controller: ControllerHandle, fleet: FleetHandle):
    template = {"headline": "Cảnh báo bão", "text": "Bão số 3 đổ bộ.", "targets": {"areas": ["hn"]}}
    controller.stop()
    controller.extra_env = {"WARDCAST_ALERTS__TEMPLATES": json.dumps({"bao-toan-thanh-pho": template})}
    controller.start()
    seed(controller)
    first_operator, second_operator = controller.api_key("operator"), controller.api_key("operator")
    pending = _alert(controller, first_operator, targets={"areas": ["hn"]})
    assert pending.status_code == 201, pending.text
    assert pending.json()["status"] == "pending_approval" and pending.json()["device_count"] == 0
    alert_id = pending.json()["id"]
    with controller.client() as client:
        assert client.get("/api/v1/broadcasts").json() == []  # nothing plays yet
    with controller.client(first_operator) as client:
        same_person = client.post(f"/api/v1/alerts/{alert_id}/approve")
    assert same_person.status_code == 403 and same_person.json()["field"] == "Authorization", same_person.text
    with controller.client(controller.api_key("ioc")) as client:
        assert client.post(f"/api/v1/alerts/{alert_id}/approve").status_code == 403
    with EventWatcher(controller) as watcher:
        with controller.client(second_operator) as client:
            approved = client.post(f"/api/v1/alerts/{alert_id}/approve")
        assert approved.status_code == 200 and approved.json()["device_count"] == 8, approved.text
        broadcast_id = _broadcast_of(controller, alert_id)
        watcher.wait_for(all_ended(broadcast_id, 8, "completed"), what="the approved alert on every speaker")
    with controller.client(second_operator) as client:
        again = client.post(f"/api/v1/alerts/{alert_id}/approve")
    assert again.status_code == 409
    drill = _alert(controller, first_operator, targets={"areas": ["hn"]}, mode="drill")
    assert drill.json()["status"] == "active", drill.text  # drills need no approval
    ioc = controller.api_key("ioc")
    ioc_manual = _alert(controller, ioc, targets={"areas": ["hn"]})
    assert ioc_manual.json()["status"] == "pending_approval", ioc_manual.text
    with controller.client(ioc) as client:
        from_template = client.post("/api/v1/alerts", json={"template": "bao-toan-thanh-pho"})
        unknown = client.post("/api/v1/alerts", json={"template": "khong-co"})
        overridden = client.post(
            "/api/v1/alerts", json={"template": "bao-toan-thanh-pho", "headline": "Khác"}
        )
    assert from_template.status_code == 201 and from_template.json()["status"] == "active", from_template.text
    assert from_template.json()["device_count"] == 8
    assert unknown.status_code == 422 and unknown.json()["field"] == "template"
    assert overridden.status_code == 422 and overridden.json()["field"] == "headline"
    with controller.client() as client:
        audit = client.get("/api/v1/audit", params={"action": "alert.approve"}).json()
        client.post("/api/v1/alerts/cancel-all")
    assert [entry["subject"] for entry in audit] == [alert_id]


def _broadcast_of(controller: ControllerHandle, alert_id: str) -> str:
    with controller.client() as client:
        broadcast_id: str = client.get(f"/api/v1/alerts/{alert_id}").json()["broadcast_id"]
    return broadcast_id


def test_an_alert_preempts_the_programme_which_resumes_afterwards(
    controller: ControllerHandle, fleet: FleetHandle
):
    seed(controller)
    long_notice = upload(controller, 60.0)  # 3 s at the fleet's speed ×20
    with EventWatcher(controller) as watcher, controller.client() as client:
        notice = client.post(
            "/api/v1/broadcasts",
            json={"targets": {"areas": ["hn.b.t1"]}, "content": {"media_id": long_notice}},
        ).json()
        watcher.wait_for(all_in(notice["id"], 2, "playing"), what="the ward's notice playing")
        alert = _alert(controller, controller.token)
        assert alert.status_code == 201, alert.text
        alert_broadcast = _broadcast_of(controller, alert.json()["id"])
        watcher.wait_for(all_ended(alert_broadcast, 2, "completed"), what="the alert played")

        def notice_back_and_done(events: list[dict[str, Any]]) -> bool:
            done = [e for e in events if e.get("broadcast_id") == notice["id"] and e["state"] == "completed"]
            return len(done) == 2

        watcher.wait_for(notice_back_and_done, what="the notice resumed and completed")
        detail = client.get(f"/api/v1/broadcasts/{notice['id']}").json()
    first = [d for d in detail["deliveries"] if d["resumes"] is None]
    assert {d["state"] for d in first} == {"interrupted"}
    assert all(f"preempted by broadcast {alert_broadcast}" in d["detail"] for d in first)
    assert {d["state"] for d in detail["deliveries"] if d["resumes"]} == {"completed"}
