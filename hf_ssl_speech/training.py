"""Helpers of the pretraining loop: optimiser and schedules, loss normalisation across processes,
checkpoints, the non-finite guard, metric logging and the loss-curve plot.

Each piece is small and testable on its own; `pretrain_loop.py` strings them together.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- optimiser
# Parameters that are scales, offsets or free embeddings: weight decay would pull them towards 0, which for
# a norm's scale means towards a dead layer. Matched on the parameter name's last component.
NO_DECAY_NAMES = ("bias", "pos_bias_u", "pos_bias_v", "masked_spec_embed", "mask_embedding", "codevectors")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices and conv kernels decay; norms, biases and embeddings (and any 1-d tensor) don't."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name.lower() or ".bn." in name or "batch_norm" in name
        (no_decay if param.ndim <= 1 or last in NO_DECAY_NAMES or is_norm else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`; arguments come from the recipe's `optim` section."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


# ---------------------------------------------------------------------------------------------- schedules
def noam_factor(step: int, d_model: int, warmup_steps: int, min_factor: float = 0.0) -> float:
    """NeMo's NoamAnnealing multiplier: d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).

    It rises linearly to d_model^-0.5 * warmup^-0.5 at `warmup_steps`, then decays as step^-0.5. `lr` in a
    NeMo recipe is multiplied by this (lr 5.0, d_model 512, warmup 25k -> peak 1.4e-3). After warmup the
    multiplier is floored at `min_factor` (= min_lr / lr). Step 0 counts as step 1 so the first update is not
    taken with a zero learning rate.
    """
    step = max(step, 1)
    if warmup_steps > 0:
        factor = d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)
    else:
        factor = d_model**-0.5 * step**-0.5
    return max(factor, min_factor) if step > warmup_steps else factor


# transformers.get_scheduler names for the recipe's schedulers (all with linear warmup).
HF_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    max_steps: int,
    d_model: int,
    lr: float,
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's LR schedule, stepped once per optimiser step.

    Args:
        name: `optim.scheduler`: "noam" (NeMo NoamAnnealing) or one of `HF_SCHEDULERS`.
        warmup_steps, lr, min_lr: from the `optim` section; max_steps from `train`; d_model = model hidden_size.
    """
    if name == "noam":
        min_factor = min_lr / lr
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: noam_factor(step, d_model, warmup_steps, min_factor)
        )
    if name not in HF_SCHEDULERS:
        raise ValueError(f"optim.scheduler={name!r} is unknown: expected 'noam' or one of {tuple(HF_SCHEDULERS)}.")
    from transformers import get_scheduler

    return get_scheduler(HF_SCHEDULERS[name], optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def gumbel_temperature(step: int, start: float, end: float, decay: float) -> float:
    """wav2vec 2.0's Gumbel-softmax temperature: max(end, start * decay^step) (2 -> 0.5, decay 0.999995)."""
    return max(end, start * decay**step)


# ---------------------------------------------------------------------------------------------- loss normalisation
def global_totals(
    values: Mapping[str, torch.Tensor | float], reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Sum named scalars (per-objective loss sums, target counts, correct counts...) over processes in ONE
    all-reduce; returns float64 scalars (exact for counts up to 2^53). `reduce_sum=None` means one process.

    Args:
        values: e.g. {"count/bestrq": out.loss_counts["bestrq"], "sum/bestrq": out.loss_sums["bestrq"].detach()}.
        reduce_sum: sums a tensor over processes, e.g. `lambda t: accelerator.reduce(t, "sum")`.
    """
    names = sorted(values)
    if not names:
        return {}
    local = torch.stack([torch.as_tensor(values[n]).detach().to(torch.float64).reshape(()).cpu() for n in names])
    total = reduce_sum(local.clone()) if reduce_sum is not None else local
    return {n: total[i].cpu() for i, n in enumerate(names)}


def reduce_counts(counts: Mapping[str, torch.Tensor], reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """All-reduce (sum) the per-objective target counts of this micro-batch over processes, in one collective."""
    return global_totals(counts, reduce_sum)


def backward_loss(
    sums: Mapping[str, torch.Tensor],
    global_counts: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    num_processes: int,
    grad_accum: int,
) -> torch.Tensor:
    """The scalar to call `backward` on, so that the gradients equal those of the global-count-normalised loss.

    The loss of one optimiser step is L = (1/A) * sum_a sum_o w_o * S_{o,a} / G_{o,a}, where S_{o,a} is objective
    o's loss sum over the whole global micro-batch a (all processes) and G_{o,a} its global target count. Each
    process only holds its share S_{o,a,p} of the sum, so it back-propagates

        l_p = num_processes / A * sum_o w_o * S_{o,a,p} / G_{o,a}

    DDP (and FSDP, DeepSpeed) *average* the gradients over processes, so the factor `num_processes` turns that
    average back into the sum over p, which is exactly dL. Dividing by the global count rather than the local one
    is what makes two processes with half the batch each give the same gradient as one process with all of it,
    whatever the split of masked frames between them.

    Why not one count over the whole accumulation window: the count is only known after the forward pass
    (masks are drawn inside the model), and several objectives with different counts cannot share one
    post-hoc rescaling of the gradient. Each micro-batch is therefore normalised by its own global count and
    the A micro-batches are averaged; with equal micro-batches this is the same thing.
    """
    total = None
    for name, value in sums.items():
        count = global_counts[name].to(device=value.device, dtype=value.dtype).clamp_min(1.0)
        term = weights.get(name, 1.0) * value / count
        total = term if total is None else total + term
    if total is None:
        raise ValueError("backward_loss got no objective sums: is any objective active at this step?")
    return total * (num_processes / grad_accum)


class LossTracker:
    """Accumulates GLOBAL (already all-reduced) per-objective sums, counts and metrics between two log lines.

    The reported loss of an objective is sum/count over everything seen, so it does not depend on the number
    of processes or on how the targets fell into batches. A metric named `<objective>_correct` is a count of
    correct predictions and becomes `<objective>_accuracy` = correct / count; other metrics are averaged.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.metric_sums: dict[str, float] = {}
        self.metric_steps = 0
        self.weights: dict[str, float] = {}

    def update(self, sums: Mapping[str, Any], counts: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
               weights: Mapping[str, float] | None = None) -> None:  # fmt: skip
        """Add one micro-batch: sums[o], counts[o] (global), metrics: name -> global mean or `_correct` sum."""
        for name in sums:
            self.sums[name] = self.sums.get(name, 0.0) + float(sums[name])
            self.counts[name] = self.counts.get(name, 0.0) + float(counts[name])
        if weights:
            self.weights = dict(weights)
        for key, value in (metrics or {}).items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + float(value)
        self.metric_steps += 1

    def compute(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """{"loss": sum_o w_o * loss_o, "loss/<objective>": sum/count, "<objective>_accuracy", other means}."""
        if not self.sums:
            return {}
        weights = dict(weights or self.weights)
        out: dict[str, float] = {}
        for name in sorted(self.sums):
            out[f"loss/{name}"] = self.sums[name] / max(self.counts[name], 1.0)
        out["loss"] = sum(weights.get(name, 1.0) * out[f"loss/{name}"] for name in self.sums)
        for key, total in sorted(self.metric_sums.items()):
            if key.endswith("_correct") and key[: -len("_correct")] in self.counts:
                objective = key[: -len("_correct")]
                out[f"{objective}_accuracy"] = total / max(self.counts[objective], 1.0)
            elif not (key.endswith("_accuracy") and f"{key[: -len('_accuracy')]}_correct" in self.metric_sums):
                out[key] = total / max(self.metric_steps, 1)
        return out

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.metric_sums.clear()
        self.metric_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "metric_sums": dict(self.metric_sums),
                "metric_steps": self.metric_steps, "weights": dict(self.weights)}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
        self.metric_sums, self.metric_steps = dict(state["metric_sums"]), int(state["metric_steps"])
        self.weights = dict(state.get("weights", {}))


# ---------------------------------------------------------------------------------------------- non-finite guard
class NonFiniteLossError(RuntimeError):
    """Raised when too many optimiser steps in a row produced a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Skips optimiser steps whose loss or gradient norm is NaN/inf, warns, counts, and stops a diverged run.

    Call `ok(value)` with a number that is identical on all processes (the globally reduced loss or the
    clipped grad norm) so every process takes the same decision and DDP stays in step.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def ok(self, value: float | torch.Tensor, step: int, what: str = "loss") -> bool:
        value = float(value)
        if math.isfinite(value):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        warnings.warn(
            f"Step {step}: non-finite {what} ({value}); skipping the update "
            f"({self.consecutive} in a row, {self.total_skipped} in total).",
            RuntimeWarning,
            stacklevel=2,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite {what}. The run has "
                "diverged: lower optim.lr, raise optim.warmup_steps, keep train.mixed_precision=no or bf16, or "
                "resume from an earlier checkpoint. Raise train.max_nonfinite to tolerate longer streaks."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))


# ---------------------------------------------------------------------------------------------- metrics
class MetricsLogger:
    """Sends scalars to the accelerate trackers (TensorBoard) and keeps the history for the loss-curve PNG.

    Args:
        log_fn: `accelerator.log` (called on every process; accelerate only writes on the main one) or None.
    """

    def __init__(self, log_fn: Callable[..., None] | None = None) -> None:
        self.log_fn = log_fn
        self.history: list[dict[str, float]] = []

    def log(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        scalars = {f"{split}/{k}": float(v) for k, v in metrics.items()}
        self.history.append({"step": step, **scalars})
        if self.log_fn is not None:
            self.log_fn(scalars, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))

    def plot(self, path: str | Path, title: str = "pretraining") -> Path | None:
        """Draw train/valid loss per objective (log scale) and the LR to `path` (PNG). None if nothing to draw."""
        return plot_history(self.history, path, title)


def plot_history(history: Iterable[Mapping[str, float]], path: str | Path, title: str = "pretraining") -> Path | None:
    """Loss curves from a metrics history: one line per `<split>/loss*` key, LR on a second panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in history:
        for key, value in row.items():
            if key == "step" or not math.isfinite(value):
                continue
            if "loss" in key or key.endswith("/lr"):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(value)
    losses = {k: v for k, v in series.items() if "loss" in k}
    for split in {k.split("/", 1)[0] for k in losses}:
        # With one objective the total is the same curve: draw it once.
        if len([k for k in losses if k.startswith(f"{split}/loss/")]) == 1:
            losses.pop(f"{split}/loss", None)
    if not losses:
        return None
    lr = {k: v for k, v in series.items() if k.endswith("/lr")}
    fig, axes = plt.subplots(2 if lr else 1, 1, figsize=(8, 7 if lr else 4.5), squeeze=False, sharex=True)
    ax = axes[0, 0]
    for key in sorted(losses):
        steps, values = losses[key]
        style = "--" if key.startswith("valid/") else "-"
        marker = "o" if key.startswith("valid/") else None
        ax.plot(steps, values, style, marker=marker, markersize=3, label=key, linewidth=1.2)
    if all(v > 0 for _, values in losses.values() for v in values):
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if lr:
        for key, (steps, values) in lr.items():
            axes[1, 0].plot(steps, values, label=key)
        axes[1, 0].set_ylabel("learning rate")
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimiser step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointManager:
    """Complete-or-absent checkpoints under `<output_dir>/checkpoints/checkpoint-<step>/`.

    A checkpoint folder holds
      - `model/`: `save_pretrained` of the model and the feature extractor (loadable with `from_pretrained`),
      - `accelerate/`: `accelerator.save_state` (weights, optimiser, scheduler, GradScaler, RNG of every process),
      - `rank_<i>.pt`: what each process needs beyond that (mask generator state, its data position),
      - `trainer_state.json`: step, data position, metric history, guard counters; written last.
    Everything is written into `.tmp-checkpoint-<step>` and renamed when complete: a crash or kill while writing
    leaves a `.tmp-*` folder that `latest()` ignores (and the next save removes), and the previous checkpoint
    intact. Only the newest `keep_last` complete checkpoints are kept.
    """

    def __init__(self, output_dir: str | Path, keep_last: int = 3) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"checkpoint-{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = CHECKPOINT_RE.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    def save(
        self,
        step: int,
        accelerator: Any,
        model: nn.Module,
        trainer_state: Mapping[str, Any],
        rank_state: Mapping[str, Any] | None = None,
        feature_extractor: Any = None,
        before_rename: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint `step` from every process (all must call this); returns its final path.

        Args:
            accelerator: the run's `Accelerator` (its prepared model/optimiser/scheduler are saved).
            model: the prepared model (unwrapped here for `save_pretrained`).
            trainer_state: JSON-able dict from the main process (step, data position, history, ...).
            rank_state: this process's own state (torch-saveable), stored as `rank_<i>.pt`.
            feature_extractor: saved next to the model so the folder is a complete `from_pretrained` source.
            before_rename: called on the main process with the temporary folder just before the rename
                (the loop draws the loss-curve PNG there; tests use it to simulate a crash mid-write).
        """
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-checkpoint-*"):  # leftovers of an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))
        torch.save(dict(rank_state or {}), tmp / f"rank_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(tmp / "model")
            if feature_extractor is not None:
                feature_extractor.save_pretrained(tmp / "model")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if before_rename is not None:
                before_rename(tmp)
            _write_json_atomic(tmp / STATE_FILE, {"step": step, "saved_at": time.time(), **trainer_state})
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: str | Path, accelerator: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the accelerate state from checkpoint `path`; returns (trainer_state, this rank's state)."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pick another one.")
        accelerator.load_state(str(path / "accelerate"))
        rank_file = path / f"rank_{accelerator.process_index}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{rank_file} is missing: the checkpoint was written by fewer processes than this run has "
                f"({accelerator.num_processes}). Resume with the same number of processes."
            )
        rank_state = torch.load(rank_file, weights_only=False)
        return json.loads(state_file.read_text()), rank_state


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "CheckpointManager",
    "LossTracker",
    "MetricsLogger",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "backward_loss",
    "build_optimizer",
    "build_scheduler",
    "global_totals",
    "gumbel_temperature",
    "noam_factor",
    "param_groups",
    "plot_history",
    "reduce_counts",
]
