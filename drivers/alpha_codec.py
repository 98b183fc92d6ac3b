"""The Alpha Sign Communications Protocol (Adaptive Micro Systems, 9708-8061) as bytes: no I/O here.

Our profile of the protocol is docs/protocol.md §4. This module builds
the packets the controller sends (§4.2–§4.5), decodes what a sign answers (§4.6), and turns text the
sign's character set cannot show (Vietnamese) into a SMALL DOTS PICTURE rendered with the bundled font
(§4.4). Everything that goes wrong raises `ValueError` naming the field (the driver translates it into
`ProtocolError`); garbage on the line is never raised, it comes out of `ReplyDecoder` as `Garbage`.

A transmission packet (§4.2):

    NUL×5  SOH  type  address(2)  { STX  command  data  ETX  checksum(4) }…  EOT

The checksum is the 16-bit sum of every byte from the STX through the ETX inclusive, written as four
upper-case ASCII hex digits, most significant first.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, time
from enum import StrEnum
from pathlib import Path
from typing import Final, Literal

from PIL import Image, ImageDraw, ImageFont

# Framing bytes (control code table, Appendix G).
NUL: Final = 0x00
SOH: Final = 0x01
STX: Final = 0x02
ETX: Final = 0x03
EOT: Final = 0x04
ACK: Final = 0x06
NAK: Final = 0x15
ESC: Final = 0x1B
CR: Final = 0x0D
# Inside a TEXT file: "call SMALL DOTS PICTURE" followed by the picture's label, and "select colour".
CALL_PICTURE: Final = 0x14
CALL_STRING: Final = 0x10
SELECT_COLOUR: Final = 0x1C

# "These five <NUL>s cause a sign to lock onto a baud rate": at least five before every packet.
SYNC_NULS: Final = 5
TYPE_ALL_SIGNS: Final = "Z"
# A sign's answer carries type code "0" and address "00" whatever its own address is.
RESPONSE_TYPE: Final = "0"
RESPONSE_ADDRESS: Final = "00"
BROADCAST_ADDRESS: Final = "00"

PRIORITY_LABEL: Final = "0"
# "A Priority TEXT file is a special 125-byte message that does not need to be configured."
PRIORITY_CAPACITY: Final = 125
# The default TEXT file a sign accepts before any memory configuration.
DEFAULT_TEXT_LABEL: Final = "A"
WILDCARD: Final = "?"
CHECKSUM_DIGITS: Final = 4
CHECKSUM_MODULUS: Final = 0x1_0000
# SMALL DOTS PICTURE height and width travel as two hex digits each.
MAX_PICTURE_SIDE: Final = 0xFF
# Every configured file costs 11 bytes of sign memory besides its own size (Table 15, note 1).
FILE_OVERHEAD_BYTES: Final = 11
# The Serial Error Status Register sent after ACK/NAK always has bit 6 set; the low bits say what
# went wrong (our profile, §4.6).
STATUS_BASE: Final = 0x40
STATUS_MAX: Final = 0x7F
# A packet longer than this is not a sign's answer: the decoder gives up on it as garbage.
MAX_REPLY_PACKET: Final = 16_384
_PRINTABLE_LOW: Final = 0x20
_PRINTABLE_HIGH: Final = 0x7E
_DAYS_IN_WEEK: Final = 7
_GENERAL_INFORMATION_LENGTHS: Final = (28, 29)
_YEAR_WINDOW_PIVOT: Final = 96
_HOURS: Final = 24
_MINUTES: Final = 60
_MONTHS: Final = 12


class CommandCode(StrEnum):
    WRITE_TEXT = "A"
    READ_TEXT = "B"
    WRITE_SPECIAL = "E"
    READ_SPECIAL = "F"
    WRITE_STRING = "G"
    READ_STRING = "H"
    WRITE_SMALL_DOTS = "I"
    READ_SMALL_DOTS = "J"


class SpecialLabel(StrEnum):
    """The label after E (write) or F (read) SPECIAL FUNCTION (Tables 15 and 16)."""

    TIME_OF_DAY = " "
    GENERAL_INFORMATION = '"'
    MEMORY_CONFIGURATION = "$"
    DAY_OF_WEEK = "&"
    TIME_FORMAT = "'"
    SOFT_RESET = ","
    DATE = ";"


class Position(StrEnum):
    """Display position, the byte after ESC in a TEXT file; irrelevant on one-line signs but required."""

    MIDDLE = " "
    TOP = '"'
    BOTTOM = "&"
    FILL = "0"


class Mode(StrEnum):
    """Standard display modes (Appendix I)."""

    ROTATE = "a"
    HOLD = "b"
    FLASH = "c"
    ROLL_UP = "e"
    ROLL_DOWN = "f"
    ROLL_LEFT = "g"
    ROLL_RIGHT = "h"
    WIPE_UP = "i"
    WIPE_DOWN = "j"
    WIPE_LEFT = "k"
    WIPE_RIGHT = "l"
    SCROLL = "m"
    AUTOMODE = "o"
    COMPRESSED_ROTATE = "t"


class Colour(StrEnum):
    """Colour digits: after SELECT_COLOUR in text, and as the pixels of a DOTS picture ("0" is off)."""

    OFF = "0"
    RED = "1"
    GREEN = "2"
    AMBER = "3"


class FileKind(StrEnum):
    """The T field of a memory configuration entry."""

    TEXT = "A"
    STRING = "B"
    DOTS = "D"


# The QQQQ field: a TEXT file's start and stop times ("FF" start = always, stop then ignored), a STRING's
# place holders, a DOTS picture's colour status (tri-colour: off, red, green, amber).
TEXT_ALWAYS: Final = "FF00"
STRING_PLACE_HOLDER: Final = "0000"
DOTS_TRI_COLOUR: Final = "2000"


class StatusFlag(StrEnum):
    """Bits of the Serial Error Status Register that follows an ACK or NAK (§4.6)."""

    ILLEGAL_COMMAND_OR_LABEL = "illegal command or file label"
    CHECKSUM = "checksum error"
    BUFFER_OVERFLOW = "buffer overflow"
    SERIAL_TIMEOUT = "serial timeout"
    FRAMING = "bit framing error"
    PARITY = "parity error"


STATUS_BITS: Final[dict[StatusFlag, int]] = {
    StatusFlag.ILLEGAL_COMMAND_OR_LABEL: 0x20,
    StatusFlag.CHECKSUM: 0x10,
    StatusFlag.BUFFER_OVERFLOW: 0x08,
    StatusFlag.SERIAL_TIMEOUT: 0x04,
    StatusFlag.FRAMING: 0x02,
    StatusFlag.PARITY: 0x01,
}


def status_flags(status: int) -> tuple[StatusFlag, ...]:
    """What a status register byte reports, most serious first."""
    return tuple(flag for flag, bit in STATUS_BITS.items() if status & bit)


# Fields


def checksum(block: bytes) -> bytes:
    """The four ASCII hex digits of the 16-bit sum of `block` (STX through ETX inclusive)."""
    return f"{sum(block) % CHECKSUM_MODULUS:0{CHECKSUM_DIGITS}X}".encode("ascii")


def check_address(address: str, *, field: str = "sign address") -> str:
    """Two hex digits (`00` = every sign), or `?` for a nibble that matches any."""
    if len(address) != 2 or any(char not in "0123456789ABCDEFabcdef?" for char in address):  # noqa: PLR2004
        raise ValueError(f"{field} {address!r} is not two hex digits (00 = broadcast, ? = any nibble)")
    return address.upper()


def check_type_code(type_code: str) -> str:
    if len(type_code) != 1 or not _PRINTABLE_LOW < ord(type_code) <= _PRINTABLE_HIGH:
        raise ValueError(f"type code {type_code!r} is not one printable ASCII character")
    return type_code


def check_label(label: str, *, field: str = "file label") -> str:
    """A file label: one printable ASCII character, `?` excepted (it is the wildcard)."""
    if len(label) != 1 or not _PRINTABLE_LOW <= ord(label) <= _PRINTABLE_HIGH or label == WILDCARD:
        raise ValueError(f"{field} {label!r} is not one printable ASCII character other than '?'")
    return label


def is_sign_text(text: str) -> bool:
    """True when the sign's own character set shows `text` as it is: printable ASCII only.

    The protocol's extended set (80H–C1H) has some Western accents but none of Vietnamese's (ơ, ư, ạ,
    ả, ẫ…), so anything beyond ASCII goes as a picture rather than half in glyphs, half in pixels.
    """
    return all(_PRINTABLE_LOW <= ord(char) <= _PRINTABLE_HIGH for char in text)


def sign_text(text: str, *, field: str = "text") -> bytes:
    """`text` in the sign's character set; `ValueError` naming `field` when it needs a picture."""
    if not is_sign_text(text):
        bad = next(char for char in text if not _PRINTABLE_LOW <= ord(char) <= _PRINTABLE_HIGH)
        raise ValueError(f"{field}: {bad!r} is outside the sign's character set (printable ASCII)")
    return text.encode("ascii")


