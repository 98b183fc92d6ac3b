"""The broker's access rules (docs/protocol.md §1.7), proven on a real Mosquitto with real accounts.

Non-delivery is proven without waiting for a time: a client's messages reach a subscriber in the order it
sent them, so once the allowed message sent *after* a refused one has arrived, the refused one would have
arrived before it if the broker had let it through.

What Mosquitto 2.0.11 does with an `acl_file` (checked here): a publish the ACL refuses is acknowledged
(PUBACK under 3.1.1) and dropped; a SUBSCRIBE is always granted (SUBACK with the QoS asked), and each
message is then checked against the subscriber's read rights when it is delivered, so a subscription to
another device's topics receives nothing. Refused connections get CONNACK "not authorised", and a client
the reloaded files no longer admit is disconnected during the reload.
"""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from controller.broker import (
    BrokerAccount,
    mosquitto_password_hash,
    mosquitto_password_matches,
)
from tests.support.broker import TestBroker, start_test_broker

WAIT_S = 20.0
ROOT = "wardcast/v1"


@dataclass
class Client:
    """A paho client on its own network thread, with what the broker told it."""

    inner: mqtt.Client
    connack: queue.Queue[ReasonCode] = field(default_factory=queue.Queue)
    subacks: queue.Queue[list[ReasonCode]] = field(default_factory=queue.Queue)
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def subscribe(self, topic: str) -> int:
        """The broker's answer for `topic`: the granted QoS (0x80 when refused, which Mosquitto 2.0's
        acl_file never does)."""
        self.inner.subscribe(topic, qos=1)
        (code,) = self.subacks.get(timeout=WAIT_S)
        return code.value

    def publish(self, topic: str, payload: bytes) -> None:
        self.inner.publish(topic, payload, qos=1).wait_for_publish(WAIT_S)

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=WAIT_S)

    def close(self) -> None:
        self.inner.disconnect()
        self.inner.loop_stop()


@pytest.fixture
def connect(mosquitto: TestBroker) -> Iterator[object]:
    opened: list[Client] = []

    def open_client(
        username: str | None, password: str | None, client_id: str | None = None, *, expect_ok: bool = True
    ) -> Client:
        inner = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client = Client(inner)
        if username is not None:
            inner.username_pw_set(username, password)
        inner.on_connect = lambda _c, _u, _f, reason, _p: client.connack.put(reason)
        inner.on_subscribe = lambda _c, _u, _m, reasons, _p: client.subacks.put(list(reasons))
        inner.on_message = lambda _c, _u, message: client.messages.put((message.topic, message.payload))
        inner.on_disconnect = lambda *_args: client.disconnected.set()
        inner.connect(mosquitto.host, mosquitto.port)
        inner.loop_start()
        opened.append(client)
        reason = client.connack.get(timeout=WAIT_S)
        assert (reason.value == 0) == expect_ok, f"{username}: CONNACK {reason}"
        return client

    yield open_client
    for client in opened:
        client.close()


@pytest.fixture
def devices(mosquitto: TestBroker) -> dict[str, BrokerAccount]:
    """Two device accounts on the broker, username = address, as provisioning makes them."""
    accounts = {name: BrokerAccount(name, secrets.token_urlsafe(18)) for name in ("spk-a", "spk-b")}
    mosquitto.broker.set_device_credentials(
        {name: mosquitto_password_hash(account.password) for name, account in accounts.items()}
    )
    return accounts


def _watcher(connect, mosquitto: TestBroker, *topics: str) -> Client:
    controller = connect(mosquitto.controller.username, mosquitto.controller.password)
    for topic in topics:
        assert controller.subscribe(topic) == 1
    return controller


def test_the_password_hash_is_mosquittos_format():
    password_hash = mosquitto_password_hash("s3cret-value")
    assert password_hash.startswith("$7$101$")
    assert mosquitto_password_matches("s3cret-value", password_hash)
    assert not mosquitto_password_matches("s3cret-valuE", password_hash)


def test_anonymous_and_wrong_passwords_are_refused(connect, devices):
    connect(None, None, expect_ok=False)
    connect("spk-a", "wrong", "spk-a", expect_ok=False)
    connect("spk-a", devices["spk-b"].password, "spk-a", expect_ok=False)
    connect("spk-ghost", devices["spk-a"].password, "spk-ghost", expect_ok=False)


@pytest.mark.parametrize("who", ["controller", "simulator", "claim"])
def test_service_accounts_connect(connect, mosquitto: TestBroker, who: str):
    account = getattr(mosquitto, who)
    connect(account.username, account.password)


@pytest.mark.parametrize("leaf", ["ack", "state", "telemetry"])
def test_a_device_cannot_publish_on_another_devices_topics(connect, mosquitto, devices, leaf):
    controller = _watcher(connect, mosquitto, f"{ROOT}/dev/+/{leaf}")
    device_a = connect("spk-a", devices["spk-a"].password, "spk-a")
    device_a.publish(f"{ROOT}/dev/spk-b/{leaf}", b"forged")  # 3.1.1: PUBACKed, then dropped
    device_a.publish(f"{ROOT}/dev/spk-a/{leaf}", b"own")
    assert controller.next_message() == (f"{ROOT}/dev/spk-a/{leaf}", b"own")


