"""A simulated smart-radio speaker speaking docs/protocol.md §1 over MQTT.

Many speakers share one `SpeakerRuntime` per process: one asyncio loop driving raw paho clients, one
HTTP connection pool for media, one play log. Each speaker is a small state machine on that loop:
callbacks and timers, no thread and no task of its own while idle, so thousands fit in a process.
While its broker link is down a speaker plays its cached programme (§1.10, firmware_sim/programme.py)
with one timer for the next due item, and keeps its reports in an outbox until it reconnects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim import wire
from firmware_sim.media import MediaCache, MediaFetcher, MediaFetchError, VerifiedMedia
from firmware_sim.mqtt_loop import NonBlockingConnectClient, PahoLoopDriver, open_tcp_connection
from firmware_sim.playlog import PlayLog
from firmware_sim.programme import Programme, ProgrammeIgnoredError, ProgrammeItem, parse_programme
from firmware_sim.wire import Clock, MediaRef, PlayCommand, ReportState, StopCommand, utc_now

logger = logging.getLogger(__name__)

FIRMWARE: Final = "sim-1.0.0"
DEFAULT_VOLUME: Final = 70
DEDUPE_MEMORY: Final = 1024
SESSION_EXPIRY_S: Final = 86_400
# Few connections on purpose: httpcore scans every pooled connection (a poll() each) whenever it
# assigns a request, so a wide pool costs more CPU per fetch than it gains in parallelism.
DEFAULT_HTTP_CONNECTIONS: Final = 8
MQTT_DEFAULT_PORT: Final = 1883
_RECONNECT_FIRST_DELAY_S: Final = 0.5
_RECONNECT_MAX_DELAY_S: Final = 30.0
# §1.10 asks for at least the latest 10,000 reports made while the link is down.
OFFLINE_REPORTS_KEPT: Final = 10_000
# The programme timer wakes at least this often, so a wall clock that jumps (NTP) is noticed within
# this long even when the next item is hours away.
_PROGRAMME_MAX_SLEEP_S: Final = 300.0

MqttProtocol = Literal["3.1.1", "5"]


class SpeakerConnectError(ConnectionError):
    """The broker refused a speaker, or did not let it subscribe to its command topic."""


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    host: str
    port: int = MQTT_DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    protocol: MqttProtocol = "3.1.1"
    keepalive_s: int = 30
    session_expiry_s: int = SESSION_EXPIRY_S
    connect_timeout_s: float = 10.0
    # Reconnect backoff: doubles from the first delay up to the max (each jittered ×0.5-1.5).
    reconnect_first_delay_s: float = _RECONNECT_FIRST_DELAY_S
    reconnect_max_delay_s: float = _RECONNECT_MAX_DELAY_S


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """`mqtt://host:port` (or `tcp://`) to host and port."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "tcp"} or not parts.hostname:
        raise ValueError(f"{url!r} is not an mqtt://host:port URL")
    return parts.hostname, parts.port or MQTT_DEFAULT_PORT


