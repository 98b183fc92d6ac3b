import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.areas import Area, AreaTree
from controller.domain.deliveries import TERMINAL_STATES, DeliveryState, can_advance, state_from_report
from controller.domain.planner import DeviceEntry, TargetError, Targets, resolve_targets
from controller.domain.priority import Priority, PriorityClass

classes = st.sampled_from(list(PriorityClass))
subs = st.integers(min_value=0, max_value=255)


@given(classes, subs, classes, subs)
def test_rank_orders_class_before_sub_priority(c1, s1, c2, s2):
    a, b = Priority(c1, s1), Priority(c2, s2)
    if c1.band != c2.band:
        assert (a.rank > b.rank) == (c1.band > c2.band)
    else:
        assert (a.rank > b.rank) == (s1 > s2)
    assert Priority.from_rank(a.rank) == a


def test_equal_priority_first_keeps_device_except_in_emergency():
    normal = Priority(PriorityClass.NORMAL, 5)
    assert not normal.takes_device_from(Priority(PriorityClass.NORMAL, 5))
    assert not Priority(PriorityClass.PRIORITY, 0).takes_device_from(Priority(PriorityClass.PRIORITY, 0))
    assert Priority(PriorityClass.EMERGENCY, 0).takes_device_from(Priority(PriorityClass.EMERGENCY, 0))
    assert Priority(PriorityClass.PRIORITY, 0).takes_device_from(Priority(PriorityClass.NORMAL, 255))
    assert not Priority(PriorityClass.NORMAL, 255).takes_device_from(Priority(PriorityClass.PRIORITY, 0))


def test_sub_priority_out_of_range_is_refused():
    with pytest.raises(ValueError, match="sub_priority"):
        Priority(PriorityClass.NORMAL, 256)


@given(st.lists(st.sampled_from(list(DeliveryState)), max_size=12))
def test_states_never_go_backwards(sequence):
    current = DeliveryState.QUEUED
    history = [current]
    for proposed in sequence:
        if can_advance(current, proposed):
            current = proposed
            history.append(current)
    progress = [state.progress for state in history]
    assert progress == sorted(progress)
    assert sum(1 for state in history if state in TERMINAL_STATES) <= 1


def test_terminal_states_are_final_and_reports_map():
    for terminal in TERMINAL_STATES:
        assert not any(can_advance(terminal, other) for other in DeliveryState)
    assert state_from_report("rejected") is DeliveryState.FAILED
    assert state_from_report("stopped") is DeliveryState.CANCELLED
    assert state_from_report("dancing") is None


def _city() -> AreaTree:
    return AreaTree(
        [
            Area(code="c", name="Thành phố", kind="city"),
            Area(code="c.w1", name="Phường Một", kind="ward", parent_code="c"),
            Area(code="c.w1.g1", name="Tổ 1", kind="group", parent_code="c.w1"),
            Area(code="c.w1.g2", name="Tổ 2", kind="group", parent_code="c.w1"),
            Area(code="c.w2", name="Phường Hai", kind="ward", parent_code="c"),
        ]
    )


DEVICES = [
    DeviceEntry("s1", "speaker", "c.w1.g1", "s1", "mqtt"),
    DeviceEntry("s2", "speaker", "c.w1.g2", "s2", "mqtt"),
    DeviceEntry("s3", "speaker", "c.w2", "s3", "mqtt"),
    DeviceEntry("led", "led_screen", "c.w1.g1", "led", "mqtt"),
    DeviceEntry("off", "speaker", "c.w1.g1", "off", "mqtt", enabled=False),
]


def test_group_target_reaches_only_that_groups_speakers():
    chosen = resolve_targets(Targets(areas=["c.w1.g1"]), _city(), DEVICES, kinds=frozenset({"speaker"}))
    assert [d.id for d in chosen] == ["s1"]


def test_ward_and_city_targets_reach_their_subtrees_once():
    tree = _city()
    ward = resolve_targets(Targets(areas=["c.w1", "c.w1.g2"]), tree, DEVICES, kinds=frozenset({"speaker"}))
    assert [d.id for d in ward] == ["s1", "s2"]
    city = resolve_targets(Targets(areas=["c"], devices=["s3"]), tree, DEVICES, kinds=frozenset({"speaker"}))
    assert [d.id for d in city] == ["s1", "s2", "s3"]


@pytest.mark.parametrize(
    ("targets", "field"),
    [
        (Targets(), "targets"),
        (Targets(areas=["c", "nowhere"]), "targets.areas[1]"),
        (Targets(devices=["ghost"]), "targets.devices[0]"),
        (Targets(devices=["led"]), "targets.devices[0]"),
        (Targets(areas=["c.w2"], devices=[]), None),
    ],
)
def test_bad_targets_name_the_field(targets, field):
    if field is None:
        assert resolve_targets(targets, _city(), DEVICES, kinds=frozenset({"speaker"}))
        return
    with pytest.raises(TargetError) as raised:
        resolve_targets(targets, _city(), DEVICES, kinds=frozenset({"speaker"}))
    assert raised.value.field == field


def test_target_with_no_devices_is_an_error():
    tree = _city().with_areas([Area(code="c.w3", name="Phường Ba", kind="ward", parent_code="c")])
    with pytest.raises(TargetError, match="no device"):
        resolve_targets(Targets(areas=["c.w3"]), tree, DEVICES, kinds=frozenset({"speaker"}))
