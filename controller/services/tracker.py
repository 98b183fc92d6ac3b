"""Delivery state tracking: the single writer of delivery states.

Device reports, broker acknowledgements, expiry and cancellation all pass through here, so the
rule that states never go backwards is enforced in one place. Writes are batched into one
transaction per flush (every `flush_interval_s`), which keeps 5,000 simultaneous acks cheap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy import Engine, bindparam, insert, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, SQLModel, col, select

from controller.domain.clock import Clock, rfc3339
from controller.domain.deliveries import DeliveryState, can_advance
from controller.services.events import EventBus
from controller.store.models import (
    BroadcastRow,
    DeliveryEventRow,
    DeliveryRow,
    DeviceRow,
    OutboxRow,
)

log = structlog.get_logger(__name__)

_KEEP_ENDED = timedelta(minutes=5)
_SWEEP_EVERY = timedelta(milliseconds=500)
_INFERRED_ENDS = frozenset({DeliveryState.EXPIRED, DeliveryState.FAILED})
DELIVERY_TRANSITIONS = Counter("wardcast_delivery_transitions_total", "Delivery state changes", ["state"])


@dataclass(slots=True)
class TrackedDelivery:
    delivery_id: str
    broadcast_id: str
    device_id: str
    command_id: str
    state: DeliveryState
    expires_at: datetime
    expected_play_s: float
    rank: int = 0
    on_preempted: str = "resume"
    # Set when this controller sent a stop because a higher-ranked broadcast took the device.
    preempted_by: str | None = None
    playing_since: datetime | None = None
    ended_at: datetime | None = None
    recorded: set[DeliveryState] = field(default_factory=set)
    # The end was the controller's inference (expired or failed for want of news), not the device's
    # fact: a device that played the command from its cache while offline may still say otherwise.
    inferred_end: bool = False


@dataclass(slots=True)
class _PendingWrites:
    delivery_updates: list[dict[str, Any]] = field(default_factory=list)
    played: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    published: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Published only after the writes commit, so that whoever sees an event can read it back.
    notifications: list[dict[str, Any]] = field(default_factory=list)

    def merged_with(self, newer: _PendingWrites) -> _PendingWrites:
        return _PendingWrites(
            delivery_updates=self.delivery_updates + newer.delivery_updates,
            played=self.played + newer.played,
            events=self.events + newer.events,
            published=self.published + newer.published,
            devices={**self.devices, **newer.devices},
            notifications=self.notifications + newer.notifications,
        )

    def __bool__(self) -> bool:
        return bool(self.delivery_updates or self.played or self.events or self.published or self.devices)


class DeliveryTracker:
    def __init__(
        self,
        engine: Engine,
        bus: EventBus,
        clock: Clock,
        *,
        completion_grace_s: float,
        flush_interval_s: float = 0.05,
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._clock = clock
        self._grace = timedelta(seconds=completion_grace_s)
        self._flush_interval_s = flush_interval_s
        self._by_delivery: dict[str, TrackedDelivery] = {}
        self._by_command: dict[str, str] = {}
        self._playing_on: dict[str, str] = {}
        self.on_ended: Callable[[TrackedDelivery], None] | None = None
        self._pending = _PendingWrites()

    # -- loading -------------------------------------------------------------------------------
    def load_open_deliveries(self) -> None:
        """Start tracking every delivery that has not ended (after a restart)."""
        terminal = [state.value for state in DeliveryState if state.is_terminal]
        with Session(self._engine) as session:
            rows = session.exec(
                select(DeliveryRow, BroadcastRow, DeviceRow.kind)
                .join(BroadcastRow, col(BroadcastRow.id) == col(DeliveryRow.broadcast_id))
                .join(DeviceRow, col(DeviceRow.id) == col(DeliveryRow.device_id))
                .where(col(DeliveryRow.state).not_in(terminal))
            ).all()
            for delivery, broadcast, kind in rows:
                self.track(
                    TrackedDelivery(
                        delivery_id=delivery.id,
                        broadcast_id=broadcast.id,
                        device_id=delivery.device_id,
                        command_id=delivery.command_id,
                        state=DeliveryState(delivery.state),
                        expires_at=broadcast.expires_at,
                        expected_play_s=_expected_seconds(broadcast, kind),
                        rank=broadcast.rank,
                        on_preempted=broadcast.on_preempted,
                        playing_since=delivery.state_at if delivery.state == DeliveryState.PLAYING else None,
                    )
                )

    def track(self, delivery: TrackedDelivery) -> None:
        if delivery.state is DeliveryState.PLAYING:
            self._playing_on[delivery.device_id] = delivery.delivery_id
        # States up to the current one are already in the log (from the DB, or as `queued` when new).
        delivery.recorded.update(
            s for s in DeliveryState if not s.is_terminal and s.progress <= delivery.state.progress
        )
        self._by_delivery[delivery.delivery_id] = delivery
        self._by_command[delivery.command_id] = delivery.delivery_id

    def get(self, delivery_id: str) -> TrackedDelivery | None:
        return self._by_delivery.get(delivery_id)

    def by_command(self, command_id: str) -> TrackedDelivery | None:
        delivery_id = self._by_command.get(command_id)
        return self._by_delivery.get(delivery_id) if delivery_id else None

    def open_deliveries_of(self, broadcast_id: str) -> list[TrackedDelivery]:
        return [
            d
            for d in self._by_delivery.values()
            if d.broadcast_id == broadcast_id and not d.state.is_terminal
        ]

    def open_deliveries(self) -> Iterable[TrackedDelivery]:
        return (d for d in self._by_delivery.values() if not d.state.is_terminal)

    # -- changes -------------------------------------------------------------------------------
    def advance(
        self,
        delivery: TrackedDelivery,
        state: DeliveryState,
        at: datetime,
        *,
        source: str,
        detail: str | None = None,
        played_s: float | None = None,
    ) -> bool:
        """Record `state` if it moves the delivery forward; return whether it did.

        A fact that arrives after a later one (the broker's PUBACK processed after the device already
        reported `delivered`) is still logged with its own time, without moving the state back.
        """
        if played_s is not None:
            # A device's "stopped" after a cancel changes no state but still tells how long it played.
            self._pending.played.append({"b_id": delivery.delivery_id, "b_played_s": played_s})
        if not can_advance(delivery.state, state):
            if (
                state.progress < delivery.state.progress
                and not state.is_terminal
                and state not in delivery.recorded
            ):
                delivery.recorded.add(state)
                self._pending.events.append(
                    {
                        "delivery_id": delivery.delivery_id,
                        "state": state.value,
                        "at": at,
                        "source": source,
                        "detail": detail,
                    }
                )
            return False
        delivery.state = state
        delivery.recorded.add(state)
        if state is DeliveryState.PLAYING:
            delivery.playing_since = at
            self._playing_on[delivery.device_id] = delivery.delivery_id
        elif state.is_terminal and self._playing_on.get(delivery.device_id) == delivery.delivery_id:
            del self._playing_on[delivery.device_id]
        self._pending.delivery_updates.append(
            {"b_id": delivery.delivery_id, "b_state": state.value, "b_state_at": at, "b_detail": detail}
        )
        self._pending.events.append(
            {
                "delivery_id": delivery.delivery_id,
                "state": state.value,
                "at": at,
                "source": source,
                "detail": detail,
            }
        )
        DELIVERY_TRANSITIONS.labels(state.value).inc()
        self._pending.notifications.append(
            {
                "type": "delivery",
                "broadcast_id": delivery.broadcast_id,
                "delivery_id": delivery.delivery_id,
                "device_id": delivery.device_id,
                "state": state.value,
                "at": rfc3339(at),
                "detail": detail,
            }
        )
        if state.is_terminal:
            delivery.ended_at = at
            delivery.inferred_end = source == "controller" and state in _INFERRED_ENDS
        if state.is_terminal and self.on_ended is not None:
            self.on_ended(delivery)
        return True

    def reopen_inferred_end(self, delivery: TrackedDelivery) -> bool:
        """Let a device's own facts replace the controller's inferred end (docs/protocol.md §2,
        reconciling offline plays): back to the furthest state logged before that end."""
        if not (delivery.state.is_terminal and delivery.inferred_end):
            return False
        reached = [state for state in delivery.recorded if not state.is_terminal]
        delivery.state = max(reached, key=lambda state: state.progress, default=DeliveryState.QUEUED)
        delivery.ended_at = None
        delivery.inferred_end = False
        return True

    def load_ended(self, command_id: str) -> TrackedDelivery | None:
        """A delivery no longer held in memory, read back by its command id so that a device's late
        offline reports can still reconcile it; None when there is no such delivery."""
        with Session(self._engine) as session:
            found = session.exec(
                select(DeliveryRow, BroadcastRow)
                .join(BroadcastRow, col(BroadcastRow.id) == col(DeliveryRow.broadcast_id))
                .where(DeliveryRow.command_id == command_id)
            ).first()
            if found is None:
                return None
            row, broadcast = found
            events = session.exec(
                select(DeliveryEventRow.state, DeliveryEventRow.source).where(
                    DeliveryEventRow.delivery_id == row.id
                )
            ).all()
        held = self._by_delivery.get(row.id)
        if held is not None:  # tracked again meanwhile
            return held
        state = DeliveryState(row.state)
        terminal_sources = {source for logged, source in events if DeliveryState(logged).is_terminal}
        delivery = TrackedDelivery(
            delivery_id=row.id,
            broadcast_id=broadcast.id,
            device_id=row.device_id,
            command_id=row.command_id,
            state=state,
            expires_at=broadcast.expires_at,
            expected_play_s=broadcast.planned_play_s,  # only a speaker plays offline
            rank=broadcast.rank,
            on_preempted=broadcast.on_preempted,
            ended_at=row.state_at if state.is_terminal else None,
            recorded={DeliveryState(logged) for logged, _ in events},
            inferred_end=state in _INFERRED_ENDS and terminal_sources == {"controller"},
        )
        self._by_delivery[delivery.delivery_id] = delivery
        self._by_command[delivery.command_id] = delivery.delivery_id
        return delivery

    def playing_on(self, device_id: str) -> TrackedDelivery | None:
        """The delivery the device last reported playing, while it has not ended."""
        delivery_id = self._playing_on.get(device_id)
        return self._by_delivery.get(delivery_id) if delivery_id else None

    def mark_published(self, outbox_id: int, delivery_ids: Iterable[str], at: datetime) -> None:
        """The broker took outbox command `outbox_id`, which carries these deliveries."""
        self._pending.published.append({"b_id": outbox_id, "b_at": at})
        for delivery_id in delivery_ids:
            delivery = self._by_delivery.get(delivery_id)
            if delivery is not None:
                self.advance(delivery, DeliveryState.SENT, at, source="broker")

    def device_seen(
        self, device_id: str, *, online: bool, at: datetime, status: dict[str, Any], owns_online: bool = True
    ) -> None:
        """The device's latest status; `owns_online` false when the availability service records the
        online flag itself (with its transitions): written here too, a batch flushed late could
        overwrite a newer transition."""
        row: dict[str, Any] = {"b_id": device_id, "b_last_seen": at, "b_status": status}
        if owns_online:
            row["b_online"] = online
        self._pending.devices[device_id] = row
        self._pending.notifications.append(
            {"type": "device", "device_id": device_id, "online": online, "at": rfc3339(at), "status": status}
        )

    def expire_overdue(self) -> None:
        """Expire what can no longer start and fail what stopped reporting mid-play."""
        now = self._clock.now()
        for delivery in list(self._by_delivery.values()):
            if delivery.ended_at is not None:
                # Ended deliveries stay a while so that late reports (played seconds) still find them.
                if now - delivery.ended_at > _KEEP_ENDED:
                    self._by_delivery.pop(delivery.delivery_id, None)
                    self._by_command.pop(delivery.command_id, None)
                continue
            if delivery.state is DeliveryState.PLAYING and delivery.playing_since is not None:
                if now > delivery.playing_since + timedelta(seconds=delivery.expected_play_s) + self._grace:
                    self.advance(
                        delivery,
                        DeliveryState.FAILED,
                        now,
                        source="controller",
                        detail="no completion report from the device",
                    )
            elif delivery.state is DeliveryState.DELIVERED:
                if now > delivery.expires_at + self._grace:
                    self.advance(
                        delivery,
                        DeliveryState.EXPIRED,
                        now,
                        source="controller",
                        detail="device never started it before expiry",
                    )
            elif now >= delivery.expires_at:
                self.advance(
                    delivery,
                    DeliveryState.EXPIRED,
                    now,
                    source="controller",
                    detail="expired before the device received it",
                )

    # -- persistence ---------------------------------------------------------------------------
    async def run(self) -> None:
        last_sweep = self._clock.now()
        while True:
            await asyncio.sleep(self._flush_interval_s)
            if self._clock.now() - last_sweep >= _SWEEP_EVERY:
                last_sweep = self._clock.now()
                self.expire_overdue()
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, _PendingWrites()
        try:
            await asyncio.to_thread(self._write, pending)
        except SQLAlchemyError:
            # Keep the batch and try again on the next flush: a state must not be lost to a DB hiccup.
            log.exception("writing delivery states failed; will retry")
            self._pending = pending.merged_with(self._pending)
            return
        for notification in pending.notifications:
            self._bus.publish(notification)

    def _write(self, pending: _PendingWrites) -> None:
        def update_by_id(table: type[SQLModel], rows: list[dict[str, Any]], **columns: str) -> None:
            if rows:
                statement = (
                    update(table)
                    .where(table.id == bindparam("b_id"))  # type: ignore[attr-defined]
                    .values({column: bindparam(key) for column, key in columns.items()})
                )
                session.connection().execute(statement, rows)

        with Session(self._engine) as session:
            update_by_id(
                DeliveryRow,
                pending.delivery_updates,
                state="b_state",
                state_at="b_state_at",
                detail="b_detail",
            )
            update_by_id(DeliveryRow, pending.played, played_s="b_played_s")
            if pending.events:
                session.connection().execute(insert(DeliveryEventRow), pending.events)
            update_by_id(OutboxRow, pending.published, published_at="b_at")
            devices = list(pending.devices.values())
            update_by_id(
                DeviceRow,
                [row for row in devices if "b_online" in row],
                online="b_online",
                last_seen="b_last_seen",
                status="b_status",
            )
            update_by_id(
                DeviceRow,
                [row for row in devices if "b_online" not in row],
                last_seen="b_last_seen",
                status="b_status",
            )
            session.commit()


def _expected_seconds(broadcast: BroadcastRow, device_kind: str) -> float:
    """How long a delivery should play: the audio's length, or a screen's display time."""
    if device_kind == "led_screen" and broadcast.display is not None:
        return float(broadcast.display["display_s"])
    return broadcast.planned_play_s


def expected_play_seconds(
    durations_s: Sequence[float], repeats: int, gap_s: float, max_duration_s: float
) -> float:
    """How long a device plays a playlist `repeats` times with `gap_s` between repeats, capped."""
    return min(sum(durations_s) * repeats + gap_s * (repeats - 1), max_duration_s)
