"""The error services raise for a request they cannot carry out; the API answers `{error, field, detail}`."""

from __future__ import annotations

from typing import Any


class ServiceError(ValueError):
    """A request that cannot be carried out; `status` is the HTTP status that fits."""

    def __init__(
        self, field: str, detail: str, *, status: int = 422, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail
        self.status = status
        self.extra = extra or {}
