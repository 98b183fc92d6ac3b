import copy
import math
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.areas import (
    ALLOWED_KINDS,
    MAX_NAME_LENGTH,
    Area,
    AreaError,
    AreaTree,
    Issue,
    UnknownAreaError,
    area_value_issues,
)


def city_tree() -> AreaTree:
    return AreaTree(
        [
            Area("bk", "Thành phố Bắc Kạn", "city", admin_code="058"),
            Area("bk.songcau", "Phường Sông Cầu", "ward", "bk", 22.15, 105.831, "01837"),
            Area("bk.songcau.t01", "Tổ dân phố 1", "group", "bk.songcau", 22.15, 105.835),
            Area("bk.songcau.t02", "Tổ dân phố 2", "group", "bk.songcau"),
            Area("bk.ducxuan", "Phường Đức Xuân", "ward", "bk", admin_code="01840"),
            Area("bk.ducxuan.t01", "Tổ dân phố 1", "group", "bk.ducxuan"),
            Area("tq", "Thành phố Tuyên Quang", "city"),
        ]
    )


def codes(areas: tuple[Area, ...] | list[Area]) -> list[str]:
    return [area.code for area in areas]


def only_issue(error: pytest.ExceptionInfo[AreaError]) -> Issue:
    assert len(error.value.issues) == 1, error.value.issues
    return error.value.issues[0]


# --- Area -------------------------------------------------------------------------------------------


def test_area_name_is_nfc_normalised_and_trimmed() -> None:
    decomposed = unicodedata.normalize("NFD", "  Phường Xuất Hóa \t")
    area = Area("bk.xuathoa", decomposed, "ward")
    assert area.name == "Phường Xuất Hóa"
    assert unicodedata.is_normalized("NFC", area.name)


def test_area_integer_coordinates_become_floats() -> None:
    area = Area("x", "X", "ward", lat=22, lon=105)
    assert area.lat == 22.0
    assert isinstance(area.lat, float)
    assert area.has_position


def test_area_accepts_every_allowed_kind() -> None:
    for kind in ALLOWED_KINDS:
        assert Area("x", "X", kind).kind == kind


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"code": ""}, "code"),
        ({"code": "bk songcau"}, "code"),
        ({"code": ".hidden"}, "code"),
        ({"code": "sôngcầu"}, "code"),
        ({"code": "a" * 65}, "code"),
        ({"code": 17}, "code"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * (MAX_NAME_LENGTH + 1)}, "name"),
        ({"name": "Tổ 1\nTổ 2"}, "name"),
        ({"name": None}, "name"),
        ({"kind": "village"}, "kind"),
        ({"kind": "Ward"}, "kind"),
        ({"parent_code": "has space"}, "parent_code"),
        ({"parent_code": "x"}, "parent_code"),
        ({"lat": 90.5, "lon": 105.0}, "lat"),
        ({"lat": 22.0, "lon": -180.5}, "lon"),
        ({"lat": math.nan, "lon": 105.0}, "lat"),
        ({"lat": 22.0, "lon": math.inf}, "lon"),
        ({"lat": True, "lon": 105.0}, "lat"),
        ({"lat": "22.1", "lon": 105.0}, "lat"),
        ({"lat": 22.0}, "lon"),
        ({"lon": 105.0}, "lat"),
        ({"admin_code": ""}, "admin_code"),
        ({"admin_code": "01 837"}, "admin_code"),
        ({"admin_code": 1837}, "admin_code"),
    ],
)
def test_each_invalid_field_is_named(changes: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"code": "x", "name": "Tổ dân phố 1", "kind": "group", **changes}
    with pytest.raises(AreaError) as error:
        Area(**values)  # type: ignore[arg-type]
    issue = only_issue(error)
    assert issue.field == field
    assert issue.message
    assert issue.row is None


def test_name_at_the_length_limit_is_accepted() -> None:
    assert len(Area("x", "ư" * MAX_NAME_LENGTH, "group").name) == MAX_NAME_LENGTH


def test_all_field_issues_are_reported_together() -> None:
    with pytest.raises(AreaError) as error:
        Area("bad code", "", "hamlet", lat=100.0, lon=0.0, admin_code="?")
    assert [issue.field for issue in error.value.issues] == ["code", "name", "kind", "lat", "admin_code"]
    assert str(error.value).startswith("code: ")


def test_area_value_issues_checks_untyped_values_without_raising() -> None:
    issues = area_value_issues(code="ok", name="Tên", kind="ward", lat=1.0)
    assert issues == [Issue("lon", "is required when lat is given (both or neither)", code="ok")]
    assert area_value_issues(code="ok", name="Tên", kind="ward") == []


def test_area_error_needs_an_issue() -> None:
    with pytest.raises(ValueError, match="at least one issue"):
        AreaError([])


