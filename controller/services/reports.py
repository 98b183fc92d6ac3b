"""Proof of play: what each speaker of an area played over a window, and the ward's broadcast log.

Both reports read the event-sourced delivery log (docs/protocol.md §2); nothing here writes.

**Window.** A delivery belongs to the window [from, to) when its *broadcast was created* in it (a
delivery that plays a preempted one again belongs to the same broadcast, so a whole chain counts in
one window). A schedule occurrence that never became a broadcast (outcome `missed` or `failed`)
belongs to it when its *planned instant* is in it.

**Devices.** Every device whose area (as registered now) lies in the requested area's subtree: all
its speakers, even those with nothing to report, plus any other device that had a delivery.

**Ward of a device.** The nearest area at or above the device's area whose kind is `ward` or
`commune`; where the tree has none on that path, the area just below the root on that path (the
district, say, in a province > district > group tree); a device registered on the root itself
belongs to the root. Ward totals add up only the devices of the requested area (asking for one
group gives its ward a row with that group's devices only).

**Counts.** The unit is a *play request*: one broadcast on one device, or one missed schedule
occurrence on one device it would have reached. A request that was preempted and played again
(`on_preempted: resume`) is a chain of deliveries; its outcome is that of the last one. So each
request ends in exactly one bucket and `scheduled = played_ok + interrupted + missed + failed +
cancelled + pending`:

- `scheduled`: play requests in the window.
- `played_ok`: the last delivery ended `completed` (played to its end, or cut at `max_duration_s`).
- `interrupted`: the last delivery ended `interrupted`: preempted and not played again (policy
  `missed`, an emergency superseded by a newer one, or the request expired before it could resume).
- `missed`: never played: the last delivery ended `expired` (the device was offline or busy until
  the broadcast expired), or the schedule occurrence was recorded `missed` (the controller was down
  past the grace time) or `failed` (it could not become a broadcast). Which devices a missed
  occurrence "would have reached" is its schedule's targets resolved against today's devices.
- `failed`: the last delivery ended `failed`: the device could not play it (fetch, checksum,
  rejected command, shut down mid-play) or never reported its end (controller timeout).
- `cancelled`: the last delivery ended `cancelled` (cancel or all-clear).
- `pending`: not ended yet (queued, sent, delivered or playing).
- `resumed`: how many times a preempted delivery was played again (deliveries created to resume
  one); each is part of a request already counted, not a request of its own.

**Seconds.** `requested_s` is the broadcast's `planned_play_s` (audio length × repeats + gaps, capped
at `max_duration_s`) once per play request, so a resumed chain asks for its length once; for a
missed occurrence it is the same length computed from its schedule. `played_s` is the sum over
every delivery of the seconds the device reported playing, or, for a `completed` delivery that
reported none, its planned length; a preempted delivery's partial play therefore counts too.
`played_percent` is played over requested.

**Log.** One row per delivery (resumes included, pointing at the delivery they resume) plus one
row per missed or failed occurrence per device it would have reached (no delivery id, state
`missed`), in time order. The rows whose `resumes_delivery_id` is empty are exactly the play
requests counted above.

**CSV.** RFC 4180, comma-separated, `.` for decimals, CRLF line ends, UTF-8 with a byte order
mark so that Excel (which otherwise assumes the Windows code page) shows Vietnamese names intact.
Times in CSV are in the controller's time zone with their offset (2026-12-01T06:00:05+07:00),
JSON uses UTC with `Z` like the rest of the API. A text cell that starts with `=`, `+`, `-`, `@`
or a tab is prefixed with `'` so that a spreadsheet never runs it as a formula.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import Connection, Engine, case, func, select
from sqlmodel import Session, col
from sqlmodel import select as select_rows

from controller.domain.areas import Area, AreaTree
from controller.domain.clock import rfc3339
from controller.domain.deliveries import DeliveryState
from controller.domain.planner import TargetError, Targets, resolve_targets
from controller.services.auth import Principal
from controller.services.broadcasts import AUDIO_DEVICE_KINDS
from controller.services.errors import ServiceError
from controller.services.targets import load_area_tree, load_device_entries
from controller.services.tracker import expected_play_seconds
from controller.store.models import (
    BroadcastRow,
    DeliveryEventRow,
    DeliveryRow,
    DeviceRow,
    MediaRow,
    OccurrenceRow,
    ScheduleRow,
)

WARD_KINDS = frozenset({"ward", "commune"})
MAX_WINDOW = timedelta(days=366)
BOM = "\ufeff"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OCCURRENCE_NOT_FIRED = ("missed", "failed")
_STATE_BUCKET = {
    DeliveryState.COMPLETED: "played_ok",
    DeliveryState.INTERRUPTED: "interrupted",
    DeliveryState.EXPIRED: "missed",
    DeliveryState.FAILED: "failed",
    DeliveryState.CANCELLED: "cancelled",
}


class ReportError(ServiceError):
    """A report that cannot be produced: unknown area, bad window, or an area outside the key's ward."""


