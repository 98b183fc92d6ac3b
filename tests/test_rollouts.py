"""Staged firmware rollouts end to end (issue 6): a real Mosquitto, a controller process and simulated
speakers that download the image over HTTP from the controller, verify it and install it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from firmware_sim.firmware import failing_devices
from tests.support.firmware import SigningKey, make_image, upload_image
from tests.support.scenario import AREAS_YAML
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle, wait_until

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

OLD, NEW = "sim-1.0.0", "2.0.0"
RUNNING = {"queued", "downloading", "verified", "updating"}


def register(controller: ControllerHandle, addresses: list[str]) -> None:
    with controller.client() as client:
        response = client.post(
            "/api/v1/areas/import", content=AREAS_YAML, headers={"Content-Type": "application/yaml"}
        )
        assert response.status_code == 200, response.text
        for index, address in enumerate(addresses):
            area = "hn.a.t1" if index % 2 else "hn.b.t1"
            response = client.post(
                "/api/v1/devices",
                json={"id": f"spk-{address}", "kind": "speaker", "area": area, "address": address},
            )
            assert response.status_code == 201, response.text


def firmware_of(client: httpx.Client) -> dict[str, str | None]:
    return {
        device["address"]: device["status"].get("firmware") for device in client.get("/api/v1/devices").json()
    }


@pytest.fixture
def fleet_factory(tmp_path: Path, firmware_controller: ControllerHandle) -> Iterator[Any]:
    started: list[FleetHandle] = []

    def start(addresses: list[str], *extra: str) -> FleetHandle:
        workdir = tmp_path / f"fleet-{len(started)}"
        workdir.mkdir()
        handle = FleetHandle(
            firmware_controller.broker,
            workdir,
            addresses,
            firmware_controller.command_key,
            speed=20,
            extra_args=list(extra),
        )
        handle.start()
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/api/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def rollout_state_is(rollout_id: str, state: str):
    def check(events: list[dict[str, Any]]) -> bool:
        return any(
            e.get("type") == "rollout"
            and e.get("event") == "state"
            and e["rollout_id"] == rollout_id
            and e["state"] == state
            for e in events
        )

    return check


def test_a_rollout_over_50_speakers_with_10_percent_failing_images_pauses_at_its_threshold(
    firmware_controller: ControllerHandle, signing_key: SigningKey, fleet_factory: Any
):
    addresses = [f"fw-{index:02}" for index in range(50)]
    failing = set(failing_devices(addresses, 0.1))
    assert len(failing) == 5
    register(firmware_controller, addresses)
    fleet_factory(
        addresses,
        "--firmware-key",
        signing_key.public_b64,
        "--fail-firmware-fraction",
        "0.1",
        "--install-seconds",
        "4",
    )
    image = make_image(NEW)
    with firmware_controller.client() as client:
        wait_until(lambda: set(firmware_of(client).values()) == {OLD}, "every speaker reporting its firmware")
        uploaded = upload_image(client, image, version=NEW, signature=signing_key.sign(image))
        assert uploaded.status_code == 201, uploaded.text
        with EventWatcher(firmware_controller) as watcher:
            # A canary of 2, then 3 groups of 16. A group advances only when all of it is updated, and one
            # failure in a group (1/16 = 6.25 %) reaches the 5 % error threshold: the rollout must pause at
            # the first group holding a failing speaker, whichever that is (here the second: the hash
            # picks fw-02, fw-06, fw-12, fw-43 and fw-47).
            rollout = create(
                client,
                name="speakers 2.0.0",
                image_id=uploaded.json()["id"],
                from_version=OLD,
                first_group=2,
                groups=4,
                success_threshold=1.0,
                error_threshold=0.05,
                maintenance_window=None,
            )
            assert [group["size"] for group in rollout["groups"]] == [2, 16, 16, 16]
            watcher.wait_for(
                rollout_state_is(rollout["id"], "paused"), timeout=120, what="the rollout to pause"
            )

        def settled() -> dict[str, Any] | None:
            shown: dict[str, Any] = client.get(f"/api/v1/rollouts/{rollout['id']}").json()
            return None if RUNNING & set(shown["counts"]) else shown

        wait_until(lambda: settled() is not None, "the updates already running to finish", timeout=60)
        shown = settled()
        assert shown is not None
        by_address = {d["device_id"].removeprefix("spk-"): d for d in shown["devices"]}
        group_of = {address: device["group"] for address, device in by_address.items()}
        stopped_at = min(group_of[address] for address in failing)
        assert stopped_at == 1
        assert shown["state"] == "paused"
        assert "error threshold" in shown["reason"]
        assert shown["current_group"] == stopped_at
        for address, device in by_address.items():
            if group_of[address] > stopped_at:
                assert device["state"] == "pending", device  # nothing started past the threshold
            elif address in failing:
                assert device["state"] == "failed", device
                assert device["rolled_back"] is True
                assert device["reported_version"] == OLD
                assert "rolled back" in device["detail"]
            else:
                assert device["state"] == "updated", device
                assert device["reported_version"] == NEW
                assert [step["state"] for step in device["history"]] == [
                    "queued",
                    "downloading",
                    "verified",
                    "updating",
                    "updated",
                ]
        assert shown["groups"][stopped_at]["error_ratio"] >= 0.05
        wait_until(
            lambda: all(
                version == (OLD if address in failing or group_of[address] > stopped_at else NEW)
                for address, version in firmware_of(client).items()
            ),
            "every speaker's state to show the firmware it runs",
        )
        audit = [e["action"] for e in client.get("/api/v1/audit", params={"subject": rollout["id"]}).json()]
        assert audit[:2] == ["rollout.create", "rollout.paused"]

    shown_cli = firmware_controller.cli(
        "rollout",
        "show",
        rollout["id"],
        "--api",
        firmware_controller.base_url,
        "--token",
        firmware_controller.token,
    )
    assert shown_cli.returncode == 0, shown_cli.stderr
    assert "paused" in shown_cli.stdout
    assert "rolled back" in shown_cli.stdout
    aborted = firmware_controller.cli(
        "rollout",
        "abort",
        rollout["id"],
        "--api",
        firmware_controller.base_url,
        "--token",
        firmware_controller.token,
    )
    assert aborted.returncode == 0, aborted.stderr
    with firmware_controller.client() as client:
        final = client.get(f"/api/v1/rollouts/{rollout['id']}").json()
    assert final["state"] == "aborted"
    assert final["counts"].get("pending", 0) == 0
    assert final["counts"].get("cancelled", 0) == sum(1 for g in group_of.values() if g > stopped_at)


def test_a_clean_rollout_completes_every_group_and_each_download_resumes_after_a_cut(
    firmware_controller: ControllerHandle, signing_key: SigningKey, fleet_factory: Any
):
    addresses = ["cl-1", "cl-2", "cl-3", "cl-4"]
    register(firmware_controller, addresses)
    fleet = fleet_factory(addresses, "--firmware-key", signing_key.public_b64, "--cut-firmware-download-once")
    image = make_image(NEW)
    local = datetime.now(UTC).astimezone(ZoneInfo("Asia/Ho_Chi_Minh"))
    window = f"{local - timedelta(hours=1):%H:%M}-{local + timedelta(hours=1):%H:%M}"  # open now
    with firmware_controller.client() as client:
        wait_until(lambda: set(firmware_of(client).values()) == {OLD}, "every speaker reporting its firmware")
        uploaded = upload_image(client, image, version=NEW, signature=signing_key.sign(image))
        assert uploaded.status_code == 201, uploaded.text
        with EventWatcher(firmware_controller) as watcher:
            rollout = create(
                client,
                name="clean",
                image_id=uploaded.json()["id"],
                first_group=1,
                groups=3,
                success_threshold=1.0,
                error_threshold=0.5,
                maintenance_window=window,
            )
            assert [group["size"] for group in rollout["groups"]] == [1, 2, 1]
            watcher.wait_for(
                rollout_state_is(rollout["id"], "completed"), timeout=90, what="the rollout to complete"
            )
            opened = [
                e["group"] for e in watcher.events if e.get("type") == "rollout" and e.get("event") == "group"
            ]
        assert opened == [1, 2]
        shown = client.get(f"/api/v1/rollouts/{rollout['id']}").json()
        assert shown["counts"] == {"updated": 4}
        wait_until(lambda: set(firmware_of(client).values()) == {NEW}, "the speakers' state showing 2.0.0")
    resumes = [entry for entry in fleet._log() if entry["event"] == "firmware_download_resumed"]
    assert sorted(entry["address"] for entry in resumes) == addresses
    assert all(entry["status"] == 206 and 0 < entry["resumed_from"] < len(image) for entry in resumes)


def test_a_rollout_waits_for_its_window_and_survives_a_restart(
    firmware_controller: ControllerHandle, signing_key: SigningKey
):
    register(firmware_controller, ["win-1", "win-2", "win-3"])
    image = make_image(NEW)
    local = datetime.now(UTC).astimezone(ZoneInfo("Asia/Ho_Chi_Minh"))
    closed = f"{local + timedelta(hours=2):%H:%M}-{local + timedelta(hours=3):%H:%M}"
    with firmware_controller.client() as client:
        uploaded = upload_image(client, image, version=NEW, signature=signing_key.sign(image))
        rollout = create(
            client, name="tonight", image_id=uploaded.json()["id"], groups=2, maintenance_window=closed
        )

        def next_window() -> str | None:
            value: str | None = client.get(f"/api/v1/rollouts/{rollout['id']}").json()["next_window_at"]
            return value

        wait_until(lambda: next_window() is not None, "the rollout to wait for its window")
        opening = datetime.fromisoformat(str(next_window()))
        assert timedelta(hours=1) < opening - datetime.now(UTC) < timedelta(hours=2, minutes=1)
    firmware_controller.stop()
    firmware_controller.start()
    with firmware_controller.client() as client:
        shown = client.get(f"/api/v1/rollouts/{rollout['id']}").json()
        assert shown["state"] == "running"
        assert shown["counts"] == {"pending": 3}
        assert shown["maintenance_window"] == closed
        assert client.post(f"/api/v1/rollouts/{rollout['id']}/resume").status_code == 409
        assert client.post(f"/api/v1/rollouts/{rollout['id']}/pause").json()["state"] == "paused"
        assert client.post(f"/api/v1/rollouts/{rollout['id']}/resume").json()["state"] == "running"
        bad = client.post(
            "/api/v1/rollouts",
            json={"name": "x", "image_id": uploaded.json()["id"], "maintenance_window": "25:00-01:00"},
        )
        assert bad.status_code == 422
        assert bad.json()["field"] == "maintenance_window"
        busy = client.post("/api/v1/rollouts", json={"name": "again", "image_id": uploaded.json()["id"]})
        assert busy.status_code == 422  # every speaker is already in the first rollout
        assert busy.json()["field"] == "targets"
        with httpx.Client(base_url=firmware_controller.base_url) as device:
            url = f"/firmware/rollouts/{rollout['id']}/image"
            assert device.get(url, params={"token": "wrong"}).status_code == 403


def test_a_corrupted_download_fails_before_anything_is_installed(
    firmware_controller: ControllerHandle, signing_key: SigningKey, fleet_factory: Any
):
    register(firmware_controller, ["cr-1", "cr-2"])
    fleet_factory(
        ["cr-1", "cr-2"], "--firmware-key", signing_key.public_b64, "--corrupt-firmware-devices", "cr-2"
    )
    image = make_image(NEW)
    with firmware_controller.client() as client:
        wait_until(lambda: set(firmware_of(client).values()) == {OLD}, "every speaker reporting its firmware")
        uploaded = upload_image(client, image, version=NEW, signature=signing_key.sign(image))
        with EventWatcher(firmware_controller) as watcher:
            rollout = create(
                client,
                name="one bad link",
                image_id=uploaded.json()["id"],
                success_threshold=0.5,
                error_threshold=1.0,
                maintenance_window=None,
            )
            watcher.wait_for(
                rollout_state_is(rollout["id"], "completed"), timeout=60, what="the rollout to end"
            )
        devices = {
            d["device_id"]: d for d in client.get(f"/api/v1/rollouts/{rollout['id']}").json()["devices"]
        }
    corrupted = devices["spk-cr-2"]
    assert corrupted["state"] == "failed"
    assert "sha256 mismatch" in corrupted["detail"]
    assert corrupted["rolled_back"] is False
    assert [step["state"] for step in corrupted["history"]] == ["queued", "downloading", "failed"]
    assert corrupted["reported_version"] == OLD
    assert devices["spk-cr-1"]["state"] == "updated"
