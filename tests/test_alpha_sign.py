"""The Alpha sign driver (drivers/alpha_sign.py) against the simulated sign (firmware_sim/alpha_sign.py),
over a real pseudo-terminal and over `socket://` (docs/protocol.md §4)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from drivers import alpha_codec as codec
from drivers.alpha_sign import AlphaSignDriver, SignProfile, SignRefused
from drivers.base import (
    CommandReport,
    DeviceCommand,
    DeviceState,
    DeviceTimeout,
    InboundEvent,
    MalformedPayload,
    ProtocolError,
)
from firmware_sim.alpha_sign import PtyLine, SignConfig, SimulatedSign, TcpLine

pytestmark = pytest.mark.integration

DEVICE = "led-hue-01"
TIMEOUT = 3.0
WAIT_S = 10.0
PROGRAMME = "Welcome to ward 5"
FLOOD_VI = "Cảnh báo lũ: sơ tán khỏi tổ 5"


class EventLog:
    """Collects what `driver.events()` yields; tests wait on it instead of sleeping."""

    def __init__(self, driver: AlphaSignDriver) -> None:
        self.events: list[InboundEvent] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._collect(driver))

    async def _collect(self, driver: AlphaSignDriver) -> None:
        async for event in driver.events():
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    async def wait_for(self, condition: Callable[[list[InboundEvent]], bool]) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: condition(self.events))

    def reports(self, command_id: str) -> list[str]:
        return [e.state for e in self.events if isinstance(e, CommandReport) and e.command_id == command_id]

    def states(self) -> list[bool]:
        return [e.online for e in self.events if isinstance(e, DeviceState)]

    def malformed(self) -> list[MalformedPayload]:
        return [e for e in self.events if isinstance(e, MalformedPayload)]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Bench:
    sign: SimulatedSign
    line: PtyLine | TcpLine
    driver: AlphaSignDriver
    log: EventLog


def open_driver(
    port: str, signs: dict[str, SignProfile | str] | None = None, **options: Any
) -> AlphaSignDriver:
    settings: dict[str, Any] = {
        "framing": "8N1",  # a pty takes nothing else
        "picture_pause_s": 0.0,
        "reply_timeout_s": 0.25,
        "backoff_s": 0.01,
    }
    return AlphaSignDriver(port, signs or {DEVICE: "01"}, **(settings | options))


@pytest.fixture(params=["pty", "socket"])
async def bench(request: pytest.FixtureRequest) -> AsyncIterator[Bench]:
    sign = SimulatedSign(SignConfig("01"))
    line: PtyLine | TcpLine = PtyLine([sign]) if request.param == "pty" else TcpLine([sign])
    async with line:
        port = line.path if isinstance(line, PtyLine) else line.url
        async with open_driver(port) as driver:
            log = EventLog(driver)
            await driver.configure_memory(DEVICE, {"A": 256, "B": 128}, timeout=TIMEOUT)
            await driver.write_programme(DEVICE, "A", PROGRAMME, timeout=TIMEOUT)
            yield Bench(sign, line, driver, log)
            await log.close()


def show(
    headline: str,
    *,
    body: str | None = None,
    display_s: float = 600.0,
    mode: str = "live",
    band: str = "emergency",
    expires_in_s: float = 60.0,
    **members: Any,
) -> DeviceCommand:
    """A §1.11 `show` for the sign, as the controller builds it."""
    now = datetime.now(UTC)
    text = {"headline": headline} | ({"body": body} if body else {})
    document: dict[str, Any] = {
        "v": 1,
        "type": "show",
        "id": str(uuid.uuid4()),
        "correlation_id": f"delivery-{uuid.uuid4().hex[:12]}",
        "device": DEVICE,
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(seconds=expires_in_s)).isoformat(),
        "seq": 1,
        "broadcast_id": "broadcast-1",
        "priority": {
            "class": band,
            "sub": 0,
            "rank": {"normal": 0, "priority": 1, "emergency": 2}[band] * 256,
        },
        "mode": mode,
        "text": text,
        "display_s": display_s,
    } | members
    return DeviceCommand(DEVICE, document["id"], document, now + timedelta(seconds=expires_in_s))


def stop(target: str) -> DeviceCommand:
    now = datetime.now(UTC)
    document: dict[str, Any] = {
        "v": 1,
        "type": "stop",
        "id": str(uuid.uuid4()),
        "correlation_id": f"delivery-{uuid.uuid4().hex[:12]}",
        "device": DEVICE,
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(minutes=1)).isoformat(),
        "seq": 2,
        "target": target,
        "reason": "cancelled",
    }
    return DeviceCommand(DEVICE, document["id"], document, now + timedelta(minutes=1))


def lit_pixels(path: Path) -> int:
    with Image.open(path) as image:
        pixels = image.convert("RGB").tobytes()
    return sum(1 for at in range(0, len(pixels), 3) if pixels[at] > 200 and pixels[at + 1] < 100)


def priority_up(sign: SimulatedSign) -> bool:
    """Whether the sign runs a priority message now (a call, so that each check reads it afresh)."""
    return sign.priority_active


# Alerts take the priority slot and leave the programme alone


async def test_an_alert_shows_in_the_priority_slot_and_the_programme_survives(bench: Bench) -> None:
    sign, driver, log = bench.sign, bench.driver, bench.log
    stored = sign.text_file("A")
    assert sign.current_text() == PROGRAMME
    alert = show("FLOOD: LEAVE NOW", body="Go to the school on Le Loi street")
    ack = await driver.send(alert, timeout=TIMEOUT)
    assert ack.command_id == alert.command_id
    assert ack.accepted_at >= ack.published_at
    await log.wait_for(lambda _: log.reports(alert.command_id) == ["delivered", "playing"])
    assert sign.current_text() == "FLOOD: LEAVE NOW Go to the school on Le Loi street"
    assert priority_up(sign)
    assert sign.text_file("A") == stored  # the programme was never written

    halt = stop(alert.command_id)
    await driver.send(halt, timeout=TIMEOUT)
    await log.wait_for(lambda _: log.reports(alert.command_id)[-1:] == ["stopped"])
    assert log.reports(halt.command_id) == ["completed"]
    assert not priority_up(sign)
    assert sign.current_text() == PROGRAMME
    assert await driver.read_text(DEVICE, "A", timeout=TIMEOUT) == stored
    report = next(e for e in log.events if isinstance(e, CommandReport) and e.state == "stopped")
    assert report.correlation_id == alert.document["correlation_id"]
    assert report.played_s is not None
    assert report.played_s >= 0


async def test_a_vietnamese_alert_goes_as_a_picture_and_ends_after_display_s(
    bench: Bench, tmp_path: Path
) -> None:
    sign, driver, log = bench.sign, bench.driver, bench.log
    alert = show(FLOOD_VI, display_s=0.4)
    await driver.send(alert, timeout=TIMEOUT)
    await log.wait_for(lambda _: "playing" in log.reports(alert.command_id))
    assert sign.displayed_pictures() == ("6",)
    picture = sign.picture("6")
    assert picture is not None
    assert picture.height == 16
    assert picture.lit > 200
    assert sign.current_text() == f"[picture 6 16x{picture.width}]"
    assert picture.rows == codec.render_picture(FLOOD_VI, height=16, colour=codec.Colour.RED).rows
    assert lit_pixels(sign.render_png(tmp_path / "alert.png")) > 200 * 9
    # display_s passes: the driver releases the priority slot by itself.
    await log.wait_for(lambda _: log.reports(alert.command_id)[-1:] == ["completed"])
    assert not priority_up(sign)
    assert sign.current_text() == PROGRAMME
    completed = [e for e in log.events if isinstance(e, CommandReport) and e.state == "completed"]
    assert completed[-1].played_s is not None
    assert completed[-1].played_s >= 0.4


async def test_a_drill_reads_as_one_and_a_newer_alert_interrupts(bench: Bench) -> None:
    sign, driver, log = bench.sign, bench.driver, bench.log
    drill = show("Sơ tán", mode="drill", band="priority")
    await driver.send(drill, timeout=TIMEOUT)
    await log.wait_for(lambda _: "playing" in log.reports(drill.command_id))
    expected = codec.render_picture("DIỄN TẬP: Sơ tán", height=16, colour=codec.Colour.AMBER)
    assert sign.picture("6") is not None
    assert sign.picture("6").rows == expected.rows  # type: ignore[union-attr]
    newer = show("EVACUATE NOW", style={"color": "green", "blink": True})
    await driver.send(newer, timeout=TIMEOUT)
    await log.wait_for(lambda _: log.reports(drill.command_id)[-1:] == ["interrupted"])
    assert sign.current_text() == "EVACUATE NOW"
    assert sign.priority_data == b"\x1b c\x1c2EVACUATE NOW"  # FLASH, green


async def test_a_duplicate_is_answered_from_memory_and_a_late_show_expires(bench: Bench) -> None:
    sign, driver, log = bench.sign, bench.driver, bench.log
    alert = show("FLOOD: LEAVE NOW")
    await driver.send(alert, timeout=TIMEOUT)
    packets = sign.counters.packets
    await driver.send(alert, timeout=TIMEOUT)  # the dispatcher lost our answer and asks again
    await log.wait_for(lambda _: log.reports(alert.command_id) == ["delivered", "playing", "playing"])
    assert sign.counters.packets == packets

    late = show("TOO LATE", expires_in_s=-1.0)
    await driver.send(late, timeout=TIMEOUT)
    await log.wait_for(lambda _: log.reports(late.command_id) == ["expired"])
    assert sign.current_text() == "FLOOD: LEAVE NOW"


async def test_malformed_documents_are_refused_naming_the_member(bench: Bench) -> None:
    driver = bench.driver
    with pytest.raises(ProtocolError, match="display_s"):
        await driver.send(show("X", display_s=0), timeout=TIMEOUT)
    with pytest.raises(ProtocolError, match=r"style\.color"):
        await driver.send(show("X", style={"color": "purple"}), timeout=TIMEOUT)
    with pytest.raises(ProtocolError, match="headline"):
        await driver.send(show(""), timeout=TIMEOUT)
    with pytest.raises(ProtocolError, match="'nowhere'"):
        await driver.write_programme("nowhere", "A", "X", timeout=TIMEOUT)
    with pytest.raises(ProtocolError, match="reserved for alerts"):
        await driver.write_programme(DEVICE, "0", "X", timeout=TIMEOUT)
    with pytest.raises(ProtocolError, match="character set"):
        await driver.write_programme(DEVICE, "A", "Chào", timeout=TIMEOUT)
    assert bench.sign.counters.naks == 0


# Clear, clock and status


async def test_clear_alert_and_clear_memory(bench: Bench) -> None:
    sign, driver = bench.sign, bench.driver
    layout = await driver.show_alert(DEVICE, "TEST", timeout=TIMEOUT)
    assert (layout.kind, layout.shown) == ("text", "TEST")
    assert priority_up(sign)
    await driver.clear_alert(DEVICE, timeout=TIMEOUT)
    assert not priority_up(sign)
    assert sign.text_file("A") is not None
    await driver.clear_memory(DEVICE, timeout=TIMEOUT)
    assert sign.text_file("A") is None
    assert sign.allocations == ()


async def test_set_time_and_read_it_back(bench: Bench) -> None:
    driver, sign = bench.driver, bench.sign
    await driver.set_time(DEVICE, datetime(2026, 11, 24, 7, 30, tzinfo=UTC), timeout=TIMEOUT)
    read = await driver.read_time(DEVICE, timeout=TIMEOUT)
    assert read == datetime(2026, 11, 24, 14, 30, tzinfo=driver.timezone)
    day, hour, minute = sign.sign_time()
    assert (day.isoformat(), hour, minute) == ("2026-11-24", 14, 30)
    with pytest.raises(ProtocolError, match="timezone-aware"):
        await driver.set_time(DEVICE, datetime(2026, 11, 24, 7, 30), timeout=TIMEOUT)  # noqa: DTZ001


async def test_read_status(bench: Bench) -> None:
    status = await bench.driver.read_status(DEVICE, timeout=TIMEOUT)
    assert status.firmware_version == "WCSIM-01"
    assert status.memory_total == 0x4000
    assert 0 < status.memory_free < status.memory_total
    assert status.time_format == "24 hour"


# Retries, typed errors, health


async def test_a_nak_is_retried_then_refused(bench: Bench) -> None:
    sign, driver = bench.sign, bench.driver
    sign.faults.nak_next = 1
    await driver.show_alert(DEVICE, "AFTER ONE NAK", timeout=TIMEOUT)
    assert driver.counters.retries == 1
    assert sign.current_text() == "AFTER ONE NAK"
    sign.faults.nak_next = 3
    with pytest.raises(SignRefused) as refused:
        await driver.clear_alert(DEVICE, timeout=TIMEOUT)
    assert refused.value.flags == (codec.StatusFlag.CHECKSUM,)
    assert driver.counters.naks == 4
    assert priority_up(sign)  # every attempt was refused unexecuted
    assert driver.online(DEVICE) is True  # a NAK is an answer


async def test_silence_is_retried_then_times_out_and_the_sign_goes_offline(bench: Bench) -> None:
    sign, driver, log = bench.sign, bench.driver, bench.log
    sign.faults.silence_next = 1
    await driver.clear_alert(DEVICE, timeout=TIMEOUT)
    assert driver.counters.retries == 1
    sign.faults.silent = True
    with pytest.raises(DeviceTimeout, match="did not answer"):
        await driver.read_status(DEVICE, timeout=TIMEOUT)
    assert driver.counters.silences == 1 + 3
    await log.wait_for(lambda _: log.states()[-1:] == [False])
    sign.faults.silent = False
    await driver.read_status(DEVICE, timeout=TIMEOUT)
    await log.wait_for(lambda _: log.states()[-2:] == [False, True])


async def test_garbage_towards_the_controller_is_counted_and_never_breaks_an_exchange(bench: Bench) -> None:
    sign, driver, log, line = bench.sign, bench.driver, bench.log, bench.line
    sign.faults.garbage_before_reply = b"\x7f\xfe line noise \x01000\x02E 12"  # noise and a cut-off reply
    await driver.show_alert(DEVICE, "STILL WORKS", timeout=TIMEOUT)
    line.inject(b"\x00\x00 more noise between exchanges \x06")
    assert (await driver.read_status(DEVICE, timeout=TIMEOUT)).firmware_version == "WCSIM-01"
    await log.wait_for(lambda _: len(log.malformed()) >= 3)
    assert driver.counters.garbage_bytes > 30
    reasons = " | ".join(event.reason for event in log.malformed())
    assert "outside any reply" in reasons
    assert "cut off" in reasons
    assert sign.current_text() == "STILL WORKS"


async def test_garbage_and_partial_frames_towards_the_sign_are_counted(bench: Bench) -> None:
    sign, driver, line = bench.sign, bench.driver, bench.line
    hello = codec.encode_packet("01", codec.write_text("B", b"hello", mode=codec.Mode.HOLD))
    noise = b"\xff\xfe\x7fgarbage"
    before = line.counters.frames
    await _write_raw(line, noise + hello[: len(hello) // 2] + b"\x05\x06" + hello)
    await line.wait_until(lambda: line.counters.frames > before, WAIT_S)
    assert line.counters.garbage_bytes >= len(noise)
    assert line.counters.partial_frames >= 1
    assert sign.text_file("B") == b"\x1b bhello"
    # The driver, which may have read the sign's ACK meant for the raw writer, carries on.
    await driver.clear_alert(DEVICE, timeout=TIMEOUT)


async def _write_raw(line: PtyLine | TcpLine, data: bytes) -> None:
    """Another talker on the line: a second opener of the pty, or a second TCP connection."""
    if isinstance(line, PtyLine):
        descriptor = os.open(line.path, os.O_WRONLY | os.O_NOCTTY)
        try:
            os.write(descriptor, data)
        finally:
            os.close(descriptor)
        return
    _, writer = await asyncio.open_connection(line.host, line.port)
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_a_packet_for_another_address_is_ignored(bench: Bench) -> None:
    sign, line = bench.sign, bench.line
    port = line.path if isinstance(line, PtyLine) else line.url
    packets = sign.counters.packets
    others = line.counters.for_other_addresses
    async with open_driver(port, {"led-elsewhere": "02"}, retries=0, reply_timeout_s=0.2) as stranger:
        with pytest.raises(DeviceTimeout):
            await stranger.read_status("led-elsewhere", timeout=TIMEOUT)
    assert line.counters.for_other_addresses == others + 1
    assert sign.counters.packets == packets


# Two signs on one RS-485 pair


async def test_two_signs_share_a_line_and_a_broadcast_reaches_both() -> None:
    first, second = SimulatedSign(SignConfig("01")), SimulatedSign(SignConfig("02"))
    async with (
        TcpLine([first, second]) as line,
        open_driver(
            line.url, {"led-a": "01", "led-b": SignProfile("02", rows=8, picture_labels="XY")}
        ) as driver,
    ):
        await driver.configure_memory("led-b", {"A": 64}, timeout=TIMEOUT)
        layout = await driver.show_alert("led-b", FLOOD_VI, timeout=TIMEOUT)
        assert layout.kind == "picture"
        assert second.displayed_pictures()[0] == "X"
        assert not first.priority_active
        await driver.broadcast_time(datetime(2026, 11, 24, 23, 5, tzinfo=UTC))
        await line.wait_until(lambda: first.sign_time()[1:] == second.sign_time()[1:] == (6, 5), WAIT_S)
        assert first.counters.acks == 0  # nobody answers a broadcast


# The command line


async def test_the_command_line_prints_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firmware_sim.alpha_sign",
        "--pty",
        "--tcp",
        "127.0.0.1:0",
        "--address",
        "01",
        "--png",
        str(tmp_path / "sign.png"),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(WAIT_S):
            ready = (await process.stdout.readline()).decode().split()
        assert ready[0] == "READY"
        fields = dict(item.split("=", 1) for item in ready[1:])
        assert fields["address"] == "01"
        assert fields["pty"].startswith("/dev/")
        for port in (fields["pty"], f"socket://{fields['tcp']}"):
            async with open_driver(port) as driver:
                await driver.configure_memory(DEVICE, {"A": 64}, timeout=TIMEOUT)
                await driver.show_alert(DEVICE, FLOOD_VI, timeout=TIMEOUT)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await process.wait() == 0
        assert lit_pixels(tmp_path / "sign.png") > 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
