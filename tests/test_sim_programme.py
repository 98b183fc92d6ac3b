"""The simulated speaker's programme cache (docs/protocol.md §1.10) against a real Mosquitto.

The link is cut with a TCP proxy between the speaker and the broker, so the speaker really loses its
broker (and the broker publishes its Last Will); the controller probe talks to the broker directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.playlog import read_play_log
from firmware_sim.programme import (
    ForeignProgrammeError,
    MalformedProgrammeError,
    parse_programme,
)
from firmware_sim.speaker import BrokerSettings, SimulatedSpeaker, SpeakerRuntime
from tests.sim_harness import (
    MEDIA_S,
    TEST_COMMAND_KEY,
    ControllerProbe,
    MediaServer,
    play_command,
    programme_document,
    started,
    timestamp,
    wav_bytes,
)
from tests.support.broker import TestBroker
from tests.support.proxy import LinkRelay

SPEED = 20.0
# 80 repeats of MEDIA_S at SPEED last 2 s of wall time: long enough to span a later item's start_at.
SPANNING_REPEATS = 80
WAIT_S = 10.0


@pytest.fixture
def proxy(mosquitto: TestBroker) -> Iterator[LinkRelay]:
    with LinkRelay(mosquitto.host, mosquitto.port) as relay:
        yield relay


@pytest.fixture
async def runtime(
    mosquitto: TestBroker, proxy: LinkRelay, play_log_path: Path
) -> AsyncIterator[SpeakerRuntime]:
    settings = BrokerSettings(
        host=proxy.host,
        port=proxy.port,
        username=mosquitto.simulator.username,
        password=mosquitto.simulator.password,
        # A restored link is found again within a fraction of a second.
        reconnect_first_delay_s=0.05,
        reconnect_max_delay_s=0.2,
    )
    async with contextlib.AsyncExitStack() as stack:
        yield await stack.enter_async_context(
            SpeakerRuntime(settings, speed=SPEED, play_log=play_log_path, command_key=TEST_COMMAND_KEY)
        )


def play(address: str, media: tuple[str, str], **options: Any) -> dict[str, Any]:
    url, sha256 = media
    return play_command(address, url, sha256, duration_s=MEDIA_S, **options)


def log_entries(play_log_path: Path, command_id: str) -> list[dict[str, object]]:
    return [entry for entry in read_play_log(play_log_path) if entry.get("command_id") == command_id]


def log_events(play_log_path: Path, command_id: str) -> list[str]:
    return [str(entry["event"]) for entry in log_entries(play_log_path, command_id)]


def wire_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


async def take(speaker: SimulatedSpeaker, probe: ControllerProbe, document: dict[str, Any]) -> None:
    """Publishes the programme and waits until the speaker holds it with its media verified."""
    generated_at = wire_time(document["generated_at"])
    await probe.publish_programme(speaker.address, document)
    await speaker.wait_until(
        lambda s: s.programme.generated_at == generated_at and s.programme.prefetched, WAIT_S
    )


async def cut(speaker: SimulatedSpeaker, proxy: LinkRelay) -> None:
    proxy.cut()
    await speaker.wait_until(lambda s: s.offline_since is not None, WAIT_S)


async def restore(speaker: SimulatedSpeaker, proxy: LinkRelay) -> None:
    proxy.restore()
    await speaker.wait_until(lambda s: s.connected and s.offline_reports_pending == 0, WAIT_S)


async def logged(speaker: SimulatedSpeaker, play_log_path: Path, command_id: str, event: str) -> None:
    await speaker.wait_until(lambda _: event in log_events(play_log_path, command_id), WAIT_S)


async def test_programme_is_taken_and_its_media_prefetched_before_any_play(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    proxy: LinkRelay,
    media_server: MediaServer,
    play_log_path: Path,
) -> None:
    speaker = await started(runtime)
    first = media_server.add_media(wav_bytes(0.25))
    second = media_server.add_media(wav_bytes(0.5))
    now = datetime.now(UTC)
    morning = play_command("spk-1", media_server.media_url(first), first, duration_s=0.25)
    evening = play_command("spk-1", media_server.media_url(second), second, duration_s=0.5)
    later = now + timedelta(hours=1)
    document = programme_document(
        "spk-1", [(later, morning), (later + timedelta(minutes=30), evening)], generated_at=now
    )

    await take(speaker, probe, document)

    assert speaker.programme.item_ids == (morning["id"], evening["id"])
    assert media_server.requests_for(first) == [None]
    assert media_server.requests_for(second) == [None]
    assert probe.reports == []
    # The speaker says it holds the programme with its media verified, and has played nothing.
    (ready,) = read_play_log(play_log_path)
    assert (ready["event"], ready["items"]) == ("programme", 2), ready

    # The broker re-sends the retained document on every reconnect: recognised, nothing refetched.
    await cut(speaker, proxy)
    await restore(speaker, proxy)
    await speaker.wait_until(lambda s: s.programme.documents == 2, WAIT_S)
    assert speaker.programme.item_ids == (morning["id"], evening["id"])
    assert speaker.programme.prefetched
    assert media_server.requests_for(first) == [None]
    assert media_server.requests_for(second) == [None]


async def test_nothing_plays_from_the_programme_while_connected(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str], play_log_path: Path
) -> None:
    speaker = await started(runtime)
    # An emergency item: had it started, it would have interrupted the live command below.
    item = play("spk-1", media, band="emergency")
    start_at = datetime.now(UTC) + timedelta(seconds=0.6)
    await take(speaker, probe, programme_document("spk-1", [(start_at, item)]))

    live = play("spk-1", media, repeats=SPANNING_REPEATS)
    await probe.send(live)
    completed = await probe.report(live["id"], "completed")

    playing = await probe.report(live["id"], "playing")
    assert wire_time(playing["at"]) < start_at < wire_time(completed["at"]), "the item fell due mid-play"
    assert probe.states_of(live["id"]) == ["delivered", "playing", "completed"]
    assert probe.reports_for(item["id"]) == []
    assert log_events(play_log_path, item["id"]) == []
    assert all("offline" not in report for report in probe.reports)
    assert speaker.programme.item_ids == (item["id"],)


async def test_offline_speaker_plays_its_programme_and_reports_on_reconnection(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    proxy: LinkRelay,
    media: tuple[str, str],
    media_server: MediaServer,
    play_log_path: Path,
) -> None:
    speaker = await started(runtime)
    now = datetime.now(UTC)
    passed = play("spk-1", media)  # start_at passed while connected: never played from the cache
    due = play("spk-1", media)
    stale = play("spk-1", media, now=now - timedelta(seconds=120), expires_in_s=60)
    start_at = now + timedelta(seconds=1)
    document = programme_document(
        "spk-1",
        [(now - timedelta(seconds=1), passed), (start_at, due), (start_at, stale)],
        generated_at=now,
    )
    await take(speaker, probe, document)
    fetches = len(media_server.requests)

    await cut(speaker, proxy)
    assert await probe.state("spk-1", lambda state: not state["online"]) == {
        "v": 1,
        "online": False,
        "reason": "will",
    }
    # The controller's live copy of the occurrence waits for the speaker in its persistent session.
    await probe.send(due)
    await logged(speaker, play_log_path, due["id"], "completed")

    assert len(media_server.requests) == fetches, "played from the cache, without a fetch"
    assert probe.reports_for(due["id"]) == [], "nothing reaches the controller while the link is down"
    assert speaker.offline_reports_pending == 4
    entries = log_entries(play_log_path, due["id"])
    assert [entry["event"] for entry in entries] == ["delivered", "playing", "completed"]
    assert {entry["offline"] for entry in entries} == {True}
    assert wire_time(str(entries[0]["at"])) >= start_at
    assert log_events(play_log_path, stale["id"]) == ["expired"]
    assert log_events(play_log_path, passed["id"]) == []

    await restore(speaker, proxy)
    # Kept reports first, in order; then the live command is answered by a re-published report.
    await probe.wait_until(lambda: probe.states_of(due["id"]).count("completed") == 2)
    assert [(report["command_id"], report["state"]) for report in probe.reports] == [
        (due["id"], "delivered"),
        (due["id"], "playing"),
        (stale["id"], "expired"),
        (due["id"], "completed"),
        (due["id"], "completed"),
    ]
    assert all(report["offline"] is True for report in probe.reports)
    completed, republished = probe.reports_for(due["id"])[2:]
    assert republished == completed
    assert completed["played_s"] == pytest.approx(MEDIA_S)
    assert [entry["event"] for entry in log_entries(play_log_path, due["id"])] == [
        "delivered",
        "playing",
        "completed",
    ], "the live command did not play a second time"
    assert probe.reports_for(passed["id"]) == []
    await probe.state("spk-1", lambda state: state["online"])


async def test_stop_after_plays_only_items_starting_within_the_limit(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    proxy: LinkRelay,
    media: tuple[str, str],
    play_log_path: Path,
) -> None:
    speaker = await started(runtime)
    now = datetime.now(UTC)
    within = play("spk-1", media, repeats=SPANNING_REPEATS)  # still playing when `beyond` falls due
    beyond = play("spk-1", media)
    after_s = 1.5
    document = programme_document(
        "spk-1",
        [(now + timedelta(seconds=1), within), (now + timedelta(seconds=2), beyond)],
        generated_at=now,
        comm_loss={"policy": "stop_after", "after_s": after_s},
    )
    await take(speaker, probe, document)

    await cut(speaker, proxy)
    offline_since = speaker.offline_since
    assert offline_since is not None
    limit = offline_since + timedelta(seconds=after_s)
    assert now + timedelta(seconds=1) < limit <= now + timedelta(seconds=2), "the cut came too late"
    await logged(speaker, play_log_path, within["id"], "completed")

    completed_at = wire_time(str(log_entries(play_log_path, within["id"])[-1]["at"]))
    assert completed_at > now + timedelta(seconds=2), "`beyond` fell due while the speaker was offline"
    assert log_events(play_log_path, beyond["id"]) == []

    await restore(speaker, proxy)
    await probe.report(within["id"], "completed")
    assert probe.states_of(within["id"]) == ["delivered", "playing", "completed"]
    assert {report["offline"] for report in probe.reports_for(within["id"])} == {True}
    assert probe.reports_for(beyond["id"]) == []


async def test_a_newer_programme_replaces_the_held_one_entirely(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    proxy: LinkRelay,
    media: tuple[str, str],
    play_log_path: Path,
) -> None:
    speaker = await started(runtime)
    now = datetime.now(UTC)
    start_at = now + timedelta(seconds=1)
    dropped = play("spk-1", media)
    kept = play("spk-1", media)
    await take(speaker, probe, programme_document("spk-1", [(start_at, dropped)], generated_at=now))
    newer = programme_document("spk-1", [(start_at, kept)], generated_at=now + timedelta(seconds=1))
    await take(speaker, probe, newer)
    assert speaker.programme.item_ids == (kept["id"],)

    await cut(speaker, proxy)
    await logged(speaker, play_log_path, kept["id"], "completed")
    assert log_events(play_log_path, dropped["id"]) == []
    await restore(speaker, proxy)
    await probe.report(kept["id"], "completed")
    assert probe.reports_for(dropped["id"]) == []

    # An empty payload is anyone's (it carries no signature): it changes nothing (§1.15.6).
    await probe.publish_programme("spk-1", b"")
    await speaker.wait_until(
        lambda s: (s.programme.last_ignored or "").startswith("an empty payload"), WAIT_S
    )
    assert speaker.programme.item_ids == (kept["id"],)
    # The controller empties a programme with a signed one that holds nothing.
    await take(speaker, probe, programme_document("spk-1", [], generated_at=now + timedelta(seconds=2)))
    assert speaker.programme.item_ids == ()


async def test_a_crashed_speaker_plays_nothing_and_keeps_its_programme(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    proxy: LinkRelay,
    media: tuple[str, str],
    media_server: MediaServer,
    play_log_path: Path,
) -> None:
    crashed = await started(runtime, "spk-1")
    witness = await started(runtime, "spk-2")
    now = datetime.now(UTC)
    start_at = now + timedelta(seconds=1)
    lost = play("spk-1", media)
    # The same instant on a speaker that stays powered: once it has played, `start_at` has passed.
    seen = play("spk-2", media)
    await take(crashed, probe, programme_document("spk-1", [(start_at, lost)], generated_at=now))
    await take(witness, probe, programme_document("spk-2", [(start_at, seen)], generated_at=now))

    crashed.crash()
    await cut(witness, proxy)
    await logged(witness, play_log_path, seen["id"], "completed")
    assert log_events(play_log_path, lost["id"]) == []
    assert crashed.programme.item_ids == (lost["id"],), "the programme survives a power cut"

    await restore(witness, proxy)
    fetches = len(media_server.requests)
    await crashed.start(timeout=WAIT_S)
    await crashed.wait_until(lambda s: s.programme.documents == 2, WAIT_S)
    assert crashed.programme.item_ids == (lost["id"],)
    assert len(media_server.requests) == fetches
    await probe.report(seen["id"], "completed")
    assert probe.reports_for(lost["id"]) == []
    assert log_events(play_log_path, lost["id"]) == []


async def test_only_the_latest_reports_are_kept_while_offline(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    proxy: LinkRelay,
    media: tuple[str, str],
    play_log_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="firmware_sim.speaker")
    speaker = await started(runtime, offline_reports_kept=2)
    now = datetime.now(UTC)
    item = play("spk-1", media)
    await take(speaker, probe, programme_document("spk-1", [(now + timedelta(seconds=1), item)]))

    await cut(speaker, proxy)
    await logged(speaker, play_log_path, item["id"], "completed")
    assert speaker.offline_reports_pending == 2
    assert speaker.offline_reports_dropped == 1

    await restore(speaker, proxy)
    await probe.report(item["id"], "completed")
    assert probe.states_of(item["id"]) == ["playing", "completed"]
    assert any(
        "1 reports made while the link was down were dropped" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    ("change", "member"),
    [
        (lambda d: d["items"][0]["command"]["media"].update(sha256="xyz"), "items[0].command.media.sha256"),
        (lambda d: d["items"][0]["command"].update(type="stop"), "items[0].command."),
        (lambda d: d["items"][0]["command"].update(device="spk-2"), "items[0].command.device"),
        (lambda d: d["items"].reverse(), "items[1].start_at"),
        (lambda d: d["items"][1].update(command=d["items"][0]["command"]), "items[1].command.id"),
        (lambda d: d.update(comm_loss={"policy": "forever"}), "comm_loss.policy"),
        (lambda d: d.update(comm_loss={"policy": "stop_after"}), "comm_loss.after_s"),
        # What the signature's header repeats is checked with the signature (§1.15.5).
        (lambda d: d.update(valid_until="2020-01-01T00:00:00Z"), "expired"),
        (lambda d: d.update(generated_at="2026-11-24T06:00:00+07:00"), "header_mismatch"),
        (lambda d: d.update(items={}), "items"),
        (lambda d: d.update(v=2), "v"),
        (lambda d: d.update(device="spk-2"), "wrong_target"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
async def test_ignored_documents_keep_the_held_programme(
    runtime: SpeakerRuntime,
    probe: ControllerProbe,
    media: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    change: Any,
    member: str,
) -> None:
    caplog.set_level(logging.INFO, logger="firmware_sim.speaker")
    speaker = await started(runtime)
    now = datetime.now(UTC)
    held = programme_document(
        "spk-1",
        [(now + timedelta(hours=1), play("spk-1", media)), (now + timedelta(hours=2), play("spk-1", media))],
        generated_at=now,
    )
    await take(speaker, probe, held)
    before = speaker.programme

    bad = json.loads(json.dumps(held))
    bad["generated_at"] = timestamp(now + timedelta(seconds=1))
    change(bad)
    await probe.publish_programme("spk-1", bad)
    await speaker.wait_until(lambda s: s.programme.documents == before.documents + 1, WAIT_S)

    after = speaker.programme
    assert (after.generated_at, after.item_ids) == (before.generated_at, before.item_ids)
    assert after.last_ignored is not None
    assert after.last_ignored.startswith(member)
    assert any(
        record.levelno == logging.WARNING and f"ignored a programme document: {member}" in record.getMessage()
        for record in caplog.records
    )


async def test_an_older_or_unreadable_document_is_ignored(
    runtime: SpeakerRuntime, probe: ControllerProbe, media: tuple[str, str]
) -> None:
    speaker = await started(runtime)
    now = datetime.now(UTC)
    held = programme_document("spk-1", [(now + timedelta(hours=1), play("spk-1", media))], generated_at=now)
    await take(speaker, probe, held)
    older = programme_document(
        "spk-1", [(now + timedelta(hours=1), play("spk-1", media))], generated_at=now - timedelta(seconds=1)
    )

    await probe.publish_programme("spk-1", older)
    await speaker.wait_until(lambda s: s.programme.documents == 2, WAIT_S)
    assert speaker.programme.generated_at == wire_time(held["generated_at"])
    assert (speaker.programme.last_ignored or "").startswith("generated_at")

    await probe.publish_programme("spk-1", b"{not json")
    await speaker.wait_until(lambda s: s.programme.documents == 3, WAIT_S)
    assert speaker.programme.item_ids == tuple(item["command"]["id"] for item in held["items"])


# The pure part: parsing and due-item selection


def test_due_items_and_the_comm_loss_limit() -> None:
    now = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)
    url, sha256 = "http://media.invalid/media/x", "ab" * 32
    commands = [play_command("spk-1", url, sha256, duration_s=1.0, now=now) for _ in range(4)]
    starts = [now + timedelta(seconds=s) for s in (10, 20, 20, 40)]
    document = programme_document(
        "spk-1",
        list(zip(starts, commands, strict=True)),
        generated_at=now,
        valid_for_s=40,
        comm_loss={"policy": "stop_after", "after_s": 15},
    )
    programme = parse_programme(json.dumps(document).encode(), "spk-1")
    assert programme is not None

    index = programme.index_from(now + timedelta(seconds=10))
    assert index == 0
    due, index = programme.due(index, now + timedelta(seconds=20))
    assert [item.command.id for item in due] == [command["id"] for command in commands[:3]]
    assert index == 3
    assert programme.due(index, now + timedelta(seconds=39)) == ((), 3)

    lost_at = now + timedelta(seconds=6)  # items may start before 21 s, and before valid_until (40 s)
    assert [programme.allows(item, lost_at) for item in programme.items] == [True, True, True, False]
    assert [media.sha256 for media in programme.media()] == [sha256]
    assert parse_programme(b"", "spk-1") is None
    with pytest.raises(ForeignProgrammeError):
        parse_programme(json.dumps(document).encode(), "spk-2")
    with pytest.raises(MalformedProgrammeError) as malformed:
        parse_programme(json.dumps({**document, "comm_loss": []}).encode(), "spk-1")
    assert malformed.value.member == "comm_loss"
