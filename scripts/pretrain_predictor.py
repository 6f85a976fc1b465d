#!/usr/bin/env python
"""Pretrain a transducer's prediction network on unpaired text, for finetune_transducer.py --predictor_from.

    python scripts/pretrain_predictor.py --text lm_sentences.txt --output_dir runs/predictor decoder_hidden_size=96
    python scripts/pretrain_predictor.py --text a.txt b.txt --valid_text dev.txt --output_dir runs/predictor \\
        tokenizer_vocab_size=256 decoder_hidden_size=640 max_steps=5000
    python scripts/finetune_transducer.py --config configs/finetune/tdt_demo.yaml \\
        --model_name_or_path runs/tiny_nest/model predictor_from=runs/predictor

`--text` files hold one sentence a line (normalised like transcripts: lower case, letters, digits, apostrophes).
A BPE/unigram tokenizer is trained on them (blank last, as finetune_transducer.py makes it), then transformers'
`ParakeetRNNTDecoder` (embedding + LSTM + projector) learns to predict each token from the ones before it, blank
being the start symbol. Held-out perplexity is reported against an add-one unigram model of the same tokens, on
`--valid_text` or the last `valid_fraction` of the shuffled sentences. The output folder holds the tokenizer, the
decoder weights (predictor.safetensors), predictor_config.json and results.json. `--help` lists every argument
(`--name value` or `name=value`; a `--config` YAML works too). The work is
`hf_ssl_speech.finetune.predictor.pretrain_predictor`. The transducer takes `decoder_hidden_size` and
`num_decoder_layers` from the predictor: a recipe that sets other values (tdt_demo.yaml: 96, 1) is refused.
"""

# No `from __future__ import annotations`: the dataclass below needs real annotations, because tests load this
# file as a module that is not in sys.modules, where string annotations cannot be resolved.
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PredictorScriptArguments:
    """Where the text comes from and where the predictor goes."""

    text: list[str] = field(default_factory=list, metadata={"help": "Text files, one sentence a line (required)."})
    valid_text: str | None = field(default=None, metadata={"help": "Held-out sentences (default: split off)."})
    output_dir: str | None = field(default=None, metadata={"help": "The predictor folder to write (required)."})


def text_paths(argv: list[str]) -> list[tuple[str, str]]:
    """(argument, file) of each `--text` / `--valid_text` file of argv (`--text a b`, `--text=a,b`, `text=a,b`),
    without the parser: for the quick check before torch loads."""
    paths: list[tuple[str, str]] = []
    index = 0
    while index < len(argv):
        key, has_value, value = argv[index].lstrip("-").partition("=")
        index += 1
        if key not in ("text", "valid_text"):
            continue
        if has_value:
            paths += [(f"--{key}", part) for part in value.split(",") if part]
            continue
        while index < len(argv) and not argv[index].startswith("--") and "=" not in argv[index]:
            paths.append((f"--{key}", argv[index]))
            index += 1
    return paths


def read_sentences(path: str, argument: str) -> list[str]:
    """The non-blank lines of a text file; a file without one is refused (it would train nothing)."""
    from hf_ssl_speech.errors import UserError

    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    sentences = [line for line in lines if line]
    if not sentences:
        raise UserError(f"{argument} {path!r} has no sentence: give a text file with one sentence a line")
    return sentences


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # Imported here: torch and transformers take seconds to load, after the quick path checks (_preflight.py).
    import logging

    from hf_ssl_speech.errors import ConfigError, check_paths
    from hf_ssl_speech.finetune.args import parse_args
    from hf_ssl_speech.finetune.predictor import PredictorArguments, pretrain_predictor

    script_args, args = parse_args((PredictorScriptArguments, PredictorArguments), argv)
    if not script_args.text:
        raise ConfigError("--text is required: one or more files with one sentence a line")
    if not script_args.output_dir:
        raise ConfigError("--output_dir is required: the folder to write the predictor to (e.g. runs/predictor)")
    check_paths(script_args.text, "--text")
    check_paths([script_args.valid_text] if script_args.valid_text else [], "--valid_text")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    texts = [sentence for path in script_args.text for sentence in read_sentences(path, "--text")]
    valid = read_sentences(script_args.valid_text, "--valid_text") if script_args.valid_text else None
    summary = pretrain_predictor(texts, script_args.output_dir, args, valid_texts=valid)
    print(
        f"held-out perplexity {summary['perplexity']:.2f} (unigram baseline {summary['unigram_perplexity']:.2f}) "
        f"on {summary['valid_tokens']} tokens of {summary['valid_sentences']} sentences; "
        f"predictor saved to {script_args.output_dir}"
    )
    return summary


if __name__ == "__main__":
    from _preflight import preflight

    def check_text_files(errors, argv: list[str]) -> None:
        for argument, path in text_paths(argv):
            errors.check_paths([path], argument)

    preflight(check_text_files)
    from hf_ssl_speech.errors import run_command

    sys.exit(run_command(main))
