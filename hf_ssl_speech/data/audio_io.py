"""Audio decoding for the data pipeline: soundfile to read, soxr to resample, one exception for bad audio.

Everything that can go wrong with one audio file becomes an `AudioError` whose `reason` is one of the
keys of `BAD_REASONS`, so the pipeline can skip the example, count it by reason and name the file.
No torchcodec / torchaudio: `datasets`' `Audio` feature needs torchcodec, whose PyPI wheel does not
import next to CPU torch (docs/architecture.md §5), so paths and bytes are decoded here with libsndfile.
"""

from __future__ import annotations

import io
import os
import re
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from ..frames import FRAME_SECONDS
from ..frames import SAMPLING_RATE as TARGET_SAMPLING_RATE

# The closed set of reasons an example can be skipped for (the counter and the logs use these keys).
BAD_REASONS: dict[str, str] = {
    "missing": "the audio file does not exist",
    "not_a_file": "the audio path is a directory or another non-regular file",
    "empty": "zero bytes, or no samples in the requested range",
    "unreadable": "libsndfile cannot open it (corrupt header or unsupported format)",
    "truncated": "the file ends before its header says it should, or decoding fails part-way",
    "non_finite": "NaN or infinite samples",
    "silent": "peak amplitude below the silence threshold",
    "too_short": "shorter than min_duration",
    "too_long": "longer than max_duration (and cropping is off)",
    "malformed": "manifest line / metadata that cannot be parsed (bad JSON, missing or mistyped field)",
    "bad_labels": "frame_labels / text that cannot be read or do not fit the audio",
}

AudioSource = str | os.PathLike | bytes | BinaryIO

# libsndfile's WAV parser logs "data : <header bytes> (should be <bytes on disk>)" when the data chunk is
# cut short; it then silently shortens `frames`, so this log line is the only sign of a truncated WAV.
_WAV_SHORT_DATA = re.compile(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)")


class AudioError(Exception):
    """One unusable audio example. `reason` is a key of `BAD_REASONS`; `where` names the file (and line)."""

    def __init__(self, reason: str, where: str, detail: str = "") -> None:
        if reason not in BAD_REASONS:
            raise ValueError(f"AudioError reason {reason!r} is not one of {sorted(BAD_REASONS)}")
        self.reason = reason
        self.where = where
        self.detail = detail
        super().__init__(f"{where}: {reason} ({detail or BAD_REASONS[reason]})")


def describe_source(source: AudioSource) -> str:
    """A short printable name for an audio source (its path, or `<N bytes>`)."""
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", None) or "<file object>"


