"""The MQTT driver (docs/protocol.md §1): one persistent broker connection for the whole fleet.

A background task owns the connection: it connects, subscribes to the device report topics, turns
inbound messages into events and, when the link drops, reconnects with jittered exponential backoff.
Each connection attempt gets a fresh aiomqtt client, so paho never re-sends an unacknowledged command
on its own after a reconnect: retrying is the dispatcher's decision (DESIGN.md §3), and the device
deduplicates by command id either way.

Flow control: at most `max_inflight` commands (capped by the broker's MQTT 5 Receive Maximum) wait for
their PUBACK at once; the others wait for a slot, inside their own timeout. A slot is freed by the
PUBACK or by the loss of the link, never by a caller giving up, so the window always matches what the
broker has really not acknowledged yet.
"""

from __future__ import annotations

import asyncio
import copy
import math
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from drivers.base import (
    Ack,
    DeviceCommand,
    DeviceTimeout,
    DeviceUnreachable,
    Driver,
    DriverError,
    InboundEvent,
    LinkListener,
    LinkState,
    ObservableLink,
    ProtocolError,
)
from drivers.mqtt_codec import (
    CONTROLLER_SUBSCRIPTIONS,
    ack_topic,
    area_command_topic,
    command_topic,
    decode_inbound,
    encode_command,
    encode_document,
)

MqttProtocol = Literal["3.1.1", "5"]

DEFAULT_PORT: Final = 1883
# Measured through this driver on the 2-core test machine, 10,000 concurrent sends to a local
# Mosquitto: 100 in flight cost 111 µs per send, 200 cost 117-126 µs, 1,000 cost 165 µs, because
# aiomqtt scans every pending call on each publish. At ~120 µs per send, 200 in flight keep the
# link busy up to a round trip of ~20 ms.
DEFAULT_MAX_INFLIGHT: Final = 200
_MQTT5_MAX_INTERVAL: Final = 2**32 - 1  # a Four Byte Integer property
_MAX_BACKOFF_DOUBLINGS: Final = 30
_MAX_PACKET_IDS: Final = 65_535
_MAX_TWO_BYTE_LENGTH: Final = 65_535
_FIRST_FAILURE_CODE: Final = 0x80  # SUBACK return codes from 0x80 on refuse the subscription

log = structlog.get_logger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_broker_url(url: str) -> tuple[str, int]:
    """`(host, port)` of an `mqtt://host[:port]` URL; raises `ValueError` for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"broker URL {url!r}: expected mqtt://host[:port]")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"broker URL {url!r}: pass credentials as username/password, not in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: expected no path, query or fragment")
    return parts.hostname, parts.port or DEFAULT_PORT


class _SubscriptionRefusedError(Exception):
    """The broker refused a report topic: a broker ACL that does not match docs/protocol.md §1.7."""


class _Client(aiomqtt.Client):
    """aiomqtt's client, keeping what the CONNACK says, which aiomqtt itself drops."""

    session_present: bool = False
    receive_maximum: int | None = None

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.session_present = bool(flags.session_present)
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        self.receive_maximum = receive_maximum if isinstance(receive_maximum, int) else None
        super()._on_connect(client, userdata, flags, reason_code, properties)


class _CommandProperties(Properties):
    """The MQTT 5 mirrors of a command (protocol.md §1.3), encoded by hand.

    paho only ever calls `pack()` on a publish's properties, and its generic encoder costs more than
    the rest of the publish: with it an MQTT 5 send took 206 µs against 140 µs under 3.1.1.
    """

    _wire: bytes

    @classmethod
    def build(
        cls, *, message_expiry_interval: int, correlation_data: bytes, response_topic: str | None
    ) -> Self:
        properties = copy.copy(_COMMAND_PROPERTIES_TEMPLATE)
        values: dict[str, object] = {
            "PayloadFormatIndicator": 1,
            "MessageExpiryInterval": message_expiry_interval,
            "ContentType": "application/json",
            "CorrelationData": correlation_data,
        }
        if response_topic is not None:
            values["ResponseTopic"] = response_topic
        for name, value in values.items():
            # Past paho's validating __setattr__: these values are ours, and it is the slow part.
            object.__setattr__(properties, name, value)
        body = b"".join(
            (
                b"\x01\x01",
                b"\x02" + message_expiry_interval.to_bytes(4, "big"),
                b"\x03" + _length_prefixed(b"application/json"),
                b"\x08" + _length_prefixed(response_topic.encode()) if response_topic is not None else b"",
                b"\x09" + _length_prefixed(correlation_data),
            )
        )
        object.__setattr__(properties, "_wire", _variable_byte_integer(len(body)) + body)
        return properties  # type: ignore[return-value]  # a copy of the template, so of this class

    def pack(self) -> bytes:
        return self._wire


