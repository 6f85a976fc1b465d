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

from .config import ARMS, HEADS, INITS, ROW_KEYS, ExperimentError

if TYPE_CHECKING:
    from .config import ExperimentConfig


def result_rows(pretrained: Mapping[str, Any], finetuned: Mapping[str, Any], scores: Mapping[str, Any]) -> list[dict]:
    """One row per kept fine-tuning run (the one validation chose per group): ROW_KEYS plus the pretraining key,
    architecture, validation figures, LM weights, throughput and data counts."""
    rows = []
    for name, run in finetuned.items():
        family = pretrained.get(run["key"], {})
        score = scores[name]
        rows.append(
            {
                "arm": run["arm"],
                "objective": run["objective"],
                "labeled_minutes": float(run["minutes"]),
                "init": run["init"],
                "head": "ctc",
                "predictor": None,
                "wer": round(score["wer"], 4),
                "cer": round(score["cer"], 4),
                "wer_lm": round(score.get("wer_lm", float("nan")), 4),
                "cer_lm": round(score.get("cer_lm", float("nan")), 4),
                "steps": int(run["steps"]),
                "wall_s": float(run["wall_s"]),
                "key": run["key"] if run["init"] != "scratch" else "none",
                "architecture": run["architecture"],
                "learning_rate": run["learning_rate"],
                "best_step": run.get("best_step"),
                "max_steps": run.get("max_steps"),
                "last_eval_step": run.get("last_eval_step"),
                "stopped_early": bool(run.get("stopped_early", False)),
                "masking": run.get("masking"),
                "head_only_steps": run.get("head_only_steps"),
                # where `finetune.patience_start` set it: evaluations up to this step did not count to the patience
                **({"patience_start_step": run["patience_start_step"]} if "patience_start_step" in run else {}),
                "lr_scheduler": run.get("lr_scheduler"),
                "valid_cer": run.get("valid_cer"),
                "valid_wer_greedy": score.get("valid", {}).get("wer"),
                "lm_alpha": score.get("lm_alpha"),
                "lm_beta": score.get("lm_beta"),
                "audio_seconds_per_s": run.get("audio_seconds_per_s"),
                "flop_utilisation": run.get("flop_utilisation"),
                "run": name,
                "repeat": int(run.get("repeat", 0)),  # > 0: a seed repeat (`finetune.seeds`), not a kept choice
                "model": run["model"],
                "train_utterances": run["train_utterances"],
                "trainable_params": run["trainable_params"],
                "test_utterances": score["utterances"],
                # < 1: an encoder kept part-way through its pretraining run (the compute curve)
                "pretrain_fraction": float(run.get("pretrain_fraction", 1.0)) if run["init"] != "scratch" else 0.0,
                "pretrain_steps": round(family.get("steps", 0) * run.get("pretrain_fraction", 1.0)),
                "pretrain_wall_s": round(family.get("wall_s", 0.0) * run.get("pretrain_fraction", 1.0), 1),
                "pretrain_audio_hours_seen": round(
                    family.get("audio_hours_seen", 0.0) * run.get("pretrain_fraction", 1.0), 3
                ),
            }
        )
    order = {init: i for i, init in enumerate(INITS)}
    keys = list(pretrained)
    rows.sort(
        key=lambda r: (
            r["labeled_minutes"],
            r["pretrain_fraction"],
            keys.index(r["key"]) if r["key"] in keys else len(keys),
            order[r["init"]],
            r["architecture"],
        )
    )
    return rows


def transducer_rows(pretrained: Mapping[str, Any], transducer: Mapping[str, Any]) -> list[dict]:
    """One row per kept TDT run (`experiments.transducers`), with the CTC rows' fields: `head` "tdt", `predictor`
    scratch | text, `init` the encoder's start, no LM (`wer_lm`/`cer_lm` None)."""
    rows = []
    for name in transducer.get("chosen", []):
        run, score = transducer["runs"][name], transducer["scores"][name]
        family = pretrained.get(run["key"], {})
        pretrained_encoder = run["encoder"] == "pretrained"
        rows.append(
            {
                "arm": "standard",
                "objective": run["key"] if pretrained_encoder else "none",
                "labeled_minutes": float(run["minutes"]),
                "init": run["encoder"],
                "head": "tdt",
                "predictor": run["predictor"],
                "wer": round(score["wer"], 4),
                "cer": round(score["cer"], 4),
                "wer_lm": None,
                "cer_lm": None,
                "steps": int(run["steps"]),
                "wall_s": float(run["wall_s"]),
                "key": run["key"],
                "architecture": family.get("architecture", ""),
                "learning_rate": run["learning_rate"],
                "best_step": run.get("best_step"),
                "max_steps": run.get("max_steps"),
                "last_eval_step": run.get("last_eval_step"),
                "stopped_early": bool(run.get("stopped_early", False)),
                "masking": "default",  # SpecAugment's defaults (finetune.spec_augment): no masking grid for TDT
                "head_only_steps": 0,
                **({"patience_start_step": run["patience_start_step"]} if "patience_start_step" in run else {}),
                "lr_scheduler": run.get("lr_scheduler"),
                "valid_cer": run.get("valid_cer"),
                "valid_wer_greedy": score.get("valid", {}).get("wer"),
                "run": name,
                "model": run["model"],
                "train_utterances": run["train_utterances"],
                "trainable_params": run["trainable_params"],
                "vocabulary": run.get("vocabulary"),
                "test_utterances": score["utterances"],
                "pretrain_fraction": 1.0 if pretrained_encoder else 0.0,
                "pretrain_steps": family.get("steps", 0) if pretrained_encoder else 0,
                "pretrain_wall_s": family.get("wall_s", 0.0) if pretrained_encoder else 0.0,
                "pretrain_audio_hours_seen": family.get("audio_hours_seen", 0.0) if pretrained_encoder else 0.0,
            }
        )
    order = {"pretrained": 0, "scratch": 1}
    rows.sort(key=lambda r: (r["labeled_minutes"], order[r["init"]], r["predictor"]))
    return rows


