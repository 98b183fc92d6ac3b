"""Time comes from an injectable clock so that domain rules are testable without waiting."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """UTC with a Z suffix, as docs/protocol.md requires."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
