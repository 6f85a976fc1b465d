"""Turn corpora already on disk into NeMo JSONL manifests (and, on request, webdataset tar shards).

One function per layout, each returning `(rows, bad)`: `rows` are manifest dicts (`audio_filepath`
absolute, `duration`, `text`, `speaker`, optional `offset`, `id`), `bad` is a list of `(path, reason)` for
files that were listed but could not be used. `write_manifest` and `write_tar_shards` write them out.

Layouts (exactly as the corpora ship):
- LibriSpeech: `<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac` + `<speaker>-<chapter>.trans.txt`
  (lines `<utt id> <TEXT>`).
- LibriLight (unlabelled): `<speaker>/<book>/<file>.flac` + `<file>.json` with `voice_activity` ([start, end]
  seconds); voiced stretches are merged into segments of at most `max_segment` seconds.
- Mozilla Common Voice: `<root>/clips/*.mp3` + `<root>/<split>.tsv` (columns `path`, `sentence`,
  `client_id`, ...); `clip_durations.tsv` (`clip`, `duration[ms]`) is used when present.
- AN4 (the NeMo tutorial's `an4_sphere` download): `an4/wav/an4_clstk/<speaker>/*.sph` (train),
  `an4/wav/an4test_clstk/<speaker>/*.sph` (test), `an4/etc/an4_{train,test}.transcription` with lines
  `<s> TEXT </s> (<fileid>)`; NIST SPHERE is converted to WAV with soundfile.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from .audio_io import AudioError, probe_duration

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".sph")
Row = dict[str, Any]
Bad = tuple[str, str]


def _progress(items: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="file")


def probe_many(
    paths: Sequence[str | os.PathLike], jobs: int = 4, progress: bool = False, desc: str = "durations"
) -> list[float | AudioError]:
    """Header durations of many files (threads: it is I/O-bound), each a float or the `AudioError`."""

    def one(path: str | os.PathLike) -> float | AudioError:
        try:
            return probe_duration(path)
        except AudioError as error:
            return error

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(_progress(pool.map(one, paths), len(paths), desc, progress))


def _rows_with_durations(
    candidates: Sequence[Row], jobs: int, progress: bool, desc: str
) -> tuple[list[Row], list[Bad]]:
    """Fill `duration` of rows that lack it by probing; rows whose file cannot be read go to `bad`."""
    todo = [index for index, row in enumerate(candidates) if row.get("duration") is None]
    results = probe_many([candidates[i]["audio_filepath"] for i in todo], jobs, progress, desc)
    durations = dict(zip(todo, results))
    rows, bad = [], []
    for index, row in enumerate(candidates):
        result = durations.get(index, row.get("duration"))
        if isinstance(result, AudioError):
            bad.append((row["audio_filepath"], f"{result.reason}: {result.detail or ''}".rstrip(": ")))
            continue
        rows.append({**row, "duration": round(float(result), 4)})
    return rows, bad


# ---------------------------------------------------------------------------------------------------------
# Writers


def write_manifest(rows: Iterable[Row], path: str | os.PathLike, relative: bool = True) -> Path:
    """Write NeMo JSONL; with `relative`, audio under the manifest's folder is stored relative to it (the
    data pipeline resolves relative paths against the manifest's folder, so the folder can move)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            row = dict(row)
            audio = Path(row["audio_filepath"]).resolve()
            if relative and audio.is_relative_to(base):
                row["audio_filepath"] = audio.relative_to(base).as_posix()
            else:
                row["audio_filepath"] = str(audio)
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def shard_key(row_id: str) -> str:
    """A webdataset key for an id: the key ends at the first dot, so dots (and slashes) become `_`."""
    return row_id.replace(".", "_").replace("/", "_").replace("@", "_")


