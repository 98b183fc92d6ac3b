"""A simulated CoAP sensor (docs/coap.md): water level, rainfall, air quality and more, observable
per RFC 7641, configured by PUT and commanded by POST, with the faults a field device shows.

    python -m firmware_sim.coap_sensor --bind 127.0.0.1:0 --report-interval 10

prints `READY coap=127.0.0.1:PORT` on stdout once it listens, and runs until SIGTERM or SIGINT, then
exits 0. It is written from docs/coap.md alone, on aiocoap's server side, and imports nothing from
the controller or the drivers.

Tests drive it through the Python API: `sensor.set_value` pins a reading (also outside its plausible
range), `sensor.faults` injects error codes, garbage payloads and lost datagrams at runtime,
`sensor.restart()` reboots it on the same port (it forgets its observers), and `wait_until` waits for
a change without sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Self

# aiocoap ships without a py.typed marker, so mypy sees its names as Any; the resources below subclass
# them (hence the `misc` ignores on those class lines) and keep typed values on our side.
import aiocoap
from aiocoap import resource

from firmware_sim.lifecycle import stop_on_signals
from firmware_sim.signals import ChangeSignal

logger = logging.getLogger(__name__)

WIRE_VERSION: Final = 1
READING_RESOURCE_TYPE: Final = "wardcast.reading"
CONFIG_RESOURCE_TYPE: Final = "wardcast.config"
COMMAND_RESOURCE_TYPE: Final = "wardcast.command"
CONTENT_FORMAT_TEXT: Final = 0
CONTENT_FORMAT_JSON: Final = 50
SENSOR_PATH_PREFIX: Final = ("sensors",)
CONFIG_PATH: Final = ("config",)
COMMAND_PATH: Final = ("command",)
MIN_REPORT_INTERVAL_S: Final = 0.05
MAX_REPORT_INTERVAL_S: Final = 86_400.0
MAX_LABEL_CHARS: Final = 64
MAX_REQUEST_BODY: Final = 1024
DEFAULT_REPORT_INTERVAL_S: Final = 10.0
DEFAULT_WALK_INTERVAL_S: Final = 1.0
ACTIONS: Final = ("identify", "reboot")
# What a sensor with a failing firmware sends instead of a reading: neither UTF-8 nor JSON.
GARBAGE_PAYLOAD: Final = b"\xff\xfe{value: \x00garbage"
_CODE_CLASS_SHIFT: Final = 5  # a CoAP code byte is class (3 bits) . detail (5 bits)
_MAX_CODE_DETAIL: Final = 31
_REQUEST_CODES: Final = range(1, 32)  # class 0, detail 1..31: GET, POST, PUT, ...

Clock = Callable[[], float]
WallClock = Callable[[], datetime]


class SensorConfigError(ValueError):
    """A sensor configuration that contradicts itself."""


# Readings


@dataclass(frozen=True, slots=True)
class Quantity:
    """A physical quantity the sensor measures, moving by a random walk within its plausible range."""

    name: str
    unit: str
    initial: float
    minimum: float
    maximum: float
    step: float
    """The largest change in one walk step, either way."""


DEFAULT_QUANTITIES: Final = (
    Quantity("water_level", "m", 1.80, 0.0, 6.0, 0.02),
    Quantity("rainfall", "mm", 0.0, 0.0, 120.0, 0.5),
    Quantity("air_quality", "VN_AQI", 62.0, 0.0, 500.0, 2.0),
    Quantity("pm2_5", "µg/m³", 35.0, 0.0, 500.0, 1.0),
    Quantity("temperature", "°C", 29.0, 10.0, 45.0, 0.1),
)


@dataclass(frozen=True, slots=True)
class SensorConfig:
    """The sensor's fixed make-up (what it measures, how its readings move) and its power-on config."""

    quantities: tuple[Quantity, ...] = DEFAULT_QUANTITIES
    seed: int = 1
    """Seeds the random walk and the fraction-based faults: the same seed, the same run."""
    walk_interval_s: float = DEFAULT_WALK_INTERVAL_S
    report_interval_s: float = DEFAULT_REPORT_INTERVAL_S
    """Power-on value of the `/config` field: a notification at least this often, changed or not."""
    label: str = ""

    def __post_init__(self) -> None:
        names = [quantity.name for quantity in self.quantities]
        if not names or len(set(names)) != len(names):
            raise SensorConfigError(f"quantity names must be distinct and at least one: {names}")
        for quantity in self.quantities:
            if not quantity.minimum <= quantity.initial <= quantity.maximum or quantity.step < 0:
                raise SensorConfigError(
                    f"quantity {quantity.name}: initial outside its range or negative step"
                )
        if not (math.isfinite(self.walk_interval_s) and self.walk_interval_s > 0):
            raise SensorConfigError("walk_interval_s must be a positive number")
        problem = _report_interval_problem(self.report_interval_s) or _label_problem(self.label)
        if problem is not None:
            raise SensorConfigError(problem)


