"""Parsing area imports (YAML or CSV bytes) into validated `Area` values.

Pure: no I/O beyond the bytes handed in. Every problem in the input is collected and raised together
as one `AreaError`; nothing else escapes, whatever the bytes are.

Where issues point:
- CSV: `Issue.field` is the column name (`parent`, `lat`, ...) and `Issue.row` is the spreadsheet row
  number, counting every CSV record from 1 with the header as row 1, so the first data row is row 2 — the
  number a user sees when opening the file in a spreadsheet. Header problems are reported on row 1.
- YAML: `Issue.field` is a path such as `areas[2].children[0].code` and `Issue.row` is None.
- Problems with the input as a whole (encoding, syntax, size) name the field `file`.

YAML format: `areas:` holds a list of items `{code, name, kind, admin_code?, lat?, lon?, children?}`;
a child's parent is the item it is nested in. Items may instead (or also) name a `parent` explicitly,
which lets a flat list describe a tree or attach new areas under existing ones.

CSV format: UTF-8 (a byte-order mark is accepted), header `code,name,kind,parent,lat,lon,admin_code`.
`code`, `name` and `kind` columns are required; the others may be left out. Unknown columns are ignored;
empty cells mean "not given".
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal, get_args

import yaml

from controller.domain.areas import Area, AreaError, AreaTree, Issue, area_value_issues

ImportFormat = Literal["yaml", "csv"]

IMPORT_FORMATS: Final[tuple[str, ...]] = get_args(ImportFormat)
CSV_REQUIRED_COLUMNS: Final[tuple[str, ...]] = ("code", "name", "kind")
CSV_OPTIONAL_COLUMNS: Final[tuple[str, ...]] = ("parent", "lat", "lon", "admin_code")
YAML_ITEM_KEYS: Final[frozenset[str]] = frozenset(
    {"code", "name", "kind", "parent", "lat", "lon", "admin_code", "children"}
)
# Far above any real city (Hà Nội has ~10,000 residential groups) yet small enough that a hostile file
# cannot make the parser build millions of objects.
MAX_IMPORT_AREAS: Final[int] = 100_000
FILE_FIELD: Final[str] = "file"

_ProblemReporter = Callable[[str, str], None]

# Area attribute → the name the import formats use for it.
_SOURCE_FIELD_NAMES: Final[dict[str, str]] = {"parent_code": "parent"}


@dataclass(frozen=True, slots=True)
class ImportedArea:
    """A parsed area and where it came from, so that later (tree-level) issues can point back to it."""

    area: Area
    row: int | None
    path: str | None
    parent_implied: bool = False

    def locate(self, area_field: str) -> tuple[str, int | None]:
        """The import's field name (column or YAML path) and row for an `Area` attribute."""
        return _locate(area_field, row=self.row, path=self.path, parent_implied=self.parent_implied)


def _locate(
    area_field: str, *, row: int | None, path: str | None, parent_implied: bool
) -> tuple[str, int | None]:
    source_field = _SOURCE_FIELD_NAMES.get(area_field, area_field)
    if path is None:
        return source_field, row
    if area_field == "parent_code" and parent_implied:
        # The parent came from nesting, so the item itself is the thing to look at.
        return path, None
    return f"{path}.{source_field}", None


def parse_areas(data: bytes, fmt: ImportFormat) -> list[Area]:
    """Parse an import into areas, parents before their nested children; raises `AreaError` listing
    every problem found. Parent references to areas outside the file are left for `AreaTree` to check.
    """
    return [record.area for record in parse_area_records(data, fmt)]


def parse_area_records(data: bytes, fmt: ImportFormat) -> list[ImportedArea]:
    """Like `parse_areas`, keeping each area's row (CSV) or path (YAML)."""
    if fmt not in IMPORT_FORMATS:
        raise AreaError([Issue("format", f"must be one of {', '.join(IMPORT_FORMATS)}; got {fmt!r}")])
    text = _decode(data)
    records, issues = _parse_yaml(text) if fmt == "yaml" else _parse_csv(text)
    issues.extend(_duplicate_code_issues(records))
    if issues:
        raise AreaError(issues)
    return records


