"""The simulated speaker against a real Mosquitto, a real HTTP media server and a controller probe."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.playlog import read_play_log
from firmware_sim.speaker import BrokerSettings, MqttProtocol, SpeakerRuntime
from tests.sim_harness import (
    MEDIA_S,
    TEST_COMMAND_KEY,
    ControllerProbe,
    MediaServer,
    ShiftableClock,
    media_object,
    play_command,
    sign_document,
    started,
    stop_command,
    wav_bytes,
)
from tests.support.broker import TestBroker

SPEED = 20.0
LONG_REPEATS = 400  # 200 s of audio, 10 s at SPEED: far longer than any test waits for it
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")

OpenRuntime = Callable[..., Awaitable[SpeakerRuntime]]


@pytest.fixture
async def open_runtime(
    mosquitto: TestBroker, clock: ShiftableClock, play_log_path: Path
) -> AsyncIterator[OpenRuntime]:
    async with contextlib.AsyncExitStack() as stack:

        async def open_runtime(protocol: MqttProtocol = "3.1.1") -> SpeakerRuntime:
            settings = BrokerSettings(
                host=mosquitto.host,
                port=mosquitto.port,
                username=mosquitto.simulator.username,
                password=mosquitto.simulator.password,
                protocol=protocol,
            )
            runtime = SpeakerRuntime(
                settings, speed=SPEED, clock=clock, play_log=play_log_path, command_key=TEST_COMMAND_KEY
            )
            return await stack.enter_async_context(runtime)

        yield open_runtime


@pytest.fixture
async def runtime(open_runtime: OpenRuntime) -> SpeakerRuntime:
    return await open_runtime()


def log_events(play_log_path: Path, command_id: str) -> list[str]:
    return [
        str(entry["event"]) for entry in read_play_log(play_log_path) if entry["command_id"] == command_id
    ]


def play(address: str, media: tuple[str, str], **options: Any) -> dict[str, Any]:
    url, sha256 = media
    return play_command(address, url, sha256, duration_s=MEDIA_S, **options)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_play_is_delivered_played_and_completed(
    open_runtime: OpenRuntime,
    probe: ControllerProbe,
    media: tuple[str, str],
    play_log_path: Path,
    protocol: MqttProtocol,
) -> None:
    await started(await open_runtime(protocol))
    online = await probe.state("spk-1", lambda state: state["online"])
    assert online["kind"] == "speaker"
    assert online["firmware"] == "sim-1.0.0"
    assert online["playing"] is None
    assert isinstance(online["volume"], int)
    assert isinstance(online["rssi_dbm"], int)
    assert TIMESTAMP.fullmatch(online["at"])

    command = play("spk-1", media, repeats=2, mode="drill")
    await probe.send(command)
    completed = await probe.report(command["id"], "completed")

    assert probe.states_of(command["id"]) == ["delivered", "playing", "completed"]
    assert completed["played_s"] == pytest.approx(2 * MEDIA_S)
    assert completed["truncated"] is False
    for report in probe.reports_for(command["id"]):
        assert report["v"] == 1
        assert report["correlation_id"] == command["correlation_id"]
        assert TIMESTAMP.fullmatch(report["at"])
    states = await probe.wait_until(
        lambda: (
            (states := [s["playing"] for s in probe.states["spk-1"]])[-1] is None
            and len(states) >= 3
            and states
        )
    )
    assert states == [None, command["id"], None]
    entries = [entry for entry in read_play_log(play_log_path) if entry["command_id"] == command["id"]]
    assert [entry["event"] for entry in entries] == ["delivered", "playing", "completed"]
    assert {entry["broadcast_id"] for entry in entries} == {command["broadcast_id"]}
    assert {entry["mode"] for entry in entries} == {"drill"}
    assert {entry["address"] for entry in entries} == {"spk-1"}


async def test_playback_is_cut_at_max_duration(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str]
) -> None:
    await started(runtime)
    command = play("spk-1", media, repeats=5, max_duration_s=1.2)
    await probe.send(command)
    completed = await probe.report(command["id"], "completed")
    assert completed["played_s"] == pytest.approx(1.2)
    assert completed["truncated"] is True


async def test_duplicate_command_is_not_played_again_and_its_latest_report_is_repeated(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    await started(runtime)
    finished = play("spk-1", media)
    await probe.send(finished)
    first_completion = await probe.report(finished["id"], "completed")
    await probe.send(finished)
    await probe.wait_until(lambda: probe.states_of(finished["id"]).count("completed") == 2)
    assert probe.reports_for(finished["id"])[-1] == first_completion

    ongoing = play("spk-1", media, repeats=LONG_REPEATS)
    await probe.send(ongoing)
    await probe.report(ongoing["id"], "playing")
    await probe.send(ongoing)
    await probe.wait_until(lambda: probe.states_of(ongoing["id"]).count("playing") == 2)
    stop = stop_command("spk-1", ongoing["id"])
    await probe.send(stop)
    await probe.report(stop["id"], "completed")

    assert log_events(play_log_path, finished["id"]) == ["delivered", "playing", "completed"]
    assert log_events(play_log_path, ongoing["id"]) == ["delivered", "playing", "stopped"]


async def test_command_arriving_after_its_expiry_is_expired_and_never_plays(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    await started(runtime)
    issued_long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    command = play("spk-1", media, now=issued_long_ago, expires_in_s=60)
    await probe.send(command)
    expired = await probe.final_report(command["id"])
    assert expired["state"] == "expired"
    assert expired["detail"]
    assert probe.states_of(command["id"]) == ["expired"]
    assert log_events(play_log_path, command["id"]) == ["expired"]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_offline_speaker_gets_queued_commands_and_plays_only_the_unexpired(
    open_runtime: OpenRuntime,
    probe: ControllerProbe,
    media: tuple[str, str],
    clock: ShiftableClock,
    play_log_path: Path,
    protocol: MqttProtocol,
) -> None:
    speaker = await started(await open_runtime(protocol))
    await speaker.stop()
    offline = await probe.state("spk-1", lambda state: not state["online"])
    assert offline == {"v": 1, "online": False, "reason": "shutdown"}

    short_lived = play("spk-1", media, expires_in_s=30)
    long_lived = play("spk-1", media, expires_in_s=600)
    await probe.send(short_lived)
    await probe.send(long_lived)
    clock.advance(60)  # the speaker comes back after the first command expired
    await speaker.start(timeout=10)

    assert (await probe.final_report(short_lived["id"]))["state"] == "expired"
    assert (await probe.final_report(long_lived["id"]))["state"] == "completed"
    assert probe.states_of(short_lived["id"]) == ["expired"]
    assert log_events(play_log_path, short_lived["id"]) == ["expired"]
    assert log_events(play_log_path, long_lived["id"]) == ["delivered", "playing", "completed"]


async def test_stop_ends_the_playing_command(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str]
) -> None:
    speaker = await started(runtime)
    command = play("spk-1", media, repeats=LONG_REPEATS)
    await probe.send(command)
    await probe.report(command["id"], "playing")
    stop = stop_command("spk-1", command["id"])
    await probe.send(stop)

    stopped = await probe.final_report(command["id"])
    assert stopped["state"] == "stopped"
    assert 0 < stopped["played_s"] < LONG_REPEATS * MEDIA_S
    assert (await probe.report(stop["id"], "completed"))["correlation_id"] == stop["correlation_id"]
    assert speaker.playing is None
    await probe.state("spk-1", lambda state: state.get("playing", "") is None)

    stale_stop = stop_command("spk-1", command["id"])
    await probe.send(stale_stop)
    assert "nothing to stop" in (await probe.report(stale_stop["id"], "completed"))["detail"]


async def test_stop_all_also_drops_the_commands_waiting_for_the_speaker(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    await started(runtime)
    alert = play("spk-1", media, band="emergency", repeats=LONG_REPEATS)
    notice = play("spk-1", media, band="normal")
    await probe.send(alert)
    await probe.report(alert["id"], "playing")
    await probe.send(notice)
    await probe.report(notice["id"], "delivered")
    stop = stop_command("spk-1", "*", reason="all_clear")
    await probe.send(stop)

    await probe.report(stop["id"], "completed")
    assert (await probe.final_report(alert["id"]))["state"] == "stopped"
    waiting = await probe.final_report(notice["id"])
    assert waiting["state"] == "stopped"
    assert waiting["played_s"] == 0
    assert log_events(play_log_path, notice["id"]) == ["delivered", "stopped"]


async def test_higher_rank_preempts_the_playing_command(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str]
) -> None:
    await started(runtime)
    notice = play("spk-1", media, band="normal", sub=200, repeats=LONG_REPEATS)
    alert = play("spk-1", media, band="priority", sub=0)
    await probe.send(notice)
    await probe.report(notice["id"], "playing")
    await probe.send(alert)

    interrupted = await probe.final_report(notice["id"])
    assert interrupted["state"] == "interrupted"
    assert interrupted["played_s"] > 0
    assert (await probe.final_report(alert["id"]))["state"] == "completed"
    assert probe.states_of(alert["id"]) == ["delivered", "playing", "completed"]
    alert_playing = await probe.report(alert["id"], "playing")
    assert alert_playing["at"] >= interrupted["at"]


async def test_equal_rank_outside_emergency_keeps_the_first_and_plays_the_second_afterwards(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str]
) -> None:
    await started(runtime)
    first = play("spk-1", media, band="priority", sub=7, repeats=40)  # 20 s of audio: 1 s at SPEED
    second = play("spk-1", media, band="priority", sub=7)
    await probe.send(first)
    await probe.report(first["id"], "playing")
    await probe.send(second)

    second_done = await probe.final_report(second["id"])
    first_done = await probe.final_report(first["id"])
    assert first_done["state"] == "completed"
    assert second_done["state"] == "completed"
    second_delivered = await probe.report(second["id"], "delivered")
    second_playing = await probe.report(second["id"], "playing")
    assert second_delivered["at"] < first_done["at"] <= second_playing["at"]


async def test_equal_rank_in_the_emergency_band_lets_the_newest_win(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str]
) -> None:
    await started(runtime)
    older = play("spk-1", media, band="emergency", sub=3, repeats=LONG_REPEATS)
    newer = play("spk-1", media, band="emergency", sub=3)
    await probe.send(older)
    await probe.report(older["id"], "playing")
    await probe.send(newer)

    assert (await probe.final_report(older["id"]))["state"] == "interrupted"
    assert (await probe.final_report(newer["id"]))["state"] == "completed"


async def test_command_waiting_past_its_expiry_is_expired_when_the_speaker_frees(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    media: tuple[str, str],
    clock: ShiftableClock,
    play_log_path: Path,
) -> None:
    await started(runtime)
    alert = play("spk-1", media, band="emergency", repeats=LONG_REPEATS)
    notice = play("spk-1", media, band="normal", expires_in_s=30)
    await probe.send(alert)
    await probe.report(alert["id"], "playing")
    await probe.send(notice)
    await probe.report(notice["id"], "delivered")
    clock.advance(60)
    await probe.send(stop_command("spk-1", alert["id"]))

    assert (await probe.final_report(alert["id"]))["state"] == "stopped"
    expired = await probe.final_report(notice["id"])
    assert expired["state"] == "expired"
    assert log_events(play_log_path, notice["id"]) == ["delivered", "expired"]


async def test_sha256_mismatch_fails_without_playing(
    runtime: SpeakerRuntime, probe: ControllerProbe, media_server: MediaServer, play_log_path: Path
) -> None:
    await started(runtime)
    served = media_server.add_media(wav_bytes(MEDIA_S))
    claimed = media_server.add_media(wav_bytes(2 * MEDIA_S))
    command = play_command("spk-1", media_server.media_url(served), claimed, duration_s=MEDIA_S)
    await probe.send(command)

    failed = await probe.final_report(command["id"])
    assert failed["state"] == "failed"
    assert failed["detail"] == "sha256 mismatch"
    assert probe.states_of(command["id"]) == ["delivered", "failed"]
    assert log_events(play_log_path, command["id"]) == ["delivered", "failed"]


@pytest.mark.parametrize(
    ("body", "served", "detail"),
    [
        (b"RIFF and nothing else", True, "audio could not be decoded"),
        (b"never uploaded", False, "HTTP 404"),
    ],
)
async def test_media_that_cannot_be_fetched_or_decoded_fails(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    media_server: MediaServer,
    body: bytes,
    served: bool,
    detail: str,
) -> None:
    await started(runtime)
    sha256 = media_server.add_media(body)
    if not served:
        media_server.resources.clear()
    command = play_command("spk-1", media_server.media_url(sha256), sha256, duration_s=MEDIA_S)
    await probe.send(command)

    failed = await probe.final_report(command["id"])
    assert failed["state"] == "failed"
    assert detail in failed["detail"]


async def test_interrupted_media_transfer_resumes_with_a_range_request(
    runtime: SpeakerRuntime, probe: ControllerProbe, media_server: MediaServer
) -> None:
    await started(runtime)
    body = wav_bytes(MEDIA_S)
    sha256 = media_server.add_media(body, cut_first_transfer=True)
    command = play_command("spk-1", media_server.media_url(sha256), sha256, duration_s=MEDIA_S)
    await probe.send(command)

    assert (await probe.final_report(command["id"]))["state"] == "completed"
    assert media_server.requests_for(sha256) == [None, f"bytes={len(body) // 2}-"]


async def test_each_speaker_caches_the_media_it_verified(
    runtime: SpeakerRuntime, probe: ControllerProbe, media_server: MediaServer, media: tuple[str, str]
) -> None:
    await started(runtime)
    for _ in range(2):
        command = play("spk-1", media)
        await probe.send(command)
        assert (await probe.final_report(command["id"]))["state"] == "completed"
    assert len(media_server.requests_for(media[1])) == 1


async def test_command_meant_for_another_device_is_rejected(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    await started(runtime)
    command = play("spk-other", media)
    # Genuinely signed by the controller, for another speaker, and copied onto this one's topic.
    await probe.send_raw("spk-1", json.dumps(sign_document(command)).encode())

    rejected = await probe.final_report(command["id"])
    assert rejected["state"] == "rejected"
    assert rejected["_address"] == "spk-1"
    assert rejected["reason"] == "wrong_target"
    assert rejected["detail"] == "signed for device:spk-other, received as device:spk-1"
    assert log_events(play_log_path, command["id"]) == ["rejected"]


def _without(member: str) -> Callable[[dict[str, Any]], None]:
    def mutate(command: dict[str, Any]) -> None:
        del command[member]

    return mutate


def _setting(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(command: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = command
        for parent in parents:
            target = target[parent]
        target[leaf] = value

    return mutate


MALFORMED_PLAYS: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (_setting("v", 2), "v"),
    (_setting("type", "pause"), "type"),
    (_setting("id", "not-a-uuid"), "id"),
    (_without("correlation_id"), "correlation_id"),
    (_without("broadcast_id"), "broadcast_id"),
    (_setting("priority.rank", 3), "priority.rank"),
    (_setting("priority.class", "urgent"), "priority.class"),
    (_setting("priority.sub", 256), "priority.sub"),
    (_setting("mode", "test"), "mode"),
    (_setting("media.sha256", "abc"), "media.sha256"),
    (_setting("media.url", "ftp://example.org/a.wav"), "media.url"),
    (_setting("media.duration_s", True), "media.duration_s"),
    (_setting("repeats", 0), "repeats"),
    (_setting("max_duration_s", -1), "max_duration_s"),
    (_setting("gap_s", -0.5), "gap_s"),
    (_setting("gap_s", "1"), "gap_s"),
]


async def test_malformed_commands_are_rejected_naming_the_member(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    await started(runtime)
    sent: list[tuple[str, str]] = []
    for mutate, member in MALFORMED_PLAYS:
        command = play("spk-1", media)
        mutate(command)
        command["device"] = "spk-1"
        await probe.send(command)
        sent.append((command["id"], member))
    bad_stop = stop_command("spk-1", "*", reason="because")
    await probe.send(bad_stop)
    sent.append((bad_stop["id"], "reason"))

    await assert_rejected(probe, sent, play_log_path)


# Members the signature's header repeats (docs/protocol.md §1.15): malformed, the signature no longer
# describes the command, which is refused before its members are read.
MALFORMED_HEADER_MEMBERS: list[Callable[[dict[str, Any]], None]] = [
    _without("issued_at"),
    _setting("expires_at", "2030-01-01T06:00:00+07:00"),
    _setting("seq", "1"),
]


async def test_commands_whose_signed_members_are_malformed_are_refused(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    await started(runtime)
    ids = []
    for mutate in MALFORMED_HEADER_MEMBERS:
        command = play("spk-1", media)
        mutate(command)
        await probe.send(command)
        ids.append(command["id"])
    for command_id in ids:
        report = await probe.final_report(command_id)
        assert (report["state"], report["reason"]) == ("rejected", "header_mismatch"), report
    assert not [entry for entry in read_play_log(play_log_path) if entry["event"] != "rejected"]


async def assert_rejected(probe: ControllerProbe, sent: list[tuple[str, str]], play_log_path: Path) -> None:
    """Each (command id, member) was rejected with a detail naming the member, and nothing played."""
    for command_id, member in sent:
        report = await probe.final_report(command_id)
        assert report["state"] == "rejected", member
        assert report["detail"].startswith(f"{member}:"), (member, report["detail"])
        assert probe.states_of(command_id) == ["rejected"]
    assert not [entry for entry in read_play_log(play_log_path) if entry["event"] != "rejected"]


async def test_payloads_without_an_id_are_logged_and_ignored(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    await started(runtime)
    caplog.set_level(logging.WARNING, logger="firmware_sim.speaker")
    for payload in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"v": 1, "type": "play"}'):
        await probe.send_raw("spk-1", payload)
    command = play("spk-1", media)
    await probe.send(command)

    assert (await probe.final_report(command["id"]))["state"] == "completed"
    ignored = [record for record in caplog.records if "no report could name" in record.getMessage()]
    assert len(ignored) == 4
    assert {report["command_id"] for report in probe.reports} == {command["id"]}


async def test_abrupt_loss_publishes_the_last_will(runtime: SpeakerRuntime, probe: ControllerProbe) -> None:
    speaker = await started(runtime)
    await probe.state("spk-1", lambda state: state["online"])
    speaker.crash()
    will = await probe.state("spk-1", lambda state: not state["online"])
    assert will == {"v": 1, "online": False, "reason": "will"}


async def test_speaker_reconnects_to_its_session_after_a_link_drop(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str]
) -> None:
    speaker = await started(runtime)
    speaker.drop_connection()
    await probe.wait_until(
        lambda: [s["online"] for s in probe.states.get("spk-1", [])][-3:] == [True, False, True]
    )
    command = play("spk-1", media)
    await probe.send(command)
    assert (await probe.final_report(command["id"]))["state"] == "completed"
    assert speaker.connected


# Playlists and gaps (§1.3, §1.9)

PLAYLIST_S = (0.5, 1.0, 0.25)  # 1.75 s of audio per repeat; every length is exact in binary and in samples
OTHER_SHA256 = hashlib.sha256(b"a body nobody serves").hexdigest()


@pytest.fixture
def playlist_items(media_server: MediaServer) -> list[dict[str, Any]]:
    """Three WAVs of PLAYLIST_S seconds on the media server, as §1.3 media objects."""
    items = []
    for seconds in PLAYLIST_S:
        sha256 = media_server.add_media(wav_bytes(seconds))
        items.append(media_object(media_server.media_url(sha256), sha256, duration_s=seconds))
    return items


def play_list(address: str, items: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """A `play` carrying `items` as its playlist, `media` being the first of them."""
    first = items[0] if items else {"url": "http://unused.invalid/", "sha256": OTHER_SHA256, "duration_s": 1}
    return play_command(
        address, first["url"], first["sha256"], duration_s=first["duration_s"], playlist=items, **options
    )


def wire_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


async def test_playlist_plays_every_item_per_repeat_with_the_gap_between_repeats(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    media_server: MediaServer,
    playlist_items: list[dict[str, Any]],
    play_log_path: Path,
) -> None:
    await started(runtime)
    gap_s = 2.0
    command = play_list("spk-1", playlist_items, repeats=2, gap_s=gap_s)
    await probe.send(command)

    completed = await probe.report(command["id"], "completed")
    expected_s = sum(PLAYLIST_S) * 2 + gap_s  # 5.5 device seconds, one gap between two repeats
    assert probe.states_of(command["id"]) == ["delivered", "playing", "completed"]
    assert completed["played_s"] == pytest.approx(expected_s, abs=1e-3)
    assert completed["truncated"] is False
    # The speaker really played that long, in device seconds scaled by SPEED (0.275 s of wall time);
    # the upper bound is loose for a loaded machine but still catches an unscaled gap (2 s).
    playing = await probe.report(command["id"], "playing")
    wall_s = (wire_time(completed["at"]) - wire_time(playing["at"])).total_seconds()
    assert expected_s / SPEED - 0.02 <= wall_s < expected_s / SPEED + 1.5
    for item in playlist_items:
        assert len(media_server.requests_for(item["sha256"])) == 1
    assert log_events(play_log_path, command["id"]) == ["delivered", "playing", "completed"]

    again = play_list("spk-1", playlist_items)
    await probe.send(again)
    assert (await probe.report(again["id"], "completed"))["played_s"] == pytest.approx(sum(PLAYLIST_S))
    for item in playlist_items:  # every item came from the device's cache the second time
        assert len(media_server.requests_for(item["sha256"])) == 1


@pytest.mark.parametrize(
    ("repeats", "gap_s", "max_duration_s", "played_s", "truncated"),
    [
        (1, None, 1.2, 1.2, True),  # cut inside the second item of the only repeat
        (3, 0.5, 4.5, 4.5, True),  # cut inside the third repeat, after two items and a gap
        (3, 0.5, 6.25, 6.25, False),  # 3 x 1.75 + 2 x 0.5 is exactly the limit: nothing is cut
    ],
)
async def test_playlist_is_cut_at_max_duration_across_items_and_gaps(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    playlist_items: list[dict[str, Any]],
    repeats: int,
    gap_s: float | None,
    max_duration_s: float,
    played_s: float,
    truncated: bool,
) -> None:
    await started(runtime)
    command = play_list("spk-1", playlist_items, repeats=repeats, gap_s=gap_s, max_duration_s=max_duration_s)
    await probe.send(command)

    completed = await probe.report(command["id"], "completed")
    assert completed["played_s"] == pytest.approx(played_s, abs=1e-3)
    assert completed["truncated"] is truncated


@pytest.mark.parametrize(
    ("index", "fault", "detail"),
    [
        (0, "sha256", "playlist[0]: sha256 mismatch"),
        (1, "sha256", "playlist[1]: sha256 mismatch"),
        (2, "missing", "playlist[2]: fetch failed: HTTP 404"),
    ],
)
async def test_a_playlist_item_that_fails_fails_the_command_naming_the_item(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    media_server: MediaServer,
    playlist_items: list[dict[str, Any]],
    play_log_path: Path,
    index: int,
    fault: str,
    detail: str,
) -> None:
    await started(runtime)
    if fault == "sha256":  # the server sends the real body, the command claims another digest
        playlist_items[index]["sha256"] = OTHER_SHA256
    else:
        playlist_items[index] = media_object(
            media_server.media_url(OTHER_SHA256), OTHER_SHA256, duration_s=1.0
        )
    command = play_list("spk-1", playlist_items, repeats=2)
    await probe.send(command)

    failed = await probe.final_report(command["id"])
    assert failed["state"] == "failed"
    assert failed["detail"] == detail
    assert probe.states_of(command["id"]) == ["delivered", "failed"]
    assert log_events(play_log_path, command["id"]) == ["delivered", "failed"]


def _item_setting(index: int, member: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(command: dict[str, Any]) -> None:
        command["playlist"][index][member] = value

    return mutate


def _item_without(index: int, member: str) -> Callable[[dict[str, Any]], None]:
    def mutate(command: dict[str, Any]) -> None:
        del command["playlist"][index][member]

    return mutate


def _item_replaced(index: int, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(command: dict[str, Any]) -> None:
        command["playlist"][index] = value

    return mutate


MALFORMED_PLAYLISTS: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (_setting("playlist", []), "playlist"),
    (_setting("playlist", {"0": {}}), "playlist"),
    (_setting("playlist", None), "playlist"),
    (_item_replaced(1, "http://example.org/a.wav"), "playlist[1]"),
    (_item_setting(1, "sha256", "abc"), "playlist[1].sha256"),
    (_item_setting(2, "url", "ftp://example.org/a.wav"), "playlist[2].url"),
    (_item_setting(1, "duration_s", 0), "playlist[1].duration_s"),
    (_item_setting(2, "duration_s", "1.0"), "playlist[2].duration_s"),
    (_item_without(2, "content_type"), "playlist[2].content_type"),
    (_item_setting(0, "sha256", OTHER_SHA256), "playlist[0]"),  # no longer equal to `media`
    (_item_setting(0, "duration_s", 9.5), "playlist[0]"),
    (_setting("media.sha256", OTHER_SHA256), "playlist[0]"),
    (_setting("gap_s", -1), "gap_s"),
    (_setting("gap_s", True), "gap_s"),
    # (gap_s = Infinity is not JSON: the controller cannot sign it, so it never reaches validation.)
]


async def test_malformed_playlists_are_rejected_naming_the_member(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    playlist_items: list[dict[str, Any]],
    play_log_path: Path,
) -> None:
    await started(runtime)
    sent: list[tuple[str, str]] = []
    for mutate, member in MALFORMED_PLAYLISTS:
        command = play_list("spk-1", playlist_items, gap_s=1.0)
        mutate(command)
        await probe.send(command)
        sent.append((command["id"], member))

    await assert_rejected(probe, sent, play_log_path)


@pytest.mark.parametrize(
    ("gap_s", "as_playlist", "played_s"),
    [
        (None, False, 3 * MEDIA_S),  # the command as it was before playlists existed
        (0.25, False, 3 * MEDIA_S + 2 * 0.25),  # a gap applies to a single media too
        (0.25, True, 3 * MEDIA_S + 2 * 0.25),  # `playlist: [media]` means the same as no playlist
    ],
)
async def test_a_play_without_a_playlist_plays_its_media(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    media: tuple[str, str],
    play_log_path: Path,
    gap_s: float | None,
    as_playlist: bool,
    played_s: float,
) -> None:
    await started(runtime)
    command = play("spk-1", media, repeats=3, gap_s=gap_s)
    if as_playlist:
        command["playlist"] = [dict(command["media"])]
    assert ("playlist" in command) is as_playlist
    await probe.send(command)

    completed = await probe.report(command["id"], "completed")
    assert completed["played_s"] == pytest.approx(played_s, abs=1e-3)
    assert completed["truncated"] is False
    assert probe.states_of(command["id"]) == ["delivered", "playing", "completed"]
    assert log_events(play_log_path, command["id"]) == ["delivered", "playing", "completed"]


async def test_preemption_waits_until_every_playlist_item_is_verified(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    media_server: MediaServer,
    media: tuple[str, str],
    playlist_items: list[dict[str, Any]],
) -> None:
    speaker = await started(runtime)
    notice = play("spk-1", media, band="normal", repeats=LONG_REPEATS)
    await probe.send(notice)
    await probe.report(notice["id"], "playing")
    held = media_server.add_media(wav_bytes(0.75), held=True)
    items = [*playlist_items[:2], media_object(media_server.media_url(held), held, duration_s=0.75)]
    alert = play_list("spk-1", items, band="emergency")
    await probe.send(alert)
    await probe.report(alert["id"], "delivered")
    await media_server.requested(held)

    # The first items may be verified already; the last one is not, so nothing changes yet.
    assert speaker.playing == notice["id"]
    assert speaker.waiting == (alert["id"],)
    assert probe.states_of(notice["id"]) == ["delivered", "playing"]
    media_server.release(held)

    interrupted = await probe.final_report(notice["id"])
    assert interrupted["state"] == "interrupted"
    completed = await probe.final_report(alert["id"])
    assert completed["state"] == "completed"
    assert completed["played_s"] == pytest.approx(0.5 + 1.0 + 0.75, abs=1e-3)
    assert (await probe.report(alert["id"], "playing"))["at"] >= interrupted["at"]


async def test_stop_drops_a_playlist_still_being_fetched(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    media_server: MediaServer,
    playlist_items: list[dict[str, Any]],
    play_log_path: Path,
) -> None:
    await started(runtime)
    held = media_server.add_media(wav_bytes(0.75), held=True)
    items = [*playlist_items, media_object(media_server.media_url(held), held, duration_s=0.75)]
    fetching = play_list("spk-1", items)
    await probe.send(fetching)
    await media_server.requested(held)
    await probe.send(stop_command("spk-1", "*"))

    stopped = await probe.final_report(fetching["id"])
    assert stopped["state"] == "stopped"
    assert stopped["played_s"] == 0
    media_server.release(held)
    # The same items again: the held download finished for the cache, and the old command stays ended.
    again = play_list("spk-1", items)
    await probe.send(again)
    assert (await probe.final_report(again["id"]))["state"] == "completed"
    assert probe.states_of(fetching["id"]) == ["delivered", "stopped"]
    assert log_events(play_log_path, fetching["id"]) == ["delivered", "stopped"]
