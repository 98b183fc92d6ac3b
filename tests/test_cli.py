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


def test_cli_schedules_add_list_show_occurrences_and_clash(controller: ControllerHandle, tmp_path: Path):
    from tests.support.scenario import seed, upload

    seed(controller)
    media_id = upload(controller, 0.5)
    api = ["--api", controller.base_url, "--token", controller.token]
    added = controller.cli(
        "schedule",
        "add",
        "--name",
        "Bản tin chiều",
        "--start",
        "2030-01-07T17:30",
        "--rrule",
        "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA",
        "--area",
        "hn.a",
        "--media-id",
        media_id,
        *api,
    )
    assert added.returncode == 0, added.stderr
    schedule_id = added.stdout.strip().splitlines()[-1]
    listed = controller.cli("schedule", "list", *api)
    assert "Bản tin chiều" in listed.stdout
    shown = controller.cli("schedule", "show", schedule_id, *api)
    assert '"rrule": "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA"' in shown.stdout
    occurrences = controller.cli(
        "schedule",
        "occurrences",
        schedule_id,
        "--from",
        "2030-01-07T00:00+07:00",
        "--to",
        "2030-01-09T00:00+07:00",
        *api,
    )
    assert occurrences.stdout.splitlines() == [
        "2030-01-07T17:30:00+07:00  (2030-01-07T10:30:00Z)",
        "2030-01-08T17:30:00+07:00  (2030-01-08T10:30:00Z)",
    ]
    bad = controller.cli(
        "schedule",
        "add",
        "--name",
        "Sai",
        "--start",
        "2030-01-07T17:30",
        "--rrule",
        "FREQ=WEEKLY;BYDAY=XX",
        "--area",
        "hn.a",
        "--media-id",
        media_id,
        *api,
    )
    assert bad.returncode == 1
    assert "rrule.BYDAY" in bad.stderr
