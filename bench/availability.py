"""What availability costs the controller at 10,000 devices (issue 6): the monitor of
controller/domain/availability.py alone, no I/O.

    .venv/bin/python bench/availability.py [--devices 10000]

Measures, per device kind timing of config.yaml (speaker: heartbeat 60 s, timeout 150 s):
- `heard`: one heartbeat taken (a state already online: its deadline moved to the back of its queue);
- an idle sweep (nothing due), what the sweep task pays whenever it wakes;
- a sweep where every device times out at once (the broker and every modem gone), per device;
- a reconnect storm: every device back online (transition and alarm clear), per device.

Results: bench/results/availability-<UTC>.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import REPO, RESULTS_DIR, machine_info
from controller.domain.availability import AvailabilityMonitor, KindTiming

SPEAKER = KindTiming(heartbeat_s=60, timeout_s=150, alarm_after_s=600)
T0 = datetime(2026, 11, 25, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run(devices: int, rounds: int) -> dict[str, object]:
    ids = [f"spk-{n:05d}" for n in range(devices)]
    monitor = AvailabilityMonitor({"speaker": SPEAKER}, SPEAKER)
    for device_id in ids:
        monitor.register(device_id, "speaker")
    started = time.perf_counter()
    for n, device_id in enumerate(ids):
        monitor.heard(device_id, online=True, now=at(n * 60 / devices))
    first_s = time.perf_counter() - started
    heartbeat_runs = []
    for round_ in range(1, rounds + 1):
        started = time.perf_counter()
        for n, device_id in enumerate(ids):
            monitor.heard(device_id, online=True, now=at(round_ * 60 + n * 60 / devices))
        heartbeat_runs.append((time.perf_counter() - started) / devices)
    idle_runs = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(1000):
            monitor.sweep(at(rounds * 60 + 61))
        idle_runs.append((time.perf_counter() - started) / 1000)
    started = time.perf_counter()
    timed_out = monitor.sweep(at(rounds * 60 + 60 + 151))
    all_due_s = time.perf_counter() - started
    started = time.perf_counter()
    alarms = monitor.sweep(at(rounds * 60 + 60 + 151 + 600))
    alarm_s = time.perf_counter() - started
    started = time.perf_counter()
    cleared = 0
    for device_id in ids:
        cleared += len(monitor.heard(device_id, online=True, now=at(rounds * 60 + 1000)).alarms)
    storm_s = time.perf_counter() - started
    return {
        "devices": devices,
        "first_online_us_per_device": round(first_s / devices * 1e6, 3),
        "heartbeat_us_per_device": round(statistics.median(heartbeat_runs) * 1e6, 3),
        "heartbeat_cpu_share_at_60s": round(statistics.median(heartbeat_runs) * devices / 60, 7),
        "idle_sweep_us": round(statistics.median(idle_runs) * 1e6, 3),
        "all_time_out_ms": round(all_due_s * 1e3, 2),
        "all_time_out_us_per_device": round(all_due_s / devices * 1e6, 3),
        "transitions": len(timed_out.transitions),
        "alarms_raised_ms": round(alarm_s * 1e3, 2),
        "alarms": len(alarms.alarms),
        "reconnect_storm_ms": round(storm_s * 1e3, 2),
        "alarms_cleared": cleared,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path)
    options = parser.parse_args()
    document = {
        "machine": machine_info(),
        "at": datetime.now(UTC).isoformat(),
        **run(options.devices, options.rounds),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = options.output or RESULTS_DIR / f"availability-{stamp}.json"
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    for key, value in document.items():
        if key != "machine":
            print(f"{key}: {value}")
    print(f"results: {output.relative_to(REPO) if output.is_relative_to(REPO) else output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