def _length_prefixed(data: bytes) -> bytes:
    if len(data) > _MAX_TWO_BYTE_LENGTH:
        raise ValueError(f"an MQTT string or binary property holds at most 65,535 bytes, not {len(data)}")
    return len(data).to_bytes(2, "big") + data


def _variable_byte_integer(value: int) -> bytes:
    encoded = bytearray()
    while True:
        value, digit = divmod(value, 128)
        encoded.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


_COMMAND_PROPERTIES_TEMPLATE: Final = _CommandProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


@dataclass(eq=False)
class _Link:
    """One established connection and the publishes waiting on it."""

    client: _Client
    window: asyncio.Semaphore
    publishing: set[asyncio.Task[None]] = field(default_factory=set)
    lost: bool = False
    loss: BaseException | None = None

    def publish(
        self, topic: str, payload: bytes, *, retain: bool, properties: Properties | None
    ) -> asyncio.Task[None]:
        """Start a QoS 1 publish whose window slot (already taken) is freed when it finishes."""
        task = asyncio.ensure_future(
            self.client.publish(topic, payload, qos=1, retain=retain, properties=properties, timeout=math.inf)
        )
        self.publishing.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.publishing.discard(task)
        self.window.release()
        if not task.cancelled():
            # Retrieve it even when the sender has stopped waiting, so asyncio does not log it as lost.
            task.exception()

    def close(self, loss: BaseException | None) -> None:
        """The connection is gone: no PUBACK will come, so fail whatever still waits for one."""
        self.lost = True
        self.loss = loss
        for task in list(self.publishing):
            task.cancel()


