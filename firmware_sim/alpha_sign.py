"""A simulated serial LED sign speaking the Alpha Sign Communications Protocol (docs/alpha-sign.md).

    python -m firmware_sim.alpha_sign --pty --tcp 127.0.0.1:0 --address 01

prints `READY pty=/dev/pts/7 tcp=127.0.0.1:40411 address=01` once it listens, and runs until SIGTERM
or SIGINT, then exits 0. A driver opens the pty path as its serial port, or `socket://127.0.0.1:40411`.

Written from the wire spec alone: nothing here comes from `drivers/` or `controller/`, so that a
misreading of the protocol in the driver cannot hide by being shared with the sign it talks to.

The layers: `FrameReader` turns a byte stream into packets one byte at a time (resynchronising on
garbage, counting cut-off frames, checking checksums); `SimulatedSign` is the device (its memory, its
clock, its display, its faults) and sees only packets; the lines (`PtyLine`, `TcpLine`) carry bytes,
route each packet to the signs its address names, and send the addressed sign's answer. Several signs
may share a line, as they share an RS-485 pair.

Tests drive the sign through the Python API: `sign.faults` injects silence, NAKs and garbage,
`wait_until` waits for a change without sleeping, `current_text()` and `render_png()` show what a
passer-by would see.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import os
import random
import sys
import time as time_module
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from PIL import Image, ImageDraw, ImageFont

from firmware_sim.lifecycle import stop_on_signals
from firmware_sim.signals import ChangeSignal

logger = logging.getLogger(__name__)

# The wire, transcribed here on its own (docs/alpha-sign.md §4.2).
_NUL: Final = 0x00
_SOH: Final = 0x01
_STX: Final = 0x02
_ETX: Final = 0x03
_EOT: Final = 0x04
_ACK: Final = 0x06
_NAK: Final = 0x15
_CR: Final = 0x0D
_ESC: Final = 0x1B
_PICTURE_CALL: Final = 0x14
_STRING_CALL: Final = 0x10
_COLOUR_SELECT: Final = 0x1C
_FONT_SELECT: Final = 0x1A
_FRAMING: Final = frozenset({_NUL, _SOH, _STX, _ETX, _EOT})
_ALL_SIGNS_TYPE: Final = "Z"
_PRIORITY: Final = "0"
_DEFAULT_TEXT_FILE: Final = "A"
_PRIORITY_BYTES: Final = 125
_CHECKSUM_LENGTH: Final = 4
_HEADER_LENGTH: Final = 3
_FILE_OVERHEAD: Final = 11
_ENTRY_LENGTH: Final = 11
_REPLY_NULS: Final = 5
# Serial Error Status Register (docs/alpha-sign.md §4.6): bit 6 always set.
STATUS_OK: Final = 0x40
STATUS_ILLEGAL: Final = 0x20
STATUS_CHECKSUM: Final = 0x10
STATUS_OVERFLOW: Final = 0x08
STATUS_TIMEOUT: Final = 0x04

DEFAULT_ADDRESS: Final = "01"
DEFAULT_TYPE_CODE: Final = "1"  # a one-line sign
DEFAULT_ROWS: Final = 16
DEFAULT_COLUMNS: Final = 120
DEFAULT_POOL: Final = 0x4000
# "If there is longer than a second or so between characters, the sign assumes the packet is done."
DEFAULT_FRAME_TIMEOUT_S: Final = 1.0
MAX_FRAME_BYTES: Final = 32_768
MAX_PENDING_OUTPUT: Final = 65_536
FIRMWARE: Final = "WCSIM-01"
FIRMWARE_REVISION: Final = "A"
FIRMWARE_RELEASED: Final = "1126"
_SECONDS_PER_DAY: Final = 86_400
_DAYS_PER_WEEK: Final = 7
_HOURS: Final = 24
_MINUTES: Final = 60
_YEAR_PIVOT: Final = 96

Clock = Callable[[], float]


# Reading frames


@dataclass(frozen=True, slots=True)
class Command:
    """One STX…[ETX checksum] block: its command code and data; `checksum_ok` is None without one."""

    code: str
    data: bytes
    checksum_ok: bool | None


@dataclass(frozen=True, slots=True)
class Frame:
    type_code: str
    address: str
    commands: tuple[Command, ...]


@dataclass(slots=True)
class LineCounters:
    frames: int = 0
    garbage_bytes: int = 0
    partial_frames: int = 0
    malformed_frames: int = 0
    oversize_frames: int = 0
    for_other_addresses: int = 0
    broadcasts: int = 0
    lost_output_bytes: int = 0


class _State(enum.Enum):
    HUNTING = enum.auto()
    HEADER = enum.auto()
    AWAIT_STX = enum.auto()
    CODE = enum.auto()
    DATA = enum.auto()
    CHECKSUM = enum.auto()
    AFTER_CHECKSUM = enum.auto()


class FrameReader:
    """Bytes in, frames out. Garbage between frames is counted and skipped; a frame interrupted by a
    new SOH, a NUL, silence (`abandon`) or sheer length is counted and dropped; the reader then hunts
    for the next SOH."""

    def __init__(self, counters: LineCounters) -> None:
        self._counters = counters
        self._state = _State.HUNTING
        self._header = bytearray()
        self._code = 0
        self._data = bytearray()
        self._sum_digits = bytearray()
        self._commands: list[Command] = []
        self._size = 0

    @property
    def in_frame(self) -> bool:
        return self._state is not _State.HUNTING

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        for byte in data:
            frame = self._step(byte)
            if frame is not None:
                frames.append(frame)
        return frames

    def abandon(self) -> None:
        """The line went quiet in the middle of a frame: drop it."""
        if self.in_frame:
            self._counters.partial_frames += 1
            self._restart(hunting=True)

    def _restart(self, *, hunting: bool) -> None:
        self._state = _State.HUNTING if hunting else _State.HEADER
        self._header.clear()
        self._data.clear()
        self._sum_digits.clear()
        self._commands = []
        self._size = 0

    def _malformed(self, byte: int) -> None:
        self._counters.malformed_frames += 1
        self._restart(hunting=True)
        if byte == _SOH:
            self._state = _State.HEADER

    def _step(self, byte: int) -> Frame | None:
        if self._state is _State.HUNTING:
            if byte == _SOH:
                self._restart(hunting=False)
            elif byte != _NUL:
                self._counters.garbage_bytes += 1
            return None
        self._size += 1
        if self._size > MAX_FRAME_BYTES:
            self._counters.oversize_frames += 1
            self._restart(hunting=True)
            return None
        if byte == _SOH or (byte == _NUL and self._state is not _State.HEADER):
            # A new packet began (or sync NULs arrived) before this one ended: the sender gave up on it.
            self._counters.partial_frames += 1
            self._restart(hunting=byte != _SOH)
            return None
        if self._state is _State.HEADER:
            if byte < 0x20:  # noqa: PLR2004 - type code and address are printable
                self._malformed(byte)
                return None
            self._header.append(byte)
            if len(self._header) == _HEADER_LENGTH:
                self._state = _State.AWAIT_STX
            return None
        if self._state is _State.AWAIT_STX:
            if byte != _STX:
                self._malformed(byte)
                return None
            self._state = _State.CODE
            return None
        if self._state is _State.CODE:
            if byte in _FRAMING:
                self._malformed(byte)
                return None
            self._code = byte
            self._data.clear()
            self._state = _State.DATA
            return None
        if self._state is _State.DATA:
            return self._data_byte(byte)
        if self._state is _State.CHECKSUM:
            self._sum_digits.append(byte)
            if len(self._sum_digits) == _CHECKSUM_LENGTH:
                self._close_command(checked=True)
                self._state = _State.AFTER_CHECKSUM
            return None
        # After a checksum: another nested command, or the end of the packet.
        if byte == _STX:
            self._state = _State.CODE
            return None
        if byte == _EOT:
            return self._finish()
        self._malformed(byte)
        return None

    def _data_byte(self, byte: int) -> Frame | None:
        if byte == _ETX:
            self._state = _State.CHECKSUM
            self._sum_digits.clear()
        elif byte == _EOT:
            self._close_command(checked=False)
            return self._finish()
        elif byte == _STX:
            # Nesting without checksums: the next command starts straight away.
            self._close_command(checked=False)
            self._state = _State.CODE
        else:
            self._data.append(byte)
        return None

    def _close_command(self, *, checked: bool) -> None:
        ok: bool | None = None
        if checked:
            block = bytes([_STX, self._code]) + bytes(self._data) + bytes([_ETX])
            expected = f"{sum(block) & 0xFFFF:04X}".encode("ascii")
            ok = bytes(self._sum_digits).upper() == expected
        self._commands.append(Command(chr(self._code), bytes(self._data), ok))

    def _finish(self) -> Frame:
        self._counters.frames += 1
        header = self._header.decode("ascii", "replace")
        frame = Frame(type_code=header[0], address=header[1:].upper(), commands=tuple(self._commands))
        self._restart(hunting=True)
        return frame


# The sign


@dataclass(slots=True)
class SignCounters:
    packets: int = 0
    commands: int = 0
    acks: int = 0
    naks: int = 0
    bad_checksums: int = 0
    reads: int = 0
    broadcast_packets: int = 0
    ignored_packets: int = 0


@dataclass(slots=True)
class FaultPlan:
    """What goes wrong with a sign, flipped at run time. A silenced packet is never executed (the sign
    did not hear it); an injected NAK refuses it unexecuted; garbage goes out before the next answer."""

    silent: bool = False
    silence_next: int = 0
    nak_next: int = 0
    nak_status: int = STATUS_OK | STATUS_CHECKSUM
    garbage_before_reply: bytes = b""
    drop_fraction: float = 0.0
    nak_fraction: float = 0.0
    seed: int = 1
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._random = random.Random(f"alpha-faults-{self.seed}")

    def clear(self) -> None:
        self.silent = False
        self.silence_next = self.nak_next = 0
        self.garbage_before_reply = b""
        self.drop_fraction = self.nak_fraction = 0.0

    def take_silence(self) -> bool:
        if self.silent:
            return True
        if self.silence_next > 0:
            self.silence_next -= 1
            return True
        return self.drop_fraction > 0 and self._random.random() < self.drop_fraction

    def take_nak(self) -> bool:
        if self.nak_next > 0:
            self.nak_next -= 1
            return True
        return self.nak_fraction > 0 and self._random.random() < self.nak_fraction

    def take_garbage(self) -> bytes:
        garbage, self.garbage_before_reply = self.garbage_before_reply, b""
        return garbage


@dataclass(frozen=True, slots=True)
class Allocation:
    """A memory configuration entry the sign accepted."""

    label: str
    kind: str  # "A" TEXT, "B" STRING, "D" DOTS
    locked: bool
    size: int
    height: int
    width: int
    qualifier: str

    @property
    def cost(self) -> int:
        body = self.height * self.width if self.kind == "D" else self.size
        return body + _FILE_OVERHEAD

    def entry(self) -> str:
        size = f"{self.height:02X}{self.width:02X}" if self.kind == "D" else f"{self.size:04X}"
        return f"{self.label}{self.kind}{'L' if self.locked else 'U'}{size}{self.qualifier}"


@dataclass(frozen=True, slots=True)
class Picture:
    height: int
    width: int
    rows: tuple[str, ...]

    @property
    def lit(self) -> int:
        return sum(len(row) - row.count("0") for row in self.rows)


class Refusal(Exception):  # noqa: N818 - the sign's own word for it
    """A command the sign refuses: NAK with `status`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = STATUS_OK | status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SignConfig:
    address: str = DEFAULT_ADDRESS
    type_code: str = DEFAULT_TYPE_CODE
    rows: int = DEFAULT_ROWS
    columns: int = DEFAULT_COLUMNS
    memory_pool: int = DEFAULT_POOL
    seed: int = 1

    def __post_init__(self) -> None:
        if len(self.address) != 2 or any(c not in "0123456789ABCDEF" for c in self.address.upper()):  # noqa: PLR2004
            raise ValueError(f"address {self.address!r} is not two hex digits")
        if self.address == "00":
            raise ValueError("address 00 is the broadcast address, not a sign's own")
        if len(self.type_code) != 1:
            raise ValueError(f"type_code {self.type_code!r} is not one character")
        if not 1 <= self.rows <= 0xFF or not 1 <= self.columns <= 0xFFFF:  # noqa: PLR2004
            raise ValueError(f"rows {self.rows} / columns {self.columns} out of range")


