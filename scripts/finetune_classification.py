#!/usr/bin/env python
"""Fine-tune (or probe) a pretrained Conformer encoder for utterance classification with the stock Trainer.

    python scripts/finetune_classification.py --config configs/finetune/speaker_id_demo.yaml
    python scripts/finetune_classification.py --model_name_or_path runs/pretrain/checkpoint-5000/model \\
        --train_manifests train.jsonl --eval_manifests dev.jsonl label_column=speaker \\
        --use_weighted_layer_sum --freeze_encoder          # SUPERB-style probing of all layers

The class of each utterance is the manifest field `label_column` (default `speaker`: speaker identification).
Classes come from the training rows; eval rows of unseen classes are left out (and counted). Without
`--eval_manifests`, every `1 / eval_fraction`-th utterance of each class is held out of training for eval.
Long clips are cropped to `max_duration` seconds (a random window in training). At the end `output_dir` holds
the model, its feature extractor, `results.md` / `results.json` (accuracy) and `training_curves.png`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy

from hf_ssl_speech.finetune.args import DataArguments, FinetuneArguments, ModelArguments, parse_args
from hf_ssl_speech.finetune.collators import ClassificationCollator
from hf_ssl_speech.finetune.model_init import init_classification_model, load_feature_extractor, model_num_mel_bins
from hf_ssl_speech.finetune.optim import build_optimizer, set_encoder_trainable, train_time_options
from hf_ssl_speech.finetune.report import plot_training_curves, push_folder, write_results
from hf_ssl_speech.finetune.rows import eval_set_names, manifest_rows, resolve_manifests, rows_to_dataset
from hf_ssl_speech.finetune.trainers import SslTrainer, classification_accuracy

logger = logging.getLogger("finetune_classification")

DEFAULTS = {
    "output_dir": "runs/classification",
    "metric_for_best_model": "accuracy",
    "greater_is_better": True,
    "spec_augment": False,  # SUPERB probing trains without augmentation; recipes may turn it on
}
HELD_OUT_EVERY = 5  # without eval manifests: every 5th utterance of each class is held out


def hold_out(rows: list[dict[str, Any]], every: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into (train, eval): the every-th utterance of each class (classes with >= 2 rows) goes to eval."""
    seen: dict[str, int] = {}
    train, held = [], []
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    for row in rows:
        index = seen[row["label"]] = seen.get(row["label"], 0) + 1
        (held if counts[row["label"]] >= 2 and index % every == 0 else train).append(row)
    return train, held


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, finetune_args, training_args = parse_args(
        (ModelArguments, DataArguments, FinetuneArguments, TrainingArguments), argv, DEFAULTS
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    # --- data: rows with a `label`; classes from the training rows
    train_manifests, eval_manifests = resolve_manifests(data_args, training_args.seed)
    if not data_args.train_manifests:
        # The demo's test split holds only unseen talkers: classify the training talkers' utterances of the
        # pretrain and finetune splits instead, holding out some of each class.
        train_manifests = [
            str(Path(data_args.demo_corpus_dir) / f"{split}.jsonl") for split in ("pretrain", "finetune")
        ]
        eval_manifests = list(data_args.eval_manifests)
    label = data_args.label_column
    train_rows, _ = manifest_rows(train_manifests, data_args.min_duration, None, False, label,
                                  data_args.max_train_samples)  # fmt: skip
    eval_sets = {
        name: manifest_rows([m], data_args.min_duration, None, False, label, data_args.max_eval_samples)[0]
        for name, m in zip(eval_set_names(eval_manifests), eval_manifests)
    }
    if not eval_sets:
        train_rows, held = hold_out(train_rows, HELD_OUT_EVERY)
        eval_sets = {"held_out": held}
    classes = sorted({row["label"] for row in train_rows})
    if len(classes) < 2:
        raise ValueError(f"{train_manifests}: {len(classes)} distinct '{label}' values; classification needs >= 2")
    label2id = {name: index for index, name in enumerate(classes)}
    for name, rows in eval_sets.items():
        known = [row for row in rows if row["label"] in label2id]
        if len(known) < len(rows):
            logger.warning("%s: left out %d rows whose %s is not a training class", name, len(rows) - len(known), label)
        eval_sets[name] = known
    eval_rows = [row for rows in eval_sets.values() for row in rows]
    if not eval_rows and training_args.eval_strategy != "no":
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.load_best_model_at_end = False
    logger.info("%d classes, %d training / %d eval utterances", len(classes), len(train_rows), len(eval_rows))

    # --- model
    num_mel_bins = model_num_mel_bins(
        model_args.model_name_or_path, model_args.model_preset, model_args.config_overrides, model_args.cache_dir
    )
    feature_extractor = load_feature_extractor(model_args.model_name_or_path, num_mel_bins, model_args.cache_dir)
    model, _ = init_classification_model(
        label2id, model_args.model_name_or_path, model_args.from_scratch, model_args.model_preset,
        model_args.config_overrides, finetune_args.use_weighted_layer_sum, finetune_args.classifier_proj_size,
        model_args.cache_dir,
    )  # fmt: skip
    if finetune_args.freeze_encoder:
        set_encoder_trainable(model, False)

    spec, callbacks = train_time_options(data_args, finetune_args)
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

    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - start
    trainer.save_model()
    trainer.save_state()
    trainer.remove_callback(EarlyStoppingCallback)  # the final evaluations are per eval set, not for stopping
    results = {}
    for name, rows in eval_sets.items():
        if rows:
            metrics = trainer.evaluate(rows_to_dataset(rows, augment=False), metric_key_prefix=name)
            results[name] = {"utterances": len(rows), "accuracy": metrics[f"{name}_accuracy"],
                             "loss": metrics[f"{name}_loss"]}  # fmt: skip
    md_path, _ = write_results(results, output_dir)
    plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    summary = {"steps": trainer.state.global_step, "train_seconds": round(train_seconds, 1),
               "train_loss": round(train_result.training_loss, 4), "classes": len(classes)}  # fmt: skip
    logger.info("results (%s):\n%s", md_path, md_path.read_text())
    commit_url = None
    if push_to_hub:
        repo_id = training_args.hub_model_id or output_dir.name
        commit_url = push_folder(output_dir, repo_id, training_args.hub_token, training_args.hub_private_repo)
    return {"results": results, "summary": summary, "output_dir": str(output_dir), "commit_url": commit_url}


if __name__ == "__main__":
    main(sys.argv[1:])
