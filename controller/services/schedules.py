"""Ward programmes: schedules checked (timing, targets, media, clashes) before they are stored.

The conflict check must stay fast with thousands of stored schedules (docs/performance.md §2): it reads
only the targets of the stored schedules, keeps those that can share a device with the new one (an area
above one of its devices, or one of its devices by name), reads the rest of those rows only, skips the
ones whose start times cannot fall near its own (`DayWindows`), and expands the others. Parsed targets,
validated timings and the area tree are cached by their stored text, so a cache can never be stale.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, String, cast
from sqlalchemy import select as select_columns
from sqlmodel import Session, col, select

from controller.domain.areas import AreaTree
from controller.domain.clock import rfc3339
from controller.domain.planner import DeviceEntry, TargetError, Targets, resolve_targets
from controller.domain.priority import Priority, PriorityClass
from controller.services.auth import Action, Principal
from controller.services.broadcasts import AUDIO_DEVICE_KINDS, principal_scope_check
from controller.services.errors import ServiceError
from controller.services.targets import AreaTreeCache, chunks, device_kinds, plain_rows, reachable_devices
from controller.services.tracker import expected_play_seconds
from controller.settings import SchedulesSettings
from controller.store.models import DeliveryRow, DeviceRow, MediaRow, OccurrenceRow, ScheduleRow
from schedules.conflicts import (
    ConflictReport,
    DayWindows,
    Interval,
    PlannedSchedule,
    Resolution,
    find_conflicts,
    utc_seconds_of_day,
)
from schedules.recurrence import RecurrenceError, ScheduleTime, expand, next_after, validate_schedule_time

ON_PREEMPTED = ("resume", "missed")


class ScheduleError(ServiceError):
    """A schedule that cannot be stored or read."""


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    name: str
    targets: Targets
    media_ids: tuple[str, ...]
    priority: Priority
    repeats: int
    gap_s: float
    max_duration_s: float
    dtstart: str
    rrule: str | None
    exdates: tuple[str, ...]
    timezone: str
    enabled: bool = True
    ward_order: int | None = None
    on_preempted: str = "resume"

    @classmethod
    def from_row(cls, row: ScheduleRow | _StoredSchedule) -> ScheduleSpec:
        return cls(
            name=row.name,
            targets=Targets(
                areas=tuple(row.targets.get("areas", ())), devices=tuple(row.targets.get("devices", ()))
            ),
            media_ids=tuple(row.media_ids),
            priority=Priority(PriorityClass(row.priority_class), row.sub_priority),
            repeats=row.repeats,
            gap_s=row.gap_s,
            max_duration_s=row.max_duration_s,
            dtstart=row.dtstart_local,
            rrule=row.rrule,
            exdates=tuple(row.exdates_local),
            timezone=row.timezone,
            enabled=row.enabled,
            ward_order=row.ward_order,
            on_preempted=row.on_preempted,
        )


@dataclass(frozen=True, slots=True)
class _Context:
    """What checking a schedule needs from the store, loaded once per request."""

    tree: AreaTree
    devices: list[DeviceEntry]
    durations: dict[str, float]


@dataclass(frozen=True, slots=True)
class _StoredSchedule:
    """The columns of a ScheduleRow, read without the ORM (ScheduleSpec.from_row takes either)."""

    id: str
    name: str
    targets: dict[str, Any]
    media_ids: list[str]
    priority_class: str
    sub_priority: int
    repeats: int
    gap_s: float
    max_duration_s: float
    timezone: str
    dtstart_local: str
    rrule: str | None
    exdates_local: list[str]
    enabled: bool
    ward_order: int | None
    on_preempted: str


@dataclass(frozen=True, slots=True)
class _StoredTargets:
    areas: tuple[str, ...]
    devices: tuple[str, ...]
    names: frozenset[str]  # both, for one quick disjointness test


@functools.lru_cache(maxsize=65_536)
def _json_list(text: str) -> tuple[Any, ...]:
    """A stored JSON list column, parsed once per distinct text (immutable, so it can be shared)."""
    return tuple(json.loads(text))


_PARSED_TARGETS: dict[str, _StoredTargets] = {}  # a plain dict: read 10,000 times per conflict check
_PARSED_TARGETS_LIMIT = 200_000


def _stored_targets(text: str) -> _StoredTargets:
    found = _PARSED_TARGETS.get(text)
    if found is None:
        targets = json.loads(text)
        areas, devices = tuple(targets.get("areas", ())), tuple(targets.get("devices", ()))
        found = _StoredTargets(areas, devices, frozenset(areas) | frozenset(devices))
        if len(_PARSED_TARGETS) >= _PARSED_TARGETS_LIMIT:
            _PARSED_TARGETS.clear()
        _PARSED_TARGETS[text] = found
    return found


@functools.lru_cache(maxsize=65_536)
def _validated_time(rrule: str | None, dtstart: str, timezone: str, exdates: tuple[str, ...]) -> ScheduleTime:
    # A pure function of its text arguments (errors are raised again each time, never cached).
    return validate_schedule_time(rrule, dtstart, timezone, exdates)


def schedule_time(spec: ScheduleSpec) -> ScheduleTime:
    try:
        return _validated_time(spec.rrule, spec.dtstart, spec.timezone, tuple(spec.exdates))
    except RecurrenceError as error:
        raise ScheduleError(error.field, error.detail) from error


# Read on every conflict check and programme, without the ORM (controller.services.targets.plain_rows).
_ENABLED_TARGETS_SQL = "SELECT id, CAST(targets AS TEXT) FROM schedules WHERE enabled"


_STORED_COLUMNS = (
    col(ScheduleRow.id),
    col(ScheduleRow.name),
    cast(ScheduleRow.targets, String),
    cast(ScheduleRow.media_ids, String),
    col(ScheduleRow.priority_class),
    col(ScheduleRow.sub_priority),
    col(ScheduleRow.repeats),
    col(ScheduleRow.gap_s),
    col(ScheduleRow.max_duration_s),
    col(ScheduleRow.timezone),
    col(ScheduleRow.dtstart_local),
    col(ScheduleRow.rrule),
    cast(ScheduleRow.exdates_local, String),
    col(ScheduleRow.enabled),
    col(ScheduleRow.ward_order),
    col(ScheduleRow.on_preempted),
)


def _load_stored(session: Session, ids: Iterable[str]) -> dict[str, _StoredSchedule]:
    """Whole schedule rows by id, without building ORM objects (a tenth of the time for hundreds)."""
    found: dict[str, _StoredSchedule] = {}
    for chunk in chunks(ids):
        for row in session.execute(select_columns(*_STORED_COLUMNS).where(col(ScheduleRow.id).in_(chunk))):
            found[row[0]] = _StoredSchedule(
                id=row[0],
                name=row[1],
                targets=json.loads(row[2]),
                media_ids=list(_json_list(row[3])),
                priority_class=row[4],
                sub_priority=row[5],
                repeats=row[6],
                gap_s=row[7],
                max_duration_s=row[8],
                timezone=row[9],
                dtstart_local=row[10],
                rrule=row[11],
                exdates_local=list(_json_list(row[12])),
                enabled=row[13],
                ward_order=row[14],
                on_preempted=row[15],
            )
    return found


def occurrence_dict(moment: datetime) -> dict[str, str]:
    return {
        "start_local": moment.isoformat(),
        "start_utc": moment.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }


class ScheduleService:
    def __init__(self, engine: Engine, settings: SchedulesSettings, *, now: Callable[[], datetime]) -> None:
        self._engine = engine
        self._settings = settings
        self._now = now
        self._areas = AreaTreeCache()

    # -- checks ----------------------------------------------------------------------------------
    def _context(self, session: Session, spec: ScheduleSpec) -> _Context:
        """The area tree, the media durations, and the devices that `spec`'s targets can reach (all the
        devices resolve_targets would look at for it: those in the targeted subtrees and those named)."""
        tree = self._areas.load(session)
        devices = reachable_devices(session, tree, spec.targets)
        durations = dict(session.exec(select(MediaRow.id, MediaRow.duration_s)).all())
        return _Context(tree, devices, durations)

    def _devices(
        self, spec: ScheduleSpec, context: _Context, principal: Principal | None
    ) -> list[DeviceEntry]:
        if principal is not None:
            try:
                principal_scope_check(principal, context.tree, list(spec.targets.areas))
            except ServiceError as error:
                raise ScheduleError(error.field, error.detail, status=error.status) from error
        try:
            chosen = resolve_targets(spec.targets, context.tree, context.devices, kinds=AUDIO_DEVICE_KINDS)
        except TargetError as error:
            raise ScheduleError(error.field, error.detail) from error
        if principal is not None and principal.ward_code is not None:
            outside = [d.id for d in chosen if not context.tree.is_within(d.area_code, principal.ward_code)]
            if outside:
                raise ScheduleError(
                    "targets.devices",
                    f"devices {outside[:5]} are outside ward {principal.ward_code!r} of this key",
                    status=403,
                )
        return chosen

    def _play_seconds(self, spec: ScheduleSpec, context: _Context) -> float:
        durations = [context.durations[media_id] for media_id in spec.media_ids]
        return expected_play_seconds(durations, spec.repeats, spec.gap_s, spec.max_duration_s)

    def _check_content(self, spec: ScheduleSpec, context: _Context) -> None:
        if not spec.name.strip():
            raise ScheduleError("name", "must not be empty")
        if not spec.media_ids:
            raise ScheduleError("content.media_ids", "the playlist is empty")
        for index, media_id in enumerate(spec.media_ids):
            if media_id not in context.durations:
                raise ScheduleError(f"content.media_ids[{index}]", f"unknown media {media_id!r}")
        if spec.on_preempted not in ON_PREEMPTED:
            raise ScheduleError("on_preempted", f"must be one of {', '.join(ON_PREEMPTED)}")

    def _planned(
        self,
        schedule_id: str,
        spec: ScheduleSpec,
        timing: ScheduleTime,
        device_ids: frozenset[str],
        context: _Context,
        start: datetime,
        end: datetime,
    ) -> PlannedSchedule:
        length = timedelta(seconds=self._play_seconds(spec, context))
        starts = expand(timing.rule, timing.dtstart, start=start, end=end, exdates=timing.exdates)
        return PlannedSchedule(
            id=schedule_id,
            name=spec.name,
            priority_class=spec.priority.priority_class.value,
            rank=spec.priority.rank,
            devices=device_ids,
            intervals=[Interval(moment, moment + length) for moment in starts],
            ward_order=spec.ward_order,
        )

    def _sharing(
        self, session: Session, schedule_id: str, devices: Sequence[DeviceEntry], tree: AreaTree
    ) -> list[tuple[str, frozenset[str]]]:
        """The enabled stored schedules (but `schedule_id`) that reach one of `devices`, in storage order,
        each with the devices of `devices` it reaches, which is all the conflict check needs of them.

        Same result as resolving every stored schedule's targets (resolve_targets_quietly) and
        intersecting, without doing so: a device is reached through its own area or an area above it
        (when enabled, as resolve_targets requires), or by name; a schedule whose targets no longer
        resolve (an unknown area or device, a device of another kind) reaches nothing.
        """
        ids = {device.id for device in devices}
        above: dict[str, set[str]] = {}
        for device in devices:
            if device.enabled and device.kind in AUDIO_DEVICE_KINDS and device.area_code in tree:
                for code in (device.area_code, *(area.code for area in tree.ancestors(device.area_code))):
                    above.setdefault(code, set()).add(device.id)
        names = ids | above.keys()
        found: list[tuple[str, _StoredTargets, frozenset[str]]] = []
        parsed = _PARSED_TARGETS.get
        for row_id, text in plain_rows(session, _ENABLED_TARGETS_SQL):
            targets = parsed(text) or _stored_targets(text)
            if targets.names.isdisjoint(names) or row_id == schedule_id:
                continue
            shared = ids.intersection(targets.devices)
            for code in targets.areas:
                shared |= above.get(code, set())
            if shared and all(code in tree for code in targets.areas):
                found.append((row_id, targets, frozenset(shared)))
        # Devices named by those schedules that are not among `devices` must still exist and play audio.
        unknown = {d for _, targets, _ in found for d in targets.devices} - ids
        kinds = device_kinds(session, unknown)
        return [
            (row_id, shared)
            for row_id, targets, shared in found
            if all(d in ids or kinds.get(d) in AUDIO_DEVICE_KINDS for d in targets.devices)
        ]

    def _check_conflicts(
        self,
        session: Session,
        schedule_id: str,
        spec: ScheduleSpec,
        timing: ScheduleTime,
        devices: Sequence[DeviceEntry],
        context: _Context,
        resolution: Resolution,
    ) -> list[dict[str, Any]]:
        """Raise 409 listing the clashes the request did not settle; return the settled ones."""
        report = self._conflict_report(session, schedule_id, spec, timing, devices, context, resolution)
        if report.blocking:
            raise ScheduleError(
                "dtstart",
                f"clashes with {len(report.clashes)} schedule(s) on shared devices",
                status=409,
                extra={"clashes": [clash_dict(c) for c in report.clashes]},
            )
        return [clash_dict(c) for c in report.settled]

    def _conflict_report(
        self,
        session: Session,
        schedule_id: str,
        spec: ScheduleSpec,
        timing: ScheduleTime,
        devices: Sequence[DeviceEntry],
        context: _Context,
        resolution: Resolution,
    ) -> ConflictReport:
        if not spec.enabled or spec.priority.priority_class is PriorityClass.EMERGENCY:
            return ConflictReport()
        start = self._now()
        end = start + timedelta(days=self._settings.conflict_horizon_days)
        device_ids = frozenset(device.id for device in devices)
        candidate = self._planned(schedule_id, spec, timing, device_ids, context, start, end)
        windows = DayWindows.of(candidate.intervals)
        sharing = self._sharing(session, schedule_id, devices, context.tree)
        rows = _load_stored(session, (row_id for row_id, _ in sharing))
        others: list[PlannedSchedule] = []
        for row_id, shared in sharing:
            other = ScheduleSpec.from_row(rows[row_id])
            other_timing = schedule_time(other)
            # Skip the expansion when no start of `other` can come near one of the candidate's.
            reach = self._play_seconds(other, context)
            if not windows.may_overlap(utc_seconds_of_day(other_timing, start, end), reach):
                continue
            others.append(self._planned(row_id, other, other_timing, shared, context, start, end))
        return find_conflicts(candidate, others, resolution)

    # -- commands --------------------------------------------------------------------------------
    def create(self, spec: ScheduleSpec, principal: Principal, resolution: Resolution) -> dict[str, Any]:
        self._require_priority_allowed(spec, principal)
        timing = schedule_time(spec)
        schedule_id = str(uuid.uuid4())
        with Session(self._engine) as session:
            context = self._context(session, spec)
            self._check_content(spec, context)
            devices = self._devices(spec, context, principal)
            settled = self._check_conflicts(session, schedule_id, spec, timing, devices, context, resolution)
            now = self._now()
            session.add(
                ScheduleRow(
                    id=schedule_id,
                    created_by=principal.key_id,
                    created_at=now,
                    updated_at=now,
                    **_row_values(spec, timing),
                )
            )
            session.commit()
        return {
            "id": schedule_id,
            "first_occurrence": occurrence_dict(timing.first_occurrence),
            "device_count": len(devices),
            "settled_clashes": settled,
        }

    def check(
        self, spec: ScheduleSpec, principal: Principal, resolution: Resolution, *, upcoming: int = 5
    ) -> dict[str, Any]:
        """What `create` would say, without storing anything (a dry run for the console's form): the
        same validation errors (by field), and instead of a 409 the clashes it would refuse, the ones
        the resolution settles, the devices reached and the next occurrences."""
        self._require_priority_allowed(spec, principal)
        timing = schedule_time(spec)
        with Session(self._engine) as session:
            context = self._context(session, spec)
            self._check_content(spec, context)
            devices = self._devices(spec, context, principal)
            report = self._conflict_report(session, "dry-run", spec, timing, devices, context, resolution)
        now = self._now()
        moments: list[datetime] = []
        after = now
        while len(moments) < upcoming:
            moment = next_after(timing.rule, timing.dtstart, after, timing.exdates)
            if moment is None:
                break
            moments.append(moment)
            after = moment
        return {
            "ok": not report.blocking,
            "clashes": [clash_dict(c) for c in report.clashes],
            "settled_clashes": [clash_dict(c) for c in report.settled],
            "device_count": len(devices),
            "devices": sorted(device.id for device in devices),
            "first_occurrence": occurrence_dict(timing.first_occurrence),
            "next_occurrences": [occurrence_dict(moment) for moment in moments],
            "play_seconds": round(self._play_seconds(spec, context), 3),
        }

    def update(
        self, schedule_id: str, changes: dict[str, Any], principal: Principal, resolution: Resolution
    ) -> dict[str, Any]:
        with Session(self._engine) as session:
            row = self._visible(session, schedule_id, principal)
            spec = replace(ScheduleSpec.from_row(row), **changes)
            self._require_priority_allowed(spec, principal)
            timing = schedule_time(spec)
            context = self._context(session, spec)
            self._check_content(spec, context)
            devices = self._devices(spec, context, principal)
            settled = self._check_conflicts(session, schedule_id, spec, timing, devices, context, resolution)
            for key, value in _row_values(spec, timing).items():
                setattr(row, key, value)
            row.updated_at = self._now()
            session.add(row)
            session.commit()
        return {
            "id": schedule_id,
            "first_occurrence": occurrence_dict(timing.first_occurrence),
            "device_count": len(devices),
            "settled_clashes": settled,
        }

    def delete(self, schedule_id: str, principal: Principal) -> None:
        with Session(self._engine) as session:
            row = self._visible(session, schedule_id, principal)
            fired = session.exec(
                select(OccurrenceRow.id).where(OccurrenceRow.schedule_id == schedule_id)
            ).first()
            if fired is not None:
                # Its occurrences are the ward's broadcast log: keep them, stop the schedule.
                row.enabled = False
                row.updated_at = self._now()
                session.add(row)
            else:
                session.delete(row)
            session.commit()

    # -- queries ---------------------------------------------------------------------------------
    def _visible(self, session: Session, schedule_id: str, principal: Principal) -> ScheduleRow:
        row = session.get(ScheduleRow, schedule_id)
        if row is None or not self._in_scope(session, row, principal):
            raise ScheduleError("id", f"unknown schedule {schedule_id!r}", status=404)
        return row

    def _in_scope(self, session: Session, row: ScheduleRow, principal: Principal) -> bool:
        if principal.ward_code is None:
            return True
        tree = self._areas.load(session)
        areas = row.targets.get("areas", [])
        devices = row.targets.get("devices", [])
        device_areas = session.exec(select(DeviceRow.area_code).where(col(DeviceRow.id).in_(devices))).all()
        return all(
            code in tree and tree.is_within(code, principal.ward_code) for code in [*areas, *device_areas]
        )

    def describe(self, schedule_id: str, principal: Principal) -> dict[str, Any]:
        with Session(self._engine) as session:
            return schedule_dict(self._visible(session, schedule_id, principal))

    def list_visible(self, principal: Principal) -> list[dict[str, Any]]:
        with Session(self._engine) as session:
            rows = session.exec(select(ScheduleRow).order_by(col(ScheduleRow.created_at))).all()
            return [schedule_dict(row) for row in rows if self._in_scope(session, row, principal)]

    def history(self, schedule_id: str, principal: Principal) -> list[dict[str, Any]]:
        """What became of each occurrence so far: fired (with its broadcast), missed or failed, and why."""
        with Session(self._engine) as session:
            self._visible(session, schedule_id, principal)
            rows = session.exec(
                select(OccurrenceRow)
                .where(OccurrenceRow.schedule_id == schedule_id)
                .order_by(col(OccurrenceRow.planned_at))
            ).all()
        return [
            {
                "planned_at": rfc3339(row.planned_at),
                "outcome": row.outcome,
                "broadcast_id": row.broadcast_id,
                "detail": row.detail,
                "recorded_at": rfc3339(row.recorded_at),
            }
            for row in rows
        ]

    def _window(self, start: datetime, end: datetime) -> None:
        if end <= start:
            raise ScheduleError("end", "must be after start")
        if end - start > timedelta(days=self._settings.max_window_days):
            raise ScheduleError("end", f"the window may span at most {self._settings.max_window_days} days")

    def occurrences(
        self, schedule_id: str, start: datetime, end: datetime, principal: Principal
    ) -> list[dict[str, str]]:
        self._window(start, end)
        with Session(self._engine) as session:
            row = self._visible(session, schedule_id, principal)
        timing = schedule_time(ScheduleSpec.from_row(row))
        moments = expand(timing.rule, timing.dtstart, start=start, end=end, exdates=timing.exdates)
        return [occurrence_dict(moment) for moment in moments]

    def programme(
        self, area_code: str, start: datetime, end: datetime, principal: Principal
    ) -> list[dict[str, Any]]:
        """Every occurrence that reaches the area: schedules aimed at it, at an area above it, or at
        devices inside it, and (marked `part`) schedules aimed at an area below it."""
        self._window(start, end)
        with Session(self._engine) as session:
            tree, reaching = self.schedules_reaching(session, area_code, principal)
            rows = _load_stored(session, (row_id for row_id, _ in reaching))
            results = _occurrence_results(
                session, [row_id for row_id, _ in reaching], start, end, tree.subtree_codes(area_code)
            )
        items: list[dict[str, Any]] = []
        for row_id, reach in reaching:
            row = rows[row_id]
            timing = schedule_time(ScheduleSpec.from_row(row))
            shared = {
                "schedule_id": row.id,
                "name": row.name,
                "priority": row.priority_class,
                "sub_priority": row.sub_priority,
                "targets": row.targets,
                "reach": reach,
            }
            items.extend(
                {
                    **occurrence_dict(moment),
                    **shared,
                    "result": results.get((row.id, _instant_key(moment))),
                }
                for moment in expand(
                    timing.rule, timing.dtstart, start=start, end=end, exdates=timing.exdates
                )
            )
        return sorted(items, key=lambda item: (item["start_utc"], -_rank(item)))

    def schedules_reaching(
        self, session: Session, area_code: str, principal: Principal
    ) -> tuple[AreaTree, list[tuple[str, str]]]:
        """The area tree and the enabled schedules that reach the area, in storage order, each with its
        reach: `whole` (aimed at the area or one above it) or `part` (at an area below it or at devices
        inside it). Checks that the area exists and that the principal may see it."""
        tree = self._areas.load(session)
        if area_code not in tree:
            raise ScheduleError("code", f"unknown area {area_code!r}", status=404)
        if principal.ward_code is not None and not (
            tree.is_within(area_code, principal.ward_code) or tree.is_within(principal.ward_code, area_code)
        ):
            raise ScheduleError(
                "code", f"area {area_code!r} is outside ward {principal.ward_code!r}", status=403
            )
        above = {area_code} | {a.code for a in tree.ancestors(area_code)}
        below = tree.subtree_codes(area_code) - {area_code}
        inside = below | {area_code}
        rows = plain_rows(session, _ENABLED_TARGETS_SQL)
        stored = [(row_id, _stored_targets(text)) for row_id, text in rows]
        # Only the areas of the devices named by schedules that no area of theirs already places.
        placed = above | below
        named = {d for _, targets in stored if placed.isdisjoint(targets.areas) for d in targets.devices}
        device_area: dict[str, str] = {}
        for chunk in chunks(named):
            query = select(DeviceRow.id, DeviceRow.area_code).where(col(DeviceRow.id).in_(chunk))
            device_area.update(session.exec(query).all())
        reaching: list[tuple[str, str]] = []
        for row_id, targets in stored:
            if not above.isdisjoint(targets.areas):
                reaching.append((row_id, "whole"))
            elif not below.isdisjoint(targets.areas) or any(
                device_area.get(d) in inside for d in targets.devices
            ):
                reaching.append((row_id, "part"))
        return tree, reaching

    def _require_priority_allowed(self, spec: ScheduleSpec, principal: Principal) -> None:
        if spec.priority.priority_class is PriorityClass.EMERGENCY and not principal.may(
            Action.BROADCAST_EMERGENCY
        ):
            raise ScheduleError(
                "priority", f"role {principal.role} may not schedule emergency broadcasts", status=403
            )


# What became of a play request (one broadcast on one device, a preempted one played again being one
# request): the state its last delivery is in, in the buckets of the proof-of-play report
# (controller/services/reports.py).
_BUCKETS = {
    "completed": "played",
    "playing": "playing",
    "queued": "pending",
    "sent": "pending",
    "delivered": "pending",
    "interrupted": "interrupted",
    "expired": "missed",
    "failed": "failed",
    "cancelled": "cancelled",
}
RESULT_BUCKETS = ("played", "playing", "pending", "interrupted", "missed", "failed", "cancelled")


def _instant_key(moment: datetime) -> int:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return round(aware.timestamp())


def _occurrence_results(
    session: Session, schedule_ids: Sequence[str], start: datetime, end: datetime, areas: frozenset[str]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Proof of play of the recorded occurrences of these schedules planned in [start, end), keyed by
    (schedule id, planned instant): fired (with per-bucket counts of the devices in `areas` its
    broadcast reached), missed or failed (with the reason)."""
    occurrences = [
        row
        for chunk in chunks(schedule_ids)
        for row in session.exec(
            select(OccurrenceRow).where(
                col(OccurrenceRow.schedule_id).in_(chunk),
                col(OccurrenceRow.planned_at) >= start,
                col(OccurrenceRow.planned_at) < end,
            )
        ).all()
    ]
    broadcasts = {row.broadcast_id for row in occurrences if row.broadcast_id is not None}
    deliveries = [
        (delivery, area)
        for chunk in chunks(broadcasts)
        for delivery, area in session.exec(
            select(DeliveryRow, DeviceRow.area_code)
            .join(DeviceRow, col(DeviceRow.id) == col(DeliveryRow.device_id))
            .where(col(DeliveryRow.broadcast_id).in_(chunk))
        ).all()
    ]
    resumed_by = {d.resumes_delivery_id: d for d, _ in deliveries if d.resumes_delivery_id is not None}
    counts: dict[str, dict[str, int]] = {}
    for delivery, area in deliveries:
        if delivery.resumes_delivery_id is not None or area not in areas:
            continue
        last = delivery
        while last.id in resumed_by:
            last = resumed_by[last.id]
        bucket = counts.setdefault(delivery.broadcast_id, dict.fromkeys(RESULT_BUCKETS, 0))
        bucket[_BUCKETS.get(last.state, "pending")] += 1
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for row in occurrences:
        found = counts.get(row.broadcast_id or "", dict.fromkeys(RESULT_BUCKETS, 0))
        results[(row.schedule_id, _instant_key(row.planned_at))] = {
            "outcome": row.outcome,
            "broadcast_id": row.broadcast_id,
            "detail": row.detail,
            "devices": sum(found.values()) if row.broadcast_id is not None else None,
            **(found if row.broadcast_id is not None else {}),
        }
    return results


def _rank(item: dict[str, Any]) -> int:
    return Priority(PriorityClass(item["priority"]), item["sub_priority"]).rank


def resolve_targets_quietly(spec: ScheduleSpec, context: _Context) -> list[DeviceEntry]:
    """The devices a stored schedule reaches today; none when its targets no longer resolve."""
    try:
        return resolve_targets(spec.targets, context.tree, context.devices, kinds=AUDIO_DEVICE_KINDS)
    except TargetError:
        return []


def _row_values(spec: ScheduleSpec, timing: ScheduleTime) -> dict[str, Any]:
    return {
        "name": spec.name.strip(),
        "targets": {"areas": list(spec.targets.areas), "devices": list(spec.targets.devices)},
        "media_ids": list(spec.media_ids),
        "priority_class": spec.priority.priority_class.value,
        "sub_priority": spec.priority.sub,
        "rank": spec.priority.rank,
        "repeats": spec.repeats,
        "gap_s": spec.gap_s,
        "max_duration_s": spec.max_duration_s,
        "timezone": spec.timezone,
        "dtstart_local": timing.dtstart.replace(tzinfo=None).isoformat(),
        "rrule": timing.rule.to_text() if timing.rule is not None else None,
        "exdates_local": [moment.replace(tzinfo=None).isoformat() for moment in timing.exdates],
        "enabled": spec.enabled,
        "ward_order": spec.ward_order,
        "on_preempted": spec.on_preempted,
    }


def clash_dict(clash: Any) -> dict[str, Any]:
    return {
        "schedule_id": clash.schedule_id,
        "name": clash.schedule_name,
        "devices": list(clash.devices),
        "device_count": clash.device_count,
        "times": [{"start": i.start.isoformat(), "end": i.end.isoformat()} for i in clash.times],
        "overlap_count": clash.overlap_count,
        "why": clash.why,
        "remedy": clash.remedy,
    }


def schedule_dict(row: ScheduleRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "targets": row.targets,
        "content": {"media_ids": row.media_ids},
        "priority": row.priority_class,
        "sub_priority": row.sub_priority,
        "repeats": row.repeats,
        "gap_s": row.gap_s,
        "max_duration_s": row.max_duration_s,
        "dtstart": row.dtstart_local,
        "rrule": row.rrule,
        "exdates": row.exdates_local,
        "timezone": row.timezone,
        "enabled": row.enabled,
        "ward_order": row.ward_order,
        "on_preempted": row.on_preempted,
    }


def next_planned(row: ScheduleRow, after: datetime) -> datetime | None:
    """The next start of a stored schedule strictly after `after`, as an aware UTC instant."""
    timing = schedule_time(ScheduleSpec.from_row(row))
    moment = next_after(timing.rule, timing.dtstart, after, timing.exdates)
    return None if moment is None else moment.astimezone(UTC)
