"""`mixed_precision: auto` (hf_ssl_speech/precision.py): bf16 exactly where the hardware has bf16 matrix units,
the reason in words, and fine-tuning's `TrainingArguments` set from it."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from hf_ssl_speech.errors import ConfigError
from hf_ssl_speech.finetune.run import apply_mixed_precision
from hf_ssl_speech.precision import describe, hardware_bf16, resolve_mixed_precision

CPU = torch.device("cpu")


def _cpu_has_bf16_units() -> bool:
    """The CPU flags as the kernel reports them (Linux), independent of torch's own CPUID checks."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next(line for line in info if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    return "amx_bf16" in flags or "avx512_bf16" in flags


def test_auto_picks_bf16_exactly_where_the_cpu_has_bf16_units():
    precision, why = resolve_mixed_precision("auto", CPU)
    assert precision == ("bf16" if _cpu_has_bf16_units() else "no")
    assert why.startswith("auto: ") and ("AMX" in why or "AVX512-BF16" in why)
    assert hardware_bf16(CPU)[0] == (precision == "bf16")


def test_explicit_settings_are_kept_and_wrong_ones_named():
    for setting in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(setting, CPU) == (setting, "set in the recipe")
    with pytest.raises(ValueError, match=r"mixed_precision='fp8' is invalid: expected one of"):
        resolve_mixed_precision("fp8", CPU)


def test_finetuning_sets_training_arguments_from_auto(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    precision = apply_mixed_precision(args, "auto")
    assert precision == resolve_mixed_precision("auto", CPU)[0]
    assert (args.bf16, args.fp16, args.mixed_precision) == (precision == "bf16", False, precision)

    given = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True)
    assert apply_mixed_precision(given, "no") == "bf16"  # training.bf16 given: left alone

    with pytest.raises(ConfigError, match="fp16 on the CPU"):
        apply_mixed_precision(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), "fp16")
    with pytest.raises(ConfigError, match="finetune.mixed_precision='fp8' is invalid"):
        apply_mixed_precision(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), "fp8")


def test_the_log_line_names_fp32_and_the_reason():
    assert describe("no", "auto: fp32, no bf16 units") == "mixed precision: fp32 (auto: fp32, no bf16 units)"
    assert describe("bf16", "set in the recipe") == "mixed precision: bf16 (set in the recipe)"
