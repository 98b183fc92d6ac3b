"""Helpers shared by the benchmarks (bench/fanout.py, bench/scheduler.py): /proc accounting, percentiles,
subprocesses whose stdout lines are waited for, the machine description, a test tone, Ctrl-C/SIGTERM handling.

Run the benchmarks as scripts (`.venv/bin/python bench/<name>.py`): this directory is then on sys.path.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final

import numpy as np
import soundfile

from controller.broker import mosquitto_binary

HOST: Final = "127.0.0.1"
REPO: Final = Path(__file__).resolve().parent.parent
RESULTS_DIR: Final = REPO / "bench" / "results"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something the benchmark needs did not happen in time."""


# -- /proc ---------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, from /proc/<pid>/stat (0 once it is gone)."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time of a process's main thread (its event loop) and of all its other threads together."""
    main = other = 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            seconds = cpu_seconds_of(task / "stat")
            if task.name == str(pid):
                main += seconds
            else:
                other += seconds
    return {"main_thread": main, "other_threads": other}


def cpu_seconds_of(stat_path: Path) -> float:
    try:
        text = stat_path.read_text()
    except OSError:
        return 0.0
    # After the command name: fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak RSS) in MiB, from /proc/<pid>/status."""
    result: dict[str, float] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return result
    for line in lines:
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            result[key] = round(int(value.split()[0]) / 1024, 1)
    return result


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_of(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


# -- small helpers -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of `values` (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def nth_time(times: Sequence[float], fraction: float, total: int) -> float | None:
    """The instant at which `fraction` of `total` items had arrived, or None if too few arrived."""
    needed = max(1, math.ceil(fraction * total))
    if len(times) < needed:
        return None
    return sorted(times)[needed - 1]


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def since(start: float, instant: float | None) -> float | None:
    return None if instant is None else rounded(instant - start)


def parse_at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wav_bytes(seconds: float, samplerate: int = 8000) -> bytes:
    samples = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * samplerate)) / samplerate)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, samplerate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total_mib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_total_mib = int(first.split()[1]) // 1024
    version = subprocess.run(
        [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.splitlines()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_mib": mem_total_mib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": version[0].strip() if version else "unknown",
        "paho_mqtt": _package_version("paho-mqtt"),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


# -- processes -----------------------------------------------------------------------------------------


class LineProcess:
    """A subprocess whose stdout lines are pumped into a queue; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self, args: list[str], *, env: dict[str, str], log_path: Path, stdin: bool = False, what: str
    ) -> None:
        self.what = what
        self.log_path = log_path
        self.lines: queue.Queue[str | None] = queue.Queue()
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=REPO,
            )
        threading.Thread(target=self._pump, daemon=True, name=f"pump-{what}").start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with `prefix`; BenchError if it does not come in time."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith(prefix):
                return line
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        raise BenchError(
            f"{self.what}: no '{prefix}' line within {timeout:.0f} s (exit {self.process.poll()}):\n{tail}"
        )

    def send(self, line: str) -> None:
        if self.process.stdin is not None and self.process.poll() is None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()

    def stop(self, timeout: float = 30.0, signum: int = signal.SIGTERM) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return self.process.returncode


def create_admin_key(env: dict[str, str], role: str = "admin") -> str:
    """An API key (admin unless `role` says otherwise) made with the CLI against the controller
    configured by `env`."""
    result = subprocess.run(
        [sys.executable, "-m", "controller", "apikey", "create", "--name", f"bench-{role}", "--role", role],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    if result.returncode != 0:
        raise BenchError(f"apikey create failed: {result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WARDCAST_")}


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
