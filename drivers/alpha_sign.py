"""Serial LED signs on the Alpha Sign Communications Protocol (docs/protocol.md §4): one driver per link.

A link is a serial line (a device path such as a pty, or `socket://host:port` for a serial-to-Ethernet
converter) opened with pyserial-asyncio-fast; on an RS-485 pair it reaches several signs, each by its
two-hex-digit address. One packet is on the wire at a time.

What the driver promises (docs/protocol.md §4.7):

- `send()` takes the LED screen documents of docs/protocol.md §1.11 (`show`, `stop`) and puts the text
  in the sign's **priority TEXT file** (label "0"), releasing it when `display_s` has passed or on a
  stop. It never writes a programme file: programmes stay in the sign and come back by themselves
  when the priority file is released.
- Text the sign's character set cannot show (Vietnamese) is rendered with the bundled font and sent as
  SMALL DOTS PICTUREs in reserved labels, which the priority file then calls.
- NAK or silence is retried (`retries` times, backing off) before a typed error: `SignRefused` (a
  `ProtocolError`) after NAKs, `DeviceTimeout` after silence, `DeviceUnreachable` when the port itself
  fails. These are the protocol's own link-level retries; whether to send the command again later is
  still the dispatcher's decision (DESIGN.md §3).
- `events()` yields `DeviceState` when a sign answers again or falls silent, `CommandReport`s for the
  show/stop documents (delivered, playing, completed, stopped, interrupted, expired), and a
  `MalformedPayload` for every run of garbage on the line, which is counted and never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time as time_module
import unicodedata
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar
from zoneinfo import ZoneInfo

import serial
import serial_asyncio_fast

from drivers import alpha_codec as codec
from drivers.base import (
    Ack,
    CommandReport,
    DeviceCommand,
    DeviceState,
    DeviceTimeout,
    DeviceUnreachable,
    Driver,
    DriverError,
    InboundEvent,
    MalformedPayload,
    ProtocolError,
)

log = logging.getLogger(__name__)

_R = TypeVar("_R", codec.Acknowledged, codec.ResponsePacket)
_T = TypeVar("_T")

DEFAULT_BAUD: Final = 9600
# The protocol's serial format; a pty only takes 8N1 (the simulator and its tests pass framing="8N1").
DEFAULT_FRAMING: Final = "7E1"
DEFAULT_RETRIES: Final = 2
DEFAULT_REPLY_TIMEOUT_S: Final = 0.5
DEFAULT_BACKOFF_S: Final = 0.05
# A pause after a SMALL DOTS PICTURE's width digits, which some signs need before the rows (§4.4).
DEFAULT_PICTURE_PAUSE_S: Final = 0.1
DEFAULT_ROWS: Final = 16
DEFAULT_PICTURE_WIDTH: Final = 240
DEFAULT_PICTURE_LABELS: Final = "6789"
DEFAULT_TIMEZONE: Final = "Asia/Ho_Chi_Minh"
# How long a display's end may take to reach the sign before it is tried again (a timer has no caller).
RELEASE_TIMEOUT_S: Final = 5.0
MAX_RELEASE_BACKOFF_S: Final = 30.0
# A duplicate `show`/`stop` id is answered from memory (docs/protocol.md §1.4.2).
REMEMBERED_COMMANDS: Final = 1000
DRILL_LABEL: Final = "DIỄN TẬP: "
MAX_HEADLINE: Final = 200
MAX_BODY: Final = 2000
MAX_DISPLAY_S: Final = 86_400.0
_ELLIPSIS_PICTURE: Final = "…"
_ELLIPSIS_TEXT: Final = "..."
_BITS_PER_CHARACTER: Final = 10  # start, 7 data, parity, stop (or start, 8 data, stop)
_COLOURS: Final = {"red": codec.Colour.RED, "amber": codec.Colour.AMBER, "green": codec.Colour.GREEN}
# An Alpha sign has no white; amber is the nearest it shows.
_WHITE_AS: Final = codec.Colour.AMBER
_EMERGENCY_CLASS: Final = "emergency"
_PARITIES: Final = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SignRefused(ProtocolError):  # noqa: N818  # the sign refused; "Error" adds nothing
    """The sign answered NAK to every attempt: it hears us and will not take the packet."""

    def __init__(self, device: str, what: str, status: int) -> None:
        self.device = device
        self.status = status
        self.flags = codec.status_flags(status)
        reasons = ", ".join(self.flags) or "no reason given"
        super().__init__(f"{device}: the sign refused {what} (NAK, status 0x{status:02X}: {reasons})")


@dataclass(frozen=True, slots=True)
class SignProfile:
    """One sign on the link: its RS-485 address, its rows, and the picture labels reserved for alerts."""

    sign_address: str
    rows: int = DEFAULT_ROWS
    picture_width: int = DEFAULT_PICTURE_WIDTH
    picture_labels: str = DEFAULT_PICTURE_LABELS
    type_code: str = codec.TYPE_ALL_SIGNS

    def __post_init__(self) -> None:
        codec.check_address(self.sign_address, field="sign_address")
        if self.sign_address == codec.BROADCAST_ADDRESS or "?" in self.sign_address:
            raise ValueError(f"sign_address {self.sign_address!r}: a sign needs its own address")
        codec.check_type_code(self.type_code)
        if not 1 <= self.rows <= codec.MAX_PICTURE_SIDE:
            raise ValueError(f"rows {self.rows} outside 1..{codec.MAX_PICTURE_SIDE}")
        if not 1 <= self.picture_width <= codec.MAX_PICTURE_SIDE:
            raise ValueError(f"picture_width {self.picture_width} outside 1..{codec.MAX_PICTURE_SIDE}")
        if not self.picture_labels or len(set(self.picture_labels)) != len(self.picture_labels):
            raise ValueError(f"picture_labels {self.picture_labels!r}: distinct labels, at least one")
        for label in self.picture_labels:
            codec.check_label(label, field="picture_labels")
            if label in (codec.PRIORITY_LABEL, codec.DEFAULT_TEXT_LABEL):
                raise ValueError(f"picture_labels: {label!r} is the priority or the default text file")


@dataclass(frozen=True, slots=True)
class AlertLayout:
    """How an alert went up: as sign text, or as `pages` pictures; `shown` is the text on the sign."""

    kind: Literal["text", "picture"]
    shown: str
    pages: int = 0


@dataclass(slots=True)
class LinkCounters:
    exchanges: int = 0
    retries: int = 0
    naks: int = 0
    silences: int = 0
    garbage_bytes: int = 0
    garbage_runs: int = 0
    unexpected_replies: int = 0


@dataclass(frozen=True, slots=True)
class _ShowRequest:
    correlation_id: str
    headline: str
    body: str | None
    display_s: float
    colour: codec.Colour
    blink: bool


@dataclass(slots=True)
class _Showing:
    command_id: str
    correlation_id: str
    headline: str
    display_s: float
    started: float
    timer: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Sign:
    device: str
    profile: SignProfile
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    online: bool | None = None
    showing: _Showing | None = None
    reports: OrderedDict[str, CommandReport] = field(default_factory=OrderedDict)
    failures: int = 0


class _LinkLost:
    """Put in the reply queue when the port closes under a waiting request."""


class AlphaSignDriver:
    """Implements `Driver` for the Alpha signs on one serial link; an async context manager.

    `signs` maps each device address (as in `DeviceCommand.address`) to its sign: a `SignProfile`, or
    just the two-hex-digit RS-485 address. Every operation takes `timeout`, the seconds the whole
    operation may take: waiting for the link, every packet it needs, retries and backoff included.
    """

    def __init__(
        self,
        port: str,
        signs: Mapping[str, SignProfile | str],
        *,
        baud: int = DEFAULT_BAUD,
        framing: str = DEFAULT_FRAMING,
        retries: int = DEFAULT_RETRIES,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        backoff_s: float = DEFAULT_BACKOFF_S,
        picture_pause_s: float = DEFAULT_PICTURE_PAUSE_S,
        poll_interval_s: float | None = None,
        connect_timeout_s: float = 3.0,
        timezone: tzinfo | None = None,
        clock: Callable[[], datetime] = _utc_now,
        name: str | None = None,
    ) -> None:
        if not signs:
            raise ValueError("signs: at least one sign on the link")
        if baud <= 0:
            raise ValueError(f"baud {baud} is not positive")
        self._serial_options = _framing(framing) | {"baudrate": baud}
        if retries < 0:
            raise ValueError(f"retries {retries} is negative")
        for option, value in (("reply_timeout_s", reply_timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if not value > 0:
                raise ValueError(f"{option} {value} must be greater than 0")
        if backoff_s < 0 or picture_pause_s < 0:
            raise ValueError("backoff_s and picture_pause_s must not be negative")
        if poll_interval_s is not None and not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s {poll_interval_s} must be greater than 0")
        self.port = port
        self.name = name or port
        self.baud = baud
        self.retries = retries
        self.reply_timeout_s = reply_timeout_s
        self.backoff_s = backoff_s
        self.picture_pause_s = picture_pause_s
        self.poll_interval_s = poll_interval_s
        self.timezone = timezone or ZoneInfo(DEFAULT_TIMEZONE)
        self.counters = LinkCounters()
        self._connect_timeout_s = connect_timeout_s
        self._clock = clock
        self._signs: dict[str, _Sign] = {}
        addresses: set[str] = set()
        for device, sign in signs.items():
            profile = sign if isinstance(sign, SignProfile) else SignProfile(sign)
            if profile.sign_address in addresses:
                raise ValueError(f"signs: address {profile.sign_address} is given to two devices")
            addresses.add(profile.sign_address)
            self._signs[device] = _Sign(device, profile)
        self._link_lock = asyncio.Lock()
        self._replies: asyncio.Queue[codec.Reply | _LinkLost] = asyncio.Queue()
        self._events: asyncio.Queue[InboundEvent | None] = asyncio.Queue()
        self._decoder = codec.ReplyDecoder()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self._closed = False

    # -- the Driver protocol -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._closed = False
        if self.poll_interval_s is not None:
            self._polling = asyncio.get_running_loop().create_task(self._poll(self.poll_interval_s))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        tasks = [self._polling] if self._polling is not None else []
        tasks += [s.showing.timer for s in self._signs.values() if s.showing and s.showing.timer]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._disconnect()
        self._events.put_nowait(None)

    async def send(self, command: DeviceCommand, *, timeout: float) -> Ack:
        """Carries out a `show` or `stop` document (docs/protocol.md §1.11) on the addressed sign."""
        sign = self._sign(command.address)
        document = command.document
        if document.get("id") != command.command_id or document.get("device") != command.address:
            raise ProtocolError(
                f"command {command.command_id}: document `id`/`device` do not match the command"
            )
        if command.expires_at.tzinfo is None:
            raise ProtocolError(f"command {command.command_id}: expires_at must be timezone-aware")
        kind = document.get("type")
        try:
            correlation_id = _text_member(document, "correlation_id", 1, 200)
            request = _parse_show(document, correlation_id) if kind == "show" else None
            target = _text_member(document, "target", 1, 200) if kind == "stop" else None
        except (ValueError, TypeError) as error:
            raise ProtocolError(f"command {command.command_id}: {error}") from error
        async with sign.lock:
            remembered = sign.reports.get(command.command_id)
            if remembered is not None:
                # Seen before (the dispatcher retried after losing our answer): say where it stands.
                self._events.put_nowait(remembered)
                now = self._clock()
                return Ack(command.command_id, accepted_at=now, published_at=now)
            if request is not None:
                return await self._show(sign, command, request, timeout)
            if target is not None:
                return await self._stop(sign, command, correlation_id, target, timeout)
        raise ProtocolError(f"command {command.command_id}: type {kind!r} is neither 'show' nor 'stop'")

    async def events(self) -> AsyncIterator[InboundEvent]:
        """Reports, sign states and garbage on the line, until the driver closes."""
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # later iterators end too
                return
            yield event

    async def ping(self) -> bool:
        """True when the port is open (it is opened now if it was not)."""
        if self._closed:
            return False
        try:
            async with self._link_lock:
                await self._connected()
        except DriverError:
            return False
        return True

    # -- what a sign can be asked -----------------------------------------------------------------

    async def configure_memory(self, device: str, text_files: Mapping[str, int], *, timeout: float) -> None:
        """Writes the sign's memory table: the programme TEXT files (label → bytes) and the picture
        files reserved for alerts. **Erases every file on the sign**; done once when a sign is set up."""
        sign = self._sign(device)
        try:
            allocations = [
                codec.FileAllocation(label, codec.FileKind.TEXT, size=size)
                for label, size in text_files.items()
            ]
            for label in text_files:
                self._check_programme_label(sign, label)
            allocations += [
                codec.FileAllocation(
                    label, codec.FileKind.DOTS, height=sign.profile.rows, width=sign.profile.picture_width
                )
                for label in sign.profile.picture_labels
            ]
            command = codec.configure_memory(allocations)
        except ValueError as error:
            raise ProtocolError(f"{device}: {error}") from error
        await self._erase(sign, command, "the memory configuration", timeout)

    async def clear_memory(self, device: str, *, timeout: float) -> None:
        """E$: erases every file and the memory table (programmes included)."""
        await self._erase(self._sign(device), codec.clear_memory(), "clear memory", timeout)

    async def _erase(self, sign: _Sign, command: bytes, what: str, timeout: float) -> None:
        async with sign.lock:
            await self._write(sign, command, what, timeout)
            # The erase took the priority message with it: whatever was showing has ended.
            if sign.showing is not None:
                self._end_showing(sign, sign.showing, "interrupted")

    async def write_programme(
        self,
        device: str,
        label: str,
        text: str,
        *,
        timeout: float,
        mode: codec.Mode = codec.Mode.ROTATE,
        colour: codec.Colour | None = None,
    ) -> None:
        """Writes programme TEXT file `label` (configured by `configure_memory`, or "A")."""
        sign = self._sign(device)
        try:
            self._check_programme_label(sign, label)
            message = codec.coloured(codec.sign_text(unicodedata.normalize("NFC", text)), colour)
            command = codec.write_text(label, message, mode=mode)
        except ValueError as error:
            raise ProtocolError(f"{device}: programme {label!r}: {error}") from error
        await self._write(sign, command, f"programme file {label!r}", timeout)

    async def read_text(self, device: str, label: str, *, timeout: float) -> bytes:
        """The stored data of TEXT file `label` (ESC, position, mode, message) as the sign reads it back."""
        sign = self._sign(device)
        try:
            command = codec.read_text(label)
        except ValueError as error:
            raise ProtocolError(f"{device}: {error}") from error
        packet = await self._read(sign, command, f"text file {label!r}", timeout)
        return self._parsed(device, lambda: codec.parse_text_file(packet, label))

    async def show_alert(
        self,
        device: str,
        headline: str,
        body: str | None = None,
        *,
        timeout: float,
        colour: codec.Colour = codec.Colour.RED,
        blink: bool = False,
    ) -> AlertLayout:
        """Puts `headline` (and as much of `body` as fits) in the priority file; Vietnamese as pictures."""
        sign = self._sign(device)
        async with sign.lock:
            return await self._put_alert(sign, headline, body, colour, blink, timeout)

    async def clear_alert(self, device: str, *, timeout: float) -> None:
        """Releases the priority file: the sign goes back to its programme."""
        await self._write(self._sign(device), codec.release_priority(), "the priority release", timeout)

    async def set_time(self, device: str, when: datetime, *, timeout: float) -> None:
        """Sets the sign's clock (time of day, date, day of week) to `when` in the driver's time zone."""
        sign = self._sign(device)
        local = self._local(when)
        deadline = self._deadline(timeout)
        for command, what in (
            (codec.set_date(local.date()), "the date"),
            (codec.set_day_of_week(local.date()), "the day of week"),
            (codec.set_time_of_day(local.hour, local.minute), "the time of day"),
        ):
            await self._exchange(sign, command, what, deadline, expect=codec.Acknowledged)

    async def broadcast_time(self, when: datetime) -> None:
        """Sets every sign on the link at once (address 00). Nobody answers a broadcast."""
        local = self._local(when)
        frame = codec.encode_packet(
            codec.BROADCAST_ADDRESS,
            codec.set_date(local.date()),
            codec.set_day_of_week(local.date()),
            codec.set_time_of_day(local.hour, local.minute),
        )
        if self._closed:
            raise DeviceUnreachable(f"alpha {self.name}: the driver is closed")
        async with self._link_lock:
            await self._put_on_wire(frame, None)

    async def read_time(self, device: str, *, timeout: float) -> datetime:
        """The sign's date and time of day (to the minute), in the driver's time zone."""
        sign = self._sign(device)
        deadline = self._deadline(timeout)
        day_packet = await self._exchange(
            sign,
            codec.read_special(codec.SpecialLabel.DATE),
            "a date read",
            deadline,
            expect=codec.ResponsePacket,
        )
        time_packet = await self._exchange(
            sign,
            codec.read_special(codec.SpecialLabel.TIME_OF_DAY),
            "a time read",
            deadline,
            expect=codec.ResponsePacket,
        )
        day = self._parsed(device, lambda: codec.parse_date(day_packet))
        clock = self._parsed(device, lambda: codec.parse_time_of_day(time_packet))
        return datetime.combine(day, clock, tzinfo=self.timezone)

    async def read_status(self, device: str, *, timeout: float) -> codec.GeneralInformation:
        """The sign's general information: firmware, clock, time format, speaker, memory pool."""
        sign = self._sign(device)
        command = codec.read_special(codec.SpecialLabel.GENERAL_INFORMATION)
        packet = await self._read(sign, command, "a status read", timeout)
        return self._parsed(device, lambda: codec.parse_general_information(packet))

    def online(self, device: str) -> bool | None:
        """Whether the sign answered its last packet (None before the first)."""
        return self._sign(device).online

    # -- show / stop ------------------------------------------------------------------------------

    async def _show(self, sign: _Sign, command: DeviceCommand, request: _ShowRequest, timeout: float) -> Ack:
        if command.expires_at <= self._clock():
            self._report(
                sign, command.command_id, request.correlation_id, "expired", detail="arrived after expires_at"
            )
            now = self._clock()
            return Ack(command.command_id, accepted_at=now, published_at=now)
        published_at = self._clock()
        await self._put_alert(sign, request.headline, request.body, request.colour, request.blink, timeout)
        accepted_at = self._clock()
        previous = sign.showing
        if previous is not None:
            self._end_showing(sign, previous, "interrupted")
        showing = _Showing(
            command.command_id,
            request.correlation_id,
            request.headline,
            request.display_s,
            time_module.monotonic(),
        )
        sign.showing = showing
        self._report(sign, command.command_id, request.correlation_id, "delivered")
        self._report(sign, command.command_id, request.correlation_id, "playing")
        showing.timer = asyncio.get_running_loop().create_task(self._finish_after(sign, showing))
        return Ack(command.command_id, accepted_at=accepted_at, published_at=published_at)

    async def _stop(
        self, sign: _Sign, command: DeviceCommand, correlation_id: str, target: str, timeout: float
    ) -> Ack:
        published_at = self._clock()
        showing = sign.showing
        applies = showing is not None and target in ("*", showing.command_id)
        if applies or target == "*":
            await self._write(sign, codec.release_priority(), "the priority release", timeout)
        if showing is not None and applies:
            self._end_showing(sign, showing, "stopped")
        detail = None if applies or target == "*" else f"{target} is not on the sign"
        self._report(sign, command.command_id, correlation_id, "completed", detail=detail)
        return Ack(command.command_id, accepted_at=self._clock(), published_at=published_at)

    def _end_showing(self, sign: _Sign, showing: _Showing, state: str) -> None:
        if showing.timer is not None and showing.timer is not asyncio.current_task():
            showing.timer.cancel()
        if sign.showing is showing:
            sign.showing = None
        played = round(time_module.monotonic() - showing.started, 3)
        self._report(sign, showing.command_id, showing.correlation_id, state, played_s=played)

    async def _finish_after(self, sign: _Sign, showing: _Showing) -> None:
        """Takes the text down once its `display_s` has passed; tries again until the sign answers."""
        await asyncio.sleep(showing.display_s)  # the display's own length, not synchronisation
        attempt = 0
        while True:
            async with sign.lock:
                if sign.showing is not showing:
                    return
                try:
                    await self._write(
                        sign, codec.release_priority(), "the priority release", RELEASE_TIMEOUT_S
                    )
                except DriverError as error:
                    log.warning(
                        "alpha %s: %s: the alert stays up until the sign answers: %s",
                        self.name,
                        sign.device,
                        error,
                    )
                else:
                    self._end_showing(sign, showing, "completed")
                    return
            attempt += 1
            await asyncio.sleep(min(self.backoff_s * 2**attempt, MAX_RELEASE_BACKOFF_S))

    async def _put_alert(
        self, sign: _Sign, headline: str, body: str | None, colour: codec.Colour, blink: bool, timeout: float
    ) -> AlertLayout:
        headline = unicodedata.normalize("NFC", headline).strip()
        body = unicodedata.normalize("NFC", body).strip() if body else None
        if not headline:
            raise ProtocolError(f"{sign.device}: text.headline is empty")
        deadline = self._deadline(timeout)
        full = f"{headline} {body}" if body else headline
        if codec.is_sign_text(full):
            text, command = _fit_text(headline, body, colour, blink)
            await self._exchange(sign, command, "the priority text", deadline, expect=codec.Acknowledged)
            return AlertLayout("text", text)
        profile = sign.profile
        text, pages = _fit_pictures(headline, body, profile, colour)
        for label, page in zip(profile.picture_labels, pages, strict=False):
            command = codec.write_small_dots(label, page)
            await self._exchange(
                sign, command, f"alert picture {label!r}", deadline, expect=codec.Acknowledged
            )
        labels = profile.picture_labels[: len(pages)]
        # One page holds still; several pages scroll through as one line; a blinking alert flashes.
        mode = codec.Mode.FLASH if blink else (codec.Mode.HOLD if len(pages) == 1 else codec.Mode.ROTATE)
        calls = codec.write_text(codec.PRIORITY_LABEL, codec.picture_calls(labels), mode=mode)
        await self._exchange(sign, calls, "the priority picture call", deadline, expect=codec.Acknowledged)
        return AlertLayout("picture", text, len(pages))

    def _report(
        self,
        sign: _Sign,
        command_id: str,
        correlation_id: str,
        state: str,
        *,
        detail: str | None = None,
        played_s: float | None = None,
    ) -> None:
        report = CommandReport(
            address=sign.device,
            command_id=command_id,
            correlation_id=correlation_id,
            state=state,
            at=self._clock(),
            detail=detail,
            played_s=played_s,
        )
        sign.reports[command_id] = report
        sign.reports.move_to_end(command_id)
        while len(sign.reports) > REMEMBERED_COMMANDS:
            sign.reports.popitem(last=False)
        self._events.put_nowait(report)

    # -- exchanges ----------------------------------------------------------------------------------

    async def _write(self, sign: _Sign, command: bytes, what: str, timeout: float) -> None:
        await self._exchange(sign, command, what, self._deadline(timeout), expect=codec.Acknowledged)

    async def _read(self, sign: _Sign, command: bytes, what: str, timeout: float) -> codec.ResponsePacket:
        return await self._exchange(sign, command, what, self._deadline(timeout), expect=codec.ResponsePacket)

    async def _exchange(
        self, sign: _Sign, command: bytes, what: str, deadline: float, *, expect: type[_R]
    ) -> _R:
        """One packet to one sign and its answer, retried on NAK or silence while `deadline` allows."""
        if self._closed:
            raise DeviceUnreachable(f"alpha {self.name}: the driver is closed")
        try:
            frame = codec.encode_packet(sign.profile.sign_address, command, type_code=sign.profile.type_code)
        except ValueError as error:
            raise ProtocolError(f"{sign.device}: {what}: {error}") from error
        # For a picture, the rows follow a pause after the label, height and width (§4.4).
        pause_at = frame.index(codec.STX) + 6 if command[:1] == b"I" and self.picture_pause_s > 0 else None
        refusal: codec.Refused | None = None
        unanswered = 0
        async with self._link_lock:
            for attempt in range(self.retries + 1):
                if attempt:
                    self.counters.retries += 1
                    backoff = min(self.backoff_s * 2 ** (attempt - 1), max(0.0, deadline - _now()))
                    await asyncio.sleep(backoff)  # line pacing between attempts, not synchronisation
                if _now() >= deadline:
                    break
                self.counters.exchanges += 1
                self._drain_stale()
                attempt_s = min(
                    deadline - _now(), self.reply_timeout_s + len(frame) * _BITS_PER_CHARACTER / self.baud
                )
                try:
                    await self._put_on_wire(frame, pause_at)
                    reply = await self._await_reply(expect, attempt_s)
                except DeviceUnreachable as error:
                    self._silent(sign, error)
                    raise
                if isinstance(reply, expect):
                    self._answered(sign)
                    return reply
                if isinstance(reply, codec.Refused):
                    refusal = reply
                    self.counters.naks += 1
                    self._answered(sign)
                    log.info(
                        "alpha %s: %s refused %s (status 0x%02X)", self.name, sign.device, what, reply.status
                    )
                    continue
                refusal = None
                unanswered += 1
                self.counters.silences += 1
        if refusal is not None:
            raise SignRefused(sign.device, what, refusal.status)
        if not unanswered:
            # The operation's time ran out before this packet could go: no verdict on the sign's health.
            raise DeviceTimeout(f"alpha {self.name}: {sign.device}: no time left for {what}")
        silence = DeviceTimeout(
            f"alpha {self.name}: {sign.device} (address {sign.profile.sign_address}) did not answer {what}"
        )
        self._silent(sign, silence)
        raise silence

    async def _await_reply(self, expect: type[codec.Reply], timeout: float) -> codec.Reply | None:
        """The first reply of the expected kind or a NAK within `timeout`; None on silence."""
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                while True:
                    reply = await self._replies.get()
                    if isinstance(reply, _LinkLost):
                        raise DeviceUnreachable(f"alpha {self.name}: the port closed")
                    if isinstance(reply, (expect, codec.Refused)):
                        return reply
                    self.counters.unexpected_replies += 1
                    log.debug("alpha %s: ignoring an unexpected %s", self.name, type(reply).__name__)
        except TimeoutError:
            # A reply the sign started and never finished is garbage now, not the start of the next one.
            for item in self._decoder.reset():
                self._note_decoded(item)
            return None

    def _drain_stale(self) -> None:
        """Anything that arrived between exchanges answers nothing we will ask: count and drop it."""
        while not self._replies.empty():
            item = self._replies.get_nowait()
            if not isinstance(item, _LinkLost):
                self.counters.unexpected_replies += 1

    async def _put_on_wire(self, frame: bytes, pause_at: int | None) -> None:
        writer = await self._connected()
        try:
            if pause_at is None:
                writer.write(frame)
                await writer.drain()
            else:
                writer.write(frame[:pause_at])
                await writer.drain()
                await asyncio.sleep(self.picture_pause_s)  # the sign's own timing, not synchronisation
                writer.write(frame[pause_at:])
                await writer.drain()
        except (OSError, serial.SerialException) as error:
            await self._disconnect()
            raise DeviceUnreachable(f"alpha {self.name}: writing to the port failed ({error})") from error

    async def _connected(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        await self._disconnect()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await serial_asyncio_fast.open_serial_connection(
                    url=self.port, **self._serial_options
                )
        except (TimeoutError, OSError, serial.SerialException, ValueError) as error:
            raise DeviceUnreachable(f"alpha {self.name}: cannot open {self.port} ({error})") from error
        self._reader, self._writer = reader, writer
        self._decoder = codec.ReplyDecoder()
        self._reading = asyncio.get_running_loop().create_task(self._read_replies(reader))
        return writer

    async def _disconnect(self) -> None:
        reading, writer = self._reading, self._writer
        self._reading = self._reader = self._writer = None
        if reading is not None and reading is not asyncio.current_task():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, serial.SerialException, ConnectionError):
                await writer.wait_closed()

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        """Everything the line says, for as long as the port is open."""
        try:
            while data := await reader.read(4096):
                for item in self._decoder.feed(data):
                    self._note_decoded(item)
        except (OSError, serial.SerialException) as error:
            log.warning("alpha %s: reading the port failed: %s", self.name, error)
        for item in self._decoder.reset():
            self._note_decoded(item)
        self._replies.put_nowait(_LinkLost())
        self._reading = None
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def _note_decoded(self, item: codec.Decoded) -> None:
        if not isinstance(item, codec.Garbage):
            self._replies.put_nowait(item)
            return
        self.counters.garbage_runs += 1
        self.counters.garbage_bytes += len(item.data)
        level = logging.WARNING if self.counters.garbage_runs == 1 else logging.DEBUG
        log.log(
            level, "alpha %s: %s: %d bytes %s", self.name, item.reason, len(item.data), item.data[:32].hex()
        )
        reason = f"{item.reason}: {len(item.data)} bytes ({item.data[:32].hex()})"
        self._events.put_nowait(
            MalformedPayload(address=None, topic=f"alpha-sign:{self.name}", reason=reason)
        )

    # -- health -----------------------------------------------------------------------------------

    def _answered(self, sign: _Sign) -> None:
        if sign.online is True:
            return
        if sign.failures:
            log.info("alpha %s: %s answers again after %d failures", self.name, sign.device, sign.failures)
        sign.online, sign.failures = True, 0
        self._events.put_nowait(self._state(sign))

    def _silent(self, sign: _Sign, error: DriverError) -> None:
        sign.failures += 1
        if sign.online is False:
            log.debug("alpha %s: %s still silent (%d): %s", self.name, sign.device, sign.failures, error)
            return
        log.warning("alpha %s: %s fell silent: %s", self.name, sign.device, error)
        sign.online = False
        self._events.put_nowait(self._state(sign))

    def _state(self, sign: _Sign) -> DeviceState:
        showing = sign.showing
        attributes: dict[str, Any] = {
            "kind": "led_screen",
            "sign_address": sign.profile.sign_address,
            "showing": showing.command_id if showing else None,
            "headline": showing.headline if showing else None,
        }
        return DeviceState(
            address=sign.device, online=bool(sign.online), at=self._clock(), attributes=attributes
        )

    async def _poll(self, interval: float) -> None:
        """Reads every sign's clock now and then, so that a sign that fell silent is noticed."""
        while True:
            await asyncio.sleep(interval)  # the polling period itself
            for sign in self._signs.values():
                with contextlib.suppress(DriverError):
                    await self._read(
                        sign, codec.read_special(codec.SpecialLabel.TIME_OF_DAY), "a poll", interval
                    )

    # -- helpers ----------------------------------------------------------------------------------

    def _sign(self, device: str) -> _Sign:
        sign = self._signs.get(device)
        if sign is None:
            raise ProtocolError(f"device {device!r} is not a sign on alpha link {self.name}")
        return sign

    @staticmethod
    def _check_programme_label(sign: _Sign, label: str) -> None:
        codec.check_label(label, field="programme label")
        if label == codec.PRIORITY_LABEL or label in sign.profile.picture_labels:
            raise ValueError(f"label {label!r} is reserved for alerts (priority file and alert pictures)")

    def _local(self, when: datetime) -> datetime:
        if when.tzinfo is None:
            raise ProtocolError("when: a timezone-aware datetime is needed to set a sign's clock")
        return when.astimezone(self.timezone)

    @staticmethod
    def _deadline(timeout: float) -> float:
        if not timeout > 0 or math.isinf(timeout) or math.isnan(timeout):
            raise ValueError(f"timeout {timeout} must be a finite number of seconds greater than 0")
        return _now() + timeout

    @staticmethod
    def _parsed(device: str, parse: Callable[[], _T]) -> _T:
        try:
            return parse()
        except ValueError as error:
            raise ProtocolError(f"{device}: {error}") from error


