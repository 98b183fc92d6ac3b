"""An ingest worker process: MQTT sensor telemetry off the controller's event loop (docs/telemetry.md §5).

The controller starts `telemetry.ingest_workers` of these. Each holds a persistent MQTT session on a
shared subscription of the device telemetry topics, so the broker splits the sensors' messages between
the workers and keeps what arrives while one restarts. A worker decodes, range-checks and writes
readings with the controller's own code (`drivers/mqtt_codec.py`, `ReadingQueue`, `TelemetryStore`) and
forwards to the controller only the readings that a rule watches.

It talks to the controller in JSON lines:
- stdin: the first line is a `WorkerConfig`; then `{"reload": n}` (devices changed: read addresses and
  ranges again, answer `{"reloaded": n}`) and `{"watch": [[device_id, metric], ...]}`. End of input (the
  controller stopping or gone) means: write what is queued and exit.
- stdout: `{"ready": true}` once subscribed; `{"reading": [device_id, metric, value, at_ms]}` for each
  watched reading; `{"stats": {...}}` once a second with the counters' increments since the last.

Three threads: paho's network loop (decoding and queueing under a lock), a writer, and the main thread
reading the controller's instructions. The writer's database calls release the GIL.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import REGISTRY
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from controller.domain.telemetry import epoch_ms
from controller.logs import configure_logging
from controller.services.telemetry import ReadingQueue, TelemetryStore
from controller.settings import LoggingSettings, TelemetrySettings
from controller.store.db import create_db_engine
from controller.store.models import DeviceRow
from drivers.base import MalformedPayload, TelemetryReading
from drivers.mqtt import parse_broker_url
from drivers.mqtt_codec import DEVICE_TOPIC_PREFIX, decode_inbound

log = structlog.get_logger(__name__)

SHARE_GROUP = "wardcast-ingest"
TELEMETRY_SUBSCRIPTION = f"$share/{SHARE_GROUP}/{DEVICE_TOPIC_PREFIX}+/telemetry"
TRANSPORT = "mqtt"
# An address that is not registered is looked up again at most this often (a device registered a
# moment ago, before the controller's reload reached this worker).
_UNKNOWN_RETRY_S = 2.0
_MAX_UNKNOWN = 100_000
# What a stats line counts (increments since the last line); the controller adds them to its /metrics.
STAT_NAMES = ("messages", "malformed", "unknown_device", "accepted", "rejected", "dropped", "written")


class WorkerConfig(BaseModel):
    """What the controller hands a worker on its first input line (secrets stay off the command line)."""

    model_config = ConfigDict(extra="forbid")

    index: int
    # Plain strings, not SecretStr: the controller serialises this model to hand it over.
    database_url: str = Field(repr=False)
    broker_url: str
    username: str
    password: str = Field(repr=False)
    client_id: str
    keepalive_s: int = 30
    telemetry: TelemetrySettings
    logging: LoggingSettings


def _readings(outcome: str) -> float:
    return REGISTRY.get_sample_value("wardcast_telemetry_readings_total", {"outcome": outcome}) or 0.0


class IngestWorker:
    def __init__(self, config: WorkerConfig, output: TextIO) -> None:
        self._config = config
        self._output = output
        self._output_lock = threading.Lock()
        self._engine = create_db_engine(config.database_url)
        self._store = TelemetryStore(self._engine, _NoClock(), config.telemetry)
        self._queue = ReadingQueue(config.telemetry)
        self._queue_lock = threading.Lock()
        self._addresses: dict[str, str] = {}
        self._unknown: dict[str, float] = {}
        self._watched: frozenset[tuple[str, str]] = frozenset()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # Counted by paho's thread only; read by the writer's for the stats lines.
        self._messages = self._malformed = self._unknown_devices = 0
        self._reported = dict.fromkeys(STAT_NAMES, 0.0)
        self._client = self._new_client()
        self._subscribed = threading.Event()

    # -- devices -----------------------------------------------------------------------------------
    def reload(self) -> None:
        with Session(self._engine) as session:
            rows = session.exec(
                select(DeviceRow.id, DeviceRow.transport, DeviceRow.address, DeviceRow.config)
            ).all()
        addresses = {
            address: device_id for device_id, transport, address, _ in rows if transport == TRANSPORT
        }
        with self._queue_lock:
            self._queue.load((device_id, config) for device_id, _, _, config in rows)
            self._addresses = addresses
            self._unknown.clear()

    def _device_id(self, address: str) -> str | None:
        device_id = self._addresses.get(address)
        if device_id is not None:
            return device_id
        now = time.monotonic()
        if now < self._unknown.get(address, 0.0):
            return None
        try:
            with Session(self._engine) as session:
                row = session.exec(
                    select(DeviceRow.id, DeviceRow.config).where(
                        DeviceRow.transport == TRANSPORT, DeviceRow.address == address
                    )
                ).first()
        except SQLAlchemyError:
            log.exception("looking up a device failed", address=address)
            row = None
        if row is None:
            if len(self._unknown) >= _MAX_UNKNOWN:
                self._unknown.clear()
            self._unknown[address] = now + _UNKNOWN_RETRY_S
            return None
        device_id, config = row
        with self._queue_lock:
            self._queue.device_changed(device_id, config)
        self._addresses = {**self._addresses, address: device_id}
        return device_id

    # -- MQTT --------------------------------------------------------------------------------------
    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{self._config.client_id}-ingest-{self._config.index}",
            clean_session=False,
            # MQTT 3.1.1: a v5 PUBLISH carries a properties object that costs a parse per message.
            protocol=mqtt.MQTTv311,
        )
        client.username_pw_set(self._config.username, self._config.password)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("ingest worker: the broker refused the connection", reason=str(reason))
            return
        client.subscribe(TELEMETRY_SUBSCRIPTION, qos=1)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, codes: Any, _props: Any) -> None:
        refused = [str(code) for code in codes if code.is_failure]
        if refused:
            log.error("ingest worker: the broker refused the telemetry subscription", reasons=refused)
            return
        if not self._subscribed.is_set():
            self._subscribed.set()
            self._send({"ready": True})

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if not self._stopping.is_set():
            log.warning("ingest worker lost the broker; reconnecting", reason=str(reason))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._messages += 1
        for event in decode_inbound(message.topic, bytes(message.payload)):
            if isinstance(event, MalformedPayload):
                self._malformed += 1
                log.warning(
                    "malformed device payload", topic=event.topic, address=event.address, reason=event.reason
                )
                continue
            if not isinstance(event, TelemetryReading):
                continue
            device_id = self._device_id(event.address)
            if device_id is None:
                self._unknown_devices += 1
                continue
            with self._queue_lock:
                if event.problem is not None:
                    self._queue.reject(device_id, event.metric, event.problem, event.at)
                    accepted = False
                else:
                    accepted = self._queue.accept(device_id, event.metric, event.value, event.unit, event.at)
                full = len(self._queue.pending) >= self._config.telemetry.batch_size
            if accepted and (device_id, event.metric) in self._watched:
                self._send({"reading": [device_id, event.metric, event.value, epoch_ms(event.at)]})
            if full or not accepted:
                self._wake.set()

    # -- writing -----------------------------------------------------------------------------------
    def _write_forever(self) -> None:
        while True:
            self._wake.wait(timeout=self._config.telemetry.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping.is_set()
            self._flush(stopping=stopping)
            # After every pass: the controller's counters then follow each commit within moments.
            changes = self._stats_since_last()
            if changes:
                self._send({"stats": changes})
            if stopping:
                return

    def _flush(self, *, stopping: bool) -> None:
        while True:
            with self._queue_lock:
                if not self._queue.has_work:
                    return
                batch, rejections = self._queue.take()
            try:
                self._store.write(batch, rejections)
            except SQLAlchemyError:
                with self._queue_lock:
                    self._queue.put_back(batch, rejections)
                log.exception("writing readings failed; retrying", batch=len(batch))
                if stopping:
                    return
                time.sleep(self._config.telemetry.flush_interval_s)
                continue
            with self._queue_lock:
                self._queue.written(len(batch))

    def _stats_since_last(self) -> dict[str, float]:
        totals = {
            "messages": float(self._messages),
            "malformed": float(self._malformed),
            "unknown_device": float(self._unknown_devices),
            "accepted": _readings("accepted"),
            "rejected": _readings("rejected"),
            "dropped": _readings("dropped"),
            "written": REGISTRY.get_sample_value("wardcast_telemetry_written_total") or 0.0,
        }
        changes = {
            name: total - self._reported[name]
            for name, total in totals.items()
            if total != self._reported[name]
        }
        self._reported = totals
        return changes

    # -- the controller's instructions -------------------------------------------------------------
    def _send(self, document: dict[str, Any]) -> None:
        line = json.dumps(document, separators=(",", ":")) + "\n"
        with self._output_lock:
            try:
                self._output.write(line)
                self._output.flush()
            except (BrokenPipeError, ValueError):
                self._stopping.set()  # the controller is gone: finish and exit

    def _obey(self, line: str) -> None:
        try:
            instruction = json.loads(line)
        except ValueError:
            log.exception("ingest worker: unreadable instruction", line=line[:200])
            return
        if "reload" in instruction:
            self.reload()
            self._send({"reloaded": instruction["reload"]})
        elif "watch" in instruction:
            self._watched = frozenset((str(device), str(metric)) for device, metric in instruction["watch"])

    def run(self, instructions: TextIO) -> int:
        self.reload()
        host, port = parse_broker_url(self._config.broker_url)
        writer = threading.Thread(target=self._write_forever, name="ingest-writer", daemon=True)
        writer.start()
        self._client.connect_async(host, port, keepalive=self._config.keepalive_s)
        self._client.loop_start()
        try:
            for line in instructions:
                if self._stopping.is_set():
                    break
                if line.strip():
                    self._obey(line)
        finally:
            # Stop taking messages first: what paho acknowledged is then all in the queue.
            self._stopping.set()
            self._client.disconnect()
            self._client.loop_stop()
            self._wake.set()
            writer.join()
            self._engine.dispose()
        return 0


class _NoClock:
    """The store needs a clock only for retention, which the controller runs, never a worker."""

    def now(self) -> Any:
        raise RuntimeError("an ingest worker does not run retention")


def main() -> int:
    config = WorkerConfig.model_validate_json(sys.stdin.readline())
    configure_logging(config.logging)
    structlog.contextvars.bind_contextvars(ingest_worker=config.index)
    return IngestWorker(config, sys.stdout).run(sys.stdin)


if __name__ == "__main__":
    sys.exit(main())
