"""Register codec for Modbus sensor values (docs/protocol.md §3.5): pure, no I/O.

A value is `raw × scale + offset`; `raw` lives in one register (int16, uint16) or two (int32, float32).
Writing the raw value's bytes big-endian as A B C D, the byte order is the order of the two bytes inside
each register and the word order is the order of the two registers, the lower address first.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DataType = Literal["int16", "uint16", "int32", "float32"]
Endian = Literal["big", "little"]

REGISTER_COUNT: dict[DataType, int] = {"int16": 1, "uint16": 1, "int32": 2, "float32": 2}
_STRUCT: dict[DataType, str] = {"int16": ">h", "uint16": ">H", "int32": ">i", "float32": ">f"}
_INTEGER_LIMITS: dict[DataType, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
}
_REGISTER_MAX = 0xFFFF
_FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]


@dataclass(frozen=True, slots=True)
class RegisterFormat:
    """How one named quantity sits in registers."""

    name: str
    data_type: DataType
    byte_order: Endian = "big"
    word_order: Endian = "big"
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.data_type not in REGISTER_COUNT:
            raise ValueError(f"{self.name}: unknown data type {self.data_type!r}")
        if self.byte_order not in ("big", "little") or self.word_order not in ("big", "little"):
            raise ValueError(f"{self.name}: byte and word order are 'big' or 'little'")
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise ValueError(f"{self.name}: scale must be finite and non-zero, offset finite")

    @property
    def count(self) -> int:
        """Registers the value takes."""
        return REGISTER_COUNT[self.data_type]

    def decode_raw(self, registers: Sequence[int]) -> int | float:
        """The raw number the registers carry (before scale and offset)."""
        if len(registers) != self.count:
            raise ValueError(
                f"{self.name}: {self.data_type} needs {self.count} registers, got {len(registers)}"
            )
        for register in registers:
            if not 0 <= register <= _REGISTER_MAX:
                raise ValueError(f"{self.name}: register value {register} outside 0..65535")
        words = list(registers)
        if self.word_order == "little":
            words.reverse()
        data = b"".join(_register_bytes(word, self.byte_order) for word in words)
        raw: int | float = struct.unpack(_STRUCT[self.data_type], data)[0]
        return raw

    def decode(self, registers: Sequence[int]) -> float:
        """The value in the quantity's unit: raw × scale + offset."""
        return float(self.decode_raw(registers)) * self.scale + self.offset

    def at_limit(self, registers: Sequence[int]) -> bool:
        """True when the raw reading sits at its type's limit (a saturated transmitter, §3.5)."""
        raw = self.decode_raw(registers)
        if self.data_type == "float32":
            return not math.isfinite(raw) or abs(raw) >= _FLOAT32_MAX
        low, high = _INTEGER_LIMITS[self.data_type]
        return raw in (low, high)

    def encode(self, value: float) -> tuple[int, ...]:
        """Registers for `value` (in the quantity's unit); ValueError naming the field if it does not fit."""
        if not math.isfinite(value):
            raise ValueError(f"{self.name}: {value} is not a finite number")
        raw_float = (value - self.offset) / self.scale
        if self.data_type == "float32":
            if abs(raw_float) > _FLOAT32_MAX:
                raise ValueError(f"{self.name}: {value} outside the float32 range")
            data = struct.pack(">f", raw_float)
        else:
            raw = round(raw_float)
            low, high = _INTEGER_LIMITS[self.data_type]
            if not low <= raw <= high:
                raise ValueError(
                    f"{self.name}: {value} gives raw {raw}, outside {self.data_type} range {low}..{high}"
                )
            data = struct.pack(_STRUCT[self.data_type], raw)
        words = [
            _register_value(data[index : index + 2], self.byte_order) for index in range(0, len(data), 2)
        ]
        if self.word_order == "little":
            words.reverse()
        return tuple(words)


def _register_bytes(register: int, byte_order: Endian) -> bytes:
    high_first = register.to_bytes(2, "big")
    return high_first if byte_order == "big" else high_first[::-1]


def _register_value(pair: bytes, byte_order: Endian) -> int:
    return int.from_bytes(pair if byte_order == "big" else pair[::-1], "big")
