"""What every simulated MQTT device shares (docs/protocol.md §1.1–§1.9): the runtime of a process and
the device base class.

A `DeviceRuntime` holds one asyncio loop driving raw paho clients, one HTTP connection pool for media,
one play log and the clock. An `MqttDevice` is a small state machine on that loop: the session and its
reconnects, the Last Will and the retained state, the command reports with their duplicate memory and
the outbox kept while the link is down, expiry timers, and the one-command-at-a-time preemption of
§1.4.1. Subclasses say what their commands are and how long one plays: the speaker
(firmware_sim/speaker.py) fetches audio, the LED screen (firmware_sim/screen.py) shows text.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import zlib
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Literal, Protocol, Self, TypeVar
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim import signature, wire
from firmware_sim.firmware import FirmwareUpdater
from firmware_sim.media import MediaFetcher
from firmware_sim.mqtt_loop import NonBlockingConnectClient, PahoLoopDriver, open_tcp_connection
from firmware_sim.playlog import PlayLog
from firmware_sim.wire import Clock, Priority, ReportState, StopCommand, utc_now

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)

FIRMWARE: Final = "sim-1.0.0"
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
# §1.5: the state is published again every heartbeat (the controller's timeouts count on it).
DEFAULT_HEARTBEAT_S: Final = 60.0
# A reboot (§1.14) keeps the device off the broker this long (divided by the runtime's speed).
REBOOT_S: Final = 2.0
_REBOOT_MIN_S: Final = 0.3
# Faults a test or an operator can inject (the fleet's control file, `set_faults`):
# silent: connected (keep-alive answered) but publishes no state, as a hung firmware;
# amplifier, speaker: a test tone's self-test fails, naming the part.
FAULTS: Final = frozenset({"silent", "amplifier", "speaker"})

MqttProtocol = Literal["3.1.1", "5"]
MqttDeviceT = TypeVar("MqttDeviceT", bound="MqttDevice[Any, Any]")


class DeviceConnectError(ConnectionError):
    """The broker refused a device, or did not let it subscribe to its command topic."""


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


class DeviceRuntime:
    """What the simulated devices of one process share: loop driver, HTTP pool, play log, clock.

    `speed` divides every playback duration (20 plays twenty times faster); expiry is always judged
    on `clock`, the wall clock unless a test injects another. `command_key` is the controller's public
    key its devices verify every command and programme with (docs/protocol.md §1.15); without one they
    accept nothing (each message is refused `no_key`): a device that cannot check a command never plays it.
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
        credentials: Mapping[str, tuple[str, str]] | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        command_key: signature.CommandKey | None = None,
        firmware_keys: Sequence[bytes] = (),
        install_s: float = 10.0,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be greater than 0")
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be greater than 0")
        # The raw Ed25519 public keys a firmware image's signature must verify with (§1.16).
        self.firmware_keys = tuple(firmware_keys)
        # Device seconds an install and its reboot take (divided by `speed`, like playback).
        self.install_s = install_s
        self.broker = broker
        # address → (username, password): each device's own broker account, from its provisioning
        # bundle (docs/protocol.md §1.13); a device not listed uses the broker settings' account.
        self.credentials: Mapping[str, tuple[str, str]] = credentials or {}
        self.command_key = command_key
        self.speed = speed
        # Every device's heartbeat until a `configure` operation sets its own.
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        # Every device of the runtime, whatever its kind, by address.
        self.devices: dict[str, MqttDevice[Any, Any]] = {}
        self._play_log_path = play_log
        self._shared_media_cache = shared_media_cache
        self._http_connections = http_connections
        self._media_timeout_s = media_timeout_s
        self._services: RuntimeServices | None = None

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        # Resolved once here rather than 5,000 times, once per device connect.
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

    def add(self, device: MqttDeviceT) -> MqttDeviceT:
        """Registers a device made on this runtime; its address must be new here."""
        if device.runtime is not self:
            raise ValueError(f"{device!r} belongs to another runtime")
        if device.address in self.devices:
            raise ValueError(f"a device with address {device.address!r} already exists in this runtime")
        self.devices[device.address] = device
        return device

    async def stop_all(self, concurrency: int = 500) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def stop(device: MqttDevice[Any, Any]) -> None:
            async with gate:
                await device.stop()

        await asyncio.gather(*(stop(device) for device in self.devices.values()))

    @property
    def services(self) -> RuntimeServices:
        if self._services is None:
            name = type(self).__name__
            raise RuntimeError(f"the device runtime is not running; use `async with {name}(...)`")
        return self._services

    async def open_broker_connection(self) -> socket.socket:
        services = self.services
        return await open_tcp_connection(
            services.broker_address, services.broker_family, self.broker.connect_timeout_s
        )