def _decimal(value: int, digits: int, field: str, low: int, high: int) -> bytes:
    if not low <= value <= high:
        raise ValueError(f"{field} {value} outside {low}..{high}")
    return f"{value:0{digits}d}".encode("ascii")


def _hex(value: int, digits: int, field: str) -> bytes:
    if not 0 <= value < 16**digits:
        raise ValueError(f"{field} {value} does not fit in {digits} hex digits")
    return f"{value:0{digits}X}".encode("ascii")


# Commands (the bytes between STX and ETX)


def write_text(
    label: str, message: bytes, *, position: Position = Position.MIDDLE, mode: Mode | None = Mode.HOLD
) -> bytes:
    """Write TEXT file: `A`, the label, ESC, position, mode, then the message (already sign bytes).

    `mode=None` leaves out ESC, position and mode (the spec's own examples do); the sign then uses
    its defaults. The priority file's 125 bytes count everything after the label.
    """
    header = b"" if mode is None else bytes([ESC]) + position.encode("ascii") + mode.encode("ascii")
    data = header + message
    if check_label(label) == PRIORITY_LABEL and len(data) > PRIORITY_CAPACITY:
        raise ValueError(f"priority text: {len(data)} bytes, the priority file holds {PRIORITY_CAPACITY}")
    if any(byte in (NUL, SOH, STX, ETX, EOT) for byte in message):
        raise ValueError("message: framing bytes (00H–04H) cannot appear inside a TEXT file")
    return CommandCode.WRITE_TEXT.encode("ascii") + label.encode("ascii") + data


