"""Provisioning at city scale (issue 6): a CSV import of 10,000 devices, and a reconnect storm of 5,000
simulated devices after a broker restart.

    .venv/bin/python bench/provision.py                       # SQLite, 10,000 imported, 5,000 in the storm
    .venv/bin/python bench/provision.py --database postgresql --devices 2000 --storm 1000

Everything runs on 127.0.0.1 in a temporary directory, on the production path: the controller manages its
own Mosquitto (per-device accounts in its password and ACL files), the devices connect with the
credentials of the bundles the import returned.

**Import**: `POST /api/v1/devices/import` with one CSV of N speakers (each gets its broker account, a
`$7$` hash, and the broker reloads once before the answer), beside the raw database on the same run: the
same N device rows inserted into a scratch copy of the `devices` table in one transaction, and the
hashing of N passwords alone. Then one credential rotation (`POST /devices/{id}/credentials`) with N
accounts in the broker's files: what a technician waits for on a ladder.

**Reconnect storm**: the fleet (`--credentials` bundles, jittered exponential backoff) online; Mosquitto
stopped (SIGTERM: its persistence is saved) and started again on the same files and port. Measured from
the instant the old broker had exited: when it listens again; when a raw paho subscriber (the controller's
account, on `+/state`) has received a fresh (not retained) `online` state from every device — the raw
broker's view; and when the controller has recorded every device online again (`device` events on
`/api/v1/events` with a state time after the restart).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import psycopg
from common import (
    HOST,
    RESULTS_DIR,
    BenchError,
    LineProcess,
    clean_env,
    create_admin_key,
    machine_info,
    percentile,
    rfc3339,
    sigterm_as_interrupt,
    wait_until,
)
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, text

from controller.broker import free_tcp_port, mosquitto_binary, mosquitto_password_hash

POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
WARDS = 10
GROUPS_PER_WARD = 10


@dataclass(frozen=True)
class Options:
    database: str
    devices: int
    storm: int
    processes: int
    storm_timeout_s: float
    keep: bool
    output: Path | None


def areas_yaml() -> bytes:
    lines = ["areas:", "  - {code: bc, name: Thành phố Bench, kind: city, children: ["]
    for ward in range(1, WARDS + 1):
        groups = ", ".join(
            f"{{code: bc.w{ward:02d}.t{group:02d}, name: Tổ {group}, kind: group}}"
            for group in range(1, GROUPS_PER_WARD + 1)
        )
        lines.append(
            f"      {{code: bc.w{ward:02d}, name: Phường {ward}, kind: ward, children: [{groups}]}},"
        )
    lines.append("    ]}")
    return ("\n".join(lines) + "\n").encode()


def device_csv(count: int) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["kind", "area", "id", "address", "serial", "name"])
    for index in range(1, count + 1):
        group = index % (WARDS * GROUPS_PER_WARD)
        area = f"bc.w{group // GROUPS_PER_WARD + 1:02d}.t{group % GROUPS_PER_WARD + 1:02d}"
        writer.writerow(
            ["speaker", area, f"spk-{index:05d}", f"spk-{index:05d}", f"SN{index:08d}", f"Loa {index}"]
        )
    return buffer.getvalue().encode()


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'wardcast.db'}"
        return
    name = f"wardcast_bench_provision_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def raw_database_insert(url: str) -> float:
    """Seconds to insert a copy of every `devices` row into a scratch table, in one transaction."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE bench_devices AS SELECT * FROM devices WHERE 1 = 0"))
            result = connection.execute(text("SELECT * FROM devices"))
            columns = list(result.keys())
            rows = [dict(zip(columns, row, strict=True)) for row in result]
        # The column names come from the table itself, not from input.
        statement = text(
            f"INSERT INTO bench_devices ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"  # noqa: S608
        )
        started = time.perf_counter()
        with engine.begin() as connection:
            connection.execute(statement, rows)
        elapsed = time.perf_counter() - started
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE bench_devices"))
        return elapsed
    finally:
        engine.dispose()


