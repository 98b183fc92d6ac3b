"""A sliding-window rate limit per API key, in memory (one controller process serves the API)."""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta

_WINDOW = timedelta(minutes=1)
_MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._calls: dict[str, deque[datetime]] = {}

    def admit(self, key: str, now: datetime) -> float | None:
        """Count a call and return None, or return the seconds until one more would be admitted."""
        calls = self._calls.get(key)
        if calls is None:
            if len(self._calls) >= _MAX_KEYS:
                self._forget_idle(now)
            calls = self._calls[key] = deque()
        while calls and now - calls[0] >= _WINDOW:
            calls.popleft()
        if len(calls) >= self._per_minute:
            return max((calls[0] + _WINDOW - now).total_seconds(), 0.001)
        calls.append(now)
        return None

    def _forget_idle(self, now: datetime) -> None:
        for key in [k for k, calls in self._calls.items() if not calls or now - calls[-1] >= _WINDOW]:
            del self._calls[key]
