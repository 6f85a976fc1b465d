"""Scale-out paths tested on CPU (the GPU path, FSDP, mixed precision, compile). So far: bf16 autocast through the
real pretraining loop, and fp16 on the CPU refused (accelerate enables fp16 autocast and its gradient scaler on
accelerators only; on the CPU the run would silently stay fp32)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO_ROOT, accelerate_launch, make_corpus, run_env, write_recipe
from test_pretrain import _KILL_AFTER_SAVE, train_history

SCRIPT = REPO_ROOT / "scripts" / "pretrain.py"
STEPS = 20


def _pretrain(tmp_path, recipe) -> subprocess.CompletedProcess:
    """scripts/pretrain.py in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(recipe), "--no_progress"],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run(tmp_path, manifest, precision: str) -> list[dict]:
    recipe = write_recipe(
        tmp_path / f"{precision}.yaml",
        model={"mask_time_length": 8, "mask_time_prob": 0.05, "bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 4.0},
        optim={},
        train={
            "max_steps": STEPS,
            "save_steps": STEPS,
            "output_dir": precision,
            "seed": 3,
            "mixed_precision": precision,
        },
    )
    proc = _pretrain(tmp_path, recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_history(tmp_path / precision, STEPS)


@pytest.mark.slow
def test_bf16_pretraining_runs_the_whole_loop_and_tracks_fp32(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=8, seconds=1.5, vary=True)
    full = [row["train/loss"] for row in _run(tmp_path, manifest, "no")]
    half = [row["train/loss"] for row in _run(tmp_path, manifest, "bf16")]
    assert len(full) == len(half) == STEPS and all(math.isfinite(v) for v in half)
    assert half[-1] < half[0]  # it learns
    # bf16 matmuls (8-bit mantissa) change every step a little; the curves must stay together. Measured on this
    # machine (2026-12-04): the largest relative gap over the 20 steps is 0.03%; the bound is 1%.
    gaps = [abs(h - f) / abs(f) for h, f in zip(half, full)]
    assert max(gaps) < 0.01, gaps
    assert half != full  # autocast really ran: bf16 cannot reproduce fp32 bit for bit


def test_fp16_on_the_cpu_is_refused_with_the_fix(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=2, seconds=1.0)
    recipe = write_recipe(
        tmp_path / "fp16.yaml",
        model={"bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 2.0},
        optim={},
        train={"max_steps": 1, "output_dir": "fp16", "mixed_precision": "fp16"},
    )
    proc = _pretrain(tmp_path, recipe)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.mixed_precision=fp16 on the CPU" in proc.stderr and "use train.mixed_precision=bf16" in proc.stderr
    assert not (tmp_path / "fp16" / "checkpoints").exists()


# --- FSDP2 through the loop (train.fsdp), 2 gloo processes: kill/resume bit-identical, agreement with DDP
def _fsdp_recipe(tmp_path, manifest, name: str, fsdp: bool, steps: int, save_steps: int):
    return write_recipe(
        tmp_path / f"{name}.yaml",
        model={"mask_time_length": 4, "mask_time_prob": 0.1, "bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
        objectives={"bestrq": {}, "contrastive": {"weight": 0.5}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 2.0},
        optim={},
        train={"max_steps": steps, "save_steps": save_steps, "output_dir": name, "seed": 5, "fsdp": fsdp},
    )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_kill_and_resume_is_bitwise_identical_and_agrees_with_ddp(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    import hf_ssl_speech  # noqa: F401  (registers the Auto classes)

    manifest = make_corpus(tmp_path / "corpus", count=12, seconds=1.0, vary=True)
    n = 3
    env = run_env(tmp_path)
    args = ["--no_progress"]
    straight = _fsdp_recipe(tmp_path, manifest, "straight", True, 2 * n, n)
    killed = _fsdp_recipe(tmp_path, manifest, "killed", True, 2 * n, n)
    ddp = _fsdp_recipe(tmp_path, manifest, "ddp", False, 2 * n, n)
    for recipe in (straight, ddp):
        proc = accelerate_launch(SCRIPT, ["--config", str(recipe), *args], 2, env, tmp_path, 300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # SIGKILL of one process right after checkpoint n is written (a preempted node): the launcher stops the other.
    script = tmp_path / "kill_after_save.py"
    script.write_text(_KILL_AFTER_SAVE)
    proc = accelerate_launch(script, [str(n), "--config", str(killed), *args], 2, env, tmp_path, 300)
    assert proc.returncode != 0
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == [f"checkpoint-{n:08d}"]
    sharded = tmp_path / "killed" / "checkpoints" / f"checkpoint-{n:08d}" / "fsdp"
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # each rank's shards
    proc = accelerate_launch(SCRIPT, ["--config", str(killed), "--resume", *args], 2, env, tmp_path, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def final(run: str) -> Path:
        return tmp_path / run / "checkpoints" / f"checkpoint-{2 * n:08d}" / "model"

    expected, resumed = (
        load_file(final("straight") / "model.safetensors"),
        load_file(final("killed") / "model.safetensors"),
    )
    assert expected.keys() == resumed.keys() and len(expected) > 50
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert train_history(tmp_path / "straight", 2 * n) == train_history(tmp_path / "killed", 2 * n)

    # The exported model is whole (not rank 0's shard) and loads with the Auto classes, no encoder weight missing
    # (the pretraining heads are the only keys the bare encoder does not take).
    model, info = AutoModel.from_pretrained(final("killed"), output_loading_info=True)
    assert not info["missing_keys"] and not any(k.startswith("conformer.") for k in info["unexpected_keys"])
    encoder = {k.removeprefix("conformer."): v for k, v in expected.items() if k.startswith("conformer.")}
    for key, value in model.state_dict().items():
        assert torch.equal(value, encoder[key]), key

    # Against DDP from the same initial weights and batches: the sharded reduce-scatter and the all-reduce sum
    # gradients in another order, so bitwise equality is not expected. Left out: weights whose gradient is zero in
    # exact arithmetic (the depthwise-conv bias right before BatchNorm, the attention key bias under softmax): Adam
    # turns their rounding noise into lr-sized steps on either side. Measured here (2026-12-06) after 6 steps at
    # LR 3e-3: everything else within 5.4e-7 (weights move ~4e-3), losses within 1e-7 relative; bounds 2e-6, 1e-6.
    reference = load_file(final("ddp") / "model.safetensors")
    zero_gradient = ("depthwise_conv.bias", "k_proj.bias", "running_", "num_batches_tracked")
    trained = [k for k in expected if not any(part in k for part in zero_gradient)]
    worst = max(float((expected[k] - reference[k]).abs().max()) for k in trained)
    assert len(trained) > 50 and worst < 2e-6, worst
    losses = [row["train/loss"] for row in train_history(tmp_path / "straight", 2 * n)]
    ddp_losses = [row["train/loss"] for row in train_history(tmp_path / "ddp", 2 * n)]
    # The loss is normalised by the global target count under both (the sums and counts of both ranks).
    assert losses == pytest.approx(ddp_losses, rel=1e-6)