class SimulatedSign:
    """One sign: its files, priority slot, pictures, clock and what it shows."""

    def __init__(self, config: SignConfig | None = None, *, clock: Clock = time_module.monotonic) -> None:
        self.config = config or SignConfig()
        self.address = self.config.address.upper()
        self.counters = SignCounters()
        self.faults = FaultPlan(seed=self.config.seed)
        self._clock = clock
        self._changes = ChangeSignal()
        self._allocations: dict[str, Allocation] = {}
        self._texts: dict[str, bytes] = {}
        self._strings: dict[str, bytes] = {}
        self._pictures: dict[str, Picture] = {}
        self._priority: bytes | None = None
        self._time_format = "M"
        self._day_of_week: int | None = None
        # The clock keeps running from what was last set: a date, the seconds into that day, and when.
        self._clock_date = date(2000, 1, 1)
        self._clock_seconds = 0.0
        self._clock_set_at = clock()

    # What a passer-by sees

    @property
    def priority_active(self) -> bool:
        return self._priority is not None

    @property
    def priority_data(self) -> bytes | None:
        return self._priority

    def text_file(self, label: str) -> bytes | None:
        return self._texts.get(label)

    def picture(self, label: str) -> Picture | None:
        return self._pictures.get(label)

    @property
    def allocations(self) -> tuple[Allocation, ...]:
        return tuple(self._allocations.values())

    def displayed_pictures(self) -> tuple[str, ...]:
        """The labels of the pictures the current display calls, in order."""
        return tuple(label for kind, label, _ in self._segments() if kind == "picture")

    def current_text(self) -> str:
        """What the sign shows, as text: the priority message while one runs (a picture as
        `[picture L HxW]`), otherwise its programme files one per line."""
        parts: list[str] = []
        for kind, value, _ in self._segments():
            if kind == "picture":
                picture = self._pictures.get(value)
                size = f" {picture.height}x{picture.width}" if picture else " missing"
                parts.append(f"[picture {value}{size}]")
            else:
                parts.append(value)
        return "".join(parts)

    def display_dots(self) -> tuple[str, ...]:
        """The display as rows of colour digits ("0" off), as wide as its content."""
        columns: list[str] = []
        for kind, value, colour in self._segments():
            if kind == "picture":
                picture = self._pictures.get(value)
                if picture is not None:
                    columns.extend(_columns_of(picture.rows, self.config.rows))
            elif kind == "text" and value:
                columns.extend(_text_columns(value.replace("\n", "   "), colour, self.config.rows))
        columns.extend(["0" * self.config.rows] * max(0, self.config.columns - len(columns)))
        return tuple("".join(column[row] for column in columns) for row in range(self.config.rows))

    def render_png(self, path: Path, *, dot_px: int = 4) -> Path:
        """The display drawn as LEDs: each dot a square of `dot_px` pixels, lit in its colour."""
        dots = self.display_dots()
        width, height = len(dots[0]), len(dots)
        image = Image.new("RGB", (width * dot_px, height * dot_px), _LED_COLOURS["background"])
        draw = ImageDraw.Draw(image)
        for y, row in enumerate(dots):
            for x, digit in enumerate(row):
                fill = _LED_COLOURS.get(digit, _LED_COLOURS["1"]) if digit != "0" else _LED_COLOURS["off"]
                box = (x * dot_px, y * dot_px, (x + 1) * dot_px - 2, (y + 1) * dot_px - 2)
                draw.rectangle(box, fill=fill)
        image.save(path, format="PNG")
        return path

    def sign_time(self) -> tuple[date, int, int]:
        """The sign's calendar date, hour and minute now."""
        elapsed = self._clock() - self._clock_set_at
        days, seconds = divmod(self._clock_seconds + elapsed, _SECONDS_PER_DAY)
        minutes = int(seconds) // _MINUTES
        return self._clock_date + timedelta(days=int(days)), minutes // _MINUTES, minutes % _MINUTES

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Returns once `condition()` holds after the sign handled a packet; TimeoutError otherwise."""
        await self._changes.wait_until(condition, timeout)

    # The protocol

    def accepts(self, frame: Frame) -> bool:
        """Addressed to this sign: its type code (or Z, all types), its address, broadcast or wildcard."""
        if frame.type_code not in (_ALL_SIGNS_TYPE, self.config.type_code):
            return False
        return all(want in ("?", have) for want, have in zip(frame.address, self.address, strict=True)) or (
            frame.address == "00"
        )

    def handle(self, frame: Frame, *, answer: bool) -> list[bytes]:
        """Executes a packet; returns what the sign puts on the line (nothing when `answer` is false:
        a broadcast or wildcard packet, which several signs hear at once)."""
        try:
            return self._handle(frame, answer=answer)
        finally:
            self._changes.notify()

    def _handle(self, frame: Frame, *, answer: bool) -> list[bytes]:
        self.counters.packets += 1
        if not answer:
            self.counters.broadcast_packets += 1
        if self.faults.take_silence():
            self.counters.ignored_packets += 1
            return []
        if answer and self.faults.take_nak():
            return self._refuse(self.faults.nak_status)
        replies: list[bytes] = []
        status = 0
        writes = 0
        for command in frame.commands:
            self.counters.commands += 1
            if command.checksum_ok is False:
                self.counters.bad_checksums += 1
                status |= STATUS_OK | STATUS_CHECKSUM
                continue
            try:
                response = self._execute(command)
            except Refusal as refusal:
                logger.debug("sign %s refuses %s: %s", self.address, command.code, refusal.reason)
                status |= refusal.status
                if command.code in "BFHJ":
                    replies.extend(self._refuse(refusal.status) if answer else [])
                else:
                    writes += 1
                continue
            if response is None:
                writes += 1
            else:
                self.counters.reads += 1
                replies.append(self._response_packet(response))
        if not answer:
            return []
        if writes or (status and not replies):
            if status:
                replies.extend(self._refuse(status))
            else:
                self.counters.acks += 1
                replies.append(bytes([_ACK, STATUS_OK]))
        garbage = self.faults.take_garbage()
        return [garbage, *replies] if garbage and replies else replies

    def _refuse(self, status: int) -> list[bytes]:
        self.counters.naks += 1
        return [bytes([_NAK, STATUS_OK | status])]

    @staticmethod
    def _response_packet(body: bytes) -> bytes:
        block = bytes([_STX]) + body + bytes([_ETX])
        digits = f"{sum(block) & 0xFFFF:04X}".encode("ascii")
        return bytes([_NUL] * _REPLY_NULS) + bytes([_SOH]) + b"000" + block + digits + bytes([_EOT])

    def _execute(self, command: Command) -> bytes | None:
        """Applies a write (returns None) or answers a read (returns the response body)."""
        data = command.data
        if command.code == "A":
            self._write_text(data)
            return None
        if command.code == "B":
            label = _label(data, exact=True)
            stored = (self._priority or b"") if label == _PRIORITY else self._texts.get(label, b"")
            return b"A" + label.encode("ascii") + stored
        if command.code == "E":
            self._write_special(data)
            return None
        if command.code == "F":
            return self._read_special(data)
        if command.code == "G":
            label = _label(data)
            self._require(label, "B")
            self._strings[label] = data[1:]
            return None
        if command.code == "H":
            label = _label(data, exact=True)
            return b"G" + label.encode("ascii") + self._strings.get(label, b"")
        if command.code == "I":
            self._write_picture(data)
            return None
        if command.code == "J":
            label = _label(data, exact=True)
            picture = self._pictures.get(label)
            if picture is None:
                raise Refusal(STATUS_ILLEGAL, f"no picture {label!r}")
            rows = b"".join(row.encode("ascii") + bytes([_CR]) for row in picture.rows)
            return f"I{label}{picture.height:02X}{picture.width:02X}".encode("ascii") + rows
        raise Refusal(STATUS_ILLEGAL, f"unknown command code {command.code!r}")

    def _require(self, label: str, kind: str) -> Allocation:
        allocation = self._allocations.get(label)
        if allocation is None or allocation.kind != kind:
            raise Refusal(STATUS_ILLEGAL, f"file {label!r} is not configured as {kind}")
        return allocation

    def _write_text(self, data: bytes) -> None:
        label = _label(data)
        body = data[1:]
        if label == _PRIORITY:
            if len(body) > _PRIORITY_BYTES:
                raise Refusal(STATUS_OVERFLOW, f"priority text of {len(body)} bytes")
            # A bare write releases the priority file; anything else (even ESC, position, mode and no
            # text) is a priority message that holds the display.
            self._priority = body or None
            return
        if label == _DEFAULT_TEXT_FILE and not self._allocations:
            self._texts[label] = body
            return
        allocation = self._require(label, "A")
        if len(body) > allocation.size:
            raise Refusal(STATUS_OVERFLOW, f"text file {label!r}: {len(body)} bytes in {allocation.size}")
        self._texts[label] = body

    def _write_picture(self, data: bytes) -> None:
        label = _label(data)
        allocation = self._require(label, "D")
        try:
            height, width = int(data[1:3], 16), int(data[3:5], 16)
        except ValueError:
            raise Refusal(STATUS_ILLEGAL, f"picture {label!r}: size {data[1:5]!r} is not hex") from None
        if height > allocation.height or width > allocation.width:
            raise Refusal(
                STATUS_OVERFLOW,
                f"picture {label!r}: {height}x{width} in {allocation.height}x{allocation.width}",
            )
        rows = data[5:].split(bytes([_CR]))
        if rows and not rows[-1]:
            rows.pop()
        if len(rows) != height or any(len(row) != width or not set(row) <= set(b"012345678") for row in rows):
            raise Refusal(STATUS_ILLEGAL, f"picture {label!r}: not {height} rows of {width} colour digits")
        self._pictures[label] = Picture(height, width, tuple(row.decode("ascii") for row in rows))

    def _write_special(self, data: bytes) -> None:
        if not data:
            raise Refusal(STATUS_ILLEGAL, "special function without a label")
        label, value = chr(data[0]), data[1:]
        if label == " ":
            self._set_time(value)
        elif label == ";":
            self._set_date(value)
        elif label == "&":
            if value not in {str(day).encode() for day in range(1, _DAYS_PER_WEEK + 1)}:
                raise Refusal(STATUS_ILLEGAL, f"day of week {value!r}")
            self._day_of_week = int(value)
        elif label == "'":
            if value not in (b"S", b"M"):
                raise Refusal(STATUS_ILLEGAL, f"time format {value!r}")
            self._time_format = value.decode()
        elif label == "$":
            self._configure_memory(value)
        elif label != ",":  # a soft reset keeps memory: nothing to do here
            raise Refusal(STATUS_ILLEGAL, f"special function {label!r}")

    def _set_time(self, value: bytes) -> None:
        if len(value) != 4 or not value.isdigit():  # noqa: PLR2004 - HhMm
            raise Refusal(STATUS_ILLEGAL, f"time of day {value!r}")
        hour, minute = int(value[:2]), int(value[2:])
        if hour >= _HOURS or minute >= _MINUTES:
            raise Refusal(STATUS_ILLEGAL, f"time of day {value!r}")
        today, _, _ = self.sign_time()
        self._set_clock(today, (hour * _MINUTES + minute) * _MINUTES)

    def _set_date(self, value: bytes) -> None:
        if len(value) != 6 or not value.isdigit():  # noqa: PLR2004 - mmddyy
            raise Refusal(STATUS_ILLEGAL, f"date {value!r}")
        month, day, year = int(value[:2]), int(value[2:4]), int(value[4:])
        try:
            new_date = date(2000 + year if year <= _YEAR_PIVOT else 1900 + year, month, day)
        except ValueError:
            raise Refusal(STATUS_ILLEGAL, f"date {value!r}") from None
        _, hour, minute = self.sign_time()
        elapsed = self._clock() - self._clock_set_at
        seconds = (self._clock_seconds + elapsed) % _MINUTES
        self._set_clock(new_date, (hour * _MINUTES + minute) * _MINUTES + seconds)

    def _set_clock(self, day: date, seconds: float) -> None:
        self._clock_date, self._clock_seconds, self._clock_set_at = day, seconds, self._clock()

    def _configure_memory(self, value: bytes) -> None:
        if len(value) % _ENTRY_LENGTH:
            raise Refusal(STATUS_ILLEGAL, f"memory configuration of {len(value)} characters")
        entries = [
            value[i : i + _ENTRY_LENGTH].decode("ascii", "replace")
            for i in range(0, len(value), _ENTRY_LENGTH)
        ]
        table = dict(_allocation(entry) for entry in entries)
        if len(table) != len(entries):
            raise Refusal(STATUS_ILLEGAL, "a label appears twice in the memory configuration")
        if sum(allocation.cost for allocation in table.values()) > self.config.memory_pool:
            raise Refusal(STATUS_OVERFLOW, "the memory configuration does not fit the pool")
        # Writing a configuration (or clearing it) erases every file, the priority message included.
        self._allocations = table
        self._texts.clear()
        self._strings.clear()
        self._pictures.clear()
        self._priority = None

    def _read_special(self, data: bytes) -> bytes:
        label = chr(data[0]) if len(data) == 1 else ""
        day, hour, minute = self.sign_time()
        if label == " ":
            return f"E {hour:02d}{minute:02d}".encode("ascii")
        if label == ";":
            return f"E;{day.month:02d}{day.day:02d}{day.year % 100:02d}".encode("ascii")
        if label == "&":
            weekday = self._day_of_week or day.isoweekday() % _DAYS_PER_WEEK + 1
            return f"E&{weekday}".encode("ascii")
        if label == "'":
            return f"E'{self._time_format}".encode("ascii")
        if label == "$":
            return b"E$" + "".join(a.entry() for a in self._allocations.values()).encode("ascii")
        if label == '"':
            used = sum(allocation.cost for allocation in self._allocations.values())
            free = self.config.memory_pool - used
            info = (
                f"{FIRMWARE}{FIRMWARE_REVISION}{FIRMWARE_RELEASED}{hour:02d}{minute:02d}"
                f"{self._time_format}00{self.config.memory_pool:04X},{free:04X}"
            )
            return b'E"' + info.encode("ascii")
        raise Refusal(STATUS_ILLEGAL, f"read special function {data!r}")

    # The display

    def _segments(self) -> list[tuple[str, str, str]]:
        """(kind, value, colour) pieces of what is shown: text, or a picture's label."""
        if self._priority is not None:
            return _decode_text(self._priority, self._strings)
        segments: list[tuple[str, str, str]] = []
        labels = [a.label for a in self._allocations.values() if a.kind == "A"] or [_DEFAULT_TEXT_FILE]
        for label in labels:
            data = self._texts.get(label)
            if data:
                if segments:
                    segments.append(("text", "\n", "1"))
                segments.extend(_decode_text(data, self._strings))
        return segments


