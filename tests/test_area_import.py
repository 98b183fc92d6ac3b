import csv
import io
import unicodedata

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.domain import area_import
from controller.domain.area_import import (
    CSV_OPTIONAL_COLUMNS,
    CSV_REQUIRED_COLUMNS,
    import_areas,
    parse_area_records,
    parse_areas,
)
from controller.domain.areas import CODE_PATTERN, Area, AreaError, AreaTree, Issue

NESTED_YAML = """
areas:
  - code: bk
    name: Thành phố Bắc Kạn
    kind: city
    admin_code: "058"
    lat: 22.147
    lon: 105.834
    children:
      - code: bk.songcau
        name: Phường Sông Cầu
        kind: ward
        admin_code: "01837"
        children:
          - {code: bk.songcau.t01, name: Tổ dân phố 1, kind: group, lat: 22.1534, lon: 105.8321}
          - {code: bk.songcau.t02, name: Tổ dân phố 2, kind: group, parent: bk.songcau}
      - code: bk.nongthuong
        name: Xã Nông Thượng
        kind: commune
        children: []
  - {code: bk.nongthuong.napai, name: Thôn Nà Pài, kind: group, parent: bk.nongthuong, lat: 22, lon: 105}
"""

CSV_TEXT = (
    "code,name,kind,parent,lat,lon,admin_code\n"
    "bk,Thành phố Bắc Kạn,city,,22.147,105.834,058\n"
    "bk.songcau,Phường Sông Cầu,ward,bk,,,01837\n"
    "bk.songcau.t01,Tổ dân phố 1,group,bk.songcau,22.1534,105.8321,\n"
)


def yaml_issues(text: str) -> tuple[Issue, ...]:
    with pytest.raises(AreaError) as error:
        parse_areas(text.encode(), "yaml")
    return error.value.issues


def csv_issues(text: str | bytes) -> tuple[Issue, ...]:
    with pytest.raises(AreaError) as error:
        parse_areas(text if isinstance(text, bytes) else text.encode(), "csv")
    return error.value.issues


def parse_or_issues(data: bytes, fmt: str) -> list[Area] | list[Issue]:
    """Areas on success, issues on AreaError; any other exception propagates and fails the test."""
    try:
        return parse_areas(data, fmt)  # type: ignore[arg-type]
    except AreaError as error:
        issues = list(error.issues)
    assert issues
    return issues


def located(issues: tuple[Issue, ...]) -> list[tuple[str, int | None]]:
    return [(issue.field, issue.row) for issue in issues]


# --- YAML -------------------------------------------------------------------------------------------


def test_yaml_nested_tree_implies_parents_in_pre_order() -> None:
    areas = parse_areas(NESTED_YAML.encode(), "yaml")
    assert [(area.code, area.parent_code) for area in areas] == [
        ("bk", None),
        ("bk.songcau", "bk"),
        ("bk.songcau.t01", "bk.songcau"),
        ("bk.songcau.t02", "bk.songcau"),
        ("bk.nongthuong", "bk"),
        ("bk.nongthuong.napai", "bk.nongthuong"),
    ]
    city = areas[0]
    assert city == Area("bk", "Thành phố Bắc Kạn", "city", None, 22.147, 105.834, "058")
    assert areas[-1].lat == 22.0
    assert len(AreaTree(areas)) == len(areas)


def test_yaml_names_are_nfc_normalised() -> None:
    decomposed = unicodedata.normalize("NFD", "Phường Xuất Hóa")
    areas = parse_areas(f"areas: [{{code: x, name: '{decomposed}', kind: ward}}]".encode(), "yaml")
    assert areas[0].name == "Phường Xuất Hóa"


def test_yaml_byte_order_mark_is_accepted() -> None:
    assert len(parse_areas(b"\xef\xbb\xbf" + NESTED_YAML.encode(), "yaml")) == 6


def test_yaml_records_keep_their_paths() -> None:
    records = parse_area_records(NESTED_YAML.encode(), "yaml")
    assert [record.path for record in records] == [
        "areas[0]",
        "areas[0].children[0]",
        "areas[0].children[0].children[0]",
        "areas[0].children[0].children[1]",
        "areas[0].children[1]",
        "areas[1]",
    ]
    assert all(record.row is None for record in records)


def test_yaml_empty_area_list_is_fine() -> None:
    assert parse_areas(b"areas: []", "yaml") == []


