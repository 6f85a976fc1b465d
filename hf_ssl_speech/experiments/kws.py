"""Keyword spotting with few labels, fine-tuned: the whole encoder plus a pooled linear head, pretrained vs scratch.

The frozen keyword probe (`experiments.probes`) asks what the features already hold; this asks what a user gets who
fine-tunes on a handful of recordings. The synthetic speech-commands set (`synthetic.commands`: 12 words,
`_unknown_`, `_silence_`) is made with `max(labels_per_keyword)` pseudo-speakers per labeled voice, each saying each
word once; the subset with k labels per keyword per voice keeps the clips of each voice's first k speakers (the
subsets are nested). Validation: one further speaker per labeled voice (unseen talkers, seen voices); test: speakers
of the held-out test voices, scored once with the run validation chose.

Every init gets the same protocol: features made once (normalised log-mels, no augmentation), AdamW with a linear
warmup and cosine decay over `steps`, validation accuracy every `eval_every` steps and the best state kept, a
learning-rate grid per init chosen on validation (pretrained grid 10x below scratch's, as in the CTC runs).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.audio_io import load_audio
from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from ..modeling_conformer_ssl import ConformerSslModel

logger = logging.getLogger(__name__)

KWS_INITS = ("pretrained", "scratch")


@dataclass
class KwsSpec:
    """Sizes and training of the fine-tuned keyword spotter (`probes.kws` in an experiment config)."""

    enabled: bool = False
    labels_per_keyword: list[int] = field(default_factory=lambda: [1, 3, 10])  # per labeled voice
    learning_rates: dict[str, list[float]] = field(
        default_factory=lambda: {"pretrained": [3e-4, 3e-3], "scratch": [3e-3, 3e-2]}
    )
    steps: int = 300
    eval_every: int = 25
    batch_size: int = 32
    warmup_steps: int = 30
    unknown_per_speaker: int = 1
    test_speakers_per_voice: int = 3
    seed: int = 0


class KeywordSpotter(nn.Module):
    """The encoder, mean-pooled over its valid steps, then a linear layer over the labels."""

    def __init__(self, encoder: ConformerSslModel, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_features (batch, frames, mels); attention_mask (batch, frames)
        hidden = self.encoder(input_features=input_features, attention_mask=attention_mask).last_hidden_state
        lengths = self.encoder._get_feat_extract_output_lengths(attention_mask.sum(-1))  # (batch,)
        valid = (torch.arange(hidden.shape[1])[None] < lengths[:, None]).to(hidden.dtype)  # (batch, steps)
        pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)  # (batch, hidden)
        return self.classifier(pooled)  # (batch, classes)


def nested_subsets(rows: Sequence[Mapping[str, Any]], counts: Sequence[int]) -> dict[int, list[int]]:
    """k -> indices of the rows spoken by the first k speakers of each voice. `_silence_` clips (no speaker) follow
    their speaker's clips in the manifest and go with that speaker."""
    rank: dict[str, int] = {}  # speaker -> its position among its voice's speakers
    per_voice: dict[str, int] = {}
    owner: list[int] = []
    current = 0
    for row in rows:
        if row.get("speaker") is not None:
            if row["speaker"] not in rank:
                rank[row["speaker"]] = per_voice.get(row["voice"], 0)
                per_voice[row["voice"]] = rank[row["speaker"]] + 1
            current = rank[row["speaker"]]
        owner.append(current)
    return {k: [i for i, position in enumerate(owner) if position < k] for k in counts}


