"""Wire protocol v1 as a device reads it (docs/protocol.md §1), written from the text alone.

Pure functions and value types: topics, timestamps, command validation and the JSON documents a
device publishes. Nothing here touches the network, so the speaker can stay a thin state machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

WIRE_VERSION: Final = 1
TOPIC_ROOT: Final = "wardcast/v1"
ADDRESS_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
EMERGENCY_RANK_FLOOR: Final = 2 * 256

PRIORITY_BANDS: Final[Mapping[str, int]] = {"normal": 0, "priority": 1, "emergency": 2}
PLAY_MODES: Final = frozenset({"live", "drill"})
STOP_REASONS: Final = frozenset({"cancelled", "preempted", "all_clear"})
STOP_ALL: Final = "*"
# LED screens (§1.11)
SCREEN_COLORS: Final = frozenset({"red", "amber", "green", "white"})
HEADLINE_MAX_CHARS: Final = 200
BODY_MAX_CHARS: Final = 2000
DISPLAY_MAX_S: Final = 86_400.0

# Remote operations (§1.14): every MQTT device takes `reboot` and `configure`, a speaker also
# `set_volume` and `test_tone`.
OPERATION_TYPES: Final = frozenset({"set_volume", "reboot", "test_tone", "configure"})
TEST_TONE_MAX_S: Final = 30.0
HEARTBEAT_MIN_S: Final = 5
HEARTBEAT_MAX_S: Final = 3600
_CLOCK_TIME: Final = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")

ReportState = Literal[
    "delivered",
    "playing",
    "completed",
    "interrupted",
    "stopped",
    "failed",
    "expired",
    "rejected",
    # A firmware update's steps (§1.16).
    "downloading",
    "verified",
    "updating",
    "updated",
]
FIRMWARE_UPDATE: Final = "firmware_update"
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")
Clock = Callable[[], datetime]
_T = TypeVar("_T")
_C = TypeVar("_C")

_TIMESTAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?Z")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_AREA_TOPIC_PREFIX: Final = f"{TOPIC_ROOT}/area/"
_AREA_TOPIC_SUFFIX: Final = "/cmd"
# The level separator, the wildcards and NUL cannot appear in a topic level subscribed to literally.
_TOPIC_LEVEL_FORBIDDEN: Final = frozenset("/+#\x00")


def utc_now() -> datetime:
    return datetime.now(UTC)


def cmd_topic(address: str) -> str:
    return f"{TOPIC_ROOT}/dev/{address}/cmd"


def ack_topic(address: str) -> str:
    return f"{TOPIC_ROOT}/dev/{address}/ack"


def state_topic(address: str) -> str:
    return f"{TOPIC_ROOT}/dev/{address}/state"


def schedule_topic(address: str) -> str:
    return f"{TOPIC_ROOT}/dev/{address}/schedule"


def area_cmd_topic(area_code: str) -> str:
    return f"{TOPIC_ROOT}/area/{area_code}/cmd"


def is_valid_address(address: str) -> bool:
    return ADDRESS_PATTERN.fullmatch(address) is not None


def is_valid_area_code(area_code: str) -> bool:
    """Whether the code can be one level of a topic a device subscribes to literally (§1.12)."""
    return bool(area_code) and _TOPIC_LEVEL_FORBIDDEN.isdisjoint(area_code)


def area_of_topic(topic: str) -> str | None:
    """The area code of an area command topic (§1.12), or `None` for any other topic."""
    if not (topic.startswith(_AREA_TOPIC_PREFIX) and topic.endswith(_AREA_TOPIC_SUFFIX)):
        return None
    area_code = topic[len(_AREA_TOPIC_PREFIX) : -len(_AREA_TOPIC_SUFFIX)]
    return area_code if is_valid_area_code(area_code) else None


def format_timestamp(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> datetime:
    """RFC 3339 in UTC with a `Z` and at most microseconds, the only form §1.1 allows."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 UTC timestamp ending in Z")
    year, month, day, hour, minute, second, fraction = match.groups()
    microsecond = int((fraction or "0").ljust(6, "0"))
    return datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second), microsecond, tzinfo=UTC
    )


@dataclass(frozen=True, slots=True)
class Priority:
    band: str
    sub: int
    rank: int


@dataclass(frozen=True, slots=True)
class MediaRef:
    url: str
    sha256: str
    duration_s: float
    content_type: str