def release_priority() -> bytes:
    """Write the priority TEXT file with no data at all: the sign goes back to its programme.

    Bare on purpose: the formatted-but-empty form (ESC, position, mode, no text) is a blank priority
    message that holds the display on nothing.
    """
    return CommandCode.WRITE_TEXT.encode("ascii") + PRIORITY_LABEL.encode("ascii")


def coloured(message: bytes, colour: Colour | None) -> bytes:
    """`message` preceded by a colour selection (none: the sign's default colour)."""
    if colour is None or colour is Colour.OFF:
        return message
    return bytes([SELECT_COLOUR]) + colour.encode("ascii") + message


def picture_calls(labels: Iterable[str]) -> bytes:
    """The TEXT file bytes that show the SMALL DOTS PICTUREs `labels` one after another."""
    return b"".join(bytes([CALL_PICTURE]) + check_label(label).encode("ascii") for label in labels)


def read_text(label: str) -> bytes:
    return CommandCode.READ_TEXT.encode("ascii") + check_label(label).encode("ascii")


def set_time_of_day(hour: int, minute: int) -> bytes:
    """E, space, HhMm in 24-hour decimal digits."""
    return (
        CommandCode.WRITE_SPECIAL.encode("ascii")
        + SpecialLabel.TIME_OF_DAY.encode("ascii")
        + _decimal(hour, 2, "hour", 0, _HOURS - 1)
        + _decimal(minute, 2, "minute", 0, _MINUTES - 1)
    )


