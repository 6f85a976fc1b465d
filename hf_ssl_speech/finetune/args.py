"""Arguments of the fine-tuning scripts: model, data and fine-tuning settings next to `TrainingArguments`."""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import (
    HfArgumentParser,
)

logger = logging.getLogger(__name__)


# ============================================================================================ arguments
@dataclass
class ModelArguments:
    """Which model to start from and how it is built (the `model_*` keys of a fine-tuning recipe)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretraining checkpoint (save_pretrained folder or Hub repo id) whose encoder is fine-tuned."
        },
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Random init of the same architecture (from the checkpoint's config, or --model_preset)."},
    )
    model_preset: str | None = field(
        default=None,
        metadata={
            "help": "Preset name (configs/model/<name>.yaml) or YAML path, for --from_scratch without checkpoint."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "ConformerSslConfig fields to change, 'key=value,key=value' (e.g. 'final_dropout=0.0')."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})


@dataclass
class DataArguments:
    """Where the labelled audio comes from and how it is augmented."""

    train_manifests: list[str] = field(
        default_factory=list, metadata={"help": "NeMo JSONL manifests to train on (empty: the demo corpus)."}
    )
    eval_manifests: list[str] = field(
        default_factory=list, metadata={"help": "NeMo JSONL manifests to evaluate on, each reported separately."}
    )
    min_duration: float = field(default=0.1, metadata={"help": "Leave out shorter utterances (seconds)."})
    max_duration: float | None = field(
        default=30.0, metadata={"help": "Leave out longer training utterances (CTC), crop them (classification)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows per eval set."})
    label_column: str = field(
        default="speaker", metadata={"help": "Manifest field holding the class (classification only)."}
    )
    demo_corpus_dir: str = field(
        default="data/demo_corpus", metadata={"help": "Demo corpus folder, made when no manifests are given."}
    )
    demo_minutes: float = field(default=10.0, metadata={"help": "Minutes of demo audio to make (all splits)."})
    spec_augment: bool = field(default=True, metadata={"help": "SpecAugment on training features."})
    freq_masks: int = field(default=2, metadata={"help": "SpecAugment frequency masks per utterance (NeMo: 2)."})
    freq_width: int = field(default=27, metadata={"help": "Widest frequency mask in mel bins (NeMo: 27)."})
    time_masks: int = field(default=10, metadata={"help": "SpecAugment time masks per utterance (NeMo: 10)."})
    time_width: float = field(
        default=0.05,
        metadata={"help": "Widest time mask: a fraction of the utterance if < 1, else frames (NeMo: 0.05)."},
    )
    dither: bool = field(default=True, metadata={"help": "Add the feature extractor's dither to training audio."})


@dataclass
class FinetuneArguments:
    """How the pretrained encoder is fine-tuned, beyond what TrainingArguments covers."""

    freeze_encoder_steps: int = field(
        default=0, metadata={"help": "Train only the new head for the first N optimiser steps (then everything)."}
    )
    freeze_encoder: bool = field(
        default=False, metadata={"help": "Keep the encoder frozen for the whole run (probing)."}
    )
    layer_decay: float = field(
        default=1.0,
        metadata={"help": "Layer-wise LR decay: block i of L trains at lr * decay^(L + 1 - i), the head at lr."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improving metric_for_best_model."}
    )
    use_weighted_layer_sum: bool = field(
        default=False, metadata={"help": "Classification: learned softmax-weighted sum of all layers (SUPERB)."}
    )
    classifier_proj_size: int | None = field(default=None, metadata={"help": "Classification projection width."})


# Forced on every run: our datasets hold metadata rows that the collator turns into model inputs, so the
# Trainer must not drop "unused" columns; every other TrainingArguments default is the recipe's to choose.
FORCED_TRAINING_ARGS = {"remove_unused_columns": False}


def _flatten_recipe(data: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe is a flat mapping, or sections (model/data/finetune/training) of flat mappings."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "data", "finetune", "training") and isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Remove `--config PATH` / `--config=PATH` / `config=PATH` from argv; return (PATH, rest)."""
    config, rest, index = None, [], 0
    while index < len(argv):
        token = argv[index]
        if token == "--config":
            if index + 1 >= len(argv):
                raise SystemExit("--config needs a YAML file path")
            config, index = argv[index + 1], index + 2
            continue
        if token.startswith("--config=") or token.startswith("config="):
            config = token.split("=", 1)[1]
        else:
            rest.append(token)
        index += 1
    return config, rest