@dataclass(slots=True)
class PlayTotals:
    scheduled: int = 0
    played_ok: int = 0
    interrupted: int = 0
    missed: int = 0
    failed: int = 0
    cancelled: int = 0
    pending: int = 0
    resumed: int = 0
    played_s: float = 0.0
    requested_s: float = 0.0

    def add(self, other: PlayTotals) -> None:
        for name in TOTAL_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def played_percent(self) -> float | None:
        return round(100 * self.played_s / self.requested_s, 1) if self.requested_s > 0 else None

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, Any] = {name: getattr(self, name) for name in TOTAL_FIELDS}
        counts["played_s"] = round(self.played_s, 1)
        counts["requested_s"] = round(self.requested_s, 1)
        counts["played_percent"] = self.played_percent
        return counts


TOTAL_FIELDS = tuple(f.name for f in fields(PlayTotals))


@dataclass(slots=True)
class DeviceLine:
    device_id: str
    name: str | None
    area: Area
    ward: Area
    totals: PlayTotals = field(default_factory=PlayTotals)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "name": self.name,
            "area": self.area.code,
            "area_name": self.area.name,
            "ward": self.ward.code,
            "ward_name": self.ward.name,
            **self.totals.as_dict(),
        }


@dataclass(slots=True)
class WardLine:
    ward: Area
    devices: int = 0
    totals: PlayTotals = field(default_factory=PlayTotals)

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.ward.code,
            "name": self.ward.name,
            "kind": self.ward.kind,
            "devices": self.devices,
            **self.totals.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class PlaysReport:
    area: Area
    start: datetime
    end: datetime
    totals: PlayTotals
    wards: list[WardLine]
    devices: list[DeviceLine]

    def as_dict(self) -> dict[str, Any]:
        return {
            "area": self.area.code,
            "area_name": self.area.name,
            "from": rfc3339(self.start),
            "to": rfc3339(self.end),
            "totals": self.totals.as_dict(),
            "wards": [ward.as_dict() for ward in self.wards],
            "devices": [device.as_dict() for device in self.devices],
        }


@dataclass(slots=True)
class LogEntry:
    delivery_id: str | None
    broadcast_id: str | None
    schedule_id: str | None
    schedule_name: str | None
    device_id: str
    device_name: str | None
    area: Area
    ward: Area
    priority: str
    sub_priority: int
    mode: str
    planned_at: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    state: str
    played_s: float
    requested_s: float
    resumes_delivery_id: str | None
    detail: str | None

    @property
    def sort_key(self) -> tuple[datetime, str, str, datetime]:
        # A delivery has its queued time, a missed occurrence its planned one; a scheduled broadcast
        # sorts by its plan so that a late catch-up still sits where the programme had it.
        moment = self.queued_at or self.planned_at or _EPOCH
        return (self.planned_at or moment, self.broadcast_id or "", self.device_id, moment)

    def values(self, render_time: Any) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "broadcast_id": self.broadcast_id,
            "schedule_id": self.schedule_id,
            "schedule_name": self.schedule_name,
            "device_id": self.device_id,
            "device_name": self.device_name,
            "area": self.area.code,
            "area_name": self.area.name,
            "ward": self.ward.code,
            "ward_name": self.ward.name,
            "priority": self.priority,
            "sub_priority": self.sub_priority,
            "mode": self.mode,
            "planned_at": render_time(self.planned_at),
            "queued_at": render_time(self.queued_at),
            "started_at": render_time(self.started_at),
            "ended_at": render_time(self.ended_at),
            "state": self.state,
            "played_s": round(self.played_s, 1),
            "requested_s": round(self.requested_s, 1),
            "resumes_delivery_id": self.resumes_delivery_id,
            "detail": self.detail,
        }


