"""Training helpers: schedules, optimiser groups, loss normalisation over processes, guard, checkpoints, plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from support import accelerate_launch, make_tiny_config, write_recipe
from torch import nn

from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
from hf_ssl_speech.pretrain.bookkeeping import (
    LossTracker,
    MetricsLogger,
    NonFiniteGuard,
    NonFiniteLossError,
    backward_loss,
    global_totals,
    reduce_counts,
)
from hf_ssl_speech.pretrain.checkpoints import CheckpointManager
from hf_ssl_speech.pretrain.optim import build_optimizer, build_scheduler, gumbel_temperature, noam_factor, param_groups

REPO_ROOT = Path(__file__).resolve().parent.parent


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """Subprocess environment: one thread, no user accelerate config, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_"))}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO_ROOT / "tests"))
    return env


# ---------------------------------------------------------------------------------------------- schedules
def test_noam_peak_matches_nemo_formula_and_shape():
    d_model, warmup, lr = 512, 25_000, 5.0
    # NeMo: the peak is lr * (d_model * warmup)^-0.5, reached at the end of warmup (docs/architecture.md §4: ~1.4e-3).
    peak = lr * noam_factor(warmup, d_model, warmup)
    assert peak == pytest.approx(lr / math.sqrt(d_model * warmup), rel=1e-12)
    assert peak == pytest.approx(1.4e-3, rel=0.01)
    # Linear rise, then step^-0.5 decay.
    assert noam_factor(warmup // 2, d_model, warmup) == pytest.approx(noam_factor(warmup, d_model, warmup) / 2)
    assert noam_factor(4 * warmup, d_model, warmup) == pytest.approx(noam_factor(warmup, d_model, warmup) / 2)
    # The min_lr floor applies only after warmup.
    assert noam_factor(10**9, d_model, warmup, min_factor=1e-5) == 1e-5  # unfloored: 1.4e-6
    assert noam_factor(1, d_model, warmup, min_factor=1e-3) < 1e-3
    assert noam_factor(0, d_model, warmup) == noam_factor(1, d_model, warmup) > 0


def test_noam_scheduler_drives_the_optimiser_lr():
    param = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=5.0)
    scheduler = build_scheduler(optimizer, "noam", warmup_steps=10, max_steps=100, d_model=64, lr=5.0, min_lr=0.0)
    seen = []
    for _ in range(40):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[10] == pytest.approx(5.0 * noam_factor(10, 64, 10))
    assert max(seen) == seen[10]
    assert seen[39] == pytest.approx(5.0 * noam_factor(39, 64, 10))


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_hf_schedulers_warm_up_then_follow_their_shape(name):
    param = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = build_scheduler(optimizer, name, warmup_steps=5, max_steps=20, d_model=64, lr=1e-3)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-3)
    assert lrs[2] == pytest.approx(1e-3 * 2 / 5)
    if name == "constant":
        assert lrs[19] == pytest.approx(1e-3)
    else:
        assert lrs[19] < 0.1 * 1e-3


def test_unknown_scheduler_is_named():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="optim.scheduler='poly'"):
        build_scheduler(optimizer, "poly", 1, 10, 8, 1.0)


def test_gumbel_temperature_decays_to_floor():
    assert gumbel_temperature(0, 2.0, 0.5, 0.999995) == 2.0
    assert gumbel_temperature(100_000, 2.0, 0.5, 0.999995) == pytest.approx(2.0 * 0.999995**100_000)
    assert gumbel_temperature(10**7, 2.0, 0.5, 0.999995) == 0.5  # 2 * 0.999995^1e7 ~ 0 -> floor


