"""The fine-tuned keyword spotter of the experiment (hf_ssl_speech/experiments/kws.py): nested label subsets by
speaker, and a run that learns tone "keywords" from a tiny encoder, keeps its best validation state and refuses
nothing it should accept."""

from __future__ import annotations

import numpy as np
import torch
from support import letter_chord, make_tiny_config

from hf_ssl_speech import ConformerSslFeatureExtractor, ConformerSslModel
from hf_ssl_speech.experiments.kws import KeywordSpotter, KwsSpec, fine_tune, nested_subsets


def test_nested_subsets_take_each_voices_first_speakers_and_their_silence():
    rows = []
    for voice in ("a", "b"):
        for speaker in range(3):
            rows += [{"voice": voice, "speaker": f"{voice}{speaker}", "label": w} for w in ("yes", "no")]
            rows.append({"voice": None, "speaker": None, "label": "_silence_"})  # follows its speaker
    subsets = nested_subsets(rows, [1, 2, 3])
    assert [rows[i]["speaker"] for i in subsets[1]] == ["a0", "a0", None, "b0", "b0", None]
    assert set(subsets[1]) < set(subsets[2]) < set(subsets[3]) == set(range(len(rows)))
    assert len(subsets[2]) == 2 * 2 * 3


def _tone_set(letters: str, per_letter: int, seed: int):
    rng = np.random.default_rng(seed)
    audios, labels = [], []
    for label, letter in enumerate(letters):
        for _ in range(per_letter):
            audios.append(np.concatenate([letter_chord(letter, rng), np.zeros(1600, np.float32)]))
            labels.append(label)
    return audios, torch.tensor(labels)


def test_fine_tune_learns_tone_keywords_and_keeps_its_best_state(tmp_path):
    config = make_tiny_config()
    ConformerSslModel(config).save_pretrained(tmp_path / "encoder")
    extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins)
    extractor.save_pretrained(tmp_path / "encoder")

    def inputs(audios):
        return dict(extractor(audios, sampling_rate=16000, return_tensors="pt"))

    train_audio, train_labels = _tone_set("abc", 6, 0)
    valid_audio, valid_labels = _tone_set("abc", 3, 1)
    spec = KwsSpec(steps=40, eval_every=10, batch_size=9, warmup_steps=5)
    train = (inputs(train_audio), train_labels)
    valid = (inputs(valid_audio), valid_labels)
    model, accuracy, step = fine_tune(tmp_path / "encoder", True, train, valid, 3, 3e-3, spec)
    assert isinstance(model, KeywordSpotter) and step in (10, 20, 30, 40)
    assert accuracy >= 0.8, accuracy  # three tone chords: chance is 1/3
    with torch.no_grad():
        model.eval()
        predicted = model(valid[0]["input_features"], valid[0]["attention_mask"]).argmax(-1)
    assert float((predicted == valid_labels).float().mean()) == accuracy  # the kept state is the best one
