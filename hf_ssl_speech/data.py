"""Speech data pipeline: sources → epoch plan → decoded, bucketed, padded batches, exactly once per epoch.

The parts, in the order data flows through them:

1. **Sources** give raw examples (a path or bytes plus metadata) by row number, and the estimated
   duration of every row up front: `ManifestSource` (NeMo JSONL), `TarShardSource` (webdataset-layout
   tar shards, read with `tarfile`), `DatasetSource` (any map-style `datasets.Dataset` with a path or bytes
   column: json / csv / parquet builders). `StreamingDatasetSource` wraps a streaming
   `datasets.IterableDataset`, which has no row numbers (see "Streaming" below).
2. **The epoch plan** (`plan_epoch`) is a pure function of (durations, weights, seed, epoch): filter by
   duration, repeat/subsample each source by its weight, shuffle, sort windows of `bucket_window` rows by
   duration, pack each window into batches of at most `batch_seconds` padded seconds, shuffle the batches,
   and split a few batches so their number divides by the number of processes. Process `rank` takes
   batches `rank, rank + world_size, ...`; its dataloader worker `w` takes every `num_workers`-th of those.
   Every process computes the same plan, so no data is exchanged, every example is used exactly once per
   epoch, and all processes get the same number of batches (a DDP step never waits for a process that ran
   out of data).
3. **Decoding** (`decode_example`, in the dataloader workers) reads, crops, mixes to mono, checks and
   resamples one example (see `audio_io`). A bad example is dropped from its batch and reported with the
   batch; `BadExampleCounter` in the main process counts it by reason, logs it (rate-limited) and stops the
   run with `TooManyBadExamplesError` once the bad fraction exceeds `max_bad_fraction`.
4. **The collator** (`SpeechCollator`) pads: log-mel features from the feature extractor, or raw waveforms
   plus lengths for featurising on the accelerator.
5. **`SpeechDataLoader`** runs a `torch.utils.data.DataLoader` over the plan and keeps the data position
   (epoch, batches consumed), so `state_dict()` / `load_state_dict()` resume with the next unseen batch, in
   the same order as an uninterrupted run.

Use with accelerate: build one loader per process with `rank=accelerator.process_index,
world_size=accelerator.num_processes` and do **not** pass it to `accelerator.prepare` (accelerate would
shard it a second time, and its default `dispatch_batches=True` fails on variable-length batches; DESIGN.md
§7). Move batches to the device with `batch[k].to(accelerator.device)`.

Streaming: a streaming dataset cannot be planned globally. Each (process, worker) pair reads a disjoint part
of the stream (whole shards when there are enough, else every n-th row) and buckets it in windows; the
loader then never ends (each part restarts with a new shuffle when exhausted), so train for a number of
steps. Resuming replays the metadata of the stream (no decoding) up to the saved position.
"""

from __future__ import annotations

import bisect
import collections
import glob
import io
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .audio_io import BAD_REASONS, TARGET_SAMPLING_RATE, AudioError, AudioSource, load_audio, probe_duration

logger = logging.getLogger(__name__)

HOP_LENGTH = 160  # samples per 10 ms feature frame at 16 kHz; frame_labels are given per feature frame
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "opus", "mp3", "sph", "aiff", "aif", "au")


# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DataConfig:
    """How examples are filtered, cropped and batched. Defaults suit pretraining on 16 kHz speech.

    Args:
        batch_seconds: padded audio seconds per batch (batch size × longest clip in it); a clip longer than
            this gets a batch of its own.
        max_batch_size: at most this many clips per batch (None: only `batch_seconds` limits).
        min_duration: clips shorter than this (seconds) are skipped as `too_short`.
        max_duration: clips longer than this are randomly cropped (`crop_long`) or skipped as `too_long`.
        crop_long: crop long clips to a random `max_duration` window instead of skipping them.
        bucket_window: rows sorted by duration together before packing; larger = less padding, less
            randomness in which clips share a batch (the order of batches is shuffled over the whole epoch).
        sampling_rate: the model's sampling rate; audio is resampled to it.
        silence_threshold: a clip whose peak amplitude is at or below this is skipped as `silent`.
        max_bad_fraction: stop with `TooManyBadExamplesError` when more than this fraction of the examples
            tried so far was bad (checked after `min_examples_before_check` examples and at each epoch end).
        min_examples_before_check: examples to see before the fraction is checked.
        shuffle: shuffle rows and batches each epoch (False for validation: rows in source order, sorted by
            duration within each window, batches in that order).
        require_text: skip examples without a transcript (`bad_labels`), for supervised training.
        frame_label_tolerance: frame_labels may differ from `samples // 160` by this many frames (they are
            cut or padded with -100); a larger mismatch is `bad_labels`.
    """

    batch_seconds: float = 200.0
    max_batch_size: int | None = None
    min_duration: float = 0.5
    max_duration: float | None = 30.0
    crop_long: bool = True
    bucket_window: int = 4096
    sampling_rate: int = TARGET_SAMPLING_RATE
    silence_threshold: float = 1e-6
    max_bad_fraction: float = 0.05
    min_examples_before_check: int = 200
    shuffle: bool = True
    require_text: bool = False
    frame_label_tolerance: int = 2

    def __post_init__(self) -> None:
        checks = {
            "batch_seconds": self.batch_seconds > 0,
            "max_batch_size": self.max_batch_size is None or self.max_batch_size >= 1,
            "min_duration": self.min_duration >= 0,
            "max_duration": self.max_duration is None or self.max_duration > self.min_duration,
            "bucket_window": self.bucket_window >= 1,
            "max_bad_fraction": 0.0 <= self.max_bad_fraction <= 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r} is out of range; see the docstring.")


# ---------------------------------------------------------------------------------------------------------
# Bad-example accounting


class TooManyBadExamplesError(RuntimeError):
    """Raised when the fraction of bad examples exceeds `DataConfig.max_bad_fraction`."""


