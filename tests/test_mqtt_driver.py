"""The MQTT driver against a real Mosquitto with auth and the device ACL (docs/protocol.md §1)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import pytest
import structlog.testing
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.broker import ManagedMosquitto, free_tcp_port
from drivers.base import (
    CommandReport,
    DeviceCommand,
    DeviceState,
    DeviceTimeout,
    DeviceUnreachable,
    InboundEvent,
    LinkState,
    MalformedPayload,
    ProtocolError,
    TelemetryReading,
)
from drivers.mqtt import MqttDriver, MqttProtocol, _CommandProperties, parse_broker_url
from drivers.mqtt_codec import ack_topic, command_topic, encode_command, schedule_topic, state_topic
from tests.support.broker import TestBroker

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

WAIT = 10.0  # generous: only a failing test ever waits this long


def play_command(address: str, *, expires_in: timedelta = timedelta(minutes=10)) -> DeviceCommand:
    now = datetime.now(UTC)
    command_id = str(uuid.uuid4())
    expires_at = now + expires_in
    document = {
        "v": 1,
        "type": "play",
        "id": command_id,
        "correlation_id": f"delivery-{command_id[:8]}",
        "device": address,
        "issued_at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "expires_at": expires_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "seq": 1,
        "broadcast_id": "b-1",
        "priority": {"class": "emergency", "sub": 10, "rank": 522},
        "mode": "drill",
        "media": {
            "url": "http://controller/media/ab",
            "sha256": "ab",
            "duration_s": 12.5,
            "content_type": "audio/ogg",
        },
        "repeats": 1,
        "max_duration_s": 60.0,
    }
    return DeviceCommand(address=address, command_id=command_id, document=document, expires_at=expires_at)


class Devices:
    """Device-side MQTT clients on the simulation-only shared account, each with its address as client id."""

    def __init__(self, broker: TestBroker) -> None:
        self._broker = broker

    @asynccontextmanager
    async def connect(self, address: str, *, mqtt5: bool = True) -> AsyncIterator[aiomqtt.Client]:
        client = aiomqtt.Client(
            self._broker.host,
            self._broker.port,
            username=self._broker.simulator.username,
            password=self._broker.simulator.password,
            identifier=address,
            protocol=aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311,
        )
        async with client:
            yield client


@pytest.fixture
def devices(mosquitto: TestBroker) -> Devices:
    return Devices(mosquitto)


DriverFactory = Callable[..., MqttDriver]


@pytest.fixture
def make_driver(mosquitto: TestBroker) -> DriverFactory:
    def make(
        *,
        protocol: MqttProtocol = "5",
        client_id: str = "controller-test",
        url: str | None = None,
        **options: Any,
    ) -> MqttDriver:
        options.setdefault("reconnect_min_s", 0.05)
        options.setdefault("reconnect_max_s", 0.5)
        return MqttDriver(
            url or mosquitto.url,
            username=mosquitto.controller.username,
            password=mosquitto.controller.password,
            client_id=client_id,
            protocol=protocol,
            **options,
        )

    return make


class BrokerRestarts:
    """Kills the test's Mosquitto and starts another on the same port and state directory."""

    def __init__(self, broker: TestBroker) -> None:
        self._broker = broker
        self.current: ManagedMosquitto = broker.broker
        self._started: list[ManagedMosquitto] = []

    def kill(self) -> None:
        self.current.kill()

    def freeze(self) -> None:
        """SIGSTOP: the TCP connection stays up but nothing is answered, as with a hung broker."""
        assert self.current._process is not None
        os.kill(self.current._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.current._process is not None
        os.kill(self.current._process.pid, signal.SIGCONT)

    def start_again(self) -> None:
        old = self.current
        self.current = ManagedMosquitto(
            old.state_dir,
            host=old.host,
            port=old.port,
            accounts=[self._broker.controller, self._broker.simulator, self._broker.claim],
            controller_username=self._broker.controller.username,
            simulator_username=self._broker.simulator.username,
            claim_username=self._broker.claim.username,
        )
        self._started.append(self.current)
        self.current.start()

    def stop_all(self) -> None:
        for broker in self._started:
            broker.stop()


@pytest.fixture
def restarts(mosquitto: TestBroker) -> Iterator[BrokerRestarts]:
    helper = BrokerRestarts(mosquitto)
    try:
        yield helper
    finally:
        if helper.current._process is not None:
            helper.thaw()  # a stopped process ignores SIGTERM until continued
        helper.stop_all()


class LinkStates:
    """Records link state changes and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[LinkState] = []
        self._changed = asyncio.Condition()

    def __call__(self, state: LinkState) -> None:
        self.seen.append(state)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, state: LinkState, occurrences: int = 1) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self.seen.count(state) >= occurrences), WAIT
            )


async def next_event(
    events: AsyncIterator[InboundEvent], wanted: Callable[[InboundEvent], bool] = lambda _: True
) -> InboundEvent:
    """The next event that `wanted` accepts (skipping e.g. retained states of other tests' devices)."""

    async def search() -> InboundEvent:
        async for event in events:
            if wanted(event):
                return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(search(), WAIT)


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(aiter(client.messages)), WAIT)


# -- sending -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_send_returns_ack_after_puback_and_the_device_gets_the_exact_document(
    make_driver: DriverFactory, devices: Devices, protocol: MqttProtocol
) -> None:
    command = play_command("spk-1")
    async with devices.connect("spk-1") as device, make_driver(protocol=protocol) as driver:
        await device.subscribe(command_topic("spk-1"), qos=1)
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        before = datetime.now(UTC)

        ack = await driver.send(command, timeout=5)

        assert ack.command_id == command.command_id
        assert before <= ack.accepted_at <= datetime.now(UTC)
        message = await next_message(device)
        assert message.topic.value == "wardcast/v1/dev/spk-1/cmd"
        assert message.qos == 1
        assert not message.retain
        assert message.payload == encode_command(command.document)
        assert json.loads(message.payload) == command.document
        if protocol == "3.1.1":
            assert message.properties is None or not hasattr(message.properties, "CorrelationData")


