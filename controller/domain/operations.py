"""Remote operations on devices (issue 6): set volume, reboot, test tone (loa thử), push configuration.

Pure rules: which kinds take which operation, the parameters each takes (every error names its
field), the command documents on the wire (docs/protocol.md §1.14) and the per-device result state
machine. An operation on a group is one command per device, each with its own result.

Result states: queued → sent (broker accepted) → delivered (device took it) → one end:
completed | failed | rejected | expired. As for deliveries, each is a separate fact with its time and
states never go backwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, TypeGuard

from controller.domain.clock import rfc3339

SET_VOLUME: Final = "set_volume"
REBOOT: Final = "reboot"
TEST_TONE: Final = "test_tone"
CONFIGURE: Final = "configure"
OPERATION_TYPES: Final = (SET_VOLUME, REBOOT, TEST_TONE, CONFIGURE)

_AUDIO_KINDS: Final = frozenset({"speaker", "wired_zone"})
_MQTT_KINDS: Final = frozenset({"speaker", "wired_zone", "led_screen", "sensor"})
KINDS_FOR: Final[Mapping[str, frozenset[str]]] = {
    SET_VOLUME: _AUDIO_KINDS,
    TEST_TONE: _AUDIO_KINDS,
    REBOOT: _MQTT_KINDS,
    CONFIGURE: _MQTT_KINDS,
}

TEST_TONE_DEFAULT_S: Final = 3.0
TEST_TONE_MAX_S: Final = 30.0
HEARTBEAT_MIN_S: Final = 5
HEARTBEAT_MAX_S: Final = 3600
COMM_LOSS_MAX_S: Final = 30 * 86_400
_CLOCK_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


class OperationInputError(ValueError):
    """An operation that cannot be sent as asked; `field` names the member at fault."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class ResultState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def progress(self) -> int:
        return _PROGRESS[self]


_TERMINAL: Final = frozenset(
    {ResultState.COMPLETED, ResultState.FAILED, ResultState.REJECTED, ResultState.EXPIRED}
)
_PROGRESS: Final = {
    ResultState.QUEUED: 0,
    ResultState.SENT: 1,
    ResultState.DELIVERED: 2,
    **dict.fromkeys(_TERMINAL, 3),
}
# What each report state a device sends (§1.4) means for an operation's result.
_REPORTED: Final = {
    "delivered": ResultState.DELIVERED,
    "completed": ResultState.COMPLETED,
    "failed": ResultState.FAILED,
    "rejected": ResultState.REJECTED,
    "expired": ResultState.EXPIRED,
}


def can_advance(current: ResultState, new: ResultState) -> bool:
    """Forward only; an ended result stays ended."""
    return not current.is_terminal and new.progress > current.progress


def state_from_report(state: str) -> ResultState | None:
    return _REPORTED.get(state)


def operation_status(states: Iterable[ResultState]) -> str:
    """One word for a whole operation: `pending` while any device has not answered for good, then
    `completed` (every device), `failed` (none) or `partial`."""
    listed = list(states)
    if any(not state.is_terminal for state in listed):
        return "pending"
    done = sum(1 for state in listed if state is ResultState.COMPLETED)
    if done == len(listed):
        return "completed"
    return "failed" if done == 0 else "partial"


def check_kind(operation: str, kind: str) -> bool:
    return kind in KINDS_FOR.get(operation, frozenset())


def validate_params(operation: str, params: Mapping[str, Any], *, utc_offset_min: int) -> dict[str, Any]:
    """The wire members of `operation` from the request's `params`; raises `OperationInputError`.

    `utc_offset_min` is the city's offset from UTC, sent with quiet hours so that a device needs no
    time-zone database (Vietnam keeps no daylight saving time).
    """
    if operation not in OPERATION_TYPES:
        raise OperationInputError("type", f"{operation!r} is not one of {', '.join(OPERATION_TYPES)}")
    known = _PARAMS[operation]
    for name in params:
        if name not in known:
            allowed = ", ".join(known) if known else "none"
            raise OperationInputError(
                f"params.{name}", f"is not a parameter of {operation} (takes: {allowed})"
            )
    if operation == SET_VOLUME:
        return {"volume": _volume(params)}
    if operation == TEST_TONE:
        return {"duration_s": _tone_seconds(params)}
    if operation == CONFIGURE:
        return {"config": _config(params, utc_offset_min)}
    return {}


_PARAMS: Final[Mapping[str, tuple[str, ...]]] = {
    SET_VOLUME: ("volume",),
    REBOOT: (),
    TEST_TONE: ("duration_s",),
    CONFIGURE: ("quiet_hours", "comm_loss", "heartbeat_s"),
}


