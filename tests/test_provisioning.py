"""Provisioning end to end: the controller writes the broker's password and ACL files from its database and
reloads it (mqtt.external_access, here `kill -HUP` of the test's Mosquitto); devices connect with their own
credentials; decommissioning refuses them at once; a device claims itself; roles confine who does what.

SQLite only: what is checked here lives in the controller and the broker, not in the database.
"""

from __future__ import annotations

import json
import queue
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import TestBroker
from tests.support.scenario import SPEAKERS, seed, send, upload, wait_until_ended
from tests.support.system import ControllerHandle, EventWatcher, start_process

pytestmark = pytest.mark.integration
WAIT_S = 30.0


@pytest.fixture
def controller(tmp_path: Path, mosquitto: TestBroker) -> Iterator[ControllerHandle]:
    handle = ControllerHandle(
        workdir=tmp_path, database_url=f"sqlite:///{tmp_path / 'w.db'}", broker=mosquitto
    )
    handle.manage_broker_accounts()
    handle.start()
    seed(handle)
    try:
        yield handle
    finally:
        handle.stop()


class Device:
    """A device's MQTT session with its own credentials (3.1.1, its address as client id)."""

    def __init__(self, broker: TestBroker, username: str, password: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, reconnect_on_failure=False)
        self.client.username_pw_set(username, password)
        self.connack: queue.Queue[int] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self.connack.put(reason.value)
        self.client.on_disconnect = lambda *_args: self.disconnected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.result = self.connack.get(timeout=WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _connects(broker: TestBroker, username: str, password: str) -> bool:
    device = Device(broker, username, password)
    device.close()
    return device.result == 0


def test_a_registered_device_gets_its_own_account_and_a_rotated_password_refuses_the_old(
    controller: ControllerHandle,
):
    with controller.client() as client:
        created = client.post("/api/v1/devices", json={"id": "spk-new", "kind": "speaker", "area": "hn.a.t1"})
        assert created.status_code == 201, created.text
        bundle = created.json()["bundle"]
        assert bundle["username"] == bundle["address"] == "spk-new" and len(bundle["password"]) >= 32
        # The key the device verifies every command with (signed commands, docs/protocol.md §1.15).
        assert bundle["command_key"] == client.get("/api/v1/command-key").json()["public_key"]
        assert "password" not in json.dumps(client.get("/api/v1/devices/spk-new").json())
        assert _connects(controller.broker, "spk-new", bundle["password"])
        assert not _connects(controller.broker, "spk-new", "not-the-password")
        live = Device(controller.broker, "spk-new", bundle["password"])
        qr = client.post("/api/v1/devices/spk-new/credentials", params={"format": "png"})
        assert qr.status_code == 200 and qr.headers["content-type"] == "image/png"
        assert qr.content.startswith(b"\x89PNG")
        # The rotation answered: the old session is closed and the old password refused.
        assert live.disconnected.wait(WAIT_S)
        live.close()
        assert not _connects(controller.broker, "spk-new", bundle["password"])
        (fresh,) = client.post("/api/v1/devices/credentials", json={"devices": ["spk-new"]}).json()
        assert _connects(controller.broker, "spk-new", fresh["password"])
        reserved = client.post(
            "/api/v1/devices", json={"id": "controller", "kind": "speaker", "area": "hn.a.t1"}
        )
        assert reserved.status_code == 409 and reserved.json()["field"] == "id"


def test_a_csv_import_reports_rows_and_is_all_or_nothing_on_request(controller: ControllerHandle):
    csv = (
        "kind,area,id,serial\n"
        "speaker,hn.a.t1,spk-c1,SN-C1\n"
        "speaker,hn.a.t1,spk-c2,SN-C1\n"  # duplicate serial in the file
        "speaker,hn.a.t1,spk-a1-1,SN-C3\n"  # id already registered
        "speaker,hn.z,spk-c4,SN-C4\n"  # unknown area
    )
    with controller.client() as client:
        atomic = client.post(
            "/api/v1/devices/import",
            params={"atomic": True},
            content=csv,
            headers={"Content-Type": "text/csv"},
        )
        assert atomic.status_code == 422, atomic.text
        assert atomic.json()["field"] == "row 3: serial"
        assert [(r["row"], r["field"]) for r in atomic.json()["rejected"]] == [
            (3, "serial"),
            (4, "id"),
            (5, "area"),
        ]
        assert client.get("/api/v1/devices/spk-c1").status_code == 404
        partial = client.post("/api/v1/devices/import", content=csv, headers={"Content-Type": "text/csv"})
        assert partial.status_code == 200, partial.text
        report = partial.json()
        assert report["created"] == 1 and len(report["rejected"]) == 3
        (bundle,) = report["bundles"]
    assert _connects(controller.broker, "spk-c1", bundle["password"])


def test_decommissioning_refuses_the_device_at_once_and_keeps_its_history(controller: ControllerHandle):
    with controller.client() as client:
        (bundle,) = client.post("/api/v1/devices/credentials", json={"devices": ["spk-a1-1"]}).json()
        assert bundle["username"] == "a1-1"  # the device's address, not its id
        live = Device(controller.broker, bundle["username"], bundle["password"])
        assert live.result == 0
        response = client.post("/api/v1/devices/spk-a1-1/decommission")
        assert response.status_code == 200, response.text
        # Before the answer the broker reloaded: the open session is closed, a new one refused.
        assert live.disconnected.wait(WAIT_S)
        live.close()
        assert not _connects(controller.broker, bundle["username"], bundle["password"])
        device = client.get("/api/v1/devices/spk-a1-1").json()
        assert device["decommissioned_at"] is not None and device["enabled"] is False
        revived = client.patch("/api/v1/devices/spk-a1-1", json={"enabled": True})
        assert revived.status_code == 409
        again = client.post("/api/v1/devices/credentials", json={"devices": ["spk-a1-1"]})
        assert again.status_code == 409


def test_a_fleet_of_devices_with_their_own_credentials_plays_a_broadcast(
    controller: ControllerHandle, tmp_path: Path
):
    addresses = [a for group in SPEAKERS.values() for a in group]
    with controller.client() as client:
        bundles = client.post(
            "/api/v1/devices/credentials", json={"devices": [f"spk-{a}" for a in addresses]}
        )
    assert bundles.status_code == 200, bundles.text
    credentials = tmp_path / "bundles.json"
    credentials.write_text(json.dumps(bundles.json()))
    fleet = start_process(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "fleet",
            "--mqtt-url",
            controller.broker.url,
            "--credentials",
            str(credentials),
            "--speed",
            "20",
        ],
        {k: v for k, v in controller.env().items() if not k.startswith("WARDCAST_")},
        tmp_path / "fleet.log",
        "the fleet with its own credentials",
    )
    try:
        assert fleet.ready_line == f"READY {len(addresses)}"
        media_id = upload(controller, 0.5)
        with EventWatcher(controller) as watcher:
            accepted = send(controller, media_id, targets={"areas": ["hn"]})
            result = wait_until_ended(controller, watcher, str(accepted["id"]), len(addresses))
        assert result["counts"].get("completed") == len(addresses), result["counts"]
    finally:
        fleet.terminate()


