"""The rollout state machine (controller/domain/rollouts.py), without a database or a broker."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.rollouts import (
    DeviceProgress,
    MaintenanceWindow,
    RolloutRuleError,
    RolloutState,
    RolloutView,
    StepTimeouts,
    Thresholds,
    UpdateState,
    can_advance,
    decide,
    first_group_size,
    group_statuses,
    groups_accepted_on_resume,
    split_into_groups,
)

HCM = ZoneInfo("Asia/Ho_Chi_Minh")
NOW = datetime(2026, 11, 25, 19, 30, tzinfo=UTC)  # 02:30 in Ho Chi Minh City
TIMEOUTS = StepTimeouts(start_s=60, download_s=600, install_s=300)
NIGHT = MaintenanceWindow(time(1, 0), time(4, 0), HCM)


def view(
    groups: list[list[UpdateState]],
    *,
    current: int = 0,
    success: float = 0.8,
    error: float = 0.2,
    state: RolloutState = RolloutState.RUNNING,
    window: MaintenanceWindow | None = None,
    accepted: frozenset[int] = frozenset(),
    since: datetime = NOW,
) -> RolloutView:
    devices = [
        DeviceProgress(f"d{g}-{i}", g, update_state, since)
        for g, states in enumerate(groups)
        for i, update_state in enumerate(states)
    ]
    return RolloutView(
        state, current, len(groups), Thresholds(success, error), TIMEOUTS, window, devices, accepted
    )


P, U, F, D = UpdateState.PENDING, UpdateState.UPDATED, UpdateState.FAILED, UpdateState.DOWNLOADING


def test_groups_are_a_canary_then_equal_parts():
    ids = [f"d{i:02}" for i in range(50)]
    groups = split_into_groups(ids, first_group_size=5, groups=4)
    assert [len(g) for g in groups] == [5, 15, 15, 15]
    assert [d for g in groups for d in g] == ids
    assert [len(g) for g in split_into_groups(ids[:7], first_group_size=1, groups=4)] == [1, 2, 2, 2]
    assert first_group_size(50, count=None, percent=10) == 5
    assert first_group_size(3, count=None, percent=10) == 1
    with pytest.raises(RolloutRuleError) as error:
        first_group_size(3, count=2, percent=10)
    assert error.value.field == "first_group"
    with pytest.raises(RolloutRuleError):
        Thresholds(0, 0.1)


def test_the_first_group_starts_and_the_next_opens_at_the_success_threshold():
    first = decide(view([[P, P], [P, P]]), NOW)
    assert first.start == ["d0-0", "d0-1"]
    assert first.state is RolloutState.RUNNING
    half = decide(view([[U, D], [P, P]], success=1.0), NOW)
    assert half.start == []
    assert half.current_group == 0
    advanced = decide(view([[U, U], [P, P]], success=1.0), NOW)
    assert advanced.current_group == 1
    assert advanced.start == ["d1-0", "d1-1"]
    done = decide(view([[U, U], [U, U]], current=1), NOW)
    assert done.state is RolloutState.COMPLETED


def test_the_error_threshold_pauses_and_a_resume_accepts_the_group():
    paused = decide(view([[U, U, U, F, D], [P] * 5], error=0.2), NOW)
    assert paused.state is RolloutState.PAUSED
    assert paused.start == []
    assert "error ratio 20 %" in (paused.reason or "")
    stopped = view([[U, U, U, F, D], [P] * 5], error=0.2, state=RolloutState.PAUSED)
    assert decide(stopped, NOW).start == []
    accepted = groups_accepted_on_resume(stopped)
    assert accepted == {0}
    resumed = decide(view([[U, U, U, F, D], [P] * 5], error=0.2, accepted=accepted, success=0.8), NOW)
    assert resumed.state is RolloutState.RUNNING
    assert resumed.current_group == 1
    assert len(resumed.start) == 5


def test_a_group_opened_with_too_many_errors_pauses_before_anything_starts():
    decision = decide(view([[U], [F, P]], success=0.5, error=0.5), NOW)
    assert decision.state is RolloutState.PAUSED
    assert decision.start == []


def test_a_group_that_ends_below_the_success_threshold_pauses():
    decision = decide(view([[U, U, U, F, UpdateState.CANCELLED], [P]], success=0.8, error=0.5), NOW)
    assert decision.state is RolloutState.PAUSED
    assert "below the success threshold" in (decision.reason or "")


def test_updates_start_only_inside_the_maintenance_window():
    assert NIGHT.contains(NOW)
    assert decide(view([[P]], window=NIGHT), NOW).start == ["d0-0"]
    noon = datetime(2026, 11, 25, 5, 0, tzinfo=UTC)  # 12:00 local
    waiting = decide(view([[P]], window=NIGHT), noon)
    assert waiting.start == []
    assert waiting.state is RolloutState.RUNNING
    assert waiting.next_window_at == datetime(2026, 11, 26, 1, 0, tzinfo=HCM)
    wraps = MaintenanceWindow(time(23, 0), time(2, 0), HCM)
    assert wraps.contains(datetime(2026, 11, 25, 17, 30, tzinfo=UTC))  # 00:30 local
    assert not wraps.contains(datetime(2026, 11, 25, 20, 0, tzinfo=UTC))  # 03:00 local
    # A running update is not the window's business: it may finish, and its timeout still applies.
    late = decide(view([[D, P]], window=NIGHT, since=noon - timedelta(hours=1)), noon)
    assert late.timed_out and late.timed_out[0][0] == "d0-0"


def test_a_device_silent_in_a_step_is_failed_by_timeout():
    decision = decide(
        view([[D, UpdateState.UPDATING, UpdateState.QUEUED]], since=NOW), NOW + timedelta(seconds=61)
    )
    assert [device for device, _ in decision.timed_out] == ["d0-2"]
    decision = decide(view([[D, UpdateState.UPDATING]], since=NOW), NOW + timedelta(seconds=601))
    assert sorted(device for device, _ in decision.timed_out) == ["d0-0", "d0-1"]
    assert "timed out" in decision.timed_out[0][1]


def test_states_never_go_backwards():
    assert can_advance(UpdateState.QUEUED, UpdateState.DOWNLOADING)
    assert can_advance(UpdateState.DOWNLOADING, UpdateState.FAILED)
    assert not can_advance(UpdateState.UPDATING, UpdateState.DOWNLOADING)
    assert not can_advance(UpdateState.UPDATED, UpdateState.FAILED)


OUTCOMES = st.sampled_from(
    [UpdateState.PENDING, UpdateState.DOWNLOADING, UpdateState.UPDATED, UpdateState.FAILED]
)


@given(
    groups=st.lists(st.lists(OUTCOMES, min_size=1, max_size=12), min_size=1, max_size=5),
    success=st.floats(0.05, 1.0),
    error=st.floats(0.05, 1.0),
    current=st.integers(0, 4),
)
def test_a_group_never_opens_below_the_success_threshold_nor_goes_on_past_the_error_threshold(
    groups: list[list[UpdateState]], success: float, error: float, current: int
):
    current = min(current, len(groups) - 1)
    before = view(groups, current=current, success=success, error=error)
    decision = decide(before, NOW)
    statuses = group_statuses(before.devices, len(groups), frozenset())
    for status in statuses[current : decision.current_group]:
        # Every group the rollout went past had reached the success threshold.
        assert status.success_ratio >= success
    over = [s for s in statuses[: decision.current_group + 1] if s.error_ratio >= error]
    if over:
        assert decision.state is RolloutState.PAUSED
        assert decision.start == []
    started_groups = {device.group for device in before.devices if device.device_id in decision.start}
    assert all(group <= decision.current_group for group in started_groups)
    if decision.state is RolloutState.COMPLETED:
        assert all(s.success_ratio >= success for s in statuses[current:])
