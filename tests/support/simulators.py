"""Fixtures shared by the simulator tests: a shiftable clock, a play log path, the controller's side of
the broker (ControllerProbe) and a media server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.sim_harness import MEDIA_S, ControllerProbe, MediaServer, ShiftableClock, wav_bytes
from tests.support.broker import TestBroker


@pytest.fixture
def clock() -> ShiftableClock:
    return ShiftableClock()


@pytest.fixture
def play_log_path(tmp_path: Path) -> Path:
    return tmp_path / "play.jsonl"


@pytest.fixture
async def probe(mosquitto: TestBroker) -> AsyncIterator[ControllerProbe]:
    async with ControllerProbe(mosquitto) as controller_probe:
        yield controller_probe


@pytest.fixture
def media_server() -> Iterator[MediaServer]:
    with MediaServer() as server:
        yield server


@pytest.fixture
def media(media_server: MediaServer) -> tuple[str, str]:
    """A MEDIA_S-second WAV on the media server: (url, sha256)."""
    sha256 = media_server.add_media(wav_bytes(MEDIA_S))
    return media_server.media_url(sha256), sha256