def import_areas(tree: AreaTree, data: bytes, fmt: ImportFormat, *, upsert: bool = False) -> AreaTree:
    """Parse an import and merge it into `tree` (see `AreaTree.with_areas` for the merge rules).

    Tree-level issues (missing parent, cycle, clash with an existing area) are pointed back at the
    import's row or path.
    """
    records = parse_area_records(data, fmt)
    try:
        return tree.with_areas((record.area for record in records), upsert=upsert)
    except AreaError as error:
        by_code = {record.area.code: record for record in records}
        located: list[Issue] = []
        for issue in error.issues:
            record = by_code.get(issue.code) if issue.code is not None else None
            if record is None:
                located.append(issue)
            else:
                field, row = record.locate(issue.field)
                located.append(Issue(field, issue.message, row, issue.code))
        raise AreaError(located) from error


def _decode(data: bytes) -> str:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AreaError([Issue(FILE_FIELD, f"must be bytes, got {type(data).__name__}")])
    try:
        # utf-8-sig drops a leading byte-order mark, which spreadsheet programs like to add.
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise AreaError(
            [Issue(FILE_FIELD, f"is not UTF-8 text (invalid byte at offset {error.start}); save it as UTF-8")]
        ) from error


# --- YAML -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PendingItem:
    item: object
    path: str
    implied_parent: str | None


def _parse_yaml(text: str) -> tuple[list[ImportedArea], list[Issue]]:
    try:
        document: object = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = error.problem or error.context or "syntax error"
        raise AreaError([Issue(FILE_FIELD, f"is not valid YAML: {reason}{where}")]) from error
    except yaml.YAMLError as error:
        raise AreaError([Issue(FILE_FIELD, f"is not valid YAML: {error}")]) from error
    except RecursionError as error:
        raise AreaError([Issue(FILE_FIELD, "is nested too deeply to be an area list")]) from error
    except (ValueError, OverflowError) as error:
        # PyYAML turns scalars such as 2024-13-45 into dates and lets the resulting ValueError escape.
        raise AreaError([Issue(FILE_FIELD, f"holds a value YAML cannot read: {error}")]) from error

    if not isinstance(document, dict):
        found = "an empty file" if document is None else f"a {_yaml_type(document)}"
        raise AreaError([Issue("areas", f"expected a mapping with an 'areas' list, found {found}")])
    issues = [
        Issue(str(key), "unknown top-level key; only 'areas' is allowed")
        for key in document
        if key != "areas"
    ]
    top_items = document.get("areas")
    if not isinstance(top_items, list):
        found = "nothing" if top_items is None else f"a {_yaml_type(top_items)}"
        raise AreaError([*issues, Issue("areas", f"must be a list of areas, found {found}")])

    records: list[ImportedArea] = []
    seen_items: set[int] = set()
    walked = 0
    pending = [_PendingItem(item, f"areas[{index}]", None) for index, item in enumerate(top_items)]
    pending.reverse()
    # Iterative pre-order walk: deep nesting cannot exhaust the call stack.
    while pending:
        current = pending.pop()
        if isinstance(current.item, dict) and id(current.item) in seen_items:
            # A YAML alias repeating an item would duplicate its whole subtree; walking it again could
            # also make a few kilobytes of anchors expand into billions of areas.
            issues.append(Issue(current.path, "repeats another item through a YAML alias; write it out"))
            continue
        if isinstance(current.item, dict):
            seen_items.add(id(current.item))
        # Counting items walked, not areas accepted, also bounds the work spent on a file of junk items.
        walked += 1
        if walked > MAX_IMPORT_AREAS:
            issues.append(Issue(FILE_FIELD, f"holds more than {MAX_IMPORT_AREAS} areas; split the import"))
            break
        record, children = _read_yaml_item(current, issues)
        if record is not None:
            records.append(record)
        child_parent = record.area.code if record is not None else _loose_code(current.item)
        pending.extend(
            _PendingItem(child, f"{current.path}.children[{index}]", child_parent)
            for index, child in reversed(list(enumerate(children)))
        )
    return records, issues


