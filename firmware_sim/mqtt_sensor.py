"""A simulated MQTT sensor (water level, rainfall, air quality…) speaking docs/protocol.md §1.

The session, the Last Will, the retained state and the clean shutdown are those of every simulated MQTT
device (firmware_sim/device.py): a sensor connects with its address as client id under the fleet's
device account, so the broker's ACL (§1.7) lets it publish on its own topics only. What it adds is its
telemetry (§1.6): every `interval_s` seconds one document on `wardcast/v1/dev/{address}/telemetry`,

    {"v": 1, "at": "…", "readings": [{"metric": "water_level", "value": 1.82, "unit": "m"}]}

with one reading per metric it measures. Each value takes a seeded random walk within a plausible
range (the same quantities, ranges and steps as the Modbus box's sensors, §3.5), one step per document:
the same seed and address give the same course, whichever process the sensor runs in.

Timing: the first document after each connect goes out at a random instant within one interval, so
that thousands of sensors connected together do not all publish in the same millisecond; later ones
follow on a fixed grid (`interval_s` apart, not drifting with the time a publish takes). A process that
falls more than an interval behind skips the missed ticks rather than bursting to catch up, and counts
them as `late`. While the link is down nothing is published (a tick then counts as `skipped`): a reading
is only worth its moment, unlike a command report, which is kept (§1.10).

Commands: a sensor subscribes to its `cmd` topic like every device and answers there: a `stop` is
acknowledged `completed` (there is nothing to stop), anything else is `rejected`, naming `type`.

Forcing a value (tests, drills of the controller's rules): `sensor.set_value("water_level", 3.4)` keeps
the metric at that value (any finite value, also outside the plausible range, to exercise the
controller's range checks) until `sensor.resume_walk("water_level")`; `publish_now()` sends a document
at once instead of waiting for the next tick. A fleet run from the command line does the same through
its control file (`SensorControl`, see firmware_sim/fleet.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Never

from firmware_sim import wire
from firmware_sim.device import DEDUPE_MEMORY, DeviceRuntime, Job, MqttDevice
from firmware_sim.wire import StopCommand

if TYPE_CHECKING:
    from datetime import datetime

    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

logger = logging.getLogger(__name__)

KIND: Final = "sensor"
DEFAULT_INTERVAL_S: Final = 10.0
DEFAULT_METRICS: Final[tuple[str, ...]] = ("water_level",)
# A sensor keeps few command reports: it takes no commands worth remembering.
_SENSOR_DEDUPE_MEMORY: Final = min(DEDUPE_MEMORY, 16)


@dataclass(frozen=True, slots=True)
class Quantity:
    """What a sensor measures: its unit, where its walk starts, its plausible range, the largest change
    between two documents, and the decimals a real transmitter would send."""

    name: str
    unit: str
    initial: float
    minimum: float
    maximum: float
    step: float
    decimals: int


# The first three as the Modbus box has them (docs/protocol.md §3.5), so both simulators agree.
QUANTITIES: Final[Mapping[str, Quantity]] = {
    quantity.name: quantity
    for quantity in (
        Quantity("water_level", "m", 1.80, 0.0, 6.0, 0.02, 3),
        Quantity("rainfall", "mm", 0.0, 0.0, 120.0, 0.5, 1),
        Quantity("air_quality", "VN_AQI", 62.0, 0.0, 500.0, 2.0, 0),
        Quantity("pm2_5", "µg/m³", 35.0, 0.0, 500.0, 1.5, 1),
        Quantity("temperature", "°C", 28.0, -5.0, 45.0, 0.1, 1),
        Quantity("noise", "dB", 55.0, 30.0, 120.0, 1.0, 1),
    )
}


class SensorConfigError(ValueError):
    """A sensor setting or a control document that cannot be used."""


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metrics, each once and in order; refuses an empty list and names a sensor cannot measure."""
    unique = tuple(dict.fromkeys(metrics))
    unknown = [metric for metric in unique if metric not in QUANTITIES]
    if unknown or not unique:
        raise SensorConfigError(
            f"sensor metrics must be some of {', '.join(QUANTITIES)}, not {', '.join(unknown) or 'none'}"
        )
    return unique


def check_interval(interval_s: float) -> float:
    if not math.isfinite(interval_s) or interval_s <= 0:
        raise SensorConfigError(f"a sensor interval must be a number of seconds above 0, not {interval_s}")
    return interval_s


@dataclass(slots=True)
class TelemetryCounters:
    """What the sensors of one process did; shared by them, read by the fleet's stats file."""

    # Telemetry documents handed to a connected broker session (QoS 1: paho sends and re-sends them).
    published: int = 0
    # PUBACKs the sensors received from the broker, for telemetry and the (few) state documents.
    acknowledged: int = 0
    # Ticks that fell while the link was down: nothing was sent.
    skipped: int = 0
    # Ticks that came more than one interval late (the process could not keep up) and were dropped.
    late: int = 0


