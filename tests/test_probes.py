"""SUPERB-style probes (`experiments.probes`): the weighted-sum head learns WHICH layer carries a task, the
utterance and CTC phone probes learn from features that carry the answer and not from noise, the learning rate is
chosen on validation. (The toy experiment's probes.json is checked in test_low_resource.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ssl_speech.experiments.probes import (
    FBANK,
    ProbeSpec,
    WeightedSumHead,
    beats_fbank,
    layer_features,
    phone_probe,
    utterance_probe,
)
from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor


def _utterances(count: int, centres: np.ndarray, informative_layer: int, rng: np.random.Generator):
    """(layers=3, steps, dim=8) features; only `informative_layer` holds a class-dependent mean (`centres`)."""
    classes = len(centres)
    feats, labels = [], []
    for i in range(count):
        label = i % classes
        x = rng.normal(0, 1, size=(3, int(rng.integers(5, 12)), 8))
        x[informative_layer] += 2.0 * centres[label]
        feats.append(torch.tensor(x, dtype=torch.float32))
        labels.append(label)
    return feats, labels


def test_weighted_sum_head_weights_are_a_distribution_and_learnable():
    head = WeightedSumHead(layers=3, dim=4, classes=2)
    assert sum(head.layer_weights()) == pytest.approx(1.0, abs=1e-3)
    out = head(torch.randn(5, 3, 7, 4))  # (batch, layers, steps, dim) -> (batch, steps, classes)
    assert out.shape == (5, 7, 2)
    out.sum().backward()
    assert head.layer_logits.grad is not None and head.layer_logits.grad.abs().sum() > 0


def test_utterance_probe_finds_the_informative_layer_and_beats_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, size=(4, 8))
    splits = {n: _utterances(c, centres, 2, rng) for n, c in (("train", 80), ("valid", 40), ("test", 40))}
    spec = ProbeSpec(learning_rates=[1e-4, 1e-2], utterance_steps=200)
    result = utterance_probe(splits, classes=4, spec=spec)
    assert result["value"] > 0.9  # chance is 0.25
    assert result["learning_rate"] == 1e-2  # 1e-4 barely moves in 200 steps: validation must prefer 1e-2
    assert int(np.argmax(result["layers"])) == 2
    # Labels shuffled against the features: test accuracy falls toward chance (the probe does not memorise test).
    shuffled = {k: (f, list(np.random.default_rng(1).permutation(labels))) for k, (f, labels) in splits.items()}
    assert utterance_probe(shuffled, classes=4, spec=spec)["value"] < 0.5


def test_input_layer_lets_the_head_use_what_only_fbank_sees():
    """Speaker ID: the label is in the (un-normalised) input features only, as a level that per-utterance
    normalisation removes from the encoder's layers. With the inputs as layer 0 the head finds it and weights it."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, size=(4, 8))
    spec = ProbeSpec(learning_rates=[1e-2], utterance_steps=200)
    splits, inputs = {}, {}
    for name, count in (("train", 80), ("valid", 40), ("test", 40)):
        feats, labels = _utterances(count, centres, 2, rng)
        noise = [torch.randn_like(f) for f in feats]  # the encoder's layers: nothing about the label
        splits[name] = (noise, labels)
        inputs[name] = ([f[2:3, :, :5] for f in feats], labels)  # FBANK: (1, steps, 5) holding the label
    assert utterance_probe(splits, classes=4, spec=spec)["value"] < 0.5
    result = utterance_probe(splits, classes=4, spec=spec, inputs=inputs)
    assert result["value"] > 0.9 and len(result["layers"]) == 4  # input + 3 layers
    assert int(np.argmax(result["layers"])) == 0