def test_a_device_using_anothers_client_id_gets_only_its_own_rights(connect, mosquitto, devices):
    """Rights follow the username, so claiming B's address as client id gains nothing."""
    controller = _watcher(connect, mosquitto, f"{ROOT}/dev/+/ack")
    impostor = connect("spk-a", devices["spk-a"].password, "spk-b")
    impostor.subscribe(f"{ROOT}/dev/spk-b/cmd")
    impostor.subscribe(f"{ROOT}/dev/spk-a/cmd")
    impostor.publish(f"{ROOT}/dev/spk-b/ack", b"forged")
    impostor.publish(f"{ROOT}/dev/spk-a/ack", b"own")
    assert controller.next_message() == (f"{ROOT}/dev/spk-a/ack", b"own")
    controller.publish(f"{ROOT}/dev/spk-b/cmd", b"for b")
    controller.publish(f"{ROOT}/dev/spk-a/cmd", b"for a")
    assert impostor.next_message() == (f"{ROOT}/dev/spk-a/cmd", b"for a")


@pytest.mark.parametrize(
    "other",
    [
        f"{ROOT}/dev/spk-b/cmd",
        f"{ROOT}/dev/spk-b/schedule",
        f"{ROOT}/dev/+/cmd",
        "#",
        f"{ROOT}/dev/spk-b/ack",
    ],
)
def test_a_device_receives_nothing_of_another_devices_topics(connect, mosquitto, devices, other):
    controller = _watcher(connect, mosquitto)
    device_a = connect("spk-a", devices["spk-a"].password, "spk-a")
    device_a.subscribe(other)  # granted by Mosquitto 2.0; each message is then checked on delivery
    assert device_a.subscribe(f"{ROOT}/dev/spk-a/cmd") == 1
    for topic in (f"{ROOT}/dev/spk-b/cmd", f"{ROOT}/dev/spk-b/schedule", f"{ROOT}/dev/spk-b/ack"):
        controller.publish(topic, b"not for a")
    controller.publish(f"{ROOT}/dev/spk-a/cmd", b"for a")
    assert device_a.next_message() == (f"{ROOT}/dev/spk-a/cmd", b"for a")
    assert device_a.messages.empty()


def test_a_device_follows_its_own_commands_schedule_and_the_area_topics(connect, mosquitto, devices):
    controller = _watcher(connect, mosquitto)
    device_a = connect("spk-a", devices["spk-a"].password, "spk-a")
    for topic in (f"{ROOT}/dev/spk-a/cmd", f"{ROOT}/dev/spk-a/schedule", f"{ROOT}/area/hn.a.t1/cmd"):
        assert device_a.subscribe(topic) == 1
        controller.publish(topic, b"x")
        assert device_a.next_message() == (topic, b"x")


def test_a_device_cannot_publish_area_commands(connect, mosquitto, devices):
    controller = _watcher(connect, mosquitto, f"{ROOT}/area/+/cmd", f"{ROOT}/dev/+/ack")
    device_a = connect("spk-a", devices["spk-a"].password, "spk-a")
    device_a.publish(f"{ROOT}/area/hn/cmd", b"play everywhere")
    device_a.publish(f"{ROOT}/dev/spk-a/ack", b"own")
    assert controller.next_message() == (f"{ROOT}/dev/spk-a/ack", b"own")


def test_the_claim_account_only_asks_and_reads_answers(connect, mosquitto, devices):
    controller = _watcher(connect, mosquitto, f"{ROOT}/dev/+/ack", f"{ROOT}/claim/+/#")
    claimant = connect(mosquitto.claim.username, mosquitto.claim.password)
    for topic in (f"{ROOT}/dev/spk-a/cmd", f"{ROOT}/area/hn/cmd", f"{ROOT}/claim/SN1/request"):
        claimant.subscribe(topic)
    assert claimant.subscribe(f"{ROOT}/claim/SN1/response") == 1
    claimant.publish(f"{ROOT}/dev/spk-a/ack", b"forged")
    claimant.publish(f"{ROOT}/claim/SN1/response", b"forged answer")
    claimant.publish(f"{ROOT}/claim/SN1/request", b"request")
    assert controller.next_message() == (f"{ROOT}/claim/SN1/request", b"request")
    for topic in (f"{ROOT}/dev/spk-a/cmd", f"{ROOT}/area/hn/cmd", f"{ROOT}/claim/SN1/response"):
        controller.publish(topic, b"from the controller")
    assert claimant.next_message() == (f"{ROOT}/claim/SN1/response", b"from the controller")
    assert claimant.messages.empty()


def test_a_removed_device_is_disconnected_at_once_and_refused(connect, mosquitto, devices):
    device_a = connect("spk-a", devices["spk-a"].password, "spk-a")
    device_b = connect("spk-b", devices["spk-b"].password, "spk-b")
    # set_device_credentials returns once Mosquitto has reloaded (SIGHUP) and applied the new files.
    mosquitto.broker.set_device_credentials({"spk-b": mosquitto_password_hash(devices["spk-b"].password)})
    assert device_a.disconnected.wait(WAIT_S), "the removed device's open connection survived the reload"
    connect("spk-a", devices["spk-a"].password, "spk-a", expect_ok=False)
    assert not device_b.disconnected.is_set()


def test_a_rotated_password_closes_the_old_session_and_refuses_the_old_password(connect, mosquitto, devices):
    device_a = connect("spk-a", devices["spk-a"].password, "spk-a")
    new_password = secrets.token_urlsafe(18)
    mosquitto.broker.set_device_credentials(
        {
            "spk-a": mosquitto_password_hash(new_password),
            "spk-b": mosquitto_password_hash(devices["spk-b"].password),
        }
    )
    assert device_a.disconnected.wait(WAIT_S)
    connect("spk-a", devices["spk-a"].password, "spk-a", expect_ok=False)
    connect("spk-a", new_password, "spk-a")


def test_a_device_account_may_not_take_a_service_accounts_name(tmp_path: Path):
    broker = start_test_broker(tmp_path / "broker", persistence=False)
    try:
        with pytest.raises(Exception, match="service account"):
            broker.broker.set_device_credentials({"controller": mosquitto_password_hash("x" * 20)})
    finally:
        broker.broker.stop()
