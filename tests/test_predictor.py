"""Prediction-network pretraining on text (scripts/pretrain_predictor.py) and transducer fine-tuning that starts
from it (`--predictor_from`): the text LM beats a unigram model on held-out sentences, the fine-tuned transducer's
prediction network starts as the saved weights with the predictor's tokenizer, and wrong inputs are one line."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support import load_script, random_tone_text, write_tone_corpus
from test_transducer import _args, _pretrained_folder
from transformers import AutoProcessor

from hf_ssl_speech.errors import ConfigError, UserError, run_command
from hf_ssl_speech.finetune import transducer
from hf_ssl_speech.finetune.predictor import PredictorArguments, load_predictor, pretrain_predictor
from hf_ssl_speech.finetune.transducer import TransducerArguments, tokens_and_predictor

# A tiny grammar with regular structure: a next-token model can learn what follows what, a unigram cannot.
SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "her sister"]
VERBS = ["saw", "liked", "found", "painted"]
OBJECTS = ["the red ball", "a green box", "the tall tree", "a small boat"]
PLACES = ["in the park", "near the river", "at home", "on monday"]
SETTINGS = {
    "tokenizer_vocab_size": 40,
    "decoder_hidden_size": 16,
    "batch_size": 16,
    "learning_rate": 1e-2,
    "warmup_steps": 5,
    "max_steps": 100,
}


def grammar_sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    parts = (SUBJECTS, VERBS, OBJECTS, PLACES)
    return [" ".join(words[int(rng.integers(len(words)))] for words in parts) for _ in range(count)]


@pytest.fixture(scope="module")
def grammar_predictor(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor")
    (root / "text.txt").write_text("\n".join(grammar_sentences(200, seed=0)) + "\n")
    argv = ["--text", str(root / "text.txt"), "--output_dir", str(root / "out")]
    argv += [f"{name}={value}" for name, value in SETTINGS.items()]
    return root, load_script("pretrain_predictor").main(argv)


def test_predictor_beats_the_unigram_baseline_on_held_out_sentences(grammar_predictor):
    root, summary = grammar_predictor
    assert summary["steps"] == 100 and summary["valid_sentences"] == 10 and summary["train_sentences"] == 190
    assert summary["perplexity"] < 0.5 * summary["unigram_perplexity"], summary
    assert json.loads((root / "out" / "results.json").read_text()) == summary
    tokenizer, state, config = load_predictor(root / "out")
    assert len(tokenizer) == summary["vocabulary"] == config["vocab_size"]
    assert config["blank_token_id"] == tokenizer.pad_token_id == len(tokenizer) - 1
    assert config["results"]["perplexity"] == summary["perplexity"]
    # The keys and shapes of ParakeetForTDT.decoder, so the state dict loads into it as is.
    assert set(state) == {
        "embedding.weight",
        *(f"lstm.{kind}_{part}_l0" for kind in ("weight", "bias") for part in ("ih", "hh")),
        "decoder_projector.weight",
        "decoder_projector.bias",
    }
    assert tuple(state["embedding.weight"].shape) == (len(tokenizer), 16)


def test_predictor_training_is_deterministic_with_its_seed(grammar_predictor, tmp_path):
    root, summary = grammar_predictor
    texts = (root / "text.txt").read_text().splitlines()
    args = PredictorArguments(**SETTINGS)
    again = pretrain_predictor(texts, tmp_path / "again", args, log=lambda line: None)
    assert again["perplexity"] == summary["perplexity"]
    first, second = (
        load_file(root / "out" / "predictor.safetensors"),
        load_file(tmp_path / "again" / "predictor.safetensors"),
    )
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.fixture(scope="module")
def tone_predictor(tmp_path_factory):
    """A predictor trained on tone-word text (the fine-tuning corpus' alphabet), 16 wide like SMALL_HEAD."""
    root = tmp_path_factory.mktemp("tone_predictor")
    rng = np.random.default_rng(7)
    texts = [random_tone_text(rng) for _ in range(120)]
    args = PredictorArguments(tokenizer_vocab_size=20, decoder_hidden_size=16, max_steps=10, batch_size=16)
    pretrain_predictor(texts, root / "predictor", args, log=lambda line: None)
    return root / "predictor"


def test_transducer_finetuning_starts_from_the_predictor_weights_and_tokenizer(
    tone_predictor, tmp_path, monkeypatch, caplog
):
    write_tone_corpus(tmp_path, 4, seed=1, name="train")
    write_tone_corpus(tmp_path, 2, seed=2, name="valid")
    model = _pretrained_folder(tmp_path / "pretrained")
    starts = []

    class RecordingTrainer(transducer.TransducerTrainer):  # the model as training receives it
        def __init__(self, model, **kwargs):
            starts.append({key: value.clone() for key, value in model.decoder.state_dict().items()})
            super().__init__(model=model, **kwargs)

    monkeypatch.setattr(transducer, "TransducerTrainer", RecordingTrainer)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="hf_ssl_speech.finetune.transducer"):
        result = load_script("finetune_transducer").main(
            _args(tmp_path, model, out, f"predictor_from={tone_predictor}")
        )
    assert f"prediction network: 7 tensors from {tone_predictor} (text perplexity" in caplog.text
    saved = load_file(tone_predictor / "predictor.safetensors")
    assert set(starts[0]) == set(saved)
    assert all(torch.equal(starts[0][key], saved[key]) for key in saved)
    assert result.summary["predictor"] == "text" and result.summary["predictor_from"] == str(tone_predictor)
    predictor_tokenizer, _, _ = load_predictor(tone_predictor)
    assert AutoProcessor.from_pretrained(out).tokenizer.get_vocab() == predictor_tokenizer.get_vocab()
    # tokenizer_from takes the tokenizer alone (from a predictor or a transducer folder): a new prediction network.
    for folder in (tone_predictor, out):
        args, tokenizer, predictor = tokens_and_predictor(TransducerArguments(tokenizer_from=str(folder)))
        assert predictor is None and tokenizer.get_vocab() == predictor_tokenizer.get_vocab()