def _expand_key_values(argv: list[str], destinations: set[str], list_dests: set[str]) -> list[str]:
    """`key=value` tokens naming an argument become `--key value` (`a,b` splits for list-valued keys).

    Other tokens pass unchanged, so a flag's value may itself contain `=` (`--config_overrides layerdrop=0.1`).
    """
    out: list[str] = []
    for token in argv:
        key, _, value = token.partition("=")
        key = key.replace("-", "_")
        if not token.startswith("-") and _ and key in destinations:
            out.append(f"--{key}")
            out.extend([v for v in value.split(",") if v] if key in list_dests else [value])
        else:
            out.append(token)
    return out


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> tuple:
    """
    Parse `--config recipe.yaml` plus command-line overrides into one instance of each dataclass.

    Args:
        dataclass_types: e.g. (ModelArguments, DataArguments, FinetuneArguments, TrainingArguments).
        argv: the arguments (default `sys.argv[1:]`). Overrides come as `--key value`, `--flag` (booleans) or
            `key=value`; list-valued keys take several values after `--key`, or `key=a,b`.
        defaults: script-level defaults, below the recipe's values.

    Precedence: dataclass defaults < `FORCED_TRAINING_ARGS` < `defaults` < recipe YAML < command line. Unknown
    recipe keys are refused with the closest valid name; a recipe or flag that changes one of
    `FORCED_TRAINING_ARGS` is overruled with a warning.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _split_config_flag(argv)
    parser = HfArgumentParser(dataclass_types)
    destinations = {action.dest for action in parser._actions if action.dest != "help"}
    list_dests = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
    values = {**FORCED_TRAINING_ARGS, **(defaults or {})}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_path}: no such file (recipes live in configs/finetune/)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a recipe must be a YAML mapping of argument names to values")
        recipe = _flatten_recipe(data)
        unknown = sorted(set(recipe) - destinations)
        if unknown:
            hints = [f"{key} (did you mean {difflib.get_close_matches(key, destinations, 1)})" for key in unknown]
            raise ValueError(f"{path}: unknown keys {', '.join(hints)}; run the script with --help for the list.")
        values.update(recipe)
    parser.set_defaults(**{key: value for key, value in values.items() if key in destinations})
    *parsed, unknown_args = parser.parse_args_into_dataclasses(
        args=_expand_key_values(argv, destinations, list_dests), return_remaining_strings=True
    )
    if unknown_args:
        hints = []
        for token in unknown_args:
            name = token.lstrip("-").partition("=")[0].replace("-", "_")
            hints.append(f"{token!r} (did you mean {difflib.get_close_matches(name, destinations, 1)})")
        raise ValueError(f"unknown arguments {', '.join(hints)}; run the script with --help for the list.")
    for item in parsed:
        for key, forced in FORCED_TRAINING_ARGS.items():
            if hasattr(item, key) and getattr(item, key) != forced:
                logger.warning("%s=%r is not supported by these scripts; using %r.", key, getattr(item, key), forced)
                setattr(item, key, forced)
    return tuple(parsed)


def parse_config_overrides(overrides: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`'a=1,b=x'` (values read as YAML scalars) or a mapping -> dict of ConformerSslConfig fields."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    result = {}
    for item in str(overrides).split(","):
        if "=" not in item:
            raise ValueError(
                f"config_overrides item {item!r} is not key=value (e.g. 'final_dropout=0.0,layerdrop=0.1')"
            )
        key, value = item.split("=", 1)
        result[key.strip()] = yaml.safe_load(value)
    return result
