"""Frame labels for the HuBERT objective: k-means on one layer of a checkpoint's hidden states, or on MFCCs.

`make_kmeans_labels` is what `scripts/make_kmeans_labels.py` runs. Pass 1 encodes the manifest and keeps a
seeded random subset of encoder steps (`max_fit_steps`) to fit k-means (Lloyd iterations in torch, seeded
k-means++ initialisation); pass 2 encodes again and labels every step. The features are a checkpoint's hidden
states (`features="hidden"`, HuBERT's later iterations) or 39-dim MFCCs of the audio (`features="mfcc"`,
HuBERT's first iteration: `mfcc_features`, the DCT of the feature extractor's log-mels plus deltas). With
`kmeans=<kmeans.pt>` the centroids of an earlier run are applied instead of fitted (label a validation
manifest with the training clusters, so that label ids mean the same in both). Output, in `output_dir`:

    labels/<id>.npy        int64 (frames,): one label per 10 ms feature frame (each encoder step's label
                           repeated `subsampling_factor` times), the layout the data pipeline expects;
    manifest.jsonl         the input lines with an absolute `audio_filepath` and `frame_labels` (relative
                           path to the .npy), ready for `frame_labels_key: frame_labels` training;
    kmeans.pt              {"centroids": (k, dim), "features", "layer", "checkpoint", ...};
    summary.json           counts: utterances labelled / skipped (with reasons), steps fitted, clusters used.

Unreadable or too-short utterances are skipped, counted and listed; they never stop the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..data.audio_io import AudioError, load_audio
from ..errors import ConfigError, UserError, check_paths
from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from ..frames import SAMPLING_RATE, num_frames, output_lengths
from ..modeling_conformer_ssl import ConformerSslModel

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- k-means
def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances via ||x||^2 - 2 x.c + ||c||^2 (no (N, K, D) tensor)."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centroids.T + centroids.pow(2).sum(1)[None, :]).clamp(min=0)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Nearest centroid of each row of x (N, D), in chunks to bound memory. Returns (N,) long."""
    return torch.cat([squared_distances(x[i : i + chunk], centroids).argmin(1) for i in range(0, len(x), chunk)])


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability ~ D(x)^2."""
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    nearest = squared_distances(x, centroids)[:, 0]
    for _ in range(1, k):
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        index = torch.multinomial(weights, 1, generator=generator)
        centroids = torch.cat([centroids, x[index]])
        nearest = torch.minimum(nearest, squared_distances(x, x[index])[:, 0])
    return centroids


def fit_kmeans(x: torch.Tensor, k: int, iterations: int = 10, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Lloyd's algorithm on x (N, D) float32. Returns (centroids (k, D), mean squared distance).

    An emptied cluster is re-seeded with the point farthest from its centroid, so all k stay in use.
    """
    if len(x) < k:
        raise ConfigError(f"num_clusters={k} is larger than the {len(x)} steps available to fit; lower it.")
    generator = torch.Generator().manual_seed(seed)
    x = x.float()
    centroids = kmeans_plus_plus(x, k, generator)
    for _ in range(iterations):
        labels = assign(x, centroids)
        counts = torch.bincount(labels, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        updated = sums / counts.clamp(min=1)[:, None]
        empty = counts == 0
        if empty.any():
            distance = squared_distances(x, centroids).gather(1, labels[:, None])[:, 0]
            farthest = distance.topk(int(empty.sum())).indices
            updated[empty] = x[farthest]
        centroids = updated
    labels = assign(x, centroids)
    inertia = squared_distances(x, centroids).gather(1, labels[:, None]).mean().item()
    return centroids, inertia


# ----------------------------------------------------------------------------------------------- MFCC
MFCC_COEFFICIENTS = 13  # HuBERT §IV-A: "39-dimensional MFCC features, which were 13 coefficients with the
DELTA_WIDTH = 2  #       first and the second-order derivatives"; deltas over +-2 frames (Kaldi, torchaudio)


def dct_matrix(num_mel_bins: int, num_coefficients: int = MFCC_COEFFICIENTS) -> torch.Tensor:
    """Orthonormal DCT-II as a (num_mel_bins, num_coefficients) matrix: `log_mel @ M` gives the cepstrum.

    M[n, k] = sqrt(2 / N) * cos(pi / N * (n + 1/2) * k), with column 0 scaled by 1 / sqrt(2) (what
    scipy.fft.dct(..., norm="ortho") and Kaldi's MFCC compute, up to Kaldi's liftering, which HuBERT's
    torchaudio front end leaves at its default 22 and we leave out).
    """
    if not 1 <= num_coefficients <= num_mel_bins:
        raise ValueError(f"num_coefficients={num_coefficients} must be in [1, num_mel_bins={num_mel_bins}]")
    n = torch.arange(num_mel_bins, dtype=torch.float64)[:, None]
    k = torch.arange(num_coefficients, dtype=torch.float64)[None, :]
    matrix = torch.cos(torch.pi / num_mel_bins * (n + 0.5) * k) * (2.0 / num_mel_bins) ** 0.5
    matrix[:, 0] /= 2**0.5
    return matrix.float()


def deltas(x: torch.Tensor, width: int = DELTA_WIDTH) -> torch.Tensor:
    """Regression deltas over time of x (frames, dim), edges repeated (Kaldi / torchaudio.compute_deltas):

    d[t] = sum_{n=1..W} n * (x[t+n] - x[t-n]) / (2 * sum_{n=1..W} n^2).
    """
    padded = torch.cat([x[:1].expand(width, -1), x, x[-1:].expand(width, -1)])  # (frames + 2W, dim)
    frames = len(x)
    numerator = sum(
        n * (padded[width + n : width + n + frames] - padded[width - n : width - n + frames])
        for n in range(1, width + 1)
    )
    return numerator / (2 * sum(n * n for n in range(1, width + 1)))


def mfcc_features(log_mel: torch.Tensor, num_coefficients: int = MFCC_COEFFICIENTS) -> torch.Tensor:
    """(frames, mels) un-normalised log-mels -> (frames, 3 * num_coefficients) MFCC + delta + delta-delta."""
    cepstra = log_mel.float() @ dct_matrix(log_mel.shape[-1], num_coefficients)  # (frames, coefficients)
    first = deltas(cepstra)
    return torch.cat([cepstra, first, deltas(first)], dim=-1)


# ----------------------------------------------------------------------------------------------- data
def read_manifest(path: Path) -> list[dict]:
    """NeMo JSONL lines with `audio_filepath` resolved against the manifest's folder."""
    rows = []
    base = path.resolve().parent
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not a JSON object ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict) or "audio_filepath" not in row:
                raise UserError(f"{path}:{number}: no 'audio_filepath' field")
            audio = Path(row["audio_filepath"])
            row["audio_filepath"] = str(audio if audio.is_absolute() else (base / audio).resolve())
            row.setdefault("id", os.path.splitext(os.path.relpath(row["audio_filepath"], base))[0])
            rows.append(row)
    return rows


