"""The ingest worker processes (controller/ingest_worker.py): started, told about changes, restarted.

MQTT telemetry is the one inbound stream that grows with the number of sensors rather than with what
operators do; in the controller's process it competed with commands for one event loop and one GIL
(docs/performance.md §4). The workers take it on a shared subscription; the controller keeps acks and
states, and hears from the workers only the readings its rules watch, and their counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import Callable, Iterable
from datetime import datetime

import structlog

from controller.domain.telemetry import from_epoch_ms
from controller.ingest_worker import WorkerConfig
from controller.services.inbound import INBOUND_MESSAGES, REJECTED_PAYLOADS
from controller.services.telemetry import READINGS, WRITTEN
from controller.settings import LoggingSettings, TelemetrySettings

log = structlog.get_logger(__name__)

ReadingListener = Callable[[str, str, float, datetime], None]
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 20.0
_RELOAD_TIMEOUT_S = 10.0
_RESTART_MAX_S = 30.0
_STATS_COUNTERS = {
    "messages": INBOUND_MESSAGES.labels("telemetry"),
    "malformed": REJECTED_PAYLOADS.labels("malformed"),
    "unknown_device": REJECTED_PAYLOADS.labels("unknown_device"),
    "accepted": READINGS.labels("accepted"),
    "rejected": READINGS.labels("rejected"),
    "dropped": READINGS.labels("dropped"),
    "written": WRITTEN,
}


class IngestWorkerError(RuntimeError):
    """A worker that could not start (its log lines are on the controller's stderr)."""


class _Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.reloads: dict[int, asyncio.Future[None]] = {}


class IngestWorkers:
    def __init__(
        self,
        count: int,
        *,
        database_url: str,
        broker_url: str,
        username: str,
        password: str,
        client_id: str,
        telemetry: TelemetrySettings,
        logging: LoggingSettings,
        on_reading: ReadingListener,
    ) -> None:
        self._workers = [
            _Worker(
                WorkerConfig(
                    index=index,
                    database_url=database_url,
                    broker_url=broker_url,
                    username=username,
                    password=password,
                    client_id=client_id,
                    telemetry=telemetry,
                    logging=logging,
                )
            )
            for index in range(count)
        ]
        self._on_reading = on_reading
        self._watch: list[list[str]] = []
        self._reload_numbers = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._next_reload: asyncio.Future[None] | None = None
        self._reloader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start every worker and wait until each has subscribed."""
        self._tasks = [asyncio.create_task(self._supervise(worker)) for worker in self._workers]
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                await asyncio.gather(*(worker.ready.wait() for worker in self._workers))
        except TimeoutError:
            await self.stop()
            raise IngestWorkerError(
                f"an ingest worker did not subscribe within {_READY_TIMEOUT_S:.0f} s (see its log above)"
            ) from None
        log.info("ingest workers started", count=len(self._workers))

    async def stop(self) -> None:
        """Close their input: each writes what it has queued and exits."""
        self._stopping.set()
        for worker in self._workers:
            if worker.process is not None and worker.process.stdin is not None:
                worker.process.stdin.close()
        for worker in self._workers:
            if worker.process is None:
                continue
            try:
                await asyncio.wait_for(worker.process.wait(), _STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("an ingest worker did not stop; killing it", index=worker.config.index)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        tasks = [*self._tasks, *([self._reloader] if self._reloader else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []

    def watch(self, metrics: Iterable[tuple[str, str]]) -> None:
        """The (device, metric) pairs whose readings the rules need."""
        self._watch = sorted([device_id, metric] for device_id, metric in set(metrics))
        for worker in self._workers:
            self._send(worker, {"watch": self._watch})

    def devices_changed(self) -> asyncio.Future[None]:
        """Have every worker read addresses and ranges again; the future is done once all have.

        Changes that arrive while a reload runs (an import of many devices) share the next one.
        """
        if self._next_reload is None:
            self._next_reload = asyncio.get_running_loop().create_future()
            if self._reloader is None or self._reloader.done():
                self._reloader = asyncio.create_task(self._reload_while_asked())
        return self._next_reload

    async def _reload_while_asked(self) -> None:
        while self._next_reload is not None:
            asked, self._next_reload = self._next_reload, None
            number = next(self._reload_numbers)
            loop = asyncio.get_running_loop()
            waiting = []
            for worker in self._workers:
                if worker.process is None:
                    continue  # a starting worker reads the devices anyway
                future = worker.reloads[number] = loop.create_future()
                waiting.append(future)
                self._send(worker, {"reload": number})
            try:
                await asyncio.wait_for(asyncio.gather(*waiting), _RELOAD_TIMEOUT_S)
            except TimeoutError:
                log.warning("an ingest worker took too long to read the device changes")
            finally:
                for worker in self._workers:
                    worker.reloads.pop(number, None)
            if not asked.done():
                asked.set_result(None)

    def _send(self, worker: _Worker, document: dict[str, object]) -> None:
        process = worker.process
        if process is None or process.stdin is None or process.stdin.is_closing():
            return
        process.stdin.write((json.dumps(document) + "\n").encode())

    async def _supervise(self, worker: _Worker) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = asyncio.get_running_loop().time()
            code = await self._run_once(worker)
            if self._stopping.is_set():
                return
            failures = 0 if asyncio.get_running_loop().time() - started > _RESTART_MAX_S else failures + 1
            delay = min(_RESTART_MAX_S, 0.5 * 2 ** min(failures, 6))
            log.error(
                "an ingest worker exited; restarting it",
                index=worker.config.index,
                exit_code=code,
                restart_in_s=delay,
            )
            await asyncio.sleep(delay)

    async def _run_once(self, worker: _Worker) -> int:
        process = worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.ingest_worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        if process.stdin is None or process.stdout is None:
            raise IngestWorkerError("the ingest worker's pipes were not opened")
        process.stdin.write((worker.config.model_dump_json() + "\n").encode())
        if self._watch:
            self._send(worker, {"watch": self._watch})
        try:
            async for line in process.stdout:
                self._heard(worker, line)
        finally:
            code = await process.wait()
            for future in worker.reloads.values():
                if not future.done():
                    future.set_result(None)
        return code

    def _heard(self, worker: _Worker, line: bytes) -> None:
        try:
            message = json.loads(line)
            if "reading" in message:
                device_id, metric, value, at_ms = message["reading"]
                self._on_reading(str(device_id), str(metric), float(value), from_epoch_ms(int(at_ms)))
            elif "stats" in message:
                for name, increment in message["stats"].items():
                    counter = _STATS_COUNTERS.get(name)
                    if counter is not None and increment > 0:
                        counter.inc(increment)
            elif "reloaded" in message:
                future = worker.reloads.get(int(message["reloaded"]))
                if future is not None and not future.done():
                    future.set_result(None)
            elif message.get("ready"):
                worker.ready.set()
        except (ValueError, TypeError, KeyError):
            log.exception("unreadable line from an ingest worker", index=worker.config.index, line=line[:200])
