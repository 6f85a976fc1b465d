"""Sources: raw examples (a path or bytes plus metadata) by row number, with every row's duration up front."""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from .audio_io import AudioError, AudioSource, probe_duration

logger = logging.getLogger(__name__)


AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "opus", "mp3", "sph", "aiff", "aif", "au")


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
                    except json.JSONDecodeError as error:
                        # json counts lines within the one line it was given; report the column only
                        raise AudioError("malformed", where, f"not JSON: {error.msg} at column {error.colno}") from None
                    except UnicodeDecodeError as error:
                        raise AudioError("malformed", where, f"not UTF-8 text: {error.reason}") from None
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
        # Without an id column: the file name, also for bytes that carry one (an `Audio` struct's `path`).
        id=meta.get("id")
        or (where if audio_name.startswith("<") else os.path.splitext(os.path.basename(audio_name))[0]),
        audio=audio,
        where=f"{audio_name} ({where})",
        offset=meta.get("offset", 0.0),
        duration=meta.get("duration") if segment else None,
        text=meta.get("text"),
        speaker=meta.get("speaker"),
        frame_labels=meta.get("frame_labels"),
        source=name,
    ), meta


# Optional columns and their default names: a default that the dataset lacks is ignored, a name given
# explicitly must exist (a typo would otherwise silently drop the transcripts or durations).
OPTIONAL_COLUMNS = {
    "text": "text",
    "speaker": "speaker",
    "duration": "duration",
    "id": "id",
    "offset": "offset",
    "frame_labels": "frame_labels",
}


def _dataset_columns(dataset: Any, audio_column: str, name: str, **columns: str | None) -> dict[str, str | None]:
    """Map the example fields to the dataset's columns; a `ConfigError` naming the setting if one is missing."""
    names = set(dataset.column_names or [])
    if audio_column not in names:
        raise ConfigError(
            f"{name}: audio_column={audio_column!r} is not a column of the dataset (columns: {sorted(names)}); "
            f"set audio_column to the column that holds the audio (a path, bytes or an Audio {{bytes, path}} struct)"
        )
    out: dict[str, str | None] = {"audio": audio_column}
    for key, column in columns.items():
        if column is not None and column not in names:
            raise ConfigError(
                f"{name}: {key}_column={column!r} is not a column of the dataset (columns: {sorted(names)}); "
                f"name one of them, or leave {key}_column out (default {OPTIONAL_COLUMNS[key]!r}, used if present)"
            )
        default = OPTIONAL_COLUMNS[key]
        out[key] = column if column is not None else (default if default in names else None)
    return out


def _undecoded(dataset: Any, audio_column: str) -> Any:
    """Make sure an `Audio` column yields `{"path", "bytes"}` instead of decoding (which needs torchcodec)."""
    features = getattr(dataset, "features", None) or {}
    feature = features.get(audio_column)
    if feature is not None and type(feature).__name__ == "Audio" and getattr(feature, "decode", False):
        from datasets import Audio

        dataset = dataset.cast_column(audio_column, Audio(decode=False))
    return dataset


