"""The API contract: auth, roles and wards, bad input named by field, media serving, health."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from tests.support.scenario import upload, wav_bytes
from tests.support.system import ControllerHandle

pytestmark = pytest.mark.integration


def test_every_call_needs_a_token(api: ControllerHandle):
    with api.client(token="wc_not-a-real-token") as client:
        response = client.get("/api/v1/devices")
    assert response.status_code == 401
    assert response.json()["field"] == "Authorization"
    with api.client() as client:
        response = client.get("/api/v1/areas", headers={"Authorization": ""})
    assert response.status_code == 401


def test_roles_and_wards_confine_keys(api: ControllerHandle):
    staff = api.api_key("ward_staff", ward="hn.a")
    technician = api.api_key("technician")
    media_id = upload(api, 0.5)
    with api.client(staff) as client:
        devices = client.get("/api/v1/devices").json()
        assert {d["area"] for d in devices} <= {"hn.a", "hn.a.t1", "hn.a.t2", "hn.a.t3"} and devices
        outside = client.post(
            "/api/v1/broadcasts", json={"targets": {"areas": ["hn.b.t1"]}, "content": {"media_id": media_id}}
        )
        assert outside.status_code == 403 and outside.json()["field"] == "targets.areas[0]"
        emergency = client.post(
            "/api/v1/broadcasts",
            json={
                "targets": {"areas": ["hn.a.t1"]},
                "content": {"media_id": media_id},
                "priority": "emergency",
            },
        )
        assert emergency.status_code == 403 and emergency.json()["field"] == "priority"
        assert client.get("/api/v1/devices/spk-b1-1").status_code == 404
        inside = client.post(
            "/api/v1/broadcasts", json={"targets": {"areas": ["hn.a.t1"]}, "content": {"media_id": media_id}}
        )
        assert inside.status_code == 201, inside.text
    with api.client(technician) as client:
        response = client.post(
            "/api/v1/broadcasts", json={"targets": {"areas": ["hn"]}, "content": {"media_id": media_id}}
        )
        assert response.status_code == 403


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"targets": {"areas": ["nowhere"]}}, 422, "targets.areas[0]"),
        ({"targets": {"devices": ["spk-ghost"]}}, 422, "targets.devices[0]"),
        ({"targets": {}}, 422, "targets"),
        ({"targets": {"areas": ["hn"]}, "priority": "urgent"}, 422, "priority"),
        ({"targets": {"areas": ["hn"]}, "sub_priority": 300}, 422, "sub_priority"),
        ({"targets": {"areas": ["hn"]}, "expires_at": "2020-01-01T00:00:00Z"}, 422, "expires_at"),
        ({"targets": {"areas": ["hn"]}, "expires_at": "2030-01-01T00:00:00"}, 422, "expires_at"),
        ({"targets": {"areas": ["hn"]}, "colour": "red"}, 422, "colour"),
    ],
)
def test_bad_broadcasts_name_the_field(
    api: ControllerHandle, body: dict[str, object], status: int, field: str
):
    media_id = upload(api, 0.5)
    with api.client() as client:
        response = client.post("/api/v1/broadcasts", json={"content": {"media_id": media_id}, **body})
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert set(response.json()) >= {"error", "field", "detail"}


def test_malformed_json_and_unknown_media(api: ControllerHandle):
    with api.client() as client:
        broken = client.post(
            "/api/v1/broadcasts", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 400 and broken.json()["field"] == "body"
        unknown = client.post(
            "/api/v1/broadcasts", json={"targets": {"areas": ["hn"]}, "content": {"media_id": "nope"}}
        )
        assert unknown.status_code == 404 and unknown.json()["field"] == "content.media_id"


def test_a_group_without_speakers_is_refused(api: ControllerHandle):
    media_id = upload(api, 0.5)
    with api.client() as client:
        created = client.post(
            "/api/v1/areas", json={"code": "hn.b.t9", "name": "Thôn Mới", "kind": "group", "parent": "hn.b"}
        )
        assert created.status_code == 201, created.text
        response = client.post(
            "/api/v1/broadcasts", json={"targets": {"areas": ["hn.b.t9"]}, "content": {"media_id": media_id}}
        )
    assert response.status_code == 422 and response.json()["field"] == "targets"


def test_duplicates_are_conflicts_and_change_nothing(api: ControllerHandle):
    with api.client() as client:
        before = client.get("/api/v1/devices/spk-a1-1").json()
        area = client.post(
            "/api/v1/areas", json={"code": "hn.a", "name": "Khác", "kind": "ward", "parent": "hn"}
        )
        assert area.status_code == 409 and area.json()["field"] == "code"
        device = client.post("/api/v1/devices", json={"id": "spk-a1-1", "kind": "speaker", "area": "hn.b"})
        assert device.status_code == 409 and device.json()["field"] == "id"
        address = client.post(
            "/api/v1/devices", json={"id": "spk-new", "kind": "speaker", "area": "hn.b", "address": "a1-1"}
        )
        assert address.status_code == 409 and address.json()["field"] == "address"
        assert client.get("/api/v1/devices/spk-a1-1").json() == before
        unknown_area = client.post("/api/v1/devices", json={"kind": "speaker", "area": "nowhere"})
        assert unknown_area.status_code == 422 and unknown_area.json()["field"] == "area"


def test_a_bad_csv_import_names_the_row_and_stores_nothing(api: ControllerHandle):
    csv = (
        "code,name,kind,parent,lat,lon\nhn.c,Phường Cũ,ward,hn,22.1,105.8\nhn.c.t1,Tổ 1,group,hn.c,91,105.8\n"
    )
    with api.client() as client:
        before = client.get("/api/v1/areas").json()
        response = client.post(
            "/api/v1/areas/import", content=csv.encode(), headers={"Content-Type": "text/csv"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "lat"
        assert "3" in response.json()["detail"] or any(i.get("row") for i in response.json()["issues"])
        assert client.get("/api/v1/areas").json() == before


def test_areas_import_from_csv_and_list(api: ControllerHandle):
    csv = "code,name,kind,parent,lat,lon\nhn.d,Phường Đức,ward,hn,22.14,105.83\nhn.d.t1,Tổ 1,group,hn.d,,\n"
    with api.client() as client:
        response = client.post(
            "/api/v1/areas/import", content=csv.encode(), headers={"Content-Type": "text/csv"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["created"] == 2
        areas = {a["code"]: a for a in client.get("/api/v1/areas").json()}
    assert areas["hn.d"] == {
        "code": "hn.d",
        "name": "Phường Đức",
        "kind": "ward",
        "parent": "hn",
        "lat": 22.14,
        "lon": 105.83,
        "admin_code": None,
    }


def test_media_upload_checks_audio_and_serves_ranges(api: ControllerHandle):
    audio = wav_bytes(1.5)
    with api.client() as client:
        created = client.post("/api/v1/media", files={"file": ("a.wav", audio, "audio/wav")})
        assert created.status_code in {200, 201}, created.text
        body = created.json()
        assert body["sha256"] == hashlib.sha256(audio).hexdigest()
        assert body["duration_s"] == pytest.approx(1.5, abs=0.01)
        assert body["content_type"] == "audio/wav"
        again = client.post("/api/v1/media", files={"file": ("b.wav", audio, "audio/wav")})
        assert again.status_code == 200 and again.json()["id"] == body["id"]
        text = client.post(
            "/api/v1/media", files={"file": ("x.mp3", b"hello, not audio" * 100, "audio/mpeg")}
        )
        assert text.status_code == 422 and text.json()["field"] == "file"
        missing = client.post("/api/v1/media", files={"other": ("a.wav", audio)})
        assert missing.status_code == 422 and missing.json()["field"] == "file"
        part = client.get(f"/media/{body['sha256']}", headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == audio[:100]
        whole = client.get(f"/media/{body['sha256']}")
        assert whole.content == audio
        assert client.get(f"/media/{'0' * 64}").status_code == 404


def test_device_crud(api: ControllerHandle):
    with api.client() as client:
        created = client.post(
            "/api/v1/devices",
            json={"kind": "speaker", "area": "hn.b.t2", "lat": 22.1, "lon": 105.8, "name": "Loa đầu thôn"},
        )
        assert created.status_code == 201, created.text
        device_id = created.json()["id"]
        assert created.json()["address"] == device_id and created.json()["online"] is False
        patched = client.patch(
            f"/api/v1/devices/{device_id}", json={"name": "Loa cuối thôn", "area": "hn.b.t1"}
        )
        assert patched.status_code == 200 and patched.json()["area"] == "hn.b.t1"
        listed = client.get("/api/v1/devices", params={"area": "hn.b.t1", "kind": "speaker"}).json()
        assert device_id in {d["id"] for d in listed}
        bad = client.patch(f"/api/v1/devices/{device_id}", json={"lat": 120})
        assert bad.status_code == 422 and bad.json()["field"] == "lat"
        assert client.delete(f"/api/v1/devices/{device_id}").status_code == 204
        assert client.get(f"/api/v1/devices/{device_id}").status_code == 404


def test_a_speakers_comm_loss_policy_is_checked_and_shown_in_its_programme(api: ControllerHandle):
    with api.client() as client:
        created = client.post(
            "/api/v1/devices",
            json={
                "kind": "speaker",
                "area": "hn.a.t3",
                "comm_loss": {"policy": "stop_after", "after_s": 7200},
            },
        )
        assert created.status_code == 201, created.text
        device_id = created.json()["id"]
        assert created.json()["comm_loss"] == {"policy": "stop_after", "after_s": 7200}
        programme = client.get(f"/api/v1/devices/{device_id}/programme").json()
        assert programme["document"]["comm_loss"] == {"policy": "stop_after", "after_s": 7200}
        assert programme["document"]["device"] == created.json()["address"]
        for bad, field in (
            ({"policy": "stop_after"}, "comm_loss"),
            ({"policy": "keep", "after_s": 60}, "comm_loss"),
            ({"policy": "stop_after", "after_s": -1}, "comm_loss.after_s"),
            ({"policy": "forever"}, "comm_loss.policy"),
        ):
            refused = client.patch(f"/api/v1/devices/{device_id}", json={"comm_loss": bad})
            assert refused.status_code == 422, refused.text
            assert refused.json()["field"] == field, (bad, refused.json())
        kept = client.get(f"/api/v1/devices/{device_id}").json()
        assert kept["comm_loss"] == {"policy": "stop_after", "after_s": 7200}  # nothing changed
        keep = client.patch(f"/api/v1/devices/{device_id}", json={"comm_loss": {"policy": "keep"}})
        assert keep.json()["comm_loss"] == {"policy": "keep", "after_s": None}
        assert client.delete(f"/api/v1/devices/{device_id}").status_code == 204


def test_health_metrics_and_openapi(api: ControllerHandle):
    with api.client() as client:
        health = client.get("/healthz")
        assert (
            health.status_code == 200
            and health.json()["broker"] == "ok"
            and health.json()["database"] == "ok"
        )
        assert "wardcast_commands_published_total" in client.get("/metrics").text
        spec = client.get("/openapi.json").json()
        assert "/api/v1/broadcasts" in spec["paths"]
        assert client.get("/docs").status_code == 200


def test_an_invalid_config_names_the_key_and_starts_nothing(api: ControllerHandle):
    env = {**api.env(), "WARDCAST_HTTP__PORT": "eighty", "WARDCAST_MQTT__PASSWORD": "changeme"}
    result = subprocess.run(
        [sys.executable, "-m", "controller", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "http.port" in result.stderr
