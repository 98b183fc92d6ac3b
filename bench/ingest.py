"""Issue 5 benchmark: telemetry from 10,000 simulated MQTT sensors, stepped up until it stops keeping up.

    .venv/bin/python bench/ingest.py                                      # SQLite, then PostgreSQL
    .venv/bin/python bench/ingest.py --databases sqlite --sensors 1000 --rates 500,1000 --warmup 2 --window 5
    .venv/bin/python bench/ingest.py --databases sqlite --rates 1500 --no-raw-ceiling --profile --keep

For each database (a SQLite file, or a fresh database on the local PostgreSQL at 127.0.0.1:5432, trust
auth) it starts, on 127.0.0.1 only and in a temporary directory: its own Mosquitto (the managed broker's
code: auth + the device ACL), the database migrated and seeded in bulk with one city and `--sensors`
MQTT sensors (each measuring `water_level`, 0…10 m), the controller (`python -m controller serve`, external
broker, MQTT 5), a raw paho subscriber to `wardcast/v1/dev/+/telemetry` in a process of its own (MQTT 5,
QoS 1, the controller's account; it only counts), and the simulated sensors (`python -m firmware_sim fleet
--kinds sensor --processes N`, MQTT 3.1.1, QoS 1, one reading per document: one message is one reading).
Before the controller starts, the controller's own per-message steps are timed in this process on that
database (`component_costs`: decoding, the pipeline's intake, a batch write of 5,000).

Then it steps the offered rate up through `--rates` (messages a second across all sensors) by rewriting
the fleet's control file (`sensor_interval_s` = sensors ÷ rate; each sensor's next document falls at a
random instant within the new interval, so the load stays spread). For each step, after one interval
and `--warmup` seconds, over a `--window` of seconds:

offered    what the fleet handed to the broker: the sensors' `published` counters from the fleet's stats
           file (one JSON line per process per second; each process's rate from its own timestamps);
raw        what the raw paho subscriber received, beside the controller in the same run;
persisted  what the controller stored: `wardcast_telemetry_written_total` on /metrics (its batches are
           committed before the counter moves); it and the raw count are sampled every second and the
           rate is the least-squares slope, so that a batch landing just inside or outside the window
           does not skew it; `wardcast_telemetry_readings_total` (accepted / rejected / dropped),
           `wardcast_inbound_messages_total{kind="telemetry"}` and `wardcast_telemetry_pending` beside it;
ratio      persisted ÷ raw in the same window;
CPU        cores used by the controller (its event-loop thread and its other threads apart), the broker,
           the fleet, the raw subscriber and this process, and per message; of the machine's busy time the
           soft interrupts (loopback networking charged to no process), the time stolen by the host, and
           everything else ("foreign": other jobs on the machine).

A step is *sustained* when persisted ≥ `--sustain` × offered (default 0.95) and nothing was dropped; the
run of a database stops at the first step that is not. A step that fails while other jobs on the machine
used more than BUSY_FOREIGN_CORES is measured once more after they have gone quiet (the JSON keeps both).
The fleet may fail to offer a step's rate on a small machine; the JSON says so
(`offered_fraction_of_target`). Within the first database's run (SQLite by default, so that no PostgreSQL
server is busy meanwhile), the controller is then stopped and the same steps are run for the raw subscriber
alone (until it receives less than `--sustain` × offered): the ceiling of the broker, the fleet and a plain
subscriber on this machine, against which the controller's highest sustained step is compared.
With `--single-publisher`, each database also gets the same steps from one publisher connection (the
controller's account, round-robin over the sensors' topics) while the fleet idles: the controller's own
ceiling when the load generator does not take most of the machine.

Results: bench/results/ingest-<UTC>.json and a table on stdout. Everything started is stopped on the way
out, Ctrl-C included; every wait is bounded. `--profile` samples the controller with py-spy (`pip install
py-spy`) during every window and puts its hottest functions, per thread group, in the JSON: for finding
where the time goes, not for the figures (the sampler takes CPU of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import paho.mqtt.client as paho
import psycopg
from common import (
    CLOCK_TICKS,
    HOST,
    REPO,
    RESULTS_DIR,
    BenchError,
    LineProcess,
    child_pids,
    clean_env,
    cpu_of,
    machine_busy_seconds,
    machine_info,
    memory_mib,
    rfc3339,
    sigterm_as_interrupt,
    thread_cpu_seconds,
    wait_until,
)
from fanout import close_client, connect_and_subscribe, new_client, wipe_session
from sqlalchemy import delete, insert
from sqlmodel import Session

from controller.broker import BrokerAccount, ManagedMosquitto, free_tcp_port
from controller.domain.clock import SystemClock
from controller.domain.telemetry import epoch_ms
from controller.services.telemetry import Reading, TelemetryPipeline
from controller.settings import TelemetrySettings
from controller.store.db import create_db_engine, migrate
from controller.store.models import AreaRow, DeviceRow, TelemetryLatestRow, TelemetryRow
from drivers.mqtt_codec import decode_inbound

TELEMETRY_TOPIC: Final = "wardcast/v1/dev/+/telemetry"
CITY: Final = "ic"
SENSOR_PREFIX: Final = "sen-"
METRIC: Final = "water_level"
# The interval of an idle fleet: connected, announcing its state, publishing (next to) nothing.
IDLE_INTERVAL_S: Final = 3600.0
POSTGRES_ADMIN_DSN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
CONTROLLER_CLIENT_ID: Final = "wardcast-bench-ingest"
QUIET_CORES: Final = 0.15
# A step that fails while other jobs used more than this is measured again (once).
BUSY_FOREIGN_CORES: Final = 0.25
PROFILE_RATE_HZ: Final = 100
SAMPLE_INTERVAL_S: Final = 1.0
# The goals: persisted messages a second, and persisted ÷ raw.
GOAL_RATE: Final = 20_000
GOAL_RATIO: Final = 0.5
# Fine where a 2-core machine gives out, coarse up to the goal and beyond it.
DEFAULT_RATES: Final = (
    1000,
    1500,
    2000,
    2500,
    3000,
    4000,
    5000,
    7500,
    10_000,
    15_000,
    20_000,
    25_000,
    30_000,
)
_METRIC_LINE: Final = re.compile(
    r"^(wardcast_[a-z_]+(?:\{[^}]*\})?|process_cpu_seconds_total) (\S+)$", re.MULTILINE
)
WRITTEN: Final = "wardcast_telemetry_written_total"
RECEIVED: Final = 'wardcast_inbound_messages_total{kind="telemetry"}'
PENDING: Final = "wardcast_telemetry_pending"


def outcome(name: str) -> str:
    return f'wardcast_telemetry_readings_total{{outcome="{name}"}}'


# -- the raw subscriber (a worker process) -------------------------------------------------------------


def raw_worker_main() -> int:
    """`ingest.py --raw-worker`: one paho client (MQTT 5, clean start, QoS 1) subscribed to every
    device's telemetry with the controller's account, counting messages in paho's network thread.

    stdin: one JSON line of config, then `COUNT` lines (each answered `COUNT <messages> <unix time>`),
    then `QUIT` or EOF.
    """
    config = json.loads(sys.stdin.readline())
    account = BrokerAccount(config["username"], config["password"])
    client = new_client(f"bench-raw-telemetry-{secrets.token_hex(3)}", account, v5=True)
    received = [0]

    def on_message(_client: paho.Client, _userdata: Any, _message: paho.MQTTMessage) -> None:
        received[0] += 1  # the baseline does nothing else: no decoding, no storing

    client.on_message = on_message
    connect_and_subscribe(client, config["port"], [TELEMETRY_TOPIC])
    print("READY", flush=True)
    try:
        for line in sys.stdin:
            word = line.strip()
            if word == "QUIT":
                break
            if word == "COUNT":
                print(f"COUNT {received[0]} {time.time()}", flush=True)
    finally:
        close_client(client)
    return 0


class RawSubscriber:
    """The orchestrator's handle on the raw subscriber process."""

    def __init__(self, workdir: Path, port: int, account: BrokerAccount) -> None:
        self.process = LineProcess(
            [sys.executable, str(Path(__file__).resolve()), "--raw-worker"],
            env=clean_env(),
            log_path=workdir / "raw-subscriber.log",
            stdin=True,
            what="the raw subscriber",
        )
        self.pid = self.process.pid
        self.process.send(
            json.dumps({"port": port, "username": account.username, "password": account.password})
        )
        self.process.expect("READY", 30)

    def count(self) -> tuple[int, float]:
        self.process.send("COUNT")
        _, messages, at = self.process.expect("COUNT", 30).split()
        return int(messages), float(at)

    def close(self) -> None:
        self.process.send("QUIT")
        self.process.stop(10)


