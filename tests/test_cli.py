"""The `wardcast` CLI against a running controller: import, devices, and a broadcast to one group."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.scenario import AREAS_YAML, SPEAKERS, wav_bytes
from tests.support.system import ControllerHandle, FleetHandle

pytestmark = pytest.mark.integration


def test_cli_imports_adds_lists_and_broadcasts_to_one_group(
    controller: ControllerHandle, fleet: FleetHandle, tmp_path: Path
):
    api = ["--api", controller.base_url, "--token", controller.token]
    areas = tmp_path / "areas.yaml"
    areas.write_bytes(AREAS_YAML)
    imported = controller.cli("area", "import", str(areas), *api)
    assert imported.returncode == 0, imported.stderr
    assert "created 8" in imported.stdout
    again = controller.cli("area", "import", str(areas), *api)
    assert "unchanged 8" in again.stdout

    for area, addresses in SPEAKERS.items():
        for address in addresses:
            added = controller.cli(
                "device",
                "add",
                "--kind",
                "speaker",
                "--area",
                area,
                "--id",
                f"spk-{address}",
                "--address",
                address,
                "--lat",
                "22.15",
                "--lon",
                "105.83",
                *api,
            )
            assert added.returncode == 0, added.stderr
    duplicate = controller.cli(
        "device", "add", "--kind", "speaker", "--area", "hn.a", "--id", "spk-a1-1", *api
    )
    assert duplicate.returncode == 1
    assert "id" in duplicate.stderr and "already exists" in duplicate.stderr

    listed = controller.cli("device", "list", "--area", "hn.b", *api)
    assert listed.returncode == 0, listed.stderr
    assert "spk-b1-1" in listed.stdout and "spk-a1-1" not in listed.stdout

    audio = tmp_path / "thong-bao.wav"
    audio.write_bytes(wav_bytes(2.0))
    sent = controller.cli(
        "broadcast", "send", "--area", "hn.b.t1", "--media", str(audio), "--timeout", "60", *api
    )
    assert sent.returncode == 0, sent.stderr
    broadcast_id = sent.stdout.strip().splitlines()[-1]
    assert "'completed': 2" in sent.stderr
    played = {
        p["address"] for p in fleet.plays() if p["broadcast_id"] == broadcast_id and p["event"] == "playing"
    }
    assert played == {"b1-1", "b1-2"}


def test_cli_errors_name_the_field(controller: ControllerHandle, tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("code,name,kind,parent\nx,,ward,\n")
    result = controller.cli(
        "area", "import", str(bad), "--api", controller.base_url, "--token", controller.token
    )
    assert result.returncode == 1
    assert "name" in result.stderr
    wrong_role = controller.cli("apikey", "create", "--name", "x", "--role", "mayor")
    assert wrong_role.returncode == 2
    assert "role" in wrong_role.stderr
