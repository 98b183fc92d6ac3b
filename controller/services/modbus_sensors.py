"""Modbus sensors (issue 5): the registered devices of transport `modbus`, polled by the Modbus driver,
their readings and availability fed through the same inbound path as every other transport's."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, select

from controller.domain.clock import Clock
from controller.services.inbound import DeviceDirectory, InboundProcessor
from controller.services.telemetry import TelemetryPipeline
from controller.services.tracker import DeliveryTracker
from controller.store.models import DeviceRow
from drivers.modbus_codec import RegisterFormat
from drivers.modbus_field import LinkUrlError, ModbusDriver, ModbusSensor, RegisterPoint

log = structlog.get_logger(__name__)

TRANSPORT = "modbus"


def sensor_from_config(address: str, config: Mapping[str, Any]) -> ModbusSensor:
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


class ModbusSensors:
    def __init__(
        self,
        engine: Engine,
        directory: DeviceDirectory,
        tracker: DeliveryTracker,
        clock: Clock,
        telemetry: TelemetryPipeline,
        *,
        timeout_s: float = 1.0,
    ) -> None:
        self._engine = engine
        self.driver = ModbusDriver(timeout_s=timeout_s)
        self._inbound = InboundProcessor(TRANSPORT, directory, tracker, clock, telemetry=telemetry)
        self._addresses: dict[str, str] = {}  # device id → address, to remove a device by its id
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.driver.__aenter__()
        self._task = asyncio.create_task(self._inbound.run(self.driver.events()), name="modbus-inbound")
        for device_id, address, config, enabled in await asyncio.to_thread(self._registered):
            await self.device_changed(device_id, address, config if enabled else None)

    def _registered(self) -> list[tuple[str, str, Mapping[str, Any], bool]]:
        with Session(self._engine) as session:
            rows = session.exec(
                select(DeviceRow.id, DeviceRow.address, DeviceRow.config, DeviceRow.enabled).where(
                    DeviceRow.transport == TRANSPORT
                )
            ).all()
        return [(device_id, address, config, enabled) for device_id, address, config, enabled in rows]

    async def device_changed(self, device_id: str, address: str, config: Mapping[str, Any] | None) -> None:
        """Poll the device as configured now; `config` None (removed, disabled): stop polling it."""
        earlier = self._addresses.pop(device_id, None)
        if earlier is not None:
            await self.driver.remove(earlier)
        if config is None or "modbus" not in config:
            return
        try:
            sensor = sensor_from_config(address, config)
            await self.driver.add_sensor(sensor)
        except (LinkUrlError, ValueError, KeyError) as error:
            # The reason is the whole story: no traceback.
            log.error(  # noqa: TRY400
                "a Modbus sensor's configuration cannot be used", device_id=device_id, error=str(error)
            )
            return
        self._addresses[device_id] = address
        log.info("polling a Modbus sensor", device_id=device_id, link=sensor.link, unit=sensor.unit)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.driver.__aexit__(None, None, None)
