"""The low-resource experiment: does self-supervised pretraining pay when labels are scarce?

`run_experiment(config)` runs five stages, each in its own folder under `config.output_dir` and each skipped
when its `done.json` marker exists (a marker made with other settings is an error, never silently reused):

1. **corpus**: the demo corpus (`synthetic.corpus.make_demo_corpus`): unlabeled pretraining audio, a labeled pool
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

Everything runs in this process through the library (`pretrain.loop.pretrain`, `finetune.run.run_ctc` on
the stock `Trainer`); devices are chosen by accelerate (a GPU when there is one). The settings are
`experiments/config.py`; the report's rows, tables and plots are `experiments/report.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import AutoProcessor, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..data import DataConfig
from ..finetune.args import DataArguments, FinetuneArguments, ModelArguments
from ..finetune.ctc import transcribe
from ..finetune.inference import score
from ..finetune.rows import decode_rows, manifest_rows
from ..finetune.run import run_ctc
from ..finetune.text import normalize_transcript
from ..modeling_conformer_ssl import ConformerSslForCTC, ConformerSslModel
from ..pretrain.loop import pretrain
from ..pretrain.recipe import load_recipe, model_config
from ..synthetic.corpus import make_demo_corpus
from .config import (
    INITS,
    ROW_KEYS,
    STAGES,
    CorpusSpec,
    EvaluateSpec,
    ExperimentConfig,
    ExperimentError,
    FinetuneSpec,
    PretrainSpec,
    SubsetSpec,
    load_experiment_config,
)
from .report import (
    check_rows,
    format_duration,
    machine_description,
    markdown_report,
    plot_error_curves,
    plot_pretraining_losses,
    result_rows,
)

logger = logging.getLogger(__name__)


REPO_ROOT = Path(__file__).resolve().parents[2]
DONE = "done.json"
SETTINGS = "settings.json"
# The ConformerSslConfig fields that define the encoder network itself (not the SSL heads, masks or CTC head):
# two pretrained checkpoints with equal values here have the same architecture, and need one scratch baseline.
ENCODER_FIELDS = (
    "num_mel_bins",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "conv_depthwise_kernel_size",
    "conv_norm_type",
    "subsampling",
    "subsampling_factor",
    "subsampling_conv_channels",
    "max_position_embeddings",
    "xscaling",
    "attention_bias",
    "convolution_bias",
    "causal",
    "hop_length",
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


def stage_done(
    folder: Path, settings: Mapping[str, Any], upstream: Mapping[str, Any], what: str, strict: bool = True
) -> dict[str, Any] | None:
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


def write_stage_done(
    folder: Path, settings: Mapping[str, Any], upstream: Mapping[str, Any], result: Mapping[str, Any]
) -> dict[str, Any]:
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
    return {
        "test_voices": sorted(test_voices),
        "test_speakers": len(test_speakers),
        "train_voices": sorted(train_voices),
        "train_speakers": len(train_speakers),
    }


def stage_corpus(config: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Make (or reuse) the demo corpus, check the hold-out, write the labeled subsets; returns the summary."""

    c = config.corpus
    corpus_dir = out / "corpus"
    summary = make_demo_corpus(
        corpus_dir,
        c.minutes,
        c.seed,
        finetune_fraction=c.finetune_fraction,
        test_fraction=c.test_fraction,
        engines=c.engines,
        speakers_per_voice=c.speakers_per_voice,
        recorded_share=c.recorded_share,
        noise_fraction=c.noise_fraction,
        num_workers=c.num_workers,
        progress=config.pretrain.progress,
    )
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
        subsets[name] = {
            "manifest": f"corpus/{name}.jsonl",
            "nominal_minutes": target,
            "utterances": len(rows),
            "minutes": round(sum(r["duration"] for r in rows) / 60, 3),
            "speakers": len({r["speaker"] for r in rows}),
        }
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

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        encoder = ConformerSslModel(model_config)
    return sum(p.numel() for p in encoder.parameters())