@dataclass(slots=True)
class _Reading:
    quantity: Quantity
    value: float
    sampled_at: datetime
    # A reading set through the API stays where it was put instead of walking on.
    pinned: bool = False
    last_notified: float = -math.inf


# Fault injection


@dataclass(slots=True)
class InjectedAnswer:
    """Answer `code` (e.g. "5.03") to requests on `path` (any when None) instead of serving them, for
    the next `remaining` matching requests (until cleared when None)."""

    code: str
    path: str | None = None
    remaining: int | None = None


class FaultPlan:
    """What goes wrong with the sensor, flipped at runtime (tests) or set at start (command line).

    Lost datagrams are lost below aiocoap's message layer, as on a radio link: a dropped request is
    never seen (the client retransmits it), a dropped reply follows a request that was carried out
    (the retransmitted request is answered again from aiocoap's duplicate cache, RFC 7252 §4.5).
    """

    def __init__(self, seed: int) -> None:
        self._random = random.Random(f"faults-{seed}")
        self.silent = False
        """Hears nothing and sends nothing (a dead radio or a cut cable); readings keep walking."""
        self._drop_fraction = 0.0
        self._requests_to_drop = 0
        self._replies_to_drop = 0
        self._garbage: list[InjectedAnswer] = []
        self._answers: list[InjectedAnswer] = []

    @property
    def drop_fraction(self) -> float:
        """The share of requests the sensor does not hear (0 to 1), drawn from the seed."""
        return self._drop_fraction

    @drop_fraction.setter
    def drop_fraction(self, fraction: float) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"drop_fraction {fraction} outside 0..1")
        self._drop_fraction = fraction

    def drop_requests(self, count: int = 1) -> None:
        """The next `count` request datagrams (retransmissions included) are not heard."""
        self._requests_to_drop += _count("drop_requests", count)

    def drop_replies(self, count: int = 1) -> None:
        """The next `count` responses (piggybacked, separate or notifications) are lost on the way out."""
        self._replies_to_drop += _count("drop_replies", count)

    def answer(self, code: str, *, path: str | None = None, count: int | None = None) -> InjectedAnswer:
        """From now on answer `code` (4.xx or 5.xx, e.g. "5.03") on `path`; the newest match wins.
        A notification counts as a request: an injected error ends the observation (RFC 7641 §4.2)."""
        _code_number(code)
        if not code.startswith(("4.", "5.")):
            raise ValueError(f"injected code {code} must be an error (4.xx or 5.xx)")
        injected = InjectedAnswer(code, path, None if count is None else _count("count", count))
        self._answers.append(injected)
        return injected

    def garbage_payloads(self, count: int = 1, *, path: str | None = None) -> None:
        """The next `count` readings (on `path`, or any) carry bytes that are neither UTF-8 nor JSON."""
        self._garbage.append(InjectedAnswer("2.05", path, _count("garbage_payloads", count)))

    def clear(self) -> None:
        """Back to a healthy sensor."""
        self.silent = False
        self._drop_fraction = 0.0
        self._requests_to_drop = self._replies_to_drop = 0
        self._garbage.clear()
        self._answers.clear()

    def take_request_drop(self) -> bool:
        if self._requests_to_drop:
            self._requests_to_drop -= 1
            return True
        # Drawn only when the fault is on, so that switching it on does not shift other draws.
        return self._drop_fraction > 0 and self._random.random() < self._drop_fraction

    def take_reply_drop(self) -> bool:
        if self._replies_to_drop:
            self._replies_to_drop -= 1
            return True
        return False

    def take_answer(self, path: str) -> str | None:
        return _take(self._answers, path)

    def take_garbage(self, path: str) -> bool:
        return _take(self._garbage, path) is not None


