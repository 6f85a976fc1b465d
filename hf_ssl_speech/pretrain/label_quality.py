"""How good are k-means frame labels? Code usage, and their agreement with phones (HuBERT paper, Hsu et al. 2021).

Without phone labels: `code_usage` counts the codes used and the entropy of the code distribution (bits; its
maximum is log2 k when every code is equally frequent).

With frame-level phone labels y aligned to the codes z (one of each per 10 ms frame), the HuBERT paper's
three measures (§IV-D, "Analysis") come from the joint distribution p(y, z) of frame counts:

    phone purity   = E_{p(z)} [ max_y p(y | z) ]     how phone-pure each code is (rises with k)
    cluster purity = E_{p(y)} [ max_z p(z | y) ]     how much one code holds each phone (falls with k)
    PNMI           = I(y; z) / H(y)                  the share of phone uncertainty a code removes

`label_quality` reads a labels folder written by `kmeans.make_kmeans_labels` and, optionally, one written by
`synthetic.alignment.write_phone_labels`, and pairs their files by name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..targets import codebook_usage


def code_usage(codes: np.ndarray, num_clusters: int) -> dict[str, float]:
    """Codes used (of `num_clusters`), entropy of the code distribution in bits, and that entropy / log2 k.

    The same histogram statistics the pretraining loop logs for its codebooks (`targets.codebook_usage`), in bits.
    """
    counts = np.bincount(np.asarray(codes).ravel(), minlength=num_clusters).astype(np.float64)
    usage = codebook_usage(torch.from_numpy(counts)[None])
    entropy = float(usage["entropy"][0]) / math.log(2)
    return {
        "codes_used": int((counts > 0).sum()),
        "num_clusters": int(num_clusters),
        "entropy_bits": entropy,
        "normalized_entropy": float(entropy / np.log2(num_clusters)) if num_clusters > 1 else 0.0,
    }


def joint_counts(phones: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(num phones, num codes) frame counts of each (phone, code) pair; both inputs (frames,) non-negative ints."""
    phones, codes = np.asarray(phones).ravel(), np.asarray(codes).ravel()
    if phones.shape != codes.shape:
        raise ValueError(f"phones {phones.shape} and codes {codes.shape} must have one entry per frame each")
    joint = np.zeros((int(phones.max(initial=-1)) + 1, int(codes.max(initial=-1)) + 1), dtype=np.int64)
    np.add.at(joint, (phones, codes), 1)
    return joint


def phone_code_metrics(joint: np.ndarray) -> dict[str, float]:
    """Phone purity, cluster purity and PNMI of a (phones, codes) count matrix (see the module doc)."""
    total = joint.sum()
    if total == 0:
        raise ValueError("no frames to score: the phone and code labels share no frame")
    p = joint / total  # p(y, z)
    p_y, p_z = p.sum(1), p.sum(0)  # (phones,), (codes,)
    # E_z[max_y p(y|z)] = sum_z p(z) max_y p(y, z) / p(z) = sum_z max_y p(y, z); likewise for cluster purity.
    phone_purity = float(p.max(0).sum())
    cluster_purity = float(p.max(1).sum())
    nz = p > 0
    mutual_information = float((p[nz] * np.log(p[nz] / np.outer(p_y, p_z)[nz])).sum())
    h_y = float(-(p_y[p_y > 0] * np.log(p_y[p_y > 0])).sum())
    return {
        "phone_purity": phone_purity,
        "cluster_purity": cluster_purity,
        "pnmi": mutual_information / h_y if h_y > 0 else 0.0,
    }


def label_quality(
    labels_dir: str | os.PathLike, num_clusters: int, phones_dir: str | os.PathLike | None = None
) -> dict[str, float | int]:
    """Code usage of every labels/<id>.npy under `labels_dir`, and the phone metrics on the utterances that
    also have phone labels under `phones_dir` (frames paired one to one; a length mismatch of a frame or two
    at the end, from rounding, is cut; more is an error)."""
    label_files = sorted((Path(labels_dir) / "labels").glob("*.npy"))
    if not label_files:
        raise UserError(f"{labels_dir}: no labels/*.npy to score; make the k-means labels first")
    codes = {path.stem: np.load(path) for path in label_files}
    report: dict[str, float | int] = {"utterances": len(codes), "frames": sum(len(c) for c in codes.values())}
    report.update(code_usage(np.concatenate(list(codes.values())), num_clusters))
    if phones_dir is None:
        return report
    paired_phones, paired_codes = [], []
    for stem, code in codes.items():
        path = Path(phones_dir) / "labels" / f"{stem}.npy"
        if not path.is_file():
            continue
        phone = np.load(path).astype(np.int64)
        if abs(len(phone) - len(code)) > 2:
            raise UserError(
                f"{path}: {len(phone)} phone frames but {len(code)} code frames for the same utterance; the phone "
                "labels belong to other audio: delete the phone-label folder to make it again"
            )
        n = min(len(phone), len(code))
        paired_phones.append(phone[:n])
        paired_codes.append(code[:n])
    report["phone_labelled_utterances"] = len(paired_phones)
    if paired_phones:
        joint = joint_counts(np.concatenate(paired_phones), np.concatenate(paired_codes))
        report["phone_labelled_frames"] = int(joint.sum())
        report.update(phone_code_metrics(joint))
    return report


__all__ = ["code_usage", "joint_counts", "label_quality", "phone_code_metrics"]