def hashing_seconds(count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        mosquitto_password_hash(secrets.token_urlsafe(24))
    return time.perf_counter() - started


class StateObserver:
    """The devices' and raw broker's view: a paho subscriber that notes when each device said it was online
    again (the `at` of its fresh, not retained, state)."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.fresh_online: dict[str, float] = {}
        self.counting_from = float("inf")
        self._lock = threading.Lock()
        # A persistent session: what devices publish while this client is itself reconnecting after the
        # restart is kept for it by the broker (and not flagged as retained).
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-observer-{secrets.token_hex(3)}",
            clean_session=False,
        )
        self._client.username_pw_set(username, password)
        self._client.on_connect = lambda client, *_: client.subscribe("wardcast/v1/dev/+/state", qos=1)
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)
        self._client.connect(HOST, port)
        self._client.loop_start()

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        if message.retain:
            return  # an old state the broker kept, not a device speaking now
        now = time.time()
        try:
            document = json.loads(message.payload)
        except ValueError:
            return
        if document.get("online") is not True or not isinstance(document.get("at"), str):
            return
        # When the device said it was back (its own clock, the same as ours here), not when this client,
        # reconnecting too, got to hear it.
        said_at = datetime.fromisoformat(document["at"]).timestamp()
        if said_at >= self.counting_from:
            address = message.topic.split("/")[3]
            with self._lock:
                self.fresh_online.setdefault(address, min(said_at, now))

    def count_from(self, instant: float) -> None:
        with self._lock:
            self.counting_from = instant
            self.fresh_online = {}

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class ControllerObserver:
    """The controller's view: `device` events on /api/v1/events, with the time each device came online."""

    def __init__(self, base_url: str, token: str) -> None:
        self.online: dict[str, float] = {}
        self.online_at_or_after = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._client = httpx.Client(
            # An event stream: no read timeout, a connect timeout as usual.
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=None),
        )
        self._thread = threading.Thread(target=self._listen, daemon=True, name="events")
        self._thread.start()
        if not self._ready.wait(30):
            raise BenchError("the controller's event stream did not open")

    def _listen(self) -> None:
        with self._client.stream("GET", "/api/v1/events") as response:
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("type") is None:
                    self._ready.set()
                    continue
                if event["type"] != "device" or not event.get("online"):
                    continue
                at = datetime.fromisoformat(event["at"]).timestamp()
                with self._lock:
                    if at >= self.online_at_or_after:
                        self.online.setdefault(event["device_id"], time.time())

    def count_from(self, instant: float) -> None:
        with self._lock:
            self.online_at_or_after = instant
            self.online = {}

    def close(self) -> None:
        self._stop.set()
        self._client.close()


