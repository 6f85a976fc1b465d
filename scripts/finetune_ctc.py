#!/usr/bin/env python
"""Fine-tune a pretrained Conformer encoder for speech recognition with CTC, using the stock Trainer.

    python scripts/finetune_ctc.py --config configs/finetune/ctc_demo.yaml \\
        --model_name_or_path runs/tiny_nest/model
    python scripts/finetune_ctc.py --config configs/finetune/ctc_base.yaml \\
        --model_name_or_path runs/pretrain/checkpoints/checkpoint-00100000/model \\
        --train_manifests train.jsonl --eval_manifests dev.jsonl test.jsonl max_steps=20000

The recipe YAML gives defaults for any argument; the command line overrides it (`--key value`, `--flag` or
`key=value`; `--help` lists them all: hf_ssl_speech.finetune.args plus every `transformers.TrainingArguments`
field). Without `--train_manifests` the demo corpus is made (in ./demo_corpus) and used. The run itself is
`hf_ssl_speech.finetune.run.run_ctc`; a user error ends it with one `error:` line (`--debug`: the traceback).
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
    from hf_ssl_speech.finetune.run import CTC_DEFAULTS, run_ctc

    arguments = parse_args((ModelArguments, DataArguments, FinetuneArguments, TrainingArguments), argv, CTC_DEFAULTS)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_ctc(*arguments)


if __name__ == "__main__":
    from _preflight import check_finetune_model, preflight

    preflight(check_finetune_model)
    from hf_ssl_speech.errors import run_command

    sys.exit(run_command(main))
