"""The two fine-tuning runs, each one function over the building blocks: `run_ctc` and `run_classification`.

`scripts/finetune_ctc.py` and `scripts/finetune_classification.py` parse their arguments and call these; the
low-resource experiment calls `run_ctc` for every one of its fine-tuning runs. Both end the same way
(`_train_and_report`): train with the stock `Trainer`, save, evaluate each eval set (and then the test sets,
indexed only now: on the demo corpus, checkpoints are chosen on its valid split and its test split is read
once, here), write `results.md` / `results.json` and `training_curves.png`, and push when asked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint

from ..errors import ConfigError, Preempted, UserError, check_model_source
from ..precision import describe, resolve_mixed_precision
from ..preemption import StopRequest, preempted_message
from .args import DataArguments, FinetuneArguments, ModelArguments
from .collators import ClassificationCollator, CtcCollator
from .ctc import drop_infeasible_ctc, make_ctc_compute_metrics, split_ctc_feasible
from .model_init import (
    LoadReport,
    init_classification_model,
    init_ctc_model,
    load_feature_extractor,
    model_input_config,
)
from .optim import (
    build_optimizer,
    set_encoder_trainable,
    set_unused_parameter_search,
    train_time_options,
    unused_parameter_reasons,
)
from .preempt import PreemptionCallback, WallClock
from .report import card_base_model, ctc_model_card, plot_training_curves, push_folder, write_results
from .rows import demo_test_manifests, eval_set_names, manifest_rows, resolve_manifests, rows_to_dataset
from .text import build_processor
from .trainers import CtcTrainer, SslTrainer, classification_accuracy

logger = logging.getLogger(__name__)

CTC_DEFAULTS = {"output_dir": "runs/ctc", "metric_for_best_model": "wer", "greater_is_better": False}
CLASSIFICATION_DEFAULTS = {
    "output_dir": "runs/classification",
    "metric_for_best_model": "accuracy",
    "greater_is_better": True,
    "spec_augment": False,  # SUPERB probing trains without augmentation; recipes may turn it on
}
HELD_OUT_EVERY = 5  # classification without eval manifests: every 5th utterance of each class is held out


class OutputDirInUseError(UserError):
    """A fresh fine-tuning run pointed at a folder that holds another run."""


@dataclass
class FinetuneResult:
    """What a fine-tuning run leaves behind."""

    output_dir: Path
    results: dict[str, dict[str, float]]  # eval set -> metrics (utterances, wer/cer or accuracy, loss)
    summary: dict[str, Any]  # steps, train_seconds, train_loss, ...
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss) as logged
    load_report: LoadReport | None = None  # what came from the checkpoint (None from scratch)
    commit_url: str | None = None


def check_model_argument(model_args: ModelArguments) -> None:
    """A local `model_name_or_path` that is not there fails now, in one line, before the demo corpus is made or
    transformers asks the Hub for it (which retried for ~30 s before)."""
    if model_args.model_name_or_path:
        check_model_source(model_args.model_name_or_path, "--model_name_or_path")


def check_output_dir(training_args: TrainingArguments) -> None:
    """Refuse a fresh run in a folder that already holds one (two commands writing `runs/ctc_demo` mixed their
    checkpoints and results); `--resume_from_checkpoint` continues a run on purpose."""
    folder = Path(training_args.output_dir)
    if training_args.resume_from_checkpoint or not folder.is_dir() or not any(folder.iterdir()):
        return
    last = get_last_checkpoint(str(folder))
    held = f"a run (last checkpoint {Path(last).name})" if last else "files of an earlier run"
    raise OutputDirInUseError(
        f"--output_dir {folder} already holds {held}. Pass --resume_from_checkpoint "
        f"{last or str(folder) + '/checkpoint-N'} to continue it, choose another --output_dir, or delete it first."
    )


def apply_mixed_precision(training_args: TrainingArguments, setting: str) -> str:
    """`finetune.mixed_precision` -> `TrainingArguments.bf16` / `fp16` (left alone when either is set already).
    Returns the precision chosen ("no", "bf16" or "fp16"), which is logged with the reason."""
    if training_args.bf16 or training_args.fp16:
        precision, why = ("bf16" if training_args.bf16 else "fp16"), "training.bf16 / fp16 set"
    else:
        try:
            precision, why = resolve_mixed_precision(setting, training_args.device)
        except ValueError as error:
            raise ConfigError(f"finetune.{error}") from None
        if precision == "fp16" and training_args.device.type == "cpu":
            raise ConfigError(
                "finetune.mixed_precision=fp16 on the CPU: Trainer runs fp16 on GPUs only; use bf16, auto or no"
            )
        training_args.bf16, training_args.fp16 = precision == "bf16", precision == "fp16"
        training_args.mixed_precision = precision  # what Trainer hands to accelerate
    logger.info(describe(precision, why))
    return precision


def _disable_eval_without_data(training_args: TrainingArguments, has_eval: bool) -> None:
    if not has_eval and training_args.eval_strategy != "no":
        logger.warning("no eval data: turning off evaluation during training (eval_strategy=no)")
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.load_best_model_at_end = False


def _report_early_stop(trainer: Trainer, patience: int | None) -> str | None:
    """A line saying that (and why) early stopping ended the run before max_steps, or None."""
    state, args = trainer.state, trainer.args
    if not patience or args.max_steps <= 0 or state.global_step >= args.max_steps:
        return None
    best = f"{args.metric_for_best_model} {state.best_metric:.4g}" if state.best_metric is not None else "none"
    where = f" at {Path(state.best_model_checkpoint).name}" if state.best_model_checkpoint else ""
    return (
        f"early stopping at step {state.global_step} of {args.max_steps}: {args.metric_for_best_model} did not "
        f"improve for {patience} evaluations; the best model ({best}{where}) is the one saved"
    )


def _train_and_report(
    trainer: Trainer,
    eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
    metric_names: Sequence[str],
    finetune_args: FinetuneArguments,
    push_to_hub: bool,
    summary_extra: Mapping[str, Any],
    model_card: Any = None,
    load_test_sets: Callable[[], Mapping[str, Sequence[Mapping[str, Any]]]] | None = None,
) -> FinetuneResult:
    """Train (or resume), save, evaluate each eval set, write the results and curves, push when asked.

    Args:
        model_card: called with (results, summary) to give README.md's text, or None for no card.
        load_test_sets: called once after training to index the test sets, evaluated after the eval sets. Kept
            out of `eval_sets` so that nothing chosen during training (best checkpoint, early stop) sees them.
    """
    args = trainer.args
    output_dir = Path(args.output_dir)
    clock = WallClock(args.resume_from_checkpoint)  # seconds of the legs before a resume: the whole run counts
    trainer.add_callback(clock)
    with StopRequest() as stop:  # SIGTERM / SIGUSR1 / SIGINT: Trainer's checkpoint after this step, exit 75
        preemption = PreemptionCallback(stop)
        trainer.add_callback(preemption)
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.remove_callback(preemption)
    if preemption.stopped_by is not None:
        step = trainer.state.global_step
        checkpoint = output_dir / f"checkpoint-{step}"
        rerun = f"--resume_from_checkpoint {checkpoint}"
        raise Preempted(preempted_message(step, checkpoint, preemption.stopped_by, rerun=rerun))
    train_seconds = clock.seconds
    trainer.remove_callback(clock)
    stopped = _report_early_stop(trainer, finetune_args.early_stopping_patience)
    if stopped:
        logger.warning(stopped)
    trainer.save_model()
    trainer.save_state()
    trainer.remove_callback(EarlyStoppingCallback)  # the final evaluations are per eval set, not for stopping
    test_sets = load_test_sets() if load_test_sets is not None else {}
    results = {}
    for name, rows in {**eval_sets, **test_sets}.items():
        if rows:
            metrics = trainer.evaluate(rows_to_dataset(rows, augment=False), metric_key_prefix=name)
            results[name] = {
                "utterances": len(rows),
                **{key: metrics[f"{name}_{key}"] for key in (*metric_names, "loss")},
            }
    md_path, _ = write_results(results, output_dir)
    plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    summary = {
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "train_loss": round(train_result.training_loss, 4),
        **({"early_stopped": stopped} if stopped else {}),
        # what the best checkpoint and early stopping were chosen on; test sets were read only after training
        **({"selected_on": ", ".join(eval_sets)} if args.load_best_model_at_end and eval_sets else {}),
        **summary_extra,
    }
    repo_id = args.hub_model_id or output_dir.name
    if model_card is not None:
        (output_dir / "README.md").write_text(model_card(repo_id, results, summary))
    logger.info("results (%s):\n%s", md_path, md_path.read_text())
    commit_url = None
    if push_to_hub:
        commit_url = push_folder(output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        logger.info("pushed %s to %s", output_dir, commit_url)
    curve = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    return FinetuneResult(output_dir, results, summary, curve, commit_url=commit_url)


def _feature_extractor(model_args: ModelArguments):
    config = model_input_config(
        model_args.model_name_or_path, model_args.model_preset, model_args.config_overrides, model_args.cache_dir
    )
    return load_feature_extractor(
        model_args.model_name_or_path,
        config.num_mel_bins,
        model_args.cache_dir,
        stacked_fbank=config.subsampling == "feature_projection",
    )


def transcribed_rows(
    data_args: DataArguments, training_args: TrainingArguments
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], Callable[[], dict[str, list[dict[str, Any]]]]]:
    """The data rules of ASR fine-tuning (CTC and transducer): (training rows, eval sets by name, a reader of the
    test sets, called once after training). Metadata rows only; the collator decodes the audio. Evaluation is
    switched off when there are no eval rows."""
    train_manifests, eval_manifests = resolve_manifests(data_args, demo_train=("pretrain", "finetune"))
    test_manifests = demo_test_manifests(data_args)
    set_names = eval_set_names(eval_manifests + test_manifests)
    train_rows, _ = manifest_rows(
        train_manifests,
        data_args.min_duration,
        data_args.max_duration,
        require_text=True,
        limit=data_args.max_train_samples,
    )

    def eval_rows_of(manifest: str) -> list[dict[str, Any]]:
        return manifest_rows([manifest], data_args.min_duration, None, True, None, data_args.max_eval_samples)[0]

    eval_sets = {name: eval_rows_of(manifest) for name, manifest in zip(set_names, eval_manifests)}
    _disable_eval_without_data(training_args, any(eval_sets.values()))

    def read_test_sets() -> dict[str, list[dict[str, Any]]]:
        return {name: eval_rows_of(m) for name, m in zip(set_names[len(eval_manifests) :], test_manifests)}

    return train_rows, eval_sets, read_test_sets


def run_ctc(
    model_args: ModelArguments,
    data_args: DataArguments,
    finetune_args: FinetuneArguments,
    training_args: TrainingArguments,
    vocabulary_texts: Sequence[str] | None = None,
    require_complete_encoder: bool = False,
) -> FinetuneResult:
    """CTC fine-tuning of a pretrained encoder (or the same architecture from scratch) with the stock `Trainer`.

    Args:
        model_args, data_args, finetune_args, training_args: the parsed arguments (`args.parse_args`).
        vocabulary_texts: transcripts the character vocabulary is built from (default: the training rows'); an
            experiment passes its whole labeled pool so every run has the same alphabet.
        require_complete_encoder: refuse (instead of warn) when the checkpoint's encoder does not load fully.

    At the end `output_dir` holds the model, the processor (feature extractor + character tokenizer; load both
    with `AutoProcessor` / `AutoModelForCTC`), `results.md` / `results.json` (WER/CER per eval set),
    `training_curves.png` and a README.md model card.
    """
    check_model_argument(model_args)
    check_output_dir(training_args)
    apply_mixed_precision(training_args, finetune_args.mixed_precision)
    set_seed(training_args.seed)
    # We push the finished folder ourselves (with our model card), not every checkpoint through Trainer.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    # --- data: metadata rows only; audio is decoded by the collator
    # The demo fine-tunes on all ~16 transcribed minutes of the demo corpus (pretrain + finetune splits): its
    # finetune split alone (~35 utterances) is overfitted within the first evaluations. It selects and early-stops
    # on the valid split (held-out talkers) and reads the test split (other held-out talkers) once, at the end.
    train_rows, eval_sets, read_test_sets = transcribed_rows(data_args, training_args)
    eval_rows = [row for rows in eval_sets.values() for row in rows]

    # --- processor (the vocabulary of the transcripts) and model
    texts = vocabulary_texts if vocabulary_texts is not None else [row["text"] for row in train_rows]
    processor = build_processor(texts, _feature_extractor(model_args))
    tokenizer = processor.tokenizer
    logger.info("vocabulary (%d): %s", len(tokenizer), "".join(tokenizer.get_vocab()))
    model, report = init_ctc_model(
        len(tokenizer),
        tokenizer.pad_token_id,
        model_args.model_name_or_path,
        model_args.from_scratch,
        model_args.model_preset,
        model_args.config_overrides,
        model_args.cache_dir,
    )
    if require_complete_encoder and report is not None and not report.encoder_complete:
        raise UserError(f"the encoder of {model_args.model_name_or_path} did not load completely: {report}")
    train_rows = drop_infeasible_ctc(train_rows, tokenizer, model.config, "training data")

    def warn_infeasible(sets: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        for name, rows in sets.items():
            infeasible = split_ctc_feasible(rows, tokenizer, model.config)[1]
            if infeasible:
                logger.warning(
                    "eval set %s: %d of %d transcripts cannot fit the CTC output (errors guaranteed)",
                    name,
                    len(infeasible),
                    len(rows),
                )

    def load_test_sets() -> dict[str, list[dict[str, Any]]]:
        test_sets = read_test_sets()
        warn_infeasible(test_sets)
        return test_sets

    warn_infeasible(eval_sets)
    if finetune_args.freeze_encoder:
        set_encoder_trainable(model, False)

    spec, callbacks = train_time_options(data_args, finetune_args)
    set_unused_parameter_search(training_args, unused_parameter_reasons(finetune_args, model.config))
    trainer = CtcTrainer(
        model=model,
        args=training_args,
        train_dataset=rows_to_dataset(train_rows, augment=True),
        eval_dataset=rows_to_dataset(eval_rows, augment=False) if eval_rows else None,
        data_collator=CtcCollator(processor, spec, dither=data_args.dither),
        processing_class=processor,
        compute_metrics=make_ctc_compute_metrics(tokenizer),
        callbacks=callbacks,
        optimizers=(build_optimizer(model, training_args, finetune_args.layer_decay), None),
    )

    def card(repo_id: str, results: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
        base_model = card_base_model(model_args.model_name_or_path, model_args.from_scratch)
        return ctc_model_card(repo_id, results, base_model=base_model, training_summary=summary)

    extra = {
        "train_utterances": len(train_rows),
        "train_audio_seconds": round(sum(float(row.get("duration") or 0.0) for row in train_rows), 1),
        "vocabulary": len(tokenizer),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    result = _train_and_report(
        trainer, eval_sets, ("wer", "cer"), finetune_args, push_to_hub, extra, card, load_test_sets
    )
    result.load_report = report
    return result


def hold_out(rows: list[dict[str, Any]], every: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into (train, eval): the every-th utterance of each class (classes with >= 2 rows) goes to eval."""
    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    train, held = [], []
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    for row in rows:
        index = seen[row["label"]] = seen.get(row["label"], 0) + 1
        (held if counts[row["label"]] >= 2 and index % every == 0 else train).append(row)
    return train, held


def run_classification(
    model_args: ModelArguments,
    data_args: DataArguments,
    finetune_args: FinetuneArguments,
    training_args: TrainingArguments,
) -> FinetuneResult:
    """Utterance classification (speaker, keyword, ...) of the manifest field `data_args.label_column`.

    Classes come from the training rows; eval rows of unseen classes are left out (and counted). Without eval
    manifests, every `HELD_OUT_EVERY`-th utterance of each class is held out of training for eval. With the demo
    corpus, the training talkers' utterances (pretrain and finetune splits) are classified: its test split holds
    only unseen talkers.
    """
    check_model_argument(model_args)
    check_output_dir(training_args)
    apply_mixed_precision(training_args, finetune_args.mixed_precision)
    set_seed(training_args.seed)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    # The demo corpus' test split holds only unseen talkers: classify the training talkers' utterances instead.
    train_manifests, eval_manifests = resolve_manifests(data_args, demo_train=("pretrain", "finetune"), demo_eval=())
    label = data_args.label_column
    train_rows, _ = manifest_rows(
        train_manifests, data_args.min_duration, None, False, label, data_args.max_train_samples
    )
    eval_sets = {
        name: manifest_rows([m], data_args.min_duration, None, False, label, data_args.max_eval_samples)[0]
        for name, m in zip(eval_set_names(eval_manifests), eval_manifests)
    }
    if not eval_sets:
        train_rows, held = hold_out(train_rows, HELD_OUT_EVERY)
        eval_sets = {"held_out": held}
    classes = sorted({row["label"] for row in train_rows})
    if len(classes) < 2:
        raise ConfigError(f"{train_manifests}: {len(classes)} distinct '{label}' values; classification needs >= 2")
    label2id = {name: index for index, name in enumerate(classes)}
    for name, rows in eval_sets.items():
        known = [row for row in rows if row["label"] in label2id]
        if len(known) < len(rows):
            logger.warning("%s: left out %d rows whose %s is not a training class", name, len(rows) - len(known), label)
        eval_sets[name] = known
    eval_rows = [row for rows in eval_sets.values() for row in rows]
    _disable_eval_without_data(training_args, bool(eval_rows))
    logger.info("%d classes, %d training / %d eval utterances", len(classes), len(train_rows), len(eval_rows))

    feature_extractor = _feature_extractor(model_args)
    model, report = init_classification_model(
        label2id,
        model_args.model_name_or_path,
        model_args.from_scratch,
        model_args.model_preset,
        model_args.config_overrides,
        finetune_args.use_weighted_layer_sum,
        finetune_args.classifier_proj_size,
        model_args.cache_dir,
    )
    if finetune_args.freeze_encoder:
        set_encoder_trainable(model, False)

    spec, callbacks = train_time_options(data_args, finetune_args)
    set_unused_parameter_search(training_args, unused_parameter_reasons(finetune_args, model.config))
    trainer = SslTrainer(
        model=model,
        args=training_args,
        train_dataset=rows_to_dataset(train_rows, augment=True),
        eval_dataset=rows_to_dataset(eval_rows, augment=False) if eval_rows else None,
        data_collator=ClassificationCollator(feature_extractor, label2id, data_args.max_duration, spec),
        processing_class=feature_extractor,
        compute_metrics=classification_accuracy,
        callbacks=callbacks,
        optimizers=(build_optimizer(model, training_args, finetune_args.layer_decay), None),
    )
    extra = {"classes": len(classes), "train_utterances": len(train_rows)}
    result = _train_and_report(trainer, eval_sets, ("accuracy",), finetune_args, push_to_hub, extra)
    result.load_report = report
    return result


__all__ = [
    "CLASSIFICATION_DEFAULTS",
    "CTC_DEFAULTS",
    "FinetuneResult",
    "OutputDirInUseError",
    "check_model_argument",
    "check_output_dir",
    "hold_out",
    "run_classification",
    "run_ctc",
]
