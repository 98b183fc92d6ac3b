"""A Mosquitto of the test's own, on a free port, with auth and the ACL of docs/protocol.md §1.7.

Its service accounts are the ones a controller in the tests is configured with (tests/support/system.py):
the controller's, the simulation-only shared account that simulated fleets use unless a test gives each
device its own credentials, and the claim account of unprovisioned devices.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.broker import BrokerAccount, BrokerError, ManagedMosquitto

SIMULATOR_USERNAME = "wardcast.simulator"
CLAIM_USERNAME = "wardcast.claim"


@dataclass(frozen=True)
class TestBroker:
    __test__ = False
    broker: ManagedMosquitto
    controller: BrokerAccount
    # Simulation only: rights on every device's topics (tests that are not about credentials).
    simulator: BrokerAccount
    claim: BrokerAccount

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url


def start_test_broker(state_dir: Path, *, persistence: bool = True) -> TestBroker:
    controller = BrokerAccount("controller", secrets.token_urlsafe(16))
    simulator = BrokerAccount(SIMULATOR_USERNAME, secrets.token_urlsafe(16))
    claim = BrokerAccount(CLAIM_USERNAME, secrets.token_urlsafe(16))
    broker = ManagedMosquitto(
        state_dir,
        accounts=[controller, simulator, claim],
        controller_username=controller.username,
        simulator_username=simulator.username,
        claim_username=claim.username,
        persistence=persistence,
    )
    try:
        broker.start()
    except BrokerError as error:
        pytest.fail(f"cannot start the test's Mosquitto: {error}")
    return TestBroker(broker, controller, simulator, claim)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[TestBroker]:
    handle = start_test_broker(tmp_path / "mosquitto")
    try:
        yield handle
    finally:
        handle.broker.stop()
