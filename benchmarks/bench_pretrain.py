"""Full pretraining-step throughput and peak memory: our objectives vs NeMo's recipes and transformers' wav2vec2.

One step = masking + forward + loss + backward + gradient clipping (1.0) + AdamW update, on the reference
workload: 8 utterances x 10 s, hidden 256, 4 heads, FFN 1024, 8 layers, 2 threads; depthwise kernel 31 for
Conformer (4x striding), 9 for FastConformer (8x dw_striding). `--precision fp32|bf16` applies to every system
alike: bf16 is `torch.autocast("cpu", torch.bfloat16)` around forward and loss (what accelerate's bf16 and
Lightning's `precision="bf16-mixed"`, NeMo's trainer setting, do on a CPU), backward and optimiser outside it.

Systems (each in its own subprocess, so the peak RSS is that system's; run alternately, same environment):
  ours_<objective>       ConformerSslForPreTraining on precomputed log-mel features (the data loader makes
                         them; `featurise` times that part separately: add it to compare with raw-audio systems)
  featurise              ConformerSslFeatureExtractor.extract_batch on the batch's audio (dither on)
  w2v2                   transformers Wav2Vec2ConformerForPreTraining, raw audio, run_wav2vec2_pretraining_no_trainer's
                         step (numpy masks + negatives per step, forward, backward, 1/num_losses, clip, AdamW)
  nemo_contrastive       NeMo 3.0 SpeechEncDecSelfSupervisedModel, conformer_ssl recipe, contrastive only
  nemo_contrastive_mlm   the same with the recipe's MLM loss (90k-class head, weight 1000)
  nemo_nest              NeMo 3.0 EncDecDenoiseMaskedTokenPredModel, NEST FastConformer recipe
  ours_data2vec, ours_dinosr, ours_w2v_bert, ours_wavlm
                         the new families (no peer ships their pretraining): ratios against ours_contrastive
  ours_data2vec_fast     data2vec 2.0's MAE-style student (data2vec_fast.yaml); `--clone_batch c` gives every
                         ours_* system c masked copies per teacher pass (audio-s/s counts the utterances once)
  baseline_contrastive, baseline_bestrq
                         ours_contrastive / ours_bestrq from another checkout of this project (`--baseline_code DIR`,
                         e.g. a git worktree of an older commit), always in fp32: today's path against an earlier one
The NeMo systems run benchmarks/nemo_pretrain_runner.py with the NeMo virtual environment's python
(`--nemo_python`, default $NEMO_PYTHON or /work/nemo_env/venv/bin/python; see benchmarks/README.md).

    python benchmarks/bench_pretrain.py --quick                       # smoke run, tiny sizes
    python benchmarks/bench_pretrain.py                               # the reference workload, every system
    python benchmarks/bench_pretrain.py --malloc both                 # default glibc malloc, then the tuned one
    python benchmarks/bench_pretrain.py --systems ours_bestrq nemo_nest --repeats 5 --profile 15
    python benchmarks/bench_pretrain.py --precision bf16 --systems nemo_nest ours_bestrq baseline_bestrq \
        --baseline_code /tmp/old_checkout                             # bf16 vs NeMo bf16 vs an older fp32 path

Prints a table (system, objective, params, train audio-s/s, peak RSS, step GFLOP, FLOP utilisation) and one JSON
line with every figure and the ratios ours / NeMo on the matching recipe and ours / w2v2 (targets: >= 1.5x
throughput at <= 0.7x memory). FLOP utilisation: the step's FLOPs (torch.utils.flop_counter.FlopCounterMode over
one step, in every system's own process and environment) per median step time, as a percentage of the best
2048 x 2048 matmul measured in the same process on the same threads, in the precision the step ran in
(`flop_utilisation_pct`) and in bf16 (`flop_utilisation_bf16_pct`: the ceiling of cores with bf16 matrix units).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NEMO_RUNNER = HERE / "nemo_pretrain_runner.py"
DEFAULT_NEMO_PYTHON = "/work/nemo_env/venv/bin/python"
TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=137438953472"
SAMPLE_RATE = 16000

# Encoders of our model family (ConformerSslConfig fields); the kernel comes from --kernel / --fast_kernel.
ENCODERS = {
    "conformer": {"subsampling": "striding", "subsampling_factor": 4, "subsampling_conv_channels": -1},
    "fastconformer": {"subsampling": "dw_striding", "subsampling_factor": 8, "subsampling_conv_channels": 256},
}

# Masking of the shipped recipes (configs/pretrain/*.yaml).
PATCH_MASK = {"mask_strategy": "patch", "mask_time_prob": 0.5, "mask_time_length": 48, "mask_fill": "learned"}  # NeMo
BLOCK_MASK = {"mask_strategy": "block", "mask_time_prob": 0.01, "mask_time_length": 40, "mask_fill": "noise"}  # NEST
GUMBEL = {"num_codevector_groups": 2, "num_codevectors_per_group": 300, "num_negatives": 100}  # NeMo conformer_ssl
BESTRQ = {"bestrq_num_codebooks": 1, "bestrq_codebook_size": 8192, "bestrq_codebook_dim": 16}  # NEST

# Our systems: objective -> encoder, objectives and ConformerSslConfig settings (from the matching recipe).
OURS = {
    "contrastive": {"encoder": "conformer", "objectives": {"contrastive": {}}, "config": PATCH_MASK | GUMBEL},
    "contrastive+mlm": {
        "encoder": "conformer",
        "objectives": {"contrastive": {}, "mlm": {}},
        "config": PATCH_MASK | GUMBEL,
    },
    "bestrq": {"encoder": "fastconformer", "objectives": {"bestrq": {}}, "config": BLOCK_MASK | BESTRQ},
    "hubert": {
        "encoder": "conformer",
        "objectives": {"hubert": {}},
        "config": {"mask_strategy": "span", "mask_time_prob": 0.04, "mask_time_length": 20, "hubert_num_labels": 500},
    },
    "reconstruction": {
        "encoder": "conformer",
        "objectives": {"reconstruction": {}},
        "config": {"mask_strategy": "span", "mask_time_prob": 0.0325, "mask_time_length": 20},
    },
    "apc": {"encoder": "conformer", "objectives": {"apc": {}}, "config": {"causal": True, "apc_shift": 3}},
    "cpc": {
        "encoder": "conformer",
        "objectives": {"cpc": {}},
        "config": {"causal": True, "cpc_steps": 12, "cpc_num_negatives": 10},
    },
    # EMA-teacher families (configs/pretrain/data2vec.yaml, dinosr.yaml): the step includes the teacher's forward
    # and its EMA update. One mask per utterance (clone_batch 1): the recipe's 8 clones multiply the student's work.
    "data2vec": {
        "encoder": "conformer",
        "objectives": {"data2vec": {"top_k_layers": 8}},
        "config": {"mask_strategy": "span", "mask_time_prob": 0.05, "mask_time_length": 10},
    },
    # configs/pretrain/data2vec_fast.yaml: data2vec 2.0's MAE-style student (the blocks encode only the unmasked
    # steps, ~51% of them masked) with the same targets; compare at equal --clone_batch with ours_data2vec.
    "data2vec_fast": {
        "encoder": "conformer",
        "objectives": {"data2vec": {"top_k_layers": 8, "encode_unmasked_only": True}},
        "config": {"mask_strategy": "span", "mask_time_prob": 0.04, "mask_time_length": 20},
    },
    "dinosr": {
        "encoder": "conformer",
        "objectives": {"dinosr": {"top_k_layers": 8}},
        "config": {"mask_strategy": "span", "mask_time_prob": 0.04, "mask_time_length": 20},
    },
    # configs/pretrain/w2v_bert.yaml: contrastive on block layers // 3, MLM on the same 1 x 1024 codebook's ids.
    "w2v_bert": {
        "encoder": "conformer",
        "objectives": lambda layers: {"contrastive": {"layer": max(1, layers // 3)}, "mlm": {}},
        "config": {
            "mask_strategy": "span",
            "mask_time_prob": 0.01625,
            "mask_time_length": 40,
            "num_codevector_groups": 1,
            "num_codevectors_per_group": 1024,
            "num_negatives": 100,
        },
    },
    # configs/pretrain/wavlm.yaml's step: HuBERT targets with WavLM's gated relative position bias (the utterance
    # mixing happens in the data loader's featurisation, not in this step).
    "wavlm": {
        "encoder": "conformer",
        "objectives": {"hubert": {}},
        "config": {
            "mask_strategy": "span",
            "mask_time_prob": 0.04,
            "mask_time_length": 20,
            "hubert_num_labels": 500,
            "position_embeddings_type": "gated_rel_pos",
        },
    },
    # configs/pretrain/mixed.yaml with every objective active (its contrastive start step is ignored).
    "mixed": {
        "encoder": "fastconformer",
        "objectives": {"bestrq": {"weight": 1.0}, "reconstruction": {"weight": 0.2}, "contrastive": {"weight": 0.5}},
        "config": BLOCK_MASK | BESTRQ | GUMBEL,
    },
}
OURS_SYSTEMS = {f"ours_{name.replace('+', '_')}": name for name in OURS}
BASELINE_SYSTEMS = {"baseline_contrastive": "contrastive", "baseline_bestrq": "bestrq"}  # --baseline_code, fp32
NEMO_SYSTEMS = {"nemo_contrastive": "contrastive", "nemo_contrastive_mlm": "contrastive+mlm", "nemo_nest": "nest"}
PEER_OBJECTIVE = {"w2v2": "contrastive", "featurise": "(log-mel)"} | {
    s: ("bestrq (NEST)" if r == "nest" else r) for s, r in NEMO_SYSTEMS.items()
}
PEER_OBJECTIVE |= {s: f"{r} (baseline)" for s, r in BASELINE_SYSTEMS.items()}
# Run order: each peer next to the ours system it is compared with, so drifting machine load hits both alike.
SYSTEMS = (
    "nemo_contrastive",
    "ours_contrastive",
    "baseline_contrastive",
    "nemo_contrastive_mlm",
    "ours_contrastive_mlm",
    "nemo_nest",
    "ours_bestrq",
    "baseline_bestrq",
    "w2v2",
    "ours_hubert",
    "ours_reconstruction",
    "ours_apc",
    "ours_cpc",
    "ours_mixed",
    "ours_data2vec",
    "ours_data2vec_fast",
    "ours_dinosr",
    "ours_w2v_bert",
    "ours_wavlm",
    "featurise",
)
# ours system -> the peer it must beat (docs/performance.md).
MATCHES = {
    "ours_contrastive": "nemo_contrastive",
    "ours_contrastive_mlm": "nemo_contrastive_mlm",
    "ours_bestrq": "nemo_nest",
}
# ours system -> the same objective from --baseline_code in fp32 (issue target: >= 2x in bf16).
AGAINST_BASELINE = {f"ours_{objective}": system for system, objective in BASELINE_SYSTEMS.items()}
TARGET_OVER_BASELINE = 2.0
# New SSL families: step cost and memory next to our contrastive recipe (no peer ships their pretraining).
AGAINST_CONTRASTIVE = ("ours_data2vec", "ours_dinosr", "ours_w2v_bert", "ours_wavlm", "ours_hubert")
TARGET_THROUGHPUT, TARGET_MEMORY = 1.5, 0.7
HEADLINE = (
    "objective",
    "encoder",
    "params_m",
    "audio_s_per_s",
    "step_s",
    "peak_rss_gb",
    "sys_s_per_step",
    "step_gflop",
    "precision",
    "matmul_peak_gflops",
    "flop_utilisation_pct",
    "bf16_matmul_peak_gflops",
    "flop_utilisation_bf16_pct",
)
QUICK = {"batch": 2, "seconds": 2.0, "hidden": 64, "layers": 2, "heads": 2, "ffn": 128}  # sizes only
STEPS = {"full": {"repeats": 3, "warmup": 2}, "quick": {"repeats": 1, "warmup": 1}}  # unless given


# ----------------------------------------------------------------------------------------- shared helpers
# (imported by nemo_pretrain_runner.py, which runs in the NeMo environment: numpy and the standard library only)


def synthetic_speech(batch: int, num_samples: int, seed: int = 0) -> np.ndarray:
    """Noise-like speech, (batch, num_samples) float32 at 16 kHz: syllable-long voiced stretches (harmonics of a
    gliding 90-250 Hz pitch under two formant-like bumps, amplitude-modulated) alternate with fricative-like noise
    bursts and short pauses, over a faint noise floor. Deterministic for a seed; loud enough that log-mels look
    like speech rather than silence (every system gets the same waveforms)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, num_samples), dtype=np.float64)
    for b in range(batch):
        pos = 0
        while pos < num_samples:
            length = min(int(rng.uniform(0.08, 0.3) * SAMPLE_RATE), num_samples - pos)
            t = np.arange(length) / SAMPLE_RATE
            envelope = np.sqrt(np.clip(np.sin(np.pi * np.arange(length) / max(length - 1, 1)), 0.0, None))
            kind = rng.choice(3, p=[0.65, 0.25, 0.10])  # voiced, fricative, pause
            if kind == 0:
                f0 = rng.uniform(90, 250) * (1 + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-3))
                phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
                formants = rng.uniform([300, 900], [900, 2500])
                segment = np.zeros(length)
                for k in range(1, 25):
                    freq = k * f0.mean()
                    if freq > 7000:
                        break
                    gain = sum(np.exp(-(((freq - f) / 150.0) ** 2)) for f in formants) + 0.05 / k
                    segment += gain * np.sin(k * phase)
                segment *= 0.3 / max(np.abs(segment).max(), 1e-6)
            elif kind == 1:
                noise = rng.standard_normal(length)
                segment = 0.08 * (noise - np.concatenate([[0.0], noise[:-1]]))  # high-passed: /s/-like
            else:
                segment = np.zeros(length)
            out[b, pos : pos + length] = segment * envelope
            pos += length
    out += 0.003 * rng.standard_normal(out.shape)  # noise floor (about -45 dB below the voiced parts)
    return out.astype(np.float32)


