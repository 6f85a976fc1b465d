#!/usr/bin/env python
"""Does self-supervised pretraining pay when labels are scarce? The experiment, end to end, resumable.

    python scripts/low_resource_experiment.py --config configs/experiments/low_resource.yaml
    python scripts/low_resource_experiment.py --config configs/experiments/low_resource_toy.yaml --out /tmp/toy
    python scripts/low_resource_experiment.py --config ... --stages corpus pretrain     # only these stages

Stages (hf_ssl_speech/experiments/low_resource.py): corpus (unlabeled pool, few-speaker labels, held-out
validation and test voices, in-domain audio, LM text) -> pretrain (one encoder per objective and arm, equal
budgets) -> finetune (CTC on 10 min / 1 h: pretrained, frozen-encoder probe, scratch baseline; learning rate and
checkpoint chosen on validation) -> evaluate (greedy and n-gram-LM WER/CER on the test voices, LM weights chosen
on validation) -> probes (SUPERB-style, frozen encoders vs FBANK) -> report (low_resource.json / .md / PNGs in
the config's results_dir, models in its models_dir). Each stage, and each run inside it, leaves a done.json
marker: run the same command again after an interruption and it continues where it stopped. `--out` moves the
working folder (corpus, checkpoints), `--results_dir` the report, `--models_dir` the exported models.

Recorded voices (flite, festival, MBROLA, pico) are used when installed (engines: auto), and the LM is built
with irstlm; on Debian/Ubuntu, as root:  bash scripts/setup_voices.sh
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import transformers

from hf_ssl_speech.experiments.low_resource import (
    STAGES,
    ExperimentError,
    command_line,
    load_experiment_config,
    run_experiment,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/experiments/<name>.yaml")
    parser.add_argument("--out", default=None, help="working folder (default: the config's output_dir)")
    parser.add_argument("--results_dir", default=None, help="report folder (default: the config's results_dir)")
    parser.add_argument("--models_dir", default=None, help="exported models (default: the config's models_dir)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="run only these stages")
    args = parser.parse_args(argv)
    if argv is None:  # process-wide logging set-up belongs to the command, not to a call from Python (tests)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        for noisy in ("accelerate", "datasets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # transformers prints a table of every SSL-head tensor a CTC model does not use at each load; an encoder
        # tensor that fails to load stops the experiment instead (experiment.finetune_one).
        transformers.logging.set_verbosity_error()
    command = command_line(sys.argv if argv is None else ["scripts/low_resource_experiment.py", *argv])
    try:
        config = load_experiment_config(
            args.config, {"output_dir": args.out, "results_dir": args.results_dir, "models_dir": args.models_dir}
        )
        result = run_experiment(config, args.stages, command=command)
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("stages: " + ", ".join(f"{stage} {state}" for stage, state in result.status.items()))
    if "report" in result.results:
        print(f"report: {result.results['report']['results_dir']}/low_resource.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
