"""The API behind the console's record pages: console users (/api/v1/users) and the broadcast log's
filters, paging and names (/api/v1/broadcasts)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session

from controller.services.auth import Role
from controller.services.users import UserError, create_user, principal_of, sign_in, update_user
from controller.store.db import create_db_engine, migrate
from controller.store.models import AreaRow
from tests.support.scenario import send, upload
from tests.support.system import ControllerHandle

NOW = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
PASSWORD = "một-mật-khẩu-dài"


@pytest.fixture
def engine(tmp_path: Path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'users.db'}")
    migrate(engine)
    with Session(engine) as session:
        session.add(AreaRow(code="hn", name="Thành phố Thử", kind="city"))
        session.add(AreaRow(code="hn.a", name="Phường An", kind="ward", parent_code="hn"))
        session.add(AreaRow(code="hn.b", name="Xã Bình", kind="commune", parent_code="hn"))
        session.commit()
    yield engine
    engine.dispose()


def test_update_user_resets_unlocks_and_rescopes(engine):
    user = create_user(
        engine, username="canbo", password=PASSWORD, role="ward_staff", wards=["hn.a"], now=NOW
    )
    for attempt in range(5):
        sign_in(engine, "canbo", f"sai-{attempt}", NOW)
    assert sign_in(engine, "canbo", PASSWORD, NOW).locked_until is not None
    assert update_user(engine, user.id, unlock=True).locked_until is None
    assert sign_in(engine, "canbo", PASSWORD, NOW).user is not None

    update_user(engine, user.id, password="mật-khẩu-mới-đủ-dài")
    assert sign_in(engine, "canbo", PASSWORD, NOW).user is None
    assert sign_in(engine, "canbo", "mật-khẩu-mới-đủ-dài", NOW).user is not None

    technician = update_user(engine, user.id, role="technician", wards=["hn.a", "hn.b"])
    principal = principal_of(technician)
    assert principal.role is Role.TECHNICIAN
    assert principal.device_wards() == frozenset({"hn.a", "hn.b"})
    for changes, field in [
        ({"role": "ward_staff"}, "ward"),  # two wards kept: a ward_staff user needs exactly one
        ({"role": "operator"}, "ward"),
        ({"wards": ["hn.z"]}, "ward"),
        ({"password": "ngắn"}, "password"),
        ({"role": "ioc"}, "role"),
    ]:
        with pytest.raises(UserError) as caught:
            update_user(engine, user.id, **changes)  # type: ignore[arg-type]
        assert caught.value.field == field
    with pytest.raises(UserError) as caught:
        update_user(engine, "no-such-user", unlock=True)
    assert caught.value.field == "id"


def _console_session(api: ControllerHandle, username: str, password: str) -> tuple[httpx.Client, str]:
    """An HTTP client signed in to the console as a user, and its CSRF token."""
    client = httpx.Client(base_url=api.base_url, timeout=30)
    page = client.get("/login")
    token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert token is not None
    signed = client.post("/login", data={"username": username, "password": password, "csrf": token.group(1)})
    assert signed.status_code == 303, signed.text
    home = client.get("/")
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', home.text)
    assert csrf is not None
    return client, csrf.group(1)


@pytest.mark.integration
def test_users_api_creates_lists_changes_and_deletes_without_hashes(api: ControllerHandle):
    with api.client() as client:
        created = client.post(
            "/api/v1/users",
            json={"username": "canbo.an", "role": "ward_staff", "wards": ["hn.a"], "password": PASSWORD},
        )
        assert created.status_code == 201, created.text
        user = created.json()
        assert user["username"] == "canbo.an" and user["wards"] == ["hn.a"] and user["locked_until"] is None
        listed = client.get("/api/v1/users")
        assert listed.status_code == 200
        assert "canbo.an" in {u["username"] for u in listed.json()}
        assert "argon2" not in listed.text and "password" not in listed.text

        for body, status, field in [
            ({"username": "canbo.an", "role": "admin", "password": PASSWORD}, 409, "username"),
            ({"username": "x", "role": "ward_staff", "password": PASSWORD}, 422, "wards"),
            ({"username": "x", "role": "ward_staff", "wards": ["hn.z"], "password": PASSWORD}, 422, "wards"),
            ({"username": "x", "role": "admin", "password": "ngắn"}, 422, "password"),
            ({"username": "x", "role": "ioc", "password": PASSWORD}, 422, "role"),
            ({"username": "có dấu cách", "role": "admin", "password": PASSWORD}, 422, "username"),
        ]:
            refused = client.post("/api/v1/users", json=body)
            assert (refused.status_code, refused.json()["field"]) == (status, field), refused.text

        changed = client.patch(
            f"/api/v1/users/{user['id']}", json={"role": "technician", "wards": ["hn.a", "hn.b"]}
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["role"] == "technician" and changed.json()["wards"] == ["hn.a", "hn.b"]
        short = client.patch(f"/api/v1/users/{user['id']}", json={"password": "ngắn"})
        assert (short.status_code, short.json()["field"]) == (422, "password")
        reset = client.patch(
            f"/api/v1/users/{user['id']}", json={"password": "mật-khẩu-mới-đủ-dài", "unlock": True}
        )
        assert reset.status_code == 200 and "argon2" not in reset.text
        assert client.patch("/api/v1/users/nobody", json={"unlock": True}).status_code == 404

        assert client.delete(f"/api/v1/users/{user['id']}").status_code == 204
        gone = client.delete(f"/api/v1/users/{user['id']}")
        assert (gone.status_code, gone.json()["field"]) == (404, "id")

    for role, ward in [("operator", None), ("ward_staff", "hn.a"), ("technician", None)]:
        with api.client(api.api_key(role, ward)) as client:
            assert client.get("/api/v1/users").status_code == 403
            refused = client.post(
                "/api/v1/users", json={"username": "y", "role": "admin", "password": PASSWORD}
            )
            assert refused.status_code == 403


@pytest.mark.integration
def test_an_admin_cannot_delete_or_demote_themself(api: ControllerHandle):
    with api.client() as client:
        me = client.post("/api/v1/users", json={"username": "quantri", "role": "admin", "password": PASSWORD})
        assert me.status_code == 201, me.text
    session, csrf = _console_session(api, "quantri", PASSWORD)
    header = {"X-CSRF-Token": csrf}
    try:
        user_id = me.json()["id"]
        deleted = session.delete(f"/api/v1/users/{user_id}", headers=header)
        assert (deleted.status_code, deleted.json()["field"]) == (409, "id")
        demoted = session.patch(f"/api/v1/users/{user_id}", json={"role": "operator"}, headers=header)
        assert demoted.status_code == 409
        own_password = session.patch(
            f"/api/v1/users/{user_id}",
            json={"password": "mật-khẩu-mới-đủ-dài"},
            headers=header,
        )
        assert own_password.status_code == 200
        # A new password ends every session opened with the old one, this one too: sign in again.
        assert session.get("/api/v1/users").status_code == 401
    finally:
        session.close()
    renewed, _ = _console_session(api, "quantri", "mật-khẩu-mới-đủ-dài")
    try:
        assert renewed.get("/api/v1/users").status_code == 200
    finally:
        renewed.close()


@pytest.mark.integration
def test_the_broadcast_log_filters_pages_and_names_content_and_author(api: ControllerHandle):
    start = datetime.now(UTC) - timedelta(seconds=1)  # the controller runs on this machine's clock
    media_id = upload(api, 0.5)
    ward_a = send(api, media_id, targets={"areas": ["hn.a.t1"]})
    ward_b = send(api, media_id, targets={"areas": ["hn.b.t1"]}, priority="priority")

    def listed(token: str | None = None, **params: str) -> list[dict[str, object]]:
        with api.client(token) as client:
            response = client.get("/api/v1/broadcasts", params={"from": start.isoformat(), **params})
        assert response.status_code == 200, response.text
        return response.json()

    newest = listed()
    assert [b["id"] for b in newest] == [ward_b["id"], ward_a["id"]]
    assert newest[0]["state"] == "active"
    assert newest[0]["content"] == [{"media_id": media_id, "filename": "tone-0.5.wav", "duration_s": 0.5}]
    assert newest[0]["created_by"] == "test-admin"
    assert [b["id"] for b in listed(area="hn.b")] == [ward_b["id"]]
    assert [b["id"] for b in listed(priority="normal")] == [ward_a["id"]]
    assert [b["id"] for b in listed(limit="1", offset="1")] == [ward_a["id"]]
    assert listed(to=start.isoformat()) == []
    assert [b["id"] for b in listed(api.api_key("ward_staff", "hn.a"))] == [ward_a["id"]]
    with api.client() as client:
        unknown = client.get("/api/v1/broadcasts", params={"area": "hn.z"})
        assert (unknown.status_code, unknown.json()["field"]) == (422, "area")
        naive = client.get("/api/v1/broadcasts", params={"from": "2026-11-24T00:00:00"})
        assert (naive.status_code, naive.json()["field"]) == (422, "from")
        detail = client.get(f"/api/v1/broadcasts/{ward_a['id']}").json()
    assert detail["created_by"] == "test-admin"
    assert {d["area"] for d in detail["deliveries"]} == {"hn.a.t1"}


@pytest.mark.integration
def test_a_console_user_s_actions_are_stored_and_audited_under_their_name(api: ControllerHandle):
    """A console user acts as `user:<uuid>` (41 characters): every who-did-it column takes it, on
    PostgreSQL too (migration 0012)."""
    with api.client() as client:
        made = client.post(
            "/api/v1/users", json={"username": "vanhanh.a", "role": "operator", "password": PASSWORD}
        )
        assert made.status_code == 201, made.text
    media_id = upload(api, 0.5)
    console, csrf = _console_session(api, "vanhanh.a", PASSWORD)
    try:
        headers = {"X-CSRF-Token": csrf}
        broadcast = console.post(
            "/api/v1/broadcasts",
            json={"content": {"media_id": media_id}, "targets": {"areas": ["hn.a.t1"]}},
            headers=headers,
        )
        assert broadcast.status_code == 201, broadcast.text
        schedule = console.post(
            "/api/v1/schedules",
            json={
                "name": "Bản tin thử",
                "targets": {"areas": ["hn.a.t2"]},
                "content": {"media_ids": [media_id]},
                "dtstart": "2031-01-06T06:00",
                "rrule": "FREQ=WEEKLY;BYDAY=MO",
            },
            headers=headers,
        )
        assert schedule.status_code == 201, schedule.text
        alert = console.post(
            "/api/v1/alerts",
            json={"headline": "Diễn tập", "text": "Thử", "mode": "drill", "targets": {"areas": ["hn.b"]}},
            headers=headers,
        )
        assert alert.status_code in {201, 202}, alert.text
        cancelled = console.post("/api/v1/alerts/cancel-all", headers=headers)
        assert cancelled.status_code == 200, cancelled.text
        logged = console.get(f"/api/v1/broadcasts/{broadcast.json()['id']}").json()
        assert logged["created_by"] == "vanhanh.a"
        audit = console.get("/api/v1/audit", params={"limit": 1000}).json()
    finally:
        console.close()
    assert any(entry["key_name"] == "vanhanh.a" for entry in audit)
