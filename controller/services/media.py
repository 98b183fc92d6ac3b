"""Audio uploads: validated by decoding them in full, stored under their SHA-256 for devices to fetch.

Speakers download audio over HTTP from `/media/<sha256>` and check the digest (docs/protocol.md), so a
stored file's name is its content hash: identical uploads share one file and a stored file never changes.

Durations come from decoding every frame, not from headers: a truncated upload whose header still
claims the full length is rejected, and an MP3 without a frame-count (Xing/Info) header, whose length
libsndfile can only estimate from the first frame's bitrate, is decoded again to its real end.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
import struct
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal

import soundfile as sf
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from controller.store.models import MediaRow

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


AudioFormat = Literal["WAV", "MP3", "OGG"]

CONTENT_TYPES: Final[dict[AudioFormat, str]] = {
    "WAV": "audio/wav",
    "MP3": "audio/mpeg",
    "OGG": "audio/ogg",
}

_log = logging.getLogger(__name__)

# libsndfile's major formats that a speaker's player understands, by the family a client would call them.
_ACCEPTED_LIBSNDFILE_FORMATS: Final[dict[str, AudioFormat]] = {
    "WAV": "WAV",
    "WAVEX": "WAV",
    "RF64": "WAV",
    "MP3": "MP3",
    "OGG": "OGG",
}
_NOT_AUDIO: Final = "not a WAV, MP3 or OGG audio file"
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_DECODE_BLOCK_FRAMES: Final = 65536
_FLOAT32_BYTES: Final = 4
# Slack between a header's frame count and the decoded one: the samples of one (the longest) MPEG frame.
_FRAME_COUNT_TOLERANCE: Final = 1152
# Bytes an MP3 decoder may legitimately leave unread at the end: an ID3v1 tag (128) and small trailers.
_UNDECODED_TAIL_SLACK_BYTES: Final = 4096
_WRITE_BATCH_BYTES: Final = 1 << 20
_PIPE_CHUNK_BYTES: Final = 1 << 16
_MPEG_FRAME_SYNC: Final = 0xFFE0  # the 11 set bits that open every MPEG audio frame header
_MPEG_HEADER_BYTES: Final = 4
_MPEG_HEADER_PROBE_BYTES: Final = 48  # enough for a Xing/Info tag and flags, or a VBRI tag at byte 36
_MPEG1_VERSION_ID: Final = 0b11
_MONO_CHANNEL_MODE: Final = 0b11
_VBRI_AT: Final = 36
_XING_FRAMES_FLAG: Final = 0x1
_ID3V2_HEADER_BYTES: Final = 10
_ID3V2_FOOTER_FLAG: Final = 0x10
_RIFF_HEADER_BYTES: Final = 12  # "RIFF", the size, "WAVE": also enough to tell the three families apart
_RIFF_CHUNK_HEADER: Final = struct.Struct("<4sI")
_RF64_SIZES: Final = struct.Struct("<QQ")  # the RIFF and data sizes that open an RF64 file's ds64 chunk
_WAV_UNKNOWN_LENGTH: Final = 0xFFFFFFFF  # streaming writers and RF64 put this in the data chunk's size
_STORED_FILE_MODE: Final = 0o644  # readable by a reverse proxy that may serve /media directly


class MediaRejected(ValueError):  # noqa: N818 - the name the API layer and its clients know
    """An upload that cannot be stored; `detail` is written for the person who uploaded it."""

    def __init__(self, detail: str, *, field: str = "file") -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What a full decode of an audio file found."""

    format: AudioFormat
    subtype: str  # the codec as libsndfile names it: PCM_16, MPEG_LAYER_III, VORBIS, OPUS…
    samplerate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return round(self.frames / self.samplerate, 3)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass(frozen=True, slots=True)
class StoredMedia:
    sha256: str
    size_bytes: int
    duration_s: float
    content_type: str
    format: AudioFormat
    samplerate: int
    channels: int
    filename: str | None


def decode_duration(path: Path) -> AudioInfo:
    """Decode all of `path` and measure it; raise MediaRejected unless it is whole WAV, MP3 or OGG audio.

    Blocking and CPU-bound (about 0.4 s for a 10 MB MP3 on a small server): call it from a worker
    thread. libsndfile's MP3 decoder (mpg123) writes its complaints about damaged frames to stderr.
    """
    file_size = path.stat().st_size
    if file_size == 0:
        raise MediaRejected("file is empty")
    with path.open("rb") as raw:
        family = _sniff_family(raw.read(_RIFF_HEADER_BYTES))
        if family is None:
            raise MediaRejected(_NOT_AUDIO)
        raw.seek(0)
        reader = _ReadWatermark(raw)
        try:
            audio = sf.SoundFile(reader)
        except sf.LibsndfileError as exc:
            raise MediaRejected(f"truncated or corrupt {family} stream: no decodable audio in it") from exc
        with audio:
            if _ACCEPTED_LIBSNDFILE_FORMATS.get(audio.format) != family:
                raise MediaRejected(_NOT_AUDIO)
            subtype = str(audio.subtype)
            samplerate = int(audio.samplerate)
            channels = int(audio.channels)
            header_frames = int(audio.frames)
            # Opening reads the file's end (ID3v1 tag, last Ogg page); only reads from here on are decoding.
            reader.forget_reads()
            decoded_frames = _count_decoded_frames(audio, family)
    undecoded_tail_bytes = file_size - reader.furthest_read_end

    if family == "WAV":
        _reject_truncated_wav_data(path, file_size)
    header_counts_frames = family != "MP3" or _mp3_header_counts_frames(path)
    if header_counts_frames and header_frames - decoded_frames > _FRAME_COUNT_TOLERANCE:
        raise MediaRejected(
            f"truncated or corrupt {family} stream: the header declares "
            f"{_seconds(header_frames, samplerate)}, the stream decodes to "
            f"{_seconds(decoded_frames, samplerate)}"
        )
    if family == "MP3" and undecoded_tail_bytes > _UNDECODED_TAIL_SLACK_BYTES:
        # libsndfile stops reading at the length it announced, which for an MP3 without a frame-count
        # header is a guess; the pipe decode has no length to stop at.
        decoded_frames = _count_frames_through_pipe(path, family)
    if decoded_frames == 0:
        raise MediaRejected("audio has no samples")
    return AudioInfo(
        format=family, subtype=subtype, samplerate=samplerate, channels=channels, frames=decoded_frames
    )