def peak_rss_gb() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def current_rss_gb() -> float:
    """Resident set size now (VmRSS), to separate the imports and weights from the step's activations."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def time_steps(step: Callable[[int], float], warmup: int, repeats: int) -> dict:
    """Run `warmup` untimed then `repeats` timed calls of step(i) (which returns the loss as a float).

    Returns the median and all step times, the kernel (system) CPU seconds and minor page faults per timed step
    (high values mean the allocator hands memory back to the OS every step, docs/architecture.md §5), and the last loss."""
    loss = float("nan")
    for i in range(warmup):
        loss = step(i)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for i in range(warmup, warmup + repeats):
        start = time.perf_counter()
        loss = step(i)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "step_s": round(statistics.median(times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "sys_s_per_step": round((after.ru_stime - usage.ru_stime) / repeats, 3),
        "minor_faults_per_step": int((after.ru_minflt - usage.ru_minflt) / repeats),
        "last_loss": loss,
    }


def profile_step(step: Callable[[int], float], index: int, top: int) -> list[list]:
    """Profile one call of step(index) with torch.profiler: the `top` ops by self CPU time as
    [name, self CPU ms, calls, share of the step]."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(index)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    del torch
    return [
        [e.key, round(e.self_cpu_time_total / 1e3, 1), e.count, round(e.self_cpu_time_total / total, 3)]
        for e in events[:top]
    ]