class _ColumnSource:
    """What both `datasets` sources share: the columns an example is read from, and reading one row (arguments:
    see `DatasetSource`)."""

    default_name: str

    def __init__(
        self,
        dataset: Any,
        audio_column: str = "audio_filepath",
        text_column: str | None = None,
        speaker_column: str | None = None,
        duration_column: str | None = None,
        id_column: str | None = None,
        offset_column: str | None = None,
        frame_labels_column: str | None = None,
        base_dir: str | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or self.default_name
        self.dataset = _undecoded(dataset, audio_column)
        self.columns = _dataset_columns(
            self.dataset,
            audio_column,
            self.name,
            text=text_column,
            speaker=speaker_column,
            duration=duration_column,
            id=id_column,
            offset=offset_column,
            frame_labels=frame_labels_column,
        )
        self.base_dir = base_dir
        self.problems: list[tuple[str, str, str]] = []

    def _read(self, row: dict[str, Any], where: str) -> tuple[RawExample, float]:
        """One row -> (example, duration in seconds); the duration column, else the audio header (probed)."""
        raw, meta = _row_to_raw(row, self.columns, self.base_dir, self.name, where)
        duration = meta.get("duration")
        if duration is None:
            duration = probe_duration(raw.audio, raw.where) - raw.offset
        return raw, duration


class DatasetSource(_ColumnSource):
    """A map-style `datasets.Dataset` (e.g. `load_dataset("parquet", data_files=...)["train"]`).

    Args:
        dataset: the dataset; its audio column holds paths, bytes, or `Audio(decode=False)` dicts (an
            `Audio` column with decoding on is cast to `decode=False`: decoding needs torchcodec).
        audio_column: the column holding a path, bytes or an `Audio` `{bytes, path}` struct.
        text_column, speaker_column, duration_column, id_column, offset_column, frame_labels_column: column
            names; None uses `text`, `speaker`, ... when the dataset has them. A name given explicitly must
            exist (`ConfigError` otherwise).
        base_dir: folder that relative paths resolve against (e.g. the folder of the json/csv file).
        name: source name for logs.
    Rows without a duration column are probed (header read) once while indexing.
    """

    default_name = "dataset"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name = self.name
        rows: list[int] = []
        durations: list[float] = []
        for index, row in enumerate(self.dataset):
            where = f"{name}[{index}]"
            try:
                _, duration = self._read(row, where)
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


class StreamingDatasetSource(_ColumnSource):
    """A streaming `datasets.IterableDataset` with a path or bytes column (no row numbers, no global plan).

    Args: as `DatasetSource`. Rows without a duration are probed (header read) as they stream by.
    """

    default_name = "stream"

    def part(self, index: int, parts: int) -> Iterator[tuple[RawExample | None, float, AudioError | None]]:
        """Rows of part `index` of `parts` (disjoint, together all rows) as (raw, duration, error).

        With `S` shards (files, for parquet) the first `S - S % parts` go whole to the parts, round robin
        (part `i` reads shards `i, i + parts, ...`); the `S % parts` left over are read by every part, which
        keeps every `parts`-th of their rows. So parts get the same number of rows (within one row, given
        shards of equal size) whether or not `parts` divides `S`: 3 shards over 2 parts are 1.5 shards each,
        1 shard over 2 parts every other row. Uses `IterableDataset.iter`, which (unlike `__iter__`) does not
        shard again by dataloader worker.
        """
        shards = int(getattr(self.dataset, "num_shards", 1) or 1)
        whole = shards - shards % parts
        # (shard, dataset to read, keep every n-th row): whole shards first, then the shared remainder.
        plan: list[tuple[int | None, Any, int]] = []
        for shard in range(index, whole, parts):
            plan.append((shard, self.dataset.shard(num_shards=shards, index=shard, contiguous=True), 1))
        if whole == 0:
            plan.append((None, self.dataset, parts))
        else:
            for shard in range(whole, shards):
                plan.append((shard, self.dataset.shard(num_shards=shards, index=shard, contiguous=True), parts))
        shared_rows = 0  # rows of the shared remainder read so far, over all its shards: the stride runs across
        for shard, dataset, stride in plan:
            row_number = -1
            for batch in dataset.iter(batch_size=64):
                count = len(next(iter(batch.values())))
                for offset in range(count):
                    row_number += 1
                    if stride > 1:
                        shared_rows += 1
                        if (shared_rows - 1) % stride != index:
                            continue
                    row = {key: values[offset] for key, values in batch.items()}
                    place = f"row {row_number}" if shard is None else f"shard {shard}, row {row_number}"
                    where = f"{self.name}[part {index}/{parts}, {place}]"
                    try:
                        raw, duration = self._read(row, where)
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

            allowed = {"builder", "data_files", "streaming", "split", "base_dir", "name", "audio_column"}
            allowed |= {f"{key}_column" for key in OPTIONAL_COLUMNS}
            unknown = sorted(set(spec) - allowed)
            if unknown:
                raise ConfigError(
                    f"source spec {spec!r}: unknown key(s) {unknown}; a 'builder' source takes {sorted(allowed)} "
                    f"(and 'weight')"
                )
            if not spec.get("data_files"):
                raise ConfigError(
                    f"source spec {spec!r}: 'data_files' is missing; give the files, e.g. "
                    f"data_files: 'shards/train-*.parquet'"
                )
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
