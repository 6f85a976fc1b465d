#!/usr/bin/env python
"""Data pipeline throughput: audio seconds decoded (+ resampled) (+ featurised) per wall second, one worker.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--clips 48] [--seconds 10] [--repeats 3]

Writes its own corpus to a temporary folder: 16 kHz FLAC and 44.1 kHz WAV (speech-like harmonic signals).
Everything runs in this process on one torch thread, i.e. the cost per dataloader worker (per core). Rows:

- decode: `decode_example` only (soundfile read, mono, checks, soxr resample to 16 kHz).
- loader+waveforms: `build_dataloader(num_workers=0, return_waveforms=True)`: decode + bucketing + padding,
  what a worker does when the training loop featurises on the accelerator.
- loader+features: the same with `ConformerSslFeatureExtractor` in the collator (featurising in the worker).
- features only: `extract_batch` on the padded waveforms (the part moved to the accelerator by waveform mode).

Prints a table and one JSON line (`{"bench": "data", ...}`) with "x real time" figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


def speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Harmonics of a gliding pitch, syllable-rate amplitude modulation, a little noise (compresses like speech)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None) ** 2
    return (0.2 * voiced * envelope + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def write_corpus(folder: Path, fmt: str, rate: int, clips: int, seconds: float) -> Path:
    lines = []
    for index in range(clips):
        duration = seconds * (0.5 + index % 4 / 4)  # 0.5x..1.25x: some bucketing work
        path = folder / f"{fmt}_{rate}_{index:03d}.{fmt}"
        sf.write(path, speech_like(duration, rate, index), rate)
        lines.append(json.dumps({"audio_filepath": path.name, "duration": duration}))
    manifest = folder / f"{fmt}_{rate}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def timed(function, repeats: int) -> float:
    """Best wall time of `repeats` runs (the least disturbed by other processes on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48, help="clips per format")
    parser.add_argument("--seconds", type=float, default=10.0, help="typical clip length")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    parser.add_argument("--batch-seconds", type=float, default=160.0, help="padded seconds per batch")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from hf_ssl_speech.data import DataConfig, ManifestSource, build_dataloader, decode_example
    from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor

    extractor = ConformerSslFeatureExtractor()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, rate in (("flac", 16000), ("wav", 44100)):
            manifest = write_corpus(Path(tmp), fmt, rate, args.clips, args.seconds)
            source = ManifestSource(manifest)
            audio_seconds = float(source.durations.sum())
            config = DataConfig(batch_seconds=args.batch_seconds, max_duration=None)
            common = dict(batch_seconds=args.batch_seconds, num_workers=0, max_duration=None, seed=0)

            def decode(source=source, config=config):
                for index in range(len(source)):
                    decode_example(source.raw(index), config)

            def loader_waveforms(manifest=manifest, common=common):
                for _ in build_dataloader(manifest, return_waveforms=True, **common):
                    pass

            def loader_features(manifest=manifest, common=common):
                for _ in build_dataloader(manifest, feature_extractor=extractor, **common):
                    pass

            batches = list(build_dataloader(manifest, return_waveforms=True, **common))

            def features_only(batches=batches):
                for batch in batches:
                    extractor.extract_batch(batch["waveforms"], batch["waveform_lengths"])

            row = {}
            for name, function in (
                ("decode", decode),
                ("loader+waveforms", loader_waveforms),
                ("loader+features", loader_features),
                ("features only", features_only),
            ):
                row[name] = audio_seconds / timed(function, args.repeats)
            results[f"{fmt} {rate // 1000 if rate % 1000 == 0 else rate / 1000:g} kHz"] = row

    names = list(next(iter(results.values())))
    print(f"{'input':<14}" + "".join(f"{name:>19}" for name in names))
    for label, row in results.items():
        print(f"{label:<14}" + "".join(f"{row[name]:>17.0f}x" for name in names))
    print("(audio seconds per wall second, one worker on one thread; best of", args.repeats, "runs)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        json.dumps(
            {
                "bench": "data",
                "unit": "x_real_time_per_worker",
                "results": {k: {n: round(v, 1) for n, v in row.items()} for k, row in results.items()},
                "clips": args.clips,
                "seconds": args.seconds,
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "load_avg_1min": round(load, 2),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