def test_yaml_issues_name_the_path_of_every_problem() -> None:
    text = """
areas:
  - code: bk
    name: Bắc Kạn
    kind: city
    children:
      - {name: Không mã, kind: ward}
      - {code: bk.a, name: A, kind: hamlet, lng: 105.8}
      - {code: bk.b, name: B, kind: ward, admin_code: 1837, lat: north, lon: 105.8}
      - {code: bk.c, name: C, kind: ward, parent: elsewhere}
      - {code: bk.d, name: D, kind: ward, children: {code: x}}
      - just text
  - {code: q, name: Q, kind: ward, lat: 22.1}
"""
    assert [issue.field for issue in yaml_issues(text)] == [
        "areas[0].children[0].code",
        "areas[0].children[1].lng",
        "areas[0].children[1].kind",
        "areas[0].children[2].admin_code",
        "areas[0].children[2].lat",
        "areas[0].children[3].parent",
        "areas[0].children[4].children",
        "areas[0].children[5]",
        "areas[1].lon",
    ]


def test_yaml_numeric_codes_must_be_quoted() -> None:
    (issue,) = yaml_issues("areas: [{code: bk, name: B, kind: ward, admin_code: 1837}]")
    assert issue.field == "areas[0].admin_code"
    assert "quoted" in issue.message
    assert issue.code == "bk"


def test_yaml_duplicate_codes_point_at_the_first_use() -> None:
    text = (
        "areas: [{code: a, name: A, kind: ward, children: [{code: b, name: B, kind: group}]},"
        " {code: b, name: C, kind: ward}]"
    )
    (issue,) = yaml_issues(text)
    assert issue.field == "areas[1].code"
    assert issue.message == "duplicate code 'b'; first used at areas[0].children[0].code"


def test_yaml_aliases_repeating_items_are_rejected() -> None:
    issues = yaml_issues("areas:\n - &ward {code: a, name: A, kind: ward}\n - *ward\n")
    assert [issue.field for issue in issues] == ["areas[1]"]


def test_yaml_alias_bombs_stay_cheap() -> None:
    # Each level names the previous one twice: walked naively, level 29 alone would hold 2**29 items.
    lines = ["areas:", "  - &l0 {code: a, name: A, kind: ward}"]
    lines += [
        f"  - &l{level} {{code: a{level}, name: A, kind: ward, children: [*l{level - 1}, *l{level - 1}]}}"
        for level in range(1, 30)
    ]
    issues = yaml_issues("\n".join(lines))
    assert all("alias" in issue.message for issue in issues)
    assert len(issues) < 100


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("", "areas", "empty"),
        ("- {code: a}", "areas", "found a list"),
        ("just text", "areas", "found a text"),
        ("areas: 5", "areas", "found a number"),
        ("areas: {code: a}", "areas", "found a mapping"),
        ("area: []", "areas", "found nothing"),
        ("areas: [\n  {code: a", "file", "line"),
        ("areas: [{code: a, name: A, kind: ward}]\nday: 2024-13-45", "file", "month"),
        ("areas: !!python/object:os.system {}", "file", "not valid YAML"),
        ("areas: [{code: a, name: A, kind: ward, lat: !!float nope}]", "file", "cannot read"),
    ],
)
def test_yaml_garbage_is_an_area_error_naming_the_field(text: str, field: str, fragment: str) -> None:
    issues = yaml_issues(text)
    assert issues[-1].field == field
    assert fragment in issues[-1].message


def test_yaml_unknown_top_level_keys_are_named() -> None:
    issues = yaml_issues("areas: []\nversion: 2")
    assert located(issues) == [("version", None)]


def test_yaml_deep_nesting_is_an_area_error() -> None:
    text = "areas: " + "[" * 5000 + "]" * 5000
    issues = yaml_issues(text)
    assert issues[0].field in {"file", "areas[0]"}


def test_yaml_deep_area_nesting_does_not_recurse() -> None:
    depth = 100
    text = "areas:\n"
    for level in range(depth):
        indent = "  " * (2 * level)
        text += f"{indent}- code: n{level}\n{indent}  name: Tầng {level}\n"
        text += f"{indent}  kind: group\n{indent}  children:\n"
    areas = parse_areas(text.encode(), "yaml")
    assert len(AreaTree(areas).ancestors(f"n{depth - 1}")) == depth - 1


# --- CSV --------------------------------------------------------------------------------------------