def transducer_table(rows: Sequence[Mapping[str, Any]], predictor: Mapping[str, Any] | None) -> list[str]:
    """The TDT rows beside the CTC rows of the same subsets and encoder starts (greedy; CTC also with the LM)."""
    tdt = [r for r in rows if r["head"] == "tdt"]
    if not tdt:
        return []
    lines = ["## Transducers (TDT) beside CTC", ""]
    if predictor:
        lines += [
            f"Prediction network `text`: pretrained as a next-token model on the LM sentences "
            f"({predictor.get('train_sentences')} sentences, {predictor.get('steps')} steps; held-out perplexity "
            f"{predictor.get('perplexity', float('nan')):.1f} vs {predictor.get('unigram_perplexity', float('nan')):.1f}"
            f" for a unigram model); one tokenizer ({predictor.get('vocabulary')} BPE tokens, trained on the same "
            "text) for every TDT arm. TDT decoding is greedy, without the LM. Encoder `pretrained`: the family "
            "validation chose; CTC rows of the same encoder start for comparison.",
            "",
        ]
    lines += [
        "| labeled | head | encoder | predictor | CER | WER | CER LM | WER LM | valid CER | lr | best step / steps | "
        "fine-tune wall |",
        "|" + "---|" * 12,
    ]
    objectives = {r["objective"] for r in tdt if r["init"] == "pretrained"}
    ctc = [
        r
        for r in rows
        if r["head"] == "ctc" and r["arm"] == "standard" and (r["init"] == "scratch" or r["objective"] in objectives)
    ]
    for minutes in sorted({r["labeled_minutes"] for r in tdt}):
        for row in [r for r in ctc + tdt if r["labeled_minutes"] == minutes]:
            if row["head"] == "ctc" and row["init"] == "probe":
                continue
            encoder = row["objective"] if row["init"] == "pretrained" else "scratch"
            lines.append(
                f"| {_minutes_label(minutes)} | {row['head']} | {encoder} | {row.get('predictor') or ''} | "
                f"{_pct(row['cer'])} | {_pct(row['wer'])} | {_pct(row['cer_lm'])} | {_pct(row['wer_lm'])} | "
                f"{_pct(row.get('valid_cer'))} | {row['learning_rate']:g} | {row.get('best_step')} / {row['steps']} | "
                f"{format_duration(row['wall_s'])} |"
            )
    return lines + [""]


def selection_rows(runs: Mapping[str, Mapping[str, Any]], chosen: set[str]) -> list[dict[str, Any]]:
    """Every fine-tuning run with its validation CER, and whether validation kept it (the learning-rate and
    masking grid)."""
    return [
        {
            "run": name,
            "group": info["group"],
            "learning_rate": info["learning_rate"],
            "masking": info.get("masking"),
            "valid_cer": info["valid_cer"],
            "best_step": info.get("best_step"),
            "steps": info["steps"],
            "max_steps": info.get("max_steps"),
            "kept": name in chosen,
        }
        for name, info in runs.items()
    ]


