"""LED signs on serial lines (issue 5, docs/protocol.md §4): the registered `led_screen` devices of
transport `serial`, grouped by the line they hang on (RS-232, an RS-485 pair, or a serial server at
`socket://host:port`), one `AlphaSignDriver` per line. Their alerts go out through the dispatcher like
an MQTT screen's (the command router picks the line), their reports and availability come back through
the inbound path.

Changing or removing a sign rebuilds the driver of its line: an alert showing on that line's other signs
at that moment is cleared by the sign's own timer, not by the controller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from controller.domain.clock import Clock
from controller.services.availability import AvailabilityService
from controller.services.inbound import DeviceDirectory, InboundProcessor
from controller.services.telemetry import TelemetryPipeline
from controller.services.tracker import DeliveryTracker
from drivers.alpha_sign import AlphaSignDriver, SignProfile
from drivers.base import Ack, DeviceCommand, DriverError, ProtocolError

log = structlog.get_logger(__name__)

TRANSPORT = "serial"
_STATE_POLL_S = 60.0
_PROGRAMME_FILE = "A"
_PROGRAMME_BYTES = 512
_SET_UP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class SerialSign:
    address: str
    port: str
    sign_address: str
    baud: int = 9600
    framing: str = "7E1"
    rows: int = 16


def serial_sign(address: str, config: Mapping[str, Any]) -> SerialSign:
    serial = config["serial"]
    return SerialSign(
        address,
        serial["port"],
        serial["sign_address"],
        serial.get("baud", 9600),
        serial.get("framing", "7E1"),
        serial.get("rows", 16),
    )


@dataclass
class _Line:
    driver: AlphaSignDriver
    signs: dict[str, SerialSign] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


class SerialSigns:
    def __init__(
        self,
        directory: DeviceDirectory,
        tracker: DeliveryTracker,
        clock: Clock,
        telemetry: TelemetryPipeline,
        availability: AvailabilityService | None = None,
    ) -> None:
        self._inbound = InboundProcessor(
            TRANSPORT, directory, tracker, clock, telemetry=telemetry, availability=availability
        )
        self._lines: dict[str, _Line] = {}
        self._signs: dict[str, SerialSign] = {}  # device id → sign
        self._line_of_address: dict[str, str] = {}
        self._not_set_up: set[str] = set()

    def driver_for(self, address: str) -> AlphaSignDriver | None:
        port = self._line_of_address.get(address)
        line = self._lines.get(port) if port is not None else None
        return line.driver if line is not None else None

    def handles(self, address: str) -> bool:
        return self.driver_for(address) is not None

    async def send(self, command: DeviceCommand, *, timeout: float) -> Ack:
        """A show or stop for a sign; a sign registered but not set up yet is set up first."""
        driver = self.driver_for(command.address)
        if driver is None:
            raise ProtocolError(f"{command.address!r} is not a serial sign")
        if command.address in self._not_set_up:
            await self._set_up(driver, command.address, timeout)
        return await driver.send(command, timeout=timeout)

    async def _set_up(self, driver: AlphaSignDriver, address: str, timeout: float) -> None:
        """The sign's memory table: one programme file and the picture files alerts use. It erases the
        sign, so it is done when the sign is registered, not at every start."""
        await driver.configure_memory(address, {_PROGRAMME_FILE: _PROGRAMME_BYTES}, timeout=timeout)
        self._not_set_up.discard(address)
        log.info("serial sign set up", address=address)

    async def device_changed(
        self, device_id: str, address: str, config: Mapping[str, Any] | None, *, set_up: bool = False
    ) -> None:
        """The sign as configured now; `config` None (removed, disabled): forget it. `set_up`: a new
        sign, whose memory is configured now (or before its first command, if it does not answer)."""
        try:
            wanted = serial_sign(address, config) if config is not None and "serial" in config else None
        except (KeyError, ValueError) as error:
            # The reason is the whole story: no traceback.
            log.error(  # noqa: TRY400
                "a serial sign's configuration cannot be used", device_id=device_id, error=str(error)
            )
            wanted = None
        if wanted is not None and not set_up and self._signs.get(device_id) == wanted:
            return  # a change of name or place: the line is not rebuilt under a showing alert
        ports: set[str] = set()
        earlier = self._signs.pop(device_id, None)
        if earlier is not None:
            ports.add(earlier.port)
            self._line_of_address.pop(earlier.address, None)
        if wanted is not None:
            self._signs[device_id] = wanted
            self._line_of_address[wanted.address] = wanted.port
            ports.add(wanted.port)
        for port in ports:
            await self._rebuild(port)
        driver = self.driver_for(address) if set_up and device_id in self._signs else None
        if driver is not None:
            self._not_set_up.add(address)
            try:
                await self._set_up(driver, address, _SET_UP_TIMEOUT_S)
            except DriverError as error:
                log.warning(
                    "a new serial sign could not be set up yet", device_id=device_id, error=str(error)
                )

    async def _rebuild(self, port: str) -> None:
        line = self._lines.pop(port, None)
        if line is not None:
            await self._close(line)
        signs = {sign.address: sign for sign in self._signs.values() if sign.port == port}
        if not signs:
            return
        first = next(iter(signs.values()))
        try:
            driver = AlphaSignDriver(
                port,
                {s.address: SignProfile(s.sign_address, rows=s.rows) for s in signs.values()},
                baud=first.baud,
                framing=first.framing,
                poll_interval_s=_STATE_POLL_S,
            )
        except ValueError as error:
            log.error(  # noqa: TRY400
                "serial signs on a line cannot be driven", port=port, error=str(error)
            )
            return
        await driver.__aenter__()
        line = self._lines[port] = _Line(driver, signs)
        line.task = asyncio.create_task(self._inbound.run(driver.events()), name=f"serial-{port}")
        log.info("driving serial signs", port=port, signs=sorted(signs))

    async def _close(self, line: _Line) -> None:
        await line.driver.close()
        if line.task is not None:
            line.task.cancel()
            await asyncio.gather(line.task, return_exceptions=True)

    async def stop(self) -> None:
        for line in list(self._lines.values()):
            await self._close(line)
        self._lines.clear()