def _read_yaml_item(pending: _PendingItem, issues: list[Issue]) -> tuple[ImportedArea | None, list[object]]:
    path = pending.path
    item = pending.item
    if not isinstance(item, dict):
        issues.append(Issue(path, f"must be a mapping with code, name and kind, found a {_yaml_type(item)}"))
        return None, []
    item_issues: list[Issue] = []
    code_hint = _loose_code(item)

    def problem(key: str, message: str) -> None:
        item_issues.append(Issue(f"{path}.{key}", message, code=code_hint))

    for key in item:
        if key not in YAML_ITEM_KEYS:
            problem(str(key), f"unknown key; expected some of {', '.join(sorted(YAML_ITEM_KEYS))}")

    code = _yaml_text(item, "code", required=True, problem=problem)
    name = _yaml_text(item, "name", required=True, problem=problem)
    kind = _yaml_text(item, "kind", required=True, problem=problem)
    admin_code = _yaml_text(item, "admin_code", required=False, problem=problem)
    explicit_parent = _yaml_text(item, "parent", required=False, problem=problem)
    lat = _yaml_number(item, "lat", problem)
    lon = _yaml_number(item, "lon", problem)

    parent = explicit_parent
    if pending.implied_parent is not None:
        if explicit_parent is not None and explicit_parent != pending.implied_parent:
            problem(
                "parent",
                f"says {explicit_parent!r} but the item is nested under {pending.implied_parent!r}",
            )
        parent = pending.implied_parent

    children: list[object] = []
    raw_children = item.get("children")
    if isinstance(raw_children, list):
        children = raw_children
    elif raw_children is not None:
        problem("children", f"must be a list of areas, found a {_yaml_type(raw_children)}")

    if item_issues or code is None or name is None or kind is None:
        issues.extend(item_issues)
        issues.extend(
            _remaining_value_issues(
                item_issues,
                code,
                name,
                kind,
                parent,
                lat,
                lon,
                admin_code,
                row=None,
                path=path,
                parent_implied=pending.implied_parent is not None and explicit_parent is None,
            )
        )
        return None, children
    record = _build(
        code,
        name,
        kind,
        parent,
        lat,
        lon,
        admin_code,
        issues,
        row=None,
        path=path,
        parent_implied=pending.implied_parent is not None and explicit_parent is None,
    )
    return record, children


def _yaml_text(
    item: dict[object, object], key: str, *, required: bool, problem: _ProblemReporter
) -> str | None:
    value = item.get(key)
    if value is None or value == "":
        if required:
            problem(key, "is required")
        return None
    if isinstance(value, str):
        return value.strip() if key != "name" else value
    if isinstance(value, int | float) and not isinstance(value, bool) and key != "name":
        # YAML reads 01834 as a number (or worse, octal), silently losing the leading zero of a code.
        problem(key, f"must be quoted text so leading zeros survive, e.g. '{value}'")
        return None
    problem(key, f"must be text, found a {_yaml_type(value)}")
    return None


def _yaml_number(item: dict[object, object], key: str, problem: _ProblemReporter) -> float | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    problem(key, f"must be a number in decimal degrees, found a {_yaml_type(value)}")
    return None


def _loose_code(item: object) -> str | None:
    """The item's code if it has a usable one, for labelling issues and nesting children."""
    if isinstance(item, dict):
        code = item.get("code")
        if isinstance(code, str) and code.strip():
            return code.strip()
    return None