def check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise if a row misses a `ROW_KEYS` field, has the wrong type, or an impossible value."""
    for index, row in enumerate(rows):
        for key, kind in ROW_KEYS.items():
            value = row.get(key)
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind) and not isinstance(value, bool)
            if not ok and not (key in ("wer_lm", "cer_lm") and value is None and row.get("head") == "tdt"):
                raise ExperimentError(f"row {index}: {key}={value!r} is not a {kind.__name__}")
        if (
            row["head"] not in HEADS
            or row["init"] not in INITS
            or row["arm"] not in ARMS
            or row["wer"] < 0
            or row["cer"] < 0
            or row["steps"] < 1
        ):
            raise ExperimentError(f"row {index}: impossible values {dict(row)}")
        if not 0 <= row["best_step"] <= row["steps"]:
            raise ExperimentError(f"row {index}: best_step={row['best_step']} outside 0..steps={row['steps']}")


def best_at_last_evaluation(row: Mapping[str, Any]) -> bool:
    """Whether a run kept the checkpoint of its last evaluation: validation CER was still improving when the run
    ended (at its step cap: early stopping ends a run only after `patience` evaluations without improvement)."""
    last = row.get("last_eval_step")
    return row.get("best_step") is not None and row["best_step"] >= (row["steps"] if last is None else last)


def stopping_table(rows: Sequence[Mapping[str, Any]], rate_grid_minutes: Sequence[float] = ()) -> list[str]:
    """The report's section on each kept run's fine-tuning settings and how it stopped (best / run / cap steps)."""
    again = ", ".join(_minutes_label(m) for m in rate_grid_minutes)
    reuse = f"reused by the others; the rate chosen again on {again}" if again else "reused by the others"
    lines = [
        "### Fine-tuning settings and stopping of every kept run",
        "",
        f"Chosen on validation: the learning rate and masking (on the grid subset, {reuse}) and "
        "the checkpoint (lowest validation CER). `best / run / cap`: the step of the kept checkpoint, the steps "
        "run and the step cap; `best = last eval`: the run was still improving when it ended.",
        "",
        "| run | init | labeled | lr | masking | head-only steps | LR schedule | best / run / cap steps | "
        "stopped early | best = last eval |",
        "|" + "---|" * 10,
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['init']} | {_minutes_label(row['labeled_minutes'])} | {row['learning_rate']:g} | "
            f"{row.get('masking')} | {row.get('head_only_steps')} | {row.get('lr_scheduler')} | "
            f"{row.get('best_step')} / {row['steps']} / {row.get('max_steps')} | "
            f"{_stopped_early(row)} | {'**YES**' if best_at_last_evaluation(row) else 'no'} |"
        )
    return lines


def _stopped_early(row: Mapping[str, Any]) -> str:
    """'yes' / 'no', and from which step evaluations counted towards the patience where `patience_start` set it."""
    answer = "yes" if row.get("stopped_early") else "no"
    start = row.get("patience_start_step")
    return f"{answer} (counted after step {start})" if start is not None else answer


def _run_and_steps(row: Mapping[str, Any]) -> str:
    return f"{row['run']} ({row['best_step']} / {row['steps']})"


def stopping_lines(rows: Sequence[Mapping[str, Any]], repeats: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """The check that training ran long enough, in plain words: which kept runs (and which seed repeats of them)
    chose their last evaluation."""
    still = [r for r in rows if best_at_last_evaluation(r)]
    if not rows:
        return []
    if not still:
        line = (
            f"- **stopping**: no kept fine-tuning run chose its last evaluated step (all {len(rows)} had stopped "
            "improving on validation before they ended; best step / steps in the tables below)."
        )
    else:
        names = ", ".join(_run_and_steps(r) for r in still)
        line = (
            f"- **stopping**: WARNING: {len(still)} of {len(rows)} kept fine-tuning runs chose their LAST evaluated "
            f"step: still improving when their step cap ended them, so their error rates are not converged (raise "
            f"finetune.subsets[].steps): {names}."
        )
    # A seed repeat that needed more steps says the cap is tight even where the kept run stopped in time.
    late = [r for r in repeats if best_at_last_evaluation(r)]
    if repeats:
        line += (
            f" Seed repeats: {len(late)} of {len(repeats)} chose their last evaluated step"
            + (": " + ", ".join(_run_and_steps(r) for r in late) if late else "")
            + "."
        )
    return [line]


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
    selection: Sequence[Mapping[str, Any]] = (),
    probes: Sequence[Mapping[str, Any]] = (),
    models: Mapping[str, Any] | None = None,
    transducer: Sequence[str] = (),
    curves: Sequence[str] = (),
    kws: Sequence[str] = (),
    seeds: Sequence[Mapping[str, Any]] = (),
) -> str:
    """low_resource.md: scale, the command, the machine, the corpus, the pretraining budget, the verdict per arm,
    the result tables (greedy and LM), the validation choices, the probes and the exported models."""
    lines = [f"# Low-resource ASR: does self-supervised pretraining pay? ({config.name})", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    headline = config.finetune.headline_minutes
    lines += _verdict(rows, pretrained, headline)
    changes = seed_changes(seeds)
    if changes:
        count = min(sum(r["init"] == init for r in seeds) for init in ("pretrained", "scratch"))
        lines += [
            f"- **over {count} fine-tuning seeds** (the same two runs again, other seeds; change of the means): "
            + ", ".join(f"{_METRIC_NAMES[m]} {100 * c:+.0f}%" for m, c in changes.items())
            + " (see 'Fine-tuning seed noise').",
            "",
        ]
    lines += [*stopping_lines(rows, [r for r in seeds if r["repeat"]]), ""] if rows else []
    if probes:
        lines += [_probe_verdict(probes), ""]
    subsets = corpus["subsets"]
    minutes = corpus["minutes"]
    lines += [
        "## Scale",
        "",
        f"- Unlabeled pool (standard arm): **{corpus['pretrain_hours']:.2f} h** ({corpus['utterances']['pretrain']} "
        f"utterances, {corpus['train_speakers']} pseudo-speakers of {len(corpus['train_voices'])} base voices, "
        f"engines {' + '.join(corpus['engines'])}).",
        *(
            [
                f"- In-domain arm: the pool plus {corpus['in_domain_hours']:.2f} h of unlabeled audio of the test "
                "voices (other sentences, no transcripts used)."
            ]
            if corpus.get("in_domain_hours")
            else []
        ),
        "- Labeled subsets (nested): " + ", ".join(_subset_phrase(s) for s in subsets.values()) + ".",
        f"- Validation: {minutes['valid']:.1f} min, {corpus['utterances']['valid']} utterances of "
        f"{corpus['valid_speakers']} speakers of held-out voices {', '.join(corpus['valid_voices'])}.",
        f"- Test: {minutes['test']:.1f} min, {corpus['utterances']['test']} utterances of {corpus['test_speakers']} "
        f"speakers of held-out voices {', '.join(corpus['test_voices'])} (none in the pool, the labels or validation;"
        " asserted). Read once, for the tables below.",
        f"- LM: a {config.evaluate.lm_order}-gram word LM (irstlm) on {corpus['lm_sentences']} grammar sentences, "
        f"none of which occurs in a validation or test utterance ({corpus['lm_sentences_dropped']} dropped); "
        "beam search with pyctcdecode, its weights chosen on validation for each model.",
        f"- Pretraining: {len(pretrained)} encoder{'s' if len(pretrained) != 1 else ''}, {config.pretrain.max_steps} steps each, the same model size "
        "and batch seconds for every objective and arm"
        + (
            f"; encoders also kept at {', '.join(f'{f:g}' for f in config.pretrain.curve_fractions)} of the run "
            "for the compute curve."
            if config.pretrain.curve_fractions
            else "."
        ),
        f"- Machine: {machine['device']}, {machine['cores']} cores ({machine['cpu']}), torch {machine['torch']} "
        f"({machine['torch_threads']} torch threads, {config.parallel_runs} run(s) at once), Python "
        f"{machine['python']}; measured matmul peak {machine.get('matmul_peak_gflops', '?')} GFLOP/s fp32, "
        f"{machine.get('bf16_matmul_peak_gflops', '?')} GFLOP/s bf16 (FLOP utilisation is against the peak of "
        "the precision each run used).",
    ]
    if total_wall_s is not None:
        lines.append(
            f"- Wall time of corpus + pretraining + fine-tuning + evaluation + probes: {format_duration(total_wall_s)} "
            "(every stage's units' own times, wherever they ran: pretraining, fine-tuning and evaluation runs summed "
            "and divided by the runs at once; restarts and waits between invocations not counted)."
        )
    lines += ["", "Made by:", "", "```bash", command, "```", ""]
    if config.budget_note:
        lines += ["Budget (from the config):", "", config.budget_note.strip(), ""]

    lines += [
        "## Pretraining",
        "",
        "| run | arm | loss terms | encoder params | steps | batch s | audio h seen | wall | audio-s/s | precision | "
        "FLOP util. | final train loss | final valid loss |",
        "|" + "---|" * 13,
    ]
    for key, info in pretrained.items():
        train_loss = info["final_train"].get("loss")
        valid_loss = info["final_valid"].get("loss")
        util = info.get("flop_utilisation")
        lines.append(
            f"| {key} | {info.get('arm', 'standard')} | {'+'.join(info['objectives'])} | {info['encoder_params']:,} | "
            f"{info['steps']} | {info['batch_seconds']:g} | {info['audio_hours_seen']:.2f} | "
            f"{format_duration(info['wall_s'])} | {info['audio_seconds_per_s'] or ''} | "
            f"{'fp32' if info.get('precision', 'no') == 'no' else info['precision']} | "
            f"{'' if util is None else f'{100 * util:.1f}%'} | {'' if train_loss is None else f'{train_loss:.4g}'} | "
            f"{'' if valid_loss is None else f'{valid_loss:.4g}'} |"
        )
    lines += ["", "![pretraining loss curves](pretraining_loss.png)", ""]

    lines += [
        "## Results on held-out test voices",
        "",
        "Error rates in %. `pretrained`: the whole model fine-tuned from the SSL encoder; `probe`: encoder frozen, "
        "only the CTC head trained; `scratch`: the same architecture from random weights (one baseline for both "
        "arms: it sees no unlabeled audio). `greedy`: argmax CTC; `LM`: beam search with the word LM. Learning "
        "rate, checkpoint and LM weights were chosen on validation for every run alike.",
        "",
    ]
    for metric in ("cer", "wer"):
        lines += [f"### {metric.upper()}", ""] + _pivot_table(rows, pretrained, metric) + [""]
    lines += [
        "![CER vs labeled minutes](cer_vs_labeled_minutes.png)",
        "",
        "![WER vs labeled minutes](wer_vs_labeled_minutes.png)",
        "",
        *curves,
        *seed_lines(seeds, headline if headline is not None else min(r["labeled_minutes"] for r in rows)),
        "### Every kept run",
        "",
        "| run | arm | init | labeled | CER | WER | CER LM | WER LM | valid CER | lr | best step / steps | "
        "LM α, β | fine-tune wall | audio-s/s | FLOP util. |",
        "|" + "---|" * 15,
    ]
    for row in rows:
        util = row.get("flop_utilisation")
        lines.append(
            f"| {row['key'] if row['init'] != 'scratch' else 'scratch'} | {row['arm']} | {row['init']} | "
            f"{_minutes_label(row['labeled_minutes'])} | {_pct(row['cer'])} | {_pct(row['wer'])} | "
            f"{_pct(row['cer_lm'])} | {_pct(row['wer_lm'])} | {_pct(row.get('valid_cer'))} | "
            f"{row['learning_rate']:g} | {row.get('best_step')} / {row['steps']} | {row.get('lm_alpha')}, "
            f"{row.get('lm_beta')} | {format_duration(row['wall_s'])} | {row.get('audio_seconds_per_s') or ''} | "
            f"{'' if util is None else f'{100 * util:.1f}%'} |"
        )
    lines += ["", *stopping_table(rows, config.finetune.rate_grid_minutes)]
    if selection:
        lines += [
            "",
            "### Learning-rate and masking choice on validation",
            "",
            "| run | lr | masking | valid CER | best step / steps | kept |",
            "|---|---|---|---|---|---|",
        ]
        for item in selection:
            lines.append(
                f"| {item['group']} | {item['learning_rate']:g} | {item.get('masking')} | {_pct(item['valid_cer'])} | "
                f"{item.get('best_step')} / {item['steps']} | {'yes' if item['kept'] else ''} |"
            )
    lines += _sample_transcripts(rows, scores or {}, headline)
    if transducer:
        lines += ["", *transducer]
    if probes:
        lines += ["", "## SUPERB-style probes (frozen encoder, learned weighted sum of layers)", ""]
        lines += probe_table(probes)
        lines += ["", "![probes](probes.png)"]
    if kws:
        lines += ["", *kws]
    if models:
        lines += ["", f"## Models to try ({config.models_dir}/)", ""]
        for name, info in models.items():
            lines.append(f"- `{name}` ({info['megabytes']} MB), from `{info['from']}`")
        ctc = next((name for name in models if name.startswith("ctc_") and "_pretrained_" in name), None)
        if ctc:
            lines += [
                "",
                "```python",
                "import soundfile as sf",
                "from transformers import pipeline",
                "",
                "import hf_ssl_speech  # registers the classes (or pass trust_remote_code=True without the package)",
                "",
                f'asr = pipeline("automatic-speech-recognition", model="{config.models_dir}/{ctc}")',
                'audio, rate = sf.read("speech.wav", dtype="float32")',
                'print(asr({"raw": audio, "sampling_rate": rate})["text"])  # beam search with the LM',
                "```",
            ]
    lines += [
        "",
        "Raw numbers: `low_resource.json` (error rates as fractions). Each fine-tuning run's folder holds its model, "
        "processor (with the LM) and loss curve; `done.json` markers let the command resume.",
        "",
    ]
    return "\n".join(lines)


def beats_fbank(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, bool]]:
    """Per probe task and encoder: whether its test value beats FBANK's (higher or lower, as the metric wants)."""
    fbank = {r["task"]: r for r in rows if r["features"] == "fbank"}
    verdict: dict[str, dict[str, bool]] = {}
    for r in rows:
        if r["features"] != "fbank" and r["task"] in fbank:
            base = fbank[r["task"]]["value"]
            verdict.setdefault(r["task"], {})[r["features"]] = (
                r["value"] > base if r["higher_is_better"] else r["value"] < base
            )
    return verdict