def pretrain_family(config: ExperimentConfig, family: str, out: Path, corpus_id: float) -> dict[str, Any]:
    """Pretrain one family (or continue its newest checkpoint); returns its done.json result.

    Args:
        config / family / out: the experiment, the family (a key of `pretrain.recipes`), the working folder.
        corpus_id: finish time of the corpus stage (a new corpus invalidates the encoders trained on the old).
    """

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
    logger.info(
        "pretrain %s: %s + %d overrides%s", family, recipe_path, len(overrides), " (resuming)" if has_checkpoint else ""
    )
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
                    runs.append(
                        FinetuneRun(
                            family,
                            init,
                            info["architecture"],
                            name,
                            subset.minutes,
                            subset.steps,
                            info["checkpoint"],
                            info["finished_at"],
                        )
                    )
        if "scratch" in config.finetune.inits:
            for index, (label, checkpoint, encoder_id) in enumerate(architectures.values()):
                # Two different non-causal encoders would share a label: number them apart.
                label = label if labels.count(label) == 1 else f"{label}{index}"
                runs.append(
                    FinetuneRun("none", "scratch", label, name, subset.minutes, subset.steps, checkpoint, encoder_id)
                )
    return runs


def finetune_one(config: ExperimentConfig, run: FinetuneRun, out: Path, alphabet_texts: Sequence[str]) -> dict:
    """Train one CTC model with `finetune.run.run_ctc` (resuming its Trainer checkpoint if an attempt was killed)."""
    f = config.finetune
    folder = out / "finetune" / run.name
    lr = {"probe": f.probe_learning_rate, "scratch": f.scratch_learning_rate}.get(run.init) or f.learning_rate
    settings = {
        **dataclasses.asdict(run),
        "batch_size": f.batch_size,
        "learning_rate": lr,
        "warmup_steps": f.warmup_steps,
        "weight_decay": f.weight_decay,
        "spec_augment": f.spec_augment,
        "freeze_encoder_steps": f.freeze_encoder_steps if run.init == "pretrained" else 0,
        "layer_decay": f.layer_decay if run.init == "pretrained" else 1.0,
        "seed": config.seed,
    }
    done = unit_done(folder, settings)
    if done is not None:
        return {"learning_rate": lr, **done}  # the settings matched: the rate is the one it ran with
    logger.info("finetune %s: %d steps", run.name, run.steps)
    run_dir = folder / "model"  # run_ctc saves the finished model here, beside its resume points
    resume = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if run_dir.is_dir() and resume is None:
        shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to continue
    model_args = ModelArguments(model_name_or_path=str(out / run.checkpoint), from_scratch=run.init == "scratch")
    data_args = DataArguments(
        train_manifests=[str(out / "corpus" / f"{run.subset}.jsonl")],
        min_duration=0.1,
        max_duration=f.max_duration,
        spec_augment=f.spec_augment,
    )
    finetune_args = FinetuneArguments(
        freeze_encoder=run.init == "probe",
        freeze_encoder_steps=settings["freeze_encoder_steps"],
        layer_decay=settings["layer_decay"],
    )
    training_args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=run.steps,
        per_device_train_batch_size=f.batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(f.warmup_steps, run.steps // 2),
        weight_decay=f.weight_decay,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",
        eval_strategy="no",
        save_strategy="steps",
        save_steps=f.save_steps,
        save_total_limit=1,
        logging_steps=f.logging_steps,
        seed=config.seed,
        report_to="none",
        disable_tqdm=not f.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        resume_from_checkpoint=resume,
    )
    # One character set for every run: the labeled pool's. A 10-minute subset may miss a rare letter; that
    # would be an alphabet gap, not a measure of how well an encoder learns from few labels.
    result = run_ctc(
        model_args,
        data_args,
        finetune_args,
        training_args,
        vocabulary_texts=alphabet_texts,
        require_complete_encoder=run.init != "scratch",
    )
    for stale in run_dir.glob("checkpoint-*"):  # the finished model is in model/; resume points are not needed
        shutil.rmtree(stale, ignore_errors=True)
    result_row = {
        **dataclasses.asdict(run),
        "run": run.name,
        "steps": int(result.summary["steps"]),
        "learning_rate": lr,
        "wall_s": result.summary["train_seconds"],
        "resumed": resume is not None,
        "train_loss": result.summary["train_loss"],
        "train_utterances": result.summary["train_utterances"],
        "trainable_params": result.summary["trainable_params"],
        "loss_curve": result.loss_curve,
        "model": str(run_dir.relative_to(out)),
    }
    return finish_unit(folder, result_row)


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
    scores = score([{"hypothesis": h, "reference": r} for h, r in zip(hypotheses, references)])
    return {
        **scores,
        "utterances": len(examples),
        "eval_wall_s": round(wall, 1),
        "examples": [{"reference": r, "hypothesis": h} for r, h in list(zip(references, hypotheses))[:3]],
    }