def autocast(precision: str):
    """The step's precision context: bf16 autocast on the CPU, or nothing (fp32)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def matmul_peak_gflops(precision: str = "fp32", size: int = 2048, repeats: int = 12) -> float:
    """The machine's matmul ceiling in `precision` (fp32, or bf16 operands with bf16 output as autocast runs them)
    on this process's threads: the best of `repeats` size x size matmuls, in GFLOP/s (2 size^3 FLOPs each).
    Measured in every benchmark process, next to its own step."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up (thread pool, packing buffers)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of fn() as torch.utils.flop_counter.FlopCounterMode counts them: matmuls and
    convolutions (forward and backward) and attention; elementwise ops, norms and the optimiser count 0."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def add_flop_utilisation(
    figures: dict, flops_per_step: float, step_s: float, precision: str = "fp32", prefix: str = ""
) -> None:
    """figures += the step's GFLOP, the measured matmul peaks (the step's precision and bf16) and the step's share
    of each (percent)."""
    if "matmul_peak_gflops" not in figures:
        figures["precision"] = precision
        figures["matmul_peak_gflops"] = round(matmul_peak_gflops(precision), 1)
        figures["bf16_matmul_peak_gflops"] = round(matmul_peak_gflops("bf16"), 1)
    figures[f"{prefix}step_gflop"] = round(flops_per_step / 1e9, 1)
    achieved = flops_per_step / step_s / 1e9
    figures[f"{prefix}flop_utilisation_pct"] = round(100 * achieved / figures["matmul_peak_gflops"], 1)
    figures[f"{prefix}flop_utilisation_bf16_pct"] = round(100 * achieved / figures["bf16_matmul_peak_gflops"], 1)


