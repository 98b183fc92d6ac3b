"""Real processes for integration tests: the controller, a simulated fleet, PostgreSQL databases,
and a watcher on the controller's event stream (tests wait on events, never on sleeps)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from controller.broker import free_tcp_port
from tests.support.broker import TestBroker

POSTGRES_ADMIN_DSN = os.environ.get("WARDCAST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


class DidNotStartError(Exception):
    """A process ended, or stayed silent, without printing its READY line; `log_tail` says why."""

    def __init__(self, what: str, timeout: float, log_tail: str) -> None:
        super().__init__(f"{what} did not report READY within {timeout} s:\n{log_tail}")
        self.log_tail = log_tail


def _read_ready_line(process: subprocess.Popen[str], timeout: float, what: str, log: Path) -> str:
    """Wait for the `READY …` line a process prints on stdout when it is up."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while True:
            line = lines.get(timeout=timeout)
            if line is None:
                break
            if line.startswith("READY"):
                return line.strip()
    except queue.Empty:
        pass
    process.kill()
    process.wait()
    reader.join(timeout=10)  # it ends at the pipe's end of file; then the pipe can be closed
    if process.stdout is not None:
        process.stdout.close()
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise DidNotStartError(what, timeout, tail)


@dataclass
class ManagedProcess:
    process: subprocess.Popen[str]
    log_path: Path
    ready_line: str

    def terminate(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def _close(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_process(
    args: list[str], env: dict[str, str], log_path: Path, what: str, timeout: float = 60
) -> ManagedProcess:
    """The process, once it printed READY; `DidNotStartError` (with its log's tail) otherwise."""
    with log_path.open("a") as log:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    ready = _read_ready_line(process, timeout, what, log_path)
    return ManagedProcess(process, log_path, ready)


class _Supervised:
    """A handle whose process can be stopped gracefully or killed as a crash would."""

    process: ManagedProcess | None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None


@dataclass
class ControllerHandle(_Supervised):
    """A controller subprocess on its own port, pointed at the test's broker and database."""

    workdir: Path
    database_url: str
    broker: TestBroker
    port: int = field(default_factory=free_tcp_port)
    process: ManagedProcess | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    _token: str | None = None
    _command_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARDCAST_")}
        env.update(
            {
                "WARDCAST_DATABASE__URL": self.database_url,
                "WARDCAST_HTTP__PORT": str(self.port),
                "WARDCAST_MQTT__MODE": "external",
                "WARDCAST_MQTT__URL": self.broker.url,
                "WARDCAST_MQTT__USERNAME": self.broker.controller.username,
                "WARDCAST_MQTT__PASSWORD": self.broker.controller.password,
                "WARDCAST_MQTT__CLIENT_ID": "wardcast-test-controller",
                # The test broker's simulation-only account (fleets without their own credentials) and
                # claim account; the controller writes them into the broker's files when a test has it
                # manage the broker's accounts (`manage_broker_accounts`).
                "WARDCAST_MQTT__SIMULATOR__ENABLED": "true",
                "WARDCAST_MQTT__SIMULATOR__USERNAME": self.broker.simulator.username,
                "WARDCAST_MQTT__SIMULATOR__PASSWORD": self.broker.simulator.password,
                "WARDCAST_MQTT__CLAIM__USERNAME": self.broker.claim.username,
                "WARDCAST_MQTT__CLAIM__PASSWORD": self.broker.claim.password,
                "WARDCAST_MEDIA__DIR": str(self.workdir / "media"),
                "WARDCAST_DATA_DIR": str(self.workdir),
                "WARDCAST_DISPATCH__COMPLETION_GRACE_S": "5",
                "WARDCAST_LOGGING__LEVEL": "debug",
            }
        )
        env.update(self.extra_env)
        return env

    def manage_broker_accounts(self) -> None:
        """Have the controller write the test broker's password and ACL files from its database and
        reload it (`mqtt.external_access`): devices then connect with their own credentials."""
        broker = self.broker.broker
        self.extra_env.update(
            {
                "WARDCAST_MQTT__EXTERNAL_ACCESS__PASSWORD_FILE": str(broker.password_path),
                "WARDCAST_MQTT__EXTERNAL_ACCESS__ACL_FILE": str(broker.acl_path),
                "WARDCAST_MQTT__EXTERNAL_ACCESS__RELOAD_COMMAND": json.dumps(
                    ["kill", "-HUP", str(broker.pid)]
                ),
            }
        )

    def start(self) -> None:
        # The free port was picked by binding and releasing it; another process (an outgoing
        # connection's ephemeral port, say) can take it before the controller binds: pick another.
        for _ in range(3):
            try:
                self.process = start_process(
                    [sys.executable, "-m", "controller", "serve"],
                    self.env(),
                    self.workdir / "controller.log",
                    "the controller",
                )
                return
            except DidNotStartError as error:
                if "address already in use" not in error.log_tail:
                    pytest.fail(str(error))
                self.port = free_tcp_port()
        pytest.fail(f"the controller found its port taken three times in a row (last: {self.port})")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controller", *args],
            env={**self.env(), "COLUMNS": "250"},  # rich tables: wide enough not to wrap names
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def api_key(self, role: str = "admin", ward: str | None = None) -> str:
        args = ["apikey", "create", "--name", f"test-{role}", "--role", role]
        if ward:
            args += ["--ward", ward]
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def api_key_with_wards(self, role: str, wards: list[str]) -> str:
        args = ["apikey", "create", "--name", f"test-{role}", "--role", role]
        for ward in wards:
            args += ["--ward", ward]
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self.api_key("admin")
        return self._token

    @property
    def command_key(self) -> str:
        """The controller's public command key (docs/protocol.md §1.15), as devices get it: from the API."""
        if self._command_key is None:
            with self.client() as client:
                response = client.get("/api/v1/command-key")
            assert response.status_code == 200, response.text
            self._command_key = response.json()["public_key"]
        return self._command_key

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, timeout=30, headers={"Authorization": f"Bearer {token or self.token}"}
        )


@dataclass
class FleetHandle(_Supervised):
    broker: TestBroker
    workdir: Path
    addresses: list[str]
    # The controller's public key (`ControllerHandle.command_key`): the simulators play only what it signed.
    command_key: str
    speed: float = 20.0
    process: ManagedProcess | None = None
    mqtt_url: str | None = None  # another way to the broker (a relay a test can cut); default: direct
    screens: list[str] = field(default_factory=list)  # networked LED screens, besides the speakers
    heartbeat_s: float | None = None  # every device republishes its state this often (default 60 s)
    control: Path | None = None  # the fleet's control file (sensor values, injected faults)
    csv_name: str = "fleet.csv"  # another name lets two fleets share a working directory
    extra_args: list[str] = field(default_factory=list)  # more `firmware_sim fleet` options

    @property
    def play_log(self) -> Path:
        return self.workdir / "plays.jsonl"

    def start(self) -> None:
        csv_path = self.workdir / self.csv_name
        csv_path.write_text(
            "address,kind\n"
            + "".join(f"{a},speaker\n" for a in self.addresses)
            + "".join(f"{a},led_screen\n" for a in self.screens)
        )
        self.process = start_process(
            [
                sys.executable,
                "-m",
                "firmware_sim",
                "fleet",
                "--mqtt-url",
                self.mqtt_url or self.broker.url,
                "--username",
                self.broker.simulator.username,
                f"--password={self.broker.simulator.password}",  # it may start with "-"
                "--csv",
                str(csv_path),
                "--speed",
                str(self.speed),
                "--play-log",
                str(self.play_log),
                "--kinds",
                "speaker,led_screen" if self.screens else "speaker",
                *(["--heartbeat", str(self.heartbeat_s)] if self.heartbeat_s is not None else []),
                *(["--control", str(self.control)] if self.control is not None else []),
                "--command-key",
                self.command_key,
                *self.extra_args,
            ],
            {k: v for k, v in os.environ.items() if not k.startswith("WARDCAST_")},
            self.workdir / f"{Path(self.csv_name).stem}.log",
            "the simulated fleet",
        )

    def set_control(self, document: dict[str, Any]) -> None:
        """Replaces the control file in one rename, so that the fleet never reads half of it."""
        assert self.control is not None, "start the fleet with a control file"
        staged = self.control.with_suffix(".tmp")
        staged.write_text(json.dumps(document))
        staged.replace(self.control)

    def _log(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for path in sorted(self.workdir.glob("plays*.jsonl*")):
            entries.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return entries

    def plays(self) -> list[dict[str, Any]]:
        """What the speakers did with commands (delivered, playing, completed, ...)."""
        return [entry for entry in self._log() if entry["event"] != "programme"]

    def programmes(self) -> list[dict[str, Any]]:
        """Each programme a speaker took and verified all the media of (docs/protocol.md §1.10)."""
        return [entry for entry in self._log() if entry["event"] == "programme"]


class EventWatcher:
    """Follows /api/v1/events in a thread; `wait_for` blocks until a predicate over all events holds."""

    def __init__(self, controller: ControllerHandle) -> None:
        self._controller = controller
        self.events: list[dict[str, Any]] = []
        self._condition = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._response: httpx.Response | None = None

    def __enter__(self) -> EventWatcher:
        self._thread.start()
        assert self._ready.wait(30), "the event stream did not open"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._response is not None:
            # Closing the response does not wake a read blocked in another thread; shutting the
            # socket down does.
            stream = self._response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the event watcher did not stop"

    def _run(self) -> None:
        with (
            self._controller.client() as client,
            client.stream("GET", "/api/v1/events", timeout=httpx.Timeout(None, connect=10)) as response,
        ):
            self._response = response
            try:
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("event: ready"):
                        self._ready.set()
                    if line.startswith("data:") and line[5:].strip() != "{}":
                        with self._condition:
                            self.events.append(json.loads(line[5:]))
                            self._condition.notify_all()
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.StreamClosed, httpx.StreamError):
                return

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30, what: str = "condition"
    ) -> None:
        with self._condition:
            if not self._condition.wait_for(lambda: predicate(self.events), timeout=timeout):
                pytest.fail(
                    f"timed out after {timeout} s waiting for {what}; last events: {self.events[-5:]}"
                )

    def delivery_states(self, broadcast_id: str) -> dict[str, str]:
        states: dict[str, str] = {}
        for event in self.events:
            if event.get("type") == "delivery" and event["broadcast_id"] == broadcast_id:
                states[event["device_id"]] = event["state"]
        return states


def create_postgres_database() -> tuple[str, Callable[[], None]]:
    name = f"wardcast_test_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_DSN}: {error}")

    def drop() -> None:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://"), drop


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'wardcast.db'}"
        return
    url, drop = create_postgres_database()
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def controller(tmp_path: Path, database_url: str, mosquitto: TestBroker) -> Iterator[ControllerHandle]:
    handle = ControllerHandle(workdir=tmp_path, database_url=database_url, broker=mosquitto)
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll the system until `check` holds (state in other processes; no event to wait on)."""
    deadline = datetime.now(UTC) + timedelta(seconds=timeout)
    pause = threading.Event()
    while not check():
        if datetime.now(UTC) > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.1)
