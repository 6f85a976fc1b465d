"""Arguments of the fine-tuning scripts: model, data and fine-tuning settings next to `TrainingArguments`.

`parse_args` reads a YAML recipe and the command line into these dataclasses through the package's one config
layer (`hf_ssl_speech.config_io`), the same coercion and error messages as pretraining recipes.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import config_io
from ..data.config import DataConfig
from ..errors import ConfigError, MissingPathError
from ..synthetic.corpus import DEMO_DIR, DEMO_MINUTES

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
        default_factory=list,
        metadata={
            "help": "NeMo JSONL manifests to evaluate on during training, each reported separately; together they "
            "select the best checkpoint and drive early stopping."
        },
    )
    test_manifests: list[str] = field(
        default_factory=list,
        metadata={
            "help": "NeMo JSONL manifests scored once, after training, with the selected model (CTC); never read "
            "before (no selection or early stopping on them). Default with the demo corpus: its test split."
        },
    )
    min_duration: float = field(
        default=DataConfig.min_duration, metadata={"help": "Leave out shorter utterances (seconds)."}
    )
    max_duration: float | None = field(
        default=30.0, metadata={"help": "Leave out longer training utterances (CTC), crop them (classification)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows per eval set."})
    label_column: str = field(
        default="speaker", metadata={"help": "Manifest field holding the class (classification only)."}
    )
    demo_corpus_dir: str = field(
        default=DEMO_DIR,
        metadata={"help": "Demo corpus folder, made when no manifests are given (shared with pretraining)."},
    )
    demo_minutes: float = field(default=DEMO_MINUTES, metadata={"help": "Minutes of demo audio to make (all splits)."})
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
        default=None,
        metadata={
            "help": "Stop after N evaluations without improving metric_for_best_model (those during "
            "freeze_encoder_steps and up to early_stopping_start_step not counted)."
        },
    )
    early_stopping_start_step: int = field(
        default=0,
        metadata={
            "help": "Evaluations up to this step do not count towards early_stopping_patience (they still compete "
            "for the best checkpoint): e.g. the end of a tri-stage schedule's hold, so a model on the plateau that "
            "CTC training starts with is not stopped at its peak learning rate."
        },
    )
    use_weighted_layer_sum: bool = field(
        default=False, metadata={"help": "Classification: learned softmax-weighted sum of all layers (SUPERB)."}
    )
    classifier_proj_size: int | None = field(default=None, metadata={"help": "Classification projection width."})
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto | no | bf16 | fp16. auto: bf16 where the hardware has bf16 matrix units (CPU AMX or "
            "AVX512-BF16, CUDA bf16), fp32 elsewhere. Sets TrainingArguments.bf16 / fp16 unless either is given."
        },
    )


# Forced on every run: our datasets hold metadata rows that the collator turns into model inputs, so the
# Trainer must not drop "unused" columns; every other TrainingArguments default is the recipe's to choose.
FORCED_TRAINING_ARGS = {"remove_unused_columns": False}
# A recipe is flat or in these sections (any section may hold any argument; the names are unique).
RECIPE_SECTIONS = ("model", "data", "finetune", "training")


def _flatten_recipe(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A recipe is a flat mapping, or sections (model/data/finetune/training) of flat mappings."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in RECIPE_SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: section '{key}' must be a mapping of argument names to values.")
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
                raise ConfigError("--config needs a YAML file path")
            config, index = argv[index + 1], index + 2
            continue
        if token.startswith("--config=") or token.startswith("config="):
            config = token.split("=", 1)[1]
        else:
            rest.append(token)
        index += 1
    return config, rest


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(annotation)
    )


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or bool in typing.get_args(annotation)


HELP_HINT = "Run the script with --help for the list."
_BOOL_WORDS = ("true", "false", "yes", "no", "1", "0", "on", "off")


def command_line_values(argv: Sequence[str], types: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Raw command-line strings by argument name, for `config_io.coerce_text` to type.

    Accepted: `--key value`, `--key=value`, `--flag` (a bool set to true, or `--flag false`), `--key a b` for
    lists, and `key=value` (`key=a,b` for lists). An unknown name is refused with the closest valid one.
    """

    def known(name: str) -> str:
        name = name.replace("-", "_")
        if name not in types:
            raise config_io.unknown_key(name, types, "", "argument", listing=HELP_HINT)
        return name

    def is_assignment(token: str) -> bool:
        return "=" in token and token.split("=", 1)[0].replace("-", "_") in types

    values: dict[str, str | list[str]] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not token.startswith("--"):
            key, has_value, value = token.partition("=")
            if not has_value:
                raise ConfigError(f"unexpected argument {token!r}: use --key value or key=value (--help lists them).")
            name = known(key)
            values[name] = [v for v in value.split(",") if v] if _is_list(types[name]) else value
            continue
        key, has_value, inline = token[2:].partition("=")
        name = known(key)
        annotation = types[name]
        if has_value:
            values[name] = [v for v in inline.split(",") if v] if _is_list(annotation) else inline
            continue
        following: list[str] = []
        while index < len(argv) and not argv[index].startswith("--") and not is_assignment(argv[index]):
            if following and not _is_list(annotation):
                break
            if _is_bool(annotation) and argv[index].lower() not in _BOOL_WORDS:
                break
            following.append(argv[index])
            index += 1
        if following:
            values[name] = following if _is_list(annotation) else following[0]
        elif _is_bool(annotation):
            values[name] = "true"
        else:
            raise ConfigError(f"--{name} needs a value (expected {config_io.type_name(annotation)}).")
    return values