def finish(figures: dict, step: Callable[[int], float], args: argparse.Namespace) -> None:
    """Time the step, optionally profile it, add memory, FLOP-utilisation and load figures, and print the RESULT
    line. The FLOP count (one more step under FlopCounterMode) and the matmul peak come after the peak RSS."""
    figures["rss_before_steps_gb"] = round(current_rss_gb(), 2)
    figures.update(time_steps(step, args.warmup, args.repeats))
    figures["peak_rss_gb"] = round(peak_rss_gb(), 2)
    figures["audio_s_per_s"] = round(args.batch * args.seconds / figures["step_s"], 2)
    index = args.warmup + args.repeats
    add_flop_utilisation(figures, count_flops(lambda: step(index)), figures["step_s"], args.precision)
    if args.profile:
        figures["top_ops"] = profile_step(step, index + 1, args.profile)
    figures["loadavg_1min"] = round(os.getloadavg()[0], 2)
    if not math.isfinite(figures["last_loss"]):  # a broken step is not a benchmark figure
        raise SystemExit(f"non-finite loss {figures['last_loss']} after {args.warmup + args.repeats} steps: {figures}")
    print("RESULT " + json.dumps(figures), flush=True)


# ----------------------------------------------------------------------------------------- child processes


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    torch.manual_seed(0)