class SpeakerRuntime:
    """What the simulated speakers of one process share: loop driver, HTTP pool, play log, clock.

    `speed` divides every playback duration (20 plays twenty times faster); expiry is always judged
    on `clock`, the wall clock unless a test injects another.
    """

    def __init__(
        self,
        broker: BrokerSettings,
        *,
        speed: float = 1.0,
        clock: Clock = utc_now,
        play_log: Path | None = None,
        shared_media_cache: bool = False,
        http_connections: int = DEFAULT_HTTP_CONNECTIONS,
        media_timeout_s: float = 30.0,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be greater than 0")
        self.broker = broker
        self.speed = speed
        self.clock = clock
        self.speakers: dict[str, SimulatedSpeaker] = {}
        self._play_log_path = play_log
        self._shared_media_cache = shared_media_cache
        self._http_connections = http_connections
        self._media_timeout_s = media_timeout_s
        self._services: RuntimeServices | None = None

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        # Resolved once here rather than 5,000 times, once per speaker connect.
        family, _, _, _, address = (
            await loop.getaddrinfo(self.broker.host, self.broker.port, type=socket.SOCK_STREAM)
        )[0]
        http = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=self._http_connections, max_keepalive_connections=self._http_connections
            ),
            # Thousands of speakers queue for a few pooled connections during a broadcast; waiting
            # for a connection is expected there, not an error.
            timeout=httpx.Timeout(self._media_timeout_s, pool=None),
        )
        self._services = RuntimeServices(
            loop=loop,
            driver=PahoLoopDriver(),
            http=http,
            fetcher=MediaFetcher(
                http, concurrency=self._http_connections, shared_cache=self._shared_media_cache
            ),
            play_log=PlayLog(self._play_log_path) if self._play_log_path is not None else None,
            broker_family=family,
            broker_address=address,
        )
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        services = self._services
        if services is None:
            return
        try:
            await self.stop_all()
        finally:
            self._services = None
            await services.fetcher.aclose()
            await services.http.aclose()
            await services.driver.aclose()
            if services.play_log is not None:
                services.play_log.close()

    def speaker(
        self,
        address: str,
        *,
        kind: str = "speaker",
        volume: int = DEFAULT_VOLUME,
        rssi_dbm: int | None = None,
        offline_reports_kept: int = OFFLINE_REPORTS_KEPT,
    ) -> SimulatedSpeaker:
        if address in self.speakers:
            raise ValueError(f"a speaker with address {address!r} already exists in this runtime")
        speaker = SimulatedSpeaker(
            self,
            address,
            kind=kind,
            volume=volume,
            rssi_dbm=rssi_dbm,
            offline_reports_kept=offline_reports_kept,
        )
        self.speakers[address] = speaker
        return speaker

    async def stop_all(self, concurrency: int = 500) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def stop(speaker: SimulatedSpeaker) -> None:
            async with gate:
                await speaker.stop()

        await asyncio.gather(*(stop(speaker) for speaker in self.speakers.values()))

    @property
    def services(self) -> RuntimeServices:
        if self._services is None:
            raise RuntimeError("the speaker runtime is not running; use `async with SpeakerRuntime(...)`")
        return self._services

    async def open_broker_connection(self) -> socket.socket:
        services = self.services
        return await open_tcp_connection(
            services.broker_address, services.broker_family, self.broker.connect_timeout_s
        )


@dataclass(frozen=True, slots=True)
class RuntimeServices:
    """The shared machinery of a running `SpeakerRuntime`."""

    loop: asyncio.AbstractEventLoop
    driver: PahoLoopDriver
    http: httpx.AsyncClient
    fetcher: MediaFetcher
    play_log: PlayLog | None
    broker_family: socket.AddressFamily
    broker_address: tuple[Any, ...]


@dataclass(eq=False, slots=True)
class _Play:
    """An accepted `play` that has not ended yet."""

    command: PlayCommand
    arrival: int
    phase: Literal["fetching", "waiting", "playing"] = "fetching"
    # Every playlist item, fetched and verified, in order; set when the phase leaves "fetching".
    playlist: tuple[VerifiedMedia, ...] | None = None
    fetch_task: asyncio.Task[None] | None = None
    expiry_timer: asyncio.TimerHandle | None = None
    end_timer: asyncio.TimerHandle | None = None
    started_at: float = 0.0
    planned_s: float = 0.0
    truncated: bool = False
    # Started from the programme cache while the link was down: every report says `offline` (§1.4).
    offline: bool = False

    @property
    def rank(self) -> int:
        return self.command.priority.rank


def takes_speaker(
    challenger_rank: int, challenger_arrival: int, holder_rank: int, holder_arrival: int
) -> bool:
    """§1.4.1: a higher rank wins; at equal rank the holder keeps it, except that in the emergency
    band the newer command wins (so a stuck alert cannot block a newer one)."""
    if challenger_rank != holder_rank:
        return challenger_rank > holder_rank
    return challenger_rank >= wire.EMERGENCY_RANK_FLOOR and challenger_arrival > holder_arrival


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


