"""One-command GPU check: facts, CUDA correctness, SDPA backends, largest batch, throughput and FLOP utilisation.

Not part of the test suite. On one GPU it is meant to finish within `--budget_minutes` (8 by default); phases that
would start after the budget is spent are skipped and say so. On a machine without CUDA it records the facts and
skips every CUDA-only part with the reason (exit 0); `--cpu_smoke` runs the same code paths on the CPU at tiny
sizes (CUDA/CPU parity skipped, bf16 autocast on the CPU, the batch search capped) so the script is known to run
end to end.

Phases (each one's result, timing and any skip reason go to `<output>/gpu_check.json` and `<output>/gpu_check.md`):
  facts       device, driver, torch / CUDA / cuDNN versions, `nvidia-smi` when present, package versions
  parity      fp32 forward of `ConformerSslModel` (Conformer and FastConformer, rel_pos; FastConformer rotary) on
              CUDA against the CPU with the same weights, padded batch, TF32 off: max |cuda - cpu| over real frames
              must be <= 1e-4 x max(1, max |cpu|). The TF32 figure (cuDNN's default for convolutions) is recorded
              as information only.
  nest        `--nest_steps` (50) bf16-autocast training steps of NEST (the `bestrq` objective on the FastConformer
              of configs/pretrain/nest_fastconformer.yaml, featurised and denoised by the pretraining loop's own
              `featurise`) on a fixed pool of synthetic speech: every loss finite and the mean of the last 10 below
              the mean of the first 10.
  sdpa        for `position_embeddings_type` rel_pos and rotary (L-size attention, bf16, with and without padding):
              the attention inputs of the first block are captured and replayed (forward + backward) under each
              `torch.nn.attention.sdpa_kernel(SDPBackend.X)` alone; the unrestricted call is profiled and the aten
              kernel it dispatched to is named.
  throughput  bf16 training steps of FastConformer-L NEST and Conformer-L contrastive (ours: loop featurisation +
              forward + loss + backward + clip 1.0 + AdamW) next to transformers' ParakeetEncoder (the same size as
              FastConformer-L; encoder only, forward + backward of mean-square output, as benchmarks/bench_encoder.py)
              and Wav2Vec2ConformerForPreTraining (the same size as Conformer-L; raw audio, the step of
              benchmarks/bench_pretrain.py's `w2v2`). For each: the largest batch of `--utt_seconds` utterances that
              fits (doubling from one utterance until OOM, then bisecting), audio-seconds/s and peak memory there,
              FLOPs per audio second (`FlopCounterMode` on one step), audio-hours per GPU-day and utilisation of the
              GPU's dense bf16 peak.

    python benchmarks/gpu_check.py --output runs/gpu_check            # on a GPU machine (about 5-8 minutes)
    python benchmarks/gpu_check.py --cpu_smoke --output runs/gpu_smoke # CPU, tiny sizes, 10-25 s
    python benchmarks/gpu_check.py --skip throughput                   # correctness only

Exit status: 0 when every check that ran passed (skipped ones included), 1 when a correctness check failed.

Anchor (printed with the results): wav2vec 2.0 Base pretraining on 8 x A100 in bf16 runs at about 262k frames/s
(NVIDIA DeepLearningExamples, PyTorch/SpeechRecognition/wav2vec2 README); at 50 frames per second that is 655
audio-seconds/s per GPU, about 15.7k audio-hours per GPU-day.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PHASES = ("parity", "nest", "sdpa", "throughput")
SYSTEMS = ("ours_nest_fastconformer_l", "parakeet_l", "ours_contrastive_conformer_l", "w2v2_conformer_l")

# Dense bf16 tensor-core peak, TFLOP/s (NVIDIA datasheets; the sparsity figures are twice these).
BF16_PEAK_TFLOPS = (
    ("H100 PCIE", 756.0),  # checked before "H100": the PCIe card has a lower clock and fewer SMs
    ("H100", 989.0),  # SXM (torch names it "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
ANCHOR = {
    "what": "wav2vec 2.0 Base pretraining, 8 x A100 80GB, bf16 (NVIDIA DeepLearningExamples wav2vec2 README)",
    "frames_per_s_8_gpus": 262_000,
    "frames_per_audio_second": 50,
}
ANCHOR["audio_s_per_s_per_gpu"] = ANCHOR["frames_per_s_8_gpus"] / ANCHOR["frames_per_audio_second"] / 8
ANCHOR["audio_hours_per_gpu_day"] = round(ANCHOR["audio_s_per_s_per_gpu"] * 24)  # x 86400 s / 3600 s per hour

PARITY_TOLERANCE = 1e-4  # max |cuda - cpu| <= this x max(1, max |cpu|), fp32, TF32 off

# Sizes: the L presets on a GPU, tiny ones for --cpu_smoke (the same code paths).
FULL = {
    "utt_seconds": 10.0,
    "max_batch_utts": 4096,
    "timed_steps": 10,
    "nest_batch_utts": 8,
    "sdpa_batch": 4,
    "nest_steps": 50,
}
SMOKE = {
    "utt_seconds": 1.0,
    "max_batch_utts": 2,
    "timed_steps": 2,
    "nest_batch_utts": 2,
    "sdpa_batch": 2,
    "nest_steps": 20,
}
SMOKE_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
SMOKE_NEST = {"subsampling_conv_channels": 32, "bestrq_codebook_size": 512}  # smaller front end and codebook
SMOKE_CONTRASTIVE = {"num_negatives": 20}


# ----------------------------------------------------------------------------------------------- helpers
def now() -> float:
    return time.perf_counter()


class Budget:
    """Wall-clock budget of the whole command: a phase that would start after it is skipped with a reason."""

    def __init__(self, minutes: float) -> None:
        self.start, self.seconds = now(), 60.0 * minutes

    def left(self) -> float:
        return self.seconds - (now() - self.start)

    def reason(self, need_seconds: float) -> str | None:
        left = self.left()
        return None if left >= need_seconds else f"time budget: {left:.0f} s left, about {need_seconds:.0f} s needed"


def is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def first_line(error: BaseException, limit: int = 300) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]


def autocast(device):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16)


def set_tf32(enabled: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def speech_pool(utterances: int, seconds: float, seed: int = 0):
    """(utterances, samples) float32 synthetic speech (bench_pretrain.synthetic_speech), made once and tiled."""
    import numpy as np
    from bench_pretrain import synthetic_speech

    return np.asarray(synthetic_speech(utterances, int(seconds * 16000), seed=seed))


def tile_batch(pool, utterances: int, device):
    """`utterances` rows cycled from the pool, on `device` (identical rows cost the same as different ones)."""
    import torch

    index = torch.arange(utterances) % pool.shape[0]
    return torch.from_numpy(pool)[index].to(device)


# ----------------------------------------------------------------------------------------------- facts
def facts(device) -> dict[str, Any]:
    import accelerate
    import numpy
    import torch
    import transformers

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=round(props.total_memory / 1024**3, 1),
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,driver_version,memory.total,power.limit,clocks.max.sm,pstate"
        try:
            proc = subprocess.run(
                [smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
            out["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
            out["driver"] = proc.stdout.split(",")[1].strip() if proc.returncode == 0 and proc.stdout else None
        except (OSError, subprocess.SubprocessError) as error:
            out["nvidia_smi"] = f"failed: {error}"
    else:
        out["nvidia_smi"] = "not found"
    out["bf16_peak_tflops"] = peak_tflops(out.get("gpu_name"))
    return out


def peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    upper = name.upper()
    for key, value in BF16_PEAK_TFLOPS:
        if all(part in upper for part in key.split()):
            return value
    return None


# ----------------------------------------------------------------------------------------------- models
def nest_recipe(smoke: bool):
    from hf_ssl_speech.pretrain.recipe import load_recipe

    overrides = [f"model.{k}={v}" for k, v in (SMOKE_MODEL | SMOKE_NEST).items()] if smoke else []
    return load_recipe(REPO / "configs" / "pretrain" / "nest_fastconformer.yaml", overrides)


def contrastive_recipe(smoke: bool):
    """configs/pretrain/conformer_contrastive_mlm.yaml (Conformer-L, patch masking, Gumbel 2 x 300, 100 negatives)
    with the contrastive objective alone."""
    import yaml

    from hf_ssl_speech.pretrain.recipe import recipe_from_dict

    raw = yaml.safe_load((REPO / "configs" / "pretrain" / "conformer_contrastive_mlm.yaml").read_text())
    raw["objectives"] = {"contrastive": {"weight": 1.0}}
    if smoke:
        raw["model"].update(SMOKE_MODEL | SMOKE_CONTRASTIVE)
    return recipe_from_dict(raw, preset_dirs=[REPO / "configs" / "model"])


def peer_sizes(config) -> argparse.Namespace:
    """bench_encoder.build's size arguments taken from one of our configs (the peer has the same size)."""
    return argparse.Namespace(
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        ffn=config.intermediate_size,
        kernel=config.conv_depthwise_kernel_size,
        fast_kernel=config.conv_depthwise_kernel_size,
        batch=1,
        seconds=1.0,
    )


