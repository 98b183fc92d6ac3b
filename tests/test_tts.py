"""Text-to-speech with the real espeak-ng: Vietnamese audio, one media item per text, clear errors."""

from __future__ import annotations

import io
import shutil
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from controller.services.errors import ServiceError
from controller.services.media import MediaStore, StoredMedia, decode_duration
from controller.services.tts import SpeechSynthesizer, speech_media_id
from controller.settings import TtsSettings
from tests.support.system import ControllerHandle

ANNOUNCEMENT = "Thông báo: sáng mai 6 giờ, tổ dân phố 1 họp tại nhà văn hoá."


@pytest.fixture(autouse=True)
def espeak_ng() -> str:
    """espeak-ng is a requirement of these tests, never a reason to skip them."""
    binary = TtsSettings().binary
    path = shutil.which(binary)
    if path is None:
        pytest.fail(
            f"{binary!r} is not installed, so text-to-speech cannot be tested: run `make test` "
            "(it installs the system packages) or `apt-get install espeak-ng`"
        )
    return path


class CountingSynthesizer(SpeechSynthesizer):
    """The real synthesizer, counting how often espeak-ng runs."""

    def __init__(self, settings: TtsSettings) -> None:
        super().__init__(settings)
        self.runs = 0

    async def synthesize(self, text: str) -> bytes:
        self.runs += 1
        return await super().synthesize(text)