def test_a_folder_that_is_not_a_finished_predictor_is_refused_in_one_line(tone_predictor, tmp_path):
    with pytest.raises(UserError) as error:
        load_predictor(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "predictor.safetensors" in message and "pretrain_predictor.py" in message
    assert "\n" not in message
    unfinished = shutil.copytree(tone_predictor, tmp_path / "unfinished")
    (unfinished / "results.json").unlink()  # what a run that crashed before its end leaves
    with pytest.raises(UserError, match="no results.json \\(an unfinished run\\?\\).*pretrain_predictor.py"):
        load_predictor(unfinished)


def test_decoder_size_other_than_the_predictors_is_refused_before_any_work(tone_predictor, tmp_path):
    argv = _args(tmp_path, "unused", tmp_path / "out", f"predictor_from={tone_predictor}", "decoder_hidden_size=24")
    with pytest.raises(ConfigError) as error:
        load_script("finetune_transducer").main(argv)
    message = str(error.value)
    assert "decoder_hidden_size=24" in message and "decoder_hidden_size=16" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    both = [f"predictor_from={tone_predictor}", f"tokenizer_from={tone_predictor}"]
    with pytest.raises(ConfigError, match="drop tokenizer_from"):
        load_script("finetune_transducer").main(_args(tmp_path, "unused", tmp_path / "out", *both))


def test_empty_text_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = ["--text", str(tmp_path / "empty.txt"), "--output_dir", str(tmp_path / "out")]
    assert run_command(load_script("pretrain_predictor").main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--text" in lines[0] and "empty.txt" in lines[0] and "no sentence" in lines[0]
    assert not (tmp_path / "out").exists()
