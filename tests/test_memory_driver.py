"""The in-memory fake driver that domain and dispatcher tests run against."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from drivers.base import (
    CommandReport,
    DeviceCommand,
    DeviceTimeout,
    DeviceUnreachable,
    LinkState,
    ProtocolError,
)
from drivers.memory import MemoryDriver

NOW = datetime(2026, 11, 24, 6, tzinfo=UTC)


def command(number: int) -> DeviceCommand:
    return DeviceCommand(
        address="spk-1",
        command_id=f"c-{number}",
        document={"v": 1, "id": f"c-{number}", "device": "spk-1"},
        expires_at=NOW,
    )


async def test_records_sends_and_acks_with_the_injected_clock() -> None:
    async with MemoryDriver(clock=lambda: NOW) as driver:
        ack = await driver.send(command(1), timeout=1)
        assert ack.command_id == "c-1"
        assert ack.accepted_at == NOW
        assert driver.sent == [command(1)]
        assert await driver.ping()


async def test_wait_sent_wakes_when_enough_commands_arrived() -> None:
    driver = MemoryDriver()
    waiting = asyncio.create_task(driver.wait_sent(2))
    await driver.send(command(1), timeout=1)
    assert not waiting.done()
    await driver.send(command(2), timeout=1)
    assert [sent.command_id for sent in await asyncio.wait_for(waiting, 5)] == ["c-1", "c-2"]


@pytest.mark.parametrize(
    ("failure", "error"),
    [("unreachable", DeviceUnreachable), ("timeout", DeviceTimeout), ("protocol", ProtocolError)],
)
async def test_injected_failures(failure: str, error: type[Exception]) -> None:
    driver = MemoryDriver()
    driver.fail_with(failure, times=2)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(error):
            await driver.send(command(1), timeout=1)
    await driver.send(command(2), timeout=1)
    assert [sent.command_id for sent in driver.sent] == ["c-2"]


async def test_link_down_refuses_sends_and_tells_listeners() -> None:
    driver = MemoryDriver()
    seen: list[LinkState] = []
    remove = driver.add_link_listener(seen.append)
    driver.set_link("disconnected")
    with pytest.raises(DeviceUnreachable):
        await driver.send(command(1), timeout=1)
    assert not await driver.ping()
    reconnected = asyncio.create_task(driver.wait_connected())
    driver.set_link("connected")
    await asyncio.wait_for(reconnected, 5)
    remove()
    driver.set_link("disconnected")
    assert seen == ["disconnected", "connected"]


async def test_pushed_events_flow_until_the_driver_closes() -> None:
    report = CommandReport("spk-1", "c-1", "d-1", "playing", NOW)
    async with MemoryDriver() as driver:
        driver.push(report)
        events = driver.events()
        assert await asyncio.wait_for(anext(events), 5) == report
    assert [event async for event in events] == []


def test_fail_with_refuses_a_count_below_one() -> None:
    with pytest.raises(ValueError, match="times"):
        MemoryDriver().fail_with("timeout", times=0)
