"""The experiment's report: one row per fine-tuning run, the Markdown tables and verdict, and the plots.

Pure functions of the stage results (`low_resource.stage_report` calls them), so a report can be redrawn from
the JSON without training anything.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import INITS, ROW_KEYS, ExperimentError

if TYPE_CHECKING:
    from .config import ExperimentConfig


def result_rows(pretrained: Mapping[str, Any], finetuned: Mapping[str, Any], scores: Mapping[str, Any]) -> list[dict]:
    """One row per fine-tuning run: ROW_KEYS plus architecture, pretraining budget and data counts."""
    rows = []
    for name, run in finetuned.items():
        family = pretrained.get(run["objective"], {})
        score = scores[name]
        rows.append(
            {
                "objective": run["objective"],
                "labeled_minutes": float(run["minutes"]),
                "init": run["init"],
                "wer": round(score["wer"], 4),
                "cer": round(score["cer"], 4),
                "steps": int(run["steps"]),
                "wall_s": float(run["wall_s"]),
                "architecture": run["architecture"],
                "learning_rate": run["learning_rate"],
                "run": name,
                "train_utterances": run["train_utterances"],
                "trainable_params": run["trainable_params"],
                "test_utterances": score["utterances"],
                "pretrain_steps": family.get("steps", 0),
                "pretrain_wall_s": family.get("wall_s", 0.0),
                "pretrain_audio_hours_seen": family.get("audio_hours_seen", 0.0),
            }
        )
    order = {init: i for i, init in enumerate(INITS)}
    families = list(pretrained)
    rows.sort(
        key=lambda r: (
            r["labeled_minutes"],
            families.index(r["objective"]) if r["objective"] in families else len(families),
            order[r["init"]],
            r["architecture"],
        )
    )
    return rows


def check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise if a row misses a `ROW_KEYS` field, has the wrong type, or an impossible value."""
    for index, row in enumerate(rows):
        for key, kind in ROW_KEYS.items():
            value = row.get(key)
            ok = (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                if kind is float
                else (isinstance(value, kind) and not isinstance(value, bool))
            )
            if not ok:
                raise ExperimentError(f"row {index}: {key}={value!r} is not a {kind.__name__}")
        if row["init"] not in INITS or row["wer"] < 0 or row["cer"] < 0 or row["steps"] < 1 or row["wall_s"] < 0:
            raise ExperimentError(f"row {index}: impossible values {dict(row)}")


