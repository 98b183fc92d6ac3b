"""Issue 3 benchmark: firing jitter of 10,000 recurring schedules, the conflict check, a ward's week.

    .venv/bin/python bench/scheduler.py                          # the full run (about 15 minutes)
    .venv/bin/python bench/scheduler.py --inprocess-only         # only ScheduleService, no servers
    .venv/bin/python bench/scheduler.py --database postgresql    # the same on a local PostgreSQL

The city: `--wards` wards × `--groups` residential groups × `--speakers` speakers (default 20 × 50 × 10 =
10,000 speakers), `--per-group` schedules per group (default 10, so 500 per ward and 10,000 in all). In
each group the even-numbered schedules target the group, the odd ones 1–3 of its speakers; every third is
FREQ=WEEKLY (three weekdays, today's among them), the others FREQ=DAILY. No two schedules of a group overlap,
so every create is accepted.

in-process  ScheduleService on a fresh database of its own, no server: all schedules but the last
            `--inprocess-creates` are inserted in bulk (same rows as the API would store), those are created
            through ScheduleService.create (timed), then the conflict checks and the ward's week (below).
API         on 127.0.0.1 only, in a temporary directory: Mosquitto (the managed broker's code), the
            controller (`python -m controller serve`, SQLite or PostgreSQL, JSON logs), the city imported,
            the speakers registered one request each, a simulated fleet (`python -m firmware_sim fleet
            --shared-media-cache`). Then:
  create    every schedule through POST /api/v1/schedules (timed, `--create-concurrency` in flight);
  conflict  POST /api/v1/schedules for a new schedule in ward 1 (500 schedules), aimed at the whole ward or
            at one group, at a free time (201, deleted again) or at a taken one (409); wall time per call;
  programme GET /api/v1/areas/{ward}/programme for one week;
  probes    `--probes` schedules planned one per second on an otherwise idle controller: planned instant →
            broadcast accepted (the runner's `occurrence fired` log line; its histogram on /metrics) and
            → `sent` (GET /api/v1/broadcasts/{id}: broker accepted the command);
  full      the other schedules planned within `--spread` seconds (10,000 in 120 s by default); the same
            figures, observed until `--drain` seconds after the last planned instant, then the
            controller is stopped and the `sent` stamps are read from its database.
Everything started is stopped on the way out, Ctrl-C included; every wait is bounded. Results:
bench/results/scheduler-<UTC>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import httpx
import psycopg
from common import (
    HOST,
    REPO,
    RESULTS_DIR,
    BenchError,
    LineProcess,
    child_pids,
    clean_env,
    cpu_of,
    create_admin_key,
    machine_busy_seconds,
    machine_info,
    memory_mib,
    percentile,
    rfc3339,
    rounded,
    sigterm_as_interrupt,
    wait_until,
    wav_bytes,
)
from sqlalchemy import text
from sqlmodel import Session

from controller.broker import BrokerAccount, ManagedMosquitto, free_tcp_port
from controller.domain.planner import Targets
from controller.domain.priority import Priority, PriorityClass
from controller.services.auth import Principal, Role
from controller.services.device_programmes import DeviceProgrammes
from controller.services.errors import ServiceError
from controller.services.schedules import ScheduleService, ScheduleSpec, _row_values, schedule_time
from controller.settings import SchedulesSettings
from controller.store.db import create_db_engine, migrate
from controller.store.models import AreaRow, DeviceRow, MediaRow, ScheduleRow
from firmware_sim.fleet import split_evenly
from schedules.conflicts import Resolution
from schedules.runtime import OccurrenceScheduler

ZONE_NAME: Final = "Asia/Ho_Chi_Minh"
ZONE: Final = ZoneInfo(ZONE_NAME)
CITY: Final = "sc"
AUDIO_S: Final = 2.0  # every schedule plays this clip once: a 2 s interval in the conflict check
WEEKDAYS: Final = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
GOAL_FIRING_P99_S: Final = 0.100
GOAL_CONFLICT_S: Final = 0.050
POSTGRES_ADMIN_DSN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"


# -- the city and its programme ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    wards: int
    groups: int  # per ward
    speakers: int  # per group
    per_group: int  # schedules per group

    @property
    def group_count(self) -> int:
        return self.wards * self.groups

    @property
    def schedule_count(self) -> int:
        return self.group_count * self.per_group

    def ward(self, w: int) -> str:
        return f"{CITY}.w{w:02d}"

    def group(self, index: int) -> str:
        w, g = divmod(index, self.groups)
        return f"{self.ward(w)}.t{g:02d}"

    def speaker(self, index: int, s: int) -> str:
        return f"spk-{index:04d}-{s:02d}"

    def speakers_of(self, index: int) -> list[str]:
        return [self.speaker(index, s) for s in range(self.speakers)]

    def all_speakers(self) -> list[tuple[str, str]]:
        """(device id, group code) of every speaker, group after group."""
        return [(d, self.group(i)) for i in range(self.group_count) for d in self.speakers_of(i)]

    def areas_yaml(self) -> str:
        lines = ["areas:", f"  - {{code: {CITY}, name: Thành phố Bench, kind: city, children: ["]
        wards = []
        for w in range(self.wards):
            groups = ", ".join(
                f"{{code: {self.group(w * self.groups + g)}, name: Tổ {g + 1}, kind: group}}"
                for g in range(self.groups)
            )
            wards.append(f"{{code: {self.ward(w)}, name: Phường {w + 1}, kind: ward, children: [{groups}]}}")
        lines.append("      " + ",\n      ".join(wards))
        lines.append("    ]}")
        return "\n".join(lines)

    def targets(self, index: int, k: int) -> dict[str, list[str]]:
        """Even k: the whole group; odd k: 1, 2 or 3 of its speakers, different ones for each k."""
        if k % 2 == 0:
            return {"areas": [self.group(index)], "devices": []}
        sizes = [1 + j % 3 for j in range(k // 2 + 1)]
        first = sum(sizes[:-1])
        chosen = [(first + n) % self.speakers for n in range(sizes[-1])]
        return {"areas": [], "devices": [self.speaker(index, s) for s in sorted(set(chosen))]}


def local_text(moment: datetime) -> str:
    return moment.astimezone(ZONE).replace(tzinfo=None).isoformat()


def schedule_body(
    name: str, targets: dict[str, list[str]], media_id: str, at: datetime, weekly: bool
) -> dict[str, Any]:
    """An API body: FREQ=DAILY, or FREQ=WEEKLY on three weekdays of which `at`'s is one."""
    weekday = at.astimezone(ZONE).weekday()
    rule = (
        "FREQ=WEEKLY;BYDAY=" + ",".join(WEEKDAYS[(weekday + d) % 7] for d in (0, 2, 4))
        if weekly
        else "FREQ=DAILY"
    )
    return {
        "name": name,
        "targets": targets,
        "content": {"media_ids": [media_id]},
        "dtstart": local_text(at),
        "rrule": rule,
        "timezone": ZONE_NAME,
    }