async def test_mqtt5_properties_mirror_the_payload(make_driver: DriverFactory, devices: Devices) -> None:
    command = play_command("spk-2", expires_in=timedelta(seconds=90.2))
    async with devices.connect("spk-2") as device, make_driver(protocol="5") as driver:
        await device.subscribe(command_topic("spk-2"), qos=1)
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        await driver.send(command, timeout=5)

        properties = (await next_message(device)).properties
        assert properties is not None
        assert properties.CorrelationData == command.command_id.encode()
        assert properties.ResponseTopic == ack_topic("spk-2")
        assert properties.ContentType == "application/json"
        assert properties.PayloadFormatIndicator == 1
        # Rounded up from 90.2 s; the broker takes off the whole seconds the message waited.
        assert 89 <= properties.MessageExpiryInterval <= 91


async def test_an_expired_command_is_still_published_with_a_positive_expiry(
    make_driver: DriverFactory, devices: Devices
) -> None:
    command = play_command("spk-3", expires_in=timedelta(seconds=-30))
    async with devices.connect("spk-3") as device, make_driver(protocol="5") as driver:
        await device.subscribe(command_topic("spk-3"), qos=1)
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        await driver.send(command, timeout=5)
        properties = (await next_message(device)).properties
        assert properties is not None
        assert properties.MessageExpiryInterval == 1


async def test_commands_that_cannot_go_on_the_wire_raise_protocol_error(make_driver: DriverFactory) -> None:
    good = play_command("spk-4")
    wrong_device = DeviceCommand("spk-5", good.command_id, good.document, good.expires_at)
    bad_address = DeviceCommand(
        "spk/4", good.command_id, {**good.document, "device": "spk/4"}, good.expires_at
    )
    not_json = DeviceCommand(
        "spk-4", good.command_id, {**good.document, "repeats": float("nan")}, good.expires_at
    )
    async with make_driver() as driver:
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        for command in (wrong_device, bad_address, not_json):
            with pytest.raises(ProtocolError):
                await driver.send(command, timeout=5)


