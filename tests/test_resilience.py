"""Crashes and broker restarts: the outbox and persistent sessions carry every broadcast through."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.support.broker import TestBroker
from tests.support.scenario import SPEAKERS, all_ended, all_in, seed, send, upload, wait_until_ended
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle

pytestmark = pytest.mark.integration


def test_a_broadcast_accepted_before_a_crash_is_delivered_after_restart_once(
    controller: ControllerHandle, fleet: FleetHandle, mosquitto: TestBroker
):
    seed(controller)
    media_id = upload(controller, 1.0)
    # With the broker down the controller can accept (outbox) but not publish.
    mosquitto.broker.kill()
    accepted = send(controller, media_id, targets={"areas": ["hn.a"]})
    broadcast_id = str(accepted["id"])
    controller.kill()  # SIGKILL between accepting and sending
    mosquitto.broker.start()
    controller.start()
    with EventWatcher(controller) as watcher:
        watcher.wait_for(
            all_ended(broadcast_id, 5, "completed"), timeout=60, what="all 5 completed after restart"
        )
    plays = Counter(
        p["address"]
        for p in fleet.plays()
        if p.get("broadcast_id") == broadcast_id and p["event"] == "playing"
    )
    assert plays == Counter(dict.fromkeys(SPEAKERS["hn.a.t1"] + SPEAKERS["hn.a.t2"] + SPEAKERS["hn.a.t3"], 1))


def test_a_crash_right_after_acceptance_never_plays_twice(controller: ControllerHandle, fleet: FleetHandle):
    seed(controller)
    media_id = upload(controller, 1.0)
    accepted = send(controller, media_id, targets={"areas": ["hn"]})
    broadcast_id = str(accepted["id"])
    controller.kill()  # some commands may be out, some not, some acknowledged but not recorded
    controller.start()
    with EventWatcher(controller) as watcher:
        detail = wait_until_ended(controller, watcher, broadcast_id, 8)
    assert detail["counts"] == {"completed": 8}
    plays = Counter(
        p["address"]
        for p in fleet.plays()
        if p.get("broadcast_id") == broadcast_id and p["event"] == "playing"
    )
    assert set(plays.values()) == {1} and len(plays) == 8


def test_every_delivery_completes_across_a_broker_restart(
    controller: ControllerHandle, fleet: FleetHandle, mosquitto: TestBroker
):
    seed(controller)
    media_id = upload(controller, 60.0)  # 3 s at 20×
    with EventWatcher(controller) as watcher:
        accepted = send(controller, media_id, targets={"areas": ["hn"]})
        broadcast_id = str(accepted["id"])
        watcher.wait_for(all_in(broadcast_id, 8, "playing"), what="all 8 playing")
        mosquitto.broker.kill()
        mosquitto.broker.start()
        watcher.wait_for(all_ended(broadcast_id, 8, "completed"), timeout=60, what="all 8 completed")
