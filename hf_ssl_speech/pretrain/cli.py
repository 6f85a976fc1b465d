"""Console entry points.

`hf-ssl-pretrain` (= `scripts/pretrain.py`):

    accelerate launch scripts/pretrain.py --config configs/pretrain/<recipe>.yaml [section.key=value ...]
        [--resume [CHECKPOINT]] [--push_to_hub REPO]

With no `--config` it runs the tiny NEST demo (`DEFAULT_RECIPE`, the same recipe as
configs/pretrain/tiny_nest.yaml with the model preset spelled out, so it works from any folder): it builds the
demo corpus in `./demo_corpus` if it is missing, pretrains for a few CPU minutes and prints where the
checkpoint and the loss-curve plot are.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The tiny NEST demo (configs/pretrain/tiny_nest.yaml with configs/model/tiny.yaml expanded; test_recipe keeps
# the two equal). Data paths are relative to the current folder.
DEFAULT_RECIPE: dict[str, Any] = {
    "model": {
        "subsampling": "dw_striding",
        "subsampling_factor": 4,
        "subsampling_conv_channels": 64,
        "hidden_size": 96,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 384,
        "conv_depthwise_kernel_size": 9,
        "xscaling": True,
        "conv_norm_type": "batch_norm",
        "mask_strategy": "block",
        "mask_time_prob": 0.01,
        "mask_time_length": 40,
        "mask_fill": "noise",
        "bestrq_num_codebooks": 1,
        "bestrq_codebook_size": 8192,
        "bestrq_codebook_dim": 16,
        "hidden_dropout": 0.0,
        "activation_dropout": 0.0,
        "attention_dropout": 0.0,
        "feat_proj_dropout": 0.0,
    },
    "objectives": {"bestrq": {"weight": 1.0, "start_step": 0, "layer": -1}},
    "data": {
        "train_manifests": ["demo_corpus/pretrain.jsonl"],
        "valid_manifests": ["demo_corpus/test.jsonl"],
        "batch_seconds": 48,
        "max_batch_size": 16,
        "max_duration": 12.0,
        "min_duration": 0.5,
        "num_workers": 0,
        "denoising_prob": 0.5,
    },
    "optim": {
        "lr": 2.0e-3,
        "scheduler": "cosine",
        "warmup_steps": 30,
        "weight_decay": 1.0e-3,
        "betas": [0.9, 0.98],
        "clip": 1.0,
    },
    "train": {
        "output_dir": "runs/tiny_nest",
        "max_steps": 300,
        "max_minutes": 5,
        "save_steps": 100,
        "eval_steps": 50,
        "eval_batches": 4,
        "log_steps": 5,
        "seed": 1234,
        "keep_last": 2,
        "report_to": "tensorboard",
    },
}
DEMO_CORPUS_DIR = "demo_corpus"
DEMO_CORPUS_MINUTES = 20.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-ssl-pretrain",
        description="Self-supervised pretraining of a Conformer / FastConformer speech encoder from a YAML recipe. "
        "Without --config: a few CPU minutes of the tiny NEST demo on a generated corpus.",
        epilog="Examples:\n  accelerate launch scripts/pretrain.py --config configs/pretrain/nest_fastconformer.yaml "
        "train.max_steps=1000 optim.lr=2e-3\n  hf-ssl-pretrain --config configs/pretrain/tiny_apc.yaml --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="recipe YAML (configs/pretrain/<name>.yaml); default: the tiny NEST demo")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="recipe overrides, e.g. train.max_steps=100 optim.lr=1e-3 'data.train_manifests=[a.jsonl]'")  # fmt: skip
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the newest complete checkpoint in train.output_dir, or from CHECKPOINT")  # fmt: skip
    parser.add_argument("--push_to_hub", metavar="REPO", help="push the final checkpoint to this Hub repo (user/name)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    return parser


def _ensure_demo_corpus(recipe: Any) -> None:
    """Build ./demo_corpus on the main process when the default recipe's manifests are missing."""
    manifests = [*recipe.data.train_manifests, *recipe.data.valid_manifests]
    if all(Path(m).is_file() for m in manifests):
        return
    from accelerate import PartialState

    from ..synthetic.corpus import make_demo_corpus

    state = PartialState()
    with state.main_process_first():  # the others then find it complete and reuse it
        if state.is_main_process:
            print(f"Building the demo corpus ({DEMO_CORPUS_MINUTES:g} min of synthetic speech) in ./{DEMO_CORPUS_DIR}")
        make_demo_corpus(DEMO_CORPUS_DIR, minutes=DEMO_CORPUS_MINUTES, seed=0, progress=state.is_main_process)


# glibc's malloc returns large freed blocks to the OS at once, so every training step maps fresh pages for its
# activations (millions of minor page faults). Keeping them costs peak RSS but made every system we measured
# about 1.5x faster on CPU (DESIGN.md §9; benchmarks/README.md). HF_SSL_SPEECH_MALLOC=default opts out.
TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=137438953472"


def tune_malloc_and_reexec() -> None:
    """Re-run this command with TUNED_MALLOC set (it must be in the environment before the process starts)."""
    if (
        sys.platform.startswith("linux")
        and "GLIBC_TUNABLES" not in os.environ
        and os.environ.get("HF_SSL_SPEECH_MALLOC", "tuned") != "default"
    ):
        os.environ["GLIBC_TUNABLES"] = TUNED_MALLOC
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """`hf-ssl-pretrain` / `scripts/pretrain.py`: parse, load the recipe, (demo corpus), pretrain, report."""
    if argv is None:  # a command, not a call from Python: the process is ours to restart
        tune_malloc_and_reexec()
    args = _parser().parse_args(argv)
    from .recipe import RecipeError, load_recipe

    overrides = list(args.overrides)
    if args.push_to_hub:
        overrides.append(f"train.push_to_hub={args.push_to_hub}")
    try:
        recipe = load_recipe(args.config, overrides, base=None if args.config else DEFAULT_RECIPE)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.config is None:
        _ensure_demo_corpus(recipe)

    from .loop import pretrain

    result = pretrain(recipe, resume=args.resume, progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        out = result.output_dir
        print(f"\nDone: {result.step} optimiser steps.")
        if result.checkpoint is not None:
            print(f"Checkpoint:   {result.checkpoint}   (model: {result.checkpoint / 'model'})")
        if result.plot is not None:
            print(f"Loss curves:  {result.plot}")
        if recipe.train.report_to == "tensorboard":
            print(f"TensorBoard:  tensorboard --logdir {out / 'tensorboard'}")
        if result.valid_metrics:
            print("Validation:   " + ", ".join(f"{k} {v:.4g}" for k, v in result.valid_metrics.items() if "loss" in k))
        if result.hub_url:
            print(f"Pushed:       {result.hub_url}")
        if result.checkpoint is not None:
            print(f"Load it:      import hf_ssl_speech; AutoModel.from_pretrained('{result.checkpoint / 'model'}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(pretrain_main())
