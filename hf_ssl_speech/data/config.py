"""How examples are filtered, cropped and batched: `DataConfig`, shared by pretraining and fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

from .audio_io import TARGET_SAMPLING_RATE


@dataclass
class DataConfig:
    """How examples are filtered, cropped and batched. Defaults suit pretraining on 16 kHz speech.

    Args:
        batch_seconds: padded audio seconds per batch (batch size × longest clip in it); a clip longer than
            this gets a batch of its own.
        max_batch_size: at most this many clips per batch (None: only `batch_seconds` limits).
        min_duration: clips shorter than this (seconds) are skipped as `too_short`.
        max_duration: clips longer than this are randomly cropped (`crop_long`) or skipped as `too_long`.
        crop_long: crop long clips to a random `max_duration` window instead of skipping them.
        bucket_window: rows sorted by duration together before packing; larger = less padding, less
            randomness in which clips share a batch (the order of batches is shuffled over the whole epoch).
        sampling_rate: the model's sampling rate; audio is resampled to it.
        silence_threshold: a clip whose peak amplitude is at or below this is skipped as `silent`.
        max_bad_fraction: stop with `TooManyBadExamplesError` when more than this fraction of the examples
            tried so far was bad (checked after `min_examples_before_check` examples and at each epoch end).
        min_examples_before_check: examples to see before the fraction is checked.
        shuffle: shuffle rows and batches each epoch (False for validation: rows in source order, sorted by
            duration within each window, batches in that order).
        require_text: skip examples without a transcript (`bad_labels`), for supervised training.
        frame_label_tolerance: frame_labels may differ from `samples // 160` by this many frames (they are
            cut or padded with -100); a larger mismatch is `bad_labels`.
    """

    batch_seconds: float = 160.0
    max_batch_size: int | None = 64
    min_duration: float = 0.5
    max_duration: float | None = 20.0
    crop_long: bool = True
    bucket_window: int = 4096
    sampling_rate: int = TARGET_SAMPLING_RATE
    silence_threshold: float = 1e-6
    max_bad_fraction: float = 0.05
    min_examples_before_check: int = 200
    shuffle: bool = True
    require_text: bool = False
    frame_label_tolerance: int = 2

    def __post_init__(self) -> None:
        checks = {
            "batch_seconds": self.batch_seconds > 0,
            "max_batch_size": self.max_batch_size is None or self.max_batch_size >= 1,
            "min_duration": self.min_duration >= 0,
            "max_duration": self.max_duration is None or self.max_duration > self.min_duration,
            "bucket_window": self.bucket_window >= 1,
            "max_bad_fraction": 0.0 <= self.max_bad_fraction <= 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r} is out of range; see the docstring.")