class MqttDriver:
    """`drivers.base.Driver` over MQTT 3.1.1 or 5, QoS 1, with a persistent session.

    `send` returns once the broker has acknowledged the command (PUBACK). Device reports, states and
    telemetry arrive through `events()`, which has a single consumer. `add_link_listener` and
    `wait_connected` tell the dispatcher when the broker link comes and goes.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str | None,
        password: str | None,
        client_id: str,
        protocol: MqttProtocol = "5",
        keepalive_s: int = 30,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 10.0,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        session_expiry_s: int = 86_400,
        connect_timeout_s: float = 10.0,
        clock: Callable[[], datetime] = utc_now,
        subscriptions: Sequence[str] = CONTROLLER_SUBSCRIPTIONS,
    ) -> None:
        self._host, self._port = parse_broker_url(url)
        unknown = set(subscriptions) - set(CONTROLLER_SUBSCRIPTIONS)
        if unknown or not subscriptions:
            raise ValueError(f"subscriptions: expected some of {list(CONTROLLER_SUBSCRIPTIONS)}")
        if not client_id:
            raise ValueError("client_id is required: a persistent session is keyed by it")
        if protocol not in ("3.1.1", "5"):
            raise ValueError(f"protocol {protocol!r}: expected '3.1.1' or '5'")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError("reconnect bounds: expected 0 < reconnect_min_s <= reconnect_max_s")
        if not 1 <= max_inflight <= _MAX_PACKET_IDS:
            raise ValueError("max_inflight: expected 1..65535 (an MQTT packet identifier is 16 bits)")
        if session_expiry_s < 1:
            raise ValueError("session_expiry_s: expected >= 1, or the broker drops reports sent while away")
        self.url = url
        self.client_id = client_id
        self.protocol: MqttProtocol = protocol
        self._username = username
        self._password = password
        self._keepalive_s = keepalive_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._max_inflight = max_inflight
        self._session_expiry_s = session_expiry_s
        self._connect_timeout_s = connect_timeout_s
        self._clock = clock
        self._subscriptions = tuple(subscriptions)
        self._events: asyncio.Queue[InboundEvent | None] = asyncio.Queue()
        self._up = asyncio.Event()
        self._listeners: list[LinkListener] = []
        self._link: _Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._inbox_type = self._make_inbox_type()
        self._connecting = False
        # An Event rather than a bool only so that type checkers do not narrow it across awaits.
        self._closing = asyncio.Event()
        self._ever_connected = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("an MqttDriver is entered once")
        self._task = asyncio.create_task(self._maintain_link(), name=f"mqtt-link-{self.client_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is None or self._closing.is_set():
            return
        self._closing.set()
        # A connect in progress runs in an executor thread that cannot be cancelled; let it finish
        # (bounded by connect_timeout_s) so its socket is closed by a clean disconnect.
        if not self._connecting:
            task.cancel()
        await asyncio.wait({task})
        self._events.put_nowait(None)

    # -- Driver ------------------------------------------------------------------------------------

    async def send(self, command: DeviceCommand, *, timeout: float) -> Ack:
        """Publish `command.document` to the device's `cmd` topic (or, for an area command, the area's)
        at QoS 1; return after the PUBACK."""
        if command.area is not None:
            if command.document.get("area") != command.area or "device" in command.document:
                raise ProtocolError(
                    f"area command {command.command_id}: document `area`/`device` do not match the command"
                )
        elif (
            command.document.get("id") != command.command_id
            or command.document.get("device") != command.address
        ):
            raise ProtocolError(
                f"command {command.command_id}: document `id`/`device` do not match the command"
            )
        if command.expires_at.tzinfo is None:
            raise ProtocolError(f"command {command.command_id}: expires_at must be timezone-aware")
        try:
            topic = (
                area_command_topic(command.area)
                if command.area is not None
                else command_topic(command.address)
            )
            payload = encode_command(command.document)
            properties = self._command_properties(command) if self.protocol == "5" else None
        except (ValueError, TypeError) as error:
            raise ProtocolError(f"command {command.command_id} cannot go on the wire: {error}") from error
        published_at = await self._publish(
            topic,
            payload,
            retain=False,
            timeout=timeout,
            what=f"command {command.command_id} to {command.area or command.address}",
            properties=properties,
        )
        return Ack(command_id=command.command_id, accepted_at=self._clock(), published_at=published_at)

    async def events(self) -> AsyncIterator[InboundEvent]:
        """Reports, states and telemetry (and `MalformedPayload`s) until the driver closes."""
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # later iterators end too
                return
            yield event

    async def ping(self) -> bool:
        return self._link is not None

    # -- link state --------------------------------------------------------------------------------

    @property
    def link_state(self) -> LinkState:
        return "connected" if self._link is not None else "disconnected"

    def add_link_listener(self, listener: LinkListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    async def wait_connected(self) -> None:
        await self._up.wait()

    # -- extras ------------------------------------------------------------------------------------

    async def publish_retained(
        self, topic: str, document: Mapping[str, Any] | None, *, timeout: float
    ) -> None:
        """Publish a retained QoS 1 document (a device's schedule); `None` clears the retained one."""
        try:
            payload = b"" if document is None else encode_document(document)
        except (ValueError, TypeError) as error:
            raise ProtocolError(f"document for {topic} cannot go on the wire: {error}") from error
        await self._publish(
            topic, payload, retain=True, timeout=timeout, what=f"retained {topic}", properties=None
        )

    # -- internals ---------------------------------------------------------------------------------

    async def _publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool,
        timeout: float,
        what: str,
        properties: Properties | None,
    ) -> datetime:
        """Publish at QoS 1 and wait for the PUBACK; return when the PUBLISH went on the wire."""
        link = self._link
        if link is None:
            raise DeviceUnreachable(f"{what}: not connected to the broker at {self.url}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await link.window.acquire()
        except TimeoutError as error:
            raise DeviceTimeout(
                f"{what}: {len(link.publishing)} publishes in flight, no slot within {timeout} s"
            ) from error
        if link.lost:
            link.window.release()
            raise DeviceUnreachable(f"{what}: the connection to {self.url} was lost") from link.loss
        published_at = self._clock()
        publishing = link.publish(topic, payload, retain=retain, properties=properties)
        # asyncio.wait, unlike wait_for, leaves the publish running when we stop waiting: its slot stays
        # taken until the broker acknowledges it.
        done, _ = await asyncio.wait((publishing,), timeout=max(0.0, deadline - loop.time()))
        if not done:
            raise DeviceTimeout(f"{what}: no PUBACK from {self.url} within {timeout} s")
        if publishing.cancelled():
            raise DeviceUnreachable(
                f"{what}: the connection to {self.url} was lost before the PUBACK"
            ) from link.loss
        failure = publishing.exception()
        if failure is not None:
            raise _translate(failure, what) from failure
        return published_at

    def _command_properties(self, command: DeviceCommand) -> Properties:
        seconds_left = (command.expires_at - self._clock()).total_seconds()
        return _CommandProperties.build(
            # Rounded up: the payload's `expires_at` is what devices enforce, and a device that gets a
            # command a fraction of a second late reports `expired`, which tells more than silence.
            message_expiry_interval=min(_MQTT5_MAX_INTERVAL, max(1, math.ceil(seconds_left))),
            correlation_data=str(command.document.get("id", command.command_id)).encode(),
            # Each follower of an area answers on its own `ack` topic: there is no one to name.
            response_topic=ack_topic(command.address) if command.area is None else None,
        )

    def _new_client(self) -> _Client:
        speaks_mqtt5 = self.protocol == "5"
        connect_properties: Properties | None = None
        if speaks_mqtt5:
            connect_properties = _properties(PacketTypes.CONNECT)
            connect_properties.SessionExpiryInterval = min(_MQTT5_MAX_INTERVAL, self._session_expiry_s)
        client = _Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if speaks_mqtt5 else aiomqtt.ProtocolVersion.V311,
            # A persistent session either way: the broker keeps our subscriptions and queues the
            # reports devices publish while we are away (protocol.md §1.1).
            clean_session=None if speaks_mqtt5 else False,
            # paho refuses any clean_start but its default under 3.1.1.
            clean_start=False if speaks_mqtt5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_properties,
            keepalive=self._keepalive_s,
            timeout=self._connect_timeout_s,
            # Unlimited in paho: our window (a slot held from publish to PUBACK) is the one bound, and
            # paho's own limit rescans every unacknowledged message on each PUBACK.
            max_inflight_messages=0,
            max_queued_outgoing_messages=0,
            queue_type=self._inbox_type,
        )
        # aiomqtt warns on every publish beyond 10 pending ones; our window is the back-pressure.
        client.pending_calls_threshold = self._max_inflight + len(CONTROLLER_SUBSCRIPTIONS) + 1
        return client

    async def _maintain_link(self) -> None:
        failures = 0
        while not self._closing.is_set():
            client = self._new_client()
            link: _Link | None = None
            self._connecting = True
            try:
                async with client:
                    self._connecting = False
                    if self._closing.is_set():
                        return
                    await self._subscribe(client)
                    if self._closing.is_set():
                        # Python 3.11's wait_for (inside aiomqtt's subscribe) swallows a cancel
                        # that lands as the SUBACK arrives, so the close may not have reached us.
                        return
                    link = self._open_link(client, failures)
                    failures = 0
                    # Messages never reach aiomqtt's queue (see _inbox_type); iterating it is only
                    # how aiomqtt tells us that the connection is gone.
                    async for _ in client.messages:
                        pass
            except (aiomqtt.MqttError, _SubscriptionRefusedError) as error:
                if self._closing.is_set():
                    return
                failures += 1
                self._log_failure(failures, error, was_connected=link is not None)
                if link is not None:
                    self._close_link(link, error)
            except Exception as error:
                # Not a broker problem but a bug (here, in aiomqtt or in paho). Dying would leave the
                # controller silently deaf, so say it loudly and keep reconnecting.
                log.exception("mqtt.link_task_error", broker=self.url, client_id=self.client_id)
                failures += 1
                if link is not None:
                    self._close_link(link, error)
            finally:
                self._connecting = False
                if link is not None and not link.lost:
                    self._close_link(link, None)
            await asyncio.sleep(self._backoff_s(failures))

    def _make_inbox_type(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        """The queue class aiomqtt puts inbound messages in, decoding them into our events instead.

        Decoding in paho's callback, before paho sends the PUBACK, means a message acknowledged to
        the broker is already an event: aiomqtt's own queue drops what it still holds when the link
        drops, and paying a task per message to drain it costs more than the decoding.
        """
        accept = self._accept

        class Inbox(asyncio.Queue[aiomqtt.Message]):
            def put_nowait(self, item: aiomqtt.Message) -> None:
                accept(item)

        return Inbox

    def _accept(self, message: aiomqtt.Message) -> None:
        try:
            events = decode_inbound(message.topic.value, message.payload)
        except Exception:
            # decode_inbound is total; should that ever break, lose one message rather than the link.
            log.exception("mqtt.decode_failed", topic=str(message.topic))
            return
        for event in events:
            self._events.put_nowait(event)

    async def _subscribe(self, client: _Client) -> None:
        topics = self._subscriptions
        granted = await client.subscribe([(topic, 1) for topic in topics])
        codes: list[int | ReasonCode] = list(granted)
        refused = [topic for topic, code in zip(topics, codes, strict=False) if _is_refusal(code)]
        if refused or len(codes) != len(topics):
            raise _SubscriptionRefusedError(f"the broker refused {refused or list(topics)}")
        # The persistent session keeps what an earlier run subscribed to (telemetry, before ingest
        # workers took it over): leave what this run does not want.
        dropped = [topic for topic in CONTROLLER_SUBSCRIPTIONS if topic not in topics]
        if dropped:
            await client.unsubscribe(dropped)

    def _open_link(self, client: _Client, failures: int) -> _Link:
        window = self._max_inflight
        if client.receive_maximum is not None and client.receive_maximum < window:
            # MQTT 5 §4.9: more unacknowledged publishes than this and the broker may disconnect us.
            window = client.receive_maximum
        if self._ever_connected and not client.session_present:
            log.warning(
                "mqtt.session_lost",
                broker=self.url,
                client_id=self.client_id,
                consequence="reports published while the controller was away are gone",
            )
        log.info(
            "mqtt.connected",
            broker=self.url,
            client_id=self.client_id,
            protocol=self.protocol,
            session_present=client.session_present,
            window=window,
            failed_attempts=failures,
        )
        self._ever_connected = True
        link = _Link(client=client, window=asyncio.Semaphore(window))
        self._link = link
        self._up.set()
        self._notify("connected")
        return link

    def _close_link(self, link: _Link, loss: BaseException | None) -> None:
        link.close(loss)
        if self._link is link:
            self._link = None
            self._up.clear()
            self._notify("disconnected")

    def _notify(self, state: LinkState) -> None:
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                # A listener's bug must not take the broker connection down with it.
                log.exception("mqtt.link_listener_failed", state=state)

    def _log_failure(self, failures: int, error: BaseException, *, was_connected: bool) -> None:
        event = "mqtt.link_lost" if was_connected else "mqtt.connect_failed"
        # aiomqtt's "Disconnected during message iteration" keeps the real reason in __cause__.
        reason = "; ".join(
            str(cause) or repr(cause) for cause in (error, error.__cause__) if cause is not None
        )
        emit = log.warning if failures == 1 else log.debug
        emit(event, broker=self.url, client_id=self.client_id, error=reason, attempt=failures)

    def _backoff_s(self, failures: int) -> float:
        if failures == 0:
            return self._reconnect_min_s
        ceiling = min(
            self._reconnect_max_s, self._reconnect_min_s * 2 ** min(failures - 1, _MAX_BACKOFF_DOUBLINGS)
        )
        # Full jitter: a thousand controllers (or one after a broker restart) do not retry in step.
        return random.uniform(0.0, ceiling)


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho's Properties is unannotated


def _is_refusal(code: int | ReasonCode) -> bool:
    return code.is_failure if isinstance(code, ReasonCode) else code >= _FIRST_FAILURE_CODE


def _translate(error: BaseException, what: str) -> DriverError:
    if isinstance(error, aiomqtt.MqttError):
        return DeviceUnreachable(f"{what}: {error}")
    if isinstance(error, ValueError):  # paho refuses a topic or payload
        return ProtocolError(f"{what}: {error}")
    return DriverError(f"{what}: {error!r}")


if TYPE_CHECKING:

    def _implements(driver: MqttDriver) -> tuple[Driver, ObservableLink]:
        return driver, driver
