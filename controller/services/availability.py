"""Device availability (issue 6): the monitor of controller/domain/availability.py fed with what devices
say, swept by one task that sleeps until the next deadline, and its decisions recorded.

Every online/offline transition becomes a row of `device_availability` and the device's `online` flag;
a device offline beyond its kind's `alarm_after_s` raises an alarm (source `availability`, the alarm
table of the threshold rules), cleared when it returns. Alarms are audited and every change is on the
event stream once committed (`type: availability`, `type: alarm`). Writes are batched: a reconnect
storm of thousands of devices is a few transactions, in the order the changes were decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy import Engine, bindparam, func, insert, or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from controller.domain.availability import (
    AlarmChange,
    AvailabilityMonitor,
    Changes,
    DeviceSnapshot,
    KindTiming,
    Transition,
)
from controller.domain.clock import Clock, rfc3339
from controller.services.audit import AuditLog
from controller.services.events import EventBus
from controller.services.rules import ACTIVE, CLEARED, alarm_out
from controller.settings import AvailabilitySettings, KindAvailabilitySettings
from controller.store.models import AlarmRow, DeviceAvailabilityRow, DeviceRow

log = structlog.get_logger(__name__)

SOURCE = "availability"
# Devices heard through heartbeats; the others are polled by a driver that says when they go away.
HEARTBEAT_TRANSPORT = "mqtt"
# The loop wakes at least this often even with nothing due (a clock that jumped is noticed).
_MAX_IDLE_S = 5.0
AVAILABILITY_TRANSITIONS = Counter(
    "wardcast_availability_transitions_total", "Devices going online or offline", ["online", "reason"]
)


def timings(settings: AvailabilitySettings) -> dict[str, KindTiming]:
    def timing(kind: KindAvailabilitySettings) -> KindTiming:
        return KindTiming(kind.heartbeat_s, kind.timeout_s, kind.alarm_after_s)

    return {name: timing(getattr(settings, name)) for name in type(settings).model_fields}


@dataclass(slots=True)
class _Pending:
    transitions: list[Transition] = field(default_factory=list)
    # (alarm id, change), in the order decided.
    alarms: list[tuple[str, AlarmChange]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.transitions or self.alarms)


class AvailabilityService:
    def __init__(
        self, engine: Engine, bus: EventBus, audit: AuditLog, clock: Clock, settings: AvailabilitySettings
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._audit = audit
        self._clock = clock
        kinds = timings(settings)
        self.monitor = AvailabilityMonitor(kinds, kinds["speaker"])
        self._pending = _Pending()
        # The active alarm of each device that has one.
        self._alarm_ids: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._sleeping_until: datetime | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # -- start ---------------------------------------------------------------------------------------
    def load(self) -> None:
        """Every device as last recorded: online flag, latest transition and active alarm."""
        now = self._clock.now()
        with Session(self._engine) as session:
            devices = session.exec(
                select(DeviceRow.id, DeviceRow.kind, DeviceRow.transport, DeviceRow.online)
            ).all()
            latest = dict(
                session.exec(
                    select(DeviceAvailabilityRow.device_id, func.max(DeviceAvailabilityRow.at)).group_by(
                        col(DeviceAvailabilityRow.device_id)
                    )
                ).all()
            )
            alarms = session.exec(
                select(AlarmRow.device_id, AlarmRow.id).where(
                    AlarmRow.source == SOURCE, AlarmRow.state == ACTIVE
                )
            ).all()
        self._alarm_ids = dict(alarms)
        for device_id, kind, transport, online in devices:
            self.monitor.restore(
                DeviceSnapshot(
                    device_id=device_id,
                    kind=kind,
                    online=online,
                    # SQLite hands the aggregate back as text, without the column's type.
                    since=_as_datetime(latest.get(device_id)),
                    alarm_active=device_id in self._alarm_ids,
                    heartbeat=transport == HEARTBEAT_TRANSPORT,
                ),
                now,
            )

    # -- the fleet -----------------------------------------------------------------------------------
    def register(self, device_id: str, kind: str) -> None:
        self.monitor.register(device_id, kind)

    def forget(self, device_id: str) -> None:
        self.monitor.forget(device_id)

    # -- what devices say ----------------------------------------------------------------------------
    def heard(
        self,
        device_id: str,
        *,
        online: bool,
        said_at: datetime | None,
        reason: str | None = None,
        heartbeat: bool = True,
    ) -> bool | None:
        """A device's state or report; returns whether the device is online now (None: unknown)."""
        changes = self.monitor.heard(
            device_id,
            online=online,
            now=self._clock.now(),
            said_at=said_at,
            reason=reason,
            heartbeat=heartbeat,
        )
        if changes:
            self._queue(changes)
        due = self.monitor.next_due()
        if changes or (due is not None and (self._sleeping_until is None or due < self._sleeping_until)):
            self._wake.set()
        return self.monitor.is_online(device_id)

    def alive(self, device_id: str) -> None:
        """Any other message from the device (a command report): it still works, even if a heartbeat
        was lost. It never brings an offline device back; its next state does."""
        self.monitor.alive(device_id, self._clock.now())

    def _queue(self, changes: Changes) -> None:
        self._pending.transitions.extend(changes.transitions)
        for change in changes.alarms:
            if change.raised:
                alarm_id = self._alarm_ids[change.device_id] = str(uuid.uuid4())
            else:
                found = self._alarm_ids.pop(change.device_id, None)
                if found is None:
                    continue
                alarm_id = found
            self._pending.alarms.append((alarm_id, change))
        self._idle.clear()

    # -- the sweep -----------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock.now()
            changes = self.monitor.sweep(now)
            if changes:
                self._queue(changes)
            await self.flush()
            due = self.monitor.next_due()
            delay_s = _MAX_IDLE_S if due is None else (due - self._clock.now()).total_seconds()
            delay_s = min(max(delay_s, 0.0), _MAX_IDLE_S)
            self._sleeping_until = due
            if delay_s > 0 and not self._pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay_s)

    async def wait_idle(self, timeout: float) -> None:
        """Until everything decided so far is committed (tests, shutdown)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def flush(self) -> None:
        if not self._pending:
            self._idle.set()
            return
        pending, self._pending = self._pending, _Pending()
        try:
            events = await asyncio.to_thread(self._write, pending)
        except SQLAlchemyError:
            log.exception("recording availability changes failed; will retry")
            self._pending = _Pending(
                pending.transitions + self._pending.transitions, pending.alarms + self._pending.alarms
            )
            await asyncio.sleep(1.0)  # the database is in trouble: do not spin
            return
        for transition in pending.transitions:
            AVAILABILITY_TRANSITIONS.labels(str(transition.online).lower(), transition.reason).inc()
        for event in events:
            self._bus.publish(event)
        if not self._pending:
            self._idle.set()

    def _write(self, pending: _Pending) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        with Session(self._engine, expire_on_commit=False) as session:
            connection = session.connection()
            if pending.transitions:
                connection.execute(
                    insert(DeviceAvailabilityRow),
                    [
                        {
                            "device_id": t.device_id,
                            "online": t.online,
                            "at": t.at,
                            "detected_at": t.detected_at,
                            "reason": t.reason,
                            "detail": t.detail,
                        }
                        for t in pending.transitions
                    ],
                )
                connection.execute(
                    update(DeviceRow)
                    .where(col(DeviceRow.id) == bindparam("b_id"))
                    .values(online=bindparam("b_online")),
                    [{"b_id": t.device_id, "b_online": t.online} for t in pending.transitions],
                )
                came_online = [
                    {"b_id": t.device_id, "b_seen": t.detected_at} for t in pending.transitions if t.online
                ]
                if came_online:
                    # A device that comes online was heard then: its last_seen must not wait for the
                    # tracker's status batch, which may commit after this transition is announced.
                    connection.execute(
                        update(DeviceRow)
                        .where(col(DeviceRow.id) == bindparam("b_id"))
                        .where(
                            or_(
                                col(DeviceRow.last_seen).is_(None),
                                col(DeviceRow.last_seen) < bindparam("b_seen"),
                            )
                        )
                        .values(last_seen=bindparam("b_seen")),
                        came_online,
                    )
                events += [_transition_event(t) for t in pending.transitions]
            for alarm_id, change in pending.alarms:
                alarm = self._record_alarm(session, alarm_id, change)
                if alarm is not None:
                    events.append({"type": "alarm", **alarm_out(alarm, None)})
            session.commit()
        return events

    def _record_alarm(self, session: Session, alarm_id: str, change: AlarmChange) -> AlarmRow | None:
        detail = {
            "source": SOURCE,
            "device_id": change.device_id,
            "offline_since": rfc3339(change.offline_since),
        }
        if change.raised:
            alarm = AlarmRow(
                id=alarm_id,
                source=SOURCE,
                device_id=change.device_id,
                state=ACTIVE,
                raised_at=change.at,
                detail=f"offline since {rfc3339(change.offline_since)}",
            )
            session.add(alarm)
            session.add(self._audit.entry(None, "alarm.raise", subject=alarm_id, detail=detail))
            log.warning("device offline too long: alarm raised", alarm_id=alarm_id, **detail)
            return alarm
        found = session.get(AlarmRow, alarm_id)
        if found is None or found.state != ACTIVE:
            return None
        found.state = CLEARED
        found.cleared_at = change.at
        session.add(found)
        session.add(
            self._audit.entry(
                None, "alarm.clear", subject=alarm_id, detail={**detail, "online_at": rfc3339(change.at)}
            )
        )
        log.info("device back online: alarm cleared", alarm_id=alarm_id, device_id=change.device_id)
        return found

    # -- reading back --------------------------------------------------------------------------------
    def history(self, device_id: str, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
        """Transitions with `start` <= at < `end`, oldest first."""
        with Session(self._engine) as session:
            rows = session.exec(
                select(DeviceAvailabilityRow)
                .where(
                    DeviceAvailabilityRow.device_id == device_id,
                    col(DeviceAvailabilityRow.at) >= start,
                    col(DeviceAvailabilityRow.at) < end,
                )
                .order_by(col(DeviceAvailabilityRow.at), col(DeviceAvailabilityRow.id))
                .limit(limit)
            ).all()
        return [_transition_out(row) for row in rows]

    def since(self, device_ids: list[str]) -> dict[str, datetime]:
        """The time of each device's latest transition (for the device list)."""
        if not device_ids:
            return {}
        with Session(self._engine) as session:
            rows = session.exec(
                select(DeviceAvailabilityRow.device_id, func.max(DeviceAvailabilityRow.at))
                .where(col(DeviceAvailabilityRow.device_id).in_(device_ids))
                .group_by(col(DeviceAvailabilityRow.device_id))
            ).all()
        return {device_id: at for device_id, at in ((d, _as_datetime(a)) for d, a in rows) if at is not None}


def _transition_event(transition: Transition) -> dict[str, Any]:
    return {
        "type": "availability",
        "device_id": transition.device_id,
        "online": transition.online,
        "at": rfc3339(transition.at),
        "detected_at": rfc3339(transition.detected_at),
        "reason": transition.reason,
        "detail": transition.detail,
    }


def _transition_out(row: DeviceAvailabilityRow) -> dict[str, Any]:
    return {
        "online": row.online,
        "at": rfc3339(row.at),
        "detected_at": rfc3339(row.detected_at),
        "reason": row.reason,
        "detail": row.detail,
    }


def _as_datetime(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