def _yaml_type(value: object) -> str:
    names = {dict: "mapping", list: "list", str: "text", bool: "true/false", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


# --- CSV --------------------------------------------------------------------------------------------


def _parse_csv(text: str) -> tuple[list[ImportedArea], list[Issue]]:
    rows = _csv_rows(text)
    header_row, header = next(((number, cells) for number, cells in rows if _has_content(cells)), (0, []))
    if not header:
        raise AreaError(
            [Issue(FILE_FIELD, "is empty; expected a header row code,name,kind,parent,lat,lon,admin_code")]
        )

    columns: dict[str, int] = {}
    issues: list[Issue] = []
    for index, raw_name in enumerate(header):
        column_name = raw_name.strip().lower()
        if column_name in columns and column_name in (*CSV_REQUIRED_COLUMNS, *CSV_OPTIONAL_COLUMNS):
            issues.append(Issue(column_name, "column appears more than once in the header", header_row))
        columns.setdefault(column_name, index)
    issues.extend(
        Issue(column_name, "required column is missing from the header", header_row)
        for column_name in CSV_REQUIRED_COLUMNS
        if column_name not in columns
    )
    if issues:
        raise AreaError(issues)

    records: list[ImportedArea] = []
    for row_number, cells in rows:
        if row_number <= header_row or not _has_content(cells):
            continue
        if len(records) >= MAX_IMPORT_AREAS:
            issues.append(Issue(FILE_FIELD, f"holds more than {MAX_IMPORT_AREAS} areas; split the import"))
            break
        record = _read_csv_row(row_number, cells, columns, len(header), issues)
        if record is not None:
            records.append(record)
    return records, issues


def _csv_rows(text: str) -> list[tuple[int, list[str]]]:
    """Records with their spreadsheet row numbers; a malformed record is an `AreaError` naming its row."""
    reader: Iterator[list[str]] = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return rows
        except csv.Error as error:
            raise AreaError([Issue(FILE_FIELD, f"is not valid CSV: {error}", len(rows) + 1)]) from error
        rows.append((len(rows) + 1, cells))
        if len(rows) > MAX_IMPORT_AREAS + 1:
            raise AreaError(
                [Issue(FILE_FIELD, f"holds more than {MAX_IMPORT_AREAS} areas; split the import")]
            )


def _has_content(cells: list[str]) -> bool:
    return any(cell.strip() for cell in cells)


def _read_csv_row(
    row: int, cells: list[str], columns: dict[str, int], header_width: int, issues: list[Issue]
) -> ImportedArea | None:
    def cell(column_name: str) -> str | None:
        index = columns.get(column_name)
        if index is None or index >= len(cells):
            return None
        return cells[index].strip() or None

    code_label = cell("code")
    row_issues = [
        Issue(column_name, "is required", row, code_label)
        for column_name in CSV_REQUIRED_COLUMNS
        if cell(column_name) is None
    ]
    overflow = next((index for index in range(header_width, len(cells)) if cells[index].strip()), None)
    if overflow is not None:
        row_issues.append(
            Issue(
                f"column {overflow + 1}",
                "has a value but no header; quote values that contain commas",
                row,
                code_label,
            )
        )
    lat = _csv_number(cell("lat"), "lat", row, code_label, row_issues)
    lon = _csv_number(cell("lon"), "lon", row, code_label, row_issues)
    code, name, kind = cell("code"), cell("name"), cell("kind")
    parent, admin_code = cell("parent"), cell("admin_code")
    if row_issues or code is None or name is None or kind is None:
        issues.extend(row_issues)
        issues.extend(
            _remaining_value_issues(
                row_issues,
                code,
                name,
                kind,
                parent,
                lat,
                lon,
                admin_code,
                row=row,
                path=None,
                parent_implied=False,
            )
        )
        return None
    return _build(code, name, kind, parent, lat, lon, admin_code, issues, row=row, path=None)


def _csv_number(
    raw: str | None, column_name: str, row: int, code: str | None, issues: list[Issue]
) -> float | None:
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        hint = "; use a dot as the decimal separator" if "," in raw else ""
        issues.append(
            Issue(column_name, f"must be a number in decimal degrees, got {raw!r}{hint}", row, code)
        )
        return None


# --- shared -----------------------------------------------------------------------------------------


def _build(
    code: str,
    name: str,
    kind: str,
    parent: str | None,
    lat: float | None,
    lon: float | None,
    admin_code: str | None,
    issues: list[Issue],
    *,
    row: int | None,
    path: str | None,
    parent_implied: bool = False,
) -> ImportedArea | None:
    try:
        area = Area(code, name, kind, parent, lat, lon, admin_code)
    except AreaError as error:
        for issue in error.issues:
            field, issue_row = _locate(issue.field, row=row, path=path, parent_implied=parent_implied)
            issues.append(Issue(field, issue.message, issue_row, code))
        return None
    return ImportedArea(area, row, path, parent_implied)


def _remaining_value_issues(
    reported: list[Issue],
    code: str | None,
    name: str | None,
    kind: str | None,
    parent: str | None,
    lat: float | None,
    lon: float | None,
    admin_code: str | None,
    *,
    row: int | None,
    path: str | None,
    parent_implied: bool,
) -> list[Issue]:
    """The value problems of an item that already failed to parse, minus those of fields already reported,
    so that one pass shows every mistake in the item rather than only its type errors.
    """
    already_reported = {issue.field for issue in reported}
    remaining: list[Issue] = []
    value_issues = area_value_issues(
        code=code, name=name, kind=kind, parent_code=parent, lat=lat, lon=lon, admin_code=admin_code
    )
    for issue in value_issues:
        field, issue_row = _locate(issue.field, row=row, path=path, parent_implied=parent_implied)
        if field not in already_reported:
            remaining.append(Issue(field, issue.message, issue_row, issue.code))
            already_reported.add(field)
    return remaining


def _duplicate_code_issues(records: list[ImportedArea]) -> list[Issue]:
    first_seen: dict[str, ImportedArea] = {}
    issues: list[Issue] = []
    for record in records:
        earlier = first_seen.setdefault(record.area.code, record)
        if earlier is record:
            continue
        where = f"row {earlier.row}" if earlier.path is None else f"{earlier.path}.code"
        field, row = record.locate("code")
        issues.append(
            Issue(field, f"duplicate code {record.area.code!r}; first used at {where}", row, record.area.code)
        )
    return issues
