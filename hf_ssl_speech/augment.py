"""NEST denoising augmentation: mix noise or another utterance of the batch into the waveforms.

Not Hub-bound (used by the data pipeline before featurisation); torch only.

NEST (Huang et al. 2024, §2.3): with probability p each utterance gets either noise at an SNR drawn
uniformly from [-5, 20] dB or another utterance of the same batch at [-5, 5] dB; the model sees the noisy
input while its targets come from the clean audio. Everything is vectorised over the batch and drawn from
an explicit `torch.Generator`.
"""

from __future__ import annotations

import torch


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _power(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean square over the valid samples of each row: (batch, N), (batch, N) -> (batch,)."""
    return (x.pow(2) * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def mix_for_denoising(
    waveforms: torch.Tensor,
    lengths: torch.Tensor,
    prob: float = 0.5,
    noise: torch.Tensor | None = None,
    noise_snr_db: tuple[float, float] = (-5.0, 20.0),
    speech_snr_db: tuple[float, float] = (-5.0, 5.0),
    noise_ratio: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy waveforms (batch, N), kind (batch,) long: 0 clean, 1 noise, 2 other utterance).

    Args:
        waveforms: clean audio (batch, N) float, zero-padded past `lengths` (from the collator).
        lengths: valid samples per utterance (batch,).
        prob: probability that an utterance is corrupted at all (NEST: 0.5).
        noise: optional (batch, N) noise recordings (e.g. MUSAN crops) aligned with the batch; when None,
            white Gaussian noise from `generator` is used (no noise corpus offline).
        noise_snr_db / speech_snr_db: uniform SNR ranges for noise and for an interfering utterance.
        noise_ratio: probability that a corrupted utterance gets noise rather than another utterance
            (always noise when the batch has one utterance).
        generator: source of randomness.

    The interferer is scaled so that 10 log10(P_speech / P_interferer) equals the drawn SNR, with powers
    measured over the utterance's valid samples; padding stays zero. Another utterance is truncated (or
    zero beyond its own length) to the target's length.
    """
    batch, num_samples = waveforms.shape
    device = waveforms.device
    x = waveforms.float()
    valid = torch.arange(num_samples, device=device)[None, :] < lengths[:, None]  # (batch, N)
    corrupt = _uniform((batch,), generator, device) < prob
    use_noise = (_uniform((batch,), generator, device) < noise_ratio) | (batch < 2)
    # Partner b' != b: shift by a random offset in [1, batch - 1] (a derangement, no loop).
    offset = 1 + torch.floor(_uniform((batch,), generator, device) * max(batch - 1, 1)).long().clamp(
        max=max(batch - 2, 0)
    )
    partner = (torch.arange(batch, device=device) + offset) % batch
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn((batch, num_samples), generator=generator, device=gen_device).to(device)
    speech_interferer = x[partner]  # zero past the partner's own length already
    interferer = torch.where(use_noise[:, None], noise.float(), speech_interferer) * valid
    low = torch.where(use_noise, noise_snr_db[0], speech_snr_db[0])
    high = torch.where(use_noise, noise_snr_db[1], speech_snr_db[1])
    snr_db = low + (high - low) * _uniform((batch,), generator, device)
    # scale^2 * P_i = P_s / 10^(snr/10)  ->  scale = sqrt(P_s / (P_i * 10^(snr/10))); silent interferer -> 0.
    p_speech = _power(x, valid)
    p_interferer = _power(interferer, valid)
    scale = torch.sqrt(p_speech / (p_interferer.clamp(min=1e-12) * 10.0 ** (snr_db / 10.0)))
    scale = torch.where((p_interferer > 1e-12) & corrupt, scale, torch.zeros_like(scale))
    noisy = x + scale[:, None] * interferer
    kind = torch.where(corrupt, torch.where(use_noise, 1, 2), 0)
    return noisy.to(waveforms.dtype), kind


__all__ = ["mix_for_denoising"]