async def test_a_burst_of_2000_concurrent_sends_all_get_acks(
    make_driver: DriverFactory, mosquitto: TestBroker
) -> None:
    count = 2_000
    commands = [play_command(f"spk-{index:05d}") for index in range(count)]
    watcher = aiomqtt.Client(
        mosquitto.host,
        mosquitto.port,
        username=mosquitto.controller.username,
        password=mosquitto.controller.password,
        identifier="burst-watcher",
    )
    async with watcher, make_driver() as driver:
        await watcher.subscribe("wardcast/v1/dev/+/cmd", qos=1)
        await asyncio.wait_for(driver.wait_connected(), WAIT)

        started = time.perf_counter()
        acks = await asyncio.wait_for(
            asyncio.gather(*(driver.send(command, timeout=30) for command in commands)), 60
        )
        elapsed = time.perf_counter() - started

        assert [ack.command_id for ack in acks] == [command.command_id for command in commands]
        seen: set[str] = set()
        async with asyncio.timeout(WAIT):
            async for message in watcher.messages:
                seen.add(json.loads(message.payload)["id"])
                if len(seen) == count:
                    break
        assert seen == {command.command_id for command in commands}
    # Shown with `-o log_cli=true --log-cli-level=INFO`; a wall-clock bound would only make CI flaky.
    logger.info(
        "%d concurrent sends acknowledged in %.3f s: %.1f µs per send", count, elapsed, elapsed / count * 1e6
    )


# -- inbound -----------------------------------------------------------------------------------------


async def test_device_reports_states_and_telemetry_arrive_as_typed_events(
    make_driver: DriverFactory, devices: Devices
) -> None:
    async with make_driver() as driver, devices.connect("spk-6") as device:
        events = aiter(driver.events())
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        report = {
            "v": 1,
            "command_id": "c-1",
            "correlation_id": "d-1",
            "state": "completed",
            "at": "2026-11-24T06:00:01.5Z",
            "played_s": 60.0,
            "truncated": True,
        }
        await device.publish(ack_topic("spk-6"), json.dumps(report), qos=1)
        await device.publish(
            state_topic("spk-6"),
            json.dumps(
                {"v": 1, "online": True, "at": "2026-11-24T06:00:00Z", "volume": 70, "playing": "c-1"}
            ),
            qos=1,
            retain=True,
        )
        await device.publish(
            "wardcast/v1/dev/spk-6/telemetry",
            json.dumps(
                {
                    "v": 1,
                    "at": "2026-11-24T06:00:02Z",
                    "readings": [
                        {"metric": "noise_db", "value": 61.5, "unit": "dB"},
                        {"metric": "pm25", "value": 35},
                    ],
                }
            ),
            qos=1,
        )

        mine = lambda event: event.address == "spk-6"  # noqa: E731
        assert await next_event(events, mine) == CommandReport(
            address="spk-6",
            command_id="c-1",
            correlation_id="d-1",
            state="completed",
            at=datetime(2026, 11, 24, 6, 0, 1, 500_000, tzinfo=UTC),
            played_s=60.0,
            truncated=True,
        )
        assert await next_event(events, mine) == DeviceState(
            address="spk-6",
            online=True,
            at=datetime(2026, 11, 24, 6, tzinfo=UTC),
            attributes={"volume": 70, "playing": "c-1"},
        )
        at = datetime(2026, 11, 24, 6, 0, 2, tzinfo=UTC)
        assert await next_event(events, mine) == TelemetryReading("spk-6", "noise_db", 61.5, "dB", at)
        assert await next_event(events, mine) == TelemetryReading("spk-6", "pm25", 35.0, None, at)


async def test_a_burst_of_reports_arrives_complete_and_in_order(
    make_driver: DriverFactory, devices: Devices
) -> None:
    count = 2_000
    async with make_driver() as driver, devices.connect("spk-11") as device:
        events = aiter(driver.events())
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        await asyncio.gather(
            *(
                device.publish(
                    ack_topic("spk-11"),
                    json.dumps(
                        {
                            "v": 1,
                            "command_id": f"c-{number}",
                            "correlation_id": "d",
                            "state": "delivered",
                            "at": "2026-11-24T06:00:00Z",
                        }
                    ),
                    qos=1,
                )
                for number in range(count)
            )
        )
        received = [await next_event(events) for _ in range(count)]
    assert [getattr(event, "command_id", None) for event in received] == [f"c-{n}" for n in range(count)]


