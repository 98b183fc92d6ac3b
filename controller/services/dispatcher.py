"""The dispatcher: one priority-aware queue and one worker per device, fed by the durable outbox.

A command reaches the outbox table in the same transaction that accepted it; the worker publishes it
and it leaves the outbox (published_at is set) only after the broker acknowledged it. After a crash,
`load_outbox` picks up what was never acknowledged; devices dedupe by command id, so a command that
was acknowledged just before the crash plays once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.domain.clock import Clock
from controller.domain.deliveries import DeliveryState
from controller.domain.operations import OPERATION_TYPES
from controller.services.tracker import DeliveryTracker
from controller.store.models import DeviceRow, OutboxRow
from drivers.base import DeviceCommand, DeviceTimeout, DeviceUnreachable, Driver, DriverError

log = structlog.get_logger(__name__)

COMMANDS_PUBLISHED = Counter(
    "wardcast_commands_published_total", "Commands the broker acknowledged", ["kind"]
)
PUBLISH_FAILURES = Counter("wardcast_publish_failures_total", "Failed publish attempts", ["reason"])

# Stops jump ahead of every play, whatever its priority.
STOP_RANK = 1 << 20
# Remote operations (volume, reboot, test tone, configure) are short: ahead of plays, behind stops.
OPERATION_RANK = STOP_RANK - 1
# Commands that must not go out once expired: a stop is applied even late (docs/protocol.md §1.9), and
# a screen's `show` is left for the device to report `expired`.
_EXPIRE_UNSENT = frozenset({"play", *OPERATION_TYPES})
_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 5.0


@dataclass(order=True, slots=True)
class QueuedCommand:
    """A command for one device, or for every follower of one area topic (docs/protocol.md §1.12)."""

    sort_key: tuple[int, int]
    outbox_id: int = field(compare=False)
    device_id: str | None = field(compare=False)
    address: str = field(compare=False)
    command_id: str = field(compare=False)
    delivery_id: str | None = field(compare=False)
    kind: str = field(compare=False)
    document: dict[str, Any] = field(compare=False)
    expires_at: datetime = field(compare=False)
    area_code: str | None = field(default=None, compare=False)
    covers: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_row(cls, row: OutboxRow, address: str | None) -> QueuedCommand:
        assert row.id is not None  # noqa: S101  (rows come from the database)
        return cls(
            sort_key=(-row.rank, row.id),
            outbox_id=row.id,
            device_id=row.device_id,
            address=address or "",
            command_id=row.command_id,
            delivery_id=row.delivery_id,
            kind=row.kind,
            document=row.document,
            expires_at=row.expires_at,
            area_code=row.area_code,
            covers=tuple(row.covers or ()),
        )

    @classmethod
    def from_values(cls, outbox_id: int, values: Mapping[str, Any], address: str | None) -> QueuedCommand:
        """From the values an outbox row was inserted with, and the id the insert returned."""
        return cls(
            sort_key=(-values["rank"], outbox_id),
            outbox_id=outbox_id,
            device_id=values["device_id"],
            address=address or "",
            command_id=values["command_id"],
            delivery_id=values["delivery_id"],
            kind=values["kind"],
            document=values["document"],
            expires_at=values["expires_at"],
            area_code=values.get("area_code"),
            covers=tuple(values.get("covers") or ()),
        )

    @property
    def lane(self) -> str:
        return self.device_id if self.device_id is not None else f"area:{self.area_code}"

    @property
    def delivery_ids(self) -> tuple[str, ...]:
        return (
            self.covers if self.area_code is not None else ((self.delivery_id,) if self.delivery_id else ())
        )


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """What a cancel took out of the queues before it was sent."""

    deliveries: set[str] = field(default_factory=set)
    outbox_ids: set[int] = field(default_factory=set)


class _Lane:
    """One device's queue and the task that drains it in priority order."""

    def __init__(self) -> None:
        self.heap: list[QueuedCommand] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Dispatcher:
    def __init__(
        self,
        engine: Engine,
        driver: Driver,
        tracker: DeliveryTracker,
        clock: Clock,
        *,
        publish_timeout_s: float,
    ) -> None:
        self._engine = engine
        self._driver = driver
        self._tracker = tracker
        self._clock = clock
        self._publish_timeout_s = publish_timeout_s
        self._lanes: dict[str, _Lane] = {}
        self._link_up = asyncio.Event()
        self._closed = False
        # Hear what became of every command, whatever it carries (remote operations have no delivery).
        self.on_published: Callable[[QueuedCommand, datetime], None] | None = None
        # (command, when, expired: else refused by the transport, detail)
        self.on_unsent: Callable[[QueuedCommand, datetime, bool, str], None] | None = None

    def load_outbox(self) -> list[QueuedCommand]:
        """Every command accepted but never acknowledged by the broker, oldest first."""
        with Session(self._engine) as session:
            rows = session.exec(
                select(OutboxRow, DeviceRow.address)
                .join(DeviceRow, col(DeviceRow.id) == col(OutboxRow.device_id), isouter=True)
                .where(col(OutboxRow.published_at).is_(None))
                .order_by(col(OutboxRow.id))
            ).all()
        return [QueuedCommand.from_row(row, address) for row, address in rows]

    def submit(self, commands: list[QueuedCommand]) -> None:
        for command in commands:
            lane = self._lanes.get(command.lane)
            if lane is None:
                lane = self._lanes[command.lane] = _Lane()
            heapq.heappush(lane.heap, command)
            lane.wake.set()
            if lane.task is None or lane.task.done():
                lane.task = asyncio.create_task(self._drain(lane), name=f"lane-{command.lane}")

    def withdraw(self, delivery_ids: set[str]) -> Withdrawal:
        """Drop still-queued plays of these deliveries (a cancel). An area command goes if any of its
        deliveries is withdrawn: a cancel withdraws a whole broadcast."""
        dropped = Withdrawal()
        for lane in self._lanes.values():
            kept: list[QueuedCommand] = []
            for command in lane.heap:
                carried = command.delivery_ids
                if command.kind == "play" and any(d in delivery_ids for d in carried):
                    dropped.deliveries.update(carried)
                    dropped.outbox_ids.add(command.outbox_id)
                else:
                    kept.append(command)
            if len(kept) != len(lane.heap):
                heapq.heapify(kept)
                lane.heap = kept
        return dropped

    def link_changed(self, *, up: bool) -> None:
        if up:
            self._link_up.set()
        else:
            self._link_up.clear()

    async def close(self) -> None:
        self._closed = True
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def queued_count(self) -> int:
        return sum(len(lane.heap) for lane in self._lanes.values())

    async def _drain(self, lane: _Lane) -> None:
        retry_s = _RETRY_MIN_S
        while lane.heap and not self._closed:
            command = heapq.heappop(lane.heap)
            if command.kind in _EXPIRE_UNSENT and command.expires_at <= self._clock.now():
                self._expire_unsent(command)
                continue
            try:
                ack = await self._driver.send(
                    DeviceCommand(
                        address=command.address,
                        command_id=command.command_id,
                        document=command.document,
                        expires_at=command.expires_at,
                        area=command.area_code,
                    ),
                    timeout=self._publish_timeout_s,
                )
            except (DeviceUnreachable, DeviceTimeout) as error:
                PUBLISH_FAILURES.labels(type(error).__name__).inc()
                heapq.heappush(lane.heap, command)
                if isinstance(error, DeviceUnreachable):
                    # Wait for the link listener to say the link is back (or retry after the backoff).
                    self._link_up.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._link_up.wait(), timeout=retry_s)
                else:
                    await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, _RETRY_MAX_S)
                continue
            except DriverError as error:
                PUBLISH_FAILURES.labels(type(error).__name__).inc()
                log.warning(
                    "command refused by the transport", command_id=command.command_id, error=str(error)
                )
                self._fail_unsent(command, str(error))
                continue
            retry_s = _RETRY_MIN_S
            COMMANDS_PUBLISHED.labels(command.kind).inc()
            # "sent" is dated when the command went on the wire: the PUBACK can be processed after
            # the device has already reported receiving it.
            self._tracker.mark_published(command.outbox_id, command.delivery_ids, ack.published_at)
            if self.on_published is not None:
                self.on_published(command, ack.published_at)
            log.debug("command published", command_id=command.command_id, lane=command.lane)

    def _expire_unsent(self, command: QueuedCommand) -> None:
        self._end_unsent(command, DeliveryState.EXPIRED, "expired before it could be sent")

    def _fail_unsent(self, command: QueuedCommand, detail: str) -> None:
        self._end_unsent(command, DeliveryState.FAILED, detail)

    def _end_unsent(self, command: QueuedCommand, state: DeliveryState, detail: str) -> None:
        now = self._clock.now()
        self._tracker.mark_published(command.outbox_id, (), now)
        if self.on_unsent is not None:
            self.on_unsent(command, now, state is DeliveryState.EXPIRED, detail)
        for delivery_id in command.delivery_ids:
            delivery = self._tracker.get(delivery_id)
            if delivery is not None:
                self._tracker.advance(delivery, state, now, source="controller", detail=detail)
