"""`hf-ssl-pretrain` (= `scripts/pretrain.py`):

    accelerate launch scripts/pretrain.py --config configs/pretrain/<recipe>.yaml [section.key=value ...]
        [--resume [CHECKPOINT]] [--push_to_hub REPO] [--debug]

With no `--config` it runs the packaged tiny NEST recipe (`hf_ssl_speech/presets/recipes/tiny_nest.yaml`, the
same file as configs/pretrain/tiny_nest.yaml, so it works from any folder): it builds the demo corpus in
`./demo_corpus` if it is missing, pretrains for a few CPU minutes and prints where the checkpoint and the
loss-curve plot are (`<train.output_dir>/model` always links to the newest checkpoint's model). A bad recipe, a missing manifest or an output folder that holds another run ends the
command with one `error:` line and exit status 2 (`--debug` shows the traceback). SIGTERM, SIGUSR1 or SIGINT
end it after the current optimiser step with a checkpoint and exit status 75 (`PREEMPTED_EXIT_CODE`; a second
signal stops at once); `--resume` continues.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import run_command
from ..preemption import PREEMPTED_EXIT_CODE, preempted_message
from .recipe import DEFAULT_RECIPE, Recipe, check_recipe_paths, load_recipe

if TYPE_CHECKING:
    from .loop import PretrainResult


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-ssl-pretrain",
        description="Self-supervised pretraining of a Conformer / FastConformer speech encoder from a YAML recipe. "
        f"Without --config: a few CPU minutes of the packaged {DEFAULT_RECIPE} recipe on a generated corpus.",
        epilog="Examples:\n  accelerate launch scripts/pretrain.py --config configs/pretrain/nest_fastconformer.yaml "
        "train.max_steps=1000 optim.lr=2e-3\n  hf-ssl-pretrain --config configs/pretrain/tiny_apc.yaml --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        help=f"recipe YAML (configs/pretrain/<name>.yaml) or a packaged recipe's name; default: {DEFAULT_RECIPE}",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="recipe overrides, e.g. train.max_steps=100 optim.lr=1e-3 'data.train_manifests=[a.jsonl]'",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint in train.output_dir, or from CHECKPOINT",
    )
    parser.add_argument("--push_to_hub", metavar="REPO", help="push the final checkpoint to this Hub repo (user/name)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    return parser


def main(argv: list[str]) -> int:
    """Parse, load the recipe, (make the demo corpus), check its paths, pretrain, report."""
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.max_steps=600`: argparse gives --resume the override as its CHECKPOINT value.
        overrides.insert(0, args.resume)
        args.resume = True
    if args.push_to_hub:
        overrides.append(f"train.push_to_hub={args.push_to_hub}")
    recipe = load_recipe(args.config or DEFAULT_RECIPE, overrides)
    if args.config is None:
        from ..synthetic.corpus import ensure_demo_corpus

        ensure_demo_corpus()
    # Before any model is built: a missing manifest is one clear line. With --resume, setup checks model.init_from
    # only if no checkpoint is found (a checkpoint holds every weight: the source may be gone).
    check_recipe_paths(recipe, source_needed=args.resume is False)

    from accelerate import PartialState

    from .loop import pretrain

    result = pretrain(recipe, resume=args.resume, progress=not args.no_progress)
    if PartialState().is_main_process:
        _report(result, recipe)
    return PREEMPTED_EXIT_CODE if result.stopped_by not in (None, "max_minutes") else 0


def _report(result: PretrainResult, recipe: Recipe) -> None:
    """The summary: first how the run ended (a time cap or a signal is said first), then where things are."""
    t = recipe.train
    model = result.output_dir / "model"  # the stable link to the newest checkpoint's model
    if result.stopped_by == "max_minutes":
        print(
            f"\nStopped by train.max_minutes={t.max_minutes} after {result.step} of {t.max_steps} optimiser steps "
            f"in {result.output_dir}: continue with the same command and --resume (or raise train.max_minutes)."
        )
    elif result.stopped_by is not None:
        print("\n" + preempted_message(result.step, result.checkpoint, result.stopped_by))
    else:
        print(f"\nDone: {result.step} optimiser steps in {result.output_dir}.")
    if result.checkpoint is not None:
        print(f"Checkpoint:   {result.checkpoint}   (model: {model} -> {result.checkpoint / 'model'})")
    if result.plot is not None:
        print(f"Loss curves:  {result.plot}")
    if t.report_to == "tensorboard":
        print(f"TensorBoard:  tensorboard --logdir {result.output_dir / 'tensorboard'}")
    if result.valid_metrics:
        print("Validation:   " + ", ".join(f"{k} {v:.4g}" for k, v in result.valid_metrics.items() if "loss" in k))
    print(f"Data:         {result.data_summary}")
    if result.hub_url:
        print(f"Pushed:       {result.hub_url}")
    if result.checkpoint is not None:
        where = model if model.is_dir() else result.checkpoint / "model"
        print(f"Load it:      import hf_ssl_speech; AutoModel.from_pretrained('{where}')")


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """`hf-ssl-pretrain` / `scripts/pretrain.py`; returns the exit status (2 for a user error)."""
    return run_command(main, argv)


if __name__ == "__main__":
    raise SystemExit(pretrain_main())
