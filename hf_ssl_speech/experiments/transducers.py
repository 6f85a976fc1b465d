"""The experiment's transducer stage: TDT fine-tuning of the SSL encoder and of its scratch twin, with a prediction
network from scratch or pretrained on text, on the CTC runs' subsets, validation split and test voices.

1. The prediction network is pretrained once as a next-token model on the LM sentences (`corpus/lm_text.txt`, none
   of which occurs in a validation or test utterance; `finetune.predictor.pretrain_predictor`). Its tokenizer
   (BPE on those sentences) serves every arm, so arms differ only in their starting weights.
2. Each arm (`transducer.arms`: encoder pretrained|scratch x predictor scratch|text) is fine-tuned with
   `finetune.transducer.run_transducer` (the stock `Trainer`, transformers' TDT loss) on each subset of
   `transducer.minutes` (empty: every subset): the first subset runs every learning rate of `transducer.learning_rates[encoder]`, validation CER keeps one, larger
   subsets reuse it; within a run the checkpoint with the best validation CER is kept.
3. The kept runs are decoded greedily (each utterance alone, as the ASR pipeline does) on validation and test.
   No LM fusion: `wer_lm`/`cer_lm` are None on these rows.

The same resumable units as the CTC stage (`settings.json` / `done.json` per run). Imported by `low_resource`
only when the stage runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor

from ..data import DataConfig
from ..finetune.args import DataArguments, FinetuneArguments, ModelArguments
from ..finetune.inference import score
from ..finetune.predictor import PredictorArguments, pretrain_predictor
from ..finetune.rows import decode_rows, manifest_rows
from ..finetune.text import normalize_transcript
from ..finetune.transducer import TransducerArguments, load_transducer, run_transducer, transducer_outputs
from .config import ExperimentConfig, ExperimentError, patience_start_step
from .low_resource import (
    arm_of,
    choose_by_validation,
    finish_unit,
    read_manifest,
    resume_point,
    run_outcome,
    schedule_arguments,
    subset_name,
    trainer_arguments,
    training_valid_manifest,
    unit_done,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransducerRun:
    """One TDT fine-tuning run: `key` the pretraining run the encoder comes from ("none" when from scratch)."""

    key: str
    encoder: str  # pretrained | scratch
    predictor: str  # scratch | text
    subset: str
    minutes: float
    steps: int
    learning_rate: float
    checkpoint: str  # the encoder's weights (pretrained) or its config (scratch), relative to the experiment folder
    encoder_id: float  # finish time of that pretraining run

    @property
    def group(self) -> str:
        """Runs that differ only in learning rate: validation keeps one per group."""
        who = self.key if self.encoder == "pretrained" else "scratch"
        return f"tdt__{who}__predictor-{self.predictor}__{self.subset}"

    @property
    def name(self) -> str:
        return f"{self.group}__lr{self.learning_rate:g}"


def choose_family(config: ExperimentConfig, finetuned: Mapping[str, Any]) -> str:
    """`transducer.family`, or the standard-arm family whose kept pretrained CTC run on the headline subset
    (`finetune.headline_minutes`, else the first) had the lowest validation CER (test is not looked at)."""
    if config.transducer.family is not None:
        return config.transducer.family
    first = subset_name(config.finetune.headline_minutes or config.finetune.subsets[0].minutes)
    candidates = [
        finetuned["runs"][name]
        for name in finetuned["chosen"]
        if finetuned["runs"][name]["init"] == "pretrained"
        and finetuned["runs"][name].get("pretrain_fraction", 1.0) == 1.0  # not the compute curve's encoders
        and finetuned["runs"][name]["subset"] == first
        and arm_of(finetuned["runs"][name]["key"]) == "standard"
    ]
    if not candidates:
        raise ExperimentError(
            "transducer stage: no pretrained CTC run on the first subset to choose the family from; add "
            "'pretrained' to finetune.inits or set transducer.family"
        )
    return min(candidates, key=lambda run: run["valid_cer"])["key"]


def plan_transducer_runs(
    config: ExperimentConfig,
    family: Mapping[str, Any],
    key: str,
    chosen_rates: Mapping[tuple[str, str], float] | None,
    subset_index: int,
) -> list[TransducerRun]:
    """Every arm on one subset, with each rate of its encoder's grid, or (larger subsets) the rate validation kept
    for that arm on the first subset."""
    t = config.transducer
    subset = config.finetune.subsets[subset_index]
    runs = []
    for arm in t.arms:
        grid = (
            [chosen_rates[(arm.encoder, arm.predictor)]] if chosen_rates is not None else t.learning_rates[arm.encoder]
        )
        for lr in grid:
            runs.append(
                TransducerRun(
                    key=key if arm.encoder == "pretrained" else "none",
                    encoder=arm.encoder,
                    predictor=arm.predictor,
                    subset=subset_name(subset.minutes),
                    minutes=subset.minutes,
                    steps=max(1, round(subset.steps * t.steps_scale)),
                    learning_rate=lr,
                    checkpoint=family["checkpoint"],
                    encoder_id=family["finished_at"],
                )
            )
    return runs


def train_predictor(config: ExperimentConfig, out: Path) -> dict[str, Any]:
    """The text-pretrained prediction network (and the tokenizer of every arm), made once."""
    t = config.transducer
    folder = out / "transducer" / "predictor"
    args = PredictorArguments(
        tokenizer_vocab_size=t.tokenizer_vocab_size,
        tokenizer_model=t.tokenizer_model,
        decoder_hidden_size=t.decoder_hidden_size,
        num_decoder_layers=t.num_decoder_layers,
        max_steps=t.predictor_steps,
        batch_size=t.predictor_batch_size,
        learning_rate=t.predictor_learning_rate,
        seed=config.seed,
    )
    settings = {**dataclasses.asdict(args), "text": "corpus/lm_text.txt"}
    done = unit_done(folder, settings)
    if done is not None:
        return done
    texts = [line for line in (out / "corpus" / "lm_text.txt").read_text().splitlines() if line.strip()]
    # Held-out perplexity on the validation transcripts: text of held-out voices, never an LM sentence.
    valid = [row["text"] for row in read_manifest(out / "corpus" / "valid.jsonl")]
    logger.info("transducer: pretraining the prediction network on %d sentences", len(texts))
    summary = pretrain_predictor(texts, folder / "model", args, valid_texts=valid)
    return finish_unit(folder, {**summary, "model": str((folder / "model").relative_to(out))})


def transducer_one(config: ExperimentConfig, run: TransducerRun, out: Path, predictor_dir: Path) -> dict[str, Any]:
    """Train one TDT model with `run_transducer` (resuming its Trainer checkpoint after a kill), with the CTC runs'
    schedule, evaluations and early stopping; the checkpoint with the best validation CER is the model kept.

    No head-only phase: the transducer's joint and prediction network are two new modules whose gradients reach
    the encoder through the joint alone, and `finetune_transducer.py` does not freeze a Parakeet encoder yet."""
    f, t = config.finetune, config.transducer
    folder = out / "transducer" / run.name
    schedule = schedule_arguments(f, run.steps)
    settings = {
        **dataclasses.asdict(run),
        "batch_size": f.batch_size,
        "schedule": schedule,
        "weight_decay": f.weight_decay,
        "patience": f.patience,
        **({"patience_start": f.patience_start} if f.patience_start else {}),  # runs from before it: as they were
        "eval_steps": f.eval_steps,
        "valid_utterances": f.valid_utterances,
        **({"max_symbols_per_step": t.max_symbols_per_step} if t.max_symbols_per_step else {}),  # older runs: as were
        "predictor_dir": str(predictor_dir.relative_to(out)),
        "seed": config.seed,
    }
    done = unit_done(folder, settings)
    if done is not None:
        return done
    uncounted = patience_start_step(f, run.steps)
    logger.info("transducer %s: %d steps", run.name, run.steps)
    run_dir = folder / "model"
    resume = resume_point(run_dir)
    transducer_args = TransducerArguments(
        head="tdt",
        tokenizer_vocab_size=t.tokenizer_vocab_size,
        tokenizer_model=t.tokenizer_model,
        decoder_hidden_size=t.decoder_hidden_size,
        num_decoder_layers=t.num_decoder_layers,
        max_symbols_per_step=t.max_symbols_per_step,
        # The predictor's tokenizer for every arm: `predictor_from` brings it, `tokenizer_from` takes it alone.
        tokenizer_from=None if run.predictor == "text" else str(predictor_dir),
        predictor_from=str(predictor_dir) if run.predictor == "text" else None,
    )
    result = run_transducer(
        ModelArguments(model_name_or_path=str(out / run.checkpoint), from_scratch=run.encoder == "scratch"),
        DataArguments(
            train_manifests=[str(out / "corpus" / f"{run.subset}.jsonl")],
            eval_manifests=[str(training_valid_manifest(config, out))],
            min_duration=0.1,
            max_duration=f.max_duration,
            spec_augment=f.spec_augment,
        ),
        # No head-only phase: only `patience_start` of the cap goes uncounted (the CTC runs' rule).
        FinetuneArguments(early_stopping_patience=f.patience, early_stopping_start_step=uncounted),
        transducer_args,
        trainer_arguments(config, run_dir, run.steps, run.learning_rate, schedule, resume),
    )
    return finish_unit(
        folder,
        {
            **dataclasses.asdict(run),
            "group": run.group,
            "run": run.name,
            "max_steps": run.steps,
            **run_outcome(run_dir, result),
            "lr_scheduler": f.lr_scheduler,
            **({"patience_start_step": uncounted} if f.patience_start else {}),
            "wall_s": result.summary["train_seconds"],
            "train_loss": result.summary["train_loss"],
            "train_utterances": result.summary["train_utterances"],
            "trainable_params": result.summary["trainable_params"],
            "vocabulary": result.summary["vocabulary"],
            "resumed": resume is not None,
            "loss_curve": result.loss_curve,
            "model": str(run_dir.relative_to(out)),
        },
    )


def _greedy(model: torch.nn.Module, processor: Any, manifest: Path, limit: int | None) -> tuple[list, list]:
    rows, _ = manifest_rows([str(manifest)], 0.0, None, require_text=True, limit=limit)
    examples = decode_rows(rows, DataConfig(min_duration=0.0, max_duration=None, crop_long=False))
    hypotheses = transducer_outputs(model, processor, [example["audio"] for example in examples])
    return [normalize_transcript(example["text"]) for example in examples], hypotheses


def evaluate_transducer(model_dir: Path, valid: Path, test: Path, limit: int | None) -> dict[str, Any]:
    """Greedy WER/CER of a TDT folder on validation and test (the stock processor and model, as the pipeline)."""
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = load_transducer(str(model_dir)).eval()
    model.to("cuda" if torch.cuda.is_available() else "cpu")

    def scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
        return score([{"hypothesis": h, "reference": r} for h, r in zip(hypotheses, references)])

    valid_refs, valid_hyps = _greedy(model, processor, valid, None)
    test_refs, test_hyps = _greedy(model, processor, test, limit)
    return {
        **scores(test_refs, test_hyps),
        "valid": scores(valid_refs, valid_hyps),
        "utterances": len(test_refs),
        "examples": [{"reference": r, "hypothesis": h} for r, h in list(zip(test_refs, test_hyps))[:3]],
        "eval_wall_s": round(time.perf_counter() - start, 1),
    }


def stage_transducer(
    config: ExperimentConfig, out: Path, pretrained: Mapping[str, Any], finetuned: Mapping[str, Any]
) -> dict[str, Any]:
    """Pretrain the predictor, fine-tune every arm on every subset (the grid on the first), score the kept runs."""
    if not config.transducer.enabled:
        return {"runs": {}, "chosen": [], "scores": {}}
    key = choose_family(config, finetuned)
    if key not in pretrained:
        raise ExperimentError(f"transducer.family={key!r}: no such pretraining run ({sorted(pretrained)})")
    predictor = train_predictor(config, out)
    predictor_dir = out / predictor["model"]
    results: dict[str, Any] = {}
    chosen_rates: dict[tuple[str, str], float] | None = None
    wanted = config.transducer.minutes
    for index, subset in enumerate(config.finetune.subsets):
        if wanted and subset.minutes not in wanted:
            continue
        runs = plan_transducer_runs(config, pretrained[key], key, chosen_rates, index)
        subset_results = {run.name: transducer_one(config, run, out, predictor_dir) for run in runs}
        results.update(subset_results)
        if chosen_rates is None:
            chosen_rates = {
                (subset_results[n]["encoder"], subset_results[n]["predictor"]): subset_results[n]["learning_rate"]
                for n in choose_by_validation(subset_results).values()
            }
    chosen = sorted(choose_by_validation(results).values())
    corpus = out / "corpus"
    scores = {}
    for name in chosen:
        folder = out / "transducer" / "evaluate" / name
        settings = {"model": results[name]["model"], "model_id": results[name]["finished_at"], "test": "test.jsonl"}
        done = unit_done(folder, {**settings, "max_utterances": config.evaluate.max_utterances})
        if done is None:
            logger.info("transducer: evaluate %s", name)
            result = evaluate_transducer(
                out / results[name]["model"], corpus / "valid.jsonl", corpus / "test.jsonl",
                config.evaluate.max_utterances,
            )  # fmt: skip
            done = finish_unit(folder, result)
        scores[name] = done
    return {"family": key, "predictor": predictor, "runs": results, "chosen": chosen, "scores": scores}


__all__ = [
    "TransducerRun",
    "choose_family",
    "evaluate_transducer",
    "plan_transducer_runs",
    "stage_transducer",
    "train_predictor",
    "transducer_one",
]
