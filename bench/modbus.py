"""Issue 5 benchmark: Modbus polling latency, and how long a zone write waits while polls run.

    .venv/bin/python bench/modbus.py                 # 200 TCP devices at 1 Hz for 60 s, then the RTU line
    .venv/bin/python bench/modbus.py --devices 50 --seconds 20

TCP      `--devices` simulated boxes, each on its own Modbus TCP endpoint (one simulator process,
         `python -m firmware_sim modbus-box --tcp …` × N), polled once a second by the Modbus driver
         (drivers/modbus_field.py), each poll two reads (input 0-1, holding 200-208: 11 registers).
         Poll latency per poll from the driver's `on_poll`. Then, on the same run and the same boxes,
         a raw pymodbus client per box doing the same two reads at 1 Hz: the raw baseline (one after
         the other, so that neither steals the other's CPU). While the driver polls, `--writes`
         zone writes (write coil, docs/protocol.md §3.4) are issued at
         random moments through the driver's link of a random box: their latency from the call to the
         reply.
RTU      one RTU-over-TCP line (a serial server), `--rtu-units` boxes on it answering after
         `--reply-delay-ms`; every unit polled back to back so that requests always queue for the line;
         writes issued meanwhile. A write jumps ahead of the queued polls: its latency should stay within
         the request on the wire when it was issued plus its own exchange (`waited_polls` ≤ 1).
Results: bench/results/modbus-<UTC>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import REPO, RESULTS_DIR, LineProcess, clean_env, machine_info, percentile, rounded
from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus import ModbusLink
from drivers.modbus_codec import RegisterFormat
from drivers.modbus_field import ModbusDriver, ModbusSensor, RegisterPoint

POINTS = (
    RegisterPoint("amplifier_temperature", "input", 0, RegisterFormat("t", "int16", scale=0.1), "°C"),
    RegisterPoint("mains_voltage", "input", 1, RegisterFormat("v", "uint16", scale=0.1), "V"),
    RegisterPoint("water_level", "holding", 200, RegisterFormat("w", "float32"), "m"),
    RegisterPoint(
        "water_level_cdab", "holding", 202, RegisterFormat("w", "float32", word_order="little"), "m"
    ),
    RegisterPoint(
        "water_level_badc", "holding", 204, RegisterFormat("w", "float32", byte_order="little"), "m"
    ),
    RegisterPoint(
        "water_level_dcba", "holding", 206, RegisterFormat("w", "float32", "little", "little"), "m"
    ),
    RegisterPoint("water_level_i16", "holding", 208, RegisterFormat("w", "int16", scale=0.01), "m"),
)
TIMEOUT_S = 2.0


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50_ms": rounded(_ms(percentile(values, 50))),
        "p99_ms": rounded(_ms(percentile(values, 99))),
        "max_ms": rounded(_ms(max(values) if values else None)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def start_boxes(workdir: Path, args: list[str], what: str) -> tuple[LineProcess, str]:
    process = LineProcess(
        [sys.executable, "-m", "firmware_sim", "modbus-box", *args],
        env=clean_env(),
        log_path=workdir / f"{what}.log",
        what=what,
    )
    return process, process.expect("READY", timeout=60)


async def raw_poller(host: str, port: int, seconds: float, latencies: list[float]) -> None:
    client = AsyncModbusTcpClient(host, port=port, timeout=TIMEOUT_S, retries=0)
    if not await client.connect():
        raise RuntimeError(f"raw client: cannot connect to {host}:{port}")
    try:
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + random.random()
        end = loop.time() + seconds
        while next_poll < end:
            await asyncio.sleep(max(0.0, next_poll - loop.time()))
            started = time.perf_counter()
            await client.read_input_registers(0, count=2, device_id=1)
            await client.read_holding_registers(200, count=9, device_id=1)
            latencies.append(time.perf_counter() - started)
            next_poll += 1.0
    finally:
        client.close()


async def writer(
    driver: ModbusDriver, addresses: Sequence[str], count: int, seconds: float, latencies: list[float]
) -> None:
    loop = asyncio.get_running_loop()
    moments = sorted(random.uniform(1.5, seconds - 0.5) for _ in range(count))
    start = loop.time()
    for index, moment in enumerate(moments):
        await asyncio.sleep(max(0.0, start + moment - loop.time()))
        link = driver.link_of(random.choice(addresses))
        started = time.perf_counter()
        await link.write_coil(1, index % 8, index % 2 == 0, timeout=TIMEOUT_S)
        latencies.append(time.perf_counter() - started)


async def tcp_round(ports: Sequence[int], seconds: float, writes: int) -> dict[str, Any]:
    poll_latencies: list[float] = []
    connecting: list[float] = []
    failures = 0
    polled: set[str] = set()

    def on_poll(address: str, elapsed: float, ok: bool) -> None:
        nonlocal failures
        if not ok:
            failures += 1
        elif address not in polled:  # the first poll opens the TCP connection: reported apart
            polled.add(address)
            connecting.append(elapsed)
        else:
            poll_latencies.append(elapsed)

    raw_latencies: list[float] = []
    write_latencies: list[float] = []
    async with ModbusDriver(timeout_s=TIMEOUT_S, on_poll=on_poll) as driver:
        addresses = [f"box-{port}" for port in ports]
        for address, port in zip(addresses, ports, strict=True):
            await driver.add_sensor(ModbusSensor(address, f"tcp://127.0.0.1:{port}", 1, POINTS, 1.0))
        drain = asyncio.create_task(_drain(driver))
        await writer(driver, addresses, writes, seconds, write_latencies)
        drain.cancel()
    # The raw baseline next, alone in the process as the driver was: one client per box, same reads.
    await asyncio.gather(*(raw_poller("127.0.0.1", port, seconds, raw_latencies) for port in ports))
    return {
        "devices": len(ports),
        "seconds": seconds,
        "driver_poll": summary(poll_latencies) | {"failed": failures},
        "driver_first_poll_with_connect": summary(connecting),
        "raw_poll": summary(raw_latencies),
        "p99_vs_raw": rounded(
            (percentile(poll_latencies, 99) or 0) / (percentile(raw_latencies, 99) or 1), 3
        ),
        "write_while_polling": summary(write_latencies),
    }


async def _drain(driver: ModbusDriver) -> None:
    async for _event in driver.events():
        pass


async def rtu_round(port: int, units: int, seconds: float, writes: int) -> dict[str, Any]:
    """Every unit polled back to back on one line; writes measured against the request time."""
    request_times: list[float] = []
    write_latencies: list[float] = []
    alone_writes: list[float] = []
    waited: list[int] = []
    async with ModbusLink.serial(f"socket://127.0.0.1:{port}", baud=115_200) as link:
        alone: list[float] = []
        for _ in range(50):  # the line idle: what one poll and one write take on the wire
            started = time.perf_counter()
            await link.read_holding_registers(1, 200, 9, timeout=TIMEOUT_S)
            alone.append(time.perf_counter() - started)
        for _ in range(20):
            started = time.perf_counter()
            await link.write_coil(1, 0, False, timeout=TIMEOUT_S)
            alone_writes.append(time.perf_counter() - started)
        completed = 0

        async def poll_unit(unit: int, end: float) -> None:
            nonlocal completed
            loop = asyncio.get_running_loop()
            while loop.time() < end:
                started = time.perf_counter()
                await link.read_holding_registers(unit, 200, 9, timeout=TIMEOUT_S)
                request_times.append(time.perf_counter() - started)
                completed += 1

        async def write_now(index: int) -> None:
            await link.wait_waiting(units - 1, timeout=10)  # the line is busy: polls queue for it
            before = completed
            started = time.perf_counter()
            await link.write_coil(1 + index % units, index % 8, True, timeout=TIMEOUT_S)
            write_latencies.append(time.perf_counter() - started)
            waited.append(completed - before)

        end = asyncio.get_running_loop().time() + seconds

        async def writes_spread() -> None:
            for index in range(writes):
                await asyncio.sleep(random.uniform(0.05, max(0.1, seconds / writes)))
                await write_now(index)

        await asyncio.gather(*(poll_unit(unit, end) for unit in range(1, units + 1)), writes_spread())
    return {
        "units": units,
        "seconds": seconds,
        "poll_alone": summary(alone),
        "write_alone": summary(alone_writes),
        "poll_latency_with_queue": summary(request_times),
        "write_while_line_busy": summary(write_latencies),
        "write_waited_polls": {"max": max(waited) if waited else None, "histogram": _histogram(waited)},
    }


def _histogram(values: Sequence[int]) -> dict[str, int]:
    found: dict[str, int] = {}
    for value in values:
        found[str(value)] = found.get(str(value), 0) + 1
    return found


async def run(options: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wardcast-bench-modbus-") as directory:
        workdir = Path(directory)
        tcp_args = [arg for _ in range(options.devices) for arg in ("--tcp", "127.0.0.1:0")]
        boxes, ready = start_boxes(workdir, [*tcp_args, "--walk-interval", "1"], "tcp-boxes")
        line_units = ",".join(str(unit) for unit in range(1, options.rtu_units + 1))
        line, line_ready = start_boxes(
            workdir,
            [
                "--rtu-tcp",
                "127.0.0.1:0",
                "--unit",
                line_units,
                "--baud",
                "115200",
                "--reply-delay-ms",
                str(options.reply_delay_ms),
            ],
            "rtu-line",
        )
        try:
            ports = [int(p) for p in re.findall(r"tcp=127\.0\.0\.1:(\d+)", ready)]
            (rtu_port,) = (int(p) for p in re.findall(r"rtu-tcp=127\.0\.0\.1:(\d+)", line_ready))
            tcp = await tcp_round(ports, options.seconds, options.writes)
            rtu = await rtu_round(rtu_port, options.rtu_units, options.rtu_seconds, options.rtu_writes)
        finally:
            boxes.stop()
            line.stop()
    return {
        "benchmark": "modbus",
        "at": datetime.now(UTC).isoformat(),
        "machine": machine_info(),
        "tcp": tcp,
        "rtu_line": rtu | {"reply_delay_ms": options.reply_delay_ms},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--rtu-units", type=int, default=20)
    parser.add_argument("--rtu-seconds", type=float, default=20.0)
    parser.add_argument("--rtu-writes", type=int, default=100)
    parser.add_argument("--reply-delay-ms", type=float, default=5.0)
    parser.add_argument("--output", type=Path)
    options = parser.parse_args()
    document = asyncio.run(run(options))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = options.output or RESULTS_DIR / f"modbus-{stamp}.json"
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    tcp, rtu = document["tcp"], document["rtu_line"]
    print(f"TCP {tcp['devices']} devices at 1 Hz: driver poll {tcp['driver_poll']}")
    print(f"  raw poll {tcp['raw_poll']}; p99 ÷ raw {tcp['p99_vs_raw']}")
    print(f"  write while polling {tcp['write_while_polling']}")
    print(f"RTU line {rtu['units']} units: poll alone {rtu['poll_alone']}, write alone {rtu['write_alone']}")
    print(f"  polls queued {rtu['poll_latency_with_queue']}")
    print(f"  write while busy {rtu['write_while_line_busy']}, waited polls {rtu['write_waited_polls']}")
    print(f"results: {output.relative_to(REPO) if output.is_relative_to(REPO) else output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
