#!/usr/bin/env python
"""Transcribe audio files with a fine-tuned CTC model (greedy decoding).

    python scripts/transcribe.py runs/ctc a.wav b.flac               # prints "path<TAB>text" lines
    python scripts/transcribe.py runs/ctc --manifest test.jsonl --output hyp.jsonl
    python scripts/transcribe.py user/model long.wav --chunk_length_s 20 --stride_length_s 4

MODEL is a folder or Hub repo holding an `AutoModelForCTC` + `AutoProcessor` pair (what finetune_ctc.py
saves). Audio is decoded with soundfile, mixed to mono and resampled to 16 kHz. With `--chunk_length_s`,
each file goes through `pipeline("automatic-speech-recognition")` in overlapping chunks (long recordings);
otherwise files are batched. `--output` gets one JSON line per file (`audio_filepath`, `duration`,
`hypothesis`, and `reference` when the manifest has text); with references, corpus WER/CER are printed and
written to `<output>.metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCTC, AutoProcessor, pipeline

import hf_ssl_speech  # noqa: F401  (registers the conformer_ssl classes with the Auto factories)
from hf_ssl_speech.data.audio_io import AudioError, load_audio
from hf_ssl_speech.finetune.ctc import transcribe
from hf_ssl_speech.finetune.metrics import load_metrics
from hf_ssl_speech.finetune.rows import manifest_rows
from hf_ssl_speech.finetune.text import normalize_transcript

logger = logging.getLogger("transcribe")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="fine-tuned model folder or Hub repo id")
    parser.add_argument("files", nargs="*", help="audio files to transcribe")
    parser.add_argument("--manifest", action="append", default=[], help="NeMo JSONL manifest(s) (repeatable)")
    parser.add_argument("--output", help="JSONL file for the hypotheses (default: print to stdout)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--chunk_length_s", type=float, default=0.0, help="chunked long-form decoding (seconds)")
    parser.add_argument("--stride_length_s", type=float, default=None, help="context on each side of a chunk")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trust_remote_code", action="store_true", help="use the code stored next to the weights")
    args = parser.parse_args(argv)
    if not args.files and not args.manifest:
        parser.error("give audio files or --manifest")
    return args


def collect_inputs(files: list[str], manifests: list[str]) -> list[dict[str, Any]]:
    """One dict per utterance: audio_filepath, offset, read_duration, reference (None without text)."""
    items = [{"audio_filepath": f, "offset": 0.0, "read_duration": None, "reference": None} for f in files]
    if manifests:
        rows, _ = manifest_rows(manifests)
        for row in rows:
            reference = normalize_transcript(row["text"]) if row["text"] is not None else None
            items.append({**{k: row[k] for k in ("audio_filepath", "offset", "read_duration")}, "reference": reference})
    return items


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = parse(argv)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCTC.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).to(args.device)
    model.eval()

    items, audios = [], []
    for item in collect_inputs(args.files, args.manifest):
        try:
            audio, _ = load_audio(item["audio_filepath"], offset=item["offset"], duration=item["read_duration"])
        except AudioError as error:
            logger.warning("skipping %s", error)
            continue
        items.append({**item, "duration": round(len(audio) / 16000, 3)})
        audios.append(audio)

    with tqdm(total=len(audios), unit="file", desc="transcribing", file=sys.stderr) as bar:
        if args.chunk_length_s > 0:
            asr = pipeline(
                "automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                feature_extractor=processor.feature_extractor, device=args.device,
            )  # fmt: skip
            hypotheses = []
            for audio in audios:
                out = asr(audio, chunk_length_s=args.chunk_length_s, stride_length_s=args.stride_length_s)
                hypotheses.append(out["text"])
                bar.update(1)
        else:
            hypotheses = transcribe(model, processor, audios, args.batch_size, progress=bar.update)

    records = []
    for item, hypothesis in zip(items, hypotheses):
        record = {"audio_filepath": item["audio_filepath"], "duration": item["duration"], "hypothesis": hypothesis}
        if item["reference"] is not None:
            record["reference"] = item["reference"]
        records.append(record)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    else:
        for record in records:
            print(f"{record['audio_filepath']}\t{record['hypothesis']}")

    scores: dict[str, float] = {}
    scored = [record for record in records if "reference" in record]
    if scored:
        metrics = load_metrics()
        predictions = [record["hypothesis"] for record in scored]
        references = [record["reference"] for record in scored]
        scores = {name: m.compute(predictions=predictions, references=references) for name, m in metrics.items()}
        scores["utterances"] = len(scored)
        print(f"WER {100 * scores['wer']:.2f}%  CER {100 * scores['cer']:.2f}%  ({len(scored)} utterances)",
              file=sys.stderr)  # fmt: skip
        if args.output:
            Path(args.output).with_suffix(".metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
    return {"records": records, "scores": scores}


if __name__ == "__main__":
    main(sys.argv[1:])