LOG_COLUMNS = (
    "delivery_id",
    "broadcast_id",
    "schedule_id",
    "schedule_name",
    "device_id",
    "device_name",
    "area",
    "area_name",
    "ward",
    "ward_name",
    "priority",
    "sub_priority",
    "mode",
    "planned_at",
    "queued_at",
    "started_at",
    "ended_at",
    "state",
    "played_s",
    "requested_s",
    "resumes_delivery_id",
    "detail",
)


@dataclass(frozen=True, slots=True)
class PlayLog:
    area: Area
    start: datetime
    end: datetime
    entries: list[LogEntry]

    def as_dict(self) -> dict[str, Any]:
        return {
            "area": self.area.code,
            "area_name": self.area.name,
            "from": rfc3339(self.start),
            "to": rfc3339(self.end),
            "count": len(self.entries),
            "rows": [entry.values(_utc_or_none) for entry in self.entries],
        }


@dataclass(frozen=True, slots=True)
class _Device:
    id: str
    name: str | None
    kind: str
    area: Area
    ward: Area


@dataclass(frozen=True, slots=True)
class _Scope:
    tree: AreaTree
    area: Area
    # None when the area's subtree is the whole tree: no filter needed.
    area_codes: frozenset[str] | None
    devices: dict[str, _Device]


@dataclass(frozen=True, slots=True)
class _NotFired:
    """A schedule occurrence that became no broadcast, with the devices of the area it would have reached."""

    schedule: ScheduleRow
    planned_at: datetime
    outcome: str
    detail: str | None
    device_ids: list[str]
    requested_s: float


def ward_of(tree: AreaTree, code: str) -> Area:
    """The ward or commune holding `code`; see the module notes for trees without those kinds."""
    chain = [tree.get(code), *tree.ancestors(code)]
    for area in chain:
        if area.kind in WARD_KINDS:
            return area
    return chain[-2] if len(chain) >= 2 else chain[-1]  # noqa: PLR2004  (just below the root)


def check_window(start: datetime, end: datetime) -> None:
    for name, moment in (("from", start), ("to", end)):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ReportError(name, "give a time zone offset, e.g. 2026-12-01T00:00:00+07:00")
    if start >= end:
        raise ReportError("to", "must be after from")
    if end - start > MAX_WINDOW:
        raise ReportError("to", f"the window may span at most {MAX_WINDOW.days} days")


