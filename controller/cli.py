"""The `wardcast` command: run the controller, the demo, and talk to a running controller's API."""

from __future__ import annotations

import asyncio
import json
import os
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
sim_app = typer.Typer(help="Simulated devices.", no_args_is_help=True)
schedule_app = typer.Typer(help="Ward programmes: one-off and recurring schedules.", no_args_is_help=True)
command_key_app = typer.Typer(
    help="The key that signs what the controller sends devices (docs/protocol.md §1.13).",
    no_args_is_help=True,
)
app.add_typer(area_app, name="area")
app.add_typer(device_app, name="device")
app.add_typer(broadcast_app, name="broadcast")
app.add_typer(apikey_app, name="apikey")
app.add_typer(sim_app, name="sim")
app.add_typer(schedule_app, name="schedule")
app.add_typer(command_key_app, name="command-key")

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
    ward: Annotated[str | None, typer.Option(help="area code a ward_staff key is confined to")] = None,
    config: ConfigOption = None,
) -> None:
    """Create an API key; the token is printed once, as the last line of stdout."""
    from controller.services.auth import ApiKeyError, create_api_key
    from controller.store.db import create_db_engine, migrate

    settings = _settings(config)
    engine = create_db_engine(settings.database.url)
    try:
        migrate(engine)
        row, token = create_api_key(engine, name=name, role=role, ward_code=ward)
    except ApiKeyError as error:
        err.print(f"[red]{error.field}: {error.detail}[/red]")
        raise typer.Exit(2) from error
    finally:
        engine.dispose()
    err.print(f"created key {row.id} ({row.role}{', ward ' + row.ward_code if row.ward_code else ''})")
    typer.echo(token)


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
    table = Table("id", "kind", "area", "online", "last seen", "address")
    for device in devices:
        table.add_row(
            device["id"],
            device["kind"],
            device["area"],
            "yes" if device["online"] else "no",
            device["last_seen"] or "-",
            device["address"],
        )
    out.print(table)


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
    """Show progress from the event stream until every delivery has ended."""
    terminal = {"completed", "interrupted", "failed", "expired", "cancelled"}
    states: dict[str, str] = {}
    snapshot = _checked(client.get(f"/api/v1/broadcasts/{broadcast_id}"))
    states.update({d["id"]: d["state"] for d in snapshot["deliveries"]})
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

        if update():
            return
        with client.stream("GET", "/api/v1/events", timeout=httpx.Timeout(timeout, connect=10)) as stream:
            for line in stream.iter_lines():
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
