"""The `wardcast` command: run the controller, the demo, and talk to a running controller's API."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.settings import ConfigError, Settings, load_settings

app = typer.Typer(
    help="Wardcast: targeted announcements for a city's public-address system.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
area_app = typer.Typer(help="Areas (city > ward/commune > residential group).", no_args_is_help=True)
device_app = typer.Typer(help="Speakers, LED screens and sensors.", no_args_is_help=True)
broadcast_app = typer.Typer(help="Send and follow broadcasts.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys.", no_args_is_help=True)
user_app = typer.Typer(help="Web console users.", no_args_is_help=True)
sim_app = typer.Typer(help="Simulated devices.", no_args_is_help=True)
schedule_app = typer.Typer(help="Ward programmes: one-off and recurring schedules.", no_args_is_help=True)
command_key_app = typer.Typer(
    help="The key that signs what the controller sends devices (docs/protocol.md §1.15).",
    no_args_is_help=True,
)
app.add_typer(area_app, name="area")
app.add_typer(device_app, name="device")
app.add_typer(broadcast_app, name="broadcast")
app.add_typer(apikey_app, name="apikey")
app.add_typer(user_app, name="user")
app.add_typer(sim_app, name="sim")
app.add_typer(schedule_app, name="schedule")
app.add_typer(command_key_app, name="command-key")
firmware_app = typer.Typer(help="Firmware images: keys, signatures, uploads.", no_args_is_help=True)
rollout_app = typer.Typer(help="Staged firmware rollouts.", no_args_is_help=True)
app.add_typer(firmware_app, name="firmware")
app.add_typer(rollout_app, name="rollout")

err = Console(stderr=True)
out = Console()

CLI_STATE_FILE = Path(".wardcast/cli.json")
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="config.yaml (or $WARDCAST_CONFIG)")
]
ApiOption = Annotated[
    str | None, typer.Option("--api", envvar="WARDCAST_API_URL", help="controller base URL")
]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="WARDCAST_TOKEN", help="API key")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as error:
        err.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error


def _client(api: str | None, token: str | None) -> httpx.Client:
    saved: dict[str, str] = json.loads(CLI_STATE_FILE.read_text()) if CLI_STATE_FILE.exists() else {}
    base = api or saved.get("api") or "http://127.0.0.1:8080"
    key = token or saved.get("token")
    if not key:
        err.print("[red]no API key: pass --token, set WARDCAST_TOKEN, or run `wardcast demo`[/red]")
        raise typer.Exit(2)
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _checked(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json() if response.content else None
    try:
        body = response.json()
        message = f"{body.get('field') or ''}: {body.get('detail')}".lstrip(": ")
    except ValueError:
        message = response.text
    err.print(f"[red]HTTP {response.status_code}: {message}[/red]")
    raise typer.Exit(1)


# -- running ---------------------------------------------------------------------------------
@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the controller: API, dispatcher and (in managed mode) its own Mosquitto."""
    from controller.server import run_server

    settings = _settings(config)
    asyncio.run(run_server(settings))


@app.command()
def demo(
    config: ConfigOption = None,
    speakers_speed: Annotated[float, typer.Option(help="simulated playback speed factor")] = 1.0,
) -> None:
    """The controller with the Bắc Kạn demo city and a simulated fleet (what `make run` starts)."""
    from controller.demo import run_demo

    settings = _settings(config)
    asyncio.run(run_demo(settings, speed=speakers_speed, state_file=CLI_STATE_FILE))


# -- the command-signing key -----------------------------------------------------------------
@command_key_app.command("show")
def command_key_show(
    config: ConfigOption = None,
    output: Annotated[
        str, typer.Option("--format", help="base64 (the raw key, what simulators take) | pem | json")
    ] = "base64",
) -> None:
    """Print the public key devices verify commands with (generating the key pair on first use)."""
    from controller.services.command_signing import (
        CommandSigner,
        CountingSequence,
        SigningKeyError,
        load_or_create_signing_key,
    )

    if output not in {"base64", "pem", "json"}:
        err.print(f"[red]--format: {output!r} is not one of base64, pem, json[/red]")
        raise typer.Exit(2)
    settings = _settings(config)
    try:
        private_key = load_or_create_signing_key(settings.signing_key_file)
    except SigningKeyError as error:
        err.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error
    signer = CommandSigner(private_key, CountingSequence())
    if output == "pem":
        typer.echo(signer.public_key_pem, nl=False)
    elif output == "json":
        document = {"alg": "ed25519", "key_id": signer.key_id, "public_key": signer.public_key}
        typer.echo(json.dumps(document))
    else:
        typer.echo(signer.public_key)