@dataclass(frozen=True, slots=True)
class PlayCommand:
    id: str
    correlation_id: str
    device: str
    issued_at: datetime
    expires_at: datetime
    seq: int
    broadcast_id: str
    priority: Priority
    mode: str
    media: MediaRef
    repeats: int
    max_duration_s: float
    # Never empty: `(media,)` when the command carries no `playlist` (§1.3).
    playlist: tuple[MediaRef, ...]
    gap_s: float
    # Whether the command itself carried `playlist`, so a failure can name the item (`playlist[1]`).
    playlist_given: bool


@dataclass(frozen=True, slots=True)
class StopCommand:
    id: str
    correlation_id: str
    device: str
    issued_at: datetime
    expires_at: datetime
    seq: int
    target: str
    reason: str


@dataclass(frozen=True, slots=True)
class ScreenText:
    headline: str
    body: str | None


@dataclass(frozen=True, slots=True)
class ScreenStyle:
    color: str
    blink: bool


@dataclass(frozen=True, slots=True)
class ShowCommand:
    """A `show` for an LED screen (§1.11)."""

    id: str
    correlation_id: str
    device: str
    issued_at: datetime
    expires_at: datetime
    seq: int
    broadcast_id: str
    priority: Priority
    mode: str
    text: ScreenText
    display_s: float
    # The defaults of §1.11 filled in when the command carries no (or a partial) `style`.
    style: ScreenStyle


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily window in local time (`utc_offset_min` from UTC) in which normal-class plays are refused."""

    start_min: int
    end_min: int
    utc_offset_min: int

    def contains(self, instant: datetime) -> bool:
        local = instant.astimezone(UTC) + timedelta(minutes=self.utc_offset_min)
        minute = local.hour * 60 + local.minute
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min  # the window passes midnight


@dataclass(frozen=True, slots=True)
class OperationCommand:
    """A remote operation (§1.14); `members` holds what its type carries, validated."""

    id: str
    correlation_id: str
    device: str
    issued_at: datetime
    expires_at: datetime
    seq: int
    type: str
    volume: int | None = None
    duration_s: float | None = None
    # `configure`: the members given, each validated (`quiet_hours` may be None: cleared).
    config: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class FirmwareImage:
    kind: str
    version: str
    url: str
    size: int
    sha256: str
    # Base64 of the 64-byte Ed25519 signature over the image's 32-byte SHA-256 digest.
    signature: str


@dataclass(frozen=True, slots=True)
class FirmwareUpdateCommand:
    """A `firmware_update` (§1.16)."""

    id: str
    correlation_id: str
    device: str
    issued_at: datetime
    expires_at: datetime
    seq: int
    firmware: FirmwareImage


Command = PlayCommand | StopCommand
ScreenCommand = ShowCommand | StopCommand


class UnidentifiableCommandError(ValueError):
    """The payload has no usable `id`, so no report can name it; the device can only log it."""


class CommandRejectedError(ValueError):
    """The command carries an id but breaks the spec; `member` is the offending JSON member."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}")
        self.member = member
        self.reason = reason
        self.detail = f"{member}: {reason}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """The members a device needs before anything else, to deduplicate and to address a report."""

    command_id: str
    correlation_id: str
    document: Mapping[str, Any]


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose member names are unique: parsers disagree on which of two equal names wins,
    so a signature over one reading must not be acted on in another (docs/protocol.md §1.15.3)."""
    document: dict[str, Any] = {}
    for name, value in pairs:
        if name in document:
            raise ValueError(f"member {name!r} appears twice")
        document[name] = value
    return document


def load_json(payload: bytes | bytearray) -> Any:
    """JSON as every document from the controller is read: member names unique at every level."""
    return json.loads(payload, object_pairs_hook=_unique_members)