def set_date(day: date) -> bytes:
    """E;mmddyy; the year is two digits (00–96 read as 2000–2096 by Alpha 2.0 signs)."""
    if not 2000 <= day.year <= 2000 + _YEAR_WINDOW_PIVOT:  # noqa: PLR2004
        raise ValueError(f"date {day.isoformat()}: the sign's two-digit year covers 2000..2096")
    return (
        CommandCode.WRITE_SPECIAL.encode("ascii")
        + SpecialLabel.DATE.encode("ascii")
        + f"{day.month:02d}{day.day:02d}{day.year % 100:02d}".encode("ascii")
    )


def set_day_of_week(day: date) -> bytes:
    """E& and a digit, "1" = Sunday … "7" = Saturday."""
    digit = day.isoweekday() % _DAYS_IN_WEEK + 1
    return (
        CommandCode.WRITE_SPECIAL.encode("ascii")
        + SpecialLabel.DAY_OF_WEEK.encode("ascii")
        + str(digit).encode()
    )


def clear_memory() -> bytes:
    """E$ with nothing after it: erases every file and the memory configuration."""
    return CommandCode.WRITE_SPECIAL.encode("ascii") + SpecialLabel.MEMORY_CONFIGURATION.encode("ascii")


@dataclass(frozen=True, slots=True)
class FileAllocation:
    """One entry of a memory configuration: a TEXT or STRING file of `size` bytes, or a DOTS picture
    of `height` × `width`."""

    label: str
    kind: FileKind
    size: int = 0
    height: int = 0
    width: int = 0
    locked: bool = False

    def __post_init__(self) -> None:
        check_label(self.label, field="allocation label")
        if self.label == PRIORITY_LABEL:
            raise ValueError("allocation label '0': the priority file always exists and is not configured")
        if self.kind is FileKind.DOTS:
            for name, side in (("height", self.height), ("width", self.width)):
                if not 1 <= side <= MAX_PICTURE_SIDE:
                    raise ValueError(f"allocation {self.label!r}: picture {name} {side} outside 1..255")
        elif not 1 <= self.size <= CHECKSUM_MODULUS - 1:
            raise ValueError(f"allocation {self.label!r}: size {self.size} outside 1..65535")

    def entry(self) -> bytes:
        """FTPSIZEQQQQ, eleven ASCII characters."""
        protection = b"L" if self.locked or self.kind is FileKind.STRING else b"U"
        if self.kind is FileKind.DOTS:
            size = _hex(self.height, 2, "height") + _hex(self.width, 2, "width")
            qualifier = DOTS_TRI_COLOUR
        else:
            size = _hex(self.size, 4, "size")
            qualifier = TEXT_ALWAYS if self.kind is FileKind.TEXT else STRING_PLACE_HOLDER
        return (
            self.label.encode("ascii")
            + self.kind.encode("ascii")
            + protection
            + size
            + qualifier.encode("ascii")
        )


def configure_memory(allocations: Sequence[FileAllocation]) -> bytes:
    """E$ followed by one entry per file. It replaces the whole table and erases every file."""
    if not allocations:
        raise ValueError("allocations: empty; use clear_memory() to erase the sign on purpose")
    labels = [allocation.label for allocation in allocations]
    if len(set(labels)) != len(labels):
        raise ValueError(f"allocations: a label appears twice in {''.join(labels)!r}")
    return clear_memory() + b"".join(allocation.entry() for allocation in allocations)


def read_special(label: SpecialLabel) -> bytes:
    return CommandCode.READ_SPECIAL.encode("ascii") + label.encode("ascii")


def write_string(label: str, text: bytes) -> bytes:
    return CommandCode.WRITE_STRING.encode("ascii") + check_label(label).encode("ascii") + text


def write_small_dots(label: str, picture: DotsPicture) -> bytes:
    """I, the label, height and width as two hex digits each, then each row's colour digits and CR."""
    return (
        CommandCode.WRITE_SMALL_DOTS.encode("ascii")
        + check_label(label).encode("ascii")
        + _hex(picture.height, 2, "picture height")
        + _hex(picture.width, 2, "picture width")
        + picture.data()
    )


def read_small_dots(label: str) -> bytes:
    return CommandCode.READ_SMALL_DOTS.encode("ascii") + check_label(label).encode("ascii")


# Packets


