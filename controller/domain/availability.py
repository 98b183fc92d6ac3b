"""Device availability: who is online, decided from Last Wills, heartbeats and timeouts (issue 6).

A device says it is online in its retained state (docs/protocol.md §1.5) and repeats that state every
heartbeat; the broker publishes its Last Will when the connection dies. Neither alone is enough: a
connection can stay open while the device's firmware is hung (IoT platforms then show it "active"
forever), so a device that has said nothing within its kind's timeout is offline as well.

`AvailabilityMonitor` is the whole rule, with no I/O: it is told what each device said and what time it
is, and answers the transitions and alarm changes to record. Deadlines are kept so that checking is
cheap whatever the fleet's size: one queue per device kind in the order devices were last heard (every
device of a kind has the same timeout, so that order is also the order of their deadlines), and a heap
of alarm deadlines for the offline devices. A sweep looks only at the heads: it costs nothing when
nothing is due, and O(1) per device that is.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

# Why a device went offline, as recorded: the device's own state says `will` (broker, connection lost)
# or `shutdown` (clean stop), or the controller inferred it.
TIMEOUT: Final = "timeout"
# A state that said online (or any report): the device spoke.
STATE: Final = "state"
_MAX_REASON = 32


@dataclass(frozen=True, slots=True)
class KindTiming:
    """How often a device of one kind says it is alive, and how long the controller waits."""

    heartbeat_s: float
    # Nothing heard for this long: offline. At least two heartbeats, so that one lost message (a 4G
    # handover) never flips a device.
    timeout_s: float
    # Offline for this long: an alarm, cleared when the device returns.
    alarm_after_s: float

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be greater than 0")
        if self.timeout_s < 2 * self.heartbeat_s:
            raise ValueError("timeout_s must be at least twice heartbeat_s")
        if self.alarm_after_s <= 0:
            raise ValueError("alarm_after_s must be greater than 0")


@dataclass(frozen=True, slots=True)
class Transition:
    device_id: str
    online: bool
    # When it happened: the device's state time when it gave one, else when the controller noticed
    # (for a timeout, the instant the timeout ran out).
    at: datetime
    detected_at: datetime
    reason: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class AlarmChange:
    device_id: str
    raised: bool
    at: datetime
    # When the device went offline (the transition the alarm is about).
    offline_since: datetime


@dataclass(slots=True)
class Changes:
    transitions: list[Transition] = field(default_factory=list)
    alarms: list[AlarmChange] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.transitions or self.alarms)

    def extend(self, other: Changes) -> None:
        self.transitions.extend(other.transitions)
        self.alarms.extend(other.alarms)


@dataclass(slots=True)
class _Device:
    kind: str
    # `None` until the device is first heard (or loaded): a device never installed is neither.
    online: bool | None = None
    # The time of its latest transition.
    since: datetime | None = None
    alarm: bool = False
    # Bumped on every transition, so that an alarm deadline left in the heap for an earlier offline
    # spell is recognised as stale.
    generation: int = 0


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """What the controller knew of a device when it stopped, to start again from (no double alarm)."""

    device_id: str
    kind: str
    online: bool
    since: datetime | None
    alarm_active: bool
    # Whether it is heard through heartbeats (MQTT); polled devices are judged by their driver.
    heartbeat: bool


class AvailabilityMonitor:
    def __init__(self, timings: Mapping[str, KindTiming], default: KindTiming) -> None:
        self._timings = dict(timings)
        self._default = default
        self._devices: dict[str, _Device] = {}
        # Per kind: device id → the instant it times out, oldest first.
        self._deadlines: dict[str, OrderedDict[str, datetime]] = {}
        # (due, device id, generation) of offline devices whose alarm is not raised yet.
        self._alarm_heap: list[tuple[datetime, str, int]] = []

    def timing(self, kind: str) -> KindTiming:
        return self._timings.get(kind, self._default)

    def __len__(self) -> int:
        return len(self._devices)

    # -- the fleet ---------------------------------------------------------------------------------
    def register(self, device_id: str, kind: str) -> None:
        """A device now known (or changed kind); its state is unknown until it is heard."""
        held = self._devices.get(device_id)
        if held is None:
            self._devices[device_id] = _Device(kind)
            return
        if held.kind != kind:
            deadline = self._queue(held.kind).pop(device_id, None)
            held.kind = kind
            if deadline is not None:
                self._queue(kind)[device_id] = deadline
                # Its deadline is the old kind's: re-placed at the end, judged at the next sighting.

    def forget(self, device_id: str) -> None:
        held = self._devices.pop(device_id, None)
        if held is not None:
            self._queue(held.kind).pop(device_id, None)
            # Its alarm heap entry goes stale: no device, nothing raised.

    def restore(self, snapshot: DeviceSnapshot, now: datetime) -> None:
        """The device as it was recorded. An online device gets a whole timeout from `now`: nobody
        could hear it while the controller was down; an offline one keeps its alarm deadline."""
        device = _Device(snapshot.kind, snapshot.online, snapshot.since, snapshot.alarm_active)
        self._devices[snapshot.device_id] = device
        timing = self.timing(snapshot.kind)
        if snapshot.online and snapshot.heartbeat:
            self._queue(snapshot.kind)[snapshot.device_id] = now + timedelta(seconds=timing.timeout_s)
        elif not snapshot.online and not snapshot.alarm_active and snapshot.since is not None:
            self._arm_alarm(snapshot.device_id, device, snapshot.since)

    def is_online(self, device_id: str) -> bool | None:
        held = self._devices.get(device_id)
        return held.online if held is not None else None

    def knows(self, device_id: str) -> bool:
        return device_id in self._devices

    # -- what devices say ---------------------------------------------------------------------------
    def heard(
        self,
        device_id: str,
        *,
        online: bool,
        now: datetime,
        said_at: datetime | None = None,
        reason: str | None = None,
        heartbeat: bool = True,
    ) -> Changes:
        """The device said it is online (a state, a report) or offline (its Last Will, a shutdown).

        `said_at` is the time in the device's document, if any; `heartbeat` is false for devices a
        driver polls, which have no timeout of their own. An online state already older than the
        timeout when it arrives (a retained state replayed by the broker from a device that went
        silent) is no sign of life.
        """
        device = self._devices.get(device_id)
        if device is None:
            return Changes()
        timing = self.timing(device.kind)
        timeout = timedelta(seconds=timing.timeout_s)
        if online:
            if heartbeat and said_at is not None and said_at + timeout <= now:
                return Changes()
            if heartbeat:
                queue = self._queue(device.kind)
                queue.pop(device_id, None)
                queue[device_id] = now + timeout
            if device.online:
                return Changes()
            return self._change(
                device_id, device, True, _bounded(said_at, device.since, now), now, reason or STATE
            )
        self._queue(device.kind).pop(device_id, None)
        if device.online is False:
            return Changes()  # already offline (timed out before its Last Will came)
        return self._change(
            device_id, device, False, _bounded(said_at, device.since, now), now, reason or STATE
        )

    def alive(self, device_id: str, now: datetime) -> None:
        """A sign of life other than a state (a command report): pushes the deadline of a device that
        is online and heartbeating; changes nothing else."""
        device = self._devices.get(device_id)
        if device is None or not device.online:
            return
        queue = self._queue(device.kind)
        if device_id in queue:
            del queue[device_id]
            queue[device_id] = now + timedelta(seconds=self.timing(device.kind).timeout_s)

    def sweep(self, now: datetime) -> Changes:
        """Every timeout and alarm due by `now`."""
        changes = Changes()
        for kind, queue in self._deadlines.items():
            timeout_s = self.timing(kind).timeout_s
            while queue:
                device_id, deadline = next(iter(queue.items()))
                if deadline > now:
                    break
                del queue[device_id]
                device = self._devices[device_id]
                if device.online is False:
                    continue
                changes.extend(
                    self._change(
                        device_id,
                        device,
                        False,
                        deadline,
                        now,
                        TIMEOUT,
                        detail=f"nothing heard for {timeout_s:g} s",
                    )
                )
        while self._alarm_heap and self._alarm_heap[0][0] <= now:
            due, device_id, generation = heapq.heappop(self._alarm_heap)
            offline = self._devices.get(device_id)
            if (
                offline is None
                or offline.generation != generation
                or offline.online is not False
                or offline.alarm
                or offline.since is None
            ):
                continue
            offline.alarm = True
            changes.alarms.append(AlarmChange(device_id, True, due, offline.since))
        return changes

    def next_due(self) -> datetime | None:
        """The earliest instant a sweep would find something to do."""
        heads = [next(iter(queue.values())) for queue in self._deadlines.values() if queue]
        if self._alarm_heap:
            heads.append(self._alarm_heap[0][0])
        return min(heads, default=None)

    # -- internals ----------------------------------------------------------------------------------
    def _queue(self, kind: str) -> OrderedDict[str, datetime]:
        queue = self._deadlines.get(kind)
        if queue is None:
            queue = self._deadlines[kind] = OrderedDict()
        return queue

    def _change(
        self,
        device_id: str,
        device: _Device,
        online: bool,
        at: datetime,
        now: datetime,
        reason: str,
        *,
        detail: str | None = None,
    ) -> Changes:
        changes = Changes()
        changes.transitions.append(Transition(device_id, online, at, now, reason[:_MAX_REASON], detail))
        offline_since = device.since
        device.online = online
        device.since = at
        device.generation += 1
        if online:
            if device.alarm:
                device.alarm = False
                changes.alarms.append(AlarmChange(device_id, False, at, offline_since or at))
        else:
            self._arm_alarm(device_id, device, at)
        return changes

    def _arm_alarm(self, device_id: str, device: _Device, offline_since: datetime) -> None:
        due = offline_since + timedelta(seconds=self.timing(device.kind).alarm_after_s)
        heapq.heappush(self._alarm_heap, (due, device_id, device.generation))


def _bounded(said_at: datetime | None, previous: datetime | None, now: datetime) -> datetime:
    """The device's own time for a transition, kept between the previous transition and now: a device
    clock running ahead (or behind) never dates a change in the future or before the last one."""
    at = now if said_at is None or said_at > now else said_at
    if previous is not None and at < previous:
        return previous
    return at
