"""Encoder throughput and memory, side by side with transformers' own speech encoders.

Pairs (same width / depth / heads / FFN / kernel; the reference workload of docs/performance.md):
  ours Conformer (4x striding)        vs  transformers Wav2Vec2ConformerModel (rel-pos, its conv front end)
  ours FastConformer (8x dw_striding)  vs  transformers ParakeetEncoder

Each system runs in its own subprocess (so peak RSS is its own), under the same thread count and allocator
settings, in alternating order. Reported: audio-seconds per second for forward+backward (train mode, loss =
mean square of the output) and forward-only (eval, no grad), peak RSS, and the FLOP utilisation of both: the
pass's FLOPs (torch.utils.flop_counter.FlopCounterMode, counted once per system) per best pass time, as a
percentage of a 2048 x 2048 matmul loop measured in the same process on the same threads, in the pass's precision
and in bf16. `--precision bf16` runs every system under `torch.autocast("cpu", torch.bfloat16)`. Prints a table and
one JSON line with the ratios ours / theirs.

    python benchmarks/bench_encoder.py                      # reference size: 8 x 10 s, hidden 256, 8 layers
    python benchmarks/bench_encoder.py --batch 2 --seconds 4 --repeats 2   # quick look
    python benchmarks/bench_encoder.py --malloc tuned       # glibc malloc without mmap churn (docs/architecture.md §5)
    python benchmarks/bench_encoder.py --precision bf16     # every system under bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import TUNED_MALLOC, autocast, count_flops, matmul_peak_gflops  # noqa: E402

SYSTEMS = ("ours_conformer", "w2v2_conformer", "ours_fastconformer", "parakeet")
PAIRS = (("ours_conformer", "w2v2_conformer"), ("ours_fastconformer", "parakeet"))


def build(system: str, args: argparse.Namespace):
    """Model and a batch for `system`: (model, inputs dict)."""
    import torch

    d, layers, heads, ffn, kernel = args.hidden, args.layers, args.heads, args.ffn, args.kernel
    batch, samples = args.batch, int(args.seconds * 16000)
    generator = torch.Generator().manual_seed(0)
    if system.startswith("ours"):
        from hf_ssl_speech import ConformerSslConfig, ConformerSslModel

        fast = system == "ours_fastconformer"
        config = ConformerSslConfig(
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            conv_depthwise_kernel_size=kernel if not fast else args.fast_kernel,
            subsampling="dw_striding" if fast else "striding",
            subsampling_factor=8 if fast else 4,
            subsampling_conv_channels=256 if fast else -1,
            # Same regularisation as the peer: Parakeet's blocks have no residual-branch dropout (only input,
            # activation and attention dropout), Wav2Vec2Conformer's have 0.1 like ours by default.
            hidden_dropout=0.0 if fast else 0.1,
        )
        frames = samples // 160
        inputs = {"input_features": torch.randn(batch, frames, 80, generator=generator)}
        return ConformerSslModel(config), inputs
    if system == "parakeet":
        from transformers import ParakeetEncoder, ParakeetEncoderConfig

        config = ParakeetEncoderConfig(
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            conv_kernel_size=args.fast_kernel,
            subsampling_conv_channels=256,
            layerdrop=0.0,
        )
        frames = samples // 160
        return ParakeetEncoder(config), {"input_features": torch.randn(batch, frames, 80, generator=generator)}
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    config = Wav2Vec2ConformerConfig(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        conv_depthwise_kernel_size=kernel,
        position_embeddings_type="relative",
        layerdrop=0.0,
        mask_time_prob=0.0,
        apply_spec_augment=False,
    )
    return Wav2Vec2ConformerModel(config), {"input_values": torch.randn(batch, samples, generator=generator)}


def run_one(system: str, args: argparse.Namespace) -> dict:
    """Measure one system in this process; returns its figures."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, inputs = build(system, args)
    params = sum(p.numel() for p in model.parameters())
    audio_seconds = args.batch * args.seconds

    def train_step():
        model.train()
        with autocast(args.precision):
            out = model(**inputs).last_hidden_state
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    def forward():
        model.eval()
        with torch.no_grad(), autocast(args.precision):
            model(**inputs)

    figures = {"system": system, "params_m": round(params / 1e6, 2)}
    for name, fn in (("train", train_step), ("forward", forward)):
        fn()  # warm-up (allocator, kernels)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best = min(times)
        figures[f"{name}_audio_s_per_s"] = round(audio_seconds / best, 2)
        figures[f"{name}_step_s"] = round(best, 3)
    figures["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    # after the peak RSS: one more pass of each under the FLOP counter, then the matmul ceiling
    figures["precision"] = args.precision
    figures["matmul_peak_gflops"] = round(matmul_peak_gflops(args.precision), 1)
    figures["bf16_matmul_peak_gflops"] = round(matmul_peak_gflops("bf16"), 1)
    for name, fn in (("train", train_step), ("forward", forward)):
        flops = count_flops(fn)
        figures[f"{name}_gflop"] = round(flops / 1e9, 1)
        achieved = flops / figures[f"{name}_step_s"] / 1e9
        figures[f"{name}_flop_utilisation_pct"] = round(100 * achieved / figures["matmul_peak_gflops"], 1)
        figures[f"{name}_flop_utilisation_bf16_pct"] = round(100 * achieved / figures["bf16_matmul_peak_gflops"], 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--kernel", type=int, default=31, help="depthwise kernel of the Conformer pair")
    parser.add_argument("--fast_kernel", type=int, default=9, help="depthwise kernel of the FastConformer pair")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--malloc", choices=("default", "tuned"), default="default")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.malloc == "tuned":
        env["GLIBC_TUNABLES"] = TUNED_MALLOC
    # The children get every setting but the system list (each measures one system).
    child_args = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("systems", "one")]
    results = {}
    for system in args.systems:
        proc = subprocess.run(
            [sys.executable, __file__, *child_args, "--one", system], env=env, capture_output=True, text=True
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{system} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[system] = json.loads(line.removeprefix("RESULT "))
        r = results[system]
        print(
            f"  {system:20s} {r['params_m']:7.2f}M  train {r['train_audio_s_per_s']:8.2f} audio-s/s  "
            f"fwd {r['forward_audio_s_per_s']:8.2f} audio-s/s  peak {r['peak_rss_gb']:.2f} GB  FLOP util train "
            f"{r['train_flop_utilisation_pct']}% fwd {r['forward_flop_utilisation_pct']}% of "
            f"{r['matmul_peak_gflops']} GFLOP/s ({r['precision']}); of the bf16 peak {r['bf16_matmul_peak_gflops']}: "
            f"train {r['train_flop_utilisation_bf16_pct']}% fwd {r['forward_flop_utilisation_bf16_pct']}%",
            flush=True,
        )

    ratios = {}
    for ours, theirs in PAIRS:
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            ratios[f"{ours}/{theirs}"] = {
                "train_throughput": round(a["train_audio_s_per_s"] / b["train_audio_s_per_s"], 2),
                "forward_throughput": round(a["forward_audio_s_per_s"] / b["forward_audio_s_per_s"], 2),
                "peak_memory": round(a["peak_rss_gb"] / b["peak_rss_gb"], 2),
            }
    print(
        f"\nworkload: batch {args.batch} x {args.seconds} s, hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads, FFN {args.ffn}, {args.precision}, {args.threads} threads, malloc {args.malloc}"
    )
    for pair, r in ratios.items():
        print(
            f"  {pair:36s} train x{r['train_throughput']}  forward x{r['forward_throughput']}  "
            f"peak memory x{r['peak_memory']}"
        )
    print(
        json.dumps(
            {"benchmark": "encoder", "settings": vars(args) | {"one": None}, "results": results, "ratios": ratios}
        )
    )


if __name__ == "__main__":
    main()