def _pct(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _minutes_label(minutes: float) -> str:
    return f"{minutes / 60:g} h" if minutes >= 60 and minutes % 60 == 0 else f"{minutes:g} min"


def format_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def machine_description() -> dict[str, Any]:

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": device,
        "cpu": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def markdown_report(
    config: ExperimentConfig,
    corpus: Mapping[str, Any],
    pretrained: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    command: str,
    machine: Mapping[str, Any],
    total_wall_s: float | None,
    scores: Mapping[str, Any] | None = None,
) -> str:
    """low_resource.md: scale, the command, the machine, the corpus, the pretraining budget, the result tables.

    `scores` (evaluate stage results by run name) adds sample transcripts of the best pretrained run.
    """
    lines = [f"# Low-resource ASR: does self-supervised pretraining pay? ({config.name})", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    subsets = corpus["subsets"]
    lines += [
        "## Scale",
        "",
        f"- Unlabeled pretraining audio: **{corpus['pretrain_hours']:.2f} h** ({corpus['utterances']['pretrain']} "
        f"utterances, {corpus['train_speakers']} training speakers of {len(corpus['train_voices'])} voices, engines "
        f"{' + '.join(corpus['engines'])}).",
        "- Labeled subsets (nested, drawn from finetune.jsonl): "
        + ", ".join(_subset_phrase(s) for s in subsets.values())
        + ".",
        f"- Test split: {corpus['minutes']['test']:.1f} min, {corpus['utterances']['test']} utterances of "
        f"{corpus['test_speakers']} speakers from held-out voices {', '.join(corpus['test_voices'])} "
        "(none of them in pretraining or fine-tuning; asserted).",
        f"- Pretraining: {len(pretrained)} encoders, {config.pretrain.max_steps} steps each, the same model size "
        "and batch seconds for every objective.",
        f"- Machine: {machine['device']}, {machine['cores']} cores ({machine['cpu']}), torch {machine['torch']} "
        f"({machine['torch_threads']} torch threads), Python {machine['python']}.",
    ]
    if total_wall_s is not None:
        lines.append(
            f"- Wall time of corpus + pretraining + fine-tuning + evaluation: {format_duration(total_wall_s)} (the sum "
            "of every stage's and run's own time: restarts and waits between them not counted)."
        )
    lines += ["", "Made by:", "", "```bash", command, "```", ""]
    if config.budget_note:
        lines += ["Budget estimate (from the config):", "", config.budget_note.strip(), ""]

    lines += [
        "## Pretraining",
        "",
        "| objective | loss terms | architecture | encoder params | steps | batch s | audio h seen | wall | "
        "audio-s/s | final train loss | final valid loss |",
        "|" + "---|" * 11,
    ]
    for family, info in pretrained.items():
        train_loss = info["final_train"].get("loss")
        valid_loss = info["final_valid"].get("loss")
        lines.append(
            f"| {family} | {'+'.join(info['objectives'])} | {info['architecture']} | {info['encoder_params']:,} | "
            f"{info['steps']} | {info['batch_seconds']:g} | {info['audio_hours_seen']:.2f} | {format_duration(info['wall_s'])}"
            f" | {info['audio_seconds_per_s'] or ''} | {'' if train_loss is None else f'{train_loss:.4g}'} | "
            f"{'' if valid_loss is None else f'{valid_loss:.4g}'} |"
        )
    lines += ["", "![pretraining loss curves](pretraining_loss.png)", ""]

    lines += [
        "## Results on held-out voices",
        "",
        "WER/CER in % (greedy CTC, no language model) on the test split. `pretrained`: the whole model "
        "fine-tuned from the SSL encoder; `probe`: encoder frozen, only the CTC head trained; `scratch`: the "
        "same architecture from random weights. Every run of a subset has the same steps and no model "
        "selection (the test split is only used here).",
        "",
    ]
    lines += _verdict(rows, pretrained)
    lines += _pivot_table(rows, pretrained, "wer")
    lines += [
        "",
        "### CER",
        "",
        "Character error rate of the same runs: it moves before WER does (a word counts as right"
        " only when all its characters are).",
        "",
    ]
    lines += _pivot_table(rows, pretrained, "cer")
    lines += [
        "",
        "![WER vs labeled minutes](wer_vs_labeled_minutes.png)",
        "",
        "![CER vs labeled minutes](cer_vs_labeled_minutes.png)",
        "",
        "### Every run",
        "",
        "| objective | architecture | init | labeled | WER (%) | CER (%) | steps | peak lr | fine-tune wall | "
        "pretrain steps | pretrain wall |",
        "|" + "---|" * 11,
    ]
    for row in rows:
        lines.append(
            f"| {row['objective']} | {row['architecture']} | {row['init']} | {_minutes_label(row['labeled_minutes'])}"
            f" | {_pct(row['wer'])} | {_pct(row['cer'])} | {row['steps']} | {row['learning_rate']:g} | "
            f"{format_duration(row['wall_s'])} | "
            f"{row['pretrain_steps'] or '-'} | {format_duration(row['pretrain_wall_s']) if row['pretrain_steps'] else '-'} |"
        )
    lines += _sample_transcripts(rows, scores or {})
    lines += [
        "",
        "Raw numbers: `low_resource.json` (WER/CER as fractions). Each fine-tuning run's folder holds "
        "its model, processor and loss curve; `done.json` markers let the command resume.",
        "",
    ]
    return "\n".join(lines)


def _sample_transcripts(rows: Sequence[Mapping[str, Any]], scores: Mapping[str, Any]) -> list[str]:
    """The first test utterances as transcribed by the best pretrained run (largest subset), its probe and scratch."""
    largest = max((r["labeled_minutes"] for r in rows), default=None)
    pretrained = [r for r in rows if r["labeled_minutes"] == largest and r["init"] == "pretrained"]
    if not pretrained:
        return []
    best = min(pretrained, key=lambda r: r["wer"])
    chosen = [best] + [
        r
        for r in rows
        if r["labeled_minutes"] == largest
        and (
            (r["init"] == "probe" and r["objective"] == best["objective"])
            or (r["init"] == "scratch" and r["architecture"] == best["architecture"])
        )
    ]
    examples = {r["run"]: scores.get(r["run"], {}).get("examples", []) for r in chosen}
    count = min((len(e) for e in examples.values()), default=0)
    if count == 0:
        return []
    lines = ["", f"### Sample transcripts ({best['objective']}, {_minutes_label(largest)} labeled)", ""]
    for index in range(count):
        lines.append(f"- reference: `{examples[best['run']][index]['reference']}`")
        for row in chosen:
            hypothesis = examples[row["run"]][index]["hypothesis"]
            lines.append(f"  - {row['init']}: " + (f"`{hypothesis}`" if hypothesis else "(nothing)"))
    return lines


def _subset_phrase(subset: Mapping[str, Any]) -> str:
    return (
        f"{subset['nominal_minutes']:g} min = {subset['minutes']:.1f} min / {subset['utterances']} utterances / "
        f"{subset['speakers']} speakers"
    )


def _matching_scratch(rows: Sequence[Mapping[str, Any]], architecture: str, minutes: float) -> Mapping | None:
    """The scratch baseline of an objective's architecture on one subset."""
    return next(
        (
            r
            for r in rows
            if r["init"] == "scratch" and r["labeled_minutes"] == minutes and r["architecture"].startswith(architecture)
        ),
        None,
    )


def relative_change(row: Mapping[str, Any], baseline: Mapping[str, Any], metric: str) -> float | None:
    """(row - baseline) / baseline of `metric` ("wer" or "cer"): -0.4 is the 40% reduction issue 7 asks for."""
    return (row[metric] - baseline[metric]) / baseline[metric] if baseline[metric] > 0 else None


def best_change(
    rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], minutes: float, metric: str
) -> tuple[str, float] | None:
    """(objective, relative change) of the fine-tuned pretrained run that beats its scratch baseline most."""
    changes = []
    for family, info in pretrained.items():
        row = next(
            (
                r
                for r in rows
                if r["objective"] == family and r["init"] == "pretrained" and r["labeled_minutes"] == minutes
            ),
            None,
        )
        scratch = _matching_scratch(rows, info["architecture"], minutes)
        change = relative_change(row, scratch, metric) if row and scratch else None
        if change is not None:
            changes.append((family, change))
    return min(changes, key=lambda item: item[1]) if changes else None


def _verdict(rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any]) -> list[str]:
    """One sentence per metric on the fewest labels: the best objective's change against scratch."""
    if not rows:
        return []
    fewest = min(r["labeled_minutes"] for r in rows)
    parts = []
    for metric in ("wer", "cer"):
        best = best_change(rows, pretrained, fewest, metric)
        if best is not None:
            parts.append(f"{metric.upper()} {100 * best[1]:+.0f}% ({best[0]})")
    if not parts:
        return []
    return [
        f"Best fine-tuned objective against scratch with {_minutes_label(fewest)} of labels: "
        + ", ".join(parts)
        + " (relative change; negative is better).",
        "",
    ]


