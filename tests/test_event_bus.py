"""The event bus behind /api/v1/events and the alert webhooks: exact while a follower keeps up, coalesced
per delivery when it falls behind, and a follower dropped only when even that overflows."""

from __future__ import annotations

import pytest

from controller.services import events
from controller.services.events import EventBus


def delivery(delivery_id: str, state: str) -> dict[str, str]:
    return {"type": "delivery", "delivery_id": delivery_id, "device_id": f"dev-{delivery_id}", "state": state}


async def drain(subscription: events.Subscription, count: int) -> list[dict[str, str] | None]:
    return [await subscription.get() for _ in range(count)]


async def test_a_follower_that_keeps_up_gets_every_event_in_order() -> None:
    bus = EventBus()
    async with bus.subscribe() as subscription:
        for state in ("queued", "sent", "delivered", "playing"):
            bus.publish(delivery("d1", state))
        received = await drain(subscription, 4)
    assert [e["state"] for e in received if e] == ["queued", "sent", "delivered", "playing"]


async def test_a_follower_behind_gets_each_deliverys_latest_state_and_is_not_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "_EXACT_BACKLOG", 3)
    monkeypatch.setattr(events, "_COALESCED_BACKLOG", 10)
    bus = EventBus()
    async with bus.subscribe() as subscription:
        for state in ("queued", "sent", "delivered"):
            bus.publish(delivery("d1", state))  # within the exact backlog: all three kept
        for state in ("queued", "sent", "delivered", "playing", "completed"):
            for name in ("d2", "d3", "d4"):
                bus.publish(delivery(name, state))
        bus.publish({"type": "alarm", "detail": "không coalesce"})
        pending = await drain(subscription, 7)
    states = [(e["delivery_id"], e["state"]) if e and "delivery_id" in e else e for e in pending]
    assert states[:3] == [("d1", "queued"), ("d1", "sent"), ("d1", "delivered")]
    assert states[3:6] == [("d2", "completed"), ("d3", "completed"), ("d4", "completed")]
    assert states[6] == {"type": "alarm", "detail": "không coalesce"}


async def test_a_follower_too_far_behind_is_ended_and_the_publisher_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "_EXACT_BACKLOG", 2)
    monkeypatch.setattr(events, "_COALESCED_BACKLOG", 4)
    bus = EventBus()
    async with bus.subscribe() as slow, bus.subscribe() as fast:
        for index in range(5):
            bus.publish(delivery(f"d{index}", "queued"))
            assert await fast.get() is not None
        assert await slow.get() is None
        bus.publish(delivery("late", "queued"))
        assert (await fast.get() or {}).get("delivery_id") == "late"


async def test_closing_hands_out_what_is_pending_then_ends() -> None:
    bus = EventBus()
    async with bus.subscribe() as subscription:
        bus.publish(delivery("d1", "queued"))
        bus.close()
        assert (await subscription.get() or {}).get("state") == "queued"
        assert await subscription.get() is None