@dataclass(slots=True)
class _Reading:
    quantity: Quantity
    value: float
    # Set by `set_value`: the walk leaves the value alone until `resume_walk`.
    forced: bool = False


class SimulatedMqttSensor(MqttDevice[Never, None]):
    """An MQTT sensor publishing telemetry every `interval_s` seconds (docs/protocol.md §1.6)."""

    _logger = logger
    _noun = "sensor"

    def __init__(
        self,
        runtime: DeviceRuntime,
        address: str,
        *,
        metrics: Sequence[str] = DEFAULT_METRICS,
        interval_s: float = DEFAULT_INTERVAL_S,
        seed: int = 1,
        counters: TelemetryCounters | None = None,
        rssi_dbm: int | None = None,
    ) -> None:
        super().__init__(runtime, address, kind=KIND, rssi_dbm=rssi_dbm, dedupe_memory=_SENSOR_DEDUPE_MEMORY)
        self._interval_s = check_interval(interval_s)
        self._telemetry_topic = f"{wire.TOPIC_ROOT}/dev/{address}/telemetry"
        # Seeded by the address too, so each sensor has its own course, the same in every run.
        self._random = random.Random(f"sensor-{seed}-{address}")
        self._readings = {
            metric: _Reading(QUANTITIES[metric], self._starting_value(QUANTITIES[metric]))
            for metric in check_metrics(metrics)
        }
        self.counters = counters if counters is not None else TelemetryCounters()
        # Documents this sensor handed to the broker session (the fleet-wide total is in `counters`).
        self.documents_published = 0
        self._timer: asyncio.TimerHandle | None = None
        # Loop time at which the pending tick was due; the next one is due one interval later.
        self._due = 0.0

    # What tests and the fleet's control file use

    @property
    def interval_s(self) -> float:
        return self._interval_s

    @interval_s.setter
    def interval_s(self, interval_s: float) -> None:
        """A new interval applies at once: the next document goes out at a random instant within the
        new interval (so that a whole fleet changing its rate together stays spread out)."""
        interval_s = check_interval(interval_s)
        if interval_s == self._interval_s:
            return
        self._interval_s = interval_s
        if self._timer is not None:
            self._start_ticking()

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self._readings)

    def value(self, metric: str) -> float:
        """The metric's value now: what the latest document carried (before rounding to the quantity's
        decimals), or the forced value."""
        return self._reading(metric).value

    def forced(self, metric: str) -> bool:
        return self._reading(metric).forced

    def set_value(self, metric: str, value: float) -> None:
        """Keeps `metric` at `value` in every document until `resume_walk(metric)`."""
        if not math.isfinite(value):
            raise SensorConfigError(f"{metric}: {value} is not a finite reading")
        reading = self._reading(metric)
        reading.value, reading.forced = value, True

    def resume_walk(self, metric: str) -> None:
        """The metric walks again, from the value it was held at (clipped to its plausible range)."""
        reading = self._reading(metric)
        if reading.forced:
            quantity = reading.quantity
            reading.value = min(quantity.maximum, max(quantity.minimum, reading.value))
            reading.forced = False

    def publish_now(self) -> bool:
        """Publishes a telemetry document at once (the regular ticks go on as planned); False when the
        link is down and nothing was sent."""
        return self._publish_telemetry()

    # What makes it a sensor (the hooks of `MqttDevice`)

    def _parse_command(self, envelope: wire.Envelope) -> StopCommand:
        command_type = envelope.document.get("type")
        if command_type != "stop":
            raise wire.CommandRejectedError("type", f"{command_type!r}: a sensor takes no command but 'stop'")
        command = wire.parse_command(envelope, self.address)
        if not isinstance(command, StopCommand):  # pragma: no cover - `type` was checked above
            raise wire.CommandRejectedError("type", "a sensor takes no command but 'stop'")
        # A valid stop is acknowledged `completed`, with a detail saying there was nothing to stop.
        return command

    def _prepare(self, job: Job[Never, None]) -> None:  # pragma: no cover - a sensor accepts no job
        raise AssertionError(f"{self.address}: a sensor has no command to prepare ({job!r})")

    def _planned_length(self, job: Job[Never, None]) -> tuple[float, bool | None]:  # pragma: no cover
        raise AssertionError(f"{self.address}: a sensor has no command to play ({job!r})")

    def _status(self) -> dict[str, object]:
        # `playing` as every device's state has it (§1.5), always null here; what it measures and how
        # often, for an operator looking at the device.
        return {"playing": None, "metrics": list(self._readings), "interval_s": self._interval_s}

    def _on_link_restored(self) -> None:
        self._start_ticking()

    def _on_link_lost(self, _now: datetime) -> None:
        self._stop_ticking()

    def _on_power_off(self) -> None:
        self._stop_ticking()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        self.counters.acknowledged += 1
        super()._on_publish(client, userdata, mid, reason_code, properties)

    # Telemetry

    def _starting_value(self, quantity: Quantity) -> float:
        # A few steps away from the catalogue's value, so that a fleet's sensors do not all read alike.
        spread = quantity.step * 10
        return min(
            quantity.maximum, max(quantity.minimum, quantity.initial + self._random.uniform(-spread, spread))
        )

    def _start_ticking(self) -> None:
        self._stop_ticking()
        loop = self.runtime.services.loop
        self._due = loop.time() + self._random.uniform(0.0, self._interval_s)
        self._timer = loop.call_at(self._due, self._tick)

    def _stop_ticking(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        loop = self.runtime.services.loop
        if not self._publish_telemetry():
            self.counters.skipped += 1
        now = loop.time()
        due = self._due + self._interval_s
        if due < now:
            # More than an interval behind: drop the missed ticks instead of bursting to catch up, so
            # the rate offered never exceeds the one asked for.
            self.counters.late += 1
            due = now
        self._due = due
        self._timer = loop.call_at(due, self._tick)

    def _publish_telemetry(self) -> bool:
        client = self._client
        if client is None or not client.is_connected():
            return False
        client.publish(self._telemetry_topic, self._document(), qos=1)
        self.documents_published += 1
        self.counters.published += 1
        if self._watchers:
            self._notify_watchers()
        return True

    def _document(self) -> bytes:
        readings = []
        for metric, reading in self._readings.items():
            quantity = reading.quantity
            # Drawn for forced readings too, so that forcing one metric does not change the others' course.
            change = self._random.uniform(-quantity.step, quantity.step)
            if not reading.forced:
                reading.value = _reflected(reading.value + change, quantity.minimum, quantity.maximum)
            readings.append(
                {"metric": metric, "value": round(reading.value, quantity.decimals), "unit": quantity.unit}
            )
        return wire.encode(
            {
                "v": wire.WIRE_VERSION,
                "at": wire.format_timestamp(self.runtime.clock()),
                "readings": readings,
            }
        )

    def _reading(self, metric: str) -> _Reading:
        try:
            return self._readings[metric]
        except KeyError:
            raise SensorConfigError(
                f"{self.address} measures {', '.join(self._readings)}, not {metric!r}"
            ) from None


def _reflected(value: float, minimum: float, maximum: float) -> float:
    """Reflected at the ends of the range, so that a walk does not stick to a limit."""
    if value > maximum:
        value = 2 * maximum - value
    if value < minimum:
        value = 2 * minimum - value
    return min(maximum, max(minimum, value))


# The fleet's control document


@dataclass(frozen=True, slots=True)
class SensorControl:
    """What a fleet's control file says about its sensors (a JSON object, every member optional):

        {"sensor_interval_s": 0.5, "forced": {"sen-00001": {"water_level": 3.4}}}

    `sensor_interval_s` sets every sensor's interval (absent: the fleet's `--sensor-interval`);
    `forced` holds metrics at values. The document is the whole truth: a metric it does not force walks
    again, so removing a line from the file releases that value.
    """

    interval_s: float | None = None
    forced: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> SensorControl:
        try:
            document = json.loads(text) if text.strip() else {}
        except ValueError as error:
            raise SensorConfigError(f"the control file is not JSON: {error}") from error
        if not isinstance(document, dict):
            raise SensorConfigError("the control file must hold a JSON object")
        interval = document.get("sensor_interval_s")
        if interval is not None:
            if isinstance(interval, bool) or not isinstance(interval, int | float):
                raise SensorConfigError(f"sensor_interval_s must be a number, not {interval!r}")
            interval = check_interval(float(interval))
        forced_document = document.get("forced") or {}
        if not isinstance(forced_document, dict):
            raise SensorConfigError("forced must map sensor addresses to {metric: value} objects")
        forced: dict[str, dict[str, float]] = {}
        for address, values in forced_document.items():
            if not isinstance(values, dict) or not all(
                isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                for value in values.values()
            ):
                raise SensorConfigError(f"forced.{address} must map metrics to finite numbers")
            forced[str(address)] = {str(metric): float(value) for metric, value in values.items()}
        return cls(interval, forced)

    def apply(self, sensors: Iterable[SimulatedMqttSensor], default_interval_s: float) -> None:
        """Brings every sensor in line with the document: interval, forced values, released values.
        A forced metric a sensor does not measure is logged and ignored."""
        interval = self.interval_s if self.interval_s is not None else default_interval_s
        for sensor in sensors:
            sensor.interval_s = interval
            wanted = self.forced.get(sensor.address, {})
            for metric in sensor.metrics:
                if metric in wanted:
                    sensor.set_value(metric, wanted[metric])
                else:
                    sensor.resume_walk(metric)
            unknown = set(wanted) - set(sensor.metrics)
            if unknown:
                logger.warning(
                    "%s: the control file forces %s, which this sensor does not measure",
                    sensor.address,
                    ", ".join(sorted(unknown)),
                )
