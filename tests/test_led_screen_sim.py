"""The simulated networked LED screen (docs/protocol.md §1.11) against a real Mosquitto and a controller
probe; and fleets that mix speakers and screens."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from firmware_sim import fleet
from firmware_sim.fleet import Fleet, FleetConfig, devices_from_api, devices_from_csv
from firmware_sim.playlog import read_play_log
from firmware_sim.screen import SimulatedLedScreen
from firmware_sim.speaker import BrokerSettings, MqttProtocol, SpeakerRuntime
from tests.sim_harness import (
    TEST_COMMAND_KEY,
    TEST_COMMAND_KEY_TEXT,
    ControllerProbe,
    MediaServer,
    ShiftableClock,
    play_command,
    setting,
    show_command,
    start_fleet_cli,
    stop_command,
    wav_bytes,
    without,
)
from tests.support.broker import TestBroker

SPEED = 20.0
LONG_S = 400.0  # 20 s up at SPEED: far longer than any test waits for it
WAIT_S = 20.0
# NFC, with the diacritics a Vietnamese notice carries (the source file is NFC; normalised to be sure).
FLOOD = unicodedata.normalize("NFC", "Cảnh báo lũ: sơ tán khẩn cấp tổ dân phố số 5, phường Hoàn Kiếm")
NOTICE = unicodedata.normalize("NFC", "Thông báo: tiêm chủng mở rộng tại trạm y tế phường, 7 giờ sáng")
DRILL = unicodedata.normalize("NFC", "DIỄN TẬP phòng cháy chữa cháy")

OpenRuntime = Callable[..., Awaitable[SpeakerRuntime]]


def device_broker(mosquitto: TestBroker, protocol: MqttProtocol = "3.1.1") -> BrokerSettings:
    return BrokerSettings(
        host=mosquitto.host,
        port=mosquitto.port,
        username=mosquitto.simulator.username,
        password=mosquitto.simulator.password,
        protocol=protocol,
    )


@pytest.fixture
async def open_runtime(
    mosquitto: TestBroker, clock: ShiftableClock, play_log_path: Path
) -> AsyncIterator[OpenRuntime]:
    async with contextlib.AsyncExitStack() as stack:

        async def open_runtime(protocol: MqttProtocol = "3.1.1") -> SpeakerRuntime:
            runtime = SpeakerRuntime(
                device_broker(mosquitto, protocol),
                speed=SPEED,
                clock=clock,
                play_log=play_log_path,
                command_key=TEST_COMMAND_KEY,
            )
            return await stack.enter_async_context(runtime)

        yield open_runtime


@pytest.fixture
async def runtime(open_runtime: OpenRuntime) -> SpeakerRuntime:
    return await open_runtime()


async def started(runtime: SpeakerRuntime, address: str = "led-1") -> SimulatedLedScreen:
    screen = runtime.led_screen(address)
    await screen.start(timeout=10)
    return screen


def log_entries(play_log_path: Path, command_id: str) -> list[dict[str, Any]]:
    return [entry for entry in read_play_log(play_log_path) if entry.get("command_id") == command_id]


def log_events(play_log_path: Path, command_id: str) -> list[str]:
    return [str(entry["event"]) for entry in log_entries(play_log_path, command_id)]


def shown_headlines(play_log_path: Path, address: str = "led-1") -> list[str]:
    return [
        str(entry["headline"])
        for entry in read_play_log(play_log_path)
        if entry["address"] == address and entry["event"] == "playing"
    ]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_show_puts_the_headline_up_and_completes_after_display_s(
    open_runtime: OpenRuntime, probe: ControllerProbe, play_log_path: Path, protocol: MqttProtocol
) -> None:
    await started(await open_runtime(protocol))
    online = await probe.state("led-1", lambda state: state["online"])
    assert online["kind"] == "led_screen"
    assert online["firmware"] == "sim-1.0.0"
    assert online["showing"] is None
    assert online["headline"] is None
    assert "volume" not in online

    command = show_command("led-1", FLOOD, body=NOTICE, display_s=2.0, mode="drill")
    await probe.send(command)
    completed = await probe.report(command["id"], "completed")

    assert probe.states_of(command["id"]) == ["delivered", "playing", "completed"]
    assert completed["played_s"] == pytest.approx(2.0)
    assert "truncated" not in completed
    assert {report["correlation_id"] for report in probe.reports_for(command["id"])} == {
        command["correlation_id"]
    }
    shown = await probe.wait_until(
        lambda: (
            (states := [(s["showing"], s["headline"]) for s in probe.states["led-1"]])[-1] == (None, None)
            and len(states) >= 3
            and states
        )
    )
    assert shown == [(None, None), (command["id"], FLOOD), (None, None)]
    entries = log_entries(play_log_path, command["id"])
    assert [entry["event"] for entry in entries] == ["delivered", "playing", "completed"]
    assert {entry["broadcast_id"] for entry in entries} == {command["broadcast_id"]}
    assert {entry["mode"] for entry in entries} == {"drill"}
    playing = entries[1]
    assert (playing["headline"], playing["color"], playing["blink"]) == (FLOOD, "amber", False)
    assert entries[2]["played_s"] == pytest.approx(2.0)


async def test_style_defaults_and_the_newest_emergency_takes_the_screen(
    runtime: SpeakerRuntime, probe: ControllerProbe, play_log_path: Path
) -> None:
    screen = await started(runtime)
    first = show_command("led-1", FLOOD, display_s=LONG_S, band="emergency", sub=10)
    await probe.send(first)
    await probe.report(first["id"], "playing")
    newer = show_command("led-1", DRILL, display_s=LONG_S, band="emergency", sub=10, style={"blink": True})
    await probe.send(newer)
    interrupted = await probe.final_report(first["id"])
    await probe.report(newer["id"], "playing")

    assert interrupted["state"] == "interrupted"
    assert 0 <= interrupted["played_s"] < LONG_S
    assert (screen.showing, screen.headline) == (newer["id"], DRILL)
    styles = [
        (entry["color"], entry["blink"])
        for entry in read_play_log(play_log_path)
        if entry["event"] == "playing"
    ]
    assert styles == [("red", False), ("red", True)]


async def test_higher_rank_interrupts_and_equal_rank_waits_for_the_screen(
    runtime: SpeakerRuntime, probe: ControllerProbe, play_log_path: Path
) -> None:
    screen = await started(runtime)
    first = show_command("led-1", NOTICE, display_s=LONG_S)
    await probe.send(first)
    await probe.report(first["id"], "playing")

    same_rank = show_command("led-1", DRILL, display_s=LONG_S)
    await probe.send(same_rank)
    await probe.report(same_rank["id"], "delivered")
    assert screen.showing == first["id"]
    assert screen.waiting == (same_rank["id"],)

    urgent = show_command("led-1", FLOOD, display_s=LONG_S, band="priority", style={"color": "white"})
    await probe.send(urgent)
    interrupted = await probe.final_report(first["id"])
    assert interrupted["state"] == "interrupted"
    assert interrupted["played_s"] >= 0
    await probe.report(urgent["id"], "playing")
    await probe.state("led-1", lambda state: (state["showing"], state["headline"]) == (urgent["id"], FLOOD))
    assert screen.waiting == (same_rank["id"],)  # still lower than the one up

    stop = stop_command("led-1", urgent["id"])
    await probe.send(stop)
    assert (await probe.final_report(urgent["id"]))["state"] == "stopped"
    await probe.report(same_rank["id"], "playing")
    await probe.state(
        "led-1", lambda state: (state["showing"], state["headline"]) == (same_rank["id"], DRILL)
    )

    assert probe.states_of(first["id"]) == ["delivered", "playing", "interrupted"]
    assert shown_headlines(play_log_path) == [NOTICE, FLOOD, DRILL]


async def test_stop_all_takes_the_text_down_at_once_with_what_was_waiting(
    runtime: SpeakerRuntime, probe: ControllerProbe, play_log_path: Path
) -> None:
    screen = await started(runtime)
    shown = show_command("led-1", FLOOD, display_s=LONG_S)
    await probe.send(shown)
    await probe.report(shown["id"], "playing")
    waiting = show_command("led-1", NOTICE, display_s=LONG_S)
    await probe.send(waiting)
    await probe.report(waiting["id"], "delivered")

    stop = stop_command("led-1", "*", reason="all_clear")
    await probe.send(stop)
    stop_report = await probe.final_report(stop["id"])

    assert stop_report["state"] == "completed"
    taken_down = await probe.final_report(shown["id"])
    assert taken_down["state"] == "stopped"
    assert 0 <= taken_down["played_s"] < LONG_S
    dropped = await probe.final_report(waiting["id"])
    assert (dropped["state"], dropped["played_s"]) == ("stopped", 0)
    assert (screen.showing, screen.headline, screen.waiting) == (None, None, ())
    await probe.wait_until(lambda: probe.states["led-1"][-1]["showing"] is None)
    assert probe.states["led-1"][-1]["headline"] is None
    assert log_events(play_log_path, shown["id"]) == ["delivered", "playing", "stopped"]
    assert log_events(play_log_path, waiting["id"]) == ["delivered", "stopped"]

    nothing = stop_command("led-1", shown["id"])
    await probe.send(nothing)
    assert "nothing to stop" in (await probe.report(nothing["id"], "completed"))["detail"]


async def test_a_show_arriving_after_its_expiry_is_expired_and_never_shown(
    runtime: SpeakerRuntime, probe: ControllerProbe, play_log_path: Path
) -> None:
    await started(runtime)
    command = show_command("led-1", FLOOD, now=datetime(2020, 1, 1, tzinfo=UTC), expires_in_s=60)
    await probe.send(command)
    expired = await probe.final_report(command["id"])
    assert expired["state"] == "expired"
    assert expired["detail"] == "arrived after expires_at"
    assert probe.states_of(command["id"]) == ["expired"]
    assert log_events(play_log_path, command["id"]) == ["expired"]


async def test_a_show_waiting_past_its_expiry_is_expired_when_the_screen_frees(
    runtime: SpeakerRuntime, probe: ControllerProbe, clock: ShiftableClock, play_log_path: Path
) -> None:
    await started(runtime)
    shown = show_command("led-1", NOTICE, display_s=LONG_S)
    await probe.send(shown)
    await probe.report(shown["id"], "playing")
    late = show_command("led-1", FLOOD, expires_in_s=60)
    await probe.send(late)
    await probe.report(late["id"], "delivered")

    clock.advance(120)
    await probe.send(stop_command("led-1", shown["id"]))
    expired = await probe.final_report(late["id"])

    assert expired["state"] == "expired"
    assert "waited for the screen" in expired["detail"]
    assert shown_headlines(play_log_path) == [NOTICE]


async def test_a_play_sent_to_a_screen_and_a_show_sent_to_a_speaker_are_rejected_naming_type(
    runtime: SpeakerRuntime, probe: ControllerProbe, play_log_path: Path
) -> None:
    await started(runtime)
    speaker = runtime.speaker("spk-1")
    await speaker.start(timeout=10)
    play = play_command("led-1", "http://127.0.0.1:9/media/x", "0" * 64, duration_s=1.0)
    show = show_command("spk-1", FLOOD)
    await probe.send(play)
    await probe.send(show)

    for command in (play, show):
        rejected = await probe.final_report(command["id"])
        assert rejected["state"] == "rejected"
        assert rejected["detail"].startswith("type:"), rejected["detail"]
        assert probe.states_of(command["id"]) == ["rejected"]
    assert "'play'" in (await probe.final_report(play["id"]))["detail"]
    assert log_events(play_log_path, play["id"]) == ["rejected"]


MALFORMED_SHOWS: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (setting("v", 2), "v"),
    (setting("id", "not-a-uuid"), "id"),
    # (A malformed `expires_at` is refused by the signature check: test_speaker_sim.py.)
    (without("broadcast_id"), "broadcast_id"),
    (setting("priority.rank", 3), "priority.rank"),
    (setting("mode", "test"), "mode"),
    (without("text"), "text"),
    (setting("text", "Cảnh báo"), "text"),
    (without("text.headline"), "text.headline"),
    (setting("text.headline", ""), "text.headline"),
    (setting("text.headline", "A" * 201), "text.headline"),
    (setting("text.headline", unicodedata.normalize("NFD", FLOOD)), "text.headline"),
    (setting("text.headline", 5), "text.headline"),
    (setting("text.body", "B" * 2001), "text.body"),
    (setting("text.body", unicodedata.normalize("NFD", NOTICE)), "text.body"),
    (without("display_s"), "display_s"),
    (setting("display_s", 0), "display_s"),
    (setting("display_s", 86_400.5), "display_s"),
    (setting("display_s", True), "display_s"),
    (setting("style", "red"), "style"),
    (setting("style", {"color": "blue"}), "style.color"),
    (setting("style", {"color": "red", "blink": "yes"}), "style.blink"),
]


async def test_malformed_shows_are_rejected_naming_the_member(
    runtime: SpeakerRuntime, probe: ControllerProbe, play_log_path: Path
) -> None:
    await started(runtime)
    sent: list[tuple[str, str]] = []
    for mutate, member in MALFORMED_SHOWS:
        command = show_command("led-1", FLOOD, body=NOTICE)
        mutate(command)
        await probe.send(command)
        sent.append((command["id"], member))
    longest = show_command("led-1", "\u00c1" * 200, body="B" * 2000, display_s=86_400)
    await probe.send(longest)

    for command_id, member in sent:
        report = await probe.final_report(command_id)
        assert report["state"] == "rejected", member
        assert report["detail"].startswith(f"{member}:"), (member, report["detail"])
    assert (await probe.report(longest["id"], "playing"))["state"] == "playing"
    shown = [entry for entry in read_play_log(play_log_path) if entry["event"] != "rejected"]
    assert {entry["command_id"] for entry in shown} == {longest["id"]}


async def test_a_duplicate_show_is_not_shown_again_and_its_latest_report_is_repeated(
    runtime: SpeakerRuntime, probe: ControllerProbe, play_log_path: Path
) -> None:
    await started(runtime)
    finished = show_command("led-1", NOTICE)
    await probe.send(finished)
    first_completion = await probe.report(finished["id"], "completed")
    await probe.send(finished)
    await probe.wait_until(lambda: probe.states_of(finished["id"]).count("completed") == 2)
    assert probe.reports_for(finished["id"])[-1] == first_completion

    ongoing = show_command("led-1", FLOOD, display_s=LONG_S)
    await probe.send(ongoing)
    await probe.report(ongoing["id"], "playing")
    await probe.send(ongoing)
    await probe.wait_until(lambda: probe.states_of(ongoing["id"]).count("playing") == 2)

    rejected = show_command("led-1", "")
    await probe.send(rejected)
    await probe.report(rejected["id"], "rejected")
    await probe.send(rejected)
    await probe.wait_until(lambda: probe.states_of(rejected["id"]).count("rejected") == 2)
    assert probe.reports_for(rejected["id"])[0] == probe.reports_for(rejected["id"])[1]

    assert log_events(play_log_path, finished["id"]) == ["delivered", "playing", "completed"]
    assert log_events(play_log_path, ongoing["id"]) == ["delivered", "playing"]
    assert shown_headlines(play_log_path) == [NOTICE, FLOOD]


async def test_a_screen_announces_shutdown_and_leaves_a_last_will(
    runtime: SpeakerRuntime, probe: ControllerProbe
) -> None:
    crashing = await started(runtime, "led-1")
    stopping = await started(runtime, "led-2")
    shown = show_command("led-2", FLOOD, display_s=LONG_S)
    await probe.send(shown)
    await probe.report(shown["id"], "playing")

    crashing.crash()
    await stopping.stop()

    assert await probe.state("led-1", lambda state: not state["online"]) == {
        "v": 1,
        "online": False,
        "reason": "will",
    }
    assert await probe.state("led-2", lambda state: not state["online"]) == {
        "v": 1,
        "online": False,
        "reason": "shutdown",
    }
    failed = await probe.final_report(shown["id"])
    assert (failed["state"], failed["detail"]) == ("failed", "the device shut down before the command ended")


# Fleets of speakers and screens


async def test_a_fleet_runs_speakers_and_screens_side_by_side(
    mosquitto: TestBroker, probe: ControllerProbe, media_server: MediaServer, tmp_path: Path
) -> None:
    play_log = tmp_path / "play.jsonl"
    config = FleetConfig(
        broker=device_broker(mosquitto),
        command_key=TEST_COMMAND_KEY_TEXT,
        addresses=("spk-a", "spk-b"),
        screens=("led-a", "led-b", "led-c"),
        speed=50,
        play_log=play_log,
    )
    sha256 = media_server.add_media(wav_bytes(0.5))
    async with Fleet(config) as running:
        assert len(running) == 5
        assert set(running.screens) == {"led-a", "led-b", "led-c"}
        assert set(running.speakers) == {"spk-a", "spk-b"}
        headlines = {address: f"{NOTICE} ({address})" for address in config.screens}
        commands = [show_command(address, headlines[address]) for address in config.screens] + [
            play_command(address, media_server.media_url(sha256), sha256, duration_s=0.5)
            for address in config.addresses
        ]
        for command in commands:
            await probe.send(command)
        finals = [await probe.final_report(command["id"], timeout=WAIT_S) for command in commands]
        for address in config.screens:
            online = await probe.state(address, lambda state: state["online"])
            assert online["kind"] == "led_screen"

    assert {final["state"] for final in finals} == {"completed"}
    entries = read_play_log(play_log)
    assert {
        str(entry["address"]): entry.get("headline") for entry in entries if entry["event"] == "playing"
    } == {**headlines, "spk-a": None, "spk-b": None}


async def test_cli_fleet_from_csv_starts_screens_for_led_screen_rows(
    mosquitto: TestBroker, probe: ControllerProbe, tmp_path: Path
) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text(
        "address,kind,ward\nspk-a,speaker,P1\nled-1,led_screen,P1\nsen-1,sensor,P1\nspk-b,,P2\nled-2,LED_SCREEN,P2\n"
    )
    play_log = tmp_path / "play.jsonl"
    process = await start_fleet_cli(
        mosquitto,
        "--csv",
        str(devices),
        "--kinds",
        "speaker,led_screen",
        "--processes",
        "2",
        "--speed",
        "50",
        "--play-log",
        str(play_log),
    )
    assert process.stdout is not None
    try:
        assert (await asyncio.wait_for(process.stdout.readline(), WAIT_S)).decode() == "READY 4\n"
        for address in ("led-1", "led-2"):
            online = await probe.state(address, lambda state: state["online"])
            assert online["kind"] == "led_screen"
        assert (await probe.state("spk-b", lambda state: state["online"]))["kind"] == "speaker"
        commands = [show_command("led-1", FLOOD), show_command("led-2", NOTICE)]
        for command in commands:
            await probe.send(command)
        for command in commands:
            assert (await probe.final_report(command["id"], timeout=WAIT_S))["state"] == "completed"
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), WAIT_S) == 0

    assert "sen-1" not in probe.states
    shutdown = {"v": 1, "online": False, "reason": "shutdown"}
    await probe.wait_until(
        lambda: all(probe.states[a][-1] == shutdown for a in ("spk-a", "spk-b", "led-1", "led-2"))
    )
    assert sorted(shown_headlines(play_log, "led-1") + shown_headlines(play_log, "led-2")) == sorted(
        [FLOOD, NOTICE]
    )


def test_devices_from_csv_and_from_the_api_keep_the_kinds_asked_for(
    tmp_path: Path, media_server: MediaServer
) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text("address,kind\nspk-1,speaker\nled-1,led_screen\nspk-2,\nsen-1,sensor\n")
    assert devices_from_csv(devices) == [("spk-1", "speaker"), ("spk-2", "speaker")]
    assert devices_from_csv(devices, ("led_screen",)) == [("led-1", "led_screen")]
    assert devices_from_csv(devices, ("speaker", "led_screen")) == [
        ("spk-1", "speaker"),
        ("led-1", "led_screen"),
        ("spk-2", "speaker"),
    ]

    # The test server ignores the `kind` query; the client keeps only the kind it asked for.
    listed = [
        {"address": "spk-1", "kind": "speaker", "transport": "mqtt"},
        {"address": "led-1", "kind": "led_screen", "transport": "mqtt"},
        {"address": "led-serial", "kind": "led_screen", "transport": "serial"},
    ]
    media_server.add_json("/api/v1/devices", {"items": listed}, token="s3cret")
    assert devices_from_api(media_server.base_url, "s3cret", ("speaker", "led_screen")) == [
        ("spk-1", "speaker"),
        ("led-1", "led_screen"),
    ]


def test_fleet_config_with_screens_survives_the_trip_to_a_worker() -> None:
    broker = BrokerSettings(host="127.0.0.1")
    config = FleetConfig(
        broker=broker, addresses=("a",), screens=("led-a", "led-b"), command_key=TEST_COMMAND_KEY_TEXT
    )
    assert FleetConfig.from_json(config.to_json()) == config


def test_unknown_kinds_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet.main(["--count", "1", "--kinds", "speaker,camera"]) == 2
    assert "--kinds" in capsys.readouterr().err