def _pivot_table(rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], metric: str = "wer") -> list[str]:
    """Per objective and subset: `metric` of pretrained / probe / scratch of the same architecture, and the change."""
    minutes = sorted({r["labeled_minutes"] for r in rows})
    by_key = {(r["objective"], r["init"], r["labeled_minutes"], r["architecture"]): r for r in rows}
    header = "| objective |" + "".join(
        f" {metric.upper()} {_minutes_label(m)} pretrained | probe | scratch | rel. change |" for m in minutes
    )
    lines = [header, "|---|" + "---|---|---|---|" * len(minutes)]
    for family, info in pretrained.items():
        cells = [family]
        for m in minutes:
            pre = by_key.get((family, "pretrained", m, info["architecture"]))
            probe = by_key.get((family, "probe", m, info["architecture"]))
            scratch = _matching_scratch(rows, info["architecture"], m)
            change = relative_change(pre, scratch, metric) if pre and scratch else None
            cells += [
                _pct(pre[metric]) if pre else "",
                _pct(probe[metric]) if probe else "",
                _pct(scratch[metric]) if scratch else "",
                "" if change is None else f"{100 * change:+.0f}%",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_error_curves(
    rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], path: Path, metric: str
) -> Path:
    """One panel per objective: `metric` (WER or CER) vs labeled minutes for pretrained, probe and the matching
    scratch baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(pretrained)
    cols = min(3, len(families))
    nrows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    styles = {"pretrained": ("o-", "tab:blue"), "probe": ("s--", "tab:green"), "scratch": ("^:", "tab:red")}
    for ax, family in zip(axes.flat, families):
        arch = pretrained[family]["architecture"]
        for init, (style, color) in styles.items():
            points = sorted(
                (r["labeled_minutes"], 100 * r[metric])
                for r in rows
                if r["init"] == init
                and (r["objective"] == family if init != "scratch" else r["architecture"].startswith(arch))
            )
            if points:
                ax.plot(*zip(*points), style, color=color, label=init if init != "scratch" else f"scratch ({arch})")
        ax.set_xscale("log")
        ticks = sorted({r["labeled_minutes"] for r in rows})
        ax.set_xticks(ticks, [_minutes_label(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(family)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{metric.upper()} (%) on held-out voices")
    for ax in axes[-1, :]:
        ax.set_xlabel("labeled audio")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pretraining_losses(pretrained: Mapping[str, Any], path: Path) -> Path:
    """One panel per family: the train loss (and valid loss points) against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(pretrained)
    cols = min(3, len(families))
    nrows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, family in zip(axes.flat, families):
        history = pretrained[family]["history"]
        for split, style in (("train", "-"), ("valid", "o--")):
            points = [
                (row["step"], row[f"{split}/loss"])
                for row in history
                if math.isfinite(row.get(f"{split}/loss", float("nan")))
            ]
            if points:
                ax.plot(*zip(*points), style, markersize=3, label=f"{split} loss")
        ax.set_title(f"{family} ({'+'.join(pretrained[family]['objectives'])})", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
