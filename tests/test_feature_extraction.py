"""ConformerSslFeatureExtractor: shapes, padding invariance, NeMo/Parakeet parity, an independent reference,
refusals of bad input, dither, and save/load. Audio is speech-like and read back from real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoFeatureExtractor, ParakeetFeatureExtractor
from transformers.audio_utils import mel_filter_bank
from transformers.testing_utils import CaptureLogger

from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor, logger

SR = 16000
HOP = 160
LENGTHS = (16000, 8037, 4800)  # 1 s, an odd length, 0.3 s


@pytest.fixture(scope="module")
def extractor() -> ConformerSslFeatureExtractor:
    return ConformerSslFeatureExtractor()


@pytest.fixture
def utterances(tmp_path, write_wav) -> list[np.ndarray]:
    """Three speech-like mono utterances of LENGTHS samples, written as PCM16 WAVs and read back."""
    audio = []
    for seed, n in enumerate(LENGTHS):
        path = write_wav(tmp_path / f"utt{seed}.wav", n / SR, SR, seed=seed)
        samples, rate = sf.read(path, dtype="float32")
        assert rate == SR and samples.shape == (n,)
        audio.append(samples)
    return audio


def reference_features(audio: np.ndarray) -> np.ndarray:
    """The recipe written out plainly in float64 numpy for one utterance: (frames, 80)."""
    x = audio.astype(np.float64)
    y = np.concatenate([x[:1], x[1:] - 0.97 * x[:-1]])  # pre-emphasis
    n_fft, win = 512, 400
    padded = np.pad(y, (n_fft // 2, n_fft // 2))  # centred frames, zero padding
    window = np.zeros(n_fft)
    window[(n_fft - win) // 2 : (n_fft - win) // 2 + win] = np.hanning(win)  # symmetric Hann, centred in n_fft
    frames = len(x) // HOP
    spectra = np.stack([np.fft.rfft(padded[k * HOP : k * HOP + n_fft] * window) for k in range(frames)])
    power = np.abs(spectra) ** 2  # (frames, 257)
    mel = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=80,
        min_frequency=0.0,
        max_frequency=SR / 2,
        sampling_rate=SR,
        norm="slaney",
        mel_scale="slaney",
    )
    log_mel = np.log(power @ mel + 2**-24)  # (frames, 80)
    return (log_mel - log_mel.mean(0)) / (log_mel.std(0, ddof=1) + 1e-5)


def test_shapes_mask_and_normalisation(extractor, utterances):
    out = extractor(utterances, sampling_rate=SR, return_tensors="pt")
    assert set(out.keys()) == set(ConformerSslFeatureExtractor.model_input_names)
    features, mask = out["input_features"], out["attention_mask"]
    assert features.shape == (3, LENGTHS[0] // HOP, 80) and features.dtype == torch.float32
    assert mask.dtype == torch.long and mask.shape == (3, LENGTHS[0] // HOP)
    assert mask.sum(1).tolist() == [n // HOP for n in LENGTHS]
    assert mask[:, 0].all() and torch.all(mask[:, 1:] <= mask[:, :-1])  # 1s then 0s
    assert torch.all(features[mask == 0] == 0)
    for row, n in enumerate(LENGTHS):
        valid = features[row, : n // HOP].double()
        torch.testing.assert_close(valid.mean(0), torch.zeros(80, dtype=torch.double), atol=1e-5, rtol=0)
        std = valid.std(0)  # (std + 1e-5) normalisation leaves a std just under 1
        assert torch.all((std > 0.99) & (std <= 1.0)), std
    as_numpy = extractor(utterances, sampling_rate=SR)
    assert isinstance(as_numpy["input_features"], np.ndarray) and as_numpy["attention_mask"].dtype == np.int64
    np.testing.assert_allclose(as_numpy["input_features"], features.numpy())


@pytest.mark.parametrize(("samples", "frames"), [(320, 2), (479, 2), (480, 3), (16000, 100), (16159, 100)])
def test_frame_count_is_samples_floor_hop(extractor, speech_like, samples, frames):
    out = extractor(speech_like(1.1)[:samples], sampling_rate=SR, return_tensors="pt")
    assert out["input_features"].shape == (1, frames, 80)
    assert out["attention_mask"].sum().item() == frames


def test_padding_invariance(extractor, utterances):
    batch = extractor(utterances, sampling_rate=SR, return_tensors="pt")["input_features"]
    for row, audio in enumerate(utterances):
        alone = extractor(audio, sampling_rate=SR, return_tensors="pt")["input_features"][0]
        torch.testing.assert_close(batch[row, : len(alone)], alone, atol=1e-5, rtol=0)
    # Extra padding (max_length, pad_to_multiple_of) changes only the number of padded frames.
    wide = extractor(utterances, sampling_rate=SR, return_tensors="pt", padding="max_length", max_length=20000)
    assert wide["input_features"].shape == (3, 125, 80)
    torch.testing.assert_close(wide["input_features"][:, :100], batch, atol=1e-5, rtol=0)
    multiple = extractor(utterances, sampling_rate=SR, return_tensors="pt", pad_to_multiple_of=1600 * 3)
    assert multiple["input_features"].shape == (3, 120, 80)


def test_extract_batch_matches_call_and_ignores_padding_content(extractor, utterances):
    lengths = torch.tensor(LENGTHS)
    waveforms = torch.zeros(3, 17000)
    for row, audio in enumerate(utterances):
        waveforms[row, : len(audio)] = torch.from_numpy(audio)
    features, feature_lengths = extractor.extract_batch(waveforms, lengths)
    assert features.shape == (3, 17000 // HOP, 80)
    assert feature_lengths.tolist() == [n // HOP for n in LENGTHS]
    expected = extractor(utterances, sampling_rate=SR, return_tensors="pt")["input_features"]
    torch.testing.assert_close(features[:, :100], expected, atol=1e-5, rtol=0)
    assert torch.all(features[:, 100:] == 0)
    # Garbage in the padded region must not leak into the real frames.
    noisy = waveforms.clone()
    for row, n in enumerate(LENGTHS):
        noisy[row, n:] = torch.randn(17000 - n)
    torch.testing.assert_close(extractor.extract_batch(noisy, lengths)[0], features, atol=1e-5, rtol=0)


def test_parity_with_parakeet_extractor(extractor, utterances):
    ours = extractor(utterances, sampling_rate=SR, return_tensors="pt")
    theirs = ParakeetFeatureExtractor()(utterances, sampling_rate=SR, return_tensors="pt")
    frames = ours["input_features"].shape[1]
    # Parakeet (like NeMo) keeps torch.stft's 1 + N // hop frames and masks the last one; we drop it.
    assert theirs["input_features"].shape[1] == frames + 1
    assert not theirs["attention_mask"][:, frames:].any()
    torch.testing.assert_close(ours["attention_mask"].bool(), theirs["attention_mask"][:, :frames])
    torch.testing.assert_close(ours["input_features"], theirs["input_features"][:, :frames], atol=1e-5, rtol=0)


def test_matches_independent_numpy_reference(extractor, utterances):
    for audio in utterances:
        ours = extractor(audio, sampling_rate=SR)["input_features"][0]
        reference = reference_features(audio)
        assert ours.shape == reference.shape
        # float32 STFT against a float64 one: differences come from rounding only.
        np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)


def test_dither_only_when_asked(extractor, utterances):
    audio = utterances[1]
    plain = [extractor(audio, sampling_rate=SR, return_tensors="pt")["input_features"] for _ in range(2)]
    torch.testing.assert_close(plain[0], plain[1], atol=0, rtol=0)  # deterministic by default

    def dithered(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        out = extractor(audio, sampling_rate=SR, return_tensors="pt", dither=extractor.dither, generator=generator)
        return out["input_features"]

    torch.testing.assert_close(dithered(0), dithered(0), atol=0, rtol=0)
    assert not torch.equal(dithered(0), dithered(1))
    assert not torch.equal(dithered(0), plain[0])
    # Digital silence: without dither every bin is log(2**-24) (normalised to 0); dither makes it noise.
    silence = np.zeros(3200, dtype=np.float32)
    quiet = extractor(silence, sampling_rate=SR, return_tensors="pt")["input_features"]
    assert torch.all(quiet == 0)
    noisy = extractor(silence, sampling_rate=SR, return_tensors="pt", dither=1e-5)["input_features"]
    assert torch.isfinite(noisy).all() and noisy.std() > 0.5


def test_save_and_load_round_trip(extractor, utterances, tmp_path):
    custom = ConformerSslFeatureExtractor(feature_size=64, dither=0.0, preemphasis=0.9)
    custom.save_pretrained(tmp_path)
    loaded = ConformerSslFeatureExtractor.from_pretrained(tmp_path)
    assert type(loaded) is ConformerSslFeatureExtractor
    for name in ("feature_size", "sampling_rate", "hop_length", "n_fft", "win_length", "preemphasis", "dither"):
        assert getattr(loaded, name) == getattr(custom, name), name
    a = custom(utterances, sampling_rate=SR, return_tensors="pt")["input_features"]
    b = loaded(utterances, sampling_rate=SR, return_tensors="pt")["input_features"]
    assert a.shape[-1] == 64
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_auto_feature_extractor_and_hub_files(tmp_path):
    """Saving writes this module next to the config (for trust_remote_code) and AutoFeatureExtractor finds it."""
    # (importing hf_ssl_speech, as this module does, registers the Auto classes)
    ConformerSslFeatureExtractor().save_pretrained(tmp_path)
    assert (tmp_path / "feature_extraction_conformer_ssl.py").is_file()
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["auto_map"]["AutoFeatureExtractor"] == "feature_extraction_conformer_ssl.ConformerSslFeatureExtractor"
    assert type(AutoFeatureExtractor.from_pretrained(tmp_path)) is ConformerSslFeatureExtractor


def test_refuses_wrong_sampling_rate(extractor, utterances):
    with pytest.raises(ValueError, match=r"sampling_rate=8000 .*16000 Hz.*resample"):
        extractor(utterances[0], sampling_rate=8000)


def test_warns_without_sampling_rate(extractor, utterances):
    with CaptureLogger(logger) as captured:
        extractor(utterances[0])
    assert "sampling_rate" in captured.out
    with CaptureLogger(logger) as captured:
        extractor(utterances[0], sampling_rate=SR)
    assert captured.out == ""


def test_refuses_empty_signals(extractor, utterances):
    with pytest.raises(ValueError, match=r"raw_speech\[1\] is empty"):
        extractor([utterances[0], np.zeros(0, dtype=np.float32)], sampling_rate=SR)
    with pytest.raises(ValueError, match="empty list"):
        extractor([], sampling_rate=SR)
    with pytest.raises(ValueError, match=r"raw_speech has 100 samples, fewer than the 320"):
        extractor(utterances[0][:100], sampling_rate=SR)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_refuses_non_finite_samples(extractor, utterances, bad):
    broken = utterances[2].copy()
    broken[[10, 500]] = bad
    with pytest.raises(ValueError, match=r"raw_speech\[2\] has 2 non-finite samples"):
        extractor([utterances[0], utterances[1], broken], sampling_rate=SR)
    with pytest.raises(ValueError, match="non-finite"):
        extractor(torch.from_numpy(broken), sampling_rate=SR)


def test_refuses_stereo(extractor, tmp_path, write_wav):
    stereo, rate = sf.read(write_wav(tmp_path / "stereo.wav", 0.5, SR, channels=2), dtype="float32")
    assert stereo.shape == (8000, 2)  # soundfile's (samples, channels)
    with pytest.raises(ValueError, match=r"\(samples, channels\).*mix down.*axis=1"):
        extractor(stereo, sampling_rate=rate)
    with pytest.raises(ValueError, match=r"raw_speech\[0\] has shape \(2, 8000\).*\(channels, samples\).*axis=0"):
        extractor([stereo.T], sampling_rate=rate)
    with pytest.raises(ValueError, match="mono"):
        extractor(torch.zeros(2, 2, 8000), sampling_rate=rate)
    # The mixed-down signal is accepted.
    assert extractor(stereo.mean(axis=1), sampling_rate=rate)["input_features"].shape == (1, 50, 80)


def test_two_dimensional_input_is_a_batch(extractor, utterances):
    batch = np.stack([utterances[0], utterances[0][::-1].copy()])  # (batch, samples), the HF convention
    out = extractor(torch.from_numpy(batch), sampling_rate=SR, return_tensors="pt")
    assert out["input_features"].shape == (2, 100, 80)


def test_extract_batch_refuses_bad_lengths(extractor):
    with pytest.raises(ValueError, match=r"lengths must be in \[320, 1000\]"):
        extractor.extract_batch(torch.zeros(2, 1000), torch.tensor([1000, 100]))
    with pytest.raises(ValueError, match=r"lengths must be in \[320, 1000\]"):
        extractor.extract_batch(torch.zeros(2, 1000), torch.tensor([1000, 1001]))
    with pytest.raises(ValueError, match=r"waveforms must be \(batch, samples\)"):
        extractor.extract_batch(torch.zeros(1000), torch.tensor([1000]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the features must match the CPU)")
def test_extract_batch_on_cuda_matches_cpu(extractor, utterances):
    waveforms = torch.zeros(3, 16000)
    for row, audio in enumerate(utterances):
        waveforms[row, : len(audio)] = torch.from_numpy(audio)
    lengths = torch.tensor(LENGTHS)
    cpu, _ = extractor.extract_batch(waveforms, lengths)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu, gpu_lengths = extractor.extract_batch(waveforms.cuda(), lengths.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32 and gpu_lengths.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)


def test_do_normalize_false_returns_the_raw_log_mels():
    """The raw log-mels keep each utterance's level (a louder copy is higher); normalised features do not."""
    extractor = ConformerSslFeatureExtractor()
    audio = np.random.default_rng(0).normal(0, 0.05, 8000).astype(np.float32)
    quiet, loud = audio, 4 * audio
    raw = extractor([quiet, loud], sampling_rate=16000, return_tensors="pt", do_normalize=False)["input_features"]
    assert float(raw[1].mean() - raw[0].mean()) == pytest.approx(2 * np.log(4), rel=0.05)  # log power: 4x amplitude
    normal = extractor([quiet, loud], sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.allclose(normal[0], normal[1], atol=0.05)  # per-utterance standardisation removes the level
    assert torch.allclose(normal[0].mean(0), torch.zeros(80), atol=1e-4)
