"""Threshold rules with a duration and hysteresis (issue 5): when a reading stream raises or clears.

"Water level ≥ 3.2 m for 2 minutes, clear below 3.0 m": the alarm is raised by the first reading that
finds the level at or beyond `raise_at` without a break for `for_s`, and cleared by the first reading that
finds it back beyond `clear_at` (for `clear_for_s`, 0 by default). The gap between the two levels keeps a
value hovering at the threshold from raising and clearing over and over.

The evaluation is driven by readings only: a sensor that stops reporting neither raises nor clears (its
silence is the availability alarm's business, not this rule's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from controller.domain.errors import FieldError


class Direction(StrEnum):
    ABOVE = "above"
    BELOW = "below"


class Transition(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"


class ThresholdError(FieldError):
    """A refused input (controller/domain/errors.py)."""


@dataclass(frozen=True, slots=True)
class Threshold:
    direction: Direction
    raise_at: float
    clear_at: float
    for_s: float = 0.0
    clear_for_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("raise_at", "clear_at", "for_s", "clear_for_s"):
            if not math.isfinite(getattr(self, name)):
                raise ThresholdError(name, "must be a finite number")
        if self.for_s < 0:
            raise ThresholdError("for_s", "must not be negative")
        if self.clear_for_s < 0:
            raise ThresholdError("clear_for_s", "must not be negative")
        if self.direction is Direction.ABOVE and self.clear_at > self.raise_at:
            raise ThresholdError(
                "clear_at",
                f"a rule on rising values clears at or below its raise level ({self.raise_at}), "
                f"not at {self.clear_at}",
            )
        if self.direction is Direction.BELOW and self.clear_at < self.raise_at:
            raise ThresholdError(
                "clear_at",
                f"a rule on falling values clears at or above its raise level ({self.raise_at}), "
                f"not at {self.clear_at}",
            )

    def breached(self, value: float) -> bool:
        if self.direction is Direction.ABOVE:
            return value >= self.raise_at
        return value <= self.raise_at

    def recovered(self, value: float) -> bool:
        if self.direction is Direction.ABOVE:
            return value < self.clear_at
        return value > self.clear_at


@dataclass(slots=True)
class ThresholdTracker:
    """The state of one rule over one reading stream."""

    threshold: Threshold
    active: bool = False
    _since: datetime | None = None
    _last_at: datetime | None = None

    def observe(self, value: float, at: datetime) -> Transition | None:
        """Feed one reading; the transition it causes, if any. Readings older than the last one seen
        (a late batch, a sensor's clock stepping back) are ignored rather than rewriting history."""
        if not math.isfinite(value) or (self._last_at is not None and at < self._last_at):
            return None
        self._last_at = at
        moving = self.threshold.recovered(value) if self.active else self.threshold.breached(value)
        if not moving:
            self._since = None
            return None
        if self._since is None:
            self._since = at
        needed = self.threshold.clear_for_s if self.active else self.threshold.for_s
        if (at - self._since).total_seconds() < needed:
            return None
        self._since = None
        self.active = not self.active
        return Transition.RAISED if self.active else Transition.CLEARED
