"""A small city (two wards, five groups, eight speakers) and helpers to drive broadcasts through the API."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.support.broker import TestBroker, start_test_broker
from tests.support.system import ControllerHandle, FleetHandle, create_postgres_database

TERMINAL = {"completed", "interrupted", "failed", "expired", "cancelled"}
ORDER = ["queued", "sent", "delivered", "playing"]

AREAS_YAML = """
areas:
  - code: hn
    name: Thành phố Thử
    kind: city
    children:
      - code: hn.a
        name: Phường An
        kind: ward
        children:
          - {code: hn.a.t1, name: Tổ dân phố 1, kind: group}
          - {code: hn.a.t2, name: Tổ dân phố 2, kind: group}
          - {code: hn.a.t3, name: Tổ dân phố 3, kind: group}
      - code: hn.b
        name: Xã Bình
        kind: commune
        children:
          - {code: hn.b.t1, name: Thôn Nà Pài, kind: group}
          - {code: hn.b.t2, name: Thôn Khuổi Đắng, kind: group}
""".encode()

SPEAKERS = {
    "hn.a.t1": ["a1-1", "a1-2"],
    "hn.a.t2": ["a2-1", "a2-2"],
    "hn.a.t3": ["a3-1"],
    "hn.b.t1": ["b1-1", "b1-2"],
    "hn.b.t2": ["b2-1"],
}


def wav_bytes(seconds: float, samplerate: int = 8000) -> bytes:
    samples = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * samplerate)) / samplerate)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, samplerate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# Groups placed apart (a few hundred metres) so that a polygon can take some and leave others.
PLACES = {
    "hn.a.t1": (22.150, 105.830),
    "hn.a.t2": (22.150, 105.836),
    "hn.a.t3": (22.156, 105.830),
    "hn.b.t1": (22.140, 105.850),
    "hn.b.t2": (22.140, 105.856),
}


def place_speakers(controller: ControllerHandle) -> None:
    """Move each group's speakers to its own spot, so that a polygon can take some groups and not others."""
    with controller.client() as client:
        for device in client.get("/api/v1/devices").json():
            lat, lon = PLACES[device["area"]]
            response = client.patch(f"/api/v1/devices/{device['id']}", json={"lat": lat, "lon": lon})
            assert response.status_code == 200, response.text


def seed(controller: ControllerHandle) -> None:
    with controller.client() as client:
        response = client.post(
            "/api/v1/areas/import", content=AREAS_YAML, headers={"Content-Type": "application/yaml"}
        )
        assert response.status_code == 200, response.text
        for area, addresses in SPEAKERS.items():
            for address in addresses:
                response = client.post(
                    "/api/v1/devices",
                    json={
                        "id": f"spk-{address}",
                        "kind": "speaker",
                        "area": area,
                        "address": address,
                        "lat": 22.15,
                        "lon": 105.83,
                    },
                )
                assert response.status_code == 201, response.text


def upload(controller: ControllerHandle, seconds: float) -> str:
    with controller.client() as client:
        response = client.post("/api/v1/media", files={"file": (f"tone-{seconds}.wav", wav_bytes(seconds))})
    assert response.status_code in {200, 201}, response.text  # 200: the same audio again
    media_id: str = response.json()["id"]
    return media_id


def send(controller: ControllerHandle, media_id: str, **fields: object) -> dict[str, object]:
    body = {"content": {"media_id": media_id}, **fields}
    with controller.client() as client:
        response = client.post("/api/v1/broadcasts", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, object] = response.json()
    return result


def all_ended(broadcast_id: str, count: int, state: str | None = None):
    def check(events: list[dict[str, object]]) -> bool:
        final = {
            e["device_id"]: e["state"]
            for e in events
            if e.get("type") == "delivery" and e["broadcast_id"] == broadcast_id and e["state"] in TERMINAL
        }
        return len(final) == count and (state is None or set(final.values()) == {state})

    return check


def all_in(broadcast_id: str, count: int, state: str):
    def check(events: list[dict[str, object]]) -> bool:
        reached = {
            e["device_id"]
            for e in events
            if e.get("type") == "delivery" and e["broadcast_id"] == broadcast_id and e["state"] == state
        }
        return len(reached) == count

    return check


@contextlib.contextmanager
def running_fleet(
    workdir: Path, broker: TestBroker, *, command_key: str, mqtt_url: str | None = None
) -> Iterator[FleetHandle]:
    """The city's speakers simulated in one process, connected directly or through `mqtt_url`, verifying
    commands with `command_key` (the controller's, `ControllerHandle.command_key`)."""
    handle = FleetHandle(
        broker, workdir, [a for group in SPEAKERS.values() for a in group], command_key, mqtt_url=mqtt_url
    )
    handle.workdir.mkdir()
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: TestBroker, controller: ControllerHandle) -> Iterator[FleetHandle]:
    with running_fleet(tmp_path / "fleet", mosquitto, command_key=controller.command_key) as handle:
        yield handle


def schedule_history(controller: ControllerHandle, schedule_id: str) -> list[dict[str, Any]]:
    """Each occurrence of the schedule so far: fired (with its broadcast), missed or failed."""
    with controller.client() as client:
        response = client.get(f"/api/v1/schedules/{schedule_id}/history")
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()
    return result


def wait_until_ended(
    controller: ControllerHandle, watcher: Any, broadcast_id: str, count: int, timeout: float = 60
) -> dict[str, Any]:
    """Wait until all `count` deliveries ended, whether they ended before the watcher subscribed or after.

    Events are published after they are committed, so a snapshot taken after subscribing plus the
    events that follow it miss nothing.
    """
    with controller.client() as client:
        snapshot = client.get(f"/api/v1/broadcasts/{broadcast_id}").json()
    ended_before = {d["device_id"] for d in snapshot["deliveries"] if d["state"] in TERMINAL}

    def check(events: list[dict[str, Any]]) -> bool:
        ended = ended_before | {
            e["device_id"]
            for e in events
            if e.get("type") == "delivery" and e["broadcast_id"] == broadcast_id and e["state"] in TERMINAL
        }
        return len(ended) == count

    watcher.wait_for(check, timeout=timeout, what=f"all {count} deliveries of {broadcast_id} ended")
    with controller.client() as client:
        result: dict[str, Any] = client.get(f"/api/v1/broadcasts/{broadcast_id}").json()
    return result


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(  # a seeded controller shared by a module's API tests
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControllerHandle]:
    workdir = tmp_path_factory.mktemp("api")
    broker = start_test_broker(workdir / "mosquitto")
    drop = None
    if request.param == "sqlite":
        url = f"sqlite:///{workdir / 'api.db'}"
    else:
        url, drop = create_postgres_database()
    handle = ControllerHandle(workdir=workdir, database_url=url, broker=broker)
    handle.start()
    seed(handle)
    try:
        yield handle
    finally:
        handle.stop()
        broker.broker.stop()
        if drop is not None:
            drop()