def safe_name(identifier: str) -> str:
    """A file name for an utterance id (path separators and odd characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", identifier).strip("_") or "utterance"


@torch.no_grad()
def encode(
    model: ConformerSslModel, extractor: ConformerSslFeatureExtractor, row: dict, layer: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Hidden states (steps, hidden) of one utterance at `layer`, and its number of feature frames."""
    audio = load_row_audio(row, extractor)
    features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt", device=device)
    out = model(features["input_features"], attention_mask=features["attention_mask"], output_hidden_states=True)
    steps = int(out.output_lengths[0])
    return out.hidden_states[layer][0, :steps].float().cpu(), int(features["attention_mask"].sum())


def load_row_audio(row: dict, extractor: ConformerSslFeatureExtractor) -> np.ndarray:
    """The samples of one manifest row (a segment when it has an `offset`), at least the extractor's minimum."""
    duration = row.get("duration") if "offset" in row else None  # a segment of a longer file
    min_duration = extractor.min_samples / extractor.sampling_rate
    audio, _ = load_audio(
        row["audio_filepath"], offset=row.get("offset", 0.0), duration=duration, min_duration=min_duration
    )
    return audio


def encode_mfcc(extractor: ConformerSslFeatureExtractor, row: dict) -> tuple[torch.Tensor, int]:
    """MFCCs (frames, 39) of one utterance from the extractor's raw log-mels (no per-utterance normalisation:
    HuBERT clusters plain MFCCs), and its number of feature frames (the same count)."""
    audio = load_row_audio(row, extractor)
    log_mel = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt", do_normalize=False)
    features = mfcc_features(log_mel["input_features"][0])  # (frames, 39)
    return features, len(features)


