"""The area fan-out planner (docs/protocol.md §1.12): which area topics may carry a broadcast."""

import uuid

from hypothesis import given
from hypothesis import strategies as st

from controller.domain.areas import Area, AreaTree
from controller.domain.fanout import area_delivery_ids, plan_fanout

# city > two wards > two groups each
TREE = AreaTree(
    [
        Area("city", "Thành phố", "city"),
        Area("w1", "Phường Một", "ward", "city"),
        Area("w2", "Phường Hai", "ward", "city"),
        Area("g11", "Tổ 1", "group", "w1"),
        Area("g12", "Tổ 2", "group", "w1"),
        Area("g21", "Tổ 1", "group", "w2"),
        Area("g22", "Tổ 2", "group", "w2"),
    ]
)
GROUPS = ("g11", "g12", "g21", "g22")
PLACED = {group: {f"{group}-{n}" for n in range(3)} for group in GROUPS}
EVERYONE = {device for devices in PLACED.values() for device in devices}


def path(group: str) -> list[str]:
    return [group, *(area.code for area in TREE.ancestors(group))]


def following_their_path(placed: dict[str, set[str]]) -> dict[str, set[str]]:
    followers: dict[str, set[str]] = {}
    for group, devices in placed.items():
        for code in path(group):
            followers.setdefault(code, set()).update(devices)
    return followers


def test_a_city_wide_broadcast_takes_one_publish() -> None:
    plan = plan_fanout(TREE, EVERYONE, PLACED, following_their_path(PLACED))
    assert dict(plan.by_area) == {"city": frozenset(EVERYONE)}
    assert plan.direct == frozenset()


def test_one_ward_and_one_group_elsewhere_use_their_own_topics() -> None:
    targets = PLACED["g11"] | PLACED["g12"] | PLACED["g21"]
    plan = plan_fanout(TREE, targets, PLACED, following_their_path(PLACED))
    assert set(plan.by_area) == {"w1", "g21"}
    assert plan.covered == targets


def test_an_area_with_a_speaker_left_out_is_not_used() -> None:
    targets = EVERYONE - {"g22-0"}  # a polygon that misses one speaker
    plan = plan_fanout(TREE, targets, PLACED, following_their_path(PLACED))
    assert set(plan.by_area) == {"w1", "g21"}
    assert plan.direct == {"g22-1", "g22-2"}


def test_a_speaker_that_moved_closes_its_old_area_until_it_follows_the_new_one() -> None:
    # g11-0 now belongs to g21 in the registry, but still says it follows city > w1 > g11.
    placed = {**PLACED, "g11": PLACED["g11"] - {"g11-0"}, "g21": PLACED["g21"] | {"g11-0"}}
    followers = following_their_path(PLACED)
    targets = placed["g11"] | placed["g12"]  # ward 1 as the registry has it now
    plan = plan_fanout(TREE, targets, placed, followers)
    assert "w1" not in plan.by_area and "g11" not in plan.by_area
    assert plan.by_area["g12"] == PLACED["g12"]
    assert plan.direct == placed["g11"]


def test_a_target_that_does_not_follow_yet_gets_its_own_command() -> None:
    followers = following_their_path(PLACED)
    for code in path("g22"):
        followers[code] = followers[code] - {"g22-2"}
    plan = plan_fanout(TREE, EVERYONE, PLACED, followers)
    assert set(plan.by_area) == {"city"}
    assert plan.direct == {"g22-2"}


def test_a_lone_follower_is_sent_directly() -> None:
    placed = {"g11": {"only"}}
    plan = plan_fanout(TREE, {"only"}, placed, following_their_path(placed))
    assert plan.by_area == {}
    assert plan.direct == {"only"}


def test_derived_ids_are_stable_and_distinct_per_device() -> None:
    fanout_id = str(uuid.uuid4())
    first = area_delivery_ids(fanout_id, "spk-1")
    assert first == area_delivery_ids(fanout_id, "spk-1")
    assert first != area_delivery_ids(fanout_id, "spk-2")
    assert first.command_id != first.delivery_id
    assert first.command_id == str(uuid.uuid5(uuid.UUID(fanout_id), "command:spk-1"))


@given(
    targets=st.sets(st.sampled_from(sorted(EVERYONE))),
    moved=st.dictionaries(st.sampled_from(sorted(EVERYONE)), st.sampled_from(GROUPS), max_size=4),
    lagging=st.sets(st.sampled_from(sorted(EVERYONE)), max_size=4),
)
def test_no_area_topic_ever_reaches_a_speaker_outside_the_broadcast(
    targets: set[str], moved: dict[str, str], lagging: set[str]
) -> None:
    """Whatever the registry moves and whoever has not caught up yet: every speaker that follows a
    chosen area, by its own word or by the registry's, is a target; each target is reached once."""
    placed = {group: {d for d in devices if d not in moved} for group, devices in PLACED.items()}
    for device, group in moved.items():
        placed[group].add(device)
    # A lagging speaker still follows its old path; the others follow what the registry says.
    followers: dict[str, set[str]] = {}
    for group, devices in PLACED.items():
        for device in devices:
            home = group if device in lagging else moved.get(device, group)
            for code in path(home):
                followers.setdefault(code, set()).add(device)
    plan = plan_fanout(TREE, targets, placed, followers)
    registry_followers = following_their_path(placed)
    for code, reach in plan.by_area.items():
        assert followers.get(code, set()) <= targets
        assert registry_followers.get(code, set()) <= targets
        assert reach <= followers[code]
    assert plan.covered | plan.direct == targets
    assert not plan.covered & plan.direct
    reached = [device for reach in plan.by_area.values() for device in reach]
    assert len(reached) == len(set(reached))