def write_tar_shards(
    rows: Sequence[Row], out_dir: str | os.PathLike, num_shards: int, prefix: str = "shard"
) -> list[Path]:
    """Write `rows` as `num_shards` uncompressed tars in webdataset layout: `<key>.<ext>` (the original audio
    bytes) + `<key>.json` (every other manifest field). Rows are dealt round-robin so shards have similar sizes.
    Segments (`offset`) keep their offset and duration in the json; the whole file is stored once per row.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(num_shards - 1)))
    paths = [out_dir / f"{prefix}-{index:0{width}d}.tar" for index in range(num_shards)]
    archives = [tarfile.open(path, "w") for path in paths]
    try:
        seen: set[str] = set()
        for index, row in enumerate(rows):
            key = shard_key(row.get("id") or Path(row["audio_filepath"]).stem)
            if key in seen:
                key = f"{key}_{index}"
            seen.add(key)
            archive = archives[index % num_shards]
            audio_path = Path(row["audio_filepath"])
            archive.add(audio_path, arcname=f"{key}{audio_path.suffix.lower()}")
            meta = {k: v for k, v in row.items() if k != "audio_filepath"}
            blob = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    finally:
        for archive in archives:
            archive.close()
    return paths


def convert_audio(source: str | os.PathLike, target: str | os.PathLike, subtype: str = "PCM_16") -> float:
    """Re-encode one file with soundfile (format from `target`'s suffix, same rate and channels); returns
    its duration. Raises `AudioError` when the source cannot be read."""
    from .audio_io import read_audio

    audio, rate, _ = read_audio(source)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    sf.write(target, audio, rate, subtype=subtype)
    return audio.shape[0] / rate


# ---------------------------------------------------------------------------------------------------------
# A folder of audio


def find_audio(folder: str | os.PathLike, suffixes: Sequence[str] = AUDIO_SUFFIXES) -> list[Path]:
    """Audio files under `folder` (recursive, sorted); directories named like audio are left to the caller."""
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and not p.is_dir())


def folder_manifest(
    folder: str | os.PathLike, suffixes: Sequence[str] = AUDIO_SUFFIXES, jobs: int = 4, progress: bool = True
) -> tuple[list[Row], list[Bad]]:
    """Rows for every audio file under `folder`; text from a sidecar `<stem>.txt` when there is one."""
    folder = Path(folder)
    rows = []
    for path in find_audio(folder, suffixes):
        sidecar = path.with_suffix(".txt")
        text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        row: Row = {
            "audio_filepath": str(path.resolve()),
            "duration": None,
            "id": path.relative_to(folder).with_suffix("").as_posix(),
        }
        if text is not None:
            row["text"] = text
        rows.append(row)
    return _rows_with_durations(rows, jobs, progress, f"reading {folder}")


# ---------------------------------------------------------------------------------------------------------
# LibriSpeech


def prepare_librispeech(
    split_dir: str | os.PathLike, lowercase: bool = True, jobs: int = 4, progress: bool = True
) -> tuple[list[Row], list[Bad]]:
    """LibriSpeech split folder (e.g. `LibriSpeech/train-clean-100`) → rows with text, speaker, id.

    Args:
        split_dir: the folder holding `<speaker>/<chapter>/`.
        lowercase: lowercase the (upper-case) transcripts, as NeMo's LibriSpeech recipe does.
        jobs: threads reading headers. progress: show a tqdm bar.
    """
    split_dir = Path(split_dir)
    transcripts = sorted(split_dir.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise FileNotFoundError(f"no <speaker>/<chapter>/*.trans.txt under {split_dir}: is it a LibriSpeech split?")
    rows, bad = [], []
    for transcript in transcripts:
        for number, line in enumerate(transcript.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            audio = transcript.parent / f"{utt}.flac"
            if not text:
                bad.append((f"{transcript}:{number}", "malformed: no text after the utterance id"))
                continue
            if not audio.is_file():
                bad.append((str(audio), "missing: listed in the transcript, no .flac"))
                continue
            speaker = utt.split("-", 1)[0]
            rows.append(
                {
                    "audio_filepath": str(audio.resolve()),
                    "duration": None,
                    "text": text.lower() if lowercase else text,
                    "speaker": speaker,
                    "id": utt,
                }
            )
    good, unreadable = _rows_with_durations(rows, jobs, progress, f"LibriSpeech {split_dir.name}")
    return good, bad + unreadable


# ---------------------------------------------------------------------------------------------------------
# LibriLight


def segments_from_vad(
    voice_activity: Sequence[Sequence[float]], max_segment: float = 20.0, min_segment: float = 1.0
) -> list[tuple[float, float]]:
    """Merge voiced stretches `[start, end]` (seconds) into `(offset, duration)` segments of at most
    `max_segment` seconds: consecutive stretches are joined while the span fits, a longer stretch is cut
    into equal pieces; segments shorter than `min_segment` are dropped."""
    segments: list[tuple[float, float]] = []
    current: list[float] | None = None
    for start, end in sorted((float(s), float(e)) for s, e in voice_activity if e > s):
        if current is not None and end - current[0] <= max_segment:
            current[1] = end
            continue
        if current is not None:
            segments.append((current[0], current[1] - current[0]))
        pieces = max(1, int(np.ceil((end - start) / max_segment)))
        step = (end - start) / pieces
        for piece in range(pieces - 1):
            segments.append((start + piece * step, step))
        current = [start + (pieces - 1) * step, end]
    if current is not None:
        segments.append((current[0], current[1] - current[0]))
    return [(round(o, 3), round(d, 3)) for o, d in segments if d >= min_segment]


def prepare_librilight(
    root: str | os.PathLike,
    max_segment: float | None = 20.0,
    min_segment: float = 1.0,
    jobs: int = 4,
    progress: bool = True,
) -> tuple[list[Row], list[Bad]]:
    """LibriLight folder (`small`, `medium`, ... holding `<speaker>/<book>/<file>.flac` + `<file>.json`) →
    unlabelled rows. With `max_segment`, each file becomes its voice-activity segments (`offset` +
    `duration`); with None (or without usable json) each file is one row."""
    root = Path(root)
    files = sorted(root.glob("*/*/*.flac"))
    if not files:
        raise FileNotFoundError(f"no <speaker>/<book>/*.flac under {root}: is it a LibriLight folder?")
    whole, segmented, bad = [], [], []
    for audio in files:
        speaker = audio.parent.parent.name
        base_id = f"{speaker}/{audio.parent.name}/{audio.stem}"
        meta_path = audio.with_suffix(".json")
        intervals = None
        if max_segment is not None and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                intervals = meta.get("voice_activity")
                speaker = str(meta.get("speaker", speaker))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
                bad.append((str(meta_path), f"malformed: {error}; using the whole file"))
        if intervals:
            for offset, duration in segments_from_vad(intervals, max_segment, min_segment):
                segmented.append(
                    {
                        "audio_filepath": str(audio.resolve()),
                        "offset": offset,
                        "duration": duration,
                        "speaker": speaker,
                        "id": f"{base_id}@{offset:.3f}",
                    }
                )
        else:
            whole.append({"audio_filepath": str(audio.resolve()), "duration": None, "speaker": speaker, "id": base_id})
    # Segments were cut from metadata; make sure their files open (one header read per file).
    readable, unreadable = _rows_with_durations(
        [{"audio_filepath": p, "duration": None} for p in sorted({r["audio_filepath"] for r in segmented})],
        jobs,
        progress,
        "LibriLight headers",
    )
    lengths = {row["audio_filepath"]: row["duration"] for row in readable}
    segments = [r for r in segmented if r["audio_filepath"] in lengths and r["offset"] < lengths[r["audio_filepath"]]]
    for row in segments:
        row["duration"] = round(min(row["duration"], lengths[row["audio_filepath"]] - row["offset"]), 4)
    rows, more_bad = _rows_with_durations(whole, jobs, progress, "LibriLight files")
    return sorted(rows + segments, key=lambda r: r["id"]), bad + unreadable + more_bad


# ---------------------------------------------------------------------------------------------------------
# Common Voice


def _read_tsv(path: Path) -> list[dict[str, str]]:
    # Sentences contain quotes; Common Voice TSVs are not quoted, so quoting must be off.
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def prepare_commonvoice(
    root: str | os.PathLike,
    split: str = "train",
    convert_to: str | None = None,
    converted_dir: str | os.PathLike | None = None,
    jobs: int = 4,
    progress: bool = True,
) -> tuple[list[Row], list[Bad]]:
    """Common Voice language folder (`<root>/clips/`, `<root>/<split>.tsv`) → rows with text and speaker
    (`client_id`).

    Args:
        root: the language folder (e.g. `cv-corpus-17.0/eo`).
        split: the tsv name without `.tsv` (train, dev, test, validated, ...).
        convert_to: re-encode the clips to this format ("flac" or "wav") under `converted_dir`: MP3 decoding
            needs libsndfile >= 1.1 and is slower than FLAC.
        converted_dir: where converted clips go (default `<root>/clips_<format>`).
    """
    root = Path(root)
    tsv = root / f"{split}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{tsv} not found: Common Voice splits are <root>/<split>.tsv (train, dev, test)")
    table = _read_tsv(tsv)
    if table and not {"path", "sentence"} <= set(table[0]):
        raise ValueError(f"{tsv} has columns {sorted(table[0])}; expected at least 'path' and 'sentence'")
    known: dict[str, float] = {}
    durations_tsv = root / "clip_durations.tsv"
    if durations_tsv.is_file():
        for line in _read_tsv(durations_tsv):
            try:
                known[line["clip"]] = float(line["duration[ms]"]) / 1000.0
            except (KeyError, TypeError, ValueError):
                continue
    rows, bad = [], []
    for number, entry in enumerate(table, start=2):
        clip, sentence = entry.get("path"), entry.get("sentence")
        if not clip or sentence is None:
            bad.append((f"{tsv}:{number}", "malformed: empty 'path' or 'sentence'"))
            continue
        audio = root / "clips" / clip
        row = {
            "audio_filepath": str(audio.resolve()),
            "duration": known.get(clip),
            "text": sentence.strip(),
            "speaker": entry.get("client_id") or None,
            "id": Path(clip).stem,
        }
        rows.append(row)
    if convert_to is not None:
        converted_dir = Path(converted_dir or root / f"clips_{convert_to}")
        rows, conversion_bad = _convert_rows(rows, converted_dir, convert_to, progress)
        bad += conversion_bad
    good, unreadable = _rows_with_durations(rows, jobs, progress, f"Common Voice {split}")
    return good, bad + unreadable


def _convert_rows(rows: list[Row], out_dir: Path, fmt: str, progress: bool) -> tuple[list[Row], list[Bad]]:
    if fmt not in ("flac", "wav"):
        raise ValueError(f"convert_to={fmt!r}: choose 'flac' or 'wav'")
    converted, bad = [], []
    for row in _progress(rows, len(rows), f"converting to {fmt}", progress):
        target = out_dir / f"{row['id']}.{fmt}"
        try:
            duration = convert_audio(row["audio_filepath"], target)
        except AudioError as error:
            bad.append((row["audio_filepath"], f"{error.reason}: {error.detail}".rstrip(": ")))
            continue
        converted.append({**row, "audio_filepath": str(target.resolve()), "duration": round(duration, 4)})
    return converted, bad


# ---------------------------------------------------------------------------------------------------------
# AN4

AN4_SPLITS = {"train": ("an4_clstk", "an4_train"), "test": ("an4test_clstk", "an4_test")}


def parse_an4_transcription(line: str) -> tuple[str, str] | None:
    """`<s> YES </s> (fash-an251-b)` → (`fash-an251-b`, `YES`); None for a line that does not match."""
    line = line.strip()
    if not line.endswith(")") or "(" not in line:
        return None
    text, _, file_id = line[:-1].rpartition("(")
    words = [w for w in text.split() if w not in ("<s>", "</s>")]
    return (file_id.strip(), " ".join(words)) if file_id.strip() else None


def prepare_an4(
    an4_dir: str | os.PathLike,
    split: str = "train",
    wav_dir: str | os.PathLike | None = None,
    lowercase: bool = True,
    progress: bool = True,
) -> tuple[list[Row], list[Bad]]:
    """AN4 (`an4/` of the NeMo tutorial download) → rows pointing at WAV copies of the SPHERE files.

    The transcription file id `<speaker>-<utt>-<x>` names `wav/<split dir>/<speaker>/<utt>-<speaker>-<x>.sph`
    (the order of `etc/<split>.fileids` is the same; we use the id itself, so a missing line cannot shift the
    pairing). Each `.sph` is converted to 16-bit WAV under `wav_dir` (default `an4/wav_converted/<split>`).

    Args:
        an4_dir: the `an4` folder (holding `wav/` and `etc/`).
        split: "train" or "test".
        wav_dir: where the WAV copies go.
        lowercase: lowercase the transcripts (NeMo's tutorial does).
    """
    if split not in AN4_SPLITS:
        raise ValueError(f"split={split!r}: AN4 has {sorted(AN4_SPLITS)}")
    an4_dir = Path(an4_dir)
    audio_dir, etc_name = AN4_SPLITS[split]
    transcription = an4_dir / "etc" / f"{etc_name}.transcription"
    if not transcription.is_file():
        raise FileNotFoundError(f"{transcription} not found: expected the NeMo tutorial's an4/ folder")
    wav_dir = Path(wav_dir or an4_dir / "wav_converted" / split)
    entries, bad = [], []
    for number, line in enumerate(transcription.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parsed = parse_an4_transcription(line)
        if parsed is None:
            bad.append((f"{transcription}:{number}", "malformed: expected '<s> TEXT </s> (fileid)'"))
            continue
        file_id, text = parsed
        parts = file_id.split("-")
        if len(parts) != 3:
            bad.append((f"{transcription}:{number}", f"malformed: file id {file_id!r} is not speaker-utt-x"))
            continue
        speaker, utt, suffix = parts
        entries.append(
            (an4_dir / "wav" / audio_dir / speaker / f"{utt}-{speaker}-{suffix}.sph", file_id, text, speaker)
        )
    rows = []
    for sphere, file_id, text, speaker in _progress(entries, len(entries), f"AN4 {split}: .sph → .wav", progress):
        target = wav_dir / speaker / f"{sphere.stem}.wav"
        try:
            duration = convert_audio(sphere, target)
        except AudioError as error:
            bad.append((str(sphere), f"{error.reason}: {error.detail}".rstrip(": ")))
            continue
        rows.append(
            {
                "audio_filepath": str(target.resolve()),
                "duration": round(duration, 4),
                "text": text.lower() if lowercase else text,
                "speaker": speaker,
                "id": file_id,
            }
        )
    return rows, bad


PREPARERS: dict[str, Callable[..., tuple[list[Row], list[Bad]]]] = {
    "librispeech": prepare_librispeech,
    "librilight": prepare_librilight,
    "commonvoice": prepare_commonvoice,
    "an4": prepare_an4,
}


def report_bad(bad: Sequence[Bad], limit: int = 50) -> str:
    """Printable list of the files left out, with reasons (the first `limit`)."""
    if not bad:
        return "all files usable"
    lines = [f"{len(bad)} file(s) left out:"]
    lines += [f"  {path}: {reason}" for path, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