def test_csv_happy_path() -> None:
    areas = parse_areas(CSV_TEXT.encode(), "csv")
    assert areas == [
        Area("bk", "Thành phố Bắc Kạn", "city", None, 22.147, 105.834, "058"),
        Area("bk.songcau", "Phường Sông Cầu", "ward", "bk", None, None, "01837"),
        Area("bk.songcau.t01", "Tổ dân phố 1", "group", "bk.songcau", 22.1534, 105.8321, None),
    ]


def test_csv_with_bom_crlf_reordered_and_extra_columns() -> None:
    text = (
        " Name ,CODE,notes,kind\r\n"
        '"Tổ dân phố 1, khu A",bk.t01,"ghi chú, bất kỳ",group\r\n'
        "\r\n"
        "Tổ dân phố 2,bk.t02,,group,\r\n"
    )
    records = parse_area_records(b"\xef\xbb\xbf" + text.encode(), "csv")
    assert [(record.area.code, record.area.name, record.row) for record in records] == [
        ("bk.t01", "Tổ dân phố 1, khu A", 2),
        ("bk.t02", "Tổ dân phố 2", 4),
    ]


def test_csv_header_only_is_an_empty_import() -> None:
    assert parse_areas(b"code,name,kind\n", "csv") == []


def test_csv_rows_count_from_the_header_as_row_one() -> None:
    text = "\n\ncode,name,kind\nok,OK,ward\n\nbad code,X,ward\n"
    assert located(csv_issues(text)) == [("code", 6)]


@pytest.mark.parametrize("missing", CSV_REQUIRED_COLUMNS)
def test_csv_missing_required_column_is_named(missing: str) -> None:
    header = ",".join(
        column for column in (*CSV_REQUIRED_COLUMNS, *CSV_OPTIONAL_COLUMNS) if column != missing
    )
    (issue,) = csv_issues(header + "\nx,y,z\n")
    assert (issue.field, issue.row) == (missing, 1)
    assert "missing" in issue.message


def test_csv_duplicate_column_is_named() -> None:
    assert located(csv_issues("code,name,kind,lat,lat\n")) == [("lat", 1)]


def test_csv_every_row_problem_is_reported_with_its_row_and_column() -> None:
    text = (
        "code,name,kind,parent,lat,lon,admin_code\n"
        "bk,Bắc Kạn,city,,,,\n"  # row 2: fine
        ",Không mã,ward,bk,,,\n"  # row 3: no code
        "bk.a,,hamlet,bk,,,\n"  # row 4: no name, bad kind
        'bk.b,B,ward,bk,"22,15",105.8,\n'  # row 5: decimal comma
        "bk.c,C,ward,bk,22.1,,\n"  # row 6: lat without lon
        "bk.d,D,ward,bk,nan,105.8,\n"  # row 7: not finite
        "bk.e,E,ward,bk bk,,,01 837\n"  # row 8: bad parent and admin code
        "bk.f,F, khu A,ward,bk\n"  # row 9: unquoted comma shifts the cells
        "bk,Bắc Kạn lần 2,city,,,,\n"  # row 10: duplicate
    )
    issues = csv_issues(text)
    assert located(issues) == [
        ("code", 3),
        ("name", 4),
        ("kind", 4),
        ("lat", 5),
        ("lon", 6),
        ("lat", 7),
        ("parent", 8),
        ("admin_code", 8),
        ("lat", 9),
        ("kind", 9),
        ("code", 10),
    ]
    by_location = {(issue.field, issue.row): issue for issue in issues}
    assert "dot as the decimal separator" in by_location[("lat", 5)].message
    assert "both or neither" in by_location[("lon", 6)].message
    assert by_location[("code", 10)].message == "duplicate code 'bk'; first used at row 2"
    assert all(issue.code == "bk.e" for issue in issues if issue.row == 8)


def test_csv_values_beyond_the_header_are_reported() -> None:
    issues = csv_issues("code,name,kind\nbk.f,Tổ 1, khu A,group\n")
    assert located(issues) == [("column 4", 2), ("kind", 2)]
    assert "quote values that contain commas" in issues[0].message


def test_csv_trailing_empty_cells_are_harmless() -> None:
    assert parse_areas(b"code,name,kind\nbk,B,city,,,\n", "csv")[0].code == "bk"


def test_csv_short_rows_leave_optional_columns_empty() -> None:
    (area,) = parse_areas(b"code,name,kind,parent,lat,lon\nbk,B,city\n", "csv")
    assert (area.parent_code, area.lat) == (None, None)


