"""Frame geometry: the sampling rate, the feature hop, and how many encoder steps a length gives.

Hub-bound: copied next to the weights by `save_pretrained`; imports only torch.

These are the facts every part relies on, written once: the feature extractor makes `samples // HOP_LENGTH`
frames (NeMo's count), the model subsamples them by `subsampling_factor`, and masking, targets, CTC
feasibility, the data pipeline and the ASR pipeline's chunking all count with the same two functions.
"""

from __future__ import annotations

import torch

SAMPLING_RATE = 16000  # Hz: the only rate the models take (audio is resampled to it when loaded)
HOP_LENGTH = 160  # samples per log-mel frame: 10 ms at 16 kHz
FRAME_SECONDS = HOP_LENGTH / SAMPLING_RATE  # 0.01 s: the unit of `frame_labels` and of mask lengths


def hop_for(sampling_rate: int) -> int:
    """Samples per 10 ms frame at `sampling_rate` (160 at 16 kHz)."""
    return round(sampling_rate * FRAME_SECONDS)


def num_frames(num_samples: int | torch.Tensor, hop_length: int = HOP_LENGTH) -> int | torch.Tensor:
    """Valid feature frames of `num_samples` samples: `num_samples // hop_length` (NeMo, Parakeet)."""
    return num_samples // hop_length


def output_lengths(lengths: int | torch.Tensor, subsampling_factor: int) -> int | torch.Tensor:
    """Encoder steps of `lengths` feature frames: ceil(L / subsampling_factor), for ints and LongTensors.

    The subsampling is log2(f) stride-2 convs (kernel 3, one frame of padding on each side, or two on the left
    when causal), each giving ceil(L / 2) outputs; for a power-of-2 factor ceil(ceil(L / 2) / 2) = ceil(L / 4),
    so the stages compose into ceil(L / f). Frame stacking for the SSL targets uses the same count, so one
    target lines up with each encoder step.

    Args:
        lengths: valid frames, from `attention_mask.sum(-1)` or `num_frames`.
        subsampling_factor: config `subsampling_factor` (2 for a single conv stage).
    """
    if isinstance(lengths, torch.Tensor):
        return torch.div(lengths + subsampling_factor - 1, subsampling_factor, rounding_mode="floor")
    return -(-lengths // subsampling_factor)


def lengths_to_padding_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(batch,) valid lengths -> (batch, max_length) bool, True where the step is padding."""
    return torch.arange(max_length, device=lengths.device)[None, :] >= lengths[:, None]


__all__ = [
    "FRAME_SECONDS",
    "HOP_LENGTH",
    "SAMPLING_RATE",
    "hop_for",
    "lengths_to_padding_mask",
    "num_frames",
    "output_lengths",
]
