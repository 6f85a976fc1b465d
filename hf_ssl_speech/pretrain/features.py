"""The loop's featuriser: one `extract_batch(waveforms, lengths, dither, generator)` contract for every front end.

Our log-mel `ConformerSslFeatureExtractor` featurises a padded batch in torch itself. A w2v-BERT 2.0 model reads
stacked fbank features from transformers' `SeamlessM4TFeatureExtractor` (numpy, Kaldi fbank, 2 frames stacked):
`StackedFbankBatches` gives it the same contract, so `loop.featurise` (dither, denoising, masks) works unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


class StackedFbankBatches:
    """`extract_batch` over a `SeamlessM4TFeatureExtractor`; everything else (save_pretrained, sampling_rate, ...)
    is the wrapped extractor's, so a checkpoint's `model/` folder holds the extractor the model was trained with."""

    def __init__(self, extractor: Any) -> None:
        self.extractor = extractor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["extractor"], name)

    def extract_batch(
        self,
        waveforms: torch.Tensor,
        lengths: torch.Tensor,
        dither: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (batch, frames, 2 * num_mel_bins), frames (batch,)) of a right-padded 16 kHz batch.

        Dither is Gaussian noise of std `dither` on the real samples (as in our log-mel extractor; drawn from
        `generator` so a resumed run draws the same); features are per-utterance normalised over real frames.
        """
        device = waveforms.device
        if dither > 0:
            noise = torch.randn(waveforms.shape, generator=generator, device=device, dtype=waveforms.dtype)
            real = torch.arange(waveforms.shape[1], device=device)[None, :] < lengths[:, None]
            waveforms = waveforms + dither * noise * real
        arrays = [wave[: int(n)].float().cpu().numpy() for wave, n in zip(waveforms, lengths)]
        out = self.extractor(
            arrays,
            sampling_rate=self.extractor.sampling_rate,
            padding=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        features = out["input_features"].to(device=device, dtype=torch.float32)
        return features, out["attention_mask"].sum(-1).to(device=device, dtype=torch.long)


def batch_extractor(extractor: Any) -> Any:
    """`extractor` itself when it featurises torch batches (`extract_batch`), else its `StackedFbankBatches`."""
    if hasattr(extractor, "extract_batch"):
        return extractor
    from transformers import SeamlessM4TFeatureExtractor

    if isinstance(extractor, SeamlessM4TFeatureExtractor):
        return StackedFbankBatches(extractor)
    raise TypeError(
        f"{type(extractor).__name__} cannot featurise pretraining batches: expected ConformerSslFeatureExtractor "
        "(log-mel) or SeamlessM4TFeatureExtractor (w2v-BERT stacked fbank)"
    )


__all__ = ["StackedFbankBatches", "batch_extractor"]