def probe_table(probes: Sequence[Mapping[str, Any]]) -> list[str]:
    """task x feature set, with the metric and whether it beats FBANK."""
    lines = ["| task | features | metric | value | vs FBANK |", "|---|---|---|---|---|"]
    verdict = beats_fbank(probes)
    for row in probes:
        better = verdict.get(row["task"], {}).get(row["features"])
        note = "" if better is None else "better" if better else "not better"
        lines.append(f"| {row['task']} | {row['features']} | {row['metric']} | {100 * row['value']:.1f} | {note} |")
    return lines


def _sample_transcripts(
    rows: Sequence[Mapping[str, Any]], scores: Mapping[str, Any], minutes: float | None = None
) -> list[str]:
    """The first test utterances as transcribed by the best pretrained run (on `minutes` of labels, default the
    fewest) and its scratch twin."""
    fewest = minutes if minutes is not None else min((r["labeled_minutes"] for r in rows), default=None)
    pretrained = [r for r in rows if r["labeled_minutes"] == fewest and r["init"] == "pretrained"]
    scratch = [r for r in rows if r["labeled_minutes"] == fewest and r["init"] == "scratch"]
    if not pretrained or not scratch:
        return []
    chosen = [min(pretrained, key=lambda r: r["valid_cer"]), min(scratch, key=lambda r: r["valid_cer"])]
    examples = {r["run"]: scores.get(r["run"], {}).get("examples", []) for r in chosen}
    count = min(len(e) for e in examples.values())
    if count == 0:
        return []
    lines = ["", f"### Sample transcripts ({_minutes_label(fewest)} labeled, greedy / LM)", ""]
    for index in range(count):
        lines.append(f"- reference: `{examples[chosen[0]['run']][index]['reference']}`")
        for row in chosen:
            example = examples[row["run"]][index]
            label = row["key"] if row["init"] != "scratch" else "scratch"
            lines.append(f"  - {label}: `{example['hypothesis']}` / `{example.get('hypothesis_lm', '')}`")
    return lines


