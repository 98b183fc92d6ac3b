"""The console's pieces without a browser: catalogues, users and lock-out, the session secret."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from controller.console.i18n import LANGUAGES, Translator, catalogue
from controller.console.session import load_or_create_secret, new_session, session_user
from controller.services.auth import Role
from controller.services.users import (
    LOCKOUT,
    UserError,
    create_user,
    delete_user,
    get_user,
    principal_of,
    sign_in,
    update_user,
)
from controller.store.db import create_db_engine, migrate
from controller.store.models import AreaRow

NOW = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
PASSWORD = "một-mật-khẩu-dài"


def test_every_language_has_every_key_and_the_vietnamese_is_accented():
    keys = {language: set(catalogue(language)) for language in LANGUAGES}
    assert keys["vi"] == keys["en"]
    t = Translator("vi")
    assert t("nav.dashboard") == "Bảng điều khiển"
    assert t("login.title") == "Đăng nhập"
    assert t("kind.group") == "Tổ dân phố"
    assert t.or_default("kind.hamlet", "hamlet") == "hamlet"


@pytest.fixture
def engine(tmp_path: Path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'users.db'}")
    migrate(engine)
    with Session(engine) as session:
        session.add(AreaRow(code="hn", name="Thành phố Thử", kind="city"))
        session.add(AreaRow(code="hn.a", name="Phường An", kind="ward", parent_code="hn"))
        session.commit()
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"username": "", "role": "admin"}, "username"),
        ({"username": "có dấu cách", "role": "admin"}, "username"),
        ({"username": "x", "role": "ioc"}, "role"),
        ({"username": "x", "role": "admin", "password": "ngắn"}, "password"),
        ({"username": "x", "role": "ward_staff"}, "ward"),
        ({"username": "x", "role": "ward_staff", "wards": ["hn.z"]}, "ward"),
        ({"username": "x", "role": "operator", "wards": ["hn.a"]}, "ward"),
    ],
)
def test_create_user_names_the_wrong_field(engine, fields, field):
    arguments = {"password": PASSWORD, "wards": [], "now": NOW, **fields}
    with pytest.raises(UserError) as caught:
        create_user(engine, **arguments)
    assert caught.value.field == field


def test_a_ward_staff_user_is_confined_to_the_ward(engine):
    user = create_user(
        engine, username="canbo", password=PASSWORD, role="ward_staff", wards=["hn.a"], now=NOW
    )
    principal = principal_of(user)
    assert principal.role is Role.WARD_STAFF
    assert principal.device_wards() == frozenset({"hn.a"})
    assert user.password_hash.startswith("$argon2id$")
    with pytest.raises(UserError) as caught:
        create_user(engine, username="canbo", password=PASSWORD, role="admin", wards=[], now=NOW)
    assert caught.value.field == "username"


def test_five_failures_lock_for_fifteen_minutes_then_the_right_password_works(engine):
    create_user(engine, username="op", password=PASSWORD, role="operator", wards=[], now=NOW)
    for attempt in range(4):
        result = sign_in(engine, "op", f"wrong-{attempt}", NOW)
        assert result.user is None
        assert result.locked_until is None
    assert sign_in(engine, "op", "wrong-5", NOW).locked_until == NOW + LOCKOUT
    assert sign_in(engine, "op", PASSWORD, NOW + LOCKOUT - timedelta(seconds=1)).user is None
    assert sign_in(engine, "op", PASSWORD, NOW + LOCKOUT).user is not None
    # A success resets the count: four more failures do not lock.
    for attempt in range(4):
        assert sign_in(engine, "op", f"again-{attempt}", NOW + LOCKOUT).locked_until is None
    assert sign_in(engine, "nobody", PASSWORD, NOW) == sign_in(engine, "nobody", "x", NOW)


def test_the_session_secret_is_made_once_and_private(tmp_path: Path):
    secret = load_or_create_secret(tmp_path / "data")
    path = tmp_path / "data" / "console-session.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(tmp_path / "data") == secret
    assert len(secret) >= 48


def test_a_new_password_or_a_deleted_user_ends_the_sessions_opened_before(engine):
    user = create_user(engine, username="canbo", password=PASSWORD, role="admin", wards=[], now=NOW)
    session = new_session(user)
    assert session_user(engine, session).id == user.id
    assert session_user(engine, new_session()) is None
    update_user(engine, user.id, password="một-mật-khẩu-mới-dài")
    assert session_user(engine, session) is None  # opened with the old password
    renewed = new_session(get_user(engine, user.id))
    assert session_user(engine, renewed).id == user.id
    delete_user(engine, user.id)
    assert session_user(engine, renewed) is None