class BadExampleCounter:
    """Counts good and bad examples (by reason), logs bad ones rate-limited, enforces `max_bad_fraction`.

    Lives in the main process of each rank: workers report the bad examples of each batch along with it.
    `state_dict()` is plain JSON, so a loop can all-gather the ranks' counters and `merge` them.

    Args:
        max_bad_fraction: see `DataConfig`.
        min_examples_before_check: see `DataConfig`.
        log_first: log this many bad examples one by one, then one summary line per `log_interval` seconds.
        log_interval: seconds between summary lines after the first `log_first`.
        keep_names: remember this many file names per reason for `summary()`.
    """

    def __init__(
        self,
        max_bad_fraction: float = 0.05,
        min_examples_before_check: int = 200,
        log_first: int = 20,
        log_interval: float = 60.0,
        keep_names: int = 5,
    ) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.min_examples_before_check = min_examples_before_check
        self.log_first = log_first
        self.log_interval = log_interval
        self.keep_names = keep_names
        self.good = 0
        self.bad: collections.Counter[str] = collections.Counter()
        self.names: dict[str, list[str]] = {}
        self._logged = 0
        self._last_log = 0.0
        self._unlogged = 0

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def attempted(self) -> int:
        return self.good + self.total_bad

    def add_good(self, count: int = 1) -> None:
        self.good += count

    def add_bad(self, reason: str, where: str, detail: str = "", log: bool = True) -> None:
        """Count one bad example; `where` names the file (and manifest line) for the log and the summary.
        `log=False` for rows already logged elsewhere (left out while indexing)."""
        self.bad[reason] += 1
        names = self.names.setdefault(reason, [])
        if len(names) < self.keep_names:
            names.append(where)
        if not log:
            return
        if self._logged < self.log_first:
            self._logged += 1
            logger.warning("skipping bad example %s: %s%s", where, reason, f" ({detail})" if detail else "")
            self._last_log = time.monotonic()
            return
        self._unlogged += 1
        if time.monotonic() - self._last_log >= self.log_interval:
            logger.warning("skipped %d more bad examples; so far %s", self._unlogged, dict(self.bad))
            self._unlogged = 0
            self._last_log = time.monotonic()

    def check(self, force: bool = False) -> None:
        """Raise `TooManyBadExamplesError` if too many examples were bad (`force`: even before the minimum)."""
        if self.attempted == 0 or (not force and self.attempted < self.min_examples_before_check):
            return
        fraction = self.total_bad / self.attempted
        if fraction > self.max_bad_fraction:
            raise TooManyBadExamplesError(
                f"{self.total_bad} of {self.attempted} examples ({fraction:.1%}) were bad, more than "
                f"max_bad_fraction={self.max_bad_fraction}. Fix or remove them (e.g. regenerate the manifest "
                f"with scripts/make_manifest.py), or raise max_bad_fraction.\n{self.summary()}"
            )

    def summary(self) -> str:
        """Multi-line report: counts per reason with a few of the file names."""
        lines = [f"data: {self.good} good, {self.total_bad} bad examples"]
        for reason, count in sorted(self.bad.items(), key=lambda item: -item[1]):
            lines.append(f"  {reason} ({BAD_REASONS.get(reason, '?')}): {count}, e.g. {self.names.get(reason, [])}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"good": self.good, "bad": dict(self.bad), "names": {k: list(v) for k, v in self.names.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.good = int(state["good"])
        self.bad = collections.Counter({k: int(v) for k, v in state["bad"].items()})
        self.names = {k: list(v) for k, v in state["names"].items()}

    @staticmethod
    def merge(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Sum the `state_dict()`s of several ranks (e.g. from `accelerate.utils.gather_object`)."""
        bad: collections.Counter[str] = collections.Counter()
        names: dict[str, list[str]] = {}
        for state in states:
            bad.update(state["bad"])
            for reason, where in state["names"].items():
                names.setdefault(reason, []).extend(where)
        return {"good": sum(s["good"] for s in states), "bad": dict(bad), "names": names}


# ---------------------------------------------------------------------------------------------------------
# Raw examples and sources


@dataclass
class RawExample:
    """One row of a source before decoding.

    Args:
        id: unique name of the example (manifest `id`, else path relative to the manifest without extension).
        audio: path or encoded bytes.
        where: file name (and manifest line / tar member) used in logs and errors.
        offset: seconds into the file where the example starts.
        duration: seconds to read from `offset`; None reads the whole file.
        text, speaker: from the metadata, or None.
        frame_labels: int64 `(frames,)`, one label per 10 ms feature frame from the example's start (its
            `offset`), or a path to a `.npy` / whitespace-separated text file of them, or None.
        source: name of the source (the manifest path, shard pattern or dataset name).
    """

    id: str
    audio: AudioSource
    where: str
    offset: float = 0.0
    duration: float | None = None
    text: str | None = None
    speaker: str | None = None
    frame_labels: np.ndarray | str | None = None
    source: str = ""


class IndexedSource(Protocol):
    """What the epoch planner needs from a source: a length, the durations, raw rows by number."""

    name: str
    durations: np.ndarray  # float32 (rows,), estimated seconds per row (from metadata or the file header)
    problems: list[tuple[str, str, str]]  # (reason, where, detail) of rows left out while indexing

    def __len__(self) -> int: ...

    def raw(self, index: int) -> RawExample: ...


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_metadata(
    meta: Any, where: str, base_dir: str | None, require_audio: bool = True, frame_labels_key: str = "frame_labels"
) -> dict[str, Any]:
    """Validate one NeMo-manifest-style record; raise `AudioError("malformed")` naming the field.

    Accepted fields: `audio_filepath` (str, relative to `base_dir`), `duration` (number ≥ 0), `offset`
    (number ≥ 0), `text` (str), `speaker` (str or int), `id` (str), and under `frame_labels_key` a list of
    int or a str path (relative to `base_dir`) of a `.npy` / text file. Unknown fields are ignored.
    """
    if not isinstance(meta, dict):
        raise AudioError("malformed", where, f"expected a JSON object, got {type(meta).__name__}")
    out: dict[str, Any] = {}
    if require_audio:
        path = meta.get("audio_filepath")
        if not isinstance(path, str) or not path:
            raise AudioError("malformed", where, f"'audio_filepath' must be a non-empty string, got {path!r}")
        out["audio_filepath"] = os.path.join(base_dir, path) if base_dir and not os.path.isabs(path) else path
    for key in ("duration", "offset"):
        if key in meta and meta[key] is not None:
            if not _number(meta[key]) or meta[key] < 0:
                raise AudioError("malformed", where, f"'{key}' must be a number >= 0, got {meta[key]!r}")
            out[key] = float(meta[key])
    for key, types in (("text", (str,)), ("speaker", (str, int)), ("id", (str,))):
        if meta.get(key) is not None:
            if not isinstance(meta[key], types) or isinstance(meta[key], bool):
                raise AudioError("malformed", where, f"'{key}' must be {types[0].__name__}, got {meta[key]!r}")
            out[key] = str(meta[key])
    labels = meta.get(frame_labels_key)
    if labels is not None:
        if isinstance(labels, str):
            out["frame_labels"] = os.path.join(base_dir, labels) if base_dir and not os.path.isabs(labels) else labels
        elif isinstance(labels, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            out["frame_labels"] = np.asarray(labels, dtype=np.int64)
        else:
            raise AudioError("malformed", where, f"'{frame_labels_key}' must be a path or a list of integers")
    return out


def _default_id(path: str, base_dir: str | None, offset: float | None) -> str:
    rel = os.path.relpath(path, base_dir) if base_dir else path
    stem = os.path.splitext(rel)[0]
    return stem if offset is None else f"{stem}@{offset:.3f}"


def _raw_from_meta(meta: dict[str, Any], where: str, source: str, base_dir: str | None) -> RawExample:
    path = meta["audio_filepath"]
    segment = "offset" in meta  # NeMo: without an offset the whole file is read; `duration` is informational
    return RawExample(
        id=meta.get("id") or _default_id(path, base_dir, meta.get("offset")),
        audio=path,
        where=where,
        offset=meta.get("offset", 0.0),
        duration=meta.get("duration") if segment else None,
        text=meta.get("text"),
        speaker=meta.get("speaker"),
        frame_labels=meta.get("frame_labels"),
        source=source,
    )


def _log_problems(name: str, problems: list[tuple[str, str, str]], total: int, limit: int = 20) -> None:
    for reason, where, detail in problems[:limit]:
        logger.warning("%s: leaving out %s: %s (%s)", name, where, reason, detail)
    if len(problems) > limit:
        logger.warning("%s: %d more rows left out (%d of %d in all)", name, len(problems) - limit, len(problems), total)


class ManifestSource:
    """A NeMo JSONL manifest, indexed by byte offset (lines are re-read on demand, not held in memory).

    Args:
        path: the manifest; relative `audio_filepath` / `frame_labels` resolve against its folder.
        probe_missing_durations: read the header of files whose line has no `duration` (else such lines
            are `malformed`).
        frame_labels_key: the field holding frame labels (HuBERT-style targets, one per 10 ms frame).
    Malformed lines (bad JSON, missing `audio_filepath`, wrong types) and files whose duration cannot be
    probed are left out and listed in `problems` as `(reason, "manifest:line", detail)`.
    """

    def __init__(
        self, path: str | os.PathLike, probe_missing_durations: bool = True, frame_labels_key: str = "frame_labels"
    ) -> None:
        self.path = os.fspath(path)
        self.frame_labels_key = frame_labels_key
        self.name = self.path
        self.base_dir = os.path.dirname(os.path.abspath(self.path))
        self.problems: list[tuple[str, str, str]] = []
        offsets: list[int] = []
        lines: list[int] = []
        durations: list[float] = []
        with open(self.path, "rb") as handle:
            position = 0
            for line_number, line in enumerate(handle, start=1):
                start, position = position, position + len(line)
                if not line.strip():
                    continue
                where = f"{self.path}:{line_number}"
                try:
                    try:
                        meta = parse_metadata(json.loads(line), where, self.base_dir, True, frame_labels_key)
                    except (json.JSONDecodeError, UnicodeDecodeError) as error:
                        raise AudioError("malformed", where, f"not JSON: {error}") from None
                    duration = meta.get("duration")
                    if duration is None:
                        if not probe_missing_durations:
                            raise AudioError("malformed", where, "no 'duration'")
                        duration = probe_duration(meta["audio_filepath"], where=f"{meta['audio_filepath']} ({where})")
                        duration -= meta.get("offset", 0.0)
                except AudioError as error:
                    self.problems.append((error.reason, error.where, error.detail))
                    continue
                offsets.append(start)
                lines.append(line_number)
                durations.append(duration)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.line_numbers = np.asarray(lines, dtype=np.int64)
        self.durations = np.asarray(durations, dtype=np.float32)
        self._handle: io.BufferedReader | None = None
        _log_problems(self.name, self.problems, len(self.offsets) + len(self.problems))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # open handles do not cross into dataloader worker processes
        return state

    def raw(self, index: int) -> RawExample:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for the life of the worker
        self._handle.seek(int(self.offsets[index]))
        where = f"{self.path}:{int(self.line_numbers[index])}"
        meta = parse_metadata(json.loads(self._handle.readline()), where, self.base_dir, True, self.frame_labels_key)
        raw = _raw_from_meta(meta, f"{meta['audio_filepath']} ({where})", self.name, self.base_dir)
        return raw


def webdataset_key(member_name: str) -> tuple[str, str]:
    """Split a tar member name into (key, extension) the webdataset way: the key ends at the first dot of
    the base name (`a/b/utt1.seg.flac` → (`a/b/utt1`, `seg.flac`))."""
    folder, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarShardSource:
    """Tar shards in webdataset layout (`key.wav|flac|...` plus `key.json` and/or `key.txt`), indexed once.

    The index holds the byte offset and size of every member, so rows are read with one seek; use
    uncompressed tars (a `.tar.gz` must be decompressed to seek). `key.json` may hold any manifest field
    (`text`, `duration`, `speaker`, `offset`, `frame_labels` as a list, `id`); `key.txt` holds the text.

    Args:
        shards: tar paths or glob patterns (sorted), or one folder (all `*.tar` in it).
        name: source name for logs (default: the first pattern).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], name: str | None = None) -> None:
        patterns = [os.fspath(shards)] if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards]
        paths: list[str] = []
        for pattern in patterns:
            if os.path.isdir(pattern):
                paths.extend(sorted(glob.glob(os.path.join(pattern, "*.tar"))))
            else:
                paths.extend(sorted(glob.glob(pattern)) or [pattern])
        self.paths = paths
        self.name = name or patterns[0]
        self.problems: list[tuple[str, str, str]] = []
        # One row per key: (shard index, key, audio (offset, size, ext), meta (offset, size, ext) or None).
        self.rows: list[tuple[int, str, tuple[int, int, str], tuple[int, int, str] | None]] = []
        self._handles: dict[int, io.BufferedReader] = {}
        durations: list[float] = []
        for shard_index, path in enumerate(paths):
            try:
                members = self._scan(path)
            except (OSError, tarfile.TarError) as error:
                hint = (
                    "; compressed tars cannot be indexed: decompress them" if path.endswith(("gz", "bz2", "xz")) else ""
                )
                self.problems.append(("unreadable", path, f"cannot read the tar: {error}{hint}"))
                continue
            for key, parts in members.items():
                where = f"{path}:{key}"
                audio = next(((ext, parts[ext]) for ext in parts if ext.rsplit(".", 1)[-1] in AUDIO_EXTENSIONS), None)
                meta_part = next(((ext, parts[ext]) for ext in ("json", "txt") if ext in parts), None)
                try:
                    if audio is None:
                        raise AudioError("malformed", where, f"no audio member among {sorted(parts)}")
                    row = (
                        shard_index,
                        key,
                        (*audio[1], audio[0]),
                        (*meta_part[1], meta_part[0]) if meta_part else None,
                    )
                    meta = self._meta(row, where)
                    duration = meta.get("duration")
                    if duration is None:
                        audio_bytes = self._read_member(shard_index, *audio[1])
                        duration = probe_duration(audio_bytes, where) - meta.get("offset", 0.0)
                except AudioError as error:
                    self.problems.append((error.reason, error.where, error.detail))
                    continue
                self.rows.append(row)
                durations.append(duration)
        self.durations = np.asarray(durations, dtype=np.float32)
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
        _log_problems(self.name, self.problems, len(self.rows) + len(self.problems))

    @staticmethod
    def _scan(path: str) -> dict[str, dict[str, tuple[int, int]]]:
        members: dict[str, dict[str, tuple[int, int]]] = {}
        with tarfile.open(path, mode="r:") as archive:
            for info in archive:  # reads headers only; data blocks are seeked over
                if info.isfile():
                    key, ext = webdataset_key(info.name)
                    members.setdefault(key, {})[ext] = (info.offset_data, info.size)
        return members

    def _read_member(self, shard_index: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(shard_index)
        if handle is None:
            if len(self._handles) >= 8:  # keep a few shards open; rows of one batch come from all over
                self._handles.pop(next(iter(self._handles))).close()
            handle = self._handles[shard_index] = open(self.paths[shard_index], "rb")  # noqa: SIM115
        handle.seek(offset)
        return handle.read(size)

    def _meta(self, row: tuple, where: str) -> dict[str, Any]:
        shard_index, key, _, meta_part = row
        if meta_part is None:
            return {}
        blob = self._read_member(shard_index, meta_part[0], meta_part[1])
        if meta_part[2] == "txt":
            return {"text": blob.decode("utf-8", errors="replace").strip()}
        try:
            meta = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AudioError("malformed", where, f"{key}.json is not JSON: {error}") from None
        return parse_metadata(meta, where, None, require_audio=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def raw(self, index: int) -> RawExample:
        row = self.rows[index]
        shard_index, key, audio, _ = row
        where = f"{self.paths[shard_index]}:{key}.{audio[2]}"
        meta = self._meta(row, where)
        segment = "offset" in meta
        return RawExample(
            id=meta.get("id") or key,
            audio=self._read_member(shard_index, audio[0], audio[1]),
            where=where,
            offset=meta.get("offset", 0.0),
            duration=meta.get("duration") if segment else None,
            text=meta.get("text"),
            speaker=meta.get("speaker"),
            frame_labels=meta.get("frame_labels"),
            source=self.name,
        )


def _audio_value(value: Any, base_dir: str | None) -> tuple[AudioSource | None, str]:
    """A dataset cell → (path or bytes, printable name). Accepts a path, bytes, or `{"path", "bytes"}`."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], value.get("path") or f"<{len(value['bytes'])} bytes>"
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), f"<{len(value)} bytes>"
    if isinstance(value, str) and value:
        path = os.path.join(base_dir, value) if base_dir and not os.path.isabs(value) else value
        return path, path
    return None, repr(value)[:80]


def _row_to_raw(row: dict[str, Any], columns: dict[str, str | None], base_dir: str | None, name: str, where: str):
    audio, audio_name = _audio_value(row.get(columns["audio"]), base_dir)
    if audio is None:
        raise AudioError("malformed", where, f"column {columns['audio']!r} holds no path or bytes: {audio_name}")
    meta: dict[str, Any] = {}
    for field_name in ("text", "speaker", "duration", "offset", "id", "frame_labels"):
        column = columns.get(field_name)
        if column and row.get(column) is not None:
            meta[field_name] = row[column]
    meta = parse_metadata(meta, where, base_dir, require_audio=False)
    segment = "offset" in meta
    return RawExample(
        id=meta.get("id") or (os.path.splitext(os.path.basename(audio_name))[0] if isinstance(audio, str) else where),
        audio=audio,
        where=f"{audio_name} ({where})",
        offset=meta.get("offset", 0.0),
        duration=meta.get("duration") if segment else None,
        text=meta.get("text"),
        speaker=meta.get("speaker"),
        frame_labels=meta.get("frame_labels"),
        source=name,
    ), meta


def _dataset_columns(dataset: Any, audio_column: str, **columns: str | None) -> dict[str, str | None]:
    names = set(dataset.column_names or [])
    if audio_column not in names:
        raise ValueError(f"audio_column={audio_column!r} is not a column of the dataset (columns: {sorted(names)})")
    out: dict[str, str | None] = {"audio": audio_column}
    for key, column in columns.items():
        out[key] = column if column in names else None
    return out


def _undecoded(dataset: Any, audio_column: str) -> Any:
    """Make sure an `Audio` column yields `{"path", "bytes"}` instead of decoding (which needs torchcodec)."""
    features = getattr(dataset, "features", None) or {}
    feature = features.get(audio_column)
    if feature is not None and type(feature).__name__ == "Audio" and getattr(feature, "decode", False):
        from datasets import Audio

        dataset = dataset.cast_column(audio_column, Audio(decode=False))
    return dataset


class DatasetSource:
    """A map-style `datasets.Dataset` (e.g. `load_dataset("parquet", data_files=...)["train"]`).

    Args:
        dataset: the dataset; its audio column holds paths, bytes, or `Audio(decode=False)` dicts (an
            `Audio` column with decoding on is cast to `decode=False`: decoding needs torchcodec).
        audio_column, text_column, speaker_column, duration_column, id_column, offset_column,
        frame_labels_column: column names (missing optional columns are ignored).
        base_dir: folder that relative paths resolve against (e.g. the folder of the json/csv file).
        name: source name for logs.
    Rows without a duration column are probed (header read) once while indexing.
    """

    def __init__(
        self,
        dataset: Any,
        audio_column: str = "audio_filepath",
        text_column: str = "text",
        speaker_column: str = "speaker",
        duration_column: str = "duration",
        id_column: str = "id",
        offset_column: str = "offset",
        frame_labels_column: str = "frame_labels",
        base_dir: str | None = None,
        name: str = "dataset",
    ) -> None:
        self.dataset = _undecoded(dataset, audio_column)
        self.columns = _dataset_columns(
            self.dataset,
            audio_column,
            text=text_column,
            speaker=speaker_column,
            duration=duration_column,
            id=id_column,
            offset=offset_column,
            frame_labels=frame_labels_column,
        )
        self.base_dir = base_dir
        self.name = name
        self.problems: list[tuple[str, str, str]] = []
        rows: list[int] = []
        durations: list[float] = []
        for index, row in enumerate(self.dataset):
            where = f"{name}[{index}]"
            try:
                raw, meta = _row_to_raw(row, self.columns, base_dir, name, where)
                duration = meta.get("duration")
                if duration is None:
                    duration = probe_duration(raw.audio, raw.where) - raw.offset
            except AudioError as error:
                self.problems.append((error.reason, error.where, error.detail))
                continue
            rows.append(index)
            durations.append(duration)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.durations = np.asarray(durations, dtype=np.float32)
        _log_problems(self.name, self.problems, len(self.rows) + len(self.problems))

    def __len__(self) -> int:
        return len(self.rows)

    def raw(self, index: int) -> RawExample:
        row_index = int(self.rows[index])
        return _row_to_raw(
            self.dataset[row_index], self.columns, self.base_dir, self.name, f"{self.name}[{row_index}]"
        )[0]


class StreamingDatasetSource:
    """A streaming `datasets.IterableDataset` with a path or bytes column (no row numbers, no global plan).

    Args: as `DatasetSource`. Rows without a duration are probed (header read) as they stream by.
    """

    def __init__(
        self,
        dataset: Any,
        audio_column: str = "audio_filepath",
        text_column: str = "text",
        speaker_column: str = "speaker",
        duration_column: str = "duration",
        id_column: str = "id",
        offset_column: str = "offset",
        frame_labels_column: str = "frame_labels",
        base_dir: str | None = None,
        name: str = "stream",
    ) -> None:
        self.dataset = _undecoded(dataset, audio_column)
        self.columns = _dataset_columns(
            self.dataset,
            audio_column,
            text=text_column,
            speaker=speaker_column,
            duration=duration_column,
            id=id_column,
            offset=offset_column,
            frame_labels=frame_labels_column,
        )
        self.base_dir = base_dir
        self.name = name
        self.problems: list[tuple[str, str, str]] = []

    def part(self, index: int, parts: int) -> Iterator[tuple[RawExample | None, float, AudioError | None]]:
        """Rows of part `index` of `parts` (disjoint, together all rows) as (raw, duration, error).

        Whole shards per part when the stream has at least `parts` shards, else every `parts`-th row. Uses
        `IterableDataset.iter`, which (unlike `__iter__`) does not shard again by dataloader worker.
        """
        dataset, stride = self.dataset, parts
        if getattr(dataset, "num_shards", 1) >= parts:
            dataset, stride = dataset.shard(num_shards=parts, index=index, contiguous=False), 1
        position = 0
        for batch in dataset.iter(batch_size=64):
            count = len(next(iter(batch.values())))
            for offset in range(count):
                row_number, position = position, position + 1
                if stride > 1 and row_number % stride != index:
                    continue
                row = {key: values[offset] for key, values in batch.items()}
                where = f"{self.name}[part {index}/{parts}, row {row_number}]"
                try:
                    raw, meta = _row_to_raw(row, self.columns, self.base_dir, self.name, where)
                    duration = meta.get("duration")
                    if duration is None:
                        duration = probe_duration(raw.audio, raw.where) - raw.offset
                except AudioError as error:
                    yield None, 0.0, error
                    continue
                yield raw, float(duration), None


def open_source(spec: Any, frame_labels_key: str = "frame_labels") -> IndexedSource | StreamingDatasetSource:
    """Build a source from a path, a `datasets` object, a source, or a config dict.

    - `"x.jsonl"` / `"x.json"` → `ManifestSource`; `"x.tar"`, a glob of tars or a folder of tars → `TarShardSource`.
    - a `datasets.Dataset` → `DatasetSource`; a `datasets.IterableDataset` → `StreamingDatasetSource`.
    - a dict (from a YAML recipe): `{"manifest": path}`, `{"tar": pattern}`, or `{"builder": "json"|"csv"|
      "parquet", "data_files": ..., "streaming": bool, "split": "train", "audio_column": ..., ...}` (other
      keys go to `DatasetSource`; `base_dir` defaults to the folder of a single `data_files` path).
      `weight` is ignored here (see `build_dataloader`).
    `frame_labels_key` is the manifest field of the frame labels (for path specs and `{"manifest": ...}`).
    """
    if (hasattr(spec, "raw") and hasattr(spec, "durations")) or isinstance(spec, StreamingDatasetSource):
        return spec
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if k != "weight"}
        if "manifest" in spec:
            return ManifestSource(spec["manifest"], frame_labels_key=spec.get("frame_labels_key", frame_labels_key))
        if "tar" in spec:
            return TarShardSource(spec["tar"])
        if "builder" in spec:
            import datasets

            builder = spec.pop("builder")
            data_files = spec.pop("data_files")
            streaming = bool(spec.pop("streaming", False))
            split = spec.pop("split", "train")
            if "base_dir" not in spec and isinstance(data_files, str):
                spec["base_dir"] = os.path.dirname(os.path.abspath(data_files))
            spec.setdefault("name", f"{builder}:{data_files}")
            dataset = datasets.load_dataset(builder, data_files=data_files, split=split, streaming=streaming)
            return (StreamingDatasetSource if streaming else DatasetSource)(dataset, **spec)
        raise ValueError(f"source spec {spec!r} needs one of the keys 'manifest', 'tar' or 'builder'")
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        if path.endswith((".jsonl", ".json")):
            return ManifestSource(path, frame_labels_key=frame_labels_key)
        if path.endswith(".tar") or os.path.isdir(path) or any(ch in path for ch in "*?["):
            return TarShardSource(path)
        raise ValueError(f"source {path!r}: expected a .jsonl/.json manifest, a .tar shard, a glob or a folder of tars")
    type_name = type(spec).__name__
    if type_name == "Dataset":
        return DatasetSource(spec)
    if type_name == "IterableDataset":
        return StreamingDatasetSource(spec)
    raise TypeError(f"cannot make a speech source from {type_name}: pass a path, a datasets object or a dict spec")


# ---------------------------------------------------------------------------------------------------------
# Decoding one example


def _frame_labels(raw: RawExample, crop_start: float, frames: int, tolerance: int) -> np.ndarray | None:
    labels = raw.frame_labels
    if labels is None:
        return None
    if isinstance(labels, str):
        try:
            labels = np.load(labels) if labels.endswith(".npy") else np.loadtxt(labels, dtype=np.int64, ndmin=1)
        except (OSError, ValueError) as error:
            raise AudioError("bad_labels", raw.where, f"cannot read frame_labels {labels}: {error}") from None
    labels = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    start = int(round(crop_start * 100))  # crop starts are whole 10 ms frames (read_audio's crop_step)
    labels = labels[start : start + frames]
    if abs(len(labels) - frames) > tolerance:
        raise AudioError("bad_labels", raw.where, f"{len(labels)} frame labels for {frames} frames")
    return labels


def decode_example(raw: RawExample, config: DataConfig, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Decode a `RawExample` into the example dict of docs/CONTRACTS.md. Raises `AudioError` if unusable.

    Args:
        raw: from a source's `raw()`.
        config: length limits, cropping, sampling rate, silence threshold, text requirement.
        rng: draws the crop window (None: first `max_duration` seconds).
    """
    if config.require_text and not raw.text:
        raise AudioError("bad_labels", raw.where, "no text, and require_text is set")
    audio, crop_start = load_audio(
        raw.audio,
        target_rate=config.sampling_rate,
        offset=raw.offset,
        duration=raw.duration,
        where=raw.where,
        silence_threshold=config.silence_threshold,
        min_duration=config.min_duration,
        max_duration=config.max_duration,
        crop=config.crop_long,
        rng=rng,
    )
    hop = config.sampling_rate // 100
    return {
        "id": raw.id,
        "audio": audio,  # (samples,) float32
        "sampling_rate": config.sampling_rate,
        "duration": len(audio) / config.sampling_rate,
        "text": raw.text,
        "speaker": raw.speaker,
        "frame_labels": _frame_labels(raw, crop_start, len(audio) // hop, config.frame_label_tolerance),
        "source": raw.source,
    }


# ---------------------------------------------------------------------------------------------------------
# Collation


class SpeechCollator:
    """Pads a list of example dicts into model inputs (docs/CONTRACTS.md).

    Two modes:
    - features (default): `input_features (B, T, n_mels) float32`, `attention_mask (B, T) long` from
      `feature_extractor(list_of_arrays, sampling_rate=..., return_tensors="pt")`.
    - `return_waveforms=True`: `waveforms (B, N) float32` zero-padded and `waveform_lengths (B,) long`, for
      `feature_extractor.extract_batch(waveforms, waveform_lengths)` on the accelerator.
    Both add `audio_seconds` (float, sum of the clip durations), `ids` (list of str) when `return_ids`,
    `labels (B, L) long` -100-padded when `text_to_ids` is given, and `frame_labels (B, T) long` -100-padded
    (T = feature frames, or `N // hop` for waveforms) when every example has frame labels.

    Which mode: featurising costs a CPU worker about 4x more than decoding 16 kHz FLAC
    (benchmarks/bench_data.py), so with an accelerator use `return_waveforms=True` and featurise on the device
    (also where dither belongs: `extract_batch(..., dither=fe.dither, generator=...)`); on CPU-only runs
    featurise here, in the dataloader workers, where it overlaps with the training step.

    Args:
        feature_extractor: a `ConformerSslFeatureExtractor` (or anything with the same `__call__`); needed
            unless `return_waveforms`.
        return_waveforms: pad waveforms instead of featurising.
        text_to_ids: maps a transcript to label ids (e.g. a CTC tokenizer's `encode`), for fine-tuning.
        sampling_rate: rate of the example audio (checked).
        hop_length: samples per feature frame (frames = samples // hop_length).
        return_ids: include the example ids (for bookkeeping and tests; not a model input).
    """

    def __init__(
        self,
        feature_extractor: Any = None,
        return_waveforms: bool = False,
        text_to_ids: Callable[[str], Sequence[int]] | None = None,
        sampling_rate: int = TARGET_SAMPLING_RATE,
        hop_length: int = HOP_LENGTH,
        return_ids: bool = False,
    ) -> None:
        if feature_extractor is None and not return_waveforms:
            raise ValueError("SpeechCollator needs a feature_extractor, or return_waveforms=True")
        self.feature_extractor = feature_extractor
        self.return_waveforms = return_waveforms
        self.text_to_ids = text_to_ids
        self.sampling_rate = sampling_rate
        self.hop_length = hop_length
        self.return_ids = return_ids

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("SpeechCollator got an empty list of examples")
        for example in examples:
            if example["sampling_rate"] != self.sampling_rate:
                raise ValueError(
                    f"example {example['id']} is at {example['sampling_rate']} Hz; the collator expects "
                    f"{self.sampling_rate} Hz (resample in decode_example)"
                )
        audios = [example["audio"] for example in examples]
        lengths = torch.tensor([len(audio) for audio in audios], dtype=torch.long)
        batch: dict[str, Any] = {}
        if self.return_waveforms:
            waveforms = torch.zeros(len(audios), int(lengths.max()), dtype=torch.float32)  # (batch, samples)
            for row, audio in enumerate(audios):
                waveforms[row, : len(audio)] = torch.from_numpy(audio)
            batch["waveforms"] = waveforms
            batch["waveform_lengths"] = lengths
            frames = int(lengths.max()) // self.hop_length
        else:
            features = self.feature_extractor(audios, sampling_rate=self.sampling_rate, return_tensors="pt")
            batch["input_features"] = features["input_features"]  # (batch, frames, n_mels)
            batch["attention_mask"] = features["attention_mask"].long()  # (batch, frames)
            frames = batch["input_features"].shape[1]
        batch["audio_seconds"] = float(lengths.sum()) / self.sampling_rate
        if self.return_ids:
            batch["ids"] = [example["id"] for example in examples]
        if self.text_to_ids is not None:
            label_ids = []
            for example in examples:
                if example["text"] is None:
                    raise ValueError(f"example {example['id']} has no text; set DataConfig.require_text=True")
                label_ids.append(list(self.text_to_ids(example["text"])))
            batch["labels"] = _pad_int([np.asarray(ids, dtype=np.int64) for ids in label_ids])  # (batch, L)
        if all(example.get("frame_labels") is not None for example in examples):
            batch["frame_labels"] = _pad_int([example["frame_labels"] for example in examples], frames)  # (B, T)
        return batch


def _pad_int(rows: Sequence[np.ndarray], length: int | None = None) -> torch.Tensor:
    """Stack int rows into a (rows, length) long tensor padded (or cut) with -100."""
    length = max((len(row) for row in rows), default=0) if length is None else length
    out = torch.full((len(rows), length), -100, dtype=torch.long)
    for index, row in enumerate(rows):
        count = min(len(row), length)
        out[index, :count] = torch.as_tensor(row[:count], dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------------------
# Epoch plan


@dataclass
class EpochPlan:
    """The batches of one epoch for all processes, as global row ids (`source_offsets[s] + row`).

    `filtered` lists `(global row id, reason)` of rows left out by their metadata duration.
    """

    batches: list[np.ndarray]
    filtered: list[tuple[int, str]] = field(default_factory=list)

    def for_rank(self, rank: int, world_size: int) -> list[np.ndarray]:
        return self.batches[rank::world_size]


def pack_sorted(durations: np.ndarray, order: np.ndarray, batch_seconds: float, max_batch_size: int | None) -> list:
    """Greedily cut `order` (row ids sorted by ascending duration) into batches whose padded length
    (rows × longest) stays within `batch_seconds`; a row longer than the budget gets a batch of its own."""
    batches, start = [], 0
    limit = max_batch_size or len(order) + 1
    for end in range(1, len(order) + 1):
        longest = durations[order[end - 1]]  # ascending, so the newest row is the longest
        if end - start > 1 and ((end - start) * longest > batch_seconds or end - start > limit):
            batches.append(order[start : end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


def plan_epoch(
    durations: np.ndarray,
    source_offsets: Sequence[int],
    weights: Sequence[float],
    config: DataConfig,
    seed: int,
    epoch: int,
    world_size: int,
) -> EpochPlan:
    """Plan one epoch (see the module docstring). Pure: the same arguments give the same plan everywhere.

    Args:
        durations: float32 `(rows,)` estimated duration of every row of every source, concatenated.
        source_offsets: first global row id of each source, plus the total at the end.
        weights: per source, how many times each of its rows is used per epoch: 1.0 = once, 2.0 = twice,
            0.5 = a random half (a new half every epoch). Sources mix uniformly through the epoch.
        config: duration limits and batching.
        seed, epoch: the randomness of this epoch.
        world_size: processes; the number of batches is made a multiple of it by splitting the largest.
    """
    rng = np.random.default_rng([seed, epoch])
    effective = durations.astype(np.float64)
    if config.max_duration is not None and config.crop_long:
        effective = np.minimum(effective, config.max_duration)
    too_short = durations < config.min_duration
    too_long = (
        durations > config.max_duration
        if config.max_duration is not None and not config.crop_long
        else np.zeros_like(too_short)
    )
    filtered = [(int(g), "too_short") for g in np.flatnonzero(too_short)]
    filtered += [(int(g), "too_long") for g in np.flatnonzero(too_long & ~too_short)]
    keep = ~(too_short | too_long)
    chosen = []
    for source, weight in enumerate(weights):
        rows = np.arange(source_offsets[source], source_offsets[source + 1])
        rows = rows[keep[rows]]
        whole, fraction = int(math.floor(weight)), weight - math.floor(weight)
        chosen.extend([rows] * whole)
        if fraction > 0:
            chosen.append(rng.choice(rows, size=int(round(fraction * len(rows))), replace=False))
    items = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    if config.shuffle:
        items = rng.permutation(items)
    batches: list[np.ndarray] = []
    for start in range(0, len(items), config.bucket_window):
        window = items[start : start + config.bucket_window]
        window = window[np.argsort(effective[window], kind="stable")]
        batches.extend(pack_sorted(effective, window, config.batch_seconds, config.max_batch_size))
    if config.shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    while len(batches) % world_size:
        # Split the largest batch so every process gets the same number of batches (no DDP straggler).
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            raise ValueError(
                f"cannot give {world_size} processes the same number of batches: only {len(batches)} batches of "
                f"one clip each. Use more data, fewer processes, or a larger batch_seconds."
            )
        half = len(batches[largest]) // 2
        batches[largest : largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return EpochPlan(batches=batches, filtered=filtered)


# ---------------------------------------------------------------------------------------------------------
# Iterable datasets for the DataLoader


def _example_rng(seed: int, epoch: int, position: int, slot: int) -> np.random.Generator:
    # Per example, not per worker: the crop is the same whatever worker decodes it, so resume is exact.
    return np.random.default_rng([seed, epoch, position, slot])


def _decode_batch(
    raws: Sequence[tuple[str, Callable[[], RawExample], np.random.Generator]],
    config: DataConfig,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    position: int,
) -> dict[str, Any]:
    """Decode and collate one planned batch; bad examples go to `_bad`, the batch is `_empty` if all were bad."""
    examples, bad = [], []
    for where, get_raw, rng in raws:
        try:
            examples.append(decode_example(get_raw(), config, rng))
        except AudioError as error:
            bad.append((error.reason, error.where, error.detail))
        except Exception as error:  # noqa: BLE001 - one odd file must not kill the run; it is counted and named
            bad.append(("unreadable", where, f"{type(error).__name__}: {error}"))
    batch = collator(examples) if examples else {"_empty": True}
    batch["_position"] = position
    batch["_bad"] = bad
    batch["_good"] = len(examples)
    return batch


class PlannedBatchDataset(torch.utils.data.IterableDataset):
    """Yields this rank's planned batches from position `start` on; worker `w` of `M` yields positions
    `start + w, start + w + M, ...`, so the DataLoader's round-robin returns them in plan order.

    Args:
        sources: indexed sources (see `open_source`).
        weights: per source, see `plan_epoch`.
        config: see `DataConfig`.
        collator: turns a list of example dicts into a batch.
        rank, world_size: this process and the number of processes.
        seed: seed of the plan and the crops.
    `epoch` and `start` are set by `SpeechDataLoader` before each pass.
    """

    def __init__(
        self,
        sources: Sequence[IndexedSource],
        weights: Sequence[float],
        config: DataConfig,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.sources = list(sources)
        self.weights = list(weights)
        self.config = config
        self.collator = collator
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.source_offsets = np.cumsum([0] + [len(source) for source in self.sources]).tolist()
        self.durations = (
            np.concatenate([source.durations for source in self.sources]) if self.sources else np.zeros(0, np.float32)
        )
        self.epoch = 0
        self.start = 0
        self._plan_cache: tuple[int, EpochPlan] | None = None

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            plan = plan_epoch(
                self.durations, self.source_offsets, self.weights, self.config, self.seed, epoch, self.world_size
            )
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        return self.plan(epoch).for_rank(self.rank, self.world_size)

    def locate(self, global_row: int) -> tuple[IndexedSource, int]:
        source = bisect.bisect_right(self.source_offsets, global_row) - 1
        return self.sources[source], global_row - self.source_offsets[source]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.rank_batches(self.epoch)
        for position in range(self.start + worker, len(batches), workers):
            raws = []
            for slot, global_row in enumerate(batches[position].tolist()):
                source, row = self.locate(global_row)
                rng = _example_rng(self.seed, self.epoch, position, slot)
                raws.append((f"{source.name} row {row}", (lambda s=source, r=row: s.raw(r)), rng))
            yield _decode_batch(raws, self.config, self.collator, position)


class StreamingBatchDataset(torch.utils.data.IterableDataset):
    """Yields batches from one part of a streaming source, forever; see "Streaming" in the module docstring.

    Part `rank * M + w` of `world_size * M` is stream `w` of process `rank`; its batches are global positions
    `w, w + M, ...`, in the order the DataLoader's round robin returns them. Each pass over the part
    (a "part epoch") buckets windows of `bucket_window` rows with a fresh shuffle. `start` (set by
    `SpeechDataLoader`) is the number of batches this process already consumed; the worker skips its share
    by replaying the row metadata without decoding.
    """

    def __init__(
        self,
        source: StreamingDatasetSource,
        config: DataConfig,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.source = source
        self.config = config
        self.collator = collator
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = 0
        self.epoch = 0  # unused: parts restart on their own

    def _pack_window(self, window: list[tuple[RawExample, float]], rng: np.random.Generator) -> list[list]:
        durations = np.asarray([duration for _, duration in window], dtype=np.float64)
        order = rng.permutation(len(window))
        order = order[np.argsort(durations[order], kind="stable")]
        batches = pack_sorted(durations, order, self.config.batch_seconds, self.config.max_batch_size)
        return [[window[i][0] for i in batches[b]] for b in rng.permutation(len(batches))]

    def _planned(self, part: int, parts: int) -> Iterator[tuple[list[RawExample], list[tuple[str, str, str]], int]]:
        """(raw examples of a batch, bad reports since the previous batch, part epoch) forever, no decoding."""
        config, part_epoch = self.config, 0
        bad: list[tuple[str, str, str]] = []  # bad rows after a pass's last batch ride with the next batch
        while True:
            rng = np.random.default_rng([self.seed, part, part_epoch])
            window: list[tuple[RawExample, float]] = []
            rows = 0
            for raw, duration, error in self.source.part(part, parts):
                rows += 1
                if error is not None:
                    bad.append((error.reason, error.where, error.detail))
                elif duration < config.min_duration:
                    bad.append(("too_short", raw.where, f"{duration:.3f}s (metadata)"))
                elif config.max_duration is not None and duration > config.max_duration and not config.crop_long:
                    bad.append(("too_long", raw.where, f"{duration:.3f}s (metadata)"))
                else:
                    window.append((raw, min(duration, config.max_duration or math.inf)))
                if len(window) >= config.bucket_window:
                    for batch in self._pack_window(window, rng):
                        yield batch, bad, part_epoch
                        bad = []
                    window = []
            for batch in self._pack_window(window, rng) if window else []:
                yield batch, bad, part_epoch
                bad = []
            if rows == 0:
                raise ValueError(f"streaming source {self.source.name}: part {part} of {parts} has no rows")
            part_epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Global batch p comes from stream (p mod M). The DataLoader asks worker 0 first, so worker w serves
        # stream (w + start) mod M: the stream that holds batch `start`, then `start + 1`, ...
        stream = (worker + self.start) % workers
        part, parts = self.rank * workers + stream, self.world_size * workers
        skip = len(range(stream, self.start, workers))  # batches of this stream among the first `start`
        for index, (raws, bad, part_epoch) in enumerate(self._planned(part, parts)):
            if index < skip:
                continue
            position = index * workers + stream
            pairs = [
                (raw.where, (lambda r=raw: r), _example_rng(self.seed, part_epoch, position, slot))
                for slot, raw in enumerate(raws)
            ]
            batch = _decode_batch(pairs, self.config, self.collator, position)
            batch["_bad"] = bad + batch["_bad"]
            yield batch


def _identity(batch: Any) -> Any:
    return batch


def _single_thread_worker(worker_id: int) -> None:
    # Each worker featurises on one thread: M workers × several torch threads would oversubscribe the cores.
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# The loader


class SpeechDataLoader:
    """A resumable loader over `PlannedBatchDataset` or `StreamingBatchDataset` (see `build_dataloader`).

    Iterating yields the rest of the current epoch (planned sources; then the epoch advances) or batches
    forever (streaming). Batches are dicts from the collator. Bad examples are counted in `counter`.

    Args:
        dataset: the batch dataset.
        counter: the bad-example counter of this process.
        num_workers: DataLoader worker processes (0 = decode in this process).
        pin_memory: pin batch tensors (for CUDA).
        prefetch_factor: batches each worker prepares ahead.
        problems: rows left out while indexing (reason, where, detail); this rank counts its share.
    """

    def __init__(
        self,
        dataset: PlannedBatchDataset | StreamingBatchDataset,
        counter: BadExampleCounter,
        num_workers: int = 2,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        problems: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        self.dataset = dataset
        self.counter = counter
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.streaming = isinstance(dataset, StreamingBatchDataset)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed to the caller
        self._counted_epoch: int | None = None  # epoch whose metadata-filtered rows are already counted
        rank, world_size = dataset.rank, dataset.world_size
        for index, (reason, where, detail) in enumerate(problems):
            if index % world_size == rank:  # each rank counts a disjoint share, so the ranks' sum is the total
                self.counter.add_bad(reason, where, detail, log=False)

    def __len__(self) -> int:
        """Batches per epoch for this process (planned sources only)."""
        if self.streaming:
            raise TypeError("a streaming SpeechDataLoader has no length: it yields batches forever")
        return len(self.dataset.rank_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of `epoch` (not needed in a plain loop: the epoch advances on its own)."""
        self.epoch, self.position = epoch, 0

    def _count_filtered(self) -> None:
        plan = self.dataset.plan(self.epoch)
        rank, world_size = self.dataset.rank, self.dataset.world_size
        for index, (global_row, reason) in enumerate(plan.filtered[rank::world_size]):
            source, row = self.dataset.locate(global_row)
            where = f"{source.name} row {row}"
            if index < self.counter.log_first:  # name the file for the rows that get logged
                try:
                    where = source.raw(row).where
                except AudioError:
                    pass
            self.counter.add_bad(reason, where, f"{float(source.durations[row]):.3f}s (metadata)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.streaming and self.position == 0 and self._counted_epoch != self.epoch:
            self._count_filtered()
            self._counted_epoch = self.epoch
        self.dataset.epoch, self.dataset.start = self.epoch, self.position
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            worker_init_fn=_single_thread_worker if self.num_workers > 0 else None,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,  # the workers must see the new epoch/start each pass
            # Its own generator: starting a pass would otherwise draw the workers' base seed from the global
            # torch RNG and shift the training loop's random stream (dropout, masks) on every epoch or resume.
            generator=torch.Generator().manual_seed(self.epoch),
        )
        for batch in loader:
            position = batch.pop("_position")
            if position != self.position:  # the round robin over workers must reproduce the plan order
                raise RuntimeError(f"data order broken: got batch {position}, expected {self.position}")
            for reason, where, detail in batch.pop("_bad"):
                self.counter.add_bad(reason, where, detail)
            self.counter.add_good(batch.pop("_good"))
            self.counter.check()
            self.position = position + 1
            if batch.pop("_empty", False):
                continue
            yield batch
        self.counter.check(force=True)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The data position of this process (JSON-serialisable); save one per rank with the checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": self.num_workers,
            "seed": self.dataset.seed,
            "streaming": self.streaming,
            "config": asdict(self.dataset.config),
            "counter": self.counter.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next batch is the first one not yet handed out."""
        for key in ("rank", "world_size", "seed", "streaming"):
            mine = getattr(self, key) if key == "streaming" else getattr(self.dataset, key)
            if state[key] != mine:
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r} but this loader has {key}={mine!r}; "
                    f"resume with the same {key} (and the same sources, weights and DataConfig)"
                )
        if self.streaming and state["num_workers"] != self.num_workers:
            raise ValueError(
                f"streaming data state was saved with num_workers={state['num_workers']}, this loader has "
                f"{self.num_workers}: each worker reads its own part of the stream, so resume with the same number"
            )
        if state["config"] != asdict(self.dataset.config):
            logger.warning("DataConfig changed since the data state was saved: the epoch plan will differ")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._counted_epoch = self.epoch if self.position > 0 else None  # the saved counter has them already
        self.counter.load_state_dict(state["counter"])


def build_dataloader(
    sources: Any,
    weights: Sequence[float] | None = None,
    *,
    batch_seconds: float = 200.0,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    feature_extractor: Any = None,
    return_waveforms: bool = False,
    text_to_ids: Callable[[str], Sequence[int]] | None = None,
    return_ids: bool = False,
    pin_memory: bool = False,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    frame_labels_key: str = "frame_labels",
    **config: Any,
) -> SpeechDataLoader:
    """Build the training loader of one process.

    Args:
        sources: one source or a list; each a manifest path, tar pattern, `datasets` object, source object or
            dict spec (see `open_source`; a dict's `weight` key is used when `weights` is None).
        weights: per source, uses per epoch (see `plan_epoch`); default 1.0 each. Streaming sources take none.
        batch_seconds: padded audio seconds per batch (per process).
        num_workers: dataloader worker processes per process.
        rank, world_size: `accelerator.process_index`, `accelerator.num_processes` (do not `prepare` the loader).
        seed: seed of the epoch plans and crops (the same on every rank).
        feature_extractor, return_waveforms, text_to_ids, return_ids: see `SpeechCollator`.
        pin_memory: pin batches for faster host-to-GPU copies.
        collator: a custom collator instead of `SpeechCollator`.
        frame_labels_key: manifest field of the frame labels (`recipe.data.frame_labels_key`).
        **config: other `DataConfig` fields (min_duration, max_duration, crop_long, max_batch_size,
            bucket_window, max_bad_fraction, require_text, ...).
    Example:
        loader = build_dataloader(["a.jsonl", "b.jsonl"], [1.0, 0.5], batch_seconds=300, num_workers=4,
                                  rank=acc.process_index, world_size=acc.num_processes, seed=1,
                                  feature_extractor=fe)
        for batch in loader: ...          # one epoch; state = loader.state_dict() at any time
        while step < max_steps:           # step-based training: each pass is the next epoch
            for batch in loader: ...
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    data_config = DataConfig(batch_seconds=batch_seconds, **config)
    specs = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if weights is None:
        weights = [float(spec.get("weight", 1.0)) if isinstance(spec, dict) else 1.0 for spec in specs]
    if len(weights) != len(specs) or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights={list(weights)} must be one finite number >= 0 per source ({len(specs)} sources)")
    opened = [open_source(spec, frame_labels_key) for spec in specs]
    collator = collator or SpeechCollator(
        feature_extractor,
        return_waveforms=return_waveforms,
        text_to_ids=text_to_ids,
        sampling_rate=data_config.sampling_rate,
        return_ids=return_ids,
    )
    counter = BadExampleCounter(data_config.max_bad_fraction, data_config.min_examples_before_check)
    streaming = [source for source in opened if isinstance(source, StreamingDatasetSource)]
    if streaming:
        if len(opened) != 1:
            raise ValueError("a streaming dataset must be the only source of a loader (mixing needs row counts)")
        dataset: PlannedBatchDataset | StreamingBatchDataset = StreamingBatchDataset(
            streaming[0], data_config, collator, rank, world_size, seed
        )
        return SpeechDataLoader(dataset, counter, num_workers, pin_memory)
    problems = [problem for source in opened for problem in source.problems]
    rows = sum(len(source) for source in opened)
    if rows == 0:
        raise ValueError(f"no usable rows in {specs}: {len(problems)} left out, e.g. {problems[:3]}")
    if problems and len(problems) / (rows + len(problems)) > data_config.max_bad_fraction:
        counter = BadExampleCounter(data_config.max_bad_fraction, 0, log_first=0, log_interval=math.inf)
        for problem in problems:  # already logged while indexing
            counter.add_bad(*problem)
        counter.add_good(rows)
        counter.check(force=True)
    dataset = PlannedBatchDataset(opened, weights, data_config, collator, rank, world_size, seed)
    return SpeechDataLoader(dataset, counter, num_workers, pin_memory, problems=problems)
