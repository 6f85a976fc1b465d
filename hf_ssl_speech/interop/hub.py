"""Model cards and pushing checkpoints to the Hugging Face Hub.

`write_model_card(folder, ...)` writes `README.md` (YAML metadata + how to load + the training summary) into a
`save_pretrained` folder; `push_checkpoint(folder, repo_id)` creates the repo and uploads the folder with
`huggingface_hub` (`create_repo` + `upload_folder`). The endpoint comes from `HF_ENDPOINT` (or `endpoint=`),
so the same code pushes to the Hub, a private Hub, or the loopback server of the tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..frames import HOP_LENGTH, SAMPLING_RATE

CARD_TAGS = ["ssl", "speech", "conformer", "hf_ssl_speech", "self-supervised-learning"]


def card_metadata(
    datasets: Sequence[str] = (),
    extra_tags: Sequence[str] = (),
    license: str = "apache-2.0",
    language: Sequence[str] = ("en",),
) -> dict[str, Any]:
    """The YAML header of the card: what the Hub indexes (library, pipeline, tags, datasets)."""
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "feature-extraction",
        "license": license,
        "language": list(language),
        "tags": [*CARD_TAGS, *[t for t in extra_tags if t not in CARD_TAGS]],
    }
    if datasets:
        metadata["datasets"] = list(datasets)
    return metadata


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _architecture_summary(config: Mapping[str, Any]) -> str:
    if not config:
        return "(no config.json in the folder)"
    kind = "FastConformer" if config.get("subsampling") == "dw_striding" else "Conformer"
    objectives = config.get("objectives") or {}
    objective_text = ", ".join(
        f"{name} (weight {spec.get('weight', 1.0)}, from step {spec.get('start_step', 0)})"
        for name, spec in objectives.items()
    )
    return (
        f"{kind} encoder: {config.get('num_hidden_layers')} layers, hidden size {config.get('hidden_size')}, "
        f"{config.get('num_attention_heads')} heads, feed-forward {config.get('intermediate_size')}, depthwise kernel "
        f"{config.get('conv_depthwise_kernel_size')}, {config.get('subsampling_factor')}x subsampling of 80-dim "
        f"log-mel frames (10 ms hop).\nPretraining objectives: {objective_text or 'none recorded'}."
    )


def _summary_table(summary: Mapping[str, Any]) -> str:
    if not summary:
        return "No training summary was recorded."
    rows = ["| quantity | value |", "|---|---|"]
    for key, value in summary.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"| {key} | {text} |")
    return "\n".join(rows)


def model_card_text(
    repo_id: str,
    config: Mapping[str, Any] | None = None,
    training_summary: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    recipe_yaml: str | None = None,
    extra_tags: Sequence[str] = (),
) -> str:
    """The README.md text of a pushed checkpoint.

    Args:
        repo_id: where the model lives (used in the loading snippets).
        config: the model's `config.json` as a dict (architecture and objectives are summarised from it).
        training_summary: e.g. {"steps": 1000, "audio hours": 12.5, "final train loss": 3.2}.
        datasets: Hub dataset ids (or free names) the encoder was pretrained on, for the metadata.
        recipe_yaml: the resolved recipe, included verbatim so the run can be reproduced.
    """
    metadata = yaml.safe_dump(card_metadata(datasets, extra_tags), sort_keys=False).strip()
    recipe_block = f"\n## Recipe\n\n```yaml\n{recipe_yaml.strip()}\n```\n" if recipe_yaml else ""
    return f"""---
{metadata}
---

# {repo_id.split("/")[-1]}

A self-supervised speech encoder pretrained with `hf_ssl_speech` on unlabeled audio.
It maps 16 kHz audio to contextual frame features (one vector per {_frame_ms(config)} ms); fine-tune it for
speech recognition (`AutoModelForCTC`) or audio classification (`AutoModelForAudioClassification`).

## Model

{_architecture_summary(config or {})}

## How to load

With the package installed (`pip install hf_ssl_speech`):

```python
import hf_ssl_speech  # registers the conformer_ssl classes with the Auto factories
from transformers import AutoFeatureExtractor, AutoModel

extractor = AutoFeatureExtractor.from_pretrained("{repo_id}")
model = AutoModel.from_pretrained("{repo_id}")
```

Without it, the modelling code stored next to the weights is used:

```python
from transformers import AutoFeatureExtractor, AutoModel

extractor = AutoFeatureExtractor.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = extractor(audio_16khz, sampling_rate=16000, return_tensors="pt")
features = model(**inputs).last_hidden_state  # (batch, frames, hidden)
```

## Training

{_summary_table(training_summary or {})}
{recipe_block}"""


def _frame_ms(config: Mapping[str, Any] | None) -> int:
    config = config or {}
    return int(1000 * config.get("hop_length", HOP_LENGTH) * config.get("subsampling_factor", 4) / SAMPLING_RATE)


def write_model_card(
    folder: str | Path,
    repo_id: str,
    training_summary: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    recipe_yaml: str | None = None,
) -> Path:
    """Write `README.md` into a `save_pretrained` folder (config read from its `config.json`); returns its path."""
    folder = Path(folder)
    path = folder / "README.md"
    path.write_text(model_card_text(repo_id, _load_config(folder), training_summary, datasets, recipe_yaml))
    return path


def push_checkpoint(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload pretrained hf_ssl_speech encoder",
    endpoint: str | None = None,
) -> str:
    """Create `repo_id` if needed and upload `folder` (a `save_pretrained` folder) to it; returns the commit URL.

    Args:
        folder: the checkpoint's `model/` folder (weights, config, feature extractor, remote code, README.md).
        repo_id: "user/name" on the Hub (the recipe's `train.push_to_hub` or `--push_to_hub`).
        token: a write token; None uses `HF_TOKEN` / the saved login.
        private: create the repo private (ignored if it exists).
        endpoint: Hub URL; None uses `HF_ENDPOINT` (default https://huggingface.co).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a save_pretrained folder (checkpoint-*/model).")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return info.commit_url


__all__ = ["card_metadata", "model_card_text", "push_checkpoint", "write_model_card"]
