"""Sensors on field buses (issue 5): the registered devices of transport `modbus` (polled) and `coap`
(observed), their readings and availability fed through the same inbound path as every transport's.

One `FieldSensors` per transport; what differs between transports is how a device's stored `config`
becomes the driver's sensor, and how the driver adds and removes one (`SensorAdapter`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, select

from controller.domain.clock import Clock
from controller.services.availability import AvailabilityService
from controller.services.inbound import DeviceDirectory, InboundProcessor
from controller.services.telemetry import TelemetryPipeline
from controller.services.tracker import DeliveryTracker
from controller.store.models import DeviceRow
from drivers.base import Driver
from drivers.coap import CoapDriver, CoapSensor, MetricLimits, ReadingResource
from drivers.modbus_codec import RegisterFormat
from drivers.modbus_field import ModbusDriver, ModbusSensor, RegisterPoint

log = structlog.get_logger(__name__)

MODBUS = "modbus"
COAP = "coap"


class SensorAdapter(Protocol):
    """A transport's driver, seen as a set of sensors that can be added and removed by address."""

    @property
    def driver(self) -> Driver: ...

    async def add(self, address: str, config: Mapping[str, Any]) -> str:
        """Start reading the sensor; returns a short description for the log. ValueError/KeyError:
        the configuration cannot be used."""
        ...

    async def remove(self, address: str) -> None: ...


@dataclass
class ModbusAdapter:
    driver: ModbusDriver

    async def add(self, address: str, config: Mapping[str, Any]) -> str:
        sensor = modbus_sensor(address, config)
        await self.driver.add_sensor(sensor)
        return f"{sensor.link} unit {sensor.unit}"

    async def remove(self, address: str) -> None:
        await self.driver.remove(address)


@dataclass
class CoapAdapter:
    driver: CoapDriver

    async def add(self, address: str, config: Mapping[str, Any]) -> str:
        sensor = coap_sensor(address, config)
        await self.driver.add_sensor(sensor)
        return sensor.address

    async def remove(self, address: str) -> None:
        await self.driver.remove_sensor(address)


def modbus_sensor(address: str, config: Mapping[str, Any]) -> ModbusSensor:
    """The driver's view of a device's `config.modbus` (validated by the API when it was stored)."""
    modbus = config["modbus"]
    points = tuple(
        RegisterPoint(
            metric=register["metric"],
            table=register.get("table", "input"),
            address=register["address"],
            format=RegisterFormat(
                register["metric"],
                register.get("type", "uint16"),
                byte_order=register.get("byte_order", "big"),
                word_order=register.get("word_order", "big"),
                scale=register.get("scale", 1.0),
                offset=register.get("offset", 0.0),
            ),
            unit=register.get("unit"),
        )
        for register in modbus["registers"]
    )
    return ModbusSensor(
        address, modbus["link"], modbus.get("unit", 1), points, modbus.get("poll_interval_s", 10.0)
    )


def coap_sensor(address: str, config: Mapping[str, Any]) -> CoapSensor:
    """The driver's view of a CoAP sensor: its address is its `coap://host:port`; the readings to
    observe are `config.coap.readings` (or discovered), their ranges `config.metrics`."""
    coap = config.get("coap") or {}
    limits = {
        name: MetricLimits(
            unit=spec.get("unit"),
            minimum=spec["min"] if spec.get("min") is not None else float("-inf"),
            maximum=spec["max"] if spec.get("max") is not None else float("inf"),
        )
        for name, spec in (config.get("metrics") or {}).items()
    }
    readings = tuple(
        ReadingResource(item["path"], item.get("format", "json"), item.get("metric"))
        for item in coap.get("readings", ())
    )
    return CoapSensor(address, readings=readings, limits=limits)


class FieldSensors:
    def __init__(
        self,
        transport: str,
        adapter: SensorAdapter,
        engine: Engine,
        directory: DeviceDirectory,
        tracker: DeliveryTracker,
        clock: Clock,
        telemetry: TelemetryPipeline,
        availability: AvailabilityService | None = None,
    ) -> None:
        self.transport = transport
        self._adapter = adapter
        self._engine = engine
        self._inbound = InboundProcessor(
            transport, directory, tracker, clock, telemetry=telemetry, availability=availability
        )
        # device id → (address, config) being read: to remove a device by its id, and to leave one alone
        # when nothing about its transport changed.
        self._reading: dict[str, tuple[str, dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._adapter.driver.__aenter__()
        self._task = asyncio.create_task(
            self._inbound.run(self._adapter.driver.events()), name=f"{self.transport}-inbound"
        )
        for device_id, address, config, enabled in await asyncio.to_thread(self._registered):
            await self.device_changed(device_id, address, config if enabled else None)

    def _registered(self) -> list[tuple[str, str, Mapping[str, Any], bool]]:
        with Session(self._engine) as session:
            rows = session.exec(
                select(DeviceRow.id, DeviceRow.address, DeviceRow.config, DeviceRow.enabled).where(
                    DeviceRow.transport == self.transport
                )
            ).all()
        return [(device_id, address, config, enabled) for device_id, address, config, enabled in rows]

    async def device_changed(self, device_id: str, address: str, config: Mapping[str, Any] | None) -> None:
        """Read the device as configured now; `config` None (removed, disabled): stop reading it."""
        if config is not None and self._reading.get(device_id) == (address, config):
            return  # a change of name or place: polling and observations go on undisturbed
        earlier = self._reading.pop(device_id, None)
        if earlier is not None:
            await self._adapter.remove(earlier[0])
        if config is None:
            return
        try:
            description = await self._adapter.add(address, config)
        except (ValueError, KeyError) as error:
            # The reason is the whole story: no traceback.
            log.error(  # noqa: TRY400
                "a sensor's configuration cannot be used",
                transport=self.transport,
                device_id=device_id,
                error=str(error),
            )
            return
        self._reading[device_id] = (address, dict(config))
        log.info("reading a sensor", transport=self.transport, device_id=device_id, at=description)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._adapter.driver.__aexit__(None, None, None)
