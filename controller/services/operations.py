"""Remote operations (issue 6): set volume, reboot, test tone, push configuration, to one device or a
group, each a command with an acknowledgement and a result in the operations log.

Acceptance is one transaction, as for broadcasts: the operation, one result row per device (queued),
one outbox command per device and the audit entry. The commands then take the dispatcher's lanes and
the driver's publish path like every other command (so whatever is added there, a signature, applies
to them). Reports on them are taken here (by command id) before the delivery tracker sees them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Engine, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from controller.domain.areas import AreaTree
from controller.domain.clock import Clock, rfc3339
from controller.domain.operations import (
    CONFIGURE,
    OperationInputError,
    ResultState,
    can_advance,
    check_kind,
    operation_command,
    operation_status,
    state_from_report,
    validate_params,
)
from controller.services.audit import AuditLog
from controller.services.auth import Principal
from controller.services.dispatcher import OPERATION_RANK, Dispatcher, QueuedCommand
from controller.services.errors import ServiceError
from controller.services.events import EventBus
from controller.store.models import DeviceRow, OperationResultRow, OperationRow, OutboxRow
from drivers.base import CommandReport

log = structlog.get_logger(__name__)

_MQTT = "mqtt"
_SWEEP_EVERY_S = 0.5
_FLUSH_EVERY_S = 0.05


class OperationError(ServiceError):
    """An operation that cannot be accepted or read."""


@dataclass(frozen=True, slots=True)
class OperationRequest:
    type: str
    devices: tuple[str, ...] = ()
    areas: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Tracked:
    operation_id: str
    device_id: str
    command_id: str
    state: ResultState
    expires_at: datetime


@dataclass(slots=True)
class _Pending:
    # (command id, columns to set), in the order decided.
    updates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    finished: list[tuple[str, datetime]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.updates or self.finished)


class OperationService:
    def __init__(
        self,
        engine: Engine,
        dispatcher: Dispatcher,
        audit: AuditLog,
        bus: EventBus,
        clock: Clock,
        *,
        expiry_s: int,
        result_grace_s: float,
        utc_offset_min: int,
        programmes_changed: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._dispatcher = dispatcher
        self._audit = audit
        self._bus = bus
        self._clock = clock
        self._expiry = timedelta(seconds=expiry_s)
        self._grace = timedelta(seconds=result_grace_s)
        self._utc_offset_min = utc_offset_min
        self._programmes_changed = programmes_changed
        self._open: dict[str, _Tracked] = {}
        # Results not ended yet, per operation: at 0 the operation is finished.
        self._remaining: dict[str, int] = {}
        self._pending = _Pending()
        dispatcher.on_published = self._published
        dispatcher.on_unsent = self._unsent

    # -- start ---------------------------------------------------------------------------------------
    def load(self) -> None:
        """The results still open after a restart (their commands are in the outbox, if unsent)."""
        ended = [state.value for state in ResultState if state.is_terminal]
        with Session(self._engine) as session:
            rows = session.exec(
                select(OperationResultRow, OperationRow.expires_at)
                .join(OperationRow, col(OperationRow.id) == col(OperationResultRow.operation_id))
                .where(col(OperationResultRow.state).not_in(ended))
            ).all()
        for result, expires_at in rows:
            self._track(
                _Tracked(
                    result.operation_id,
                    result.device_id,
                    result.command_id,
                    ResultState(result.state),
                    expires_at,
                )
            )

    def _track(self, tracked: _Tracked) -> None:
        self._open[tracked.command_id] = tracked
        self._remaining[tracked.operation_id] = self._remaining.get(tracked.operation_id, 0) + 1

    # -- accepting -----------------------------------------------------------------------------------
    async def create(self, request: OperationRequest, principal: Principal, tree: AreaTree) -> dict[str, Any]:
        try:
            members = validate_params(request.type, request.params, utc_offset_min=self._utc_offset_min)
        except OperationInputError as error:
            raise OperationError(error.field, error.detail) from error
        commands, accepted = await asyncio.to_thread(self._accept, request, members, principal, tree)
        self._dispatcher.submit(commands)
        if request.type == CONFIGURE and "comm_loss" in members["config"] and self._programmes_changed:
            self._programmes_changed()  # the programmes carry the device's comm-loss policy too
        return accepted

    def _accept(
        self,
        request: OperationRequest,
        members: dict[str, Any],
        principal: Principal,
        tree: AreaTree,
    ) -> tuple[list[QueuedCommand], dict[str, Any]]:
        now = self._clock.now()
        expires_at = now + self._expiry
        operation_id = str(uuid.uuid4())
        with Session(self._engine) as session:
            devices = self._resolve(session, request, principal, tree)
            session.add(
                OperationRow(
                    id=operation_id,
                    type=request.type,
                    params=members,
                    targets={"devices": list(request.devices), "areas": list(request.areas)},
                    device_count=len(devices),
                    created_by=principal.key_id,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            session.flush()  # the operation exists before the results and commands that point at it
            outbox: list[tuple[OutboxRow, DeviceRow]] = []
            for device in devices:
                command_id = str(uuid.uuid4())
                session.add(
                    OperationResultRow(
                        command_id=command_id,
                        operation_id=operation_id,
                        device_id=device.id,
                        state=ResultState.QUEUED.value,
                        state_at=now,
                    )
                )
                row = OutboxRow(
                    device_id=device.id,
                    command_id=command_id,
                    kind=request.type,
                    rank=OPERATION_RANK,
                    created_at=now,
                    expires_at=expires_at,
                    document=operation_command(
                        request.type,
                        members,
                        command_id=command_id,
                        correlation_id=operation_id,
                        address=device.address,
                        issued_at=now,
                        expires_at=expires_at,
                    ),
                )
                session.add(row)
                outbox.append((row, device))
            if request.type == CONFIGURE and "comm_loss" in members["config"]:
                policy = members["config"]["comm_loss"]
                for device in devices:
                    device.comm_loss_policy = policy["policy"]
                    device.comm_loss_after_s = policy.get("after_s")
                    session.add(device)
            session.add(
                self._audit.entry(
                    principal,
                    f"operation.{request.type}",
                    subject=operation_id,
                    detail={
                        "params": members,
                        "targets": {"devices": list(request.devices), "areas": list(request.areas)},
                        "device_count": len(devices),
                    },
                )
            )
            session.flush()
            commands = [QueuedCommand.from_row(row, device.address) for row, device in outbox]
            session.commit()
        for command in commands:
            assert command.device_id is not None  # noqa: S101  (operation commands are per device)
            self._track(
                _Tracked(operation_id, command.device_id, command.command_id, ResultState.QUEUED, expires_at)
            )
        log.info("operation accepted", operation_id=operation_id, type=request.type, devices=len(commands))
        return commands, {
            "id": operation_id,
            "type": request.type,
            "device_count": len(commands),
            "expires_at": rfc3339(expires_at),
        }

    def _resolve(
        self, session: Session, request: OperationRequest, principal: Principal, tree: AreaTree
    ) -> list[DeviceRow]:
        """The devices the operation reaches: those named, and those of the areas (whole subtrees)
        whose kind takes it; a named device that cannot take it is an error naming it."""
        if not request.devices and not request.areas:
            raise OperationError("targets", "name at least one device or area")
        # A ward_staff key's ward, or a technician's assigned wards; None: the whole city.
        wards = principal.device_wards()

        def within(code: str) -> bool:
            return wards is None or any(ward in tree and tree.is_within(code, ward) for ward in wards)

        chosen: dict[str, DeviceRow] = {}
        for index, device_id in enumerate(request.devices):
            name = f"targets.devices[{index}]"
            row = session.get(DeviceRow, device_id)
            if row is None or not within(row.area_code):
                raise OperationError(name, f"unknown device {device_id!r}", status=404)
            if row.transport != _MQTT or not check_kind(request.type, row.kind):
                raise OperationError(name, f"a {row.transport} {row.kind} does not take {request.type}")
            if not row.enabled:
                raise OperationError(name, f"device {device_id!r} is disabled")
            chosen[row.id] = row
        codes: set[str] = set()
        for index, code in enumerate(request.areas):
            name = f"targets.areas[{index}]"
            if code not in tree:
                raise OperationError(name, f"unknown area {code!r}")
            if not within(code):
                named = ", ".join(repr(ward) for ward in sorted(wards or ()))
                noun = "ward" if len(wards or ()) == 1 else "wards"
                raise OperationError(name, f"area {code!r} is outside {noun} {named} of this key", status=403)
            codes |= tree.subtree_codes(code)
        if codes:
            rows = session.exec(
                select(DeviceRow).where(
                    col(DeviceRow.area_code).in_(codes),
                    col(DeviceRow.enabled),
                    DeviceRow.transport == _MQTT,
                )
            ).all()
            for row in rows:
                if check_kind(request.type, row.kind):
                    chosen.setdefault(row.id, row)
        if not chosen:
            raise OperationError("targets", f"no enabled device there takes {request.type}")
        return sorted(chosen.values(), key=lambda row: row.id)

    # -- what happens to the commands -----------------------------------------------------------------
    def _published(self, command: QueuedCommand, at: datetime) -> None:
        tracked = self._open.get(command.command_id)
        if tracked is not None:
            self._advance(tracked, ResultState.SENT, at)

    def _unsent(self, command: QueuedCommand, at: datetime, expired: bool, detail: str) -> None:
        tracked = self._open.get(command.command_id)
        if tracked is not None:
            self._advance(tracked, ResultState.EXPIRED if expired else ResultState.FAILED, at, detail=detail)

    def report(self, device_id: str, report: CommandReport) -> bool:
        """A device's report; True if it is about an operation's command."""
        tracked = self._open.get(report.command_id)
        if tracked is None:
            return False
        if tracked.device_id != device_id:
            log.warning("an operation report from another device", command_id=report.command_id)
            return True
        state = state_from_report(report.state)
        if state is None:
            log.debug("operation report state ignored", command_id=report.command_id, state=report.state)
            return True
        self._advance(tracked, state, report.at, detail=report.detail, result=report.result)
        return True

    def _advance(
        self,
        tracked: _Tracked,
        state: ResultState,
        at: datetime,
        *,
        detail: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        columns: dict[str, Any] = {}
        if state is ResultState.SENT:
            columns["sent_at"] = at  # a PUBACK processed after `delivered` still dates `sent`
        elif state is ResultState.DELIVERED:
            columns["delivered_at"] = at
        if not can_advance(tracked.state, state):
            if columns and state.progress < tracked.state.progress:
                self._pending.updates.append((tracked.command_id, columns))
            return
        tracked.state = state
        columns |= {"state": state.value, "state_at": at}
        if state.is_terminal:
            columns |= {"ended_at": at, "detail": detail[:500] if detail else None}
            if result is not None:
                columns["result"] = dict(result)
        self._pending.updates.append((tracked.command_id, columns))
        self._pending.events.append(
            {
                "type": "operation",
                "operation_id": tracked.operation_id,
                "device_id": tracked.device_id,
                "command_id": tracked.command_id,
                "state": state.value,
                "at": rfc3339(at),
                "detail": detail,
                "result": dict(result) if result is not None else None,
            }
        )
        if state.is_terminal:
            del self._open[tracked.command_id]
            remaining = self._remaining[tracked.operation_id] = self._remaining[tracked.operation_id] - 1
            if remaining == 0:
                del self._remaining[tracked.operation_id]
                self._pending.finished.append((tracked.operation_id, at))

    def expire_overdue(self) -> None:
        """A result never delivered before expiry is `expired`; one delivered but never answered (a
        device that did not come back from a reboot) `failed`, once the grace time has passed too."""
        now = self._clock.now()
        for tracked in list(self._open.values()):
            if now <= tracked.expires_at + self._grace:
                continue
            if tracked.state is ResultState.DELIVERED:
                self._advance(tracked, ResultState.FAILED, now, detail="no result from the device")
            else:
                self._advance(tracked, ResultState.EXPIRED, now, detail="not delivered before expires_at")

    # -- recording -----------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_sweep = loop.time()
        while True:
            await asyncio.sleep(_FLUSH_EVERY_S)
            if loop.time() - last_sweep >= _SWEEP_EVERY_S:
                last_sweep = loop.time()
                self.expire_overdue()
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, _Pending()
        try:
            await asyncio.to_thread(self._write, pending)
        except SQLAlchemyError:
            log.exception("recording operation results failed; will retry")
            self._pending = _Pending(
                pending.updates + self._pending.updates,
                pending.finished + self._pending.finished,
                pending.events + self._pending.events,
            )
            return
        for event in pending.events:
            self._bus.publish(event)

    def _write(self, pending: _Pending) -> None:
        with Session(self._engine) as session:
            connection = session.connection()
            for command_id, columns in pending.updates:
                connection.execute(
                    update(OperationResultRow)
                    .where(col(OperationResultRow.command_id) == command_id)
                    .values(**columns)
                )
            for operation_id, at in pending.finished:
                connection.execute(
                    update(OperationRow).where(col(OperationRow.id) == operation_id).values(finished_at=at)
                )
                states = session.exec(
                    select(OperationResultRow.state).where(OperationResultRow.operation_id == operation_id)
                ).all()
                counts = _counts(states)
                session.add(
                    self._audit.entry(
                        None,
                        "operation.finished",
                        subject=operation_id,
                        detail={"counts": counts, "status": operation_status(ResultState(s) for s in states)},
                    )
                )
                pending.events.append(
                    {"type": "operation_finished", "operation_id": operation_id, "counts": counts}
                )
            session.commit()

    # -- reading back --------------------------------------------------------------------------------
    def describe(self, operation_id: str, visible: frozenset[str] | None) -> dict[str, Any]:
        with Session(self._engine) as session:
            row = session.get(OperationRow, operation_id)
            if row is None:
                raise OperationError("id", f"unknown operation {operation_id!r}", status=404)
            results = session.exec(
                select(OperationResultRow)
                .where(OperationResultRow.operation_id == operation_id)
                .order_by(col(OperationResultRow.device_id))
            ).all()
        if visible is not None and not any(result.device_id in visible for result in results):
            raise OperationError("id", f"unknown operation {operation_id!r}", status=404)
        shown = [result for result in results if visible is None or result.device_id in visible]
        return {
            **_operation_out(row, [r.state for r in shown]),
            "results": [_result_out(result) for result in shown],
        }

    def recent(
        self, limit: int, visible: frozenset[str] | None, device: str | None = None
    ) -> list[dict[str, Any]]:
        """The latest operations the key may see, newest first. With `device`: only those that reached
        it, their counts and status for that device alone, and its result (`device_result`)."""
        if device is not None:
            if visible is not None and device not in visible:
                return []
            visible = frozenset({device})
        with Session(self._engine) as session:
            statement = select(OperationRow).order_by(col(OperationRow.created_at).desc()).limit(limit)
            if device is not None:
                statement = statement.where(
                    col(OperationRow.id).in_(
                        select(OperationResultRow.operation_id).where(OperationResultRow.device_id == device)
                    )
                )
            rows = session.exec(statement).all()
            results = session.exec(
                select(OperationResultRow).where(
                    col(OperationResultRow.operation_id).in_([row.id for row in rows])
                )
            ).all()
        by_operation: dict[str, list[OperationResultRow]] = {}
        for result in results:
            if visible is None or result.device_id in visible:
                by_operation.setdefault(result.operation_id, []).append(result)
        listed = []
        for row in rows:
            if row.id not in by_operation:
                continue
            shown = by_operation[row.id]
            out = _operation_out(row, [result.state for result in shown])
            if device is not None:
                out["device_result"] = _result_out(shown[0])
            listed.append(out)
        return listed


def _counts(states: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts


def _operation_out(row: OperationRow, states: list[str]) -> dict[str, Any]:
    return {
        "id": row.id,
        "type": row.type,
        "params": row.params,
        "targets": row.targets,
        "device_count": row.device_count,
        "created_by": row.created_by,
        "created_at": rfc3339(row.created_at),
        "expires_at": rfc3339(row.expires_at),
        "finished_at": rfc3339(row.finished_at) if row.finished_at else None,
        "status": operation_status(ResultState(state) for state in states),
        "counts": _counts(states),
    }


def _result_out(row: OperationResultRow) -> dict[str, Any]:
    def stamp(value: datetime | None) -> str | None:
        return rfc3339(value) if value is not None else None

    return {
        "device_id": row.device_id,
        "command_id": row.command_id,
        "state": row.state,
        "state_at": rfc3339(row.state_at),
        "sent_at": stamp(row.sent_at),
        "delivered_at": stamp(row.delivered_at),
        "ended_at": stamp(row.ended_at),
        "detail": row.detail,
        "result": row.result,
    }
