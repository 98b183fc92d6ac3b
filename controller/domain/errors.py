"""The one shape of a domain rule's refusal: which input field, and why."""

from __future__ import annotations


class FieldError(ValueError):
    """Bad input; `field` names it (e.g. `targets.circle.lat`), `detail` says what is wrong."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail
