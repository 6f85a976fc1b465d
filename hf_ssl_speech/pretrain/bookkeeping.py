"""Loss normalisation across processes, the non-finite guard, metric logging and the loss-curve plot."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..targets import codebook_usage


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

    def update(
        self,
        sums: Mapping[str, Any],
        counts: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
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
        return {
            "sums": dict(self.sums),
            "counts": dict(self.counts),
            "metric_sums": dict(self.metric_sums),
            "metric_steps": self.metric_steps,
            "weights": dict(self.weights),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
        self.metric_sums, self.metric_steps = dict(state["metric_sums"]), int(state["metric_steps"])
        self.weights = dict(state.get("weights", {}))


class CodeUsage:
    """This process's code histograms (`out.code_counts`: objective -> (books, codes)) since the last log line.

    `compute` sums them over processes and reports, per codebook, the coverage (fraction of codes used), the
    entropy (nats) and the perplexity of the whole interval: `<objective>_codebook<k>_{coverage,entropy,perplexity}`.
    Every process must call it at the same step (it all-reduces); the histograms are per-rank resume state.
    """

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}

    def update(self, code_counts: Mapping[str, torch.Tensor] | None) -> None:
        for name, histogram in (code_counts or {}).items():
            histogram = histogram.detach().double()  # exact counts however long the logging interval
            self.counts[name] = histogram if name not in self.counts else self.counts[name].to(histogram) + histogram

    def compute(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in sorted(self.counts):
            total = reduce_sum(self.counts[name].clone()) if reduce_sum is not None else self.counts[name]
            for stat, values in codebook_usage(total).items():
                for book, value in enumerate(values.tolist()):
                    out[f"{name}_codebook{book}_{stat}"] = value
        return out

    def reset(self) -> None:
        self.counts.clear()

    def state_dict(self) -> dict[str, Any]:
        return {name: histogram.cpu() for name, histogram in self.counts.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = {name: torch.as_tensor(histogram).double() for name, histogram in state.items()}


# ---------------------------------------------------------------------------------------------- non-finite guard
class NonFiniteLossError(UserError, RuntimeError):
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