async def test_malformed_payloads_become_events(make_driver: DriverFactory, devices: Devices) -> None:
    async with make_driver() as driver, devices.connect("spk-7") as device:
        events = aiter(driver.events())
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        await device.publish(ack_topic("spk-7"), b'{"v": 1, "command_id": "c", "state": "playing"}', qos=1)
        await device.publish(ack_topic("spk-7"), b"\x00\xffnot json", qos=1)

        first = await next_event(events, lambda event: event.address == "spk-7")
        second = await next_event(events, lambda event: event.address == "spk-7")
        assert isinstance(first, MalformedPayload)
        assert "`correlation_id` is missing" in first.reason
        assert first.topic == ack_topic("spk-7")
        assert isinstance(second, MalformedPayload)
        assert "not UTF-8 JSON" in second.reason


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_reports_published_while_the_controller_is_away_are_kept(
    make_driver: DriverFactory, devices: Devices, protocol: MqttProtocol
) -> None:
    async with make_driver(protocol=protocol, client_id="controller-away") as driver:
        await asyncio.wait_for(driver.wait_connected(), WAIT)
    report = {
        "v": 1,
        "command_id": "c-9",
        "correlation_id": "d-9",
        "state": "delivered",
        "at": "2026-11-24T06:00:00Z",
    }
    async with devices.connect("spk-8") as device:
        await device.publish(ack_topic("spk-8"), json.dumps(report), qos=1)

    async with make_driver(protocol=protocol, client_id="controller-away") as driver:
        event = await next_event(aiter(driver.events()), lambda event: event.address == "spk-8")
    assert isinstance(event, CommandReport)
    assert event.command_id == "c-9"


async def test_events_end_when_the_driver_closes(make_driver: DriverFactory) -> None:
    driver = make_driver()
    async with driver:
        events = aiter(driver.events())
        await asyncio.wait_for(driver.wait_connected(), WAIT)
    assert [event async for event in events] == []
    assert not await driver.ping()


async def test_retained_documents_reach_a_device_that_subscribes_later(
    make_driver: DriverFactory, devices: Devices
) -> None:
    schedule = {"v": 1, "device": "spk-9", "items": [{"at": "2026-11-24T06:00:00Z", "broadcast_id": "b-1"}]}
    async with make_driver() as driver:
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        await driver.publish_retained(schedule_topic("spk-9"), schedule, timeout=5)
    async with devices.connect("spk-9") as device:
        await device.subscribe(schedule_topic("spk-9"), qos=1)
        message = await next_message(device)
    assert message.retain
    assert json.loads(message.payload) == schedule


# -- failures ----------------------------------------------------------------------------------------


async def test_send_while_the_broker_is_down_raises_unreachable_at_once(
    make_driver: DriverFactory, restarts: BrokerRestarts
) -> None:
    links = LinkStates()
    async with make_driver() as driver:
        driver.add_link_listener(links)
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        restarts.kill()
        await links.wait_for("disconnected")

        started = time.perf_counter()
        with pytest.raises(DeviceUnreachable, match="not connected"):
            await driver.send(play_command("spk-1"), timeout=5)
        assert time.perf_counter() - started < 0.5
        assert not await driver.ping()
        assert driver.link_state == "disconnected"


async def test_a_driver_started_before_its_broker_connects_when_the_broker_comes(
    mosquitto: TestBroker, restarts: BrokerRestarts, make_driver: DriverFactory
) -> None:
    restarts.kill()
    with structlog.testing.capture_logs() as logs:
        async with make_driver() as driver:
            # A negative check, not a synchronisation: several attempts fail meanwhile.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(driver.wait_connected(), 0.3)
            with pytest.raises(DeviceUnreachable):
                await driver.send(play_command("spk-1"), timeout=5)
            restarts.start_again()
            await asyncio.wait_for(driver.wait_connected(), WAIT)
            await driver.send(play_command("spk-1"), timeout=5)

    failures = [entry for entry in logs if entry["event"] == "mqtt.connect_failed"]
    assert [entry["log_level"] for entry in failures][:1] == ["warning"]  # the first one loudly
    assert all(entry["log_level"] == "debug" for entry in failures[1:])  # the repeats quietly
    (connected,) = [entry for entry in logs if entry["event"] == "mqtt.connected"]
    assert connected["failed_attempts"] == len(failures)