class ReportService:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- the reports ---------------------------------------------------------------------------
    def plays(self, area_code: str, start: datetime, end: datetime, principal: Principal) -> PlaysReport:
        check_window(start, end)
        with Session(self._engine) as session:
            scope = self._scope(session, area_code, principal)
            connection = session.connection()
            by_device = self._delivery_totals(connection, scope, start, end)
            for missed in self._not_fired(session, scope, start, end):
                for device_id in missed.device_ids:
                    totals = by_device.setdefault(device_id, PlayTotals())
                    totals.scheduled += 1
                    totals.missed += 1
                    totals.requested_s += missed.requested_s
        lines = [
            DeviceLine(
                device.id, device.name, device.area, device.ward, by_device.get(device.id, PlayTotals())
            )
            for device in scope.devices.values()
            if device.kind in AUDIO_DEVICE_KINDS or device.id in by_device
        ]
        lines.sort(key=lambda line: (line.ward.code, line.area.code, line.device_id))
        wards: dict[str, WardLine] = {}
        overall = PlayTotals()
        for line in lines:
            ward = wards.setdefault(line.ward.code, WardLine(line.ward))
            ward.devices += 1
            ward.totals.add(line.totals)
            overall.add(line.totals)
        return PlaysReport(scope.area, start, end, overall, list(wards.values()), lines)

    def log(self, area_code: str, start: datetime, end: datetime, principal: Principal) -> PlayLog:
        check_window(start, end)
        with Session(self._engine) as session:
            scope = self._scope(session, area_code, principal)
            entries = self._delivery_entries(session.connection(), scope, start, end)
            for missed in self._not_fired(session, scope, start, end):
                schedule = missed.schedule
                verb = "was missed" if missed.outcome == "missed" else "could not fire"
                detail = f"schedule occurrence {verb}" + (f": {missed.detail}" if missed.detail else "")
                for device_id in missed.device_ids:
                    device = scope.devices[device_id]
                    entries.append(
                        LogEntry(
                            delivery_id=None,
                            broadcast_id=None,
                            schedule_id=schedule.id,
                            schedule_name=schedule.name,
                            device_id=device.id,
                            device_name=device.name,
                            area=device.area,
                            ward=device.ward,
                            priority=schedule.priority_class,
                            sub_priority=schedule.sub_priority,
                            mode="live",
                            planned_at=missed.planned_at,
                            queued_at=None,
                            started_at=None,
                            ended_at=None,
                            state="missed",
                            played_s=0.0,
                            requested_s=missed.requested_s,
                            resumes_delivery_id=None,
                            detail=detail[:500],
                        )
                    )
        entries.sort(key=lambda entry: entry.sort_key)
        return PlayLog(scope.area, start, end, entries)

    # -- pieces ----------------------------------------------------------------------------------
    def _scope(self, session: Session, area_code: str, principal: Principal) -> _Scope:
        tree = load_area_tree(session)
        area = tree.find(area_code)
        if area is None:
            raise ReportError("area", f"unknown area {area_code!r}", status=404)
        if principal.ward_code is not None and (
            principal.ward_code not in tree or not tree.is_within(area_code, principal.ward_code)
        ):
            raise ReportError(
                "area", f"area {area_code!r} is outside ward {principal.ward_code!r} of this key", status=403
            )
        codes = tree.subtree_codes(area_code)
        whole = len(codes) == len(tree)
        statement = select(
            col(DeviceRow.id), col(DeviceRow.name), col(DeviceRow.kind), col(DeviceRow.area_code)
        )
        if not whole:
            statement = statement.where(col(DeviceRow.area_code).in_(codes))
        wards: dict[str, Area] = {}
        devices: dict[str, _Device] = {}
        for device_id, name, kind, device_area in session.connection().execute(statement):
            ward = wards.get(device_area)
            if ward is None:
                ward = wards[device_area] = ward_of(tree, device_area)
            devices[device_id] = _Device(device_id, name, kind, tree.get(device_area), ward)
        return _Scope(tree, area, None if whole else codes, devices)

    def _delivery_totals(
        self, connection: Connection, scope: _Scope, start: datetime, end: datetime
    ) -> dict[str, PlayTotals]:
        """One grouped query: per device and final state, the deliveries, resumes and seconds."""
        state = col(DeliveryRow.state)
        planned = col(BroadcastRow.planned_play_s)
        played = func.coalesce(col(DeliveryRow.played_s), case((state == "completed", planned), else_=0.0))
        requested = case((col(DeliveryRow.resumes_delivery_id).is_(None), planned), else_=0.0)
        statement = (
            select(
                col(DeliveryRow.device_id),
                state,
                func.count(),
                func.count(col(DeliveryRow.resumes_delivery_id)),
                func.sum(played),
                func.sum(requested),
            )
            .join(BroadcastRow, col(BroadcastRow.id) == col(DeliveryRow.broadcast_id))
            .where(col(BroadcastRow.created_at) >= start, col(BroadcastRow.created_at) < end)
            .group_by(col(DeliveryRow.device_id), state)
        )
        if scope.area_codes is not None:
            statement = statement.join(DeviceRow, col(DeviceRow.id) == col(DeliveryRow.device_id)).where(
                col(DeviceRow.area_code).in_(scope.area_codes)
            )
        by_device: dict[str, PlayTotals] = {}
        for device_id, state_value, count, resumes, played_s, requested_s in connection.execute(statement):
            totals = by_device.setdefault(device_id, PlayTotals())
            totals.scheduled += int(count)
            totals.resumed += int(resumes)
            totals.played_s += float(played_s or 0)
            totals.requested_s += float(requested_s or 0)
            bucket = _STATE_BUCKET.get(DeliveryState(state_value), "pending")
            setattr(totals, bucket, getattr(totals, bucket) + int(count))
        for totals in by_device.values():
            # Only an interrupted delivery is ever resumed, and only once: each resume makes one
            # interrupted delivery a link of a chain, not an outcome. (A resume can be stored a moment
            # before its predecessor's `interrupted` is: then that predecessor still shows as pending.)
            totals.scheduled -= totals.resumed
            superseded = min(totals.resumed, totals.interrupted)
            totals.interrupted -= superseded
            totals.pending = max(totals.pending - (totals.resumed - superseded), 0)
        return by_device

    def _delivery_entries(
        self, connection: Connection, scope: _Scope, start: datetime, end: datetime
    ) -> list[LogEntry]:
        def first_event(state: DeliveryState) -> Any:
            return (
                select(func.min(col(DeliveryEventRow.at)))
                .where(
                    col(DeliveryEventRow.delivery_id) == col(DeliveryRow.id),
                    col(DeliveryEventRow.state) == state.value,
                )
                .correlate(DeliveryRow)
                .scalar_subquery()
            )

        statement = (
            select(
                col(DeliveryRow.id),
                col(DeliveryRow.broadcast_id),
                col(DeliveryRow.device_id),
                col(DeliveryRow.state),
                col(DeliveryRow.state_at),
                col(DeliveryRow.played_s),
                col(DeliveryRow.detail),
                col(DeliveryRow.resumes_delivery_id),
                col(BroadcastRow.priority_class),
                col(BroadcastRow.sub_priority),
                col(BroadcastRow.mode),
                col(BroadcastRow.planned_play_s),
                col(OccurrenceRow.planned_at),
                col(ScheduleRow.id),
                col(ScheduleRow.name),
                # An accepted delivery is queued as its broadcast is created; only a resume has its own
                # time (CASE evaluates the subquery for those rows only, on both databases).
                case(
                    (col(DeliveryRow.resumes_delivery_id).is_(None), col(BroadcastRow.created_at)),
                    else_=first_event(DeliveryState.QUEUED),
                ),
                first_event(DeliveryState.PLAYING),
            )
            .join(BroadcastRow, col(BroadcastRow.id) == col(DeliveryRow.broadcast_id))
            .outerjoin(OccurrenceRow, col(OccurrenceRow.broadcast_id) == col(BroadcastRow.id))
            .outerjoin(ScheduleRow, col(ScheduleRow.id) == col(OccurrenceRow.schedule_id))
            .where(col(BroadcastRow.created_at) >= start, col(BroadcastRow.created_at) < end)
        )
        if scope.area_codes is not None:
            statement = statement.join(DeviceRow, col(DeviceRow.id) == col(DeliveryRow.device_id)).where(
                col(DeviceRow.area_code).in_(scope.area_codes)
            )
        entries: list[LogEntry] = []
        for row in connection.execute(statement):
            (
                delivery_id,
                broadcast_id,
                device_id,
                state,
                state_at,
                played_s,
                detail,
                resumes,
                priority,
                sub_priority,
                mode,
                planned_play_s,
                planned_at,
                schedule_id,
                schedule_name,
                queued_at,
                started_at,
            ) = row
            device = scope.devices.get(device_id)
            if device is None:  # registered after the scope was read
                continue
            terminal = DeliveryState(state).is_terminal
            if played_s is None:
                played_s = planned_play_s if state == DeliveryState.COMPLETED else 0.0
            entries.append(
                LogEntry(
                    delivery_id=delivery_id,
                    broadcast_id=broadcast_id,
                    schedule_id=schedule_id,
                    schedule_name=schedule_name,
                    device_id=device_id,
                    device_name=device.name,
                    area=device.area,
                    ward=device.ward,
                    priority=priority,
                    sub_priority=sub_priority,
                    mode=mode,
                    planned_at=planned_at,
                    queued_at=queued_at,
                    started_at=started_at,
                    ended_at=state_at if terminal else None,
                    state=state,
                    played_s=float(played_s),
                    requested_s=float(planned_play_s),
                    resumes_delivery_id=resumes,
                    detail=detail,
                )
            )
        return entries

    def _not_fired(self, session: Session, scope: _Scope, start: datetime, end: datetime) -> list[_NotFired]:
        """Occurrences planned in the window that became no broadcast, on the area's devices."""
        rows = session.exec(
            select_rows(OccurrenceRow, ScheduleRow)
            .join(ScheduleRow, col(ScheduleRow.id) == col(OccurrenceRow.schedule_id))
            .where(
                col(OccurrenceRow.outcome).in_(_OCCURRENCE_NOT_FIRED),
                col(OccurrenceRow.planned_at) >= start,
                col(OccurrenceRow.planned_at) < end,
            )
        ).all()
        if not rows:
            return []
        entries = load_device_entries(session)
        media_ids = {media_id for _, schedule in rows for media_id in schedule.media_ids}
        durations: dict[str, float] = dict(
            session.connection()
            .execute(
                select(col(MediaRow.id), col(MediaRow.duration_s)).where(col(MediaRow.id).in_(media_ids))
            )
            .tuples()
            .all()
        )
        reached: dict[str, tuple[list[str], float]] = {}
        result: list[_NotFired] = []
        for occurrence, schedule in rows:
            if schedule.id not in reached:
                reached[schedule.id] = (
                    [d for d in _schedule_devices(schedule, scope.tree, entries) if d in scope.devices],
                    expected_play_seconds(
                        [durations.get(media_id, 0.0) for media_id in schedule.media_ids],
                        schedule.repeats,
                        schedule.gap_s,
                        schedule.max_duration_s,
                    ),
                )
            device_ids, requested_s = reached[schedule.id]
            if device_ids:
                result.append(
                    _NotFired(
                        schedule,
                        occurrence.planned_at,
                        occurrence.outcome,
                        occurrence.detail,
                        device_ids,
                        requested_s,
                    )
                )
        return result