def _label(data: bytes, *, exact: bool = False) -> str:
    if not data or (exact and len(data) != 1):
        raise Refusal(STATUS_ILLEGAL, "missing or malformed file label")
    label = chr(data[0])
    if not 0x20 <= data[0] <= 0x7E or label == "?":  # noqa: PLR2004
        raise Refusal(STATUS_ILLEGAL, f"file label {label!r}")
    return label


def _allocation(entry: str) -> tuple[str, Allocation]:
    label, kind, protection, size, qualifier = entry[0], entry[1], entry[2], entry[3:7], entry[7:]
    if label in (_PRIORITY, "?") or kind not in "ABD" or protection not in "UL":
        raise Refusal(STATUS_ILLEGAL, f"memory configuration entry {entry!r}")
    try:
        number = int(size, 16)
    except ValueError:
        raise Refusal(STATUS_ILLEGAL, f"memory configuration entry {entry!r}") from None
    height, width = (number >> 8, number & 0xFF) if kind == "D" else (0, 0)
    return label, Allocation(label, kind, protection == "L", number, height, width, qualifier)


def _decode_text(data: bytes, strings: dict[str, bytes]) -> list[tuple[str, str, str]]:
    """A TEXT file's data as display pieces: control codes applied or skipped, pictures called."""
    segments: list[tuple[str, str, str]] = []
    colour = "1"
    text = bytearray()

    def flush() -> None:
        if text:
            segments.append(("text", text.decode("ascii", "replace"), colour))
            text.clear()

    index = 0
    while index < len(data):
        byte = data[index]
        if byte == _ESC:
            # Position and mode; a special mode ("n") carries one more byte. Mid-message it starts a line.
            if segments or text:
                text += b" "
            skip = 4 if index + 2 < len(data) and data[index + 2] == ord("n") else 3
            index += skip
            continue
        if byte == _PICTURE_CALL and index + 1 < len(data):
            flush()
            segments.append(("picture", chr(data[index + 1]), colour))
            index += 2
            continue
        if byte == _STRING_CALL and index + 1 < len(data):
            text += strings.get(chr(data[index + 1]), b"")
            index += 2
            continue
        if byte in (_COLOUR_SELECT, _FONT_SELECT) and index + 1 < len(data):
            if byte == _COLOUR_SELECT:
                flush()
                colour = chr(data[index + 1])
            index += 2
            continue
        if byte >= 0x20:  # noqa: PLR2004 - printable; other control codes change nothing visible here
            text.append(byte)
        index += 1
    flush()
    return segments