def encode_packet(
    address: str,
    *commands: bytes,
    type_code: str = TYPE_ALL_SIGNS,
    sync_nuls: int = SYNC_NULS,
    with_checksum: bool = True,
) -> bytes:
    """A whole transmission packet with one command, or several nested (each with its own checksum)."""
    if not commands:
        raise ValueError("commands: a packet carries at least one command")
    if sync_nuls < SYNC_NULS:
        raise ValueError(f"sync_nuls {sync_nuls}: a sign needs at least {SYNC_NULS} NULs to lock on")
    header = bytes([NUL] * sync_nuls + [SOH]) + check_type_code(type_code).encode("ascii")
    packet = bytearray(header + check_address(address).encode("ascii"))
    for command in commands:
        if not command:
            raise ValueError("commands: an empty command")
        block = bytes([STX]) + command
        if not with_checksum:
            packet += block
            continue
        block += bytes([ETX])
        packet += block + checksum(block)
    packet.append(EOT)
    return bytes(packet)


# What a sign answers


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """ACK and the status register: the sign took the packet."""

    status: int


@dataclass(frozen=True, slots=True)
class Refused:
    """NAK and the status register: the sign heard the packet and rejected it."""

    status: int

    @property
    def flags(self) -> tuple[StatusFlag, ...]:
        return status_flags(self.status)


@dataclass(frozen=True, slots=True)
class ResponsePacket:
    """A read's answer: `command` is the *write* code the sign echoes (A for a TEXT read, E for a
    SPECIAL FUNCTION read, I for a picture read) and `body` everything after it."""

    type_code: str
    address: str
    command: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Garbage:
    """Bytes that are no reply: line noise, a cut-off packet, a bad checksum."""

    data: bytes
    reason: str


Reply = Acknowledged | Refused | ResponsePacket
Decoded = Reply | Garbage


class ReplyDecoder:
    """Turns the bytes a sign sends into replies, one byte at a time, whatever the chunks.

    NULs between replies are sync and ignored. An ACK or NAK counts only with a status byte in
    40H–7FH after it, so that a stray 06H in noise is not taken for a confirmation. A packet runs
    from SOH to EOT; a second SOH inside one restarts it (the first is reported as cut off).
    """

    def __init__(self) -> None:
        self._noise = bytearray()
        self._packet = bytearray()
        self._handshake: int | None = None
        self._in_packet = False

    @property
    def pending(self) -> bool:
        """True while a reply has begun but not ended."""
        return self._in_packet or self._handshake is not None

    def feed(self, data: bytes) -> list[Decoded]:
        out: list[Decoded] = []
        for byte in data:
            self._take(byte, out)
        self._flush_noise(out)
        return out

    def reset(self) -> list[Decoded]:
        """Abandon a reply in progress (the sign fell silent in the middle); it comes back as garbage."""
        out: list[Decoded] = []
        if self._handshake is not None:
            self._noise.append(self._handshake)
            self._handshake = None
        self._flush_noise(out)
        if self._in_packet:
            out.append(Garbage(bytes(self._packet), "packet cut off before EOT"))
            self._packet.clear()
            self._in_packet = False
        return out

    def _take(self, byte: int, out: list[Decoded]) -> None:
        if self._handshake is not None:
            kind, self._handshake = self._handshake, None
            if STATUS_BASE <= byte <= STATUS_MAX:
                self._flush_noise(out)
                out.append(Acknowledged(byte) if kind == ACK else Refused(byte))
                return
            self._noise.append(kind)  # not a handshake after all; look at this byte afresh
        if self._in_packet:
            self._take_packet_byte(byte, out)
        elif byte == SOH:
            self._flush_noise(out)
            self._in_packet = True
            self._packet[:] = bytes([SOH])
        elif byte in (ACK, NAK):
            self._handshake = byte
        elif byte != NUL:
            self._noise.append(byte)

    def _take_packet_byte(self, byte: int, out: list[Decoded]) -> None:
        if byte == SOH:
            out.append(Garbage(bytes(self._packet), "packet cut off by a new SOH"))
            self._packet[:] = bytes([SOH])
            return
        self._packet.append(byte)
        if byte == EOT:
            out.append(_parse_response(bytes(self._packet)))
            self._packet.clear()
            self._in_packet = False
        elif len(self._packet) > MAX_REPLY_PACKET:
            out.append(Garbage(bytes(self._packet), f"packet longer than {MAX_REPLY_PACKET} bytes"))
            self._packet.clear()
            self._in_packet = False

    def _flush_noise(self, out: list[Decoded]) -> None:
        if self._noise:
            out.append(Garbage(bytes(self._noise), "bytes outside any reply"))
            self._noise.clear()


