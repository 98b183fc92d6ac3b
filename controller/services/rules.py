"""Threshold rules on sensor readings (issue 5): alarms raised and cleared, audited, on the event stream,
and optionally an alert sent at once or held as a draft for an operator to approve.

Readings arrive on the event loop (from the telemetry pipeline); each rule's tracker decides at once,
and the transitions are recorded in order by one worker task, so that a raise is always stored before
its clear even when the database is slow.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.domain.clock import Clock, rfc3339
from controller.domain.priority import Priority, PriorityClass
from controller.domain.thresholds import Direction, Threshold, ThresholdTracker, Transition
from controller.services.alerts import AlertRequest, AlertService, AlertTargets
from controller.services.audit import AuditLog
from controller.services.auth import Principal, Role
from controller.services.errors import ServiceError
from controller.services.events import EventBus
from controller.store.models import AlarmRow, RuleRow

log = structlog.get_logger(__name__)

ACTIVE = "active"
CLEARED = "cleared"
# Where an alarm comes from: a threshold rule, or a device offline too long (services/availability.py).
RULE_SOURCE = "rule"
ACTIONS = ("none", "broadcast", "draft")
_MAX_QUEUED_TRANSITIONS = 10_000


class RuleError(ServiceError):
    """A rule that cannot be stored or an alarm that cannot be read."""


def rule_principal(rule: RuleRow) -> Principal:
    """Who a rule acts as in the audit log and for the alert it sends: the rule itself, with the rights
    of an operator (a person approved the rule, and approves its drafts)."""
    return Principal(key_id=rule.id, name=f"rule {rule.name}"[:100], role=Role.OPERATOR, ward_code=None)


@dataclass(slots=True)
class _Watched:
    rule: RuleRow
    tracker: ThresholdTracker
    alarm_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Change:
    rule_id: str
    transition: Transition
    value: float
    at: datetime


@dataclass(slots=True)
class _Index:
    by_metric: dict[tuple[str, str], list[_Watched]] = field(default_factory=dict)
    by_id: dict[str, _Watched] = field(default_factory=dict)


class RuleEngine:
    def __init__(
        self, engine: Engine, bus: EventBus, audit: AuditLog, clock: Clock, alerts: AlertService
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._audit = audit
        self._clock = clock
        self._alerts = alerts
        self._index = _Index()
        self._changes: asyncio.Queue[_Change] = asyncio.Queue(maxsize=_MAX_QUEUED_TRANSITIONS)
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_watch_changed: Callable[[Iterable[tuple[str, str]]], None] | None = None
        """Hears the (device, metric) pairs that rules watch whenever they change (ingest workers)."""

    @property
    def watched_metrics(self) -> Iterable[tuple[str, str]]:
        return self._index.by_metric.keys()

    def _watch_changed(self) -> None:
        if self.on_watch_changed is not None:
            self.on_watch_changed(self.watched_metrics)

    # -- the rules in memory ---------------------------------------------------------------------
    def load(self) -> None:
        """Every enabled rule, with its alarm still active (a restart does not raise it twice)."""
        with Session(self._engine) as session:
            rules = session.exec(select(RuleRow).where(col(RuleRow.enabled))).all()
            active = {
                alarm.rule_id: alarm.id
                for alarm in session.exec(
                    select(AlarmRow).where(AlarmRow.state == ACTIVE, AlarmRow.source == RULE_SOURCE)
                ).all()
            }
        self._index = _Index()
        for rule in rules:
            self._watch(rule, active.get(rule.id))
        self._watch_changed()

    def _watch(self, rule: RuleRow, alarm_id: str | None) -> None:
        tracker = ThresholdTracker(_threshold(rule), active=alarm_id is not None)
        watched = _Watched(rule, tracker, alarm_id)
        self._index.by_id[rule.id] = watched
        self._index.by_metric.setdefault((rule.device_id, rule.metric), []).append(watched)

    def _unwatch(self, rule_id: str) -> _Watched | None:
        watched = self._index.by_id.pop(rule_id, None)
        if watched is not None:
            key = (watched.rule.device_id, watched.rule.metric)
            remaining = [w for w in self._index.by_metric.get(key, []) if w.rule.id != rule_id]
            if remaining:
                self._index.by_metric[key] = remaining
            else:
                self._index.by_metric.pop(key, None)
        return watched

    def rule_changed(self, rule: RuleRow) -> None:
        """A rule was created or edited: it starts over (an active alarm stays active until it clears)."""
        earlier = self._unwatch(rule.id)
        if rule.enabled:
            self._watch(rule, earlier.alarm_id if earlier else self._active_alarm(rule.id))
        self._watch_changed()

    def rule_removed(self, rule_id: str) -> None:
        self._unwatch(rule_id)
        self._watch_changed()

    def _active_alarm(self, rule_id: str) -> str | None:
        with Session(self._engine) as session:
            return session.exec(
                select(AlarmRow.id).where(AlarmRow.rule_id == rule_id, AlarmRow.state == ACTIVE)
            ).first()

    # -- readings --------------------------------------------------------------------------------
    def observe(self, device_id: str, metric: str, value: float, at: datetime) -> None:
        """Called for every accepted reading (on the event loop)."""
        for watched in self._index.by_metric.get((device_id, metric), ()):
            transition = watched.tracker.observe(value, at)
            if transition is None:
                continue
            change = _Change(watched.rule.id, transition, value, at)
            try:
                self._changes.put_nowait(change)
            except asyncio.QueueFull:
                log.error(  # noqa: TRY400  (a full queue, not an error to trace)
                    "too many alarm transitions waiting; one was lost", rule_id=watched.rule.id
                )
                continue
            self._idle.clear()

    async def run(self) -> None:
        while True:
            change = await self._changes.get()
            try:
                await self._record(change)
            except Exception:
                log.exception("recording an alarm transition failed", rule_id=change.rule_id)
            finally:
                self._changes.task_done()
                if self._changes.empty():
                    self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def _record(self, change: _Change) -> None:
        watched = self._index.by_id.get(change.rule_id)
        if watched is None:  # removed meanwhile
            return
        if change.transition is Transition.RAISED:
            await self._raise(watched, change)
        else:
            await self._clear(watched, change)

    async def _raise(self, watched: _Watched, change: _Change) -> None:
        rule = watched.rule
        alarm = AlarmRow(
            id=str(uuid.uuid4()),
            rule_id=rule.id,
            device_id=rule.device_id,
            metric=rule.metric,
            state=ACTIVE,
            raised_at=change.at,
            raised_value=change.value,
        )
        detail = {
            "rule": rule.name,
            "device_id": rule.device_id,
            "metric": rule.metric,
            "value": change.value,
            "raise_at": rule.raise_at,
            "for_s": rule.for_s,
        }

        def store() -> None:
            with Session(self._engine, expire_on_commit=False) as session:
                session.add(alarm)
                session.add(
                    self._audit.entry(rule_principal(rule), "alarm.raise", subject=alarm.id, detail=detail)
                )
                session.commit()

        await asyncio.to_thread(store)
        watched.alarm_id = alarm.id
        log.warning("alarm raised", alarm_id=alarm.id, **detail)
        self._bus.publish(_event(alarm, rule))
        if rule.action in {"broadcast", "draft"} and rule.broadcast is not None:
            await self._send(rule, alarm, draft=rule.action == "draft")

    async def _send(self, rule: RuleRow, alarm: AlarmRow, *, draft: bool) -> None:
        spec = rule.broadcast or {}
        request = AlertRequest(
            headline=spec["headline"],
            text=spec.get("text", ""),
            targets=AlertTargets(areas=tuple(spec["areas"])),
            mode=spec.get("mode", "live"),
            repeats=spec.get("repeats", 1),
            priority=Priority(PriorityClass(spec.get("priority_class", "emergency")), 0),
            source="rule",
        )
        try:
            accepted = await self._alerts.create(request, rule_principal(rule), hold_for_approval=draft)
        except ServiceError as error:
            alarm.detail = f"its broadcast was refused: {error.field}: {error.detail}"[:500]
            # The refusal is the whole story: no traceback needed.
            log.error(  # noqa: TRY400
                "a rule's broadcast was refused", rule_id=rule.id, field=error.field, detail=error.detail
            )
        else:
            alarm.alert_id = accepted.id
            alarm.detail = (
                f"alert {accepted.id} waits for an operator's approval"
                if draft
                else f"alert {accepted.id} sent to {accepted.device_count} devices"
            )

        def update() -> None:
            with Session(self._engine) as session:
                stored = session.get(AlarmRow, alarm.id)
                if stored is not None:
                    stored.alert_id, stored.detail = alarm.alert_id, alarm.detail
                    session.add(stored)
                    session.commit()

        await asyncio.to_thread(update)
        self._bus.publish(_event(alarm, rule))

    async def _clear(self, watched: _Watched, change: _Change) -> None:
        rule = watched.rule
        alarm_id = watched.alarm_id
        watched.alarm_id = None
        if alarm_id is None:
            return

        def store() -> AlarmRow | None:
            with Session(self._engine) as session:
                alarm = session.get(AlarmRow, alarm_id)
                if alarm is None or alarm.state != ACTIVE:
                    return None
                alarm.state = CLEARED
                alarm.cleared_at = change.at
                alarm.cleared_value = change.value
                session.add(alarm)
                session.add(
                    self._audit.entry(
                        rule_principal(rule),
                        "alarm.clear",
                        subject=alarm_id,
                        detail={"rule": rule.name, "value": change.value, "clear_at": rule.clear_at},
                    )
                )
                session.commit()
                session.refresh(alarm)
                return alarm

        alarm = await asyncio.to_thread(store)
        if alarm is not None:
            log.info("alarm cleared", alarm_id=alarm_id, rule=rule.name, value=change.value)
            self._bus.publish(_event(alarm, rule))

    # -- reading back ----------------------------------------------------------------------------
    @staticmethod
    def has_alarms(session: Session, rule_id: str) -> bool:
        return session.exec(select(AlarmRow.id).where(AlarmRow.rule_id == rule_id)).first() is not None

    def alarms(
        self, *, state: str | None = None, limit: int = 200, devices: frozenset[str] | None = None
    ) -> list[dict[str, Any]]:
        """Newest first, of every source; `devices`: only alarms of these devices (a ward's)."""
        with Session(self._engine) as session:
            query = select(AlarmRow, RuleRow).join(
                RuleRow, col(RuleRow.id) == col(AlarmRow.rule_id), isouter=True
            )
            if state is not None:
                query = query.where(AlarmRow.state == state)
            if devices is not None:
                query = query.where(col(AlarmRow.device_id).in_(devices))
            rows = session.exec(query.order_by(col(AlarmRow.raised_at).desc()).limit(limit)).all()
        return [alarm_out(alarm, rule) for alarm, rule in rows]


def _threshold(rule: RuleRow) -> Threshold:
    return Threshold(Direction(rule.direction), rule.raise_at, rule.clear_at, rule.for_s, rule.clear_for_s)


def alarm_out(alarm: AlarmRow, rule: RuleRow | None) -> dict[str, Any]:
    return {
        "id": alarm.id,
        "source": alarm.source,
        "rule_id": alarm.rule_id,
        "rule": rule.name if rule is not None else None,
        "device_id": alarm.device_id,
        "metric": alarm.metric,
        "state": alarm.state,
        "raised_at": rfc3339(alarm.raised_at),
        "raised_value": alarm.raised_value,
        "cleared_at": rfc3339(alarm.cleared_at) if alarm.cleared_at else None,
        "cleared_value": alarm.cleared_value,
        "alert_id": alarm.alert_id,
        "detail": alarm.detail,
    }


def _event(alarm: AlarmRow, rule: RuleRow | None) -> dict[str, Any]:
    return {"type": "alarm", **alarm_out(alarm, rule)}