def _optimizer(params: list) -> object:
    """AdamW with the SSL recipes' betas and weight decay (the same for every system)."""
    import torch

    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=1e-3)


def _gumbel_temperature(step: int) -> float:
    """wav2vec 2.0 / NeMo schedule: 2 -> 0.5, x0.999995 per step."""
    return max(2.0 * 0.999995**step, 0.5)


def run_ours(objective: str, args: argparse.Namespace) -> None:
    import torch

    from hf_ssl_speech import ConformerSslConfig, ConformerSslFeatureExtractor
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining

    _threads(args.threads)
    spec = OURS[objective]
    encoder = args.encoder or spec["encoder"]
    kernel = args.kernel if encoder == "conformer" else args.fast_kernel
    objectives = spec["objectives"](args.layers) if callable(spec["objectives"]) else dict(spec["objectives"])
    for name in ("data2vec", "dinosr"):  # the paper's top 8 blocks, or every block of a shallower model
        if name in objectives:
            objectives[name] = {**objectives[name], "top_k_layers": min(8, args.layers)}
    config = ConformerSslConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.ffn,
        conv_depthwise_kernel_size=kernel,
        objectives=objectives,
        **ENCODERS[encoder],
        **spec["config"],
        **({"clone_batch": args.clone_batch} if args.clone_batch else {}),
    )
    num_samples = int(args.seconds * SAMPLE_RATE)
    # What the data loader hands over: log-mel features of the batch (made here, outside the timed step).
    waves = torch.from_numpy(synthetic_speech(args.batch, num_samples))
    lengths = torch.full((args.batch,), num_samples)
    extractor = ConformerSslFeatureExtractor()
    features, frame_lengths = extractor.extract_batch(waves, lengths, dither=1e-5)
    attention_mask = (torch.arange(features.shape[1])[None, :] < frame_lengths[:, None]).long()
    extra = {}
    if "hubert" in objectives:  # random frame labels stand in for k-means labels
        extra["frame_labels"] = torch.randint(0, config.hubert_num_labels, features.shape[:2])
    model = ConformerSslForPreTraining(config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params)

    def step(i: int) -> float:
        with autocast(args.precision):
            out = model(features, attention_mask, gumbel_temperature=_gumbel_temperature(i), **extra)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(0.999, out.teacher_statistics)  # data2vec / DinoSR; a no-op for the others
        return out.loss.item()

    # trained parameters (an EMA teacher is a second copy of the encoder, counted in memory, not here)
    params_m = round(sum(p.numel() for p in params) / 1e6, 2)
    finish({"objective": objective, "encoder": encoder, "params_m": params_m}, step, args)


def run_featurise(args: argparse.Namespace) -> None:
    """The log-mel front end our systems leave to the data loader: extract_batch on the step's audio."""
    import torch

    from hf_ssl_speech import ConformerSslFeatureExtractor

    _threads(args.threads)
    num_samples = int(args.seconds * SAMPLE_RATE)
    waves = torch.from_numpy(synthetic_speech(args.batch, num_samples))
    lengths = torch.full((args.batch,), num_samples)
    extractor = ConformerSslFeatureExtractor()

    def step(i: int) -> float:
        features, _ = extractor.extract_batch(waves, lengths, dither=1e-5)
        return float(features[0, 0, 0])

    finish({"objective": PEER_OBJECTIVE["featurise"], "params_m": 0.0}, step, args)


def w2v2_config(hidden: int, layers: int, heads: int, ffn: int, kernel: int, **extra: object):
    """The `w2v2` peer's Wav2Vec2ConformerConfig at our size: rel-pos, wav2vec 2.0's masking (0.65 x 10), 100
    negatives, no layerdrop (`extra` overrides, e.g. gpu_check's smoke sizes)."""
    from transformers import Wav2Vec2ConformerConfig

    settings = {"position_embeddings_type": "relative", "layerdrop": 0.0, "mask_time_prob": 0.65}
    settings |= {"mask_time_length": 10, "num_negatives": 100, **extra}
    return Wav2Vec2ConformerConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        conv_depthwise_kernel_size=kernel,
        **settings,
    )