def stage_evaluate(config: ExperimentConfig, out: Path, finetuned: Mapping[str, Any]) -> dict[str, Any]:
    test = out / "corpus" / "test.jsonl"
    scores = {}
    for name, info in finetuned.items():
        folder = out / "evaluate" / name
        settings = {
            "model": info["model"],
            "model_id": info["finished_at"],
            "test": "corpus/test.jsonl",
            **dataclasses.asdict(config.evaluate),
        }
        done = unit_done(folder, settings)
        if done is None:
            logger.info("evaluate %s", name)
            result = evaluate_model(
                out / info["model"], test, config.evaluate.batch_size, config.evaluate.max_utterances
            )
            done = finish_unit(folder, result)
        scores[name] = done
    return {"scores": scores}


# ============================================================================================ 5. report
def stage_report(
    config: ExperimentConfig, out: Path, results: Mapping[str, Any], command: str, total_wall_s: float | None
) -> dict[str, Any]:
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
    markdown = markdown_report(
        config, results["corpus"], pretrained, rows, command, machine, total_wall_s, results["evaluate"]["scores"]
    )
    (results_dir / "low_resource.md").write_text(markdown + "\n")
    plot_error_curves(rows, pretrained, results_dir / "wer_vs_labeled_minutes.png", "wer")
    plot_error_curves(rows, pretrained, results_dir / "cer_vs_labeled_minutes.png", "cer")
    plot_pretraining_losses(pretrained, results_dir / "pretraining_loss.png")
    return {
        "results_dir": str(results_dir),
        "rows": len(rows),
        "files": [
            "low_resource.json",
            "low_resource.md",
            "wer_vs_labeled_minutes.png",
            "cer_vs_labeled_minutes.png",
            "pretraining_loss.png",
        ],
    }


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
        return {
            "corpus": dataclasses.asdict(config.corpus),
            "subsets": [s.minutes for s in config.finetune.subsets],
            "seed": config.seed,
        }
    if stage == "pretrain":
        return {"pretrain": {k: v for k, v in dataclasses.asdict(config.pretrain).items() if k != "progress"}}
    if stage == "finetune":
        return {
            "finetune": {
                k: v
                for k, v in dataclasses.asdict(config.finetune).items()
                if k not in ("progress", "logging_steps", "save_steps")
            }
        }
    if stage == "evaluate":
        return {"evaluate": dataclasses.asdict(config.evaluate)}
    return {"results_dir": str(Path(config.results_dir).resolve())}


def run_experiment(
    config: ExperimentConfig, stages: Sequence[str] | None = None, command: str = "", log: Callable[[str], None] = print
) -> ExperimentResult:
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
        log(f"[{stage}] finished in {format_duration(result['stage_wall_s'])}")
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
