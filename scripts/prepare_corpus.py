#!/usr/bin/env python
"""Corpus on disk → NeMo JSONL manifest (+ webdataset tar shards with --shards N).

    python scripts/prepare_corpus.py librispeech LibriSpeech/train-clean-100 --out manifests/ls100.jsonl
    python scripts/prepare_corpus.py librilight librilight/small --out manifests/ll_small.jsonl --max-segment 20
    python scripts/prepare_corpus.py commonvoice cv-corpus/eo --split train --out manifests/cv_eo_train.jsonl
    python scripts/prepare_corpus.py an4 an4 --split train --out manifests/an4_train.jsonl --shards 4

Files that are listed but unusable (missing, unreadable, malformed lines) are printed at the end; the exit
status is 1 when nothing usable was found. Layout details: `hf_ssl_speech/data/prepare.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_ssl_speech.data.prepare import (
    prepare_an4,
    prepare_commonvoice,
    prepare_librilight,
    prepare_librispeech,
    report_bad,
    write_manifest,
    write_tar_shards,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="corpus", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--out", required=True, type=Path, help="manifest to write (.jsonl)")
        sub.add_argument("--shards", type=int, default=0, help="also write this many tar shards (webdataset layout)")
        sub.add_argument("--shard-dir", type=Path, help="folder of the shards (default: <out without .jsonl>_shards)")
        sub.add_argument("--absolute", action="store_true", help="absolute audio paths (default: relative to --out)")
        sub.add_argument("--jobs", type=int, default=4, help="threads reading audio headers")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub = commands.add_parser("librispeech", help="<split>/<spk>/<chapter>/*.flac + *.trans.txt")
    sub.add_argument("root", type=Path, help="a split folder, e.g. LibriSpeech/dev-clean")
    sub.add_argument("--keep-case", action="store_true", help="keep the upper-case transcripts")
    common(sub)
    sub = commands.add_parser("librilight", help="<spk>/<book>/*.flac + *.json voice activity (unlabelled)")
    sub.add_argument("root", type=Path, help="e.g. librilight/small")
    sub.add_argument("--max-segment", type=float, default=20.0, help="segment length cap in seconds; 0 = whole files")
    sub.add_argument("--min-segment", type=float, default=1.0, help="drop shorter voiced segments")
    common(sub)
    sub = commands.add_parser("commonvoice", help="clips/*.mp3 + <split>.tsv")
    sub.add_argument("root", type=Path, help="a language folder, e.g. cv-corpus-17.0/eo")
    sub.add_argument("--split", default="train", help="tsv name without .tsv (train, dev, test, validated)")
    sub.add_argument("--convert-to", choices=["flac", "wav"], help="re-encode the MP3 clips (faster to decode)")
    sub.add_argument("--converted-dir", type=Path, help="where re-encoded clips go (default <root>/clips_<fmt>)")
    common(sub)
    sub = commands.add_parser("an4", help="an4/wav/an4_clstk/<spk>/*.sph + an4/etc/an4_train.transcription")
    sub.add_argument("root", type=Path, help="the an4 folder (holding wav/ and etc/)")
    sub.add_argument("--split", default="train", choices=["train", "test"])
    sub.add_argument("--wav-dir", type=Path, help="where the WAV copies go (default an4/wav_converted/<split>)")
    sub.add_argument("--keep-case", action="store_true", help="keep the upper-case transcripts")
    common(sub)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = not args.no_progress
    if args.corpus == "librispeech":
        rows, bad = prepare_librispeech(args.root, lowercase=not args.keep_case, jobs=args.jobs, progress=progress)
    elif args.corpus == "librilight":
        rows, bad = prepare_librilight(
            args.root, args.max_segment or None, args.min_segment, jobs=args.jobs, progress=progress
        )
    elif args.corpus == "commonvoice":
        rows, bad = prepare_commonvoice(
            args.root, args.split, args.convert_to, args.converted_dir, jobs=args.jobs, progress=progress
        )
    else:
        rows, bad = prepare_an4(args.root, args.split, args.wav_dir, lowercase=not args.keep_case, progress=progress)
    if rows:
        write_manifest(rows, args.out, relative=not args.absolute)
        hours = sum(row["duration"] for row in rows) / 3600
        print(f"wrote {args.out}: {len(rows)} rows, {hours:.2f} h")
        if args.shards:
            shard_dir = args.shard_dir or args.out.with_name(args.out.stem + "_shards")
            paths = write_tar_shards(rows, shard_dir, args.shards)
            print(f"wrote {len(paths)} tar shards to {shard_dir}")
    print(report_bad(bad))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