def broker_process(controller_pid: int) -> int:
    # Each thread lists the children it started: the broker is started from a worker thread.
    for task in Path(f"/proc/{controller_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"mosquitto" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise BenchError("the controller's Mosquitto was not found among its children")


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
        return True
    return False


def summary(times: dict[str, float], since: float, expected: int) -> dict[str, Any]:
    delays = sorted(at - since for at in times.values())
    return {
        "devices": len(delays),
        "of": expected,
        "p50_s": round(percentile(delays, 0.5) or 0.0, 2) if delays else None,
        "p99_s": round(percentile(delays, 0.99) or 0.0, 2) if delays else None,
        "all_s": round(delays[-1], 2) if len(delays) == expected else None,
    }


def run(options: Options, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(database(options.database, workdir))
        http_port, broker_port = free_tcp_port(HOST), free_tcp_port(HOST)
        state_dir = workdir / "mosquitto"
        env = clean_env()
        env.update(
            {
                "WARDCAST_DATABASE__URL": url,
                "WARDCAST_HTTP__HOST": HOST,
                "WARDCAST_HTTP__PORT": str(http_port),
                "WARDCAST_MQTT__MANAGED__PORT": str(broker_port),
                "WARDCAST_MQTT__MANAGED__STATE_DIR": str(state_dir),
                "WARDCAST_MEDIA__DIR": str(workdir / "media"),
                "WARDCAST_DATA_DIR": str(workdir),
                "WARDCAST_LOGGING__LEVEL": "info",
            }
        )
        controller = LineProcess(
            [sys.executable, "-m", "controller", "serve"],
            env=env,
            log_path=workdir / "controller.log",
            what="the controller",
        )
        stack.callback(controller.stop, 60)
        controller.expect("READY", 90)
        token = create_admin_key(env)
        api = stack.enter_context(
            httpx.Client(
                base_url=f"http://{HOST}:{http_port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=900,
            )
        )
        response = api.post(
            "/api/v1/areas/import", content=areas_yaml(), headers={"Content-Type": "application/yaml"}
        )
        if response.status_code != 200:
            raise BenchError(f"area import: {response.status_code} {response.text[:500]}")

        # -- import -------------------------------------------------------------------------------
        body = device_csv(options.devices)
        started = time.perf_counter()
        response = api.post("/api/v1/devices/import", content=body, headers={"Content-Type": "text/csv"})
        import_s = time.perf_counter() - started
        if response.status_code != 200:
            raise BenchError(f"device import: {response.status_code} {response.text[:500]}")
        report = response.json()
        if report["created"] != options.devices or report["rejected"]:
            raise BenchError(f"import created {report['created']}, rejected {report['rejected'][:5]}")
        bundles: list[dict[str, Any]] = report["bundles"]
        started = time.perf_counter()
        response = api.post("/api/v1/devices/spk-00001/credentials")
        rotation_s = time.perf_counter() - started
        if response.status_code != 200:
            raise BenchError(f"credential rotation: {response.status_code} {response.text[:300]}")
        bundles[0] = response.json()
        raw_insert_s = raw_database_insert(url)
        hashing_s = hashing_seconds(options.devices)
        result["import"] = {
            "devices": options.devices,
            "csv_bytes": len(body),
            "api_import_s": round(import_s, 2),
            "per_device_ms": round(import_s / options.devices * 1000, 3),
            "raw_database_insert_s": round(raw_insert_s, 3),
            "password_hashing_alone_s": round(hashing_s, 3),
            "import_over_raw_insert": round(import_s / raw_insert_s, 1),
            "one_rotation_with_all_accounts_s": round(rotation_s, 3),
        }
        print(f"import: {result['import']}", flush=True)

        # -- reconnect storm ----------------------------------------------------------------------
        storm = bundles[: options.storm]
        credentials_path = workdir / "bundles.json"
        credentials_path.write_text(json.dumps(storm))
        accounts = json.loads((state_dir / "credentials.json").read_text())
        observer = StateObserver(broker_port, "controller", accounts["controller"])
        stack.callback(observer.close)
        events = ControllerObserver(f"http://{HOST}:{http_port}", token)
        stack.callback(events.close)
        addresses = {bundle["address"] for bundle in storm}
        events.count_from(0.0)
        started = time.monotonic()
        fleet = LineProcess(
            [
                sys.executable,
                "-m",
                "firmware_sim",
                "fleet",
                "--mqtt-url",
                f"mqtt://{HOST}:{broker_port}",
                "--credentials",
                str(credentials_path),
                "--processes",
                str(options.processes),
            ],
            env=clean_env(),
            log_path=workdir / "fleet.log",
            what="the simulated devices",
        )
        stack.callback(fleet.stop, 90)
        fleet.expect("READY", max(180, options.storm / 20))
        if not wait_until(
            lambda: len(events.online) >= len(addresses), timeout=options.storm_timeout_s, interval=0.5
        ):
            raise BenchError(
                f"the controller saw {len(events.online)} of {len(addresses)} devices online at start"
            )
        result["first_connect_s"] = round(time.monotonic() - started, 2)

        old_broker = broker_process(controller.pid)
        config = state_dir / "mosquitto.conf"
        subprocess.run(["kill", "-TERM", str(old_broker)], check=True)
        if not wait_until(
            lambda: not Path(f"/proc/{old_broker}").exists() or _zombie(old_broker), timeout=30, interval=0.01
        ):
            raise BenchError("the broker did not stop")
        restart = time.time()
        observer.count_from(restart)
        events.count_from(restart)
        with (workdir / "mosquitto-restarted.stderr").open("wb") as stderr:
            new_broker = subprocess.Popen(
                [mosquitto_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        stack.callback(_stop_process, new_broker)
        wait_until(lambda: listening(broker_port), timeout=30, interval=0.01)
        listening_s = time.time() - restart
        wait_until(
            lambda: len(events.online) >= len(addresses) and len(observer.fresh_online) >= len(addresses),
            timeout=options.storm_timeout_s,
            interval=0.25,
        )
        result["storm"] = {
            "devices": len(addresses),
            "fleet_processes": options.processes,
            "broker_listening_s": round(listening_s, 3),
            "raw_broker_fresh_online_state": summary(observer.fresh_online, restart, len(addresses)),
            "controller_recorded_online": summary(events.online, restart, len(addresses)),
        }
        print(f"storm: {result['storm']}", flush=True)
    return result


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    return True


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def parse_arguments(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--devices", type=int, default=10_000, help="devices in the CSV import (default 10,000)"
    )
    parser.add_argument(
        "--storm", type=int, default=5_000, help="simulated devices in the reconnect storm (5,000)"
    )
    parser.add_argument("--processes", type=int, default=4, help="fleet processes (default 4)")
    parser.add_argument("--storm-timeout", type=float, default=300.0, help="longest wait for every device")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/provision-<UTC>.json)")
    arguments = parser.parse_args(argv)
    if arguments.devices < 1 or not 1 <= arguments.storm <= arguments.devices or arguments.processes < 1:
        parser.error("expected --devices >= 1, 1 <= --storm <= --devices, --processes >= 1")
    return Options(
        database=arguments.database,
        devices=arguments.devices,
        storm=arguments.storm,
        processes=arguments.processes,
        storm_timeout_s=arguments.storm_timeout,
        keep=arguments.keep,
        output=arguments.output,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    started = datetime.now(UTC)
    output = options.output or RESULTS_DIR / f"provision-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    workdir = Path(tempfile.mkdtemp(prefix="wardcast-provision-"))
    document: dict[str, Any] = {
        "benchmark": "provision",
        "issue": 6,
        "started_at": rfc3339(started),
        "machine": machine_info(),
        "parameters": {
            "database": options.database,
            "devices": options.devices,
            "storm": options.storm,
            "processes": options.processes,
        },
    }
    try:
        with sigterm_as_interrupt():
            document["result"] = run(options, workdir)
    finally:
        if options.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    document["finished_at"] = rfc3339(datetime.now(UTC))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