class SimulatedSpeaker:
    def __init__(
        self,
        runtime: SpeakerRuntime,
        address: str,
        *,
        kind: str = "speaker",
        volume: int = DEFAULT_VOLUME,
        rssi_dbm: int | None = None,
        dedupe_memory: int = DEDUPE_MEMORY,
        offline_reports_kept: int = OFFLINE_REPORTS_KEPT,
    ) -> None:
        if offline_reports_kept < 1:
            raise ValueError("offline_reports_kept must be at least 1")
        if not wire.is_valid_address(address):
            raise ValueError(f"{address!r} is not a device address ({wire.ADDRESS_PATTERN.pattern})")
        self.runtime = runtime
        self.address = address
        self.kind = kind
        self.volume = volume
        # A stable, plausible signal strength per device, so repeated runs publish the same state.
        self.rssi_dbm = rssi_dbm if rssi_dbm is not None else -55 - zlib.crc32(address.encode()) % 40
        self._cmd_topic = wire.cmd_topic(address)
        self._ack_topic = wire.ack_topic(address)
        self._state_topic = wire.state_topic(address)
        self._schedule_topic = wire.schedule_topic(address)
        self._dedupe_memory = dedupe_memory
        self._latest_reports: OrderedDict[str, bytes] = OrderedDict()
        self._active: dict[str, _Play] = {}
        self._playing: _Play | None = None
        self._arrivals = itertools.count()
        self._media_cache = MediaCache()
        self._published_playing: str | None = None
        self._client: NonBlockingConnectClient | None = None
        self._ready: asyncio.Future[None] | None = None
        self._ever_ready = False
        self._subscribe_mid: int | None = None
        self._stopping = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._puback_waiters: dict[int, asyncio.Future[None]] = {}
        self._disconnected: asyncio.Future[None] | None = None
        self._reconnect_delay_s = runtime.broker.reconnect_first_delay_s
        # Programme cache (§1.10). The programme, like the dedupe memory and the outbox, survives
        # `crash()` and `stop()` as a real device's flash would; its one timer runs only while the
        # speaker is powered and has no broker connection.
        self._programme: Programme | None = None
        self._programme_cursor = 0
        self._programme_timer: asyncio.TimerHandle | None = None
        self._link_lost_at: datetime | None = None
        self._prefetch_task: asyncio.Task[None] | None = None
        self._prefetched = True
        self._programme_logged: Programme | None = None
        self._programme_documents = 0
        self._programme_last_ignored: str | None = None
        # Reports made while the link is down, published in order on reconnection (§1.10).
        # Created on the first such report, dropped once flushed: thousands of connected speakers
        # in a fleet carry no empty deque each.
        self._outbox: deque[bytes] | None = None
        self._outbox_limit = offline_reports_kept
        self._outbox_flush: asyncio.Handle | None = None
        # Counts the oldest reports the bounded outbox let go; logged on the next flush.
        self.offline_reports_dropped = 0
        self._dropped_logged = 0
        # Futures of `wait_until` callers, woken on every change they might be waiting for.
        self._watchers: list[asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        return f"SimulatedSpeaker({self.address!r})"

    @property
    def playing(self) -> str | None:
        """The id of the command on the speaker now, if any."""
        return self._playing.command.id if self._playing is not None else None

    @property
    def waiting(self) -> tuple[str, ...]:
        """Ids of accepted commands that are not playing (still fetching, or waiting for the speaker)."""
        return tuple(play.command.id for play in self._active.values() if play.phase != "playing")

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

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
    def offline_since(self) -> datetime | None:
        """When (device clock) the speaker last lost, or powered up without, its broker connection;
        `None` while connected or off. `comm_loss.after_s` counts from here (§1.10)."""
        return self._link_lost_at

    @property
    def offline_reports_pending(self) -> int:
        """Reports made while the link was down that the broker has not been given yet."""
        return len(self._outbox) if self._outbox is not None else 0

    async def wait_until(self, predicate: Callable[[SimulatedSpeaker], bool], timeout: float = 10.0) -> None:
        """Returns once `predicate(self)` holds; it is re-checked whenever the connection, the
        programme or a command's state changes. Raises `TimeoutError` after `timeout` seconds."""
        loop = self.runtime.services.loop
        async with asyncio.timeout(timeout):
            while not predicate(self):
                changed = loop.create_future()
                if self._watchers is None:
                    self._watchers = []
                self._watchers.append(changed)
                await changed

    def _notify_watchers(self) -> None:
        watchers, self._watchers = self._watchers, None
        for changed in watchers or ():
            if not changed.done():
                changed.set_result(None)

    async def start(self, timeout: float | None = None) -> None:
        """Connects, announces itself online and returns once the broker granted its subscription."""
        if self._client is not None:
            raise RuntimeError(f"{self.address} is already started")
        loop = self.runtime.services.loop
        broker = self.runtime.broker
        self._stopping = False
        self._ever_ready = False
        if broker.protocol == "5":
            client = NonBlockingConnectClient(
                CallbackAPIVersion.VERSION2,
                client_id=self.address,
                protocol=mqtt.MQTTv5,
                reconnect_on_failure=False,
            )
        else:
            client = NonBlockingConnectClient(
                CallbackAPIVersion.VERSION2,
                client_id=self.address,
                clean_session=False,
                protocol=mqtt.MQTTv311,
                reconnect_on_failure=False,
            )
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        client.will_set(self._state_topic, wire.OFFLINE_WILL, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        self.runtime.services.driver.attach(client)
        self._client = client
        self._ready = loop.create_future()
        # Powered up but not connected yet: a programme held from before plays if an item falls due
        # before the broker answers (a receiver that boots without a link).
        self._link_down()
        try:
            async with asyncio.timeout(timeout):
                await self._first_connect(client)
                await self._ready
        except BaseException:
            self._abandon_client()
            raise
        self._ever_ready = True

    async def stop(self, timeout: float = 5.0) -> None:
        """Clean shutdown: retained `offline` with reason `shutdown`, then DISCONNECT (no Last Will)."""
        client = self._client
        if client is None:
            return
        self._stopping = True
        self._cancel_reconnect()
        self._power_off_programme()
        for play in list(self._active.values()):
            self._finish(play, "failed", detail="the device shut down before the command ended")
        if client.is_connected():
            self._flush_outbox(client)
            loop = self.runtime.services.loop
            info = client.publish(self._state_topic, wire.OFFLINE_SHUTDOWN, qos=1, retain=True)
            acknowledged = loop.create_future()
            self._puback_waiters[info.mid] = acknowledged
            self._disconnected = loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await acknowledged
                    client.disconnect()
                    await self._disconnected
            except TimeoutError:
                logger.warning(
                    "%s: the broker did not confirm the shutdown within %s s", self.address, timeout
                )
        self._abandon_client()

    def crash(self) -> None:
        """Abrupt loss, as a power cut: the TCP connection closes without DISCONNECT, so the broker
        publishes the Last Will; nothing is reported and nothing reconnects until `start()`.
        The programme, the dedupe memory and the reports not yet published survive (flash)."""
        if self._client is None:
            return
        self._stopping = True
        self._cancel_reconnect()
        self._power_off_programme()
        for play in list(self._active.values()):
            self._drop_silently(play)
        self._abandon_client()

    def drop_connection(self) -> None:
        """A network blip: the link breaks without DISCONNECT, playback goes on, and the speaker
        reconnects to its persistent session by itself (playing from its programme meanwhile)."""
        sock = self._client.socket() if self._client is not None else None
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)

    async def _first_connect(self, client: NonBlockingConnectClient) -> None:
        broker = self.runtime.broker
        delay = broker.reconnect_first_delay_s
        while True:
            try:
                client.prepared_socket = await self.runtime.open_broker_connection()
                break
            except OSError as error:
                # The broker may still be starting next to the fleet; the caller's timeout bounds this.
                logger.info(
                    "%s: cannot reach the broker yet (%s); retrying in %.1f s", self.address, error, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, broker.reconnect_max_delay_s)
        if broker.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
            properties.SessionExpiryInterval = broker.session_expiry_s
            client.connect(
                broker.host, broker.port, broker.keepalive_s, clean_start=False, properties=properties
            )
        else:
            client.connect(broker.host, broker.port, broker.keepalive_s)

    async def _reconnect_forever(self, client: NonBlockingConnectClient) -> None:
        broker = self.runtime.broker
        while not self._stopping and client is self._client:
            delay = self._reconnect_delay_s * random.uniform(0.5, 1.5)
            self._reconnect_delay_s = min(self._reconnect_delay_s * 2, broker.reconnect_max_delay_s)
            await asyncio.sleep(delay)
            try:
                client.prepared_socket = await self.runtime.open_broker_connection()
                client.reconnect()
            except OSError as error:
                logger.info("%s: reconnect failed (%s)", self.address, error)
                continue
            return

    def _cancel_reconnect(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            self._reconnect_task = None

    def _abandon_client(self) -> None:
        client, self._client = self._client, None
        self._power_off_programme()
        if self._outbox_flush is not None:
            self._outbox_flush.cancel()
            self._outbox_flush = None
        if client is not None:
            self.runtime.services.driver.detach(client)
            sock = client.prepared_socket
            if sock is not None:
                sock.close()
        for waiter in self._puback_waiters.values():
            waiter.cancel()
        self._puback_waiters.clear()

    # paho callbacks: they run inside `loop_read`, so they must never raise into paho.

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:
            error = SpeakerConnectError(f"{self.address}: the broker refused the connection: {reason_code}")
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(error)
            else:
                logger.warning("%s", error)
            return
        self._reconnect_delay_s = self.runtime.broker.reconnect_first_delay_s
        # §1.10: never play from the programme while connected; what fell due offline was handled.
        self._link_up()
        self._publish_state()
        # paho re-sends its own unacknowledged publishes right after this callback returns; the
        # outbox (newer than those) goes out just after them, before any newer report (§1.10).
        if self._outbox is not None and self._outbox_flush is None:
            self._outbox_flush = self.runtime.services.loop.call_soon(self._flush_outbox, client)
        _, self._subscribe_mid = client.subscribe([(self._cmd_topic, 1), (self._schedule_topic, 1)])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if client is not self._client or mid != self._subscribe_mid:
            return
        ready = self._ready
        if len(reason_codes) > 1 and reason_codes[1].is_failure:
            # The device still works live without it, so this does not fail the connection.
            logger.error(
                "%s: the broker refused the subscription to %s: %s",
                self.address,
                self._schedule_topic,
                reason_codes[1],
            )
        if not reason_codes or reason_codes[0].is_failure:
            error = SpeakerConnectError(
                f"{self.address}: the broker refused the subscription to {self._cmd_topic}"
            )
            if ready is not None and not ready.done():
                ready.set_exception(error)
            else:
                logger.error("%s", error)
        elif ready is not None and not ready.done():
            ready.set_result(None)

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        _reason_code: ReasonCode,
        _properties: Properties,
    ) -> None:
        waiter = self._puback_waiters.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if self._disconnected is not None and not self._disconnected.done():
            self._disconnected.set_result(None)
        if client is not self._client or self._stopping:
            return
        if not self._ever_ready:
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(
                    SpeakerConnectError(
                        f"{self.address}: the connection closed during the handshake: {reason_code}"
                    )
                )
            return
        logger.info("%s: connection lost (%s); reconnecting", self.address, reason_code)
        self._link_down()
        self._cancel_reconnect()
        self._reconnect_task = self.runtime.services.loop.create_task(
            self._reconnect_forever(self._client), name=f"reconnect-{self.address}"
        )

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._schedule_topic:
            try:
                self._handle_programme_document(message.payload)
            except Exception:
                logger.exception("%s: a programme document could not be handled", self.address)
            return
        try:
            self._handle_command(message.payload)
        except Exception:
            logger.exception("%s: a command could not be handled", self.address)

    # Commands

    def _handle_command(self, payload: bytes | bytearray) -> None:
        try:
            envelope = wire.open_envelope(payload)
        except wire.UnidentifiableCommandError as error:
            logger.warning("%s: ignored a command that no report could name: %s", self.address, error)
            return
        if envelope.command_id in self._active or envelope.command_id in self._latest_reports:
            self._repeat_latest_report(envelope.command_id)
            return
        try:
            command = wire.parse_command(envelope, self.address)
        except wire.CommandRejectedError as rejection:
            logger.info("%s: rejected command %s: %s", self.address, envelope.command_id, rejection.detail)
            self._report(
                envelope.command_id, envelope.correlation_id, "rejected", None, detail=rejection.detail
            )
            return
        if isinstance(command, StopCommand):
            self._apply_stop(command)
        else:
            self._accept_play(command)

    def _repeat_latest_report(self, command_id: str) -> None:
        latest = self._latest_reports.get(command_id)
        if latest is not None:
            self._latest_reports.move_to_end(command_id)
            self._publish_report(latest)

    def _accept_play(self, command: PlayCommand, *, offline: bool = False) -> None:
        now = self.runtime.clock()
        if now > command.expires_at:
            self._report_play(command, "expired", detail="arrived after expires_at", offline=offline)
            return
        self._report_play(command, "delivered", offline=offline)
        play = _Play(command, next(self._arrivals), offline=offline)
        self._active[command.id] = play
        loop = self.runtime.services.loop
        play.expiry_timer = loop.call_later(
            (command.expires_at - now).total_seconds(), self._on_expiry_due, play
        )
        cached = self._cached_playlist(command)
        if cached is not None:
            play.playlist = cached
            play.phase = "waiting"
            self._schedule()
        else:
            play.fetch_task = loop.create_task(self._fetch(play))

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
        if self._active.get(play.command.id) is play:
            play.playlist = playlist
            play.phase = "waiting"
            self._schedule()

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

    def _apply_stop(self, stop: StopCommand) -> None:
        if stop.target == wire.STOP_ALL:
            victims = list(self._active.values())
        else:
            target = self._active.get(stop.target)
            victims = [target] if target is not None else []
        for play in victims:
            self._finish(play, "stopped", played_s=self._played_so_far(play))
        self._report(
            stop.id,
            stop.correlation_id,
            "completed",
            None,
            detail=None if victims else "nothing to stop: the target is neither playing nor waiting",
        )
        self._schedule()

    def _on_expiry_due(self, play: _Play) -> None:
        if self._active.get(play.command.id) is not play or play.phase == "playing":
            return
        remaining_s = (play.command.expires_at - self.runtime.clock()).total_seconds()
        if remaining_s > 0:
            play.expiry_timer = self.runtime.services.loop.call_later(remaining_s, self._on_expiry_due, play)
            return
        self._finish(play, "expired", detail="expires_at passed before it could start")
        self._schedule()

    # The programme cache (§1.10)

    def _handle_programme_document(self, payload: bytes | bytearray) -> None:
        self._programme_documents += 1
        try:
            self._take_programme_document(payload)
        finally:
            self._notify_watchers()

    def _take_programme_document(self, payload: bytes | bytearray) -> None:
        try:
            programme = parse_programme(payload, self.address)
        except ProgrammeIgnoredError as ignored:
            self._programme_last_ignored = ignored.detail
            logger.warning("%s: ignored a programme document: %s", self.address, ignored.detail)
            return
        held = self._programme
        if programme is None:
            if held is not None:
                logger.info("%s: programme cleared", self.address)
            self._replace_programme(None)
            return
        if held is not None and not programme.supersedes(held):
            detail = (
                f"generated_at: {wire.format_timestamp(programme.generated_at)} is older than the held "
                f"programme's {wire.format_timestamp(held.generated_at)}"
            )
            self._programme_last_ignored = detail
            logger.info("%s: ignored a programme document: %s", self.address, detail)
            return
        if held is not None and programme.digest == held.digest:
            # The retained copy again (every reconnect): nothing changes, but a prefetch that did
            # not finish (a shutdown, a failed fetch) gets another chance.
            self._prefetch_programme()
            return
        logger.info(
            "%s: programme generated at %s taken: %d items",
            self.address,
            wire.format_timestamp(programme.generated_at),
            len(programme.items),
        )
        self._replace_programme(programme)

    def _replace_programme(self, programme: Programme | None) -> None:
        """A new document replaces the old one entirely (§1.10): its timer and prefetch go with it."""
        self._cancel_prefetch()
        self._programme = programme
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

    def _link_down(self) -> None:
        """The speaker has no broker connection (lost, or not made yet): the programme takes over
        from this instant for the items still to come."""
        if self._link_lost_at is not None:
            return  # a failed reconnect attempt: the link went down earlier
        now = self.runtime.clock()
        self._link_lost_at = now
        programme = self._programme
        self._programme_cursor = programme.index_from(now) if programme is not None else 0
        self._arm_programme()
        self._notify_watchers()

    def _link_up(self) -> None:
        self._link_lost_at = None
        self._cancel_programme_timer()
        self._notify_watchers()

    def _power_off_programme(self) -> None:
        """The device is off (shutdown, crash): nothing plays; the programme itself is kept."""
        self._link_lost_at = None
        self._cancel_programme_timer()
        self._cancel_prefetch()

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
        if not programme.allows(item, link_lost_at):
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
            if programme.allows(item, link_lost_at):
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
        if command.id in self._active or command.id in self._latest_reports:
            self._repeat_latest_report(command.id)
            return
        self._accept_play(command, offline=True)

    # The speaker itself

    def _schedule(self) -> None:
        """Gives the speaker to the best ready command if §1.4.1 lets it take the speaker."""
        while (candidate := self._best_waiting()) is not None:
            holder = self._playing
            if holder is not None and not takes_speaker(
                candidate.rank, candidate.arrival, holder.rank, holder.arrival
            ):
                break
            if self.runtime.clock() > candidate.command.expires_at:
                self._finish(candidate, "expired", detail="expires_at passed while it waited for the speaker")
                continue
            if holder is not None:
                self._finish(holder, "interrupted", played_s=self._played_so_far(holder))
            self._start_playing(candidate)
        self._publish_state_if_changed()

    def _best_waiting(self) -> _Play | None:
        best: _Play | None = None
        for play in self._active.values():
            if play.phase != "waiting":
                continue
            if best is None or takes_speaker(play.rank, play.arrival, best.rank, best.arrival):
                best = play
        return best

    def _start_playing(self, play: _Play) -> None:
        if play.playlist is None:
            raise RuntimeError("a play started before its media was verified")
        # §1.9: the whole playlist per repeat, `gap_s` of silence between repeats, decoded durations.
        command = play.command
        playlist_s = sum(item.duration_s for item in play.playlist)
        total_s = playlist_s * command.repeats + command.gap_s * (command.repeats - 1)
        play.planned_s = min(total_s, play.command.max_duration_s)
        play.truncated = total_s > play.command.max_duration_s
        play.phase = "playing"
        loop = self.runtime.services.loop
        play.started_at = loop.time()
        if play.expiry_timer is not None:
            play.expiry_timer.cancel()
            play.expiry_timer = None
        play.end_timer = loop.call_later(play.planned_s / self.runtime.speed, self._on_play_end, play)
        self._playing = play
        self._report_play(play.command, "playing", offline=play.offline)

    def _on_play_end(self, play: _Play) -> None:
        self._finish(play, "completed", played_s=play.planned_s, truncated=play.truncated)
        self._schedule()

    def _played_so_far(self, play: _Play) -> float:
        if play.phase != "playing":
            return 0.0
        elapsed_s = (self.runtime.services.loop.time() - play.started_at) * self.runtime.speed
        return min(play.planned_s, elapsed_s)

    def _finish(
        self,
        play: _Play,
        state: ReportState,
        *,
        detail: str | None = None,
        played_s: float | None = None,
        truncated: bool | None = None,
    ) -> None:
        """Ends a play in its one terminal state (§1.4); a play already ended is left alone."""
        if not self._drop_silently(play):
            return
        self._report_play(
            play.command, state, detail=detail, played_s=played_s, truncated=truncated, offline=play.offline
        )

    def _drop_silently(self, play: _Play) -> bool:
        if self._active.get(play.command.id) is not play:
            return False
        del self._active[play.command.id]
        for timer in (play.expiry_timer, play.end_timer):
            if timer is not None:
                timer.cancel()
        task = play.fetch_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self._playing is play:
            self._playing = None
        return True

    # Publishing

    def _report_play(
        self,
        command: PlayCommand,
        state: ReportState,
        *,
        detail: str | None = None,
        played_s: float | None = None,
        truncated: bool | None = None,
        offline: bool = False,
    ) -> None:
        self._report(
            command.id,
            command.correlation_id,
            state,
            command,
            detail=detail,
            played_s=played_s,
            truncated=truncated,
            offline=offline,
        )

    def _report(
        self,
        command_id: str,
        correlation_id: str,
        state: ReportState,
        command: PlayCommand | None,
        *,
        detail: str | None = None,
        played_s: float | None = None,
        truncated: bool | None = None,
        offline: bool = False,
    ) -> None:
        document = wire.report_document(
            command_id,
            correlation_id,
            state,
            self.runtime.clock(),
            detail=detail,
            played_s=played_s,
            truncated=truncated,
            offline=offline,
        )
        payload = wire.encode(document)
        self._latest_reports[command_id] = payload
        self._latest_reports.move_to_end(command_id)
        if len(self._latest_reports) > self._dedupe_memory:
            self._latest_reports.popitem(last=False)
        self._publish_report(payload)
        play_log = self.runtime.services.play_log
        if play_log is not None and (command is not None or state == "rejected"):
            entry: dict[str, object] = {
                "address": self.address,
                "command_id": command_id,
                "broadcast_id": command.broadcast_id if command is not None else None,
                "correlation_id": correlation_id,
                "event": state,
                "at": document["at"],
                "mode": command.mode if command is not None else None,
            }
            entry.update(
                (key, document[key])
                for key in ("detail", "played_s", "truncated", "offline")
                if key in document
            )
            play_log.record(entry)
        if self._watchers:
            self._notify_watchers()

    def _publish_state_if_changed(self) -> None:
        if self.playing != self._published_playing:
            self._publish_state()

    def _publish_state(self) -> None:
        client = self._client
        if client is None or not client.is_connected():
            return  # the state goes out with the next connect anyway
        playing = self.playing
        payload = wire.online_state(
            self.runtime.clock(),
            kind=self.kind,
            firmware=FIRMWARE,
            volume=self.volume,
            playing=playing,
            rssi_dbm=self.rssi_dbm,
        )
        client.publish(self._state_topic, payload, qos=1, retain=True)
        self._published_playing = playing

    def _publish_report(self, payload: bytes) -> None:
        """Publishes a report now, or keeps it in the outbox while the link is down (§1.10).

        paho alone would keep a publish made while disconnected as well, but without bound, failing
        the newest (not dropping the oldest) once its 16-bit message ids run out, and only for the
        life of that client object (`crash()` and `start()` make a new one). The outbox makes the
        rule explicit: the latest `offline_reports_kept` in order, the dropped ones counted and
        logged, and while it is not empty newer reports queue behind it so that the order holds.
        """
        client = self._client
        outbox = self._outbox
        if outbox is None:
            if client is not None and client.is_connected():
                client.publish(self._ack_topic, payload, qos=1)
                return
            outbox = self._outbox = deque()
        if len(outbox) >= self._outbox_limit:
            outbox.popleft()
            self.offline_reports_dropped += 1
        outbox.append(payload)

    def _flush_outbox(self, client: NonBlockingConnectClient) -> None:
        """Hands every kept report to paho in order; paho sends them as its in-flight window allows
        and keeps those not acknowledged for the next session, so the outbox can be emptied now."""
        self._outbox_flush = None
        if client is not self._client or not client.is_connected():
            return  # the next connect flushes
        unlogged = self.offline_reports_dropped - self._dropped_logged
        if unlogged:
            logger.warning(
                "%s: %d reports made while the link was down were dropped (only the latest %d are kept)",
                self.address,
                unlogged,
                self._outbox_limit,
            )
            self._dropped_logged = self.offline_reports_dropped
        outbox, self._outbox = self._outbox, None
        for payload in outbox or ():
            client.publish(self._ack_topic, payload, qos=1)
        if self._watchers:
            self._notify_watchers()
