"""The low-resource experiment: does self-supervised pretraining pay when labels are scarce?

`run_experiment(config)` runs five stages, each in its own folder under `config.output_dir` and each skipped
when its `done.json` marker exists (a marker made with other settings is an error, never silently reused):

1. **corpus**: the demo corpus (`demo_corpus.make_demo_corpus`): unlabeled pretraining audio, a labeled pool
   (finetune.jsonl) and a test split of held-out talkers. Nested labeled subsets (e.g. 10 minutes inside 1
   hour) are drawn from the pool. The stage asserts that no test voice or speaker occurs in pretraining or
   fine-tuning data.
2. **pretrain**: one encoder per objective family (NEST/BEST-RQ, contrastive + MLM, reconstruction, APC, CPC,
   mixed) from its recipe plus the SAME overrides for every family (model size, batch seconds, steps), so
   each gets the same compute budget. Wall time is recorded. APC and CPC need causal encoders.
3. **finetune**: character CTC on each labeled subset from every pretrained encoder (`pretrained`), from a
   frozen encoder with only the CTC head trained (`probe`), and from random weights of the same architecture
   (`scratch`; one per distinct encoder architecture, so causal families get a causal baseline). A fixed number
   of steps per subset and no model selection: the test split is never looked at while training.
4. **evaluate**: greedy-CTC WER/CER of every fine-tuned model on the held-out-voice test split.
5. **report**: `low_resource.json` (one row per run), `low_resource.md` (tables, corpus, machine, the command),
   `wer_vs_labeled_minutes.png`, `cer_vs_labeled_minutes.png` and `pretraining_loss.png` in `config.results_dir`.

Everything runs in this process through the library (`pretrain_loop.pretrain`, the `finetune` building blocks
and the stock `Trainer`); devices are chosen by accelerate (a GPU when there is one).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

logger = logging.getLogger(__name__)


REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = ("corpus", "pretrain", "finetune", "evaluate", "report")
INITS = ("pretrained", "probe", "scratch")
DONE = "done.json"
SETTINGS = "settings.json"
# The ConformerSslConfig fields that define the encoder network itself (not the SSL heads, masks or CTC head):
# two pretrained checkpoints with equal values here have the same architecture, and need one scratch baseline.
ENCODER_FIELDS = (
    "num_mel_bins", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "conv_depthwise_kernel_size", "conv_norm_type", "subsampling", "subsampling_factor", "subsampling_conv_channels",
    "max_position_embeddings", "xscaling", "attention_bias", "convolution_bias", "causal", "hop_length",
)  # fmt: skip
ROW_KEYS = {
    "objective": str,  # pretraining family, or "none" for scratch baselines
    "labeled_minutes": float,  # the nominal size of the labeled subset (10, 60, ...)
    "init": str,  # pretrained | probe | scratch
    "wer": float,  # fraction (0.25 = 25 %) on the held-out-voice test split
    "cer": float,
    "steps": int,  # fine-tuning optimiser steps
    "wall_s": float,  # fine-tuning wall time
}


class ExperimentError(RuntimeError):
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


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` checked against a dataclass field annotation (nested dataclasses, lists, dicts, unions)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ExperimentError:
                continue
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, Mapping):
            return _build(annotation, value, key)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ExperimentError(f"{key}={value!r} has the wrong type: expected {annotation}.")


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = [k for k in values if k not in hints]
    if unknown:
        close = difflib.get_close_matches(unknown[0], hints, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ExperimentError(f"{where}: unknown key '{unknown[0]}'.{hint} Valid keys: {', '.join(sorted(hints))}.")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()})


def load_experiment_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML; `overrides` (e.g. {"output_dir": ...}) replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment config {str(path)!r} does not exist (see configs/experiments/).")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, Mapping):
        raise ExperimentError(f"{path}: an experiment config must be a YAML mapping")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    config = _build(ExperimentConfig, raw, "")
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


def resolve_path(path: str | Path) -> Path:
    """A config path: as given if it exists (relative to the current folder), else relative to the repository."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


# ============================================================================================ markers
# Two levels of `done.json`:
# - a stage (stages/<stage>/done.json) records the config settings it ran with and the identity (finish time) of
#   the upstream stages it used. Other config settings are an error (hours of work are never thrown away because
#   of an edit); a re-done upstream stage simply makes it run again.
# - a unit inside a stage (one pretraining family, one fine-tuning run, one evaluation) writes settings.json when
#   it starts and done.json when it ends. A unit folder started with other settings (including another upstream
#   result) is cleared and redone, so a resumed run never continues from a checkpoint of another recipe.
def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_ready(data), indent=2) + "\n")
    tmp.replace(path)


def stage_done(folder: Path, settings: Mapping[str, Any], upstream: Mapping[str, Any],
               what: str, strict: bool = True) -> dict[str, Any] | None:  # fmt: skip
    """The result of a finished stage, or None when it must run (never ran, or upstream was redone).

    Args:
        folder: stages/<stage>.
        settings: the config settings the stage depends on.
        upstream: finish times of the stages it reads.
        what: names the stage in errors.
        strict: other `settings` are an error (True) or just mean "run again" (False, for the cheap report).
    """
    marker = folder / DONE
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    wanted = _json_ready(settings)
    if done.get("settings") != wanted:
        if not strict:
            return None
        old = done.get("settings") or {}
        differing = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
        raise ExperimentError(
            f"{what}: {folder} was finished with other settings ({differing}); use another --out folder, or "
            f"delete {folder} to redo the stage with the new settings"
        )
    return done["result"] if done.get("upstream") == _json_ready(upstream) else None