def _take(rules: list[InjectedAnswer], path: str) -> str | None:
    for rule in reversed(rules):
        if rule.path is None or rule.path == path:
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining == 0:
                    rules.remove(rule)
            return rule.code
    return None


def _count(name: str, count: int) -> int:
    if count < 1:
        raise ValueError(f"{name} count {count} must be at least 1")
    return count


def _code_number(code: str) -> int:
    """The code byte of a dotted CoAP code ("5.03" → 0xA3)."""
    code_class, separator, detail = code.partition(".")
    if not (separator and code_class.isdigit() and detail.isdigit() and len(detail) == 2):  # noqa: PLR2004
        raise ValueError(f"{code!r} is not a dotted CoAP code such as 5.03")
    if not 0 <= int(detail) <= _MAX_CODE_DETAIL or not 0 <= int(code_class) <= 7:  # noqa: PLR2004
        raise ValueError(f"{code!r} is outside the CoAP code space")
    return int(code_class) << _CODE_CLASS_SHIFT | int(detail)


@dataclass(slots=True)
class SensorCounters:
    requests_heard: int = 0
    dropped_requests: int = 0
    dropped_replies: int = 0
    datagrams_lost_silent: int = 0
    readings_served: int = 0
    notifications_triggered: int = 0
    injected_answers: int = 0
    garbage_payloads: int = 0
    config_changes: int = 0
    rejected_requests: int = 0
    commands: int = 0
    identifies: int = 0
    reboots: int = 0


# Validation of request bodies (docs/coap.md §5.4, §5.5)


class BadRequestError(ValueError):
    """A request body the sensor refuses with 4.00; the message names the member."""


def _report_interval_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "report_interval_s: expected a number of seconds"
    if not MIN_REPORT_INTERVAL_S <= value <= MAX_REPORT_INTERVAL_S:
        return f"report_interval_s: {value:g} outside {MIN_REPORT_INTERVAL_S:g}..{MAX_REPORT_INTERVAL_S:g}"
    return None


def _label_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return "label: expected a string"
    if len(value) > MAX_LABEL_CHARS:
        return f"label: longer than {MAX_LABEL_CHARS} characters"
    return None


def _json_body(payload: bytes) -> dict[str, Any]:
    try:
        document = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequestError("body: not a JSON document") from None
    if not isinstance(document, dict):
        raise BadRequestError("body: expected a JSON object")
    version = document.get("v", WIRE_VERSION)
    if version != WIRE_VERSION or isinstance(version, bool):
        raise BadRequestError(f"v: wire version {version!r} is not spoken here (expected {WIRE_VERSION})")
    return document


def parse_config(payload: bytes) -> dict[str, Any]:
    """The new config from a PUT body (it replaces the old one; members left out take their power-on
    defaults); `BadRequestError` naming the member."""
    document = _json_body(payload)
    known: dict[str, Any] = {
        name: document[name] for name in ("report_interval_s", "label") if name in document
    }
    if not known:
        raise BadRequestError("body: no config member (report_interval_s, label)")
    if "report_interval_s" in known and (problem := _report_interval_problem(known["report_interval_s"])):
        raise BadRequestError(problem)
    if "label" in known and (problem := _label_problem(known["label"])):
        raise BadRequestError(problem)
    return known


def parse_command(payload: bytes) -> str:
    """The action of a POST body; `BadRequestError` naming the member."""
    action = _json_body(payload).get("action")
    if not isinstance(action, str):
        raise BadRequestError("action: missing or not a string")
    if action not in ACTIONS:
        raise BadRequestError(f"action: unknown {action[:40]!r} (known: {', '.join(ACTIONS)})")
    return action


# Resources


def _error(code: str, diagnostic: str) -> Any:
    """An error response with a diagnostic payload (RFC 7252 §5.5.2)."""
    return aiocoap.Message(
        code=aiocoap.Code(_code_number(code)),
        payload=diagnostic.encode(),
        content_format=CONTENT_FORMAT_TEXT,
    )


def _content_format_problem(request: Any) -> Any:
    """A 4.15 for a body in another format than JSON (no Content-Format at all is taken as JSON, as
    command-line clients send none by default), a 4.13 for an oversized one; None when acceptable."""
    content_format = request.opt.content_format
    if content_format is not None and int(content_format) != CONTENT_FORMAT_JSON:
        return _error("4.15", f"body: content-format {int(content_format)}, expected {CONTENT_FORMAT_JSON}")
    if len(request.payload) > MAX_REQUEST_BODY:
        return _error("4.13", f"body: larger than {MAX_REQUEST_BODY} bytes")
    return None


