"""Console users: argon2id password hashes, sign-in with a per-username lock-out, and the same roles and
ward scope as API keys (controller/services/auth.py)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.services.auth import Principal, Role
from controller.store.models import ApiKeyRow, AreaRow, UserRow

# A console user acts as principal `user:<id>` (an API key as its own id): in the audit log and in the
# who-made-it columns.
USER_KEY_PREFIX = "user:"
MAX_FAILED_ATTEMPTS = 5
LOCKOUT = timedelta(minutes=15)
MIN_PASSWORD_LENGTH = 10
# Console users are people: an IOC is an API client and has no console login.
CONSOLE_ROLES = (Role.ADMIN, Role.OPERATOR, Role.WARD_STAFF, Role.TECHNICIAN)

_hasher = PasswordHasher()
# Verified against when the username is unknown, so that an unknown name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("wardcast-no-such-user")


class UserError(ValueError):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class LoginResult:
    """`user` on success; otherwise `locked_until` when the account is (now) locked, else a wrong
    username or password (not told apart, so that the form does not reveal which names exist)."""

    user: UserRow | None
    locked_until: datetime | None = None


def _role(role: str) -> Role:
    try:
        parsed = Role(role)
    except ValueError as error:
        raise UserError("role", f"must be one of {', '.join(r.value for r in CONSOLE_ROLES)}") from error
    if parsed not in CONSOLE_ROLES:
        raise UserError("role", f"must be one of {', '.join(r.value for r in CONSOLE_ROLES)}")
    return parsed


def _scope(role: Role, wards: Sequence[str]) -> tuple[str | None, list[str]]:
    """(ward_code, wards) of a user of this role: a ward_staff user names exactly one ward (its
    `ward_code`); a technician any number (none: city-wide); the others none."""
    wards = list(dict.fromkeys(wards))
    if role is Role.WARD_STAFF:
        if len(wards) != 1:
            raise UserError("ward", "a ward_staff user names exactly one ward")
        return wards[0], []
    if wards and role is not Role.TECHNICIAN:
        raise UserError("ward", "only ward_staff and technician users have wards")
    return None, wards


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError("password", f"at least {MIN_PASSWORD_LENGTH} characters")


def _check_wards(session: Session, ward_code: str | None, wards: Sequence[str]) -> None:
    for code in [*([ward_code] if ward_code else []), *wards]:
        if session.get(AreaRow, code) is None:
            raise UserError("ward", f"unknown area {code!r}")


def create_user(
    engine: Engine, *, username: str, password: str, role: str, wards: Sequence[str], now: datetime
) -> UserRow:
    """A ward_staff user names exactly one ward; a technician any number (none: city-wide)."""
    username = username.strip()
    if not username or len(username) > 64 or any(c.isspace() for c in username):  # noqa: PLR2004
        raise UserError("username", "1 to 64 characters, no spaces")
    parsed_role = _role(role)
    _check_password(password)
    ward_code, wards = _scope(parsed_role, wards)
    row = UserRow(
        id=str(uuid.uuid4()),
        username=username,
        password_hash=_hasher.hash(password),
        role=parsed_role.value,
        ward_code=ward_code,
        wards=wards,
        created_at=now,
    )
    with Session(engine) as session:
        _check_wards(session, ward_code, wards)
        if session.exec(select(UserRow).where(UserRow.username == username)).first() is not None:
            raise UserError("username", f"{username!r} exists already")
        session.add(row)
        session.commit()
        session.refresh(row)
    return row


def list_users(engine: Engine) -> list[UserRow]:
    with Session(engine) as session:
        return list(session.exec(select(UserRow).order_by(col(UserRow.username))).all())


def update_user(
    engine: Engine,
    user_id: str,
    *,
    role: str | None = None,
    wards: Sequence[str] | None = None,
    password: str | None = None,
    unlock: bool = False,
) -> UserRow:
    """Change a user's role and/or wards (checked together, as at creation), set a new password, or
    lift a lock-out (`unlock`). A new password also lifts the lock-out."""
    with Session(engine) as session:
        row = session.get(UserRow, user_id)
        if row is None:
            raise UserError("id", f"unknown user {user_id!r}")
        if role is not None or wards is not None:
            parsed_role = _role(role if role is not None else row.role)
            current = [row.ward_code] if row.ward_code else list(row.wards or ())
            ward_code, new_wards = _scope(parsed_role, current if wards is None else wards)
            _check_wards(session, ward_code, new_wards)
            row.role, row.ward_code, row.wards = parsed_role.value, ward_code, new_wards
        if password is not None:
            _check_password(password)
            row.password_hash = _hasher.hash(password)
            unlock = True
        if unlock:
            row.failed_attempts = 0
            row.locked_until = None
        session.add(row)
        session.commit()
        session.refresh(row)
        return row


def delete_user(engine: Engine, user_id: str) -> None:
    with Session(engine) as session:
        row = session.get(UserRow, user_id)
        if row is None:
            raise UserError("id", f"unknown user {user_id!r}")
        session.delete(row)
        session.commit()


def sign_in(engine: Engine, username: str, password: str, now: datetime) -> LoginResult:
    """Checks the password; the fifth failure in a row locks the username for 15 minutes, during which
    even the right password is refused."""
    with Session(engine) as session:
        row = session.exec(select(UserRow).where(UserRow.username == username.strip())).first()
        if row is None:
            with contextlib.suppress(VerificationError):
                _hasher.verify(_DUMMY_HASH, password)
            return LoginResult(None)
        if row.locked_until is not None and row.locked_until > now:
            return LoginResult(None, locked_until=row.locked_until)
        try:
            _hasher.verify(row.password_hash, password)
        except (VerificationError, InvalidHashError):
            row.failed_attempts += 1
            if row.failed_attempts >= MAX_FAILED_ATTEMPTS:
                row.failed_attempts = 0
                row.locked_until = now + LOCKOUT
            session.add(row)
            session.commit()
            locked = row.locked_until if row.locked_until is not None and row.locked_until > now else None
            return LoginResult(None, locked_until=locked)
        if _hasher.check_needs_rehash(row.password_hash):
            row.password_hash = _hasher.hash(password)
        row.failed_attempts = 0
        row.locked_until = None
        session.add(row)
        session.commit()
        session.refresh(row)
        return LoginResult(row)


def get_user(engine: Engine, user_id: str) -> UserRow | None:
    with Session(engine) as session:
        return session.get(UserRow, user_id)


def principal_of(user: UserRow) -> Principal:
    return Principal(
        key_id=USER_KEY_PREFIX + user.id,
        name=user.username,
        role=Role(user.role),
        ward_code=user.ward_code,
        wards=frozenset(user.wards or ()),
    )


def principal_names(session: Session, key_ids: set[str]) -> dict[str, str]:
    """Who is behind each principal id, for people: a console user's name or an API key's name (ids
    of neither, such as "schedule", are left out)."""
    users = {key.removeprefix(USER_KEY_PREFIX) for key in key_ids if key.startswith(USER_KEY_PREFIX)}
    keys = {key for key in key_ids if not key.startswith(USER_KEY_PREFIX)}
    names: dict[str, str] = {}
    if users:
        for user_id, username in session.exec(
            select(UserRow.id, UserRow.username).where(col(UserRow.id).in_(users))
        ).all():
            names[USER_KEY_PREFIX + user_id] = username
    if keys:
        names.update(
            session.exec(select(ApiKeyRow.id, ApiKeyRow.name).where(col(ApiKeyRow.id).in_(keys))).all()
        )
    return names
