"""LED signs on a serial line (docs/protocol.md §4) registered through the API: an alert to their group
shows on the sign in its priority slot (Vietnamese as a picture), a cancel takes it down, the sign's
programme stays. The controller talks to a simulated sign behind a serial server (`socket://`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from firmware_sim.alpha_sign import SignConfig, SimulatedSign, TcpLine
from tests.support.scenario import all_ended, all_in, seed
from tests.support.system import ControllerHandle, EventWatcher, wait_until
from tests.support.threaded import WAIT_S, ServedInThread

pytestmark = pytest.mark.integration


@dataclass
class Sign:
    served: ServedInThread[TcpLine]
    sign: SimulatedSign


@pytest.fixture
def sign() -> Iterator[Sign]:
    simulated = SimulatedSign(SignConfig(address="01"))
    with ServedInThread(lambda: TcpLine([simulated])) as served:
        yield Sign(served, simulated)


def register_sign(controller: ControllerHandle, url: str, **serial: Any) -> Any:
    with controller.client() as client:
        return client.post(
            "/api/v1/devices",
            json={
                "id": "led-b1",
                "kind": "led_screen",
                "area": "hn.b.t1",
                "transport": "serial",
                "config": {"serial": {"port": url, "sign_address": "01", "framing": "8N1", **serial}},
            },
        )


def test_an_alert_shows_on_a_serial_sign_as_a_picture_and_a_cancel_takes_it_down(
    controller: ControllerHandle, sign: Sign
) -> None:
    seed(controller)
    response = register_sign(controller, sign.served.server.url)
    assert response.status_code == 201, response.text
    showing = sign.served.when(sign.sign.wait_until, lambda: bool(sign.sign.displayed_pictures()))
    with EventWatcher(controller) as watcher, controller.client() as client:
        alert = client.post(
            "/api/v1/alerts",
            json={"headline": "Cảnh báo lũ", "text": "Sơ tán khỏi tổ 5.", "targets": {"areas": ["hn.b.t1"]}},
        )
        assert alert.status_code == 201, alert.text
        broadcast_id = alert.json()["broadcast_id"]
        showing.result(WAIT_S)  # Vietnamese: drawn with the bundled font, sent as a picture
        watcher.wait_for(all_in(broadcast_id, 1, "playing"), what="the sign reporting it shows the alert")
        cleared = sign.served.when(sign.sign.wait_until, lambda: not sign.sign.displayed_pictures())
        assert client.post(f"/api/v1/alerts/{alert.json()['id']}/cancel").status_code == 200
        cleared.result(WAIT_S)
        # The group's two speakers (not simulated here) and the sign: all three ended by the cancel.
        watcher.wait_for(all_ended(broadcast_id, 3, "cancelled"), what="every delivery cancelled")
    wait_until(lambda: device_online(controller), "the sign online (it answered)")


def device_online(controller: ControllerHandle) -> bool:
    with controller.client() as client:
        online: bool = client.get("/api/v1/devices/led-b1").json()["online"]
    return online


# Input checks and transport plumbing: the database adds nothing here (SQLite only, to keep CI short).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_serial_sign_settings_are_refused_naming_the_field(controller: ControllerHandle) -> None:
    seed(controller)
    for serial, field in [
        ({"sign_address": "00"}, "config.serial.sign_address"),
        ({"sign_address": "1"}, "config.serial.sign_address"),
        ({"baud": 1234}, "config.serial.baud"),
        ({"framing": "9Z9"}, "config.serial.framing"),
    ]:
        response = register_sign(controller, "socket://127.0.0.1:9", **serial)
        assert response.status_code == 422, (field, response.text)
        assert response.json()["field"] == field, response.text
    with controller.client() as client:
        speaker = client.post(
            "/api/v1/devices", json={"kind": "speaker", "area": "hn.b.t1", "transport": "serial"}
        )
        assert speaker.status_code == 422 and speaker.json()["field"] == "transport"
        no_line = client.post(
            "/api/v1/devices", json={"kind": "led_screen", "area": "hn.b.t1", "transport": "serial"}
        )
        assert no_line.status_code == 422 and no_line.json()["field"] == "config.serial"
        # An address an MQTT speaker already has: the router could not tell them apart.
        clash = client.post(
            "/api/v1/devices",
            json={
                "kind": "led_screen",
                "area": "hn.b.t1",
                "transport": "serial",
                "address": "b1-1",
                "config": {"serial": {"port": "socket://127.0.0.1:9", "sign_address": "02"}},
            },
        )
        assert clash.status_code == 409 and clash.json()["field"] == "address"