def write_stage_done(folder: Path, settings: Mapping[str, Any], upstream: Mapping[str, Any],
                     result: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    result = {**result, "finished_at": time.time()}
    _write_json(folder / DONE, {"settings": settings, "upstream": upstream, "result": result})
    return _json_ready(result)


def unit_done(folder: Path, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result of a finished unit, or None after making sure `folder` holds only work with these settings."""
    wanted = _json_ready(settings)
    started = folder / SETTINGS
    if started.is_file() and json.loads(started.read_text()) != wanted:
        logger.warning("%s was started with other settings: clearing it to redo the work", folder)
        shutil.rmtree(folder)
    if (folder / DONE).is_file():
        return json.loads((folder / DONE).read_text())["result"]
    _write_json(started, wanted)
    return None


def finish_unit(folder: Path, result: Mapping[str, Any]) -> dict[str, Any]:
    result = _json_ready({**result, "finished_at": time.time()})
    _write_json(folder / DONE, {"result": result})
    return result


# ============================================================================================ 1. corpus
def read_manifest(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw_nested_subsets(rows: Sequence[Mapping[str, Any]], minutes: Sequence[float], seed: int) -> list[list[dict]]:
    """Nested labeled subsets: one seeded shuffle of the pool, each subset the shortest prefix reaching its minutes.

    Nesting (10 min inside 1 h, as in Libri-light) makes the curves comparable: a larger subset only adds data.
    """
    order = np.random.default_rng([seed, 7]).permutation(len(rows))
    shuffled = [dict(rows[i]) for i in order]
    cumulative = np.cumsum([float(r["duration"]) for r in shuffled])
    subsets = []
    for target in minutes:
        count = int(np.searchsorted(cumulative, 60.0 * target)) + 1
        if count > len(shuffled):
            raise ExperimentError(
                f"labeled subset of {target} min: the labeled pool has only {cumulative[-1] / 60:.1f} min; "
                "raise corpus.minutes or corpus.finetune_fraction"
            )
        subsets.append(shuffled[:count])
    return subsets


def check_held_out(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Assert that no test voice or speaker occurs in pretrain/finetune; returns the sets for the report."""
    train_voices = {r["voice"] for s in ("pretrain", "finetune") for r in splits[s]}
    train_speakers = {r["speaker"] for s in ("pretrain", "finetune") for r in splits[s]}
    test_voices = {r["voice"] for r in splits["test"]}
    test_speakers = {r["speaker"] for r in splits["test"]}
    if not splits["test"]:
        raise ExperimentError("the test split is empty: raise corpus.test_fraction or corpus.minutes")
    shared = sorted((test_voices & train_voices) | (test_speakers & train_speakers))
    if shared:
        raise ExperimentError(f"test voices/speakers {shared} also occur in pretrain/finetune: they must be held out")
    return {"test_voices": sorted(test_voices), "test_speakers": len(test_speakers),
            "train_voices": sorted(train_voices), "train_speakers": len(train_speakers)}  # fmt: skip


def stage_corpus(config: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Make (or reuse) the demo corpus, check the hold-out, write the labeled subsets; returns the summary."""
    from ..synthetic.corpus import make_demo_corpus

    c = config.corpus
    corpus_dir = out / "corpus"
    summary = make_demo_corpus(
        corpus_dir, c.minutes, c.seed, finetune_fraction=c.finetune_fraction, test_fraction=c.test_fraction,
        engines=c.engines, speakers_per_voice=c.speakers_per_voice, recorded_share=c.recorded_share,
        noise_fraction=c.noise_fraction, num_workers=c.num_workers, progress=config.pretrain.progress,
    )  # fmt: skip
    splits = {s: read_manifest(corpus_dir / f"{s}.jsonl") for s in ("pretrain", "finetune", "test")}
    held_out = check_held_out(splits)
    pretrain_hours = sum(r["duration"] for r in splits["pretrain"]) / 3600
    if pretrain_hours < c.min_pretrain_hours:
        raise ExperimentError(
            f"corpus: {pretrain_hours:.2f} h of pretraining audio < corpus.min_pretrain_hours={c.min_pretrain_hours}; "
            "raise corpus.minutes or lower corpus.finetune_fraction / test_fraction"
        )
    subsets = {}
    minutes = [s.minutes for s in config.finetune.subsets]
    for target, rows in zip(minutes, draw_nested_subsets(splits["finetune"], minutes, config.seed)):
        name = subset_name(target)
        (corpus_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        subsets[name] = {"manifest": f"corpus/{name}.jsonl", "nominal_minutes": target, "utterances": len(rows),
                         "minutes": round(sum(r["duration"] for r in rows) / 60, 3),
                         "speakers": len({r["speaker"] for r in rows})}  # fmt: skip
    return {
        "corpus_dir": "corpus",
        "engines": summary["engines"],
        "engine_minutes": summary.get("engine_minutes", {}),
        "minutes": summary["minutes"],
        "pretrain_hours": round(pretrain_hours, 3),
        "num_speakers": summary["num_speakers"],
        "utterances": {s: len(rows) for s, rows in splits.items()},
        "subsets": subsets,
        "generation_wall_s": summary.get("wall_time_s"),
        **held_out,
    }


def subset_name(minutes: float) -> str:
    return f"labeled_{minutes:g}min"


# ============================================================================================ 2. pretrain
def family_recipe_overrides(config: ExperimentConfig, family: str, out: Path) -> list[str]:
    """The overrides that turn a family's recipe into this experiment's run (data, budget, output folder)."""
    corpus = out / "corpus"
    return [
        f"data.train_manifests=[{corpus / 'pretrain.jsonl'}]",
        f"data.valid_manifests=[{corpus / 'test.jsonl'}]",  # held-out voices: losses only, no selection
        "train.max_minutes=null",  # the budget is steps, equal for all; a wall-clock stop would differ per family
        *config.pretrain.overrides,
        f"train.max_steps={config.pretrain.max_steps}",
        f"train.output_dir={out / 'pretrain' / family}",
        *config.pretrain.family_overrides.get(family, []),
    ]


def encoder_signature(model_config: Any) -> dict[str, Any]:
    return {name: getattr(model_config, name) for name in ENCODER_FIELDS}


def architecture_label(model_config: Any) -> str:
    return "causal" if model_config.causal else "non-causal"


def _count_encoder_params(model_config: Any) -> int:
    import torch

    from ..modeling_conformer_ssl import ConformerSslModel

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        encoder = ConformerSslModel(model_config)
    return sum(p.numel() for p in encoder.parameters())


def pretrain_family(config: ExperimentConfig, family: str, out: Path, corpus_id: float) -> dict[str, Any]:
    """Pretrain one family (or continue its newest checkpoint); returns its done.json result.

    Args:
        config / family / out: the experiment, the family (a key of `pretrain.recipes`), the working folder.
        corpus_id: finish time of the corpus stage (a new corpus invalidates the encoders trained on the old).
    """
    from ..pretrain.loop import pretrain
    from ..pretrain.recipe import load_recipe, model_config

    recipe_path = resolve_path(config.pretrain.recipes[family])
    overrides = family_recipe_overrides(config, family, out)
    settings = {"recipe": str(config.pretrain.recipes[family]), "overrides": overrides, "corpus": corpus_id}
    folder = out / "pretrain" / family
    done = unit_done(folder, settings)
    if done is not None:
        return done
    recipe = load_recipe(recipe_path, overrides)
    cfg = model_config(recipe)
    has_checkpoint = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").glob("checkpoint-*"))
    logger.info("pretrain %s: %s + %d overrides%s", family, recipe_path, len(overrides),
                " (resuming)" if has_checkpoint else "")  # fmt: skip
    start = time.perf_counter()
    # resume=True: continue the newest checkpoint when there is one (the unit folder is this family's own).
    result = pretrain(recipe, resume=True, progress=config.pretrain.progress)
    wall = time.perf_counter() - start
    if result.checkpoint is None or result.step < recipe.train.max_steps:
        raise ExperimentError(f"pretrain {family}: stopped at step {result.step} of {recipe.train.max_steps}")
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    history = state["metrics"]["history"]
    throughput = [row["train/audio_seconds_per_s"] for row in history if "train/audio_seconds_per_s" in row]
    summary = {
        "family": family,
        "objectives": sorted(recipe.objectives),
        "recipe": str(config.pretrain.recipes[family]),
        "architecture": architecture_label(cfg),
        "encoder": encoder_signature(cfg),
        "encoder_params": _count_encoder_params(cfg),
        "steps": result.step,
        "batch_seconds": recipe.data.batch_seconds,
        "audio_hours_seen": round(state.get("audio_seconds_total", 0.0) / 3600, 3),
        "wall_s": round(wall, 1),
        "resumed": has_checkpoint,
        "audio_seconds_per_s": round(float(np.mean(throughput)), 2) if throughput else None,
        "final_train": {k: v for k, v in result.train_metrics.items() if k.startswith("loss")},
        "final_valid": {k: v for k, v in result.valid_metrics.items() if k.startswith("loss")},
        "checkpoint": str(result.checkpoint.relative_to(out) / "model"),
        "history": [{k: v for k, v in row.items() if k == "step" or "/loss" in k} for row in history],
    }
    return finish_unit(folder, summary)


def stage_pretrain(config: ExperimentConfig, out: Path, corpus_id: float) -> dict[str, Any]:
    families = {family: pretrain_family(config, family, out, corpus_id) for family in config.pretrain.recipes}
    return {"families": families}


# ============================================================================================ 3. finetune
@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run: `objective` = the pretrained family ("none" for scratch), its encoder checkpoint."""

    objective: str
    init: str
    architecture: str
    subset: str
    minutes: float
    steps: int
    checkpoint: str  # relative to the experiment folder: the weights (pretrained, probe) or the config (scratch)
    encoder_id: float  # finish time of that pretraining run (a redone pretraining invalidates this run)

    @property
    def name(self) -> str:
        who = self.objective if self.init != "scratch" else f"scratch-{self.architecture}"
        return f"{who}__{self.init}__{self.subset}"


def plan_finetune_runs(config: ExperimentConfig, pretrained: Mapping[str, Mapping[str, Any]]) -> list[FinetuneRun]:
    """Every (family, init, subset), plus one scratch run per distinct encoder architecture and subset."""
    runs = []
    architectures: dict[str, tuple[str, str, float]] = {}  # signature -> (label, checkpoint, id) of its 1st family
    for info in pretrained.values():
        key = json.dumps(info["encoder"], sort_keys=True)
        architectures.setdefault(key, (info["architecture"], info["checkpoint"], info["finished_at"]))
    labels = [label for label, _, _ in architectures.values()]
    for subset in config.finetune.subsets:
        name = subset_name(subset.minutes)
        for family, info in pretrained.items():
            for init in ("pretrained", "probe"):
                if init in config.finetune.inits:
                    runs.append(FinetuneRun(family, init, info["architecture"], name, subset.minutes, subset.steps,
                                            info["checkpoint"], info["finished_at"]))  # fmt: skip
        if "scratch" in config.finetune.inits:
            for index, (label, checkpoint, encoder_id) in enumerate(architectures.values()):
                # Two different non-causal encoders would share a label: number them apart.
                label = label if labels.count(label) == 1 else f"{label}{index}"
                runs.append(FinetuneRun("none", "scratch", label, name, subset.minutes, subset.steps, checkpoint,
                                        encoder_id))  # fmt: skip
    return runs


def finetune_one(config: ExperimentConfig, run: FinetuneRun, out: Path, alphabet_texts: Sequence[str]) -> dict:
    """Train one CTC model (resuming its Trainer checkpoint if a previous attempt was killed)."""
    import torch
    from transformers import TrainingArguments, set_seed

    from ..data.augment import SpecAugmentConfig
    from ..finetune.collators import CtcCollator
    from ..finetune.ctc import drop_infeasible_ctc
    from ..finetune.model_init import init_ctc_model, load_feature_extractor
    from ..finetune.optim import FreezeEncoderCallback, build_optimizer, set_encoder_trainable
    from ..finetune.rows import manifest_rows, rows_to_dataset
    from ..finetune.text import build_processor
    from ..finetune.trainers import CtcTrainer

    f = config.finetune
    folder = out / "finetune" / run.name
    lr = {"probe": f.probe_learning_rate, "scratch": f.scratch_learning_rate}.get(run.init) or f.learning_rate
    settings = {**dataclasses.asdict(run), "batch_size": f.batch_size, "learning_rate": lr,
                "warmup_steps": f.warmup_steps, "weight_decay": f.weight_decay, "spec_augment": f.spec_augment,
                "freeze_encoder_steps": f.freeze_encoder_steps if run.init == "pretrained" else 0,
                "layer_decay": f.layer_decay if run.init == "pretrained" else 1.0, "seed": config.seed}  # fmt: skip
    done = unit_done(folder, settings)
    if done is not None:
        return {"learning_rate": lr, **done}  # the settings matched: the rate is the one it ran with
    logger.info("finetune %s: %d steps", run.name, run.steps)
    set_seed(config.seed)
    checkpoint = str(out / run.checkpoint)
    rows, left_out = manifest_rows([str(out / "corpus" / f"{run.subset}.jsonl")], 0.1, f.max_duration,
                                   require_text=True)  # fmt: skip
    extractor = load_feature_extractor(checkpoint, _num_mel_bins(checkpoint))
    # One character set for every run: the labeled pool's. A 10-minute subset may miss a rare letter; that
    # would be an alphabet gap, not a measure of how well an encoder learns from few labels.
    processor = build_processor(alphabet_texts, extractor)
    tokenizer = processor.tokenizer
    model, report = init_ctc_model(len(tokenizer), tokenizer.pad_token_id, model_name_or_path=checkpoint,
                                   from_scratch=run.init == "scratch")  # fmt: skip
    if report is not None and not report.encoder_complete:
        raise ExperimentError(f"finetune {run.name}: the encoder of {checkpoint} did not load completely: {report}")
    rows = drop_infeasible_ctc(rows, tokenizer, model.config, f"labeled subset {run.subset}")
    callbacks = []
    if run.init == "probe":
        set_encoder_trainable(model, False)
    elif settings["freeze_encoder_steps"] > 0:
        callbacks.append(FreezeEncoderCallback(settings["freeze_encoder_steps"]))
    args = TrainingArguments(
        output_dir=str(folder), max_steps=run.steps, per_device_train_batch_size=f.batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=min(f.warmup_steps, run.steps // 2), weight_decay=f.weight_decay,
        adam_beta2=0.98, max_grad_norm=1.0, train_sampling_strategy="group_by_length", eval_strategy="no",
        save_strategy="steps", save_steps=f.save_steps, save_total_limit=1, logging_steps=f.logging_steps,
        seed=config.seed, report_to="none", disable_tqdm=not f.progress, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
    )  # fmt: skip
    spec = SpecAugmentConfig() if f.spec_augment else None
    trainer = CtcTrainer(
        model=model, args=args, train_dataset=rows_to_dataset(rows, augment=True),
        data_collator=CtcCollator(processor, spec), processing_class=processor, callbacks=callbacks,
        optimizers=(build_optimizer(model, args, settings["layer_decay"]), None),
    )  # fmt: skip
    resume = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=str(resume[-1]) if resume else None)
    wall = time.perf_counter() - start
    trainer.save_model(str(folder / "model"))
    processor.save_pretrained(str(folder / "model"))
    for stale in folder.glob("checkpoint-*"):  # the finished model is in model/; resume points are not needed
        shutil.rmtree(stale, ignore_errors=True)
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    result = {
        **dataclasses.asdict(run),
        "run": run.name,
        "steps": int(trainer.state.global_step),
        "learning_rate": lr,
        "wall_s": round(wall, 1),
        "resumed": bool(resume),
        "train_loss": round(float(train_result.training_loss), 4),
        "train_utterances": len(rows),
        "left_out": left_out,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loss_curve": losses,
        "model": str((folder / "model").relative_to(out)),
    }
    return finish_unit(folder, result)


def _num_mel_bins(checkpoint: str) -> int:
    from ..configuration_conformer_ssl import ConformerSslConfig

    return ConformerSslConfig.from_pretrained(checkpoint).num_mel_bins


def stage_finetune(config: ExperimentConfig, out: Path, pretrained: Mapping[str, Any]) -> dict[str, Any]:
    alphabet_texts = [r["text"] for r in read_manifest(out / "corpus" / "finetune.jsonl")]
    runs = plan_finetune_runs(config, pretrained)
    results = {}
    for run in runs:
        results[run.name] = finetune_one(config, run, out, alphabet_texts)
    return {"runs": results}


# ============================================================================================ 4. evaluate
def evaluate_model(model_dir: Path, manifest: Path, batch_size: int, max_utterances: int | None) -> dict[str, Any]:
    """Greedy-CTC WER/CER of a fine-tuned folder on a manifest (references normalised like the training text)."""
    import torch
    from transformers import AutoProcessor

    from .. import ConformerSslForCTC  # noqa: F401  (registers the Auto classes)
    from ..data import DataConfig
    from ..finetune.ctc import transcribe
    from ..finetune.metrics import load_metrics
    from ..finetune.rows import decode_rows, manifest_rows
    from ..finetune.text import normalize_transcript

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = ConformerSslForCTC.from_pretrained(str(model_dir))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    rows, _ = manifest_rows([str(manifest)], 0.0, None, require_text=True, limit=max_utterances)
    examples = decode_rows(rows, DataConfig(min_duration=0.0, max_duration=None, crop_long=False))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["audio"]))  # little padding per batch
    start = time.perf_counter()
    hypotheses_sorted = transcribe(model, processor, [examples[i]["audio"] for i in order], batch_size)
    wall = time.perf_counter() - start
    hypotheses = [""] * len(examples)
    for position, index in enumerate(order):
        hypotheses[index] = hypotheses_sorted[position]
    references = [normalize_transcript(e["text"]) for e in examples]
    metrics = load_metrics()
    scores = {name: float(m.compute(predictions=hypotheses, references=references)) for name, m in metrics.items()}
    return {**scores, "utterances": len(examples), "eval_wall_s": round(wall, 1),
            "examples": [{"reference": r, "hypothesis": h} for r, h in list(zip(references, hypotheses))[:3]]}  # fmt: skip


def stage_evaluate(config: ExperimentConfig, out: Path, finetuned: Mapping[str, Any]) -> dict[str, Any]:
    test = out / "corpus" / "test.jsonl"
    scores = {}
    for name, info in finetuned.items():
        folder = out / "evaluate" / name
        settings = {"model": info["model"], "model_id": info["finished_at"], "test": "corpus/test.jsonl",
                    **dataclasses.asdict(config.evaluate)}  # fmt: skip
        done = unit_done(folder, settings)
        if done is None:
            logger.info("evaluate %s", name)
            result = evaluate_model(out / info["model"], test, config.evaluate.batch_size,
                                    config.evaluate.max_utterances)  # fmt: skip
            done = finish_unit(folder, result)
        scores[name] = done
    return {"scores": scores}


# ============================================================================================ 5. report
def result_rows(pretrained: Mapping[str, Any], finetuned: Mapping[str, Any], scores: Mapping[str, Any]) -> list[dict]:
    """One row per fine-tuning run: ROW_KEYS plus architecture, pretraining budget and data counts."""
    rows = []
    for name, run in finetuned.items():
        family = pretrained.get(run["objective"], {})
        score = scores[name]
        rows.append({
            "objective": run["objective"],
            "labeled_minutes": float(run["minutes"]),
            "init": run["init"],
            "wer": round(score["wer"], 4),
            "cer": round(score["cer"], 4),
            "steps": int(run["steps"]),
            "wall_s": float(run["wall_s"]),
            "architecture": run["architecture"],
            "learning_rate": run["learning_rate"],
            "run": name,
            "train_utterances": run["train_utterances"],
            "trainable_params": run["trainable_params"],
            "test_utterances": score["utterances"],
            "pretrain_steps": family.get("steps", 0),
            "pretrain_wall_s": family.get("wall_s", 0.0),
            "pretrain_audio_hours_seen": family.get("audio_hours_seen", 0.0),
        })  # fmt: skip
    order = {init: i for i, init in enumerate(INITS)}
    families = list(pretrained)
    rows.sort(key=lambda r: (r["labeled_minutes"], families.index(r["objective"]) if r["objective"] in families
                             else len(families), order[r["init"]], r["architecture"]))  # fmt: skip
    return rows


def check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise if a row misses a `ROW_KEYS` field, has the wrong type, or an impossible value."""
    for index, row in enumerate(rows):
        for key, kind in ROW_KEYS.items():
            value = row.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
                isinstance(value, kind) and not isinstance(value, bool))  # fmt: skip
            if not ok:
                raise ExperimentError(f"row {index}: {key}={value!r} is not a {kind.__name__}")
        if row["init"] not in INITS or row["wer"] < 0 or row["cer"] < 0 or row["steps"] < 1 or row["wall_s"] < 0:
            raise ExperimentError(f"row {index}: impossible values {dict(row)}")


def _pct(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _minutes_label(minutes: float) -> str:
    return f"{minutes / 60:g} h" if minutes >= 60 and minutes % 60 == 0 else f"{minutes:g} min"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def machine_description() -> dict[str, Any]:
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": device, "cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}  # fmt: skip


def markdown_report(config: ExperimentConfig, corpus: Mapping[str, Any], pretrained: Mapping[str, Any],
                    rows: Sequence[Mapping[str, Any]], command: str, machine: Mapping[str, Any],
                    total_wall_s: float | None, scores: Mapping[str, Any] | None = None) -> str:  # fmt: skip
    """low_resource.md: scale, the command, the machine, the corpus, the pretraining budget, the result tables.

    `scores` (evaluate stage results by run name) adds sample transcripts of the best pretrained run.
    """
    lines = [f"# Low-resource ASR: does self-supervised pretraining pay? ({config.name})", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    subsets = corpus["subsets"]
    lines += [
        "## Scale",
        "",
        f"- Unlabeled pretraining audio: **{corpus['pretrain_hours']:.2f} h** ({corpus['utterances']['pretrain']} "
        f"utterances, {corpus['train_speakers']} training speakers of {len(corpus['train_voices'])} voices, engines "
        f"{' + '.join(corpus['engines'])}).",
        "- Labeled subsets (nested, drawn from finetune.jsonl): "
        + ", ".join(_subset_phrase(s) for s in subsets.values())
        + ".",
        f"- Test split: {corpus['minutes']['test']:.1f} min, {corpus['utterances']['test']} utterances of "
        f"{corpus['test_speakers']} speakers from held-out voices {', '.join(corpus['test_voices'])} "
        "(none of them in pretraining or fine-tuning; asserted).",
        f"- Pretraining: {len(pretrained)} encoders, {config.pretrain.max_steps} steps each, the same model size "
        "and batch seconds for every objective.",
        f"- Machine: {machine['device']}, {machine['cores']} cores ({machine['cpu']}), torch {machine['torch']} "
        f"({machine['torch_threads']} torch threads), Python {machine['python']}.",
    ]
    if total_wall_s is not None:
        lines.append(
            f"- Wall time of corpus + pretraining + fine-tuning + evaluation: {_duration(total_wall_s)} (the sum "
            "of every stage's and run's own time: restarts and waits between them not counted)."
        )
    lines += ["", "Made by:", "", "```bash", command, "```", ""]
    if config.budget_note:
        lines += ["Budget estimate (from the config):", "", config.budget_note.strip(), ""]

    lines += ["## Pretraining", "",
              "| objective | loss terms | architecture | encoder params | steps | batch s | audio h seen | wall | "
              "audio-s/s | final train loss | final valid loss |", "|" + "---|" * 11]  # fmt: skip
    for family, info in pretrained.items():
        train_loss = info["final_train"].get("loss")
        valid_loss = info["final_valid"].get("loss")
        lines.append(
            f"| {family} | {'+'.join(info['objectives'])} | {info['architecture']} | {info['encoder_params']:,} | "
            f"{info['steps']} | {info['batch_seconds']:g} | {info['audio_hours_seen']:.2f} | {_duration(info['wall_s'])}"
            f" | {info['audio_seconds_per_s'] or ''} | {'' if train_loss is None else f'{train_loss:.4g}'} | "
            f"{'' if valid_loss is None else f'{valid_loss:.4g}'} |"
        )
    lines += ["", "![pretraining loss curves](pretraining_loss.png)", ""]

    lines += ["## Results on held-out voices", "",
              "WER/CER in % (greedy CTC, no language model) on the test split. `pretrained`: the whole model "
              "fine-tuned from the SSL encoder; `probe`: encoder frozen, only the CTC head trained; `scratch`: the "
              "same architecture from random weights. Every run of a subset has the same steps and no model "
              "selection (the test split is only used here).", ""]  # fmt: skip
    lines += _verdict(rows, pretrained)
    lines += _pivot_table(rows, pretrained, "wer")
    lines += ["", "### CER", "", "Character error rate of the same runs: it moves before WER does (a word counts as right"
              " only when all its characters are).", ""]  # fmt: skip
    lines += _pivot_table(rows, pretrained, "cer")
    lines += ["", "![WER vs labeled minutes](wer_vs_labeled_minutes.png)", "",
              "![CER vs labeled minutes](cer_vs_labeled_minutes.png)", "", "### Every run", "",
              "| objective | architecture | init | labeled | WER (%) | CER (%) | steps | peak lr | fine-tune wall | "
              "pretrain steps | pretrain wall |", "|" + "---|" * 11]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['objective']} | {row['architecture']} | {row['init']} | {_minutes_label(row['labeled_minutes'])}"
            f" | {_pct(row['wer'])} | {_pct(row['cer'])} | {row['steps']} | {row['learning_rate']:g} | "
            f"{_duration(row['wall_s'])} | "
            f"{row['pretrain_steps'] or '-'} | {_duration(row['pretrain_wall_s']) if row['pretrain_steps'] else '-'} |"
        )
    lines += _sample_transcripts(rows, scores or {})
    lines += ["", "Raw numbers: `low_resource.json` (WER/CER as fractions). Each fine-tuning run's folder holds "
              "its model, processor and loss curve; `done.json` markers let the command resume.", ""]  # fmt: skip
    return "\n".join(lines)


def _sample_transcripts(rows: Sequence[Mapping[str, Any]], scores: Mapping[str, Any]) -> list[str]:
    """The first test utterances as transcribed by the best pretrained run (largest subset), its probe and scratch."""
    largest = max((r["labeled_minutes"] for r in rows), default=None)
    pretrained = [r for r in rows if r["labeled_minutes"] == largest and r["init"] == "pretrained"]
    if not pretrained:
        return []
    best = min(pretrained, key=lambda r: r["wer"])
    chosen = [best] + [r for r in rows if r["labeled_minutes"] == largest and (
        (r["init"] == "probe" and r["objective"] == best["objective"])
        or (r["init"] == "scratch" and r["architecture"] == best["architecture"]))]  # fmt: skip
    examples = {r["run"]: scores.get(r["run"], {}).get("examples", []) for r in chosen}
    count = min((len(e) for e in examples.values()), default=0)
    if count == 0:
        return []
    lines = ["", f"### Sample transcripts ({best['objective']}, {_minutes_label(largest)} labeled)", ""]
    for index in range(count):
        lines.append(f"- reference: `{examples[best['run']][index]['reference']}`")
        for row in chosen:
            hypothesis = examples[row["run"]][index]["hypothesis"]
            lines.append(f"  - {row['init']}: " + (f"`{hypothesis}`" if hypothesis else "(nothing)"))
    return lines


def _subset_phrase(subset: Mapping[str, Any]) -> str:
    return (f"{subset['nominal_minutes']:g} min = {subset['minutes']:.1f} min / {subset['utterances']} utterances / "
            f"{subset['speakers']} speakers")  # fmt: skip


def _matching_scratch(rows: Sequence[Mapping[str, Any]], architecture: str, minutes: float) -> Mapping | None:
    """The scratch baseline of an objective's architecture on one subset."""
    return next((r for r in rows if r["init"] == "scratch" and r["labeled_minutes"] == minutes
                 and r["architecture"].startswith(architecture)), None)  # fmt: skip


def relative_change(row: Mapping[str, Any], baseline: Mapping[str, Any], metric: str) -> float | None:
    """(row - baseline) / baseline of `metric` ("wer" or "cer"): -0.4 is the 40% reduction issue 7 asks for."""
    return (row[metric] - baseline[metric]) / baseline[metric] if baseline[metric] > 0 else None


def best_change(rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], minutes: float,
                metric: str) -> tuple[str, float] | None:  # fmt: skip
    """(objective, relative change) of the fine-tuned pretrained run that beats its scratch baseline most."""
    changes = []
    for family, info in pretrained.items():
        row = next((r for r in rows if r["objective"] == family and r["init"] == "pretrained"
                    and r["labeled_minutes"] == minutes), None)  # fmt: skip
        scratch = _matching_scratch(rows, info["architecture"], minutes)
        change = relative_change(row, scratch, metric) if row and scratch else None
        if change is not None:
            changes.append((family, change))
    return min(changes, key=lambda item: item[1]) if changes else None