def open_envelope(payload: bytes | bytearray) -> Envelope:
    try:
        document = load_json(payload)
    except ValueError as error:
        raise UnidentifiableCommandError(f"payload is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise UnidentifiableCommandError("payload is not a JSON object")
    command_id = document.get("id")
    if not isinstance(command_id, str) or not command_id:
        raise UnidentifiableCommandError("member id is missing or not a non-empty string")
    correlation_id = document.get("correlation_id")
    return Envelope(command_id, correlation_id if isinstance(correlation_id, str) else "", document)


class AreaCommandIgnoredError(ValueError):
    """An area command a speaker ignores without a report (§1.12 step 1): it does not belong on the
    topic it came on, is not a `play`, or has no `id` to derive the speaker's own ids from."""


@dataclass(frozen=True, slots=True)
class AreaCommand:
    """An area command (§1.12) that passed step 1; `for_device` is step 2."""

    area: str
    # The area command's `id`: the namespace of every speaker's own ids.
    namespace: uuid.UUID
    # Every member as received except `area`. One parse may serve every speaker of a process, so
    # this is never mutated: each speaker gets a copy with its own ids.
    members: Mapping[str, Any]
    # The document exactly as received, `area` included: what its signature covers (§1.15).
    received: Mapping[str, Any]

    def for_device(self, address: str) -> Envelope:
        """The device's own command: UUIDv5 ids derived from the area command's, its address as
        `device`, every other member as received."""
        command_id = str(uuid.uuid5(self.namespace, "command:" + address))
        correlation_id = str(uuid.uuid5(self.namespace, "delivery:" + address))
        document = {**self.members, "id": command_id, "correlation_id": correlation_id, "device": address}
        return Envelope(command_id, correlation_id, document)


def open_area_command(payload: bytes, topic_area: str) -> AreaCommand:
    """The area command in `payload`, received on the topic of `topic_area`; raises
    `AreaCommandIgnoredError` when §1.12 says to ignore it. Everything else is validated later, on
    the derived command, exactly as on the `cmd` topic."""
    try:
        received = load_json(payload)
    except ValueError as error:
        raise AreaCommandIgnoredError(f"payload is not JSON: {error}") from error
    if not isinstance(received, dict):
        raise AreaCommandIgnoredError("payload is not a JSON object")
    document = dict(received)
    area = document.pop("area", None)
    if area != topic_area:
        raise AreaCommandIgnoredError(f"area: {area!r} is not the topic's area {topic_area!r}")
    command_type = document.get("type")
    if command_type != "play":
        raise AreaCommandIgnoredError(f"type: {command_type!r} is not 'play'")
    command_id = document.get("id")
    if not isinstance(command_id, str):
        raise AreaCommandIgnoredError("id: is missing or not a string")
    try:
        namespace = uuid.UUID(command_id)
    except ValueError as error:
        raise AreaCommandIgnoredError(f"id: {command_id!r} is not a UUID") from error
    return AreaCommand(topic_area, namespace, document, received)


@dataclass(frozen=True, slots=True)
class _Header:
    """The members §1.3 gives every command, validated; each command type adds its own."""

    id: str
    correlation_id: str
    device: str
    issued_at: datetime
    expires_at: datetime
    seq: int

    def members(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


_CommandParser = Callable[[Mapping[str, Any], _Header], _C]


def parse_command(envelope: Envelope, address: str) -> Command:
    """Validates a speaker's command, every member §1.3 defines; raises `CommandRejectedError` naming
    the first bad one."""
    parsers: Mapping[str, _CommandParser[Command]] = {"play": _play, "stop": _stop}
    return _parse(envelope, address, parsers)


def parse_screen_command(envelope: Envelope, address: str) -> ScreenCommand:
    """Validates an LED screen's command (§1.11): `show` or `stop`; a `play` is rejected naming `type`."""
    parsers: Mapping[str, _CommandParser[ScreenCommand]] = {"show": _show, "stop": _stop}
    return _parse(envelope, address, parsers)


def parse_operation(envelope: Envelope, address: str, accepted: frozenset[str]) -> OperationCommand:
    """Validates a remote operation (§1.14) this device takes (`accepted`); raises
    `CommandRejectedError` naming the first bad member (`type` for an operation it does not take)."""
    parsers: Mapping[str, _CommandParser[OperationCommand]] = {
        name: parser for name, parser in _OPERATION_PARSERS.items() if name in accepted
    }
    return _parse(envelope, address, parsers)


def _set_volume(document: Mapping[str, Any], header: _Header) -> OperationCommand:
    volume = _member(document, "volume", int)
    if not 0 <= volume <= 100:  # noqa: PLR2004 - a percentage
        raise CommandRejectedError("volume", "must be within 0..100")
    return OperationCommand(**header.members(), type="set_volume", volume=volume)


def _reboot(_document: Mapping[str, Any], header: _Header) -> OperationCommand:
    return OperationCommand(**header.members(), type="reboot")


def _test_tone(document: Mapping[str, Any], header: _Header) -> OperationCommand:
    duration_s = _positive_number(document, "duration_s")
    if duration_s > TEST_TONE_MAX_S:
        raise CommandRejectedError("duration_s", f"must be at most {TEST_TONE_MAX_S:g}")
    return OperationCommand(**header.members(), type="test_tone", duration_s=duration_s)


def _configure(document: Mapping[str, Any], header: _Header) -> OperationCommand:
    config = _member(document, "config", dict)
    taken: dict[str, Any] = {}
    for name in config:
        if name not in {"quiet_hours", "comm_loss", "heartbeat_s"}:
            raise CommandRejectedError(f"config.{name}", "is not a setting this device knows")
    if "quiet_hours" in config:
        taken["quiet_hours"] = _quiet_hours(config["quiet_hours"])
    if "comm_loss" in config:
        taken["comm_loss"] = _config_comm_loss(config["comm_loss"])
    if "heartbeat_s" in config:
        heartbeat_s = _member(config, "heartbeat_s", int, "config.")
        if not HEARTBEAT_MIN_S <= heartbeat_s <= HEARTBEAT_MAX_S:
            raise CommandRejectedError(
                "config.heartbeat_s", f"must be within {HEARTBEAT_MIN_S}..{HEARTBEAT_MAX_S}"
            )
        taken["heartbeat_s"] = heartbeat_s
    if not taken:
        raise CommandRejectedError("config", "must hold at least one setting")
    return OperationCommand(**header.members(), type="configure", config=taken)


def _quiet_hours(value: object) -> QuietHours | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CommandRejectedError("config.quiet_hours", "must be a JSON object or null")
    minutes: list[int] = []
    for name in ("start", "end"):
        text = _member(value, name, str, "config.quiet_hours.")
        match = _CLOCK_TIME.fullmatch(text)
        if match is None:
            raise CommandRejectedError(f"config.quiet_hours.{name}", f"{text!r} is not HH:MM")
        minutes.append(int(match.group(1)) * 60 + int(match.group(2)))
    if minutes[0] == minutes[1]:
        raise CommandRejectedError("config.quiet_hours.end", "must differ from start")
    offset = _member(value, "utc_offset_min", int, "config.quiet_hours.")
    if not -14 * 60 <= offset <= 14 * 60:
        raise CommandRejectedError("config.quiet_hours.utc_offset_min", "must be within -840..840")
    return QuietHours(minutes[0], minutes[1], offset)


def _config_comm_loss(value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise CommandRejectedError("config.comm_loss", "must be a JSON object")
    policy = _choice(value, "policy", frozenset({"keep", "stop_after"}), "config.comm_loss.")
    if policy == "keep":
        return {"policy": "keep"}
    after_s = _member(value, "after_s", int, "config.comm_loss.")
    if after_s <= 0:
        raise CommandRejectedError("config.comm_loss.after_s", "must be greater than 0")
    return {"policy": "stop_after", "after_s": after_s}


_OPERATION_PARSERS: Final[Mapping[str, _CommandParser[OperationCommand]]] = {
    "set_volume": _set_volume,
    "reboot": _reboot,
    "test_tone": _test_tone,
    "configure": _configure,
}


def quiet_hours_document(quiet: QuietHours | None) -> dict[str, object] | None:
    """Quiet hours as the state echoes them (§1.5)."""
    if quiet is None:
        return None
    return {
        "start": f"{quiet.start_min // 60:02d}:{quiet.start_min % 60:02d}",
        "end": f"{quiet.end_min // 60:02d}:{quiet.end_min % 60:02d}",
        "utc_offset_min": quiet.utc_offset_min,
    }


def _parse(envelope: Envelope, address: str, parsers: Mapping[str, _CommandParser[_C]]) -> _C:
    document = envelope.document
    version = document.get("v")
    if not _is_int(version) or version != WIRE_VERSION:
        raise CommandRejectedError("v", f"wire version {version!r} is not spoken here (only {WIRE_VERSION})")
    command_type = _member(document, "type", str)
    command_id = _uuid_member(document, "id")
    correlation_id = _member(document, "correlation_id", str)
    if not correlation_id:
        raise CommandRejectedError("correlation_id", "must not be empty")
    device = _member(document, "device", str)
    if device != address:
        raise CommandRejectedError("device", f"meant for {device!r}, this device is {address!r}")
    issued_at = _timestamp_member(document, "issued_at")
    expires_at = _timestamp_member(document, "expires_at")
    if expires_at < issued_at:
        raise CommandRejectedError("expires_at", "is before issued_at")
    seq = _member(document, "seq", int)
    if seq < 0:
        raise CommandRejectedError("seq", "must not be negative")
    parser = parsers.get(command_type)
    if parser is None:
        accepted = " nor ".join(repr(name) for name in parsers)
        raise CommandRejectedError("type", f"{command_type!r} is neither {accepted}")
    return parser(document, _Header(command_id, correlation_id, device, issued_at, expires_at, seq))


def is_firmware_update(envelope: Envelope) -> bool:
    return envelope.document.get("type") == FIRMWARE_UPDATE


def parse_firmware_command(envelope: Envelope, address: str, kind: str) -> FirmwareUpdateCommand:
    """Validates a `firmware_update` (§1.16) meant for a device of `kind`; raises `CommandRejectedError`
    naming the first bad member."""
    parsers: Mapping[str, _CommandParser[FirmwareUpdateCommand]] = {FIRMWARE_UPDATE: _firmware_update}
    command = _parse(envelope, address, parsers)
    if command.firmware.kind != kind:
        raise CommandRejectedError("firmware.kind", f"{command.firmware.kind!r} firmware; this is a {kind}")
    return command


def _firmware_update(document: Mapping[str, Any], header: _Header) -> FirmwareUpdateCommand:
    value = document.get("firmware")
    if not isinstance(value, dict):
        raise CommandRejectedError("firmware", "must be a JSON object")
    prefix = "firmware."
    version = _non_empty_string(value, "version", prefix)
    if _VERSION.fullmatch(version) is None:
        raise CommandRejectedError(prefix + "version", f"{version!r} is not a firmware version")
    url = _non_empty_string(value, "url", prefix)
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise CommandRejectedError(prefix + "url", f"{url!r} is not an absolute HTTP URL")
    size = _member(value, "size", int, prefix)
    if size < 1:
        raise CommandRejectedError(prefix + "size", "must be at least 1")
    sha256 = _member(value, "sha256", str, prefix)
    if _SHA256_HEX.fullmatch(sha256) is None:
        raise CommandRejectedError(prefix + "sha256", "must be 64 hexadecimal digits")
    return FirmwareUpdateCommand(
        **header.members(),
        firmware=FirmwareImage(
            kind=_non_empty_string(value, "kind", prefix),
            version=version,
            url=url,
            size=size,
            sha256=sha256.lower(),
            signature=_non_empty_string(value, "signature", prefix),
        ),
    )


def _delivery(document: Mapping[str, Any]) -> dict[str, Any]:
    """The members `play` and `show` share, in the order §1.3 lists them."""
    return {
        "broadcast_id": _non_empty_string(document, "broadcast_id"),
        "priority": _priority(document.get("priority")),
        "mode": _choice(document, "mode", PLAY_MODES),
    }


def _play(document: Mapping[str, Any], header: _Header) -> PlayCommand:
    # Members are checked in the order §1.3 lists them, so the first bad one is named.
    delivery = _delivery(document)
    media = _media(document.get("media"))
    playlist = _playlist(document, media)
    return PlayCommand(
        **header.members(),
        **delivery,
        media=media,
        playlist=playlist if playlist is not None else (media,),
        playlist_given=playlist is not None,
        gap_s=_gap(document),
        repeats=_repeats(document),
        max_duration_s=_positive_number(document, "max_duration_s"),
    )


def _stop(document: Mapping[str, Any], header: _Header) -> StopCommand:
    target = _member(document, "target", str)
    if target != STOP_ALL:
        target = _uuid_member(document, "target")
    return StopCommand(**header.members(), target=target, reason=_choice(document, "reason", STOP_REASONS))


def _show(document: Mapping[str, Any], header: _Header) -> ShowCommand:
    # Members are checked in the order §1.11 lists them, so the first bad one is named.
    delivery = _delivery(document)
    text = _screen_text(document.get("text"))
    display_s = _positive_number(document, "display_s")
    if display_s > DISPLAY_MAX_S:
        raise CommandRejectedError("display_s", f"must be at most {DISPLAY_MAX_S:g}")
    return ShowCommand(
        **header.members(),
        **delivery,
        text=text,
        display_s=display_s,
        style=_screen_style(document, delivery["priority"]),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _member(document: Mapping[str, Any], name: str, kind: type[_T], prefix: str = "") -> _T:
    value = document.get(name)
    if value is None:
        raise CommandRejectedError(prefix + name, "is missing")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandRejectedError(prefix + name, f"must be of JSON type {_json_type_name(kind)}")
    return value


def _json_type_name(kind: type) -> str:
    return {str: "string", int: "integer", dict: "object"}.get(kind, kind.__name__)


def _non_empty_string(document: Mapping[str, Any], name: str, prefix: str = "") -> str:
    value = _member(document, name, str, prefix)
    if not value:
        raise CommandRejectedError(prefix + name, "must not be empty")
    return value


def _uuid_member(document: Mapping[str, Any], name: str) -> str:
    value = _member(document, name, str)
    try:
        uuid.UUID(value)
    except ValueError as error:
        raise CommandRejectedError(name, f"{value!r} is not a UUID") from error
    return value


def _timestamp_member(document: Mapping[str, Any], name: str) -> datetime:
    value = _member(document, name, str)
    try:
        return parse_timestamp(value)
    except ValueError as error:
        raise CommandRejectedError(name, str(error)) from error


def _choice(document: Mapping[str, Any], name: str, allowed: frozenset[str], prefix: str = "") -> str:
    value = _member(document, name, str, prefix)
    if value not in allowed:
        raise CommandRejectedError(prefix + name, f"{value!r} is not one of {sorted(allowed)}")
    return value


def _finite_number(document: Mapping[str, Any], name: str, prefix: str = "") -> float:
    value = document.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise CommandRejectedError(prefix + name, "must be a finite number")
    return float(value)


def _positive_number(document: Mapping[str, Any], name: str, prefix: str = "") -> float:
    number = _finite_number(document, name, prefix)
    if number <= 0:
        raise CommandRejectedError(prefix + name, "must be greater than 0")
    return number


def _gap(document: Mapping[str, Any]) -> float:
    """`gap_s`, optional: seconds of silence between repeats, 0 when absent (§1.3)."""
    if "gap_s" not in document:
        return 0.0
    gap_s = _finite_number(document, "gap_s")
    if gap_s < 0:
        raise CommandRejectedError("gap_s", "must not be negative")
    return gap_s


def _repeats(document: Mapping[str, Any]) -> int:
    repeats = _member(document, "repeats", int)
    if repeats < 1:
        raise CommandRejectedError("repeats", "must be at least 1")
    return repeats


def _priority(value: object) -> Priority:
    if not isinstance(value, dict):
        raise CommandRejectedError("priority", "must be a JSON object")
    band = _member(value, "class", str, "priority.")
    if band not in PRIORITY_BANDS:
        raise CommandRejectedError("priority.class", f"{band!r} is not one of {list(PRIORITY_BANDS)}")
    sub = _member(value, "sub", int, "priority.")
    if not 0 <= sub <= 255:  # noqa: PLR2004 - the sub-priority is one byte by definition (§1.3)
        raise CommandRejectedError("priority.sub", "must be within 0..255")
    rank = _member(value, "rank", int, "priority.")
    expected = PRIORITY_BANDS[band] * 256 + sub
    if rank != expected:
        raise CommandRejectedError(
            "priority.rank", f"is {rank}, but class {band!r} with sub {sub} gives {expected}"
        )
    return Priority(band, sub, rank)


def _media(value: object, name: str = "media") -> MediaRef:
    if not isinstance(value, dict):
        raise CommandRejectedError(name, "must be a JSON object")
    prefix = f"{name}."
    url = _non_empty_string(value, "url", prefix)
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise CommandRejectedError(prefix + "url", f"{url!r} is not an absolute HTTP URL")
    sha256 = _member(value, "sha256", str, prefix)
    if _SHA256_HEX.fullmatch(sha256) is None:
        raise CommandRejectedError(prefix + "sha256", "must be 64 hexadecimal digits")
    return MediaRef(
        url=url,
        sha256=sha256.lower(),
        duration_s=_positive_number(value, "duration_s", prefix),
        content_type=_non_empty_string(value, "content_type", prefix),
    )


def _playlist(document: Mapping[str, Any], media: MediaRef) -> tuple[MediaRef, ...] | None:
    """`playlist`, optional: `None` when absent; when present its first item must equal `media`."""
    if "playlist" not in document:
        return None
    value = document["playlist"]
    if not isinstance(value, list):
        raise CommandRejectedError("playlist", "must be a JSON array")
    if not value:
        raise CommandRejectedError("playlist", "must not be empty")
    items = tuple(_media(item, f"playlist[{index}]") for index, item in enumerate(value))
    if items[0] != media:
        raise CommandRejectedError("playlist[0]", "must equal media")
    return items


def _screen_text(value: object) -> ScreenText:
    """`text`: a headline of 1-200 characters and an optional body of at most 2,000, NFC (§1.11)."""
    if not isinstance(value, dict):
        raise CommandRejectedError("text", "must be a JSON object")
    headline = _nfc_text(value, "headline", HEADLINE_MAX_CHARS)
    if not headline:
        raise CommandRejectedError("text.headline", "must not be empty")
    body = _nfc_text(value, "body", BODY_MAX_CHARS) if "body" in value else None
    return ScreenText(headline, body)


def _nfc_text(text: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = _member(text, name, str, "text.")
    if not unicodedata.is_normalized("NFC", value):
        raise CommandRejectedError(f"text.{name}", "must be in Unicode normalization form NFC")
    if len(value) > max_chars:
        raise CommandRejectedError(f"text.{name}", f"has {len(value)} characters; at most {max_chars}")
    return value


def _screen_style(document: Mapping[str, Any], priority: Priority) -> ScreenStyle:
    """`style`, optional: red for emergency and amber otherwise, without blinking, unless given."""
    color = "red" if priority.band == "emergency" else "amber"
    if "style" not in document:
        return ScreenStyle(color, blink=False)
    value = document["style"]
    if not isinstance(value, dict):
        raise CommandRejectedError("style", "must be a JSON object")
    if "color" in value:
        color = _choice(value, "color", SCREEN_COLORS, "style.")
    blink = value.get("blink", False)
    if not isinstance(blink, bool):
        raise CommandRejectedError("style.blink", "must be a JSON boolean")
    return ScreenStyle(color, blink)


def encode(document: Mapping[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def report_document(
    command_id: str,
    correlation_id: str,
    state: ReportState,
    at: datetime,
    *,
    detail: str | None = None,
    played_s: float | None = None,
    truncated: bool | None = None,
    offline: bool = False,
    result: Mapping[str, object] | None = None,
    reason: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    document: dict[str, object] = {
        "v": WIRE_VERSION,
        "command_id": command_id,
        "correlation_id": correlation_id,
        "state": state,
        "at": format_timestamp(at),
    }
    if reason is not None:
        # §1.15.5: the code of the check that failed, on `rejected` and `expired`.
        document["reason"] = reason
    if detail is not None:
        document["detail"] = detail
    if played_s is not None:
        document["played_s"] = round(played_s, 3)
    if truncated is not None:
        document["truncated"] = truncated
    if offline:
        # §1.4: only on reports about a command started from the programme cache; absent otherwise.
        document["offline"] = True
    if result is not None:
        # §1.14: what a remote operation did, on its final report.
        document["result"] = dict(result)
    if extra:
        # §1.16: a firmware update's `firmware` and `rolled_back`.
        document.update(extra)
    return document


def online_state(
    at: datetime, *, kind: str, firmware: str, rssi_dbm: int, status: Mapping[str, object]
) -> bytes:
    """The retained online state (§1.5); `status` holds the members that depend on the kind
    (`volume` and `playing` for a speaker, §1.11's `showing` and `headline` for a screen)."""
    return encode(
        {
            "v": WIRE_VERSION,
            "online": True,
            "at": format_timestamp(at),
            "kind": kind,
            "firmware": firmware,
            **status,
            "rssi_dbm": rssi_dbm,
        }
    )


OFFLINE_SHUTDOWN: Final = encode({"v": WIRE_VERSION, "online": False, "reason": "shutdown"})
OFFLINE_WILL: Final = encode({"v": WIRE_VERSION, "online": False, "reason": "will"})
