"""The area tree: city > ward/commune > residential group, or whatever depth the data has.

Pure domain code: standard library only. Every rule violation is reported as an `Issue` naming the
field it concerns, collected into one `AreaError`, so that callers (the API, the importer, the CLI)
can show all problems at once instead of one per attempt.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Final

ALLOWED_KINDS: Final[frozenset[str]] = frozenset({"province", "city", "district", "ward", "commune", "group"})
CODE_PATTERN: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Official codes are digits (province "06", ward "01837") and local group codes are short tags, so the
# same shape as area codes fits both, just shorter.
ADMIN_CODE_PATTERN: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
MAX_NAME_LENGTH: Final[int] = 200
LATITUDE_LIMIT: Final[float] = 90.0
LONGITUDE_LIMIT: Final[float] = 180.0


@dataclass(frozen=True, slots=True)
class Issue:
    """One validation problem.

    field: the offending field: an `Area` attribute (`parent_code`), a CSV column (`parent`) or a YAML
        path (`areas[2].children[0].code`); `file` for problems with the input as a whole.
    message: a human-readable explanation.
    row: for CSV imports, the spreadsheet row (header = row 1); otherwise None.
    code: the area code the issue is about, when known.
    """

    field: str
    message: str
    row: int | None = None
    code: str | None = None

    def as_dict(self) -> dict[str, str | int | None]:
        return {"field": self.field, "message": self.message, "row": self.row, "code": self.code}


class AreaError(ValueError):
    """One or more area validation issues; `issues` is never empty."""

    error_name: str = "invalid_area"

    def __init__(self, issues: Sequence[Issue]) -> None:
        if not issues:
            raise ValueError("AreaError needs at least one issue")
        self.issues: tuple[Issue, ...] = tuple(issues)
        super().__init__(self._summary())

    def __reduce__(self) -> tuple[type[AreaError], tuple[tuple[Issue, ...]]]:
        # The default reduce would rebuild from the summary string; keep the issues across pickling.
        return (type(self), (self.issues,))

    @property
    def first(self) -> Issue:
        return self.issues[0]

    def as_response(self) -> dict[str, object]:
        """The API error body: `{error, field, detail, row, code, issues}` led by the first issue."""
        return {
            "error": self.error_name,
            "field": self.first.field,
            "detail": self.first.message,
            "row": self.first.row,
            "code": self.first.code,
            "issues": [issue.as_dict() for issue in self.issues],
        }

    def _summary(self) -> str:
        shown = "; ".join(_describe(issue) for issue in self.issues[:5])
        hidden = len(self.issues) - 5
        return f"{shown}; and {hidden} more" if hidden > 0 else shown


class UnknownAreaError(AreaError):
    """A query named an area code that the tree does not hold."""

    error_name = "unknown_area"

    def __init__(self, code: str, field: str = "code") -> None:
        super().__init__([Issue(field, f"no area with code {code!r}", code=code)])
        self.code = code
        self.field = field

    def __reduce__(self) -> tuple[type[UnknownAreaError], tuple[str, str]]:  # type: ignore[override]
        return (type(self), (self.code, self.field))


def _describe(issue: Issue) -> str:
    where = f"row {issue.row}, " if issue.row is not None else ""
    return f"{where}{issue.field}: {issue.message}"


def normalise_name(raw: str) -> str:
    """NFC plus trimming, so that 'Hóa' typed with a combining accent and a precomposed one match."""
    return unicodedata.normalize("NFC", raw).strip()


@dataclass(frozen=True, slots=True)
class Area:
    """One node of the area tree. Construction normalises the name and validates every field."""

    code: str
    name: str
    kind: str
    parent_code: str | None = None
    lat: float | None = None
    lon: float | None = None
    admin_code: str | None = None

    def __post_init__(self) -> None:
        raw_name: object = self.name
        if isinstance(raw_name, str):
            object.__setattr__(self, "name", normalise_name(raw_name))
        # An int latitude from YAML ("lat: 22") is a valid coordinate; store it as the float it means.
        for coordinate in ("lat", "lon"):
            value: object = getattr(self, coordinate)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, coordinate, float(value))
        issues = area_value_issues(
            code=self.code,
            name=self.name,
            kind=self.kind,
            parent_code=self.parent_code,
            lat=self.lat,
            lon=self.lon,
            admin_code=self.admin_code,
        )
        if issues:
            raise AreaError(issues)

    @property
    def has_position(self) -> bool:
        return self.lat is not None and self.lon is not None


AREA_FIELD_NAMES: Final[tuple[str, ...]] = tuple(field.name for field in fields(Area))


def area_value_issues(
    *,
    code: object,
    name: object,
    kind: object,
    parent_code: object = None,
    lat: object = None,
    lon: object = None,
    admin_code: object = None,
) -> list[Issue]:
    """Field-level problems of would-be area values, each naming its `Area` attribute.

    Takes `object`s because callers check untyped input (an import row) before building an `Area`.
    """
    if isinstance(name, str):
        name = normalise_name(name)
    code_label = code if isinstance(code, str) else None
    issues: list[Issue] = []

    def problem(field: str, message: str) -> None:
        issues.append(Issue(field, message, code=code_label))

    if not isinstance(code, str):
        problem("code", f"must be text, got {code!r}")
    elif not CODE_PATTERN.fullmatch(code):
        problem(
            "code", "must be 1-64 ASCII letters, digits, '_', '.' or '-', starting with a letter or digit"
        )

    if not isinstance(name, str):
        problem("name", f"must be text, got {name!r}")
    elif not name:
        problem("name", "must not be empty")
    elif len(name) > MAX_NAME_LENGTH:
        problem("name", f"must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    elif any(unicodedata.category(char) in {"Cc", "Cs"} for char in name):
        problem("name", "must not contain control characters or line breaks")

    if not isinstance(kind, str) or kind not in ALLOWED_KINDS:
        problem("kind", f"must be one of {', '.join(sorted(ALLOWED_KINDS))}; got {kind!r}")

    if parent_code is not None:
        if not isinstance(parent_code, str) or not CODE_PATTERN.fullmatch(parent_code):
            problem("parent_code", f"is not a valid area code: {parent_code!r}")
        elif parent_code == code:
            problem("parent_code", "an area cannot be its own parent")

    issues.extend(_coordinate_issues(lat, lon, code_label))

    if admin_code is not None and (
        not isinstance(admin_code, str) or not ADMIN_CODE_PATTERN.fullmatch(admin_code)
    ):
        problem("admin_code", f"must be 1-32 ASCII letters, digits, '_', '.' or '-'; got {admin_code!r}")
    return issues


def _coordinate_issues(lat: object, lon: object, code: str | None) -> list[Issue]:
    issues: list[Issue] = []
    for field, value, limit in (("lat", lat, LATITUDE_LIMIT), ("lon", lon, LONGITUDE_LIMIT)):
        if value is None:
            continue
        if not isinstance(value, float | int) or isinstance(value, bool):
            issues.append(Issue(field, f"must be a number, got {value!r}", code=code))
        # NaN compares false with everything, so a range check alone would let it through.
        elif not math.isfinite(value) or not -limit <= value <= limit:
            issues.append(Issue(field, f"must be between {-limit:g} and {limit:g}, got {value!r}", code=code))
    if lat is None and lon is not None:
        issues.append(Issue("lat", "is required when lon is given (both or neither)", code=code))
    elif lon is None and lat is not None:
        issues.append(Issue("lon", "is required when lat is given (both or neither)", code=code))
    return issues


class AreaTree:
    """A validated forest of areas (one or more roots). Immutable: `with_areas` returns a new tree.

    Children, descendants and roots keep the order in which the areas were given (an area updated by
    `with_areas(upsert=True)` keeps its original place).
    """

    __slots__ = ("_areas", "_children", "_roots")

    def __init__(self, areas: Iterable[Area] = ()) -> None:
        issues: list[Issue] = []
        by_code: dict[str, Area] = {}
        for area in areas:
            if area.code in by_code:
                issues.append(Issue("code", f"duplicate area code {area.code!r}", code=area.code))
            else:
                by_code[area.code] = area
        issues.extend(
            Issue("parent_code", f"parent area {area.parent_code!r} does not exist", code=area.code)
            for area in by_code.values()
            if area.parent_code is not None and area.parent_code not in by_code
        )
        issues.extend(_cycle_issues(by_code))
        if issues:
            raise AreaError(issues)

        self._areas: dict[str, Area] = by_code
        self._children: dict[str, list[str]] = {code: [] for code in by_code}
        self._roots: list[str] = []
        for area in by_code.values():
            if area.parent_code is None:
                self._roots.append(area.code)
            else:
                self._children[area.parent_code].append(area.code)

    def __len__(self) -> int:
        return len(self._areas)

    def __iter__(self) -> Iterator[Area]:
        return iter(self._areas.values())

    def __contains__(self, code: object) -> bool:
        return code in self._areas

    def __repr__(self) -> str:
        return f"AreaTree({len(self._areas)} areas, roots={self._roots!r})"

    def areas(self) -> list[Area]:
        return list(self._areas.values())

    def roots(self) -> tuple[Area, ...]:
        return tuple(self._areas[code] for code in self._roots)

    def find(self, code: str) -> Area | None:
        return self._areas.get(code)

    def get(self, code: str) -> Area:
        """The area with this code; raises `UnknownAreaError` if there is none."""
        try:
            return self._areas[code]
        except KeyError:
            raise UnknownAreaError(code) from None

    def children(self, code: str) -> tuple[Area, ...]:
        self.get(code)
        return tuple(self._areas[child] for child in self._children[code])

    def descendants(self, code: str, *, include_self: bool = True) -> tuple[Area, ...]:
        """Pre-order (parent before its children). Iterative, so depth is bounded only by memory."""
        start = self.get(code)
        found: list[Area] = [start] if include_self else []
        pending = list(reversed(self._children[code]))
        while pending:
            current = pending.pop()
            found.append(self._areas[current])
            pending.extend(reversed(self._children[current]))
        return tuple(found)

    def depth_first(self, roots: Iterable[str]) -> list[tuple[Area, int]]:
        """Each root's subtree in pre-order, with each area's depth below its root (the root: 0)."""
        found: list[tuple[Area, int]] = []
        for root in roots:
            pending = [(self.get(root).code, 0)]
            while pending:
                code, depth = pending.pop()
                found.append((self._areas[code], depth))
                pending.extend((child, depth + 1) for child in reversed(self._children[code]))
        return found

    def ancestors(self, code: str) -> tuple[Area, ...]:
        """Nearest first, ending at the root; the area itself is not included."""
        current = self.get(code)
        chain: list[Area] = []
        while current.parent_code is not None:
            current = self._areas[current.parent_code]
            chain.append(current)
        return tuple(chain)

    def is_within(self, code: str, ancestor_code: str) -> bool:
        """True when `code` is `ancestor_code` itself or lies below it: targeting a ward covers the ward."""
        self.get(ancestor_code)
        self.get(code)
        if code == ancestor_code:
            return True
        return any(area.code == ancestor_code for area in self.ancestors(code))

    def subtree_codes(self, code: str) -> frozenset[str]:
        """The codes of `code` and everything below it."""
        return frozenset(area.code for area in self.descendants(code))

    def with_areas(self, new_areas: Iterable[Area], *, upsert: bool = False) -> AreaTree:
        """A new tree holding these areas as well, validated as a whole.

        Re-importing an area identical to the stored one is a no-op, so that loading the same file twice
        is harmless. A differing area with an existing code is an error naming the code and the fields
        that differ, unless `upsert` is set: then it replaces the stored one (name, kind, coordinates,
        admin code, even parent), and the whole-tree validation still rejects a re-parenting that would
        make a cycle or point at a missing parent.
        """
        merged: dict[str, Area] = dict(self._areas)
        issues: list[Issue] = []
        seen_in_batch: set[str] = set()
        for area in new_areas:
            if area.code in seen_in_batch:
                issues.append(
                    Issue("code", f"duplicate area code {area.code!r} in the import", code=area.code)
                )
                continue
            seen_in_batch.add(area.code)
            existing = self._areas.get(area.code)
            if existing is not None and existing != area and not upsert:
                differing = ", ".join(_differing_fields(existing, area))
                issues.append(
                    Issue(
                        "code",
                        f"area {area.code!r} already exists with a different {differing}; "
                        "use upsert to update it",
                        code=area.code,
                    )
                )
                continue
            merged[area.code] = area
        try:
            merged_tree = AreaTree(merged.values())
        except AreaError as error:
            issues.extend(error.issues)
        if issues:
            raise AreaError(issues)
        return merged_tree


def _differing_fields(old: Area, new: Area) -> list[str]:
    return [name for name in AREA_FIELD_NAMES if getattr(old, name) != getattr(new, name)]


def _cycle_issues(by_code: Mapping[str, Area]) -> list[Issue]:
    """One issue per parent cycle, naming its members in parent order."""
    settled: set[str] = set()
    issues: list[Issue] = []
    for start in by_code:
        walk: list[str] = []
        walk_index: dict[str, int] = {}
        current: str | None = start
        while current is not None and current not in settled:
            if current in walk_index:
                cycle = walk[walk_index[current] :]
                path = " → ".join([*cycle, current])
                issues.append(Issue("parent_code", f"parent links form a cycle: {path}", code=current))
                break
            walk_index[current] = len(walk)
            walk.append(current)
            parent = by_code.get(current)
            current = parent.parent_code if parent is not None else None
            if current is not None and current not in by_code:
                # A dangling parent is reported separately; the walk ends at it like at a root.
                current = None
        # Every node walked is now settled (it reaches a root or an already reported cycle);
        # remembering them keeps the whole check linear in the number of areas.
        settled.update(walk)
    return issues