@dataclass(frozen=True, slots=True)
class RuntimeServices:
    """The shared machinery of a running `DeviceRuntime`."""

    loop: asyncio.AbstractEventLoop
    driver: PahoLoopDriver
    http: httpx.AsyncClient
    fetcher: MediaFetcher
    play_log: PlayLog | None
    broker_family: socket.AddressFamily
    broker_address: tuple[Any, ...]


class DeliveryCommand(Protocol):
    """What the shared machinery reads of a device's own command (`play`, `show`)."""

    @property
    def id(self) -> str: ...
    @property
    def correlation_id(self) -> str: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def broadcast_id(self) -> str: ...
    @property
    def priority(self) -> Priority: ...
    @property
    def mode(self) -> str: ...


CommandT = TypeVar("CommandT", bound=DeliveryCommand)
# What a device needs at hand to play a command, once prepared: a speaker's verified playlist.
ContentT = TypeVar("ContentT")


@dataclass(eq=False, slots=True)
class Job(Generic[CommandT, ContentT]):
    """An accepted command that has not ended yet."""

    command: CommandT
    arrival: int
    # First the device gets the content ready (a speaker fetches its media), then the job waits for
    # the device to be free, then it plays (sounds on the speaker, or is up on the screen).
    phase: Literal["preparing", "waiting", "playing"] = "preparing"
    # Set when the phase leaves "preparing".
    content: ContentT | None = None
    prepare_task: asyncio.Task[None] | None = None
    expiry_timer: asyncio.TimerHandle | None = None
    end_timer: asyncio.TimerHandle | None = None
    started_at: float = 0.0
    planned_s: float = 0.0
    # On `completed`: whether the play was cut (a speaker's `max_duration_s`); `None` leaves it out.
    truncated: bool | None = None
    # Started from the programme cache while the link was down: every report says `offline` (§1.4).
    offline: bool = False

    @property
    def rank(self) -> int:
        return self.command.priority.rank


def takes_over(challenger_rank: int, challenger_arrival: int, holder_rank: int, holder_arrival: int) -> bool:
    """§1.4.1: a higher rank wins; at equal rank the holder keeps the device, except that in the
    emergency band the newer command wins (so a stuck alert cannot block a newer one)."""
    if challenger_rank != holder_rank:
        return challenger_rank > holder_rank
    return challenger_rank >= wire.EMERGENCY_RANK_FLOOR and challenger_arrival > holder_arrival


