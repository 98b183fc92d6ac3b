"""Issue 2 benchmark: one broadcast to a whole city of N simulated speakers, against two raw baselines.

    .venv/bin/python bench/fanout.py                      # N = 1,000 and 5,000 (what `make bench` runs)
    .venv/bin/python bench/fanout.py --sizes 200 --rounds 1
    .venv/bin/python bench/fanout.py --sizes 5000 --rounds 1 --profile-controller --keep   # diagnosis

For every N it starts, on 127.0.0.1 only and in a temporary directory: its own Mosquitto (the managed
broker's code: auth + ACL), a controller subprocess on SQLite in external-broker mode, a city with N
speakers registered through the API, and a simulated fleet (`python -m firmware_sim fleet`, several
processes, `--shared-media-cache`). Then, on that broker and those N fleet connections:

controller  POST /api/v1/broadcasts to the whole city; time from the API call until >= 99 % of the devices
            reported `playing` on their ack topics (seen by an observer process subscribed to
            wardcast/v1/dev/+/ack), per-device latency, API response time, time to all `completed`,
            the controller's CPU time (per thread) and RSS (from /proc). One more round is measured
            with an /api/v1/events follower open, as an operator console would be.
raw (a)     the controller stopped; a raw paho publisher (same window, same MQTT 5 properties, subscribed
            to the same report topics) sends N prebuilt v1 play commands; same observer, same figures.
raw area (c) the same, but one area command (docs/protocol.md §1.12) on the city's topic: the broker does
            the fan-out to the speakers that follow it (what the controller does with area fan-out on).
bare (b)    no device work: N extra raw paho subscribers (separate processes), one QoS 1 message per
            topic from the same publisher; time until all received.

Every round starts once other jobs leave the CPUs (bounded by --quiet-wait), and records the CPU time
of each of our processes and of everything else on the machine. Medians of --rounds rounds are reported.
Results go to bench/results/fanout-<UTC timestamp>.json and a table on stdout. Everything started is
stopped on the way out, Ctrl-C included; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import httpx
import paho.mqtt.client as paho
from common import (
    HOST,
    REPO,
    RESULTS_DIR,
    BenchError,
    LineProcess,
    child_pids,
    clean_env,
    cpu_of,
    cpu_seconds,
    create_admin_key,
    machine_busy_seconds,
    machine_info,
    memory_mib,
    nth_time,
    parse_at,
    percentile,
    rfc3339,
    rounded,
    sigterm_as_interrupt,
    since,
    thread_cpu_seconds,
    wait_until,
    wav_bytes,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from controller.broker import BrokerAccount, ManagedMosquitto, free_tcp_port
from firmware_sim.fleet import split_evenly
from firmware_sim.mqtt_loop import NonBlockingConnectClient, PahoLoopDriver, open_tcp_connection

TOPIC_ROOT: Final = "wardcast/v1"
CONTROLLER_CLIENT_ID: Final = "wardcast-bench-controller"
# What the controller subscribes to (docs/protocol.md §1.2); the raw publisher subscribes to the same.
CONTROLLER_TOPICS: Final = (
    f"{TOPIC_ROOT}/dev/+/ack",
    f"{TOPIC_ROOT}/dev/+/state",
    f"{TOPIC_ROOT}/dev/+/telemetry",
)
# drivers/mqtt.py DEFAULT_MAX_INFLIGHT, capped by the broker's Receive Maximum, as the driver does.
PUBLISH_WINDOW: Final = 200
WARDS: Final = 10
GROUPS_PER_WARD: Final = 5
CITY: Final = "bc"
BARE_PREFIX: Final = "bare-"
DEVICE_PREFIX: Final = "bench-"
QUIET_FOREIGN_CORES: Final = 0.15


# -- MQTT clients in this process ----------------------------------------------------------------------


def cmd_topic(address: str) -> str:
    return f"{TOPIC_ROOT}/dev/{address}/cmd"


def ack_topic(address: str) -> str:
    return f"{TOPIC_ROOT}/dev/{address}/ack"


def new_client(client_id: str, account: BrokerAccount, *, v5: bool) -> paho.Client:
    if v5:  # clean start is the MQTT 5 default (connect() sends clean_start=True on the first connect)
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    else:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, clean_session=True
        )
    client.username_pw_set(account.username, account.password)
    client.max_inflight_messages_set(0)  # our own window is the bound (as in drivers/mqtt.py)
    client.max_queued_messages_set(0)
    return client


def connect_and_subscribe(
    client: paho.Client, port: int, topics: Sequence[str], timeout: float = 15
) -> dict[str, Any]:
    """Connect (clean start), start paho's network thread, subscribe at QoS 1; return CONNACK facts."""
    connected = threading.Event()
    subscribed = threading.Event()
    facts: dict[str, Any] = {}

    def on_connect(
        _client: paho.Client,
        _userdata: Any,
        _flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        facts["reason"] = str(reason_code)
        facts["receive_maximum"] = getattr(properties, "ReceiveMaximum", None)
        connected.set()

    def on_subscribe(
        _client: paho.Client,
        _userdata: Any,
        _mid: int,
        codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        facts["suback"] = [str(code) for code in codes]
        subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.connect(HOST, port, keepalive=60)
    client.loop_start()
    if not connected.wait(timeout) or facts.get("reason") != "Success":
        raise BenchError(f"MQTT connect failed: {facts}")
    if topics:
        client.subscribe([(topic, 1) for topic in topics])
        if not subscribed.wait(timeout) or any("Granted" not in code for code in facts["suback"]):
            raise BenchError(f"subscription to {topics} refused: {facts}")
    return facts


def close_client(client: paho.Client) -> None:
    with contextlib.suppress(Exception):
        client.disconnect()
    with contextlib.suppress(Exception):
        client.loop_stop()


def observer_worker_main() -> int:
    """`fanout.py --observer-worker`: subscribed to every device's ack topic with the controller account,
    in a process of its own so that publishing and observing never share a GIL.

    stdin: one JSON line of config, then commands: `ARM <n>` (forget what came before; answer `ARMED`,
    then `ALL <state>` once n reports of `<state>` arrived), `DUMP` (answer `REPORTS <json>`: arrival,
    address, command id, state and device time of every report since ARM), `QUIT` or EOF.
    """
    config = json.loads(sys.stdin.readline())
    account = BrokerAccount(config["username"], config["password"])
    client = new_client(f"bench-observer-{secrets.token_hex(3)}", account, v5=False)
    lock = threading.Lock()
    reports: list[tuple[float, str, str, str, str]] = []
    counts: dict[str, int] = {}
    expected = [0]
    malformed = [0]

    def say(line: str) -> None:
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def on_message(_client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        received = time.time()
        try:
            document = json.loads(message.payload)
            entry = (
                received,
                message.topic.split("/")[3],
                document["command_id"],
                document["state"],
                document["at"],
            )
        except (ValueError, KeyError, IndexError):
            malformed[0] += 1
            return
        reports.append(entry)
        state = entry[3]
        counts[state] = counts.get(state, 0) + 1
        if counts[state] == expected[0]:
            say(f"ALL {state}")

    client.on_message = on_message
    connect_and_subscribe(client, config["port"], [f"{TOPIC_ROOT}/dev/+/ack"])
    say("READY")
    try:
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "QUIT":
                break
            if words[0] == "ARM":
                expected[0] = int(words[1])
                reports.clear()
                counts.clear()
                say("ARMED")
            elif words[0] == "DUMP":
                say("REPORTS " + json.dumps({"reports": list(reports), "malformed": malformed[0]}))
    finally:
        close_client(client)
    return 0


@dataclass(slots=True)
class Report:
    received: float
    address: str
    command_id: str
    state: str
    at: str


class AckObserver:
    """The orchestrator's handle on the observer process."""

    def __init__(self, workdir: Path, port: int, account: BrokerAccount) -> None:
        self.process = LineProcess(
            [sys.executable, str(Path(__file__).resolve()), "--observer-worker"],
            env=clean_env(),
            log_path=workdir / "observer.log",
            stdin=True,
            what="the ack observer",
        )
        self.malformed = 0
        self.pid = self.process.pid
        self.process.send(
            json.dumps({"port": port, "username": account.username, "password": account.password})
        )
        self.process.expect("READY", 30)

    def arm(self, n: int) -> None:
        self.process.send(f"ARM {n}")
        self.process.expect("ARMED", 30)

    def wait_all(self, state: str, timeout: float) -> bool:
        try:
            self.process.expect(f"ALL {state}", timeout)
        except BenchError:
            return False
        return True

    def dump(self) -> list[Report]:
        self.process.send("DUMP")
        document = json.loads(self.process.expect("REPORTS", 120)[len("REPORTS ") :])
        self.malformed = document["malformed"]
        return [Report(*entry) for entry in document["reports"]]

    def close(self) -> None:
        self.process.send("QUIT")
        self.process.stop(10)


class RawPublisher:
    """A minimal controller: one MQTT 5 connection subscribed like the controller, QoS 1 publishes with a
    window of unacknowledged messages (refilled from the PUBACK callback), no database, no logic."""

    def __init__(self, port: int, account: BrokerAccount) -> None:
        self.client = new_client(f"bench-raw-{secrets.token_hex(3)}", account, v5=True)
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.inbound = 0
        facts = connect_and_subscribe(self.client, port, CONTROLLER_TOPICS)
        receive_maximum = facts.get("receive_maximum")
        self.window = (
            min(PUBLISH_WINDOW, receive_maximum) if isinstance(receive_maximum, int) else PUBLISH_WINDOW
        )
        self._pending: deque[tuple[str, bytes, Properties]] = deque()
        self._total = 0
        self._acked = 0
        self.first_publish_at = 0.0
        self.last_puback_at: float | None = None
        self.done = threading.Event()

    def _on_message(self, _client: paho.Client, _userdata: Any, _message: paho.MQTTMessage) -> None:
        self.inbound += 1  # reports and states are received, as the controller receives them, and dropped

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, _mid: int, _reason: ReasonCode, _properties: Properties
    ) -> None:
        self._acked += 1
        self._next()
        if self._acked == self._total:
            self.last_puback_at = time.time()
            self.done.set()

    def _next(self) -> None:
        try:
            topic, payload, properties = self._pending.popleft()
        except IndexError:
            return
        self.client.publish(topic, payload, qos=1, properties=properties)

    def start(self, messages: list[tuple[str, bytes, Properties]]) -> float:
        """Start publishing everything; returns the wall-clock instant of the first publish."""
        self._pending = deque(messages)
        self._total = len(messages)
        self._acked = 0
        self.last_puback_at = None
        self.done.clear()
        self.first_publish_at = time.time()
        for _ in range(min(self.window, len(messages))):
            self._next()
        return self.first_publish_at

    def close(self) -> None:
        close_client(self.client)


def command_properties(address: str, command_id: str, expires_in_s: int) -> Properties:
    """The MQTT 5 mirrors of protocol.md §1.3 that the controller's driver sends with every command."""
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.PayloadFormatIndicator = 1
    properties.MessageExpiryInterval = expires_in_s
    properties.ContentType = "application/json"
    properties.ResponseTopic = ack_topic(address)
    properties.CorrelationData = command_id.encode()
    return properties


def play_members(broadcast_id: str, media: dict[str, Any], media_url: str) -> dict[str, Any]:
    """What every benchmark `play` carries after its header: one normal-class play of the test audio."""
    return {
        "broadcast_id": broadcast_id,
        "priority": {"class": "normal", "sub": 0, "rank": 0},
        "mode": "live",
        "media": {
            "url": media_url,
            "sha256": media["sha256"],
            "duration_s": media["duration_s"],
            "content_type": media["content_type"],
        },
        "repeats": 1,
        "max_duration_s": 600.0,
    }


def play_messages(
    addresses: Sequence[str], media: dict[str, Any], media_url: str, *, seq_start: int, expiry_s: int = 3600
) -> tuple[list[tuple[str, bytes, Properties]], set[str]]:
    """Prebuilt v1 play commands (docs/protocol.md §1.3) for each address, and their command ids."""
    now = datetime.now(UTC)
    broadcast_id = str(uuid.uuid4())
    messages = []
    ids = set()
    for offset, address in enumerate(addresses):
        command_id = str(uuid.uuid4())
        ids.add(command_id)
        document = {
            "v": 1,
            "type": "play",
            "id": command_id,
            "correlation_id": str(uuid.uuid4()),
            "device": address,
            "issued_at": rfc3339(now),
            "expires_at": rfc3339(now + timedelta(seconds=expiry_s)),
            "seq": seq_start + offset,
            **play_members(broadcast_id, media, media_url),
        }
        payload = json.dumps(document, separators=(",", ":")).encode()
        messages.append((cmd_topic(address), payload, command_properties(address, command_id, expiry_s)))
    return messages, ids


def area_messages(
    area_code: str,
    addresses: Sequence[str],
    media: dict[str, Any],
    media_url: str,
    *,
    seq: int,
    expiry_s: int = 3600,
) -> tuple[list[tuple[str, bytes, Properties]], set[str]]:
    """One prebuilt area command (docs/protocol.md §1.12) on `area_code`'s topic, and the command ids
    the followers derive from it."""
    now = datetime.now(UTC)
    fanout_id = uuid.uuid4()
    document = {
        "v": 1,
        "type": "play",
        "id": str(fanout_id),
        "area": area_code,
        "issued_at": rfc3339(now),
        "expires_at": rfc3339(now + timedelta(seconds=expiry_s)),
        "seq": seq,
        **play_members(str(fanout_id), media, media_url),
    }
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.PayloadFormatIndicator = 1
    properties.MessageExpiryInterval = expiry_s
    properties.ContentType = "application/json"
    properties.CorrelationData = str(fanout_id).encode()
    payload = json.dumps(document, separators=(",", ":")).encode()
    ids = {str(uuid.uuid5(fanout_id, f"command:{address}")) for address in addresses}
    return [(f"wardcast/v1/area/{area_code}/cmd", payload, properties)], ids


def wipe_session(port: int, account: BrokerAccount, client_id: str) -> None:
    """Connect with clean start and session expiry 0 so the broker stops queueing for `client_id`."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.username_pw_set(account.username, account.password)
    try:
        connect_and_subscribe(client, port, [])
    finally:
        close_client(client)


class TransitionPoller:
    """Polls the controller's /metrics for wardcast_delivery_transitions_total{state=playing|completed}:
    when the controller itself had processed the reports (the counter moves in memory, the database
    commit follows within one tracker flush), at a cost of one small request per interval."""

    INTERVAL_S: Final = 0.1
    _LINE: Final = re.compile(
        r'^wardcast_delivery_transitions_total\{state="(playing|completed)"\} (\S+)$', re.MULTILINE
    )

    def __init__(self, base_url: str, baseline: dict[str, float], n: int, timeout: float) -> None:
        self._base_url = base_url
        self._baseline = {
            state: baseline.get(f'wardcast_delivery_transitions_total{{state="{state}"}}', 0.0)
            for state in ("playing", "completed")
        }
        self._n = n
        self._deadline = time.monotonic() + timeout
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-poller")
        self._thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self._base_url, timeout=10) as client:
                while not self._stop.is_set() and time.monotonic() < self._deadline:
                    text = client.get("/metrics").text
                    at = time.time()
                    counts = {
                        state: float(value) - self._baseline[state]
                        for state, value in self._LINE.findall(text)
                    }
                    self.samples.append((at, counts))
                    if counts.get("completed", 0.0) >= self._n:
                        break
                    self._stop.wait(self.INTERVAL_S)
        except httpx.HTTPError:
            return
        finally:
            self.finished.set()

    def crossed(self, state: str, fraction: float) -> float | None:
        needed = math.ceil(fraction * self._n)
        return next((at for at, counts in self.samples if counts.get(state, 0.0) >= needed), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# -- the controller's event stream ---------------------------------------------------------------------


class SseFollower:
    """Follows /api/v1/events in a thread and keeps (arrival, broadcast, device, state) of deliveries."""

    def __init__(self, base_url: str, token: str) -> None:
        self._client = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(None, connect=10),
        )
        self._response: httpx.Response | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.events: list[tuple[float, str, str, str]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.device_events = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="sse")
        self._thread.start()
        if not self.ready.wait(30):
            raise BenchError("the controller's event stream did not open")

    def _run(self) -> None:
        try:
            with self._client.stream("GET", "/api/v1/events") as response:
                self._response = response
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("event: ready"):
                        self.ready.set()
                    elif line.startswith("data:"):
                        self._record(line[5:])
        except (httpx.HTTPError, httpx.StreamClosed):
            return
        finally:
            self.ended.set()

    def _record(self, data: str) -> None:
        arrived = time.time()
        event = json.loads(data)
        if event.get("type") != "delivery":
            self.device_events += event.get("type") == "device"
            return
        key = (event["broadcast_id"], event["state"])
        self.events.append((arrived, event["broadcast_id"], event["device_id"], event["state"]))
        self.counts[key] = self.counts.get(key, 0) + 1

    def count(self, broadcast_id: str, state: str) -> int:
        return self.counts.get((broadcast_id, state), 0)

    def times(self, broadcast_id: str, state: str) -> list[float]:
        return [t for t, b, _, s in list(self.events) if b == broadcast_id and s == state]

    def close(self) -> None:
        self._stop.set()
        if self._response is not None:
            with contextlib.suppress(Exception):
                self._response.close()
        self._thread.join(timeout=5)
        self._client.close()


# -- bare subscribers (a worker process) ---------------------------------------------------------------


def bare_worker_main() -> int:
    """`fanout.py --bare-worker`: N raw paho subscribers on one asyncio loop (the fleet's loop driver).

    stdin: one JSON line of config, then `GO <round> <timeout_s>` lines (each answered `ARMED <round>` and,
    once every subscriber got one message or the timeout passed, `DONE <json>`), then `QUIT` or EOF.
    """
    config = json.loads(sys.stdin.readline())
    return asyncio.run(_bare_worker(config))


async def _bare_worker(config: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    driver = PahoLoopDriver()
    family, _, _, _, address = (await loop.getaddrinfo(HOST, config["port"], type=socket.SOCK_STREAM))[0]
    clients: list[NonBlockingConnectClient] = []
    received: dict[str, float] = {}
    all_in = asyncio.Event()
    expected = len(config["addresses"])
    gate = asyncio.Semaphore(100)

    async def connect(address_: str) -> None:
        ready: asyncio.Future[None] = loop.create_future()
        client = NonBlockingConnectClient(
            CallbackAPIVersion.VERSION2, client_id=address_, clean_session=True, protocol=paho.MQTTv311
        )
        client.username_pw_set(config["username"], config["password"])

        def on_connect(c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None) -> None:
            if reason.is_failure:
                if not ready.done():
                    ready.set_exception(BenchError(f"{address_}: connect refused: {reason}"))
                return
            c.subscribe(cmd_topic(address_), qos=1)

        def on_subscribe(
            _c: paho.Client, _u: Any, _m: int, codes: list[ReasonCode], _p: Properties | None
        ) -> None:
            if not ready.done():
                if codes and not codes[0].is_failure:
                    ready.set_result(None)
                else:
                    ready.set_exception(BenchError(f"{address_}: subscription refused"))

        def on_message(_c: paho.Client, _u: Any, _message: paho.MQTTMessage) -> None:
            if address_ not in received:
                received[address_] = time.time()
                if len(received) >= expected:
                    all_in.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        async with gate:
            driver.attach(client)
            clients.append(client)
            client.prepared_socket = await open_tcp_connection(address, family, 10.0)
            client.connect(HOST, config["port"], keepalive=60)
            # Generous: right after a 10,000-device round the broker is still draining the fleet's reports.
            async with asyncio.timeout(120):
                await ready

    try:
        await asyncio.gather(*(connect(a) for a in config["addresses"]))
        print(f"READY {len(clients)}", flush=True)
        while True:
            line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout=3600)
            words = line.split()
            if not words or words[0] == "QUIT":
                break
            if words[0] != "GO":
                continue
            received.clear()
            all_in.clear()
            print(f"ARMED {words[1]}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), timeout=float(words[2]))
            print(
                "DONE " + json.dumps({"round": int(words[1]), "times": list(received.values())}), flush=True
            )
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.disconnect()
        await asyncio.sleep(0.2)  # let the DISCONNECTs go out
        await driver.aclose()
    return 0


# -- one size ------------------------------------------------------------------------------------------


@dataclass
class Options:
    sizes: list[int]
    rounds: int
    processes: int
    speed: float
    audio_s: float
    timeout_s: float
    settle_s: float
    controller_log_level: str
    register_concurrency: int
    event_stream_round: bool
    profile_controller: bool
    quiet_wait_s: float
    keep: bool
    output: Path | None
    # `broadcasts`: POST /api/v1/broadcasts (issue 2); `alerts`: an IOC key's POST /api/v1/alerts of a
    # pre-approved city-wide template (issue 4: emergency class, TTS content, speakers preempted).
    via: str = "broadcasts"


# The pre-approved template the IOC key sends in `--via alerts` rounds (no second person needed).
ALERT_TEMPLATE = "bench-city"


@dataclass
class SizeRun:
    """Everything one N needs; `stack` stops it all, in reverse order of start."""

    n: int
    options: Options
    workdir: Path
    stack: contextlib.ExitStack
    setup: dict[str, Any] = field(default_factory=dict)
    broker: ManagedMosquitto | None = None
    controller_account: BrokerAccount = field(
        default_factory=lambda: BrokerAccount("controller", secrets.token_urlsafe(16))
    )
    device_account: BrokerAccount = field(
        default_factory=lambda: BrokerAccount("device", secrets.token_urlsafe(16))
    )
    controller: LineProcess | None = None
    http_port: int = 0
    token: str = ""
    ioc_token: str = ""
    fleet: LineProcess | None = None
    addresses: list[str] = field(default_factory=list)
    media: dict[str, Any] = field(default_factory=dict)
    observer_pids: list[int] = field(default_factory=list)
    bare_pids: list[int] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def port(self) -> int:
        assert self.broker is not None
        return self.broker.port

    def broker_pid(self) -> int:
        assert self.broker is not None
        process = self.broker._process  # noqa: SLF001  (its pid, for /proc)
        assert process is not None
        return process.pid

    def fleet_pids(self) -> list[int]:
        assert self.fleet is not None
        return [self.fleet.pid, *child_pids(self.fleet.pid)]

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds so far of each of our process groups, and of the whole machine (all cores)."""
        groups = {
            "bench": [os.getpid()],  # the orchestrator: raw publisher, /metrics poller, event stream follower
            "observer": self.observer_pids,
            "bare_subscribers": self.bare_pids,
            "broker": [self.broker_pid()],
            "fleet": self.fleet_pids() if self.fleet is not None else [],
        }
        if self.controller is not None and self.controller.process.poll() is None:
            groups["controller"] = [self.controller.pid]
        snapshot = {name: cpu_of(pids) for name, pids in groups.items()}
        snapshot["machine"] = machine_busy_seconds()
        return snapshot

    @staticmethod
    def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Per group; `foreign` is what processes that are not ours (other jobs on the box) used meanwhile."""
        delta = {name: round(after[name] - before.get(name, 0.0), 3) for name in after}
        ours = sum(value for name, value in delta.items() if name != "machine")
        delta["ours"] = round(ours, 3)
        # Clamped: the two clocks tick in 10 ms steps, so "nothing" can read as a little below zero.
        delta["foreign"] = round(max(0.0, delta["machine"] - ours), 3)
        return delta

    def wait_quiet(self) -> dict[str, float]:
        """Wait (at most --quiet-wait s) until other processes on the machine use < 15 % of one core, and
        the controller has finished recording the previous round (its reports and delivery states): an
        alert is measured arriving at an idle controller, not behind the bookkeeping of the last one."""
        started = time.monotonic()
        while True:
            before = self.cpu_snapshot()
            time.sleep(1.0)
            delta = self.cpu_delta(before, self.cpu_snapshot())
            foreign, controller = delta["foreign"], delta.get("controller", 0.0)
            waited = time.monotonic() - started
            settled = foreign < QUIET_FOREIGN_CORES and controller < QUIET_FOREIGN_CORES
            if settled or waited >= self.options.quiet_wait_s:
                return {
                    "waited_s": round(waited, 1),
                    "foreign_cores": round(foreign, 2),
                    "controller_cores": round(controller, 2),
                }

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

    # -- setup -----------------------------------------------------------------------------------------

    def start_broker(self) -> None:
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

    def controller_env(self) -> dict[str, str]:
        env = clean_env()
        env.update(
            {
                "WARDCAST_DATABASE__URL": f"sqlite:///{self.workdir / 'wardcast.db'}",
                "WARDCAST_HTTP__HOST": HOST,
                "WARDCAST_HTTP__PORT": str(self.http_port),
                "WARDCAST_MQTT__MODE": "external",
                "WARDCAST_MQTT__URL": f"mqtt://{HOST}:{self.port}",
                "WARDCAST_MQTT__USERNAME": self.controller_account.username,
                "WARDCAST_MQTT__PASSWORD": self.controller_account.password,
                "WARDCAST_MQTT__CLIENT_ID": CONTROLLER_CLIENT_ID,
                "WARDCAST_MEDIA__DIR": str(self.workdir / "media"),
                "WARDCAST_DATA_DIR": str(self.workdir),
                "WARDCAST_LOGGING__LEVEL": self.options.controller_log_level,
                "WARDCAST_ALERTS__TEMPLATES": json.dumps(
                    {
                        ALERT_TEMPLATE: {
                            "headline": "Cảnh báo lũ",
                            "text": "Nước sông Cầu lên nhanh.",
                            "targets": {"areas": [CITY]},
                        }
                    }
                ),
                # Rounds, warm-up and retries stay far below it; the figure is the dispatch path.
                "WARDCAST_ALERTS__RATE_LIMIT_PER_MINUTE": "1000",
            }
        )
        return env

    @property
    def profile_path(self) -> Path:
        return self.workdir / "controller.prof"

    def profile_summary(self, top: int = 30) -> dict[str, Any]:
        """The controller's hottest functions (main thread only: cProfile does not see worker threads)."""
        import pstats

        if not self.profile_path.exists():
            return {}
        stats = pstats.Stats(str(self.profile_path))
        table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        total = sum(entry[2] for entry in table.values())

        def rows(column: int) -> list[dict[str, Any]]:
            ordered = sorted(table.items(), key=lambda item: item[1][column], reverse=True)[:top]
            return [
                {
                    "function": f"{Path(file).name}:{line}({name})",
                    "calls": entry[1],
                    "tottime_s": round(entry[2], 3),
                    "cumtime_s": round(entry[3], 3),
                }
                for (file, line, name), entry in ordered
            ]

        return {"total_tottime_s": round(total, 3), "by_tottime": rows(2), "by_cumtime": rows(3)}

    def start_controller(self) -> None:
        self.http_port = free_tcp_port(HOST)
        profile = ["-m", "cProfile", "-o", str(self.profile_path)] if self.options.profile_controller else []
        self.controller = LineProcess(
            [sys.executable, *profile, "-m", "controller", "serve"],
            env=self.controller_env(),
            log_path=self.workdir / "controller.log",
            what="the controller",
        )
        self.stack.callback(self.stop_controller)
        self.controller.expect("READY", 60)
        self.token = create_admin_key(self.controller_env())
        self.ioc_token = create_admin_key(self.controller_env(), role="ioc")

    def stop_controller(self) -> None:
        if self.controller is not None:
            # uvicorn re-raises the signal it stopped on; only as KeyboardInterrupt (SIGINT) does that
            # unwind through cProfile's `finally`, which writes the profile.
            self.controller.stop(signum=signal.SIGINT if self.options.profile_controller else signal.SIGTERM)

    def seed(self) -> None:
        lines = ["areas:", f"  - {{code: {CITY}, name: Thành phố Bench, kind: city, children: ["]
        wards = []
        for w in range(1, WARDS + 1):
            groups = ", ".join(
                f"{{code: {CITY}.w{w:02d}.t{g:02d}, name: Tổ {g}, kind: group}}"
                for g in range(1, GROUPS_PER_WARD + 1)
            )
            wards.append(f"{{code: {CITY}.w{w:02d}, name: Phường {w}, kind: ward, children: [{groups}]}}")
        lines.append("      " + ",\n      ".join(wards))
        lines.append("    ]}")
        groups_codes = [
            f"{CITY}.w{w:02d}.t{g:02d}" for w in range(1, WARDS + 1) for g in range(1, GROUPS_PER_WARD + 1)
        ]
        self.addresses = [f"{DEVICE_PREFIX}{i:05d}" for i in range(1, self.n + 1)]
        with self.client() as client:
            response = client.post(
                "/api/v1/areas/import",
                content="\n".join(lines).encode(),
                headers={"Content-Type": "application/yaml"},
            )
            if response.status_code != 200:
                raise BenchError(f"area import failed: {response.status_code} {response.text}")
            response = client.post(
                "/api/v1/media", files={"file": ("bench.wav", wav_bytes(self.options.audio_s))}
            )
            if response.status_code not in {200, 201}:
                raise BenchError(f"media upload failed: {response.status_code} {response.text}")
            self.media = response.json()
        started = time.monotonic()
        asyncio.run(self._register(groups_codes))
        self.setup["register_s"] = round(time.monotonic() - started, 2)
        self.setup["areas"] = 1 + WARDS + WARDS * GROUPS_PER_WARD

    async def _register(self, groups: list[str]) -> None:
        gate = asyncio.Semaphore(self.options.register_concurrency)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        ) as client:

            async def one(index: int, address: str) -> None:
                body = {
                    "id": address,
                    "kind": "speaker",
                    "area": groups[index % len(groups)],
                    "address": address,
                }
                async with gate:
                    response = await client.post("/api/v1/devices", json=body)
                if response.status_code != 201:
                    raise BenchError(f"registering {address}: {response.status_code} {response.text}")

            await asyncio.gather(*(one(i, a) for i, a in enumerate(self.addresses)))

    def start_fleet(self) -> None:
        csv_path = self.workdir / "fleet.csv"
        csv_path.write_text("address,kind\n" + "".join(f"{a},speaker\n" for a in self.addresses))
        started = time.monotonic()
        self.fleet = LineProcess(
            [
                sys.executable,
                "-m",
                "firmware_sim",
                "fleet",
                "--mqtt-url",
                f"mqtt://{HOST}:{self.port}",
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
        self.fleet.expect("READY", max(120, self.n / 20))
        self.setup["fleet_connect_s"] = round(time.monotonic() - started, 2)

    def wait_devices_online(self) -> None:
        started = time.monotonic()
        with self.client() as client:

            def all_online() -> bool:
                listed = client.get("/api/v1/devices", params={"online": "true"}).json()
                return len(listed) >= self.n

            if not wait_until(all_online, timeout=120, interval=1.0):
                raise BenchError("the controller never saw every device online")
        self.setup["controller_saw_all_online_s"] = round(time.monotonic() - started, 2)

    def metrics(self) -> dict[str, float]:
        with self.client() as client:
            text = client.get("/metrics").text
        wanted = ("wardcast_", "process_cpu_seconds_total", "process_resident_memory_bytes")
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(wanted) or "_created" in line.split(" ")[0]:
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
        return values

    # -- measurements ----------------------------------------------------------------------------------

    def warm_up(self, observer: AckObserver) -> None:
        """One play per fleet process, so each process has fetched and verified the media once."""
        firsts = [chunk[0] for chunk in split_evenly(self.addresses, self.options.processes)]
        observer.arm(len(firsts))
        with self.client() as client:
            response = client.post(
                "/api/v1/broadcasts",
                json={"targets": {"devices": firsts}, "content": {"media_id": self.media["id"]}},
            )
        if response.status_code != 201:
            raise BenchError(f"warm-up broadcast refused: {response.status_code} {response.text}")
        if not observer.wait_all("completed", self.options.timeout_s):
            raise BenchError(f"warm-up: not all of {len(firsts)} devices completed")
        time.sleep(self.options.settle_s)
        if self.options.via == "alerts":
            # The template's speech is made on the first alert; the rounds measure dispatch, not espeak-ng.
            observer.arm(self.n)
            self.send_alert()
            if not observer.wait_all("completed", self.options.timeout_s):
                raise BenchError("warm-up alert: not every device completed")
            time.sleep(self.options.settle_s)

    def send_alert(self) -> tuple[httpx.Response, str | None]:
        """The IOC's call; returns the response and the alert's broadcast id."""
        with httpx.Client(
            base_url=self.base_url, timeout=60, headers={"Authorization": f"Bearer {self.ioc_token}"}
        ) as client:
            response = client.post("/api/v1/alerts", json={"template": ALERT_TEMPLATE})
        if response.status_code != 201:
            return response, None
        # From the 201 itself: a GET of the alert (every delivery in detail) would compete with the
        # dispatch it is timing.
        broadcast_id: str = response.json()["broadcast_id"]
        return response, broadcast_id

    def controller_round(
        self, observer: AckObserver, sse: SseFollower | None, round_no: int
    ) -> dict[str, Any]:
        """One city-wide broadcast through the API. With `sse`, an /api/v1/events follower is open too."""
        n = self.n
        assert self.controller is not None
        pid = self.controller.pid
        quiet = self.wait_quiet()
        observer.arm(n)
        metrics0 = self.metrics()
        cpu0 = self.cpu_snapshot()
        threads0 = thread_cpu_seconds(pid)
        memory0 = memory_mib(pid)
        poller = TransitionPoller(self.base_url, metrics0, n, self.options.timeout_s)
        body = {"targets": {"areas": [CITY]}, "content": {"media_id": self.media["id"]}}
        t0 = time.time()
        if self.options.via == "alerts":
            response, alert_broadcast = self.send_alert()
        else:
            with self.client() as client:
                response = client.post("/api/v1/broadcasts", json=body)
            alert_broadcast = None
        t_response = time.time()
        if response.status_code != 201:
            poller.stop()
            raise BenchError(f"{self.options.via} call refused: {response.status_code} {response.text}")
        accepted = response.json()
        broadcast_id = alert_broadcast or accepted["id"]
        timeout = self.options.timeout_s
        observer.wait_all("playing", timeout)
        cpu_playing = cpu_seconds(pid)
        observer.wait_all("completed", timeout)
        poller.finished.wait(timeout)
        if sse is not None:
            # Bounded well below `timeout`: a stream that stopped delivering is a finding, not a wait.
            wait_until(lambda: sse.count(broadcast_id, "completed") >= n or sse.ended.is_set(), 15)
        t_recorded = time.time()
        poller.stop()
        cpu1 = self.cpu_snapshot()
        threads1 = thread_cpu_seconds(pid)
        memory1 = memory_mib(pid)
        reports = observer.dump()
        metrics1 = self.metrics()
        with self.client() as client:
            # A `sent` fact whose PUBACK was handled after the device's `completed` can trail the end of
            # the round by a tracker flush or two; read the log until it is whole (or three times).
            for _ in range(3):
                described_at = time.time()
                description = client.get(f"/api/v1/broadcasts/{broadcast_id}").json()
                describe_s = time.time() - described_at
                sent = [
                    parse_at(e["at"])
                    for d in description["deliveries"]
                    for e in d["events"]
                    if e["state"] == "sent"
                ]
                if len(sent) >= n:
                    break
                time.sleep(0.5)
        result = self._figures(reports, t0, n)
        result.update(
            {
                "round": round_no,
                "broadcast_id": broadcast_id,
                "device_count": accepted["device_count"],
                "api_response_s": rounded(t_response - t0),
                "controller_sent_stamps": {
                    "first_s": since(t0, min(sent) if sent else None),
                    "p50_s": since(t0, percentile(sent, 50)),
                    "last_s": since(t0, max(sent) if sent else None),
                    "count": len(sent),
                },
                "controller_processed": {
                    "how": "wardcast_delivery_transitions_total polled on /metrics every "
                    f"{TransitionPoller.INTERVAL_S} s",
                    "playing_99pct_s": since(t0, poller.crossed("playing", 0.99)),
                    "playing_all_s": since(t0, poller.crossed("playing", 1.0)),
                    "completed_all_s": since(t0, poller.crossed("completed", 1.0)),
                    "final_counts": description["counts"],
                },
                "controller_cpu_s": rounded(cpu1["controller"] - cpu0["controller"], 3),
                "controller_cpu_to_all_playing_s": rounded(cpu_playing - cpu0["controller"], 3),
                "controller_cpu_by_thread_s": {k: rounded(v - threads0[k], 3) for k, v in threads1.items()},
                "controller_rss_mib_before": memory0.get("VmRSS"),
                "controller_rss_mib_after": memory1.get("VmRSS"),
                "controller_peak_rss_mib": memory1.get("VmHWM"),
                "cpu_s": self.cpu_delta(cpu0, cpu1),
                "quiet_before": quiet,
                "window_s": rounded(t_recorded - t0),
                "describe_s": rounded(describe_s),
                "metrics_delta": {
                    k: round(v - metrics0.get(k, 0.0), 3)
                    for k, v in metrics1.items()
                    if k.startswith("wardcast_") and v != metrics0.get(k, 0.0)
                },
            }
        )
        if sse is not None:
            playing = sse.times(broadcast_id, "playing")
            completed = sse.times(broadcast_id, "completed")
            counts = {state: count for (b, state), count in list(sse.counts.items()) if b == broadcast_id}
            result["event_stream"] = {
                "delivery_events_received": sum(counts.values()),
                "by_state": counts,
                "device_events_received": sse.device_events,
                "stream_closed_by_server": sse.ended.is_set(),
                "complete": len(completed) >= n,
                "playing_99pct_s": since(t0, nth_time(playing, 0.99, n)),
                "completed_all_s": since(t0, nth_time(completed, 1.0, n)),
                "controller_log_warnings": self.controller_warnings(),
            }
        time.sleep(self.options.settle_s)
        return result

    def controller_warnings(self) -> list[str]:
        log = self.workdir / "controller.log"
        if not log.exists():
            return []
        pattern = re.compile(r"\[(warning|error)|^(WARNING|ERROR) ")
        return [line[:300] for line in log.read_text(errors="replace").splitlines() if pattern.search(line)][
            :20
        ]

    def raw_round(
        self, observer: AckObserver, publisher: RawPublisher, round_no: int, *, area: bool = False
    ) -> dict[str, Any]:
        """(a): one command per device; with `area`, (c): one area command on the city's topic."""
        n = self.n
        media_url = f"{self.base_url}/media/{self.media['sha256']}"
        if area:
            messages, ids = area_messages(
                CITY, self.addresses, self.media, media_url, seq=2_000_000 * round_no
            )
        else:
            messages, ids = play_messages(
                self.addresses, self.media, media_url, seq_start=1_000_000 * round_no
            )
        quiet = self.wait_quiet()
        observer.arm(n)
        cpu0 = self.cpu_snapshot()
        t0 = publisher.start(messages)
        timeout = self.options.timeout_s
        observer.wait_all("playing", timeout)
        observer.wait_all("completed", timeout)
        publisher.done.wait(timeout)
        t_end = time.time()
        cpu1 = self.cpu_snapshot()
        reports = [r for r in observer.dump() if r.command_id in ids]
        result = self._figures(reports, t0, n)
        result.update(
            {
                "round": round_no,
                "publish_window": publisher.window,
                "all_pubacks_s": since(t0, publisher.last_puback_at),
                "cpu_s": self.cpu_delta(cpu0, cpu1),
                "quiet_before": quiet,
                "window_s": rounded(t_end - t0),
            }
        )
        time.sleep(self.options.settle_s)
        return result

    @staticmethod
    def _figures(reports: list[Report], t0: float, n: int) -> dict[str, Any]:
        playing = {r.address: r for r in reports if r.state == "playing"}
        delivered = {r.address: r for r in reports if r.state == "delivered"}
        completed = {r.address: r for r in reports if r.state == "completed"}
        playing_times = [r.received for r in playing.values()]
        latencies = [t - t0 for t in playing_times]
        device_playing = [parse_at(r.at) - t0 for r in playing.values()]
        device_delivered = [parse_at(r.at) - t0 for r in delivered.values()]
        other = sorted({r.state for r in reports} - {"delivered", "playing", "completed"})
        return {
            "devices": n,
            "playing_reports": len(playing),
            "completed_reports": len(completed),
            "other_states": other,
            "playing_99pct_s": since(t0, nth_time(playing_times, 0.99, n)),
            "playing_all_s": since(t0, nth_time(playing_times, 1.0, n)),
            "completed_all_s": since(t0, nth_time([r.received for r in completed.values()], 1.0, n)),
            "latency_s": {
                "p50": rounded(percentile(latencies, 50)),
                "p99": rounded(percentile(latencies, 99)),
                "max": rounded(max(latencies) if latencies else None),
            },
            "device_stamped_s": {
                "delivered_first": rounded(min(device_delivered) if device_delivered else None),
                "delivered_p50": rounded(percentile(device_delivered, 50)),
                "delivered_max": rounded(max(device_delivered) if device_delivered else None),
                "playing_p50": rounded(percentile(device_playing, 50)),
                "playing_max": rounded(max(device_playing) if device_playing else None),
            },
        }

    def bare_phase(self, publisher: RawPublisher) -> list[dict[str, Any]]:
        n = self.n
        addresses = [f"{BARE_PREFIX}{i:05d}" for i in range(1, n + 1)]
        workers: list[LineProcess] = []
        started = time.monotonic()
        try:
            for index, chunk in enumerate(split_evenly(addresses, self.options.processes)):
                worker = LineProcess(
                    [sys.executable, str(Path(__file__).resolve()), "--bare-worker"],
                    env=clean_env(),
                    log_path=self.workdir / f"bare-{index}.log",
                    stdin=True,
                    what=f"bare subscriber worker {index}",
                )
                workers.append(worker)
                self.bare_pids.append(worker.pid)
                worker.send(
                    json.dumps(
                        {
                            "port": self.port,
                            "username": self.device_account.username,
                            "password": self.device_account.password,
                            "addresses": list(chunk),
                        }
                    )
                )
            for worker in workers:
                worker.expect("READY", max(120, n / 20))
            self.setup["bare_connect_s"] = round(time.monotonic() - started, 2)
            media_url = f"{self.base_url}/media/{self.media['sha256']}"
            rounds = []
            for round_no in range(1, self.options.rounds + 1):
                messages, _ = play_messages(addresses, self.media, media_url, seq_start=0)
                quiet = self.wait_quiet()
                for worker in workers:
                    worker.send(f"GO {round_no} {self.options.timeout_s}")
                for worker in workers:
                    worker.expect(f"ARMED {round_no}", 30)
                cpu0 = self.cpu_snapshot()
                t0 = publisher.start(messages)
                times: list[float] = []
                for worker in workers:
                    done = json.loads(worker.expect("DONE", self.options.timeout_s + 30)[5:])
                    times.extend(done["times"])
                publisher.done.wait(self.options.timeout_s)
                cpu1 = self.cpu_snapshot()
                latencies = [t - t0 for t in times]
                rounds.append(
                    {
                        "round": round_no,
                        "subscribers": n,
                        "received": len(times),
                        "received_99pct_s": since(t0, nth_time(times, 0.99, n)),
                        "received_all_s": since(t0, nth_time(times, 1.0, n)),
                        "all_pubacks_s": since(t0, publisher.last_puback_at),
                        "latency_s": {
                            "p50": rounded(percentile(latencies, 50)),
                            "p99": rounded(percentile(latencies, 99)),
                        },
                        "cpu_s": self.cpu_delta(cpu0, cpu1),
                        "quiet_before": quiet,
                    }
                )
                time.sleep(self.options.settle_s)
            for worker in workers:
                worker.send("QUIT")
            for worker in workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(timeout=30)
            return rounds
        finally:
            for worker in workers:
                worker.stop(10)
                self.bare_pids.remove(worker.pid)

    def broker_warnings(self) -> list[str]:
        assert self.broker is not None
        log = self.broker.log_path
        if not log.exists():
            return []
        interesting = re.compile(r"drop|warning|error|exceed|too many", re.IGNORECASE)
        return [line for line in log.read_text(errors="replace").splitlines() if interesting.search(line)][
            :50
        ]


def median_of(rounds: list[dict[str, Any]], *path: str) -> float | None:
    values: list[float] = []
    for item in rounds:
        value: Any = item
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            values.append(float(value))
    return round(statistics.median(values), 4) if values else None


def run_size(n: int, options: Options) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"wardcast-bench-{n}-"))
    print(f"\n== N = {n:,} (work dir {workdir})", flush=True)
    with contextlib.ExitStack() as stack:
        if not options.keep:
            stack.callback(shutil.rmtree, workdir, True)
        run = SizeRun(n=n, options=options, workdir=workdir, stack=stack)
        step = time.monotonic()

        def progress(what: str) -> None:
            nonlocal step
            print(f"   {what} ({time.monotonic() - step:.1f} s)", flush=True)
            step = time.monotonic()

        run.start_broker()
        run.start_controller()
        progress(f"broker on :{run.port}, controller on :{run.http_port}")
        run.seed()
        progress(f"{run.setup['areas']} areas, {n:,} speakers registered")
        run.start_fleet()
        progress(f"fleet ready ({options.processes} processes)")
        run.wait_devices_online()
        progress("controller sees every device online")
        observer = AckObserver(workdir, run.port, run.controller_account)
        stack.callback(observer.close)
        run.observer_pids.append(observer.pid)
        run.warm_up(observer)
        assert run.controller is not None
        idle = memory_mib(run.controller.pid)
        controller_rounds = []
        for round_no in range(1, options.rounds + 1):
            result = run.controller_round(observer, None, round_no)
            controller_rounds.append(result)
            progress(
                f"controller round {round_no}: 99% playing {result['playing_99pct_s']} s, "
                f"API {result['api_response_s']} s, controller CPU {result['controller_cpu_s']} s"
            )
        with_stream: dict[str, Any] | None = None
        sse: SseFollower | None = None
        if options.event_stream_round:
            sse = SseFollower(run.base_url, run.token)
            stack.callback(sse.close)
            with_stream = run.controller_round(observer, sse, options.rounds + 1)
            progress(
                f"controller round with /api/v1/events open: 99% playing {with_stream['playing_99pct_s']} s, "
                f"stream complete: {with_stream['event_stream']['complete']}"
            )
        # Stopped before the stream is closed: the controller ends it, instead of a read blocked until a ping.
        run.stop_controller()
        if sse is not None:
            sse.close()
        progress("controller stopped")
        wipe_session(run.port, run.controller_account, CONTROLLER_CLIENT_ID)
        time.sleep(options.settle_s)
        publisher = RawPublisher(run.port, run.controller_account)
        stack.callback(publisher.close)
        # The retained states of every device arrive on subscribing; let them drain first.
        wait_until(lambda: publisher.inbound >= n, 30, interval=0.05)
        time.sleep(options.settle_s)
        raw_rounds = []
        for round_no in range(1, options.rounds + 1):
            result = run.raw_round(observer, publisher, round_no)
            raw_rounds.append(result)
            progress(f"raw publisher round {round_no}: 99% playing {result['playing_99pct_s']} s")
        raw_area_rounds = []
        for round_no in range(1, options.rounds + 1):
            result = run.raw_round(observer, publisher, round_no, area=True)
            raw_area_rounds.append(result)
            progress(f"raw area command round {round_no}: 99% playing {result['playing_99pct_s']} s")
        bare_error: str | None = None
        try:
            bare_rounds = run.bare_phase(publisher)
            progress("bare fan-out: " + ", ".join(f"{r['received_all_s']} s" for r in bare_rounds))
        except BenchError as error:
            # N more subscribers next to N devices can exceed the machine's file limit (20,000 at N =
            # 10,000); the controller and raw figures stand without this baseline.
            bare_rounds, bare_error = [], str(error)[:500]
            progress(f"bare fan-out not measured: {bare_error[:120]}")
        controller_99 = median_of(controller_rounds, "playing_99pct_s")
        raw_99 = median_of(raw_rounds, "playing_99pct_s")
        raw_area_99 = median_of(raw_area_rounds, "playing_99pct_s")
        bare_99 = median_of(bare_rounds, "received_99pct_s")
        bare_all = median_of(bare_rounds, "received_all_s")
        return {
            "n": n,
            "setup": run.setup,
            "controller_idle_rss_mib": idle.get("VmRSS"),
            "controller_with_event_stream": with_stream,
            "controller_profile": run.profile_summary() if options.profile_controller else None,
            "controller": {
                "rounds": controller_rounds,
                "median": {
                    "playing_99pct_s": controller_99,
                    "playing_all_s": median_of(controller_rounds, "playing_all_s"),
                    "latency_p50_s": median_of(controller_rounds, "latency_s", "p50"),
                    "latency_p99_s": median_of(controller_rounds, "latency_s", "p99"),
                    "latency_max_s": median_of(controller_rounds, "latency_s", "max"),
                    "api_response_s": median_of(controller_rounds, "api_response_s"),
                    "sent_stamp_last_s": median_of(controller_rounds, "controller_sent_stamps", "last_s"),
                    "delivered_max_s": median_of(controller_rounds, "device_stamped_s", "delivered_max"),
                    "completed_all_s": median_of(controller_rounds, "completed_all_s"),
                    "processed_playing_99pct_s": median_of(
                        controller_rounds, "controller_processed", "playing_99pct_s"
                    ),
                    "processed_completed_all_s": median_of(
                        controller_rounds, "controller_processed", "completed_all_s"
                    ),
                    "controller_cpu_s": median_of(controller_rounds, "controller_cpu_s"),
                    "foreign_cpu_s": median_of(controller_rounds, "cpu_s", "foreign"),
                    "controller_peak_rss_mib": median_of(controller_rounds, "controller_peak_rss_mib"),
                },
            },
            "raw_publisher": {
                "rounds": raw_rounds,
                "median": {
                    "playing_99pct_s": raw_99,
                    "playing_all_s": median_of(raw_rounds, "playing_all_s"),
                    "latency_p50_s": median_of(raw_rounds, "latency_s", "p50"),
                    "latency_p99_s": median_of(raw_rounds, "latency_s", "p99"),
                    "latency_max_s": median_of(raw_rounds, "latency_s", "max"),
                    "all_pubacks_s": median_of(raw_rounds, "all_pubacks_s"),
                    "delivered_max_s": median_of(raw_rounds, "device_stamped_s", "delivered_max"),
                    "completed_all_s": median_of(raw_rounds, "completed_all_s"),
                    "foreign_cpu_s": median_of(raw_rounds, "cpu_s", "foreign"),
                },
            },
            "raw_area_command": {
                "rounds": raw_area_rounds,
                "median": {
                    "playing_99pct_s": raw_area_99,
                    "playing_all_s": median_of(raw_area_rounds, "playing_all_s"),
                    "latency_p50_s": median_of(raw_area_rounds, "latency_s", "p50"),
                    "latency_p99_s": median_of(raw_area_rounds, "latency_s", "p99"),
                    "completed_all_s": median_of(raw_area_rounds, "completed_all_s"),
                    "foreign_cpu_s": median_of(raw_area_rounds, "cpu_s", "foreign"),
                },
            },
            "bare_fanout": {
                "rounds": bare_rounds,
                "error": bare_error,
                "median": {
                    "received_99pct_s": bare_99,
                    "received_all_s": bare_all,
                    "all_pubacks_s": median_of(bare_rounds, "all_pubacks_s"),
                    "foreign_cpu_s": median_of(bare_rounds, "cpu_s", "foreign"),
                },
            },
            "ratios": {
                "controller_over_raw": round(controller_99 / raw_99, 2) if controller_99 and raw_99 else None,
                "controller_over_raw_area": round(controller_99 / raw_area_99, 2)
                if controller_99 and raw_area_99
                else None,
                "controller_over_bare": round(controller_99 / bare_99, 2)
                if controller_99 and bare_99
                else None,
                "raw_over_bare": round(raw_99 / bare_99, 2) if raw_99 and bare_99 else None,
            },
            "broker_log": run.broker_warnings(),
            "observer_malformed": observer.malformed,
        }


# -- output --------------------------------------------------------------------------------------------


def fmt(value: Any, unit: str = "s") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f} {unit}".strip() if unit == "s" else f"{value:g} {unit}".strip()
    return str(value)


def summary_table(results: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [("N", "figure", "controller", "raw paho (a)", "bare broker (b)")]
    for size in results:
        c, r, b = size["controller"]["median"], size["raw_publisher"]["median"], size["bare_fanout"]["median"]
        n = f"{size['n']:,}"
        rows += [
            (
                n,
                "99% playing / received",
                fmt(c["playing_99pct_s"]),
                fmt(r["playing_99pct_s"]),
                fmt(b["received_99pct_s"]),
            ),
            (
                n,
                "100% playing / received",
                fmt(c["playing_all_s"]),
                fmt(r["playing_all_s"]),
                fmt(b["received_all_s"]),
            ),
            (n, "latency p50", fmt(c["latency_p50_s"]), fmt(r["latency_p50_s"]), "—"),
            (n, "latency p99", fmt(c["latency_p99_s"]), fmt(r["latency_p99_s"]), "—"),
            (n, "latency max", fmt(c["latency_max_s"]), fmt(r["latency_max_s"]), "—"),
            (n, "API response", fmt(c["api_response_s"]), "—", "—"),
            (
                n,
                "last command reached a device",
                fmt(c["delivered_max_s"]),
                fmt(r["delivered_max_s"]),
                fmt(b["received_all_s"]),
            ),
            (n, "last PUBACK to the publisher", "—", fmt(r["all_pubacks_s"]), fmt(b["all_pubacks_s"])),
            (n, "last 'sent' stamp in the log", fmt(c["sent_stamp_last_s"]), "—", "—"),
            (n, "all completed (acks seen)", fmt(c["completed_all_s"]), fmt(r["completed_all_s"]), "—"),
            (n, "99% playing processed by ctl", fmt(c["processed_playing_99pct_s"]), "—", "—"),
            (n, "all completed processed by ctl", fmt(c["processed_completed_all_s"]), "—", "—"),
            (n, "controller CPU", fmt(c["controller_cpu_s"]), "—", "—"),
            (
                n,
                "CPU used by other jobs on the box",
                fmt(c["foreign_cpu_s"]),
                fmt(r["foreign_cpu_s"]),
                fmt(b["foreign_cpu_s"]),
            ),
            (n, "controller peak RSS", fmt(c["controller_peak_rss_mib"], "MiB"), "—", "—"),
            *(
                [
                    (
                        n,
                        "with /api/v1/events open: 99%",
                        fmt(size["controller_with_event_stream"]["playing_99pct_s"]),
                        "stream complete: "
                        + str(size["controller_with_event_stream"]["event_stream"]["complete"]).lower(),
                        "",
                    )
                ]
                if size.get("controller_with_event_stream")
                else []
            ),
            (
                n,
                "ratio controller / (a), / (b)",
                "",
                fmt(size["ratios"]["controller_over_raw"], "×"),
                fmt(size["ratios"]["controller_over_bare"], "×"),
            ),
            (
                n,
                "raw area command (c): 99% / p99",
                "",
                fmt(size["raw_area_command"]["median"]["playing_99pct_s"])
                + " / "
                + fmt(size["raw_area_command"]["median"]["latency_p99_s"]),
                "",
            ),
            (n, "ratio controller / (c)", "", fmt(size["ratios"]["controller_over_raw_area"], "×"), ""),
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_arguments(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", default="1000,5000", help="fleet sizes, comma-separated (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds per figure; medians are reported"
    )
    parser.add_argument("--processes", type=int, default=2, help="fleet (and bare subscriber) processes")
    parser.add_argument("--speed", type=float, default=50.0, help="simulated playback speed factor")
    parser.add_argument("--audio-seconds", type=float, default=2.0, help="length of the test audio")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for one phase, in seconds")
    parser.add_argument("--settle", type=float, default=1.5, help="pause between rounds, in seconds")
    parser.add_argument(
        "--controller-log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--register-concurrency", type=int, default=8, help="parallel device registrations")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each round, wait up to this long for other processes to leave the CPUs (default: 60)",
    )
    parser.add_argument(
        "--no-event-stream-round",
        dest="event_stream_round",
        action="store_false",
        help="skip the extra controller round measured with an /api/v1/events follower open",
    )
    parser.add_argument(
        "--profile-controller",
        action="store_true",
        help="run the controller under cProfile (slower; for finding where its time goes, not for figures)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directories (logs, DB)")
    parser.add_argument(
        "--output", type=Path, help="JSON file (default: bench/results/<benchmark>-<UTC>.json)"
    )
    parser.add_argument(
        "--via",
        choices=["broadcasts", "alerts"],
        default="broadcasts",
        help="the controller path measured: a broadcast, or an IOC alert (what bench/emergency.py runs)",
    )
    arguments = parser.parse_args(argv)
    sizes = [int(s) for s in arguments.sizes.split(",") if s.strip()]
    if not sizes or any(s < 2 for s in sizes) or arguments.rounds < 1 or arguments.processes < 1:
        parser.error("--sizes needs values >= 2; --rounds and --processes >= 1")
    return Options(
        sizes=sizes,
        rounds=arguments.rounds,
        processes=arguments.processes,
        speed=arguments.speed,
        audio_s=arguments.audio_seconds,
        timeout_s=arguments.timeout,
        settle_s=arguments.settle,
        controller_log_level=arguments.controller_log_level,
        register_concurrency=arguments.register_concurrency,
        event_stream_round=arguments.event_stream_round,
        quiet_wait_s=arguments.quiet_wait,
        profile_controller=arguments.profile_controller,
        keep=arguments.keep,
        output=arguments.output,
        via=arguments.via,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    name = "emergency" if options.via == "alerts" else "fanout"
    output = options.output or RESULTS_DIR / f"{name}-{stamp}.json"
    document: dict[str, Any] = {
        "benchmark": name,
        "issue": 4 if options.via == "alerts" else 2,
        "started_at": rfc3339(started),
        "machine": machine_info(),
        "parameters": {
            "sizes": options.sizes,
            "via": options.via,
            "rounds": options.rounds,
            "fleet_processes": options.processes,
            "fleet_protocol": "3.1.1",
            "controller_protocol": "5",
            "speed": options.speed,
            "audio_seconds": options.audio_s,
            "shared_media_cache": True,
            "database": "sqlite",
            "controller_log_level": options.controller_log_level,
            "controller_profiled": options.profile_controller,
            "publish_window": f"min({PUBLISH_WINDOW}, the broker's Receive Maximum), as in drivers/mqtt.py",
            "areas": {"cities": 1, "wards": WARDS, "groups": WARDS * GROUPS_PER_WARD},
            "qos": 1,
            "host": HOST,
        },
        "sizes": [],
    }
    with sigterm_as_interrupt():
        try:
            for n in options.sizes:
                document["sizes"].append(run_size(n, options))
        except KeyboardInterrupt:
            print("\ninterrupted; everything started has been stopped", file=sys.stderr)
            return 130
        except (BenchError, httpx.HTTPError, OSError) as error:
            # Also what a Ctrl-C to the whole process group looks like: the children stop first.
            print(f"\nbenchmark failed: {error!r}; everything started has been stopped", file=sys.stderr)
            document["failed"] = repr(error)[:2000]
            partial = output.with_name(output.stem + "-partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
            print(f"what was measured before the failure: {partial}", file=sys.stderr)
            return 1
    document["finished_at"] = rfc3339(datetime.now(UTC))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print()
    print(summary_table(document["sizes"]))
    print("\nshared media cache: on (one media download per fleet process; the figures are the command path)")
    print(f"results: {output.relative_to(REPO) if output.is_relative_to(REPO) else output}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare-worker"]:
        sys.exit(bare_worker_main())
    if sys.argv[1:2] == ["--observer-worker"]:
        sys.exit(observer_worker_main())
    sys.exit(main())
