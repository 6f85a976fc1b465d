"""Transcribe audio files or manifests with a fine-tuned CTC model: what `scripts/transcribe.py` runs.

Audio is decoded with soundfile, mixed to mono and resampled to 16 kHz (`hf_ssl_speech.data.load_audio`);
unreadable files are skipped with a warning. With `chunk_length_s`, each file goes through
`pipeline("automatic-speech-recognition")` in overlapping chunks (long recordings); otherwise files are
batched through `ctc.ctc_outputs`. Decoding is greedy, or a beam search with the folder's n-gram LM
(`decoder="lm"`; `"auto"` uses the LM when the folder has one, `finetune.lm.attach_lm`). With references (a
manifest with text), corpus WER/CER are computed.
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
from ..errors import UserError, check_model_source, check_paths
from ..frames import SAMPLING_RATE
from .ctc import ctc_outputs
from .metrics import load_metrics
from .rows import manifest_rows
from .text import normalize_transcript

logger = logging.getLogger(__name__)


DECODERS = ("auto", "greedy", "lm")


def load_lm_processor(model_name_or_path: str | os.PathLike, decoder: str) -> Any:
    """The folder's `ConformerSslProcessorWithLM` when `decoder` asks for the LM ("lm", or "auto" and one is there)."""
    from .lm import LM_INSTALL, LmError, has_lm, lm_chatter_to_debug_log

    if decoder == "greedy":
        return None
    if not has_lm(model_name_or_path):
        if decoder == "lm":
            raise LmError(
                f"{model_name_or_path}: no language model in this folder (alphabet.json + language_model/); add one "
                "with scripts/build_lm.py, or use --decoder greedy"
            )
        return None
    try:
        from ..processing_conformer_ssl_lm import ConformerSslProcessorWithLM

        with lm_chatter_to_debug_log():
            return ConformerSslProcessorWithLM.from_pretrained(str(model_name_or_path))
    except ImportError as error:
        if decoder == "lm":
            raise LmError(f"LM decoding needs pyctcdecode and kenlm: {LM_INSTALL} ({error})") from error
        # Not silently: the folder's LM is what its WER figures assume.
        logger.warning(
            "%s has an n-gram LM, but %s is not installed, so decoding is GREEDY. For LM decoding: %s",
            model_name_or_path,
            getattr(error, "name", None) or "pyctcdecode/kenlm",
            LM_INSTALL,
        )
        return None


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


def load_inputs(items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any], list[str]]:
    """Decode the audio of `collect_inputs` items: (the readable items with their `duration`, their waveforms,
    the reasons the others were skipped). An unreadable file is logged and skipped, never the whole run."""
    kept, audios, skipped = [], [], []
    for item in items:
        try:
            audio, _ = load_audio(item["audio_filepath"], offset=item["offset"], duration=item["read_duration"])
        except AudioError as error:
            logger.warning("skipping %s", error)
            skipped.append(str(error))
            continue
        kept.append({**item, "duration": round(len(audio) / SAMPLING_RATE, 3)})
        audios.append(audio)
    return kept, audios, skipped


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
    decoder: str = "auto",
    beam_width: int = 24,
) -> Transcription:
    """CTC transcripts of `files` and the utterances of `manifests`, scored where they have text.

    Args:
        model_name_or_path: a folder or Hub repo with an `AutoModelForCTC` + `AutoProcessor` pair (what
            `run_ctc` saves).
        files / manifests: audio paths, and NeMo JSONL manifests (their `offset`/`duration` segments are kept).
        chunk_length_s / stride_length_s: > 0 sends each file through the ASR pipeline in chunks of that length.
        decoder: "greedy", "lm" (beam search with the folder's LM; an error if it has none) or "auto" (the LM
            when the folder has one and pyctcdecode/kenlm are installed, else greedy).
        beam_width: beams of the LM search.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: choose one of {', '.join(DECODERS)}")
    check_model_source(model_name_or_path, "model_name_or_path")
    items_in = collect_inputs(files, manifests)
    from .lm import lm_chatter_to_debug_log
    from .transducer import is_transducer_folder, load_transducer, transducer_outputs

    with lm_chatter_to_debug_log():  # a folder with an LM loads it here too
        processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    transducer = is_transducer_folder(str(model_name_or_path), trust_remote_code)
    if transducer and (decoder == "lm" or chunk_length_s > 0):
        # transformers 5.25's ASR pipeline drops the chunk strides of transducer outputs (overlaps would repeat)
        raise UserError(f"{model_name_or_path} is a transducer: greedy decoding of whole files only (no LM, no chunks)")
    processor_lm = None if transducer else load_lm_processor(model_name_or_path, decoder)
    if transducer:
        model = load_transducer(str(model_name_or_path), trust_remote_code).to(device)
    else:
        model = AutoModelForCTC.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code).to(device)
    model.eval()

    items, audios, skipped = load_inputs(items_in)

    with tqdm(total=len(audios), unit="file", desc="transcribing", file=sys.stderr) as bar:
        if chunk_length_s > 0:
            with lm_chatter_to_debug_log():
                asr = pipeline(
                    "automatic-speech-recognition",
                    model=model,
                    tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor,
                    decoder=processor_lm.decoder if processor_lm is not None else None,
                    device=device,
                )
            hypotheses = []
            for audio in audios:
                hypotheses.append(asr(audio, chunk_length_s=chunk_length_s, stride_length_s=stride_length_s)["text"])
                bar.update(1)
        elif transducer:
            hypotheses = transducer_outputs(model, processor, audios, batch_size, progress=bar.update)
        else:
            hypotheses, log_probs = ctc_outputs(model, processor, audios, batch_size, progress=bar.update)
            if processor_lm is not None:
                from .lm import lm_decode

                hypotheses = lm_decode(processor_lm, log_probs, beam_width=beam_width)

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


def load_validation_outputs(
    model_name_or_path: str | os.PathLike, manifest: str | os.PathLike, batch_size: int = 8, device: str = "cpu"
) -> tuple[list[str], list[Any]]:
    """(normalised references, CTC log-probabilities) of a manifest's utterances with text: what the LM weights
    are tuned on (`finetune.lm.tune_lm_weights`)."""
    check_model_source(model_name_or_path, "model_name_or_path")
    items = [item for item in collect_inputs([], [str(manifest)]) if item["reference"] is not None]
    if not items:
        raise ValueError(f"{manifest}: no utterance with text; tuning LM weights needs references")
    processor = AutoProcessor.from_pretrained(model_name_or_path)
    model = AutoModelForCTC.from_pretrained(model_name_or_path).to(device)
    kept, audios, _ = load_inputs(items)
    _, log_probs = ctc_outputs(model, processor, audios, batch_size)
    return [item["reference"] for item in kept], log_probs


__all__ = [
    "Transcription",
    "collect_inputs",
    "load_inputs",
    "load_validation_outputs",
    "score",
    "transcribe_files",
    "write_records",
]
