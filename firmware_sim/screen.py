"""A simulated networked LED screen (bảng tin điện tử) speaking docs/protocol.md §1.11 over MQTT.

The session, topics, reports, duplicates, expiry and preemption are those of every MQTT device
(firmware_sim/device.py, shared with the speaker); only the commands differ: `show` puts priority text
on the screen for `display_s` seconds (divided by the runtime's speed, like a speaker's playback) and
`stop` takes it down. Between priority texts the screen shows its own programme (a clock, the ward's
notices), which the controller never sees: the state says `showing: null`. A screen keeps no
programme cache (§1.10 is for speakers), so it subscribes to its `cmd` topic only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from firmware_sim import wire
from firmware_sim.device import DEDUPE_MEMORY, OFFLINE_REPORTS_KEPT, Job, MqttDevice
from firmware_sim.wire import ReportState, ShowCommand, StopCommand

if TYPE_CHECKING:
    from firmware_sim.device import DeviceRuntime

logger = logging.getLogger(__name__)

KIND = "led_screen"

# An accepted `show` that has not ended yet; text needs no content prepared beside the command.
_Show = Job[ShowCommand, None]


class SimulatedLedScreen(MqttDevice[ShowCommand, None]):
    """A networked LED screen; `headline` is the priority text it shows now, if any."""

    _logger = logger
    _noun = "screen"

    def __init__(
        self,
        runtime: DeviceRuntime,
        address: str,
        *,
        rssi_dbm: int | None = None,
        dedupe_memory: int = DEDUPE_MEMORY,
        offline_reports_kept: int = OFFLINE_REPORTS_KEPT,
    ) -> None:
        super().__init__(
            runtime,
            address,
            kind=KIND,
            rssi_dbm=rssi_dbm,
            dedupe_memory=dedupe_memory,
            offline_reports_kept=offline_reports_kept,
        )

    @property
    def showing(self) -> str | None:
        """The id of the `show` whose text is up, or `None` while the screen shows its own programme."""
        return self.playing

    @property
    def headline(self) -> str | None:
        return self._playing.command.text.headline if self._playing is not None else None

    # What makes it a screen (the hooks of `MqttDevice`)

    def _parse_command(self, envelope: wire.Envelope) -> ShowCommand | StopCommand:
        return wire.parse_screen_command(envelope, self.address)

    def _prepare(self, job: _Show) -> None:
        # Text needs no fetching: it is ready to go up as soon as it arrives.
        self._content_ready(job, None)

    def _planned_length(self, job: _Show) -> tuple[float, bool | None]:
        return job.command.display_s, None

    def _status(self) -> dict[str, object]:
        # `playing` as every device's state has it (§1.5), and §1.11's own members.
        return {"playing": self.playing, "showing": self.showing, "headline": self.headline}

    def _log_details(self, command: ShowCommand, state: ReportState) -> Mapping[str, object]:
        """What went up on the screen, so that a test can check the very text each screen showed."""
        if state != "playing":
            return {}
        return {
            "headline": command.text.headline,
            "color": command.style.color,
            "blink": command.style.blink,
        }