class MediaStore:
    """Content-addressed audio files under `root`: `root/<sha[:2]>/<sha>`, uploads spooled in `root/tmp`."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self._root = root
        self._spool_dir = root / "tmp"
        self._max_bytes = max_bytes

    @property
    def root(self) -> Path:
        return self._root

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def path_for(self, sha256: str) -> Path:
        """Where the file with this digest lives; ValueError unless `sha256` is 64 lowercase hex digits."""
        if not _SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"not a SHA-256 digest in lowercase hex: {sha256!r}")
        return self._root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether this digest is stored; False for a string that is not a digest at all."""
        try:
            return self.path_for(sha256).is_file()
        except ValueError:
            return False

    async def ingest(
        self,
        chunks: AsyncIterator[bytes],
        *,
        filename: str | None,
        declared_type: str | None,
    ) -> StoredMedia:
        """Stream an upload to disk, decode it in a worker thread, and store it under its SHA-256.

        Raises MediaRejected as soon as the upload passes `max_bytes`, or when it is not whole WAV, MP3
        or OGG audio. Whatever happens, the spooled upload is removed and stored files are untouched.
        """
        # Created on the loop (one small open), not in a worker, so a cancellation cannot land between
        # the file's creation and the try that removes it.
        spool = _SpoolFile.create(self._spool_dir)
        try:
            sha256, size_bytes = await self._receive(chunks, spool)
            info = await asyncio.to_thread(decode_duration, spool.path)
            await asyncio.to_thread(self._commit, spool.path, sha256)
        finally:
            await asyncio.to_thread(spool.discard)
        if declared_type is not None and declared_type.split(";")[0].strip() != info.content_type:
            _log.info("upload %s declared as %s decodes as %s", sha256[:12], declared_type, info.content_type)
        return StoredMedia(
            sha256=sha256,
            size_bytes=size_bytes,
            duration_s=info.duration_s,
            content_type=info.content_type,
            format=info.format,
            samplerate=info.samplerate,
            channels=info.channels,
            filename=_clean_filename(filename),
        )

    async def _receive(self, chunks: AsyncIterator[bytes], spool: _SpoolFile) -> tuple[str, int]:
        digest = hashlib.sha256()
        size_bytes = 0
        pending = bytearray()
        async for chunk in chunks:
            size_bytes += len(chunk)
            if size_bytes > self._max_bytes:
                raise MediaRejected(f"file is larger than the {_megabytes(self._max_bytes)} limit")
            digest.update(chunk)
            pending += chunk
            # Batched so that a client sending tiny chunks does not cost one thread hop per chunk.
            if len(pending) >= _WRITE_BATCH_BYTES:
                await asyncio.to_thread(spool.write, pending)
                pending.clear()
        await asyncio.to_thread(spool.seal, pending)
        return digest.hexdigest(), size_bytes

    def _commit(self, spooled: Path, sha256: str) -> None:
        target = self.path_for(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        spooled.chmod(_STORED_FILE_MODE)
        # Atomic: readers see the old complete file or the new one. An identical upload replaces a
        # file with the same bytes, so a digest never names two contents.
        spooled.replace(target)
        _fsync_directory(target.parent)


class _SpoolFile:
    """An upload on its way to disk; the store calls the blocking methods in worker threads."""

    def __init__(self, path: Path, sink: BinaryIO) -> None:
        self.path = path
        self._sink = sink

    @classmethod
    def create(cls, spool_dir: Path) -> _SpoolFile:
        spool_dir.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=spool_dir, prefix="upload-", suffix=".part")
        return cls(Path(name), os.fdopen(descriptor, "wb"))

    def write(self, data: bytes | bytearray) -> None:
        self._sink.write(data)

    def seal(self, last_data: bytes | bytearray) -> None:
        """Write the tail and make the file durable, so a crash after commit cannot leave it empty."""
        self._sink.write(last_data)
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()

    def discard(self) -> None:
        """Close and delete the spooled file if it is still there (it is not after a commit)."""
        self._sink.close()
        self.path.unlink(missing_ok=True)


class _ReadWatermark:
    """A file wrapper for libsndfile's virtual I/O that records how far into the file reads went."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self._raw = raw
        self.furthest_read_end = 0

    def forget_reads(self) -> None:
        self.furthest_read_end = 0

    def readinto(self, buffer: WriteableBuffer) -> int:
        start = self._raw.tell()
        size = self._raw.readinto(buffer)
        self.furthest_read_end = max(self.furthest_read_end, start + size)
        return size

    def read(self, size: int = -1) -> bytes:
        start = self._raw.tell()
        data = self._raw.read(size)
        self.furthest_read_end = max(self.furthest_read_end, start + len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _sniff_family(head: bytes) -> AudioFormat | None:
    """The container the first bytes announce, so that a failed decode can say what it was decoding."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head.startswith(b"OggS"):
        return "OGG"
    if head.startswith(b"ID3"):
        return "MP3"
    return "MP3" if _opens_with_mpeg_frame(head) else None


def _opens_with_mpeg_frame(data: bytes) -> bool:
    return int.from_bytes(data[:2], "big") & _MPEG_FRAME_SYNC == _MPEG_FRAME_SYNC


