"""Play commands and the programme a speaker keeps for when its link drops (docs/protocol.md §1.3, §1.10).

A scheduled occurrence's ids are derived from the schedule, the planned instant and the device, so the
controller can put in a device's programme, hours ahead, the very command it will send live: a device
that played an item from its cache while offline and then receives the live command recognises it as a
duplicate, and its offline reports land on the delivery the controller created for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from controller.domain.clock import rfc3339
from controller.domain.priority import Priority

# Fixed for ever: changing it would change every scheduled command id a device holds in its cache.
_OCCURRENCE_NAMESPACE = uuid.UUID("6f1d3c52-7a0e-4b8e-9a51-2f3b8c0d9e47")


@dataclass(frozen=True, slots=True)
class DeliveryIds:
    delivery_id: str
    command_id: str


def occurrence_key(schedule_id: str, planned_at: datetime) -> str:
    return f"{schedule_id}@{rfc3339(planned_at)}"


def occurrence_broadcast_id(schedule_id: str, planned_at: datetime) -> str:
    return str(uuid.uuid5(_OCCURRENCE_NAMESPACE, f"broadcast:{occurrence_key(schedule_id, planned_at)}"))


def occurrence_delivery_ids(schedule_id: str, planned_at: datetime, device_id: str) -> DeliveryIds:
    key = f"{occurrence_key(schedule_id, planned_at)}/{device_id}"
    return DeliveryIds(
        delivery_id=str(uuid.uuid5(_OCCURRENCE_NAMESPACE, f"delivery:{key}")),
        command_id=str(uuid.uuid5(_OCCURRENCE_NAMESPACE, f"command:{key}")),
    )


@dataclass(frozen=True, slots=True)
class PlayContent:
    """What a play command asks a device to play, and how."""

    priority: Priority
    media: Sequence[dict[str, Any]]  # the wire's media objects, in playlist order
    repeats: int
    max_duration_s: float
    gap_s: float = 0.0
    mode: str = "live"


def play_command(
    content: PlayContent,
    *,
    broadcast_id: str,
    ids: DeliveryIds,
    address: str,
    issued_at: datetime,
    expires_at: datetime,
) -> dict[str, Any]:
    """The `play` document of docs/protocol.md §1.3 (`seq` and `sig` are added when it is signed)."""
    header = {
        "v": 1,
        "type": "play",
        "id": ids.command_id,
        "correlation_id": ids.delivery_id,
        "device": address,
    }
    return {**header, **_play_members(content, broadcast_id, issued_at, expires_at)}


def area_play_command(
    content: PlayContent,
    *,
    broadcast_id: str,
    fanout_id: str,
    area_code: str,
    issued_at: datetime,
    expires_at: datetime,
) -> dict[str, Any]:
    """The area command of docs/protocol.md §1.12: a `play` with `area` instead of `device` and
    `correlation_id`; each follower derives its own ids from `fanout_id`."""
    header = {"v": 1, "type": "play", "id": fanout_id, "area": area_code}
    return {**header, **_play_members(content, broadcast_id, issued_at, expires_at)}


def _play_members(
    content: PlayContent, broadcast_id: str, issued_at: datetime, expires_at: datetime
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "issued_at": rfc3339(issued_at),
        "expires_at": rfc3339(expires_at),
        "broadcast_id": broadcast_id,
        "priority": {
            "class": content.priority.priority_class.value,
            "sub": content.priority.sub,
            "rank": content.priority.rank,
        },
        "mode": content.mode,
        "media": content.media[0],
        "repeats": content.repeats,
        "max_duration_s": content.max_duration_s,
    }
    if len(content.media) > 1:
        document["playlist"] = list(content.media)
    if content.gap_s:
        document["gap_s"] = content.gap_s
    return document


@dataclass(frozen=True, slots=True)
class DisplayText:
    """Priority text for LED screens (docs/protocol.md §1.11), shown for `display_s` seconds."""

    headline: str
    body: str = ""
    display_s: float = 3600.0

    def document(self) -> dict[str, Any]:
        return {"headline": self.headline, "body": self.body, "display_s": self.display_s}


def show_command(
    text: DisplayText,
    *,
    priority: Priority,
    mode: str,
    broadcast_id: str,
    ids: DeliveryIds,
    address: str,
    issued_at: datetime,
    expires_at: datetime,
) -> dict[str, Any]:
    """The `show` document of docs/protocol.md §1.11 (`seq` and `sig` are added when it is signed). The
    screen picks the colour from the class (red for emergency, amber otherwise)."""
    document: dict[str, Any] = {
        "v": 1,
        "type": "show",
        "id": ids.command_id,
        "correlation_id": ids.delivery_id,
        "device": address,
        "issued_at": rfc3339(issued_at),
        "expires_at": rfc3339(expires_at),
        "broadcast_id": broadcast_id,
        "priority": {"class": priority.priority_class.value, "sub": priority.sub, "rank": priority.rank},
        "mode": mode,
        "text": {"headline": text.headline, **({"body": text.body} if text.body else {})},
        "display_s": text.display_s,
    }
    return document


class CommLossPolicy(StrEnum):
    KEEP = "keep"
    STOP_AFTER = "stop_after"


@dataclass(frozen=True, slots=True)
class CommLoss:
    """What a device does with its cached programme while its link is down."""

    policy: CommLossPolicy = CommLossPolicy.KEEP
    after_s: int | None = None

    def __post_init__(self) -> None:
        if self.policy is CommLossPolicy.STOP_AFTER and (self.after_s is None or self.after_s <= 0):
            raise ValueError("comm_loss.after_s: stop_after needs a number of seconds > 0")
        if self.policy is CommLossPolicy.KEEP and self.after_s is not None:
            raise ValueError("comm_loss.after_s: only the stop_after policy takes a limit")

    def document(self) -> dict[str, Any]:
        if self.policy is CommLossPolicy.KEEP:
            return {"policy": self.policy.value}
        return {"policy": self.policy.value, "after_s": self.after_s}


@dataclass(frozen=True, slots=True)
class ProgrammeItem:
    start_at: datetime
    command: dict[str, Any]


def programme_document(
    *,
    address: str,
    generated_at: datetime,
    valid_from: datetime,
    valid_until: datetime,
    comm_loss: CommLoss,
    items: Sequence[ProgrammeItem],
    areas: Sequence[str] = (),
) -> dict[str, Any]:
    """A device's retained programme (docs/protocol.md §1.10), items in start order; `areas` are the
    area codes whose command topics it follows (§1.12), from its own residential group upwards."""
    ordered = sorted(items, key=lambda item: (item.start_at, item.command["id"]))
    # `seq` numbers the signed live stream (docs/protocol.md §1.15); a cached copy is outside it.
    return {
        "v": 1,
        "device": address,
        "generated_at": rfc3339(generated_at),
        "valid_from": rfc3339(valid_from),
        "valid_until": rfc3339(valid_until),
        "comm_loss": comm_loss.document(),
        "areas": list(areas),
        "items": [
            {"start_at": rfc3339(item.start_at), "command": {**item.command, "seq": 0}} for item in ordered
        ],
    }