def test_area_error_response_names_field_row_and_code() -> None:
    error = AreaError(
        [Issue("lat", "must be between -90 and 90", 4, "bk.x"), Issue("name", "must not be empty")]
    )
    response = error.as_response()
    assert response["error"] == "invalid_area"
    assert response["field"] == "lat"
    assert response["detail"] == "must be between -90 and 90"
    assert response["row"] == 4
    assert response["code"] == "bk.x"
    assert response["issues"] == [
        {"field": "lat", "message": "must be between -90 and 90", "row": 4, "code": "bk.x"},
        {"field": "name", "message": "must not be empty", "row": None, "code": None},
    ]
    assert "row 4, lat: must be between" in str(error)


def test_area_errors_survive_copying_and_pickling() -> None:
    error = AreaError([Issue("lat", "too far north", 3, "bk.x")])
    assert copy.deepcopy(error).issues == error.issues
    unknown = copy.deepcopy(UnknownAreaError("ghost", "parent_code"))
    assert (unknown.code, unknown.first.field) == ("ghost", "parent_code")


def test_area_error_message_is_shortened_for_many_issues() -> None:
    error = AreaError([Issue("name", f"problem {index}", index) for index in range(8)])
    assert str(error).endswith("and 3 more")


# --- tree queries -----------------------------------------------------------------------------------


def test_tree_basics() -> None:
    tree = city_tree()
    assert len(tree) == 7
    assert "bk.songcau" in tree
    assert "nowhere" not in tree
    assert codes(tree.roots()) == ["bk", "tq"]
    assert codes(list(tree)) == codes(tree.areas())
    assert tree.get("bk.songcau").admin_code == "01837"
    assert tree.find("nowhere") is None
    assert "7 areas" in repr(tree)


def test_children_keep_input_order() -> None:
    tree = city_tree()
    assert codes(tree.children("bk")) == ["bk.songcau", "bk.ducxuan"]
    assert codes(tree.children("bk.songcau")) == ["bk.songcau.t01", "bk.songcau.t02"]
    assert tree.children("bk.songcau.t01") == ()


def test_depth_first_walks_each_root_s_subtree_with_depths() -> None:
    tree = city_tree()
    walked = [(area.code, depth) for area, depth in tree.depth_first(["bk.ducxuan", "bk.songcau"])]
    assert walked == [
        ("bk.ducxuan", 0),
        ("bk.ducxuan.t01", 1),
        ("bk.songcau", 0),
        ("bk.songcau.t01", 1),
        ("bk.songcau.t02", 1),
    ]
    whole = tree.depth_first(area.code for area in tree.roots())
    assert [area.code for area, _ in whole][:3] == ["bk", "bk.songcau", "bk.songcau.t01"]
    assert {area.code: depth for area, depth in whole}["bk.ducxuan.t01"] == 2


def test_descendants_are_pre_order() -> None:
    tree = city_tree()
    assert codes(tree.descendants("bk")) == [
        "bk",
        "bk.songcau",
        "bk.songcau.t01",
        "bk.songcau.t02",
        "bk.ducxuan",
        "bk.ducxuan.t01",
    ]
    assert codes(tree.descendants("bk.songcau", include_self=False)) == ["bk.songcau.t01", "bk.songcau.t02"]
    assert codes(tree.descendants("tq")) == ["tq"]


def test_ancestors_are_nearest_first() -> None:
    tree = city_tree()
    assert codes(tree.ancestors("bk.songcau.t02")) == ["bk.songcau", "bk"]
    assert tree.ancestors("bk") == ()


def test_is_within_is_reflexive_and_follows_the_parent_chain() -> None:
    tree = city_tree()
    assert tree.is_within("bk.songcau.t01", "bk")
    assert tree.is_within("bk.songcau.t01", "bk.songcau")
    assert tree.is_within("bk.songcau", "bk.songcau")
    assert not tree.is_within("bk.songcau.t01", "bk.ducxuan")
    assert not tree.is_within("bk", "bk.songcau")
    assert not tree.is_within("bk.songcau", "tq")


def test_subtree_codes() -> None:
    tree = city_tree()
    assert tree.subtree_codes("bk.songcau") == {"bk.songcau", "bk.songcau.t01", "bk.songcau.t02"}
    assert tree.subtree_codes("bk.ducxuan.t01") == {"bk.ducxuan.t01"}


@pytest.mark.parametrize(
    "query",
    [
        lambda tree: tree.get("nowhere"),
        lambda tree: tree.children("nowhere"),
        lambda tree: tree.descendants("nowhere"),
        lambda tree: tree.ancestors("nowhere"),
        lambda tree: tree.subtree_codes("nowhere"),
        lambda tree: tree.is_within("nowhere", "bk"),
        lambda tree: tree.is_within("bk", "nowhere"),
    ],
)
def test_unknown_codes_raise_unknown_area_error(query: object) -> None:
    tree = city_tree()
    with pytest.raises(UnknownAreaError) as error:
        query(tree)  # type: ignore[operator]
    assert error.value.code == "nowhere"
    assert error.value.as_response()["error"] == "unknown_area"
    assert only_issue(error).field == "code"


