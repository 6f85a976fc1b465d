"""Two processes against one: the real pretraining loop (`scripts/pretrain.py`) under DDP, FSDP and alone.

Every configuration trains the same recipe on the same generated corpus with the same GLOBAL batch:
  one        1 process, all threads, `train.grad_accum=2` (two micro-batches per step)
  ddp        2 gloo processes (`accelerate launch --multi_gpu`, ACCELERATE_USE_CPU=1), threads split between them
  fsdp       the same with `train.fsdp=true` (FSDP2 shards, reduce-scatter instead of all-reduce)
Each runs `--steps` optimiser steps; the figure is the loop's own `train/audio_seconds_per_s` (audio seconds of
the global batch per wall second, data loading included, checkpoints and validation excluded), median over the
steps after `--skip` warm-up steps, and the largest process's peak RSS. Printed: a table and the ratios to `one`.

On a 2-core machine two processes cannot beat one by much: one process already uses both cores for its matmuls.
The comparison shows what the distributed machinery costs (gradient all-reduce or reduce-scatter + all-gather,
the unused-parameter search when a recipe needs it) rather than a speed-up.

    python benchmarks/bench_distributed.py                  # the default workload (~3 minutes on 2 cores)
    python benchmarks/bench_distributed.py --quick          # smoke run
    python benchmarks/bench_distributed.py --configs one ddp --output runs/bench_distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml
from bench_pretrain import count_flops, matmul_peak_gflops  # same folder: FLOP utilisation as every bench row

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = REPO / "scripts" / "pretrain.py"
SAMPLE_RATE = 16000
CONFIGS = ("one", "ddp", "fsdp")


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Harmonic tones with a syllable-rate envelope plus a little noise: enough structure for a log-mel step."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 100 + 60 * rng.random()
    wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.random() * 6.28) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + 3 * rng.random()) * t) ** 2
    return (0.1 * wave * envelope + 0.005 * rng.standard_normal(t.shape)).astype(np.float32)


def write_corpus(folder: Path, count: int, seconds: float) -> Path:
    lines = []
    for index in range(count):
        path = folder / f"utt{index:03d}.wav"
        sf.write(path, speech_like(seconds, index), SAMPLE_RATE)
        lines.append(json.dumps({"audio_filepath": str(path), "duration": seconds}))
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def recipe(manifest: Path, args: argparse.Namespace, config: str, output_dir: Path) -> dict:
    processes = 1 if config == "one" else 2
    return {
        "model": {
            "hidden_size": args.hidden,
            "num_hidden_layers": args.layers,
            "num_attention_heads": 4,
            "intermediate_size": 4 * args.hidden,
            "num_mel_bins": 80,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": args.hidden,
            "conv_depthwise_kernel_size": 9,
            "mask_strategy": "block",
            "mask_time_prob": 0.01,
            "mask_time_length": 40,
            "mask_fill": "noise",
            "bestrq_codebook_size": 8192,
            "bestrq_codebook_dim": 16,
        },
        "objectives": {"bestrq": {}},  # NEST: every parameter gets a gradient, so no unused-parameter search
        "data": {
            "train_manifests": [str(manifest)],
            # the global batch is the same for every configuration: one process accumulates two micro-batches
            "batch_seconds": args.batch_seconds / 2,
            "max_batch_size": 64,
            "num_workers": 0,
            "min_duration": 0.5,
            "max_duration": 30.0,
        },
        "optim": {"lr": 1e-3, "scheduler": "cosine", "warmup_steps": 2},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": args.steps,
            "save_steps": args.steps,
            "eval_steps": args.steps,
            "log_steps": 1,
            "report_to": "none",
            "seed": 1,
            "grad_accum": 2 if processes == 1 else 1,
            "fsdp": config == "fsdp",
            "mixed_precision": "bf16" if args.precision == "bf16" else "no",
        },
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(config: str, manifest: Path, args: argparse.Namespace, work: Path) -> dict:
    processes = 1 if config == "one" else 2
    out = work / config
    path = work / f"{config}.yaml"
    path.write_text(yaml.safe_dump(recipe(manifest, args, config, out)))
    threads = max(1, args.threads // processes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    launch += ["--multi_gpu", "--num_processes", "2"] if processes > 1 else ["--num_processes", "1"]
    # Through a fresh wrapper process: its RUSAGE_CHILDREN maximum covers this configuration's processes only.
    started = time.monotonic()
    command = [*launch, str(SCRIPT), "--config", str(path), "--no_progress"]
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(command)], env=env, capture_output=True, text=True
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_kb"]
    state = json.loads(next((out / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    rows = [row for row in state["metrics"]["history"] if "train/audio_seconds_per_s" in row]
    speeds = [row["train/audio_seconds_per_s"] for row in rows[args.skip :]]
    warnings = [w for w in ("find_unused_parameters=True", "Grad strides do not match") if w in proc.stderr]
    return {
        "config": config,
        "processes": processes,
        "threads_per_process": threads,
        "audio_s_per_s": statistics.median(speeds),
        "steps_timed": len(speeds),
        "wall_s": wall,
        "peak_rss_gb": peak / 1024**2,
        "final_loss": rows[-1].get("train/loss"),
        "ddp_warnings": warnings,
    }


def measure(command: list[str]) -> None:
    """Run `command`, pass its output through, print the largest descendant's peak RSS (KiB) as a JSON line."""
    proc = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def flops_per_audio_second(manifest: Path, args: argparse.Namespace, work: Path) -> float:
    """FLOPs of one training step (forward + backward, FlopCounterMode) of the recipe's model on 10 s utterances,
    per audio second: the same for every configuration, since they all train the same global batch."""
    import torch

    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
    from hf_ssl_speech.pretrain.recipe import model_config, recipe_from_dict

    config = model_config(recipe_from_dict(recipe(manifest, args, "one", work / "flops")))
    model = ConformerSslForPreTraining(config).train()
    utterances = max(1, int(args.batch_seconds / 10))
    features = torch.randn(utterances, 1000, config.num_mel_bins)
    mask = torch.ones(utterances, 1000, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    flops = count_flops(lambda: model(features, mask, step=0, generator=generator).loss.backward())
    return flops / (10.0 * utterances)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        return measure(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    parser.add_argument("--batch_seconds", type=float, default=80.0, help="global batch, audio seconds")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="threads in all; split over the processes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 4 steps (smoke run)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="train.mixed_precision of every run"
    )
    parser.add_argument("--output", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.skip, args.batch_seconds, args.hidden, args.layers = 4, 1, 16.0, 64, 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = write_corpus(work, count=max(16, int(4 * args.batch_seconds / 10)), seconds=10.0)
        for config in args.configs:
            results.append(run(config, manifest, args, work))
            row = results[-1]
            print(f"{config}: {row['audio_s_per_s']:.1f} audio-s/s, peak RSS {row['peak_rss_gb']} GB", flush=True)
        flops = flops_per_audio_second(manifest, args, work)
    import torch

    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(args.precision)  # all the threads the processes share
    bf16_peak = matmul_peak_gflops("bf16")
    for row in results:
        row["flop_utilisation_pct"] = 100 * row["audio_s_per_s"] * flops / 1e9 / peak
        row["flop_utilisation_bf16_pct"] = 100 * row["audio_s_per_s"] * flops / 1e9 / bf16_peak
    base = next((r for r in results if r["config"] == "one"), None)
    print(
        f"\nFLOPs per audio second {flops / 1e9:.1f} GFLOP, {args.precision} matmul peak {peak:.0f} GFLOP/s, bf16 peak "
        f"{bf16_peak:.0f} GFLOP/s (all threads)"
    )
    print(
        "| config | processes x threads | audio-s/s | ratio to one | FLOP util | of bf16 peak | peak RSS (largest) | DDP warnings |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        ratio = row["audio_s_per_s"] / base["audio_s_per_s"] if base else float("nan")
        row["ratio_to_one"] = ratio
        rss = f"{row['peak_rss_gb']:.2f} GB"
        print(
            f"| {row['config']} | {row['processes']} x {row['threads_per_process']} | {row['audio_s_per_s']:.1f} | "
            f"{ratio:.2f} | {row['flop_utilisation_pct']:.0f}% | {row['flop_utilisation_bf16_pct']:.0f}% | {rss} | "
            f"{', '.join(row['ddp_warnings']) or 'none'} |"
        )
    print(json.dumps({"workload": vars(args) | {"output": str(args.output)}, "results": results}))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
