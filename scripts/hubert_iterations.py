#!/usr/bin/env python
"""HuBERT iterations in one command: MFCC k-means -> pretrain -> k-means on a middle layer -> pretrain again.

    python scripts/hubert_iterations.py --config configs/hubert_iterations/tiny.yaml
    python scripts/hubert_iterations.py --config configs/hubert_iterations/tiny.yaml \\
        run.output_dir=runs/hi_2 iteration2.num_clusters=200 'pretrain.overrides=[train.max_steps=50]'

Rerun the same command to continue: finished stages are skipped, an interrupted pretraining resumes from its
newest checkpoint. The label quality of each iteration (codes used, entropy, and phone purity / cluster purity /
PNMI where the corpus has phone labels) goes to <run.output_dir>/report.md and report.json.
The work is `hf_ssl_speech.pretrain.hubert_iterations.run_hubert_iterations`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hf_ssl_speech.errors import run_command
from hf_ssl_speech.pretrain.hubert_iterations import load_config, run_hubert_iterations


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/hubert_iterations/tiny.yaml); default: defaults")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. iteration1.num_clusters=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    report = run_hubert_iterations(load_config(args.config, args.overrides))
    for it in report["iterations"]:
        for split, q in it["label_quality"].items():
            phones = (
                f", phone purity {q['phone_purity']:.3f}, cluster purity {q['cluster_purity']:.3f}, PNMI {q['pnmi']:.3f}"
                if "pnmi" in q
                else ""
            )
            print(
                f"iteration {it['iteration']} ({it['features']}, k={it['num_clusters']}) {split}: "
                f"{q['codes_used']} codes used, entropy {q['entropy_bits']:.2f} bits{phones}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
