"""Media ingestion: real audio generated here, decoded for real, stored by content."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from controller.services import media
from controller.services.media import AudioInfo, MediaRejected, MediaStore, StoredMedia, decode_duration
from controller.services.tones import (
    DRILL_PREFIX_PATTERN,
    ToneSegment,
    drill_prefix_tone,
    sine_wav,
    tone_sequence_wav,
)

MAX_BYTES = 2_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- audio made on the spot -------------------------------------------------------------------------


def sine(seconds: float, samplerate: int, channels: int = 1) -> np.ndarray:
    times = np.arange(round(seconds * samplerate)) / samplerate
    mono = 0.4 * np.sin(2 * np.pi * 440.0 * times) + 0.05 * np.sin(2 * np.pi * 1250.0 * times)
    return np.repeat(mono[:, None], channels, axis=1).astype(np.float32)


def encode(
    tmp_path: Path,
    name: str,
    seconds: float,
    *,
    samplerate: int = 16000,
    channels: int = 1,
    container: str = "WAV",
    subtype: str | None = None,
    bitrate_mode: str | None = None,
    compression_level: float | None = None,
) -> bytes:
    path = tmp_path / name
    with sf.SoundFile(
        path,
        "w",
        samplerate,
        channels,
        subtype=subtype,
        format=container,
        bitrate_mode=bitrate_mode,
        compression_level=compression_level,
    ) as out:
        out.write(sine(seconds, samplerate, channels))
    return path.read_bytes()


def mpeg_frames_after_first(mp3: bytes) -> bytes:
    """The stream without its first MPEG frame, which holds the Xing/Info frame count in these files."""
    position = 4
    while not (mp3[position] == 0xFF and mp3[position + 1] & 0xE0 == 0xE0):
        position += 1
    return mp3[position:]


async def chunked(data: bytes, chunk_size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


def stored_files(store: MediaStore) -> dict[Path, bytes]:
    return {
        path: path.read_bytes()
        for path in store.root.rglob("*")
        if path.is_file() and store.root / "tmp" not in path.parents
    }


def spooled_files(store: MediaStore) -> list[Path]:
    spool = store.root / "tmp"
    return list(spool.iterdir()) if spool.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> MediaStore:
    return MediaStore(tmp_path / "media", max_bytes=MAX_BYTES)


async def ingest(store: MediaStore, data: bytes, **kwargs: str | None) -> StoredMedia:
    return await store.ingest(
        chunked(data), filename=kwargs.get("filename"), declared_type=kwargs.get("declared_type")
    )


# --- accepted audio ---------------------------------------------------------------------------------


async def test_wav_is_stored_by_content_with_exact_duration(store: MediaStore, tmp_path: Path) -> None:
    data = encode(tmp_path, "speech.wav", 2.5, samplerate=16000, subtype="PCM_16")

    stored = await ingest(store, data, filename="thong-bao.wav", declared_type="audio/wav")

    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size_bytes == len(data)
    assert stored.duration_s == pytest.approx(2.5, abs=0.001)
    assert (stored.format, stored.content_type) == ("WAV", "audio/wav")
    assert (stored.samplerate, stored.channels) == (16000, 1)
    assert stored.filename == "thong-bao.wav"
    assert store.path_for(stored.sha256) == store.root / stored.sha256[:2] / stored.sha256
    assert store.path_for(stored.sha256).read_bytes() == data
    assert store.exists(stored.sha256)
    assert spooled_files(store) == []


@pytest.mark.parametrize(
    ("name", "encoding", "seconds", "samplerate", "channels", "expected_format", "content_type"),
    [
        ("a.wav", {"container": "WAV", "subtype": "FLOAT"}, 1.234, 44100, 2, "WAV", "audio/wav"),
        ("a.wav", {"container": "WAVEX", "subtype": "PCM_24"}, 0.75, 48000, 2, "WAV", "audio/wav"),
        ("a.wav", {"container": "RF64", "subtype": "PCM_16"}, 1.5, 8000, 1, "WAV", "audio/wav"),
        ("a.ogg", {"container": "OGG", "subtype": "VORBIS"}, 3.3, 22050, 1, "OGG", "audio/ogg"),
        ("a.opus", {"container": "OGG", "subtype": "OPUS"}, 2.2, 48000, 1, "OGG", "audio/ogg"),
        ("a.mp3", {"container": "MP3"}, 4.0, 16000, 1, "MP3", "audio/mpeg"),
        ("a.mp3", {"container": "MP3"}, 2.6, 44100, 2, "MP3", "audio/mpeg"),
        (
            "a.mp3",
            {"container": "MP3", "bitrate_mode": "VARIABLE", "compression_level": 0.5},
            3.0,
            44100,
            1,
            "MP3",
            "audio/mpeg",
        ),
    ],
)
async def test_every_accepted_format_gets_its_decoded_duration(
    store: MediaStore,
    tmp_path: Path,
    name: str,
    encoding: dict[str, Any],
    seconds: float,
    samplerate: int,
    channels: int,
    expected_format: str,
    content_type: str,
) -> None:
    data = encode(tmp_path, name, seconds, samplerate=samplerate, channels=channels, **encoding)
    tolerance = 0.001 if expected_format == "WAV" else 0.05

    stored = await ingest(store, data, filename=name)

    assert stored.duration_s == pytest.approx(seconds, abs=tolerance)
    assert (stored.format, stored.content_type) == (expected_format, content_type)
    assert (stored.samplerate, stored.channels) == (samplerate, channels)


async def test_the_declared_type_is_ignored_and_the_filename_kept(store: MediaStore, tmp_path: Path) -> None:
    mp3 = encode(tmp_path, "a.mp3", 1.0, container="MP3")

    stored = await ingest(store, mp3, filename="C:\\fakepath\\Loa phường.mp3", declared_type="audio/wav")

    assert stored.content_type == "audio/mpeg"
    assert stored.filename == "Loa phường.mp3"


async def test_same_bytes_twice_give_one_file(store: MediaStore, tmp_path: Path) -> None:
    data = encode(tmp_path, "a.ogg", 1.0, container="OGG", subtype="VORBIS")

    first = await ingest(store, data, filename="first.ogg")
    second = await ingest(store, data, filename="second.ogg")

    assert first.sha256 == second.sha256
    assert list(stored_files(store)) == [store.path_for(first.sha256)]
    assert spooled_files(store) == []


@pytest.mark.parametrize(
    ("leading_silence_s", "guess_is"),
    [(0.0, "too short: decoding must go on past it"), (2.0, "too long: no truncation to report")],
)
async def test_mp3_without_frame_count_header_gets_its_real_length(
    store: MediaStore, tmp_path: Path, leading_silence_s: float, guess_is: str
) -> None:
    # Hiss makes the encoder's bitrate, and with it the first-frame guess, differ from the average.
    hiss = 0.05 * np.random.default_rng(0).standard_normal((6 * 44100, 1)).astype(np.float32)
    samples = sine(6.0, 44100) + hiss
    samples[: round(leading_silence_s * 44100)] = 0.0
    with_header_path = tmp_path / "vbr.mp3"
    with sf.SoundFile(
        with_header_path, "w", 44100, 1, format="MP3", bitrate_mode="VARIABLE", compression_level=0.5
    ) as out:
        out.write(samples)
    headerless = tmp_path / "headerless.mp3"
    headerless.write_bytes(mpeg_frames_after_first(with_header_path.read_bytes()))
    # Without the Xing frame libsndfile guesses the length from the first frame's bitrate.
    guessed_s = sf.info(headerless).frames / 44100
    assert guessed_s < 5.5 if guess_is.startswith("too short") else guessed_s > 6.5

    stored = await ingest(store, headerless.read_bytes())

    # Without the Xing/LAME tag nothing says how much encoder delay and padding to drop.
    assert stored.duration_s == pytest.approx(6.0, abs=0.1)


async def test_mp3_tags_are_not_audio(store: MediaStore, tmp_path: Path) -> None:
    id3v2 = b"ID3\x03\x00\x00\x00\x00\x00\x14" + bytes(20)
    id3v1 = b"TAG" + "Thông báo".encode().ljust(125, b"\x00")
    mp3 = encode(tmp_path, "a.mp3", 2.0, samplerate=44100, container="MP3")

    stored = await ingest(store, id3v2 + mp3 + id3v1)

    assert stored.duration_s == pytest.approx(2.0, abs=0.001)


def test_mp3_with_more_audio_than_its_header_counts_is_never_measured_by_the_header(tmp_path: Path) -> None:
    one_take = encode(tmp_path, "one.mp3", 2.0, samplerate=44100, container="MP3")
    doubled = tmp_path / "doubled.mp3"
    doubled.write_bytes(one_take + one_take)

    outcome: AudioInfo | MediaRejected
    try:
        outcome = decode_duration(doubled)
    except MediaRejected as rejection:
        outcome = rejection

    if isinstance(outcome, MediaRejected):
        assert outcome.field == "file"
        assert outcome.detail.startswith("truncated or corrupt MP3 stream")
        assert "2.000 s" not in outcome.detail
    else:
        assert outcome.duration_s == pytest.approx(4.0, abs=0.1)


def test_decode_duration_reports_what_it_decoded(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    path.write_bytes(sine_wav(440.0, 1.5, samplerate=8000))

    assert decode_duration(path) == AudioInfo(
        format="WAV", subtype="PCM_16", samplerate=8000, channels=1, frames=12000
    )
    assert decode_duration(path).duration_s == 1.5
    assert decode_duration(path).content_type == "audio/wav"


async def test_decoding_runs_off_the_event_loop(
    store: MediaStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoding_threads: list[int] = []

    def recording_decode(path: Path) -> AudioInfo:
        decoding_threads.append(threading.get_ident())
        return decode_duration(path)

    monkeypatch.setattr(media, "decode_duration", recording_decode)
    await ingest(store, sine_wav(440.0, 0.5))

    assert decoding_threads
    assert threading.get_ident() not in decoding_threads


# --- rejected uploads -------------------------------------------------------------------------------


def wav_bytes(tmp_path: Path) -> bytes:
    return encode(tmp_path, "whole.wav", 2.0, subtype="PCM_16")


def mp3_bytes(tmp_path: Path) -> bytes:
    return encode(tmp_path, "whole.mp3", 3.0, samplerate=44100, container="MP3")


REJECTIONS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "text": (lambda _: "Thông báo: cắt nước ngày mai.\n".encode() * 50, "not a WAV, MP3 or OGG audio file"),
    "png": (lambda _: PNG_SIGNATURE + b"\x00\x00\x00\rIHDR" + bytes(200), "not a WAV, MP3 or OGG audio file"),
    "empty": (lambda _: b"", "file is empty"),
    "flac": (
        lambda tmp: encode(tmp, "a.flac", 1.0, container="FLAC"),
        "not a WAV, MP3 or OGG audio file",
    ),
    "truncated wav": (
        lambda tmp: wav_bytes(tmp)[: len(wav_bytes(tmp)) // 2],
        "truncated or corrupt WAV stream: the header declares 64,000 bytes of audio, the file holds 31,978",
    ),
    "wav header then garbage": (
        lambda tmp: wav_bytes(tmp)[:44] + np.random.default_rng(7).bytes(5000),
        "truncated or corrupt WAV stream: the header declares 64,000 bytes",
    ),
    "wav header only": (lambda tmp: wav_bytes(tmp)[:44], "truncated or corrupt WAV stream"),
    "wav with no samples": (lambda _: sine_wav(440.0, 1.0)[:40] + bytes(4), "audio has no samples"),
    "truncated mp3": (
        lambda tmp: mp3_bytes(tmp)[: len(mp3_bytes(tmp)) * 2 // 3],
        "truncated or corrupt MP3 stream: the header declares 3.000 s, the stream decodes to",
    ),
    "truncated mp3 behind an id3v2 tag": (
        lambda tmp: b"ID3\x04\x00\x00\x00\x00\x01\x00" + bytes(128) + mp3_bytes(tmp)[:9000],
        "truncated or corrupt MP3 stream: the header declares 3.000 s, the stream decodes to",
    ),
    "mp3 frame sync then garbage": (
        lambda _: b"\xff\xfb\x90\xc4" + np.random.default_rng(3).bytes(3000),
        "truncated or corrupt MP3 stream",
    ),
    "ogg page header then garbage": (
        lambda _: b"OggS\x00\x02" + np.random.default_rng(5).bytes(3000),
        "truncated or corrupt OGG stream",
    ),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
async def test_non_audio_and_damaged_audio_are_rejected_without_trace(
    store: MediaStore, tmp_path: Path, case: str
) -> None:
    earlier = await ingest(store, sine_wav(660.0, 0.3))
    before = stored_files(store)
    make_upload, expected_detail = REJECTIONS[case]

    with pytest.raises(MediaRejected) as rejected:
        await ingest(store, make_upload(tmp_path), filename="upload.bin", declared_type="audio/mpeg")

    assert rejected.value.field == "file"
    assert rejected.value.detail.startswith(expected_detail)
    assert str(rejected.value) == rejected.value.detail
    assert stored_files(store) == before
    assert store.exists(earlier.sha256)
    assert spooled_files(store) == []


async def test_oversized_upload_is_cut_off_early(store: MediaStore) -> None:
    earlier = await ingest(store, sine_wav(440.0, 0.2))
    before = stored_files(store)
    chunks_taken = 0

    async def endless_upload() -> AsyncIterator[bytes]:
        nonlocal chunks_taken
        while True:
            chunks_taken += 1
            yield b"\x00" * 100_000

    with pytest.raises(MediaRejected) as rejected:
        await store.ingest(endless_upload(), filename="huge.wav", declared_type="audio/wav")

    assert rejected.value.field == "file"
    assert rejected.value.detail == "file is larger than the 2.0 MB limit"
    assert chunks_taken == MAX_BYTES // 100_000 + 1
    assert stored_files(store) == before
    assert store.exists(earlier.sha256)
    assert spooled_files(store) == []


async def test_upload_exactly_at_the_limit_is_accepted(tmp_path: Path) -> None:
    data = sine_wav(440.0, 1.0)
    store = MediaStore(tmp_path / "media", max_bytes=len(data))

    stored = await ingest(store, data)

    assert stored.size_bytes == len(data)


async def test_cancelled_upload_leaves_no_spooled_file(store: MediaStore) -> None:
    first_chunk_written = asyncio.Event()

    async def stalled_upload() -> AsyncIterator[bytes]:
        yield sine_wav(440.0, 1.0)[:1000]
        first_chunk_written.set()
        await asyncio.Event().wait()
        yield b""

    upload = asyncio.create_task(store.ingest(stalled_upload(), filename=None, declared_type=None))
    await first_chunk_written.wait()
    assert len(spooled_files(store)) == 1
    upload.cancel()

    with pytest.raises(asyncio.CancelledError):
        await upload
    assert spooled_files(store) == []
    assert stored_files(store) == {}


# --- addressing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "not_a_digest",
    ["../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "", "../" + "a" * 61, "a" * 64 + "\n"],
)
def test_path_for_accepts_only_lowercase_sha256_hex(store: MediaStore, not_a_digest: str) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        store.path_for(not_a_digest)
    assert not store.exists(not_a_digest)


def test_unknown_digest_does_not_exist(store: MediaStore) -> None:
    assert not store.exists("0" * 64)


def test_store_needs_a_positive_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MediaStore(tmp_path, max_bytes=0)


# --- generated tones --------------------------------------------------------------------------------


def dominant_frequency(samples: np.ndarray, samplerate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / samplerate)[np.argmax(spectrum)])


@pytest.mark.parametrize(
    ("frequency_hz", "seconds", "samplerate"), [(440.0, 1.0, 16000), (1000.0, 0.37, 8000)]
)
def test_sine_wav_decodes_to_its_length_and_pitch(
    frequency_hz: float, seconds: float, samplerate: int
) -> None:
    samples, decoded_rate = sf.read(io.BytesIO(sine_wav(frequency_hz, seconds, samplerate)))

    assert decoded_rate == samplerate
    assert len(samples) == round(seconds * samplerate)
    assert dominant_frequency(samples, samplerate) == pytest.approx(
        frequency_hz, abs=samplerate / len(samples)
    )
    assert 0.45 < np.max(np.abs(samples)) <= 0.5
    assert abs(samples[0]) < 0.01  # faded in: no click at the start


def test_drill_prefix_is_a_distinct_two_tone_pattern() -> None:
    samples, samplerate = sf.read(io.BytesIO(drill_prefix_tone()))

    assert len(samples) / samplerate == pytest.approx(sum(s.seconds for s in DRILL_PREFIX_PATTERN))
    heard: list[float] = []
    start = 0
    for segment in DRILL_PREFIX_PATTERN:
        stop = start + round(segment.seconds * samplerate)
        if segment.frequency_hz:
            heard.append(dominant_frequency(samples[start:stop], samplerate))
        else:
            assert np.max(np.abs(samples[start:stop])) == 0
        start = stop
    assert heard == pytest.approx([1000.0, 750.0] * 3, abs=5.0)


async def test_generated_tones_are_accepted_media(store: MediaStore) -> None:
    stored = await ingest(store, drill_prefix_tone(), filename="drill-prefix.wav")

    assert stored.duration_s == pytest.approx(2.0, abs=0.001)
    assert stored.content_type == "audio/wav"


@pytest.mark.parametrize(
    ("segments", "samplerate", "amplitude", "complaint"),
    [
        ([ToneSegment(9000.0, 1.0)], 16000, 0.5, "frequency"),
        ([ToneSegment(-1.0, 1.0)], 16000, 0.5, "frequency"),
        ([ToneSegment(440.0, 0.0)], 16000, 0.5, "last more than 0 s"),
        ([ToneSegment(440.0, 1.0)], 0, 0.5, "samplerate"),
        ([ToneSegment(440.0, 1.0)], 16000, 1.5, "amplitude"),
        ([], 16000, 0.5, "at least one segment"),
    ],
)
def test_impossible_tones_are_refused(
    segments: list[ToneSegment], samplerate: int, amplitude: float, complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        tone_sequence_wav(segments, samplerate, amplitude=amplitude)
