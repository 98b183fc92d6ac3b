"""The programme cache document as a device reads it (docs/protocol.md §1.10), written from the text alone.

Pure: parsing and validating the retained `schedule` document, deciding whether a new one supersedes
the held one, and choosing which items fall due while the device has no broker connection. The
speaker owns the timer and the connection state; this module only answers questions about time.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from firmware_sim import wire
from firmware_sim.wire import MediaRef, PlayCommand

COMM_LOSS_POLICIES: Final = frozenset({"keep", "stop_after"})

CommLossPolicy = Literal["keep", "stop_after"]


class ProgrammeIgnoredError(ValueError):
    """A document the device does not take; `detail` says why (and names the member at fault)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class MalformedProgrammeError(ProgrammeIgnoredError):
    """The document breaks §1.10; `member` is the JSON path of the first member at fault."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}")
        self.member = member


class ForeignProgrammeError(ProgrammeIgnoredError):
    """The document is addressed to another device."""


@dataclass(frozen=True, slots=True)
class CommLoss:
    policy: CommLossPolicy
    # Seconds after the link went down during which items may still start; `None` for `keep`.
    after_s: float | None = None


@dataclass(frozen=True, slots=True)
class ProgrammeItem:
    start_at: datetime
    command: PlayCommand


@dataclass(frozen=True, slots=True)
class Programme:
    device: str
    generated_at: datetime
    valid_from: datetime
    valid_until: datetime
    comm_loss: CommLoss
    # The area codes whose command topics the speaker follows (§1.12), in the document's order (its
    # residential group first); empty when the document lists none.
    areas: tuple[str, ...]
    # In `start_at` order (validated), so the next due item is found by bisection.
    items: tuple[ProgrammeItem, ...]
    # SHA-256 of the payload: the retained copy the broker re-sends on every reconnect is recognised
    # without holding its bytes.
    digest: bytes
    # The seq of its signature (§1.15.4): a programme must come with a higher one to replace it.
    seq: int = 0
    _starts: tuple[datetime, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(item.start_at for item in self.items))

    def supersedes(self, held: Programme | None) -> bool:
        """§1.10: a document older than the held one is ignored; an equal or newer one replaces it."""
        return held is None or self.generated_at >= held.generated_at

    def index_from(self, instant: datetime) -> int:
        """The index of the first item starting at or after `instant`."""
        return bisect.bisect_left(self._starts, instant)

    def due(self, index: int, now: datetime) -> tuple[tuple[ProgrammeItem, ...], int]:
        """The items from `index` whose `start_at` has come by `now`, and the index after them."""
        end = bisect.bisect_right(self._starts, now, lo=index)
        return self.items[index:end], end

    def allows(self, item: ProgrammeItem, link_lost_at: datetime, comm_loss: CommLoss | None = None) -> bool:
        """Whether the item may start from the cache after a link lost at `link_lost_at`, under the
        document's comm-loss policy or `comm_loss`, one a `configure` operation pushed since (§1.14).

        Both limits are upper bounds on `start_at`, so once an item is refused every later one is too.
        """
        if item.start_at >= self.valid_until:
            return False
        after_s = (comm_loss or self.comm_loss).after_s
        return after_s is None or item.start_at < link_lost_at + timedelta(seconds=after_s)

    def media(self) -> tuple[MediaRef, ...]:
        """Every media object the programme names, once per SHA-256, in first-use order."""
        seen: dict[str, MediaRef] = {}
        for item in self.items:
            for media in item.command.playlist:
                seen.setdefault(media.sha256, media)
        return tuple(seen.values())


def parse_programme(payload: bytes | bytearray, address: str, *, seq: int = 0) -> Programme | None:
    """The programme in `payload` (whose signature, with `seq`, the caller has checked), or `None` for
    an empty payload.

    Raises `ForeignProgrammeError` for a document meant for another device and
    `MalformedProgrammeError` naming the first member at fault otherwise.
    """
    if not payload:
        return None
    try:
        document = wire.load_json(payload)
    except ValueError as error:
        raise MalformedProgrammeError("(document)", f"payload is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise MalformedProgrammeError("(document)", "payload is not a JSON object")
    version = document.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version != wire.WIRE_VERSION:
        raise MalformedProgrammeError(
            "v", f"wire version {version!r} is not spoken here (only {wire.WIRE_VERSION})"
        )
    device = document.get("device")
    if not isinstance(device, str) or not device:
        raise MalformedProgrammeError("device", "must be a non-empty string")
    if device != address:
        raise ForeignProgrammeError(f"device: meant for {device!r}, this device is {address!r}")
    generated_at = _timestamp(document, "generated_at")
    valid_from = _timestamp(document, "valid_from")
    valid_until = _timestamp(document, "valid_until")
    if valid_until < valid_from:
        raise MalformedProgrammeError("valid_until", "is before valid_from")
    return Programme(
        device=device,
        generated_at=generated_at,
        valid_from=valid_from,
        valid_until=valid_until,
        comm_loss=_comm_loss(document.get("comm_loss")),
        areas=_areas(document["areas"]) if "areas" in document else (),
        items=_items(document.get("items"), address),
        digest=hashlib.sha256(payload).digest(),
        seq=seq,
    )


def _timestamp(document: Mapping[str, Any], name: str, prefix: str = "") -> datetime:
    value = document.get(name)
    if not isinstance(value, str):
        raise MalformedProgrammeError(prefix + name, "must be a timestamp string")
    try:
        return wire.parse_timestamp(value)
    except ValueError as error:
        raise MalformedProgrammeError(prefix + name, str(error)) from error


def _comm_loss(value: object) -> CommLoss:
    if not isinstance(value, dict):
        raise MalformedProgrammeError("comm_loss", "must be a JSON object")
    policy = value.get("policy")
    if policy == "keep":
        return CommLoss("keep")
    if policy == "stop_after":
        after_s = value.get("after_s")
        if (
            not isinstance(after_s, int | float)
            or isinstance(after_s, bool)
            or not math.isfinite(after_s)
            or after_s < 0
        ):
            raise MalformedProgrammeError("comm_loss.after_s", "must be a finite number ≥ 0")
        return CommLoss("stop_after", float(after_s))
    raise MalformedProgrammeError(
        "comm_loss.policy", f"{policy!r} is not one of {sorted(COMM_LOSS_POLICIES)}"
    )


def _areas(value: object) -> tuple[str, ...]:
    """`areas` (§1.10, §1.12), when present: each code names a topic level, so it must be one that a
    subscription can carry literally (no level separator, no wildcard)."""
    if not isinstance(value, list):
        raise MalformedProgrammeError("areas", "must be a JSON array")
    areas: list[str] = []
    for index, code in enumerate(value):
        member = f"areas[{index}]"
        if not isinstance(code, str) or not code:
            raise MalformedProgrammeError(member, "must be a non-empty string")
        if not wire.is_valid_area_code(code):
            raise MalformedProgrammeError(member, f"{code!r} cannot be a topic level (it holds / + # or NUL)")
        if code in areas:
            raise MalformedProgrammeError(member, f"{code!r} is listed twice")
        areas.append(code)
    return tuple(areas)


def _items(value: object, address: str) -> tuple[ProgrammeItem, ...]:
    if not isinstance(value, list):
        raise MalformedProgrammeError("items", "must be a JSON array")
    items: list[ProgrammeItem] = []
    ids: set[str] = set()
    for index, raw in enumerate(value):
        prefix = f"items[{index}]."
        if not isinstance(raw, dict):
            raise MalformedProgrammeError(f"items[{index}]", "must be a JSON object")
        start_at = _timestamp(raw, "start_at", prefix)
        if items and start_at < items[-1].start_at:
            raise MalformedProgrammeError(
                prefix + "start_at", "is before the previous item's (items are in start_at order)"
            )
        command = _command(raw.get("command"), address, prefix + "command")
        if command.id in ids:
            raise MalformedProgrammeError(prefix + "command.id", f"{command.id} is listed twice")
        ids.add(command.id)
        items.append(ProgrammeItem(start_at, command))
    return tuple(items)


def _command(value: object, address: str, name: str) -> PlayCommand:
    """A complete `play` command (§1.3), validated exactly as one arriving on the `cmd` topic."""
    if not isinstance(value, dict):
        raise MalformedProgrammeError(name, "must be a JSON object")
    command_id = value.get("id")
    if not isinstance(command_id, str) or not command_id:
        raise MalformedProgrammeError(f"{name}.id", "is missing or not a non-empty string")
    correlation_id = value.get("correlation_id")
    envelope = wire.Envelope(command_id, correlation_id if isinstance(correlation_id, str) else "", value)
    try:
        command = wire.parse_command(envelope, address)
    except wire.CommandRejectedError as rejection:
        raise MalformedProgrammeError(f"{name}.{rejection.member}", rejection.reason) from rejection
    if not isinstance(command, PlayCommand):
        raise MalformedProgrammeError(f"{name}.type", "must be 'play'")
    return command
