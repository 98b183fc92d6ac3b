"""Staged firmware rollouts (hawkBit-style), as pure rules: no database, no transport, no clock of its own.

A rollout splits its target devices into ordered groups. The devices of every group up to the
current one may be updated; the next group opens once the current group's success ratio (devices
`updated` / group size) reaches the success threshold. The rollout pauses as soon as one of its open
groups' error ratio (devices `failed` / group size) reaches the error threshold, or when a group ended
below the success threshold; an operator then resumes it (accepting those groups as they are) or
aborts it. New device updates start only inside the maintenance window; updates already running may
finish outside it, and after a pause or an abort. A device that stays silent in a step longer than
the step's timeout is failed.

`decide` is the whole state machine: given what is known now, it says which devices time out, which
start, and where the rollout stands. The service applies the decision and persists it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


class UpdateState(StrEnum):
    """One device's update, in the order it passes the states (docs/protocol.md §1.16)."""

    PENDING = "pending"  # its group has not been started, or the window is closed
    QUEUED = "queued"  # the command is on its way (outbox, broker)
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    UPDATING = "updating"
    UPDATED = "updated"
    FAILED = "failed"
    CANCELLED = "cancelled"  # never started: the rollout was aborted first

    @property
    def progress(self) -> int:
        return _PROGRESS[self]

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def in_progress(self) -> bool:
        return self in _IN_PROGRESS


_PROGRESS = {state: index for index, state in enumerate(UpdateState)}
_TERMINAL = frozenset({UpdateState.UPDATED, UpdateState.FAILED, UpdateState.CANCELLED})
_IN_PROGRESS = frozenset(
    {UpdateState.QUEUED, UpdateState.DOWNLOADING, UpdateState.VERIFIED, UpdateState.UPDATING}
)

# What each report state of a `firmware_update` command means for the device's update. `rejected`
# (malformed, no trusted key) and `expired` (arrived too late) end it as failures.
_REPORTED = {
    "downloading": UpdateState.DOWNLOADING,
    "verified": UpdateState.VERIFIED,
    "updating": UpdateState.UPDATING,
    "updated": UpdateState.UPDATED,
    "failed": UpdateState.FAILED,
    "rejected": UpdateState.FAILED,
    "expired": UpdateState.FAILED,
}
FIRMWARE_REPORT_STATES = frozenset(_REPORTED)


def state_from_report(report_state: str) -> UpdateState | None:
    return _REPORTED.get(report_state)


def can_advance(current: UpdateState, new: UpdateState) -> bool:
    """States never go backwards, and an ended update stays ended."""
    return not current.is_terminal and new.progress > current.progress


class RolloutRuleError(ValueError):
    """A rollout parameter that breaks the rules; `field` names it."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Ratios of a group's size: `success` opens the next group, `error` pauses the rollout."""

    success: float
    error: float

    def __post_init__(self) -> None:
        for name, value in (("success_threshold", self.success), ("error_threshold", self.error)):
            if not (math.isfinite(value) and 0 < value <= 1):
                raise RolloutRuleError(name, f"must be within (0, 1], not {value}")


def split_into_groups(device_ids: Sequence[str], *, first_group_size: int, groups: int) -> list[list[str]]:
    """A first (canary) group of `first_group_size` devices, then the rest in `groups - 1` groups whose
    sizes differ by at most one, in the order given. Empty groups are left out."""
    if groups < 1:
        raise RolloutRuleError("groups", "must be at least 1")
    if first_group_size < 1:
        raise RolloutRuleError("first_group", "must be at least 1 device")
    if groups == 1:
        return [list(device_ids)] if device_ids else []
    first = list(device_ids[:first_group_size])
    rest = list(device_ids[first_group_size:])
    parts = groups - 1
    size, extra = divmod(len(rest), parts)
    split: list[list[str]] = [first] if first else []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        if end > start:
            split.append(rest[start:end])
        start = end
    return split


def first_group_size(device_count: int, *, count: int | None, percent: float | None) -> int:
    """The canary group's size: `count` devices, or `percent` of them rounded up (at least one)."""
    if (count is None) == (percent is None):
        raise RolloutRuleError("first_group", "give either a device count or a percentage")
    if count is not None:
        if count < 1:
            raise RolloutRuleError("first_group", "must be at least 1 device")
        return count
    assert percent is not None  # noqa: S101  (one of the two is set, checked above)
    if not (math.isfinite(percent) and 0 < percent <= 100):  # noqa: PLR2004
        raise RolloutRuleError("first_group_percent", "must be within (0, 100]")
    return max(1, math.ceil(device_count * percent / 100))


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """Daily local hours when updates may start; `end` before `start` wraps past midnight."""

    start: time
    end: time
    zone: ZoneInfo

    def contains(self, instant: datetime) -> bool:
        local = instant.astimezone(self.zone).time()
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def next_opening(self, instant: datetime) -> datetime:
        """The first instant at or after `instant` when the window is open."""
        if self.contains(instant):
            return instant
        local = instant.astimezone(self.zone)
        opening = local.replace(
            hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0, fold=0
        )
        if opening <= local:
            opening = (opening + timedelta(days=1)).replace(tzinfo=self.zone)
        return opening

    def describe(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.zone.key}"