_RESPONSE = re.compile(
    rb"\x01(?P<type>[\x21-\x7e])(?P<address>[0-9A-Fa-f]{2})\x02(?P<command>[\x21-\x7e])"
    rb"(?P<body>[^\x00-\x04]*)(?:\x03(?P<checksum>[0-9A-F]{4}))?\x04",
    re.DOTALL,
)


def _parse_response(packet: bytes) -> ResponsePacket | Garbage:
    match = _RESPONSE.fullmatch(packet)
    if match is None:
        return Garbage(packet, "not a response packet (SOH type address STX command data [ETX sum] EOT)")
    if match["checksum"] is not None:
        block = packet[match.start("command") - 1 : match.end("body")] + bytes([ETX])
        if checksum(block) != match["checksum"]:
            return Garbage(packet, f"checksum {match['checksum'].decode()} ≠ {checksum(block).decode()}")
    return ResponsePacket(
        type_code=match["type"].decode("ascii"),
        address=match["address"].decode("ascii").upper(),
        command=match["command"].decode("ascii"),
        body=match["body"],
    )


class ReplyError(ValueError):
    """A response packet that does not answer the question asked, or says something impossible."""


def _expect(packet: ResponsePacket, command: CommandCode, label: str) -> bytes:
    if packet.command != command or not packet.body.startswith(label.encode("ascii")):
        asked = f"{command}{label}"
        got = f"{packet.command}{packet.body[:1].decode('ascii', 'replace')}"
        raise ReplyError(f"the sign answered about {got!r}, not {asked!r}")
    return packet.body[len(label) :]


def parse_text_file(packet: ResponsePacket, label: str) -> bytes:
    """The data of TEXT file `label` as stored (ESC, position, mode, message), from a B read."""
    return _expect(packet, CommandCode.WRITE_TEXT, check_label(label))


def _digits(value: bytes, field: str) -> int:
    if not value.isdigit():
        raise ReplyError(f"{field}: {value!r} is not decimal digits")
    return int(value)


def parse_time_of_day(packet: ResponsePacket) -> time:
    data = _expect(packet, CommandCode.WRITE_SPECIAL, SpecialLabel.TIME_OF_DAY)
    if len(data) != 4:  # noqa: PLR2004 - HhMm
        raise ReplyError(f"time of day: {data!r} is not HhMm")
    hour, minute = _digits(data[:2], "hour"), _digits(data[2:], "minute")
    if hour >= _HOURS or minute >= _MINUTES:
        raise ReplyError(f"time of day: the sign reported {hour:02d}:{minute:02d}")
    return time(hour, minute)


def parse_date(packet: ResponsePacket) -> date:
    data = _expect(packet, CommandCode.WRITE_SPECIAL, SpecialLabel.DATE)
    if len(data) != 6:  # noqa: PLR2004 - mmddyy
        raise ReplyError(f"date: {data!r} is not mmddyy")
    month, day, year = _digits(data[:2], "month"), _digits(data[2:4], "day"), _digits(data[4:], "year")
    # Alpha 2.0 windowing: 00–96 are 2000–2096, 97–99 are 1997–1999.
    full_year = 2000 + year if year <= _YEAR_WINDOW_PIVOT else 1900 + year
    try:
        return date(full_year, month, day)
    except ValueError as error:
        raise ReplyError(f"date: the sign reported {data.decode('ascii')} ({error})") from error


@dataclass(frozen=True, slots=True)
class GeneralInformation:
    """The F" answer: firmware, clock, time format, speaker and memory pool."""

    firmware_version: str
    firmware_revision: str
    firmware_released: str
    clock: time
    time_format: Literal["12 hour", "24 hour"]
    speaker_enabled: bool
    memory_total: int
    memory_free: int
    raw: str