@dataclass(frozen=True)
class Planned:
    body: dict[str, Any]
    window: str  # "probe", "full" or "later"
    at: datetime  # the first planned instant (UTC)


def programme(
    layout: Layout, media_id: str, *, anchor: datetime, probes: int, full_start_s: float, spread_s: int
) -> list[Planned]:
    """Every schedule of the city. Probe i (the first schedule of every (groups/probes)-th group) is planned
    at anchor + i s; the others at anchor + full_start_s + (7 × group + k × spread/per_group) mod spread, so
    that each group's schedules are spread/per_group seconds apart and the city's evenly over the spread."""
    step = max(1, layout.group_count // probes) if probes else 0
    probe_groups = {i * step: i for i in range(probes)} if probes else {}
    slot = spread_s // layout.per_group
    plans = []
    for index in range(layout.group_count):
        for k in range(layout.per_group):
            if k == 0 and index in probe_groups:
                at, window = anchor + timedelta(seconds=probe_groups[index]), "probe"
            else:
                offset = (7 * index + k * slot) % spread_s
                at, window = anchor + timedelta(seconds=full_start_s + offset), "full"
            name = f"{layout.group(index)} #{k}"
            body = schedule_body(name, layout.targets(index, k), media_id, at, weekly=k % 3 == 0)
            plans.append(Planned(body, window, at))
    return plans


@dataclass(frozen=True)
class Candidate:
    label: str
    targets: dict[str, list[str]]
    at: datetime
    expect: int


def candidates(layout: Layout, plans: Sequence[Planned], free_at: datetime) -> list[Candidate]:
    """New schedules for ward 1: aimed at the ward or at its second group, at a free or a taken time."""
    group = layout.group(1)
    taken = next(p.at for p in plans if p.body["targets"]["areas"] == [group] and p.window == "full")
    return [
        Candidate("ward, free time (201)", {"areas": [layout.ward(0)], "devices": []}, free_at, 201),
        Candidate("ward, taken time (409)", {"areas": [layout.ward(0)], "devices": []}, taken, 409),
        Candidate("group, free time (201)", {"areas": [group], "devices": []}, free_at, 201),
        Candidate("group, taken time (409)", {"areas": [group], "devices": []}, taken, 409),
    ]


def candidate_body(candidate: Candidate, media_id: str, n: int) -> dict[str, Any]:
    return schedule_body(f"conflict check {n}", candidate.targets, media_id, candidate.at, weekly=False)


def week_window(anchor: datetime) -> tuple[str, str]:
    start = anchor.astimezone(ZONE).replace(hour=0, minute=0, second=0, microsecond=0)
    return start.isoformat(), (start + timedelta(days=7)).isoformat()


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_s": rounded(percentile(values, 50)),
        "p90_s": rounded(percentile(values, 90)),
        "p99_s": rounded(percentile(values, 99)),
        "max_s": rounded(max(values) if values else None),
        "mean_s": rounded(statistics.fmean(values) if values else None),
    }


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