_LED_COLOURS: Final[dict[str, tuple[int, int, int]]] = {
    "background": (8, 8, 8),
    "off": (34, 30, 30),
    "1": (255, 40, 30),
    "2": (40, 230, 60),
    "3": (255, 170, 20),
    "4": (140, 20, 15),
    "5": (20, 120, 30),
    "6": (150, 90, 30),
    "7": (255, 120, 0),
    "8": (255, 240, 40),
}


def _columns_of(rows: Sequence[str], height: int) -> list[str]:
    """A picture's columns, cut or padded (with unlit dots, centred) to the sign's rows."""
    pad = max(0, height - len(rows)) // 2
    padded = ["0" * len(rows[0])] * pad + list(rows[:height])
    padded += ["0" * len(rows[0])] * (height - len(padded))
    return ["".join(row[x] for row in padded) for x in range(len(rows[0]))]


def _text_columns(text: str, colour: str, height: int) -> list[str]:
    """ASCII text drawn with Pillow's built-in bitmap font, as the sign's own character generator."""
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    width, glyph_height = max(1, right - left), max(1, bottom - top)
    canvas = Image.new("L", (width, max(height, glyph_height)), 0)
    ImageDraw.Draw(canvas).text((-left, (height - glyph_height) // 2 - top), text, font=font, fill=255)
    pixels = canvas.load()
    if pixels is None:  # pragma: no cover - a fresh image always loads
        return []
    return ["".join(colour if _lit(pixels[x, y]) else "0" for y in range(height)) for x in range(width)]


def _lit(pixel: float | tuple[int, ...]) -> bool:
    level = pixel if isinstance(pixel, float | int) else pixel[0]
    return level >= 128  # noqa: PLR2004 - half coverage


# Lines


class _Bus:
    """One byte stream (a pty, one TCP connection) shared by the signs on it, as an RS-485 pair."""

    def __init__(
        self,
        signs: Sequence[SimulatedSign],
        counters: LineCounters,
        changes: ChangeSignal,
        send: Callable[[bytes], None],
        frame_timeout_s: float,
    ) -> None:
        self._signs = signs
        self._counters = counters
        self._changes = changes
        self._send = send
        self._reader = FrameReader(counters)
        self._frame_timeout_s = frame_timeout_s
        self._timer: asyncio.TimerHandle | None = None

    def feed(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            for frame in self._reader.feed(data):
                self._route(frame)
        except Exception:
            # A bug in a sign must not take the line down: log it and go on with the next bytes.
            logger.exception("alpha sign line: a frame could not be handled")
        if self._reader.in_frame:
            self._timer = asyncio.get_running_loop().call_later(self._frame_timeout_s, self._timed_out)
        self._changes.notify()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _timed_out(self) -> None:
        self._timer = None
        self._reader.abandon()
        self._changes.notify()

    def _route(self, frame: Frame) -> None:
        listeners = [sign for sign in self._signs if sign.accepts(frame)]
        if not listeners:
            self._counters.for_other_addresses += 1
            return
        individual = "?" not in frame.address and frame.address != "00"
        if not individual:
            self._counters.broadcasts += 1
        for sign in listeners:
            for reply in sign.handle(frame, answer=individual):
                self._send(reply)


class PtyLine:
    """The signs on a pseudo-terminal: a driver opens `path` (e.g. /dev/pts/7) as its serial port."""

    def __init__(
        self, signs: Sequence[SimulatedSign], *, frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S
    ) -> None:
        self.signs = list(signs)
        self.counters = LineCounters()
        self._changes = ChangeSignal()
        self._frame_timeout_s = frame_timeout_s
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._path: str | None = None
        self._bus: _Bus | None = None
        self._pending = bytearray()
        self._writing = False

    @property
    def path(self) -> str:
        if self._path is None:
            raise RuntimeError("the line is not open")
        return self._path

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        await self._changes.wait_until(condition, timeout)

    def inject(self, data: bytes) -> None:
        """Puts `data` on the line towards the controller (noise, a stray reply)."""
        self._send(data)

    async def __aenter__(self) -> Self:
        master_fd, slave_fd = os.openpty()
        self._master_fd, self._slave_fd = master_fd, slave_fd
        try:
            # Raw, so that the line discipline neither echoes nor eats control bytes; the slave stays
            # open here so that the master never reads EIO while no driver holds the port.
            tty.setraw(slave_fd)
            os.set_blocking(master_fd, False)
            self._path = os.ttyname(slave_fd)
            self._bus = _Bus(self.signs, self.counters, self._changes, self._send, self._frame_timeout_s)
            asyncio.get_running_loop().add_reader(master_fd, self._read)
        except BaseException:
            self._close()
            raise
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._master_fd is not None:
            loop.remove_reader(self._master_fd)
            loop.remove_writer(self._master_fd)
        if self._bus is not None:
            self._bus.close()
            self._bus = None
        for descriptor in (self._master_fd, self._slave_fd):
            if descriptor is not None:
                os.close(descriptor)
        self._master_fd = self._slave_fd = None

    def _read(self) -> None:
        if self._master_fd is None or self._bus is None:
            return
        try:
            data = os.read(self._master_fd, 65_536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO while the slave side is being reopened: nothing to read
        if data:
            self._bus.feed(data)

    def _send(self, data: bytes) -> None:
        if len(self._pending) + len(data) > MAX_PENDING_OUTPUT:
            self.counters.lost_output_bytes += len(data)
            logger.warning("nobody reads %s: %d bytes lost", self._path, len(data))
            return
        self._pending += data
        self._flush()

    def _flush(self) -> None:
        if self._master_fd is None:
            return
        try:
            written = os.write(self._master_fd, self._pending)
        except BlockingIOError:
            written = 0
        del self._pending[:written]
        loop = asyncio.get_running_loop()
        if self._pending and not self._writing:
            loop.add_writer(self._master_fd, self._flush)
            self._writing = True
        elif not self._pending and self._writing:
            loop.remove_writer(self._master_fd)
            self._writing = False


class TcpLine:
    """The signs behind a serial-to-Ethernet converter in transparent mode: raw bytes over TCP, what a
    `socket://host:port` serial port opens. Each connection is a line of its own."""

    def __init__(
        self,
        signs: Sequence[SimulatedSign],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S,
    ) -> None:
        self.signs = list(signs)
        self.host = host
        self._requested_port = port
        self.counters = LineCounters()
        self._changes = ChangeSignal()
        self._frame_timeout_s = frame_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"socket://{self.host}:{self.port}"

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        await self._changes.wait_until(condition, timeout)

    def inject(self, data: bytes) -> None:
        """Puts `data` on every open connection towards the controller."""
        for writer in self._writers:
            writer.write(data)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, self.host, self._requested_port)
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in self._connections:
            connection.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bus = _Bus(self.signs, self.counters, self._changes, writer.write, self._frame_timeout_s)
        self._writers.add(writer)
        try:
            while data := await reader.read(65_536):
                bus.feed(data)
        except ConnectionError:
            pass  # the controller left, possibly in the middle of a frame
        finally:
            self._writers.discard(writer)
            bus.close()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# Command line

READY_PREFIX: Final = "READY"
_EXIT_OK: Final = 0
_EXIT_FAILED: Final = 1
_EXIT_USAGE: Final = 2


def build_parser(prog: str = "python -m firmware_sim.alpha_sign") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A simulated serial LED sign speaking the Alpha Sign Communications Protocol "
        "(docs/alpha-sign.md). Prints READY with its endpoints, runs until SIGTERM. Without --pty or "
        "--tcp it opens both (a pty and a TCP port on 127.0.0.1).",
    )
    parser.add_argument("--pty", action="store_true", help="listen on a new pseudo-terminal")
    parser.add_argument(
        "--tcp", metavar="HOST:PORT", help="raw serial bytes over TCP, for socket:// (port 0: any free one)"
    )
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, metavar="HH[,HH…]", help="sign addresses on the line"
    )
    parser.add_argument(
        "--type-code", default=DEFAULT_TYPE_CODE, help="the signs' own type code (Z also reaches them)"
    )
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="LED rows (default: %(default)s)")
    parser.add_argument(
        "--columns", type=int, default=DEFAULT_COLUMNS, help="LED columns (default: %(default)s)"
    )
    parser.add_argument("--drop-fraction", type=float, default=0.0, help="share of packets never heard")
    parser.add_argument("--nak-fraction", type=float, default=0.0, help="share of packets refused with NAK")
    parser.add_argument("--seed", type=int, default=1, help="seeds the fault fractions")
    parser.add_argument(
        "--png", type=Path, metavar="PATH", help="keep PATH a picture of the first sign's display"
    )
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _endpoint(text: str) -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or int(port) > 0xFFFF:  # noqa: PLR2004
        raise ValueError(f"--tcp {text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Everything `python -m firmware_sim.alpha_sign` runs: the signs, where they listen, their faults."""

    signs: tuple[SignConfig, ...]
    pty: bool
    tcp: tuple[str, int] | None
    drop_fraction: float = 0.0
    nak_fraction: float = 0.0
    png: Path | None = None


def config_from_arguments(arguments: argparse.Namespace) -> ServiceConfig:
    """The command line as a `ServiceConfig`; `ValueError` naming the flag when it does not add up."""
    addresses = [item.strip().upper() for item in arguments.address.split(",") if item.strip()]
    if not addresses or len(set(addresses)) != len(addresses):
        raise ValueError(f"--address needs distinct addresses, not {arguments.address!r}")
    for name in ("drop_fraction", "nak_fraction"):
        if not 0 <= getattr(arguments, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} outside 0..1")
    tcp = _endpoint(arguments.tcp) if arguments.tcp else None
    # Without an endpoint named, both: a pty and a TCP port anywhere on 127.0.0.1.
    pty = arguments.pty or tcp is None
    if not arguments.pty and tcp is None:
        tcp = ("127.0.0.1", 0)
    signs = tuple(
        SignConfig(
            address, arguments.type_code, arguments.rows, arguments.columns, seed=arguments.seed + index
        )
        for index, address in enumerate(addresses)
    )
    return ServiceConfig(signs, pty, tcp, arguments.drop_fraction, arguments.nak_fraction, arguments.png)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m firmware_sim.alpha_sign ARGS`; returns the exit status."""
    parser = build_parser()
    try:
        arguments = parser.parse_args(argv)
        try:
            config = config_from_arguments(arguments)
        except ValueError as error:
            parser.error(str(error))
    except SystemExit as exit_request:  # argparse exits on --help and on usage errors
        return exit_request.code if isinstance(exit_request.code, int) else _EXIT_USAGE
    logging.basicConfig(
        level=arguments.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s: %(message)s",
    )
    signs = [SimulatedSign(sign_config) for sign_config in config.signs]
    for sign in signs:
        sign.faults.drop_fraction = config.drop_fraction
        sign.faults.nak_fraction = config.nak_fraction
    return asyncio.run(serve(signs, pty=config.pty, tcp=config.tcp, png=config.png))


async def serve(
    signs: Sequence[SimulatedSign],
    *,
    pty: bool,
    tcp: tuple[str, int] | None,
    png: Path | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Runs the signs until `stop` is set or SIGTERM/SIGINT arrives; prints READY once listening."""
    stop = stop if stop is not None else asyncio.Event()
    with stop_on_signals(stop):
        async with contextlib.AsyncExitStack() as lines:
            announced: list[str] = []
            try:
                if pty:
                    pty_line = await lines.enter_async_context(PtyLine(signs))
                    announced.append(f"pty={pty_line.path}")
                if tcp is not None:
                    tcp_line = await lines.enter_async_context(TcpLine(signs, *tcp))
                    host = f"[{tcp_line.host}]" if ":" in tcp_line.host else tcp_line.host
                    announced.append(f"tcp={host}:{tcp_line.port}")
            except OSError as error:
                logger.error("cannot open an endpoint: %s", error)  # noqa: TRY400 - the message says it all
                return _EXIT_FAILED
            addresses = ",".join(sign.address for sign in signs)
            sys.stdout.write(f"{READY_PREFIX} {' '.join(announced)} address={addresses}\n")
            sys.stdout.flush()
            if png is None:
                await stop.wait()
            else:
                await _keep_png(signs[0], png, stop)
    return _EXIT_OK


async def _keep_png(sign: SimulatedSign, path: Path, stop: asyncio.Event) -> None:
    """Redraws `path` whenever the sign's display changes, until `stop`."""
    while not stop.is_set():
        shown = sign.display_dots()
        sign.render_png(path)

        def changed(before: tuple[str, ...] = shown) -> bool:
            return stop.is_set() or sign.display_dots() != before

        with contextlib.suppress(TimeoutError):
            await sign.wait_until(changed, timeout=1.0)
    sign.render_png(path)  # what it showed last, whatever raced with the stop


if __name__ == "__main__":
    sys.exit(main())