def parse_general_information(packet: ResponsePacket) -> GeneralInformation:
    """FFFFFFFF f MmYy HhNn R SS PPPP,pppp — 28 or 29 characters, the revision letter being optional.

    Read from both ends so that a missing revision letter shifts nothing into a plausible wrong value.
    """
    data = _expect(packet, CommandCode.WRITE_SPECIAL, SpecialLabel.GENERAL_INFORMATION)
    text = data.decode("ascii", "replace")
    if len(text) not in _GENERAL_INFORMATION_LENGTHS:
        raise ReplyError(f"general information: {len(text)} characters, expected 28 or 29")
    head, comma, free = text.rpartition(",")
    if not comma or len(free) != 4:  # noqa: PLR2004
        raise ReplyError("general information: no memory pool ',pppp' at the end")
    total, speaker, time_format = head[-4:], head[-6:-4], head[-7]
    hour, minute = head[-11:-9], head[-9:-7]
    released, version, revision = head[-15:-11], head[:8], head[8:-15]
    try:
        memory_total, memory_free = int(total, 16), int(free, 16)
    except ValueError:
        raise ReplyError(f"general information: memory pool {total},{free} is not hex") from None
    if time_format not in "SM" or speaker not in ("00", "FF"):
        raise ReplyError(f"general information: unknown time format {time_format!r} or speaker {speaker!r}")
    hours, minutes = _digits(hour.encode(), "hour"), _digits(minute.encode(), "minute")
    if hours >= _HOURS or minutes >= _MINUTES:
        raise ReplyError(f"general information: the sign reported a time {hour}:{minute}")
    return GeneralInformation(
        firmware_version=version,
        firmware_revision=revision,
        firmware_released=f"{released[:2]}/{released[2:]}",
        clock=time(hours, minutes),
        time_format="24 hour" if time_format == "M" else "12 hour",
        speaker_enabled=speaker == "00",
        memory_total=memory_total,
        memory_free=memory_free,
        raw=text,
    )


def parse_small_dots(packet: ResponsePacket, label: str) -> DotsPicture:
    data = _expect(packet, CommandCode.WRITE_SMALL_DOTS, check_label(label))
    return DotsPicture.from_data(data[4:], height=int(data[:2], 16), width=int(data[2:4], 16))


# Pictures

FONT_DIRECTORY: Final = Path(__file__).with_name("fonts")
BUNDLED_FONT: Final = FONT_DIRECTORY / "DejaVuSans.ttf"
# A dot is lit where the anti-aliased glyph covers at least half of it.
LIT_THRESHOLD: Final = 128
# The tallest Vietnamese stacks (a capital with a breve or circumflex and a tone mark) and the deepest
# descenders (a dot below, g, y): the font size is the largest at which these fit the sign's rows.
_SIZING_PROBE: Final = "ẶỄỖỬÁgjpqyịỵ"
_COLOUR_DIGITS: Final = frozenset("012345678")


