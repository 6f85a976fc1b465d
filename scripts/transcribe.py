#!/usr/bin/env python
"""Transcribe audio files with a fine-tuned CTC model (greedy, or beam search with the folder's n-gram LM).

    python scripts/transcribe.py runs/ctc_demo a.wav b.flac          # prints "path<TAB>text" lines
    python scripts/transcribe.py runs/ctc_demo --manifest test.jsonl --output hyp.jsonl
    python scripts/transcribe.py user/model long.wav --chunk_length_s 20 --stride_length_s 4
    python scripts/transcribe.py docs/results/models/ctc_10min_pretrained_dinosr a.wav --decoder lm

MODEL is a folder or Hub repo holding an `AutoModelForCTC` + `AutoProcessor` pair (what finetune_ctc.py
saves). Audio is decoded with soundfile, mixed to mono and resampled to 16 kHz. With `--chunk_length_s`,
each file goes through `pipeline("automatic-speech-recognition")` in overlapping chunks (long recordings);
otherwise files are batched. `--output` gets one JSON line per file (`audio_filepath`, `duration`,
`hypothesis`, and `reference` when the manifest has text). `--decoder auto` (the default) decodes with
the folder's LM when it has one (`scripts/build_lm.py` adds one), `greedy` never, `lm` always; with references, corpus WER/CER are printed and
written to `<output>.metrics.json`. The work is `hf_ssl_speech.finetune.inference.transcribe_files`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_ssl_speech.finetune.inference import Transcription


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="fine-tuned model folder or Hub repo id")
    parser.add_argument("files", nargs="*", help="audio files to transcribe")
    parser.add_argument("--manifest", action="append", default=[], help="NeMo JSONL manifest(s) (repeatable)")
    parser.add_argument("--output", help="JSONL file for the hypotheses (default: print to stdout)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--chunk_length_s", type=float, default=0.0, help="chunked long-form decoding (seconds)")
    parser.add_argument("--stride_length_s", type=float, default=None, help="context on each side of a chunk")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    parser.add_argument("--decoder", choices=("auto", "greedy", "lm"), default="auto", help="see above")
    parser.add_argument("--beam_width", type=int, default=24, help="beams of the LM search")
    parser.add_argument("--trust_remote_code", action="store_true", help="use the code stored next to the weights")
    args = parser.parse_args(argv)
    if not args.files and not args.manifest:
        parser.error("give audio files or --manifest")
    return args


def main(argv: list[str] | None = None) -> Transcription:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = parse(argv)
    # Imported here, after the arguments: torch and transformers take seconds to load (see _preflight.py).
    import torch

    import hf_ssl_speech  # noqa: F401  (registers the conformer_ssl classes with the Auto factories)
    from hf_ssl_speech.finetune.inference import transcribe_files, write_records

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    result = transcribe_files(
        args.model,
        args.files,
        args.manifest,
        batch_size=args.batch_size,
        chunk_length_s=args.chunk_length_s,
        stride_length_s=args.stride_length_s,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        decoder=args.decoder,
        beam_width=args.beam_width,
    )
    if args.output:
        write_records(result.records, args.output, result.scores)
    else:
        for record in result.records:
            print(f"{record['audio_filepath']}\t{record['hypothesis']}")
    if result.scores:
        wer, cer, n = result.scores["wer"], result.scores["cer"], result.scores["utterances"]
        print(f"WER {100 * wer:.2f}%  CER {100 * cer:.2f}%  ({n} utterances)", file=sys.stderr)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable file(s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    from _preflight import preflight

    def check_paths(errors, argv: list[str]) -> None:
        args = parse(argv)
        errors.check_model_source(args.model, "model")
        errors.check_paths(args.files, "files")
        errors.check_paths(args.manifest, "--manifest")

    preflight(check_paths)
    from hf_ssl_speech.errors import run_command

    sys.exit(run_command(main))
