"""Bytes and topics of the MQTT wire protocol v1 (docs/protocol.md §1), with no I/O and no MQTT library.

Decoding never raises: whatever a device publishes becomes either typed events or one
`MalformedPayload` whose reason names the offending member, so one broken firmware cannot stop the
controller's inbound loop.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

from drivers.base import CommandReport, DeviceState, InboundEvent, MalformedPayload, TelemetryReading

WIRE_VERSION: Final = 1
TOPIC_ROOT: Final = "wardcast/v1"
DEVICE_TOPIC_PREFIX: Final = f"{TOPIC_ROOT}/dev/"
AREA_TOPIC_PREFIX: Final = f"{TOPIC_ROOT}/area/"

DeviceLeaf = Literal["cmd", "ack", "state", "telemetry", "schedule"]
InboundLeaf = Literal["ack", "state", "telemetry"]
_DEVICE_LEAVES: Final[dict[str, DeviceLeaf]] = {leaf: leaf for leaf in get_args(DeviceLeaf)}
INBOUND_LEAVES: Final[frozenset[str]] = frozenset(get_args(InboundLeaf))

# What the controller subscribes to (§1.2), each at QoS 1.
CONTROLLER_SUBSCRIPTIONS: Final[tuple[str, ...]] = tuple(
    f"{DEVICE_TOPIC_PREFIX}+/{leaf}" for leaf in ("ack", "state", "telemetry")
)

REPORT_STATES: Final[frozenset[str]] = frozenset(
    {"delivered", "playing", "completed", "interrupted", "stopped", "failed", "expired", "rejected"}
    # A firmware update's steps (docs/protocol.md §1.16).
    | {"downloading", "verified", "updating", "updated"}
)

_ADDRESS = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# [0-9], not \d: \d would also match non-ASCII digits, which int() happily parses.
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?Z"
)
# The members every document carries; whatever else a state document holds is passed on as attributes.
_STATE_CORE_MEMBERS: Final = frozenset({"v", "online", "at"})


def is_valid_address(address: str) -> bool:
    return _ADDRESS.fullmatch(address) is not None


def device_topic(address: str, leaf: DeviceLeaf) -> str:
    """`wardcast/v1/dev/{address}/{leaf}`; raises `ValueError` for an address the spec does not allow."""
    if not is_valid_address(address):
        raise ValueError(f"invalid device address {address!r}: expected [a-z0-9][a-z0-9_-]{{0,63}}")
    return f"{DEVICE_TOPIC_PREFIX}{address}/{leaf}"


def command_topic(address: str) -> str:
    return device_topic(address, "cmd")


_AREA_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def area_command_topic(area_code: str) -> str:
    """`wardcast/v1/area/{area_code}/cmd` (docs/protocol.md §1.12)."""
    if _AREA_CODE.fullmatch(area_code) is None:
        raise ValueError(f"invalid area code {area_code!r} for a topic")
    return f"{AREA_TOPIC_PREFIX}{area_code}/cmd"


def ack_topic(address: str) -> str:
    return device_topic(address, "ack")


def state_topic(address: str) -> str:
    return device_topic(address, "state")


def telemetry_topic(address: str) -> str:
    return device_topic(address, "telemetry")


def schedule_topic(address: str) -> str:
    return device_topic(address, "schedule")


def parse_device_topic(topic: str) -> tuple[str, DeviceLeaf] | None:
    """`(address, leaf)` for a topic of the v1 device tree, `None` for anything else."""
    if not topic.startswith(DEVICE_TOPIC_PREFIX):
        return None
    address, _, leaf_text = topic[len(DEVICE_TOPIC_PREFIX) :].partition("/")
    leaf = _DEVICE_LEAVES.get(leaf_text)
    if leaf is None or not is_valid_address(address):
        return None
    return address, leaf


def format_timestamp(instant: datetime) -> str:
    """RFC 3339 in UTC with a `Z` suffix, microseconds only when there are any."""
    if instant.tzinfo is None:
        raise ValueError("wire timestamps need an aware datetime")
    utc = instant.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_timestamp(text: str) -> datetime | None:
    """An aware UTC datetime for `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, `None` for anything else."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "0").ljust(6, "0")),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def encode_command(document: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON. Raises `ValueError`/`TypeError` for what JSON cannot carry (NaN, sets...)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


encode_document = encode_command  # the retained schedule document is encoded the same way


class _MalformedError(Exception):
    """Internal: carries the reason out of the nested member checks."""


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def decode_inbound(topic: str, payload: bytes) -> list[InboundEvent]:
    """Turn one message a device published into events; never raises."""
    parsed = parse_device_topic(topic)
    if parsed is None:
        return [MalformedPayload(None, topic, "topic is outside wardcast/v1/dev/{address}/{leaf}")]
    address, leaf = parsed
    if leaf not in INBOUND_LEAVES:
        return [MalformedPayload(address, topic, f"`{leaf}` is a controller-to-device topic")]
    if not payload:
        # An empty message on `state` is how a retained document is cleared (device decommissioned).
        return [MalformedPayload(address, topic, "empty payload")]
    try:
        document = json.loads(payload.decode(), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; RecursionError is deep nesting.
        return [MalformedPayload(address, topic, f"payload is not UTF-8 JSON: {_short(error)}")]
    try:
        return _decode_document(address, leaf, document)
    except _MalformedError as malformed:
        return [MalformedPayload(address, topic, str(malformed))]


def _decode_document(address: str, leaf: str, document: object) -> list[InboundEvent]:
    if not isinstance(document, dict):
        raise _MalformedError("payload is not a JSON object")
    version = document.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise _invalid(document, "v", f"{WIRE_VERSION} (the wire version this controller speaks)")
    if leaf == "ack":
        return [_decode_report(address, document)]
    if leaf == "state":
        return [_decode_state(address, document)]
    return list(_decode_telemetry(address, document))


def _decode_report(address: str, document: dict[str, Any]) -> CommandReport:
    state = _required_text(document, "state")
    if state not in REPORT_STATES:
        raise _invalid(document, "state", f"one of {', '.join(sorted(REPORT_STATES))}")
    played_s = _optional_number(document, "played_s")
    if played_s is not None and played_s < 0:
        raise _invalid(document, "played_s", "a number >= 0")
    truncated = document.get("truncated", False)
    if type(truncated) is not bool:
        raise _invalid(document, "truncated", "a boolean")
    offline = document.get("offline", False)
    if type(offline) is not bool:
        raise _invalid(document, "offline", "a boolean")
    result = document.get("result")
    if result is not None and not isinstance(result, dict):
        raise _invalid(document, "result", "an object")
    rolled_back = document.get("rolled_back", False)
    if type(rolled_back) is not bool:
        raise _invalid(document, "rolled_back", "a boolean")
    return CommandReport(
        address=address,
        command_id=_required_text(document, "command_id"),
        correlation_id=_required_text(document, "correlation_id"),
        state=state,
        at=_required_timestamp(document, "at"),
        detail=_optional_text(document, "detail"),
        played_s=played_s,
        truncated=truncated,
        offline=offline,
        result=result,
        reason=_optional_text(document, "reason"),
        firmware=_optional_text(document, "firmware"),
        rolled_back=rolled_back,
    )


def _decode_state(address: str, document: dict[str, Any]) -> DeviceState:
    online = document.get("online")
    if type(online) is not bool:
        raise _invalid(document, "online", "a boolean")
    # The Last Will (`{"v":1,"online":false,"reason":"will"}`) has no `at`: the broker publishes it.
    at = None if document.get("at") is None else _required_timestamp(document, "at")
    attributes = {key: value for key, value in document.items() if key not in _STATE_CORE_MEMBERS}
    return DeviceState(address=address, online=online, at=at, attributes=attributes)


def _decode_telemetry(address: str, document: dict[str, Any]) -> list[TelemetryReading]:
    at = _required_timestamp(document, "at")
    readings = document.get("readings")
    if not isinstance(readings, list):
        raise _invalid(document, "readings", "a list")
    decoded: list[TelemetryReading] = []
    for index, reading in enumerate(readings):
        member = f"readings[{index}]"
        if not isinstance(reading, dict):
            raise _MalformedError(f"member `{member}` is {_short(reading)}, expected an object")
        decoded.append(
            TelemetryReading(
                address=address,
                metric=_required_text(reading, "metric", member),
                value=_required_number(reading, "value", member),
                unit=_optional_text(reading, "unit", member),
                at=at,
            )
        )
    return decoded


def _qualified(name: str, parent: str | None) -> str:
    return name if parent is None else f"{parent}.{name}"


def _invalid(
    document: dict[str, Any], name: str, expected: str, parent: str | None = None
) -> _MalformedError:
    found = _short(document[name]) if name in document else "missing"
    return _MalformedError(f"member `{_qualified(name, parent)}` is {found}, expected {expected}")


def _required_text(document: dict[str, Any], name: str, parent: str | None = None) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise _invalid(document, name, "a non-empty string", parent)
    return value


def _optional_text(document: dict[str, Any], name: str, parent: str | None = None) -> str | None:
    value = document.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(document, name, "a string", parent)
    return value


def _number_or_none(value: object) -> float | None:
    # bool is an int subclass, but `true` is not a number on this wire.
    if type(value) is bool or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer literal beyond the float range
        return None
    return number if math.isfinite(number) else None


def _required_number(document: dict[str, Any], name: str, parent: str | None = None) -> float:
    number = _number_or_none(document.get(name))
    if number is None:
        raise _invalid(document, name, "a finite number", parent)
    return number


def _optional_number(document: dict[str, Any], name: str) -> float | None:
    if document.get(name) is None:
        return None
    return _required_number(document, name)


def _required_timestamp(document: dict[str, Any], name: str) -> datetime:
    value = document.get(name)
    parsed = parse_timestamp(value) if isinstance(value, str) else None
    if parsed is None:
        raise _invalid(document, name, "an RFC 3339 UTC timestamp ending in Z")
    return parsed


def _short(value: object, limit: int = 80) -> str:
    """A bounded, escaped rendering for reasons that end up in logs: devices can send megabytes."""
    text = str(value) if isinstance(value, BaseException) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