@dataclass(frozen=True, slots=True)
class DotsPicture:
    """A SMALL DOTS PICTURE: rows of colour digits ("0" off, "1" red, "2" green, "3" amber …)."""

    rows: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.rows) <= MAX_PICTURE_SIDE:
            raise ValueError(f"picture height {len(self.rows)} outside 1..{MAX_PICTURE_SIDE}")
        width = len(self.rows[0])
        if not 1 <= width <= MAX_PICTURE_SIDE:
            raise ValueError(f"picture width {width} outside 1..{MAX_PICTURE_SIDE}")
        for number, row in enumerate(self.rows):
            if len(row) != width or not set(row) <= _COLOUR_DIGITS:
                raise ValueError(f"picture row {number}: {width} colour digits 0–8 expected")

    @property
    def height(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return len(self.rows[0])

    @property
    def lit_dots(self) -> int:
        return sum(len(row) - row.count(Colour.OFF) for row in self.rows)

    def data(self) -> bytes:
        """Each row's digits followed by CR, as the picture travels in its command."""
        return b"".join(row.encode("ascii") + bytes([CR]) for row in self.rows)

    @classmethod
    def from_data(cls, data: bytes, *, height: int, width: int) -> DotsPicture:
        rows = data.split(bytes([CR]))
        if rows and not rows[-1]:
            rows.pop()
        if len(rows) != height or any(len(row) != width for row in rows):
            raise ReplyError(f"picture data is not {height} rows of {width} digits")
        return cls(tuple(row.decode("ascii") for row in rows))


@functools.lru_cache(maxsize=32)
def _font_for_height(font_path: Path, height: int) -> tuple[ImageFont.FreeTypeFont, int]:
    """The largest font whose tallest stacks and deepest descenders fit `height` rows, and where its
    baseline falls. Basic layout, so that a picture is the same on every machine."""
    for size in range(height * 2, 3, -1):
        font = ImageFont.truetype(str(font_path), size, layout_engine=ImageFont.Layout.BASIC)
        _, top, _, bottom = font.getbbox(_SIZING_PROBE, anchor="ls")
        if bottom - top <= height:
            return font, -int(top)
    raise ValueError(f"picture height {height}: too few rows for any legible text")


def render_picture(
    text: str, *, height: int, colour: Colour = Colour.RED, font_path: Path = BUNDLED_FONT
) -> DotsPicture:
    """`text` (NFC-normalised) drawn with the bundled font into `height` rows, one dot per pixel."""
    if colour is Colour.OFF:
        raise ValueError("colour: a picture drawn in 'off' shows nothing")
    text = unicodedata.normalize("NFC", text)
    if not text.strip():
        raise ValueError("text: nothing to draw")
    font, baseline = _font_for_height(font_path, height)
    left, _, right, _ = font.getbbox(text, anchor="ls")
    width = max(1, int(right) - min(0, int(left)))
    if width > MAX_PICTURE_SIDE:
        raise ValueError(f"text: {width} dots wide, a SMALL DOTS PICTURE holds {MAX_PICTURE_SIDE}")
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((-min(0, int(left)), baseline), text, font=font, fill=255, anchor="ls")
    pixels = canvas.load()
    if pixels is None:  # pragma: no cover - Pillow always loads a fresh image
        raise RuntimeError("Pillow returned no pixel access")
    rows = tuple(
        "".join(colour if _level(pixels[x, y]) >= LIT_THRESHOLD else Colour.OFF for x in range(width))
        for y in range(height)
    )
    return DotsPicture(rows)


def _level(pixel: float | tuple[int, ...]) -> float:
    return pixel if isinstance(pixel, float | int) else pixel[0]


def render_pages(
    text: str,
    *,
    height: int,
    page_width: int,
    max_pages: int,
    colour: Colour = Colour.RED,
    font_path: Path = BUNDLED_FONT,
) -> tuple[DotsPicture, ...]:
    """`text` as consecutive pictures of at most `page_width` dots, cut between words (inside a word
    only when it is wider than a page); each page after the first starts with the space it was cut at.
    `ValueError` when the text needs more than `max_pages`."""
    if not 1 <= page_width <= MAX_PICTURE_SIDE:
        raise ValueError(f"page_width {page_width} outside 1..{MAX_PICTURE_SIDE}")
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if not text:
        raise ValueError("text: nothing to draw")
    font, _ = _font_for_height(font_path, height)

    def fits(candidate: str) -> bool:
        left, _, right, _ = font.getbbox(candidate, anchor="ls")
        return int(right) - min(0, int(left)) <= page_width

    pages: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else (f" {word}" if pages else word)
        if fits(candidate):
            current = candidate
            continue
        if current:
            pages.append(current)
            current = f" {word}"
            if fits(current):
                continue
        current = _cut_word(current, fits, pages)
    pages.append(current)
    if len(pages) > max_pages:
        raise ValueError(
            f"text: needs {len(pages)} pictures of {page_width} dots, the sign keeps {max_pages}"
        )
    return tuple(render_picture(page, height=height, colour=colour, font_path=font_path) for page in pages)


def _cut_word(word: str, fits: Callable[[str], bool], pages: list[str]) -> str:
    """Cuts a word wider than a page into page-wide pieces; the last piece is returned to go on."""
    piece = ""
    for char in word:
        if piece and not fits(piece + char):
            pages.append(piece)
            piece = ""
        piece += char
    return piece