def test_roles_confine_provisioning(controller: ControllerHandle):
    technician = controller.api_key_with_wards("technician", ["hn.a"])
    staff = controller.api_key("ward_staff", ward="hn.a")
    operator = controller.api_key("operator")
    body = {"kind": "speaker", "area": "hn.b.t1", "id": "spk-tech-b"}
    with controller.client(technician) as client:
        outside = client.post("/api/v1/devices", json=body)
        assert outside.status_code == 403 and outside.json()["field"] == "area"
        assert "hn.a" in outside.json()["detail"]
        inside = client.post("/api/v1/devices", json={**body, "area": "hn.a.t1"})
        assert inside.status_code == 201, inside.text
        qr = client.post("/api/v1/provisioning/qr", json={"bundle": inside.json()["bundle"]})
        assert qr.status_code == 200 and qr.headers["content-type"] == "image/png"
        assert qr.content.startswith(b"\x89PNG")
        too_big = client.post("/api/v1/provisioning/qr", json={"bundle": {"x": "y" * 5000}})
        assert (too_big.status_code, too_big.json()["field"]) == (422, "bundle")
        assert client.post("/api/v1/devices/spk-b1-1/decommission").status_code == 404
        assert client.post("/api/v1/devices/spk-a1-2/decommission").status_code == 200
        assert client.post("/api/v1/apikeys", json={"name": "x", "role": "admin"}).status_code == 403
        assert client.get("/api/v1/claims").status_code == 200
    with controller.client(staff) as client:
        refused = client.post("/api/v1/devices", json={**body, "area": "hn.a.t1"})
        assert refused.status_code == 403
        assert client.post("/api/v1/devices/import", content="kind,area\n").status_code == 403
        assert client.post("/api/v1/provisioning/qr", json={"bundle": {}}).status_code == 403
    with controller.client(operator) as client:
        assert client.post("/api/v1/devices/spk-a2-1/decommission").status_code == 403
        assert client.get("/api/v1/apikeys").status_code == 403
    with controller.client() as client:
        created = client.post("/api/v1/apikeys", json={"name": "t2", "role": "technician", "wards": ["hn.b"]})
        assert created.status_code == 201 and created.json()["token"].startswith("wc_")
        key_id = created.json()["id"]
        assert client.post(f"/api/v1/apikeys/{key_id}/revoke").json()["revoked_at"] is not None
    with controller.client(created.json()["token"]) as client:
        assert client.get("/api/v1/devices").status_code == 401


