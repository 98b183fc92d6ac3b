"""Thousands of simulated speakers (and LED screens, and MQTT sensors), in one process or split over several.

    python -m firmware_sim fleet --mqtt-url mqtt://127.0.0.1:1883 --credentials bundles.json --speed 20
    python -m firmware_sim fleet --mqtt-url mqtt://127.0.0.1:1883 --username wardcast.simulator \\
        --password … --count 5000 --prefix sim- --speed 20

`--credentials` connects each device with the broker account of its provisioning bundle (as the
controller issues them, docs/protocol.md §1.13); `--username`/`--password` is the simulation-only shared
account (§1.7) for the devices without one.

prints `READY <n>` on stdout once every device is connected and subscribed, and shuts every device
down cleanly (retained `offline`, reason `shutdown`) on SIGTERM or SIGINT, then exits 0.
Speakers are simulated by default; `--kinds speaker,led_screen,sensor` also starts the networked LED
screens (firmware_sim/screen.py) and the MQTT sensors (firmware_sim/mqtt_sensor.py) that `--csv` and
`--from-api` list.

Sensors publish telemetry every `--sensor-interval` seconds (one reading per `--sensor-metrics` entry in
each document), their first document at a random instant within one interval. N sensors thus offer
N / interval documents a second: 10,000 sensors at `--sensor-interval 0.5` offer 20,000 a second.

Two files let another process steer and watch a running fleet without a channel of its own (every
worker process reads and writes them itself, so they work the same with `--processes`):

- `--control FILE`: a JSON document, re-read within `CONTROL_POLL_S` whenever it changes (write it to a
  temporary name and rename it over the old one, so that no reader sees half of it), e.g.
  `{"sensor_interval_s": 0.5, "forced": {"sen-00001": {"water_level": 3.4}}}`: every sensor's interval
  (absent: `--sensor-interval`), and metrics held at a value (a metric no longer listed walks again).
  A missing file is an empty document; a malformed one is logged and the previous one stays in force.
  `"faults": {"sim-00002": ["silent"], "sim-00003": ["amplifier"]}` injects faults into any device
  (firmware_sim/device.py `FAULTS`: `silent` stays connected but publishes no state, `amplifier` and
  `speaker` fail a test tone's self-test); a device not listed has none.
- `--stats FILE`: every `--stats-interval` seconds each process appends one JSON line of its sensors'
  counters: `{"pid", "at" (Unix time), "sensors", "published", "acknowledged", "skipped", "late"}`
  (totals since the process started; see `TelemetryCounters`), and a last line when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, cast, get_args

import httpx

from firmware_sim import signature, wire
from firmware_sim.device import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_HTTP_CONNECTIONS,
    FAULTS,
    BrokerSettings,
    MqttDevice,
    MqttProtocol,
    parse_mqtt_url,
)
from firmware_sim.firmware import FirmwareFaults, decode_public_key, failing_devices
from firmware_sim.lifecycle import stop_on_signals
from firmware_sim.mqtt_sensor import (
    DEFAULT_INTERVAL_S,
    DEFAULT_METRICS,
    QUANTITIES,
    SensorConfigError,
    SensorControl,
    SimulatedMqttSensor,
    TelemetryCounters,
    check_interval,
    check_metrics,
)
from firmware_sim.screen import SimulatedLedScreen
from firmware_sim.speaker import SimulatedSpeaker, SpeakerRuntime
from firmware_sim.wire import Clock, utc_now

logger = logging.getLogger(__name__)

READY_PREFIX: Final = "READY"
PASSWORD_ENVIRONMENT_VARIABLE: Final = "WARDCAST_SIM_MQTT_PASSWORD"  # noqa: S105 - a variable name
WORKER_COMMAND: Final = "fleet-worker"
_EXIT_OK: Final = 0
_EXIT_FAILED: Final = 1
_EXIT_USAGE: Final = 2
_WORKER_STOP_TIMEOUT_S: Final = 60.0
# How often a process looks at its control file: a stat() call, cheap enough to do often.
CONTROL_POLL_S: Final = 0.25
DEFAULT_STATS_INTERVAL_S: Final = 1.0

DeviceKind = Literal["speaker", "led_screen", "sensor"]
DEVICE_KINDS: Final[tuple[DeviceKind, ...]] = get_args(DeviceKind)
# The registry's kinds each simulated kind stands for: a wired zone (protocol §3.4) is played by the
# smart-radio receiver at its amplifier's input, a speaker as far as the wire goes.
_REGISTERED_AS: Final[dict[str, tuple[str, ...]]] = {"speaker": ("speaker", "wired_zone")}
SPEAKERS_ONLY: Final[tuple[DeviceKind, ...]] = ("speaker",)
_T = TypeVar("_T")


class FleetError(RuntimeError):
    """The fleet could not be assembled or could not connect."""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    broker: BrokerSettings
    # The speakers' addresses.
    addresses: tuple[str, ...]
    speed: float = 1.0
    play_log: Path | None = None
    shared_media_cache: bool = False
    connect_concurrency: int = 100
    connect_timeout_s: float = 60.0
    http_connections: int = DEFAULT_HTTP_CONNECTIONS
    # The LED screens' addresses (§1.11).
    screens: tuple[str, ...] = ()
    # The MQTT sensors' addresses, and what they publish (firmware_sim/mqtt_sensor.py).
    sensors: tuple[str, ...] = ()
    sensor_interval_s: float = DEFAULT_INTERVAL_S
    sensor_metrics: tuple[str, ...] = DEFAULT_METRICS
    # Seeds the sensors' random walks and first-publish instants (with each sensor's address).
    seed: int = 1
    # The control file and the stats file (see the module's docstring).
    control: Path | None = None
    stats: Path | None = None
    stats_interval_s: float = DEFAULT_STATS_INTERVAL_S
    # address → (username, password): devices that connect with their own broker account
    # (`--credentials`); the others use `broker`'s.
    credentials: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    # Every device republishes its state this often (docs/protocol.md §1.5).
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    # The controller's public key, base64 (docs/protocol.md §1.15): every command and programme is
    # verified with it. None: the devices accept nothing (each message is refused `no_key`).
    command_key: str | None = None
    # Firmware updates (docs/protocol.md §1.16): the trusted signing keys (base64), the device seconds
    # an install takes, and faults: devices whose install fails (and rolls back), devices whose
    # download arrives corrupted, and a cut of every device's first download half-way.
    firmware_keys: tuple[str, ...] = ()
    install_s: float = 10.0
    fail_firmware: tuple[str, ...] = ()
    corrupt_firmware: tuple[str, ...] = ()
    cut_firmware_download_once: bool = False

    def devices(self) -> list[tuple[str, DeviceKind]]:
        """Every device of the fleet with its kind: speakers, then LED screens, then sensors."""
        return (
            [(address, "speaker") for address in self.addresses]
            + [(address, "led_screen") for address in self.screens]
            + [(address, "sensor") for address in self.sensors]
        )

    def to_json(self) -> str:
        document = dataclasses.asdict(self)
        for name in _PATH_FIELDS:
            path = document[name]
            document[name] = str(path) if path is not None else None
        return json.dumps(document)

    @classmethod
    def from_json(cls, text: str) -> FleetConfig:
        document = json.loads(text)

        def path(name: str) -> Path | None:
            value = document.pop(name, None)
            return Path(value) if value is not None else None

        return cls(
            broker=BrokerSettings(**document.pop("broker")),
            addresses=tuple(document.pop("addresses")),
            screens=tuple(document.pop("screens", ())),
            sensors=tuple(document.pop("sensors", ())),
            sensor_metrics=tuple(document.pop("sensor_metrics", DEFAULT_METRICS)),
            firmware_keys=tuple(document.pop("firmware_keys", ())),
            fail_firmware=tuple(document.pop("fail_firmware", ())),
            corrupt_firmware=tuple(document.pop("corrupt_firmware", ())),
            play_log=path("play_log"),
            control=path("control"),
            stats=path("stats"),
            credentials={
                address: (username, password)
                for address, (username, password) in document.pop("credentials", {}).items()
            },
            **document,
        )


_PATH_FIELDS: Final = ("play_log", "control", "stats")


class Fleet:
    """Every speaker, LED screen and sensor of `config` in this process; entering returns once all are
    subscribed (and, with a control or stats file, watching or writing it).

    async with Fleet(config) as fleet:
        fleet.speakers["sim-00001"].playing
        fleet.screens["led-00001"].headline
        fleet.sensors["sen-00001"].set_value("water_level", 3.4)
    """

    def __init__(self, config: FleetConfig, *, clock: Clock = utc_now) -> None:
        for address, _ in config.devices():
            if not wire.is_valid_address(address):
                raise FleetError(f"{address!r} is not a device address ({wire.ADDRESS_PATTERN.pattern})")
        self.config = config
        self.runtime = SpeakerRuntime(
            config.broker,
            speed=config.speed,
            clock=clock,
            play_log=config.play_log,
            shared_media_cache=config.shared_media_cache,
            http_connections=config.http_connections,
            credentials=config.credentials,
            heartbeat_s=config.heartbeat_s,
            command_key=signature.CommandKey.from_text(config.command_key) if config.command_key else None,
            firmware_keys=[decode_public_key(key) for key in config.firmware_keys],
            install_s=config.install_s,
        )
        # What this process's sensors did, for the stats file (and tests).
        self.counters = TelemetryCounters()
        self._sensors: dict[str, SimulatedMqttSensor] = {}
        self._control_key: tuple[int, int, int] | None = None
        self._side_tasks: list[asyncio.Task[None]] = []

    @property
    def speakers(self) -> Mapping[str, SimulatedSpeaker]:
        return self.runtime.speakers

    @property
    def screens(self) -> Mapping[str, SimulatedLedScreen]:
        return self.runtime.screens

    @property
    def sensors(self) -> Mapping[str, SimulatedMqttSensor]:
        return self._sensors

    def __len__(self) -> int:
        return len(self.runtime.devices)

    async def __aenter__(self) -> Self:
        try:
            await self.runtime.__aenter__()
        except OSError as error:
            raise FleetError(f"cannot reach the broker {self.config.broker.host}: {error}") from error
        try:
            self._make_sensors()
            await self._connect_all()
        except BaseException:
            await self.runtime.__aexit__(None, None, None)
            raise
        loop = asyncio.get_running_loop()
        if self.config.control is not None:
            self._side_tasks.append(loop.create_task(self._watch_control(self.config.control)))
        if self.config.stats is not None:
            self._side_tasks.append(loop.create_task(self._write_stats(self.config.stats)))
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        tasks, self._side_tasks = self._side_tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.runtime.__aexit__(None, None, None)
        finally:
            if self.config.stats is not None:
                self._append_stats(self.config.stats)

    def _make_sensors(self) -> None:
        config = self.config
        try:
            for address in config.sensors:
                self._sensors[address] = self.runtime.add(
                    SimulatedMqttSensor(
                        self.runtime,
                        address,
                        metrics=config.sensor_metrics,
                        interval_s=config.sensor_interval_s,
                        seed=config.seed,
                        counters=self.counters,
                    )
                )
        except SensorConfigError as error:
            raise FleetError(f"the sensors cannot be made: {error}") from error
        if config.control is not None:
            # Before the first connect, so that the first documents already follow the file.
            self._reload_control(config.control)

    async def _connect_all(self) -> None:
        # Bounded so that thousands of CONNECTs (each a password check on the broker) arrive as a
        # steady stream instead of one storm.
        gate = asyncio.Semaphore(self.config.connect_concurrency)

        async def connect(device: MqttDevice[Any, Any]) -> None:
            async with gate:
                await device.start(timeout=self.config.connect_timeout_s)

        devices: list[MqttDevice[Any, Any]] = [
            self.runtime.speaker(address) for address in self.config.addresses
        ]
        devices += [self.runtime.led_screen(address) for address in self.config.screens]
        devices += self._sensors.values()
        failing, corrupt = set(self.config.fail_firmware), set(self.config.corrupt_firmware)
        for device in devices:
            device.firmware.faults = FirmwareFaults(
                fail_install=device.address in failing,
                cut_download_once=self.config.cut_firmware_download_once,
                corrupt_download=device.address in corrupt,
            )
        results = await asyncio.gather(*(connect(device) for device in devices), return_exceptions=True)
        failures = [
            (device, result) for device, result in zip(devices, results, strict=True) if result is not None
        ]
        for _, result in failures:
            if isinstance(result, asyncio.CancelledError):
                raise result
        if failures:
            device, first = failures[0]
            noun = "devices" if self.config.screens or self.config.sensors else "speakers"
            raise FleetError(
                f"{len(failures)} of {len(devices)} {noun} could not connect; {device.address}: {first!r}"
            ) from first

    # The control file and the stats file

    async def _watch_control(self, path: Path) -> None:
        while True:
            await asyncio.sleep(CONTROL_POLL_S)
            self._reload_control(path)

    def _reload_control(self, path: Path) -> None:
        """Applies the control file if it changed since the last look (a missing file is empty)."""
        try:
            status = path.stat()
            key = (status.st_ino, status.st_mtime_ns, status.st_size)
        except FileNotFoundError:
            key = (0, 0, -1)
        except OSError as error:
            logger.warning("cannot look at the control file %s: %s", path, error)
            return
        if key == self._control_key:
            return
        try:
            text = path.read_text(encoding="utf-8") if key[2] >= 0 else ""
            control = SensorControl.parse(text)
        except FileNotFoundError:
            control = SensorControl()  # removed between the stat() and the read
        except (OSError, UnicodeDecodeError, SensorConfigError) as error:
            logger.warning("the control file %s was not applied: %s", path, error)
            self._control_key = key  # said once; the next change is looked at again
            return
        try:
            faults = parse_faults(text)
        except ValueError as error:
            logger.warning("the control file %s was not applied: %s", path, error)
            self._control_key = key
            return
        self._control_key = key
        control.apply(self._sensors.values(), self.config.sensor_interval_s)
        for address, device in self.runtime.devices.items():
            wanted = faults.get(address, frozenset())
            if device.faults != wanted:
                device.set_faults(wanted)
        logger.info(
            "control file applied: interval %s s, %d sensors forced",
            control.interval_s or self.config.sensor_interval_s,
            len(control.forced),
        )

    async def _write_stats(self, path: Path) -> None:
        while True:
            self._append_stats(path)
            await asyncio.sleep(self.config.stats_interval_s)

    def _append_stats(self, path: Path) -> None:
        counters = self.counters
        line = json.dumps(
            {
                "pid": os.getpid(),
                "at": time.time(),
                "sensors": len(self._sensors),
                "published": counters.published,
                "acknowledged": counters.acknowledged,
                "skipped": counters.skipped,
                "late": counters.late,
            }
        )
        try:
            # One write() of a short line on an O_APPEND descriptor: the processes of a fleet share the
            # file without interleaving their lines.
            descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, (line + "\n").encode())
            finally:
                os.close(descriptor)
        except OSError as error:
            logger.warning("cannot append to the stats file %s: %s", path, error)


class ControlFileError(ValueError):
    """The control file says something the fleet cannot apply."""


def parse_faults(text: str) -> dict[str, frozenset[str]]:
    """The control file's `faults`: `{"address": ["silent", "amplifier", ...]}` (the whole truth: a
    device not listed has none); raises `ControlFileError` (or `ValueError`: not JSON) naming what is
    wrong."""
    document = json.loads(text) if text.strip() else {}
    if not isinstance(document, dict):
        raise ControlFileError("the control file must hold a JSON object")
    listed = document.get("faults") or {}
    if not isinstance(listed, dict):
        raise ControlFileError("faults must map device addresses to lists of faults")
    faults: dict[str, frozenset[str]] = {}
    for address, names in listed.items():
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ControlFileError(f"faults.{address} must be a list of fault names")
        unknown = set(names) - FAULTS
        if unknown:
            raise ControlFileError(f"faults.{address}: unknown {sorted(unknown)}; known: {sorted(FAULTS)}")
        faults[str(address)] = frozenset(names)
    return faults


async def run_fleet(
    config: FleetConfig,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    *,
    clock: Clock = utc_now,
) -> int:
    """Runs the fleet until `stop` is set (or the task is cancelled); sets `ready` once all are
    subscribed. Returns the number of devices that ran."""
    async with Fleet(config, clock=clock) as fleet:
        if ready is not None:
            ready.set()
        await (stop.wait() if stop is not None else asyncio.get_running_loop().create_future())
        return len(fleet)


# Where the addresses come from


def addresses_from_csv(path: Path) -> list[str]:
    """The `address` column of the rows whose optional `kind` column is empty or `speaker`."""
    return [address for address, _ in devices_from_csv(path)]


def devices_from_csv(path: Path, kinds: Iterable[DeviceKind] = SPEAKERS_ONLY) -> list[tuple[str, DeviceKind]]:
    """(address, kind) of the rows whose `kind` is one of `kinds`; an empty or missing `kind` is a
    speaker, and rows of other kinds (sensors, …) are left out."""
    wanted = frozenset(kinds)
    with path.open(newline="", encoding="utf-8-sig") as source:
        reader = csv.DictReader(source)
        if reader.fieldnames is None or "address" not in reader.fieldnames:
            raise FleetError(f"{path}: the CSV has no 'address' column")
        devices: list[tuple[str, DeviceKind]] = []
        for line_number, row in enumerate(reader, start=2):
            kind = (row.get("kind") or "").strip().lower() or "speaker"
            if kind not in wanted:
                continue
            address = (row.get("address") or "").strip()
            if not address:
                raise FleetError(f"{path}:{line_number}: the address is empty")
            devices.append((address, cast("DeviceKind", kind)))
        return devices


def addresses_from_api(base_url: str, token: str, *, timeout_s: float = 30.0) -> list[str]:
    """The MQTT speakers the controller knows: GET {base_url}/api/v1/devices?kind=speaker."""
    return [address for address, _ in devices_from_api(base_url, token, timeout_s=timeout_s)]


def devices_from_api(
    base_url: str, token: str, kinds: Iterable[DeviceKind] = SPEAKERS_ONLY, *, timeout_s: float = 30.0
) -> list[tuple[str, DeviceKind]]:
    """(address, kind) of the MQTT devices of `kinds` the controller knows: one
    GET {base_url}/api/v1/devices?kind=… per kind."""
    url = f"{base_url.rstrip('/')}/api/v1/devices"
    devices: list[tuple[str, DeviceKind]] = []
    wanted = [(kind, listed) for kind in kinds for listed in _REGISTERED_AS.get(kind, (kind,))]
    for kind, listed in wanted:
        try:
            response = httpx.get(
                url, params={"kind": listed}, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s
            )
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise FleetError(f"cannot list the devices at {url}: {error}") from error
        items = document.get("items") if isinstance(document, dict) else document
        if not isinstance(items, list):
            raise FleetError(f"{url} answered neither a list of devices nor an object with 'items'")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("address"), str):
                raise FleetError(f"{url}: a device without a string 'address': {item!r}")
            # The server filters by kind; a device that does not say its kind is taken at its word.
            if item.get("transport") == "mqtt" and item.get("kind", listed) == listed:
                devices.append((item["address"], kind))
    return devices


def devices_from_credentials(
    path: Path, kinds: Iterable[DeviceKind] = SPEAKERS_ONLY
) -> tuple[list[tuple[str, DeviceKind]], dict[str, tuple[str, str]]]:
    """The devices of a file of provisioning bundles (docs/protocol.md §1.13: a JSON list of bundles, as
    the controller's POST /api/v1/devices/credentials answers, or one bundle per line) whose kind is one
    of `kinds`, and each one's own broker account (address → (username, password)). Every bundle's
    account is returned, whatever its kind, so that devices listed elsewhere can use it too."""
    wanted = frozenset(kinds)
    devices: list[tuple[str, DeviceKind]] = []
    credentials: dict[str, tuple[str, str]] = {}
    for index, bundle in enumerate(_read_bundles(path)):
        fields = {name: bundle.get(name) if isinstance(bundle, dict) else None for name in _BUNDLE_FIELDS}
        missing = [name for name, value in fields.items() if not isinstance(value, str)]
        if missing:
            raise FleetError(f"{path}: bundle {index} has no string {', '.join(missing)}")
        address, kind = str(fields["address"]), str(fields["kind"])
        credentials[address] = (str(fields["username"]), str(fields["password"]))
        simulated_as = next((k for k, listed in _REGISTERED_AS.items() if kind in listed), kind)
        if simulated_as in wanted:
            devices.append((address, simulated_as))
    return devices, credentials


_BUNDLE_FIELDS: Final = ("address", "kind", "username", "password")


def _read_bundles(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise FleetError(f"cannot read {path}: {error}") from error
    try:
        stripped = text.strip()
        bundles: Any = (
            json.loads(stripped)
            if stripped.startswith("[")
            else [json.loads(line) for line in stripped.splitlines() if line.strip()]
        )
    except ValueError as error:
        raise FleetError(f"{path}: not a JSON list of bundles nor one bundle per line: {error}") from error
    return bundles if isinstance(bundles, list) else []


def command_key_from_bundles(path: Path) -> str | None:
    """The controller's public key that provisioning bundles carry (`command_key`, §1.13): the one
    every bundle of the file names, None when none does; bundles naming different keys are an error."""
    keys = {
        bundle["command_key"]
        for bundle in _read_bundles(path)
        if isinstance(bundle, dict) and isinstance(bundle.get("command_key"), str)
    }
    if len(keys) > 1:
        raise FleetError(f"{path}: the bundles name {len(keys)} different command keys")
    return next(iter(keys), None)


def command_key_from_api(base_url: str, token: str, *, timeout_s: float = 30.0) -> str:
    """The controller's public command key (base64): GET {base_url}/api/v1/command-key."""
    url = f"{base_url.rstrip('/')}/api/v1/command-key"
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)
        response.raise_for_status()
        document = response.json()
    except (httpx.HTTPError, ValueError) as error:
        raise FleetError(f"cannot fetch the command key at {url}: {error}") from error
    key = document.get("public_key") if isinstance(document, dict) else None
    if not isinstance(key, str):
        raise FleetError(f"{url} answered no string 'public_key'")
    return key