def _mp3_header_counts_frames(path: Path) -> bool:
    """Whether the first MPEG frame is a Xing/Info or VBRI header holding the stream's frame count.

    With one, libsndfile's length is exact and a shorter decode means a truncated file; without one, it
    is an estimate from the first frame's bitrate, off by any amount for VBR and ~0.1 % even for CBR.
    """
    with path.open("rb") as mp3:
        id3 = mp3.read(_ID3V2_HEADER_BYTES)
        frame_start = 0
        if id3.startswith(b"ID3") and len(id3) == _ID3V2_HEADER_BYTES:
            tag_bytes = (id3[6] << 21) | (id3[7] << 14) | (id3[8] << 7) | id3[9]  # "syncsafe": 7 bits a byte
            has_footer = bool(id3[5] & _ID3V2_FOOTER_FLAG)
            frame_start = _ID3V2_HEADER_BYTES * (2 if has_footer else 1) + tag_bytes
        mp3.seek(frame_start)
        frame = mp3.read(_MPEG_HEADER_PROBE_BYTES)
    if len(frame) < _MPEG_HEADER_PROBE_BYTES or not _opens_with_mpeg_frame(frame):
        return False
    is_mpeg1 = (frame[1] >> 3) & 0b11 == _MPEG1_VERSION_ID
    is_mono = frame[3] >> 6 == _MONO_CHANNEL_MODE
    # The Xing/Info tag follows the frame's side information, whose size depends on version and channels.
    side_info_bytes = (17 if is_mono else 32) if is_mpeg1 else (9 if is_mono else 17)
    xing_at = _MPEG_HEADER_BYTES + side_info_bytes
    if frame[xing_at : xing_at + 4] in (b"Xing", b"Info"):
        xing_flags = int.from_bytes(frame[xing_at + 4 : xing_at + 8], "big")
        return bool(xing_flags & _XING_FRAMES_FLAG)
    return frame[_VBRI_AT : _VBRI_AT + 4] == b"VBRI"  # VBRI headers always carry the frame count


def _count_decoded_frames(audio: sf.SoundFile, family: AudioFormat) -> int:
    # buffer_read_into goes straight to libsndfile; SoundFile.read would stop at the announced length.
    block = bytearray(_DECODE_BLOCK_FRAMES * int(audio.channels) * _FLOAT32_BYTES)
    decoded_frames = 0
    while True:
        try:
            frames_read = int(audio.buffer_read_into(block, "float32"))
        except sf.LibsndfileError as exc:
            raise MediaRejected(
                f"truncated or corrupt {family} stream: decoding failed after "
                f"{_seconds(decoded_frames, int(audio.samplerate))} of audio"
            ) from exc
        if frames_read == 0:
            return decoded_frames
        decoded_frames += frames_read


def _count_frames_through_pipe(path: Path, family: AudioFormat) -> int:
    """Decode `path` fed through a pipe, where libsndfile cannot know a length and decodes to the end."""
    read_fd, write_fd = os.pipe()
    feeder = _PipeFeeder(path, write_fd)
    feeder.start()
    try:
        try:
            audio = sf.SoundFile(read_fd, closefd=False)
        except sf.LibsndfileError as exc:
            # libsndfile cannot stream an MP3 that opens with a Xing header, so one that has more
            # audio than that header counts (a concatenation, a damaged file) ends up here.
            raise MediaRejected(
                f"truncated or corrupt {family} stream: the audio does not decode through to the end"
            ) from exc
        with audio:
            return _count_decoded_frames(audio, family)
    finally:
        os.close(read_fd)  # a feeder blocked on a full pipe now fails with EPIPE and ends
        feeder.join()
        feeder.raise_if_failed()