def build_w2v2(config, smoke: bool = False):
    """transformers' Wav2Vec2ConformerForPreTraining of our Conformer's size, configured like bench_pretrain's `w2v2`
    system (rel-pos, mask prob 0.65 x 10, 100 negatives, no layerdrop)."""
    from bench_pretrain import w2v2_config
    from transformers import Wav2Vec2ConformerForPreTraining

    peer = w2v2_config(
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
        config.conv_depthwise_kernel_size,
        # --cpu_smoke: fewer negatives and a narrow raw-audio front end (its default, 7 convs x 512 channels, dwarfs
        # a tiny encoder)
        **({"num_negatives": 20, "conv_dim": (32,) * 7} if smoke else {}),
    )
    return Wav2Vec2ConformerForPreTraining(peer)


class System:
    """A model, its optimiser and `step(utterances) -> loss` on a batch of `utterances` utterances."""

    def __init__(self, name: str, what: str, model, params_m: float, step: Callable[[int], float]) -> None:
        self.name, self.what, self.model, self.params_m, self.step = name, what, model, params_m, step


def make_system(name: str, device, smoke: bool, pool) -> System:
    import numpy as np
    import torch
    from bench_encoder import build as build_encoder
    from bench_pretrain import _gumbel_temperature, _optimizer

    from hf_ssl_speech import ConformerSslFeatureExtractor
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
    from hf_ssl_speech.pretrain.loop import featurise
    from hf_ssl_speech.pretrain.optim import build_optimizer
    from hf_ssl_speech.pretrain.recipe import model_config

    torch.manual_seed(0)
    extractor = ConformerSslFeatureExtractor()
    samples = pool.shape[1]
    recipe = nest_recipe(smoke) if "fastconformer" in name or name == "parakeet_l" else contrastive_recipe(smoke)
    config = model_config(recipe)

    if name.startswith("ours"):
        model = ConformerSslForPreTraining(config).to(device).train()
        o = recipe.optim
        optimizer = build_optimizer(model, 1e-4, o.betas, o.weight_decay, o.eps)
        generator = torch.Generator(device=device).manual_seed(0)
        params = [p for p in model.parameters() if p.requires_grad]

        def step(utterances: int) -> float:
            waves = tile_batch(pool, utterances, device)
            batch = {"waveforms": waves, "waveform_lengths": torch.full((utterances,), samples)}
            inputs = featurise(batch, extractor, device, recipe, generator, train=True)  # the loop's own, on device
            with autocast(device):
                out = model(**inputs, gumbel_temperature=1.0, step=10**9, generator=generator)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.item()

        what = ", ".join(recipe.objectives) + f" on {config.subsampling} x{config.subsampling_factor}"
        params_m = sum(p.numel() for p in params) / 1e6
        return System(name, what, model, params_m, step)

    if name == "parakeet_l":
        model, _ = build_encoder("parakeet", peer_sizes(config))
        model = model.to(device).train()
        optimizer = _optimizer(list(model.parameters()))

        def step(utterances: int) -> float:
            waves = tile_batch(pool, utterances, device)
            features, _ = extractor.extract_batch(waves, torch.full((utterances,), samples, device=device), dither=1e-5)
            with autocast(device):
                hidden = model(input_features=features).last_hidden_state
            loss = hidden.float().pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        what = "encoder only (no SSL head): features + forward + backward of mean(out^2) + clip + AdamW"
        return System(name, what, model, sum(p.numel() for p in model.parameters()) / 1e6, step)

    if name == "w2v2_conformer_l":
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

        model = build_w2v2(config, smoke).to(device).train()
        peer = model.config
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params)
        frames = int(model._get_feat_extract_output_lengths(samples))
        normalised = (pool - pool.mean(1, keepdims=True)) / np.sqrt(pool.var(1, keepdims=True) + 1e-7)
        counter = {"i": 0}

        def step(utterances: int) -> float:
            values = tile_batch(normalised, utterances, device)
            masks = _compute_mask_indices((utterances, frames), peer.mask_time_prob, peer.mask_time_length)
            negatives = _sample_negative_indices((utterances, frames), peer.num_negatives, masks)
            masks = torch.tensor(masks, dtype=torch.long, device=device)
            with autocast(device):
                out = model(
                    values,
                    mask_time_indices=masks,
                    sampled_negative_indices=torch.tensor(negatives, dtype=torch.long, device=device),
                )
            num_losses = masks.sum()
            out.loss.backward()
            for p in params:  # run_wav2vec2_pretraining_no_trainer's multiply_grads(params, 1 / num_losses)
                if p.grad is not None:
                    p.grad.mul_(1 / num_losses)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counter["i"] += 1
            model.set_gumbel_temperature(_gumbel_temperature(counter["i"]))
            return (out.loss / num_losses).item()

        what = "raw audio, numpy masks + negatives per step, contrastive + diversity, clip, AdamW"
        return System(name, what, model, sum(p.numel() for p in params) / 1e6, step)
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------- parity
def parity(device) -> dict[str, Any]:
    import torch

    from hf_ssl_speech import ConformerSslConfig, ConformerSslFeatureExtractor, ConformerSslModel

    common = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
    variants = {
        "conformer_rel_pos": {"subsampling": "striding", "subsampling_factor": 4, "conv_depthwise_kernel_size": 31},
        "fastconformer_rel_pos": {
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": 256,
            "conv_depthwise_kernel_size": 9,
        },
        "fastconformer_rotary": {
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": 256,
            "conv_depthwise_kernel_size": 9,
            "position_embeddings_type": "rotary",
        },
    }
    pool = speech_pool(3, 6.0, seed=1)
    lengths = torch.tensor([96000, 64000, 40000])  # a padded batch: 6 s, 4 s, 2.5 s
    waves = torch.from_numpy(pool) * (torch.arange(96000)[None, :] < lengths[:, None])
    features, frames = ConformerSslFeatureExtractor().extract_batch(waves, lengths)
    mask = (torch.arange(features.shape[1])[None, :] < frames[:, None]).long()
    out: dict[str, Any] = {"tolerance": f"max |cuda - cpu| <= {PARITY_TOLERANCE} x max(1, max |cpu|), fp32, TF32 off"}
    ok = True
    for name, fields in variants.items():
        torch.manual_seed(0)
        model = ConformerSslModel(ConformerSslConfig(**common, **fields)).eval()
        with torch.no_grad():
            ref = model(features, mask)
        valid = ref.attention_mask.bool()
        scale = max(1.0, float(ref.last_hidden_state[valid].abs().max()))
        model_cuda = model.to(device)
        row: dict[str, Any] = {}
        for tf32 in (False, True):
            set_tf32(tf32)
            with torch.no_grad():
                got = model_cuda(features.to(device), mask.to(device))
            diff = (got.last_hidden_state.cpu() - ref.last_hidden_state)[valid].abs().max().item()
            row["max_abs_diff_tf32" if tf32 else "max_abs_diff"] = diff
            if not tf32:
                row["lengths_equal"] = bool(torch.equal(got.output_lengths.cpu(), ref.output_lengths))
        set_tf32(False)
        row["max_abs_cpu"] = scale
        row["passed"] = row["max_abs_diff"] <= PARITY_TOLERANCE * scale and row["lengths_equal"]
        ok &= row["passed"]
        out[name] = row
        del model, model_cuda
        free_memory()
    out["passed"] = ok
    return out


