"""A Mosquitto of the test's own, on a free port, with auth and the device ACL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.broker import BrokerAccount, BrokerError, ManagedMosquitto


@dataclass(frozen=True)
class TestBroker:
    __test__ = False
    broker: ManagedMosquitto
    controller: BrokerAccount
    device: BrokerAccount

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[TestBroker]:
    controller = BrokerAccount("controller", secrets.token_urlsafe(16))
    device = BrokerAccount("device", secrets.token_urlsafe(16))
    broker = ManagedMosquitto(
        tmp_path / "mosquitto", accounts=[controller, device], controller_username=controller.username
    )
    try:
        broker.start()
    except BrokerError as error:
        pytest.fail(f"cannot start the test's Mosquitto: {error}")
    try:
        yield TestBroker(broker, controller, device)
    finally:
        broker.stop()