def _subset_phrase(subset: Mapping[str, Any]) -> str:
    return (
        f"{subset['nominal_minutes']:g} min = {subset['minutes']:.1f} min / {subset['utterances']} utterances / "
        f"{subset['speakers']} speakers of {len(subset.get('voices', []))} base voices"
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
    """(row - baseline) / baseline of `metric`: -0.4 is a 40% reduction."""
    base, value = baseline[metric], row[metric]
    if not (math.isfinite(base) and math.isfinite(value)) or base <= 0:
        return None
    return (value - base) / base


def best_change(
    rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], minutes: float, metric: str, arm: str = "standard"
) -> tuple[str, float] | None:
    """(pretraining key, relative change of `metric` on test) of the arm's best fine-tuned pretrained run against
    the scratch baseline of its architecture. "Best" is chosen on VALIDATION (the lowest validation CER relative to
    its baseline's), like every other choice; the test split only gives the reported figure."""
    candidates = []
    for key, info in pretrained.items():
        if info.get("arm", "standard") != arm:
            continue
        row = next(
            (r for r in rows if r["key"] == key and r["init"] == "pretrained" and r["labeled_minutes"] == minutes),
            None,
        )
        scratch = _matching_scratch(rows, info["architecture"], minutes)
        if row is None or scratch is None:
            continue
        chosen_by = relative_change(row, scratch, "valid_cer") if "valid_cer" in row else None
        candidates.append((chosen_by if chosen_by is not None else math.inf, key, row, scratch))
    if not candidates:
        return None
    _, key, row, scratch = min(candidates, key=lambda item: item[0])
    change = relative_change(row, scratch, metric)
    return None if change is None else (key, change)


# The proof's targets (standard arm, fewest labels, best pretrained against best scratch).
TARGETS = {"cer": -0.40, "wer_lm": -0.30}


def _verdict(
    rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], minutes: float | None = None
) -> list[str]:
    """One line per arm on `minutes` of labels (default the fewest): the best pretrained run (chosen on validation)
    against scratch, CER and WER greedy and with the LM on test, and whether the targets (CER -40%, WER with LM
    -30%) are reached."""
    if not rows:
        return []
    fewest = minutes if minutes is not None else min(r["labeled_minutes"] for r in rows)
    lines = ["## Verdict", ""]
    for arm in ARMS:
        parts, reached = [], []
        for metric in ("cer", "wer", "cer_lm", "wer_lm"):
            best = best_change(rows, pretrained, fewest, metric, arm)
            if best is not None:
                parts.append(f"{metric.upper().replace('_LM', ' with LM')} {100 * best[1]:+.0f}% ({best[0]})")
                if metric in TARGETS:
                    reached.append(best[1] <= TARGETS[metric])
        if parts:
            status = "targets reached" if reached and all(reached) else "targets NOT reached"
            lines.append(
                f"- **{arm}** arm, {_minutes_label(fewest)} of labels, best pretrained (chosen on validation) vs scratch on test voices: "
                + ", ".join(parts)
                + f" (relative; negative is better) — {status} (CER ≤ -40%, WER with LM ≤ -30%)."
            )
    return lines + [""] if len(lines) > 2 else []