def frame_labels_from_steps(step_labels: np.ndarray, factor: int, frames: int) -> np.ndarray:
    """Repeat each encoder step's label over its `factor` frames and cut to the utterance's frames."""
    return np.repeat(step_labels.astype(np.int64), factor)[:frames]


# ----------------------------------------------------------------------------------------------- the run
FEATURES = ("hidden", "mfcc")


def make_kmeans_labels(
    checkpoint: str | os.PathLike | None,
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    layer: int = -1,
    num_clusters: int = 100,
    iterations: int = 10,
    max_fit_steps: int = 200_000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    features: str = "hidden",
    kmeans: str | os.PathLike | None = None,
) -> dict:
    """Fit k-means on `features` over `manifest` and write the frame labels (see the module doc).

    Args:
        checkpoint: a `save_pretrained` folder of any ConformerSsl head (its encoder is used); None for MFCCs.
        manifest: NeMo JSONL manifest of the utterances to label.
        output_dir: where labels/, manifest.jsonl, kmeans.pt and summary.json go.
        layer: hidden-state index: 0 = after subsampling, k = after block k, -1 = last.
        features: "hidden" (`layer` of `checkpoint`, one label per encoder step) or "mfcc" (one per 10 ms
            frame; `checkpoint` and `layer` are not used).
        kmeans: a kmeans.pt written by an earlier run: its centroids label `manifest`, nothing is fitted.
    Returns the summary written to summary.json.
    """
    if features not in FEATURES:
        raise ConfigError(f"--features={features!r} is invalid: expected one of {FEATURES}.")
    manifest, output_dir = Path(manifest), Path(output_dir)
    check_paths([manifest], "--manifest")
    device = torch.device(device)
    if features == "hidden":
        if checkpoint is None:
            raise ConfigError("--checkpoint is required with --features=hidden (or use --features=mfcc).")
        check_paths([checkpoint], "--checkpoint", kind="path")
        model = ConformerSslModel.from_pretrained(checkpoint).to(device).eval()
        config = model.config
        n = config.num_hidden_layers
        if not -n - 1 <= layer <= n:
            raise ConfigError(f"--layer={layer}: the checkpoint has {n + 1} hidden states, use [{-n - 1}, {n}].")
        try:
            extractor = ConformerSslFeatureExtractor.from_pretrained(checkpoint)
        except OSError:
            extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins)
        if extractor.feature_size != config.num_mel_bins:
            raise ConfigError(f"feature extractor has {extractor.feature_size} mels, the model {config.num_mel_bins}.")
        factor, dim = config.subsampling_factor, config.hidden_size
        featurize = lambda row: encode(model, extractor, row, layer, device)  # noqa: E731
    else:
        extractor = ConformerSslFeatureExtractor()  # 80 log-mels, the models' front end
        factor, dim = 1, 3 * MFCC_COEFFICIENTS
        featurize = lambda row: encode_mfcc(extractor, row)  # noqa: E731
        checkpoint, layer = None, None
    rows = read_manifest(manifest)
    skipped: Counter = Counter()
    problems: list[str] = []

    def features_of(row: dict) -> tuple[torch.Tensor, int] | None:
        try:
            return featurize(row)
        except (AudioError, ValueError) as error:
            reason = getattr(error, "reason", "unusable")
            skipped[reason] += 1
            problems.append(f"{row['audio_filepath']}: {reason}: {error}")
            logger.warning("skipping %s: %s", row["audio_filepath"], error)
            return None

    if kmeans is not None:  # apply earlier centroids: one pass
        check_paths([kmeans], "--kmeans")
        fitted = torch.load(kmeans, weights_only=False)
        centroids, inertia = fitted["centroids"], float(fitted.get("inertia", float("nan")))
        if fitted.get("features", "hidden") != features or centroids.shape[1] != dim:
            raise ConfigError(
                f"--kmeans={str(kmeans)!r} holds {fitted.get('features', 'hidden')} centroids of dimension "
                f"{centroids.shape[1]}, but --features={features} gives {dim}; pass the kmeans.pt made from the "
                "same features (and checkpoint)"
            )
        num_clusters = len(centroids)
        usable, fit_steps = rows, 0
    else:
        # Pass 1: a seeded uniform subset of steps (each step kept with probability max_fit_steps / total steps).
        generator = torch.Generator().manual_seed(seed)
        frames = [num_frames(round(float(r.get("duration", 0)) * SAMPLING_RATE)) for r in rows]
        total_steps = int(output_lengths(torch.tensor(frames), factor).sum()) if rows else 0
        keep_prob = min(1.0, max_fit_steps / max(total_steps, 1))
        fit_rows, usable = [], []
        for row in rows:
            encoded = features_of(row)
            if encoded is None:
                continue
            usable.append(row)
            hidden, _ = encoded  # (steps, dim)
            keep = torch.rand(len(hidden), generator=generator) < keep_prob
            fit_rows.append(hidden[keep])
        fit = torch.cat(fit_rows) if fit_rows else torch.zeros(0, dim)
        centroids, inertia = fit_kmeans(fit, num_clusters, iterations, seed)
        fit_steps = len(fit)
        logger.info(
            "k-means: %d clusters on %d %s steps, mean squared distance %.4f",
            num_clusters,
            fit_steps,
            features,
            inertia,
        )

    # Pass 2: label every step of every readable utterance.
    labels_dir = output_dir / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    usage = torch.zeros(num_clusters, dtype=torch.long)
    written = 0
    with open(output_dir / "manifest.jsonl", "w", encoding="utf-8") as handle:
        for row in usable:  # when fitting, the bad ones were counted in pass 1
            encoded = features_of(row) if kmeans is not None else featurize(row)
            if encoded is None:
                continue
            hidden, frame_count = encoded
            step_labels = assign(hidden, centroids)
            usage += torch.bincount(step_labels, minlength=num_clusters)
            name = f"{safe_name(str(row['id']))}.npy"
            labels = frame_labels_from_steps(step_labels.numpy(), factor, frame_count)
            np.save(labels_dir / name, labels)
            handle.write(json.dumps({**row, "frame_labels": f"labels/{name}"}) + "\n")
            written += 1
    torch.save(
        {
            "centroids": centroids,
            "features": features,
            "layer": layer,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "num_clusters": num_clusters,
            "inertia": inertia,
        },
        output_dir / "kmeans.pt",
    )
    summary = {
        "utterances": len(rows),
        "labelled": written,
        "skipped": dict(skipped),
        "problems": problems,
        "features": features,
        "fitted": kmeans is None,
        "fit_steps": fit_steps,
        "clusters_used": int((usage > 0).sum()),
        "num_clusters": num_clusters,
        "layer": layer,
        "inertia": inertia,
    }
    with open(output_dir / "summary.json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    logger.info("labelled %d of %d utterances; skipped %s", written, len(rows), dict(skipped) or "none")
    return summary


__all__ = [
    "FEATURES",
    "assign",
    "dct_matrix",
    "deltas",
    "fit_kmeans",
    "frame_labels_from_steps",
    "kmeans_plus_plus",
    "make_kmeans_labels",
    "mfcc_features",
]
