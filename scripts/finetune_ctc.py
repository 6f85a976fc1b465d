#!/usr/bin/env python
"""Fine-tune a pretrained Conformer encoder for speech recognition with CTC, using the stock Trainer.

    python scripts/finetune_ctc.py --config configs/finetune/ctc_demo.yaml
    python scripts/finetune_ctc.py --config configs/finetune/ctc_base.yaml \\
        --model_name_or_path runs/pretrain/checkpoint-100000/model \\
        --train_manifests train.jsonl --eval_manifests dev.jsonl test.jsonl max_steps=20000

The recipe YAML gives defaults for any argument below; the command line overrides it (`--key value`, `--flag`
or `key=value`). Arguments: ModelArguments, DataArguments, FinetuneArguments (hf_ssl_speech/finetune.py) and
every `transformers.TrainingArguments` field. Without `--train_manifests` the demo corpus is made and used.

At the end `output_dir` holds the model, the processor (feature extractor + character tokenizer; load both
with `AutoProcessor` / `AutoModelForCTC`), `results.md` / `results.json` (WER/CER per eval set),
`training_curves.png`, and a README.md model card; `--push_to_hub` uploads that folder.
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
from hf_ssl_speech.finetune.collators import CtcCollator
from hf_ssl_speech.finetune.ctc import drop_infeasible_ctc, make_ctc_compute_metrics, split_ctc_feasible
from hf_ssl_speech.finetune.model_init import init_ctc_model, load_feature_extractor, model_num_mel_bins
from hf_ssl_speech.finetune.optim import build_optimizer, set_encoder_trainable, train_time_options
from hf_ssl_speech.finetune.report import ctc_model_card, plot_training_curves, push_folder, write_results
from hf_ssl_speech.finetune.rows import eval_set_names, manifest_rows, resolve_manifests, rows_to_dataset
from hf_ssl_speech.finetune.text import build_processor
from hf_ssl_speech.finetune.trainers import CtcTrainer

logger = logging.getLogger("finetune_ctc")

# Below the recipe: the best model is the one with the lowest WER.
DEFAULTS = {"output_dir": "runs/ctc", "metric_for_best_model": "wer", "greater_is_better": False}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, finetune_args, training_args = parse_args(
        (ModelArguments, DataArguments, FinetuneArguments, TrainingArguments), argv, DEFAULTS
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    # We push the finished folder ourselves (with our model card), not every checkpoint through Trainer.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    # --- data: metadata rows only; audio is decoded by the collator
    train_manifests, eval_manifests = resolve_manifests(data_args, training_args.seed)
    train_rows, _ = manifest_rows(
        train_manifests, data_args.min_duration, data_args.max_duration, require_text=True,
        limit=data_args.max_train_samples,
    )  # fmt: skip
    eval_sets = {
        name: manifest_rows([manifest], data_args.min_duration, None, True, None, data_args.max_eval_samples)[0]
        for name, manifest in zip(eval_set_names(eval_manifests), eval_manifests)
    }
    eval_rows = [row for rows in eval_sets.values() for row in rows]
    if not eval_rows and training_args.eval_strategy != "no":
        logger.warning("no eval data: turning off evaluation during training (eval_strategy=no)")
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.load_best_model_at_end = False

    # --- processor (vocabulary from the training transcripts) and model
    num_mel_bins = model_num_mel_bins(
        model_args.model_name_or_path, model_args.model_preset, model_args.config_overrides, model_args.cache_dir
    )
    feature_extractor = load_feature_extractor(model_args.model_name_or_path, num_mel_bins, model_args.cache_dir)
    processor = build_processor([row["text"] for row in train_rows], feature_extractor)
    tokenizer = processor.tokenizer
    logger.info("vocabulary (%d): %s", len(tokenizer), "".join(tokenizer.get_vocab()))
    model, _ = init_ctc_model(
        len(tokenizer), tokenizer.pad_token_id, model_args.model_name_or_path, model_args.from_scratch,
        model_args.model_preset, model_args.config_overrides, model_args.cache_dir,
    )  # fmt: skip
    train_rows = drop_infeasible_ctc(train_rows, tokenizer, model.config, "training data")
    for name, rows in eval_sets.items():
        infeasible = split_ctc_feasible(rows, tokenizer, model.config)[1]
        if infeasible:
            logger.warning("eval set %s: %d of %d transcripts cannot fit the CTC output (errors guaranteed)",
                           name, len(infeasible), len(rows))  # fmt: skip
    if finetune_args.freeze_encoder:
        set_encoder_trainable(model, False)

    spec, callbacks = train_time_options(data_args, finetune_args)
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

    # --- train, save (model + processor + remote code), evaluate each eval set
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
            results[name] = {
                "utterances": len(rows),
                "wer": metrics[f"{name}_wer"],
                "cer": metrics[f"{name}_cer"],
                "loss": metrics[f"{name}_loss"],
            }
    md_path, _ = write_results(results, output_dir)
    plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    summary = {
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "train_loss": round(train_result.training_loss, 4),
        "train_utterances": len(train_rows),
        "vocabulary": len(tokenizer),
    }
    repo_id = training_args.hub_model_id or output_dir.name
    (output_dir / "README.md").write_text(
        ctc_model_card(repo_id, results, base_model=model_args.model_name_or_path, training_summary=summary)
    )
    logger.info("results (%s):\n%s", md_path, md_path.read_text())
    commit_url = None
    if push_to_hub:
        commit_url = push_folder(output_dir, repo_id, token=training_args.hub_token,
                                 private=training_args.hub_private_repo)  # fmt: skip
        logger.info("pushed %s to %s", output_dir, commit_url)
    return {"results": results, "summary": summary, "output_dir": str(output_dir), "commit_url": commit_url}


if __name__ == "__main__":
    main(sys.argv[1:])