@pytest.mark.parametrize("objectives", [{"contrastive": {}, "mlm": {}, "bestrq": {}}, {"apc": {}, "cpc": {}}])
def test_no_decay_rule_on_the_real_pretraining_model(tiny_config, objectives):
    """By parameter name, on a real ConformerSslForPreTraining: every norm, bias, rel-pos bias u/v and embedding
    is in the no-decay group, every weight matrix and conv kernel in the decayed one (the review found
    `self_attn.bias_u` / `bias_v` decayed when the rule matched names the model does not use)."""
    config = tiny_config(objectives=objectives, causal="apc" in objectives, mask_fill="learned")
    model = ConformerSslForPreTraining(config)
    decay, no_decay = param_groups(model, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    for name in exempt:
        last = name.rsplit(".", 1)[-1]
        assert last in ("bias", "bias_u", "bias_v", "masked_spec_embed", "codevectors") or "norm" in name, name
    for name in decayed:
        assert name.endswith("weight") and "norm" not in name, name
        assert model.get_parameter(name).ndim >= 2, name
    for layer in range(config.num_hidden_layers):
        for suffix in ("self_attn.bias_u", "self_attn.bias_v", "norm_self_att.weight", "conv.norm.weight"):
            assert f"conformer.layers.{layer}.{suffix}" in exempt
    if "contrastive" in objectives:
        assert {"masked_spec_embed", "quantizer.codevectors", "quantizer.weight_proj.bias"} <= exempt
        assert "quantizer.weight_proj.weight" in decayed
    optimizer = build_optimizer(model, 1e-3, (0.9, 0.98), 1e-3)
    assert optimizer.defaults["betas"] == (0.9, 0.98)


def test_pretraining_and_finetuning_share_the_no_decay_rule(tiny_config):
    """Fine-tuning's layer-wise groups exempt exactly the parameters the model names, like pretraining's."""
    from hf_ssl_speech import ConformerSslForCTC
    from hf_ssl_speech.finetune.optim import layerwise_param_groups

    model = ConformerSslForCTC(tiny_config(vocab_size=12))
    names = {id(p): n for n, p in model.named_parameters()}
    fine = {
        names[id(p)]
        for g in layerwise_param_groups(model, 1e-3, 1e-2, 0.8)
        if g["weight_decay"] == 0
        for p in g["params"]
    }
    pre = {names[id(p)] for p in param_groups(model, 1e-2)[1]["params"]}
    assert fine == pre == model.no_weight_decay_parameters()
    assert "conformer.layers.0.self_attn.bias_u" in fine and "lm_head.bias" in fine and "lm_head.weight" not in fine


# ---------------------------------------------------------------------------------------------- loss normalisation
# Two "objectives" on a linear model, with target counts that differ per example, so that each process
# holds a different number of targets: per-process normalisation would give the wrong gradient.
_NORMALISER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from accelerate import Accelerator
    from hf_ssl_speech.pretrain.bookkeeping import backward_loss, reduce_counts

    out_path, grad_accum = sys.argv[1], int(sys.argv[2])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = accelerator.prepare(nn.Linear(3, 2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 3, generator=g)                 # (examples, frames, features)
    y = torch.randn(8, 5, 2, generator=g)
    lengths_a = torch.tensor([5, 1, 4, 2, 5, 3, 1, 1])    # objective a: first L frames of each example
    lengths_b = torch.tensor([1, 1, 1, 5, 5, 5, 2, 4])    # objective b: a different count per example
    weights = {"a": 1.0, "b": 0.5}
    rank, world = accelerator.process_index, accelerator.num_processes
    # global micro-batch m holds examples [4m, 4m+4); this process takes its contiguous share of it
    for m in range(grad_accum):
        lo, share = 4 * m if grad_accum > 1 else 0, (4 if grad_accum > 1 else 8) // world
        idx = torch.arange(lo + rank * share, lo + (rank + 1) * share)
        pred = model(x[idx])
        err = (pred - y[idx]).pow(2).sum(-1)            # (share, frames)
        frames = torch.arange(5)
        mask_a = frames < lengths_a[idx, None]
        mask_b = frames < lengths_b[idx, None]
        sums = {"a": (err * mask_a).sum(), "b": (pred.abs().sum(-1) * mask_b).sum()}
        counts = {"a": mask_a.sum(), "b": mask_b.sum()}
        global_counts = reduce_counts(counts, lambda t: accelerator.reduce(t, "sum"))
        with accelerator.no_sync(model) if m < grad_accum - 1 else torch.enable_grad():
            accelerator.backward(backward_loss(sums, global_counts, weights, world, grad_accum))
    if accelerator.is_main_process:
        module = accelerator.unwrap_model(model)
        torch.save({"weight": module.weight.grad, "bias": module.bias.grad, "world": world}, out_path)
    accelerator.wait_for_everyone()
    # Tear gloo down before interpreter exit: left to atexit, a rank can abort ("terminate called without an
    # active exception") while its peer is already gone. The DDP wrapper's reducer holds the process group, so
    # it goes first (the module global and accelerate's own reference), then the group itself.
    del model
    accelerator.free_memory()
    accelerator.end_training()  # destroys the process group
    """
)


def _reference_grads(grad_accum: int, split: int = 1) -> dict[str, torch.Tensor]:
    """The gradient of sum_o w_o * S_o / G_o over each global micro-batch, averaged over micro-batches.

    `split > 1` gives the naive alternative instead: each micro-batch cut in `split` parts normalised by their
    own counts and averaged (what per-process normalisation + DDP averaging computes).
    """
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, 3, generator=g), torch.randn(8, 5, 2, generator=g)
    lengths_a = torch.tensor([5, 1, 4, 2, 5, 3, 1, 1])
    lengths_b = torch.tensor([1, 1, 1, 5, 5, 5, 2, 4])
    batches = [torch.arange(8)] if grad_accum == 1 else [torch.arange(0, 4), torch.arange(4, 8)]
    batches = [part for idx in batches for part in idx.chunk(split)]
    total = 0.0
    for idx in batches:
        pred = model(x[idx])
        frames = torch.arange(5)
        mask_a, mask_b = frames < lengths_a[idx, None], frames < lengths_b[idx, None]
        loss_a = ((pred - y[idx]).pow(2).sum(-1) * mask_a).sum() / mask_a.sum()
        loss_b = (pred.abs().sum(-1) * mask_b).sum() / mask_b.sum()
        total = total + (loss_a + 0.5 * loss_b) / len(batches)
    total.backward()
    return {"weight": model.weight.grad, "bias": model.bias.grad}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_global_count_normalisation_two_gloo_processes_match_one(tmp_path, grad_accum):
    script = tmp_path / "normaliser.py"
    script.write_text(_NORMALISER_SCRIPT)
    env = _clean_env(tmp_path)
    results = {}
    for world in (1, 2):
        out = tmp_path / f"grads_{world}.pt"
        proc = accelerate_launch(script, [str(out), str(grad_accum)], world, env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = torch.load(out)
    assert (results[1]["world"], results[2]["world"]) == (1, 2)
    reference = _reference_grads(grad_accum)
    naive = _reference_grads(grad_accum, split=2)
    assert not torch.allclose(naive["weight"], reference["weight"], rtol=1e-3), "the data must tell them apart"
    for key in ("weight", "bias"):
        torch.testing.assert_close(results[1][key], reference[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[2][key], reference[key], rtol=1e-5, atol=1e-6)


def test_backward_loss_scales_by_processes_and_accumulation():
    sums = {"a": torch.tensor(6.0), "b": torch.tensor(4.0)}
    counts = {"a": torch.tensor(3.0, dtype=torch.float64), "b": torch.tensor(8.0, dtype=torch.float64)}
    value = backward_loss(sums, counts, {"a": 1.0, "b": 2.0}, num_processes=4, grad_accum=2)
    assert float(value) == pytest.approx((6 / 3 + 2 * 4 / 8) * 4 / 2)
    reduced = reduce_counts({"a": torch.tensor(3), "b": torch.tensor(0)}, lambda t: t * 2)  # two equal processes
    assert float(reduced["a"]) == 6 and float(reduced["b"]) == 0
    # a zero global count (objective inactive everywhere) must not produce NaN
    assert torch.isfinite(backward_loss({"b": torch.tensor(0.0)}, reduced, {}, 1, 1))
    with pytest.raises(ValueError, match="no objective sums"):
        backward_loss({}, {}, {}, 1, 1)


def test_loss_tracker_reports_global_sum_over_count():
    tracker = LossTracker()
    metrics = {"bestrq_correct": 1.0, "bestrq_accuracy": 0.5, "bestrq_perplexity": 10.0}
    tracker.update({"bestrq": 3.0}, {"bestrq": 2.0}, metrics, weights={"bestrq": 2.0})
    tracker.update(
        {"bestrq": 5.0}, {"bestrq": 6.0}, {"bestrq_correct": 5.0, "bestrq_accuracy": 0.8, "bestrq_perplexity": 20.0}
    )
    out = tracker.compute()
    assert out["loss/bestrq"] == pytest.approx(8 / 8)
    assert out["loss"] == pytest.approx(2.0)  # weight remembered from the first update
    assert out["bestrq_accuracy"] == pytest.approx(6 / 8)  # pooled, not the mean of 0.5 and 0.8
    assert out["bestrq_perplexity"] == pytest.approx(15.0)
    restored = LossTracker()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.compute() == out
    tracker.reset()
    assert tracker.compute() == {}


def test_global_totals_single_process_is_identity():
    totals = global_totals({"count/a": torch.tensor(3), "sum/a": torch.tensor(1.5, requires_grad=True)}, None)
    assert totals["count/a"].dtype == torch.float64 and float(totals["sum/a"]) == 1.5
    doubled = global_totals({"x": 2.0}, lambda t: t * 2)
    assert float(doubled["x"]) == 4.0
    assert global_totals({}, None) == {}


# ---------------------------------------------------------------------------------------------- guard
def test_nonfinite_guard_skips_counts_and_stops():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.ok(1.0, step=0)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        assert not guard.ok(float("nan"), step=1)
    with pytest.warns(RuntimeWarning):
        assert not guard.ok(float("inf"), step=2)
    assert guard.ok(torch.tensor(0.3), step=3)  # a finite step resets the streak, not the total
    assert guard.state_dict() == {"consecutive": 0, "total_skipped": 2}
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        for step in range(4, 10):
            guard.ok(float("nan"), step=step)
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert restored.total_skipped == 5


# ---------------------------------------------------------------------------------------------- metrics and plot
def test_metrics_logger_history_and_png(tmp_path):
    logged = []
    metrics = MetricsLogger(lambda values, step: logged.append((step, values)))
    for step in range(1, 21):
        metrics.log(step, {"loss": 5.0 / step, "loss/bestrq": 5.0 / step, "lr": 1e-3 * step})
        if step % 10 == 0:
            metrics.log(step, {"loss": 6.0 / step}, split="valid")
    assert logged[0] == (1, {"train/loss": 5.0, "train/loss/bestrq": 5.0, "train/lr": 1e-3})
    png = metrics.plot(tmp_path / "curves" / "loss.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 500
    restored = MetricsLogger()
    restored.load_state_dict(json.loads(json.dumps(metrics.state_dict())))
    assert restored.history == metrics.history
    assert MetricsLogger().plot(tmp_path / "empty.png") is None


# ---------------------------------------------------------------------------------------------- checkpoints
_CHECKPOINT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from accelerate import Accelerator
    from hf_ssl_speech import ConformerSslModel
    from hf_ssl_speech.pretrain.checkpoints import CheckpointManager
    from hf_ssl_speech.pretrain.optim import build_optimizer
    from support import make_tiny_config  # tests/ is on PYTHONPATH

    output_dir, kill_at = sys.argv[1], int(sys.argv[2])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = ConformerSslModel(make_tiny_config())
    optimizer = build_optimizer(model, 1e-2, (0.9, 0.98), 1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    manager = CheckpointManager(output_dir, keep_last=2)
    features = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(0))
    for step in range(1, 4):
        model(features).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.save({k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
                   os.path.join(output_dir, f"params_{step}.pt"))
        # Simulates a crash (power cut, OOM killer) after everything but the final rename was written.
        die = (lambda tmp: os.kill(os.getpid(), signal.SIGKILL)) if step == kill_at else None
        manager.save(step, accelerator, model, {"data": {"batches": step}}, {"generator": torch.get_rng_state()},
                     before_rename=die)
    """
)


def _run_checkpoint_script(tmp_path: Path, kill_at: int) -> subprocess.CompletedProcess:
    script = tmp_path / "checkpoint_script.py"
    script.write_text(_CHECKPOINT_SCRIPT)
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, str(script), str(out), str(kill_at)],
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_checkpoints_keep_last_and_restore_state(tmp_path):
    proc = _run_checkpoint_script(tmp_path, kill_at=-1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    assert [p.name for p in manager.complete()] == ["checkpoint-00000002", "checkpoint-00000003"]
    latest = manager.latest()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data"] == {"batches": 3}
    # The model folder is a from_pretrained source with the step-3 weights.
    from hf_ssl_speech import ConformerSslModel

    saved = torch.load(tmp_path / "run" / "params_3.pt")
    reloaded = ConformerSslModel.from_pretrained(latest / "model").state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)
    assert (latest / "rank_0.pt").is_file() and (latest / "accelerate" / "optimizer.bin").is_file()


