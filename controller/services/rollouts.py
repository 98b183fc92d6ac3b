"""Staged firmware rollouts: targets, groups, commands, device reports and timeouts, persisted.

The rules are controller/domain/rollouts.py; this service is their one writer. A single task applies
device reports and looks at every live rollout each `firmware.tick_s` (timeouts, the maintenance
window opening), so decisions never race each other; operator actions take the same lock. Commands
go into the outbox in the transaction that records them and leave through the dispatcher like every
other controller-to-device document (docs/protocol.md §1.16), so whatever is applied at publish time
(signatures) applies to them too. Everything is in the database: a restarted controller carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.domain.clock import Clock, rfc3339
from controller.domain.rollouts import (
    DeviceProgress,
    MaintenanceWindow,
    RolloutRuleError,
    RolloutState,
    RolloutView,
    StepTimeouts,
    Thresholds,
    UpdateState,
    can_advance,
    decide,
    first_group_size,
    group_statuses,
    groups_accepted_on_resume,
    split_into_groups,
    state_from_report,
)
from controller.services.audit import AuditLog
from controller.services.auth import Principal
from controller.services.dispatcher import Dispatcher, QueuedCommand
from controller.services.errors import ServiceError
from controller.services.events import EventBus
from controller.services.firmware import FirmwareStore
from controller.services.targets import load_area_tree
from controller.settings import FirmwareSettings, parse_window
from controller.store.models import DeviceRow, FirmwareImageRow, OutboxRow, RolloutDeviceRow, RolloutRow
from drivers.base import CommandReport

log = structlog.get_logger(__name__)

COMMAND_KIND = "firmware"
# Below every play of the normal class (rank 0 and up): an update never delays an announcement.
COMMAND_RANK = -1
_LIVE_STATES = (RolloutState.RUNNING.value, RolloutState.PAUSED.value, RolloutState.ABORTED.value)
_IN_PROGRESS = [state.value for state in UpdateState if state.in_progress]


class RolloutError(ServiceError):
    """A rollout request or action that cannot be carried out."""


@dataclass(frozen=True, slots=True)
class RolloutRequest:
    name: str
    image_id: str
    kind: str | None = None
    area: str | None = None
    from_version: str | None = None
    first_group: int | None = None
    first_group_percent: float | None = None
    groups: int = 1
    success_threshold: float = 1.0
    error_threshold: float = 0.1
    # `HH:MM-HH:MM` local time; `window_given` False takes `firmware.maintenance_window`, and an
    # explicit None lets updates start at any time.
    maintenance_window: str | None = None
    window_given: bool = False
    start_timeout_s: float | None = None
    download_timeout_s: float | None = None
    install_timeout_s: float | None = None


@dataclass(slots=True)
class _StepResult:
    commands: list[QueuedCommand]
    events: list[dict[str, Any]]
    new_commands: dict[str, str]
    ended_commands: list[str]


class RolloutService:
    def __init__(
        self,
        engine: Engine,
        dispatcher: Dispatcher,
        images: FirmwareStore,
        bus: EventBus,
        audit: AuditLog,
        clock: Clock,
        settings: FirmwareSettings,
        *,
        timezone: str,
        base_url: str,
    ) -> None:
        self._engine = engine
        self._dispatcher = dispatcher
        self._images = images
        self._bus = bus
        self._audit = audit
        self._clock = clock
        self._settings = settings
        self._timezone = timezone
        self._base_url = base_url.rstrip("/")
        self._lock = asyncio.Lock()
        self._reports: asyncio.Queue[CommandReport | None] = asyncio.Queue()
        # Command id → rollout id of every update still running: how a report is recognised as ours.
        self._commands: dict[str, str] = {}

    # -- running ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Learn the commands of the updates still running (after a restart)."""
        with Session(self._engine) as session:
            rows = session.exec(
                select(RolloutDeviceRow.command_id, RolloutDeviceRow.rollout_id).where(
                    col(RolloutDeviceRow.state).in_(_IN_PROGRESS),
                    col(RolloutDeviceRow.command_id).is_not(None),
                )
            ).all()
        self._commands = {command_id: rollout_id for command_id, rollout_id in rows if command_id}

    def report(self, report: CommandReport) -> bool:
        """Take a device's report if it is about a firmware update; False leaves it to others."""
        if report.command_id not in self._commands:
            return False
        self._reports.put_nowait(report)
        return True

    def wake(self) -> None:
        self._reports.put_nowait(None)

    async def run(self) -> None:
        while True:
            batch: list[CommandReport] = []
            with contextlib.suppress(TimeoutError):
                first = await asyncio.wait_for(self._reports.get(), timeout=self._settings.tick_s)
                if first is not None:
                    batch.append(first)
            while not self._reports.empty():
                item = self._reports.get_nowait()
                if item is not None:
                    batch.append(item)
            try:
                async with self._lock:
                    result = await asyncio.to_thread(self._step, batch)
            except Exception:
                log.exception("a rollout step failed; the next tick tries again")
                continue
            self._after(result)

    def _after(self, result: _StepResult) -> None:
        self._commands.update(result.new_commands)
        for command_id in result.ended_commands:
            self._commands.pop(command_id, None)
        for event in result.events:
            self._bus.publish(event)
        if result.commands:
            self._dispatcher.submit(result.commands)

    # -- the step: reports, then a decision per live rollout ------------------------------------
    def _step(self, reports: list[CommandReport]) -> _StepResult:
        now = self._clock.now()
        result = _StepResult([], [], {}, [])
        with Session(self._engine, expire_on_commit=False) as session:
            for report in reports:
                self._apply_report(session, report, now, result)
            busy = set(
                session.exec(
                    select(RolloutDeviceRow.rollout_id).where(col(RolloutDeviceRow.state).in_(_IN_PROGRESS))
                ).all()
            )
            rollouts = session.exec(select(RolloutRow).where(col(RolloutRow.state).in_(_LIVE_STATES))).all()
            for rollout in rollouts:
                if rollout.state == RolloutState.RUNNING or rollout.id in busy:
                    self._evaluate(session, rollout, now, result)
            session.commit()
        return result

    def _apply_report(
        self, session: Session, report: CommandReport, now: datetime, result: _StepResult
    ) -> None:
        row = session.exec(
            select(RolloutDeviceRow).where(RolloutDeviceRow.command_id == report.command_id)
        ).first()
        new = state_from_report(report.state)
        if row is None or new is None:
            log.warning(
                "firmware report that fits no update", command_id=report.command_id, state=report.state
            )
            return
        current = UpdateState(row.state)
        if not can_advance(current, new):
            log.info(
                "firmware report out of order or late; kept in the log only",
                device_id=row.device_id,
                state=report.state,
                current=row.state,
            )
            return
        detail = report.detail
        if report.state in ("rejected", "expired"):
            detail = f"{report.state} by the device: {report.detail or 'no reason given'}"
        if new is UpdateState.UPDATED:
            rollout = session.get(RolloutRow, row.rollout_id)
            image = session.get(FirmwareImageRow, rollout.image_id) if rollout is not None else None
            if image is not None and report.firmware != image.version:
                new = UpdateState.FAILED
                detail = (
                    f"the device reports firmware {report.firmware!r} after the update, not {image.version!r}"
                )
        if report.firmware is not None:
            row.reported_version = report.firmware
        row.rolled_back = row.rolled_back or report.rolled_back
        self._move(session, row, new, now, detail, result, device_at=report.at)

    def _move(
        self,
        session: Session,
        row: RolloutDeviceRow,
        new: UpdateState,
        now: datetime,
        detail: str | None,
        result: _StepResult,
        *,
        device_at: datetime | None = None,
    ) -> None:
        row.state = new.value
        row.state_at = now  # timeouts run on the controller's clock, whatever the device's says
        if detail is not None:
            row.detail = detail[:500]
        entry: dict[str, Any] = {"state": new.value, "at": rfc3339(device_at or now)}
        if detail is not None:
            entry["detail"] = detail[:500]
        row.history = [*row.history, entry]
        session.add(row)
        if new.is_terminal and row.command_id is not None:
            result.ended_commands.append(row.command_id)
        event: dict[str, Any] = {
            "type": "rollout",
            "event": "device",
            "rollout_id": row.rollout_id,
            "device_id": row.device_id,
            "group": row.group_index,
            "state": new.value,
            "at": entry["at"],
            "detail": row.detail,
        }
        if new.is_terminal:
            event["rolled_back"] = row.rolled_back
            event["firmware"] = row.reported_version
        result.events.append(event)

    def _view(self, rollout: RolloutRow, rows: list[RolloutDeviceRow]) -> RolloutView:
        return RolloutView(
            state=RolloutState(rollout.state),
            current_group=rollout.current_group,
            group_count=rollout.group_count,
            thresholds=Thresholds(rollout.success_threshold, rollout.error_threshold),
            timeouts=StepTimeouts(
                rollout.start_timeout_s, rollout.download_timeout_s, rollout.install_timeout_s
            ),
            window=_window(rollout.maintenance_window, rollout.timezone),
            devices=[
                DeviceProgress(row.device_id, row.group_index, UpdateState(row.state), row.state_at)
                for row in rows
            ],
            accepted_groups=frozenset(rollout.accepted_groups),
        )

    def _device_rows(self, session: Session, rollout_id: str) -> list[RolloutDeviceRow]:
        return list(
            session.exec(
                select(RolloutDeviceRow)
                .where(RolloutDeviceRow.rollout_id == rollout_id)
                .order_by(col(RolloutDeviceRow.group_index), col(RolloutDeviceRow.device_id))
            ).all()
        )

    def _evaluate(self, session: Session, rollout: RolloutRow, now: datetime, result: _StepResult) -> None:
        rows = self._device_rows(session, rollout.id)
        decision = decide(self._view(rollout, rows), now)
        by_id = {row.device_id: row for row in rows}
        for device_id, why in decision.timed_out:
            self._move(session, by_id[device_id], UpdateState.FAILED, now, why, result)
        if decision.start:
            self._start_updates(session, rollout, [by_id[d] for d in decision.start], now, result)
        if decision.current_group != rollout.current_group:
            for group in range(rollout.current_group + 1, decision.current_group + 1):
                result.events.append(
                    {
                        "type": "rollout",
                        "event": "group",
                        "rollout_id": rollout.id,
                        "group": group,
                        "at": rfc3339(now),
                    }
                )
            rollout.current_group = decision.current_group
        if decision.next_window_at != rollout.next_window_at:
            rollout.next_window_at = decision.next_window_at
        if decision.state.value != rollout.state:
            rollout.state = decision.state.value
            rollout.reason = decision.reason
            session.add(
                self._audit.entry(
                    None,
                    f"rollout.{decision.state.value}",
                    subject=rollout.id,
                    detail={"reason": decision.reason},
                )
            )
            result.events.append(self._state_event(rollout, now))
            log.info("rollout state", rollout_id=rollout.id, state=rollout.state, reason=rollout.reason)
        rollout.updated_at = now
        session.add(rollout)

    def _start_updates(
        self,
        session: Session,
        rollout: RolloutRow,
        rows: list[RolloutDeviceRow],
        now: datetime,
        result: _StepResult,
    ) -> None:
        image = session.get(FirmwareImageRow, rollout.image_id)
        devices = {
            device.id: device
            for device in session.exec(
                select(DeviceRow).where(col(DeviceRow.id).in_([row.device_id for row in rows]))
            ).all()
        }
        assert image is not None  # noqa: S101  (a foreign key)
        expires_at = now + timedelta(seconds=rollout.start_timeout_s)
        url = f"{self._base_url}/firmware/rollouts/{rollout.id}/image?token={rollout.download_token}"
        for row in rows:
            device = devices[row.device_id]
            command_id = str(uuid.uuid4())
            document = {
                "v": 1,
                "type": "firmware_update",
                "id": command_id,
                "correlation_id": rollout.id,
                "device": device.address,
                "issued_at": rfc3339(now),
                "expires_at": rfc3339(expires_at),
                "firmware": {
                    "kind": image.kind,
                    "version": image.version,
                    "url": url,
                    "size": image.size_bytes,
                    "sha256": image.sha256,
                    "signature": image.signature,
                },
            }
            outbox = OutboxRow(
                device_id=device.id,
                command_id=command_id,
                kind=COMMAND_KIND,
                rank=COMMAND_RANK,
                document=document,
                created_at=now,
                expires_at=expires_at,
            )
            session.add(outbox)
            session.flush()
            row.command_id = command_id
            row.from_version = _firmware_of(device)
            self._move(session, row, UpdateState.QUEUED, now, None, result)
            result.new_commands[command_id] = rollout.id
            result.commands.append(QueuedCommand.from_row(outbox, device.address))

    @staticmethod
    def _state_event(rollout: RolloutRow, now: datetime) -> dict[str, Any]:
        return {
            "type": "rollout",
            "event": "state",
            "rollout_id": rollout.id,
            "state": rollout.state,
            "reason": rollout.reason,
            "group": rollout.current_group,
            "at": rfc3339(now),
        }

    # -- creating and steering -----------------------------------------------------------------
    async def create(self, request: RolloutRequest, principal: Principal) -> dict[str, Any]:
        async with self._lock:
            rollout_id = await asyncio.to_thread(self._create, request, principal)
        self.wake()
        return await asyncio.to_thread(self.describe, rollout_id)

    def _create(self, request: RolloutRequest, principal: Principal) -> str:
        now = self._clock.now()
        settings = self._settings
        window = request.maintenance_window if request.window_given else settings.maintenance_window
        if window is not None:
            try:
                parse_window(window)
            except ValueError as error:
                raise RolloutError("maintenance_window", str(error)) from error
        try:
            thresholds = Thresholds(request.success_threshold, request.error_threshold)
        except RolloutRuleError as error:
            raise RolloutError(error.field, error.detail) from error
        with Session(self._engine, expire_on_commit=False) as session:
            image = session.get(FirmwareImageRow, request.image_id)
            if image is None:
                raise RolloutError("image_id", f"unknown firmware image {request.image_id!r}", status=404)
            kind = request.kind or image.kind
            if kind != image.kind:
                raise RolloutError(
                    "kind", f"the image is {image.kind} firmware; it cannot go to {kind} devices"
                )
            targets = self._targets(session, kind, request.area, request.from_version, image.version)
            if not targets:
                raise RolloutError(
                    "targets", "no enabled device matches the filter (or each is already being updated)"
                )
            try:
                first = first_group_size(
                    len(targets), count=request.first_group, percent=request.first_group_percent
                )
                groups = split_into_groups(
                    [d.id for d in targets], first_group_size=first, groups=request.groups
                )
            except RolloutRuleError as error:
                raise RolloutError(error.field, error.detail) from error
            rollout = RolloutRow(
                id=str(uuid.uuid4()),
                name=request.name,
                image_id=image.id,
                state=RolloutState.RUNNING.value,
                target_filter={"kind": kind, "area": request.area, "from_version": request.from_version},
                group_count=len(groups),
                current_group=0,
                accepted_groups=[],
                success_threshold=thresholds.success,
                error_threshold=thresholds.error,
                maintenance_window=window,
                timezone=self._timezone,
                start_timeout_s=request.start_timeout_s or settings.start_timeout_s,
                download_timeout_s=request.download_timeout_s or settings.download_timeout_s,
                install_timeout_s=request.install_timeout_s or settings.install_timeout_s,
                download_token=secrets.token_urlsafe(32),
                created_by=principal.key_id,
                created_at=now,
                updated_at=now,
            )
            session.add(rollout)
            session.flush()
            session.add_all(
                RolloutDeviceRow(
                    rollout_id=rollout.id,
                    device_id=device_id,
                    group_index=index,
                    state=UpdateState.PENDING.value,
                    state_at=now,
                    history=[],
                )
                for index, group in enumerate(groups)
                for device_id in group
            )
            session.add(
                self._audit.entry(
                    principal,
                    "rollout.create",
                    subject=rollout.id,
                    detail={
                        "image": f"{image.kind} {image.version}",
                        "devices": len(targets),
                        "groups": [len(group) for group in groups],
                    },
                )
            )
            session.commit()
        self._bus.publish(self._state_event(rollout, now))
        return rollout.id

    def _targets(
        self, session: Session, kind: str, area: str | None, from_version: str | None, new_version: str
    ) -> list[DeviceRow]:
        query = select(DeviceRow).where(
            DeviceRow.kind == kind,
            col(DeviceRow.enabled),
            col(DeviceRow.decommissioned_at).is_(None),
            DeviceRow.transport == "mqtt",
        )
        if area is not None:
            tree = load_area_tree(session)
            if area not in tree:
                raise RolloutError("area", f"unknown area {area!r}", status=404)
            query = query.where(col(DeviceRow.area_code).in_(tree.subtree_codes(area)))
        busy = set(
            session.exec(
                select(RolloutDeviceRow.device_id)
                .join(RolloutRow, col(RolloutRow.id) == col(RolloutDeviceRow.rollout_id))
                .where(
                    col(RolloutRow.state).in_([RolloutState.RUNNING.value, RolloutState.PAUSED.value]),
                    col(RolloutDeviceRow.state).not_in([s.value for s in UpdateState if s.is_terminal]),
                )
            ).all()
        )
        devices = session.exec(query.order_by(col(DeviceRow.id))).all()
        return [
            device
            for device in devices
            if device.id not in busy
            and (from_version is None or _firmware_of(device) == from_version)
            and _firmware_of(device) != new_version
        ]

    async def pause(self, rollout_id: str, principal: Principal) -> dict[str, Any]:
        return await self._act(rollout_id, principal, "pause")

    async def resume(self, rollout_id: str, principal: Principal) -> dict[str, Any]:
        return await self._act(rollout_id, principal, "resume")

    async def abort(self, rollout_id: str, principal: Principal) -> dict[str, Any]:
        return await self._act(rollout_id, principal, "abort")

    async def _act(self, rollout_id: str, principal: Principal, action: str) -> dict[str, Any]:
        async with self._lock:
            result = await asyncio.to_thread(self._apply_action, rollout_id, principal, action)
        self._after(result)
        self.wake()
        return await asyncio.to_thread(self.describe, rollout_id)

    def _apply_action(self, rollout_id: str, principal: Principal, action: str) -> _StepResult:
        now = self._clock.now()
        result = _StepResult([], [], {}, [])
        with Session(self._engine, expire_on_commit=False) as session:
            rollout = session.get(RolloutRow, rollout_id)
            if rollout is None:
                raise RolloutError("id", f"unknown rollout {rollout_id!r}", status=404)
            state = RolloutState(rollout.state)
            allowed = {
                "pause": {RolloutState.RUNNING},
                "resume": {RolloutState.PAUSED},
                "abort": {RolloutState.RUNNING, RolloutState.PAUSED},
            }[action]
            if state not in allowed:
                raise RolloutError("state", f"a {state.value} rollout cannot be {action}d", status=409)
            rows = self._device_rows(session, rollout.id)
            if action == "pause":
                rollout.state = RolloutState.PAUSED.value
                rollout.reason = f"paused by {principal.name}"
            elif action == "resume":
                accepted = groups_accepted_on_resume(self._view(rollout, rows))
                rollout.accepted_groups = sorted(accepted)
                rollout.state = RolloutState.RUNNING.value
                rollout.reason = None
            else:
                rollout.state = RolloutState.ABORTED.value
                rollout.reason = f"aborted by {principal.name}"
                for row in rows:
                    if row.state == UpdateState.PENDING.value:
                        self._move(
                            session, row, UpdateState.CANCELLED, now, "the rollout was aborted", result
                        )
            rollout.updated_at = now
            session.add(rollout)
            session.add(
                self._audit.entry(
                    principal,
                    f"rollout.{action}",
                    subject=rollout.id,
                    detail={"accepted_groups": rollout.accepted_groups} if action == "resume" else {},
                )
            )
            session.commit()
            result.events.append(self._state_event(rollout, now))
        return result

    # -- reading ---------------------------------------------------------------------------------
    def list_rollouts(self) -> list[dict[str, Any]]:
        with Session(self._engine) as session:
            rows = session.exec(select(RolloutRow).order_by(col(RolloutRow.created_at).desc())).all()
            return [self._summary(session, row) for row in rows]

    def _summary(self, session: Session, rollout: RolloutRow) -> dict[str, Any]:
        image = session.get(FirmwareImageRow, rollout.image_id)
        return {
            "id": rollout.id,
            "name": rollout.name,
            "state": rollout.state,
            "reason": rollout.reason,
            "image": {
                "id": rollout.image_id,
                "kind": image.kind if image else None,
                "version": image.version if image else None,
            },
            "filter": rollout.target_filter,
            "current_group": rollout.current_group,
            "group_count": rollout.group_count,
            "accepted_groups": rollout.accepted_groups,
            "success_threshold": rollout.success_threshold,
            "error_threshold": rollout.error_threshold,
            "maintenance_window": rollout.maintenance_window,
            "timezone": rollout.timezone,
            "next_window_at": rfc3339(rollout.next_window_at) if rollout.next_window_at else None,
            "timeouts_s": {
                "start": rollout.start_timeout_s,
                "download": rollout.download_timeout_s,
                "install": rollout.install_timeout_s,
            },
            "created_at": rfc3339(rollout.created_at),
            "updated_at": rfc3339(rollout.updated_at),
        }

    def describe(self, rollout_id: str) -> dict[str, Any]:
        with Session(self._engine) as session:
            rollout = session.get(RolloutRow, rollout_id)
            if rollout is None:
                raise RolloutError("id", f"unknown rollout {rollout_id!r}", status=404)
            rows = self._device_rows(session, rollout.id)
            summary = self._summary(session, rollout)
        view = self._view(rollout, rows)
        statuses = group_statuses(view.devices, rollout.group_count, view.accepted_groups)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        return {
            **summary,
            "device_count": len(rows),
            "counts": counts,
            "groups": [
                {
                    "index": status.index,
                    "size": status.size,
                    "counts": {state.value: count for state, count in status.counts.items()},
                    "success_ratio": round(status.success_ratio, 4),
                    "error_ratio": round(status.error_ratio, 4),
                    "accepted": status.accepted,
                    "opened": status.index <= rollout.current_group,
                }
                for status in statuses
            ],
            "devices": [
                {
                    "device_id": row.device_id,
                    "group": row.group_index,
                    "state": row.state,
                    "state_at": rfc3339(row.state_at),
                    "from_version": row.from_version,
                    "reported_version": row.reported_version,
                    "rolled_back": row.rolled_back,
                    "detail": row.detail,
                    "history": row.history,
                }
                for row in rows
            ],
        }

    def download(self, rollout_id: str, token: str) -> tuple[Path, FirmwareImageRow]:
        """The image file a rollout's devices fetch, if `token` is the rollout's and it may still be
        fetched (the rollout has not ended, or updates are still running)."""
        with Session(self._engine) as session:
            rollout = session.get(RolloutRow, rollout_id)
            if rollout is None or not hmac.compare_digest(rollout.download_token.encode(), token.encode()):
                raise RolloutError("token", "unknown rollout or wrong download token", status=403)
            if rollout.state in (RolloutState.COMPLETED.value, RolloutState.ABORTED.value):
                running = session.exec(
                    select(RolloutDeviceRow.device_id).where(
                        RolloutDeviceRow.rollout_id == rollout_id,
                        col(RolloutDeviceRow.state).in_(_IN_PROGRESS),
                    )
                ).first()
                if running is None:
                    raise RolloutError("token", f"the rollout is {rollout.state}", status=410)
            image = session.get(FirmwareImageRow, rollout.image_id)
        assert image is not None  # noqa: S101  (a foreign key)
        return self._images.path_for(image.sha256), image


def _firmware_of(device: DeviceRow) -> str | None:
    value = device.status.get("firmware") if isinstance(device.status, Mapping) else None
    return value if isinstance(value, str) else None


def _window(text: str | None, timezone: str) -> MaintenanceWindow | None:
    if text is None:
        return None
    start, end = parse_window(text)
    return MaintenanceWindow(start, end, ZoneInfo(timezone))