# -- API keys ----------------------------------------------------------------------------------
@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="who or what uses the key")],
    role: Annotated[str, typer.Option(help="admin | operator | ward_staff | technician | ioc")],
    ward: Annotated[
        list[str] | None,
        typer.Option(help="a ward_staff key's ward; a technician's assigned ward (repeatable)"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create an API key; the token is printed once, as the last line of stdout."""
    from controller.services.auth import ApiKeyError, create_api_key
    from controller.store.db import create_db_engine, migrate

    settings = _settings(config)
    engine = create_db_engine(settings.database.url)
    try:
        migrate(engine)
        wards = ward or []
        row, token = create_api_key(
            engine, name=name, role=role, ward_code=wards[0] if wards else None, wards=wards[1:]
        )
    except ApiKeyError as error:
        err.print(f"[red]{error.field}: {error.detail}[/red]")
        raise typer.Exit(2) from error
    finally:
        engine.dispose()
    scope = row.ward_code or ", ".join(row.wards)
    err.print(f"created key {row.id} ({row.role}{', ward ' + scope if scope else ''})")
    typer.echo(token)


# -- console users -----------------------------------------------------------------------------
@user_app.command("create")
def user_create(
    username: Annotated[str, typer.Option(help="the sign-in name")],
    role: Annotated[str, typer.Option(help="admin | operator | ward_staff | technician")],
    ward: Annotated[
        list[str] | None,
        typer.Option(help="a ward_staff user's ward; a technician's assigned ward (repeatable)"),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin (first line)")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Create a console user (the first admin, say); the password is prompted for, or read from stdin."""
    import sys

    from controller.services.users import UserError, create_user
    from controller.store.db import create_db_engine, migrate

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    settings = _settings(config)
    engine = create_db_engine(settings.database.url)
    try:
        migrate(engine)
        row = create_user(
            engine, username=username, password=password, role=role, wards=ward or [], now=datetime.now(UTC)
        )
    except UserError as error:
        err.print(f"[red]{error.field}: {error.detail}[/red]")
        raise typer.Exit(2) from error
    finally:
        engine.dispose()
    scope = row.ward_code or ", ".join(row.wards)
    typer.echo(f"created user {row.username} ({row.role}{', ward ' + scope if scope else ''})")


# -- areas -------------------------------------------------------------------------------------
@area_app.command("import")
def area_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a .yaml or .csv file")],
    upsert: Annotated[bool, typer.Option(help="update areas whose code exists")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Import areas from YAML or CSV, all or nothing."""
    fmt = "csv" if file.suffix.lower() == ".csv" else "yaml"
    with _client(api, token) as client:
        result = _checked(
            client.post(
                "/api/v1/areas/import",
                params={"upsert": upsert, "format": fmt},
                content=file.read_bytes(),
                headers={"Content-Type": "text/csv" if fmt == "csv" else "application/yaml"},
            )
        )
    out.print(f"created {result['created']}, updated {result['updated']}, unchanged {result['unchanged']}")


@area_app.command("list")
def area_list(api: ApiOption = None, token: TokenOption = None) -> None:
    with _client(api, token) as client:
        areas = _checked(client.get("/api/v1/areas"))
    table = Table("code", "name", "kind", "parent")
    for area in areas:
        table.add_row(area["code"], area["name"], area["kind"], area["parent"] or "")
    out.print(table)


# -- devices -----------------------------------------------------------------------------------
@device_app.command("add")
def device_add(
    kind: Annotated[str, typer.Option(help="speaker | led_screen | sensor")],
    area: Annotated[str, typer.Option(help="area code")],
    device_id: Annotated[str | None, typer.Option("--id", help="device id (generated when omitted)")] = None,
    name: Annotated[str | None, typer.Option()] = None,
    lat: Annotated[float | None, typer.Option()] = None,
    lon: Annotated[float | None, typer.Option()] = None,
    address: Annotated[str | None, typer.Option(help="transport address (defaults to the id)")] = None,
    transport: Annotated[str, typer.Option()] = "mqtt",
    offline_hours: Annotated[
        float | None,
        typer.Option(
            help="a speaker cut off from the broker stops playing its cached programme after this many "
            "hours (default: it keeps playing it)"
        ),
    ] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    body: dict[str, object] = {
        "id": device_id,
        "kind": kind,
        "area": area,
        "name": name,
        "lat": lat,
        "lon": lon,
        "address": address,
        "transport": transport,
    }
    if offline_hours is not None:
        body["comm_loss"] = {"policy": "stop_after", "after_s": round(offline_hours * 3600)}
    with _client(api, token) as client:
        device = _checked(
            client.post("/api/v1/devices", json={k: v for k, v in body.items() if v is not None})
        )
    out.print(f"added {device['id']} ({device['kind']}) in {device['area']}, address {device['address']}")


@device_app.command("list")
def device_list(
    area: Annotated[str | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option()] = None,
    online: Annotated[bool | None, typer.Option("--online/--offline")] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    params = {k: v for k, v in {"area": area, "kind": kind, "online": online}.items() if v is not None}
    with _client(api, token) as client:
        devices = _checked(client.get("/api/v1/devices", params=params))
    table = Table("id", "kind", "area", "online", "last seen", "signal", "firmware", "volume", "self-test")
    for device in devices:
        table.add_row(
            device["id"],
            device["kind"],
            device["area"],
            "yes" if device["online"] else "no",
            device["last_seen"] or "-",
            _or_dash(device.get("rssi_dbm"), " dBm"),
            device.get("firmware") or "-",
            _or_dash(device.get("volume")),
            _self_test(device.get("self_test")),
        )
    out.print(table)


# -- provisioning (docs/protocol.md §1.13) --------------------------------------------------------
BundleOut = Annotated[
    Path | None, typer.Option("--bundle-out", help="write the provisioning bundle (JSON, mode 0600) here")
]
QrOut = Annotated[Path | None, typer.Option("--qr-out", help="write the bundle as a QR code PNG here")]


def _save_bundle(bundle: dict[str, Any] | None, bundle_out: Path | None, qr_out: Path | None) -> None:
    """The bundle holds the only copy of the device's password: files are private, never printed."""
    from controller.broker import write_private
    from controller.domain.provisioning import bundle_qr_png

    if bundle is None:
        return
    if bundle_out is not None:
        write_private(bundle_out, json.dumps(bundle, indent=2))
        err.print(f"bundle written to {bundle_out}")
    if qr_out is not None:
        qr_out.write_bytes(bundle_qr_png(bundle))
        qr_out.chmod(0o600)
        err.print(f"QR code written to {qr_out}")
    if bundle_out is None and qr_out is None:
        err.print(
            "[yellow]the password is shown only now: pass --bundle-out and/or --qr-out to keep it[/yellow]"
        )


@device_app.command("provision")
def device_provision(
    kind: Annotated[str, typer.Option(help="speaker | led_screen | sensor")],
    area: Annotated[str, typer.Option(help="area code")],
    device_id: Annotated[str | None, typer.Option("--id", help="device id (generated when omitted)")] = None,
    serial: Annotated[str | None, typer.Option(help="the maker's serial number")] = None,
    name: Annotated[str | None, typer.Option()] = None,
    lat: Annotated[float | None, typer.Option()] = None,
    lon: Annotated[float | None, typer.Option()] = None,
    bundle_out: BundleOut = None,
    qr_out: QrOut = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Register an MQTT device with its own broker account; save its bundle (JSON and/or QR PNG)."""
    body = {
        "id": device_id,
        "kind": kind,
        "area": area,
        "serial": serial,
        "name": name,
        "lat": lat,
        "lon": lon,
    }
    with _client(api, token) as client:
        device = _checked(
            client.post("/api/v1/devices", json={k: v for k, v in body.items() if v is not None})
        )
    _save_bundle(device.get("bundle"), bundle_out, qr_out)
    typer.echo(device["id"])


@device_app.command("import")
def device_import(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="CSV: kind,area[,id,address,serial,name,lat,lon]"),
    ],
    atomic: Annotated[bool, typer.Option("--atomic", help="any refused row imports nothing")] = False,
    bundles_dir: Annotated[
        Path | None, typer.Option("--bundles-dir", help="write {id}.json and {id}.png per device here")
    ] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Import devices from a CSV, row by row; refused rows are listed with their row and column."""
    with _client(api, token) as client:
        response = client.post(
            "/api/v1/devices/import",
            params={"atomic": atomic},
            content=file.read_bytes(),
            headers={"Content-Type": "text/csv"},
        )
    rejected = (
        response.json().get("rejected", [])
        if response.headers.get("content-type", "").startswith("application/json")
        else []
    )
    if rejected:
        table = Table("row", "column", "why", title="rows refused")
        for problem in rejected:
            table.add_row(str(problem["row"]), problem["field"], problem["detail"])
        err.print(table)
    report = _checked(response)
    if bundles_dir is not None:
        bundles_dir.mkdir(parents=True, exist_ok=True)
        for bundle in report["bundles"]:
            _save_bundle(
                bundle,
                bundles_dir / f"{bundle['device_id']}.json",
                bundles_dir / f"{bundle['device_id']}.png",
            )
    out.print(f"created {report['created']}, refused {len(report['rejected'])}")
    if report["rejected"]:
        raise typer.Exit(1)


@device_app.command("credentials")
def device_credentials(
    device_id: Annotated[str, typer.Argument(help="device id")],
    bundle_out: BundleOut = None,
    qr_out: QrOut = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Issue the device a new broker password (the old one is refused from now on); save its bundle."""
    with _client(api, token) as client:
        bundle = _checked(client.post(f"/api/v1/devices/{device_id}/credentials"))
    _save_bundle(bundle, bundle_out, qr_out)


@device_app.command("decommission")
def device_decommission(
    device_id: Annotated[str, typer.Argument(help="device id")],
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Take a device out of service: the broker refuses it at once; its history is kept."""
    with _client(api, token) as client:
        device = _checked(client.post(f"/api/v1/devices/{device_id}/decommission"))
    out.print(f"decommissioned {device['id']} at {device['decommissioned_at']}")


@device_app.command("factory-secrets")
def device_factory_secrets(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="CSV: serial,factory_secret (hex)")
    ],
    atomic: Annotated[bool, typer.Option("--atomic")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Register devices' factory secrets so that they can claim themselves (admin keys)."""
    with _client(api, token) as client:
        report = _checked(
            client.post(
                "/api/v1/factory-secrets",
                params={"atomic": atomic},
                content=file.read_bytes(),
                headers={"Content-Type": "text/csv"},
            )
        )
    for problem in report["rejected"]:
        err.print(f"row {problem['row']}: {problem['field']}: {problem['detail']}")
    out.print(f"registered {report['registered']}, refused {len(report['rejected'])}")


@device_app.command("claims")
def device_claims(api: ApiOption = None, token: TokenOption = None) -> None:
    """Devices asking to be claimed, within their claim window."""
    with _client(api, token) as client:
        claims = _checked(client.get("/api/v1/claims"))
    table = Table("claim", "serial", "kind", "firmware", "asked at", "expires at")
    for claim in claims:
        table.add_row(
            claim["id"],
            claim["serial"],
            claim["kind"],
            claim["firmware"] or "-",
            claim["requested_at"],
            claim["expires_at"],
        )
    out.print(table)


@device_app.command("approve")
def device_approve(
    claim_id: Annotated[str, typer.Argument(help="the claim's id (wardcast device claims)")],
    area: Annotated[str, typer.Option(help="area code the device goes into")],
    device_id: Annotated[
        str | None, typer.Option("--id", help="device id (default: kind prefix + serial)")
    ] = None,
    name: Annotated[str | None, typer.Option()] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Approve a claim: the device is registered and receives its bundle, encrypted to it."""
    body = {"area": area, "device_id": device_id, "name": name}
    with _client(api, token) as client:
        result = _checked(
            client.post(
                f"/api/v1/claims/{claim_id}/approve", json={k: v for k, v in body.items() if v is not None}
            )
        )
    sent = "sent to the device" if result["answered"] else "NOT sent (the broker was unreachable)"
    out.print(f"approved {result['device']['id']} in {result['device']['area']}; bundle {sent}")


def _or_dash(value: object, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def _self_test(self_test: object) -> str:
    if not isinstance(self_test, dict):
        return "-"
    text = f"{self_test.get('result')} {self_test.get('at', '')}".strip()
    return f"{text} ({self_test['fault']})" if self_test.get("fault") else text


@device_app.command("show")
def device_show(
    device_id: Annotated[str, typer.Argument(help="device id")],
    history_days: Annotated[float, typer.Option(help="availability history this far back")] = 7,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """A device: availability, signal, firmware, volume, last self-test, and its online/offline history."""
    with _client(api, token) as client:
        device = _checked(client.get(f"/api/v1/devices/{device_id}"))
        history = _checked(
            client.get(
                f"/api/v1/devices/{device_id}/availability",
                params={"from": _ago(history_days)},
            )
        )
    status = device.get("status") or {}
    rows = [
        ("id", device["id"]),
        ("kind", device["kind"]),
        ("area", device["area"]),
        ("address", f"{device['transport']} {device['address']}"),
        ("online", "yes" if device["online"] else "no"),
        ("last seen", device["last_seen"] or "-"),
        ("signal", _or_dash(device.get("rssi_dbm"), " dBm")),
        ("firmware", device.get("firmware") or "-"),
        ("volume", _or_dash(device.get("volume"))),
        ("self-test", _self_test(device.get("self_test"))),
        ("config", json.dumps(status.get("config")) if status.get("config") is not None else "-"),
        ("comm loss", json.dumps(device["comm_loss"])),
    ]
    table = Table("", "", show_header=False)
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)
    transitions = Table("at", "online", "reason", "detected at", "detail", title="availability")
    for transition in history["transitions"]:
        transitions.add_row(
            transition["at"],
            "online" if transition["online"] else "offline",
            transition["reason"],
            transition["detected_at"],
            transition["detail"] or "",
        )
    out.print(transitions)


def _ago(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).isoformat().replace("+00:00", "Z")


DeviceTargets = Annotated[list[str] | None, typer.Option("--device", help="device id (repeatable)")]
AreaTargets = Annotated[
    list[str] | None, typer.Option("--area", help="area code, its whole subtree (repeatable)")
]
WaitOption = Annotated[bool, typer.Option(help="wait for every device's result and show them")]
WaitTimeout = Annotated[float, typer.Option(help="seconds to wait for the results")]


def _operation(
    kind: str,
    params: dict[str, Any],
    devices: list[str] | None,
    areas: list[str] | None,
    *,
    wait: bool,
    timeout_s: float,
    api: str | None,
    token: str | None,
) -> None:
    """Sends one remote operation and, with --wait, shows each device's result once all have ended."""
    body = {"type": kind, "targets": {"devices": devices or [], "areas": areas or []}, "params": params}
    with _client(api, token) as client:
        accepted = _checked(client.post("/api/v1/operations", json=body))
        out.print(f"operation {accepted['id']}: {kind} on {accepted['device_count']} device(s)")
        if not wait:
            return
        # A person at a terminal: polling twice a second is the simple way to follow a few results.
        deadline = time.monotonic() + timeout_s
        operation = _checked(client.get(f"/api/v1/operations/{accepted['id']}"))
        while operation["status"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.5)
            operation = _checked(client.get(f"/api/v1/operations/{accepted['id']}"))
    table = Table("device", "state", "sent", "delivered", "ended", "result", "detail")
    for result in operation["results"]:
        table.add_row(
            result["device_id"],
            result["state"],
            result["sent_at"] or "-",
            result["delivered_at"] or "-",
            result["ended_at"] or "-",
            json.dumps(result["result"]) if result["result"] is not None else "-",
            result["detail"] or "",
        )
    out.print(table)
    out.print(f"status: {operation['status']} {operation['counts']}")
    if operation["status"] != "completed":
        raise typer.Exit(1)


@device_app.command("volume")
def device_volume(
    volume: Annotated[int, typer.Argument(help="0-100")],
    device: DeviceTargets = None,
    area: AreaTargets = None,
    wait: WaitOption = True,
    timeout: WaitTimeout = 120,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Set the volume of speakers (one device, or every speaker of an area)."""
    _operation(
        "set_volume", {"volume": volume}, device, area, wait=wait, timeout_s=timeout, api=api, token=token
    )


@device_app.command("reboot")
def device_reboot(
    device: DeviceTargets = None,
    area: AreaTargets = None,
    wait: WaitOption = True,
    timeout: WaitTimeout = 120,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Reboot devices; each goes offline and comes back (both recorded in its availability)."""
    _operation("reboot", {}, device, area, wait=wait, timeout_s=timeout, api=api, token=token)


@device_app.command("test-tone")
def device_test_tone(
    device: DeviceTargets = None,
    area: AreaTargets = None,
    duration: Annotated[float, typer.Option(help="seconds of tone (at most 30)")] = 3.0,
    wait: WaitOption = True,
    timeout: WaitTimeout = 120,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Loa thử: a short tone on each speaker, and its self-test result (pass or fail)."""
    _operation(
        "test_tone",
        {"duration_s": duration},
        device,
        area,
        wait=wait,
        timeout_s=timeout,
        api=api,
        token=token,
    )


@device_app.command("configure")
def device_configure(
    device: DeviceTargets = None,
    area: AreaTargets = None,
    quiet_hours: Annotated[
        str | None, typer.Option(help="HH:MM-HH:MM local time (normal plays refused), or 'off'")
    ] = None,
    comm_loss: Annotated[str | None, typer.Option(help="keep, or stop_after:SECONDS")] = None,
    heartbeat: Annotated[int | None, typer.Option(help="seconds between state heartbeats")] = None,
    wait: WaitOption = True,
    timeout: WaitTimeout = 120,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Push configuration to devices: quiet hours, comm-loss policy, heartbeat."""
    params: dict[str, Any] = {}
    if quiet_hours is not None:
        if quiet_hours.lower() == "off":
            params["quiet_hours"] = None
        else:
            start, _, end = quiet_hours.partition("-")
            params["quiet_hours"] = {"start": start.strip(), "end": end.strip()}
    if comm_loss is not None:
        policy, _, after = comm_loss.partition(":")
        params["comm_loss"] = (
            {"policy": policy, "after_s": int(after)} if after.strip().isdigit() else {"policy": policy}
        )
    if heartbeat is not None:
        params["heartbeat_s"] = heartbeat
    _operation("configure", params, device, area, wait=wait, timeout_s=timeout, api=api, token=token)


# -- broadcasts --------------------------------------------------------------------------------
@broadcast_app.command("send")
def broadcast_send(
    media: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="WAV, MP3 or OGG file")],
    area: Annotated[list[str] | None, typer.Option(help="area code (repeatable)")] = None,
    device: Annotated[list[str] | None, typer.Option(help="device id (repeatable)")] = None,
    priority: Annotated[str, typer.Option(help="normal | priority | emergency")] = "normal",
    sub_priority: Annotated[int, typer.Option(min=0, max=255)] = 0,
    repeats: Annotated[int, typer.Option(min=1, max=20)] = 1,
    max_duration: Annotated[float, typer.Option(help="seconds")] = 600,
    wait: Annotated[bool, typer.Option(help="follow the deliveries until they end")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to follow")] = 600,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Upload the audio and send it to the areas and devices named."""
    with _client(api, token) as client:
        with media.open("rb") as audio:
            uploaded = _checked(client.post("/api/v1/media", files={"file": (media.name, audio)}))
        accepted = _checked(
            client.post(
                "/api/v1/broadcasts",
                json={
                    "targets": {"areas": area or [], "devices": device or []},
                    "content": {"media_id": uploaded["id"]},
                    "priority": priority,
                    "sub_priority": sub_priority,
                    "repeats": repeats,
                    "max_duration_s": max_duration,
                },
            )
        )
        err.print(
            f"broadcast {accepted['id']} to {accepted['device_count']} devices "
            f"({uploaded['duration_s']:.1f} s of audio)"
        )
        if wait:
            _follow(client, accepted["id"], accepted["device_count"], timeout)
        typer.echo(accepted["id"])


def _follow(client: httpx.Client, broadcast_id: str, device_count: int, timeout: float) -> None:
    """Show progress from the event stream until every delivery has ended, or `timeout` seconds."""
    terminal = {"completed", "interrupted", "failed", "expired", "cancelled"}
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("playing", total=device_count)

        def update() -> bool:
            done = sum(1 for s in states.values() if s in terminal)
            summary = ", ".join(f"{s} {n}" for s, n in sorted(_count(states).items()))
            progress.update(task, completed=done, description=summary or "queued")
            return done >= device_count

        # The stream's read timeout only bounds the gap between lines (the server pings every 15 s);
        # the deadline is checked on every line.
        read_timeout = httpx.Timeout(min(timeout, 30.0), connect=10)
        with client.stream("GET", "/api/v1/events", timeout=read_timeout) as stream:
            for line in stream.iter_lines():
                if time.monotonic() > deadline:
                    break
                if line.startswith("event:") and line[6:].strip() == "ready":
                    # Subscribed: the snapshot taken now misses nothing that ends after it.
                    snapshot = _checked(client.get(f"/api/v1/broadcasts/{broadcast_id}"))
                    for delivery in snapshot["deliveries"]:
                        states.setdefault(delivery["id"], delivery["state"])
                    if update():
                        break
                    continue
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("broadcast_id") == broadcast_id:
                    states[event["delivery_id"]] = event["state"]
                    if update():
                        break
    final = _checked(client.get(f"/api/v1/broadcasts/{broadcast_id}"))
    err.print(f"final: {final['counts']}")


def _count(states: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    return counts


# -- schedules ---------------------------------------------------------------------------------
@schedule_app.command("add")
def schedule_add(
    name: Annotated[str, typer.Option(help="what staff call it, e.g. 'Bản tin sáng'")],
    start: Annotated[str, typer.Option("--start", help="local start, e.g. 2026-12-01T06:00")],
    media_id: Annotated[list[str], typer.Option("--media-id", help="media id (repeatable, played in order)")],
    area: Annotated[list[str] | None, typer.Option(help="area code (repeatable)")] = None,
    device: Annotated[list[str] | None, typer.Option(help="device id (repeatable)")] = None,
    rrule: Annotated[
        str | None, typer.Option(help="RFC 5545 rule, e.g. FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA")
    ] = None,
    exdate: Annotated[list[str] | None, typer.Option(help="local start to skip (repeatable)")] = None,
    priority: Annotated[str, typer.Option(help="normal | priority | emergency")] = "normal",
    sub_priority: Annotated[int, typer.Option(min=0, max=255)] = 0,
    repeats: Annotated[int, typer.Option(min=1, max=20)] = 1,
    gap: Annotated[float, typer.Option(help="seconds between repeats")] = 0,
    max_duration: Annotated[float, typer.Option(help="seconds")] = 1800,
    timezone: Annotated[str | None, typer.Option(help="IANA zone (default: the controller's)")] = None,
    resolution: Annotated[str, typer.Option(help="none | priority | order, to settle clashes")] = "none",
    ward_order: Annotated[int | None, typer.Option(help="order among the ward's priority items")] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Create a schedule; a clash is shown with the schedules, devices and times it hits."""
    body: dict[str, Any] = {
        "name": name,
        "targets": {"areas": area or [], "devices": device or []},
        "content": {"media_ids": media_id},
        "dtstart": start,
        "rrule": rrule,
        "exdates": exdate or [],
        "priority": priority,
        "sub_priority": sub_priority,
        "repeats": repeats,
        "gap_s": gap,
        "max_duration_s": max_duration,
        "resolution": resolution,
        "ward_order": ward_order,
    }
    if timezone:
        body["timezone"] = timezone
    with _client(api, token) as client:
        response = client.post("/api/v1/schedules", json=body)
    if response.status_code == 409:
        table = Table("clashes with", "devices", "first overlaps", "why", title="Lịch bị trùng / clashes")
        for clash in response.json().get("clashes", []):
            times = ", ".join(t["start"] for t in clash["times"][:3])
            table.add_row(
                clash["name"],
                f"{clash['device_count']}: {', '.join(clash['devices'][:5])}",
                times,
                clash["why"],
            )
        err.print(table)
        raise typer.Exit(1)
    created = _checked(response)
    err.print(
        f"first occurrence {created['first_occurrence']['start_local']} on {created['device_count']} devices"
    )
    typer.echo(created["id"])


@schedule_app.command("list")
def schedule_list(api: ApiOption = None, token: TokenOption = None) -> None:
    with _client(api, token) as client:
        schedules = _checked(client.get("/api/v1/schedules"))
    table = Table("id", "name", "priority", "start", "rule", "targets", "enabled")
    for item in schedules:
        targets = ", ".join(item["targets"].get("areas", []) + item["targets"].get("devices", []))
        table.add_row(
            item["id"][:8],
            item["name"],
            f"{item['priority']}/{item['sub_priority']}",
            item["dtstart"],
            item["rrule"] or "(once)",
            targets,
            "yes" if item["enabled"] else "no",
        )
    out.print(table)


@schedule_app.command("show")
def schedule_show(schedule_id: str, api: ApiOption = None, token: TokenOption = None) -> None:
    with _client(api, token) as client:
        item = _checked(client.get(f"/api/v1/schedules/{schedule_id}"))
        history = _checked(client.get(f"/api/v1/schedules/{schedule_id}/history"))
    out.print_json(data={**item, "history": history})


@schedule_app.command("occurrences")
def schedule_occurrences(
    schedule_id: str,
    start: Annotated[str, typer.Option("--from", help="ISO time with offset, e.g. 2026-12-01T00:00+07:00")],
    end: Annotated[str, typer.Option("--to", help="ISO time with offset")],
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    with _client(api, token) as client:
        items = _checked(
            client.get(f"/api/v1/schedules/{schedule_id}/occurrences", params={"start": start, "end": end})
        )
    for item in items:
        typer.echo(f"{item['start_local']}  ({item['start_utc']})")


# -- firmware and rollouts ---------------------------------------------------------------------
@firmware_app.command("keygen")
def firmware_keygen(
    out_file: Annotated[Path, typer.Option("--out", help="where the private key (PEM) is written")],
) -> None:
    """A new Ed25519 signing key: the private key goes to --out (mode 0600, for whoever builds images);
    the public key, for `firmware.trusted_keys` and the devices, is the last line of stdout."""
    from controller.broker import write_private
    from controller.services.firmware import generate_signing_key

    if out_file.exists():
        err.print(f"[red]{out_file} exists; not overwriting a key[/red]")
        raise typer.Exit(2)
    pem, public = generate_signing_key()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_private(out_file, pem.decode())
    err.print(f"private key written to {out_file}; add the public key to firmware.trusted_keys:")
    typer.echo(public)


@firmware_app.command("sign")
def firmware_sign(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the image")],
    key: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="the private key (PEM)")],
) -> None:
    """Print the image's detached signature (base64 Ed25519 over its SHA-256 digest)."""
    from controller.services.firmware import sign_image

    try:
        typer.echo(sign_image(file, key.read_bytes()))
    except (TypeError, ValueError) as error:
        err.print(f"[red]--key: {error}[/red]")
        raise typer.Exit(2) from error


@firmware_app.command("upload")
def firmware_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the image")],
    version: Annotated[str, typer.Option(help="the firmware version the image installs")],
    signature: Annotated[str, typer.Option(help="base64 Ed25519 signature (wardcast firmware sign)")],
    kind: Annotated[str, typer.Option(help="speaker | led_screen | sensor | wired_zone")] = "speaker",
    sha256: Annotated[str | None, typer.Option(help="the image's SHA-256 (hex), checked on arrival")] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Upload a signed image; the controller refuses it unless the signature verifies with a trusted key."""
    fields = {"kind": kind, "version": version, "signature": signature}
    if sha256 is not None:
        fields["sha256"] = sha256
    with _client(api, token) as client, file.open("rb") as image:
        row = _checked(client.post("/api/v1/firmware", data=fields, files={"file": (file.name, image)}))
    out.print(
        f"stored {row['kind']} firmware {row['version']} as {row['id']} (signed by key {row['key_id']})"
    )


@firmware_app.command("list")
def firmware_list(api: ApiOption = None, token: TokenOption = None) -> None:
    with _client(api, token) as client:
        images = _checked(client.get("/api/v1/firmware"))
    table = Table("id", "kind", "version", "bytes", "sha256", "key", "uploaded")
    for image in images:
        table.add_row(
            image["id"],
            image["kind"],
            image["version"],
            str(image["size_bytes"]),
            image["sha256"][:16],
            image["key_id"],
            image["uploaded_at"],
        )
    out.print(table)


@rollout_app.command("create")
def rollout_create(
    name: Annotated[str, typer.Option()],
    image: Annotated[str, typer.Option(help="the firmware image id (wardcast firmware list)")],
    kind: Annotated[str | None, typer.Option(help="device kind (default: the image's)")] = None,
    area: Annotated[str | None, typer.Option(help="only devices in this area's subtree")] = None,
    from_version: Annotated[str | None, typer.Option(help="only devices running this version")] = None,
    first_group: Annotated[int | None, typer.Option(help="canary group size in devices")] = None,
    first_group_percent: Annotated[float | None, typer.Option(help="canary group size in %")] = None,
    groups: Annotated[int, typer.Option(help="number of groups, the canary included")] = 1,
    success_threshold: Annotated[float, typer.Option(help="share of a group updated to go on")] = 1.0,
    error_threshold: Annotated[float, typer.Option(help="share of a group failed that pauses")] = 0.1,
    window: Annotated[str | None, typer.Option(help="maintenance window HH:MM-HH:MM (local)")] = None,
    any_time: Annotated[bool, typer.Option(help="no maintenance window: start updates at once")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Start a staged rollout (without --window or --any-time: firmware.maintenance_window)."""
    body: dict[str, Any] = {
        "name": name,
        "image_id": image,
        "kind": kind,
        "area": area,
        "from_version": from_version,
        "first_group": first_group,
        "first_group_percent": first_group_percent,
        "groups": groups,
        "success_threshold": success_threshold,
        "error_threshold": error_threshold,
    }
    body = {key: value for key, value in body.items() if value is not None}
    if any_time:
        body["maintenance_window"] = None
    elif window is not None:
        body["maintenance_window"] = window
    with _client(api, token) as client:
        rollout = _checked(client.post("/api/v1/rollouts", json=body))
    sizes = ", ".join(str(group["size"]) for group in rollout["groups"])
    out.print(f"rollout {rollout['id']}: {rollout['device_count']} devices in groups of {sizes}")
    typer.echo(rollout["id"])


def _print_rollout(rollout: dict[str, Any]) -> None:
    out.print(
        f"{rollout['name']} ({rollout['id']}): {rollout['state']}"
        + (f" - {rollout['reason']}" if rollout["reason"] else "")
    )
    out.print(
        f"image {rollout['image']['kind']} {rollout['image']['version']}; window "
        f"{rollout['maintenance_window'] or 'any time'}"
        + (f", next opening {rollout['next_window_at']}" if rollout["next_window_at"] else "")
    )
    groups = Table("group", "size", "updated", "failed", "running", "pending", "success", "errors", "status")
    for group in rollout["groups"]:
        counts = group["counts"]
        running = sum(counts.get(s, 0) for s in ("queued", "downloading", "verified", "updating"))
        status = "accepted" if group["accepted"] else "open" if group["opened"] else "waiting"
        groups.add_row(
            str(group["index"] + 1),
            str(group["size"]),
            str(counts.get("updated", 0)),
            str(counts.get("failed", 0)),
            str(running),
            str(counts.get("pending", 0) + counts.get("cancelled", 0)),
            f"{group['success_ratio']:.0%}",
            f"{group['error_ratio']:.0%}",
            status,
        )
    out.print(groups)
    devices = Table("device", "group", "state", "since", "from", "now", "detail")
    for device in rollout["devices"]:
        devices.add_row(
            device["device_id"],
            str(device["group"] + 1),
            device["state"] + (" (rolled back)" if device["rolled_back"] else ""),
            device["state_at"],
            device["from_version"] or "-",
            device["reported_version"] or "-",
            device["detail"] or "",
        )
    out.print(devices)


@rollout_app.command("show")
def rollout_show(rollout_id: str, api: ApiOption = None, token: TokenOption = None) -> None:
    """The rollout's groups and each device's state."""
    with _client(api, token) as client:
        _print_rollout(_checked(client.get(f"/api/v1/rollouts/{rollout_id}")))


@rollout_app.command("pause")
def rollout_pause(rollout_id: str, api: ApiOption = None, token: TokenOption = None) -> None:
    """No new device starts; running updates finish."""
    _rollout_action(rollout_id, "pause", api, token)


@rollout_app.command("resume")
def rollout_resume(rollout_id: str, api: ApiOption = None, token: TokenOption = None) -> None:
    """Go on; the groups that paused the rollout are accepted as they are."""
    _rollout_action(rollout_id, "resume", api, token)


@rollout_app.command("abort")
def rollout_abort(rollout_id: str, api: ApiOption = None, token: TokenOption = None) -> None:
    """No device starts any more; running updates may finish."""
    _rollout_action(rollout_id, "abort", api, token)


def _rollout_action(rollout_id: str, action: str, api: str | None, token: str | None) -> None:
    with _client(api, token) as client:
        _print_rollout(_checked(client.post(f"/api/v1/rollouts/{rollout_id}/{action}")))


# -- simulators --------------------------------------------------------------------------------
@sim_app.command(
    "fleet",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def sim_fleet(ctx: typer.Context) -> None:
    """Simulated speakers (options: `wardcast sim fleet --help`)."""
    from firmware_sim.fleet import main as fleet_main

    raise typer.Exit(fleet_main(list(ctx.args)))


def main() -> None:
    os.environ.setdefault("PYTHONUTF8", "1")
    app(prog_name="wardcast")


if __name__ == "__main__":
    main()