def generated_addresses(count: int, prefix: str, start: int = 1) -> list[str]:
    """`{prefix}{index:05d}` for index = start … start + count - 1, e.g. sim-00001."""
    return [f"{prefix}{index:05d}" for index in range(start, start + count)]


def _unique(devices: Iterable[tuple[str, DeviceKind]]) -> list[tuple[str, DeviceKind]]:
    """Each address once, with the kind of its first mention."""
    first: dict[str, DeviceKind] = {}
    for address, kind in devices:
        first.setdefault(address, kind)
    return list(first.items())


def _by_kind(
    devices: Sequence[tuple[str, DeviceKind]],
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The speakers', LED screens' and sensors' addresses, for `FleetConfig.addresses`, `.screens` and
    `.sensors`."""
    return (
        tuple(address for address, kind in devices if kind == "speaker"),
        tuple(address for address, kind in devices if kind == "led_screen"),
        tuple(address for address, kind in devices if kind == "sensor"),
    )


def split_evenly(addresses: Sequence[_T], parts: int) -> list[tuple[_T, ...]]:
    size, extra = divmod(len(addresses), parts)
    chunks, begin = [], 0
    for part in range(parts):
        end = begin + size + (1 if part < extra else 0)
        chunks.append(tuple(addresses[begin:end]))
        begin = end
    return [chunk for chunk in chunks if chunk]


# Command line


def build_parser(prog: str = "python -m firmware_sim fleet") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Simulated smart-radio speakers, LED screens and MQTT sensors speaking Wardcast MQTT "
        "(docs/protocol.md §1).",
    )
    broker = parser.add_argument_group("broker")
    broker.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="mqtt://host:port")
    broker.add_argument(
        "--username",
        help="a shared account for the devices without their own in --credentials (simulation only)",
    )
    broker.add_argument(
        "--password", help=f"the shared account's password (default: ${PASSWORD_ENVIRONMENT_VARIABLE})"
    )
    broker.add_argument("--protocol", choices=get_args(MqttProtocol), default="3.1.1")
    broker.add_argument("--keepalive", type=int, default=30, metavar="SECONDS")
    broker.add_argument(
        "--connect-concurrency",
        type=int,
        default=100,
        metavar="N",
        help="MQTT handshakes in flight at once per process (default: %(default)s)",
    )
    devices = parser.add_argument_group("devices (combined, duplicates dropped)")
    devices.add_argument(
        "--csv", type=Path, metavar="FILE", help="a CSV with an 'address' and an optional 'kind' column"
    )
    devices.add_argument(
        "--from-api", metavar="URL", help="the controller's base URL, to list its MQTT devices of --kinds"
    )
    devices.add_argument("--token", help="the API bearer token for --from-api")
    devices.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="provisioning bundles (a JSON list, or one per line): each device of --kinds in it is simulated "
        "and connects with its own username and password (docs/protocol.md §1.13)",
    )
    devices.add_argument(
        "--kinds",
        default="speaker",
        metavar="K,K",
        help=f"the kinds --csv and --from-api start, of {', '.join(DEVICE_KINDS)} (default: %(default)s); "
        "--addresses and --count are speakers",
    )
    devices.add_argument("--addresses", metavar="A,B,C", help="comma-separated addresses")
    devices.add_argument("--count", type=int, default=0, metavar="N", help="generate N addresses")
    devices.add_argument(
        "--prefix", default="sim-", help="prefix of generated addresses (default: %(default)s)"
    )
    devices.add_argument(
        "--start", type=int, default=1, help="first index of generated addresses (default: 1)"
    )
    keys = parser.add_argument_group(
        "command verification (docs/protocol.md §1.15; speakers and screens refuse what they cannot verify)"
    )
    keys.add_argument(
        "--command-key",
        metavar="BASE64",
        help="the controller's public key, as `wardcast command-key show` prints it "
        "(default with --from-api: fetched from the controller)",
    )
    keys.add_argument(
        "--command-key-file", type=Path, metavar="FILE", help="a file holding that key (base64 or PEM)"
    )
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument("--speed", type=float, default=1.0, help="playback runs this many times faster")
    behaviour.add_argument("--processes", type=int, default=1, help="split the fleet over N worker processes")
    behaviour.add_argument(
        "--play-log", type=Path, metavar="FILE", help="append a JSON line per device event here"
    )
    behaviour.add_argument(
        "--shared-media-cache",
        action="store_true",
        help="speakers of one process reuse media another one already fetched and verified (load tests)",
    )
    behaviour.add_argument(
        "--http-connections",
        type=int,
        default=DEFAULT_HTTP_CONNECTIONS,
        metavar="N",
        help="media download connections per process (default: %(default)s)",
    )
    behaviour.add_argument(
        "--heartbeat",
        type=float,
        default=DEFAULT_HEARTBEAT_S,
        metavar="SECONDS",
        help="every device republishes its state this often (default: %(default)s)",
    )
    behaviour.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    firmware = parser.add_argument_group("firmware updates (docs/protocol.md §1.16)")
    firmware.add_argument(
        "--firmware-key",
        action="append",
        default=[],
        metavar="BASE64",
        help="a trusted Ed25519 firmware signing key (repeatable); without one every update is rejected",
    )
    firmware.add_argument(
        "--install-seconds",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="device seconds an install and reboot take, divided by --speed (default: %(default)s)",
    )
    firmware.add_argument(
        "--fail-firmware-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="this share of the devices (picked by a hash of the address) fails every install and rolls back",
    )
    firmware.add_argument(
        "--fail-firmware-devices", default="", metavar="A,B", help="devices whose installs fail and roll back"
    )
    firmware.add_argument(
        "--corrupt-firmware-devices",
        default="",
        metavar="A,B",
        help="devices whose downloads arrive corrupted",
    )
    firmware.add_argument(
        "--cut-firmware-download-once",
        action="store_true",
        help="cut each device's first firmware download half-way (it resumes with a Range request)",
    )
    sensors = parser.add_argument_group("sensors (--kinds sensor)")
    sensors.add_argument(
        "--sensor-interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help="seconds between a sensor's telemetry documents; N sensors offer N / SECONDS documents a "
        "second (default: %(default)s)",
    )
    sensors.add_argument(
        "--sensor-metrics",
        default=",".join(DEFAULT_METRICS),
        metavar="M,M",
        help=f"the readings in each document, of {', '.join(QUANTITIES)} (default: %(default)s)",
    )
    sensors.add_argument(
        "--seed", type=int, default=1, help="seeds the sensors' random walks and timing (default: 1)"
    )
    sensors.add_argument(
        "--control",
        type=Path,
        metavar="FILE",
        help="a JSON control file re-read when it changes: sensor_interval_s and forced values",
    )
    sensors.add_argument(
        "--stats", type=Path, metavar="FILE", help="append each process's sensor counters here as JSON lines"
    )
    sensors.add_argument(
        "--stats-interval",
        type=float,
        default=DEFAULT_STATS_INTERVAL_S,
        metavar="SECONDS",
        help="seconds between two lines of --stats (default: %(default)s)",
    )
    return parser


def _kinds(text: str) -> tuple[DeviceKind, ...]:
    kinds = [kind.strip().lower() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in DEVICE_KINDS]
    if unknown or not kinds:
        raise FleetError(f"--kinds takes a comma-separated list of {', '.join(DEVICE_KINDS)}, not {text!r}")
    return tuple(cast("DeviceKind", kind) for kind in dict.fromkeys(kinds))


def config_from_arguments(arguments: argparse.Namespace) -> FleetConfig:
    if arguments.speed <= 0:
        raise FleetError("--speed must be greater than 0")
    if arguments.processes < 1:
        raise FleetError("--processes must be at least 1")
    if arguments.connect_concurrency < 1:
        raise FleetError("--connect-concurrency must be at least 1")
    if arguments.http_connections < 1:
        raise FleetError("--http-connections must be at least 1")
    if not arguments.stats_interval > 0:
        raise FleetError("--stats-interval must be greater than 0")
    if not arguments.heartbeat > 0:
        raise FleetError("--heartbeat must be greater than 0")
    try:
        sensor_interval_s = check_interval(arguments.sensor_interval)
        sensor_metrics = check_metrics(
            [metric.strip() for metric in arguments.sensor_metrics.split(",") if metric.strip()]
        )
    except SensorConfigError as error:
        raise FleetError(f"--sensor-interval / --sensor-metrics: {error}") from error
    try:
        host, port = parse_mqtt_url(arguments.mqtt_url)
    except ValueError as error:
        raise FleetError(str(error)) from error
    kinds = _kinds(arguments.kinds)
    devices: list[tuple[str, DeviceKind]] = []
    credentials: dict[str, tuple[str, str]] = {}
    if arguments.credentials is not None:
        devices, credentials = devices_from_credentials(arguments.credentials, kinds)
    if arguments.csv is not None:
        try:
            devices += devices_from_csv(arguments.csv, kinds)
        except OSError as error:
            raise FleetError(f"cannot read {arguments.csv}: {error}") from error
    if arguments.from_api is not None:
        if not arguments.token:
            raise FleetError("--from-api needs --token")
        devices += devices_from_api(arguments.from_api, arguments.token, kinds)
    if arguments.addresses:
        devices += [
            (address.strip(), "speaker") for address in arguments.addresses.split(",") if address.strip()
        ]
    if arguments.count:
        devices += [
            (address, "speaker")
            for address in generated_addresses(arguments.count, arguments.prefix, arguments.start)
        ]
    unique = _unique(devices)
    if not unique:
        noun = "speakers" if kinds == SPEAKERS_ONLY else "devices"
        raise FleetError(
            f"no {noun} to simulate: give --credentials, --csv, --from-api, --addresses or --count"
        )
    invalid = [address for address, _ in unique if not wire.is_valid_address(address)]
    speakers, screens, sensors = _by_kind(unique)
    if invalid:
        raise FleetError(f"not device addresses ({wire.ADDRESS_PATTERN.pattern}): {', '.join(invalid[:5])}")
    command_key = _command_key(arguments)
    if command_key is None and (speakers or screens):
        raise FleetError(
            "speakers and screens verify every command with the controller's public key and refuse "
            "what they cannot verify: give --command-key (print it with `wardcast command-key show`), "
            "--command-key-file, --from-api, or --credentials bundles that carry it"
        )
    try:
        firmware_keys = tuple(arguments.firmware_key)
        for key in firmware_keys:
            decode_public_key(key)
        addresses = [address for address, _ in unique]
        fail_firmware = set(failing_devices(addresses, arguments.fail_firmware_fraction))
    except ValueError as error:
        raise FleetError(f"--firmware-key / --fail-firmware-fraction: {error}") from error
    fail_firmware.update(a.strip() for a in arguments.fail_firmware_devices.split(",") if a.strip())
    if arguments.install_seconds < 0:
        raise FleetError("--install-seconds must not be negative")
    password = (
        arguments.password
        if arguments.password is not None
        else os.environ.get(PASSWORD_ENVIRONMENT_VARIABLE)
    )
    return FleetConfig(
        broker=BrokerSettings(
            host=host,
            port=port,
            username=arguments.username,
            password=password,
            protocol=cast("MqttProtocol", arguments.protocol),
            keepalive_s=arguments.keepalive,
        ),
        addresses=speakers,
        screens=screens,
        sensors=sensors,
        sensor_interval_s=sensor_interval_s,
        sensor_metrics=sensor_metrics,
        seed=arguments.seed,
        control=arguments.control,
        stats=arguments.stats,
        stats_interval_s=arguments.stats_interval,
        heartbeat_s=arguments.heartbeat,
        speed=arguments.speed,
        play_log=arguments.play_log,
        shared_media_cache=arguments.shared_media_cache,
        connect_concurrency=arguments.connect_concurrency,
        http_connections=arguments.http_connections,
        credentials={address: credentials[address] for address, _ in unique if address in credentials},
        command_key=command_key,
        firmware_keys=firmware_keys,
        install_s=arguments.install_seconds,
        fail_firmware=tuple(sorted(fail_firmware)),
        corrupt_firmware=tuple(a.strip() for a in arguments.corrupt_firmware_devices.split(",") if a.strip()),
        cut_firmware_download_once=arguments.cut_firmware_download_once,
    )


def _command_key(arguments: argparse.Namespace) -> str | None:
    """The key of --command-key or --command-key-file (checked here, so a typo stops the start), or
    the controller's with --from-api; None when there is none."""
    if arguments.command_key is not None and arguments.command_key_file is not None:
        raise FleetError("give --command-key or --command-key-file, not both")
    try:
        if arguments.command_key is not None:
            key = signature.CommandKey.from_text(arguments.command_key)
        elif arguments.command_key_file is not None:
            key = signature.CommandKey.from_file(arguments.command_key_file)
        elif arguments.from_api is not None and arguments.token:
            key = signature.CommandKey.from_text(command_key_from_api(arguments.from_api, arguments.token))
        elif arguments.credentials is not None and (
            bundled := command_key_from_bundles(arguments.credentials)
        ):
            # A provisioned device learns the key from its bundle, as a real one would.
            key = signature.CommandKey.from_text(bundled)
        else:
            return None
    except signature.CommandKeyError as error:
        option = "--command-key-file" if arguments.command_key_file is not None else "--command-key"
        raise FleetError(f"{option}: {error}") from error
    return base64.b64encode(key.raw).decode()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m firmware_sim fleet ARGS` and `wardcast sim fleet ARGS`; returns the exit status."""
    parser = build_parser()
    try:
        arguments = parser.parse_args(argv)
        _configure_logging(arguments.log_level)
        try:
            config = config_from_arguments(arguments)
        except FleetError as error:
            parser.error(str(error))
    except SystemExit as exit_request:  # argparse exits on --help and on usage errors
        return exit_request.code if isinstance(exit_request.code, int) else _EXIT_USAGE
    if arguments.processes > 1 and len(config.devices()) > 1:
        return asyncio.run(_supervise(config, arguments.processes, arguments.log_level))
    return asyncio.run(_serve(config))


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One worker of a multi-process fleet: its `FleetConfig` arrives as JSON on stdin."""
    parser = argparse.ArgumentParser(prog=f"python -m firmware_sim {WORKER_COMMAND}")
    parser.add_argument("--log-level", default="WARNING")
    arguments = parser.parse_args(argv)
    _configure_logging(arguments.log_level)
    return asyncio.run(_serve(FleetConfig.from_json(sys.stdin.read())))


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s: %(message)s",
    )


def _announce_ready(count: int) -> None:
    sys.stdout.write(f"{READY_PREFIX} {count}\n")
    sys.stdout.flush()


async def _first_of(main_work: asyncio.Future[Any], stop: asyncio.Event) -> bool:
    """True if `main_work` finished first; False (after cancelling it) if `stop` was set first."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({main_work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if main_work.done():
        return True
    main_work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await main_work
    return False


async def _serve(config: FleetConfig) -> int:
    stop = asyncio.Event()
    with stop_on_signals(stop):
        fleet = Fleet(config)
        entering = asyncio.ensure_future(fleet.__aenter__())
        try:
            if not await _first_of(entering, stop):
                return _EXIT_OK
            entering.result()
        except FleetError as error:
            logger.error("%s", error)  # noqa: TRY400 - the message says it all; a traceback would bury it
            return _EXIT_FAILED
        try:
            _announce_ready(len(fleet))
            await stop.wait()
        finally:
            await fleet.__aexit__(None, None, None)
    return _EXIT_OK


async def _supervise(config: FleetConfig, processes: int, log_level: str) -> int:
    """Runs one worker process per slice of the fleet; READY once every worker is ready."""
    stop = asyncio.Event()
    workers: list[asyncio.subprocess.Process] = []
    with stop_on_signals(stop):
        try:
            for chunk in split_evenly(config.devices(), processes):
                speakers, screens, sensors = _by_kind(chunk)
                own = {a: config.credentials[a] for a, _ in chunk if a in config.credentials}
                part = dataclasses.replace(
                    config, addresses=speakers, screens=screens, sensors=sensors, credentials=own
                )
                # One at a time, so that a failed spawn still leaves the started ones to stop.
                worker = await _spawn_worker(part, log_level)
                workers.append(worker)
            readiness = asyncio.ensure_future(asyncio.gather(*(_await_ready(worker) for worker in workers)))
            if not await _first_of(readiness, stop):
                return await _stop_workers(workers)
            _announce_ready(sum(readiness.result()))
            exits = [asyncio.ensure_future(worker.wait()) for worker in workers]
            any_exit = asyncio.ensure_future(asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED))
            if await _first_of(any_exit, stop):
                logger.error("a fleet worker exited on its own; stopping the others")
                await _stop_workers(workers)
                return _EXIT_FAILED
            return await _stop_workers(workers)
        except FleetError as error:
            logger.error("%s", error)  # noqa: TRY400 - the message says it all
            await _stop_workers(workers)
            return _EXIT_FAILED


async def _spawn_worker(config: FleetConfig, log_level: str) -> asyncio.subprocess.Process:
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firmware_sim",
        WORKER_COMMAND,
        "--log-level",
        log_level,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    if worker.stdin is None:
        raise FleetError("the worker process has no stdin")
    # The configuration, password included, travels on a pipe rather than on a visible command line.
    worker.stdin.write(config.to_json().encode())
    await worker.stdin.drain()
    worker.stdin.close()
    await worker.stdin.wait_closed()
    return worker


async def _await_ready(worker: asyncio.subprocess.Process) -> int:
    if worker.stdout is None:
        raise FleetError("the worker process has no stdout")
    line = (await worker.stdout.readline()).decode().strip()
    prefix, _, count = line.partition(" ")
    if prefix != READY_PREFIX or not count.isdigit():
        await worker.wait()
        raise FleetError(f"fleet worker {worker.pid} exited with {worker.returncode} before it was ready")
    return int(count)


async def _stop_workers(workers: list[asyncio.subprocess.Process]) -> int:
    for worker in workers:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            async with asyncio.timeout(_WORKER_STOP_TIMEOUT_S):
                await worker.wait()
        except TimeoutError:
            logger.warning("fleet worker %s ignored SIGTERM; killing it", worker.pid)
            worker.kill()
            await worker.wait()
    failed = [worker for worker in workers if worker.returncode != 0]
    return _EXIT_FAILED if failed else _EXIT_OK
