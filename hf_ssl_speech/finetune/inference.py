"""Transcribe audio files or manifests with a fine-tuned CTC model: what `scripts/transcribe.py` runs.

Audio is decoded with soundfile, mixed to mono and resampled to 16 kHz (`hf_ssl_speech.data.load_audio`);
unreadable files are skipped with a warning. With `chunk_length_s`, each file goes through
`pipeline("automatic-speech-recognition")` in overlapping chunks (long recordings); otherwise files are
batched through `ctc.transcribe`. With references (a manifest with text), corpus WER/CER are computed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoModelForCTC, AutoProcessor, pipeline

from ..data.audio_io import AudioError, load_audio
from ..errors import check_paths
from ..frames import SAMPLING_RATE
from .ctc import transcribe
from .metrics import load_metrics
from .rows import manifest_rows
from .text import normalize_transcript

logger = logging.getLogger(__name__)


@dataclass
class Transcription:
    """`records`: one dict per decoded file (`audio_filepath`, `duration`, `hypothesis`, `reference` when the
    manifest had text); `scores`: corpus `wer`, `cer` and `utterances` (empty without references); `skipped`:
    the files that could not be read, with the reason."""

    records: list[dict[str, Any]]
    scores: dict[str, float]
    skipped: list[str] = field(default_factory=list)


def collect_inputs(files: Sequence[str], manifests: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per utterance: audio_filepath, offset, read_duration, reference (None without text)."""
    check_paths(files, "files")
    check_paths(manifests, "--manifest")
    items = [{"audio_filepath": f, "offset": 0.0, "read_duration": None, "reference": None} for f in files]
    if manifests:
        rows, _ = manifest_rows(list(manifests))
        for row in rows:
            reference = normalize_transcript(row["text"]) if row["text"] is not None else None
            items.append({**{k: row[k] for k in ("audio_filepath", "offset", "read_duration")}, "reference": reference})
    return items


def transcribe_files(
    model_name_or_path: str | os.PathLike,
    files: Sequence[str] = (),
    manifests: Sequence[str] = (),
    *,
    batch_size: int = 8,
    chunk_length_s: float = 0.0,
    stride_length_s: float | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> Transcription:
    """Greedy CTC transcripts of `files` and the utterances of `manifests`, scored where they have text.

    Args:
        model_name_or_path: a folder or Hub repo with an `AutoModelForCTC` + `AutoProcessor` pair (what
            `run_ctc` saves).
        files / manifests: audio paths, and NeMo JSONL manifests (their `offset`/`duration` segments are kept).
        chunk_length_s / stride_length_s: > 0 sends each file through the ASR pipeline in chunks of that length.
    """
    items_in = collect_inputs(files, manifests)
    processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCTC.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code).to(device)
    model.eval()

    items, audios, skipped = [], [], []
    for item in items_in:
        try:
            audio, _ = load_audio(item["audio_filepath"], offset=item["offset"], duration=item["read_duration"])
        except AudioError as error:
            logger.warning("skipping %s", error)
            skipped.append(str(error))
            continue
        items.append({**item, "duration": round(len(audio) / SAMPLING_RATE, 3)})
        audios.append(audio)

    with tqdm(total=len(audios), unit="file", desc="transcribing", file=sys.stderr) as bar:
        if chunk_length_s > 0:
            asr = pipeline(
                "automatic-speech-recognition",
                model=model,
                tokenizer=processor.tokenizer,
                feature_extractor=processor.feature_extractor,
                device=device,
            )
            hypotheses = []
            for audio in audios:
                hypotheses.append(asr(audio, chunk_length_s=chunk_length_s, stride_length_s=stride_length_s)["text"])
                bar.update(1)
        else:
            hypotheses = transcribe(model, processor, audios, batch_size, progress=bar.update)

    records = []
    for item, hypothesis in zip(items, hypotheses):
        record = {"audio_filepath": item["audio_filepath"], "duration": item["duration"], "hypothesis": hypothesis}
        if item["reference"] is not None:
            record["reference"] = item["reference"]
        records.append(record)
    return Transcription(records=records, scores=score(records), skipped=skipped)


def score(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Corpus WER and CER of the records that carry a `reference` ({} when none does)."""
    scored = [record for record in records if "reference" in record]
    if not scored:
        return {}
    predictions = [record["hypothesis"] for record in scored]
    references = [record["reference"] for record in scored]
    scores = {name: m.compute(predictions=predictions, references=references) for name, m in load_metrics().items()}
    return {**scores, "utterances": len(scored)}


def write_records(records: Sequence[dict[str, Any]], output: str | os.PathLike, scores: dict[str, float]) -> Path:
    """One JSON line per record in `output`; the scores (if any) in `<output>.metrics.json`."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if scores:
        output.with_suffix(".metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
    return output


__all__ = ["Transcription", "collect_inputs", "score", "transcribe_files", "write_records"]