def _schedule_devices(schedule: ScheduleRow, tree: AreaTree, entries: Sequence[Any]) -> list[str]:
    targets = Targets(
        areas=tuple(schedule.targets.get("areas", ())), devices=tuple(schedule.targets.get("devices", ()))
    )
    try:
        return [device.id for device in resolve_targets(targets, tree, entries, kinds=AUDIO_DEVICE_KINDS)]
    except TargetError:
        return []  # its targets no longer exist: nothing left to say it would have reached


# -- rendering ---------------------------------------------------------------------------------------
def _utc_or_none(moment: datetime | None) -> str | None:
    return rfc3339(moment) if moment is not None else None


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _csv_bytes(header: Sequence[str], rows: Iterable[dict[str, Any]], text: frozenset[str]) -> bytes:
    """`text` names the free-text columns (names, details) that could smuggle a formula in."""
    buffer = io.StringIO()
    buffer.write(BOM)
    writer = csv.writer(buffer, lineterminator="\r\n")  # writes None as an empty cell
    writer.writerow(header)
    guarded = [name in text for name in header]
    writer.writerows(
        [_cell(row[name]) if guard else row[name] for name, guard in zip(header, guarded, strict=True)]
        for row in rows
    )
    return buffer.getvalue().encode("utf-8")


