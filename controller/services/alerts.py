"""Alerts for the IOC and operators (issue 4): one call to put a warning on the right speakers.

An alert is accepted in one transaction with its broadcast and its audit entry, so a crash leaves either
all three or none. Before that transaction, the targets are resolved (an alert that would reach no device
is refused before any speech is made) and the content is prepared: the given audio, or the headline and
text spoken by espeak-ng; a drill always starts with the drill prefix tone and the spoken words of
`alerts.drill_announcement`, and its broadcast carries mode `drill` on the wire, so it can never be
taken for a live alert. An `Idempotency-Key` maps a repeated request to the alert it created.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from controller.domain.clock import Clock, rfc3339
from controller.domain.geo import DevicePoint, GeoCircle, GeoPolygon, GeoShape, devices_in
from controller.domain.planner import Targets
from controller.domain.priority import Priority, PriorityClass
from controller.domain.programme import DisplayText
from controller.services.audit import AuditLog
from controller.services.auth import Action, Principal, Role
from controller.services.broadcasts import (
    AUDIO_DEVICE_KINDS,
    SCREEN_KIND,
    AcceptedBroadcast,
    BroadcastError,
    BroadcastRequest,
    BroadcastService,
)
from controller.services.errors import ServiceError
from controller.services.media import MediaStore, record_media
from controller.services.tones import drill_prefix_tone
from controller.services.tts import SpeechSynthesizer, speech_media_id
from controller.services.users import principal_names
from controller.settings import AlertSettings, TtsSettings
from controller.store.models import AlertRow, AreaRow, DeliveryRow, DeviceRow, MediaRow

log = structlog.get_logger(__name__)

ALERT_DEVICE_KINDS = AUDIO_DEVICE_KINDS | {SCREEN_KIND}

ACTIVE = "active"
PENDING_APPROVAL = "pending_approval"
CANCELLED = "cancelled"
RECORDED = "recorded"
SUPERSEDED = "superseded"
STATUSES = (PENDING_APPROVAL, ACTIVE, CANCELLED, RECORDED, SUPERSEDED)
_TERMINAL = frozenset({"completed", "interrupted", "failed", "expired", "cancelled"})
# A console user's principal key id (services/users.principal_of): "user:<user id>".
_DRILL_TONE_NAME = "drill-prefix.wav"
# On LED screens a drill reads as one before anything else (DESIGN.md §2).
_DRILL_LABEL = "DIỄN TẬP: "
_MAX_DISPLAY_S = 86_400.0


class AlertError(ServiceError):
    """An alert that cannot be accepted, approved, cancelled or read."""


@dataclass(frozen=True, slots=True)
class AlertTargets:
    """Areas and devices by code, and shapes (polygons, circles) that take the speakers inside them."""

    areas: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    shapes: tuple[GeoShape, ...] = ()
    # The request field each shape came from, to name it when it reaches no speaker.
    shape_fields: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"areas": list(self.areas), "devices": list(self.devices)}
        polygons = [shape.to_geojson() for shape in self.shapes if isinstance(shape, GeoPolygon)]
        circles = [
            {"lat": shape.lat, "lon": shape.lon, "radius_m": shape.radius_m}
            for shape in self.shapes
            if isinstance(shape, GeoCircle)
        ]
        if polygons:
            found["polygons"] = polygons
        if circles:
            found["circles"] = circles
        return found


@dataclass(frozen=True, slots=True)
class CapOrigin:
    """The CAP message an alert came from: its key, its text, and the alert it replaces (an Update)."""

    sender: str
    identifier: str
    xml: str
    replaces_alert_id: str | None = None


@dataclass(frozen=True, slots=True)
class AlertRequest:
    headline: str
    text: str
    targets: AlertTargets
    mode: str = "live"  # live | drill
    repeats: int = 1
    expires_at: datetime | None = None
    priority: Priority = field(default_factory=lambda: Priority(PriorityClass.EMERGENCY, 0))
    media_id: str | None = None
    language: str | None = "vi"
    webhook_url: str | None = None
    idempotency_key: str | None = None
    source: str = "api"
    cap: CapOrigin | None = None
    template: str | None = None  # the name of a pre-approved template (alerts.templates) it was made from

    def fingerprint(self) -> str:
        """What makes two requests "the same" for an Idempotency-Key."""
        essence = {
            "headline": self.headline,
            "text": self.text,
            "targets": self.targets.as_json(),
            "mode": self.mode,
            "repeats": self.repeats,
            "expires_at": rfc3339(self.expires_at) if self.expires_at else None,
            "priority": [self.priority.priority_class.value, self.priority.sub],
            "media_id": self.media_id,
            "webhook_url": self.webhook_url,
        }
        return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AcceptedAlert:
    id: str
    status: str
    device_count: int
    created: bool  # False: the same Idempotency-Key and request were seen before; this is that alert
    broadcast_id: str | None = None  # what plays it (none while it waits for approval, or recorded only)


class AlertService:
    def __init__(
        self,
        engine: Engine,
        broadcasts: BroadcastService,
        audit: AuditLog,
        media_store: MediaStore,
        clock: Clock,
        *,
        settings: AlertSettings,
        tts: TtsSettings,
    ) -> None:
        self._engine = engine
        self._broadcasts = broadcasts
        self._audit = audit
        self._media_store = media_store
        self._clock = clock
        self._settings = settings
        self._synthesizer = SpeechSynthesizer(tts)
        # Told (alert id, broadcast id, webhook URL) of each dispatched alert that asked for callbacks.
        self.on_dispatched: Callable[[str, str, str], None] | None = None

    # -- creating --------------------------------------------------------------------------------
    async def create(
        self, request: AlertRequest, principal: Principal, *, hold_for_approval: bool = False
    ) -> AcceptedAlert:
        """Send an alert, or store it waiting for a second person: when the two-person rule asks for it,
        or `hold_for_approval` (a threshold rule's draft)."""
        if not principal.may(Action.BROADCAST):
            raise AlertError("role", f"role {principal.role} may not send alerts", status=403)
        if request.priority.priority_class is PriorityClass.EMERGENCY and not principal.may(
            Action.BROADCAST_EMERGENCY
        ):
            raise AlertError("priority", f"role {principal.role} may not send emergency alerts", status=403)
        if request.repeats > self._settings.max_repeats:
            raise AlertError("repeats", f"at most {self._settings.max_repeats}")
        if request.webhook_url is not None and self._settings.webhook_secret is None:
            raise AlertError(
                "webhook_url",
                "this controller has no alerts.webhook_secret to sign callbacks with; ask its operator",
            )
        now = self._clock.now()
        expires_at = request.expires_at or now + timedelta(seconds=self._settings.default_expiry_s)
        if expires_at <= now:
            raise AlertError("expires_at", "is already in the past")
        fingerprint = request.fingerprint()
        if request.idempotency_key is not None:
            earlier = await asyncio.to_thread(self._by_idempotency_key, principal, request.idempotency_key)
            if earlier is not None:
                return self._repeated(earlier, fingerprint)
        targets = await asyncio.to_thread(self._broadcast_targets, request.targets)
        # Refused here, before any speech is made, when the targets reach no speaker or lie outside scope.
        reached = await asyncio.to_thread(self._resolve, targets, principal)
        playlist = await self._content(request)
        alert_id = str(uuid.uuid4())
        if hold_for_approval or await asyncio.to_thread(
            self._needs_second_person, request, targets, principal, reached
        ):
            row = self._row(request, alert_id, principal, now, expires_at, playlist, fingerprint, None, 0)
            row.status = PENDING_APPROVAL
            try:
                await asyncio.to_thread(self._store_pending, row, principal)
            except IntegrityError:
                return await self._same_request_raced(request, principal, fingerprint)
            log.info("alert waits for a second person's approval", alert_id=alert_id, key=principal.name)
            return AcceptedAlert(alert_id, PENDING_APPROVAL, 0, created=True)

        def record(session: Session, broadcast_id: str, device_count: int) -> None:
            session.add(
                self._row(
                    request,
                    alert_id,
                    principal,
                    now,
                    expires_at,
                    playlist,
                    fingerprint,
                    broadcast_id,
                    device_count,
                )
            )
            session.add(
                self._audit.entry(
                    principal,
                    "alert.create",
                    subject=alert_id,
                    detail=_audit_detail(request, broadcast_id, device_count),
                )
            )

        try:
            dispatched = await self._dispatch(
                request, alert_id, targets, playlist, now, expires_at, principal, record
            )
        except IntegrityError:
            return await self._same_request_raced(request, principal, fingerprint)
        return AcceptedAlert(alert_id, ACTIVE, dispatched.device_count, True, dispatched.id)

    async def _same_request_raced(
        self, request: AlertRequest, principal: Principal, fingerprint: str
    ) -> AcceptedAlert:
        """The same Idempotency-Key sent twice at once: the other request stored the alert first."""
        if request.idempotency_key is None:
            raise AlertError("id", "the alert could not be stored; try again", status=409)
        earlier = await asyncio.to_thread(self._by_idempotency_key, principal, request.idempotency_key)
        if earlier is None:
            raise AlertError("Idempotency-Key", "the alert could not be stored; try again", status=409)
        return self._repeated(earlier, fingerprint)

    async def _dispatch(
        self,
        request: AlertRequest,
        alert_id: str,
        targets: Targets,
        playlist: Sequence[str],
        now: datetime,
        expires_at: datetime,
        principal: Principal,
        record: Callable[[Session, str, int], None],
    ) -> AcceptedBroadcast:
        broadcast = BroadcastRequest(
            targets=targets,
            media_ids=tuple(playlist),
            priority=request.priority,
            repeats=request.repeats,
            max_duration_s=self._max_duration_s(now, expires_at),
            expires_at=expires_at,
            mode=request.mode,
            on_preempted="missed",  # an alert that lost its speakers to a newer one is not replayed
            record_with=record,
            display=DisplayText(
                headline=(_DRILL_LABEL if request.mode == "drill" else "") + request.headline,
                body=request.text,
                display_s=min(max((expires_at - now).total_seconds(), 1.0), _MAX_DISPLAY_S),
            ),
        )
        accepted = await self._broadcasts.create(broadcast, principal)
        if request.webhook_url is not None and self.on_dispatched is not None:
            self.on_dispatched(alert_id, accepted.id, request.webhook_url)
        log.info(
            "alert dispatched",
            alert_id=alert_id,
            mode=request.mode,
            devices=accepted.device_count,
            key=principal.name,
        )
        return accepted

    # -- the two-person rule ---------------------------------------------------------------------
    def _needs_second_person(
        self, request: AlertRequest, targets: Targets, principal: Principal, reached: int
    ) -> bool:
        """A live alert to the whole city waits for a second person, unless an IOC key sends one of the
        city's pre-approved templates (`alerts.templates`). `reached`: the devices its targets reach."""
        if request.mode != "live":
            return False
        if principal.role is Role.IOC and request.template is not None:
            return False
        return self._city_wide(targets, reached)

    def _city_wide(self, targets: Targets, reached: int) -> bool:
        with Session(self._engine) as session:
            roots = set(session.exec(select(AreaRow.code).where(col(AreaRow.parent_code).is_(None))).all())
            total = session.exec(
                select(func.count())
                .select_from(DeviceRow)
                .where(col(DeviceRow.kind).in_(ALERT_DEVICE_KINDS), col(DeviceRow.enabled))
            ).one()
        return bool(roots & set(targets.areas)) or reached >= self._settings.city_wide_share * max(total, 1)

    def _store_pending(self, row: AlertRow, principal: Principal) -> None:
        with Session(self._engine) as session:
            session.add(row)
            session.add(
                self._audit.entry(
                    principal,
                    "alert.create",
                    subject=row.id,
                    outcome="pending_approval",
                    detail={"mode": row.mode, "headline": row.headline, "targets": row.targets},
                )
            )
            session.commit()

    async def approve(self, alert_id: str, principal: Principal) -> AcceptedAlert:
        """The second person: another key (admin or operator) lets a pending city-wide alert play."""
        if principal.role not in {Role.ADMIN, Role.OPERATOR}:
            raise AlertError("role", f"role {principal.role} may not approve alerts", status=403)
        row = await asyncio.to_thread(self._get, alert_id)
        if row is None:
            raise AlertError("id", f"unknown alert {alert_id!r}", status=404)
        if row.status != PENDING_APPROVAL:
            raise AlertError("id", f"alert {alert_id} is {row.status}, not waiting for approval", status=409)
        if row.created_by == principal.key_id:
            raise AlertError(
                "Authorization",
                "the second person must use another key than the one that created it",
                status=403,
            )
        now = self._clock.now()
        if row.expires_at <= now:
            raise AlertError("expires_at", "the alert expired while it waited for approval", status=409)
        request = AlertRequest(
            headline=row.headline,
            text=row.text,
            targets=_targets_from_json(row.targets),
            mode=row.mode,
            repeats=row.repeats,
            expires_at=row.expires_at,
            priority=Priority(PriorityClass(row.priority_class), row.sub_priority),
            media_id=row.media_id,
            webhook_url=row.webhook_url,
        )
        targets = await asyncio.to_thread(self._broadcast_targets, request.targets)

        def record(session: Session, broadcast_id: str, device_count: int) -> None:
            stored = session.get(AlertRow, alert_id)
            if stored is None or stored.status != PENDING_APPROVAL:
                raise AlertError("id", f"alert {alert_id} is no longer waiting for approval", status=409)
            stored.status = ACTIVE
            stored.broadcast_id = broadcast_id
            stored.device_count = device_count
            stored.approved_by = principal.key_id
            stored.approved_at = now
            session.add(stored)
            session.add(
                self._audit.entry(
                    principal,
                    "alert.approve",
                    subject=alert_id,
                    detail=_audit_detail(request, broadcast_id, device_count),
                )
            )

        playlist = [row.media_id] if row.media_id else await self._content(request)
        dispatched = await self._dispatch(
            request, alert_id, targets, playlist, now, row.expires_at, principal, record
        )
        return AcceptedAlert(alert_id, ACTIVE, dispatched.device_count, False, dispatched.id)

    def _repeated(self, earlier: AlertRow, fingerprint: str) -> AcceptedAlert:
        if earlier.request_hash != fingerprint:
            raise AlertError(
                "Idempotency-Key",
                f"was used for alert {earlier.id} with a different request; use a new key for a new alert",
                status=409,
            )
        return AcceptedAlert(earlier.id, earlier.status, earlier.device_count, False, earlier.broadcast_id)

    def _by_idempotency_key(self, principal: Principal, key: str) -> AlertRow | None:
        with Session(self._engine) as session:
            return session.exec(
                select(AlertRow).where(
                    AlertRow.created_by == principal.key_id, AlertRow.idempotency_key == key
                )
            ).first()

    def _broadcast_targets(self, targets: AlertTargets) -> Targets:
        """Areas and devices as given, plus the speakers whose coordinates lie in the polygon or circle."""
        devices = list(targets.devices)
        if targets.shapes:
            with Session(self._engine) as session:
                rows = session.exec(
                    select(DeviceRow.id, DeviceRow.lat, DeviceRow.lon).where(
                        col(DeviceRow.kind).in_(ALERT_DEVICE_KINDS), col(DeviceRow.enabled)
                    )
                ).all()
            placed = [DevicePoint(device_id, lat, lon) for device_id, lat, lon in rows]
            for index, shape in enumerate(targets.shapes):
                inside = devices_in(shape, placed)
                if not inside and not targets.areas:
                    raise AlertError(
                        targets.shape_fields[index] if targets.shape_fields else "targets",
                        "no speaker with coordinates lies inside it",
                        status=400,
                    )
                devices.extend(d for d in inside if d not in devices)
        return Targets(areas=targets.areas, devices=tuple(devices))

    def _resolve(self, targets: Targets, principal: Principal) -> int:
        """How many devices the targets reach, or the AlertError naming what is wrong with them."""
        try:
            return len(self._broadcasts.resolve_devices(targets, principal, ALERT_DEVICE_KINDS))
        except BroadcastError as error:
            status = 400 if error.status == 422 else error.status  # noqa: PLR2004
            raise AlertError(error.field, error.detail, status=status) from error

    async def _content(self, request: AlertRequest) -> list[str]:
        if request.media_id is not None:
            known = await asyncio.to_thread(self._media_exists, request.media_id)
            if not known:
                raise AlertError("media_id", f"unknown media {request.media_id!r}", status=404)
            content = [request.media_id]
        else:
            content = [await self._speech(f"{request.headline}. {request.text}".strip())]
        if request.mode != "drill":
            return content
        return [await self._drill_tone(), await self._speech(self._settings.drill_announcement), *content]

    async def _speech(self, text: str) -> str:
        try:
            return await speech_media_id(
                text,
                synthesizer=self._synthesizer,
                store=self._media_store,
                record=lambda stored: record_media(self._engine, stored)[0].id,
            )
        except ServiceError as error:
            raise AlertError("text", error.detail, status=error.status) from error

    async def _drill_tone(self) -> str:
        async def one_chunk() -> Any:
            yield drill_prefix_tone()

        stored = await self._media_store.ingest(
            one_chunk(), filename=_DRILL_TONE_NAME, declared_type="audio/wav"
        )
        row, _ = await asyncio.to_thread(record_media, self._engine, stored)
        return row.id

    def _media_exists(self, media_id: str) -> bool:
        with Session(self._engine) as session:
            return session.get(MediaRow, media_id) is not None

    @staticmethod
    def _max_duration_s(now: datetime, expires_at: datetime) -> float:
        # An alert plays its repeats in full; only its expiry bounds it.
        return max((expires_at - now).total_seconds(), 1.0)

    def _row(
        self,
        request: AlertRequest,
        alert_id: str,
        principal: Principal,
        now: datetime,
        expires_at: datetime,
        playlist: Sequence[str | None],
        fingerprint: str,
        broadcast_id: str | None,
        device_count: int,
    ) -> AlertRow:
        return AlertRow(
            id=alert_id,
            source=request.source,
            status=ACTIVE,
            mode=request.mode,
            headline=request.headline,
            text=request.text,
            language=request.language,
            media_id=playlist[-1],
            targets=request.targets.as_json(),
            priority_class=request.priority.priority_class.value,
            sub_priority=request.priority.sub,
            repeats=request.repeats,
            expires_at=expires_at,
            device_count=device_count,
            broadcast_id=broadcast_id,
            idempotency_key=request.idempotency_key,
            request_hash=fingerprint,
            webhook_url=request.webhook_url,
            cap_sender=request.cap.sender if request.cap else None,
            cap_identifier=request.cap.identifier if request.cap else None,
            cap_xml=request.cap.xml if request.cap else None,
            replaces_alert_id=request.cap.replaces_alert_id if request.cap else None,
            created_by=principal.key_id,
            created_at=now,
        )

    def record_only(self, request: AlertRequest, principal: Principal, *, status: str) -> AcceptedAlert:
        """Store a message that plays nothing (CAP System, Draft, Ack, Error, Cancel) and audit it."""
        now = self._clock.now()
        alert_id = str(uuid.uuid4())
        row = self._row(
            request,
            alert_id,
            principal,
            now,
            request.expires_at or now,
            [request.media_id] if request.media_id else [None],
            request.fingerprint(),
            None,
            0,
        )
        row.status = status
        with Session(self._engine) as session:
            session.add(row)
            session.add(
                self._audit.entry(
                    principal,
                    "alert.record",
                    subject=alert_id,
                    detail={"status": status, "source": request.source, "headline": request.headline},
                )
            )
            session.commit()
        return AcceptedAlert(alert_id, status, 0, created=True)

    def by_cap_reference(self, sender: str, identifier: str) -> AlertRow | None:
        with Session(self._engine) as session:
            return session.exec(
                select(AlertRow).where(AlertRow.cap_sender == sender, AlertRow.cap_identifier == identifier)
            ).first()

    def mark_superseded(self, alert_id: str, by_alert_id: str, principal: Principal) -> None:
        with Session(self._engine) as session:
            row = session.get(AlertRow, alert_id)
            if row is None:
                return
            row.status = SUPERSEDED
            session.add(row)
            session.add(
                self._audit.entry(
                    principal, "alert.update", subject=alert_id, detail={"replaced_by": by_alert_id}
                )
            )
            session.commit()

    # -- cancelling ------------------------------------------------------------------------------
    async def cancel(self, alert_id: str, principal: Principal, *, reason: str = "cancelled") -> int:
        """Stop the alert everywhere; returns how many deliveries it ended."""
        if not principal.may(Action.CANCEL):
            raise AlertError("role", f"role {principal.role} may not cancel alerts", status=403)
        row = await asyncio.to_thread(self._get, alert_id)
        if row is None:
            raise AlertError("id", f"unknown alert {alert_id!r}", status=404)
        stopped = 0
        if row.broadcast_id is not None and row.status == ACTIVE:
            stopped = await self._broadcasts.cancel(row.broadcast_id, principal)
        await asyncio.to_thread(self._mark_cancelled, alert_id, principal, reason, stopped)
        return stopped

    async def cancel_all(self, principal: Principal) -> dict[str, Any]:
        if principal.role not in {Role.ADMIN, Role.OPERATOR, Role.IOC}:
            raise AlertError("role", f"role {principal.role} may not cancel every alert", status=403)
        active = await asyncio.to_thread(self._active_ids)
        stopped = 0
        for alert_id in active:
            stopped += await self.cancel(alert_id, principal, reason="all_clear")
        await asyncio.to_thread(
            self._audit.record,
            principal,
            "alert.cancel_all",
            detail={"alerts": active, "deliveries_stopped": stopped},
        )
        return {"alerts": active, "deliveries_stopped": stopped}

    def _active_ids(self) -> list[str]:
        with Session(self._engine) as session:
            return list(session.exec(select(AlertRow.id).where(AlertRow.status == ACTIVE)).all())

    def _get(self, alert_id: str) -> AlertRow | None:
        with Session(self._engine) as session:
            return session.get(AlertRow, alert_id)

    def _mark_cancelled(self, alert_id: str, principal: Principal, reason: str, stopped: int) -> None:
        with Session(self._engine) as session:
            row = session.get(AlertRow, alert_id)
            if row is None:
                return
            previous = row.status
            if row.status in {ACTIVE, PENDING_APPROVAL}:
                row.status = CANCELLED
                row.cancelled_by = principal.key_id
                row.cancelled_at = self._clock.now()
                session.add(row)
            session.add(
                self._audit.entry(
                    principal,
                    "alert.cancel",
                    subject=alert_id,
                    detail={"reason": reason, "previous_status": previous, "deliveries_stopped": stopped},
                )
            )
            session.commit()

    # -- reading ---------------------------------------------------------------------------------
    def progress(self, alert_id: str) -> dict[str, Any]:
        """Status, device count and counts per delivery state: what a webhook callback carries."""
        with Session(self._engine) as session:
            row = session.get(AlertRow, alert_id)
            if row is None:
                raise AlertError("id", f"unknown alert {alert_id!r}", status=404)
            counts: dict[str, int] = {}
            if row.broadcast_id is not None:
                states = session.exec(
                    select(DeliveryRow.state).where(DeliveryRow.broadcast_id == row.broadcast_id)
                ).all()
                for state in states:
                    counts[state] = counts.get(state, 0) + 1
        return {"status": row.status, "device_count": row.device_count, "counts": counts}

    def webhooks_to_resume(self) -> list[tuple[str, str, str]]:
        """(alert id, broadcast id, URL) of the active alerts that asked for callbacks (after a restart)."""
        with Session(self._engine) as session:
            rows = session.exec(
                select(AlertRow.id, AlertRow.broadcast_id, AlertRow.webhook_url).where(
                    AlertRow.status == ACTIVE, col(AlertRow.webhook_url).is_not(None)
                )
            ).all()
        return [(a, b, u) for a, b, u in rows if b is not None and u is not None]

    def summaries(self, *, statuses: Sequence[str] = (), limit: int = 50) -> list[dict[str, Any]]:
        """The newest alerts first (only those in `statuses`, when given), each with who made and who
        approved it (by name), its counts per delivery state and how many deliveries have not ended yet
        (`open`): what the operators' emergency panel follows."""
        with Session(self._engine) as session:
            query = select(AlertRow).order_by(col(AlertRow.created_at).desc(), col(AlertRow.id)).limit(limit)
            if statuses:
                query = query.where(col(AlertRow.status).in_(statuses))
            rows = list(session.exec(query).all())
            broadcasts = [row.broadcast_id for row in rows if row.broadcast_id is not None]
            counts: dict[str, dict[str, int]] = {}
            if broadcasts:
                grouped = session.exec(
                    select(DeliveryRow.broadcast_id, DeliveryRow.state, func.count())
                    .where(col(DeliveryRow.broadcast_id).in_(broadcasts))
                    .group_by(col(DeliveryRow.broadcast_id), col(DeliveryRow.state))
                ).all()
                for broadcast_id, state, count in grouped:
                    counts.setdefault(broadcast_id, {})[state] = count
            names = principal_names(
                session, {key for row in rows for key in (row.created_by, row.approved_by) if key}
            )
        found = []
        for row in rows:
            by_state = counts.get(row.broadcast_id or "", {})
            found.append(
                {
                    "id": row.id,
                    "status": row.status,
                    "mode": row.mode,
                    "source": row.source,
                    "headline": row.headline,
                    "text": row.text,
                    "targets": row.targets,
                    "priority": row.priority_class,
                    "repeats": row.repeats,
                    "device_count": row.device_count,
                    "counts": by_state,
                    "open": sum(n for state, n in by_state.items() if state not in _TERMINAL),
                    "expires_at": rfc3339(row.expires_at),
                    "created_at": rfc3339(row.created_at),
                    "created_by": row.created_by,
                    "created_by_name": names.get(row.created_by, row.created_by),
                    "approved_by_name": names.get(row.approved_by) if row.approved_by else None,
                    "cancelled_at": rfc3339(row.cancelled_at) if row.cancelled_at else None,
                    "broadcast_id": row.broadcast_id,
                }
            )
        return found

    def describe(self, alert_id: str, principal: Principal) -> dict[str, Any]:
        row = self._get(alert_id)
        if row is None:
            raise AlertError("id", f"unknown alert {alert_id!r}", status=404)
        found: dict[str, Any] = {
            "id": row.id,
            "status": row.status,
            "mode": row.mode,
            "source": row.source,
            "headline": row.headline,
            "text": row.text,
            "language": row.language,
            "priority": row.priority_class,
            "sub_priority": row.sub_priority,
            "repeats": row.repeats,
            "targets": row.targets,
            "device_count": row.device_count,
            "expires_at": rfc3339(row.expires_at),
            "created_at": rfc3339(row.created_at),
            "created_by": row.created_by,
            "cancelled_at": rfc3339(row.cancelled_at) if row.cancelled_at else None,
            "broadcast_id": row.broadcast_id,
            "counts": {},
            "deliveries": [],
        }
        if row.broadcast_id is not None:
            broadcast = self._broadcasts.describe(row.broadcast_id, principal)
            found["counts"] = broadcast["counts"]
            found["deliveries"] = [
                {key: delivery[key] for key in ("device_id", "state", "detail", "played_s", "events")}
                for delivery in broadcast["deliveries"]
            ]
        return found


def _audit_detail(request: AlertRequest, broadcast_id: str, device_count: int) -> dict[str, Any]:
    return {
        "mode": request.mode,
        "headline": request.headline,
        "targets": request.targets.as_json(),
        "devices": device_count,
        "broadcast_id": broadcast_id,
        "source": request.source,
        "template": request.template,
    }


def _targets_from_json(stored: dict[str, Any]) -> AlertTargets:
    shapes: list[GeoShape] = [GeoPolygon.from_geojson(p) for p in stored.get("polygons", [])]
    shapes += [GeoCircle.from_dict(c) for c in stored.get("circles", [])]
    return AlertTargets(
        tuple(stored.get("areas", [])), tuple(stored.get("devices", [])), shapes=tuple(shapes)
    )


def template_list(settings: AlertSettings) -> list[dict[str, Any]]:
    """The city's pre-approved messages (`alerts.templates`), by name."""
    return [
        {
            "name": name,
            "headline": template.headline,
            "text": template.text,
            "targets": {"areas": list(template.targets.areas), "devices": list(template.targets.devices)},
        }
        for name, template in sorted(settings.templates.items())
    ]
