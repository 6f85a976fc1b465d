"""Denoising augmentation (NEST, WavLM): mix noise or another utterance of the batch into the waveforms.

Not Hub-bound (used by the data pipeline before featurisation); torch only.

NEST (Huang et al. 2024, §2.3): with probability p each utterance gets either noise at an SNR drawn
uniformly from [-5, 20] dB or another utterance of the same batch at [-5, 5] dB, over its whole length.
WavLM (Chen et al. 2022, utterance mixing): with probability 0.2 a segment of another utterance of
the batch, at most half as long as the primary one, cut at a random place and laid over a random place of the
primary at an energy ratio of -5..5 dB (`segment_fraction=0.5`). Either way the model sees the mixed input
while its targets come from the clean, primary audio. Everything is vectorised over the batch and drawn from
an explicit `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    segment_fraction: float | None = None,
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
        segment_fraction: None (NEST): the interferer covers the whole utterance. A fraction in (0, 1] (WavLM:
            0.5): the interferer is one segment of uniform length in [1, segment_fraction * length] samples (and
            no longer than the other utterance), cut from a uniform position of its source and added at a uniform
            position of the utterance.

    The interferer is scaled so that 10 log10(P_speech / P_interferer) equals the drawn SNR (energy ratio), with
    P_speech the mean square over the utterance's valid samples and P_interferer the mean square over the
    samples the interferer covers (the whole utterance, or its segment: inside the overlap the ratio is the
    drawn one, as in WavLM and NeMo's WavLMAugmentation); padding stays zero. Without a segment another
    utterance is truncated (or zero beyond its own length) to the target's length.
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
    source = torch.where(use_noise[:, None], noise.float(), speech_interferer)  # (batch, N)
    low = torch.where(use_noise, noise_snr_db[0], speech_snr_db[0])
    high = torch.where(use_noise, noise_snr_db[1], speech_snr_db[1])
    snr_db = low + (high - low) * _uniform((batch,), generator, device)
    if segment_fraction is None:
        covered = valid
    else:
        # WavLM: one segment of the source, at most segment_fraction of the primary (and of the source itself).
        source_lengths = torch.where(use_noise, num_samples, lengths[partner])  # (batch,)
        longest = torch.minimum((lengths * segment_fraction).long(), source_lengths).clamp(min=1)
        seg = (1 + (_uniform((batch,), generator, device) * longest).long()).clamp(max=longest)  # U{1..longest}
        start = (_uniform((batch,), generator, device) * (lengths - seg + 1).clamp(min=1)).long()  # in the primary
        cut = (_uniform((batch,), generator, device) * (source_lengths - seg + 1).clamp(min=1)).long()  # source
        positions = torch.arange(num_samples, device=device)[None, :]  # (1, N)
        covered = (positions >= start[:, None]) & (positions < (start + seg)[:, None]) & valid  # (batch, N)
        index = (positions - start[:, None] + cut[:, None]).clamp(0, num_samples - 1)
        source = source.gather(1, index)  # sample t of the primary gets source sample t - start + cut
    interferer = source * covered
    # scale^2 * P_i = P_s / 10^(snr/10)  ->  scale = sqrt(P_s / (P_i * 10^(snr/10))); silent interferer -> 0.
    p_speech = _power(x, valid)
    p_interferer = _power(interferer, covered)
    scale = torch.sqrt(p_speech / (p_interferer.clamp(min=1e-12) * 10.0 ** (snr_db / 10.0)))
    scale = torch.where((p_interferer > 1e-12) & corrupt, scale, torch.zeros_like(scale))
    noisy = x + scale[:, None] * interferer
    kind = torch.where(corrupt, torch.where(use_noise, 1, 2), 0)
    return noisy.to(waveforms.dtype), kind


__all__ = ["mix_for_denoising"]


# ---------------------------------------------------------------------------------------------- SpecAugment
@dataclass
class SpecAugmentConfig:
    """SpecAugment (Park et al. 2019) as NeMo's `SpectrogramAugmentation` defaults it for Conformer CTC."""

    freq_masks: int = 2
    freq_width: int = 27  # widest frequency mask, mel bins
    time_masks: int = 10
    time_width: float = 0.05  # widest time mask: fraction of the utterance (< 1) or frames (>= 1)
    fill_value: float = 0.0  # features are normalised per utterance, so 0 is each bin's mean


def spec_augment(
    features: torch.Tensor,
    lengths: torch.Tensor,
    config: SpecAugmentConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Mask random frequency bands and time spans of each utterance, all utterances at once (no Python loops).

    Args:
        features (`torch.Tensor` of shape (batch, frames, mels)): normalised log-mels from the collator.
        lengths (`torch.Tensor` of shape (batch,)): valid frames per utterance; masks stay inside them.
        config: mask counts and widths.
        generator: source of randomness (None: torch's global RNG, seeded per dataloader worker by torch).

    Returns:
        A new tensor, `features` with masked cells set to `config.fill_value`. Mask widths are uniform in
        [0, width] and starts uniform over the positions where the whole mask fits (NeMo's sampling).
    """
    batch, frames, mels = features.shape
    device = features.device
    lengths = lengths.to(device)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device="cpu" if generator is None else generator.device).to(
            device
        )

    masked = torch.zeros(batch, frames, mels, dtype=torch.bool, device=device)
    if config.freq_masks > 0 and config.freq_width > 0:
        max_width = min(config.freq_width, mels)
        widths = (draw((batch, config.freq_masks)) * (max_width + 1)).long()  # (batch, masks) in [0, max_width]
        starts = (draw((batch, config.freq_masks)) * (mels - widths + 1)).long()
        bins = torch.arange(mels, device=device)[None, None, :]  # (1, 1, mels)
        in_band = (bins >= starts[..., None]) & (bins < (starts + widths)[..., None])  # (batch, masks, mels)
        masked |= in_band.any(dim=1)[:, None, :]
    if config.time_masks > 0 and config.time_width > 0:
        if config.time_width < 1:
            max_width = (lengths.float() * config.time_width).long().clamp(min=1)  # (batch,)
        else:
            max_width = torch.full_like(lengths, int(config.time_width))
        max_width = torch.minimum(max_width, lengths)
        widths = (draw((batch, config.time_masks)) * (max_width[:, None] + 1)).long().clamp(max=max_width[:, None])
        starts = (draw((batch, config.time_masks)) * (lengths[:, None] - widths + 1)).long()
        steps = torch.arange(frames, device=device)[None, None, :]  # (1, 1, frames)
        in_span = (steps >= starts[..., None]) & (steps < (starts + widths)[..., None])  # (batch, masks, frames)
        masked |= in_span.any(dim=1)[:, :, None]
    return features.masked_fill(masked, config.fill_value)