def test_empty_tree() -> None:
    tree = AreaTree()
    assert len(tree) == 0
    assert tree.roots() == ()


def test_deep_chains_do_not_recurse() -> None:
    depth = 20_000
    chain = [Area("n0", "Gốc", "city")]
    chain += [Area(f"n{index}", f"Tầng {index}", "group", f"n{index - 1}") for index in range(1, depth)]
    tree = AreaTree(reversed(chain))
    assert len(tree.ancestors(f"n{depth - 1}")) == depth - 1
    assert len(tree.descendants("n0")) == depth
    assert tree.is_within(f"n{depth - 1}", "n0")


# --- tree validation --------------------------------------------------------------------------------


def test_duplicate_codes_are_rejected() -> None:
    with pytest.raises(AreaError) as error:
        AreaTree([Area("a", "A", "city"), Area("a", "A again", "city")])
    issue = only_issue(error)
    assert (issue.field, issue.code) == ("code", "a")
    assert "duplicate" in issue.message


def test_missing_parents_are_rejected() -> None:
    with pytest.raises(AreaError) as error:
        AreaTree([Area("a", "A", "city"), Area("b", "B", "ward", "ghost")])
    issue = only_issue(error)
    assert (issue.field, issue.code) == ("parent_code", "b")
    assert "'ghost'" in issue.message


def test_cycles_are_rejected_once_per_cycle() -> None:
    areas = [
        Area("root", "Root", "city"),
        Area("a", "A", "ward", "b"),
        Area("b", "B", "ward", "c"),
        Area("c", "C", "ward", "a"),
        Area("tail", "Tail", "group", "a"),
        Area("x", "X", "ward", "y"),
        Area("y", "Y", "ward", "x"),
    ]
    with pytest.raises(AreaError) as error:
        AreaTree(areas)
    issues = error.value.issues
    assert [issue.field for issue in issues] == ["parent_code", "parent_code"]
    assert "a → b → c → a" in issues[0].message
    assert "x → y → x" in issues[1].message


def test_all_tree_issues_are_reported_together() -> None:
    with pytest.raises(AreaError) as error:
        AreaTree(
            [
                Area("a", "A", "city"),
                Area("a", "A", "city"),
                Area("b", "B", "ward", "ghost"),
                Area("c", "C", "ward", "d"),
                Area("d", "D", "ward", "c"),
            ]
        )
    assert [(issue.field, issue.code) for issue in error.value.issues] == [
        ("code", "a"),
        ("parent_code", "b"),
        ("parent_code", "c"),
    ]


# --- merging ----------------------------------------------------------------------------------------


def test_with_areas_adds_and_leaves_the_original_untouched() -> None:
    tree = city_tree()
    merged = tree.with_areas([Area("bk.ducxuan.t02", "Tổ dân phố 2", "group", "bk.ducxuan")])
    assert codes(merged.children("bk.ducxuan")) == ["bk.ducxuan.t01", "bk.ducxuan.t02"]
    assert "bk.ducxuan.t02" not in tree


def test_with_areas_accepts_identical_repeats() -> None:
    tree = city_tree()
    merged = tree.with_areas([tree.get("bk.songcau")])
    assert merged.areas() == tree.areas()


def test_with_areas_rejects_a_changed_repeat_naming_code_and_fields() -> None:
    tree = city_tree()
    with pytest.raises(AreaError) as error:
        tree.with_areas([Area("bk.songcau", "Phường Sông Cầu mới", "ward", "bk", 22.0, 105.0, "01837")])
    issue = only_issue(error)
    assert (issue.field, issue.code) == ("code", "bk.songcau")
    assert "name, lat, lon" in issue.message
    assert "upsert" in issue.message


def test_with_areas_rejects_duplicates_within_the_batch() -> None:
    with pytest.raises(AreaError) as error:
        city_tree().with_areas([Area("new", "N", "ward", "bk"), Area("new", "N", "ward", "bk")])
    assert only_issue(error).code == "new"


def test_upsert_updates_name_and_coordinates() -> None:
    tree = city_tree()
    merged = tree.with_areas(
        [Area("bk.songcau", "Phường Sông Cầu", "ward", "bk", 22.151, 105.832)], upsert=True
    )
    assert (merged.get("bk.songcau").lat, merged.get("bk.songcau").admin_code) == (22.151, None)
    assert codes(merged.children("bk.songcau")) == ["bk.songcau.t01", "bk.songcau.t02"]