def test_kill_during_checkpoint_write_leaves_previous_usable(tmp_path):
    proc = _run_checkpoint_script(tmp_path, kill_at=3)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    assert (manager.root / ".tmp-checkpoint-00000003").is_dir()  # the half-written one is still there...
    latest = manager.latest()  # ...but ignored
    assert latest is not None and latest.name == "checkpoint-00000002"

    # The previous checkpoint restores: accelerate state into a fresh model/optimiser, and the rank state.
    from accelerate import Accelerator

    from hf_ssl_speech import ConformerSslModel

    sys.path.insert(0, str(REPO_ROOT / "tests"))

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    model = ConformerSslModel(make_tiny_config())
    optimizer = build_optimizer(model, 1e-2, (0.9, 0.98), 1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainer_state, rank_state = CheckpointManager.load(latest, accelerator)
    assert trainer_state["step"] == 2 and "generator" in rank_state
    saved = torch.load(tmp_path / "run" / "params_2.pt")
    for key, value in accelerator.unwrap_model(model).state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    assert optimizer.state_dict()["state"], "optimizer moments were restored"

    # The next save cleans up the leftover temporary folder.
    manager.save(3, accelerator, model, {"data": {}}, {})
    assert not (manager.root / ".tmp-checkpoint-00000003").exists()
    assert manager.latest().name == "checkpoint-00000003"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        CheckpointManager.load(tmp_path / "run", accelerator)


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, tiny_config):
    """A run resumed from an earlier checkpoint writes a lower step than the ones on disk: the review saw the
    keep-last rotation delete that new checkpoint as the 'oldest'. Newest means newest written."""
    from accelerate import Accelerator

    from hf_ssl_speech import ConformerSslModel

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(ConformerSslModel(tiny_config()))
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    for step in (200, 300, 20):
        manager.save(step, accelerator, model, {}, {})
    assert {p.name for p in manager.complete()} == {"checkpoint-00000300", "checkpoint-00000020"}
    assert manager.latest().name == "checkpoint-00000020"
    weights = manager.latest() / "model" / "model.safetensors"
    config = manager.latest() / "model" / "config.json"
    assert weights.stat().st_mode & 0o777 == config.stat().st_mode & 0o777  # not 0600 next to 0644


