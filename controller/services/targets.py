"""Reading the area tree and the devices a broadcast or schedule can reach, cheaply enough for each one.

Every broadcast, every fired occurrence and every conflict check needs the area tree and the devices
its targets can reach. Reading all 10,000 devices through the ORM for each took a third of a second
(docs/performance.md), so the tree is rebuilt only when the stored areas differ from the ones it was
built from, and only the devices in the targeted subtrees (or named) are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from sqlalchemy import select as select_columns
from sqlmodel import Session, col, select

from controller.domain.areas import Area, AreaTree
from controller.domain.planner import DeviceEntry, Targets
from controller.store.models import DeviceRow

_Key = TypeVar("_Key", str, int)

# Rows per `IN (...)` list: far below SQLite's and PostgreSQL's bound-parameter limits.
IN_CHUNK = 2000
_AREAS_SQL = "SELECT code, name, kind, parent_code, lat, lon, admin_code FROM areas"
_DEVICE_COLUMNS = (
    col(DeviceRow.id),
    col(DeviceRow.kind),
    col(DeviceRow.area_code),
    col(DeviceRow.address),
    col(DeviceRow.transport),
    col(DeviceRow.enabled),
)


def plain_rows(session: Session, sql: str) -> list[Any]:
    """Rows of a plain SQL query (valid on SQLite and PostgreSQL alike) on the session's connection,
    without SQLAlchemy's per-row processing: a third of the time for 10,000 rows."""
    cursor = session.connection().connection.cursor()
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def chunks(values: Iterable[_Key]) -> Iterator[list[_Key]]:
    ordered = sorted(values)
    for begin in range(0, len(ordered), IN_CHUNK):
        yield ordered[begin : begin + IN_CHUNK]


def load_area_tree(session: Session) -> AreaTree:
    return _tree_of(tuple(tuple(row) for row in plain_rows(session, _AREAS_SQL)))


def _tree_of(rows: tuple[tuple[Any, ...], ...]) -> AreaTree:
    return AreaTree(
        Area(code=c, name=n, kind=k, parent_code=p, lat=la, lon=lo, admin_code=a)
        for c, n, k, p, la, lo, a in rows
    )


class AreaTreeCache:
    """The area tree, rebuilt only when the stored areas differ from the ones it was built from (so it
    can never be stale, whoever changed the areas)."""

    def __init__(self) -> None:
        self._built: tuple[tuple[tuple[Any, ...], ...], AreaTree] | None = None

    def load(self, session: Session) -> AreaTree:
        key = tuple(tuple(row) for row in plain_rows(session, _AREAS_SQL))
        built = self._built
        if built is not None and built[0] == key:
            return built[1]
        tree = _tree_of(key)
        self._built = (key, tree)
        return tree


def load_device_entries(session: Session) -> list[DeviceEntry]:
    """Every registered device as the planner sees it."""
    return [DeviceEntry(*row) for row in session.execute(select_columns(*_DEVICE_COLUMNS))]


def reachable_devices(session: Session, tree: AreaTree, targets: Targets) -> list[DeviceEntry]:
    """A superset of the devices `targets` resolves to (controller.domain.planner.resolve_targets): those
    in the targeted subtrees and those named. Unknown areas and devices are left for the planner to name."""
    codes: set[str] = set()
    for code in targets.areas:
        if code in tree:
            codes |= tree.subtree_codes(code)
    if len(codes) + len(targets.devices) > IN_CHUNK:
        return load_device_entries(session)
    query = select_columns(*_DEVICE_COLUMNS).where(
        col(DeviceRow.area_code).in_(codes) | col(DeviceRow.id).in_(targets.devices)
    )
    return [DeviceEntry(*row) for row in session.execute(query)]


def device_kinds(session: Session, device_ids: Iterable[str]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for chunk in chunks(device_ids):
        query = select(DeviceRow.id, DeviceRow.kind).where(col(DeviceRow.id).in_(chunk))
        kinds.update(session.exec(query).all())
    return kinds