def _features(extractor: ConformerSslFeatureExtractor, audios: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    return dict(extractor(list(audios), sampling_rate=16000, return_tensors="pt"))


def _accuracy(model: KeywordSpotter, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            part = slice(start, start + batch)
            logits = model(inputs["input_features"][part], inputs["attention_mask"][part])
            correct += int((logits.argmax(-1) == labels[part]).sum())
    model.train()
    return correct / max(len(labels), 1)


def fine_tune(
    encoder_source: str | Path,
    from_scratch: bool,
    train: tuple[Mapping[str, torch.Tensor], torch.Tensor],
    valid: tuple[Mapping[str, torch.Tensor], torch.Tensor],
    classes: int,
    learning_rate: float,
    spec: KwsSpec,
) -> tuple[KeywordSpotter, float, int]:
    """One run; returns the model at its best validation accuracy, that accuracy and its step."""
    torch.manual_seed(spec.seed)
    if from_scratch:
        config = ConformerSslModel.config_class.from_pretrained(str(encoder_source))
        encoder = ConformerSslModel(config)
    else:
        encoder = ConformerSslModel.from_pretrained(str(encoder_source))
    model = KeywordSpotter(encoder, classes)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-3)

    def factor(step: int) -> float:  # linear warmup, then cosine to 0
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - spec.warmup_steps) / max(spec.steps - spec.warmup_steps, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    inputs, labels = train
    rng = np.random.default_rng(spec.seed)
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, 0, {})  # replaced at the first evaluation
    order = rng.permutation(len(labels))
    cursor = 0
    for step in range(1, spec.steps + 1):
        if cursor + spec.batch_size > len(order):
            order, cursor = rng.permutation(len(labels)), 0
        batch = torch.as_tensor(order[cursor : cursor + spec.batch_size])
        cursor += spec.batch_size
        logits = model(inputs["input_features"][batch], inputs["attention_mask"][batch])
        loss = F.cross_entropy(logits, labels[batch])
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % spec.eval_every == 0 or step == spec.steps:
            accuracy = _accuracy(model, *valid, spec.batch_size)
            if accuracy > best[0]:
                best = (accuracy, step, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return model, best[0], best[1]


def kws_run(
    spec: KwsSpec,
    encoder_dir: str | Path,
    init: str,
    k: int,
    train: tuple[Mapping[str, torch.Tensor], torch.Tensor],
    valid: tuple[Mapping[str, torch.Tensor], torch.Tensor],
    test: tuple[Mapping[str, torch.Tensor], torch.Tensor],
    classes: int,
) -> dict[str, Any]:
    """One (init, labels per keyword) cell: every learning rate of the init's grid, the best on validation scored
    on test."""
    start = time.perf_counter()
    best = None
    for lr in spec.learning_rates[init]:
        model, accuracy, step = fine_tune(encoder_dir, init == "scratch", train, valid, classes, lr, spec)
        if best is None or accuracy > best[1]:
            best = (model, accuracy, step, lr)
    model, valid_accuracy, step, lr = best
    accuracy = _accuracy(model, *test, spec.batch_size)
    logger.info("kws %s, %d per keyword: test accuracy %.3f (valid %.3f)", init, k, accuracy, valid_accuracy)
    return {
        "init": init,
        "labels_per_keyword": k,
        "accuracy": round(accuracy, 4),
        "valid_accuracy": round(valid_accuracy, 4),
        "learning_rate": lr,
        "best_step": step,
        "steps": spec.steps,
        "train_clips": len(train[1]),
        "test_clips": len(test[1]),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def run_kws(
    spec: KwsSpec,
    encoder_dir: str | Path,
    train_voices: Sequence[str],
    test_voices: Sequence[str],
    work_dir: str | Path,
    results_dir: str | Path | None = None,
    processes: int = 1,
    encoder_name: str | None = None,
) -> list[dict[str, Any]]:
    """Rows {init, labels_per_keyword, accuracy, valid_accuracy, learning_rate, best_step, ...} for every init and
    subset (`processes` cells at once); with `results_dir`, also written to kws.json there, the encoder named by
    `encoder_name` (default: its path; a committed kws.json should not carry this machine's folders)."""
    from ..synthetic.commands import LABELS, make_command_set

    work_dir = Path(work_dir)
    commands = work_dir / "commands"
    make_command_set(
        commands,
        list(train_voices),
        list(test_voices),
        speakers_per_voice=max(spec.labels_per_keyword),
        valid_speakers_per_voice=1,
        test_speakers_per_voice=spec.test_speakers_per_voice,
        unknown_per_speaker=spec.unknown_per_speaker,
        seed=spec.seed,
        progress=False,
    )
    index = {label: i for i, label in enumerate(LABELS)}
    extractor = ConformerSslFeatureExtractor.from_pretrained(str(encoder_dir))
    splits = {}
    for name in ("train", "valid", "test"):
        rows = [json.loads(line) for line in (commands / f"{name}.jsonl").read_text().splitlines() if line.strip()]
        audios = [load_audio(commands / row["audio_filepath"])[0] for row in rows]
        splits[name] = (rows, _features(extractor, audios), torch.tensor([index[r["label"]] for r in rows]))
    train_rows, train_inputs, train_labels = splits["train"]
    subsets = nested_subsets(train_rows, spec.labels_per_keyword)
    calls = []
    for k in spec.labels_per_keyword:
        picked = torch.tensor(subsets[k])
        train = ({name: value[picked] for name, value in train_inputs.items()}, train_labels[picked])
        for init in KWS_INITS:
            calls.append((spec, encoder_dir, init, k, train, splits["valid"][1:], splits["test"][1:], len(LABELS)))
    from .low_resource import run_in_parallel  # the experiment's process pool (spawned workers)

    results = run_in_parallel(kws_run, calls, processes)
    if results_dir is not None:
        document = {
            "rows": results,
            "encoder": encoder_name or str(encoder_dir),
            "labels": list(LABELS),
            "train_voices": list(train_voices),
            "test_voices": list(test_voices),
            "settings": {k: v for k, v in spec.__dict__.items()},
        }
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        (Path(results_dir) / "kws.json").write_text(json.dumps(document, indent=2) + "\n")
    return results


__all__ = ["KWS_INITS", "KeywordSpotter", "KwsSpec", "fine_tune", "kws_run", "nested_subsets", "run_kws"]
