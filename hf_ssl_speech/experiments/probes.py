"""SUPERB-style probes: what a FROZEN encoder's layers know, read by a small head on a learned weighted sum of layers
(Yang et al. 2021), next to the same head on log-mel features (SUPERB's FBANK row).

Tasks, each on data no probe trained on:
- `speaker_id` (SUPERB SID): pseudo-speakers of the unlabeled pool, disjoint utterances for train/valid/test;
  mean-pooled features, linear head, accuracy.
- `keyword_spotting` (SUPERB KS): a synthetic speech-commands set (`synthetic.commands`: 12 words, `_unknown_`,
  `_silence_`), trained on the labeled voices and tested on held-out voices; mean-pooled, linear, accuracy.
- `phone_recognition` (SUPERB PR): espeak-ng's phonemes of the transcripts (`synthetic.phonemes`), a frame-level
  linear CTC head, phone error rate on the test voices.

How a probe is trained. Features are computed once per encoder: every hidden state (the subsampling output and each
block) of `ConformerSslModel`, standardised per dimension with training-set statistics. FBANK is the feature
extractor's 80 log-mels before its per-utterance normalisation (which would leave mean-pooled features all zero),
with `subsampling_factor` consecutive frames stacked so that it runs at the encoder's rate.
The head sees softmax(w)-weighted sums of the layers (w learned with the head); for speaker ID
(`ProbeSpec.input_layer`) the FBANK features join the sum as layer 0 through a linear map, as SUPERB's sum
starts at the input side, so the encoders' per-utterance input normalisation cannot hide what FBANK sees. Every setting that is chosen (the
learning rate) is chosen on the validation split; the test split is scored once, with the chosen one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.audio_io import AudioError, load_audio
from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from ..modeling_conformer_ssl import ConformerSslModel
from .report import beats_fbank

logger = logging.getLogger(__name__)

FBANK = "fbank"
TASKS = ("speaker_id", "keyword_spotting", "phone_recognition")
METRICS = {
    "speaker_id": ("accuracy", True),
    "keyword_spotting": ("accuracy", True),
    "phone_recognition": ("per", False),
}


@dataclass
class ProbeSpec:
    """Sizes and training of the probes (`probes.settings` in an experiment config)."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    speakers: int = 40  # pool speakers of speaker_id (those with the most utterances)
    speaker_label: str = "speaker"  # the manifest field told apart: "speaker" (pseudo-speaker) or "voice" (base voice)
    speaker_utterances: list[int] = field(default_factory=lambda: [8, 3, 4])  # train / valid / test per speaker
    # utterance tasks whose encoder heads also get the log-mels as layer 0 of the weighted sum (`WeightedSumHead`)
    input_layer: list[str] = field(default_factory=lambda: ["speaker_id"])
    phone_utterances: list[int] = field(default_factory=lambda: [600, 150, 300])  # train / valid / test
    command_speakers_per_voice: int = 3
    command_unknown_per_speaker: int = 2
    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 1e-2])
    utterance_steps: int = 300  # full-batch Adam steps of the utterance-level heads
    phone_epochs: int = 20
    batch_size: int = 32
    seed: int = 0


@dataclass
class ProbeData:
    """Where each task's data comes from (`stage_probes` fills it from the experiment's corpus)."""

    speaker_manifest: Path
    phone_train_manifest: Path
    phone_valid_manifest: Path
    phone_test_manifest: Path
    command_train_voices: list[str]
    command_test_voices: list[str]
    commands_dir: Path