def _volume(params: Mapping[str, Any]) -> int:
    if "volume" not in params:
        raise OperationInputError("params.volume", "is required (0-100)")
    volume = params["volume"]
    if not _is_int(volume) or not 0 <= volume <= 100:  # noqa: PLR2004  (a percentage)
        raise OperationInputError("params.volume", f"{volume!r} is not a whole number from 0 to 100")
    return int(volume)


def _tone_seconds(params: Mapping[str, Any]) -> float:
    value = params.get("duration_s", TEST_TONE_DEFAULT_S)
    if not _is_number(value) or not 0 < value <= TEST_TONE_MAX_S:
        raise OperationInputError(
            "params.duration_s",
            f"{value!r} is not a number of seconds above 0 and at most {TEST_TONE_MAX_S:g}",
        )
    return float(value)


def _config(params: Mapping[str, Any], utc_offset_min: int) -> dict[str, Any]:
    if not params:
        raise OperationInputError("params", "give at least one of quiet_hours, comm_loss, heartbeat_s")
    config: dict[str, Any] = {}
    if "quiet_hours" in params:
        config["quiet_hours"] = quiet_hours(params["quiet_hours"], utc_offset_min)
    if "comm_loss" in params:
        config["comm_loss"] = comm_loss(params["comm_loss"])
    if "heartbeat_s" in params:
        value = params["heartbeat_s"]
        if not _is_int(value) or not HEARTBEAT_MIN_S <= value <= HEARTBEAT_MAX_S:
            raise OperationInputError(
                "params.heartbeat_s",
                f"{value!r} is not a whole number of seconds from {HEARTBEAT_MIN_S} to {HEARTBEAT_MAX_S}",
            )
        config["heartbeat_s"] = int(value)
    return config


def quiet_hours(value: object, utc_offset_min: int) -> dict[str, Any] | None:
    """`{"start": "HH:MM", "end": "HH:MM"}` in local time (the window may pass midnight), or null
    to clear it."""
    field = "params.quiet_hours"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise OperationInputError(field, 'must be {"start": "HH:MM", "end": "HH:MM"} or null')
    extra = sorted(set(value) - {"start", "end"})
    if extra:
        raise OperationInputError(f"{field}.{extra[0]}", "is not a member of quiet hours (start, end)")
    times: dict[str, str] = {}
    for name in ("start", "end"):
        text = value.get(name)
        if not isinstance(text, str) or _CLOCK_TIME.fullmatch(text) is None:
            raise OperationInputError(f"{field}.{name}", f"{text!r} is not a 24-hour time HH:MM")
        times[name] = text
    if times["start"] == times["end"]:
        raise OperationInputError(f"{field}.end", "must differ from start (an empty or whole-day window)")
    return {**times, "utc_offset_min": utc_offset_min}


def comm_loss(value: object) -> dict[str, Any]:
    """What a speaker does with its programme while its link is down (docs/protocol.md §1.10)."""
    field = "params.comm_loss"
    if not isinstance(value, Mapping):
        raise OperationInputError(
            field, 'must be {"policy": "keep"} or {"policy": "stop_after", "after_s": N}'
        )
    policy = value.get("policy")
    extra = sorted(set(value) - {"policy", "after_s"})
    if extra:
        raise OperationInputError(f"{field}.{extra[0]}", "is not a member of comm_loss (policy, after_s)")
    if policy == "keep":
        if value.get("after_s") is not None:
            raise OperationInputError(f"{field}.after_s", "only the stop_after policy takes a limit")
        return {"policy": "keep"}
    if policy == "stop_after":
        after_s = value.get("after_s")
        if not _is_int(after_s) or not 0 < after_s <= COMM_LOSS_MAX_S:
            raise OperationInputError(
                f"{field}.after_s",
                f"{after_s!r} is not a whole number of seconds from 1 to {COMM_LOSS_MAX_S}",
            )
        return {"policy": "stop_after", "after_s": int(after_s)}
    raise OperationInputError(f"{field}.policy", f"{policy!r} is not keep or stop_after")


def operation_command(
    operation: str,
    members: Mapping[str, Any],
    *,
    command_id: str,
    correlation_id: str,
    address: str,
    issued_at: datetime,
    expires_at: datetime,
) -> dict[str, Any]:
    """The command document (§1.14), with the header every command has (§1.3); `seq` is added by
    the dispatcher when it publishes, as for every command."""
    return {
        "v": 1,
        "type": operation,
        "id": command_id,
        "correlation_id": correlation_id,
        "device": address,
        "issued_at": rfc3339(issued_at),
        "expires_at": rfc3339(expires_at),
        **members,
    }


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
