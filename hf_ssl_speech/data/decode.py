"""Decoding one example: read, crop, mix to mono, check and resample (see `audio_io`), attach frame labels."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..frames import FRAME_SECONDS, hop_for
from .audio_io import AudioError, load_audio
from .config import DataConfig
from .sources import RawExample

# ---------------------------------------------------------------------------------------------------------
# Decoding one example


def _frame_labels(raw: RawExample, crop_start: float, frames: int, tolerance: int) -> np.ndarray | None:
    labels = raw.frame_labels
    if labels is None:
        return None
    if isinstance(labels, str):
        try:
            labels = np.load(labels) if labels.endswith(".npy") else np.loadtxt(labels, dtype=np.int64, ndmin=1)
        except (OSError, ValueError) as error:
            raise AudioError("bad_labels", raw.where, f"cannot read frame_labels {labels}: {error}") from None
    labels = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    start = int(round(crop_start / FRAME_SECONDS))  # crop starts are whole frames (read_audio's crop_step)
    labels = labels[start : start + frames]
    if abs(len(labels) - frames) > tolerance:
        raise AudioError("bad_labels", raw.where, f"{len(labels)} frame labels for {frames} frames")
    return labels


def decode_example(raw: RawExample, config: DataConfig, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Decode a `RawExample` into the example dict of docs/architecture.md §2. Raises `AudioError` if unusable.

    Args:
        raw: from a source's `raw()`.
        config: length limits, cropping, sampling rate, silence threshold, text requirement.
        rng: draws the crop window (None: first `max_duration` seconds).
    """
    if config.require_text and not raw.text:
        raise AudioError("bad_labels", raw.where, "no text, and require_text is set")
    audio, crop_start = load_audio(
        raw.audio,
        target_rate=config.sampling_rate,
        offset=raw.offset,
        duration=raw.duration,
        where=raw.where,
        silence_threshold=config.silence_threshold,
        min_duration=config.min_duration,
        max_duration=config.max_duration,
        crop=config.crop_long,
        rng=rng,
    )
    hop = hop_for(config.sampling_rate)
    return {
        "id": raw.id,
        "audio": audio,  # (samples,) float32
        "sampling_rate": config.sampling_rate,
        "duration": len(audio) / config.sampling_rate,
        "text": raw.text,
        "speaker": raw.speaker,
        "frame_labels": _frame_labels(raw, crop_start, len(audio) // hop, config.frame_label_tolerance),
        "source": raw.source,
    }
