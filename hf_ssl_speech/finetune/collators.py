"""Collators: metadata rows -> model inputs for CTC and classification (decode, featurise, SpecAugment)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    Wav2Vec2Processor,
)

from ..data import DataConfig, SpeechCollator
from ..data.augment import SpecAugmentConfig, spec_augment
from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from .rows import decode_rows
from .text import text_to_ids


class CtcCollator:
    """Metadata rows -> `{"input_features", "attention_mask", "labels"}` for `ConformerSslForCTC`.

    Rows with `augment=True` (the training set) get dither and SpecAugment; eval rows are featurised
    deterministically. Decoding and padding are `hf_ssl_speech.data`'s (`decode_example`, `SpeechCollator`).

    Args:
        processor: the `Wav2Vec2Processor` (our feature extractor + the CTC tokenizer).
        spec_augment: masking settings, or None for no SpecAugment.
        dither: add the feature extractor's dither to training audio.
    """

    def __init__(
        self, processor: Wav2Vec2Processor, spec_augment: SpecAugmentConfig | None = None, dither: bool = True
    ) -> None:
        self.processor = processor
        self.spec_augment = spec_augment
        self.dither = dither
        self.decode_config = DataConfig(min_duration=0.0, max_duration=None, crop_long=False, require_text=True)

    def _collator(self, augment: bool) -> SpeechCollator:
        extractor = self.processor.feature_extractor
        if augment and self.dither and hasattr(extractor, "dither"):  # SeamlessM4T's fbank (w2v-BERT) has none
            extractor = functools.partial(extractor, dither=extractor.dither)
        return SpeechCollator(extractor, text_to_ids=functools.partial(text_to_ids, self.processor.tokenizer))

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        augment = all(row.get("augment", False) for row in rows)
        batch = self._collator(augment)(decode_rows(rows, self.decode_config))
        out = {key: batch[key] for key in ("input_features", "attention_mask", "labels")}
        if augment and self.spec_augment is not None:
            out["input_features"] = spec_augment(
                out["input_features"], out["attention_mask"].sum(-1), self.spec_augment
            )
        return out


class ClassificationCollator:
    """Metadata rows (with `label`) -> `{"input_features", "attention_mask", "labels"}` for classification.

    Args:
        feature_extractor: our feature extractor.
        label2id: class name -> id (from the training rows).
        max_duration: clips are cropped to this many seconds (random window for training rows, the start for
            eval rows); None keeps whole clips.
        spec_augment: masking for training rows, or None.
    """

    def __init__(
        self,
        feature_extractor: ConformerSslFeatureExtractor,
        label2id: Mapping[str, int],
        max_duration: float | None = None,
        spec_augment: SpecAugmentConfig | None = None,
    ) -> None:
        self.feature_extractor = feature_extractor
        self.label2id = dict(label2id)
        self.spec_augment = spec_augment
        self.decode_config = DataConfig(min_duration=0.0, max_duration=max_duration, crop_long=True)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        augment = all(row.get("augment", False) for row in rows)
        # Crop windows from torch's RNG: seeded by Trainer, and differently in each dataloader worker.
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, ()))) if augment else None
        examples = decode_rows(rows, self.decode_config, rng)
        batch = SpeechCollator(self.feature_extractor)(examples)
        out = {key: batch[key] for key in ("input_features", "attention_mask")}
        out["labels"] = torch.tensor([self.label2id[example["label"]] for example in examples], dtype=torch.long)
        if augment and self.spec_augment is not None:
            out["input_features"] = spec_augment(
                out["input_features"], out["attention_mask"].sum(-1), self.spec_augment
            )
        return out
