"""Eager vs `train.compile` (torch.compile of the encoder, inductor) side by side, in one process.

Times a pretraining step (BEST-RQ on a Conformer: masking + forward + loss + backward + clip + AdamW) and an
encoder forward (eval, no grad), eager first, then the same model compiled with `compile_encoders` (what the
pretraining loop does). Reports the median step of each, the speed ratio, the compile time (first compiled step
minus a steady one) and the graphs compiled, including after a batch of another size and length in the same
time bucket (dynamic batch, bucketed time: 0 recompiles expected).

    python benchmarks/bench_compile.py            # reference workload: 8 x 10 s, hidden 256, 8 layers
    python benchmarks/bench_compile.py --quick    # 4 x 3 s, hidden 128, 2 layers
    python benchmarks/bench_compile.py --precision bf16 --encoder fastconformer   # under bf16 autocast

FLOP utilisation is against the measured matmul peak of the precision the step runs in and against the bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_pretrain import autocast, count_flops, matmul_peak_gflops  # same folder: as every bench row

from hf_ssl_speech.configuration_conformer_ssl import ConformerSslConfig
from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
from hf_ssl_speech.pretrain.compiling import compile_encoders, pad_to_bucket


def build(args: argparse.Namespace) -> ConformerSslForPreTraining:
    config = ConformerSslConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=4 * args.hidden,
        subsampling="striding" if args.encoder == "conformer" else "dw_striding",
        subsampling_factor=4 if args.encoder == "conformer" else 8,
        conv_depthwise_kernel_size=31 if args.encoder == "conformer" else 9,
        objectives={"bestrq": {}},
    )
    torch.manual_seed(0)
    return ConformerSslForPreTraining(config).train()


def batch(args: argparse.Namespace, seconds: float, size: int) -> dict[str, torch.Tensor]:
    frames = int(seconds * 100)
    generator = torch.Generator().manual_seed(frames)
    features = torch.randn(size, frames, 80, generator=generator)
    lengths = torch.linspace(frames * 0.7, frames, size).long()  # varied lengths, padded batch
    mask = (torch.arange(frames)[None, :] < lengths[:, None]).long()
    return pad_to_bucket({"input_features": features * mask[..., None], "attention_mask": mask}, args.bucket)


def time_steps(model, optimizer, inputs, steps: int, train: bool, precision: str = "fp32") -> list[float]:
    times = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = time.perf_counter()
        if train:
            with autocast(precision):
                loss = model(**inputs, generator=generator).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), autocast(precision):
                model.conformer(**inputs)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="default")
    parser.add_argument("--encoder", choices=("conformer", "fastconformer"), default="conformer")
    parser.add_argument("--bucket", type=int, default=128, help="train.compile_bucket_frames")
    parser.add_argument("--quick", action="store_true", help="4 x 3 s, hidden 128, 2 layers")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seconds, args.hidden, args.layers = 4, 3.0, 128, 2
    torch.set_num_threads(args.threads)
    # `other`: another batch size and shorter utterances in the same time bucket, as the loader makes them
    inputs, other = batch(args, args.seconds, args.batch), batch(args, args.seconds * 0.95, max(args.batch - 1, 2))
    audio = args.batch * args.seconds
    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    report: dict[str, object] = {"workload": vars(args)}
    rows = {}
    flops = {
        kind: count_flops(lambda t=train: time_steps(model, optimizer, inputs, 1, t, args.precision))
        for kind, train in (
            ("train", True),
            ("forward", False),
        )
    }  # eager, before compiling: FlopCounterMode counts the same matmuls either way
    model.train()
    peak, bf16_peak = matmul_peak_gflops(args.precision), matmul_peak_gflops("bf16")
    for phase in ("eager", "compiled"):
        if phase == "compiled":
            counter = compile_encoders(model, args.mode)
        for kind, train in (("train", True), ("forward", False)):
            model.train(train)
            times = time_steps(model, optimizer, inputs, args.repeats + 1, train, args.precision)
            rows[(phase, kind)] = {"first": times[0], "median": statistics.median(times[1:]), "times": times}
    model.train()
    before = counter.graphs
    time_steps(
        model, optimizer, other, 1, True, args.precision
    )  # another batch size and length in the bucket: recompile?
    for kind in ("train", "forward"):
        eager, compiled = rows[("eager", kind)], rows[("compiled", kind)]
        line = {
            "eager_s": round(eager["median"], 4),
            "compiled_s": round(compiled["median"], 4),
            "speed_ratio": round(eager["median"] / compiled["median"], 3),
            "audio_s_per_s_eager": round(audio / eager["median"], 1),
            "audio_s_per_s_compiled": round(audio / compiled["median"], 1),
            "compile_s": round(compiled["first"] - compiled["median"], 1),
            "step_gflop": round(flops[kind] / 1e9, 1),
            "flop_utilisation_pct_eager": round(100 * flops[kind] / eager["median"] / 1e9 / peak, 1),
            "flop_utilisation_pct_compiled": round(100 * flops[kind] / compiled["median"] / 1e9 / peak, 1),
            "flop_utilisation_bf16_pct_eager": round(100 * flops[kind] / eager["median"] / 1e9 / bf16_peak, 1),
            "flop_utilisation_bf16_pct_compiled": round(100 * flops[kind] / compiled["median"] / 1e9 / bf16_peak, 1),
        }
        report[kind] = line
        print(f"{kind:8s} {json.dumps(line)}")
    report["matmul_peak_gflops"] = round(peak, 1)
    report["bf16_matmul_peak_gflops"] = round(bf16_peak, 1)
    report["graphs_compiled"] = counter.graphs
    report["graphs_before_new_length"] = before
    report["recompiles"] = counter.recompiles
    report["backend_compile_s"] = round(counter.seconds, 1)
    print(
        f"graphs compiled: {before} (train, eval forward), {counter.graphs} after a batch of another size and length "
        f"(recompiles counted by the loop: {counter.recompiles}); backend compile time {counter.seconds:.1f} s"
    )
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