def run_w2v2(args: argparse.Namespace) -> None:
    """transformers' own pretraining step (examples/pytorch/speech-pretraining/run_wav2vec2_pretraining_no_trainer.py):
    the collator draws the masks and negatives in numpy for every batch, then forward, backward, gradients divided by
    the number of masked steps, clip, AdamW, and the Gumbel temperature update."""
    import torch
    from transformers import Wav2Vec2ConformerForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    _threads(args.threads)
    config = w2v2_config(args.hidden, args.layers, args.heads, args.ffn, args.kernel)
    # feat_extract_norm stays at the config default ("group", as in the reference measurement): the example demands "layer" of a
    # Wav2Vec2Config, and it costs w2v2 ~30% more per step on CPU (LayerNorm + transposes after all 7 convs);
    # the default is the faster, conservative peer.
    num_samples = int(args.seconds * SAMPLE_RATE)
    waves = synthetic_speech(args.batch, num_samples)
    # Wav2Vec2FeatureExtractor(do_normalize=True) in the data pipeline: zero mean, unit variance per utterance.
    waves = (waves - waves.mean(1, keepdims=True)) / np.sqrt(waves.var(1, keepdims=True) + 1e-7)
    input_values = torch.from_numpy(waves)
    attention_mask = torch.ones(input_values.shape, dtype=torch.long)
    model = Wav2Vec2ConformerForPreTraining(config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params)
    steps = int(model._get_feat_extract_output_lengths(num_samples))
    sub_attention_mask = model._get_feature_vector_attention_mask(steps, attention_mask)

    def step(i: int) -> float:
        mask_time_indices = _compute_mask_indices(
            (args.batch, steps), config.mask_time_prob, config.mask_time_length, attention_mask=sub_attention_mask
        )
        negatives = _sample_negative_indices((args.batch, steps), config.num_negatives, mask_time_indices)
        mask_time_indices = torch.tensor(mask_time_indices, dtype=torch.long)
        num_losses = mask_time_indices.sum()
        with autocast(args.precision):
            out = model(
                input_values,
                attention_mask=attention_mask,
                mask_time_indices=mask_time_indices,
                sampled_negative_indices=torch.tensor(negatives, dtype=torch.long),
            )
        out.loss.backward()
        for p in params:  # the example's multiply_grads(params, 1 / num_losses)
            if p.grad is not None:
                p.grad.mul_(1 / num_losses)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.set_gumbel_temperature(_gumbel_temperature(i + 1))
        return (out.loss / num_losses).item()

    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    finish({"objective": PEER_OBJECTIVE["w2v2"], "params_m": params_m}, step, args)


# ----------------------------------------------------------------------------------------- parent


def child_command(system: str, args: argparse.Namespace) -> list[str]:
    sizes = [
        "--batch",
        str(args.batch),
        "--seconds",
        str(args.seconds),
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--heads",
        str(args.heads),
        "--ffn",
        str(args.ffn),
        "--kernel",
        str(args.kernel),
        "--fast_kernel",
        str(args.fast_kernel),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--profile",
        str(args.profile),
        "--precision",
        "fp32" if system in BASELINE_SYSTEMS else args.precision,
    ]
    if system in NEMO_SYSTEMS:
        return [args.nemo_python, str(NEMO_RUNNER), "--recipe", NEMO_SYSTEMS[system], *sizes]
    if args.encoder:
        sizes += ["--encoder", args.encoder]
    if args.clone_batch:
        sizes += ["--clone_batch", str(args.clone_batch)]
    return [sys.executable, str(Path(__file__).resolve()), "--one", system, *sizes]