def _phone_data(count: int, inventory: int, rng: np.random.Generator, centres: np.ndarray):
    """Utterances whose frames are the phone's centre (3 frames each) plus noise, in layer 1 only."""
    names = [f"p{i}" for i in range(inventory)]
    feats, targets = [], []
    for _ in range(count):
        phones = [names[int(k)] for k in rng.integers(0, inventory, size=int(rng.integers(3, 7)))]
        frames = []
        for p in phones:
            frames += [centres[names.index(p)]] * 3 + [np.zeros(centres.shape[1])]
        x = rng.normal(0, 0.3, size=(2, len(frames), centres.shape[1]))
        x[1] += np.array(frames)
        feats.append(torch.tensor(x, dtype=torch.float32))
        targets.append(phones)
    return feats, targets


def test_phone_probe_learns_phones_with_ctc():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, size=(6, 10))
    splits = {n: _phone_data(c, 6, rng, centres) for n, c in (("train", 120), ("valid", 30), ("test", 30))}
    result = phone_probe(splits, ProbeSpec(learning_rates=[3e-2], phone_epochs=15, batch_size=16))
    assert result["value"] < 0.2 and result["phones"] == 6
    assert result["layers"][1] > result["layers"][0]


def test_fbank_features_run_at_the_encoder_rate():
    extractor = ConformerSslFeatureExtractor()
    audio = [np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)]  # 1 s: 100 frames of 10 ms
    (feats,) = layer_features(None, extractor, audio, stack=4)
    assert feats.shape[0] == 1 and feats.shape[2] == 80 * 4
    assert abs(feats.shape[1] - 25) <= 1  # 4 frames stacked: 40 ms steps, as a 4x-subsampling encoder


def test_beats_fbank_respects_the_metric_direction():
    rows = [
        {"task": "speaker_id", "features": FBANK, "value": 0.5, "higher_is_better": True},
        {"task": "speaker_id", "features": "nest", "value": 0.6, "higher_is_better": True},
        {"task": "phone_recognition", "features": FBANK, "value": 0.5, "higher_is_better": False},
        {"task": "phone_recognition", "features": "nest", "value": 0.6, "higher_is_better": False},
    ]
    assert beats_fbank(rows) == {"speaker_id": {"nest": True}, "phone_recognition": {"nest": False}}


def _need_espeak() -> None:
    """espeakng-loader is a declared dependency ([demo]): a broken install fails (EspeakError), never skips."""
    from hf_ssl_speech.synthetic.espeak import check_espeak

    check_espeak()


def test_espeak_phonemes_are_ipa_tokens_without_stress_or_word_marks():
    from hf_ssl_speech.synthetic.phonemes import phonemize, phonemize_many

    _need_espeak()
    assert phonemize("cat") == ["k", "æ", "t"]
    the_cat, yes_no = phonemize_many(["the cat", "yes no"])
    assert the_cat == ["ð", "ə", "k", "æ", "t"]
    assert "oʊ" in yes_no  # a diphthong stays one phone, as espeak's inventory has it
    assert not any(mark in p for p in the_cat + yes_no for mark in "ˈˌ_ ")


def test_command_set_holds_every_label_and_keeps_test_voices_apart(tmp_path):
    from hf_ssl_speech.synthetic.commands import LABELS, CommandSetError, make_command_set

    _need_espeak()
    small = {"speakers_per_voice": 1, "unknown_per_speaker": 1, "num_workers": 1, "progress": False}
    summary = make_command_set(tmp_path, ["espeak:m3"], ["espeak:f2"], **small)
    assert set(summary["splits"]["train"]["labels"]) == set(LABELS) and len(LABELS) == 14
    assert summary["splits"]["test"]["voices"] == ["espeak:f2"]
    assert "espeak:f2" not in summary["splits"]["train"]["voices"]
    again = make_command_set(tmp_path, ["espeak:m3"], ["espeak:f2"], **small)
    assert again["wall_time_s"] == summary["wall_time_s"]  # reused as is, not rendered again
    with pytest.raises(CommandSetError, match=r"different parameters \['repeats'\]"):
        make_command_set(tmp_path, ["espeak:m3"], ["espeak:f2"], speakers_per_voice=1, unknown_per_speaker=1, repeats=2)
    with pytest.raises(CommandSetError, match="share a talker"):
        make_command_set(tmp_path / "x", ["espeak:m3"], ["espeak:m3"], progress=False)
