"""The delivery state machine: one broadcast on one device.

queued → sent (broker accepted) → delivered (device received) → playing → one terminal state.
Every state is a separate fact with its own timestamp, and states never go backwards.
"""

from __future__ import annotations

from enum import StrEnum


class DeliveryState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    PLAYING = "playing"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def progress(self) -> int:
        return _PROGRESS[self]


TERMINAL_STATES = frozenset(
    {
        DeliveryState.COMPLETED,
        DeliveryState.INTERRUPTED,
        DeliveryState.FAILED,
        DeliveryState.EXPIRED,
        DeliveryState.CANCELLED,
    }
)
_PROGRESS = {
    DeliveryState.QUEUED: 0,
    DeliveryState.SENT: 1,
    DeliveryState.DELIVERED: 2,
    DeliveryState.PLAYING: 3,
    **dict.fromkeys(TERMINAL_STATES, 4),
}
# Device report states (docs/protocol.md §1.4) and the delivery state each one means.
_REPORTED = {
    "delivered": DeliveryState.DELIVERED,
    "playing": DeliveryState.PLAYING,
    "completed": DeliveryState.COMPLETED,
    "interrupted": DeliveryState.INTERRUPTED,
    "stopped": DeliveryState.CANCELLED,
    "failed": DeliveryState.FAILED,
    "expired": DeliveryState.EXPIRED,
    "rejected": DeliveryState.FAILED,
}


def can_advance(current: DeliveryState, new: DeliveryState) -> bool:
    """True when `new` moves a delivery forward; a terminal delivery never changes again."""
    return not current.is_terminal and new.progress > current.progress


def state_from_report(reported: str) -> DeliveryState | None:
    return _REPORTED.get(reported)