class MediaTable:
    """Stands in for the media table: one id per digest, reused like routes/media.py `_record`."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    def record(self, stored: StoredMedia) -> str:
        return self.ids.setdefault(stored.sha256, f"media-{len(self.ids) + 1}")


async def test_a_vietnamese_announcement_becomes_whole_plausible_wav(tmp_path: Path):
    audio = await SpeechSynthesizer(TtsSettings()).synthesize(ANNOUNCEMENT)
    path = tmp_path / "announcement.wav"
    path.write_bytes(audio)
    info = decode_duration(path)  # the media store's own full decode, header lengths checked
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)
    # 13 Vietnamese words at 150 words a minute: about five seconds of speech.
    assert 1.0 < info.duration_s < 15.0, info
    samples, _rate = soundfile.read(io.BytesIO(audio))
    assert float(np.sqrt(np.mean(np.square(samples)))) > 0.01, "the audio is silent"


async def test_decomposed_text_speaks_exactly_like_composed_text():
    synthesizer = SpeechSynthesizer(TtsSettings())
    decomposed = unicodedata.normalize("NFD", ANNOUNCEMENT)
    assert decomposed != ANNOUNCEMENT
    assert synthesizer.cache_key(decomposed) == synthesizer.cache_key(ANNOUNCEMENT)
    assert await synthesizer.synthesize(decomposed) == await synthesizer.synthesize(ANNOUNCEMENT)


async def test_the_same_text_is_synthesized_once_and_keeps_its_media_id(tmp_path: Path):
    store = MediaStore(tmp_path / "media", 10_000_000)
    synthesizer = CountingSynthesizer(TtsSettings())
    table = MediaTable()

    async def media_id(text: str, speech: SpeechSynthesizer = synthesizer) -> str:
        return await speech_media_id(text, synthesizer=speech, store=store, record=table.record)

    first = await media_id(ANNOUNCEMENT)
    assert await media_id(ANNOUNCEMENT) == first
    assert await media_id(f"  {unicodedata.normalize('NFD', ANNOUNCEMENT)}\n") == first
    assert synthesizer.runs == 1
    (sha256,) = table.ids
    assert store.exists(sha256)

    # Without its index the text is spoken again, to the same bytes, hence the same digest and id.
    shutil.rmtree(tmp_path / "media" / "tts")
    assert await media_id(ANNOUNCEMENT) == first
    assert synthesizer.runs == 2

    # Another text, or the same text in another voice, is other audio.
    assert await media_id("Mời bà con đi tiêm phòng.") != first
    southern = CountingSynthesizer(TtsSettings(voice="vi-vn-x-south"))
    assert await media_id(ANNOUNCEMENT, southern) != first
    assert southern.runs == 1


@pytest.mark.parametrize("text", ["", "   \n\t ", "… ? !", "x" * 11])
async def test_empty_or_too_long_text_is_refused_naming_content_tts(tmp_path: Path, text: str):
    store = MediaStore(tmp_path / "media", 10_000_000)
    with pytest.raises(ServiceError) as raised:
        await speech_media_id(
            text,
            synthesizer=SpeechSynthesizer(TtsSettings(max_chars=10)),
            store=store,
            record=MediaTable().record,
        )
    assert (raised.value.status, raised.value.field) == (422, "content.tts")
    assert not (tmp_path / "media").exists()


async def test_a_missing_espeak_ng_is_a_503_that_names_the_package(tmp_path: Path):
    synthesizer = SpeechSynthesizer(TtsSettings(binary=str(tmp_path / "espeak-ng")))
    with pytest.raises(ServiceError) as raised:
        await synthesizer.synthesize(ANNOUNCEMENT)
    assert (raised.value.status, raised.value.field) == (503, "content.tts")
    assert "apt-get install espeak-ng" in raised.value.detail


async def test_an_espeak_ng_failure_carries_its_own_message():
    synthesizer = SpeechSynthesizer(TtsSettings(voice="xx-no-such-voice"))
    with pytest.raises(ServiceError) as raised:
        await synthesizer.synthesize(ANNOUNCEMENT)
    assert (raised.value.status, raised.value.field) == (503, "content.tts")
    assert "exit status" in raised.value.detail
    assert "voice does not exist" in raised.value.detail


def _tts_schedule(api: ControllerHandle, text: str, name: str) -> Any:
    body = {
        "name": name,
        "targets": {"areas": ["hn.a"]},
        "content": {"tts": text},
        "dtstart": "2030-03-04T06:00",
        "rrule": "FREQ=WEEKLY;BYDAY=MO",
    }
    with api.client() as client:
        return client.post("/api/v1/schedules", json=body)


@pytest.mark.integration
def test_a_schedule_with_tts_content_plays_the_spoken_text(api: ControllerHandle):
    created = _tts_schedule(api, ANNOUNCEMENT, "Họp tổ dân phố")
    assert created.status_code == 201, created.text
    again = _tts_schedule(api, unicodedata.normalize("NFD", ANNOUNCEMENT), "Họp tổ dân phố (nhắc lại)")
    assert again.status_code == 201, again.text
    with api.client() as client:
        shown = client.get(f"/api/v1/schedules/{created.json()['id']}").json()
        (media_id,) = shown["content"]["media_ids"]
        assert client.get(f"/api/v1/schedules/{again.json()['id']}").json()["content"]["media_ids"] == [
            media_id
        ]
        media = client.get(f"/api/v1/media/{media_id}").json()
        assert media["content_type"] == "audio/wav" and media["duration_s"] > 1.0, media
        assert media["filename"].startswith("TTS Thông báo: sáng mai 6 giờ"), media
        audio = client.get(f"/media/{media['sha256']}")
        assert audio.status_code == 200
        info = soundfile.info(io.BytesIO(audio.content))
        assert info.duration == pytest.approx(media["duration_s"], abs=0.01)
        for response in (created, again):
            assert client.delete(f"/api/v1/schedules/{response.json()['id']}").status_code == 204


@pytest.mark.integration
def test_an_empty_tts_text_is_refused_through_the_api(api: ControllerHandle):
    response = _tts_schedule(api, " \n ", "Trống")
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "content.tts", response.json()


@pytest.mark.integration
def test_a_bad_time_rule_is_refused_before_any_speech_is_made(api: ControllerHandle):
    with api.client() as client:
        media_before = client.get("/api/v1/media").json()
    body = {
        "name": "Sai quy tắc",
        "targets": {"areas": ["hn.a"]},
        "content": {"tts": "Một câu chưa từng được đọc trước đây."},
        "dtstart": "2030-03-04T06:00",
        "rrule": "FREQ=FORTNIGHTLY",
    }
    with api.client() as client:
        response = client.post("/api/v1/schedules", json=body)
        media_after = client.get("/api/v1/media").json()
    assert response.status_code == 422, response.text
    assert response.json()["field"].startswith("rrule"), response.json()
    assert media_after == media_before  # nothing spoken, nothing stored
