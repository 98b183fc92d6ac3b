"""The availability rule (controller/domain/availability.py) and the operations' input checks
(controller/domain/operations.py), without I/O."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from controller.domain.availability import TIMEOUT, AvailabilityMonitor, DeviceSnapshot, KindTiming
from controller.domain.operations import (
    OperationInputError,
    ResultState,
    can_advance,
    operation_status,
    validate_params,
)

T0 = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)
SPEAKER = KindTiming(heartbeat_s=60, timeout_s=150, alarm_after_s=600)
SENSOR = KindTiming(heartbeat_s=10, timeout_s=25, alarm_after_s=60)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def monitor(*devices: tuple[str, str]) -> AvailabilityMonitor:
    watched = AvailabilityMonitor({"speaker": SPEAKER, "sensor": SENSOR}, SPEAKER)
    for device_id, kind in devices:
        watched.register(device_id, kind)
    return watched


def test_a_timeout_needs_two_heartbeats():
    with pytest.raises(ValueError, match="twice"):
        KindTiming(heartbeat_s=60, timeout_s=100, alarm_after_s=600)


def test_online_then_silent_goes_offline_when_its_kind_times_out_and_alarms_later():
    watched = monitor(("spk-1", "speaker"), ("sen-1", "sensor"))
    first = watched.heard("spk-1", online=True, now=at(0), said_at=at(-0.2))
    assert [(t.online, t.at, t.reason) for t in first.transitions] == [(True, at(-0.2), "state")]
    watched.heard("sen-1", online=True, now=at(0))
    watched.heard("spk-1", online=True, now=at(60))  # a heartbeat: no change, a new deadline
    assert watched.next_due() == at(25)
    assert not watched.sweep(at(24.99))
    swept = watched.sweep(at(25.01))
    assert [(t.device_id, t.online, t.at, t.detected_at, t.reason) for t in swept.transitions] == [
        ("sen-1", False, at(25), at(25.01), TIMEOUT)
    ]
    # The sensor's alarm threshold: 60 s after it went offline.
    assert [(a.device_id, a.raised, a.at) for a in watched.sweep(at(85)).alarms] == [("sen-1", True, at(85))]
    assert not watched.sweep(at(209))  # 60 + 150 for the speaker
    swept = watched.sweep(at(210))
    assert [(t.device_id, t.at) for t in swept.transitions] == [("spk-1", at(210))]
    assert not watched.sweep(at(809)).alarms
    assert [(a.device_id, a.offline_since) for a in watched.sweep(at(810)).alarms] == [("spk-1", at(210))]


def test_a_last_will_is_offline_at_once_and_coming_back_clears_the_alarm():
    watched = monitor(("spk-1", "speaker"))
    watched.heard("spk-1", online=True, now=at(0))
    will = watched.heard("spk-1", online=False, now=at(30), reason="will")
    assert [(t.online, t.at, t.reason) for t in will.transitions] == [(False, at(30), "will")]
    assert not watched.sweep(at(200)).transitions  # no timeout for a device already offline
    assert watched.sweep(at(630)).alarms[0].raised
    back = watched.heard("spk-1", online=True, now=at(700), said_at=at(699.5))
    assert [(t.online, t.at) for t in back.transitions] == [(True, at(699.5))]
    assert [(a.raised, a.at, a.offline_since) for a in back.alarms] == [(False, at(699.5), at(30))]


def test_a_device_back_before_the_threshold_raises_nothing():
    watched = monitor(("spk-1", "speaker"))
    watched.heard("spk-1", online=True, now=at(0))
    watched.heard("spk-1", online=False, now=at(10), reason="will")
    watched.heard("spk-1", online=True, now=at(20))  # a reboot
    watched.heard("spk-1", online=True, now=at(5000))  # heartbeats go on
    assert not watched.sweep(at(5000)).alarms


def test_a_stale_retained_state_is_no_sign_of_life_and_clocks_never_date_the_future():
    watched = monitor(("spk-1", "speaker"))
    assert not watched.heard("spk-1", online=True, now=at(1000), said_at=at(0))
    assert watched.is_online("spk-1") is None
    ahead = watched.heard("spk-1", online=True, now=at(1000), said_at=at(1060))
    assert ahead.transitions[0].at == at(1000)


def test_a_report_keeps_an_online_device_alive_but_never_brings_one_back():
    watched = monitor(("spk-1", "speaker"))
    watched.heard("spk-1", online=True, now=at(0))
    watched.alive("spk-1", at(100))
    assert not watched.sweep(at(200)).transitions
    assert watched.sweep(at(250)).transitions
    watched.alive("spk-1", at(260))
    assert watched.is_online("spk-1") is False


def test_a_restart_gives_online_devices_a_whole_timeout_and_keeps_raised_alarms():
    watched = monitor()
    watched.restore(DeviceSnapshot("spk-1", "speaker", True, at(-3600), False, True), at(0))
    watched.restore(DeviceSnapshot("spk-2", "speaker", False, at(-3600), True, True), at(0))
    watched.restore(DeviceSnapshot("spk-3", "speaker", False, at(-100), False, True), at(0))
    swept = watched.sweep(at(149))
    assert not swept.transitions
    assert not swept.alarms
    assert [t.device_id for t in watched.sweep(at(150)).transitions] == ["spk-1"]
    assert [a.device_id for a in watched.sweep(at(500)).alarms] == ["spk-3"]
    assert [(a.device_id, a.raised) for a in watched.heard("spk-2", online=True, now=at(501)).alarms] == [
        ("spk-2", False)
    ]


def test_polled_devices_have_no_timeout():
    watched = monitor(("sen-modbus", "sensor"))
    watched.heard("sen-modbus", online=True, now=at(0), heartbeat=False)
    assert not watched.sweep(at(10_000)).transitions
    assert watched.heard("sen-modbus", online=False, now=at(10_001), heartbeat=False).transitions


def test_a_sweep_over_ten_thousand_devices_costs_only_what_is_due():
    watched = monitor(*((f"spk-{n:05d}", "speaker") for n in range(10_000)))
    for n in range(10_000):
        watched.heard(f"spk-{n:05d}", online=True, now=at(n / 1000))
    started = time.perf_counter()
    for _ in range(1000):
        watched.sweep(at(100))
    idle_s = (time.perf_counter() - started) / 1000
    started = time.perf_counter()
    swept = watched.sweep(at(200))
    all_due_s = time.perf_counter() - started
    assert len(swept.transitions) == 10_000
    # Generous bounds for a shared 2-core machine; bench/availability.py measures the real figures.
    assert idle_s < 0.001
    assert all_due_s < 1.0


@pytest.mark.parametrize(
    ("operation", "params", "field"),
    [
        ("set_volume", {"volume": 101}, "params.volume"),
        ("set_volume", {"volume": True}, "params.volume"),
        ("set_volume", {}, "params.volume"),
        ("set_volume", {"volume": 40, "loud": 1}, "params.loud"),
        ("test_tone", {"duration_s": 0}, "params.duration_s"),
        ("test_tone", {"duration_s": 31}, "params.duration_s"),
        ("configure", {}, "params"),
        ("configure", {"quiet_hours": {"start": "25:00", "end": "05:00"}}, "params.quiet_hours.start"),
        ("configure", {"quiet_hours": {"start": "22:00", "end": "22:00"}}, "params.quiet_hours.end"),
        ("configure", {"quiet_hours": "22-05"}, "params.quiet_hours"),
        ("configure", {"comm_loss": {"policy": "stop_after"}}, "params.comm_loss.after_s"),
        ("configure", {"comm_loss": {"policy": "forever"}}, "params.comm_loss.policy"),
        ("configure", {"heartbeat_s": 1}, "params.heartbeat_s"),
        ("reboot", {"now": True}, "params.now"),
        ("self_destruct", {}, "type"),
    ],
)
def test_operation_parameters_name_the_field_at_fault(operation: str, params: dict[str, object], field: str):
    with pytest.raises(OperationInputError) as raised:
        validate_params(operation, params, utc_offset_min=420)
    assert raised.value.field == field


def test_operation_parameters_become_wire_members():
    assert validate_params("set_volume", {"volume": 0}, utc_offset_min=420) == {"volume": 0}
    assert validate_params("test_tone", {}, utc_offset_min=420) == {"duration_s": 3.0}
    assert validate_params(
        "configure",
        {
            "quiet_hours": {"start": "22:00", "end": "05:30"},
            "comm_loss": {"policy": "keep"},
            "heartbeat_s": 30,
        },
        utc_offset_min=420,
    ) == {
        "config": {
            "quiet_hours": {"start": "22:00", "end": "05:30", "utc_offset_min": 420},
            "comm_loss": {"policy": "keep"},
            "heartbeat_s": 30,
        }
    }
    assert validate_params("configure", {"quiet_hours": None}, utc_offset_min=420) == {
        "config": {"quiet_hours": None}
    }


def test_results_only_move_forward_and_sum_up():
    assert can_advance(ResultState.SENT, ResultState.DELIVERED)
    assert not can_advance(ResultState.DELIVERED, ResultState.SENT)
    assert not can_advance(ResultState.COMPLETED, ResultState.FAILED)
    assert operation_status([ResultState.COMPLETED, ResultState.DELIVERED]) == "pending"
    assert operation_status([ResultState.COMPLETED, ResultState.COMPLETED]) == "completed"
    assert operation_status([ResultState.COMPLETED, ResultState.FAILED]) == "partial"
    assert operation_status([ResultState.EXPIRED]) == "failed"
