#!/usr/bin/env python
"""Fine-tune (or probe) a pretrained Conformer encoder for utterance classification with the stock Trainer.

    python scripts/finetune_classification.py --config configs/finetune/speaker_id_demo.yaml
    python scripts/finetune_classification.py --model_name_or_path runs/pretrain/checkpoints/checkpoint-00005000/model \\
        --train_manifests train.jsonl --eval_manifests dev.jsonl label_column=speaker \\
        --use_weighted_layer_sum --freeze_encoder          # SUPERB-style probing of all layers

The class of each utterance is the manifest field `label_column` (default `speaker`: speaker identification).
Classes come from the training rows; eval rows of unseen classes are left out (and counted). Without
`--eval_manifests`, every 5th utterance of each class is held out of training for eval. Long clips are cropped
to `max_duration` seconds (a random window in training). At the end `output_dir` holds the model, its feature
extractor, `results.md` / `results.json` (accuracy) and `training_curves.png`. The run itself is
`hf_ssl_speech.finetune.run.run_classification`.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_ssl_speech.finetune.run import FinetuneResult


def main(argv: list[str] | None = None) -> FinetuneResult:
    # Imported here: torch and transformers take seconds to load, after the quick path checks (_preflight.py).
    from transformers import TrainingArguments

    from hf_ssl_speech.finetune.args import DataArguments, FinetuneArguments, ModelArguments, parse_args
    from hf_ssl_speech.finetune.run import CLASSIFICATION_DEFAULTS, run_classification

    arguments = parse_args(
        (ModelArguments, DataArguments, FinetuneArguments, TrainingArguments), argv, CLASSIFICATION_DEFAULTS
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_classification(*arguments)


if __name__ == "__main__":
    from _preflight import check_finetune_model, preflight

    preflight(check_finetune_model)
    from hf_ssl_speech.errors import run_command

    sys.exit(run_command(main))