class _ReadingResource(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    rt = READING_RESOURCE_TYPE
    if_ = "core.s"  # the CoRE sensor interface
    ct = str(CONTENT_FORMAT_JSON)

    def __init__(self, sensor: CoapSensorSimulator, quantity: str) -> None:
        super().__init__()
        self._sensor = sensor
        self._quantity = quantity
        self.observers = 0

    def update_observation_count(self, newcount: int) -> None:
        self.observers = newcount
        self._sensor._changed()  # noqa: SLF001 - the resource is a part of the sensor

    async def render_get(self, request: Any) -> Any:
        return self._sensor._render_reading(self._quantity, request)  # noqa: SLF001

    def get_link_description(self) -> Any:
        description = dict(super().get_link_description())
        description["title"] = f"{self._quantity} ({self._sensor._reading(self._quantity).quantity.unit})"  # noqa: SLF001
        return description


class _ConfigResource(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    rt = CONFIG_RESOURCE_TYPE
    if_ = "core.p"  # the CoRE parameter interface
    ct = str(CONTENT_FORMAT_JSON)

    def __init__(self, sensor: CoapSensorSimulator) -> None:
        super().__init__()
        self._sensor = sensor

    async def render_get(self, _request: Any) -> Any:
        return self._sensor._render_config_get()  # noqa: SLF001

    async def render_put(self, request: Any) -> Any:
        return self._sensor._render_config_put(request)  # noqa: SLF001


class _CommandResource(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    rt = COMMAND_RESOURCE_TYPE
    if_ = "core.a"  # the CoRE actuator interface
    ct = str(CONTENT_FORMAT_JSON)

    def __init__(self, sensor: CoapSensorSimulator) -> None:
        super().__init__()
        self._sensor = sensor

    async def render_post(self, request: Any) -> Any:
        return self._sensor._render_command(request)  # noqa: SLF001


class _Radio:
    """Loses datagrams below aiocoap's message layer, where aiocoap offers no hook of its own: it wraps
    the receive and send methods of the UDP endpoint, so that retransmission and duplicate detection
    run for real."""

    def __init__(self, faults: FaultPlan, counters: SensorCounters, changed: Callable[[], None]) -> None:
        self._faults = faults
        self._counters = counters
        self._changed = changed
        self.off = False
        """Switched off while the sensor shuts down: nothing more is heard or said."""

    def install(self, endpoint: Any) -> None:
        receive = endpoint.datagram_msg_received
        send = endpoint.send

        def filtered_receive(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
            if self.off:
                return
            if self._faults.silent:
                self._counters.datagrams_lost_silent += 1
                return
            if len(data) > 1 and data[1] in _REQUEST_CODES:
                self._counters.requests_heard += 1
                if self._faults.take_request_drop():
                    self._counters.dropped_requests += 1
                    self._changed()
                    return
            receive(data, ancdata, flags, address)

        def filtered_send(message: Any) -> None:
            if self.off:
                return
            if self._faults.silent:
                self._counters.datagrams_lost_silent += 1
                return
            if message.code.is_response() and self._faults.take_reply_drop():
                self._counters.dropped_replies += 1
                self._changed()
                return
            send(message)

        endpoint.datagram_msg_received = filtered_receive
        endpoint.send = filtered_send


# The sensor


class CoapSensorSimulator:
    """One CoAP sensor on a UDP port; an async context manager."""

    def __init__(
        self,
        config: SensorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
        wall_clock: WallClock | None = None,
    ) -> None:
        self.config = config if config is not None else SensorConfig()
        self.host = host
        self.faults = FaultPlan(self.config.seed)
        self.counters = SensorCounters()
        self._requested_port = port
        self._port: int | None = None
        self._clock = clock
        self._wall_clock: WallClock = wall_clock if wall_clock is not None else _utc_now
        self._walk = random.Random(f"walk-{self.config.seed}")
        now = self._wall_clock()
        self._readings = {
            quantity.name: _Reading(quantity, quantity.initial, now) for quantity in self.config.quantities
        }
        self._report_interval_s = self.config.report_interval_s
        self._label = self.config.label
        self._resources: dict[str, _ReadingResource] = {}
        self._context: Any = None
        self._radio: _Radio | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._reboot: asyncio.Task[None] | None = None
        self._changes = ChangeSignal()

    # Lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reboot is not None and self._reboot is not asyncio.current_task():
            self._reboot.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reboot
        await self.stop()

    async def start(self) -> None:
        """Listens (again, on the same port after a `stop`) and starts the readings' clock."""
        if self._context is not None:
            return
        port = self._port if self._port is not None else self._requested_port
        site = self._site()
        # UDP only: aiocoap's default server list would also listen on TCP and TLS.
        context = await aiocoap.Context.create_server_context(
            site, bind=(self.host, port), transports=["udp6"], loggername="coap.sensor-sim"
        )
        # aiocoap has no public accessor for the bound port (chrysn/aiocoap#274); the UDP endpoint is
        # reached through the request interface that would carry a request to our own address.
        probe = aiocoap.Message(code=aiocoap.GET, uri=f"coap://{_host_literal(self.host)}:{port or 1}/")
        interface = await context.find_remote_and_interface(probe)
        endpoint = interface.token_interface.message_interface
        self._radio = _Radio(self.faults, self.counters, self._changed)
        self._radio.install(endpoint)
        self._port = int(endpoint.transport.get_extra_info("socket").getsockname()[1])
        self._context = context
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="coap-sensor-clock")
        self._changed()

    async def stop(self) -> None:
        """Stops listening; the observers are forgotten, as by a power cut."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        context, self._context = self._context, None
        if self._radio is not None:
            self._radio.off = True
        if context is not None:
            # One turn of the loop first, so that requests already taken in start rendering: aiocoap's
            # shutdown would otherwise cancel their tasks before they first ran ("never awaited").
            await asyncio.sleep(0)
            await context.shutdown()
        self._resources.clear()
        self._changed()

    async def restart(self) -> None:
        """A reboot: off, then on again on the same port, with no observers; readings and config stay."""
        await self.stop()
        self.counters.reboots += 1
        await self.start()

    @property
    def running(self) -> bool:
        return self._context is not None

    @property
    def port(self) -> int:
        """The UDP port it listens on (the one the system chose when asked for port 0)."""
        if self._port is None:
            raise RuntimeError("the sensor has not started")
        return self._port

    @property
    def address(self) -> str:
        """`coap://host:port`, as the controller addresses it."""
        return f"coap://{_host_literal(self.host)}:{self.port}"

    # State, as tests and the command line see it

    @property
    def quantities(self) -> tuple[str, ...]:
        return tuple(self._readings)

    def value(self, quantity: str) -> float:
        return self._reading(quantity).value

    def set_value(self, quantity: str, value: float) -> None:
        """Puts `quantity` at `value` (any finite value, also outside its plausible range) and keeps it
        there until `resume_walk`; observers are notified at once."""
        if not math.isfinite(value):
            raise ValueError(f"{quantity}: {value} is not a finite reading")
        reading = self._reading(quantity)
        reading.value, reading.pinned, reading.sampled_at = value, True, self._wall_clock()
        self._notify(quantity)
        self._changed()

    def resume_walk(self, quantity: str) -> None:
        self._reading(quantity).pinned = False

    def step_walk(self, steps: int = 1) -> None:
        """Moves every reading that is not pinned by `steps` walk steps now, notifying observers."""
        for _ in range(steps):
            self._walk_one_step()
        for name in self._readings:
            self._notify(name)
        self._changed()

    @property
    def report_interval_s(self) -> float:
        return self._report_interval_s

    @property
    def label(self) -> str:
        return self._label

    @property
    def max_age_s(self) -> int:
        """Max-Age of a reading: the longest an observer waits for the next notification."""
        return max(1, math.ceil(self._report_interval_s + self.config.walk_interval_s))

    def observers(self, quantity: str) -> int:
        """How many observers the reading resource of `quantity` has now."""
        reading_resource = self._resources.get(quantity)
        return 0 if reading_resource is None else reading_resource.observers

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Returns once `condition()` holds after the sensor changed (a request, a fault, a step)."""
        await self._changes.wait_until(condition, timeout)

    # Inside

    def _site(self) -> Any:
        site = resource.Site()
        site.add_resource(
            [".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader, impl_info=None)
        )
        self._resources = {name: _ReadingResource(self, name) for name in self._readings}
        for name, reading_resource in self._resources.items():
            site.add_resource([*SENSOR_PATH_PREFIX, name], reading_resource)
        site.add_resource(list(CONFIG_PATH), _ConfigResource(self))
        site.add_resource(list(COMMAND_PATH), _CommandResource(self))
        return site

    def _reading(self, quantity: str) -> _Reading:
        try:
            return self._readings[quantity]
        except KeyError:
            raise ValueError(f"no quantity {quantity!r} (known: {', '.join(self._readings)})") from None

    async def _tick(self) -> None:
        """Walks the readings and sends notifications: on every change, and at least every report
        interval for a reading that stays put."""
        while True:
            await asyncio.sleep(self.config.walk_interval_s)  # the sensor's sampling period
            changed = self._walk_one_step()
            now = self._clock()
            for name, reading in self._readings.items():
                if name in changed or now - reading.last_notified >= self._report_interval_s:
                    self._notify(name)
            self._changed()

    def _walk_one_step(self) -> set[str]:
        changed: set[str] = set()
        now = self._wall_clock()
        for name, reading in self._readings.items():
            quantity = reading.quantity
            if reading.pinned or quantity.step == 0:
                continue
            value = reading.value + self._walk.uniform(-quantity.step, quantity.step)
            # Reflected at the ends of the plausible range, so the walk stays inside it.
            if value < quantity.minimum:
                value = 2 * quantity.minimum - value
            if value > quantity.maximum:
                value = 2 * quantity.maximum - value
            reading.value = min(max(value, quantity.minimum), quantity.maximum)
            reading.sampled_at = now
            changed.add(name)
        return changed

    def _notify(self, quantity: str) -> None:
        reading_resource = self._resources.get(quantity)
        self._readings[quantity].last_notified = self._clock()
        if reading_resource is None or self.faults.silent or reading_resource.observers == 0:
            return
        self.counters.notifications_triggered += 1
        reading_resource.updated_state()

    def _changed(self) -> None:
        self._changes.notify()

    def _injected(self, path: str) -> Any:
        code = self.faults.take_answer(path)
        if code is None:
            return None
        self.counters.injected_answers += 1
        self._changed()
        return _error(code, "injected fault")

    def _render_reading(self, quantity: str, request: Any) -> Any:
        path = "/" + "/".join([*SENSOR_PATH_PREFIX, quantity])
        injected = self._injected(path)
        if injected is not None:
            return injected
        accept = request.opt.accept
        if accept is not None and int(accept) != CONTENT_FORMAT_JSON:
            return _error("4.06", f"readings come as content-format {CONTENT_FORMAT_JSON} (JSON) only")
        reading = self._readings[quantity]
        if self.faults.take_garbage(path):
            self.counters.garbage_payloads += 1
            payload = GARBAGE_PAYLOAD
        else:
            document = {
                "v": WIRE_VERSION,
                "value": round(reading.value, 4),
                "unit": reading.quantity.unit,
                "at": _timestamp(reading.sampled_at),
            }
            payload = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        self.counters.readings_served += 1
        return aiocoap.Message(payload=payload, content_format=CONTENT_FORMAT_JSON, max_age=self.max_age_s)

    def _render_config_get(self) -> Any:
        injected = self._injected("/config")
        if injected is not None:
            return injected
        document = {"v": WIRE_VERSION, "report_interval_s": self._report_interval_s, "label": self._label}
        payload = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        return aiocoap.Message(payload=payload, content_format=CONTENT_FORMAT_JSON)

    def _render_config_put(self, request: Any) -> Any:
        injected = self._injected("/config") or _content_format_problem(request)
        if injected is not None:
            return injected
        try:
            config = parse_config(bytes(request.payload))
        except BadRequestError as error:
            self.counters.rejected_requests += 1
            self._changed()
            return _error("4.00", str(error))
        # PUT replaces the resource (RFC 7252 §5.8.3): members left out return to their defaults.
        self._report_interval_s = float(config.get("report_interval_s", self.config.report_interval_s))
        self._label = str(config.get("label", self.config.label))
        self.counters.config_changes += 1
        self._changed()
        return aiocoap.Message(code=aiocoap.CHANGED)

    def _render_command(self, request: Any) -> Any:
        injected = self._injected("/command") or _content_format_problem(request)
        if injected is not None:
            return injected
        try:
            action = parse_command(bytes(request.payload))
        except BadRequestError as error:
            self.counters.rejected_requests += 1
            self._changed()
            return _error("4.00", str(error))
        self.counters.commands += 1
        if action == "identify":
            self.counters.identifies += 1
        elif action == "reboot" and (self._reboot is None or self._reboot.done()):
            # The reply goes out when this method returns, before the new task first runs.
            self._reboot = asyncio.get_running_loop().create_task(self.restart(), name="coap-sensor-reboot")
        self._changed()
        return aiocoap.Message(code=aiocoap.CHANGED)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _timestamp(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _host_literal(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# Command line

READY_PREFIX: Final = "READY"
_EXIT_OK: Final = 0
_EXIT_FAILED: Final = 1
_EXIT_USAGE: Final = 2


def build_parser(prog: str = "python -m firmware_sim.coap_sensor") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A simulated CoAP sensor (water level, rainfall, air quality, ...) per docs/coap.md. "
        "Prints READY with its endpoint, runs until SIGTERM.",
    )
    parser.add_argument(
        "--bind", default="127.0.0.1:0", metavar="HOST:PORT", help="UDP endpoint; port 0: any free port"
    )
    parser.add_argument(
        "--quantities",
        default=",".join(quantity.name for quantity in DEFAULT_QUANTITIES),
        metavar="NAME[,NAME…]",
        help="which of the default quantities to measure (default: all)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the random walk and faults (default: 1)")
    parser.add_argument(
        "--walk-interval",
        type=float,
        default=DEFAULT_WALK_INTERVAL_S,
        metavar="S",
        help="seconds between reading steps, each one notified (default: %(default)s)",
    )
    parser.add_argument(
        "--report-interval",
        type=float,
        default=DEFAULT_REPORT_INTERVAL_S,
        metavar="S",
        help="power-on report interval: a notification at least this often (default: %(default)s)",
    )
    parser.add_argument("--label", default="", help="power-on label (installation name)")
    parser.add_argument("--drop-fraction", type=float, default=0.0, help="share of requests not heard")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def parse_endpoint(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port)."""
    host, separator, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) <= 0xFFFF:  # noqa: PLR2004
        raise SensorConfigError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def config_from_arguments(arguments: argparse.Namespace) -> SensorConfig:
    known: Mapping[str, Quantity] = {quantity.name: quantity for quantity in DEFAULT_QUANTITIES}
    names = [name.strip() for name in arguments.quantities.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SensorConfigError(f"--quantities: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if not 0 <= arguments.drop_fraction <= 1:
        raise SensorConfigError("--drop-fraction must be within 0..1")
    return SensorConfig(
        quantities=tuple(known[name] for name in names),
        seed=arguments.seed,
        walk_interval_s=arguments.walk_interval,
        report_interval_s=arguments.report_interval,
        label=arguments.label,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m firmware_sim.coap_sensor ARGS`; returns the exit status."""
    parser = build_parser()
    try:
        arguments = parser.parse_args(argv)
        try:
            config = config_from_arguments(arguments)
            host, port = parse_endpoint(arguments.bind)
        except ValueError as error:  # SensorConfigError
            parser.error(str(error))
    except SystemExit as exit_request:  # argparse exits on --help and on usage errors
        return exit_request.code if isinstance(exit_request.code, int) else _EXIT_USAGE
    logging.basicConfig(
        level=arguments.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s: %(message)s",
    )
    return asyncio.run(serve(config, host, port, drop_fraction=arguments.drop_fraction))


async def serve(
    config: SensorConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    drop_fraction: float = 0.0,
    stop: asyncio.Event | None = None,
) -> int:
    """Runs the sensor until `stop` is set or SIGTERM/SIGINT arrives; prints the READY line once it
    listens."""
    stop = stop if stop is not None else asyncio.Event()
    sensor = CoapSensorSimulator(config, host=host, port=port)
    sensor.faults.drop_fraction = drop_fraction
    with stop_on_signals(stop):
        try:
            await sensor.start()
        except OSError as error:
            logger.error("cannot listen on %s:%d: %s", host, port, error)  # noqa: TRY400 - the message says it all
            return _EXIT_FAILED
        try:
            sys.stdout.write(f"{READY_PREFIX} coap={_host_literal(host)}:{sensor.port}\n")
            sys.stdout.flush()
            await stop.wait()
        finally:
            await sensor.__aexit__(None, None, None)
    return _EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
