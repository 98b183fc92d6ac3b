"""Text-to-speech for `content.tts`: espeak-ng speaks the text, the media store keeps the WAV.

A text becomes an ordinary media item, so devices fetch and verify it like an upload (docs/protocol.md).
Each text is synthesized once: `root/tts/<key[:2]>/<key>.json` in the media directory records the
stored audio a cache key produced, the key being the SHA-256 of the engine settings and the normalised
text. The index lives beside the audio it points to and adds nothing to the database schema; if it is
lost, the same text is synthesized again and, espeak-ng's output being deterministic for the same input
and version, stored under the same digest, so `_record`-style reuse by digest still yields the same id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import unicodedata
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

from controller.services.errors import ServiceError
from controller.services.media import MediaRejected, MediaStore, StoredMedia
from controller.settings import TtsSettings

FIELD: Final = "content.tts"
PACKAGE: Final = "espeak-ng"  # the Debian package that provides the binary
_TIMEOUT_S: Final = 120.0
_STDERR_SHOWN_CHARS: Final = 1000
_FILENAME_TEXT_CHARS: Final = 60
_RIFF_CHUNK: Final = struct.Struct("<4sI")
_RIFF_HEADER_BYTES: Final = 12
_UNAVAILABLE: Final = 503

# Blocking; called in a worker thread with the stored audio, returns the id of its media row.
RecordMedia = Callable[[StoredMedia], str]


class SpeechSynthesizer:
    """Runs `espeak-ng -v <voice> -s <speed> -p <pitch> --stdout` with the text on stdin; returns WAV."""

    def __init__(self, settings: TtsSettings) -> None:
        self._settings = settings

    @property
    def settings(self) -> TtsSettings:
        return self._settings

    def prepare(self, text: str) -> str:
        """The text as espeak-ng gets it: NFC, control characters as spaces, trimmed; ServiceError (422,
        field `content.tts`) when nothing speakable is left or it is longer than `tts.max_chars`."""
        # NFC: a text typed on macOS arrives decomposed (a + combining marks), which must not make new audio.
        normalised = unicodedata.normalize("NFC", text)
        cleaned = "".join(c if c.isprintable() or c == "\n" else " " for c in normalised).strip()
        if not any(c.isalnum() for c in cleaned):
            raise ServiceError(FIELD, "the text is empty: give the words to announce")
        limit = self._settings.max_chars
        if len(cleaned) > limit:
            raise ServiceError(FIELD, f"the text has {len(cleaned)} characters; the limit is {limit}")
        return cleaned

    def cache_key(self, text: str) -> str:
        """SHA-256 of the voice settings and the prepared text: equal keys give equal audio."""
        material = {
            "engine": PACKAGE,
            "voice": self._settings.voice,
            "speed_wpm": self._settings.speed_wpm,
            "pitch": self._settings.pitch,
            "text": self.prepare(text),
        }
        encoded = json.dumps(material, ensure_ascii=False, sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()

    async def synthesize(self, text: str) -> bytes:
        """A mono 16-bit WAV of `text`. ServiceError 422 for an empty or too long text, 503 when espeak-ng
        is missing, fails (its stderr is in the detail) or hangs."""
        spoken = self.prepare(text)
        binary = self._settings.binary
        argv = [
            binary,
            "-v",
            self._settings.voice,
            "-s",
            str(self._settings.speed_wpm),
            "-p",
            str(self._settings.pitch),
            "-b",
            "1",  # the input is UTF-8 whatever the locale
            "--stdin",  # the whole text at once, not line by line
            "--stdout",
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as error:
            raise ServiceError(
                FIELD,
                f"text-to-speech is not available: {binary!r} was not found on the controller; "
                f"install the {PACKAGE} package (apt-get install {PACKAGE}) or set tts.binary",
                status=_UNAVAILABLE,
            ) from error
        except OSError as error:
            raise ServiceError(
                FIELD, f"text-to-speech is not available: cannot run {binary!r}: {error}", status=_UNAVAILABLE
            ) from error
        try:
            async with asyncio.timeout(_TIMEOUT_S):
                audio, errors = await process.communicate(spoken.encode())
        except TimeoutError as error:
            raise ServiceError(
                FIELD, f"{PACKAGE} did not finish within {_TIMEOUT_S:.0f} s", status=_UNAVAILABLE
            ) from error
        finally:
            if process.returncode is None:  # timed out or cancelled: do not leave it running
                process.kill()
                await process.wait()
        message = errors.decode("utf-8", "replace").strip()[:_STDERR_SHOWN_CHARS]
        if process.returncode != 0:
            raise ServiceError(
                FIELD,
                f"{PACKAGE} failed (exit status {process.returncode}): {message or 'no message'}",
                status=_UNAVAILABLE,
            )
        return _seal_wav(audio, message)


async def speech_media_id(
    text: str, *, synthesizer: SpeechSynthesizer, store: MediaStore, record: RecordMedia
) -> str:
    """The id of the media item that speaks `text`, synthesizing and storing it the first time only."""
    key = synthesizer.cache_key(text)
    index = _SpeechIndex(store.root / "tts")
    async with _locks.hold(key):  # the same text asked for twice at once is synthesized once
        stored = await asyncio.to_thread(index.lookup, key, store)
        if stored is None:
            audio = await synthesizer.synthesize(text)
            filename = _filename(synthesizer.prepare(text))
            try:
                stored = await store.ingest(_one_chunk(audio), filename=filename, declared_type="audio/wav")
            except MediaRejected as error:
                raise ServiceError(
                    FIELD, f"the synthesized speech cannot be stored: {error.detail}", status=_UNAVAILABLE
                ) from error
            media_id = await asyncio.to_thread(record, stored)
            await asyncio.to_thread(index.remember, key, stored)
            return media_id
        return await asyncio.to_thread(record, stored)


class _SpeechIndex:
    """Cache key → the StoredMedia it produced, one small JSON file per key."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, key: str) -> Path:
        return self._root / key[:2] / f"{key}.json"

    def lookup(self, key: str, store: MediaStore) -> StoredMedia | None:
        """The stored audio for `key`, or None when unknown, unreadable or its file has gone."""
        try:
            fields = json.loads(self._path(key).read_text(encoding="utf-8"))
            stored = StoredMedia(**fields)
        except (OSError, ValueError, TypeError):
            return None
        return stored if store.exists(stored.sha256) else None

    def remember(self, key: str, stored: StoredMedia) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=".index-", suffix=".part")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as sink:
                json.dump(dataclasses.asdict(stored), sink, ensure_ascii=False)
            Path(name).replace(path)  # atomic: a reader sees no entry or a whole one
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise


class _KeyLocks:
    """One asyncio.Lock per key while someone holds or awaits it; gone afterwards."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def hold(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock


_locks = _KeyLocks()


def _seal_wav(audio: bytes, stderr: str) -> bytes:
    """espeak-ng streams to stdout and cannot seek back, so its WAV header declares a placeholder length
    (about 2 GB); write the real RIFF and data sizes, which the media store checks."""
    if len(audio) < _RIFF_HEADER_BYTES or audio[:4] != b"RIFF" or audio[8:12] != b"WAVE":
        raise ServiceError(
            FIELD,
            f"{PACKAGE} wrote no WAV audio{': ' + stderr if stderr else ''}",
            status=_UNAVAILABLE,
        )
    wav = bytearray(audio)
    offset = _RIFF_HEADER_BYTES
    while offset + _RIFF_CHUNK.size <= len(wav):
        chunk_id, chunk_bytes = _RIFF_CHUNK.unpack_from(wav, offset)
        if chunk_id == b"data":
            data_bytes = len(wav) - offset - _RIFF_CHUNK.size
            _RIFF_CHUNK.pack_into(wav, offset, b"data", data_bytes)
            if data_bytes & 1:
                wav.append(0)  # chunks are word-aligned; the pad byte is not part of the data
            struct.pack_into("<I", wav, 4, len(wav) - 8)
            return bytes(wav)
        offset += _RIFF_CHUNK.size + chunk_bytes + (chunk_bytes & 1)
    raise ServiceError(FIELD, f"{PACKAGE} wrote a WAV header without audio data", status=_UNAVAILABLE)


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _filename(text: str) -> str:
    """What staff see in the console: the opening words of the announcement."""
    words = " ".join(text.split()).replace("/", "-").replace("\\", "-")
    if len(words) > _FILENAME_TEXT_CHARS:
        words = words[:_FILENAME_TEXT_CHARS].rstrip() + "…"
    return f"TTS {words}.wav"
