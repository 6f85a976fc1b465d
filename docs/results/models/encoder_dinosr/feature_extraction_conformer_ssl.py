"""ConformerSslFeatureExtractor: NeMo-parity 80-dim log-mel features for Conformer / FastConformer encoders.

Hub-bound: this file is copied next to the weights by `save_pretrained`, so it imports nothing beyond
torch, numpy and transformers.

Recipe (NeMo `AudioToMelSpectrogramPreprocessor` defaults, as in `transformers.ParakeetFeatureExtractor`):
16 kHz audio → optional dither (training only) → pre-emphasis 0.97 → STFT (n_fft 512, symmetric Hann window
of 400 samples = 25 ms, hop 160 = 10 ms, centred with zero padding) → power spectrum → 80 slaney mel filters
→ log(x + 2**-24) → per-utterance, per-feature normalisation over the valid frames (mean, unbiased std
+ 1e-5) → padded frames set to 0.

The STFT and mel projection are ParakeetFeatureExtractor's own (`_torch_extract_fbank_features`,
`mel_filters`); this class adds input checks with actionable errors, dither, an explicit frame count and a
batched torch entry point (`extract_batch`) that a training loop can run on any device.

Frame count: with `center=True` torch.stft returns `1 + N // hop` frames for N samples, but NeMo (and
Parakeet) count `(N + 2 * (n_fft // 2) - n_fft) // hop = N // hop` valid frames and mask the last one.
We return exactly `samples // hop_length` frames per utterance (the padded width // hop for a batch) and
drop the always-masked trailing frame, in `__call__` and `extract_batch` alike.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import ParakeetFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import TensorType, logging

from .frames import HOP_LENGTH, SAMPLING_RATE

logger = logging.get_logger(__name__)

# NeMo's `CONSTANT` added to the per-feature std, and its log zero guard.
NORMALIZATION_EPSILON = 1e-5
LOG_ZERO_GUARD = 2**-24
# A (samples, channels) array has few channels; a batch row is never this short (we need >= 2 hops).
MAX_CHANNELS = 8
PADDING_CHOICES = {
    True: "longest",
    "longest": "longest",
    "max_length": "max_length",
    False: "do_not_pad",
    "do_not_pad": "do_not_pad",
}


class ConformerSslFeatureExtractor(ParakeetFeatureExtractor):
    r"""
    Log-mel feature extractor matching NeMo's preprocessor (see the module docstring for the recipe).

    Args:
        feature_size (`int`, 80): mel bins (NeMo `features`); must equal the model's `num_mel_bins`.
        sampling_rate (`int`, 16000): the only accepted input rate; other rates are refused, not resampled.
        hop_length (`int`, 160), win_length (`int`, 400), n_fft (`int`, 512): STFT geometry in samples.
        preemphasis (`float`, 0.97): pre-emphasis coefficient, 0.0 disables it.
        padding_value (`float`, 0.0): value of padded samples (silence).
        dither (`float`, 1e-5): std of the Gaussian noise added to the waveform *when training*; calls only
            use it when asked (`extractor(..., dither=extractor.dither)`), inference is deterministic.
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 80,
        sampling_rate: int = SAMPLING_RATE,
        hop_length: int = HOP_LENGTH,
        n_fft: int = 512,
        win_length: int = 400,
        preemphasis: float = 0.97,
        padding_value: float = 0.0,
        dither: float = 1e-5,
        return_attention_mask: bool = True,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            hop_length=hop_length,
            n_fft=n_fft,
            win_length=win_length,
            preemphasis=preemphasis,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        if dither < 0:
            raise ValueError(f"ConformerSslFeatureExtractor.dither={dither!r} is invalid: expected a std >= 0.")
        self.dither = dither

    # ------------------------------------------------------------------ geometry
    @property
    def min_samples(self) -> int:
        """Shortest accepted utterance: 2 frames, since the unbiased std over 1 frame is undefined (NaN)."""
        return 2 * self.hop_length

    def _torch_extract_fbank_features(self, waveform: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """(batch, samples) -> (batch, frames + 1, mels) log-mel; Parakeet's recipe with a cheaper power spectrum.

        Parakeet computes |X|^2 as sqrt(re^2 + im^2)^2, which costs twice the STFT itself on CPU; re^2 + im^2 is
        the same number (max diff ~2e-6) in one pass.
        """
        window = torch.hann_window(self.win_length, periodic=False, device=device)
        stft = torch.stft(
            waveform,
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=window,
            return_complex=True,
            pad_mode="constant",
        )
        power = stft.real.square() + stft.imag.square()  # (batch, freq, frames + 1)
        mel = torch.matmul(self.mel_filters.to(device), power)
        return torch.log(mel + LOG_ZERO_GUARD).transpose(1, 2)

    def num_frames(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """Valid feature frames for `num_samples` samples (NeMo: `samples // hop`)."""
        return num_samples // self.hop_length

    # ------------------------------------------------------------------ batched torch path
    def extract_batch(
        self,
        waveforms: torch.Tensor,
        lengths: torch.Tensor,
        dither: float = 0.0,
        generator: torch.Generator | None = None,
        normalize: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Featurise a padded batch on the device it lives on (e.g. inside a training loop on an accelerator).

        Args:
            waveforms (`torch.Tensor` of shape (batch, samples)): mono 16 kHz audio, right-padded; values past
                each utterance's length are ignored (treated as zeros).
            lengths (`torch.Tensor` of shape (batch,)): valid samples per utterance (from the collator).
            dither (`float`): std of Gaussian noise added to the valid samples; pass `self.dither` in training,
                0.0 (default) for deterministic features.
            generator (`torch.Generator`, optional): source of the dither noise, on the waveforms' device.
            normalize (`bool`): per-utterance, per-feature standardisation (NeMo's, what the models are trained
                on); False returns the raw log-mels (e.g. for a log-mel baseline whose pooled mean must keep the
                spectrum's level and shape).

        Returns:
            features (`torch.Tensor` float32 of shape (batch, samples // hop_length, feature_size)), zero at
            padded frames, and feature_lengths (`torch.Tensor` long of shape (batch,)) = lengths // hop_length.
            An utterance's features do not depend on how much padding the batch adds (up to float rounding).
        """
        if waveforms.ndim != 2:
            raise ValueError(
                f"extract_batch: waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}; "
                "stack mono utterances and pass their lengths."
            )
        if lengths.shape != waveforms.shape[:1]:
            raise ValueError(
                f"extract_batch: lengths must have shape ({waveforms.shape[0]},) to match waveforms "
                f"{tuple(waveforms.shape)}, got {tuple(lengths.shape)}."
            )
        device = waveforms.device
        lengths = lengths.to(device=device, dtype=torch.long)
        num_samples = waveforms.shape[1]
        shortest, longest = int(lengths.min()), int(lengths.max())
        if shortest < self.min_samples or longest > num_samples:
            raise ValueError(
                f"extract_batch: lengths must be in [{self.min_samples}, {num_samples}] (2 hops of "
                f"{self.hop_length} samples .. the padded width), got min {shortest}, max {longest}; drop utterances "
                f"shorter than {self.min_samples / self.sampling_rate * 1000:.0f} ms before batching."
            )

        # STFT and logs in float32 whatever autocast says: bf16/fp16 log-mels lose the low-energy detail.
        with torch.autocast(device_type=device.type, enabled=False):
            samples = waveforms.float()
            valid_samples = torch.arange(num_samples, device=device)[None, :] < lengths[:, None]  # (batch, samples)
            if dither > 0:
                noise = torch.randn(samples.shape, generator=generator, device=device, dtype=samples.dtype)
                samples = samples + dither * noise
            if self.preemphasis:
                # y[t] = x[t] - a * x[t-1]; y[0] = x[0] (NeMo keeps the first sample as is).
                samples = torch.cat([samples[:, :1], samples[:, 1:] - self.preemphasis * samples[:, :-1]], dim=1)
            # Zero the padding (after pre-emphasis, like NeMo): padded samples then equal the STFT's own
            # zero centre-padding, which makes features independent of the batch padding.
            samples = samples.masked_fill(~valid_samples, 0.0)

            num_frames = num_samples // self.hop_length
            log_mel = self._torch_extract_fbank_features(samples, device=device)  # (batch, frames + 1, mels)
            log_mel = log_mel[:, :num_frames]  # drop the trailing frame that is never valid (module docstring)

            feature_lengths = self.num_frames(lengths)  # (batch,)
            if normalize:
                features = normalize_per_feature(log_mel, feature_lengths)
            else:
                valid = torch.arange(num_frames, device=device)[None, :] < feature_lengths[:, None]
                features = log_mel.masked_fill(~valid[:, :, None], 0.0)
        return features, feature_lengths

    # ------------------------------------------------------------------ HF entry point
    def __call__(
        self,
        raw_speech: np.ndarray | torch.Tensor | list[float] | list[np.ndarray] | list[torch.Tensor],
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        padding: bool | str = "longest",
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        dither: float = 0.0,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        do_normalize: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """
        Featurise one utterance or a batch of mono 16 kHz utterances.

        Args:
            raw_speech: one utterance (1-D array/tensor or list of floats), a list of 1-D arrays/tensors, or a
                2-D array/tensor read as (batch, samples). Multi-channel audio is refused: mix it down first.
            sampling_rate (`int`): rate of `raw_speech`; must equal `self.sampling_rate`. Pass it: without it a
                wrong rate cannot be detected (a warning is logged, as in Wav2Vec2's extractor).
            return_tensors (`"pt"`, `"np"` or None): torch tensors (on `device`) or numpy arrays (None = numpy).
            padding (`"longest"`/True, `"max_length"`, or `"do_not_pad"`/False for equal-length batches):
                how the waveforms are padded before featurising; max_length and pad_to_multiple_of count samples.
            truncation (`bool`): cut utterances longer than `max_length` samples.
            return_attention_mask (`bool`, optional): defaults to `self.return_attention_mask` (True).
            dither (`float`): noise std; 0.0 (default) for inference, `self.dither` for training.
            generator (`torch.Generator`, optional): source of the dither noise.
            device: where to compute (e.g. "cuda").
            do_normalize (`bool`): False skips the per-utterance normalisation (raw log-mels; see `extract_batch`).

        Returns:
            [`BatchFeature`] with `input_features` (batch, frames, feature_size) float32 and `attention_mask`
            (batch, frames) int64 (1 = real frame), frames = padded samples // hop_length.
        """
        unknown = set(kwargs) - {"return_token_timestamps"}
        if unknown:
            logger.warning(f"{self.__class__.__name__}.__call__ ignores the arguments {sorted(unknown)}.")
        self._check_sampling_rate(sampling_rate)
        utterances = self._as_mono_utterances(raw_speech)
        for index, utterance in enumerate(utterances):
            self._check_utterance(utterance, index if len(utterances) > 1 else None)
        waveforms, lengths = self._pad(utterances, padding, max_length, truncation, pad_to_multiple_of)
        features, feature_lengths = self.extract_batch(
            waveforms.to(device), lengths.to(device), dither=dither, generator=generator, normalize=do_normalize
        )
        data = {"input_features": features}
        if return_attention_mask if return_attention_mask is not None else self.return_attention_mask:
            frames = torch.arange(features.shape[1], device=features.device)
            data["attention_mask"] = (frames[None, :] < feature_lengths[:, None]).long()  # (batch, frames)
        if return_tensors is None or return_tensors == TensorType.NUMPY:
            data = {key: value.cpu().numpy() for key, value in data.items()}
            return_tensors = "np"
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------ input checks (pure, no state)
    def _check_sampling_rate(self, sampling_rate: int | None) -> None:
        if sampling_rate is None:
            logger.warning(
                f"It is strongly recommended to pass `sampling_rate={self.sampling_rate}` to "
                f"`{self.__class__.__name__}()`: without it audio at another rate is silently mis-featurised."
            )
        elif sampling_rate != self.sampling_rate:
            raise ValueError(
                f"sampling_rate={sampling_rate} but {self.__class__.__name__} expects {self.sampling_rate} Hz "
                f"audio: resample to {self.sampling_rate} Hz first, e.g. "
                f"`soxr.resample(audio, {sampling_rate}, {self.sampling_rate})`."
            )

    def _as_mono_utterances(self, raw_speech) -> list[torch.Tensor]:
        """Split `raw_speech` into 1-D float32 CPU tensors, refusing anything that is not mono audio."""
        if isinstance(raw_speech, (list, tuple)):
            if len(raw_speech) == 0:
                raise ValueError("raw_speech is an empty list: pass at least one utterance.")
            if isinstance(raw_speech[0], (int, float, np.number)):  # one utterance as a list of floats
                raw_speech = np.asarray(raw_speech, dtype=np.float32)
            else:
                items = [_as_tensor(item) for item in raw_speech]
                for index, item in enumerate(items):
                    if item.ndim != 1:
                        _refuse_non_mono(f"raw_speech[{index}]", tuple(item.shape))
                return items
        batch = _as_tensor(raw_speech)
        if batch.ndim == 1:
            return [batch]
        if batch.ndim == 2 and batch.shape[1] > MAX_CHANNELS:  # (batch, samples), the HF convention
            return list(batch.unbind(0))
        _refuse_non_mono("raw_speech", tuple(batch.shape))

    def _check_utterance(self, utterance: torch.Tensor, index: int | None) -> None:
        name = "raw_speech" if index is None else f"raw_speech[{index}]"
        if utterance.numel() == 0:
            raise ValueError(f"{name} is empty (0 samples): drop it before featurising.")
        bad = int((~torch.isfinite(utterance)).sum())
        if bad:
            raise ValueError(
                f"{name} has {bad} non-finite samples (NaN or inf) out of {utterance.numel()}: the file is corrupt "
                "or a previous step divided by zero; drop or repair it."
            )
        if utterance.numel() < self.min_samples:
            raise ValueError(
                f"{name} has {utterance.numel()} samples, fewer than the {self.min_samples} "
                f"({self.min_samples / self.sampling_rate * 1000:.0f} ms, 2 frames) needed for per-feature "
                "normalisation: drop it or pad it with silence."
            )

    def _pad(
        self,
        utterances: list[torch.Tensor],
        padding: bool | str,
        max_length: int | None,
        truncation: bool,
        pad_to_multiple_of: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad 1-D utterances into (batch, samples) with `padding_value`; returns it and the lengths."""
        if padding not in PADDING_CHOICES:
            raise ValueError(f"padding={padding!r} is invalid: expected one of {list(PADDING_CHOICES)}.")
        strategy = PADDING_CHOICES[padding]
        if (strategy == "max_length" or truncation) and max_length is None:
            raise ValueError(f"padding={padding!r}, truncation={truncation} need max_length (in samples).")
        if truncation:
            utterances = [utterance[:max_length] for utterance in utterances]
        lengths = torch.tensor([len(utterance) for utterance in utterances], dtype=torch.long)
        width = int(lengths.max())
        if strategy == "do_not_pad" and int(lengths.min()) != width:
            raise ValueError(
                f"padding={padding!r} but the utterances have different lengths ({int(lengths.min())}..{width} "
                "samples): use padding='longest' or featurise them one at a time."
            )
        if strategy == "max_length":
            if width > max_length:
                raise ValueError(
                    f"an utterance has {width} samples, more than max_length={max_length}: pass truncation=True "
                    "or a larger max_length."
                )
            width = max_length
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        waveforms = torch.full((len(utterances), width), float(self.padding_value), dtype=torch.float32)
        for row, utterance in enumerate(utterances):
            waveforms[row, : len(utterance)] = utterance
        return waveforms, lengths


def normalize_per_feature(log_mel: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor:
    """
    NeMo `normalize_batch(..., "per_feature")`: standardise each mel bin of each utterance over its valid frames.

    Args:
        log_mel (`torch.Tensor` of shape (batch, frames, mels)): log-mel features; padded frames hold anything.
        feature_lengths (`torch.Tensor` of shape (batch,)): valid frames per utterance, each >= 2.

    Returns:
        (batch, frames, mels): (x - mean) / (unbiased std + 1e-5) on valid frames, 0 on padded frames.
    """
    valid = (torch.arange(log_mel.shape[1], device=log_mel.device)[None, :] < feature_lengths[:, None])[..., None]
    count = feature_lengths.to(log_mel.dtype)[:, None, None]  # (batch, 1, 1)
    masked = log_mel.masked_fill(~valid, 0.0)
    mean = masked.sum(dim=1, keepdim=True) / count  # (batch, 1, mels)
    variance = ((masked - mean).masked_fill(~valid, 0.0) ** 2).sum(dim=1, keepdim=True) / (count - 1)
    normalized = (log_mel - mean) / (variance.sqrt() + NORMALIZATION_EPSILON)
    return normalized.masked_fill(~valid, 0.0)


def _as_tensor(audio) -> torch.Tensor:
    """Any array-like audio as a float32 CPU tensor (ints are converted as they are, not rescaled)."""
    if isinstance(audio, torch.Tensor):
        return audio.detach().to(device="cpu", dtype=torch.float32)
    return torch.from_numpy(np.asarray(audio, dtype=np.float32))


def _refuse_non_mono(name: str, shape: tuple[int, ...]) -> None:
    """Raise the error for multi-channel (or otherwise non 1-D) audio, naming the likely channel axis."""
    if len(shape) == 2:
        channel_axis = int(np.argmin(shape))
        layout = "(samples, channels)" if channel_axis == 1 else "(channels, samples)"
        raise ValueError(
            f"{name} has shape {shape}, which looks like {layout} audio with {shape[channel_axis]} channels; "
            f"this feature extractor takes mono audio: mix down first, e.g. `audio.mean(axis={channel_axis})`."
        )
    raise ValueError(
        f"{name} has shape {shape}: expected mono audio, a 1-D array of samples (or a list of them, or a 2-D "
        "(batch, samples) array); mix multi-channel audio down to mono first."
    )


__all__ = ["ConformerSslFeatureExtractor"]
