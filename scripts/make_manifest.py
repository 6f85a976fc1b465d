#!/usr/bin/env python
"""Folder of audio → NeMo JSONL manifest with durations.

    python scripts/make_manifest.py AUDIO_DIR OUT.jsonl [--shards N] [--ext .wav .flac]

Every audio file under AUDIO_DIR (recursive) becomes a line with `audio_filepath` (relative to the
manifest's folder unless --absolute), `duration` and `id`; a sidecar `<name>.txt` next to a file becomes its
`text`. Files that cannot be read (empty, corrupt, truncated header) are listed at the end with the reason;
the exit status is 1 when no file was usable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_ssl_speech.data.prepare import AUDIO_SUFFIXES, folder_manifest, report_bad, write_manifest, write_tar_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio_dir", type=Path, help="folder searched recursively for audio")
    parser.add_argument("out", type=Path, help="manifest to write (.jsonl)")
    parser.add_argument("--ext", nargs="+", default=list(AUDIO_SUFFIXES), help="audio suffixes to include")
    parser.add_argument("--min-duration", type=float, default=0.0, help="leave out (and list) shorter files")
    parser.add_argument("--absolute", action="store_true", help="absolute audio paths")
    parser.add_argument("--shards", type=int, default=0, help="also write this many tar shards")
    parser.add_argument("--shard-dir", type=Path, help="folder of the shards (default <out>_shards)")
    parser.add_argument("--jobs", type=int, default=4, help="threads reading audio headers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.audio_dir.is_dir():
        parser.error(f"{args.audio_dir} is not a folder")
    suffixes = [s if s.startswith(".") else f".{s}" for s in args.ext]
    rows, bad = folder_manifest(args.audio_dir, suffixes, jobs=args.jobs, progress=not args.no_progress)
    short = [row for row in rows if row["duration"] < args.min_duration]
    bad += [(row["audio_filepath"], f"too_short: {row['duration']:.3f}s < {args.min_duration}s") for row in short]
    rows = [row for row in rows if row["duration"] >= args.min_duration]
    if rows:
        write_manifest(rows, args.out, relative=not args.absolute)
        print(f"wrote {args.out}: {len(rows)} files, {sum(r['duration'] for r in rows) / 3600:.3f} h")
        if args.shards:
            shard_dir = args.shard_dir or args.out.with_name(args.out.stem + "_shards")
            print(f"wrote {len(write_tar_shards(rows, shard_dir, args.shards))} tar shards to {shard_dir}")
    print(report_bad(bad))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
