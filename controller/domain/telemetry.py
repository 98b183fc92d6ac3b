"""Readings: physical-range checks and time buckets (issue 5). Pure: no database, no transport."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# The identifier rules of a metric name, shared by device configuration and the API.
METRIC_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """What a sensor's metric may be: its unit and the physical range outside which a reading is wrong
    (a transmitter saturated at the end of its span, a wire broken, a unit confused)."""

    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None

    def problem(self, value: float) -> str | None:
        """Why `value` cannot be a real reading, or None when it can."""
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        if self.minimum is not None and value < self.minimum:
            return f"{value} is below the physical range ({self.minimum} … {self.maximum})"
        if self.maximum is not None and value > self.maximum:
            return f"{value} is above the physical range ({self.minimum} … {self.maximum})"
        return None


def metric_specs(config: Mapping[str, Any]) -> dict[str, MetricSpec]:
    """The `metrics` of a device's stored configuration (already validated by the API)."""
    metrics = config.get("metrics") or {}
    return {
        name: MetricSpec(unit=spec.get("unit"), minimum=spec.get("min"), maximum=spec.get("max"))
        for name, spec in metrics.items()
    }


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_epoch_ms(milliseconds: int) -> datetime:
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


def bucket_start_ms(at_ms: int, step_s: int) -> int:
    step_ms = step_s * 1000
    return at_ms // step_ms * step_ms


@dataclass(slots=True)
class Bucket:
    """Count, sum, minimum and maximum of the readings of one time bucket; buckets merge exactly."""

    count: int
    total: float
    minimum: float
    maximum: float

    def merge(self, other: Bucket) -> None:
        self.count += other.count
        self.total += other.total
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    @property
    def mean(self) -> float:
        return self.total / self.count
