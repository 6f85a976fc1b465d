"""scripts/finetune_classification.py: a 2-class task learned from a checkpoint (frozen encoder, SUPERB-style
weighted layer sum) and from scratch (held-out split when no eval manifest is given)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support import TINY_CTC_OVERRIDES, load_script, tiny_scratch_args, write_tone_corpus

from hf_ssl_speech import ConformerSslModel
from hf_ssl_speech.finetune.args import parse_config_overrides
from hf_ssl_speech.presets import preset_config


def _two_class_data(folder, train_per_class: int, eval_per_class: int) -> tuple[list[str], list[str]]:
    """Class "low" speaks letters a-d (upper partials 1.4/1.9 kHz), class "high" letters e-h (2.6/3.4 kHz)."""
    train, evaluation = [], []
    for seed, (speaker, letters) in enumerate((("low", "abcd"), ("high", "efgh"))):
        kwargs = {"alphabet": letters, "speaker": speaker}
        train.append(str(write_tone_corpus(folder, train_per_class, seed=seed, name=f"train_{speaker}", **kwargs)))
        evaluation.append(
            str(write_tone_corpus(folder, eval_per_class, seed=10 + seed, name=f"dev_{speaker}", **kwargs))
        )
    return train, evaluation


def _common_flags(output_dir, max_steps: int, learning_rate: float = 5e-3) -> list[str]:
    return [
        "--output_dir",
        str(output_dir),
        "--use_cpu",
        "--seed",
        "0",
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--learning_rate",
        str(learning_rate),
        "--warmup_steps",
        "5",
        "--logging_steps",
        "5",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "max_duration=2.0",
    ]


def test_frozen_encoder_probe_from_checkpoint_learns_two_classes(tmp_path):
    checkpoint = tmp_path / "pretrained"
    torch.manual_seed(0)
    encoder = ConformerSslModel(preset_config("tiny", **parse_config_overrides(TINY_CTC_OVERRIDES)))
    encoder.save_pretrained(checkpoint)
    train, evaluation = _two_class_data(tmp_path / "data", train_per_class=12, eval_per_class=6)
    output_dir = tmp_path / "probe"
    result = load_script("finetune_classification").main(
        [
            "--model_name_or_path",
            str(checkpoint),
            "--train_manifests",
            *train,
            "--eval_manifests",
            *evaluation,
            "label_column=speaker",
            "--freeze_encoder",
            "--use_weighted_layer_sum",
            "classifier_proj_size=32",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "40",
            *_common_flags(output_dir, 120, 3e-3),
        ]
    )
    accuracies = {name: values["accuracy"] for name, values in result.results.items()}
    print(f"probe accuracies: {accuracies}, steps {result.summary['steps']}")
    assert set(accuracies) == {"dev_low", "dev_high"}
    assert sum(accuracies.values()) / 2 >= 0.9  # chance is 0.5
    saved = load_file(output_dir / "model.safetensors")
    for name, value in encoder.state_dict().items():
        if "num_batches_tracked" in name or "running_" in name:
            continue  # BatchNorm statistics still follow the data in train mode; weights must not move
        assert torch.equal(saved[f"conformer.{name}"], value), f"frozen encoder weight {name} changed"
    weights = saved["layer_weights"]
    assert weights.shape == (3,) and not torch.allclose(weights, torch.full((3,), 1 / 3))  # the layer mix learned
    config = json.loads((output_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "high", "1": "low"} and config["use_weighted_layer_sum"] is True
    assert (output_dir / "preprocessor_config.json").is_file()
    assert json.loads((output_dir / "results.json").read_text())["dev_low"]["utterances"] == 6


def test_from_scratch_with_held_out_split(tmp_path):
    train, _ = _two_class_data(tmp_path / "data", train_per_class=10, eval_per_class=1)
    result = load_script("finetune_classification").main(
        [
            *tiny_scratch_args(),
            "--train_manifests",
            *train,
            "--eval_strategy",
            "no",
            *_common_flags(tmp_path / "scratch", 30),
        ]
    )
    held_out = result.results["held_out"]
    assert held_out["utterances"] == 4  # every 5th of 10 per class
    print(f"from-scratch held-out accuracy {held_out['accuracy']:.3f}")
    assert held_out["accuracy"] >= 0.75
    history = json.loads((tmp_path / "scratch" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < losses[0]


def test_classification_needs_two_classes(tmp_path):
    manifest = write_tone_corpus(tmp_path, 4, speaker="only", name="one")
    with pytest.raises(ValueError, match="needs >= 2"):
        load_script("finetune_classification").main(
            [
                "--from_scratch",
                "--model_preset",
                "tiny",
                "--train_manifests",
                str(manifest),
                *_common_flags(tmp_path / "o", 1),
            ]
        )
