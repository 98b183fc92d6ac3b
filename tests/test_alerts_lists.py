"""What the emergency panel reads from the alerts API: the city's pre-approved templates and the alerts
(waiting for approval, active with counts per delivery state, the recent ones), to the roles that may
send emergency alerts only; reading them spends no key's budget for sending alerts."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.console import seeded_controller
from tests.support.system import ControllerHandle

pytestmark = pytest.mark.integration

TEMPLATE = {
    "headline": "Cảnh báo bão",
    "text": "Bão số 3 sắp đổ bộ, người dân ở trong nhà.",
    "targets": {"areas": ["hn"], "devices": []},
}


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerHandle]:
    extra_env = {
        "WARDCAST_ALERTS__TEMPLATES": json.dumps({"bao-toan-thanh-pho": TEMPLATE}),
        "WARDCAST_ALERTS__RATE_LIMIT_PER_MINUTE": "5",
    }
    with seeded_controller(tmp_path_factory.mktemp("alert-lists"), extra_env=extra_env) as handle:
        yield handle


def test_templates_are_listed_to_those_who_may_send_emergency_alerts(controller: ControllerHandle):
    with controller.client(controller.api_key("operator")) as client:
        response = client.get("/api/v1/alerts/templates")
    assert response.status_code == 200, response.text
    assert response.json() == [{"name": "bao-toan-thanh-pho", **TEMPLATE}]
    for role, ward in (("ward_staff", "hn.a"), ("technician", None)):
        with controller.client(controller.api_key(role, ward)) as client:
            refused = client.get("/api/v1/alerts/templates")
            listed = client.get("/api/v1/alerts")
        assert refused.status_code == 403 and listed.status_code == 403, (role, refused.text, listed.text)


def test_alerts_are_listed_newest_first_by_status_with_their_progress(controller: ControllerHandle):
    operator = controller.api_key("operator")
    with controller.client(operator) as client:
        drill = client.post(
            "/api/v1/alerts",
            json={
                "headline": "Diễn tập",
                "text": "Thử loa.",
                "targets": {"areas": ["hn.a.t1"]},
                "mode": "drill",
            },
        )
        live = client.post(
            "/api/v1/alerts", json={"headline": "Lũ", "text": "Nước lên.", "targets": {"areas": ["hn"]}}
        )
        assert drill.status_code == 201 and live.status_code == 201, (drill.text, live.text)
        assert live.json()["status"] == "pending_approval"
        # Reads spend nothing of the key's budget for sending alerts (5 a minute here).
        for _ in range(6):
            pending = client.get("/api/v1/alerts", params={"status": "pending_approval"})
            assert pending.status_code == 200, pending.text
        active = client.get("/api/v1/alerts", params={"status": "active"}).json()
        both = client.get("/api/v1/alerts", params=[("status", "active"), ("status", "pending_approval")])
        newest = client.get("/api/v1/alerts", params={"limit": 1}).json()
        bad = client.get("/api/v1/alerts", params={"status": "playing"})
    [waiting] = pending.json()
    assert waiting["id"] == live.json()["id"] and waiting["mode"] == "live"
    assert waiting["created_by_name"] == "test-operator" and waiting["device_count"] == 0
    assert waiting["counts"] == {} and waiting["open"] == 0
    [sent] = [alert for alert in active if alert["id"] == drill.json()["id"]]
    assert sent["mode"] == "drill" and sent["device_count"] == 2 and sent["headline"] == "Diễn tập"
    assert sum(sent["counts"].values()) == 2 and sent["open"] == 2  # the speakers are offline: queued
    assert sent["targets"]["areas"] == ["hn.a.t1"]
    assert {alert["id"] for alert in both.json()} >= {drill.json()["id"], live.json()["id"]}
    assert [alert["id"] for alert in newest] == [live.json()["id"]]
    assert bad.status_code == 422 and bad.json()["field"].startswith("status"), bad.text
    with controller.client() as client:
        stopped = client.post("/api/v1/alerts/cancel-all").json()
        cancelled = client.get("/api/v1/alerts", params={"status": "cancelled"}).json()
    assert drill.json()["id"] in stopped["alerts"]
    assert drill.json()["id"] in {alert["id"] for alert in cancelled}
    after = next(alert for alert in cancelled if alert["id"] == drill.json()["id"])
    assert after["open"] == 0 and after["counts"] == {"cancelled": 2}