async def test_reconnects_by_itself_after_a_broker_crash(
    make_driver: DriverFactory, restarts: BrokerRestarts, devices: Devices
) -> None:
    links = LinkStates()
    async with make_driver() as driver:
        events = aiter(driver.events())
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        driver.add_link_listener(links)

        restarts.kill()
        await links.wait_for("disconnected")
        restarts.start_again()
        await links.wait_for("connected")
        assert links.seen == ["disconnected", "connected"]

        command = play_command("spk-10")
        async with devices.connect("spk-10") as device:
            await device.subscribe(command_topic("spk-10"), qos=1)
            ack = await driver.send(command, timeout=5)
            assert ack.command_id == command.command_id
            assert json.loads((await next_message(device)).payload) == command.document

            report = {
                "v": 1,
                "command_id": command.command_id,
                "correlation_id": "d",
                "state": "delivered",
                "at": "2026-11-24T06:00:00Z",
            }
            await device.publish(ack_topic("spk-10"), json.dumps(report), qos=1)
            event = await next_event(events, lambda event: event.address == "spk-10")
        assert isinstance(event, CommandReport)
        assert event.command_id == command.command_id


async def test_no_puback_within_the_timeout_raises_device_timeout(
    make_driver: DriverFactory, restarts: BrokerRestarts
) -> None:
    async with make_driver() as driver:
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        restarts.freeze()
        try:
            with pytest.raises(DeviceTimeout, match="no PUBACK"):
                await driver.send(play_command("spk-1"), timeout=0.3)
        finally:
            restarts.thaw()


async def test_a_send_waiting_for_a_window_slot_times_out(
    make_driver: DriverFactory, restarts: BrokerRestarts
) -> None:
    async with make_driver(max_inflight=1) as driver:
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        restarts.freeze()
        try:
            first = asyncio.create_task(driver.send(play_command("spk-1"), timeout=0.6))
            await asyncio.sleep(0)  # one turn of the loop: `first` takes the only slot
            with pytest.raises(DeviceTimeout, match="no slot"):
                await driver.send(play_command("spk-2"), timeout=0.2)
            with pytest.raises(DeviceTimeout, match="no PUBACK"):
                await first
        finally:
            restarts.thaw()


async def test_sends_in_flight_when_the_link_drops_raise_unreachable(
    make_driver: DriverFactory, restarts: BrokerRestarts
) -> None:
    links = LinkStates()
    async with make_driver() as driver:
        driver.add_link_listener(links)
        await asyncio.wait_for(driver.wait_connected(), WAIT)
        restarts.freeze()  # no PUBACK can come now
        sending = [
            asyncio.create_task(driver.send(play_command(f"spk-{n}"), timeout=WAIT)) for n in range(20)
        ]
        # Two turns of the loop (FIFO, not timing): the sends start their publishes, then the
        # publishes hand their packets to paho and wait for the PUBACK.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert driver._link is not None
        assert len(driver._link.publishing) == 20
        restarts.kill()

        results = await asyncio.wait_for(asyncio.gather(*sending, return_exceptions=True), WAIT)
        assert all(isinstance(result, DeviceUnreachable) for result in results), results
        await links.wait_for("disconnected")


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1884") == ("127.0.0.1", 1884)
    assert parse_broker_url("mqtt://broker.local") == ("broker.local", 1883)
    for bad in ("tcp://x:1", "mqtt://", "mqtt://user:pw@x:1", "mqtt://x:1/path"):
        with pytest.raises(ValueError, match="broker URL"):
            parse_broker_url(bad)


def test_unusable_options_are_refused() -> None:
    url = f"mqtt://127.0.0.1:{free_tcp_port()}"
    for options in (
        {"client_id": ""},
        {"client_id": "c", "max_inflight": 0},
        {"client_id": "c", "reconnect_min_s": 2.0, "reconnect_max_s": 1.0},
        {"client_id": "c", "protocol": "3.1"},
        {"client_id": "c", "session_expiry_s": 0},
    ):
        with pytest.raises(ValueError):  # each names its own option
            MqttDriver(url, username=None, password=None, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["spk-1", "a" * 64])
def test_hand_encoded_command_properties_match_paho(address: str) -> None:
    built = _CommandProperties.build(
        message_expiry_interval=86_400, correlation_data=b"cmd-1", response_topic=ack_topic(address)
    )
    reference = Properties(PacketTypes.PUBLISH)
    reference.PayloadFormatIndicator = 1
    reference.MessageExpiryInterval = 86_400
    reference.ContentType = "application/json"
    reference.ResponseTopic = ack_topic(address)
    reference.CorrelationData = b"cmd-1"
    assert built.pack() == reference.pack()
    assert built.json() == reference.json()