def test_keep_steps_survive_rotation_and_do_not_count_in_keep_last(tmp_path, tiny_config):
    """The compute curve fine-tunes the encoders at 1/4 and 1/2 of pretraining: rotation must leave them."""
    from accelerate import Accelerator

    from hf_ssl_speech import ConformerSslModel

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(ConformerSslModel(tiny_config()))
    manager = CheckpointManager(tmp_path / "run", keep_last=1, keep_steps=[2, 4])
    for step in (2, 3, 4, 6, 8):
        manager.save(step, accelerator, model, {}, {})
    assert [p.name for p in manager.complete()] == [f"checkpoint-{s:08d}" for s in (2, 4, 8)]
    assert manager.latest().name == "checkpoint-00000008"


def test_keep_steps_outside_the_run_are_refused(tmp_path):
    from hf_ssl_speech.errors import ConfigError
    from hf_ssl_speech.pretrain.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", {}, {"bestrq": {}}, {}, {}, {"max_steps": 10, "keep_steps": [5, 11]})
    with pytest.raises(ConfigError, match=r"train\.keep_steps.*\[5, 11\].*max_steps=10"):
        load_recipe(recipe)


def test_a_fresh_run_refuses_a_folder_that_holds_another_run(tmp_path):
    from hf_ssl_speech.errors import UserError
    from hf_ssl_speech.pretrain.checkpoints import check_output_dir

    run = tmp_path / "runs" / "tiny_nest"
    check_output_dir(run, resume=False)  # absent: fine
    run.mkdir(parents=True)
    check_output_dir(run, resume=False)  # empty: fine
    (run / "checkpoints" / "checkpoint-00000300").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-00000300" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match=r"already holds a run \(newest checkpoint checkpoint-00000300\).*--resume"):
        check_output_dir(run, resume=False)
    check_output_dir(run, resume=True)  # continuing it is what --resume is for
