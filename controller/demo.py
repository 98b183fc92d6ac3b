"""`wardcast demo` (what `make run` starts): the controller, the Bắc Kạn demo city and a simulated fleet."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
from contextlib import suppress
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import httpx
from rich.console import Console
from sqlalchemy import Engine

from controller.broker import write_private
from controller.domain.demo import load_demo_fleet
from controller.server import ControllerServer
from controller.services.auth import create_api_key
from controller.services.tones import sine_wav
from controller.services.users import UserError, create_user
from controller.settings import Settings

console = Console(stderr=True)


async def _seed(client: httpx.AsyncClient) -> str:
    """Areas, devices and a greeting tone through the public API; returns the tone's media id."""
    city = resources.files("controller").joinpath("data", "demo_city.yaml").read_bytes()
    response = await client.post(
        "/api/v1/areas/import",
        params={"upsert": True, "format": "yaml"},
        content=city,
        headers={"Content-Type": "application/yaml"},
    )
    response.raise_for_status()
    existing = {d["id"] for d in (await client.get("/api/v1/devices")).json()}
    for device in load_demo_fleet():
        if device.id in existing:
            continue
        body = {
            "id": device.id,
            "kind": device.kind,
            "area": device.area,
            "name": device.name,
            "lat": device.lat,
            "lon": device.lon,
            "transport": device.transport,
            "address": device.address,
            "config": {
                **device.config,
                **(
                    {"metrics": {m.metric: {"unit": m.unit} for m in device.metrics}}
                    if device.metrics
                    else {}
                ),
            },
        }
        (await client.post("/api/v1/devices", json=body)).raise_for_status()
    await _seed_flood_rule(client)
    tone = await client.post(
        "/api/v1/media", files={"file": ("chuong-bao.wav", sine_wav(880.0, 3.0), "audio/wav")}
    )
    tone.raise_for_status()
    media_id: str = tone.json()["id"]
    await _seed_programme(client, media_id)
    return media_id


async def _seed_flood_rule(client: httpx.AsyncClient) -> None:
    """The pumping station's gauge at 3.2 m for 2 minutes drafts a warning for Xuất Hóa's groups, for
    an operator to approve (clears below 3.0 m)."""
    if (await client.get("/api/v1/rules")).json():
        return
    rule = {
        "name": "Lũ sông Cầu tại trạm bơm Xuất Hóa",
        "device_id": "wl-xuathoa-tram-bom",
        "metric": "water_level",
        "raise_at": 3.2,
        "clear_at": 3.0,
        "for_s": 120,
        "action": "draft",
        "broadcast": {
            "areas": ["bk.xuathoa.t01", "bk.xuathoa.t02", "bk.xuathoa.t03"],
            "headline": "Cảnh báo nước sông Cầu lên cao",
            "text": "Mực nước sông Cầu tại trạm bơm Xuất Hóa vượt 3,2 mét. Người dân tránh xa bờ sông.",
        },
    }
    (await client.post("/api/v1/rules", json=rule)).raise_for_status()


async def _seed_programme(client: httpx.AsyncClient, media_id: str) -> None:
    """Each ward's morning and evening bulletins, Monday to Saturday (created once)."""
    existing = {s["name"] for s in (await client.get("/api/v1/schedules")).json()}
    wards = [a for a in (await client.get("/api/v1/areas")).json() if a["kind"] in {"ward", "commune"}]
    for ward in wards:
        for label, at in (("Bản tin sáng", "06:00"), ("Bản tin chiều", "17:30")):
            name = f"{label} — {ward['name']}"
            if name in existing:
                continue
            response = await client.post(
                "/api/v1/schedules",
                json={
                    "name": name,
                    "targets": {"areas": [ward["code"]]},
                    "content": {"media_ids": [media_id]},
                    "dtstart": f"2026-01-05T{at}",
                    "rrule": "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA",
                },
            )
            response.raise_for_status()


