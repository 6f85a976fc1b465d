#!/usr/bin/env python
"""Fine-tune a pretrained FastConformer as a transducer (transformers' ParakeetForTDT, or ParakeetForRNNT with
`--head rnnt`), using the stock Trainer: the counterpart of finetune_ctc.py.

    python scripts/finetune_transducer.py --config configs/finetune/tdt_demo.yaml \\
        --model_name_or_path runs/tiny_nest/model
    python scripts/finetune_transducer.py --config configs/finetune/tdt_demo.yaml \\
        --model_name_or_path runs/pretrain/checkpoints/checkpoint-00100000/model \\
        --train_manifests train.jsonl --eval_manifests dev.jsonl tokenizer_vocab_size=256 max_steps=20000

Same arguments, recipe layer and output-folder rules as finetune_ctc.py, plus `head`, `tokenizer_vocab_size`,
`tokenizer_model` (bpe/unigram), `decoder_hidden_size`, `num_decoder_layers`, `predictor_from` (a
scripts/pretrain_predictor.py folder: its tokenizer, and the prediction network starts from its text-trained
weights), `tokenizer_from` (a saved tokenizer alone) (`--help` lists them all). The output
folder is stock transformers (ParakeetForTDT + ParakeetProcessor with a BPE tokenizer trained on the training text):
`pipeline("automatic-speech-recognition", model=folder)` and scripts/transcribe.py transcribe it. An encoder that
transformers' ParakeetEncoder cannot hold (a Conformer with 4x `striding`, ...) is refused in one line. The run is
`hf_ssl_speech.finetune.transducer.run_transducer`.
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
    from hf_ssl_speech.finetune.transducer import TRANSDUCER_DEFAULTS, TransducerArguments, run_transducer

    arguments = parse_args(
        (ModelArguments, DataArguments, FinetuneArguments, TransducerArguments, TrainingArguments),
        argv,
        TRANSDUCER_DEFAULTS,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_transducer(*arguments)


if __name__ == "__main__":
    from _preflight import check_finetune_model, preflight

    preflight(check_finetune_model)
    from hf_ssl_speech.errors import run_command

    sys.exit(run_command(main))
