"""Shared test set-up: one torch thread, and the fixtures (helpers to import are in support.py).

Fixtures (use them by naming them as test arguments):
    tiny_config(**overrides) -> ConformerSslConfig     a 2-layer, 32-wide model config (fast on CPU)
    speech_like(seconds, sampling_rate=16000, seed=0, channels=1) -> np.ndarray float32
    write_wav(path, seconds, sampling_rate=16000, channels=1, seed=0, subtype="PCM_16") -> Path
    tone_ctc -> dict                                    a tiny CTC model fine-tuned once per session (support.py)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import make_speech_like, make_tiny_config, train_tone_ctc, write_speech_wav

# The machine has 2 cores shared by several test runs: one thread each avoids OpenMP oversubscription.
torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def tone_ctc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny CTC model of `support.train_tone_ctc`, trained once per session (about 30 s on one core)."""
    return train_tone_ctc(tmp_path_factory.mktemp("shared_ctc"))
