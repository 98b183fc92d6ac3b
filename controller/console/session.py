"""The console's session: a signed, HttpOnly, SameSite=Strict cookie holding the user's id and the
session's CSRF token. The signing secret is generated once into the data directory (mode 0600)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

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
        user_id = data.get("uid")
        return ConsoleSession(csrf=data["csrf"], user_id=user_id if isinstance(user_id, str) else None)

    def write(self, request: Request, response: Response, session: ConsoleSession) -> None:
        value = self._serializer.dumps({"csrf": session.csrf, "uid": session.user_id})
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=SESSION_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )


def new_session(user_id: str | None = None) -> ConsoleSession:
    """A fresh CSRF token too: signing in starts a new session (no fixation of a pre-login token)."""
    return ConsoleSession(csrf=secrets.token_urlsafe(32), user_id=user_id)


def csrf_ok(session: ConsoleSession | None, submitted: object) -> bool:
    return (
        session is not None
        and isinstance(submitted, str)
        and secrets.compare_digest(session.csrf.encode(), submitted.encode())
    )