# -- a single publisher (a worker process) -------------------------------------------------------------


def publisher_worker_main() -> int:
    """`ingest.py --publisher-worker`: one paho client (MQTT 3.1.1, QoS 1, the controller's account, which
    may publish on every device's topics) sending sensor telemetry round-robin over the sensors' topics at
    a set rate: the same messages the fleet sends, from one connection instead of 10,000, so that the
    load costs the machine far less CPU than the simulated fleet does.

    stdin: one JSON line of config, then `RATE <messages a second>` (0 stops; answered `RATE`), `COUNT`
    (answered `COUNT <published> <acknowledged> <unix time>`), `QUIT` or EOF.
    """
    config = json.loads(sys.stdin.readline())
    account = BrokerAccount(config["username"], config["password"])
    client = new_client(f"bench-publisher-{secrets.token_hex(3)}", account, v5=False)
    topics = [f"wardcast/v1/dev/{address}/telemetry" for address in config["addresses"]]
    rate = [0.0]
    published = [0]
    acknowledged = [0]
    stop = threading.Event()

    def on_publish(*_arguments: Any) -> None:
        acknowledged[0] += 1

    def publish_forever() -> None:
        started, sent_at_start = time.monotonic(), 0
        current = 0.0
        while not stop.is_set():
            if rate[0] != current:  # a new rate: pace from now on
                current, started, sent_at_start = rate[0], time.monotonic(), published[0]
            due = int(current * (time.monotonic() - started)) - (published[0] - sent_at_start)
            moment = rfc3339(datetime.now(UTC))
            for _ in range(max(0, min(due, 1000))):
                index = published[0] % len(topics)
                document = {
                    "v": 1,
                    "at": moment,
                    "readings": [{"metric": METRIC, "value": round(1.0 + index % 300 / 100, 3), "unit": "m"}],
                }
                client.publish(topics[index], json.dumps(document, separators=(",", ":")), qos=1)
                published[0] += 1
            time.sleep(0.005)

    client.on_publish = on_publish
    connect_and_subscribe(client, config["port"], [])
    pacer = threading.Thread(target=publish_forever, daemon=True, name="pacer")
    pacer.start()
    print("READY", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "QUIT":
                break
            if words[0] == "RATE":
                rate[0] = float(words[1])
                print("RATE", flush=True)
            elif words[0] == "COUNT":
                print(f"COUNT {published[0]} {acknowledged[0]} {time.time()}", flush=True)
    finally:
        stop.set()
        pacer.join(5)
        close_client(client)
    return 0


class Publisher:
    """The orchestrator's handle on the single publisher process."""

    def __init__(self, workdir: Path, port: int, account: BrokerAccount, addresses: Sequence[str]) -> None:
        self.process = LineProcess(
            [sys.executable, str(Path(__file__).resolve()), "--publisher-worker"],
            env=clean_env(),
            log_path=workdir / "publisher.log",
            stdin=True,
            what="the single publisher",
        )
        self.pid = self.process.pid
        self.process.send(
            json.dumps(
                {
                    "port": port,
                    "username": account.username,
                    "password": account.password,
                    "addresses": list(addresses),
                }
            )
        )
        self.process.expect("READY", 30)

    def set_rate(self, rate: float) -> None:
        self.process.send(f"RATE {rate}")
        self.process.expect("RATE", 30)

    def count(self) -> tuple[int, int, float]:
        self.process.send("COUNT")
        _, published, acknowledged, at = self.process.expect("COUNT", 30).split()
        return int(published), int(acknowledged), float(at)

    def close(self) -> None:
        self.process.send("QUIT")
        self.process.stop(10)


# -- the fleet's stats file ----------------------------------------------------------------------------


class FleetStats:
    """Reads the JSON lines the fleet's processes append to their stats file (firmware_sim/fleet.py)."""

    def __init__(self, path: Path, processes: int) -> None:
        self.path = path
        self.processes = processes
        self._offset = 0
        self.latest: dict[int, list[dict[str, Any]]] = {}

    def _read(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as source:
            source.seek(self._offset)
            chunk = source.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            entry = json.loads(line)
            self.latest.setdefault(entry["pid"], []).append(entry)

    def after(self, instant: float, timeout: float = 10.0) -> dict[int, dict[str, Any]]:
        """Each process's first line stamped after `instant` (they come every --stats-interval)."""

        def fresh() -> bool:
            self._read()
            newer = [lines for lines in self.latest.values() if lines[-1]["at"] > instant]
            return len(newer) >= self.processes

        if not wait_until(fresh, timeout, interval=0.1):
            raise BenchError(f"the fleet's stats file {self.path} stopped growing")
        return {
            pid: next(line for line in lines if line["at"] > instant)
            for pid, lines in self.latest.items()
            if lines[-1]["at"] > instant
        }


def fleet_rates(before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Per second, summed over the processes, each process's counters over its own time stamps."""
    rates: dict[str, float] = {"published": 0.0, "acknowledged": 0.0, "late": 0.0, "skipped": 0.0}
    for pid, end in after.items():
        start = before.get(pid)
        if start is None or end["at"] <= start["at"]:
            continue
        span = end["at"] - start["at"]
        for name in rates:
            rates[name] += (end[name] - start[name]) / span
    return rates


# -- databases -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh database URL: a SQLite file in `workdir`, or a new database on the local PostgreSQL
    (dropped again on the way out)."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'wardcast.db'}"
        return
    name = f"wardcast_bench_ingest_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(url: str, addresses: Sequence[str]) -> float:
    """Migrates the database and inserts one city and the sensors in bulk (the rows the API would
    store, with a physical range so that every reading is range-checked); returns the seconds it took."""
    started = time.monotonic()
    engine = create_db_engine(url)
    try:
        migrate(engine)
        now = datetime.now(UTC)
        with Session(engine) as session:
            session.add(AreaRow(code=CITY, name="Thành phố Bench", kind="city"))
            session.commit()
            session.execute(
                insert(DeviceRow),
                [
                    {
                        "id": address,
                        "kind": "sensor",
                        "area_code": CITY,
                        "transport": "mqtt",
                        "address": address,
                        "enabled": True,
                        "online": False,
                        "status": {},
                        "created_at": now,
                        "comm_loss_policy": "keep",
                        "config": {"metrics": {METRIC: {"unit": "m", "min": 0.0, "max": 10.0}}},
                    }
                    for address in addresses
                ],
            )
            session.commit()
    finally:
        engine.dispose()
    return time.monotonic() - started


# -- profiling -----------------------------------------------------------------------------------------


class Profiler:
    """py-spy sampling the controller for one window (non-blocking: the controller is not paused)."""

    def __init__(self, pid: int, seconds: float, output: Path) -> None:
        self.output = output
        binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.process = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(pid),
                "--duration",
                # A little past the window, so that it is still running (and counted) at its last snapshot.
                str(math.ceil(seconds) + 3),
                "--rate",
                str(PROFILE_RATE_HZ),
                "--nonblocking",
                "--threads",
                "--format",
                "raw",
                "--output",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def summary(self, top: int = 25) -> dict[str, Any]:
        try:
            _, stderr = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return {"error": "py-spy did not finish"}
        if not self.output.exists():
            return {"error": stderr.decode(errors="replace")[-500:]}
        return summarise_stacks(self.output.read_text(errors="replace"), top)


# Frames every stack of a thread goes through (the interpreter's start, the CLI, the event loop's and the
# thread pool's machinery): left out of the inclusive tables, where they would only fill the top rows.
_PLUMBING: Final = ("<frozen runpy>", "typer/", "click/", "asyncio/", "concurrent/", "threading.py")
_ROOT_FRAMES: Final = ("controller/__main__.py", "controller/cli.py")


def summarise_stacks(collapsed: str, top: int) -> dict[str, Any]:
    """From py-spy's collapsed stacks (`--threads`): per thread group (the event loop's thread, the
    worker threads of `asyncio.to_thread`), samples, and the functions with the most samples of their
    own (self) and below them (inclusive)."""
    groups: dict[str, dict[str, Any]] = {}
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith("thread") else "thread ?"
        group = groups.setdefault(
            "event_loop_thread" if thread.endswith("MainThread") else "worker_threads",
            {"samples": 0, "own": Counter(), "inclusive": Counter()},
        )
        group["samples"] += count
        calls = [frame for frame in frames if not frame.startswith("thread")]
        if calls:
            group["own"][_short_frame(calls[-1])] += count
        for function in {
            _short_frame(frame)
            for frame in calls
            if not any(part in frame for part in _PLUMBING + _ROOT_FRAMES)
        }:
            group["inclusive"][function] += count
    total = sum(group["samples"] for group in groups.values())

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": count, "share_of_all": round(count / total, 3)}
            for name, count in counter.most_common(top)
        ]

    return {
        "samples": total,
        "rate_hz": PROFILE_RATE_HZ,
        **{
            name: {
                "samples": group["samples"],
                "self": table(group["own"]),
                "inclusive": table(group["inclusive"]),
            }
            for name, group in sorted(groups.items())
        },
    }


def _short_frame(frame: str) -> str:
    """`decode_inbound (drivers/mqtt_codec.py:160)` → `decode_inbound (mqtt_codec.py)`: lines vary
    within a function, the function is what counts."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(path).name})" if path else name


# -- one database --------------------------------------------------------------------------------------


@dataclass
class Options:
    databases: list[str]
    sensors: int
    processes: int
    rates: list[int]
    warmup_s: float
    window_s: float
    sustain: float
    quiet_wait_s: float
    drain_s: float
    controller_log_level: str
    ingest_workers: int
    profile: bool
    raw_ceiling: bool
    single_publisher: bool
    keep: bool
    output: Path | None


@dataclass
class DatabaseRun:
    """Broker, database, controller, raw subscriber and fleet of one database; `stack` stops them in
    reverse order of start."""

    kind: str
    options: Options
    workdir: Path
    stack: contextlib.ExitStack
    database_url: str = ""
    setup: dict[str, Any] = field(default_factory=dict)
    broker: ManagedMosquitto | None = None
    controller: LineProcess | None = None
    raw: RawSubscriber | None = None
    fleet: LineProcess | None = None
    stats: FleetStats | None = None
    # Set during the single-publisher phase: the load comes from it, the fleet idles.
    publisher: Publisher | None = None
    published_by_publishers: int = 0
    # py-spy during a profiled window: its CPU is counted apart, not as other jobs'.
    profiler: Profiler | None = None
    http: httpx.Client | None = None
    http_port: int = 0
    addresses: list[str] = field(default_factory=list)
    controller_account: BrokerAccount = field(
        default_factory=lambda: BrokerAccount("controller", secrets.token_urlsafe(16))
    )
    device_account: BrokerAccount = field(
        default_factory=lambda: BrokerAccount("device", secrets.token_urlsafe(16))
    )

    @property
    def control_path(self) -> Path:
        return self.workdir / "fleet-control.json"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    # -- setup -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.addresses = [f"{SENSOR_PREFIX}{index:05d}" for index in range(1, self.options.sensors + 1)]
        self.database_url = self.stack.enter_context(database(self.kind, self.workdir))
        self.setup["seed_s"] = round(seed(self.database_url, self.addresses), 2)
        self.setup["component_costs"] = component_costs(self.database_url, self.addresses)
        self.broker = ManagedMosquitto(
            self.workdir / "mosquitto",
            host=HOST,
            accounts=[self.controller_account, self.device_account],
            controller_username=self.controller_account.username,
            # The simulated fleet shares one simulation-only account (docs/protocol.md §1.7).
            simulator_username=self.device_account.username,
            persistence=False,
        )
        self.broker.start()
        self.stack.callback(self.broker.stop)
        self.start_controller()
        self.raw = RawSubscriber(self.workdir, self.broker.port, self.controller_account)
        self.stack.callback(self.raw.close)
        self.start_fleet()

    def controller_env(self) -> dict[str, str]:
        assert self.broker is not None
        env = clean_env()
        env.update(
            {
                "WARDCAST_DATABASE__URL": self.database_url,
                "WARDCAST_HTTP__HOST": HOST,
                "WARDCAST_HTTP__PORT": str(self.http_port),
                "WARDCAST_MQTT__MODE": "external",
                "WARDCAST_MQTT__URL": f"mqtt://{HOST}:{self.broker.port}",
                "WARDCAST_MQTT__USERNAME": self.controller_account.username,
                "WARDCAST_MQTT__PASSWORD": self.controller_account.password,
                "WARDCAST_MQTT__CLIENT_ID": CONTROLLER_CLIENT_ID,
                "WARDCAST_MEDIA__DIR": str(self.workdir / "media"),
                "WARDCAST_DATA_DIR": str(self.workdir),
                "WARDCAST_LOGGING__LEVEL": self.options.controller_log_level,
                "WARDCAST_TELEMETRY__INGEST_WORKERS": str(self.options.ingest_workers),
            }
        )
        return env

    def start_controller(self) -> None:
        self.http_port = free_tcp_port(HOST)
        self.controller = LineProcess(
            [sys.executable, "-m", "controller", "serve"],
            env=self.controller_env(),
            log_path=self.workdir / "controller.log",
            what="the controller",
        )
        self.stack.callback(self.controller.stop, 60)
        self.controller.expect("READY", 90)

    def write_control(self, interval_s: float) -> None:
        """Replaces the fleet's control file at once (written aside, then renamed over it)."""
        staging = self.control_path.with_suffix(".new")
        staging.write_text(json.dumps({"sensor_interval_s": interval_s}))
        staging.replace(self.control_path)

    def start_fleet(self) -> None:
        assert self.broker is not None
        csv_path = self.workdir / "sensors.csv"
        csv_path.write_text("address,kind\n" + "".join(f"{a},sensor\n" for a in self.addresses))
        stats_path = self.workdir / "fleet-stats.jsonl"
        self.write_control(IDLE_INTERVAL_S)
        started = time.monotonic()
        self.fleet = LineProcess(
            [
                sys.executable,
                "-m",
                "firmware_sim",
                "fleet",
                "--mqtt-url",
                f"mqtt://{HOST}:{self.broker.port}",
                "--username",
                self.device_account.username,
                f"--password={self.device_account.password}",  # it may start with "-"
                "--csv",
                str(csv_path),
                "--kinds",
                "sensor",
                "--sensor-metrics",
                METRIC,
                "--processes",
                str(self.options.processes),
                "--control",
                str(self.control_path),
                "--stats",
                str(stats_path),
            ],
            env=clean_env(),
            log_path=self.workdir / "fleet.log",
            what="the simulated sensors",
        )
        self.stack.callback(self.fleet.stop, 90)
        self.fleet.expect("READY", max(120, len(self.addresses) / 20))
        self.setup["fleet_connect_s"] = round(time.monotonic() - started, 2)
        self.stats = FleetStats(stats_path, min(self.options.processes, len(self.addresses)))

        # Every sensor's retained `online` state reaches the controller at connect: wait until it has
        # recorded them, so that the first step measures telemetry alone.
        def all_online() -> bool:
            metrics = self.metrics()
            return metrics.get('wardcast_inbound_messages_total{kind="state"}', 0.0) >= len(self.addresses)

        if not wait_until(all_online, timeout=180, interval=1.0):
            raise BenchError("the controller never received every sensor's state")
        self.setup["controller_saw_all_states_s"] = round(time.monotonic() - started, 2)

    # -- observation -----------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        if self.http is None:
            # One connection for the whole run: a new client per sample would cost more than the sample.
            self.http = httpx.Client(base_url=self.base_url, timeout=30)
            self.stack.callback(self.http.close)
        text = self.http.get("/metrics").text
        return {name: float(value) for name, value in _METRIC_LINE.findall(text)}

    def pids(self) -> dict[str, list[int]]:
        assert self.broker is not None
        assert self.fleet is not None
        assert self.raw is not None
        broker = self.broker._process  # noqa: SLF001  (its pid, for /proc)
        groups = {
            "broker": [broker.pid] if broker is not None else [],
            "fleet": [self.fleet.pid, *child_pids(self.fleet.pid)],
            "raw_subscriber": [self.raw.pid],
            "bench": [os.getpid()],
        }
        if self.controller_running:
            assert self.controller is not None
            groups["controller"] = [self.controller.pid]
            groups["ingest_workers"] = child_pids(self.controller.pid)
        if self.publisher is not None:
            groups["publisher"] = [self.publisher.pid]
        if self.profiler is not None and self.profiler.process.poll() is None:
            groups["profiler"] = [self.profiler.process.pid]
        if self.kind == "postgresql":
            # The server's processes (this run's backends, and its checkpointer, autovacuum…).
            groups["postgresql"] = processes_named("postgres")
        return groups

    @property
    def controller_running(self) -> bool:
        return self.controller is not None and self.controller.process.poll() is None

    def cpu(self) -> dict[str, float]:
        snapshot = {name: cpu_of(pids) for name, pids in self.pids().items()}
        snapshot["machine"] = machine_busy_seconds()
        snapshot.update(kernel_seconds())
        return snapshot

    @staticmethod
    def cpu_cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
        """Cores used on average per process group. Of the machine's busy time, `softirq` is network
        work (our loopback traffic, mostly) charged to no process, `steal` went to other virtual machines,
        and `foreign` is what remains: other processes on this machine."""
        delta = {name: (after[name] - before.get(name, 0.0)) / seconds for name in after}
        ours = sum(value for name, value in delta.items() if name not in {"machine", *KERNEL_COLUMNS})
        rounded = {name: round(value, 2) for name, value in delta.items()}
        unexplained = delta["machine"] - ours - sum(delta[name] for name in KERNEL_COLUMNS)
        rounded["foreign"] = round(max(0.0, unexplained), 2)
        return rounded

    def wait_quiet(self) -> dict[str, float]:
        """Until the controller and the machine's other jobs each use < 0.15 core (at most --quiet-wait)."""
        started = time.monotonic()
        while True:
            before = self.cpu()
            time.sleep(1.0)
            cores = self.cpu_cores(before, self.cpu(), 1.0)
            waited = time.monotonic() - started
            if (cores["foreign"] < QUIET_CORES and cores.get("controller", 0.0) < QUIET_CORES) or (
                waited >= self.options.quiet_wait_s
            ):
                return {"waited_s": round(waited, 1), "foreign_cores": cores["foreign"]}

    def snapshot(self) -> dict[str, Any]:
        assert self.raw is not None
        assert self.stats is not None
        instant = time.time()
        raw_count, raw_at = self.raw.count()
        snapshot: dict[str, Any] = {"at": instant, "raw": (raw_count, raw_at)}
        if self.controller_running:
            assert self.controller is not None
            snapshot["metrics_at"] = time.time()
            snapshot["metrics"] = self.metrics()
            snapshot["threads"] = thread_cpu_seconds(self.controller.pid)
        snapshot["cpu"] = self.cpu()
        snapshot["cpu_at"] = time.time()
        snapshot["fleet"] = self.stats.after(instant)
        return snapshot

    # -- one step --------------------------------------------------------------------------------------

    def step(self, rate: int) -> dict[str, Any]:
        """Offers `rate` messages a second and measures a window once the rate has settled. Without the
        controller (the raw-ceiling phase) only the fleet, the broker and the raw subscriber count."""
        interval_s = len(self.addresses) / rate
        if self.publisher is not None:
            self.publisher.set_rate(rate)
            time.sleep(self.options.warmup_s)
        else:
            self.write_control(interval_s)
            # One interval for every sensor to take the new one up, then the warm-up proper.
            time.sleep(min(interval_s, 10.0) + self.options.warmup_s)
        with_controller = self.controller_running
        profiler = self.profiler = None
        if self.options.profile and with_controller:
            assert self.controller is not None
            # Where the telemetry is handled: the first ingest worker, or the controller without any.
            target = next(iter(child_pids(self.controller.pid)), self.controller.pid)
            profiler = self.profiler = Profiler(
                target, self.options.window_s, self.workdir / f"profile-{rate}.txt"
            )
        first = self.snapshot()
        samples = self.sample_window(with_controller)
        last = self.snapshot()
        raw_rate = slope(samples["raw"])
        cpu_span = last["cpu_at"] - first["cpu_at"]
        cores = self.cpu_cores(first["cpu"], last["cpu"], cpu_span)
        result: dict[str, Any] = {
            "target_rate": rate,
            "load": "fleet" if self.publisher is None else "publisher",
        }
        if self.publisher is None:
            fleet = fleet_rates(first["fleet"], last["fleet"])
            offered = fleet["published"]
            result.update(
                {
                    "sensor_interval_s": round(interval_s, 4),
                    "broker_acknowledged_rate": round(fleet["acknowledged"], 1),
                    "fleet_late_ticks_per_s": round(fleet["late"], 1),
                }
            )
        else:
            offered = slope(samples["published"])
            result["broker_acknowledged_rate"] = round(slope(samples["acknowledged"]), 1)
        result.update(
            {
                "window_s": round(cpu_span, 2),
                "offered_rate": round(offered, 1),
                "offered_fraction_of_target": round(offered / rate, 3),
                "raw_rate": round(raw_rate, 1),
                "raw_over_offered": round(raw_rate / offered, 3) if offered else None,
                "cpu_cores": cores,
                # CPU per message: what each part costs, whatever share of the machine it happened to get.
                "cpu_us_per_message": {
                    result["load"]: _per_message(cores[result["load"]], offered),
                    "broker": _per_message(cores["broker"], offered),
                    "raw_subscriber": _per_message(cores["raw_subscriber"], raw_rate),
                },
            }
        )
        if not with_controller:
            result["sustained"] = bool(offered and raw_rate >= self.options.sustain * offered)
            return result
        assert self.controller is not None
        m0, m1 = first["metrics"], last["metrics"]
        metrics_span = last["metrics_at"] - first["metrics_at"]

        def per_second(name: str) -> float:
            return (
                slope(samples[name])
                if name in samples
                else (m1.get(name, 0.0) - m0.get(name, 0.0)) / metrics_span
            )

        persisted = per_second(WRITTEN)
        dropped = m1.get(outcome("dropped"), 0.0) - m0.get(outcome("dropped"), 0.0)
        # Everything the fleet published so far that the controller has not stored yet: in flight, in
        # the broker's queue for the controller, in the driver's queue, or waiting for a batch.
        published_total = sum(line["published"] for line in last["fleet"].values())
        published_total += self.published_by_publishers
        if self.publisher is not None:
            published_total += int(samples["published"][-1][1])
        threads = {
            name: round((last["threads"][name] - first["threads"][name]) / cpu_span, 2)
            for name in last["threads"]
        }
        result["cpu_us_per_message"]["controller"] = _per_message(cores["controller"], persisted)
        result["cpu_us_per_message"]["ingest_workers"] = _per_message(
            cores.get("ingest_workers", 0.0), persisted
        )
        result["cpu_us_per_message"]["controller_and_workers"] = _per_message(
            cores["controller"] + cores.get("ingest_workers", 0.0), persisted
        )
        result["cpu_us_per_message"]["controller_event_loop"] = _per_message(
            threads["main_thread"], persisted
        )
        result["cpu_us_per_message"]["controller_other_threads"] = _per_message(
            threads["other_threads"], persisted
        )
        result.update(
            {
                "controller_received_rate": round(per_second(RECEIVED), 1),
                "accepted_rate": round(per_second(outcome("accepted")), 1),
                "persisted_rate": round(persisted, 1),
                "rejected": int(m1.get(outcome("rejected"), 0.0) - m0.get(outcome("rejected"), 0.0)),
                "dropped": int(dropped),
                "pending_start": int(m0.get(PENDING, 0.0)),
                "pending_end": int(m1.get(PENDING, 0.0)),
                "backlog_end": int(published_total - m1.get(WRITTEN, 0.0)),
                "persisted_over_offered": round(persisted / offered, 3) if offered else None,
                "ratio_persisted_over_raw": round(persisted / raw_rate, 3) if raw_rate else None,
                "controller_cores_by_thread": threads,
                "controller_rss_mib": memory_mib(self.controller.pid),
            }
        )
        result["sustained"] = bool(offered and persisted >= self.options.sustain * offered and not dropped)
        if profiler is not None:
            result["controller_profile"] = profiler.summary()
            self.profiler = None
        return result

    def sample_window(self, with_controller: bool) -> dict[str, list[tuple[float, float]]]:
        """(time, count) every SAMPLE_INTERVAL_S through the window: the raw subscriber's count and the
        controller's counters. The controller writes in batches (every 0.5 s or 5,000 readings), so a
        rate from two samples would be off by up to a batch; the slope of all of them is not."""
        assert self.raw is not None
        samples: dict[str, list[tuple[float, float]]] = {"raw": []}
        counters = (WRITTEN, RECEIVED, outcome("accepted")) if with_controller else ()
        deadline = time.monotonic() + self.options.window_s
        while True:
            count, at = self.raw.count()
            samples["raw"].append((at, count))
            if self.publisher is not None:
                published, acknowledged, published_at = self.publisher.count()
                samples.setdefault("published", []).append((published_at, published))
                samples.setdefault("acknowledged", []).append((published_at, acknowledged))
            if counters:
                metrics_at = time.time()
                metrics = self.metrics()
                for name in counters:
                    samples.setdefault(name, []).append((metrics_at, metrics.get(name, 0.0)))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return samples
            time.sleep(min(SAMPLE_INTERVAL_S, remaining))

    def step_up(self, label: str) -> list[dict[str, Any]]:
        """Every rate of --rates in turn, until one is not sustained (or the fleet cannot offer it)."""
        steps: list[dict[str, Any]] = []
        for rate in self.options.rates:
            result = self.step(rate)
            print(f"   {label} {rate:>6,}/s: {step_line(result)}", flush=True)
            if not result["sustained"] and result["cpu_cores"]["foreign"] > BUSY_FOREIGN_CORES:
                # Other jobs on the machine took a good share of it during the window: the step says more
                # about them than about us. Measured once more once they are gone (or --quiet-wait passed).
                self.idle_load()
                quiet = self.wait_quiet()
                retried = self.step(rate)
                retried["earlier_attempt"] = result
                retried["quiet_before_retry"] = quiet
                result = retried
                print(f"   {label} {rate:>6,}/s, again: {step_line(result)}", flush=True)
            steps.append(result)
            if not result["sustained"]:
                break
        return steps

    def idle_load(self) -> None:
        """Stops offering load (whichever source offers it) and lets the controller catch up."""
        if self.publisher is not None:
            self.publisher.set_rate(0)
        else:
            self.write_control(IDLE_INTERVAL_S)
        if self.controller_running:
            self.drain()

    def drain(self) -> dict[str, Any]:
        """Idles the fleet and waits (at most --drain) until the controller has stored what it received."""
        assert self.stats is not None
        self.write_control(IDLE_INTERVAL_S)
        started = time.monotonic()
        published: int = sum(line["published"] for line in self.stats.after(time.time()).values())
        published += self.published_by_publishers
        if self.publisher is not None:
            published += self.publisher.count()[0]

        def stored() -> bool:
            return self.metrics().get(WRITTEN, 0.0) >= published

        done = wait_until(stored, self.options.drain_s, interval=1.0)
        metrics = self.metrics()
        return {
            "published_total": published,
            "written_total": int(metrics.get(WRITTEN, 0.0)),
            "dropped_total": int(metrics.get(outcome("dropped"), 0.0)),
            "rejected_total": int(metrics.get(outcome("rejected"), 0.0)),
            "drained": done,
            "drain_s": round(time.monotonic() - started, 1),
        }

    def single_publisher(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The same steps with the fleet idle and one publisher connection sending the sensors' messages:
        the controller's ceiling when the load generator does not take most of the machine."""
        assert self.broker is not None
        self.write_control(IDLE_INTERVAL_S)
        self.publisher = Publisher(self.workdir, self.broker.port, self.controller_account, self.addresses)
        try:
            self.wait_quiet()
            steps = self.step_up(f"{self.kind} 1-pub")
            self.publisher.set_rate(0)
            self.published_by_publishers += self.publisher.count()[0]
        finally:
            self.publisher.close()
            self.publisher = None
        return steps, self.drain()

    def raw_ceiling(self) -> list[dict[str, Any]]:
        """The controller stopped: how far the fleet, the broker and the raw subscriber go on their own."""
        assert self.controller is not None
        assert self.broker is not None
        self.controller.stop(60)
        # The controller's persistent session would otherwise have the broker queue every message for it
        # (up to max_queued_messages, then drop them): work the raw subscriber alone must not pay for.
        wipe_session(self.broker.port, self.controller_account, CONTROLLER_CLIENT_ID)
        self.wait_quiet()
        steps = self.step_up("raw only")
        self.write_control(IDLE_INTERVAL_S)
        return steps

    def warnings(self) -> dict[str, list[str]]:
        pattern = re.compile(r"warning|error|drop", re.IGNORECASE)
        found = {}
        for name in ("controller.log", "fleet.log", "raw-subscriber.log", "mosquitto/mosquitto.log"):
            path = self.workdir / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                found[name] = [line[:300] for line in lines if pattern.search(line)][:20]
        return found


def processes_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
    return pids


# /proc/stat's cpu line: user nice system idle iowait irq softirq steal.
KERNEL_COLUMNS: Final = {"irq": 5, "softirq": 6, "steal": 7}


def kernel_seconds() -> dict[str, float]:
    """CPU seconds since boot, all cores, spent in interrupts, soft interrupts and stolen by the host."""
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return {name: int(values[column]) / CLOCK_TICKS for name, column in KERNEL_COLUMNS.items()}


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (time, count) points: a rate that batching does not skew."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_c = sum(c for _, c in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (c - mean_c) for t, c in points) / spread if spread else 0.0


def _per_message(cores: float, rate: float) -> float | None:
    return round(cores / rate * 1e6, 1) if rate > 0 else None


def step_line(result: dict[str, Any]) -> str:
    line = f"offered {result['offered_rate']:>8,.0f}  raw {result['raw_rate']:>8,.0f}"
    if "persisted_rate" in result:
        line += (
            f"  persisted {result['persisted_rate']:>8,.0f}  ratio {result['ratio_persisted_over_raw']}"
            f"  pending {result['pending_end']:,}  backlog {result['backlog_end']:,}"
        )
    verdict = "sustained" if result["sustained"] else "NOT sustained"
    return f"{line}  cores {result['cpu_cores']}  µs/msg {result['cpu_us_per_message']}  {verdict}"


# -- the controller's parts, in this process -----------------------------------------------------------


def component_costs(url: str, addresses: Sequence[str], batches: int = 3) -> dict[str, Any]:
    """What the controller's per-message steps cost on their own, on this database, with nothing else
    competing: decoding a telemetry message (drivers/mqtt_codec.py), taking a reading into the pipeline
    (range check, queue, counters), and writing a batch of 5,000 (one multi-row INSERT + the upsert of the
    latest values, in one transaction). The rows written here are deleted again."""
    settings = TelemetrySettings()
    count = min(len(addresses), 10_000)
    topics = [f"wardcast/v1/dev/{address}/telemetry" for address in addresses[:count]]
    payload = json.dumps(
        {
            "v": 1,
            "at": rfc3339(datetime.now(UTC)),
            "readings": [{"metric": METRIC, "value": 1.823, "unit": "m"}],
        }
    ).encode()
    started = time.perf_counter()
    for topic in topics:
        decode_inbound(topic, payload)
    decode_us = (time.perf_counter() - started) / count * 1e6
    engine = create_db_engine(url)
    try:
        pipeline = TelemetryPipeline(engine, SystemClock(), settings)
        pipeline.load()
        now = datetime.now(UTC)
        started = time.perf_counter()
        for address in addresses[:count]:
            pipeline.accept(address, METRIC, 1.5, "m", now)
        accept_us = (time.perf_counter() - started) / count * 1e6
        batch_size = settings.batch_size
        readings = [
            Reading(addresses[index % len(addresses)], METRIC, 1.5, "m", epoch_ms(now) + index)
            for index in range(batch_size * batches)
        ]
        write_wall, write_cpu = [], []
        for number in range(batches):
            batch = readings[number * batch_size : (number + 1) * batch_size]
            wall, cpu = time.perf_counter(), time.process_time()
            pipeline.store.write(batch, {})  # the writer's own cost, without its task around it
            write_wall.append((time.perf_counter() - wall) / batch_size * 1e6)
            write_cpu.append((time.process_time() - cpu) / batch_size * 1e6)
        with Session(engine) as session:
            session.execute(delete(TelemetryRow))
            session.execute(delete(TelemetryLatestRow))
            session.commit()
    finally:
        engine.dispose()
    return {
        "decode_inbound_us_per_message": round(decode_us, 1),
        "pipeline_accept_us_per_reading": round(accept_us, 1),
        "batch_size": batch_size,
        "write_us_per_reading_wall": [round(value, 1) for value in write_wall],
        "write_us_per_reading_cpu_of_this_process": [round(value, 1) for value in write_cpu],
        "writer_ceiling_per_s": round(1e6 / min(write_wall)),
    }


def run_database(kind: str, options: Options, *, raw_ceiling: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"wardcast-ingest-{kind}-"))
    print(f"\n== {kind}: {options.sensors:,} sensors in {options.processes} processes (work dir {workdir})")
    with contextlib.ExitStack() as stack:
        if not options.keep:
            stack.callback(shutil.rmtree, workdir, True)
        run = DatabaseRun(kind=kind, options=options, workdir=workdir, stack=stack)
        run.start()
        print(f"   set up: {run.setup}", flush=True)
        quiet = run.wait_quiet()
        steps = run.step_up(kind)
        drain = run.drain()
        single, single_drain = run.single_publisher() if options.single_publisher else (None, None)
        raw_only = run.raw_ceiling() if raw_ceiling else None
        sustained = [step for step in steps if step["sustained"]]
        best = max(sustained, key=lambda step: step["offered_rate"]) if sustained else None
        return {
            "database": kind,
            "sensors": options.sensors,
            "setup": run.setup,
            "quiet_before": quiet,
            "steps": steps,
            "highest_sustained": None
            if best is None
            else {
                "target_rate": best["target_rate"],
                "offered_rate": best["offered_rate"],
                "raw_rate": best["raw_rate"],
                "persisted_rate": best["persisted_rate"],
                "ratio_persisted_over_raw": best["ratio_persisted_over_raw"],
            },
            "after_last_step": drain,
            "single_publisher_steps": single,
            "after_single_publisher": single_drain,
            "raw_only_steps": raw_only,
            "log_warnings": run.warnings(),
        }


# -- output --------------------------------------------------------------------------------------------


def summary_table(results: list[dict[str, Any]]) -> str:
    header = ("database", "target/s", "offered/s", "raw/s", "persisted/s", "ratio", "pending", "sustained")
    rows: list[tuple[str, ...]] = [header]
    rows += [
        (
            label,
            f"{step['target_rate']:,}",
            f"{step['offered_rate']:,.0f}",
            f"{step['raw_rate']:,.0f}",
            f"{step['persisted_rate']:,.0f}" if "persisted_rate" in step else "—",
            f"{step.get('ratio_persisted_over_raw', '—')}",
            f"{step['pending_end']:,}" if "pending_end" in step else "—",
            "yes" if step["sustained"] else "no",
        )
        for database_result in results
        for label, steps in (
            (database_result["database"], database_result["steps"]),
            (f"{database_result['database']} 1-pub", database_result.get("single_publisher_steps") or []),
            ("raw only", database_result.get("raw_only_steps") or []),
        )
        for step in steps
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per database: the highest sustained step, the raw ceiling (the raw subscriber alone, controller
    stopped), their ratio, and the issue's goals (>= GOAL_RATE persisted a second, >= GOAL_RATIO × raw)."""
    raw_steps = [step for result in results for step in result.get("raw_only_steps") or []]
    # What the raw subscriber received, but no more than was offered: right after a step up it may still be
    # catching up on the broker's queue, which is no rate it could keep.
    raw_ceiling = max(
        (min(step["raw_rate"], step["offered_rate"]) for step in raw_steps if step["sustained"]), default=None
    )
    summary: dict[str, Any] = {
        "raw_ceiling_per_s": raw_ceiling,
        # False when every raw-only step held: the ceiling is then only a lower bound.
        "raw_ceiling_reached": any(not step["sustained"] for step in raw_steps),
        "databases": {},
    }
    for result in results:
        best = result["highest_sustained"]
        # No more than was offered: a step may still be storing the backlog of the step before it.
        persisted = min(best["persisted_rate"], best["offered_rate"]) if best else 0.0
        ceiling_ratio = round(persisted / raw_ceiling, 3) if raw_ceiling else None
        single = [step for step in result.get("single_publisher_steps") or [] if step["sustained"]]
        summary["databases"][result["database"]] = {
            "highest_sustained_persisted_per_s": persisted,
            "single_publisher_highest_sustained_per_s": max(
                (min(step["persisted_rate"], step["offered_rate"]) for step in single), default=None
            ),
            "same_window_ratio_persisted_over_raw": best["ratio_persisted_over_raw"] if best else None,
            "ratio_to_raw_ceiling": ceiling_ratio,
            "goal_rate_met": persisted >= GOAL_RATE,
            "goal_ratio_met": ceiling_ratio is not None and ceiling_ratio >= GOAL_RATIO,
        }
    return summary


def parse_arguments(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--databases", default="sqlite,postgresql", help="sqlite and/or postgresql")
    parser.add_argument(
        "--sensors", type=int, default=10_000, help="simulated MQTT sensors (default: 10,000)"
    )
    parser.add_argument("--processes", type=int, default=4, help="fleet processes (default: 4)")
    parser.add_argument(
        "--rates",
        default=",".join(str(rate) for rate in DEFAULT_RATES),
        help="offered messages a second, stepped up in this order (default: %(default)s)",
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after a step's first interval")
    parser.add_argument("--window", type=float, default=15.0, help="measured seconds per step")
    parser.add_argument(
        "--sustain", type=float, default=0.95, help="a step holds if persisted >= this × offered"
    )
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="longest wait for an idle machine")
    parser.add_argument("--drain", type=float, default=60.0, help="longest wait for the backlog at the end")
    parser.add_argument(
        "--controller-log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--ingest-workers",
        type=int,
        default=1,
        help="the controller's telemetry.ingest_workers (default: 1, as config.yaml; 0 = in its process)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample the controller with py-spy in every window (diagnosis)"
    )
    parser.add_argument(
        "--single-publisher",
        action="store_true",
        help="also step the same messages from one publisher connection, the fleet idle: the controller's "
        "ceiling when the load generator costs little",
    )
    parser.add_argument(
        "--no-raw-ceiling",
        dest="raw_ceiling",
        action="store_false",
        help="skip the last phase: the controller stopped, the same steps for the raw subscriber alone",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directories (logs, SQLite, profiles)"
    )
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/ingest-<UTC>.json)")
    arguments = parser.parse_args(argv)
    databases = [name.strip() for name in arguments.databases.split(",") if name.strip()]
    rates = [int(rate) for rate in arguments.rates.split(",") if rate.strip()]
    if not databases or set(databases) - {"sqlite", "postgresql"}:
        parser.error("--databases takes sqlite and/or postgresql")
    if arguments.sensors < 1 or arguments.processes < 1 or not rates or min(rates) < 1:
        parser.error("--sensors, --processes and every rate must be at least 1")
    if not (arguments.window > 0 and arguments.warmup >= 0 and 0 < arguments.sustain <= 1):
        parser.error("--window must be > 0, --warmup >= 0 and --sustain in (0, 1]")
    return Options(
        databases=databases,
        sensors=arguments.sensors,
        processes=arguments.processes,
        rates=sorted(rates),
        warmup_s=arguments.warmup,
        window_s=arguments.window,
        sustain=arguments.sustain,
        quiet_wait_s=arguments.quiet_wait,
        drain_s=arguments.drain,
        controller_log_level=arguments.controller_log_level,
        ingest_workers=arguments.ingest_workers,
        profile=arguments.profile,
        raw_ceiling=arguments.raw_ceiling,
        single_publisher=arguments.single_publisher,
        keep=arguments.keep,
        output=arguments.output,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    started = datetime.now(UTC)
    output = options.output or RESULTS_DIR / f"ingest-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    document: dict[str, Any] = {
        "benchmark": "ingest",
        "issue": 5,
        "started_at": rfc3339(started),
        "machine": machine_info(),
        "parameters": {
            "databases": options.databases,
            "sensors": options.sensors,
            "fleet_processes": options.processes,
            "rates": options.rates,
            "warmup_s": options.warmup_s,
            "window_s": options.window_s,
            "sustain_fraction": options.sustain,
            "readings_per_message": 1,
            "metric": METRIC,
            "fleet_protocol": "3.1.1",
            "controller_protocol": "5",
            "raw_subscriber_protocol": "5",
            "qos": 1,
            "controller_log_level": options.controller_log_level,
            "ingest_workers": options.ingest_workers,
            "controller_profiled": options.profile,
            "host": HOST,
        },
        "databases": [],
    }
    with sigterm_as_interrupt():
        try:
            for index, kind in enumerate(options.databases):
                # With the first database: before any PostgreSQL run leaves its server busy (autovacuum).
                first = index == 0
                document["databases"].append(
                    run_database(kind, options, raw_ceiling=first and options.raw_ceiling)
                )
        except KeyboardInterrupt:
            print("\ninterrupted; everything started has been stopped", file=sys.stderr)
            return 130
        except (BenchError, httpx.HTTPError, OSError, psycopg.Error) as error:
            print(f"\nbenchmark failed: {error!r}; everything started has been stopped", file=sys.stderr)
            document["failed"] = repr(error)[:2000]
            partial = output.with_name(output.stem + "-partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
            print(f"what was measured before the failure: {partial}", file=sys.stderr)
            return 1
    document["finished_at"] = rfc3339(datetime.now(UTC))
    document["verdict"] = verdict(document["databases"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print()
    print(summary_table(document["databases"]))
    print(json.dumps(document["verdict"], indent=2))
    print(f"results: {output.relative_to(REPO) if output.is_relative_to(REPO) else output}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw-worker"]:
        sys.exit(raw_worker_main())
    if sys.argv[1:2] == ["--publisher-worker"]:
        sys.exit(publisher_worker_main())
    sys.exit(main())