async def run_demo(settings: Settings, *, speed: float, state_file: Path) -> None:
    controller = ControllerServer(settings)
    server_task = await controller.start()
    base_url = settings.http.base_url()
    _row, token = await asyncio.to_thread(
        create_api_key, controller.runtime.engine, name="demo-admin", role="admin", ward_code=None
    )
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as client:
        media_id = await _seed(client)
        console_logins = await asyncio.to_thread(_console_users, controller.runtime.engine)
        field_devices = await _start_process(
            "simulated field devices",
            "field-devices",
            "--from-api",
            base_url,
            "--token",
            token,
        )
        fleet = await _start_fleet(settings, client, speed, controller.runtime.signer.public_key)
    await asyncio.to_thread(_save_cli_state, state_file, base_url, token)
    console.print(
        f"\n[bold]Wardcast demo is running[/bold] — Bắc Kạn city, simulated speakers online\n"
        f"  API        {base_url}/docs\n"
        f"  Events     {base_url}/api/v1/events\n"
        f"  Health     {base_url}/healthz\n"
        f"  Broker     {controller.runtime.broker.url if controller.runtime.broker else settings.mqtt.url}\n"
        f"  Demo tone  media id {media_id}\n"
        f"  Try:       .venv/bin/wardcast broadcast send --area bk.songcau.t01 --media <file.wav>\n"
        f"  Console    {base_url}/   (`wardcast user create` makes more users)\n{console_logins}\n"
        f"  Admin token (also saved to {state_file}):"
    )
    print(token, flush=True)  # noqa: T201  (the token is the demo's output)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.wait([asyncio.create_task(stop.wait()), server_task], return_when=asyncio.FIRST_COMPLETED)
    for simulators in (fleet, field_devices):
        simulators.terminate()
        with suppress(TimeoutError):
            await asyncio.wait_for(simulators.wait(), timeout=10)
    controller.request_stop()
    await server_task


# The demo's console users, one per kind of user (two operators: a city-wide live alert needs a second
# person's approval). Made on the first run with fresh passwords, printed once.
_DEMO_USERS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("admin", "admin", (), "quản trị"),
    ("canbo.songcau", "ward_staff", ("bk.songcau",), "cán bộ văn hóa phường Sông Cầu"),
    ("kythuat", "technician", ("bk.songcau", "bk.xuathoa"), "kỹ thuật viên Sông Cầu, Xuất Hóa"),
    ("vanhanh.1", "operator", (), "trực IOC"),
    ("vanhanh.2", "operator", (), "trực IOC, người duyệt thứ hai"),
)


def _console_users(engine: Engine) -> str:
    """The demo's console logins, as lines to print."""
    lines = []
    for username, role, wards, who in _DEMO_USERS:
        password = secrets.token_urlsafe(12)
        shown = password
        try:
            create_user(
                engine,
                username=username,
                password=password,
                role=role,
                wards=list(wards),
                now=datetime.now(UTC),
            )
        except UserError as error:
            if error.field != "username":
                raise
            shown = "(made on an earlier run)"
        lines.append(f"    {username:<14} {shown:<24} {role} — {who}")
    return "\n".join(lines)


def _save_cli_state(state_file: Path, base_url: str, token: str) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"api": base_url, "token": token}))
    state_file.chmod(0o600)


async def _fleet_credentials(client: httpx.AsyncClient, path: Path) -> None:
    """Every simulated MQTT device's own broker account: fresh passwords for all of them in one call
    (the demo keeps no passwords between runs), saved as bundles for the fleet's `--credentials`."""
    devices = (await client.get("/api/v1/devices")).json()
    mqtt_devices = [d["id"] for d in devices if d["transport"] == "mqtt" and d["decommissioned_at"] is None]
    response = await client.post("/api/v1/devices/credentials", json={"devices": mqtt_devices})
    response.raise_for_status()
    await asyncio.to_thread(write_private, path, json.dumps(response.json()))


async def _start_fleet(
    settings: Settings, client: httpx.AsyncClient, speed: float, command_key: str
) -> asyncio.subprocess.Process:
    credentials = settings.data_dir / "demo-fleet-credentials.json"
    await _fleet_credentials(client, credentials)
    broker_url = (
        f"mqtt://{settings.mqtt.managed.host}:{settings.mqtt.managed.port}"
        if settings.mqtt.mode == "managed"
        else str(settings.mqtt.url)
    )
    return await _start_process(
        "simulated fleet",
        "fleet",
        "--mqtt-url",
        broker_url,
        # Each device connects with its own account, confined to its own topics by the broker's ACL.
        "--credentials",
        str(credentials),
        "--speed",
        str(speed),
        # The public half of the controller's signing key: the simulated devices, like real ones, play
        # only what it signed (docs/protocol.md §1.15).
        "--command-key",
        command_key,
        # Speakers (and the receivers of wired zones), networked LED screens (protocol §1.11) and the
        # MQTT sensors, reporting every 30 s.
        "--kinds",
        "speaker,led_screen,sensor",
        "--sensor-interval",
        "30",
    )


async def _start_process(what: str, *arguments: str) -> asyncio.subprocess.Process:
    """`python -m firmware_sim ARGUMENTS`, once it printed its READY line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "firmware_sim", *arguments, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None  # noqa: S101
    line = await asyncio.wait_for(process.stdout.readline(), timeout=120)
    if not line.startswith(b"READY"):
        raise SystemExit(f"the {what} did not start: {line.decode(errors='replace')}")
    console.print(f"{what}: {line.decode().strip()}")
    return process