@dataclass(frozen=True, slots=True)
class StepTimeouts:
    start_s: float
    download_s: float
    install_s: float

    def limit_s(self, state: UpdateState) -> float | None:
        if state in (UpdateState.QUEUED, UpdateState.VERIFIED):
            return self.start_s
        if state is UpdateState.DOWNLOADING:
            return self.download_s
        if state is UpdateState.UPDATING:
            return self.install_s
        return None


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    device_id: str
    group: int
    state: UpdateState
    state_at: datetime


@dataclass(frozen=True, slots=True)
class GroupStatus:
    index: int
    size: int
    counts: dict[UpdateState, int]
    accepted: bool

    @property
    def success_ratio(self) -> float:
        return self.counts.get(UpdateState.UPDATED, 0) / self.size if self.size else 1.0

    @property
    def error_ratio(self) -> float:
        return self.counts.get(UpdateState.FAILED, 0) / self.size if self.size else 0.0

    @property
    def finished(self) -> bool:
        return all(state.is_terminal or not count for state, count in self.counts.items())


def group_statuses(
    devices: Iterable[DeviceProgress], group_count: int, accepted: frozenset[int]
) -> list[GroupStatus]:
    counts: list[dict[UpdateState, int]] = [{} for _ in range(group_count)]
    for device in devices:
        bucket = counts[device.group]
        bucket[device.state] = bucket.get(device.state, 0) + 1
    return [
        GroupStatus(index, sum(bucket.values()), bucket, index in accepted)
        for index, bucket in enumerate(counts)
    ]


@dataclass(frozen=True, slots=True)
class RolloutView:
    """What `decide` needs to know about one rollout."""

    state: RolloutState
    current_group: int
    group_count: int
    thresholds: Thresholds
    timeouts: StepTimeouts
    window: MaintenanceWindow | None
    devices: Sequence[DeviceProgress]
    # Groups an operator let through by resuming (their ratios no longer stop the rollout).
    accepted_groups: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    state: RolloutState
    current_group: int
    # (device id, why) of updates a silent device let time out: they end `failed`.
    timed_out: list[tuple[str, str]] = field(default_factory=list)
    # Devices whose update starts now (their command is sent).
    start: list[str] = field(default_factory=list)
    # Why the rollout paused or completed, when it just did.
    reason: str | None = None
    # Set while devices wait for the maintenance window: when it next opens.
    next_window_at: datetime | None = None


def _too_many_errors(group: GroupStatus, thresholds: Thresholds) -> bool:
    return not group.accepted and group.size > 0 and group.error_ratio >= thresholds.error


def _percent(ratio: float) -> str:
    return f"{ratio * 100:.0f} %"


def decide(view: RolloutView, now: datetime) -> Decision:
    """Where the rollout goes from here (see the module's docstring)."""
    timed_out: list[tuple[str, str]] = []
    devices: list[DeviceProgress] = []
    for device in view.devices:
        limit_s = view.timeouts.limit_s(device.state)
        if limit_s is not None and now - device.state_at >= timedelta(seconds=limit_s):
            timed_out.append(
                (device.device_id, f"no report for {limit_s:g} s while {device.state.value}: timed out")
            )
            device = DeviceProgress(device.device_id, device.group, UpdateState.FAILED, now)  # noqa: PLW2901
        devices.append(device)
    if view.state in (RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.PAUSED):
        return Decision(view.state, view.current_group, timed_out)

    groups = group_statuses(devices, view.group_count, view.accepted_groups)
    current = view.current_group
    checked = 0  # groups below this one passed the error check
    while True:
        for group in groups[checked : current + 1]:
            if _too_many_errors(group, view.thresholds):
                return Decision(
                    RolloutState.PAUSED,
                    current,
                    timed_out,
                    reason=(
                        f"group {group.index + 1}: error ratio {_percent(group.error_ratio)} reached the "
                        f"error threshold {_percent(view.thresholds.error)}"
                    ),
                )
        checked = current + 1
        group = groups[current]
        reached = group.accepted or group.success_ratio >= view.thresholds.success
        if not reached:
            if group.finished:
                return Decision(
                    RolloutState.PAUSED,
                    current,
                    timed_out,
                    reason=(
                        f"group {current + 1} ended with success ratio {_percent(group.success_ratio)}, "
                        f"below the success threshold {_percent(view.thresholds.success)}"
                    ),
                )
            break
        if current + 1 < view.group_count:
            current += 1
            continue
        if all(g.finished for g in groups):
            return Decision(RolloutState.COMPLETED, current, timed_out, reason="every group was updated")
        break

    pending = [d.device_id for d in devices if d.state is UpdateState.PENDING and d.group <= current]
    if pending and view.window is not None and not view.window.contains(now):
        return Decision(
            RolloutState.RUNNING, current, timed_out, next_window_at=view.window.next_opening(now)
        )
    return Decision(RolloutState.RUNNING, current, timed_out, start=pending)


def groups_accepted_on_resume(view: RolloutView) -> frozenset[int]:
    """The groups an operator's resume lets through: those that stopped the rollout (too many errors,
    or ended below the success threshold). The rollout then goes on from the next group."""
    groups = group_statuses(view.devices, view.group_count, view.accepted_groups)
    stopping = {
        group.index
        for group in groups[: view.current_group + 1]
        if _too_many_errors(group, view.thresholds)
        or (not group.accepted and group.finished and group.success_ratio < view.thresholds.success)
    }
    return view.accepted_groups | stopping
