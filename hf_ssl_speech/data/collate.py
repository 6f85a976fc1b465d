"""Collation: pad a list of example dicts into model inputs (features, or waveforms for the accelerator)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..frames import HOP_LENGTH
from .audio_io import TARGET_SAMPLING_RATE

# ---------------------------------------------------------------------------------------------------------
# Collation


class SpeechCollator:
    """Pads a list of example dicts into model inputs (docs/architecture.md §2).

    Two modes:
    - features (default): `input_features (B, T, n_mels) float32`, `attention_mask (B, T) long` from
      `feature_extractor(list_of_arrays, sampling_rate=..., return_tensors="pt")`.
    - `return_waveforms=True`: `waveforms (B, N) float32` zero-padded and `waveform_lengths (B,) long`, for
      `feature_extractor.extract_batch(waveforms, waveform_lengths)` on the accelerator.
    Both add `audio_seconds` (float, sum of the clip durations), `ids` (list of str) when `return_ids`,
    `labels (B, L) long` -100-padded when `text_to_ids` is given, and `frame_labels (B, T) long` -100-padded
    (T = feature frames, or `N // hop` for waveforms) when every example has frame labels.

    Which mode: featurising costs a CPU worker about 4x more than decoding 16 kHz FLAC
    (benchmarks/bench_data.py), so with an accelerator use `return_waveforms=True` and featurise on the device
    (also where dither belongs: `extract_batch(..., dither=fe.dither, generator=...)`); on CPU-only runs
    featurise here, in the dataloader workers, where it overlaps with the training step.

    Args:
        feature_extractor: a `ConformerSslFeatureExtractor` (or anything with the same `__call__`); needed
            unless `return_waveforms`.
        return_waveforms: pad waveforms instead of featurising.
        text_to_ids: maps a transcript to label ids (e.g. a CTC tokenizer's `encode`), for fine-tuning.
        sampling_rate: rate of the example audio (checked).
        hop_length: samples per feature frame (frames = samples // hop_length).
        return_ids: include the example ids (for bookkeeping and tests; not a model input).
    """

    def __init__(
        self,
        feature_extractor: Any = None,
        return_waveforms: bool = False,
        text_to_ids: Callable[[str], Sequence[int]] | None = None,
        sampling_rate: int = TARGET_SAMPLING_RATE,
        hop_length: int = HOP_LENGTH,
        return_ids: bool = False,
    ) -> None:
        if feature_extractor is None and not return_waveforms:
            raise ValueError("SpeechCollator needs a feature_extractor, or return_waveforms=True")
        self.feature_extractor = feature_extractor
        self.return_waveforms = return_waveforms
        self.text_to_ids = text_to_ids
        self.sampling_rate = sampling_rate
        self.hop_length = hop_length
        self.return_ids = return_ids

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("SpeechCollator got an empty list of examples")
        for example in examples:
            if example["sampling_rate"] != self.sampling_rate:
                raise ValueError(
                    f"example {example['id']} is at {example['sampling_rate']} Hz; the collator expects "
                    f"{self.sampling_rate} Hz (resample in decode_example)"
                )
        audios = [example["audio"] for example in examples]
        lengths = torch.tensor([len(audio) for audio in audios], dtype=torch.long)
        batch: dict[str, Any] = {}
        if self.return_waveforms:
            waveforms = torch.zeros(len(audios), int(lengths.max()), dtype=torch.float32)  # (batch, samples)
            for row, audio in enumerate(audios):
                waveforms[row, : len(audio)] = torch.from_numpy(audio)
            batch["waveforms"] = waveforms
            batch["waveform_lengths"] = lengths
            frames = int(lengths.max()) // self.hop_length
        else:
            features = self.feature_extractor(audios, sampling_rate=self.sampling_rate, return_tensors="pt")
            batch["input_features"] = features["input_features"]  # (batch, frames, n_mels)
            batch["attention_mask"] = features["attention_mask"].long()  # (batch, frames)
            frames = batch["input_features"].shape[1]
        batch["audio_seconds"] = float(lengths.sum()) / self.sampling_rate
        if self.return_ids:
            batch["ids"] = [example["id"] for example in examples]
        if self.text_to_ids is not None:
            label_ids = []
            for example in examples:
                if example["text"] is None:
                    raise ValueError(f"example {example['id']} has no text; set DataConfig.require_text=True")
                label_ids.append(list(self.text_to_ids(example["text"])))
            batch["labels"] = _pad_int([np.asarray(ids, dtype=np.int64) for ids in label_ids])  # (batch, L)
        if all(example.get("frame_labels") is not None for example in examples):
            batch["frame_labels"] = _pad_int([example["frame_labels"] for example in examples], frames)  # (B, T)
        return batch


def _pad_int(rows: Sequence[np.ndarray], length: int | None = None) -> torch.Tensor:
    """Stack int rows into a (rows, length) long tensor padded (or cut) with -100."""
    length = max((len(row) for row in rows), default=0) if length is None else length
    out = torch.full((len(rows), length), -100, dtype=torch.long)
    for index, row in enumerate(rows):
        count = min(len(row), length)
        out[index, :count] = torch.as_tensor(row[:count], dtype=torch.long)
    return out