def _probe_verdict(probes: Sequence[Mapping[str, Any]]) -> str:
    """One line: per encoder, the probe tasks on which it beats FBANK (the target: every task)."""
    verdict = beats_fbank(probes)
    tasks = sorted({r["task"] for r in probes if r["features"] == "fbank"})
    encoders = list(dict.fromkeys(r["features"] for r in probes if r["features"] != "fbank"))
    wins = {name: [task for task, by in verdict.items() if by.get(name)] for name in encoders}
    parts = [
        f"{name} beats FBANK on {len(won)}/{len(tasks)} ({', '.join(won) or 'none'})" for name, won in wins.items()
    ]
    every = any(len(won) == len(tasks) for won in wins.values())
    return (
        "- **probes** (frozen encoders, held-out data): "
        + "; ".join(parts)
        + f" — target (every task beats FBANK) {'reached' if every else 'NOT reached'}."
    )


def _pivot_table(rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any], metric: str = "wer") -> list[str]:
    """Per pretraining run and subset: `metric` greedy and with the LM for pretrained / probe / scratch."""
    minutes = sorted({r["labeled_minutes"] for r in rows})
    by_key = {(r["key"], r["init"], r["labeled_minutes"]): r for r in rows}
    header = "| run | arm |" + "".join(
        f" {_minutes_label(m)} pretrained | probe | scratch | change | change with LM |" for m in minutes
    )
    lines = [header, "|---|---|" + "---|---|---|---|---|" * len(minutes)]
    for key, info in pretrained.items():
        cells = [key, info.get("arm", "standard")]
        for m in minutes:
            pre = by_key.get((key, "pretrained", m))
            probe = by_key.get((key, "probe", m))
            scratch = _matching_scratch(rows, info["architecture"], m)

            def pair(row: Mapping[str, Any] | None) -> str:
                return f"{_pct(row[metric])} / {_pct(row[metric + '_lm'])}" if row else ""

            change = relative_change(pre, scratch, metric) if pre and scratch else None
            change_lm = relative_change(pre, scratch, metric + "_lm") if pre and scratch else None
            cells += [
                pair(pre),
                pair(probe),
                pair(scratch),
                "" if change is None else f"{100 * change:+.0f}%",
                "" if change_lm is None else f"{100 * change_lm:+.0f}%",
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
                and (r["key"] == family if init != "scratch" else r["architecture"].startswith(arch))
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


def full_pretraining(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of finished encoders (and scratch): what the tables, verdict and exports are about."""
    return [r for r in rows if r["init"] == "scratch" or r.get("pretrain_fraction", 1.0) == 1.0]


def compute_curve(
    rows: Sequence[Mapping[str, Any]], key: str | None, minutes: float | None
) -> tuple[list[Mapping[str, Any]], Mapping[str, Any] | None]:
    """The compute curve of pretraining run `key` on `minutes` of labels: its whole-model fine-tunes from the encoders
    kept part-way and the finished one, by pretraining steps; and the scratch row of those labels (compute 0)."""
    curve = sorted(
        (r for r in rows if r["key"] == key and r["init"] == "pretrained" and r["labeled_minutes"] == minutes),
        key=lambda r: r["pretrain_fraction"],
    )
    scratch = next((r for r in rows if r["init"] == "scratch" and r["labeled_minutes"] == minutes), None)
    return curve, scratch


def steps_for_target(
    curve: Sequence[Mapping[str, Any]], scratch: Mapping[str, Any], metric: str, target: float
) -> dict[str, Any] | None:
    """Fit `metric` = a + b log2(pretraining steps) to the curve (least squares) and solve for the steps at which
    the relative change against scratch reaches `target` (-0.4: 40% lower). None with fewer than two points."""
    import numpy as np

    points = [(r["pretrain_steps"], r[metric]) for r in curve if r["pretrain_steps"] > 0 and r.get(metric) is not None]
    if len(points) < 2 or not math.isfinite(scratch.get(metric) or float("nan")):
        return None
    x = np.log2([p[0] for p in points])
    y = np.array([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    goal = (1 + target) * scratch[metric]
    result = {"metric": metric, "slope_per_doubling": float(slope), "goal": float(goal), "steps": None}
    if slope < -1e-6:  # falling with compute (a flat fit's rounding noise is not)
        steps = 2 ** min((goal - intercept) / slope, 1000.0)
        result["steps"] = float(steps) if math.isfinite(steps) else None
    return result


def compute_curve_lines(
    curve: Sequence[Mapping[str, Any]], scratch: Mapping[str, Any] | None, pretrained: Mapping[str, Any]
) -> list[str]:
    """The pretraining-compute section: a table, the plot and the extrapolated compute for the CER target."""
    if len(curve) < 2 or scratch is None:
        return []
    key = curve[0]["key"]
    info = pretrained[key]
    lines = [
        "## Pretraining-compute curve",
        "",
        f"{key}, whole model fine-tuned on {_minutes_label(curve[0]['labeled_minutes'])} of labels (the learning rate "
        "and masking validation chose for the finished encoder), from the encoders kept part-way through the same "
        "pretraining run. Scratch is compute 0.",
        "",
        "| pretraining | steps | audio h seen | pretraining wall | valid CER | test CER | test CER LM | change | "
        "best step / steps |",
        "|" + "---|" * 9,
        f"| none (scratch) | 0 | 0 | 0 | {_pct(scratch.get('valid_cer'))} | {_pct(scratch['cer'])} | "
        f"{_pct(scratch['cer_lm'])} | | {scratch.get('best_step')} / {scratch['steps']} |",
    ]
    for row in curve:
        change = relative_change(row, scratch, "cer")
        lines.append(
            f"| {row['pretrain_fraction']:g} | {row['pretrain_steps']} | {row['pretrain_audio_hours_seen']:.1f} | "
            f"{format_duration(row['pretrain_wall_s'])} | {_pct(row.get('valid_cer'))} | {_pct(row['cer'])} | "
            f"{_pct(row['cer_lm'])} | {'' if change is None else f'{100 * change:+.0f}%'} | "
            f"{row.get('best_step')} / {row['steps']} |"
        )
    lines += ["", "![CER vs pretraining compute](cer_vs_pretraining_compute.png)", ""]
    for metric, name in (("cer", "test CER"), ("valid_cer", "validation CER")):
        fit = steps_for_target(curve, scratch, metric, -0.4)
        if fit is None:
            continue
        slope = f"{100 * fit['slope_per_doubling']:+.1f} points per doubling of pretraining steps"
        if fit["steps"] is None:
            lines.append(
                f"- Fit of {name} against log2(steps): {slope}. It does not fall with compute, so on this slope "
                "no amount of pretraining reaches the -40% target."
            )
            continue
        ratio = fit["steps"] / info["steps"]
        if ratio > 1000:  # beyond any budget: the figure says the slope is too shallow, not a plan
            lines.append(
                f"- Fit of {name} against log2(steps): {slope}. The -40% target ({_pct(fit['goal'])}) would need "
                f"about {ratio:.0e}x this run's steps: out of reach on this slope: more steps at this encoder size will not "
                "get there."
            )
            continue
        hours = info["audio_hours_seen"] * ratio
        wall = info["wall_s"] * ratio
        lines.append(
            f"- Fit of {name} against log2(steps): {slope}. The -40% target ({_pct(fit['goal'])}) would need "
            f"about **{fit['steps']:,.0f} steps** ({ratio:.3g}x this run: ~{hours:,.0f} h of audio seen, "
            f"~{format_duration(wall)} on this machine at the same size), if the log-linear trend held that far."
        )
    return lines + [""]


def plot_compute_curve(curve: Sequence[Mapping[str, Any]], scratch: Mapping[str, Any] | None, path: Path) -> Path:
    """Validation and test CER against pretraining steps (log scale), scratch as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for metric, style, label in (("cer", "o-", "test CER"), ("valid_cer", "s--", "validation CER")):
        points = [(r["pretrain_steps"], 100 * r[metric]) for r in curve if r.get(metric) is not None]
        if points:
            ax.plot(*zip(*points), style, label=f"{curve[0]['key']}: {label}")
        if scratch is not None and scratch.get(metric) is not None:
            ax.axhline(100 * scratch[metric], linestyle=":", color="tab:red" if metric == "cer" else "tab:orange")
            ax.annotate(f"scratch {label}", (points[0][0] if points else 1, 100 * scratch[metric]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pretraining steps")
    ax.set_ylabel("CER (%)")
    minutes = curve[0]["labeled_minutes"] if curve else 0
    ax.set_title(f"Fine-tuned on {_minutes_label(minutes)} of labels", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def seed_rows(
    rows: Sequence[Mapping[str, Any]], repeats: Sequence[Mapping[str, Any]], minutes: float, key: str | None
) -> list[dict[str, Any]]:
    """The verdict's runs on `minutes` of labels (pretraining run `key` whole-model fine-tuned, and scratch of its
    architecture) and their seed repeats: per run, `init`, `repeat` (0: the run validation kept) and the test and
    validation figures; empty when there are no repeats."""
    ours = [r for r in rows if r["init"] == "pretrained" and r["key"] == key and r["labeled_minutes"] == minutes]
    architecture = ours[0]["architecture"] if ours else None

    def verdict_run(row: Mapping[str, Any]) -> bool:
        return (
            row["labeled_minutes"] == minutes
            and row.get("head", "ctc") == "ctc"
            and row["architecture"] == architecture
            and (row["init"] == "scratch" or (row["init"] == "pretrained" and row["key"] == key))
            and row["pretrain_fraction"] in (0.0, 1.0)
        )

    fields = ("run", "init", "key", "repeat", "cer", "cer_lm", "wer_lm", "valid_cer", "best_step", "steps")
    fields = (*fields, "last_eval_step")
    picked = [r for r in rows if verdict_run(r)] + [r for r in repeats if verdict_run(r)]
    if not any(r.get("repeat", 0) for r in picked):
        return []
    return [{k: r.get(k) for k in fields} for r in sorted(picked, key=lambda r: (r["init"], r.get("repeat", 0)))]


def mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


_METRIC_NAMES = {"cer": "CER", "wer": "WER", "cer_lm": "CER with LM", "wer_lm": "WER with LM"}


def _seed_values(seeds: Sequence[Mapping[str, Any]], init: str, metric: str) -> list[float]:
    """`metric` of every seed of `init` that has it."""
    return [r[metric] for r in seeds if r["init"] == init and r[metric] is not None]


def seed_changes(seeds: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Relative change of the mean over seeds, pretrained against scratch, per metric (empty without both)."""
    changes = {}
    for metric in ("cer", "cer_lm", "wer_lm"):
        means = {}
        for init in ("pretrained", "scratch"):
            values = _seed_values(seeds, init, metric)
            if values:
                means[init] = mean_and_sd(values)[0]
        if len(means) == 2 and means["scratch"] > 0:
            changes[metric] = (means["pretrained"] - means["scratch"]) / means["scratch"]
    return changes


def seed_difference(seeds: Sequence[Mapping[str, Any]], metric: str) -> tuple[float, float] | None:
    """Pretrained mean minus scratch mean of `metric` over the seeds, and the standard error of that difference
    (sqrt(sd_p^2 / n_p + sd_s^2 / n_s), Welch's); None without two seeds of each init."""
    stats = {}
    for init in ("pretrained", "scratch"):
        values = _seed_values(seeds, init, metric)
        if len(values) < 2:
            return None
        mean, sd = mean_and_sd(values)
        stats[init] = (mean, sd * sd / len(values))
    difference = stats["pretrained"][0] - stats["scratch"][0]
    return difference, math.sqrt(stats["pretrained"][1] + stats["scratch"][1])


def seed_lines(seeds: Sequence[Mapping[str, Any]], minutes: float) -> list[str]:
    """The 'seed noise' section: per init, the figures of every seed, their mean and standard deviation, and the
    change of the means; the spread says how large a change one run can show by chance."""
    if not seeds:
        return []
    lines = [
        f"## Fine-tuning seed noise ({_minutes_label(minutes)} of labels)",
        "",
        "The verdict's two runs trained again with other Trainer seeds (`finetune.seeds`: the CTC head's "
        "initialisation, a scratch model's weights, the batch order and the masks change; the pretrained encoder, "
        "the learning rate and the masking validation chose do not). Test figures in %, mean ± standard deviation "
        "over the seeds; each seed keeps its own best checkpoint on validation.",
        "",
        "| init | seeds | CER per seed | CER | CER LM | WER LM | valid CER | best step / steps per seed |",
        "|" + "---|" * 8,
    ]
    for init in ("pretrained", "scratch"):
        runs = [r for r in seeds if r["init"] == init]
        if not runs:
            continue
        cells = [init, str(len(runs)), ", ".join(_pct(r["cer"]) for r in runs)]
        for metric in ("cer", "cer_lm", "wer_lm", "valid_cer"):
            values = _seed_values(runs, init, metric)
            mean, sd = mean_and_sd(values) if values else (float("nan"), float("nan"))
            cells.append(f"{_pct(mean)} ± {_pct(sd)}")
        cells.append(", ".join(f"{r['best_step']} / {r['steps']}" for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
    changes = seed_changes(seeds)
    kept = {init: next((r for r in seeds if r["init"] == init and not r["repeat"]), None) for init in INITS}
    if changes and kept["pretrained"] and kept["scratch"]:
        single = {m: relative_change(kept["pretrained"], kept["scratch"], m) for m in changes}
        lines += [
            "",
            "- Change of the means, pretrained vs scratch: "
            + ", ".join(f"{_METRIC_NAMES[m]} {100 * c:+.0f}%" for m, c in changes.items())
            + " (the kept runs alone, as in the verdict: "
            + ", ".join(f"{_METRIC_NAMES[m]} {100 * c:+.0f}%" for m, c in single.items() if c is not None)
            + ").",
        ]
    for metric in ("cer", "cer_lm", "wer_lm"):
        measured = seed_difference(seeds, metric)
        if measured is None:
            continue
        difference, error = measured
        # Two standard errors: a rough line with few seeds (a t-test at 2 degrees of freedom would ask ~4.3).
        beyond = abs(difference) > 2 * error
        lines.append(
            f"- {_METRIC_NAMES[metric]}: the means differ by {100 * difference:+.1f} points, standard error of the "
            f"difference {100 * error:.1f} points: "
            + ("beyond" if beyond else "within")
            + " two standard errors of the seed noise."
        )
    return lines + [""]


def label_efficiency_lines(rows: Sequence[Mapping[str, Any]], key: str | None) -> list[str]:
    """Pretrained (`key`) against scratch at every labeled amount, and where the relative gain is largest."""
    minutes = sorted({r["labeled_minutes"] for r in rows if r["key"] == key and r["init"] == "pretrained"})
    pairs = []
    for m in minutes:
        ours = next(r for r in rows if r["key"] == key and r["init"] == "pretrained" and r["labeled_minutes"] == m)
        scratch = next((r for r in rows if r["init"] == "scratch" and r["labeled_minutes"] == m), None)
        if scratch is not None:
            pairs.append((m, ours, scratch))
    if len(pairs) < 2:
        return []
    lines = [
        "## Label-efficiency curve",
        "",
        f"{key} (the pretraining run validation chose) whole-model fine-tuned vs scratch, on nested subsets.",
        "",
        "| labeled | pretrained CER | scratch CER | change | pretrained CER LM | scratch CER LM | change | "
        "pretrained WER LM | scratch WER LM | change |",
        "|" + "---|" * 10,
    ]
    for m, ours, scratch in pairs:
        cells = [_minutes_label(m)]
        for metric in ("cer", "cer_lm", "wer_lm"):
            change = relative_change(ours, scratch, metric)
            cells += [_pct(ours[metric]), _pct(scratch[metric]), "" if change is None else f"{100 * change:+.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    changes = [(relative_change(o, s, "cer"), m) for m, o, s in pairs if relative_change(o, s, "cer") is not None]
    if changes:
        best_change, where = min(changes)
        lines += [
            "",
            f"- Largest relative CER gain from pretraining: **{100 * best_change:+.0f}% at {_minutes_label(where)}** "
            f"of labels (from {100 * changes[0][0]:+.0f}% at {_minutes_label(changes[0][1])} to "
            f"{100 * changes[-1][0]:+.0f}% at {_minutes_label(changes[-1][1])}).",
        ]
    return lines + [""]


def kws_lines(kws: Sequence[Mapping[str, Any]], encoder: str | None) -> list[str]:
    """The fine-tuned keyword spotter: accuracy on held-out voices by labels per keyword, pretrained vs scratch."""
    if not kws:
        return []
    counts = sorted({r["labels_per_keyword"] for r in kws})
    by = {(r["init"], r["labels_per_keyword"]): r for r in kws}
    lines = [
        "## Keyword spotting with few labels, fine-tuned",
        "",
        f"The whole encoder ({encoder}, or the same architecture from scratch) plus a mean-pooled linear head, "
        "fine-tuned on k clips per keyword per labeled voice (12 words, `_unknown_`, `_silence_`); learning rate "
        "and step chosen on validation speakers; accuracy on held-out test voices (kws.json).",
        "",
        "| labels per keyword per voice | pretrained | scratch | pretrained lr | scratch lr |",
        "|---|---|---|---|---|",
    ]
    for k in counts:
        ours, scratch = by.get(("pretrained", k), {}), by.get(("scratch", k), {})
        lines.append(
            f"| {k} | {_pct(ours.get('accuracy'))} | {_pct(scratch.get('accuracy'))} | "
            f"{ours.get('learning_rate', '')} | {scratch.get('learning_rate', '')} |"
        )
    return lines + [""]


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
