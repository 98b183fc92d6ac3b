"""`python -m firmware_sim field-devices --from-api URL --token T`: the field-bus devices the controller
has registered, simulated where the registry says they answer.

- Modbus (sensors, and the boxes of wired zones): one simulated box per unit id on each local
  `tcp://127.0.0.1:PORT` link (docs/protocol.md §3);
- CoAP sensors: one simulated sensor per local `coap://127.0.0.1:PORT` address (§5);
- serial LED signs: one simulated sign per RS-485 address on each local `socket://127.0.0.1:PORT` line
  (§4).

The registry is read through the controller's public API (JSON), like `fleet --from-api`; nothing of the
controller is imported. Endpoints on other hosts, serial device paths and RTU links are real hardware's
and are left alone (listed as skipped). Prints `READY modbus=N coap=N signs=N skipped=N` once every
simulator listens, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from firmware_sim.alpha_sign import SignConfig, SimulatedSign, TcpLine
from firmware_sim.coap_sensor import CoapSensorSimulator, SensorConfig
from firmware_sim.lifecycle import stop_on_signals
from firmware_sim.modbus_box import BoxConfig, ModbusBox, ModbusTcpServer

logger = logging.getLogger(__name__)
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})


@dataclass
class FieldPlan:
    """What to simulate: Modbus units per TCP port, CoAP sensor ports, sign addresses per line port."""

    modbus: dict[int, set[int]] = field(default_factory=dict)
    coap: set[int] = field(default_factory=set)
    signs: dict[int, set[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _local_port(url: str, schemes: Sequence[str]) -> int | None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or parts.hostname not in _LOCAL_HOSTS or parts.port is None:
        return None
    return parts.port


def plan_from_devices(devices: Sequence[Mapping[str, Any]]) -> FieldPlan:
    plan = FieldPlan()
    for device in devices:
        if not device.get("enabled", True):
            continue
        config = device.get("config") or {}
        transport, name = device.get("transport"), device.get("id", "?")
        if "modbus" in config:
            modbus = config["modbus"]
            port = _local_port(str(modbus.get("link", "")), ("tcp",))
            if port is None:
                plan.skipped.append(f"{name}: {modbus.get('link')}")
                continue
            plan.modbus.setdefault(port, set()).add(int(modbus.get("unit", 1)))
        elif transport == "coap":
            port = _local_port(str(device.get("address", "")), ("coap",))
            if port is None:
                plan.skipped.append(f"{name}: {device.get('address')}")
                continue
            plan.coap.add(port)
        elif transport == "serial" and "serial" in config:
            serial = config["serial"]
            port = _local_port(str(serial.get("port", "")), ("socket",))
            if port is None:
                plan.skipped.append(f"{name}: {serial.get('port')}")
                continue
            plan.signs.setdefault(port, set()).add(str(serial["sign_address"]))
    return plan


def devices_from_api(base_url: str, token: str, *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{base_url.rstrip('/')}/api/v1/devices",
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout_s,
    )
    response.raise_for_status()
    devices: list[dict[str, Any]] = response.json()
    return devices


async def run(plan: FieldPlan, *, seed: int = 1) -> None:
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        for port, units in sorted(plan.modbus.items()):
            boxes = [ModbusBox(BoxConfig(unit=unit, seed=seed + unit)) for unit in sorted(units)]
            await stack.enter_async_context(ModbusTcpServer(boxes, "127.0.0.1", port))
        for index, port in enumerate(sorted(plan.coap)):
            sensor = CoapSensorSimulator(SensorConfig(seed=seed + index), host="127.0.0.1", port=port)
            await stack.enter_async_context(sensor)
        for port, addresses in sorted(plan.signs.items()):
            signs = [SimulatedSign(SignConfig(address=address)) for address in sorted(addresses)]
            await stack.enter_async_context(TcpLine(signs, "127.0.0.1", port))
        sys.stdout.write(
            f"READY modbus={sum(len(u) for u in plan.modbus.values())} coap={len(plan.coap)} "
            f"signs={sum(len(a) for a in plan.signs.values())} skipped={len(plan.skipped)}\n"
        )
        sys.stdout.flush()
        for skipped in plan.skipped:
            logger.info("not simulated (not a local endpoint): %s", skipped)
        with stop_on_signals(stop):
            await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_sim field-devices",
        description="Simulate the registered Modbus boxes, CoAP sensors and serial signs at their endpoints.",
    )
    parser.add_argument("--from-api", required=True, metavar="URL", help="the controller's base URL")
    parser.add_argument("--token", required=True, help="an API bearer token")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    options = parser.parse_args(argv)
    logging.basicConfig(level=options.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = plan_from_devices(devices_from_api(options.from_api, options.token))
    except (httpx.HTTPError, ValueError) as error:
        sys.stderr.write(f"field-devices: cannot read the registry: {error}\n")
        return 1
    try:
        asyncio.run(run(plan, seed=options.seed))
    except OSError as error:
        sys.stderr.write(f"field-devices: cannot listen: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