def test_upsert_may_reparent_without_a_cycle() -> None:
    merged = city_tree().with_areas(
        [Area("bk.songcau.t02", "Tổ dân phố 2", "group", "bk.ducxuan")], upsert=True
    )
    assert merged.is_within("bk.songcau.t02", "bk.ducxuan")
    # An updated area keeps its original place in the order, so it precedes ducxuan's own group.
    assert codes(merged.descendants("bk.ducxuan")) == ["bk.ducxuan", "bk.songcau.t02", "bk.ducxuan.t01"]
    assert codes(merged.children("bk.songcau")) == ["bk.songcau.t01"]


def test_upsert_never_reparents_into_a_cycle() -> None:
    with pytest.raises(AreaError) as error:
        city_tree().with_areas([Area("bk", "Thành phố Bắc Kạn", "city", "bk.songcau.t01")], upsert=True)
    issue = only_issue(error)
    assert issue.field == "parent_code"
    assert "cycle" in issue.message


def test_merge_reports_clashes_and_tree_issues_together() -> None:
    with pytest.raises(AreaError) as error:
        city_tree().with_areas([Area("bk", "Khác", "city"), Area("orphan", "O", "ward", "ghost")])
    assert [(issue.field, issue.code) for issue in error.value.issues] == [
        ("code", "bk"),
        ("parent_code", "orphan"),
    ]


# --- properties -------------------------------------------------------------------------------------


@st.composite
def random_forests(draw: st.DrawFn) -> list[Area]:
    size = draw(st.integers(min_value=1, max_value=40))
    parent_indexes = [None] + [
        draw(st.one_of(st.none(), st.integers(min_value=0, max_value=index - 1))) for index in range(1, size)
    ]
    order = draw(st.permutations(range(size)))
    return [
        Area(
            f"a{index}",
            f"Tổ {index}",
            "group",
            None if parent_indexes[index] is None else f"a{parent_indexes[index]}",
        )
        for index in order
    ]


@given(random_forests())
def test_descendants_and_ancestors_agree(areas: list[Area]) -> None:
    tree = AreaTree(areas)
    all_codes = [area.code for area in areas]
    for top in all_codes:
        below = tree.subtree_codes(top)
        assert below == set(codes(tree.descendants(top)))
        assert len(below) == len(tree.descendants(top))
        for other in all_codes:
            above_other = set(codes(tree.ancestors(other)))
            assert (other in below) == (top == other or top in above_other)
            assert tree.is_within(other, top) == (other in below)


@given(random_forests())
def test_structure_is_consistent(areas: list[Area]) -> None:
    tree = AreaTree(areas)
    roots = tree.roots()
    assert sum(len(tree.descendants(root.code)) for root in roots) == len(areas)
    for area in areas:
        chain = tree.ancestors(area.code)
        assert (chain[-1] if chain else area) in roots
        for child in tree.children(area.code):
            assert child.parent_code == area.code
        descendants = tree.descendants(area.code, include_self=False)
        assert len(descendants) == sum(
            len(tree.descendants(child.code)) for child in tree.children(area.code)
        )


@given(
    st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=11)), min_size=1, max_size=12),
)
def test_tree_accepts_exactly_the_acyclic_parent_graphs(parents: list[int | None]) -> None:
    size = len(parents)
    links = [
        None if parent is None or parent >= size or parent == index else parent
        for index, parent in enumerate(parents)
    ]

    def reaches_root(start: int) -> bool:
        seen: set[int] = set()
        current: int | None = start
        while current is not None:
            if current in seen:
                return False
            seen.add(current)
            current = links[current]
        return True

    areas = [
        Area(f"n{index}", f"N{index}", "group", None if link is None else f"n{link}")
        for index, link in enumerate(links)
    ]
    if all(reaches_root(index) for index in range(size)):
        assert len(AreaTree(areas)) == size
    else:
        with pytest.raises(AreaError) as error:
            AreaTree(areas)
        assert all(issue.field == "parent_code" and "cycle" in issue.message for issue in error.value.issues)


@given(random_forests(), st.data())
def test_upsert_reparenting_never_yields_a_cycle(areas: list[Area], data: st.DataObject) -> None:
    tree = AreaTree(areas)
    moved = data.draw(st.sampled_from(areas))
    new_parent = data.draw(st.sampled_from(areas))
    update = Area(moved.code, moved.name, moved.kind, new_parent.code if new_parent != moved else None)
    if new_parent != moved and tree.is_within(new_parent.code, moved.code):
        with pytest.raises(AreaError):
            tree.with_areas([update], upsert=True)
    else:
        merged = tree.with_areas([update], upsert=True)
        assert merged.get(moved.code).parent_code == update.parent_code
        assert len(merged) == len(tree)
