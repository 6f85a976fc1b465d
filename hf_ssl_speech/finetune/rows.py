"""Labelled data as metadata rows: NeMo manifests indexed into rows, rows into `datasets.Dataset`s, rows decoded."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import AudioError, DataConfig, ManifestSource, RawExample, decode_example
from ..errors import check_paths
from ..frames import SAMPLING_RATE
from ..synthetic.corpus import ensure_demo_corpus
from .args import DataArguments
from .text import normalize_transcript

logger = logging.getLogger(__name__)


# ============================================================================================ data
ROW_COLUMNS = ("id", "audio_filepath", "where", "offset", "read_duration", "text", "speaker", "source")


def manifest_rows(
    manifests: Sequence[str],
    min_duration: float = 0.0,
    max_duration: float | None = None,
    require_text: bool = False,
    label_column: str | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """
    Index NeMo manifests into metadata rows (no audio is decoded).

    Args:
        manifests: JSONL files; relative audio paths resolve against each manifest's folder.
        min_duration / max_duration: rows outside [min, max] seconds are left out (and counted).
        require_text: leave out rows with an empty transcript (CTC).
        label_column: also read this manifest field into `label` (classification); rows without it are left out.
        limit: keep only the first N rows (over all manifests).

    Returns:
        rows: dicts with `ROW_COLUMNS`, `duration` (seconds), `length` (samples, for group_by_length) and
        `label` when `label_column` is set; left_out: count of rows left out per reason.
    """
    rows: list[dict[str, Any]] = []
    left_out: dict[str, int] = {}

    def leave_out(reason: str) -> None:
        left_out[reason] = left_out.get(reason, 0) + 1

    for manifest in manifests:
        source = ManifestSource(manifest)
        for reason, _, _ in source.problems:
            leave_out(reason)
        labels = _read_column(manifest, label_column) if label_column else None
        for index in range(len(source)):
            duration = float(source.durations[index])
            if duration < min_duration:
                leave_out("too_short")
                continue
            if max_duration is not None and duration > max_duration:
                leave_out("too_long")
                continue
            raw = source.raw(index)
            if require_text and not normalize_transcript(raw.text):
                leave_out("no_text")
                continue
            row = {
                "id": raw.id,
                "audio_filepath": os.fspath(raw.audio),
                "where": raw.where,
                "offset": float(raw.offset),
                "read_duration": raw.duration,
                "text": raw.text,
                "speaker": raw.speaker,
                "source": raw.source,
                "duration": duration,
                "length": int(round(duration * SAMPLING_RATE)),
            }
            if labels is not None:
                value = labels.get(int(source.line_numbers[index]))
                if value is None:
                    leave_out(f"no_{label_column}")
                    continue
                row["label"] = str(value)
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    if left_out:
        logger.warning("left out of %s: %s", ", ".join(manifests), left_out)
    return rows, left_out


def _read_column(manifest: str, column: str) -> dict[int, Any]:
    """line number (1-based) -> value of `column`, for the lines that have it."""
    values = {}
    with open(manifest, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    value = json.loads(line).get(column)
                except (json.JSONDecodeError, AttributeError):
                    continue
                if value is not None:
                    values[number] = value
    return values


def eval_set_names(manifests: Sequence[str]) -> list[str]:
    """Short unique names for eval manifests: the file stem, or `<folder>_<stem>` when stems repeat."""
    stems = [Path(m).stem for m in manifests]
    names = [s if stems.count(s) == 1 else f"{Path(m).parent.name}_{s}" for m, s in zip(manifests, stems)]
    if len(set(names)) < len(names):
        names = [f"{index}_{name}" for index, name in enumerate(names)]
    return names


def rows_to_dataset(rows: Sequence[Mapping[str, Any]], augment: bool):
    """A `datasets.Dataset` of metadata rows; `augment` marks training rows (dither + SpecAugment)."""
    import datasets

    if not rows:
        raise ValueError("no usable rows: every manifest row was left out (see the warning above) or none was given")
    return datasets.Dataset.from_list([{**row, "augment": augment} for row in rows])


def _raw_example(row: Mapping[str, Any]) -> RawExample:
    return RawExample(
        id=row["id"],
        audio=row["audio_filepath"],
        where=row["where"],
        offset=row["offset"] or 0.0,
        duration=row["read_duration"],
        text=row["text"],
        speaker=row["speaker"],
        source=row["source"],
    )


def decode_rows(
    rows: Sequence[Mapping[str, Any]], config: DataConfig, rng: np.random.Generator | None = None
) -> list[dict[str, Any]]:
    """Decode the audio of metadata rows; an unreadable row is logged and dropped (never the whole batch)."""
    examples = []
    for row in rows:
        try:
            example = decode_example(_raw_example(row), config, rng)
        except AudioError as error:
            logger.warning("skipping %s: %s", row["where"], error)
            continue
        example["label"] = row.get("label")
        examples.append(example)
    if not examples:
        raise RuntimeError(f"every example of a batch was unreadable: {[row['where'] for row in rows]}")
    return examples


def resolve_manifests(
    data_args: DataArguments,
    demo_train: Sequence[str] = ("finetune",),
    demo_eval: Sequence[str] = ("valid",),
) -> tuple[list[str], list[str]]:
    """(train, eval) manifests: the given ones (checked to exist), or splits of the demo corpus (made if missing,
    in the folder pretraining's demo uses too).

    Args:
        demo_train / demo_eval: the demo splits to train and evaluate on when no train manifests are given
            (CTC: finetune / valid, the split it selects and early-stops on; the eval split is used only when no
            eval manifests are given). The demo's test split is `demo_test_manifests`, read after training.
    """
    if data_args.train_manifests:
        check_paths(data_args.train_manifests, "train_manifests")
        check_paths(data_args.eval_manifests, "eval_manifests")
        return list(data_args.train_manifests), list(data_args.eval_manifests)
    logger.warning("no --train_manifests: using the demo corpus in %s", data_args.demo_corpus_dir)
    folder = ensure_demo_corpus(data_args.demo_corpus_dir, data_args.demo_minutes)
    check_paths(data_args.eval_manifests, "eval_manifests")
    eval_manifests = list(data_args.eval_manifests) or [str(folder / f"{split}.jsonl") for split in demo_eval]
    return [str(folder / f"{split}.jsonl") for split in demo_train], eval_manifests


def demo_test_manifests(data_args: DataArguments, demo_test: Sequence[str] = ("test",)) -> list[str]:
    """The manifests evaluated once, after training (never for selection): `test_manifests` if given, else the
    demo's test split when the demo corpus is used, else [].

    Paths only; the files are not opened here, so a run reads them first at its end. Call after
    `resolve_manifests`, which makes the demo corpus.
    """
    if data_args.test_manifests:
        check_paths(data_args.test_manifests, "test_manifests")  # exists, but not opened until the end
        return list(data_args.test_manifests)
    if data_args.train_manifests:
        return []
    return [str(Path(data_args.demo_corpus_dir) / f"{split}.jsonl") for split in demo_test]
