"""Shared test set-up: one torch thread, tiny model configs, and real speech-like audio files.

Fixtures (use them by naming them as test arguments):
    tiny_config(**overrides) -> ConformerSslConfig     a 2-layer, 32-wide model config (fast on CPU)
    speech_like(seconds, sampling_rate=16000, seed=0, channels=1) -> np.ndarray float32
    write_wav(path, seconds, sampling_rate=16000, channels=1, seed=0, subtype="PCM_16") -> Path
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

# The machine has 2 cores shared by several test runs: one thread each avoids OpenMP oversubscription.
torch.set_num_threads(1)

TINY_CONFIG = {
    "num_mel_bins": 16,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "conv_depthwise_kernel_size": 3,
    "subsampling": "striding",
    "subsampling_factor": 4,
    "max_position_embeddings": 512,
    # Small pretraining heads so ForPreTraining stays tiny too.
    "num_codevectors_per_group": 8,
    "codevector_dim": 16,
    "proj_codevector_dim": 16,
    "classifier_proj_size": 16,
    "num_negatives": 4,
    "bestrq_codebook_size": 32,
    "bestrq_codebook_dim": 8,
    "hubert_num_labels": 10,
    "mask_time_length": 4,
    "cpc_steps": 2,
    "cpc_num_negatives": 2,
}


def make_tiny_config(**overrides):
    """A tiny ConformerSslConfig (TINY_CONFIG updated with `overrides`), e.g. `subsampling="dw_striding"`."""
    from hf_ssl_speech.configuration_conformer_ssl import ConformerSslConfig

    settings = {**TINY_CONFIG, **overrides}
    if settings["subsampling"] == "dw_striding" and "subsampling_factor" not in overrides:
        settings["subsampling_factor"] = 8  # FastConformer
    return ConformerSslConfig(**settings)


def make_speech_like(seconds: float, sampling_rate: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    """
    Deterministic audio with the broad structure of speech: voiced syllables (a gliding pitch of 90-250 Hz
    with harmonics shaped by two moving formants, amplitude-modulated at a syllable rate of ~4 Hz),
    short noise bursts (fricatives) and pauses.

    Returns float32 in [-1, 1]: shape (samples,) for mono, (samples, channels) otherwise (soundfile's layout;
    the channels differ by a small delay and gain, like a stereo recording).
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sampling_rate))
    t = np.arange(n) / sampling_rate
    f0 = rng.uniform(90, 250) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t))  # pitch glide
    phase = 2 * np.pi * np.cumsum(f0) / sampling_rate
    formants = (rng.uniform(400, 900) * (1 + 0.3 * np.sin(2 * np.pi * 3.1 * t)), rng.uniform(1100, 2200))
    voiced = np.zeros(n)
    for k in range(1, 25):
        frequency = k * f0
        gain = sum(np.exp(-(((frequency - f) / 150.0) ** 2)) for f in formants) / k**0.5
        voiced += gain * np.sin(k * phase) * (frequency < sampling_rate / 2)
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t + rng.uniform(0, np.pi)), 0, None) ** 2
    fricative = rng.standard_normal(n) * (np.sin(2 * np.pi * 1.3 * t + 1.0) > 0.85)
    pause = np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, np.pi)) > -0.8  # a few silent stretches
    signal = (voiced * syllables + 0.05 * fricative) * pause + 1e-4 * rng.standard_normal(n)
    signal = 0.5 * signal / max(np.abs(signal).max(), 1e-9)
    if channels == 1:
        return signal.astype(np.float32)
    shifted = [np.roll(signal, 7 * c) * (1 - 0.1 * c) for c in range(channels)]
    return np.stack(shifted, axis=1).astype(np.float32)


def write_speech_wav(
    path: str | Path, seconds: float, sampling_rate: int = 16000, channels: int = 1, seed: int = 0,
    subtype: str = "PCM_16",
) -> Path:  # fmt: skip
    """Write `make_speech_like(...)` as a real audio file (format from the suffix, WAV by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, make_speech_like(seconds, sampling_rate, seed, channels), sampling_rate, subtype=subtype)
    return path


@pytest.fixture
def tiny_config() -> Callable[..., object]:
    """Factory: `tiny_config(**overrides)` -> a tiny ConformerSslConfig."""
    return make_tiny_config


@pytest.fixture
def speech_like() -> Callable[..., np.ndarray]:
    """Factory: `speech_like(seconds, sampling_rate=16000, seed=0, channels=1)` -> float32 audio array."""
    return make_speech_like


@pytest.fixture
def write_wav() -> Callable[..., Path]:
    """Factory: `write_wav(path, seconds, sampling_rate=16000, channels=1, seed=0, subtype="PCM_16")` -> path."""
    return write_speech_wav
