"""Wired horn zones end to end (docs/protocol.md §3.4): a broadcast to a group served by an amplifier
switches its zones on over Modbus before the receiver at the amplifier's input plays, and off again
afterwards; a faulty amplifier fails that delivery with the reason. A real Mosquitto, the controller,
the simulated fleet, and a simulated Modbus box whose relays the test watches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.modbus_box import BoxConfig, ModbusBox, ModbusTcpServer
from tests.support.broker import TestBroker
from tests.support.scenario import SPEAKERS, all_ended, seed, send, upload
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle
from tests.support.threaded import ServedInThread

pytestmark = pytest.mark.integration

RECEIVER = "amp-b2"
WAIT_S = 30.0


@dataclass
class Box:
    served: ServedInThread[ModbusTcpServer]
    box: ModbusBox

    @property
    def port(self) -> int:
        return self.served.server.port

    def when(self, condition: Callable[[], bool]) -> Future[None]:
        return self.served.when(self.box.wait_until, condition)

    def call(self, action: Callable[[], None]) -> None:
        self.served.call(action)


@pytest.fixture
def box() -> Iterator[Box]:
    simulated = ModbusBox(BoxConfig(unit=1, amplifier_warmup_s=0.2))
    with ServedInThread(lambda: ModbusTcpServer([simulated])) as served:
        yield Box(served, simulated)


@pytest.fixture
def fleet_with_receiver(
    tmp_path: Path, mosquitto: TestBroker, controller: ControllerHandle
) -> Iterator[FleetHandle]:
    addresses = [a for group in SPEAKERS.values() for a in group] + [RECEIVER]
    handle = FleetHandle(mosquitto, tmp_path / "fleet", addresses, controller.command_key)
    handle.workdir.mkdir()
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def register_wired_zone(controller: ControllerHandle, port: int) -> None:
    with controller.client() as client:
        response = client.post(
            "/api/v1/devices",
            json={
                "id": "wz-b2",
                "kind": "wired_zone",
                "area": "hn.b.t2",
                "address": RECEIVER,
                "config": {
                    "modbus": {"link": f"tcp://127.0.0.1:{port}", "unit": 1, "zones": [2, 3], "volume": 80}
                },
            },
        )
    assert response.status_code == 201, response.text


def zones_live(box: ModbusBox) -> bool:
    return box.audio_live and box.zone_coils[1] and box.zone_coils[2] and not box.zone_coils[0]


def all_off(box: ModbusBox) -> bool:
    return not box.amplifier_powered and not any(box.zone_coils)


def deliveries(controller: ControllerHandle, broadcast_id: str) -> dict[str, dict[str, Any]]:
    with controller.client() as client:
        shown = client.get(f"/api/v1/broadcasts/{broadcast_id}").json()
    return {d["device_id"]: d for d in shown["deliveries"]}


def test_a_group_with_wired_zones_hears_a_broadcast_with_its_relays_switched_around_it(
    controller: ControllerHandle, fleet_with_receiver: FleetHandle, box: Box
) -> None:
    seed(controller)
    register_wired_zone(controller, box.port)
    media_id = upload(controller, 2.0)
    with EventWatcher(controller) as watcher:
        live = box.when(lambda: zones_live(box.box))
        broadcast = send(controller, media_id, targets={"areas": ["hn.b.t2"]})
        live.result(WAIT_S)  # the zones carried audio (amplifier ready, volume, relays closed)
        assert box.box.volume == 80
        watcher.wait_for(
            all_ended(str(broadcast["id"]), 2, "completed"), what="the speaker and the zone played"
        )
        box.when(lambda: all_off(box.box)).result(WAIT_S)
        played = {p["address"] for p in fleet_with_receiver.plays() if p["event"] == "playing"}
        assert played == {"b2-1", RECEIVER}

        # City-wide: the speakers by area topics, the wired zone by its own command; every one plays.
        live = box.when(lambda: zones_live(box.box))
        city = send(controller, media_id, targets={"areas": ["hn"]})
        live.result(WAIT_S)
        watcher.wait_for(
            all_ended(str(city["id"]), 9, "completed"), what="the city-wide broadcast everywhere"
        )
        box.when(lambda: all_off(box.box)).result(WAIT_S)

        # A faulty amplifier: the zone's delivery fails naming it, the group's speaker still plays.
        box.call(lambda: setattr(box.box, "amplifier_fault", True))
        faulty = send(controller, media_id, targets={"areas": ["hn.b.t2"]})
        watcher.wait_for(all_ended(str(faulty["id"]), 2), what="both deliveries ended")
    ended = deliveries(controller, str(faulty["id"]))
    assert ended["spk-b2-1"]["state"] == "completed"
    assert ended["wz-b2"]["state"] == "failed"
    assert "amplifier_fault" in ended["wz-b2"]["detail"]
    box.when(lambda: all_off(box.box)).result(WAIT_S)


# Input checks and transport plumbing: the database adds nothing here (SQLite only, to keep CI short).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_wired_zone_settings_are_refused_naming_the_field(controller: ControllerHandle) -> None:
    seed(controller)
    base = {"kind": "wired_zone", "area": "hn.b.t2", "address": RECEIVER}
    modbus = {"link": "tcp://127.0.0.1:1502", "unit": 1, "zones": [2]}
    cases = [
        ({**base, "config": {}}, "config.modbus.zones"),
        ({**base, "config": {"modbus": {**modbus, "zones": []}}}, "config.modbus.zones"),
        ({**base, "config": {"modbus": {**modbus, "zones": [65]}}}, "config.modbus.zones[0]"),
        ({**base, "config": {"modbus": {**modbus, "volume": 120}}}, "config.modbus.volume"),
        ({**base, "transport": "modbus", "config": {"modbus": modbus}}, "transport"),
        (
            {**base, "config": {"modbus": {**modbus, "registers": [{"metric": "w", "address": 1}]}}},
            "config.modbus.registers",
        ),
        ({**base, "kind": "speaker", "config": {"modbus": modbus}}, "config.modbus.zones"),
    ]
    with controller.client() as client:
        for body, field in cases:
            response = client.post("/api/v1/devices", json=body)
            assert response.status_code == 422, (field, response.text)
            assert response.json()["field"] == field, response.text
        assert [d for d in client.get("/api/v1/devices").json() if d["kind"] == "wired_zone"] == []
