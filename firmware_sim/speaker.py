"""A simulated smart-radio speaker speaking docs/protocol.md §1 over MQTT.

Many speakers share one `SpeakerRuntime` per process: one asyncio loop driving raw paho clients, one
HTTP connection pool for media, one play log. Each speaker is a small state machine on that loop:
callbacks and timers, no thread and no task of its own while idle, so thousands fit in a process.
The session, reports, duplicates, expiry and preemption are those of every MQTT device
(firmware_sim/device.py); a speaker adds fetching and verifying its audio (§1.8) and its programme
cache (§1.10, firmware_sim/programme.py): while its broker link is down it plays its cached programme
with one timer for the next due item, and keeps its reports in an outbox until it reconnects. Its
programme also lists the areas it follows (§1.12): it subscribes to their command topics and turns each
area command into a command of its own, handled exactly like one on its `cmd` topic.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from firmware_sim import signature, wire
from firmware_sim.device import (
    DEDUPE_MEMORY,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_HTTP_CONNECTIONS,
    FIRMWARE,
    OFFLINE_REPORTS_KEPT,
    BrokerSettings,
    DeviceConnectError,
    DeviceRuntime,
    Job,
    MqttDevice,
    MqttProtocol,
    RuntimeServices,
    parse_mqtt_url,
)
from firmware_sim.media import MediaCache, MediaFetchError, VerifiedMedia
from firmware_sim.programme import (
    CommLoss,
    Programme,
    ProgrammeIgnoredError,
    ProgrammeItem,
    parse_programme,
)
from firmware_sim.screen import SimulatedLedScreen
from firmware_sim.wire import MediaRef, PlayCommand, StopCommand

if TYPE_CHECKING:
    from pathlib import Path

    import paho.mqtt.client as mqtt
    from paho.mqtt.reasoncodes import ReasonCode

    from firmware_sim.wire import Clock

__all__ = [
    "DEFAULT_HTTP_CONNECTIONS",
    "DEFAULT_VOLUME",
    "FIRMWARE",
    "BrokerSettings",
    "MqttProtocol",
    "ProgrammeStatus",
    "RuntimeServices",
    "SimulatedSpeaker",
    "SpeakerConnectError",
    "SpeakerRuntime",
    "parse_mqtt_url",
]

logger = logging.getLogger(__name__)

DEFAULT_VOLUME: Final = 70
# The programme timer wakes at least this often, so a wall clock that jumps (NTP) is noticed within
# this long even when the next item is hours away.
_PROGRAMME_MAX_SLEEP_S: Final = 300.0

# The name this module has always given the connection error.
SpeakerConnectError = DeviceConnectError

# Every speaker of a process that follows an area receives the same area command: parsed once, it
# serves them all (each derives its own command from the shared members, which nobody mutates).
# Exceptions are not cached, so an ignored one is parsed again by each speaker: rare, and cheap.
_open_area_command = functools.lru_cache(maxsize=64)(wire.open_area_command)


@functools.lru_cache(maxsize=64)
def _verify_area_command(
    payload: bytes, topic_area: str, key: signature.CommandKey | None
) -> signature.Verified | signature.SignatureRejectedError:
    """The signature check of an area command (§1.15.5 steps 1-6), once per process rather than once
    per speaker: it depends only on the bytes and the key. The target and window checks stay per
    speaker. Real speakers each verify on their own CPU; a simulated fleet shares two cores."""
    try:
        return signature.verify(
            _open_area_command(payload, topic_area).received, key, document_kind="command"
        )
    except signature.SignatureRejectedError as refusal:
        return refusal


class SpeakerRuntime(DeviceRuntime):
    """The devices of one process on their shared machinery: speakers, and LED screens beside them
    (a fleet may mix both kinds; `devices` holds every one)."""

    def __init__(
        self,
        broker: BrokerSettings,
        *,
        speed: float = 1.0,
        clock: Clock = wire.utc_now,
        play_log: Path | None = None,
        shared_media_cache: bool = False,
        http_connections: int = DEFAULT_HTTP_CONNECTIONS,
        media_timeout_s: float = 30.0,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        command_key: signature.CommandKey | None = None,
        firmware_keys: Sequence[bytes] = (),
        install_s: float = 10.0,
    ) -> None:
        super().__init__(
            broker,
            speed=speed,
            clock=clock,
            play_log=play_log,
            shared_media_cache=shared_media_cache,
            http_connections=http_connections,
            media_timeout_s=media_timeout_s,
            credentials=credentials,
            heartbeat_s=heartbeat_s,
            command_key=command_key,
            firmware_keys=firmware_keys,
            install_s=install_s,
        )
        self.speakers: dict[str, SimulatedSpeaker] = {}
        self.screens: dict[str, SimulatedLedScreen] = {}

    def speaker(
        self,
        address: str,
        *,
        kind: str = "speaker",
        volume: int = DEFAULT_VOLUME,
        rssi_dbm: int | None = None,
        offline_reports_kept: int = OFFLINE_REPORTS_KEPT,
    ) -> SimulatedSpeaker:
        speaker = self.add(
            SimulatedSpeaker(
                self,
                address,
                kind=kind,
                volume=volume,
                rssi_dbm=rssi_dbm,
                offline_reports_kept=offline_reports_kept,
            )
        )
        self.speakers[address] = speaker
        return speaker

    def led_screen(self, address: str, *, rssi_dbm: int | None = None) -> SimulatedLedScreen:
        screen = self.add(SimulatedLedScreen(self, address, rssi_dbm=rssi_dbm))
        self.screens[address] = screen
        return screen


# Every playlist item, fetched and verified, in order: what a speaker needs to play a `play`.
_Playlist = tuple[VerifiedMedia, ...]
# An accepted `play` that has not ended yet.
_Play = Job[PlayCommand, _Playlist]


@dataclass(frozen=True, slots=True)
class ProgrammeStatus:
    """What a speaker holds of its programme (§1.10), for tests and operators."""

    generated_at: datetime | None
    item_ids: tuple[str, ...]
    # Every media item of the held programme was fetched and verified (or found in the cache); false
    # while prefetching and when a fetch failed (the play path will try again when the item starts).
    prefetched: bool
    # `schedule` messages handled so far: taken, cleared or ignored.
    documents: int
    # Why the latest ignored document was not taken (naming the member at fault), if any.
    last_ignored: str | None


class SimulatedSpeaker(MqttDevice[PlayCommand, _Playlist]):
    _logger = logger
    _noun = "speaker"
    _operations = frozenset({"reboot", "configure", "set_volume", "test_tone"})

    def __init__(
        self,
        runtime: DeviceRuntime,
        address: str,
        *,
        kind: str = "speaker",
        volume: int = DEFAULT_VOLUME,
        rssi_dbm: int | None = None,
        dedupe_memory: int = DEDUPE_MEMORY,
        offline_reports_kept: int = OFFLINE_REPORTS_KEPT,
    ) -> None:
        super().__init__(
            runtime,
            address,
            kind=kind,
            rssi_dbm=rssi_dbm,
            dedupe_memory=dedupe_memory,
            offline_reports_kept=offline_reports_kept,
        )
        self.volume = volume
        # The latest test tone's self-test (§1.14), as the state reports it; None before the first.
        self.self_test: dict[str, object] | None = None
        self._test_tone: asyncio.TimerHandle | None = None
        self._schedule_topic = wire.schedule_topic(address)
        self._media_cache = MediaCache()
        # Programme cache (§1.10). The programme, like the dedupe memory and the outbox, survives
        # `crash()` and `stop()` as a real device's flash would; its one timer runs only while the
        # speaker is powered and has no broker connection.
        self._programme: Programme | None = None
        self._programme_cursor = 0
        self._programme_timer: asyncio.TimerHandle | None = None
        self._prefetch_task: asyncio.Task[None] | None = None
        self._prefetched = True
        self._programme_logged: Programme | None = None
        self._programme_documents = 0
        self._programme_last_ignored: str | None = None
        # Area commands (§1.12). Followed: the areas the held programme lists, in its order, and so
        # subscribed to (or being subscribed to). Granted: those the broker granted, a subset of the
        # followed ones. Accepted, what the state reports: the granted ones in the followed order.
        # Granted survives reconnects, as the broker's persistent session keeps the subscriptions.
        self._followed_areas: tuple[str, ...] = ()
        self._granted_areas: frozenset[str] = frozenset()
        self._accepted_areas: tuple[str, ...] = ()
        # The areas of each area subscribe call not answered yet, by message id, and the latest such
        # call for each area: only the answer to the latest one counts (an area dropped and listed
        # again, or asked for again on reconnect).
        self._area_subscribe_calls: dict[int, tuple[str, ...]] = {}
        self._latest_area_subscribe: dict[str, int] = {}
        # Areas dropped while the link was down: their unsubscribe goes out on the next connect.
        self._owed_area_unsubscribes: tuple[str, ...] = ()

    @property
    def programme(self) -> ProgrammeStatus:
        programme = self._programme
        return ProgrammeStatus(
            generated_at=programme.generated_at if programme is not None else None,
            item_ids=tuple(item.command.id for item in programme.items) if programme is not None else (),
            prefetched=self._prefetched,
            documents=self._programme_documents,
            last_ignored=self._programme_last_ignored,
        )

    @property
    def areas(self) -> tuple[str, ...]:
        """The areas whose commands the speaker accepts (§1.12), as its state reports them."""
        return self._accepted_areas

    @property
    def followed_areas(self) -> tuple[str, ...]:
        """The areas its programme lists, whether or not the broker granted them yet."""
        return self._followed_areas

    @property
    def areas_subscribing(self) -> tuple[str, ...]:
        """The followed areas whose latest subscription the broker has not answered yet (on every
        connect that is all of them, even those still accepted from the persistent session)."""
        return tuple(area for area in self._followed_areas if area in self._latest_area_subscribe)

    # What makes it a speaker (the hooks of `MqttDevice`)

    def _parse_command(self, envelope: wire.Envelope) -> PlayCommand | StopCommand:
        return wire.parse_command(envelope, self.address)

    def _prepare(self, job: _Play) -> None:
        cached = self._cached_playlist(job.command)
        if cached is not None:
            self._content_ready(job, cached)
        else:
            job.prepare_task = self.runtime.services.loop.create_task(self._fetch(job))

    def _planned_length(self, job: _Play) -> tuple[float, bool | None]:
        if job.content is None:
            raise RuntimeError("a play started before its media was verified")
        # §1.9: the whole playlist per repeat, `gap_s` of silence between repeats, decoded durations.
        command = job.command
        playlist_s = sum(item.duration_s for item in job.content)
        total_s = playlist_s * command.repeats + command.gap_s * (command.repeats - 1)
        return min(total_s, command.max_duration_s), total_s > command.max_duration_s

    def _status(self) -> dict[str, object]:
        programme = self._programme
        return {
            "volume": self.volume,
            "playing": self.playing,
            "areas": list(self._accepted_areas),
            "self_test": self.self_test,
            # What it holds in flash (§1.10), so that an operator sees it survive a reboot.
            "programme": {
                "generated_at": wire.format_timestamp(programme.generated_at),
                "items": len(programme.items),
            }
            if programme is not None
            else None,
        }

    # Remote operations (§1.14)

    def _apply_operation(self, operation: wire.OperationCommand) -> None:
        if operation.type == "set_volume" and operation.volume is not None:
            self.volume = operation.volume
            self._publish_state()
            self._report_operation(operation, "completed", result={"volume": self.volume})
        elif operation.type == "test_tone" and operation.duration_s is not None:
            self._play_test_tone(operation, operation.duration_s)
        else:
            super()._apply_operation(operation)

    def _play_test_tone(self, operation: wire.OperationCommand, duration_s: float) -> None:
        """A short tone through the amplifier and horns, then the self-test's verdict: never over a
        broadcast (a test must not cut a live message)."""
        if self._playing is not None:
            self._report_operation(operation, "failed", detail="busy: a broadcast is playing")
            return
        if self._test_tone is not None:
            self._report_operation(operation, "failed", detail="busy: a test tone is playing")
            return
        self._test_tone = self.runtime.services.loop.call_later(
            duration_s / self.runtime.speed, self._test_tone_done, operation
        )

    def _test_tone_done(self, operation: wire.OperationCommand) -> None:
        self._test_tone = None
        faulty = sorted(self.faults & {"amplifier", "speaker"})
        at = wire.format_timestamp(self.runtime.clock())
        if faulty:
            self.self_test = {"result": "fail", "at": at, "fault": faulty[0]}
            self._publish_state()
            self._report_operation(
                operation,
                "failed",
                detail=f"self-test failed: {faulty[0]} gives no output",
                result={"self_test": "fail", "fault": faulty[0]},
            )
            return
        self.self_test = {"result": "pass", "at": at}
        self._publish_state()
        self._report_operation(operation, "completed", result={"self_test": "pass"})

    def _accept(self, command: PlayCommand, *, offline: bool = False) -> None:
        """Quiet hours (§1.14): a normal-class play that would start inside them is refused; priority
        and emergency plays always go through."""
        quiet = self.quiet_hours
        if quiet is not None and command.priority.band == "normal" and quiet.contains(self.runtime.clock()):
            self._report_command(
                command, "rejected", detail="quiet hours: normal-class plays are refused now", offline=offline
            )
            return
        super()._accept(command, offline=offline)

    def _configured_comm_loss(self) -> CommLoss | None:
        configured = self.comm_loss
        if configured is None:
            return None
        after_s = configured.get("after_s")
        if configured.get("policy") == "stop_after" and isinstance(after_s, int | float):
            return CommLoss("stop_after", float(after_s))
        return CommLoss("keep")

    def _subscriptions(self) -> list[str]:
        return [self._cmd_topic, self._schedule_topic]

    def _handle_other_message(self, topic: str, payload: bytes | bytearray) -> None:
        if topic == self._schedule_topic:
            self._handle_programme_document(payload)
            return
        area = wire.area_of_topic(topic)
        if area is not None:
            self._handle_area_command(area, payload)
        else:
            super()._handle_other_message(topic, payload)

    def _on_session_ready(self, client: mqtt.Client) -> None:
        """§1.12: on every connect it subscribes again to the areas it follows."""
        owed = [area for area in self._owed_area_unsubscribes if area not in self._followed_areas]
        self._owed_area_unsubscribes = ()
        if owed:
            client.unsubscribe([wire.area_cmd_topic(area) for area in owed])
        if self._followed_areas:
            self._subscribe_areas(client, self._followed_areas)

    def _on_other_suback(self, mid: int, reason_codes: list[ReasonCode]) -> None:
        areas = self._area_subscribe_calls.pop(mid, None)
        if areas is None:
            return
        granted = set(self._granted_areas)
        for area, code in zip(areas, reason_codes, strict=False):
            if self._latest_area_subscribe.get(area) != mid:
                continue  # dropped since, or asked for again: the later answer decides
            del self._latest_area_subscribe[area]
            if code.is_failure:
                logger.error(
                    "%s: the broker refused the subscription to area %s (%s); its commands are not accepted",
                    self.address,
                    area,
                    code,
                )
                granted.discard(area)
            else:
                granted.add(area)
        self._granted_areas = frozenset(granted)
        self._refresh_accepted_areas()
        self._notify_watchers()  # `areas_subscribing` changed even when the accepted areas did not

    def _on_link_lost(self, now: datetime) -> None:
        """The programme takes over from this instant for the items still to come; subscribe calls
        made on the lost connection will never be answered (the next connect asks again)."""
        self._area_subscribe_calls.clear()
        self._latest_area_subscribe.clear()
        programme = self._programme
        self._programme_cursor = programme.index_from(now) if programme is not None else 0
        self._arm_programme()

    def _on_link_restored(self) -> None:
        # §1.10: never play from the programme while connected; what fell due offline was handled.
        self._cancel_programme_timer()

    def _on_power_off(self) -> None:
        """Nothing plays (nor a test tone); the programme itself is kept."""
        self._cancel_programme_timer()
        self._cancel_prefetch()
        tone, self._test_tone = self._test_tone, None
        if tone is not None:
            tone.cancel()

    # Media (§1.8)

    def _cached_playlist(self, command: PlayCommand) -> tuple[VerifiedMedia, ...] | None:
        """Every playlist item if all of them were verified before: no network needed."""
        fetcher = self.runtime.services.fetcher
        verified: list[VerifiedMedia] = []
        for item in command.playlist:
            found = fetcher.cached(item, self._media_cache)
            if found is None:
                return None
            verified.append(found)
        return tuple(verified)

    async def _fetch(self, play: _Play) -> None:
        try:
            playlist = await self._fetch_playlist(play.command)
        except MediaFetchError as error:
            self._finish(play, "failed", detail=error.detail)
            self._schedule()
            return
        except Exception:
            logger.exception("%s: fetching the media of %s broke", self.address, play.command.id)
            self._finish(play, "failed", detail="the media could not be fetched")
            self._schedule()
            return
        self._content_ready(play, playlist)

    async def _fetch_playlist(self, command: PlayCommand) -> tuple[VerifiedMedia, ...]:
        """Fetches and verifies every item at once (§1.9); the first failure, in playlist order
        among those seen, cancels the others and is raised naming its item."""
        if len(command.playlist) == 1:
            return (await self._fetch_item(command, 0),)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._fetch_item(command, index))
                    for index in range(len(command.playlist))
                ]
        except ExceptionGroup as failures:
            for task in tasks:
                if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                    raise error from failures
            raise
        return tuple(task.result() for task in tasks)

    async def _fetch_item(self, command: PlayCommand, index: int) -> VerifiedMedia:
        try:
            return await self.runtime.services.fetcher.fetch(command.playlist[index], self._media_cache)
        except MediaFetchError as error:
            if not command.playlist_given:
                raise  # a plain `media` fails with the bare detail §1.8 gives ("sha256 mismatch")
            raise MediaFetchError(f"playlist[{index}]: {error.detail}") from error

    # The programme cache (§1.10)

    def _handle_programme_document(self, payload: bytes | bytearray) -> None:
        self._programme_documents += 1
        try:
            self._take_programme_document(payload)
        finally:
            self._notify_watchers()

    def _take_programme_document(self, payload: bytes | bytearray) -> None:
        if not payload:
            # §1.10/§1.15: an empty payload only empties the broker's retained copy. Anyone with broker
            # access can send one and it carries no signature, so it changes nothing here.
            self._ignore_programme("an empty payload is not a signed programme; the held one stays")
            return
        try:
            document = wire.load_json(payload)
        except ValueError as error:
            self._ignore_programme(f"(document): payload is not JSON: {error}")
            return
        if not isinstance(document, dict):
            self._ignore_programme("(document): payload is not a JSON object")
            return
        held = self._programme
        try:
            verified = self._verify_programme(document, held, hashlib.sha256(payload).digest())
        except signature.SignatureRejectedError as refusal:
            self._ignore_programme(f"{refusal.reason}: {refusal.detail}")
            document_id = document.get("id")
            if isinstance(document_id, str) and document_id:
                self._refuse(document_id, document_id, refusal, logged=True)
            else:  # no report can name it
                self.refusals[refusal.reason] += 1
            return
        if verified is None:
            # The retained copy again (every reconnect): nothing changes, but a prefetch that did
            # not finish (a shutdown, a failed fetch) gets another chance.
            self._prefetch_programme()
            return
        try:
            programme = parse_programme(payload, self.address, seq=verified.seq)
        except ProgrammeIgnoredError as ignored:
            self._ignore_programme(ignored.detail)
            return
        if programme is None:  # pragma: no cover - an empty payload was handled above
            return
        if held is not None and not programme.supersedes(held):
            detail = (
                f"generated_at: {wire.format_timestamp(programme.generated_at)} is older than the held "
                f"programme's {wire.format_timestamp(held.generated_at)}"
            )
            self._programme_last_ignored = detail
            logger.info("%s: ignored a programme document: %s", self.address, detail)
            return
        logger.info(
            "%s: programme generated at %s taken: %d items",
            self.address,
            wire.format_timestamp(programme.generated_at),
            len(programme.items),
        )
        self._replace_programme(programme)

    def _verify_programme(
        self, document: dict[str, object], held: Programme | None, digest: bytes
    ) -> signature.Verified | None:
        """§1.15.5 for a programme; `None` for the very document held (the broker's retained copy,
        re-sent on every subscribe), which is neither new nor a replay."""
        verified = signature.verify(document, self.runtime.command_key, document_kind="programme")
        signature.require_target(verified, "device", self.address)
        if held is not None and verified.seq == held.seq and digest == held.digest:
            return None
        if self.runtime.clock() > verified.expires_at:
            raise signature.SignatureRejectedError(
                signature.EXPIRED, f"valid_until {wire.format_timestamp(verified.expires_at)} has passed"
            )
        if held is not None and verified.seq <= held.seq:
            # Programmes are retained, so they have a window of their own: the held one's seq.
            raise signature.SignatureRejectedError(
                signature.REPLAYED, f"seq {verified.seq} is not above the held programme's {held.seq}"
            )
        return verified

    def _ignore_programme(self, detail: str) -> None:
        self._programme_last_ignored = detail
        logger.warning("%s: ignored a programme document: %s", self.address, detail)

    def _replace_programme(self, programme: Programme | None) -> None:
        """A new document replaces the old one entirely (§1.10): its timer and prefetch go with it,
        and the areas it lists are followed instead of the old ones (§1.12)."""
        self._cancel_prefetch()
        self._programme = programme
        self._follow_areas(programme.areas if programme is not None else ())
        self._prefetch_programme()
        if self._link_lost_at is not None:
            # Not reachable over MQTT (documents arrive only while connected), but kept consistent:
            # only items still to come may play.
            self._programme_cursor = (
                programme.index_from(max(self._link_lost_at, self.runtime.clock())) if programme else 0
            )
            self._arm_programme()

    def _prefetch_programme(self) -> None:
        """Fetches and verifies every media item the programme names, so that it plays without a
        link. Media already verified costs no network and no task."""
        programme = self._programme
        if programme is None:
            self._prefetched = True
            return
        if self._prefetch_task is not None:
            return  # already under way for this programme
        fetcher = self.runtime.services.fetcher
        missing = [media for media in programme.media() if fetcher.cached(media, self._media_cache) is None]
        self._prefetched = not missing
        if not missing:
            self._log_programme_ready(programme)
        if missing:
            self._prefetch_task = self.runtime.services.loop.create_task(
                self._prefetch(programme, missing), name=f"prefetch-{self.address}"
            )

    async def _prefetch(self, programme: Programme, missing: list[MediaRef]) -> None:
        fetcher = self.runtime.services.fetcher
        results = await asyncio.gather(
            *(fetcher.fetch(media, self._media_cache) for media in missing), return_exceptions=True
        )
        failures = 0
        for media, result in zip(missing, results, strict=True):
            if isinstance(result, MediaFetchError):
                failures += 1
                logger.warning(
                    "%s: could not prefetch %s for the programme: %s", self.address, media.url, result.detail
                )
            elif isinstance(result, BaseException):
                failures += 1
                logger.warning(
                    "%s: could not prefetch %s for the programme: %r", self.address, media.url, result
                )
        if self._programme is programme:
            self._prefetch_task = None
            self._prefetched = failures == 0
            if self._prefetched:
                self._log_programme_ready(programme)
            self._notify_watchers()

    def _log_programme_ready(self, programme: Programme) -> None:
        """Tells the play log that this speaker holds the programme with all its media verified: from
        here on it can play it without a link."""
        if programme is self._programme_logged:
            return
        self._programme_logged = programme
        play_log = self.runtime.services.play_log
        if play_log is not None:
            play_log.record(
                {
                    "address": self.address,
                    "event": "programme",
                    "generated_at": wire.format_timestamp(programme.generated_at),
                    "items": len(programme.items),
                    "at": wire.format_timestamp(self.runtime.clock()),
                }
            )

    def _cancel_prefetch(self) -> None:
        task, self._prefetch_task = self._prefetch_task, None
        if task is not None and not task.done():
            task.cancel()

    def _cancel_programme_timer(self) -> None:
        timer, self._programme_timer = self._programme_timer, None
        if timer is not None:
            timer.cancel()

    def _arm_programme(self) -> None:
        """One timer per speaker, for the next item that may still play from the cache."""
        self._cancel_programme_timer()
        programme = self._programme
        link_lost_at = self._link_lost_at
        if programme is None or link_lost_at is None or self._stopping:
            return
        if self._programme_cursor >= len(programme.items):
            return
        item = programme.items[self._programme_cursor]
        if not programme.allows(item, link_lost_at, self._configured_comm_loss()):
            return  # every later item is refused as well (both limits bound `start_at` from above)
        delay_s = (item.start_at - self.runtime.clock()).total_seconds()
        self._programme_timer = self.runtime.services.loop.call_later(
            min(max(delay_s, 0.0), _PROGRAMME_MAX_SLEEP_S), self._on_programme_due
        )

    def _on_programme_due(self) -> None:
        self._programme_timer = None
        programme = self._programme
        link_lost_at = self._link_lost_at
        if programme is None or link_lost_at is None or self.connected:
            return
        due, self._programme_cursor = programme.due(self._programme_cursor, self.runtime.clock())
        for item in due:
            if programme.allows(item, link_lost_at, self._configured_comm_loss()):
                try:
                    self._start_from_programme(item)
                except Exception:
                    logger.exception(
                        "%s: programme item %s could not be handled", self.address, item.command.id
                    )
        self._arm_programme()

    def _start_from_programme(self, item: ProgrammeItem) -> None:
        """§1.10: handled exactly as if `item.command` had just arrived on the `cmd` topic."""
        command = item.command
        logger.info(
            "%s: no broker connection; %s starts from the programme (start_at %s)",
            self.address,
            command.id,
            wire.format_timestamp(item.start_at),
        )
        if self._seen(command.id):
            self._repeat_latest_report(command.id)
            return
        self._accept(command, offline=True)

    # Area commands (§1.12)

    def _follow_areas(self, areas: tuple[str, ...]) -> None:
        """Stops accepting the areas no longer listed at once and unsubscribes from them; subscribes
        to the newly listed ones, which are accepted once the broker grants them."""
        followed = self._followed_areas
        if areas == followed:
            return
        dropped = tuple(area for area in followed if area not in areas)
        added = tuple(area for area in areas if area not in followed)
        self._followed_areas = areas
        for area in dropped:
            self._latest_area_subscribe.pop(area, None)
        self._granted_areas = self._granted_areas.difference(dropped)
        logger.info("%s: follows areas %s", self.address, list(areas))
        client = self._client
        if client is not None and client.is_connected():
            if dropped:
                client.unsubscribe([wire.area_cmd_topic(area) for area in dropped])
            if added:
                self._subscribe_areas(client, added)
        elif dropped:
            # The broker's persistent session still holds these subscriptions.
            self._owed_area_unsubscribes = (
                *(area for area in self._owed_area_unsubscribes if area not in dropped),
                *dropped,
            )
        self._refresh_accepted_areas()

    def _subscribe_areas(self, client: mqtt.Client, areas: tuple[str, ...]) -> None:
        result, mid = client.subscribe([(wire.area_cmd_topic(area), 1) for area in areas])
        if mid is None:
            # The link went down under the call; the next connect subscribes to every followed area.
            logger.info("%s: could not subscribe to areas %s yet (%s)", self.address, list(areas), result)
            return
        self._area_subscribe_calls[mid] = areas
        for area in areas:
            self._latest_area_subscribe[area] = mid

    def _refresh_accepted_areas(self) -> None:
        """Recomputes what the speaker accepts; a change goes out in the retained state (§1.5)."""
        accepted = tuple(area for area in self._followed_areas if area in self._granted_areas)
        if accepted == self._accepted_areas:
            return
        self._accepted_areas = accepted
        logger.info("%s: accepts the commands of areas %s", self.address, list(accepted))
        self._publish_state()
        self._notify_watchers()

    def _handle_area_command(self, area: str, payload: bytes | bytearray) -> None:
        """§1.12: an area command it accepts becomes its own command (ids derived from the area
        command's), handled exactly as one on its `cmd` topic; anything else is logged and ignored,
        without a report, as it was not addressed to this speaker by name."""
        if area not in self._granted_areas:
            logger.debug("%s: ignored a command on area %s, which it does not accept", self.address, area)
            return
        received = bytes(payload)
        try:
            area_command = _open_area_command(received, area)
        except wire.AreaCommandIgnoredError as ignored:
            logger.info("%s: ignored a command on area %s: %s", self.address, area, ignored)
            return
        # Refusals name the speaker's own ids (§1.12 step 2), which the controller knows the delivery by.
        own = area_command.for_device(self.address)
        verified = _verify_area_command(received, area, self.runtime.command_key)
        if isinstance(verified, signature.SignatureRejectedError):
            self._refuse(own.command_id, own.correlation_id, verified)
            return
        try:
            signature.require_target(verified, "area", area)
            self._replay_window.admit(verified.seq)
        except signature.SignatureRejectedError as refusal:
            self._refuse(own.command_id, own.correlation_id, refusal)
            return
        self._handle_envelope(own)