@pytest.mark.parametrize(
    ("data", "field", "row", "fragment"),
    [
        (b"", "file", None, "empty"),
        (b"\n \n", "file", None, "empty"),
        (b"code,name,kind\n\xff\xfe,x,y\n", "file", None, "UTF-8"),
        (b'code,name,kind\na,"B"x,ward\n', "file", 2, "CSV"),
    ],
)
def test_csv_garbage_is_an_area_error_naming_the_field(
    data: bytes, field: str, row: int | None, fragment: str
) -> None:
    (issue,) = csv_issues(data)
    assert (issue.field, issue.row) == (field, row)
    assert fragment in issue.message


def test_csv_control_characters_in_names_are_rejected() -> None:
    assert located(csv_issues("code,name,kind\na,B\x00C,ward\n")) == [("name", 2)]


# --- shared -----------------------------------------------------------------------------------------


def test_unknown_format_is_named() -> None:
    with pytest.raises(AreaError) as error:
        parse_areas(b"", "json")  # type: ignore[arg-type]
    assert error.value.issues[0].field == "format"


def test_non_bytes_input_is_named() -> None:
    with pytest.raises(AreaError) as error:
        parse_areas("areas: []", "yaml")  # type: ignore[arg-type]
    assert error.value.issues[0].field == "file"


def test_imports_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(area_import, "MAX_IMPORT_AREAS", 3)
    many_csv = "code,name,kind\n" + "".join(f"a{index},A,ward\n" for index in range(10))
    assert "more than 3" in csv_issues(many_csv)[-1].message
    many_yaml = "areas:\n" + "".join(f"  - {{code: a{index}, name: A, kind: ward}}\n" for index in range(10))
    assert "more than 3" in yaml_issues(many_yaml)[-1].message


# --- import into a tree -----------------------------------------------------------------------------


def base_tree() -> AreaTree:
    return AreaTree(parse_areas(CSV_TEXT.encode(), "csv"))


def test_import_areas_merges_under_existing_areas() -> None:
    tree = import_areas(
        base_tree(), "code,name,kind,parent\nbk.songcau.t02,Tổ dân phố 2,group,bk.songcau\n".encode(), "csv"
    )
    assert [area.code for area in tree.children("bk.songcau")] == ["bk.songcau.t01", "bk.songcau.t02"]


def test_import_areas_points_tree_issues_at_csv_rows_and_columns() -> None:
    text = "code,name,kind,parent\nbk.new,Mới,ward,bk\nbk,Tên khác,city,\nbk.x,X,ward,ghost\n"
    with pytest.raises(AreaError) as error:
        import_areas(base_tree(), text.encode(), "csv")
    assert located(error.value.issues) == [("code", 3), ("parent", 4)]


def test_import_areas_points_tree_issues_at_yaml_paths() -> None:
    text = "areas:\n  - {code: bk.x, name: X, kind: ward, parent: ghost}\n"
    with pytest.raises(AreaError) as error:
        import_areas(base_tree(), text.encode(), "yaml")
    assert located(error.value.issues) == [("areas[0].parent", None)]


def test_import_areas_upsert_cycle_through_nesting_points_at_the_item() -> None:
    text = """
areas:
  - code: bk.songcau.t01
    name: Tổ dân phố 1
    kind: group
    parent: bk.songcau
    children:
      - {code: bk, name: Thành phố Bắc Kạn, kind: city}
"""
    with pytest.raises(AreaError) as error:
        import_areas(base_tree(), text.encode(), "yaml", upsert=True)
    (issue,) = error.value.issues
    assert issue.field == "areas[0].children[0]"
    assert "cycle" in issue.message


def test_import_areas_upsert_may_move_a_subtree_to_the_top() -> None:
    text = "areas:\n  - {code: bk.songcau, name: Phường Sông Cầu, kind: ward, admin_code: '01837'}\n"
    tree = import_areas(base_tree(), text.encode(), "yaml", upsert=True)
    assert [root.code for root in tree.roots()] == ["bk", "bk.songcau"]


def test_import_areas_upsert_updates() -> None:
    text = "code,name,kind,parent,lat,lon\nbk.songcau,Phường Sông Cầu,ward,bk,22.15,105.831\n"
    tree = import_areas(base_tree(), text.encode(), "csv", upsert=True)
    assert tree.get("bk.songcau").lat == 22.15


# --- properties -------------------------------------------------------------------------------------

