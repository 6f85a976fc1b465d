"""The experiment's settings: one YAML file (configs/experiments/*.yaml) read into `ExperimentConfig`.

`load_experiment_config` reads it through `config_io` (the recipes' parser) and `validate_config` checks what
spans several fields; errors (`ExperimentError`) name the field and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config_io
from ..errors import ConfigError

STAGES = ("corpus", "pretrain", "finetune", "evaluate", "report")
INITS = ("pretrained", "probe", "scratch")
ROW_KEYS = {
    "objective": str,  # pretraining family, or "none" for scratch baselines
    "labeled_minutes": float,  # the nominal size of the labeled subset (10, 60, ...)
    "init": str,  # pretrained | probe | scratch
    "wer": float,  # fraction (0.25 = 25 %) on the held-out-voice test split
    "cer": float,
    "steps": int,  # fine-tuning optimiser steps
    "wall_s": float,  # fine-tuning wall time
}


class ExperimentError(ConfigError):
    """An experiment setting or state that cannot be used; the message names the field or folder and the fix."""


# ============================================================================================ configuration
@dataclass
class CorpusSpec:
    """Arguments of `make_demo_corpus` (see there); `minutes` covers all three splits."""

    minutes: float = 270.0
    seed: int = 0
    finetune_fraction: float = 0.25
    test_fraction: float = 0.06
    engines: str | list[str] = "auto"
    speakers_per_voice: int = 4
    recorded_share: float | None = None
    noise_fraction: float = 0.0
    num_workers: int | None = None
    min_pretrain_hours: float = 0.0  # refuse to run when the pretraining split is smaller (guards the full config)


@dataclass
class SubsetSpec:
    """One labeled subset: `minutes` of transcribed audio from finetune.jsonl, fine-tuned for `steps` steps."""

    minutes: float
    steps: int


@dataclass
class PretrainSpec:
    """One encoder per family: `recipes[name]` (a configs/pretrain YAML) + `overrides` shared by all families.

    `family_overrides[name]` may add settings that only make sense for one family (never the budget: model size,
    batch seconds and steps come from `overrides` and `max_steps`, the same for everybody).
    """

    recipes: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    family_overrides: dict[str, list[str]] = field(default_factory=dict)
    max_steps: int = 1000
    progress: bool = True


@dataclass
class FinetuneSpec:
    """CTC fine-tuning of every (init, subset): the same optimisation for all, fixed steps, no test peeking."""

    subsets: list[SubsetSpec] = field(default_factory=list)
    batch_size: int = 8
    learning_rate: float = 2e-3
    probe_learning_rate: float = 5e-3  # only the CTC head trains: it takes a larger step
    scratch_learning_rate: float | None = None  # the baseline's own rate (None: learning_rate), so it is not held
    # back by a rate chosen for pretrained encoders
    warmup_steps: int = 100
    weight_decay: float = 1e-3
    freeze_encoder_steps: int = 0  # pretrained runs: head-only steps first (fairseq freeze_finetune_updates)
    layer_decay: float = 1.0  # pretrained runs: layer-wise LR decay
    spec_augment: bool = True
    max_duration: float = 20.0
    inits: list[str] = field(default_factory=lambda: list(INITS))
    save_steps: int = 250  # Trainer checkpoints, so a killed run resumes
    logging_steps: int = 25
    progress: bool = False


@dataclass
class EvaluateSpec:
    batch_size: int = 16
    max_utterances: int | None = None  # None: the whole test split


@dataclass
class ExperimentConfig:
    """A whole experiment (configs/experiments/*.yaml). Relative paths resolve against the current folder."""

    name: str = "low_resource"
    description: str = ""
    output_dir: str = "runs/low_resource"  # corpus, checkpoints, fine-tuned models (large; not committed)
    results_dir: str = "docs/results"  # low_resource.json / .md / PNGs (small; committed)
    seed: int = 0
    budget_note: str = ""  # the time estimate, copied into the report
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)


def load_experiment_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML (`config_io`, as recipes); `overrides` (e.g. {"output_dir": ...})
    replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment config {str(path)!r} does not exist (see configs/experiments/).")
    raw = config_io.read_yaml(path, "experiment config", ExperimentError)
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    config = config_io.build(ExperimentConfig, raw, "", "experiment config key", ExperimentError)
    validate_config(config, str(path))
    return config


def validate_config(config: ExperimentConfig, where: str = "config") -> None:
    """Cross-field checks; errors name the field and the fix."""
    f, p = config.finetune, config.pretrain
    if not p.recipes:
        raise ExperimentError(f"{where}: pretrain.recipes is empty; name at least one family: recipe YAML")
    for name in p.family_overrides:
        if name not in p.recipes:
            raise ExperimentError(f"{where}: pretrain.family_overrides.{name} names no family of pretrain.recipes")
    budget_keys = ("train.max_steps", "data.batch_seconds", "model.hidden_size", "model.num_hidden_layers")
    for name, items in p.family_overrides.items():
        for item in items:
            if item.split("=", 1)[0].strip() in budget_keys:
                raise ExperimentError(
                    f"{where}: pretrain.family_overrides.{name} sets {item!r}: the compute budget must be equal for "
                    "every family; put it in pretrain.overrides / pretrain.max_steps"
                )
    if p.max_steps < 1:
        raise ExperimentError(f"{where}: pretrain.max_steps={p.max_steps}: must be >= 1")
    if not f.subsets:
        raise ExperimentError(f"{where}: finetune.subsets is empty; e.g. [{{minutes: 10, steps: 400}}]")
    minutes = [s.minutes for s in f.subsets]
    if minutes != sorted(set(minutes)) or minutes[0] <= 0:
        raise ExperimentError(f"{where}: finetune.subsets minutes {minutes} must be positive and increasing")
    if any(s.steps < 1 for s in f.subsets):
        raise ExperimentError(f"{where}: finetune.subsets steps must be >= 1")
    bad = [i for i in f.inits if i not in INITS]
    if bad or not f.inits:
        raise ExperimentError(f"{where}: finetune.inits={f.inits}: choose one or more of {INITS}")
    pool = config.corpus.minutes * config.corpus.finetune_fraction
    if minutes[-1] > pool:
        raise ExperimentError(
            f"{where}: the largest labeled subset ({minutes[-1]} min) exceeds the labeled pool "
            f"(corpus.minutes * corpus.finetune_fraction = {pool:.1f} min); raise corpus.minutes or finetune_fraction"
        )