class _PipeFeeder(threading.Thread):
    def __init__(self, path: Path, write_fd: int) -> None:
        super().__init__(name="media-pipe-feeder", daemon=True)
        self._path = path
        self._write_fd = write_fd
        self._error: OSError | None = None

    def run(self) -> None:
        try:
            with self._path.open("rb") as source:
                while chunk := source.read(_PIPE_CHUNK_BYTES):
                    unwritten = memoryview(chunk)
                    while unwritten:
                        unwritten = unwritten[os.write(self._write_fd, unwritten) :]
        except BrokenPipeError:
            return  # the decoder stopped reading; it reports why itself
        except OSError as exc:
            self._error = exc
        finally:
            os.close(self._write_fd)  # end of file for the decoder on every path

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _reject_truncated_wav_data(path: Path, file_size: int) -> None:
    """Reject a WAV whose data chunk is cut short: libsndfile quietly shortens it to what is there."""
    with path.open("rb") as wav:
        riff_kind = wav.read(4)
        rf64_data_bytes: int | None = None
        offset = _RIFF_HEADER_BYTES
        while offset + _RIFF_CHUNK_HEADER.size <= file_size:
            wav.seek(offset)
            chunk_id, chunk_bytes = _RIFF_CHUNK_HEADER.unpack(wav.read(_RIFF_CHUNK_HEADER.size))
            if chunk_id == b"ds64" and chunk_bytes >= _RF64_SIZES.size:
                _riff_bytes, rf64_data_bytes = _RF64_SIZES.unpack(wav.read(_RF64_SIZES.size))
            if chunk_id == b"data":
                declared = chunk_bytes
                if declared == _WAV_UNKNOWN_LENGTH:
                    if riff_kind != b"RF64" or rf64_data_bytes is None:
                        return
                    declared = rf64_data_bytes
                present = file_size - offset - _RIFF_CHUNK_HEADER.size
                if declared > present:
                    raise MediaRejected(
                        f"truncated or corrupt WAV stream: the header declares {declared:,} bytes of "
                        f"audio, the file holds {present:,}"
                    )
                return
            offset += _RIFF_CHUNK_HEADER.size + chunk_bytes + (chunk_bytes & 1)  # chunks are word-aligned


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _clean_filename(filename: str | None) -> str | None:
    """The base name only: some browsers send a client path, and staff see the name in the console."""
    if filename is None:
        return None
    base_name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(character for character in base_name if character.isprintable()).strip()
    return printable[:255] or None


def _seconds(frames: int, samplerate: int) -> str:
    return f"{frames / samplerate:.3f} s"


def _megabytes(size_bytes: int) -> str:
    return f"{size_bytes / 1_000_000:.1f} MB"


def record_media(engine: Engine, stored: StoredMedia) -> tuple[MediaRow, bool]:
    """The media row for stored audio, created unless the same audio (by SHA-256) is already known;
    returns it and whether it was created."""

    def existing(session: Session) -> MediaRow | None:
        return session.exec(select(MediaRow).where(MediaRow.sha256 == stored.sha256)).first()

    with Session(engine, expire_on_commit=False) as session:
        found = existing(session)
        if found is not None:
            return found, False
        row = MediaRow(
            id=str(uuid.uuid4()),
            sha256=stored.sha256,
            content_type=stored.content_type,
            format=stored.format,
            duration_s=stored.duration_s,
            size_bytes=stored.size_bytes,
            filename=stored.filename,
            created_at=datetime.now(UTC),
        )
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # the same audio uploaded twice at once: the other one was stored first
            session.rollback()
            found = existing(session)
            if found is None:
                raise
            return found, False
        return row, True


def media_document(row: MediaRow, base_url: str) -> dict[str, Any]:
    """A stored media item as play commands name it (docs/protocol.md §1.3, §1.8)."""
    return {
        "url": f"{base_url.rstrip('/')}/media/{row.sha256}",
        "sha256": row.sha256,
        "duration_s": row.duration_s,
        "content_type": row.content_type,
    }
