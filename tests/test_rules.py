"""Sensor readings over MQTT into the telemetry API, and threshold rules that raise alarms and broadcasts,
end to end: a real Mosquitto (auth + ACL), the controller, a simulated fleet, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.broker import TestBroker
from tests.support.mqtt_sensor import SensorClient
from tests.support.scenario import all_ended, seed
from tests.support.system import ControllerHandle, EventWatcher, FleetHandle, wait_until

pytestmark = pytest.mark.integration

SENSOR_ADDRESS = "river-1"
T0 = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)
WAIT_S = 30.0


@pytest.fixture
def sensor(mosquitto: TestBroker) -> Iterator[SensorClient]:
    client = SensorClient(mosquitto, SENSOR_ADDRESS)
    try:
        yield client
    finally:
        client.close()


def register_river_sensor(controller: ControllerHandle) -> None:
    with controller.client() as client:
        response = client.post(
            "/api/v1/devices",
            json={
                "id": "sen-river",
                "kind": "sensor",
                "area": "hn.b",
                "address": SENSOR_ADDRESS,
                "config": {"metrics": {"water_level": {"unit": "m", "min": 0, "max": 10}}},
            },
        )
    assert response.status_code == 201, response.text
    assert response.json()["config"]["metrics"]["water_level"] == {"unit": "m", "min": 0.0, "max": 10.0}


def flood_rule(**fields: Any) -> dict[str, Any]:
    return {
        "name": "Lũ sông Cầu",
        "device_id": "sen-river",
        "metric": "water_level",
        "direction": "above",
        "raise_at": 3.2,
        "clear_at": 3.0,
        "for_s": 120,
        **fields,
    }


def latest_water_level(controller: ControllerHandle) -> dict[str, Any]:
    with controller.client() as client:
        metrics: list[dict[str, Any]] = client.get("/api/v1/devices/sen-river/telemetry/latest").json()[
            "metrics"
        ]
    return metrics[0] if metrics else {}


def alarm_events(events: list[dict[str, Any]], rule_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "alarm" and e["rule_id"] == rule_id]


def test_a_rising_river_raises_an_alarm_whose_draft_an_operator_approves_and_the_group_hears_it(
    controller: ControllerHandle, fleet: FleetHandle, sensor: SensorClient
) -> None:
    seed(controller)
    register_river_sensor(controller)
    broadcast = {
        "areas": ["hn.b.t1"],
        "headline": "Nước sông Cầu lên cao",
        "text": "Người dân tránh xa bờ sông.",
    }
    with controller.client() as client:
        draft_rule = client.post("/api/v1/rules", json=flood_rule(action="draft", broadcast=broadcast)).json()
        at_once_rule = client.post(
            "/api/v1/rules",
            json=flood_rule(
                name="Lũ khẩn",
                raise_at=4.0,
                clear_at=3.5,
                for_s=0,
                action="broadcast",
                broadcast={**broadcast, "areas": ["hn.b.t2"], "mode": "drill"},
            ),
        ).json()
    with EventWatcher(controller) as watcher:
        # 3.3 m from 06:00; at 06:01 not yet two minutes; at 06:02 it is: raised (one reading at 3.1 would
        # have restarted the clock).
        sensor.readings(T0, water_level=3.3)
        sensor.readings(T0 + timedelta(minutes=1), water_level=3.35)
        sensor.readings(T0 + timedelta(minutes=2), water_level=3.4)
        watcher.wait_for(
            lambda events: any(e["alert_id"] for e in alarm_events(events, draft_rule["id"])),
            what="the alarm raised with its draft alert",
        )
        (raised, *_) = alarm_events(watcher.events, draft_rule["id"])
        assert raised["state"] == "active" and raised["raised_at"] == "2026-11-24T06:02:00Z"
        assert raised["raised_value"] == 3.4
        assert not alarm_events(watcher.events, at_once_rule["id"])
        alert_id = next(
            e["alert_id"] for e in alarm_events(watcher.events, draft_rule["id"]) if e["alert_id"]
        )
        with controller.client() as client:
            assert client.get(f"/api/v1/alerts/{alert_id}").json()["status"] == "pending_approval"
        # Nothing plays before an operator approves the draft.
        assert not [p for p in fleet.plays() if p["event"] == "playing"]
        operator = controller.api_key("operator")
        with controller.client(operator) as client:
            approved = client.post(f"/api/v1/alerts/{alert_id}/approve")
        assert approved.status_code == 200, approved.text
        broadcast_id = approved.json()["broadcast_id"]
        watcher.wait_for(all_ended(broadcast_id, 2, "completed"), what="the approved alert played on hn.b.t1")

        # 4.1 m: the second rule (no duration) sends its drill at once to hn.b.t2.
        sensor.readings(T0 + timedelta(minutes=3), water_level=4.1)
        watcher.wait_for(
            lambda events: any(e["alert_id"] for e in alarm_events(events, at_once_rule["id"])),
            what="the second rule's alert",
        )
        second = next(e for e in alarm_events(watcher.events, at_once_rule["id"]) if e["alert_id"])
        assert "sent to 1 devices" in second["detail"]
        wait_until(
            lambda: any(p["address"] == "b2-1" and p["event"] == "playing" for p in fleet.plays()),
            "the second rule's drill playing on hn.b.t2",
        )

        # Down to 3.1: the first still holds (hysteresis), the second clears; at 2.9 both have cleared.
        sensor.readings(T0 + timedelta(minutes=4), water_level=3.1)
        sensor.readings(T0 + timedelta(minutes=5), water_level=2.9)
        watcher.wait_for(
            lambda events: any(e["state"] == "cleared" for e in alarm_events(events, draft_rule["id"])),
            what="the alarm cleared",
        )
    cleared = {
        e["rule_id"]: e["cleared_at"]
        for e in watcher.events
        if e.get("type") == "alarm" and e["state"] == "cleared"
    }
    assert cleared == {at_once_rule["id"]: "2026-11-24T06:04:00Z", draft_rule["id"]: "2026-11-24T06:05:00Z"}
    played = {p["address"] for p in fleet.plays() if p["event"] == "playing"}
    assert played == {"b1-1", "b1-2", "b2-1"}
    # The rules decide as readings arrive; storage follows in batches.
    wait_until(lambda: latest_water_level(controller).get("value") == 2.9, "the last reading stored")
    with controller.client() as client:
        alarms = client.get("/api/v1/alarms").json()
        actions = [e["action"] for e in client.get("/api/v1/audit").json()]
        series = client.get(
            "/api/v1/devices/sen-river/telemetry",
            params={"from": "2026-11-24T06:00:00Z", "to": "2026-11-24T07:00:00Z"},
        ).json()
        hourly = client.get(
            "/api/v1/devices/sen-river/telemetry",
            params={"from": "2026-11-24T06:00:00Z", "to": "2026-11-24T07:00:00Z", "step": "1h"},
        ).json()
        latest = client.get("/api/v1/devices/sen-river/telemetry/latest").json()
    assert {a["state"] for a in alarms} == {"cleared"} and len(alarms) == 2
    assert actions.count("alarm.raise") == 2 and actions.count("alarm.clear") == 2
    assert "rule.create" in actions and "alert.approve" in actions
    (water,) = series["series"]
    assert water["unit"] == "m"
    assert [p["value"] for p in water["points"]] == [3.3, 3.35, 3.4, 4.1, 3.1, 2.9]
    (bucket,) = hourly["series"][0]["points"]
    assert bucket["count"] == 6 and bucket["max"] == 4.1 and bucket["min"] == 2.9
    assert latest["metrics"][0]["value"] == 2.9 and not latest["metrics"][0]["degraded"]


# Input checks and transport plumbing: the database adds nothing here (SQLite only, to keep CI short).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_readings_and_bad_rules_are_refused_naming_the_field_and_nothing_is_stored(
    controller: ControllerHandle, sensor: SensorClient
) -> None:
    seed(controller)
    register_river_sensor(controller)
    with EventWatcher(controller):
        sensor.raw(b"{not json")
        sensor.readings(T0, water_level=65.5)  # a saturated transmitter
        sensor.readings(T0 + timedelta(seconds=1), water_level=1.8)
        sensor.readings(T0 + timedelta(seconds=2), water_level=-3.0)

    wait_until(
        lambda: latest_water_level(controller).get("rejected_count") == 2, "the two refused readings counted"
    )
    water = latest_water_level(controller)
    assert water["value"] == 1.8 and water["degraded"]
    assert (
        "above the physical range" in water["last_rejected"]["reason"]
        or "below" in water["last_rejected"]["reason"]
    )

    broadcast = {"areas": ["hn.b.t1"], "headline": "Lũ"}
    cases = [
        (flood_rule(device_id="sen-nowhere"), "device_id"),
        (flood_rule(device_id="spk-b1-1"), "device_id"),
        (flood_rule(metric="rainfall"), "metric"),
        (flood_rule(metric="Water Level"), "metric"),
        (flood_rule(raise_at=3.0, clear_at=3.2), "clear_at"),
        (flood_rule(for_s=-1), "for_s"),
        (flood_rule(action="broadcast"), "broadcast"),
        (flood_rule(action="draft", broadcast={**broadcast, "areas": ["hn.zz"]}), "broadcast.areas[0]"),
        (
            flood_rule(action="draft", broadcast={**broadcast, "priority_class": "normal"}),
            "broadcast.priority_class",
        ),
        (flood_rule(unknown=1), "unknown"),
    ]
    with controller.client() as client:
        for body, field in cases:
            response = client.post("/api/v1/rules", json=body)
            assert response.status_code == 422, (field, response.text)
            assert response.json()["field"] == field, response.text
        assert client.get("/api/v1/rules").json() == []
        for params, field in [
            ({"step": "0"}, "step"),
            ({"step": "fortnight"}, "step"),
            ({"from": "2026-11-24T07:00:00Z", "to": "2026-11-24T06:00:00Z"}, "to"),
            ({"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z", "step": "1"}, "step"),
            ({"from": "yesterday"}, "from"),
        ]:
            response = client.get("/api/v1/devices/sen-river/telemetry", params=params)
            assert response.status_code == 422, (params, response.text)
            assert response.json()["field"] == field, response.text
        assert client.get("/api/v1/devices/sen-nowhere/telemetry").status_code == 404
        bad_config = client.post(
            "/api/v1/devices",
            json={"kind": "sensor", "area": "hn.b", "config": {"metrics": {"level": {"min": 5, "max": 1}}}},
        )
        assert bad_config.status_code == 422 and bad_config.json()["field"].startswith("config.metrics.level")
    staff = controller.api_key("ward_staff", ward="hn.b")
    with controller.client(staff) as client:
        refused = client.post("/api/v1/rules", json=flood_rule())
    assert refused.status_code == 403
    # A technician of the other ward does not see the sensor's readings at all.
    elsewhere = controller.api_key("technician", ward="hn.a")
    with controller.client(elsewhere) as client:
        assert client.get("/api/v1/devices/sen-river/telemetry").status_code == 404
        assert client.get("/api/v1/devices/sen-river/telemetry/latest").status_code == 404
