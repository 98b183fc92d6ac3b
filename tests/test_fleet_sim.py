"""The fleet runner: its Python API, its command line (single and multi-process) and its inputs."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from firmware_sim import fleet
from firmware_sim.fleet import (
    Fleet,
    FleetConfig,
    FleetError,
    addresses_from_api,
    addresses_from_csv,
    generated_addresses,
    run_fleet,
    split_evenly,
)
from firmware_sim.playlog import read_play_log
from firmware_sim.speaker import BrokerSettings
from tests.sim_harness import TEST_COMMAND_KEY_TEXT, ControllerProbe, MediaServer, play_command, wav_bytes
from tests.support.broker import TestBroker

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0


def device_broker(mosquitto: TestBroker) -> BrokerSettings:
    return BrokerSettings(
        host=mosquitto.host,
        port=mosquitto.port,
        username=mosquitto.simulator.username,
        password=mosquitto.simulator.password,
    )


@pytest.mark.parametrize(("shared_media_cache", "expected_fetches"), [(True, 1), (False, 20)])
async def test_fleet_plays_a_broadcast_on_every_speaker(
    mosquitto: TestBroker,
    probe: ControllerProbe,
    media_server: MediaServer,
    tmp_path: Path,
    shared_media_cache: bool,
    expected_fetches: int,
) -> None:
    addresses = tuple(generated_addresses(20, "fleet-"))
    config = FleetConfig(
        broker=device_broker(mosquitto),
        command_key=TEST_COMMAND_KEY_TEXT,
        addresses=addresses,
        speed=50,
        play_log=tmp_path / "play.jsonl",
        shared_media_cache=shared_media_cache,
        connect_concurrency=5,
    )
    sha256 = media_server.add_media(wav_bytes(0.5))
    async with Fleet(config) as running:
        assert len(running) == len(addresses)
        assert all(speaker.connected for speaker in running.speakers.values())
        commands = [
            play_command(address, media_server.media_url(sha256), sha256, duration_s=0.5)
            for address in addresses
        ]
        for command in commands:
            await probe.send(command)
        finals = [await probe.final_report(command["id"], timeout=WAIT_S) for command in commands]

    assert {final["state"] for final in finals} == {"completed"}
    assert len(media_server.requests_for(sha256)) == expected_fetches
    played = {
        entry["address"] for entry in read_play_log(tmp_path / "play.jsonl") if entry["event"] == "playing"
    }
    assert played == set(addresses)
    await probe.wait_until(lambda: all(not probe.states[a][-1]["online"] for a in addresses) or None)


async def test_run_fleet_signals_ready_and_stops_on_request(
    mosquitto: TestBroker, probe: ControllerProbe
) -> None:
    config = FleetConfig(
        broker=device_broker(mosquitto), addresses=("run-a", "run-b"), command_key=TEST_COMMAND_KEY_TEXT
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(run_fleet(config, ready, stop))
    await asyncio.wait_for(ready.wait(), WAIT_S)
    await probe.state("run-b", lambda state: state["online"])
    stop.set()
    assert await asyncio.wait_for(running, WAIT_S) == 2
    assert probe.states["run-a"][-1] == {"v": 1, "online": False, "reason": "shutdown"}


async def test_fleet_refused_by_the_broker_raises_a_fleet_error(mosquitto: TestBroker) -> None:
    broker = BrokerSettings(host=mosquitto.host, port=mosquitto.port, username="device", password="wrong")
    with pytest.raises(FleetError, match="1 of 1 speakers could not connect"):
        async with Fleet(FleetConfig(broker=broker, addresses=("spk-1",))):
            pass


async def _start_cli(mosquitto: TestBroker, *options: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firmware_sim",
        "fleet",
        "--mqtt-url",
        mosquitto.url,
        "--username",
        mosquitto.simulator.username,
        f"--password={mosquitto.simulator.password}",  # it may start with "-"
        "--command-key",
        TEST_COMMAND_KEY_TEXT,
        *options,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )


async def _ready_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    return (await asyncio.wait_for(process.stdout.readline(), WAIT_S)).decode()


async def _terminate(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    assert process.stdout is not None
    remaining = await asyncio.wait_for(process.stdout.read(), WAIT_S)
    assert remaining == b""  # READY is the only line the fleet ever prints
    return await asyncio.wait_for(process.wait(), WAIT_S)


async def test_cli_fleet_over_two_processes_prints_ready_and_exits_cleanly_on_sigterm(
    mosquitto: TestBroker, probe: ControllerProbe, media_server: MediaServer, tmp_path: Path
) -> None:
    play_log = tmp_path / "play.jsonl"
    process = await _start_cli(
        mosquitto,
        "--count",
        "4",
        "--prefix",
        "cli-",
        "--processes",
        "2",
        "--speed",
        "50",
        "--play-log",
        str(play_log),
    )
    try:
        assert await _ready_line(process) == "READY 4\n"
        addresses = generated_addresses(4, "cli-")
        for address in addresses:
            await probe.state(address, lambda state: state["online"])
        sha256 = media_server.add_media(wav_bytes(0.5))
        commands = [
            play_command(address, media_server.media_url(sha256), sha256, duration_s=0.5)
            for address in addresses
        ]
        for command in commands:
            await probe.send(command)
        for command in commands:
            assert (await probe.final_report(command["id"], timeout=WAIT_S))["state"] == "completed"
    finally:
        exit_code = await _terminate(process)

    assert exit_code == 0
    for address in addresses:
        assert probe.states[address][-1] == {"v": 1, "online": False, "reason": "shutdown"}
    played = [str(entry["address"]) for entry in read_play_log(play_log) if entry["event"] == "playing"]
    assert sorted(played) == addresses


async def test_cli_fleet_from_csv_simulates_only_speakers(
    mosquitto: TestBroker, probe: ControllerProbe, tmp_path: Path
) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text("address,kind,ward\nspk-a,speaker,P1\nled-1,led_screen,P1\nspk-b,,P2\n")
    process = await _start_cli(mosquitto, "--csv", str(devices), "--protocol", "5")
    try:
        assert await _ready_line(process) == "READY 2\n"
        await probe.state("spk-b", lambda state: state["online"])
    finally:
        assert await _terminate(process) == 0
    assert "led-1" not in probe.states


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "no speakers to simulate"),
        (["--addresses", "Bad Address"], "not device addresses"),
        (["--count", "2", "--speed", "0"], "--speed"),
        (["--count", "2", "--mqtt-url", "http://broker"], "mqtt://host:port"),
        (["--from-api", "http://127.0.0.1:9"], "--from-api needs --token"),
        # Fail-closed (docs/protocol.md §1.15): no fleet of speakers without the key to check commands.
        (["--count", "2"], "give --command-key"),
        (["--count", "2", "--command-key", "not base64!"], "--command-key: not base64"),
        (["--count", "2", "--command-key", "AAAA"], "--command-key: an Ed25519 public key is 32 bytes"),
        (["--count", "2", "--command-key-file", "/nonexistent/key"], "--command-key-file: cannot read"),
    ],
)
def test_cli_usage_errors_exit_2(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet.main(arguments) == 2
    assert message in capsys.readouterr().err


def test_addresses_from_the_controller_api_are_its_mqtt_speakers(media_server: MediaServer) -> None:
    devices = [
        {"address": "spk-1", "kind": "speaker", "transport": "mqtt"},
        {"address": "amp-zone-1", "kind": "speaker", "transport": "modbus"},
        {"address": "spk-2", "kind": "speaker", "transport": "mqtt"},
    ]
    media_server.add_json("/api/v1/devices", {"items": devices}, token="s3cret")
    assert addresses_from_api(media_server.base_url, "s3cret") == ["spk-1", "spk-2"]
    media_server.add_json("/api/v1/devices", devices, token="s3cret")
    assert addresses_from_api(media_server.base_url + "/", "s3cret") == ["spk-1", "spk-2"]
    with pytest.raises(FleetError, match="401"):
        addresses_from_api(media_server.base_url, "wrong")


def test_csv_without_an_address_column_is_refused(tmp_path: Path) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text("id,kind\nspk-1,speaker\n")
    with pytest.raises(FleetError, match="no 'address' column"):
        addresses_from_csv(devices)


def test_generated_addresses_and_even_split() -> None:
    addresses = generated_addresses(5, "sim-", start=9)
    assert addresses == ["sim-00009", "sim-00010", "sim-00011", "sim-00012", "sim-00013"]
    assert split_evenly(addresses, 2) == [tuple(addresses[:3]), tuple(addresses[3:])]
    assert split_evenly(addresses[:1], 3) == [("sim-00009",)]


def test_fleet_config_survives_the_trip_to_a_worker(tmp_path: Path) -> None:
    config = FleetConfig(
        broker=BrokerSettings(host="127.0.0.1", port=1884, username="device", password="pw", protocol="5"),
        addresses=("a", "b"),
        command_key=TEST_COMMAND_KEY_TEXT,
        speed=3.5,
        play_log=tmp_path / "log.jsonl",
        shared_media_cache=True,
    )
    assert FleetConfig.from_json(config.to_json()) == config