# -- databases -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str, workdir: Path, name: str) -> Iterator[str]:
    """A fresh database URL: a SQLite file in `workdir`, or a new database on the local PostgreSQL."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'{name}.db'}"
        return
    db_name = f"wardcast_bench_{name}_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{db_name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


# -- in-process: ScheduleService alone -----------------------------------------------------------------


def spec_of(body: dict[str, Any]) -> ScheduleSpec:
    return ScheduleSpec(
        name=body["name"],
        targets=Targets(areas=tuple(body["targets"]["areas"]), devices=tuple(body["targets"]["devices"])),
        media_ids=tuple(body["content"]["media_ids"]),
        priority=Priority(PriorityClass.NORMAL, 0),
        repeats=1,
        gap_s=0.0,
        max_duration_s=1800.0,
        dtstart=body["dtstart"],
        rrule=body["rrule"],
        exdates=(),
        timezone=body["timezone"],
    )


def scheduler_alone(count: int, spread_s: int) -> dict[str, Any]:
    """OccurrenceScheduler (the runner's APScheduler wrapper) alone: `count` jobs at whole seconds over
    `spread_s`, as the runner plans them, and a callback that only notes how late it started, and how
    late it is after one hop to a worker thread (the runner's first step)."""

    async def run() -> dict[str, list[float]]:
        started: list[float] = []
        after_hop: list[float] = []
        done = asyncio.Event()

        async def fire(_schedule_id: str, planned_at: datetime) -> None:
            started.append((datetime.now(UTC) - planned_at).total_seconds())
            await asyncio.to_thread(lambda: None)
            after_hop.append((datetime.now(UTC) - planned_at).total_seconds())
            if len(after_hop) == count:
                done.set()

        scheduler = OccurrenceScheduler(fire)
        scheduler.start()
        try:
            first = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
            for i in range(count):
                scheduler.plan(f"job-{i}", first + timedelta(seconds=(7 * i) % spread_s))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=spread_s + 60)
        finally:
            scheduler.shutdown()
        return {"started": started, "after_thread_hop": after_hop}

    lateness = asyncio.run(run())
    return {
        "jobs": count,
        "spread_s": spread_s,
        "planned_to_callback": summary(lateness["started"]),
        "planned_to_after_thread_hop": summary(lateness["after_thread_hop"]),
    }


def inprocess_phase(options: Options, url: str) -> dict[str, Any]:
    """ScheduleService.create and .programme timed in this process, on a database of their own."""
    layout = options.layout
    engine = create_db_engine(url)
    migrate(engine)
    now = datetime.now(UTC)
    media_id = str(uuid.uuid4())
    with Session(engine) as session:
        session.add(AreaRow(code=CITY, name="Thành phố Bench", kind="city"))
        for w in range(layout.wards):
            session.add(AreaRow(code=layout.ward(w), name=f"Phường {w + 1}", kind="ward", parent_code=CITY))
        for index in range(layout.group_count):
            parent = layout.ward(index // layout.groups)
            session.add(
                AreaRow(code=layout.group(index), name=f"Tổ {index}", kind="group", parent_code=parent)
            )
        session.commit()
        for device_id, group in layout.all_speakers():
            session.add(
                DeviceRow(
                    id=device_id,
                    kind="speaker",
                    area_code=group,
                    transport="mqtt",
                    address=device_id,
                    created_at=now,
                )
            )
        session.add(
            MediaRow(
                id=media_id,
                sha256=secrets.token_hex(32),
                content_type="audio/wav",
                format="wav",
                duration_s=AUDIO_S,
                size_bytes=1,
                created_at=now,
            )
        )
        session.commit()
    anchor = (now + timedelta(hours=1)).replace(microsecond=0)
    plans = programme(layout, media_id, anchor=anchor, probes=0, full_start_s=0, spread_s=options.spread_s)
    # Ward 1 last, so that the timed creates are its last schedules (it holds `per ward` at the end).
    ward0 = layout.groups * layout.per_group
    ordered = plans[ward0:] + plans[:ward0]
    bulk, created = (
        ordered[: len(ordered) - options.inprocess_creates],
        ordered[len(ordered) - options.inprocess_creates :],
    )
    started = time.perf_counter()
    with Session(engine) as session:
        for plan in bulk:
            spec = spec_of(plan.body)
            session.add(
                ScheduleRow(
                    id=str(uuid.uuid4()),
                    created_by="bench",
                    created_at=now,
                    updated_at=now,
                    **_row_values(spec, schedule_time(spec)),
                )
            )
        session.commit()
    bulk_s = time.perf_counter() - started
    service = ScheduleService(engine, SchedulesSettings(), now=lambda: datetime.now(UTC))
    admin = Principal(key_id="bench", name="bench", role=Role.ADMIN, ward_code=None)
    create_times = []
    for plan in created:
        seconds, _ = timed(lambda plan=plan: service.create(spec_of(plan.body), admin, Resolution.NONE))  # type: ignore[misc]
        create_times.append(seconds)
    print(f"   in-process: {len(bulk):,} bulk-inserted in {bulk_s:.1f} s, {len(created)} created", flush=True)
    checks = {}
    for n, candidate in enumerate(candidates(layout, plans, anchor + timedelta(hours=6))):
        spec = spec_of(candidate_body(candidate, media_id, n))
        times, outcomes = [], []
        for _ in range(options.repeat):
            call_started = time.perf_counter()
            try:
                result = service.create(spec, admin, Resolution.NONE)
            except ServiceError as error:
                times.append(time.perf_counter() - call_started)
                outcomes.append(error.status)
                continue
            times.append(time.perf_counter() - call_started)
            outcomes.append(201)
            service.delete(result["id"], admin)
        checks[candidate.label] = {
            "outcomes": sorted(set(outcomes)),
            "expected": candidate.expect,
            **summary(times),
        }
        print(
            f"   in-process conflict check, {candidate.label}: p50 {percentile(times, 50):.4f} s", flush=True
        )
    start, end = (datetime.fromisoformat(t) for t in week_window(anchor))
    week_times, items = [], 0
    for _ in range(options.repeat):
        seconds, result = timed(lambda: service.programme(layout.ward(0), start, end, admin))
        week_times.append(seconds)
        items = len(result)
    device_programmes = programme_build(engine, anchor - timedelta(hours=1), repeat=3)
    engine.dispose()
    alone = scheduler_alone(layout.schedule_count, options.spread_s)
    print(
        f"   OccurrenceScheduler alone, {alone['jobs']:,} jobs in {alone['spread_s']} s: "
        f"planned → callback p99 {alone['planned_to_callback']['p99_s']} s",
        flush=True,
    )
    return {
        "scheduler_alone": alone,
        "bulk_inserted": len(bulk),
        "bulk_insert_s": round(bulk_s, 2),
        "created": summary(create_times),
        "conflict_check": checks,
        "programme_week": {"ward": layout.ward(0), "items": items, **summary(week_times)},
        "device_programmes": device_programmes,
    }


def programme_build(engine: Any, now: datetime, *, repeat: int) -> dict[str, Any]:
    """Every speaker's cached programme (docs/protocol.md §1.10) rebuilt from the database, as the
    controller does after changes and every refresh; JSON size of what would be published."""

    async def never_published(_address: str, _document: Any) -> None:
        raise AssertionError("build only")

    class FixedClock:
        def now(self) -> datetime:
            return now

    builder = DeviceProgrammes(
        engine,
        SchedulesSettings(),
        FixedClock(),
        media_base_url="http://127.0.0.1:8080",
        publish=never_published,
    )
    times: list[float] = []
    built: list[Any] = []
    for _ in range(repeat):
        seconds, built = timed(lambda: builder.build(now))
        times.append(seconds)
    sizes = [len(json.dumps(p.document)) for p in built if p.document is not None]
    items = sum(len(p.document["items"]) for p in built if p.document is not None)
    print(f"   device programmes: {len(built):,} built in {percentile(times, 50):.2f} s", flush=True)
    return {
        "devices": len(built),
        "items": items,
        "document_bytes_p50": int(percentile(sizes, 50)) if sizes else 0,
        "document_bytes_max": max(sizes, default=0),
        **summary(times),
    }


# -- the controller, its broker and its fleet ----------------------------------------------------------


@dataclass
class Options:
    layout: Layout
    database: str
    spread_s: int
    probes: int
    gap_s: int
    create_budget_s: float
    create_concurrency: int
    register_concurrency: int
    drain_s: float
    repeat: int
    inprocess_creates: int
    inprocess: bool
    api: bool
    processes: int
    speed: float
    keep: bool
    output: Path | None


class LogFollower:
    """The controller's JSON log lines (stderr), read incrementally; other lines are skipped."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        if not self._path.exists():
            return self.events
        with self._path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            if line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))
        return self.events

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.poll() if e.get("event") == event]


@dataclass
class Stack:
    """Broker, controller and fleet of one API run; `stack` stops them in reverse order of start."""

    options: Options
    workdir: Path
    database_url: str
    stack: contextlib.ExitStack
    broker: ManagedMosquitto | None = None
    controller: LineProcess | None = None
    fleet: LineProcess | None = None
    http_port: int = 0
    token: str = ""
    media_id: str = ""
    setup: dict[str, Any] = field(default_factory=dict)
    controller_account: BrokerAccount = field(
        default_factory=lambda: BrokerAccount("controller", secrets.token_urlsafe(16))
    )
    device_account: BrokerAccount = field(
        default_factory=lambda: BrokerAccount("device", secrets.token_urlsafe(16))
    )

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def log(self) -> Path:
        return self.workdir / "controller.log"

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120
        )

    def command_key(self) -> str:
        """The controller's public command key, which the simulated speakers verify with."""
        with self.client() as client:
            response = client.get("/api/v1/command-key")
        response.raise_for_status()
        key: str = response.json()["public_key"]
        return key

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120
        )

    def env(self) -> dict[str, str]:
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
                "WARDCAST_MQTT__CLIENT_ID": "wardcast-bench-scheduler",
                "WARDCAST_MEDIA__DIR": str(self.workdir / "media"),
                "WARDCAST_DATA_DIR": str(self.workdir),
                "WARDCAST_LOGGING__LEVEL": "info",
                "WARDCAST_LOGGING__FORMAT": "json",
                "WARDCAST_TIMEZONE": ZONE_NAME,
            }
        )
        return env

    def pids(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        if self.controller is not None and self.controller.process.poll() is None:
            groups["controller"] = [self.controller.pid]
        if self.broker is not None and self.broker._process is not None:  # noqa: SLF001  (its pid, for /proc)
            groups["broker"] = [self.broker._process.pid]  # noqa: SLF001
        if self.fleet is not None:
            groups["fleet"] = [self.fleet.pid, *child_pids(self.fleet.pid)]
        return groups

    def cpu(self) -> dict[str, float]:
        snapshot = {name: cpu_of(pids) for name, pids in self.pids().items()}
        snapshot["machine"] = machine_busy_seconds()
        return snapshot

    @staticmethod
    def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """CPU seconds per process group between two snapshots; `foreign`: everything else on the machine."""
        delta = {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
        ours = sum(value for name, value in delta.items() if name != "machine")
        delta["foreign"] = round(max(0.0, delta["machine"] - ours), 2)
        return delta

    def start(self) -> None:
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
        self.http_port = free_tcp_port(HOST)
        self.controller = LineProcess(
            [sys.executable, "-m", "controller", "serve"],
            env=self.env(),
            log_path=self.log,
            what="the controller",
        )
        self.stack.callback(self.stop_controller)
        self.controller.expect("READY", 90)
        self.token = create_admin_key(self.env())

    def stop_controller(self) -> None:
        if self.controller is not None:
            self.controller.stop(60)

    def seed(self) -> None:
        layout = self.options.layout
        with self.client() as client:
            response = client.post(
                "/api/v1/areas/import",
                content=layout.areas_yaml().encode(),
                headers={"Content-Type": "application/yaml"},
            )
            if response.status_code != 200:
                raise BenchError(f"area import failed: {response.status_code} {response.text}")
            response = client.post("/api/v1/media", files={"file": ("bench.wav", wav_bytes(AUDIO_S))})
            if response.status_code not in {200, 201}:
                raise BenchError(f"media upload failed: {response.status_code} {response.text}")
            self.media_id = response.json()["id"]
        started = time.monotonic()
        asyncio.run(self._register())
        self.setup["register_s"] = round(time.monotonic() - started, 1)

    async def _register(self) -> None:
        gate = asyncio.Semaphore(self.options.register_concurrency)
        async with self.async_client() as client:

            async def one(device_id: str, group: str) -> None:
                body = {"id": device_id, "kind": "speaker", "area": group, "address": device_id}
                async with gate:
                    response = await client.post("/api/v1/devices", json=body)
                if response.status_code != 201:
                    raise BenchError(f"registering {device_id}: {response.status_code} {response.text}")

            await asyncio.gather(*(one(d, g) for d, g in self.options.layout.all_speakers()))

    def start_fleet(self) -> None:
        assert self.broker is not None
        addresses = [d for d, _ in self.options.layout.all_speakers()]
        csv_path = self.workdir / "fleet.csv"
        csv_path.write_text("address,kind\n" + "".join(f"{a},speaker\n" for a in addresses))
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
                "--speed",
                str(self.options.speed),
                "--processes",
                str(self.options.processes),
                "--shared-media-cache",
                # The speakers play only what the controller signed (docs/protocol.md §1.15).
                "--command-key",
                self.command_key(),
            ],
            env=clean_env(),
            log_path=self.workdir / "fleet.log",
            what="the simulated fleet",
        )
        self.stack.callback(self.fleet.stop, 90)
        self.fleet.expect("READY", max(120, len(addresses) / 20))
        self.setup["fleet_connect_s"] = round(time.monotonic() - started, 1)
        with self.client() as client:

            def all_online() -> bool:
                return len(client.get("/api/v1/devices", params={"online": "true"}).json()) >= len(addresses)

            if not wait_until(all_online, timeout=180, interval=2.0):
                raise BenchError("the controller never saw every speaker online")
            # One play per fleet process, so that each has fetched and verified the clip once.
            firsts = [chunk[0] for chunk in split_evenly(addresses, self.options.processes)]
            response = client.post(
                "/api/v1/broadcasts",
                json={"targets": {"devices": firsts}, "content": {"media_id": self.media_id}},
            )
            if response.status_code != 201:
                raise BenchError(f"warm-up broadcast refused: {response.status_code} {response.text}")
            broadcast_id = response.json()["id"]

            def warm() -> bool:
                counts: dict[str, int] = client.get(f"/api/v1/broadcasts/{broadcast_id}").json()["counts"]
                return counts.get("completed", 0) >= len(firsts)

            if not wait_until(warm, timeout=60, interval=0.5):
                raise BenchError("warm-up broadcast did not complete")
        self.setup["online_and_warm_s"] = round(time.monotonic() - started, 1)

    def firing_histogram(self) -> dict[str, float]:
        with self.client() as client:
            lines = client.get("/metrics").text.splitlines()
        buckets = {}
        for line in lines:
            if line.startswith("wardcast_schedule_firing_delay_seconds_bucket"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[bound] = float(line.rsplit(" ", 1)[1])
        return buckets


# -- API phases ----------------------------------------------------------------------------------------


async def create_all(run: Stack, plans: Sequence[Planned]) -> tuple[list[float], dict[str, Planned]]:
    """POST every schedule, `--create-concurrency` in flight; the wall time of each call, in plan order."""
    gate = asyncio.Semaphore(run.options.create_concurrency)
    times = [0.0] * len(plans)
    by_id: dict[str, Planned] = {}
    async with run.async_client() as client:

        async def one(index: int, plan: Planned) -> None:
            async with gate:
                started = time.perf_counter()
                response = await client.post("/api/v1/schedules", json=plan.body)
                times[index] = time.perf_counter() - started
            if response.status_code != 201:
                raise BenchError(
                    f"schedule {plan.body['name']}: {response.status_code} {response.text[:500]}"
                )
            by_id[response.json()["id"]] = plan

        await asyncio.gather(*(one(i, p) for i, p in enumerate(plans)))
    return times, by_id


def api_conflict_checks(run: Stack, plans: Sequence[Planned], free_at: datetime) -> dict[str, Any]:
    results = {}
    with run.client() as client:
        for n, candidate in enumerate(candidates(run.options.layout, plans, free_at)):
            body = candidate_body(candidate, run.media_id, n)
            times, statuses, clashes = [], set(), 0
            for _ in range(run.options.repeat):
                seconds, response = timed(lambda body=body: client.post("/api/v1/schedules", json=body))  # type: ignore[misc]
                times.append(seconds)
                statuses.add(response.status_code)
                if response.status_code == 201:
                    client.delete(f"/api/v1/schedules/{response.json()['id']}")
                elif response.status_code == 409:
                    clashes = len(response.json().get("clashes", []))
            results[candidate.label] = {
                "statuses": sorted(statuses),
                "expected": candidate.expect,
                "clashes_listed": clashes,
                **summary(times),
            }
            print(
                f"   conflict check, {candidate.label}: p50 {percentile(times, 50):.4f} s {sorted(statuses)}",
                flush=True,
            )
    return results


def api_baseline(run: Stack, schedule_id: str) -> dict[str, Any]:
    """GET /api/v1/schedules/{id}: what any authenticated call costs (key check, a worker thread, JSON)."""
    with run.client() as client:
        times = [
            timed(lambda: client.get(f"/api/v1/schedules/{schedule_id}"))[0]
            for _ in range(run.options.repeat)
        ]
    return summary(times)


def api_programme(run: Stack, anchor: datetime) -> dict[str, Any]:
    start, end = week_window(anchor)
    ward = run.options.layout.ward(0)
    times, items, size = [], 0, 0
    with run.client() as client:
        for _ in range(run.options.repeat):
            seconds, response = timed(
                lambda: client.get(f"/api/v1/areas/{ward}/programme", params={"start": start, "end": end})
            )
            if response.status_code != 200:
                raise BenchError(f"programme: {response.status_code} {response.text[:300]}")
            times.append(seconds)
            items, size = len(response.json()), len(response.content)
    return {"ward": ward, "start": start, "end": end, "items": items, "bytes": size, **summary(times)}


def fired_events(log: LogFollower, ids: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    fired = [e for e in log.named("occurrence fired") if e.get("schedule_id") in ids]
    failed = [e for e in log.named("occurrence could not fire") if e.get("schedule_id") in ids]
    return fired, failed


def accept_delays(fired: Sequence[dict[str, Any]]) -> list[float]:
    """Planned instant → the runner's log line, written right after the broadcast was accepted."""
    return [
        (datetime.fromisoformat(e["timestamp"]) - datetime.fromisoformat(e["planned_at"])).total_seconds()
        for e in fired
    ]


def sent_delays(planned: dict[str, datetime], sent: dict[str, list[datetime]]) -> dict[str, Any]:
    """planned → `sent` of each delivery, and of the first and the last delivery of each occurrence."""
    each, first, last = [], [], []
    for broadcast_id, stamps in sent.items():
        delays = sorted((stamp - planned[broadcast_id]).total_seconds() for stamp in stamps)
        if delays:
            each.extend(delays)
            first.append(delays[0])
            last.append(delays[-1])
    return {
        "deliveries": summary(each),
        "first_of_occurrence": summary(first),
        "last_of_occurrence": summary(last),
    }


def histogram_percentiles(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Bucket counts added between two scrapes, and the upper bounds that hold 50 % and 99 % of them."""
    delta = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = delta.get("+Inf", 0.0)

    def bound_for(q: float) -> str | None:
        return next((b for b, count in delta.items() if total and count >= q * total), None)

    return {
        "count": total,
        "cumulative_buckets": delta,
        "p50_at_most": bound_for(0.5),
        "p99_at_most": bound_for(0.99),
    }


def wait_for_firings(
    run: Stack, log: LogFollower, ids: set[str], deadline: float, progress: list[dict[str, Any]]
) -> None:
    """Until every occurrence fired or failed, or the deadline; every 5 s, how many did and how long
    GET /healthz takes (it reads the database through the same worker threads as the firings)."""
    started = time.time()
    with httpx.Client(base_url=run.base_url, timeout=30) as client:
        while time.time() < deadline:
            fired, failed = fired_events(log, ids)
            asked = time.perf_counter()
            try:
                status: int | str = client.get("/healthz").status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            healthz_s = round(time.perf_counter() - asked, 3)
            progress.append(
                {
                    "t_s": round(time.time() - started, 1),
                    "fired": len(fired),
                    "failed": len(failed),
                    "healthz_s": healthz_s,
                    "healthz": status,
                }
            )
            if len(fired) + len(failed) >= len(ids):
                return
            time.sleep(min(5.0, max(0.0, deadline - time.time())))


def probe_window(run: Stack, log: LogFollower, ids: set[str], plans: dict[str, Planned]) -> dict[str, Any]:
    histogram0, cpu0 = run.firing_histogram(), run.cpu()
    last_at = max(plans[i].at for i in ids)
    progress: list[dict[str, Any]] = []
    wait_for_firings(run, log, ids, last_at.timestamp() + 30, progress)
    fired, failed = fired_events(log, ids)
    cpu1 = run.cpu()
    planned = {e["broadcast_id"]: datetime.fromisoformat(e["planned_at"]) for e in fired}
    sent: dict[str, list[datetime]] = {}
    with run.client() as client:
        for broadcast_id in planned:
            description = client.get(f"/api/v1/broadcasts/{broadcast_id}").json()
            sent[broadcast_id] = [
                datetime.fromisoformat(e["at"])
                for d in description["deliveries"]
                for e in d["events"]
                if e["state"] == "sent"
            ]
    accepted = accept_delays(fired)
    return {
        "schedules": len(ids),
        "fired": len(fired),
        "failed": len(failed),
        "planned_to_accepted": summary(accepted),
        "planned_to_accepted_values_s": [round(v, 4) for v in accepted],
        "runner_delay_s": summary([e["delay_s"] for e in fired]),
        "planned_to_sent": sent_delays(planned, sent),
        "histogram": histogram_percentiles(histogram0, run.firing_histogram()),
        "cpu_s": run.cpu_delta(cpu0, cpu1),
    }


def full_window(run: Stack, log: LogFollower, ids: set[str], plans: dict[str, Planned]) -> dict[str, Any]:
    histogram0, cpu0 = run.firing_histogram(), run.cpu()
    first_at = min(plans[i].at for i in ids)
    last_at = max(plans[i].at for i in ids)
    progress: list[dict[str, Any]] = []
    wait_for_firings(run, log, ids, last_at.timestamp() + run.options.drain_s, progress)
    observed_until = datetime.now(UTC)
    fired, failed = fired_events(log, ids)
    cpu1 = run.cpu()
    histogram1 = run.firing_histogram()
    assert run.controller is not None
    memory = memory_mib(run.controller.pid)
    run.stop_controller()  # the backlog, if any, stops here; what it left is read from the database
    sent = sent_stamps(run.database_url, {e["broadcast_id"] for e in fired})
    planned = {e["broadcast_id"]: datetime.fromisoformat(e["planned_at"]) for e in fired}
    accepted = accept_delays(fired)
    order = sorted(zip((datetime.fromisoformat(e["planned_at"]) for e in fired), accepted, strict=True))
    return {
        "schedules": len(ids),
        "planned_from": rfc3339(first_at),
        "planned_until": rfc3339(last_at),
        "observed_until": rfc3339(observed_until),
        "fired": len(fired),
        "failed": len(failed),
        "not_fired_when_stopped": len(ids) - len(fired) - len(failed),
        "fired_per_s": rounded(len(fired) / max(1e-9, (observed_until - first_at).total_seconds()), 2),
        "planned_to_accepted": summary(accepted),
        "planned_to_accepted_by_planned_second": [
            [round((p - first_at).total_seconds(), 1), round(d, 3)]
            for p, d in order[:: max(1, len(order) // 200)]
        ],
        "runner_delay_s": summary([e["delay_s"] for e in fired]),
        "planned_to_sent": sent_delays(planned, sent),
        "histogram": histogram_percentiles(histogram0, histogram1),
        "progress": progress,
        "cpu_s": run.cpu_delta(cpu0, cpu1),
        "controller_rss_mib": memory,
    }


def sent_stamps(url: str, broadcast_ids: set[str]) -> dict[str, list[datetime]]:
    """`sent` facts of the given broadcasts' deliveries, read from the (stopped) controller's database."""
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT d.broadcast_id, e.at FROM deliveries d"
                    " JOIN delivery_events e ON e.delivery_id = d.id WHERE e.state = 'sent'"
                )
            ).all()
    finally:
        engine.dispose()
    sent: dict[str, list[datetime]] = {b: [] for b in broadcast_ids}
    for broadcast_id, at in rows:
        if broadcast_id in sent:
            moment = at if isinstance(at, datetime) else datetime.fromisoformat(str(at))
            sent[broadcast_id].append(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return sent


def api_phase(options: Options, workdir: Path, url: str) -> dict[str, Any]:
    layout = options.layout
    with contextlib.ExitStack() as stack:
        run = Stack(options=options, workdir=workdir, database_url=url, stack=stack)
        step = time.monotonic()

        def progress(what: str) -> None:
            nonlocal step
            print(f"   {what} ({time.monotonic() - step:.1f} s)", flush=True)
            step = time.monotonic()

        speakers = layout.group_count * layout.speakers
        run.start()
        progress(f"controller on :{run.http_port} ({options.database})")
        run.seed()
        progress(f"{layout.group_count + layout.wards + 1:,} areas, {speakers:,} speakers registered")
        run.start_fleet()
        progress(f"fleet of {speakers:,} online ({options.processes} processes), clip cached")
        log = LogFollower(run.log)
        created_at = time.time()
        anchor = datetime.fromtimestamp(int(created_at + options.create_budget_s), UTC)
        plans = programme(
            layout,
            run.media_id,
            anchor=anchor,
            probes=options.probes,
            full_start_s=options.probes + options.gap_s,
            spread_s=options.spread_s,
        )
        times, by_id = asyncio.run(create_all(run, plans))
        create_s = time.time() - created_at
        progress(f"{len(plans):,} schedules created through the API ({len(plans) / create_s:.0f}/s)")
        if time.time() > anchor.timestamp() - 15:
            raise BenchError(
                f"creating took {create_s:.0f} s: raise --create-budget (now {options.create_budget_s:.0f})"
            )
        per_block = 1000
        creation = {
            "schedules": len(plans),
            "concurrency": options.create_concurrency,
            "total_s": round(create_s, 1),
            "per_s": round(len(plans) / create_s, 1),
            "request": summary(times),
            "request_by_1000_stored": [
                summary(times[i : i + per_block]) for i in range(0, len(times), per_block)
            ],
        }
        baseline = api_baseline(run, next(iter(by_id)))
        conflict = api_conflict_checks(run, plans, anchor + timedelta(hours=6))
        week = api_programme(run, anchor)
        progress(f"conflict checks and programme (ward week: {week['items']} items, p50 {week['p50_s']} s)")
        wait_until(
            lambda: time.time() >= anchor.timestamp() - 2, timeout=options.create_budget_s + 60, interval=0.5
        )
        probe_ids = {i for i, p in by_id.items() if p.window == "probe"}
        full_ids = {i for i, p in by_id.items() if p.window == "full"}
        probes = probe_window(run, log, probe_ids, by_id) if probe_ids else None
        if probes:
            progress(f"probes: planned → accepted p99 {probes['planned_to_accepted']['p99_s']} s")
        full = full_window(run, log, full_ids, by_id)
        progress(
            f"full window: {full['fired']:,} of {len(full_ids):,} fired by the end of the observation, "
            f"planned → accepted p99 {full['planned_to_accepted']['p99_s']} s"
        )
        warnings = [
            e
            for e in log.poll()
            if e.get("level") in {"warning", "error"} and e.get("event") != "occurrence could not fire"
        ]
        return {
            "setup": run.setup,
            "anchor": rfc3339(anchor),
            "create": creation,
            "request_baseline": baseline,
            "conflict_check": conflict,
            "programme_week": week,
            "probes": probes,
            "full": full,
            "controller_warnings": [json.dumps(e)[:300] for e in warnings[:20]],
        }


# -- output --------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"
    return str(value)


def table(document: dict[str, Any]) -> str:
    """p50, the tail (p99; p90 where a figure has only --repeat samples) and max of each figure, and
    whether the tail meets the goal."""
    rows: list[tuple[str, ...]] = [("figure", "p50", "tail", "max", "goal")]

    def add(label: str, figures: dict[str, Any], tail: str = "p99_s", goal: float | None = None) -> None:
        verdict = "" if goal is None else ("met" if (figures[tail] or 0) <= goal else "NOT met")
        name = f"{fmt(figures[tail])} ({tail[:3]})"
        rows.append((label, fmt(figures["p50_s"]), name, fmt(figures["max_s"]), verdict))

    for where, phase in (("in-process", document.get("inprocess")), ("API", document.get("api"))):
        if not phase:
            continue
        if where == "API":
            add("API any call (GET /api/v1/schedules/{id})", phase["request_baseline"], "p90_s")
        for label, figures in phase["conflict_check"].items():
            add(f"{where} conflict check, {label}", figures, "p90_s", GOAL_CONFLICT_S)
        add(f"{where} ward week ({phase['programme_week']['items']} items)", phase["programme_week"], "p90_s")
    inproc, api = document.get("inprocess"), document.get("api")
    if inproc:
        alone = inproc["scheduler_alone"]
        add(
            f"OccurrenceScheduler alone ({alone['jobs']:,} in {alone['spread_s']} s): planned → callback",
            alone["planned_to_callback"],
            goal=GOAL_FIRING_P99_S,
        )
    if api:
        add(f"API create ({api['create']['per_s']}/s)", api["create"]["request"])
        for name in ("probes", "full"):
            window = api.get(name)
            if window:
                label = f"{name} ({window['fired']:,}/{window['schedules']:,} fired)"
                add(f"{label}: planned → accepted", window["planned_to_accepted"], goal=GOAL_FIRING_P99_S)
                for key, what in (("first_of_occurrence", "first"), ("last_of_occurrence", "last")):
                    sent = window["planned_to_sent"][key]
                    add(f"{label}: planned → {what} `sent` (n={sent['n']:,})", sent)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_arguments(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--wards", type=int, default=20)
    parser.add_argument("--groups", type=int, default=50, help="residential groups per ward")
    parser.add_argument("--speakers", type=int, default=10, help="speakers per group")
    parser.add_argument("--per-group", type=int, default=10, help="schedules per group")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--spread", type=int, default=120, help="seconds over which the full window's schedules fall"
    )
    parser.add_argument(
        "--probes", type=int, default=60, help="schedules planned one per second before the full window"
    )
    parser.add_argument("--gap", type=int, default=30, help="seconds between the probes and the full window")
    parser.add_argument(
        "--create-budget", type=float, default=420, help="seconds allowed for creating the schedules"
    )
    parser.add_argument("--create-concurrency", type=int, default=4)
    parser.add_argument("--register-concurrency", type=int, default=8)
    parser.add_argument(
        "--drain", type=float, default=180, help="observe the full window this long after its end"
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per conflict check and programme")
    parser.add_argument(
        "--inprocess-creates", type=int, default=100, help="in-process: schedules created, not bulk-inserted"
    )
    parser.add_argument(
        "--inprocess-only", action="store_true", help="only the in-process phase (no servers)"
    )
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument("--processes", type=int, default=2, help="fleet processes")
    parser.add_argument("--speed", type=float, default=50.0, help="simulated playback speed")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, SQLite databases)"
    )
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/scheduler-<UTC>.json)")
    arguments = parser.parse_args(argv)
    layout = Layout(arguments.wards, arguments.groups, arguments.speakers, arguments.per_group)
    if (
        min(arguments.wards, arguments.groups, arguments.per_group, arguments.repeat) < 1
        or arguments.speakers < 3
    ):
        parser.error("--wards, --groups, --per-group, --repeat >= 1; --speakers >= 3")
    if arguments.spread // arguments.per_group < AUDIO_S + 1:
        parser.error("--spread must leave at least 3 s between the schedules of one group")
    if not 0 < arguments.inprocess_creates <= layout.schedule_count:
        parser.error("--inprocess-creates must be 1..the number of schedules")
    return Options(
        layout=layout,
        database=arguments.database,
        spread_s=arguments.spread,
        probes=min(arguments.probes, layout.group_count),
        gap_s=arguments.gap,
        create_budget_s=arguments.create_budget,
        create_concurrency=arguments.create_concurrency,
        register_concurrency=arguments.register_concurrency,
        drain_s=arguments.drain,
        repeat=arguments.repeat,
        inprocess_creates=arguments.inprocess_creates,
        inprocess=not arguments.skip_inprocess,
        api=not arguments.inprocess_only,
        processes=arguments.processes,
        speed=arguments.speed,
        keep=arguments.keep,
        output=arguments.output,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    started = datetime.now(UTC)
    output = options.output or RESULTS_DIR / f"scheduler-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    layout = options.layout
    document: dict[str, Any] = {
        "benchmark": "scheduler",
        "issue": 3,
        "started_at": rfc3339(started),
        "machine": machine_info(),
        "parameters": {
            "database": options.database,
            "wards": layout.wards,
            "groups_per_ward": layout.groups,
            "speakers_per_group": layout.speakers,
            "speakers": layout.group_count * layout.speakers,
            "schedules": layout.schedule_count,
            "schedules_per_ward": layout.groups * layout.per_group,
            "probes": options.probes,
            "spread_s": options.spread_s,
            "drain_s": options.drain_s,
            "create_concurrency": options.create_concurrency,
            "repeat": options.repeat,
            "inprocess_creates": options.inprocess_creates,
            "fleet_processes": options.processes,
            "speed": options.speed,
            "clip_s": AUDIO_S,
            "timezone": ZONE_NAME,
            "host": HOST,
        },
    }
    workdir = Path(tempfile.mkdtemp(prefix="wardcast-bench-scheduler-"))
    print(f"work dir {workdir}", flush=True)
    with sigterm_as_interrupt(), contextlib.ExitStack() as cleanup:
        if not options.keep:
            cleanup.callback(shutil.rmtree, workdir, True)
        try:
            if options.inprocess:
                print("== in-process (ScheduleService, no server)", flush=True)
                with database(options.database, workdir, "inprocess") as url:
                    document["inprocess"] = inprocess_phase(options, url)
            if options.api:
                print("== through the API, with the controller, its broker and a simulated fleet", flush=True)
                with database(options.database, workdir, "api") as url:
                    document["api"] = api_phase(options, workdir, url)
        except KeyboardInterrupt:
            print("\ninterrupted; everything started has been stopped", file=sys.stderr)
            return 130
        except (BenchError, httpx.HTTPError, OSError, psycopg.Error) as error:
            print(f"\nbenchmark failed: {error!r}; everything started has been stopped", file=sys.stderr)
            return 1
    document["finished_at"] = rfc3339(datetime.now(UTC))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print()
    print(table(document))
    print(f"\nresults: {output.relative_to(REPO) if output.is_relative_to(REPO) else output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
