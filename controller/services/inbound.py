"""What devices say on their own: command reports, availability, telemetry, malformed payloads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import structlog
from prometheus_client import Counter
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from controller.domain.clock import Clock
from controller.domain.deliveries import DeliveryState, state_from_report
from controller.services.area_fanout import AreaFollowers
from controller.services.availability import HEARTBEAT_TRANSPORT, AvailabilityService
from controller.services.telemetry import TelemetryPipeline
from controller.services.tracker import DeliveryTracker, TrackedDelivery
from controller.store.models import DeviceRow
from drivers.base import CommandReport, DeviceState, InboundEvent, MalformedPayload, TelemetryReading

log = structlog.get_logger(__name__)
_MAX_UNREGISTERED = 100_000
_MAX_READ_BACKS = 10_000

INBOUND_MESSAGES = Counter("wardcast_inbound_messages_total", "Messages from devices", ["kind"])
OFFLINE_REPORTS = Counter(
    "wardcast_offline_reports_total",
    "Reports of plays a device started from its cached programme while offline",
    ["outcome"],
)
# The hot paths' children, looked up once (a labels() call per message shows in the ingest profile).
_TELEMETRY_MESSAGES = INBOUND_MESSAGES.labels("telemetry")
_REPORT_MESSAGES = INBOUND_MESSAGES.labels("report")
REJECTED_PAYLOADS = Counter(
    "wardcast_rejected_payloads_total",
    "Device payloads that were malformed or from unknown devices",
    ["reason"],
)

# docs/protocol.md §1.15.5: a device refused a message on its signature, sequence or target. A flood of
# these is someone with broker access publishing to device topics (or a device with the wrong key).
DEVICE_REFUSALS = Counter(
    "wardcast_device_refusals_total",
    "Messages devices refused on a signature, replay or target check, by reason",
    ["reason"],
)


class DeviceDirectory:
    """Transport address → device id, kept in memory because every inbound message needs it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._by_address: dict[tuple[str, str], str] = {}
        self._address_of: dict[str, tuple[str, str]] = {}

    def reload(self) -> None:
        with Session(self._engine) as session:
            rows = session.exec(select(DeviceRow.transport, DeviceRow.address, DeviceRow.id)).all()
        self._by_address = {(transport, address): device_id for transport, address, device_id in rows}
        self._address_of = {device_id: key for key, device_id in self._by_address.items()}

    def device_id(self, transport: str, address: str) -> str | None:
        return self._by_address.get((transport, address))

    def put(self, transport: str, address: str, device_id: str) -> None:
        self.remove(device_id)
        self._by_address[(transport, address)] = device_id
        self._address_of[device_id] = (transport, address)

    def remove(self, device_id: str) -> None:
        key = self._address_of.pop(device_id, None)
        if key is not None:
            self._by_address.pop(key, None)


class OperationReports(Protocol):
    """Whoever sent remote operations (services/operations.py): takes the reports on them."""

    def report(self, device_id: str, report: CommandReport) -> bool:
        """True if the report is about an operation's command (and was taken)."""
        ...