def _verdict(rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any]) -> list[str]:
    """One sentence per metric on the fewest labels: the best objective's change against scratch."""
    if not rows:
        return []
    fewest = min(r["labeled_minutes"] for r in rows)
    parts = []
    for metric in ("wer", "cer"):
        best = best_change(rows, pretrained, fewest, metric)
        if best is not None:
            parts.append(f"{metric.upper()} {100 * best[1]:+.0f}% ({best[0]})")
    if not parts:
        return []
    return [f"Best fine-tuned objective against scratch with {_minutes_label(fewest)} of labels: "
            + ", ".join(parts) + " (relative change; negative is better).", ""]  # fmt: skip


def _pivot_table(rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], metric: str = "wer") -> list[str]:
    """Per objective and subset: `metric` of pretrained / probe / scratch of the same architecture, and the change."""
    minutes = sorted({r["labeled_minutes"] for r in rows})
    by_key = {(r["objective"], r["init"], r["labeled_minutes"], r["architecture"]): r for r in rows}
    header = "| objective |" + "".join(
        f" {metric.upper()} {_minutes_label(m)} pretrained | probe | scratch | rel. change |" for m in minutes
    )
    lines = [header, "|---|" + "---|---|---|---|" * len(minutes)]
    for family, info in pretrained.items():
        cells = [family]
        for m in minutes:
            pre = by_key.get((family, "pretrained", m, info["architecture"]))
            probe = by_key.get((family, "probe", m, info["architecture"]))
            scratch = _matching_scratch(rows, info["architecture"], m)
            change = relative_change(pre, scratch, metric) if pre and scratch else None
            cells += [_pct(pre[metric]) if pre else "", _pct(probe[metric]) if probe else "",
                      _pct(scratch[metric]) if scratch else "", "" if change is None else f"{100 * change:+.0f}%"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_error_curves(rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], path: Path,
                      metric: str) -> Path:  # fmt: skip
    """One panel per objective: `metric` (WER or CER) vs labeled minutes for pretrained, probe and the matching
    scratch baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(pretrained)
    cols = min(3, len(families))
    nrows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    styles = {"pretrained": ("o-", "tab:blue"), "probe": ("s--", "tab:green"), "scratch": ("^:", "tab:red")}
    for ax, family in zip(axes.flat, families):
        arch = pretrained[family]["architecture"]
        for init, (style, color) in styles.items():
            points = sorted(
                (r["labeled_minutes"], 100 * r[metric]) for r in rows if r["init"] == init
                and (r["objective"] == family if init != "scratch" else r["architecture"].startswith(arch))
            )  # fmt: skip
            if points:
                ax.plot(*zip(*points), style, color=color, label=init if init != "scratch" else f"scratch ({arch})")
        ax.set_xscale("log")
        ticks = sorted({r["labeled_minutes"] for r in rows})
        ax.set_xticks(ticks, [_minutes_label(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(family)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{metric.upper()} (%) on held-out voices")
    for ax in axes[-1, :]:
        ax.set_xlabel("labeled audio")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pretraining_losses(pretrained: Mapping[str, Any], path: Path) -> Path:
    """One panel per family: the train loss (and valid loss points) against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(pretrained)
    cols = min(3, len(families))
    nrows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, family in zip(axes.flat, families):
        history = pretrained[family]["history"]
        for split, style in (("train", "-"), ("valid", "o--")):
            points = [(row["step"], row[f"{split}/loss"]) for row in history
                      if math.isfinite(row.get(f"{split}/loss", float("nan")))]  # fmt: skip
            if points:
                ax.plot(*zip(*points), style, markersize=3, label=f"{split} loss")
        ax.set_title(f"{family} ({'+'.join(pretrained[family]['objectives'])})", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stage_report(config: ExperimentConfig, out: Path, results: Mapping[str, Any], command: str,
                 total_wall_s: float | None) -> dict[str, Any]:  # fmt: skip
    pretrained = results["pretrain"]["families"]
    rows = result_rows(pretrained, results["finetune"]["runs"], results["evaluate"]["scores"])
    check_rows(rows)
    results_dir = Path(config.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    document = {
        "experiment": config.name,
        "command": command,
        "machine": machine,
        "corpus": results["corpus"],
        "pretraining": {k: {key: v for key, v in info.items() if key != "history"} for k, info in pretrained.items()},
        "rows": rows,
    }
    (results_dir / "low_resource.json").write_text(json.dumps(_json_ready(document), indent=2) + "\n")
    markdown = markdown_report(config, results["corpus"], pretrained, rows, command, machine, total_wall_s,
                               results["evaluate"]["scores"])  # fmt: skip
    (results_dir / "low_resource.md").write_text(markdown + "\n")
    plot_error_curves(rows, pretrained, results_dir / "wer_vs_labeled_minutes.png", "wer")
    plot_error_curves(rows, pretrained, results_dir / "cer_vs_labeled_minutes.png", "cer")
    plot_pretraining_losses(pretrained, results_dir / "pretraining_loss.png")
    return {"results_dir": str(results_dir), "rows": len(rows),
            "files": ["low_resource.json", "low_resource.md", "wer_vs_labeled_minutes.png", "cer_vs_labeled_minutes.png",
                      "pretraining_loss.png"]}  # fmt: skip


def compute_wall_s(results: Mapping[str, Any]) -> float:
    """Seconds of work behind a report: corpus and evaluation stages plus every pretraining and fine-tuning run's
    own wall time. Summing runs, not stage times, keeps the figure right when a stage was interrupted and resumed
    in another invocation (its stage time then covers only the last part)."""
    total = results["corpus"]["stage_wall_s"] + results["evaluate"]["stage_wall_s"]
    total += sum(info["wall_s"] for info in results["pretrain"]["families"].values())
    return total + sum(run["wall_s"] for run in results["finetune"]["runs"].values())


# ============================================================================================ driver
@dataclass
class ExperimentResult:
    """What `run_experiment` did: per stage "ran" or "skipped", the stage results, the wall time of this call."""

    status: dict[str, str]
    results: dict[str, Any]
    wall_s: float


def _stage_settings(config: ExperimentConfig, stage: str) -> dict[str, Any]:
    """The settings a stage's output depends on (a changed setting means the marker no longer applies)."""
    if stage == "corpus":
        return {"corpus": dataclasses.asdict(config.corpus), "subsets": [s.minutes for s in config.finetune.subsets],
                "seed": config.seed}  # fmt: skip
    if stage == "pretrain":
        return {"pretrain": {k: v for k, v in dataclasses.asdict(config.pretrain).items() if k != "progress"}}
    if stage == "finetune":
        return {"finetune": {k: v for k, v in dataclasses.asdict(config.finetune).items()
                             if k not in ("progress", "logging_steps", "save_steps")}}  # fmt: skip
    if stage == "evaluate":
        return {"evaluate": dataclasses.asdict(config.evaluate)}
    return {"results_dir": str(Path(config.results_dir).resolve())}


def run_experiment(config: ExperimentConfig, stages: Sequence[str] | None = None, command: str = "",
                   log: Callable[[str], None] = print) -> ExperimentResult:  # fmt: skip
    """Run the `stages` (default: all) in order; finished ones (done.json) are read back, not redone.

    Args:
        config: the experiment (`load_experiment_config`).
        stages: subset of `STAGES`; a later stage needs the earlier ones finished (run before, or now). The
            report is regenerated when named here, and otherwise only when something upstream ran.
        command: the command line that started this, recorded in the report.
        log: where one status line per stage goes.
    """
    requested = list(stages or [])
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise ExperimentError(f"stages {unknown} unknown; choose from {STAGES}")
    wanted = requested or list(STAGES)
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(_json_ready(dataclasses.asdict(config)), sort_keys=False))
    start = time.perf_counter()
    status: dict[str, str] = {}
    results: dict[str, Any] = {}
    for index, stage in enumerate(STAGES):
        folder = out / "stages" / stage
        settings = _stage_settings(config, stage)
        before = STAGES[:index]
        upstream = {s: results[s]["finished_at"] for s in before if s in results}
        done = stage_done(folder, settings, upstream, f"stage {stage}", strict=stage != "report")
        if done is not None and not (stage == "report" and stage in requested):
            results[stage], status[stage] = done, "skipped"
            log(f"[{stage}] done before ({folder / DONE}): skipped")
            continue
        if stage not in wanted:
            continue
        missing = [s for s in before if s not in results]
        if missing:
            raise ExperimentError(
                f"stage {stage} needs stage(s) {missing} finished first: add them to --stages or run them before"
            )
        log(f"[{stage}] running")
        stage_start = time.perf_counter()
        if stage == "corpus":
            result = stage_corpus(config, out)
        elif stage == "pretrain":
            result = stage_pretrain(config, out, results["corpus"]["finished_at"])
        elif stage == "finetune":
            result = stage_finetune(config, out, results["pretrain"]["families"])
        elif stage == "evaluate":
            result = stage_evaluate(config, out, results["finetune"]["runs"])
        else:
            total = compute_wall_s(results)
            result = stage_report(config, out, results, command, total)
        result = {**result, "stage_wall_s": round(time.perf_counter() - stage_start, 1)}
        results[stage] = write_stage_done(folder, settings, upstream, result)
        status[stage] = "ran"
        log(f"[{stage}] finished in {_duration(result['stage_wall_s'])}")
    return ExperimentResult(status, results, time.perf_counter() - start)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a person would type it again: `python` for the interpreter, OMP_NUM_THREADS if set.

    `--stages ...` is left out: it only chooses what runs in one invocation, and the results of a resumable,
    seeded experiment are those of the plain command (a report regenerated with `--stages report` must not
    name that as the command that made it).
    """
    args = list(sys.argv if argv is None else argv)
    if "--stages" in args:
        at = args.index("--stages")
        end = next((i for i in range(at + 1, len(args)) if args[i].startswith("--")), len(args))
        args = args[:at] + args[end:]
    script = args[0] if args else "scripts/low_resource_experiment.py"
    try:
        script = str(Path(script).resolve().relative_to(Path.cwd()))
    except ValueError:
        pass
    # Thread settings change the wall times in the report: keep them in the command that made it.
    env = [f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS",) if name in os.environ]
    return " ".join([*env, "python", script, *(a if " " not in a else repr(a) for a in args[1:])])


__all__ = [
    "ENCODER_FIELDS",
    "INITS",
    "ROW_KEYS",
    "STAGES",
    "CorpusSpec",
    "EvaluateSpec",
    "ExperimentConfig",
    "ExperimentError",
    "ExperimentResult",
    "FinetuneRun",
    "FinetuneSpec",
    "PretrainSpec",
    "SubsetSpec",
    "check_held_out",
    "check_rows",
    "draw_nested_subsets",
    "evaluate_model",
    "load_experiment_config",
    "markdown_report",
    "plan_finetune_runs",
    "run_experiment",
]