def usage(dataclass_types: Sequence[type]) -> str:
    """`--help`: every argument with its type, default and help, grouped by dataclass."""
    lines = [
        "Arguments (in a recipe YAML, flat or under model/data/finetune/training; on the command line as",
        "--key value, --flag, or key=value; the command line wins):",
    ]
    for cls in dataclass_types:
        lines.append(f"\n{cls.__name__}:")
        hints = config_io.field_types(cls)
        for item in dataclasses.fields(cls):
            if not item.init:
                continue
            default = item.default if item.default is not dataclasses.MISSING else "[]"
            text = " ".join(str(item.metadata.get("help", "")).split())
            lines.append(
                f"  --{item.name} ({config_io.type_name(hints[item.name])}, default {default!r}) {text}".rstrip()
            )
    return "\n".join(lines)


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

    Precedence: dataclass defaults < `FORCED_TRAINING_ARGS` < `defaults` < recipe YAML < command line. Values are
    typed by `hf_ssl_speech.config_io` (the one config layer of the package); unknown keys are refused with the
    closest valid name; a recipe or flag that changes one of `FORCED_TRAINING_ARGS` is overruled with a warning.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(usage(dataclass_types))
        raise SystemExit(0)
    config_path, argv = _split_config_flag(argv)
    owners = {name: cls for cls in dataclass_types for name in config_io.field_types(cls)}
    types = {name: config_io.field_types(owners[name])[name] for name in owners}
    values: dict[str, Any] = {**FORCED_TRAINING_ARGS, **(defaults or {})}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise MissingPathError(f"--config {config_path}: no such file (recipes live in configs/finetune/)")
        recipe = _flatten_recipe(config_io.read_yaml(path, "fine-tuning recipe"), str(path))
        for key in recipe:
            if key not in types:
                raise config_io.unknown_key(key, types, "", f"key in {path}:", listing=HELP_HINT)
        values.update(recipe)
    typed = {key: config_io.coerce(value, types[key], key) for key, value in values.items() if key in types}
    for key, text in command_line_values(argv, types).items():
        typed[key] = config_io.coerce_text(text, types[key], key)
    for key, forced in FORCED_TRAINING_ARGS.items():
        if key in typed and typed[key] != forced:
            logger.warning("%s=%r is not supported by these scripts; using %r.", key, typed[key], forced)
            typed[key] = forced
    return tuple(
        config_io.build(cls, {k: v for k, v in typed.items() if owners.get(k) is cls}, "", "argument")
        for cls in dataclass_types
    )


def parse_config_overrides(overrides: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`'a=1,b=x'` (values read as YAML scalars) or a mapping -> dict of ConformerSslConfig fields."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    result = {}
    for item in str(overrides).split(","):
        if "=" not in item:
            raise ConfigError(
                f"config_overrides item {item!r} is not key=value (e.g. 'final_dropout=0.0,layerdrop=0.1')"
            )
        key, value = item.split("=", 1)
        result[key.strip()] = yaml.safe_load(value)
    return result
