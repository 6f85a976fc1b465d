"""What a fine-tuning run leaves behind: results tables, training curves, the model card, the Hub push."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


# ============================================================================================ reports
def write_results(results: Mapping[str, Mapping[str, float]], output_dir: str | Path) -> tuple[Path, Path]:
    """Write `results.json` and `results.md` (one row per eval set: utterances, WER, CER as percentages)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if not results:
        md_path = output_dir / "results.md"
        md_path.write_text("No eval set was given: nothing was evaluated.\n")
        return md_path, json_path
    keys = sorted({key for values in results.values() for key in values if key not in ("utterances",)})
    header = "| eval set | utterances | " + " | ".join(_column_name(key) for key in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for name, values in results.items():
        cells = [_format_cell(key, values.get(key)) for key in keys]
        lines.append(f"| {name} | {values.get('utterances', '')} | " + " | ".join(cells) + " |")
    md_path = output_dir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path


def _column_name(key: str) -> str:
    return f"{key.upper()} (%)" if key in ("wer", "cer") else key


def _format_cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key in ("wer", "cer"):
        return f"{100 * value:.2f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_training_curves(log_history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """PNG of train/eval loss and eval WER/CER (or accuracy) against the step, from `trainer.state.log_history`.

    Returns the path, or None when the history holds nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        return [p[0] for p in points], [p[1] for p in points]

    losses = {key: series(key) for key in ("loss", "eval_loss")}
    scores = {key: series(key) for key in ("eval_wer", "eval_cer", "eval_accuracy")}
    if not any(xs for xs, _ in [*losses.values(), *scores.values()]):
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, (xs, ys) in losses.items():
        if xs:
            left.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
    left.set(xlabel="step", ylabel="loss", title="loss")
    left.legend()
    for key, (xs, ys) in scores.items():
        if xs:
            right.plot(xs, [100 * y for y in ys], marker="o", label=key)
    right.set(xlabel="step", ylabel="%", title="evaluation")
    if right.lines:
        right.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def model_index(
    model_name: str, results: Mapping[str, Mapping[str, float]], dataset_name: str, dataset_type: str
) -> list[dict[str, Any]]:
    """Hub `model-index` metadata: one result per eval set with WER and CER in percent."""
    entries = []
    for split, values in results.items():
        metrics = [
            {"type": key, "value": round(100 * float(values[key]), 2), "name": f"{split} {key.upper()} (%)"}
            for key in ("wer", "cer")
            if values.get(key) is not None and math.isfinite(values[key])
        ]
        if metrics:
            entries.append(
                {
                    "task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
                    "dataset": {"name": dataset_name, "type": dataset_type, "split": split},
                    "metrics": metrics,
                }
            )
    return [{"name": model_name, "results": entries}]


def card_base_model(source: str | None, from_scratch: bool) -> str | None:
    """What a model card names as the base model: none from scratch, where a checkpoint given beside
    --from_scratch lends only its architecture."""
    return None if from_scratch else source


def ctc_model_card(
    repo_id: str,
    results: Mapping[str, Mapping[str, float]],
    base_model: str | None = None,
    dataset_name: str = "hf_ssl_speech demo corpus",
    dataset_type: str = "hf_ssl_speech-demo",
    language: str = "en",
    training_summary: Mapping[str, Any] | None = None,
) -> str:
    """README.md of a fine-tuned CTC model: metadata with `model-index` (WER/CER), usage, results table."""
    name = repo_id.split("/")[-1]
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "automatic-speech-recognition",
        "license": "apache-2.0",
        "language": [language],
        "tags": ["automatic-speech-recognition", "ctc", "conformer", "hf_ssl_speech"],
    }
    if base_model and "/" in base_model and not os.path.exists(base_model):
        metadata["base_model"] = base_model  # only a Hub id is meaningful on the Hub
    metadata["model-index"] = model_index(name, results, dataset_name, dataset_type)
    table = ["| eval set | WER (%) | CER (%) |", "|---|---|---|"]
    for split, values in results.items():
        table.append(
            f"| {split} | {_format_cell('wer', values.get('wer'))} | {_format_cell('cer', values.get('cer'))} |"
        )
    summary = "\n".join(f"- {key}: {value}" for key, value in (training_summary or {}).items())
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {name}

A Conformer CTC speech recogniser fine-tuned with `hf_ssl_speech` (`scripts/finetune_ctc.py`)
{f"from `{base_model}`" if base_model else "from scratch"}. Character vocabulary, greedy CTC decoding.

## Results

{chr(10).join(table)}

## Usage

```python
import hf_ssl_speech  # or pass trust_remote_code=True when the package is not installed
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="{repo_id}")
print(asr(audio_16khz_float32)["text"])
# long recordings: asr(audio, chunk_length_s=20, stride_length_s=4)
```

## Training

{summary or "See training_args.bin and results.json."}
"""


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload fine-tuned hf_ssl_speech model",
) -> str:
    """Create `repo_id` if needed and upload a finished output folder (checkpoints and logs left out).

    The endpoint is `HF_ENDPOINT` (the Hub by default); returns the commit URL.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: push the output_dir after training finished.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "demo_corpus/**", "*.tmp"],
    )
    return info.commit_url