class MqttDevice(ABC, Generic[CommandT, ContentT]):
    """A device on the broker that plays one command at a time (§1.4.1).

    Subclasses define `_parse_command` (their command types), `_prepare` (get a job's content ready,
    then call `_content_ready`), `_planned_length` and `_status` (the members of the retained state that vary
    by kind); the hooks for link changes, extra topics and play-log details are optional.
    """

    _logger: ClassVar[logging.Logger] = logger
    # What the device is called in report details ("… while it waited for the speaker").
    _noun: ClassVar[str] = "device"
    # The remote operations (§1.14) it takes; a speaker adds set_volume and test_tone.
    _operations: ClassVar[frozenset[str]] = frozenset({"reboot", "configure"})

    def __init__(
        self,
        runtime: DeviceRuntime,
        address: str,
        *,
        kind: str,
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
        # A stable, plausible signal strength per device, so repeated runs publish the same state.
        self.rssi_dbm = rssi_dbm if rssi_dbm is not None else -55 - zlib.crc32(address.encode()) % 40
        self._cmd_topic = wire.cmd_topic(address)
        self._ack_topic = wire.ack_topic(address)
        self._state_topic = wire.state_topic(address)
        self._dedupe_memory = dedupe_memory
        self._latest_reports: OrderedDict[str, bytes] = OrderedDict()
        self._active: dict[str, Job[CommandT, ContentT]] = {}
        self._playing: Job[CommandT, ContentT] | None = None
        self._arrivals = itertools.count()
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
        self._link_lost_at: datetime | None = None
        # Reports made while the link is down, published in order on reconnection (§1.10).
        # Created on the first such report, dropped once flushed: thousands of connected devices
        # in a fleet carry no empty deque each.
        self._outbox: deque[bytes] | None = None
        self._outbox_limit = offline_reports_kept
        self._outbox_flush: asyncio.Handle | None = None
        # Counts the oldest reports the bounded outbox let go; logged on the next flush.
        self.offline_reports_dropped = 0
        self._dropped_logged = 0
        # Futures of `wait_until` callers, woken on every change they might be waiting for.
        self._watchers: list[asyncio.Future[None]] | None = None
        # Availability and remote operations (§1.5, §1.14). The settings a `configure` pushed survive
        # a reboot, as in flash; the heartbeat timer runs only while connected.
        self.heartbeat_s = runtime.heartbeat_s
        self.faults: frozenset[str] = frozenset()
        self.quiet_hours: wire.QuietHours | None = None
        self.comm_loss: Mapping[str, Any] | None = None
        self.booted_at: datetime | None = None
        self.reboots = 0
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._reboot_task: asyncio.Task[None] | None = None
        # §1.15.4: the seqs of live commands (own and area topics) accepted so far; like the dedupe
        # memory it survives `crash()` and `stop()`, as a real device keeps it in flash.
        self._replay_window = signature.ReplayWindow()
        # Messages refused on a signature, replay or target check (§1.15.5), by reason.
        self.refusals: Counter[str] = Counter()
        # The firmware it runs and its update machinery (§1.16), kept across reboots like flash.
        self.firmware_version = FIRMWARE
        self.firmware = FirmwareUpdater(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

    @property
    def playing(self) -> str | None:
        """The id of the command on the device now, if any."""
        return self._playing.command.id if self._playing is not None else None

    @property
    def waiting(self) -> tuple[str, ...]:
        """Ids of accepted commands that are not playing (still preparing, or waiting for the device)."""
        return tuple(job.command.id for job in self._active.values() if job.phase != "playing")

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

    @property
    def offline_since(self) -> datetime | None:
        """When (device clock) the device last lost, or powered up without, its broker connection;
        `None` while connected or off."""
        return self._link_lost_at

    @property
    def offline_reports_pending(self) -> int:
        """Reports made while the link was down that the broker has not been given yet."""
        return len(self._outbox) if self._outbox is not None else 0

    async def wait_until(self, predicate: Callable[[Self], bool], timeout: float = 10.0) -> None:
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

    # What a kind of device defines

    @abstractmethod
    def _parse_command(self, envelope: wire.Envelope) -> CommandT | StopCommand:
        """Validates a command of this kind; raises `wire.CommandRejectedError` naming the member."""

    @abstractmethod
    def _prepare(self, job: Job[CommandT, ContentT]) -> None:
        """Gets the job's content ready (now, or in a task kept in `job.prepare_task`), then calls
        `_content_ready(job, content)`, or `_finish(job, "failed", …)` and `_schedule()` if it cannot be."""

    @abstractmethod
    def _planned_length(self, job: Job[CommandT, ContentT]) -> tuple[float, bool | None]:
        """Device seconds the job plays for once started, and whether that cut it short."""

    @abstractmethod
    def _status(self) -> dict[str, object]:
        """The members of the online state (§1.5) that depend on the kind, `playing` among them."""

    def _subscriptions(self) -> list[str]:
        """Topics the device subscribes to, its `cmd` topic first."""
        return [self._cmd_topic]

    def _handle_other_message(self, topic: str, _payload: bytes | bytearray) -> None:
        self._logger.warning("%s: ignored a message on %s", self.address, topic)

    def _log_details(self, _command: CommandT, _state: ReportState) -> Mapping[str, object]:
        """Members the play log adds to a report's entry, besides those of every device."""
        return {}

    def _on_link_lost(self, _now: datetime) -> None:
        """The device just lost (or powered up without) its broker connection."""

    def _on_link_restored(self) -> None:
        """The device is connected again."""

    def _on_power_off(self) -> None:
        """The device is off (shutdown, crash)."""

    def _on_session_ready(self, client: mqtt.Client) -> None:
        """The device just connected and asked for its `_subscriptions()`; it may subscribe to more
        topics in calls of its own, whose SUBACKs reach `_on_other_suback`."""

    def _on_other_suback(self, mid: int, reason_codes: list[ReasonCode]) -> None:
        """The broker answered a subscribe call other than the one for `_subscriptions()`."""

    # Session

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
        own = self.runtime.credentials.get(self.address)
        if own is not None:
            client.username_pw_set(*own)
        elif broker.username is not None:
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
        self.booted_at = self.runtime.clock()
        # Powered up but not connected yet (a speaker's programme may play if an item falls due
        # before the broker answers: a receiver that boots without a link).
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
        reboot = self._reboot_task
        if reboot is not None and not reboot.done() and reboot is not asyncio.current_task():
            reboot.cancel()
            await asyncio.gather(reboot, return_exceptions=True)
        client = self._client
        if client is None:
            return
        self._stopping = True
        self._cancel_reconnect()
        self._power_off()
        for job in list(self._active.values()):
            self._finish(job, "failed", detail="the device shut down before the command ended")
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
                self._logger.warning(
                    "%s: the broker did not confirm the shutdown within %s s", self.address, timeout
                )
        self._abandon_client()

    def crash(self) -> None:
        """Abrupt loss, as a power cut: the TCP connection closes without DISCONNECT, so the broker
        publishes the Last Will; nothing is reported and nothing reconnects until `start()`.
        The dedupe memory and the reports not yet published survive (flash)."""
        if self._client is None:
            return
        self._stopping = True
        self._cancel_reconnect()
        self._power_off()
        for job in list(self._active.values()):
            self._drop_silently(job)
        self._abandon_client()

    def drop_connection(self) -> None:
        """A network blip: the link breaks without DISCONNECT, playback goes on, and the device
        reconnects to its persistent session by itself."""
        sock = self._client.socket() if self._client is not None else None
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)

    def _link_down(self) -> None:
        """The device has no broker connection (lost, or not made yet)."""
        if self._link_lost_at is not None:
            return  # a failed reconnect attempt: the link went down earlier
        now = self.runtime.clock()
        self._link_lost_at = now
        self._cancel_heartbeat()
        self._on_link_lost(now)
        self._notify_watchers()

    def _link_up(self) -> None:
        self._link_lost_at = None
        self._arm_heartbeat()
        self._on_link_restored()
        self._notify_watchers()

    def _power_off(self) -> None:
        self._link_lost_at = None
        self._cancel_heartbeat()
        self._on_power_off()

    async def _first_connect(self, client: NonBlockingConnectClient) -> None:
        broker = self.runtime.broker
        delay = broker.reconnect_first_delay_s
        while True:
            try:
                client.prepared_socket = await self.runtime.open_broker_connection()
                break
            except OSError as error:
                # The broker may still be starting next to the fleet; the caller's timeout bounds this.
                self._logger.info(
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
                self._logger.info("%s: reconnect failed (%s)", self.address, error)
                continue
            return

    def _cancel_reconnect(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            self._reconnect_task = None

    def _abandon_client(self) -> None:
        client, self._client = self._client, None
        self._power_off()
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
            error = DeviceConnectError(f"{self.address}: the broker refused the connection: {reason_code}")
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(error)
            else:
                self._logger.warning("%s", error)
            return
        self._reconnect_delay_s = self.runtime.broker.reconnect_first_delay_s
        self._link_up()
        self._publish_state()
        # paho re-sends its own unacknowledged publishes right after this callback returns; the
        # outbox (newer than those) goes out just after them, before any newer report (§1.10).
        if self._outbox is not None and self._outbox_flush is None:
            self._outbox_flush = self.runtime.services.loop.call_soon(self._flush_outbox, client)
        _, self._subscribe_mid = client.subscribe([(topic, 1) for topic in self._subscriptions()])
        try:
            self._on_session_ready(client)
        except Exception:
            self._logger.exception("%s: setting up the session after connecting broke", self.address)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        if mid != self._subscribe_mid:
            try:
                self._on_other_suback(mid, reason_codes)
            except Exception:
                self._logger.exception("%s: a subscription result could not be handled", self.address)
            return
        ready = self._ready
        for topic, code in zip(self._subscriptions()[1:], reason_codes[1:], strict=False):
            if code.is_failure:
                # The device still works live without it, so this does not fail the connection.
                self._logger.error(
                    "%s: the broker refused the subscription to %s: %s", self.address, topic, code
                )
        if not reason_codes or reason_codes[0].is_failure:
            error = DeviceConnectError(
                f"{self.address}: the broker refused the subscription to {self._cmd_topic}"
            )
            if ready is not None and not ready.done():
                ready.set_exception(error)
            else:
                self._logger.error("%s", error)
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
                    DeviceConnectError(
                        f"{self.address}: the connection closed during the handshake: {reason_code}"
                    )
                )
            return
        self._logger.info("%s: connection lost (%s); reconnecting", self.address, reason_code)
        self._link_down()
        self._cancel_reconnect()
        self._reconnect_task = self.runtime.services.loop.create_task(
            self._reconnect_forever(self._client), name=f"reconnect-{self.address}"
        )

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self._cmd_topic:
            try:
                self._handle_other_message(message.topic, message.payload)
            except Exception:
                self._logger.exception(
                    "%s: a message on %s could not be handled", self.address, message.topic
                )
            return
        try:
            self._handle_command(message.payload)
        except Exception:
            self._logger.exception("%s: a command could not be handled", self.address)

    # Commands

    def _handle_command(self, payload: bytes | bytearray) -> None:
        try:
            envelope = wire.open_envelope(payload)
        except wire.UnidentifiableCommandError as error:
            self._logger.warning("%s: ignored a command that no report could name: %s", self.address, error)
            return
        try:
            verified = signature.verify(envelope.document, self.runtime.command_key, document_kind="command")
            signature.require_target(verified, "device", self.address)
            self._replay_window.admit(verified.seq)
        except signature.SignatureRejectedError as refusal:
            self._refuse(envelope.command_id, envelope.correlation_id, refusal)
            return
        self._handle_envelope(envelope)

    def _refuse(
        self,
        command_id: str,
        correlation_id: str,
        refusal: signature.SignatureRejectedError,
        *,
        logged: bool = False,
    ) -> None:
        """§1.15.5: a message that failed a signature, replay or target check is reported `rejected`
        with the check's `reason`, counted, and otherwise forgotten: it is not the controller's, so it
        must not enter the dedupe memory, where it would shadow the authentic command with that id."""
        self.refusals[refusal.reason] += 1
        if not logged:
            self._logger.warning(
                "%s: refused %s (%s): %s", self.address, command_id, refusal.reason, refusal.detail
            )
        document = wire.report_document(
            command_id,
            correlation_id,
            "rejected",
            self.runtime.clock(),
            detail=refusal.detail,
            reason=refusal.reason,
        )
        self._publish_report(wire.encode(document))
        play_log = self.runtime.services.play_log
        if play_log is not None:
            play_log.record(
                {
                    "address": self.address,
                    "command_id": command_id,
                    "correlation_id": correlation_id,
                    "event": "rejected",
                    "reason": refusal.reason,
                    "detail": refusal.detail,
                    "at": document["at"],
                }
            )
        if self._watchers:
            self._notify_watchers()

    def _handle_envelope(self, envelope: wire.Envelope) -> None:
        """A command as if it had just arrived on the `cmd` topic: duplicates, validation, then a
        stop applied or a play accepted."""
        if self._seen(envelope.command_id):
            self._repeat_latest_report(envelope.command_id)
            return
        if envelope.document.get("type") in wire.OPERATION_TYPES:
            self._handle_operation(envelope)
            return
        if wire.is_firmware_update(envelope):
            self.firmware.handle(envelope)
            return
        try:
            command = self._parse_command(envelope)
        except wire.CommandRejectedError as rejection:
            self._logger.info(
                "%s: rejected command %s: %s", self.address, envelope.command_id, rejection.detail
            )
            self._report(
                envelope.command_id, envelope.correlation_id, "rejected", None, detail=rejection.detail
            )
            return
        if isinstance(command, StopCommand):
            self._apply_stop(command)
        else:
            self._accept(command)

    # Remote operations (§1.14)

    def _handle_operation(self, envelope: wire.Envelope) -> None:
        try:
            operation = wire.parse_operation(envelope, self.address, self._operations)
        except wire.CommandRejectedError as rejection:
            self._logger.info(
                "%s: rejected operation %s: %s", self.address, envelope.command_id, rejection.detail
            )
            self._report(
                envelope.command_id, envelope.correlation_id, "rejected", None, detail=rejection.detail
            )
            return
        if self.runtime.clock() > operation.expires_at:
            self._report_operation(operation, "expired", detail="arrived after expires_at")
            return
        self._logger.info("%s: operation %s (%s)", self.address, operation.type, operation.id)
        if operation.type == "reboot":
            self._start_reboot(operation)
            return
        self._report_operation(operation, "delivered")
        if operation.type == "configure":
            self._configure(operation)
        else:
            self._apply_operation(operation)

    def _apply_operation(self, operation: wire.OperationCommand) -> None:
        """An operation of the kind's own (a speaker's volume and test tone), after `delivered`."""
        self._report_operation(operation, "rejected", detail=f"type: {operation.type!r} is not taken here")

    def _report_operation(
        self,
        operation: wire.OperationCommand,
        state: ReportState,
        *,
        detail: str | None = None,
        result: Mapping[str, object] | None = None,
    ) -> mqtt.MQTTMessageInfo | None:
        return self._report(operation.id, operation.correlation_id, state, None, detail=detail, result=result)

    def _configure(self, operation: wire.OperationCommand) -> None:
        config = operation.config or {}
        if "quiet_hours" in config:
            self.quiet_hours = config["quiet_hours"]
        if "comm_loss" in config:
            self.comm_loss = config["comm_loss"]
        if "heartbeat_s" in config:
            self.heartbeat_s = float(config["heartbeat_s"])
            if self._heartbeat_timer is not None:
                self._arm_heartbeat()
        self._publish_state()
        self._report_operation(operation, "completed", result={"config": self._config_document()})

    def _config_document(self) -> dict[str, object]:
        return {
            "quiet_hours": wire.quiet_hours_document(self.quiet_hours),
            "comm_loss": dict(self.comm_loss) if self.comm_loss is not None else None,
            "heartbeat_s": self.heartbeat_s,
        }

    def _start_reboot(self, operation: wire.OperationCommand) -> None:
        if self._reboot_task is not None and not self._reboot_task.done():
            self._report_operation(operation, "failed", detail="a reboot is already under way")
            return
        self._reboot_task = self.runtime.services.loop.create_task(
            self._reboot(operation), name=f"reboot-{self.address}"
        )

    async def _reboot(self, operation: wire.OperationCommand) -> None:
        """`delivered` (confirmed by the broker), then the connection drops without DISCONNECT, as
        at power loss, so the broker publishes the Last Will; the device comes back a moment later
        with what it keeps in flash (dedupe memory, outbox, programme, settings) and reports
        `completed` with its boot time."""
        info = self._report_operation(operation, "delivered")
        if info is not None:
            acknowledged = self.runtime.services.loop.create_future()
            self._puback_waiters[info.mid] = acknowledged
            # Bounded: a broker that does not answer does not stop the reboot.
            await asyncio.wait({acknowledged}, timeout=5.0)
        self.crash()
        await asyncio.sleep(max(REBOOT_S / self.runtime.speed, _REBOOT_MIN_S))
        try:
            await self.start(timeout=60.0)
        except (DeviceConnectError, TimeoutError, OSError) as error:
            self._logger.error("%s: did not come back from its reboot: %s", self.address, error)  # noqa: TRY400
            return
        self.reboots += 1
        self._report_operation(
            operation,
            "completed",
            result={"booted_at": wire.format_timestamp(self.booted_at or self.runtime.clock())},
        )

    def set_faults(self, faults: frozenset[str]) -> None:
        """Injects faults (see `FAULTS`); a device no longer silent publishes its state at once."""
        unknown = faults - FAULTS
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(FAULTS)}")
        was_silent = "silent" in self.faults
        self.faults = faults
        if was_silent and "silent" not in faults:
            self._publish_state()

    # Heartbeat (§1.5)

    def _arm_heartbeat(self) -> None:
        self._cancel_heartbeat()
        self._heartbeat_timer = self.runtime.services.loop.call_later(self.heartbeat_s, self._on_heartbeat)

    def _cancel_heartbeat(self) -> None:
        timer, self._heartbeat_timer = self._heartbeat_timer, None
        if timer is not None:
            timer.cancel()

    def _on_heartbeat(self) -> None:
        self._heartbeat_timer = None
        if not self.connected:
            return
        self._publish_state()
        self._arm_heartbeat()

    def _seen(self, command_id: str) -> bool:
        """§1.4.2: the command is being handled or was handled (within the dedupe memory)."""
        return command_id in self._active or command_id in self._latest_reports

    def _repeat_latest_report(self, command_id: str) -> None:
        latest = self._latest_reports.get(command_id)
        if latest is not None:
            self._latest_reports.move_to_end(command_id)
            self._publish_report(latest)

    def _accept(self, command: CommandT, *, offline: bool = False) -> None:
        now = self.runtime.clock()
        if now > command.expires_at:
            self._report_command(command, "expired", detail="arrived after expires_at", offline=offline)
            return
        self._report_command(command, "delivered", offline=offline)
        job: Job[CommandT, ContentT] = Job(command, next(self._arrivals), offline=offline)
        self._active[command.id] = job
        job.expiry_timer = self.runtime.services.loop.call_later(
            (command.expires_at - now).total_seconds(), self._on_expiry_due, job
        )
        self._prepare(job)

    def _content_ready(self, job: Job[CommandT, ContentT], content: ContentT) -> None:
        """The job's content is ready: it waits for the device, which §1.4.1 may give it at once."""
        if self._active.get(job.command.id) is job:
            job.content = content
            job.phase = "waiting"
            self._schedule()

    def _apply_stop(self, stop: StopCommand) -> None:
        if stop.target == wire.STOP_ALL:
            victims = list(self._active.values())
        else:
            target = self._active.get(stop.target)
            victims = [target] if target is not None else []
        for job in victims:
            self._finish(job, "stopped", played_s=self._played_so_far(job))
        self._report(
            stop.id,
            stop.correlation_id,
            "completed",
            None,
            detail=None if victims else "nothing to stop: the target is neither playing nor waiting",
        )
        self._schedule()

    def _on_expiry_due(self, job: Job[CommandT, ContentT]) -> None:
        if self._active.get(job.command.id) is not job or job.phase == "playing":
            return
        remaining_s = (job.command.expires_at - self.runtime.clock()).total_seconds()
        if remaining_s > 0:
            job.expiry_timer = self.runtime.services.loop.call_later(remaining_s, self._on_expiry_due, job)
            return
        self._finish(job, "expired", detail="expires_at passed before it could start")
        self._schedule()

    # The device itself: one command at a time (§1.4.1)

    def _schedule(self) -> None:
        """Gives the device to the best ready command if §1.4.1 lets it take over."""
        while (candidate := self._best_waiting()) is not None:
            holder = self._playing
            if holder is not None and not takes_over(
                candidate.rank, candidate.arrival, holder.rank, holder.arrival
            ):
                break
            if self.runtime.clock() > candidate.command.expires_at:
                self._finish(
                    candidate, "expired", detail=f"expires_at passed while it waited for the {self._noun}"
                )
                continue
            if holder is not None:
                self._finish(holder, "interrupted", played_s=self._played_so_far(holder))
            self._start_playing(candidate)
        self._publish_state_if_changed()

    def _best_waiting(self) -> Job[CommandT, ContentT] | None:
        best: Job[CommandT, ContentT] | None = None
        for job in self._active.values():
            if job.phase != "waiting":
                continue
            if best is None or takes_over(job.rank, job.arrival, best.rank, best.arrival):
                best = job
        return best

    def _start_playing(self, job: Job[CommandT, ContentT]) -> None:
        job.planned_s, job.truncated = self._planned_length(job)
        job.phase = "playing"
        loop = self.runtime.services.loop
        job.started_at = loop.time()
        if job.expiry_timer is not None:
            job.expiry_timer.cancel()
            job.expiry_timer = None
        job.end_timer = loop.call_later(job.planned_s / self.runtime.speed, self._on_play_end, job)
        self._playing = job
        self._report_command(job.command, "playing", offline=job.offline)

    def _on_play_end(self, job: Job[CommandT, ContentT]) -> None:
        self._finish(job, "completed", played_s=job.planned_s, truncated=job.truncated)
        self._schedule()

    def _played_so_far(self, job: Job[CommandT, ContentT]) -> float:
        if job.phase != "playing":
            return 0.0
        elapsed_s = (self.runtime.services.loop.time() - job.started_at) * self.runtime.speed
        return min(job.planned_s, elapsed_s)

    def _finish(
        self,
        job: Job[CommandT, ContentT],
        state: ReportState,
        *,
        detail: str | None = None,
        played_s: float | None = None,
        truncated: bool | None = None,
    ) -> None:
        """Ends a job in its one terminal state (§1.4); a job already ended is left alone."""
        if not self._drop_silently(job):
            return
        self._report_command(
            job.command, state, detail=detail, played_s=played_s, truncated=truncated, offline=job.offline
        )

    def _drop_silently(self, job: Job[CommandT, ContentT]) -> bool:
        if self._active.get(job.command.id) is not job:
            return False
        del self._active[job.command.id]
        for timer in (job.expiry_timer, job.end_timer):
            if timer is not None:
                timer.cancel()
        task = job.prepare_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self._playing is job:
            self._playing = None
        return True

    # Publishing

    def _report_command(
        self,
        command: CommandT,
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
        command: CommandT | None,
        *,
        detail: str | None = None,
        played_s: float | None = None,
        truncated: bool | None = None,
        offline: bool = False,
        result: Mapping[str, object] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> mqtt.MQTTMessageInfo | None:
        document = wire.report_document(
            command_id,
            correlation_id,
            state,
            self.runtime.clock(),
            detail=detail,
            played_s=played_s,
            truncated=truncated,
            offline=offline,
            result=result,
            # §1.15.5: expiry is one of the checks a command must pass, named like the others.
            reason=signature.EXPIRED if state == "expired" else None,
            extra=extra,
        )
        payload = wire.encode(document)
        self._latest_reports[command_id] = payload
        self._latest_reports.move_to_end(command_id)
        if len(self._latest_reports) > self._dedupe_memory:
            self._latest_reports.popitem(last=False)
        info = self._publish_report(payload)
        play_log = self.runtime.services.play_log
        if play_log is not None and extra is not None and "firmware" in extra:
            play_log.record(
                {"address": self.address, "command_id": command_id, "event": f"firmware_{state}", **document}
            )
        elif play_log is not None and (command is not None or state == "rejected"):
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
            if command is not None:
                entry.update(self._log_details(command, state))
            play_log.record(entry)
        elif play_log is not None and result is not None:
            play_log.record(
                {
                    "address": self.address,
                    "command_id": command_id,
                    "event": state,
                    "at": document["at"],
                    "result": dict(result),
                    **({"detail": detail} if detail is not None else {}),
                }
            )
        if self._watchers:
            self._notify_watchers()
        return info

    def _publish_state_if_changed(self) -> None:
        if self.playing != self._published_playing:
            self._publish_state()

    def _publish_state(self) -> None:
        client = self._client
        if client is None or not client.is_connected():
            return  # the state goes out with the next connect anyway
        if "silent" in self.faults:
            return  # a hung firmware: the connection lives on, nothing is said
        playing = self.playing
        payload = wire.online_state(
            self.runtime.clock(),
            kind=self.kind,
            firmware=self.firmware_version,
            rssi_dbm=self.rssi_dbm,
            status={
                **self._status(),
                "heartbeat_s": self.heartbeat_s,
                "booted_at": wire.format_timestamp(self.booted_at) if self.booted_at else None,
                "config": self._config_document(),
            },
        )
        client.publish(self._state_topic, payload, qos=1, retain=True)
        self._published_playing = playing

    def _publish_report(self, payload: bytes) -> mqtt.MQTTMessageInfo | None:
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
                return client.publish(self._ack_topic, payload, qos=1)
            outbox = self._outbox = deque()
        if len(outbox) >= self._outbox_limit:
            outbox.popleft()
            self.offline_reports_dropped += 1
        outbox.append(payload)
        return None

    def _flush_outbox(self, client: NonBlockingConnectClient) -> None:
        """Hands every kept report to paho in order; paho sends them as its in-flight window allows
        and keeps those not acknowledged for the next session, so the outbox can be emptied now."""
        self._outbox_flush = None
        if client is not self._client or not client.is_connected():
            return  # the next connect flushes
        unlogged = self.offline_reports_dropped - self._dropped_logged
        if unlogged:
            self._logger.warning(
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
