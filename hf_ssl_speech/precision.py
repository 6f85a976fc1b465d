"""`mixed_precision: auto`: bf16 where the hardware has bf16 matrix units, fp32 elsewhere, and why.

bf16 autocast pays only where matmuls and convolutions run natively in bf16: CUDA GPUs with bf16 support
(Ampere and later), and CPUs with AMX tiles or AVX512-BF16 dot products (oneDNN's kernels). Elsewhere torch
emulates bf16 and the run gets slower than fp32. Inside the model, logits and losses stay float32 either way.

Used by pretraining (`train.mixed_precision`) and fine-tuning (`finetune.mixed_precision`, which sets
`TrainingArguments.bf16` / `fp16`).
"""

from __future__ import annotations

import os

import torch

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def hardware_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` runs bf16 matrix work natively, and what was found (for the log)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"CUDA GPU {torch.cuda.get_device_name(device)} supports bf16"
        return False, f"CUDA GPU {torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        # torch.cpu's own CPUID checks (the same ones oneDNN dispatches on), absent from older torch releases.
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        if amx or avx512_bf16:
            units = " and ".join(name for name, has in (("AMX", amx), ("AVX512-BF16", avx512_bf16)) if has)
            return True, f"this CPU has {units}"
        return False, "this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, slower than fp32)"
    return False, f"no bf16 check for device type {device.type!r}"


def launch_device() -> torch.device:
    """The device a launched training process will use, known before its `Accelerator` exists: accelerate's own
    state must not be created early (a `PartialState()` made before `Accelerator(...)` under `accelerate launch`
    on gloo left every process believing it was the main one)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not use_cpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_mixed_precision(setting: str, device: torch.device) -> tuple[str, str]:
    """The precision to run ("no", "bf16" or "fp16") for `setting` on `device`, and the reason, for the log."""
    if setting not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision={setting!r} is invalid: expected one of {MIXED_PRECISION}")
    if setting != "auto":
        return setting, "set in the recipe"
    native, why = hardware_bf16(device)
    return ("bf16", f"auto: {why}") if native else ("no", f"auto: fp32, {why}")


def describe(precision: str, why: str) -> str:
    """The log line of a run's precision, e.g. "mixed precision: bf16 (auto: this CPU has AVX512-BF16)"."""
    return f"mixed precision: {'fp32' if precision == 'no' else precision} ({why})"