# ============================================================================================ features
def _read_manifest(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        row["path"] = str(Path(path).parent / row["audio_filepath"])
    return rows


def _load(rows: Sequence[Mapping[str, Any]]) -> tuple[list[np.ndarray], list[int]]:
    """Waveforms of the rows that decode; the indices of those rows."""
    audios, kept = [], []
    for index, row in enumerate(rows):
        try:
            audios.append(load_audio(row["path"])[0])
            kept.append(index)
        except AudioError as error:
            logger.warning("probes: skipping %s", error)
    return audios, kept


@torch.no_grad()
def layer_features(
    encoder: ConformerSslModel | None,
    extractor: ConformerSslFeatureExtractor,
    audios: Sequence[np.ndarray],
    stack: int,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per utterance (layers, steps, dim): every hidden state of `encoder`, or with `encoder=None` the log-mels with
    `stack` frames stacked (1, steps, 80 * stack). Batched in length order, unpadded on return."""
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    out: list[torch.Tensor | None] = [None] * len(audios)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        waves = [audios[i] for i in chunk]
        # FBANK: the raw log-mels. The models' input is standardised per utterance, which would leave a mean-pooled
        # FBANK head nothing but zeros; the probe standardises with training-set statistics instead.
        inputs = extractor(waves, sampling_rate=16000, return_tensors="pt", do_normalize=encoder is not None)
        frames = inputs["attention_mask"].sum(-1)
        if encoder is None:
            mels = inputs["input_features"]  # (batch, frames, 80)
            steps = mels.shape[1] // stack
            stacked = mels[:, : steps * stack].reshape(mels.shape[0], steps, -1)[:, None]  # (batch, 1, steps, 80*stack)
            lengths = frames // stack
        else:
            output = encoder(**inputs, output_hidden_states=True)
            stacked = torch.stack(output.hidden_states, dim=1)  # (batch, layers, steps, hidden)
            lengths = encoder._get_feat_extract_output_lengths(frames)
        for position, index in enumerate(chunk):
            out[index] = stacked[position, :, : max(int(lengths[position]), 1)].float().clone()
    return out  # type: ignore[return-value]


def _standardiser(train: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and dimension mean and std over all training frames: (layers, 1, dim) each."""
    frames = torch.cat([f for f in train], dim=1)  # (layers, all steps, dim)
    return frames.mean(1, keepdim=True), frames.std(1, keepdim=True).clamp_min(1e-5)


# ============================================================================================ heads
class WeightedSumHead(nn.Module):
    """softmax(w)-weighted sum over layers, then a linear layer (SUPERB's downstream for SID/KS/PR).

    With `input_dim`, the model's input features join the sum as an extra layer 0 through a linear map to `dim`:
    SUPERB's weighted sum starts at the upstream's input side, and our encoders standardise every utterance before
    the first layer, which removes the level and spectral tilt a speaker head on FBANK can use.
    """

    def __init__(self, layers: int, dim: int, classes: int, input_dim: int = 0) -> None:
        super().__init__()
        self.input_projection = nn.Linear(input_dim, dim) if input_dim else None
        self.layer_logits = nn.Parameter(torch.zeros(layers + (1 if input_dim else 0)))
        self.linear = nn.Linear(dim, classes)

    def forward(self, features: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        # features (batch, layers, [steps,] dim); inputs (batch, [steps,] input_dim), with `input_dim` only
        if self.input_projection is not None:
            features = torch.cat([self.input_projection(inputs).unsqueeze(1), features], 1)
        weights = torch.softmax(self.layer_logits, 0)
        shape = (1, -1) + (1,) * (features.dim() - 2)
        return self.linear((features * weights.view(shape)).sum(1))

    def layer_weights(self) -> list[float]:
        return [round(float(w), 4) for w in torch.softmax(self.layer_logits.detach(), 0)]


def _fit_utterance_head(pooled, labels, inputs, classes, lr, steps, seed) -> WeightedSumHead:
    torch.manual_seed(seed)
    head = WeightedSumHead(pooled.shape[1], pooled.shape[2], classes, inputs.shape[-1] if inputs is not None else 0)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(head(pooled, inputs), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return head


def _accuracy(head: WeightedSumHead, pooled: torch.Tensor, labels: torch.Tensor, inputs=None) -> float:
    with torch.no_grad():
        return float((head(pooled, inputs).argmax(-1) == labels).float().mean())


def _pooled(splits: Mapping[str, tuple[list[torch.Tensor], Any]]) -> dict[str, torch.Tensor]:
    """Per split (utterances, layers, dim): features standardised with training statistics, mean over steps."""
    mean, std = _standardiser(splits["train"][0])
    return {name: torch.stack([((f - mean) / std).mean(1) for f in feats]) for name, (feats, _) in splits.items()}


def utterance_probe(
    splits: Mapping[str, tuple[list[torch.Tensor], list[int]]],
    classes: int,
    spec: ProbeSpec,
    inputs: Mapping[str, tuple[list[torch.Tensor], Any]] | None = None,
):
    """Mean-pooled features -> linear head; the learning rate with the best VALIDATION accuracy is kept. `inputs`
    (FBANK's features of the same utterances) join the weighted sum as layer 0 (`WeightedSumHead`)."""
    pooled = {name: (features, torch.tensor(splits[name][1])) for name, features in _pooled(splits).items()}
    extra = {name: f[:, 0] for name, f in _pooled(inputs).items()} if inputs is not None else {}
    best = None
    for lr in spec.learning_rates:
        head = _fit_utterance_head(*pooled["train"], extra.get("train"), classes, lr, spec.utterance_steps, spec.seed)
        valid = _accuracy(head, *pooled["valid"], extra.get("valid"))
        if best is None or valid > best[0]:
            best = (valid, lr, head)
    valid, lr, head = best
    return {
        "value": _accuracy(head, *pooled["test"], extra.get("test")),
        "valid": valid,
        "learning_rate": lr,
        "layers": head.layer_weights(),
    }


def _phone_batches(feats, targets, batch_size, rng=None):
    order = sorted(range(len(feats)), key=lambda i: feats[i].shape[1])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    for batch in batches:
        lengths = torch.tensor([feats[i].shape[1] for i in batch])
        padded = torch.zeros(len(batch), feats[batch[0]].shape[0], int(lengths.max()), feats[batch[0]].shape[2])
        for row, i in enumerate(batch):
            padded[row, :, : lengths[row]] = feats[i]
        yield batch, padded, lengths, [targets[i] for i in batch]


def _phone_error_rate(head, feats, references, vocab, batch_size) -> float:
    import jiwer

    inverse = {i: p for p, i in vocab.items()}
    hypotheses = [""] * len(feats)
    with torch.no_grad():
        for batch, padded, lengths, _ in _phone_batches(feats, references, batch_size):
            ids = head(padded).argmax(-1)  # (batch, steps)
            for row, i in enumerate(batch):
                path = ids[row, : lengths[row]].tolist()
                collapsed = [p for k, p in enumerate(path) if p != 0 and (k == 0 or p != path[k - 1])]
                hypotheses[i] = " ".join(inverse[p] for p in collapsed)
    refs = [" ".join(r) for r in references]
    return float(jiwer.wer(refs, [h if h else "<none>" for h in hypotheses]))


def phone_probe(splits, spec: ProbeSpec):
    """Frame-level linear CTC head over espeak phones; the learning rate with the best VALIDATION PER is kept."""
    vocab = {"<blank>": 0}
    for phones in splits["train"][1]:
        for p in phones:
            vocab.setdefault(p, len(vocab))
    mean, std = _standardiser(splits["train"][0])
    norm = {name: [(f - mean) / std for f in feats] for name, (feats, _) in splits.items()}
    best = None
    for lr in spec.learning_rates:
        torch.manual_seed(spec.seed)
        rng = np.random.default_rng(spec.seed)
        layers, _, dim = norm["train"][0].shape
        head = WeightedSumHead(layers, dim, len(vocab))
        optimiser = torch.optim.Adam(head.parameters(), lr=lr)
        train_targets = splits["train"][1]
        for _ in range(spec.phone_epochs):
            for _, padded, lengths, phones in _phone_batches(norm["train"], train_targets, spec.batch_size, rng):
                log_probs = torch.log_softmax(head(padded), -1).transpose(0, 1)  # (steps, batch, vocab)
                targets = torch.tensor([vocab[p] for seq in phones for p in seq])
                loss = F.ctc_loss(
                    log_probs, targets, lengths, torch.tensor([len(s) for s in phones]), zero_infinity=True
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        valid = _phone_error_rate(head, norm["valid"], splits["valid"][1], vocab, spec.batch_size)
        if best is None or valid < best[0]:
            best = (valid, lr, head)
    valid, lr, head = best
    test = _phone_error_rate(head, norm["test"], splits["test"][1], vocab, spec.batch_size)
    return {
        "value": test,
        "valid": valid,
        "learning_rate": lr,
        "layers": head.layer_weights(),
        "phones": len(vocab) - 1,
    }


# ============================================================================================ tasks' data
def speaker_splits(manifest: Path, spec: ProbeSpec) -> tuple[dict[str, list[dict]], int]:
    """Utterances of the `spec.speakers` pool speakers with the most utterances, split train/valid/test per speaker."""
    if spec.speaker_label not in ("speaker", "voice"):
        raise ValueError(f"probes.settings.speaker_label={spec.speaker_label!r}: choose 'speaker' or 'voice'")
    rows = _read_manifest(manifest)
    by_speaker: dict[str, list[dict]] = {}
    for row in rows:
        by_speaker.setdefault(row[spec.speaker_label], []).append(row)
    need = sum(spec.speaker_utterances)
    eligible = sorted((s for s, r in by_speaker.items() if len(r) >= need), key=lambda s: (-len(by_speaker[s]), s))
    chosen = sorted(eligible[: spec.speakers])
    if len(chosen) < 2:
        raise ValueError(
            f"speaker_id probe: {len(chosen)} speakers have {need} utterances; lower probes.settings.speaker_utterances"
        )
    rng = np.random.default_rng(spec.seed)
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for label, speaker in enumerate(chosen):
        picked = rng.permutation(len(by_speaker[speaker]))[:need]
        a, b = spec.speaker_utterances[0], spec.speaker_utterances[0] + spec.speaker_utterances[1]
        for name, part in (("train", picked[:a]), ("valid", picked[a:b]), ("test", picked[b:need])):
            splits[name] += [{**by_speaker[speaker][i], "label": label} for i in part]
    return splits, len(chosen)


def command_splits(data: ProbeData, spec: ProbeSpec) -> tuple[dict[str, list[dict]], list[str]]:
    from ..synthetic.commands import LABELS, make_command_set

    make_command_set(
        data.commands_dir,
        data.command_train_voices,
        data.command_test_voices,
        speakers_per_voice=spec.command_speakers_per_voice,
        valid_speakers_per_voice=1,
        unknown_per_speaker=spec.command_unknown_per_speaker,
        seed=spec.seed,
        progress=False,
    )
    index = {label: i for i, label in enumerate(LABELS)}
    splits = {}
    for name in ("train", "valid", "test"):
        rows = _read_manifest(data.commands_dir / f"{name}.jsonl")
        splits[name] = [{**row, "label": index[row["label"]]} for row in rows]
    return splits, list(LABELS)


def phone_splits(data: ProbeData, spec: ProbeSpec) -> dict[str, list[dict]]:
    from ..finetune.text import normalize_transcript
    from ..synthetic.phonemes import phonemize_many

    splits = {}
    for name, manifest, count in zip(
        ("train", "valid", "test"),
        (data.phone_train_manifest, data.phone_valid_manifest, data.phone_test_manifest),
        spec.phone_utterances,
    ):
        rows = _read_manifest(manifest)[:count]
        phones = phonemize_many([normalize_transcript(r["text"]) for r in rows], "en-us")
        splits[name] = [{**row, "phones": p} for row, p in zip(rows, phones) if p]
    return splits


# ============================================================================================ driver
def run_probes(
    spec: ProbeSpec,
    encoders: Mapping[str, str | Path],
    data: ProbeData,
    out_dir: str | Path,
    results_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Every task for FBANK and every encoder ({features name: pretrained folder}); rows of
    {task, features, metric, value, higher_is_better, valid, learning_rate, layer_weights}. With `results_dir`,
    writes probes.json, probes.md and probes.png there."""
    unknown = sorted(set(spec.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"probes.settings.tasks: unknown {unknown}; choose from {list(TASKS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task_rows: dict[str, dict[str, list[dict]]] = {}
    summary: dict[str, Any] = {}
    if "speaker_id" in spec.tasks:
        task_rows["speaker_id"], summary["speakers"] = speaker_splits(data.speaker_manifest, spec)
    if "keyword_spotting" in spec.tasks:
        task_rows["keyword_spotting"], summary["keyword_labels"] = command_splits(data, spec)
    if "phone_recognition" in spec.tasks:
        task_rows["phone_recognition"] = phone_splits(data, spec)
    audio = {
        task: {name: _load(rows) for name, rows in splits.items()} for task, splits in task_rows.items()
    }  # task -> split -> (waveforms, kept indices)
    summary["utterances"] = {t: {n: len(a[0]) for n, a in s.items()} for t, s in audio.items()}

    features_sets: dict[str, tuple[ConformerSslModel | None, ConformerSslFeatureExtractor, int]] = {}
    first = None
    for name, folder in encoders.items():
        encoder = ConformerSslModel.from_pretrained(str(folder)).eval()
        extractor = ConformerSslFeatureExtractor.from_pretrained(str(folder))
        features_sets[name] = (encoder, extractor, encoder.config.subsampling_factor)
        first = first or (extractor, encoder.config.subsampling_factor)
    extractor, stack = first if first else (ConformerSslFeatureExtractor(), 4)
    features_sets = {FBANK: (None, extractor, stack), **features_sets}

    rows = []
    fbank: dict[str, dict[str, tuple[list[torch.Tensor], list[int]]]] = {}  # task -> FBANK's features (layer 0)
    for features, (encoder, extractor, stack) in features_sets.items():
        for task, splits in audio.items():
            t0 = time.perf_counter()
            feats = {
                name: (layer_features(encoder, extractor, waves, stack), kept) for name, (waves, kept) in splits.items()
            }
            if encoder is None:
                fbank[task] = feats
            if task == "phone_recognition":
                inputs = {n: (f, [task_rows[task][n][i]["phones"] for i in kept]) for n, (f, kept) in feats.items()}
                result = phone_probe(inputs, spec)
            else:
                inputs = {n: (f, [task_rows[task][n][i]["label"] for i in kept]) for n, (f, kept) in feats.items()}
                classes = max(label for _, labels in inputs.values() for label in labels) + 1
                layer0 = fbank[task] if encoder is not None and task in spec.input_layer else None
                result = utterance_probe(inputs, classes, spec, layer0)
            metric, higher = METRICS[task]
            row = {
                "task": task,
                "features": features,
                "metric": metric,
                "value": round(result["value"], 4),
                "higher_is_better": higher,
                "valid": round(result["valid"], 4),
                "learning_rate": result["learning_rate"],
                "layer_weights": result["layers"],
                "input_layer": encoder is not None and task in spec.input_layer,  # layer_weights[0]: the log-mels
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            logger.info("probe %s / %s: %s %.4f (valid %.4f)", task, features, metric, row["value"], row["valid"])
            rows.append(row)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    (out_dir / "probes.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")
    if results_dir is not None:
        write_probe_report(rows, summary, spec, Path(results_dir))
    return rows


def write_probe_report(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], spec: ProbeSpec, folder: Path):
    """probes.json (rows, settings, data sizes), probes.md (a table) and probes.png (a bar per task and features)."""
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "rows": list(rows),
        "settings": asdict(spec),
        "summary": dict(summary),
        "beats_fbank": beats_fbank(rows),
    }
    (folder / "probes.json").write_text(json.dumps(document, indent=2) + "\n")
    features = list(dict.fromkeys(r["features"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    table = {(r["task"], r["features"]): r for r in rows}
    lines = [
        "| task | metric | " + " | ".join(features) + " |",
        "|---|---|" + "---|" * len(features),
    ]
    for task in tasks:
        metric, higher = METRICS[task]
        cells = []
        for f in features:
            r = table.get((task, f))
            cells.append("" if r is None else f"{100 * r['value']:.1f}%")
        lines.append(f"| {task} | {metric} ({'higher' if higher else 'lower'} is better) | " + " | ".join(cells) + " |")
    lines += ["", "Layer weights (softmax; first: the log-mel input where marked, then the subsampling output):", ""]
    for r in rows:
        if r["features"] != FBANK:
            first = " (first: log-mel input)" if r.get("input_layer") else ""
            lines.append(f"- {r['task']} / {r['features']}: {r['layer_weights']}{first} (lr {r['learning_rate']:g})")
    (folder / "probes.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        values = [100 * table[(task, f)]["value"] if (task, f) in table else 0 for f in features]
        ax.bar(features, values, color=["#999999"] + ["#3b75af"] * (len(features) - 1))
        metric, higher = METRICS[task]
        ax.set_title(f"{task}\n{metric} % ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle("Frozen-encoder probes (weighted sum of layers) vs log-mel FBANK, held-out data", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "probes.png", dpi=110)
    plt.close(fig)


__all__ = ["FBANK", "TASKS", "ProbeData", "ProbeSpec", "WeightedSumHead", "beats_fbank", "layer_features", "run_probes"]
