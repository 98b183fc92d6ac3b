"""Wired horn zones (issue 5, docs/protocol.md §3.4): a `wired_zone` device is the smart-radio receiver
at an amplifier's line input, plus the Modbus box whose relays connect that amplifier to the group's
horn lines.

The dispatcher sends through `WiredZoneRouter` as through the MQTT driver. A `play` for a wired zone
first runs steps 1-5 of the broadcast sequence on its box (volume, amplifier on, warm-up, zones on, read
back); only then does the command go to the receiver, whose reports land on the zone's delivery like any
speaker's. When the delivery ends (completed, stopped, preempted, failed), the zones go off, and the
amplifier too once none of its zones is in use (step 7). A box that faults or a relay that sticks fails
the delivery with the reason; a box that does not answer is retried by the dispatcher like a link down.

Every command bound for the broker is signed here, just before it is published (docs/protocol.md §1.15),
so that each attempt, a retry included, carries a fresh seq.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import structlog

from controller.domain.command_signing import Target
from controller.services.command_signing import CommandSigner
from controller.services.serial_signs import SerialSigns
from controller.services.tracker import TrackedDelivery
from drivers.base import (
    Ack,
    DeviceCommand,
    DeviceTimeout,
    DeviceUnreachable,
    DriverError,
    InboundEvent,
    ProtocolError,
)
from drivers.modbus_field import ModbusDriver
from drivers.mqtt import MqttDriver

log = structlog.get_logger(__name__)
# Switching off is never too late: the command carries no meaningful expiry.
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class WiredZone:
    device_id: str
    link: str
    unit: int
    zones: tuple[int, ...]
    volume: int | None = None

    @property
    def box(self) -> tuple[str, int]:
        return (self.link, self.unit)

    @property
    def handle(self) -> str:
        """The name the Modbus driver knows this zone's box by."""
        return f"zone:{self.device_id}"


def wired_zone_from_config(device_id: str, config: Mapping[str, Any]) -> WiredZone:
    modbus = config["modbus"]
    return WiredZone(
        device_id, modbus["link"], modbus.get("unit", 1), tuple(modbus["zones"]), modbus.get("volume")
    )


class WiredZoneRouter:
    """The MQTT driver as the dispatcher sees it, with wired zones switched around their plays (and the
    commands of serial LED signs handed to the driver of their line)."""

    def __init__(
        self,
        mqtt: MqttDriver,
        modbus: ModbusDriver,
        *,
        signer: CommandSigner,
        signs: SerialSigns | None = None,
    ) -> None:
        self._mqtt = mqtt
        self._signer = signer
        self._modbus = modbus
        self._signs = signs
        self._by_address: dict[str, WiredZone] = {}
        self._address_of: dict[str, str] = {}
        # command id → zone, for every play whose zones are (being) switched on.
        self._playing: dict[str, WiredZone] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- configuration ---------------------------------------------------------------------------
    async def configure(self, device_id: str, address: str, config: Mapping[str, Any] | None) -> None:
        """The device is (now) a wired zone with this configuration; None: it is not (any more)."""
        wanted = wired_zone_from_config(device_id, config) if config and "modbus" in config else None
        known = self._address_of.get(device_id)
        if wanted is not None and known == address and self._by_address.get(address) == wanted:
            return  # a change of name or place: the box and its link stay as they are
        earlier = self._address_of.pop(device_id, None)
        if earlier is not None:
            zone = self._by_address.pop(earlier, None)
            if zone is not None:
                await self._modbus.remove(zone.handle)
        if wanted is None:
            return
        zone = wanted
        await self._modbus.add_box(zone.handle, zone.link, zone.unit)
        self._by_address[address] = zone
        self._address_of[device_id] = address

    # -- the Driver protocol, for the dispatcher -------------------------------------------------
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def events(self) -> AsyncIterator[InboundEvent]:
        return self._mqtt.events()

    async def ping(self) -> bool:
        return await self._mqtt.ping()

    async def send(self, command: DeviceCommand, *, timeout: float) -> Ack:
        if self._signs is not None and command.area is None and self._signs.handles(command.address):
            return await self._signs.send(command, timeout=timeout)  # a serial LED sign (protocol §4)
        zone = None if command.area is not None else self._by_address.get(command.address)
        if zone is not None and command.document.get("type") == "play":
            await self._switch_on(zone, command, timeout)
        return await self._mqtt.send(await self._signed(command), timeout=timeout)

    async def _signed(self, command: DeviceCommand) -> DeviceCommand:
        target = (
            Target("area", command.area) if command.area is not None else Target("device", command.address)
        )
        try:
            document = await self._signer.sign_command(command.document, target)
        except ValueError as error:  # UnsignableDocumentError, or a document without id/issued_at
            raise ProtocolError(f"command {command.command_id} cannot be signed: {error}") from error
        return dataclasses.replace(command, document=document)

    async def _switch_on(self, zone: WiredZone, command: DeviceCommand, timeout: float) -> None:
        self._playing[command.command_id] = zone
        try:
            await self._modbus.send(
                DeviceCommand(
                    zone.handle,
                    command.command_id,
                    {"op": "zones_on", "zones": list(zone.zones), "volume": zone.volume},
                    command.expires_at,
                ),
                timeout=timeout,
            )
        except DeviceUnreachable as error:
            self._playing.pop(command.command_id, None)
            # The broker link is fine; the box is not: the dispatcher retries after its backoff.
            raise DeviceTimeout(f"wired zone {zone.device_id}: its box is unreachable ({error})") from error
        except DriverError:
            self._playing.pop(command.command_id, None)
            self._switch_off_later(zone)
            raise

    # -- the end of a play -----------------------------------------------------------------------
    def delivery_ended(self, delivery: TrackedDelivery) -> None:
        zone = self._playing.pop(delivery.command_id, None)
        if zone is not None:
            self._switch_off_later(zone)

    def _switch_off_later(self, zone: WiredZone) -> None:
        task = asyncio.create_task(self._switch_off(zone))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _switch_off(self, zone: WiredZone) -> None:
        still_playing = [z for z in self._playing.values() if z.box == zone.box]
        in_use = {number for other in still_playing for number in other.zones}
        zones = [number for number in zone.zones if number not in in_use]
        if not zones and still_playing:
            return
        document = {"op": "zones_off", "zones": zones or list(zone.zones), "amplifier_off": not still_playing}
        try:
            await self._modbus.send(
                DeviceCommand(zone.handle, f"off-{zone.device_id}", document, _FAR_FUTURE), timeout=10.0
            )
        except DriverError as error:
            log.error(  # noqa: TRY400  (the reason is the story)
                "switching a wired zone off failed: its horns may stay connected",
                device_id=zone.device_id,
                error=str(error),
            )
