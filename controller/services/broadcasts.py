"""Accepting, cancelling and reading broadcasts.

Acceptance is one transaction: the broadcast, one delivery per device (queued) and one outbox command
per delivery. Only then does the dispatcher see the commands, so an accepted broadcast survives a crash.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from controller.domain.areas import AreaTree
from controller.domain.clock import Clock, rfc3339
from controller.domain.deliveries import DeliveryState
from controller.domain.fanout import FanoutPlan, area_delivery_ids, plan_fanout
from controller.domain.planner import DeviceEntry, TargetError, Targets, resolve_targets
from controller.domain.priority import Priority, PriorityClass
from controller.domain.programme import (
    DeliveryIds,
    DisplayText,
    PlayContent,
    area_play_command,
    occurrence_broadcast_id,
    occurrence_delivery_ids,
    play_command,
    show_command,
)
from controller.services.area_fanout import AreaFollowers
from controller.services.auth import Action, Principal
from controller.services.dispatcher import STOP_RANK, Dispatcher, QueuedCommand
from controller.services.errors import ServiceError
from controller.services.media import media_document
from controller.services.targets import AreaTreeCache, chunks, reachable_devices
from controller.services.tracker import DeliveryTracker, TrackedDelivery, expected_play_seconds
from controller.services.users import principal_names
from controller.store.models import (
    BroadcastRow,
    DeliveryEventRow,
    DeliveryRow,
    DeviceRow,
    MediaRow,
    OccurrenceRow,
    OutboxRow,
)

SPEAKER_KIND = "speaker"
# Wired horn zones of an amplifier, fed by a smart-radio receiver at its line input (issue 5): a target
# like a speaker, but commanded one by one, so that its relays are switched around each play.
WIRED_ZONE_KIND = "wired_zone"
AUDIO_DEVICE_KINDS = frozenset({SPEAKER_KIND, WIRED_ZONE_KIND})
SCREEN_KIND = "led_screen"
EMERGENCY_RANK = Priority(PriorityClass.EMERGENCY, 0).rank


class BroadcastError(ServiceError):
    """A broadcast that cannot be accepted, cancelled or read."""


@dataclass(frozen=True, slots=True)
class BroadcastRequest:
    targets: Targets
    media_ids: tuple[str, ...]
    priority: Priority
    repeats: int
    max_duration_s: float
    expires_at: datetime | None
    mode: str = "live"
    gap_s: float = 0.0
    on_preempted: str = "resume"
    # Adds rows that must commit with the broadcast or not at all (an alert and its audit entry):
    # called with the session, the broadcast id and the number of devices, just before the commit.
    record_with: Callable[[Session, str, int], None] | None = None
    # Text for the LED screens among the targets (they are left out without it).
    display: DisplayText | None = None
    # (schedule id, planned start) when a schedule fires it: recorded in the same transaction, under a
    # unique key, so that an occurrence becomes a broadcast exactly once.
    occurrence: tuple[str, datetime] | None = None


class OccurrenceAlreadyFired(Exception):  # noqa: N818  (a fact, not a failure)
    """The occurrence was already turned into a broadcast (by this process before a crash, say)."""


@dataclass(frozen=True, slots=True)
class AcceptedBroadcast:
    id: str
    device_count: int


def principal_scope_check(principal: Principal, tree: AreaTree, area_codes: list[str]) -> None:
    """A key bound to a ward may only reach areas inside it."""
    if principal.ward_code is None:
        return
    for index, code in enumerate(area_codes):
        if code in tree and not tree.is_within(code, principal.ward_code):
            raise BroadcastError(
                f"targets.areas[{index}]",
                f"area {code!r} is outside ward {principal.ward_code!r} of this key",
                status=403,
            )


class BroadcastService:
    def __init__(
        self,
        engine: Engine,
        dispatcher: Dispatcher,
        tracker: DeliveryTracker,
        clock: Clock,
        *,
        media_base_url: str,
        default_expiry_s: int,
        followers: AreaFollowers | None = None,
    ) -> None:
        self._engine = engine
        self._dispatcher = dispatcher
        self._tracker = tracker
        self._clock = clock
        self._media_base_url = media_base_url.rstrip("/")
        self._default_expiry = timedelta(seconds=default_expiry_s)
        self._cancel_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._waiting_to_resume: dict[str, list[TrackedDelivery]] = {}
        self._areas = AreaTreeCache()
        self._followers = followers

    async def create(self, request: BroadcastRequest, principal: Principal) -> AcceptedBroadcast:
        if request.priority.priority_class is PriorityClass.EMERGENCY and not principal.may(
            Action.BROADCAST_EMERGENCY
        ):
            raise BroadcastError(
                "priority", f"role {principal.role} may not send emergency broadcasts", status=403
            )
        # Scheduled occurrences keep the ids their devices cached (§1.10); the rest may use area topics.
        followers = (
            self._followers.by_area() if self._followers is not None and request.occurrence is None else None
        )
        accepted, commands, tracked = await asyncio.to_thread(self._accept, request, principal, followers)
        for delivery in tracked:
            self._tracker.track(delivery)
        stops = await self._preempt(request.priority, accepted.id, tracked)
        self._dispatcher.submit([*stops, *commands])
        return accepted

    async def _preempt(
        self, priority: Priority, broadcast_id: str, tracked: list[TrackedDelivery]
    ) -> list[QueuedCommand]:
        """Stop what plays on these devices when the new broadcast outranks it (DESIGN.md §2)."""
        victims: list[TrackedDelivery] = []
        for delivery in tracked:
            current = self._tracker.playing_on(delivery.device_id)
            if (
                current is not None
                and current.broadcast_id != broadcast_id
                and priority.takes_device_from(Priority.from_rank(current.rank))
            ):
                current.preempted_by = broadcast_id
                victims.append(current)
        if not victims:
            return []
        return await asyncio.to_thread(self._store_stops, victims, "preempted", self._clock.now())

    def _store_stops(
        self, deliveries: list[TrackedDelivery], reason: str, now: datetime
    ) -> list[QueuedCommand]:
        with Session(self._engine) as session:
            stops = self._stop_rows(session, deliveries, reason, now)
            session.commit()
            return stops

    def delivery_ended(self, delivery: TrackedDelivery) -> None:
        """Called as any delivery ends: queue a preempted one for replay, or replay what waited on it.

        A preempted delivery is played again (per its broadcast's policy) once the broadcast that took
        the device has ended there; a delivery the device preempted by itself is replayed at once and
        the device keeps it waiting (protocol §1.4.1). An emergency that a newer emergency replaced is
        not replayed: the newer alert supersedes it.
        """
        replayable = delivery.on_preempted == "resume" and delivery.rank < EMERGENCY_RANK
        if delivery.state is DeliveryState.INTERRUPTED and replayable:
            if delivery.preempted_by is None:
                self._resume_soon(delivery)
            else:
                self._waiting_to_resume.setdefault(delivery.device_id, []).append(delivery)
        waiting = self._waiting_to_resume.get(delivery.device_id)
        if waiting:
            ready = [d for d in waiting if d.preempted_by == delivery.broadcast_id]
            self._waiting_to_resume[delivery.device_id] = [d for d in waiting if d not in ready]
            for preempted in ready:
                self._resume_soon(preempted)

    def _resume_soon(self, delivery: TrackedDelivery) -> None:
        if delivery.expires_at <= self._clock.now():
            return
        task = asyncio.get_running_loop().create_task(self._resume(delivery))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resume(self, delivery: TrackedDelivery) -> None:
        resumed = await asyncio.to_thread(self._store_resume, delivery, self._clock.now())
        if resumed is None:
            return
        command, tracked = resumed
        self._tracker.track(tracked)
        self._dispatcher.submit([command])

    def _store_resume(
        self, delivery: TrackedDelivery, now: datetime
    ) -> tuple[QueuedCommand, TrackedDelivery] | None:
        with Session(self._engine) as session:
            original = session.exec(
                select(OutboxRow.document, OutboxRow.rank).where(
                    OutboxRow.delivery_id == delivery.delivery_id, OutboxRow.kind == "play"
                )
            ).first()
            if original is None:
                # It went out on an area topic (§1.12). Every area command of a broadcast carries the
                # same play, so any one serves; its `covers` list (thousands of ids) is not read.
                original = session.exec(
                    select(OutboxRow.document, OutboxRow.rank).where(
                        OutboxRow.broadcast_id == delivery.broadcast_id, OutboxRow.kind == "play"
                    )
                ).first()
            address = session.exec(
                select(DeviceRow.address).where(DeviceRow.id == delivery.device_id)
            ).first()
            if original is None or address is None:
                return None
            delivery_id, command_id = str(uuid.uuid4()), str(uuid.uuid4())
            original_document, original_rank = original
            members = {key: value for key, value in original_document.items() if key != "area"}
            document = {
                **members,
                "id": command_id,
                "correlation_id": delivery_id,
                "device": address,
                "issued_at": rfc3339(now),
            }
            session.add(
                DeliveryRow(
                    id=delivery_id,
                    broadcast_id=delivery.broadcast_id,
                    device_id=delivery.device_id,
                    command_id=command_id,
                    state=DeliveryState.QUEUED.value,
                    state_at=now,
                    resumes_delivery_id=delivery.delivery_id,
                )
            )
            session.flush()
            session.add(
                DeliveryEventRow(
                    delivery_id=delivery_id,
                    state=DeliveryState.QUEUED.value,
                    at=now,
                    source="controller",
                    detail=f"resumes {delivery.delivery_id}",
                )
            )
            row = OutboxRow(
                device_id=delivery.device_id,
                command_id=command_id,
                delivery_id=delivery_id,
                kind="play",
                rank=original_rank,
                document=document,
                created_at=now,
                expires_at=delivery.expires_at,
            )
            session.add(row)
            session.commit()
            session.refresh(row)
        tracked = TrackedDelivery(
            delivery_id=delivery_id,
            broadcast_id=delivery.broadcast_id,
            device_id=delivery.device_id,
            command_id=command_id,
            state=DeliveryState.QUEUED,
            expires_at=delivery.expires_at,
            expected_play_s=delivery.expected_play_s,
            rank=delivery.rank,
            on_preempted=delivery.on_preempted,
        )
        return QueuedCommand.from_row(row, address), tracked

    def _accept(
        self,
        request: BroadcastRequest,
        principal: Principal,
        followers: Mapping[str, frozenset[str]] | None,
    ) -> tuple[AcceptedBroadcast, list[QueuedCommand], list[TrackedDelivery]]:
        now = self._clock.now()
        expires_at = request.expires_at or now + self._default_expiry
        if expires_at <= now:
            raise BroadcastError("expires_at", "is already in the past")
        with Session(self._engine, expire_on_commit=False) as session:
            if not request.media_ids:
                raise BroadcastError("content.media_ids", "name at least one media item")
            playlist: list[MediaRow] = []
            for index, media_id in enumerate(request.media_ids):
                found = session.get(MediaRow, media_id)
                if found is None:
                    field = (
                        "content.media_id" if len(request.media_ids) == 1 else f"content.media_ids[{index}]"
                    )
                    raise BroadcastError(field, f"unknown media {media_id!r}", status=404)
                playlist.append(found)
            media = playlist[0]
            media_documents = [media_document(item, self._media_base_url) for item in playlist]
            planned_play_s = expected_play_seconds(
                [item.duration_s for item in playlist], request.repeats, request.gap_s, request.max_duration_s
            )
            kinds = AUDIO_DEVICE_KINDS | {SCREEN_KIND} if request.display is not None else AUDIO_DEVICE_KINDS
            chosen, candidates = self._resolve_with_candidates(session, request.targets, principal, kinds)
            broadcast_id = (
                occurrence_broadcast_id(*request.occurrence)
                if request.occurrence is not None
                else str(uuid.uuid4())
            )
            content = PlayContent(
                priority=request.priority,
                media=media_documents,
                repeats=request.repeats,
                max_duration_s=request.max_duration_s,
                gap_s=request.gap_s,
                mode=request.mode,
            )
            session.add(
                BroadcastRow(
                    id=broadcast_id,
                    media_id=media.id,
                    priority_class=request.priority.priority_class.value,
                    sub_priority=request.priority.sub,
                    rank=request.priority.rank,
                    mode=request.mode,
                    repeats=request.repeats,
                    max_duration_s=request.max_duration_s,
                    playlist_tail=[item.id for item in playlist[1:]],
                    gap_s=request.gap_s,
                    planned_play_s=planned_play_s,
                    on_preempted=request.on_preempted,
                    targets={"areas": list(request.targets.areas), "devices": list(request.targets.devices)},
                    display=request.display.document() if request.display is not None else None,
                    created_by=principal.key_id,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            try:
                session.flush()
            except IntegrityError as error:  # an occurrence's broadcast id is its key (§1.10)
                session.rollback()
                if request.occurrence is not None:
                    raise OccurrenceAlreadyFired(*request.occurrence) from error
                raise
            plan = (
                self._plan_fanout(session, request.targets, chosen, candidates, followers)
                if followers is not None
                else FanoutPlan(direct=frozenset(device.id for device in chosen))
            )
            deliveries: list[dict[str, Any]] = []
            outbox: list[dict[str, Any]] = []
            address_of = {device.id: device.address for device in chosen}
            delivery_of: dict[str, str] = {}
            for device in chosen:
                ids = (
                    area_delivery_ids(broadcast_id, device.address)
                    if followers is not None and device.kind in AUDIO_DEVICE_KINDS
                    else self._ids(request, device.id)
                )
                delivery_id, command_id = ids.delivery_id, ids.command_id
                delivery_of[device.id] = delivery_id
                if device.kind == SCREEN_KIND and request.display is not None:
                    document = show_command(
                        request.display,
                        priority=request.priority,
                        mode=request.mode,
                        broadcast_id=broadcast_id,
                        ids=ids,
                        address=device.address,
                        issued_at=now,
                        expires_at=expires_at,
                    )
                else:
                    document = play_command(
                        content,
                        broadcast_id=broadcast_id,
                        ids=ids,
                        address=device.address,
                        issued_at=now,
                        expires_at=expires_at,
                    )
                deliveries.append(
                    {
                        "id": delivery_id,
                        "broadcast_id": broadcast_id,
                        "device_id": device.id,
                        "command_id": command_id,
                        "state": DeliveryState.QUEUED.value,
                        "state_at": now,
                    }
                )
                if device.id in plan.direct:
                    outbox.append(
                        {
                            "device_id": device.id,
                            "area_code": None,
                            "covers": None,
                            "broadcast_id": None,
                            "command_id": command_id,
                            "delivery_id": delivery_id,
                            "kind": document["type"],
                            "rank": request.priority.rank,
                            "created_at": now,
                            "expires_at": expires_at,
                            "published_at": None,
                            "document": document,
                        }
                    )
            for area_code, reach in plan.by_area.items():
                outbox.append(
                    {
                        "device_id": None,
                        "area_code": area_code,
                        "covers": sorted(delivery_of[device_id] for device_id in reach),
                        "broadcast_id": broadcast_id,
                        "command_id": str(uuid.uuid5(uuid.UUID(broadcast_id), f"area:{area_code}")),
                        "delivery_id": None,
                        "kind": "play",
                        "rank": request.priority.rank,
                        "created_at": now,
                        "expires_at": expires_at,
                        "published_at": None,
                        "document": area_play_command(
                            content,
                            broadcast_id=broadcast_id,
                            fanout_id=broadcast_id,
                            area_code=area_code,
                            issued_at=now,
                            expires_at=expires_at,
                        ),
                    }
                )
            session.connection().execute(insert(DeliveryRow), deliveries)
            session.connection().execute(
                insert(DeliveryEventRow),
                [
                    {
                        "delivery_id": d["id"],
                        "state": DeliveryState.QUEUED.value,
                        "at": now,
                        "source": "controller",
                        "detail": None,
                    }
                    for d in deliveries
                ],
            )
            # RETURNING in parameter order: the ids (the wire `seq`) without reading N rows back.
            returned = session.connection().scalars(
                insert(OutboxRow).returning(col(OutboxRow.id), sort_by_parameter_order=True), outbox
            )
            outbox_ids = [outbox_id for outbox_id in returned if outbox_id is not None]
            if request.record_with is not None:
                request.record_with(session, broadcast_id, len(chosen))
            if request.occurrence is not None:
                schedule_id, planned_at = request.occurrence
                session.add(
                    OccurrenceRow(
                        schedule_id=schedule_id,
                        planned_at=planned_at,
                        outcome="fired",
                        broadcast_id=broadcast_id,
                        recorded_at=now,
                    )
                )
            try:
                session.commit()
            except IntegrityError as error:
                session.rollback()
                if request.occurrence is not None:
                    raise OccurrenceAlreadyFired(*request.occurrence) from error
                raise
        screens = {device.id for device in chosen if device.kind == SCREEN_KIND}
        commands = [
            QueuedCommand.from_values(
                outbox_id, values, address_of[values["device_id"]] if values["device_id"] else None
            )
            for outbox_id, values in zip(outbox_ids, outbox, strict=True)
        ]
        tracked = [
            TrackedDelivery(
                delivery_id=d["id"],
                broadcast_id=broadcast_id,
                device_id=d["device_id"],
                command_id=d["command_id"],
                state=DeliveryState.QUEUED,
                expires_at=expires_at,
                expected_play_s=(
                    request.display.display_s
                    if request.display is not None and d["device_id"] in screens
                    else planned_play_s
                ),
                rank=request.priority.rank,
                on_preempted=request.on_preempted,
            )
            for d in deliveries
        ]
        return AcceptedBroadcast(id=broadcast_id, device_count=len(chosen)), commands, tracked

    def resolve_devices(
        self, targets: Targets, principal: Principal, kinds: frozenset[str] = AUDIO_DEVICE_KINDS
    ) -> list[DeviceEntry]:
        """The devices of `kinds` that `targets` reach for this principal, or the BroadcastError naming
        what is wrong: checked before anything is prepared for a broadcast."""
        with Session(self._engine) as session:
            return self._resolve(session, targets, principal, kinds)

    def _resolve(
        self, session: Session, targets: Targets, principal: Principal, kinds: frozenset[str]
    ) -> list[DeviceEntry]:
        return self._resolve_with_candidates(session, targets, principal, kinds)[0]

    def _plan_fanout(
        self,
        session: Session,
        targets: Targets,
        chosen: list[DeviceEntry],
        candidates: list[DeviceEntry],
        followers: Mapping[str, frozenset[str]],
    ) -> FanoutPlan:
        """Area topics for the speakers, each of the rest (screens included) by itself (§1.12)."""
        tree = self._areas.load(session)

        def follows_areas(device: DeviceEntry) -> bool:
            return device.kind == SPEAKER_KIND and device.transport == "mqtt"

        placed_under: dict[str, list[str]] = {}
        for device in candidates:
            if follows_areas(device):
                placed_under.setdefault(device.area_code, []).append(device.id)
        tops = [code for code in dict.fromkeys(targets.areas) if code in tree]
        tops = [code for code in tops if not any(o != code and tree.is_within(code, o) for o in tops)]
        plan = plan_fanout(
            tree,
            [device.id for device in chosen if follows_areas(device)],
            placed_under,
            followers,
            within=tops,
        )
        others = frozenset(device.id for device in chosen if not follows_areas(device))
        return FanoutPlan(by_area=plan.by_area, direct=plan.direct | others)

    def _resolve_with_candidates(
        self, session: Session, targets: Targets, principal: Principal, kinds: frozenset[str]
    ) -> tuple[list[DeviceEntry], list[DeviceEntry]]:
        """The chosen devices, and every device in the targeted subtrees (or named) they came from."""
        tree = self._areas.load(session)
        principal_scope_check(principal, tree, list(targets.areas))
        devices = reachable_devices(session, tree, targets)
        try:
            chosen = resolve_targets(targets, tree, devices, kinds=kinds)
        except TargetError as error:
            raise BroadcastError(error.field, error.detail) from error
        if principal.ward_code is not None:
            for device in chosen:
                if not tree.is_within(device.area_code, principal.ward_code):
                    raise BroadcastError(
                        "targets.devices",
                        f"device {device.id!r} is outside ward {principal.ward_code!r} of this key",
                        status=403,
                    )
        return chosen, devices

    @staticmethod
    def _ids(request: BroadcastRequest, device_id: str) -> DeliveryIds:
        if request.occurrence is not None:
            # Known in advance: the device's cached programme holds the same command (§1.10).
            return occurrence_delivery_ids(*request.occurrence, device_id)
        return DeliveryIds(delivery_id=str(uuid.uuid4()), command_id=str(uuid.uuid4()))

    async def cancel(self, broadcast_id: str, principal: Principal) -> int:
        """Stop the broadcast on every device; returns how many deliveries it ended."""
        async with self._cancel_lock:
            row = await asyncio.to_thread(self._get_row, broadcast_id)
            if row is None:
                raise BroadcastError("id", f"unknown broadcast {broadcast_id!r}", status=404)
            await asyncio.to_thread(self._check_scope, row, principal)
            open_deliveries = self._tracker.open_deliveries_of(broadcast_id)
            withdrawn = self._dispatcher.withdraw({d.delivery_id for d in open_deliveries})
            reached = [d for d in open_deliveries if d.delivery_id not in withdrawn.deliveries]
            now = self._clock.now()
            commands = await asyncio.to_thread(
                self._store_cancel, broadcast_id, withdrawn.outbox_ids, reached, now
            )
            self._dispatcher.submit(commands)
            for delivery in open_deliveries:
                self._tracker.advance(
                    delivery,
                    DeliveryState.CANCELLED,
                    now,
                    source="controller",
                    detail=f"cancelled by {principal.name}",
                )
            await self._tracker.flush()
            return len(open_deliveries)

    def _get_row(self, broadcast_id: str) -> BroadcastRow | None:
        with Session(self._engine) as session:
            return session.get(BroadcastRow, broadcast_id)

    def _check_scope(self, row: BroadcastRow, principal: Principal) -> None:
        if principal.ward_code is None:
            return
        with Session(self._engine) as session:
            tree = self._areas.load(session)
            device_areas = session.exec(
                select(DeviceRow.area_code)
                .join(DeliveryRow, col(DeliveryRow.device_id) == col(DeviceRow.id))
                .where(DeliveryRow.broadcast_id == row.id)
            ).all()
        if any(not tree.is_within(code, principal.ward_code) for code in set(device_areas)):
            raise BroadcastError("id", "this broadcast reaches devices outside the key's ward", status=403)

    def _store_cancel(
        self, broadcast_id: str, withdrawn: set[int], reached: list[TrackedDelivery], now: datetime
    ) -> list[QueuedCommand]:
        with Session(self._engine) as session:
            session.connection().execute(
                update(BroadcastRow).where(col(BroadcastRow.id) == broadcast_id).values(cancelled_at=now)
            )
            for chunk in chunks(withdrawn):
                session.connection().execute(
                    update(OutboxRow)
                    .where(col(OutboxRow.id).in_(chunk), col(OutboxRow.published_at).is_(None))
                    .values(published_at=now)
                )
            stops = self._stop_rows(session, reached, "cancelled", now)
            session.commit()
            return stops

    def _stop_rows(
        self, session: Session, deliveries: list[TrackedDelivery], reason: str, now: datetime
    ) -> list[QueuedCommand]:
        """Durable stop commands for these deliveries (the caller commits); stops jump every queue."""
        addresses = dict(
            session.exec(
                select(DeviceRow.id, DeviceRow.address).where(
                    col(DeviceRow.id).in_([d.device_id for d in deliveries])
                )
            ).all()
        )
        stops = [
            OutboxRow(
                device_id=delivery.device_id,
                command_id=(stop_id := str(uuid.uuid4())),
                delivery_id=delivery.delivery_id,
                kind="stop",
                rank=STOP_RANK,
                created_at=now,
                expires_at=delivery.expires_at,
                document={
                    "v": 1,
                    "type": "stop",
                    "id": stop_id,
                    "correlation_id": delivery.delivery_id,
                    "device": addresses[delivery.device_id],
                    "issued_at": rfc3339(now),
                    "expires_at": rfc3339(delivery.expires_at),
                    "target": delivery.command_id,
                    "reason": reason,
                },
            )
            for delivery in deliveries
        ]
        session.add_all(stops)
        session.flush()
        return [
            QueuedCommand.from_row(stop, addresses[delivery.device_id])
            for stop, delivery in zip(stops, deliveries, strict=True)
        ]

    def recent(
        self,
        principal: Principal,
        *,
        limit: int,
        offset: int = 0,
        start: datetime | None = None,
        end: datetime | None = None,
        area: str | None = None,
        priority: PriorityClass | None = None,
    ) -> list[dict[str, Any]]:
        """Broadcasts newest first, with their counts per delivery state, content and author; filtered by
        creation time [start, end), by an area (those that reached a device in its subtree) and by
        priority class, then paged (`offset`, `limit`). A key bound to a ward sees only those that reach
        no device outside it (filtered in the query, so that pages stay full)."""
        with Session(self._engine) as session:
            tree = self._areas.load(session)
            query = select(BroadcastRow)
            if start is not None:
                query = query.where(col(BroadcastRow.created_at) >= start)
            if end is not None:
                query = query.where(col(BroadcastRow.created_at) < end)
            if priority is not None:
                query = query.where(BroadcastRow.priority_class == priority.value)
            if area is not None:
                if area not in tree:
                    raise BroadcastError("area", f"unknown area {area!r}", status=422)
                reaching = _reaching(tree.subtree_codes(area), inside=True)
                query = query.where(col(BroadcastRow.id).in_(reaching))
            if principal.ward_code is not None:
                ward = tree.subtree_codes(principal.ward_code) if principal.ward_code in tree else frozenset()
                query = query.where(col(BroadcastRow.id).not_in(_reaching(ward, inside=False)))
            rows = session.exec(
                query.order_by(col(BroadcastRow.created_at).desc(), col(BroadcastRow.id))
                .offset(offset)
                .limit(limit)
            ).all()
            ids = [row.id for row in rows]
            counted = session.exec(
                select(DeliveryRow.broadcast_id, DeliveryRow.state).where(
                    col(DeliveryRow.broadcast_id).in_(ids)
                )
            ).all()
            media = self._media_of(session, [m for row in rows for m in (row.media_id, *row.playlist_tail)])
            authors = principal_names(session, {row.created_by for row in rows if row.created_by})
        counts: dict[str, dict[str, int]] = {broadcast_id: {} for broadcast_id in ids}
        for broadcast_id, state in counted:
            counts[broadcast_id][state] = counts[broadcast_id].get(state, 0) + 1
        return [
            {
                "id": row.id,
                "state": _overall(row, counts[row.id]),
                "priority": row.priority_class,
                "sub_priority": row.sub_priority,
                "mode": row.mode,
                "targets": row.targets,
                "content": [media[m] for m in (row.media_id, *row.playlist_tail) if m in media],
                "created_by": authors.get(row.created_by, row.created_by) if row.created_by else None,
                "created_at": rfc3339(row.created_at),
                "expires_at": rfc3339(row.expires_at),
                "cancelled_at": rfc3339(row.cancelled_at) if row.cancelled_at else None,
                "device_count": sum(counts[row.id].values()),
                "counts": counts[row.id],
            }
            for row in rows
        ]

    @staticmethod
    def _media_of(session: Session, media_ids: list[str]) -> dict[str, dict[str, Any]]:
        """What each media item is, for people: its file name (a TTS item's is "TTS <its words>.wav")."""
        found = session.exec(select(MediaRow).where(col(MediaRow.id).in_(set(media_ids)))).all()
        return {
            row.id: {"media_id": row.id, "filename": row.filename, "duration_s": row.duration_s}
            for row in found
        }

    def describe(self, broadcast_id: str, principal: Principal) -> dict[str, Any]:
        with Session(self._engine) as session:
            row = session.get(BroadcastRow, broadcast_id)
            if row is None:
                raise BroadcastError("id", f"unknown broadcast {broadcast_id!r}", status=404)
            self._check_scope(row, principal)
            deliveries = session.exec(
                select(DeliveryRow)
                .where(DeliveryRow.broadcast_id == broadcast_id)
                .order_by(col(DeliveryRow.device_id))
            ).all()
            events = session.exec(
                select(DeliveryEventRow)
                .join(DeliveryRow, col(DeliveryRow.id) == col(DeliveryEventRow.delivery_id))
                .where(DeliveryRow.broadcast_id == broadcast_id)
                .order_by(col(DeliveryEventRow.id))
            ).all()
            media = self._media_of(session, [row.media_id, *row.playlist_tail])
            authors = principal_names(session, {row.created_by} if row.created_by else set())
            devices = {
                device_id: (name, area_code)
                for device_id, name, area_code in session.exec(
                    select(DeviceRow.id, DeviceRow.name, DeviceRow.area_code).where(
                        col(DeviceRow.id).in_({d.device_id for d in deliveries})
                    )
                ).all()
            }
        events_of: dict[str, list[dict[str, Any]]] = {}
        # The log reads in the order of the state machine; a fact that arrived late still sits in its place.
        for event in sorted(events, key=lambda e: (DeliveryState(e.state).progress, e.id or 0)):
            events_of.setdefault(event.delivery_id, []).append(
                {
                    "state": event.state,
                    "at": rfc3339(event.at),
                    "source": event.source,
                    "detail": event.detail,
                }
            )
        states = [DeliveryState(d.state) for d in deliveries]
        overall = _overall(row, {state.value: 1 for state in states})
        return {
            "id": row.id,
            "state": overall,
            "priority": row.priority_class,
            "sub_priority": row.sub_priority,
            "mode": row.mode,
            "media_id": row.media_id,
            "media_ids": [row.media_id, *row.playlist_tail],
            "content": [media[m] for m in (row.media_id, *row.playlist_tail) if m in media],
            "created_by": authors.get(row.created_by, row.created_by) if row.created_by else None,
            "gap_s": row.gap_s,
            "planned_play_s": row.planned_play_s,
            "repeats": row.repeats,
            "max_duration_s": row.max_duration_s,
            "targets": row.targets,
            "created_at": rfc3339(row.created_at),
            "expires_at": rfc3339(row.expires_at),
            "cancelled_at": rfc3339(row.cancelled_at) if row.cancelled_at else None,
            "device_count": len(deliveries),
            "counts": {state.value: states.count(state) for state in DeliveryState if state in states},
            "deliveries": [
                {
                    "id": d.id,
                    "device_id": d.device_id,
                    "device_name": devices.get(d.device_id, (None, None))[0],
                    "area": devices.get(d.device_id, (None, None))[1],
                    "command_id": d.command_id,
                    "state": d.state,
                    "detail": d.detail,
                    "played_s": d.played_s,
                    "resumes": d.resumes_delivery_id,
                    "events": events_of.get(d.id, []),
                }
                for d in deliveries
            ],
        }


def _overall(row: BroadcastRow, counts: Mapping[str, int]) -> str:
    """cancelled; active while a delivery has not ended; otherwise finished."""
    if row.cancelled_at is not None:
        return "cancelled"
    return "finished" if all(DeliveryState(state).is_terminal for state in counts) else "active"


def _reaching(area_codes: frozenset[str], *, inside: bool) -> Any:
    """The ids of broadcasts with a delivery to a device inside (or outside) these areas."""
    area = col(DeviceRow.area_code)
    in_areas = area.in_(area_codes) if inside else area.not_in(area_codes)
    return (
        select(DeliveryRow.broadcast_id)
        .join(DeviceRow, col(DeviceRow.id) == col(DeliveryRow.device_id))
        .where(in_areas)
    )