VIETNAMESE_LETTERS = (
    "aăâbcdđeêghiklmnoôơpqrstuưvxyàáảãạằắẳẵặầấẩẫậèéẻẽẹềếểễệìíỉĩịòóỏõọồốổỗộờớởỡợùúủũụừứửữựỳýỷỹỵ"
)
name_text = st.text(
    alphabet=VIETNAMESE_LETTERS + VIETNAMESE_LETTERS.upper() + " ,'\"-–0123456789", min_size=1, max_size=40
).filter(lambda text: text.strip() != "")
area_codes = st.from_regex(CODE_PATTERN, fullmatch=True)
coordinates = st.one_of(
    st.none(),
    st.tuples(
        st.floats(min_value=-90, max_value=90, allow_nan=False),
        st.floats(min_value=-180, max_value=180, allow_nan=False),
    ),
)


@st.composite
def importable_forests(draw: st.DrawFn) -> list[Area]:
    codes = draw(st.lists(area_codes, min_size=1, max_size=12, unique=True))
    areas: list[Area] = []
    for index, code in enumerate(codes):
        parent = draw(st.one_of(st.none(), st.sampled_from(codes[:index]))) if index else None
        position = draw(coordinates)
        admin_code = draw(st.one_of(st.none(), st.from_regex(r"\A[0-9]{2,5}\Z")))
        kind = draw(st.sampled_from(["province", "city", "district", "ward", "commune", "group"]))
        lat, lon = position if position is not None else (None, None)
        areas.append(Area(code, draw(name_text), kind, parent, lat, lon, admin_code))
    return areas


def as_csv(areas: list[Area]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["code", "name", "kind", "parent", "lat", "lon", "admin_code"])
    for area in areas:
        writer.writerow(
            [
                area.code,
                area.name,
                area.kind,
                area.parent_code or "",
                "" if area.lat is None else repr(area.lat),
                "" if area.lon is None else repr(area.lon),
                area.admin_code or "",
            ]
        )
    return buffer.getvalue().encode()


def as_flat_yaml(areas: list[Area]) -> bytes:
    items = []
    for area in areas:
        item: dict[str, object] = {"code": area.code, "name": area.name, "kind": area.kind}
        optional = {
            "parent": area.parent_code,
            "lat": area.lat,
            "lon": area.lon,
            "admin_code": area.admin_code,
        }
        item.update({key: value for key, value in optional.items() if value is not None})
        items.append(item)
    return yaml.safe_dump({"areas": items}, allow_unicode=True).encode()


def as_nested_yaml(areas: list[Area]) -> bytes:
    tree = AreaTree(areas)

    def nest(area: Area) -> dict[str, object]:
        item: dict[str, object] = {"code": area.code, "name": area.name, "kind": area.kind}
        optional = {"lat": area.lat, "lon": area.lon, "admin_code": area.admin_code}
        item.update({key: value for key, value in optional.items() if value is not None})
        item["children"] = [nest(child) for child in tree.children(area.code)]
        return item

    return yaml.safe_dump({"areas": [nest(root) for root in tree.roots()]}, allow_unicode=True).encode()


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(importable_forests())
def test_csv_round_trip(areas: list[Area]) -> None:
    assert parse_areas(as_csv(areas), "csv") == areas


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(importable_forests())
def test_flat_yaml_round_trip(areas: list[Area]) -> None:
    assert parse_areas(as_flat_yaml(areas), "yaml") == areas


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(importable_forests())
def test_nested_yaml_round_trip(areas: list[Area]) -> None:
    parsed = parse_areas(as_nested_yaml(areas), "yaml")
    assert sorted(parsed, key=lambda area: area.code) == sorted(areas, key=lambda area: area.code)


@settings(deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["yaml", "csv"]))
def test_arbitrary_bytes_never_escape_as_other_errors(data: bytes, fmt: str) -> None:
    outcome = parse_or_issues(data, fmt)
    assert all(isinstance(item, Area | Issue) for item in outcome)


yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["ward", "bk", "01837"]),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(
                ["code", "name", "kind", "parent", "lat", "lon", "admin_code", "children", "areas", "x"]
            ),
            children,
            max_size=6,
        ),
    ),
    max_leaves=25,
)


@settings(deadline=None)
@given(yaml_values)
def test_arbitrary_yaml_structures_never_escape_as_other_errors(document: object) -> None:
    data = yaml.safe_dump(document, allow_unicode=True).encode()
    outcome = parse_or_issues(data, "yaml")
    issues = [item for item in outcome if isinstance(item, Issue)]
    assert all(issue.field and issue.message for issue in issues)