def _open(source: AudioSource, where: str) -> sf.SoundFile:
    """Open `source` with libsndfile, turning every failure into an `AudioError` with a reason."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise AudioError("empty", where, "zero bytes")
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise AudioError("missing", where)
        if not os.path.isfile(path):
            raise AudioError("not_a_file", where)
        if os.path.getsize(path) == 0:
            raise AudioError("empty", where, "zero bytes")
    try:
        return sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise AudioError("unreadable", where, str(error)) from None


def _header_frames(handle: sf.SoundFile) -> int:
    """Frames the header promises; larger than `handle.frames` when libsndfile found the WAV data cut short."""
    match = _WAV_SHORT_DATA.search(handle.extra_info)
    if match and int(match.group(1)) > int(match.group(2)):
        return handle.frames + 1  # only "more than can be read" matters to the caller
    return handle.frames


def read_audio(
    source: AudioSource,
    offset: float = 0.0,
    duration: float | None = None,
    where: str | None = None,
    min_duration: float = 0.0,
    max_duration: float | None = None,
    crop: bool = False,
    rng: np.random.Generator | None = None,
    crop_step: float = FRAME_SECONDS,
) -> tuple[np.ndarray, int, float]:
    """Decode `source` (path, bytes or binary file object) to float32 `(frames, channels)` at its own rate.

    The length checks run on the header before any decoding, and a random crop reads only the crop, so a
    rejected or cropped long file costs almost nothing.

    Args:
        source: the audio (from a manifest's `audio_filepath`, a dataset's path/bytes column or a tar member).
        offset: seconds to skip first (NeMo manifest `offset`).
        duration: seconds to read from `offset`; None reads to the end.
        where: name used in errors; defaults to the path.
        min_duration: shorter spans raise `too_short`.
        max_duration: longer spans are cropped (`crop=True`) or raise `too_long`; None = no limit.
        crop: crop spans longer than `max_duration` to a random window instead of rejecting them.
        rng: draws the crop start (seeded by the caller per example, so a resumed run crops the same way);
            None takes the first `max_duration` seconds.
        crop_step: crop starts are multiples of this many seconds (10 ms = one feature frame, so frame
            labels stay aligned).
    Returns:
        `(audio (frames, channels) float32, sampling_rate, crop_start)` with `crop_start` in seconds after `offset`.
    Raises:
        AudioError: with reason missing / not_a_file / empty / unreadable / truncated / too_short / too_long.
    """
    where = where or describe_source(source)
    with _open(source, where) as handle:
        sampling_rate = handle.samplerate
        start = int(round(offset * sampling_rate))
        available = handle.frames - start
        wanted = available if duration is None else min(available, int(round(duration * sampling_rate)))
        if wanted <= 0 or handle.frames <= 0:
            raise AudioError("empty", where, f"no samples at offset {offset}s (file has {handle.frames} frames)")
        seconds = wanted / sampling_rate
        if seconds < min_duration:
            raise AudioError("too_short", where, f"{seconds:.3f}s < min_duration {min_duration}s")
        crop_start = 0.0
        if max_duration is not None and seconds > max_duration:
            if not crop:
                raise AudioError("too_long", where, f"{seconds:.3f}s > max_duration {max_duration}s")
            steps = int((seconds - max_duration) / crop_step)  # number of whole steps the window can slide
            crop_start = crop_step * int(rng.integers(0, steps + 1)) if rng is not None else 0.0
            start += int(round(crop_start * sampling_rate))
            wanted = int(round(max_duration * sampling_rate))
        truncated_header = _header_frames(handle) > handle.frames
        try:
            if start > 0:
                handle.seek(start)
            audio = handle.read(wanted, dtype="float32", always_2d=True)  # (frames, channels)
        except (sf.LibsndfileError, RuntimeError) as error:
            raise AudioError("truncated", where, f"decoding failed part-way: {error}") from None
    if truncated_header or audio.shape[0] < wanted:
        # A short read means the data ended early (MP3/FLAC) or the WAV header claims more than exists.
        raise AudioError("truncated", where, f"read {audio.shape[0]} of {wanted} frames")
    return audio, sampling_rate, crop_start


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average the channels of `(frames, channels)` audio into a float32 `(frames,)` signal."""
    if audio.ndim == 1:
        return audio.astype(np.float32, copy=False)
    if audio.shape[1] == 1:
        return audio[:, 0]
    return audio.mean(axis=1, dtype=np.float32)


def resample(audio: np.ndarray, sampling_rate: int, target_rate: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    """Resample a float32 `(frames,)` signal with soxr ("HQ"); a no-op when the rates already match."""
    if sampling_rate == target_rate:
        return audio
    return soxr.resample(audio, sampling_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def check_samples(audio: np.ndarray, where: str, silence_threshold: float = 1e-6) -> np.ndarray:
    """Reject empty, non-finite and silent signals (`AudioError`), return `audio` unchanged otherwise."""
    if audio.size == 0:
        raise AudioError("empty", where, "no samples")
    peak = np.max(np.abs(audio))  # NaN propagates through max, so one check covers NaN and inf
    if not np.isfinite(peak):
        raise AudioError("non_finite", where, f"{int(np.count_nonzero(~np.isfinite(audio)))} non-finite samples")
    if peak <= silence_threshold:
        raise AudioError("silent", where, f"peak {peak:.3g} <= {silence_threshold}")
    return audio


def load_audio(
    source: AudioSource,
    target_rate: int = TARGET_SAMPLING_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    where: str | None = None,
    silence_threshold: float = 1e-6,
    min_duration: float = 0.0,
    max_duration: float | None = None,
    crop: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, float]:
    """Decode, check lengths, crop, mix to mono, check samples and resample.

    Args: as `read_audio`, plus `target_rate` (the model's rate, 16 kHz) and `silence_threshold` (peak
    amplitude at or below which the clip counts as silent).
    Returns:
        `(audio (samples,) float32 at target_rate, crop_start seconds after offset)`.
    Raises:
        AudioError: with any reason `read_audio` or `check_samples` gives.
    """
    where = where or describe_source(source)
    audio, sampling_rate, crop_start = read_audio(
        source, offset, duration, where, min_duration=min_duration, max_duration=max_duration, crop=crop, rng=rng
    )
    # Check before resampling: soxr would smear one NaN over the whole filter length.
    mono = check_samples(to_mono(audio), where, silence_threshold)
    return resample(mono, sampling_rate, target_rate), crop_start


def probe_duration(source: AudioSource, where: str | None = None) -> float:
    """Duration in seconds from the header only (no decoding). Raises `AudioError` like `read_audio`."""
    where = where or describe_source(source)
    with _open(source, where) as handle:
        if handle.frames <= 0:
            raise AudioError("empty", where, "no samples")
        return handle.frames / handle.samplerate
