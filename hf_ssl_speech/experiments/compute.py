"""How well a stage uses the machine: model FLOPs per audio second and a measured matmul peak.

FLOP utilisation = (FLOPs per audio second of one training step) x (audio seconds per second) / (peak FLOP/s).
The peak is measured here, on this machine and thread count (a large matmul in the run's precision), not taken from a datasheet,
so the figure says how much of what torch can reach the step reaches; per-step overhead (data, Python, small
kernels) is what keeps it low.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..frames import HOP_LENGTH, SAMPLING_RATE
from ..modeling_conformer_ssl import ConformerSslModel


@functools.cache
def matmul_peak_flops(size: int = 1024, seconds: float = 0.5, precision: str = "no") -> float:
    """FLOP/s of a square matmul on the default device, at the current torch thread count (best of runs), in fp32
    or, with `precision="bf16"`, in bf16 (the peak a mixed-precision run's matmuls can reach)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def encoder_flops_per_audio_second(model_config: Any, seconds: float = 10.0, backward: bool = True) -> float:
    """FLOPs of the encoder on one utterance of `seconds` (forward, plus backward when `backward`), per second.

    The SSL heads and the CTC projection are a few percent of the encoder and are left out; so this is a lower
    bound of the step's work, and the utilisation computed from it is one too.
    """
    frames = int(seconds * SAMPLING_RATE / HOP_LENGTH)
    encoder = ConformerSslModel(model_config)
    features = torch.randn(1, frames, model_config.num_mel_bins)
    counter = FlopCounterMode(display=False)
    with counter:
        hidden = encoder(input_features=features).last_hidden_state  # (1, time, hidden)
        if backward:
            hidden.square().mean().backward()
    return counter.get_total_flops() / seconds


def training_flops_per_audio_second(model_config: Any) -> float:
    """Forward + backward encoder FLOPs per audio second of a pretraining or fine-tuning step."""
    return round(encoder_flops_per_audio_second(model_config), 1)


def utilisation(
    flops_per_audio_second: float, audio_seconds_per_second: float | None, precision: str = "no"
) -> float | None:
    """Share of the measured matmul peak of the run's `precision` ("no": fp32, "bf16") a stage reaches (None
    without a throughput)."""
    if not audio_seconds_per_second:
        return None
    peak = matmul_peak_flops(precision="bf16" if precision == "bf16" else "no")
    return round(flops_per_audio_second * audio_seconds_per_second / peak, 4)