def child_env(args: argparse.Namespace, malloc: str, system: str = "") -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if system in BASELINE_SYSTEMS:
        env["BENCH_BASELINE_CODE"] = str(Path(args.baseline_code).resolve())
    env.pop("GLIBC_TUNABLES", None)
    if malloc == "tuned":
        env["GLIBC_TUNABLES"] = TUNED_MALLOC
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_child(system: str, args: argparse.Namespace, malloc: str) -> dict | None:
    env = child_env(args, malloc, system)
    proc = subprocess.run(child_command(system, args), env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"  {system} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line.removeprefix("RESULT "))


def summarise(runs: list[dict]) -> dict:
    """One system's figures over rounds: the median step time of each process, then the median over processes."""
    merged = dict(runs[0])
    merged["step_s"] = statistics.median(r["step_s"] for r in runs)
    merged["audio_s_per_s"] = round(statistics.median(r["audio_s_per_s"] for r in runs), 2)
    merged["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
    if all("flop_utilisation_pct" in r for r in runs):  # each process against its own measured peak
        merged["flop_utilisation_pct"] = round(statistics.median(r["flop_utilisation_pct"] for r in runs), 1)
        merged["matmul_peak_gflops"] = round(statistics.median(r["matmul_peak_gflops"] for r in runs), 1)
    merged["rounds"] = len(runs)
    merged["round_step_s"] = [r["step_s"] for r in runs]  # each process's median: load spikes show up here
    return merged


def ratios(results: dict[str, dict], audio_seconds: float) -> dict:
    """ours / NeMo on the matching recipe (also with our featurisation time added to our step) and ours / w2v2."""
    out = {}
    featurise_s = results["featurise"]["step_s"] if "featurise" in results else None
    pairs = list(MATCHES.items()) + list(AGAINST_BASELINE.items())
    pairs += [(name, "ours_contrastive") for name in AGAINST_CONTRASTIVE]
    for ours, peer in pairs + [(name, "w2v2") for name in OURS_SYSTEMS]:
        if ours not in results or peer not in results:
            continue
        a, b = results[ours], results[peer]
        entry = {
            "throughput": round(a["audio_s_per_s"] / b["audio_s_per_s"], 2),
            "peak_memory": round(a["peak_rss_gb"] / b["peak_rss_gb"], 2),
        }
        if featurise_s is not None and not peer.startswith("ours_"):  # peers featurise inside their step
            entry["throughput_with_featurise"] = round((b["step_s"]) / (a["step_s"] + featurise_s), 2)
        if peer in NEMO_SYSTEMS.keys():
            entry["meets_target"] = entry["throughput"] >= TARGET_THROUGHPUT and entry["peak_memory"] <= TARGET_MEMORY
        if peer in BASELINE_SYSTEMS:
            entry["meets_target"] = entry["throughput"] >= TARGET_OVER_BASELINE
        out[f"{ours}/{peer}"] = entry
    return out


def print_table(results: dict[str, dict], malloc: str) -> None:
    print(f"\nmalloc {malloc}:")
    print(
        f"  {'system':22s} {'objective':16s} {'encoder':14s} {'params':>8s} {'audio-s/s':>10s} {'step s':>8s} "
        f"{'peak RSS':>9s} {'sys s':>6s} {'GFLOP':>7s} {'prec':>5s} {'peak GF/s':>9s} {'FLOP util':>9s} "
        f"{'bf16 peak':>9s} {'of bf16':>8s}"
    )
    for system, r in results.items():
        print(
            f"  {system:22s} {r['objective']:16s} {r.get('encoder', '-'):14s} {r['params_m']:7.2f}M "
            f"{r['audio_s_per_s']:10.2f} {r['step_s']:8.3f} {r['peak_rss_gb']:7.2f}GB {r['sys_s_per_step']:6.2f} "
            f"{r.get('step_gflop', float('nan')):7.1f} {r.get('precision', '?'):>5s} "
            f"{r.get('matmul_peak_gflops', float('nan')):9.1f} {r.get('flop_utilisation_pct', float('nan')):8.1f}% "
            f"{r.get('bf16_matmul_peak_gflops', float('nan')):9.1f} {r.get('flop_utilisation_bf16_pct', float('nan')):7.1f}%"
        )
    for system, r in results.items():
        if "top_ops" in r:
            print(f"  top ops of {system} (self CPU ms, calls, share):")
            for name, ms, calls, share in r["top_ops"]:
                print(f"      {name[:60]:60s} {ms:9.1f} {calls:6d} {share:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--kernel", type=int, default=31, help="depthwise kernel of the Conformer systems")
    parser.add_argument("--fast_kernel", type=int, default=9, help="depthwise kernel of the FastConformer systems")
    parser.add_argument("--encoder", choices=tuple(ENCODERS), help="run every ours_* system on this encoder")
    parser.add_argument(
        "--clone_batch", type=int, help="every ours_* system's clone_batch: masked copies per teacher pass (1)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="timed steps per process, median reported (3; --quick: 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps first: allocator, lazy init (2; --quick: 1)")
    parser.add_argument("--rounds", type=int, default=1, help="processes per system, in alternating order")
    parser.add_argument("--malloc", choices=("default", "tuned", "both"), default="default")
    parser.add_argument("--profile", type=int, default=0, help="also profile one step; print this many top ops")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run: " + json.dumps(QUICK))
    parser.add_argument("--output", help="write the full report (step times, profiles) to this JSON file")
    parser.add_argument("--nemo_python", default=os.environ.get("NEMO_PYTHON", DEFAULT_NEMO_PYTHON))
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="every system's precision")
    parser.add_argument("--baseline_code", help="another checkout of this project: the baseline_* systems' code")
    parser.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key, value in STEPS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.one:
        if os.environ.get("BENCH_BASELINE_CODE"):  # import hf_ssl_speech from that checkout, not the installed one
            sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
            sys.path.insert(0, os.environ["BENCH_BASELINE_CODE"])
        if args.one == "featurise":
            run_featurise(args)
        elif args.one == "w2v2":
            run_w2v2(args)
        else:
            run_ours(OURS_SYSTEMS.get(args.one) or BASELINE_SYSTEMS[args.one], args)
        return

    systems = [s for s in SYSTEMS if s in args.systems]
    if any(s in NEMO_SYSTEMS for s in systems) and not Path(args.nemo_python).exists():
        print(
            f"NeMo python {args.nemo_python!r} not found: skipping NeMo systems (benchmarks/README.md says how "
            "to make the environment; pass --nemo_python or set NEMO_PYTHON).",
            file=sys.stderr,
        )
        systems = [s for s in systems if s not in NEMO_SYSTEMS]
    if not args.baseline_code:
        systems = [s for s in systems if s not in BASELINE_SYSTEMS]
    settings = ("default", "tuned") if args.malloc == "both" else (args.malloc,)
    audio_seconds = args.batch * args.seconds
    print(
        f"workload: {args.batch} x {args.seconds} s, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"FFN {args.ffn}, kernel {args.kernel} (Conformer) / {args.fast_kernel} (FastConformer), {args.precision}, "
        f"{args.threads} threads; {args.warmup} warm-up + {args.repeats} timed steps per process, "
        f"{args.rounds} round(s); load average at start {os.getloadavg()}"
    )
    report = {"benchmark": "pretrain", "settings": {k: v for k, v in vars(args).items() if k != "one"}, "malloc": {}}
    for malloc in settings:
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for round_index in range(args.rounds):
            order = systems if round_index % 2 == 0 else systems[::-1]
            for system in order:
                result = run_child(system, args, malloc)
                if result is None:
                    continue
                runs[system].append(result)
                print(
                    f"  [{malloc}] {system:22s} {result['audio_s_per_s']:8.2f} audio-s/s  "
                    f"peak {result['peak_rss_gb']:.2f} GB  FLOP util {result['flop_utilisation_pct']}% of "
                    f"{result['matmul_peak_gflops']} GFLOP/s  (load {result['loadavg_1min']})",
                    flush=True,
                )
        results = {s: summarise(r) for s, r in runs.items() if r}
        for system, r in results.items():
            r.setdefault("objective", PEER_OBJECTIVE.get(system, "?"))
        print_table(results, malloc)
        report["malloc"][malloc] = {"results": results, "ratios": ratios(results, audio_seconds)}
        for pair, r in report["malloc"][malloc]["ratios"].items():
            if pair.split("/")[1] in BASELINE_SYSTEMS:
                print(
                    f"  {pair:44s} throughput x{r['throughput']} (target x{TARGET_OVER_BASELINE})  peak memory x{r['peak_memory']}"
                )
            if pair.split("/")[1] == "ours_contrastive":
                print(f"  {pair:44s} throughput x{r['throughput']}  peak memory x{r['peak_memory']}")
            if pair.split("/")[1] in NEMO_SYSTEMS:
                with_featurise = r.get("throughput_with_featurise", "? (run featurise)")
                print(
                    f"  {pair:44s} throughput x{r['throughput']} (x{with_featurise} with our featurising)  "
                    f"peak memory x{r['peak_memory']}  target met: {r['meets_target']}"
                )
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    # The one-line summary: ratios plus each system's headline figures (the full report goes to --output).
    summary = {k: v for k, v in report.items() if k != "malloc"} | {
        "malloc": {
            m: {
                "ratios": r["ratios"],
                "figures": {s: {k: f[k] for k in HEADLINE if k in f} for s, f in r["results"].items()},
            }
            for m, r in report["malloc"].items()
        }
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