class InboundProcessor:
    def __init__(
        self,
        transport: str,
        directory: DeviceDirectory,
        tracker: DeliveryTracker,
        clock: Clock,
        *,
        followers: AreaFollowers | None = None,
        telemetry: TelemetryPipeline | None = None,
        availability: AvailabilityService | None = None,
        operations: OperationReports | None = None,
    ) -> None:
        self._transport = transport
        self._availability = availability
        self._operations = operations
        self._telemetry = telemetry
        self._followers = followers
        self._clock = clock
        self._directory = directory
        self._tracker = tracker
        self._unknown_logged: set[str] = set()
        # The last state of addresses not registered yet: retained states arrive once, at subscribe
        # time, and a device registered later must not look offline until it next changes.
        self._unregistered_states: dict[str, DeviceState] = {}
        # Offline reports waiting for their delivery to be read back from the database, in order.
        self._reconciling: dict[str, list[CommandReport]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Services whose commands are not deliveries (firmware updates): each says whether it took
        # a report that no delivery claimed.
        self.report_takers: list[Callable[[CommandReport], bool]] = []

    async def run(self, events: AsyncIterator[InboundEvent]) -> None:
        async for event in events:
            self.handle(event)

    def handle(self, event: InboundEvent) -> None:
        if isinstance(event, MalformedPayload):
            INBOUND_MESSAGES.labels("malformed").inc()
            REJECTED_PAYLOADS.labels("malformed").inc()
            log.warning(
                "malformed device payload", topic=event.topic, address=event.address, reason=event.reason
            )
            return
        device_id = self._directory.device_id(self._transport, event.address)
        if device_id is None:
            if isinstance(event, DeviceState) and len(self._unregistered_states) < _MAX_UNREGISTERED:
                self._unregistered_states[event.address] = event
            REJECTED_PAYLOADS.labels("unknown_device").inc()
            if event.address not in self._unknown_logged:
                self._unknown_logged.add(event.address)
                log.warning("message from an unknown device", address=event.address)
            return
        if isinstance(event, CommandReport):
            _REPORT_MESSAGES.inc()
            if self._availability is not None:
                self._availability.alive(device_id)
            if self._operations is not None and self._operations.report(device_id, event):
                return
            self._report(event)
        elif isinstance(event, DeviceState):
            INBOUND_MESSAGES.labels("state").inc()
            self._state(device_id, event)
        elif isinstance(event, TelemetryReading):
            _TELEMETRY_MESSAGES.inc()
            if self._telemetry is None:
                return
            if event.problem is not None:
                self._telemetry.reject(device_id, event.metric, event.problem, event.at)
            else:
                self._telemetry.accept(device_id, event.metric, event.value, event.unit, event.at)

    def _state(self, device_id: str, event: DeviceState) -> None:
        at = event.at or self._clock.now()
        availability = self._availability
        if availability is None:
            self._tracker.device_seen(device_id, online=event.online, at=at, status=dict(event.attributes))
        else:
            reason = event.attributes.get("reason")
            online = availability.heard(
                device_id,
                online=event.online,
                said_at=event.at,
                reason=reason if isinstance(reason, str) else None,
                heartbeat=self._transport == HEARTBEAT_TRANSPORT,
            )
            if event.online or set(event.attributes) - {"reason"}:
                # The status of a device that spoke (or a driver's verdict on a polled one, which says
                # why: degraded, …). A bare Last Will or shutdown says nothing of firmware or volume,
                # so the last known status stays for the device list; the availability service
                # records the change itself.
                self._tracker.device_seen(
                    device_id,
                    online=online is not False,
                    at=at,
                    status=dict(event.attributes),
                    owns_online=False,
                )
        if self._followers is not None:
            self._followers.update(device_id, event.attributes)

    def device_registered(self, address: str) -> None:
        """Apply the state an address announced before it was registered."""
        state = self._unregistered_states.pop(address, None)
        if state is not None:
            self._unknown_logged.discard(address)
            self.handle(state)

    def _report(self, report: CommandReport) -> None:
        if report.state == "rejected" and report.reason is not None:
            DEVICE_REFUSALS.labels(report.reason).inc()
            log.warning(
                "a device refused a message",
                address=report.address,
                command_id=report.command_id,
                reason=report.reason,
                detail=report.detail,
            )
        waiting = self._reconciling.get(report.command_id)
        if waiting is not None:  # the delivery is being read back: keep the device's order
            waiting.append(report)
            return
        delivery = self._tracker.by_command(report.command_id)
        if delivery is None:
            if any(take(report) for take in self.report_takers):
                return
            if report.offline:
                self._read_back(report)
                return
            # Stop acknowledgements and reports on long-finished deliveries land here.
            log.debug("report for no open delivery", command_id=report.command_id, state=report.state)
            return
        self._apply(delivery, report)

    def _read_back(self, report: CommandReport) -> None:
        """A device's offline report on a delivery that ended (in the controller's view) a while ago."""
        if len(self._reconciling) >= _MAX_READ_BACKS:
            log.warning("too many offline reports being reconciled; dropped", command_id=report.command_id)
            return
        self._reconciling[report.command_id] = [report]
        task = asyncio.create_task(self._reconcile(report.command_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reconcile(self, command_id: str) -> None:
        try:
            delivery = await asyncio.to_thread(self._tracker.load_ended, command_id)
        except SQLAlchemyError:
            log.exception("reading a delivery back for an offline report failed", command_id=command_id)
            delivery = None
        reports = self._reconciling.pop(command_id, [])
        if delivery is None:
            OFFLINE_REPORTS.labels("unknown").inc(len(reports))
            log.warning(
                "offline play of a command the controller has no delivery for",
                command_id=command_id,
                states=[r.state for r in reports],
            )
            return
        for report in reports:
            self._apply(delivery, report)

    def _apply(self, delivery: TrackedDelivery, report: CommandReport) -> None:
        source = "device"
        if report.offline:
            source = "device-offline"
            if self._tracker.reopen_inferred_end(delivery):
                OFFLINE_REPORTS.labels("reconciled").inc()
                log.info(
                    "reconciling an offline play",
                    delivery_id=delivery.delivery_id,
                    device_id=delivery.device_id,
                    state=report.state,
                )
        state = state_from_report(report.state)
        if state is None:
            REJECTED_PAYLOADS.labels("unknown_state").inc()
            log.warning("unknown report state", command_id=report.command_id, state=report.state)
            return
        detail = report.detail
        if state is DeliveryState.CANCELLED and delivery.preempted_by is not None:
            state = DeliveryState.INTERRUPTED
            detail = f"preempted by broadcast {delivery.preempted_by}"
            if delivery.on_preempted != "resume":
                detail += "; not played again (policy: missed)"
        if report.state == "rejected":
            if delivery.state.progress >= DeliveryState.DELIVERED.progress:
                # The device took the authentic command already: what it refused was a copy bearing the
                # same id (a replay, a forgery). Its delivery stands; the refusal is counted above.
                log.info(
                    "a refused copy of a command the device had accepted",
                    delivery_id=delivery.delivery_id,
                    reason=report.reason,
                )
                return
            because = f" ({report.reason})" if report.reason is not None else ""
            detail = f"rejected by the device{because}: {report.detail or 'no reason given'}"
        self._tracker.advance(
            delivery, state, report.at, source=source, detail=detail, played_s=report.played_s
        )