def _now() -> float:
    return asyncio.get_running_loop().time()


def _framing(framing: str) -> dict[str, Any]:
    """ "7E1", "8N1" … as pyserial's bytesize, parity and stopbits."""
    if len(framing) != 3 or framing[0] not in "78" or framing[1] not in _PARITIES or framing[2] not in "12":  # noqa: PLR2004
        raise ValueError(f"framing {framing!r} is not data bits, parity, stop bits (such as 7E1 or 8N1)")
    return {"bytesize": int(framing[0]), "parity": _PARITIES[framing[1]], "stopbits": int(framing[2])}


# -- documents (docs/protocol.md §1.11) ---------------------------------------------------------------


def _text_member(document: Mapping[str, Any], name: str, low: int, high: int) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise ValueError(f"{name}: a string of {low}..{high} characters expected, got {value!r}")
    return value


def _parse_show(document: Mapping[str, Any], correlation_id: str) -> _ShowRequest:
    text = document.get("text")
    if not isinstance(text, Mapping):
        raise TypeError("text: an object {headline, body} expected")
    headline = _text_member(text, "headline", 1, MAX_HEADLINE)
    body = text.get("body")
    if body is not None and (not isinstance(body, str) or len(body) > MAX_BODY):
        raise TypeError(f"text.body: a string of at most {MAX_BODY} characters expected")
    display_s = document.get("display_s")
    if (
        isinstance(display_s, bool)
        or not isinstance(display_s, int | float)
        or not 0 < display_s <= MAX_DISPLAY_S
        or not math.isfinite(display_s)
    ):
        raise ValueError(f"display_s: a number in (0, {MAX_DISPLAY_S:g}] expected, got {display_s!r}")
    mode = document.get("mode", "live")
    if mode not in ("live", "drill"):
        raise ValueError(f"mode: 'live' or 'drill' expected, got {mode!r}")
    if mode == "drill" and not headline.startswith(DRILL_LABEL.rstrip(": ")):
        # A drill must read as one before anything else (DESIGN.md §2), whoever forgot the label.
        headline = DRILL_LABEL + headline
    priority = document.get("priority")
    emergency = isinstance(priority, Mapping) and priority.get("class") == _EMERGENCY_CLASS
    style = document.get("style") or {}
    if not isinstance(style, Mapping):
        raise TypeError("style: an object {color, blink} expected")
    colour_name = style.get("color", "red" if emergency else "amber")
    if colour_name not in (*_COLOURS, "white"):
        raise ValueError(f"style.color: red, amber, green or white expected, got {colour_name!r}")
    blink = style.get("blink", False)
    if not isinstance(blink, bool):
        raise TypeError(f"style.blink: true or false expected, got {blink!r}")
    colour = _COLOURS.get(colour_name, _WHITE_AS)
    return _ShowRequest(correlation_id, headline, body or None, float(display_s), colour, blink)


