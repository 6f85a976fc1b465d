"""Pretraining: the NEST denoising mix, and (once the model exists) ConformerSslForPreTraining."""

from __future__ import annotations

import math

import torch

from hf_ssl_speech.augment import mix_for_denoising


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tones(batch: int, num_samples: int, lengths: torch.Tensor) -> torch.Tensor:
    t = torch.arange(num_samples) / 16000
    freqs = 200.0 + 100.0 * torch.arange(batch)[:, None]
    wave = 0.3 * torch.sin(2 * math.pi * freqs * t)
    return wave * (torch.arange(num_samples)[None, :] < lengths[:, None])


def _snr_db(clean: torch.Tensor, noisy: torch.Tensor, n: int) -> float:
    added = noisy[:n] - clean[:n]
    return 10 * math.log10(clean[:n].pow(2).mean().item() / added.pow(2).mean().item())


def test_denoising_mix_hits_the_drawn_snr_ranges_and_keeps_padding_zero():
    batch, num_samples = 64, 4000
    lengths = torch.randint(1000, num_samples + 1, (batch,), generator=_gen(0))
    clean = _tones(batch, num_samples, lengths)
    noisy, kind = mix_for_denoising(clean, lengths, prob=0.5, generator=_gen(1))
    assert noisy.shape == clean.shape
    assert set(kind.unique().tolist()) == {0, 1, 2}
    # about half corrupted: Binomial(64, 0.5) lies in [16, 48] with probability > 0.9999
    assert 16 <= (kind > 0).sum().item() <= 48
    padding = torch.arange(num_samples)[None, :] >= lengths[:, None]
    assert noisy[padding].eq(0).all()
    for b in range(batch):
        n = int(lengths[b])
        if kind[b] == 0:
            assert torch.equal(noisy[b], clean[b])
            continue
        snr = _snr_db(clean[b], noisy[b], n)
        low, high = (-5.0, 20.0) if kind[b] == 1 else (-5.0, 5.0)
        assert low - 0.01 <= snr <= high + 0.01, (b, int(kind[b]), snr)
    # same seed, same mix
    again, _ = mix_for_denoising(clean, lengths, prob=0.5, generator=_gen(1))
    assert torch.equal(again, noisy)


def test_denoising_mixes_another_utterance_of_the_batch():
    batch, num_samples = 4, 1600
    lengths = torch.full((batch,), num_samples)
    clean = _tones(batch, num_samples, lengths)
    noisy, kind = mix_for_denoising(clean, lengths, prob=1.0, noise_ratio=0.0, generator=_gen(2))
    assert kind.eq(2).all()
    for b in range(batch):
        added = noisy[b] - clean[b]
        # the added signal is a scaled copy of exactly one other utterance
        matches = [c for c in range(batch) if c != b and abs(_cosine(added, clean[c]) - 1) < 1e-4]
        assert len(matches) == 1
    # a batch of one falls back to noise
    single, kind = mix_for_denoising(clean[:1], lengths[:1], prob=1.0, noise_ratio=0.0, generator=_gen(3))
    assert kind.tolist() == [1] and not torch.equal(single, clean[:1])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()