# ----------------------------------------------------------------------------------------------- NEST training
def nest_training(device, smoke: bool, steps: int, batch_utts: int, utt_seconds: float) -> dict[str, Any]:
    import torch

    from hf_ssl_speech import ConformerSslFeatureExtractor
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
    from hf_ssl_speech.pretrain.loop import featurise
    from hf_ssl_speech.pretrain.optim import build_optimizer
    from hf_ssl_speech.pretrain.recipe import model_config

    recipe = nest_recipe(smoke)
    config = model_config(recipe)
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(config).to(device).train()
    o = recipe.optim
    peak_lr, warmup = 1e-3, 10  # a short run: linear warmup to 1e-3, then constant (the recipe's Noam needs 25k)
    optimizer = build_optimizer(model, peak_lr, o.betas, o.weight_decay, o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins, hop_length=config.hop_length)
    generator = torch.Generator(device=device).manual_seed(0)
    pools = [tile_batch(speech_pool(batch_utts, utt_seconds, seed=10 + i), batch_utts, device) for i in range(4)]
    samples = pools[0].shape[1]
    losses, norms = [], []
    start = now()
    for i in range(steps):
        batch = {"waveforms": pools[i % len(pools)], "waveform_lengths": torch.full((batch_utts,), samples)}
        inputs = featurise(batch, extractor, device, recipe, generator, train=True)
        with autocast(device):
            out = model(**inputs, step=i, generator=generator)
        out.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    sync(device)
    window = min(10, max(1, steps // 2))
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    finite = all(math.isfinite(x) for x in losses + norms)
    result = {
        "model": f"{config.subsampling} x{config.subsampling_factor}, hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads",
        "params_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
        "batch": f"{batch_utts} x {utt_seconds} s (4 fixed batches cycled), denoising {recipe.data.denoising_prob}",
        "optimiser": f"AdamW {o.betas}, wd {o.weight_decay}, lr warmup {warmup} steps to {peak_lr}, clip {o.clip}",
        "steps": steps,
        "losses": [round(x, 4) for x in losses],
        "grad_norms": [round(x, 3) for x in norms],
        f"mean_first_{window}": round(first, 4),
        f"mean_last_{window}": round(last, 4),
        "all_finite": finite,
        "decreased": last < first,
        "seconds": round(now() - start, 1),
    }
    result["passed"] = finite and last < first
    del model, optimizer, pools
    free_memory()
    return result


# ----------------------------------------------------------------------------------------------- SDPA backends
KERNEL_OPS = {
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
    "aten::_scaled_dot_product_fused_attention_overrideable": "OVERRIDEABLE",
}


def capture_attention(model, features, mask, device) -> dict[str, Any]:
    """The arguments of the first `scaled_dot_product_attention` call of a bf16 training forward."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    captured: dict[str, Any] = {}

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if not captured:
            captured.update(
                query=query.detach().clone(),
                key=key.detach().clone(),
                value=value.detach().clone(),
                attn_mask=None if attn_mask is None else attn_mask.detach().clone(),
                mask_requires_grad=attn_mask is not None and attn_mask.requires_grad,
                dropout_p=dropout_p,
                scale=scale,
            )
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    F.scaled_dot_product_attention = spy
    try:
        with autocast(device):  # with gradients: whether the mask (the rel-pos bias) needs one matters
            model(features, mask)
    finally:
        F.scaled_dot_product_attention = original
    return captured


def replay(args: dict[str, Any], device, backend=None) -> None:
    """Forward + backward of SDPA on the captured inputs (under the same autocast), optionally one backend only."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q, k, v = (args[n].detach().requires_grad_(True) for n in ("query", "key", "value"))
    m = args["attn_mask"]
    if m is not None:
        m = m.detach().requires_grad_(args["mask_requires_grad"])
    context = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with context, autocast(device):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=args["dropout_p"], scale=args["scale"])
    out.float().sum().backward()
    sync(device)


def sdpa_backends(device, smoke: bool, batch: int, utt_seconds: float) -> dict[str, Any]:
    import torch
    from torch.nn.attention import SDPBackend
    from torch.profiler import ProfilerActivity, profile

    from hf_ssl_speech import ConformerSslConfig, ConformerSslModel

    sizes = (
        SMOKE_MODEL | {"num_hidden_layers": 1}
        if smoke
        else {"hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 1, "intermediate_size": 2048}
    )
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    frames = int(utt_seconds * 100)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict[str, Any] = {
        "attention": f"hidden {sizes['hidden_size']}, {sizes['num_attention_heads']} heads, FastConformer x8, "
        f"{batch} x {utt_seconds} s, bf16 autocast, training mode (forward + backward)",
    }
    for kind in ("rel_pos", "rotary"):
        torch.manual_seed(0)
        config = ConformerSslConfig(
            **sizes,
            subsampling="dw_striding",
            subsampling_factor=8,
            subsampling_conv_channels=256 if not smoke else 32,
            conv_depthwise_kernel_size=9,
            position_embeddings_type=kind,
        )
        model = ConformerSslModel(config).to(device).train()
        for padded in (False, True):
            features = torch.randn(batch, frames, 80, device=device)
            mask = torch.ones(batch, frames, dtype=torch.long, device=device)
            if padded:
                mask[-1, frames // 2 :] = 0
            args = capture_attention(model, features, mask, device)
            row: dict[str, Any] = {
                "query": f"{tuple(args['query'].shape)} {str(args['query'].dtype).removeprefix('torch.')}",
                "attn_mask": None
                if args["attn_mask"] is None
                else f"{tuple(args['attn_mask'].shape)} {str(args['attn_mask'].dtype).removeprefix('torch.')}"
                + (" (requires grad)" if args["mask_requires_grad"] else ""),
                "dropout_p": args["dropout_p"],
                "backends": {},
            }
            for backend in backends:
                try:
                    replay(args, device, backend)
                    row["backends"][backend.name] = "ok"
                except Exception as error:  # noqa: BLE001 - a backend that refuses these inputs
                    row["backends"][backend.name] = "fails: " + first_line(error, 200)
            with profile(activities=activities) as prof:
                replay(args, device)
            names = {e.key for e in prof.key_averages()}
            row["default_dispatches_to"] = sorted(label for op, label in KERNEL_OPS.items() if op in names)
            if device.type == "cuda":
                kernels = [
                    e.key
                    for e in prof.key_averages()
                    if getattr(e, "device_type", None) is not None
                    and "CUDA" in str(e.device_type)
                    and any(word in e.key.lower() for word in ("fmha", "flash", "attention", "cudnn", "softmax"))
                ]
                row["cuda_kernels"] = sorted(set(kernels))[:8]
            out[f"{kind}{'_padded' if padded else ''}"] = row
        del model
        free_memory()
    return out


# ----------------------------------------------------------------------------------------------- throughput
def try_batch(system: System, utterances: int, device) -> tuple[bool, str | None]:
    """Two steps at this batch (the first allocates AdamW's state); False on OOM (memory freed again)."""
    try:
        for _ in range(2):
            loss = system.step(utterances)
        sync(device)
        if not math.isfinite(loss):
            return False, f"non-finite loss {loss}"
        return True, None
    except Exception as error:  # noqa: BLE001
        if not is_oom(error):
            raise
    # Outside the except block: the traceback (and the step's activations it holds) is gone by now.
    system.model.zero_grad(set_to_none=True)
    free_memory()
    return False, "OOM"


def largest_batch(system: System, device, cap: int, deadline: float) -> dict[str, Any]:
    """Double from one utterance until OOM (or the cap), then bisect between the last fit and the first OOM
    down to a step of 1/16 of the fit (at least one utterance)."""
    probes: list[list] = []
    fit, fail = 0, None
    n = 1
    while n <= cap and now() < deadline:
        ok, why = try_batch(system, n, device)
        probes.append([n, ok if ok else why])
        if not ok:
            fail = n
            break
        fit = n
        n *= 2
    if fit and fail is None and n > cap:
        return {"utterances": fit, "probes": probes, "limited_by": f"cap {cap}"}
    while fail is not None and fail - fit > max(1, fit // 16) and now() < deadline:
        mid = (fit + fail) // 2
        ok, why = try_batch(system, mid, device)
        probes.append([mid, ok if ok else why])
        if ok:
            fit = mid
        else:
            fail = mid
    limited = "memory" if fail is not None else "time budget"
    return {"utterances": fit, "probes": probes, "limited_by": limited}


def count_flops(system: System, utterances: int) -> float:
    """FLOPs of one whole step at `utterances` (matmuls, convolutions, attention; torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        system.step(utterances)
    return float(counter.get_total_flops())


def measure(system: System, utterances: int, utt_seconds: float, device, steps: int) -> dict[str, Any]:
    import resource

    import torch

    system.step(utterances)  # warm-up at this size
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    loss = float("nan")
    for _ in range(steps):
        start = now()
        loss = system.step(utterances)  # .item() synchronises
        times.append(now() - start)
    step_s = statistics.median(times)
    audio = utterances * utt_seconds
    out = {
        "batch_utterances": utterances,
        "batch_audio_s": audio,
        "step_s": round(step_s, 4),
        "step_times_s": [round(t, 4) for t in times],
        "audio_s_per_s": round(audio / step_s, 1),
        "audio_hours_per_gpu_day": round(audio / step_s * 24),
        "last_loss": loss,
    }
    if device.type == "cuda":
        out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1024**3, 2)
    else:
        out["process_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    return out


def throughput(device, smoke: bool, sizes: dict, systems: list[str], budget: Budget, peak: float | None) -> dict:
    results: dict[str, Any] = {}
    pool = speech_pool(4, sizes["utt_seconds"], seed=2)
    share = max(budget.left() - 15, 0) / max(len(systems), 1)  # each system's slice of what is left
    for name in systems:
        reason = budget.reason(30)
        if reason:
            results[name] = {"skipped": reason}
            continue
        started = now()
        system = None
        try:
            system = make_system(name, device, smoke, pool)
            row: dict[str, Any] = {"what": system.what, "params_m": round(system.params_m, 2)}
            # search within 60% of this system's slice; the rest measures and counts FLOPs
            search = largest_batch(system, device, sizes["max_batch_utts"], started + 0.6 * share)
            row["search"] = search
            n = search["utterances"]
            if n == 0:
                row["skipped"] = "not even one utterance fits"
            else:
                for attempt in range(3):  # at the edge of memory a timed run can still OOM: step down
                    try:
                        row.update(measure(system, n, sizes["utt_seconds"], device, sizes["timed_steps"]))
                        break
                    except Exception as error:  # noqa: BLE001
                        if not is_oom(error) or attempt == 2:
                            raise
                    system.model.zero_grad(set_to_none=True)
                    free_memory()
                    n = max(1, int(n * 0.85))
                    row["measured_below_search"] = n
                flop_utts = max(1, min(n, 2))
                flops = count_flops(system, flop_utts)
                row["flops_per_audio_s"] = flops / (flop_utts * sizes["utt_seconds"])
                row["tflop_per_s"] = float(f"{row['flops_per_audio_s'] * row['audio_s_per_s'] / 1e12:.3g}")
                row["flop_utilisation"] = round(row["tflop_per_s"] / peak, 4) if peak else None
        except Exception as error:  # noqa: BLE001 - one system failing must not hide the others
            row = {"error": first_line(error, 500)}
        finally:
            del system
            free_memory()
        row["seconds"] = round(now() - started, 1)
        results[name] = row
        print(f"  {name}: {json.dumps({k: v for k, v in row.items() if k not in ('search', 'step_times_s')})}")
    return results


# ----------------------------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    f = report["facts"]
    lines = ["# GPU check", ""]
    lines.append(
        f"Device: {f.get('gpu_name', f['device'])}; driver {f.get('driver')}; torch {f['torch']} (CUDA "
        f"{f['torch_cuda']}, cuDNN {f['cudnn']}); transformers {f['transformers']}; accelerate {f['accelerate']}; "
        f"commit {f.get('git_commit')}; mode {report['mode']}; {report['seconds']:.0f} s in all."
    )
    if f.get("nvidia_smi"):
        lines.append(f"nvidia-smi: `{f['nvidia_smi']}`")
    lines.append("")
    lines.append("| phase | result |")
    lines.append("|---|---|")
    for phase in PHASES:
        r = report["phases"].get(phase, {})
        if "skipped" in r:
            text = f"skipped: {r['skipped']}"
        elif "error" in r:
            text = f"error: {r['error']}"
        elif phase == "parity":
            text = ("passed" if r["passed"] else "FAILED") + "; " + r["tolerance"] + "; "
            text += ", ".join(
                f"{k} {v['max_abs_diff']:.1e} (TF32 {v['max_abs_diff_tf32']:.1e})"
                for k, v in r.items()
                if isinstance(v, dict)
            )
        elif phase == "nest":
            window = [k for k in r if k.startswith("mean_first_")][0]
            last = window.replace("first", "last")
            text = (
                f"{'passed' if r['passed'] else 'FAILED'}: {r['steps']} bf16 steps, {r['model']}, loss "
                f"{r[window]:.3f} (first) -> {r[last]:.3f} (last), finite: {r['all_finite']}, {r['seconds']} s"
            )
        elif phase == "sdpa":
            text = "; ".join(
                f"{k}: runs {'+'.join(v['default_dispatches_to']) or '?'}, "
                f"works alone: {', '.join(b for b, s in v['backends'].items() if s == 'ok') or 'none'}"
                for k, v in r.items()
                if isinstance(v, dict)
            )
        else:
            text = "see the table below"
        lines.append(f"| {phase} | {text} |")
    rows = report["phases"].get("throughput", {})
    if isinstance(rows, dict) and "skipped" not in rows and "error" not in rows:
        peak = f.get("bf16_peak_tflops")
        lines += [
            "",
            f"Throughput, bf16 autocast, {report['sizes']['utt_seconds']} s utterances, largest batch that fits "
            f"(bf16 dense peak: {peak or 'unknown'} TFLOP/s):",
            "",
            "| system | params | batch (audio s) | audio-s/s | audio-h per GPU-day | peak memory | TFLOP/s | "
            "FLOP utilisation | limited by |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            if not isinstance(r, dict):
                continue
            if "audio_s_per_s" not in r:
                lines.append(f"| {name} | | | | | | | | {r.get('skipped') or r.get('error')} |")
                continue
            memory = r.get("peak_allocated_gb", r.get("process_peak_rss_gb"))
            util = f"{r['flop_utilisation']:.1%}" if r.get("flop_utilisation") is not None else "-"
            lines.append(
                f"| {name} | {r['params_m']}M | {r['batch_audio_s']:.0f} | {r['audio_s_per_s']} | "
                f"{r['audio_hours_per_gpu_day']} | {memory} GB | {r['tflop_per_s']} | {util} | "
                f"{r['search']['limited_by']} |"
            )
        a = report["anchor"]
        lines += [
            "",
            f"Anchor: {a['what']}: {a['frames_per_s_8_gpus']} frames/s on 8 GPUs = {a['audio_s_per_s_per_gpu']:.0f} "
            f"audio-s/s per GPU = about {a['audio_hours_per_gpu_day']} audio-hours per GPU-day.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny sizes on the CPU: every code path, no CUDA")
    parser.add_argument("--budget_minutes", type=float, default=8.0, help="wall-clock budget of the whole command")
    parser.add_argument("--skip", nargs="*", default=[], choices=PHASES, help="phases to leave out")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--nest_steps", type=int, help="bf16 NEST steps of the nest phase (50; smoke 20)")
    parser.add_argument("--utt_seconds", type=float, help="utterance length of the throughput batches (10; smoke 2)")
    parser.add_argument("--max_batch_utts", type=int, help="cap of the batch search (4096; smoke 4)")
    parser.add_argument("--peak_tflops", type=float, help="bf16 dense peak of a GPU missing from the table")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))  # bench_encoder / bench_pretrain builders
    sys.path.insert(0, str(REPO))
    import torch

    budget = Budget(args.budget_minutes)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda and not args.cpu_smoke else "cpu")
    smoke = args.cpu_smoke
    sizes = dict(SMOKE if smoke else FULL)
    for key in ("utt_seconds", "max_batch_utts", "nest_steps"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if device.type == "cpu":
        # One thread: the smoke run checks code paths, not speed, and a 2-thread torch run beside other busy
        # processes is several times slower than a 1-thread one (docs/architecture.md §5).
        torch.set_num_threads(1)
    set_tf32(False)
    report: dict[str, Any] = {
        "mode": "cpu_smoke" if smoke else ("cuda" if cuda else "cpu (CUDA-only parts skipped)"),
        "sizes": sizes,
        "anchor": ANCHOR,
        "phases": {},
    }
    report["facts"] = facts(device)
    peak = args.peak_tflops or report["facts"].get("bf16_peak_tflops")
    print(f"facts: {json.dumps(report['facts'])}", flush=True)
    no_cuda = (
        None
        if (cuda or smoke)
        else "no CUDA device (torch.cuda.is_available() is False); --cpu_smoke runs the other phases on the CPU at tiny sizes"
    )
    needs = {"parity": 30, "nest": 60, "sdpa": 30, "throughput": 60}
    for phase in PHASES:
        started = now()
        if phase in args.skip:
            result = {"skipped": "--skip"}
        elif no_cuda:
            result = {"skipped": no_cuda}
        elif phase == "parity" and device.type != "cuda":
            result = {"skipped": "CUDA vs CPU parity needs a CUDA device (--cpu_smoke runs on the CPU only)"}
        elif budget.reason(needs[phase]):
            result = {"skipped": budget.reason(needs[phase])}
        else:
            print(f"{phase} ...", flush=True)
            try:
                if phase == "parity":
                    result = parity(device)
                elif phase == "nest":
                    result = nest_training(
                        device, smoke, sizes["nest_steps"], sizes["nest_batch_utts"], sizes["utt_seconds"]
                    )
                elif phase == "sdpa":
                    result = sdpa_backends(device, smoke, sizes["sdpa_batch"], sizes["utt_seconds"])
                else:
                    result = throughput(device, smoke, sizes, args.systems, budget, peak)
            except Exception as error:  # noqa: BLE001 - report it, go on with the other phases
                result = {"error": first_line(error, 500), "passed": False}
                free_memory()
        if isinstance(result, dict):
            result.setdefault("phase_seconds", round(now() - started, 1))
        report["phases"][phase] = result
        summary = {k: v for k, v in result.items() if k not in ("losses", "grad_norms")}
        print(f"{phase}: {json.dumps(summary, default=str)[:2000]}", flush=True)
    report["seconds"] = round(now() - budget.start, 1)
    failed = [p for p, r in report["phases"].items() if isinstance(r, dict) and r.get("passed") is False]
    report["failed"] = failed
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