def _fit_text(headline: str, body: str | None, colour: codec.Colour, blink: bool) -> tuple[str, bytes]:
    """The longest of headline + body, headline, a cut headline that fits the 125-byte priority file."""
    mode = codec.Mode.FLASH if blink else codec.Mode.ROTATE
    for text in _candidates(headline, body, _ELLIPSIS_TEXT):
        try:
            return text, codec.write_text(
                codec.PRIORITY_LABEL, codec.coloured(codec.sign_text(text), colour), mode=mode
            )
        except ValueError:
            continue
    raise ProtocolError("text.headline: nothing of it fits the priority file")  # pragma: no cover


def _fit_pictures(
    headline: str, body: str | None, profile: SignProfile, colour: codec.Colour
) -> tuple[str, tuple[codec.DotsPicture, ...]]:
    """The longest of headline + body, headline, a cut headline that fits the reserved pictures."""
    for text in _candidates(headline, body, _ELLIPSIS_PICTURE):
        try:
            pages = codec.render_pages(
                text,
                height=profile.rows,
                page_width=profile.picture_width,
                max_pages=len(profile.picture_labels),
                colour=colour,
            )
        except ValueError:
            continue
        return text, pages
    raise ProtocolError(f"text.headline: the sign's {profile.rows} rows are too few for any text")


def _candidates(headline: str, body: str | None, ellipsis: str) -> list[str]:
    candidates = [f"{headline} {body}"] if body else []
    candidates.append(headline)
    words = headline.split()
    candidates += [" ".join(words[:count]) + ellipsis for count in range(len(words) - 1, 0, -1)]
    candidates += [
        headline[:length] + ellipsis for length in (80, 40, 20, 10, 5, 1) if length < len(headline)
    ]
    return candidates


if TYPE_CHECKING:

    def _implements(driver: AlphaSignDriver) -> Driver:
        return driver
