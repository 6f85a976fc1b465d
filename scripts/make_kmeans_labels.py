#!/usr/bin/env python
"""Frame labels for the HuBERT objective: k-means on one layer of a checkpoint's hidden states.

    python scripts/make_kmeans_labels.py --checkpoint runs/tiny_nest/model \\
        --manifest demo_corpus/train.jsonl --output-dir data/kmeans_l2 --layer 2 --num-clusters 100

    python scripts/make_kmeans_labels.py --features mfcc --manifest demo_corpus/pretrain.jsonl \\
        --output-dir data/kmeans_mfcc --num-clusters 100           # HuBERT's first iteration
    python scripts/make_kmeans_labels.py --features mfcc --manifest demo_corpus/test.jsonl \\
        --output-dir data/kmeans_mfcc_valid --kmeans data/kmeans_mfcc/kmeans.pt   # the same clusters

Writes labels/<id>.npy (one int64 label per 10 ms frame), manifest.jsonl (the input lines plus
`frame_labels`), kmeans.pt and summary.json into --output-dir; unreadable utterances are skipped and counted.
The work is `hf_ssl_speech.pretrain.kmeans.make_kmeans_labels`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from hf_ssl_speech.errors import run_command
from hf_ssl_speech.pretrain.kmeans import make_kmeans_labels


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="save_pretrained folder (any ConformerSsl head); not with mfcc")
    parser.add_argument("--features", choices=("hidden", "mfcc"), default="hidden", help="what to cluster")
    parser.add_argument("--kmeans", help="kmeans.pt of an earlier run: apply its centroids instead of fitting")
    parser.add_argument("--manifest", required=True, help="NeMo JSONL manifest")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--layer", type=int, default=-1, help="hidden state index: 0 subsampling, k block k, -1 last")
    parser.add_argument("--num-clusters", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--max-fit-steps", type=int, default=200_000, help="encoder steps sampled to fit k-means")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return make_kmeans_labels(
        args.checkpoint,
        args.manifest,
        args.output_dir,
        layer=args.layer,
        num_clusters=args.num_clusters,
        iterations=args.iterations,
        max_fit_steps=args.max_fit_steps,
        seed=args.seed,
        device=args.device,
        features=args.features,
        kmeans=args.kmeans,
    )


if __name__ == "__main__":
    sys.exit(run_command(main))
