"""Synthetic WAV signals: a plain test tone and the prefix tone that marks a drill broadcast.

Generated rather than shipped, so the repository holds no binary audio and every caller gets a file
whose exact length is known. Frequencies stay in the band horn loudspeakers reproduce well (about
300 Hz to 5 kHz).
"""

from __future__ import annotations

import io
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

DEFAULT_SAMPLERATE: Final = 16000
_PCM16_FULL_SCALE: Final = 32767
_EDGE_FADE_S: Final = 0.005  # a tone switched on or off abruptly clicks on a horn speaker


@dataclass(frozen=True, slots=True)
class ToneSegment:
    """A stretch of one sine frequency, or of silence when `frequency_hz` is 0."""

    frequency_hz: float
    seconds: float


# Heard before every drill/test broadcast (DESIGN.md §2): a hi-lo pair repeated three times, then a
# pause before the content, unlike anything a live broadcast starts with.
DRILL_PREFIX_PATTERN: Final[tuple[ToneSegment, ...]] = (
    *(ToneSegment(1000.0, 0.25), ToneSegment(750.0, 0.25)) * 3,
    ToneSegment(0.0, 0.5),
)


def sine_wav(
    frequency_hz: float,
    seconds: float,
    samplerate: int = DEFAULT_SAMPLERATE,
    *,
    amplitude: float = 0.5,
) -> bytes:
    """A mono 16-bit PCM WAV of one sine tone lasting exactly round(seconds × samplerate) frames."""
    return tone_sequence_wav([ToneSegment(frequency_hz, seconds)], samplerate, amplitude=amplitude)


def drill_prefix_tone(samplerate: int = DEFAULT_SAMPLERATE) -> bytes:
    """The drill prefix (DRILL_PREFIX_PATTERN) as a mono 16-bit PCM WAV."""
    return tone_sequence_wav(DRILL_PREFIX_PATTERN, samplerate)


def tone_sequence_wav(
    segments: Sequence[ToneSegment],
    samplerate: int = DEFAULT_SAMPLERATE,
    *,
    amplitude: float = 0.5,
) -> bytes:
    """Tones and silences one after another, as a mono 16-bit PCM WAV."""
    if samplerate <= 0:
        raise ValueError(f"samplerate must be positive, not {samplerate}")
    if not 0.0 < amplitude <= 1.0:
        raise ValueError(f"amplitude must be in (0, 1], not {amplitude}")
    if not segments:
        raise ValueError("a tone needs at least one segment")
    samples = np.concatenate([_render(segment, samplerate) for segment in segments])
    pcm = np.round(samples * amplitude * _PCM16_FULL_SCALE).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(samplerate)
        wav.writeframes(pcm.tobytes())
    return buffer.getvalue()


def _render(segment: ToneSegment, samplerate: int) -> np.ndarray[tuple[int], np.dtype[np.float64]]:
    nyquist_hz = samplerate / 2
    if segment.seconds <= 0:
        raise ValueError(f"a segment must last more than 0 s, not {segment.seconds}")
    if not 0.0 <= segment.frequency_hz < nyquist_hz:
        raise ValueError(
            f"frequency must be 0 (silence) or below {nyquist_hz:g} Hz at {samplerate} Hz, "
            f"not {segment.frequency_hz}"
        )
    frame_count = round(segment.seconds * samplerate)
    if segment.frequency_hz == 0:
        return np.zeros(frame_count)
    times = np.arange(frame_count) / samplerate
    tone = np.sin(2 * np.pi * segment.frequency_hz * times)
    fade_frames = min(round(_EDGE_FADE_S * samplerate), frame_count // 2)
    if fade_frames:
        # Raised-cosine ramps: smoother in spectrum than linear ones, so the fade itself does not click.
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade_frames))
        tone[:fade_frames] *= ramp
        tone[-fade_frames:] *= ramp[::-1]
    return tone
