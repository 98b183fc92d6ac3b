"""The console's session: a signed, HttpOnly, SameSite=Strict cookie holding the user's id and the
session's CSRF token. The signing secret is generated once into the data directory (mode 0600)."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import Engine

from controller.services.users import get_user
from controller.store.models import UserRow

SESSION_COOKIE = "wardcast_session"
SESSION_MAX_AGE_S = 12 * 3600
CSRF_HEADER = "X-CSRF-Token"  # how the console's own scripts send the token with API calls
SECRET_FILE = "console-session.key"  # noqa: S105  (a file name, not a secret)


def load_or_create_secret(data_dir: Path) -> str:
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    # O_EXCL: two processes starting at once cannot both write; the loser reads the winner's secret.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as file:
        file.write(secret)
    return secret


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    csrf: str
    user_id: str | None = None
    # Ties the session to the password it was opened with: a new password ends every other session.
    stamp: str | None = None


class SessionCodec:
    def __init__(self, secret: str) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="wardcast-console-session")

    def read(self, request: Request) -> ConsoleSession | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if raw is None:
            return None
        try:
            data: Any = self._serializer.loads(raw, max_age=SESSION_MAX_AGE_S)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        user_id, stamp = data.get("uid"), data.get("stamp")
        return ConsoleSession(
            csrf=data["csrf"],
            user_id=user_id if isinstance(user_id, str) else None,
            stamp=stamp if isinstance(stamp, str) else None,
        )

    def write(self, request: Request, response: Response, session: ConsoleSession) -> None:
        value = self._serializer.dumps({"csrf": session.csrf, "uid": session.user_id, "stamp": session.stamp})
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=SESSION_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )


def new_session(user: UserRow | None = None) -> ConsoleSession:
    """A fresh CSRF token too: signing in starts a new session (no fixation of a pre-login token)."""
    if user is None:
        return ConsoleSession(csrf=secrets.token_urlsafe(32))
    return ConsoleSession(csrf=secrets.token_urlsafe(32), user_id=user.id, stamp=password_stamp(user))


def password_stamp(user: UserRow) -> str:
    # A digest of the stored hash, not the hash itself: the cookie is signed, not encrypted.
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:24]


def session_user(engine: Engine, session: ConsoleSession | None) -> UserRow | None:
    """The signed-in user of a session, read on every request (blocking): a deleted user's session, or
    one opened with a password that has since been changed, is no session."""
    if session is None or session.user_id is None or session.stamp is None:
        return None
    user = get_user(engine, session.user_id)
    if user is None or not secrets.compare_digest(password_stamp(user), session.stamp):
        return None
    return user


def csrf_ok(session: ConsoleSession | None, submitted: object) -> bool:
    return (
        session is not None
        and isinstance(submitted, str)
        and secrets.compare_digest(session.csrf.encode(), submitted.encode())
    )