def test_a_device_claims_itself_and_a_technician_approves_it(controller: ControllerHandle, tmp_path: Path):
    secret = secrets.token_bytes(32).hex()
    with controller.client() as client:
        registered = client.post(
            "/api/v1/factory-secrets",
            content=f"serial,factory_secret\nSN-900,{secret}\n",
            headers={"Content-Type": "text/csv"},
        )
        assert registered.json() == {"registered": 1, "rejected": []}
    broker = controller.broker

    def claim(serial: str, factory_secret: str, out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "firmware_sim",
            "claim",
            "--mqtt-url",
            broker.url,
            "--username",
            broker.claim.username,
            f"--password={broker.claim.password}",
            "--serial",
            serial,
            "--factory-secret",
            factory_secret,
            "--bundle-out",
            str(out),
            "--timeout",
            "120",
        ]

    wrong = subprocess.run(
        claim("SN-900", secrets.token_bytes(32).hex(), tmp_path / "x.json"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert wrong.returncode == 1 and wrong.stdout.startswith("REFUSED mac:"), wrong.stdout + wrong.stderr
    bundle_path = tmp_path / "bundle.json"
    device = subprocess.Popen(
        claim("SN-900", secret, bundle_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert device.stdout is not None
        pending = device.stdout.readline()
        assert pending.startswith("PENDING "), pending + (device.stderr.read() if device.stderr else "")
        technician = controller.api_key_with_wards("technician", ["hn.a"])
        with controller.client(technician) as client:
            (listed,) = client.get("/api/v1/claims").json()
            assert listed["serial"] == "SN-900" and listed["id"] == pending.split()[1]
            approved = client.post(f"/api/v1/claims/{listed['id']}/approve", json={"area": "hn.a.t1"})
            assert approved.status_code == 200, approved.text
            assert approved.json()["answered"] is True
            assert approved.json()["device"]["serial"] == "SN-900"
        assert device.stdout.readline().strip() == "CLAIMED spk-sn-900"
        assert device.wait(timeout=WAIT_S) == 0
    finally:
        if device.poll() is None:
            device.kill()
        device.communicate()
    bundle = json.loads(bundle_path.read_text())
    assert bundle["area"] == "hn.a.t1" and bundle["broker_port"] == broker.port
    assert _connects(broker, bundle["username"], bundle["password"])
