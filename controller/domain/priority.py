"""Priority classes of Circular 39/2020/TT-BTTTT and the rule that decides who takes a device."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

SUB_PRIORITY_MAX = 255
_BAND_WIDTH = SUB_PRIORITY_MAX + 1


class PriorityClass(StrEnum):
    NORMAL = "normal"  # thông thường: the ward picks the slot
    PRIORITY = "priority"  # ưu tiên: placed first
    EMERGENCY = "emergency"  # khẩn cấp: plays immediately, preempts

    @property
    def band(self) -> int:
        return _BANDS[self]


_BANDS = {PriorityClass.NORMAL: 0, PriorityClass.PRIORITY: 1, PriorityClass.EMERGENCY: 2}


@dataclass(frozen=True, slots=True)
class Priority:
    priority_class: PriorityClass
    sub: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.sub <= SUB_PRIORITY_MAX:
            raise ValueError(f"sub_priority must be between 0 and {SUB_PRIORITY_MAX}")

    @property
    def rank(self) -> int:
        """One integer that orders every priority: class band first, then sub-priority."""
        return self.priority_class.band * _BAND_WIDTH + self.sub

    @classmethod
    def from_rank(cls, rank: int) -> Priority:
        band, sub = divmod(rank, _BAND_WIDTH)
        priority_class = next(c for c, b in _BANDS.items() if b == band)
        return cls(priority_class, sub)

    def takes_device_from(self, playing: Priority) -> bool:
        """Whether a newcomer with this priority preempts `playing`.

        Higher rank wins. At equal rank the first keeps the device, except in the emergency band,
        where the newest wins so that a stuck alert cannot block a newer one.
        """
        if self.rank != playing.rank:
            return self.rank > playing.rank
        return self.priority_class is PriorityClass.EMERGENCY
