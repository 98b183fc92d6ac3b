"""Threshold rules with a duration and hysteresis (controller/domain/thresholds.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.thresholds import Direction, Threshold, ThresholdError, ThresholdTracker, Transition

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
FLOOD = Threshold(Direction.ABOVE, raise_at=3.2, clear_at=3.0, for_s=120)


def feed(tracker: ThresholdTracker, readings: list[tuple[float, float]]) -> list[tuple[float, Transition]]:
    """(seconds after T0, value) pairs → the transitions, with the second they happened at."""
    found = []
    for second, value in readings:
        transition = tracker.observe(value, T0 + timedelta(seconds=second))
        if transition is not None:
            found.append((second, transition))
    return found


def test_the_level_must_stay_up_for_the_whole_duration_before_the_alarm_rises() -> None:
    tracker = ThresholdTracker(FLOOD)
    # Up at 0 s, a dip at 60 s restarts the clock; up again from 90 s: raised at 210 s, not 120 s.
    readings = [(0, 3.3), (30, 3.4), (60, 3.1), (90, 3.25), (150, 3.3), (209, 3.3), (210, 3.3), (240, 3.5)]
    assert feed(tracker, readings) == [(210, Transition.RAISED)]
    assert tracker.active


def test_hysteresis_keeps_a_level_hovering_at_the_threshold_from_flapping() -> None:
    tracker = ThresholdTracker(FLOOD)
    feed(tracker, [(0, 3.3), (120, 3.3)])
    # Between 3.0 and 3.2 the alarm stays; below 3.0 it clears at once (clear_for_s = 0).
    assert feed(tracker, [(130, 3.19), (140, 3.05), (150, 3.2), (160, 3.0)]) == []
    assert feed(tracker, [(170, 2.99)]) == [(170, Transition.CLEARED)]
    assert not tracker.active
    # And it takes the full duration to rise again.
    assert feed(tracker, [(180, 3.3), (299, 3.3), (300, 3.3)]) == [(300, Transition.RAISED)]


def test_a_clearing_duration_and_a_rule_on_falling_values() -> None:
    drought = Threshold(Direction.BELOW, raise_at=0.5, clear_at=0.8, for_s=0, clear_for_s=60)
    tracker = ThresholdTracker(drought)
    assert feed(tracker, [(0, 0.6), (10, 0.5)]) == [(10, Transition.RAISED)]
    assert feed(tracker, [(20, 0.9), (50, 0.7), (60, 0.85), (100, 0.9), (120, 0.95)]) == [
        (120, Transition.CLEARED)
    ]


def test_late_and_impossible_readings_change_nothing() -> None:
    tracker = ThresholdTracker(FLOOD)
    feed(tracker, [(0, 3.3), (60, 3.3)])
    # A reading older than the last one (a late batch) neither restarts nor breaks the clock.
    assert feed(tracker, [(30, 1.0), (70, float("nan")), (120, 3.3)]) == [(120, Transition.RAISED)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"direction": Direction.ABOVE, "raise_at": 3.0, "clear_at": 3.2}, "clear_at"),
        ({"direction": Direction.BELOW, "raise_at": 0.5, "clear_at": 0.4}, "clear_at"),
        ({"direction": Direction.ABOVE, "raise_at": 3.0, "clear_at": 2.0, "for_s": -1}, "for_s"),
        ({"direction": Direction.ABOVE, "raise_at": float("inf"), "clear_at": 2.0}, "raise_at"),
        ({"direction": Direction.ABOVE, "raise_at": 3.0, "clear_at": 2.0, "clear_for_s": -5}, "clear_for_s"),
    ],
)
def test_an_impossible_rule_is_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ThresholdError) as caught:
        Threshold(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


@given(st.lists(st.floats(min_value=0, max_value=6, allow_nan=False), min_size=1, max_size=200))
def test_raised_and_cleared_alternate_and_only_where_the_levels_say(values: list[float]) -> None:
    tracker = ThresholdTracker(Threshold(Direction.ABOVE, raise_at=3.2, clear_at=3.0, for_s=0))
    expected_active = False
    for second, value in enumerate(values):
        transition = tracker.observe(value, T0 + timedelta(seconds=second))
        if transition is Transition.RAISED:
            assert not expected_active and value >= 3.2
            expected_active = True
        elif transition is Transition.CLEARED:
            assert expected_active and value < 3.0
            expected_active = False
        else:
            assert (value >= 3.2) is False or expected_active
            assert (value < 3.0) is False or not expected_active
        assert tracker.active == expected_active