_COUNT_COLUMNS = (*TOTAL_FIELDS, "played_percent")
PLAYS_DEVICE_COLUMNS = ("device_id", "name", "area", "area_name", "ward", "ward_name", *_COUNT_COLUMNS)
PLAYS_WARD_COLUMNS = ("code", "name", "kind", "devices", *_COUNT_COLUMNS)
_TEXT_COLUMNS = frozenset({"name", "area_name", "ward_name", "device_name", "schedule_name", "detail"})


def plays_csv(report: PlaysReport, *, level: str) -> bytes:
    """One row per device (`level="device"`) or per ward (`level="ward"`)."""
    if level == "ward":
        return _csv_bytes(PLAYS_WARD_COLUMNS, (ward.as_dict() for ward in report.wards), _TEXT_COLUMNS)
    return _csv_bytes(PLAYS_DEVICE_COLUMNS, (device.as_dict() for device in report.devices), _TEXT_COLUMNS)


def log_csv(log: PlayLog, zone: tzinfo) -> bytes:
    rendered: dict[datetime, str] = {}  # a broadcast's deliveries share their queued and planned times

    def local(moment: datetime | None) -> str | None:
        if moment is None:
            return None
        text = rendered.get(moment)
        if text is None:
            text = rendered[moment] = moment.astimezone(zone).isoformat(timespec="seconds")
        return text

    return _csv_bytes(LOG_COLUMNS, (entry.values(local) for entry in log.entries), _TEXT_COLUMNS)
