"""End-to-end pretraining through `scripts/pretrain.py`: exact resume after SIGKILL, 2 gloo processes vs 1, CLI.

Each test writes a handful of real WAV files and a NeMo manifest, and trains a 2-layer, 32-wide model for a
few steps in subprocesses (the way a user runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import REPO_ROOT, accelerate_launch, make_corpus, run_env, write_recipe

SCRIPT = REPO_ROOT / "scripts" / "pretrain.py"


def run_script(
    args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300, script: Path = SCRIPT
) -> subprocess.CompletedProcess:
    """`python <script> args...` in `cwd` with `env`, output captured as text."""
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def final_params(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "checkpoints" / f"checkpoint-{step:08d}" / "model" / "model.safetensors")


TIMING_KEYS = ("train/audio_seconds_per_s", "train/data_wait_fraction")  # wall-clock figures differ run to run


def train_history(output_dir: Path, step: int) -> list[dict]:
    state = json.loads((output_dir / "checkpoints" / f"checkpoint-{step:08d}" / "trainer_state.json").read_text())
    rows = [row for row in state["metrics"]["history"] if "train/loss" in row]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


# Kills itself (SIGKILL: no cleanup, like a preempted node) right after the checkpoint of step `kill_after`.
_KILL_AFTER_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from hf_ssl_speech.pretrain import checkpoints as training
    from hf_ssl_speech.pretrain.cli import pretrain_main

    kill_after = int(sys.argv[1])
    original_save = training.CheckpointManager.save

    def save_then_die(self, step, *args, **kwargs):
        path = original_save(self, step, *args, **kwargs)
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    training.CheckpointManager.save = save_then_die
    sys.exit(pretrain_main(sys.argv[2:]))
    """
)


RESUME_OBJECTIVES = {
    "bestrq_contrastive": {"bestrq": {}, "contrastive": {"weight": 0.5, "start_step": 2}},
    # The EMA teacher and DinoSR's codewords are state too: the teacher lives in the accelerate state only.
    "ema_teacher": {
        "data2vec": {"top_k_layers": 2, "decoder_layers": 2, "decoder_dim": 32, "decoder_groups": 4},
        "dinosr": {"top_k_layers": 2, "codebook_size": 16, "start_step": 2},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("objectives", list(RESUME_OBJECTIVES))
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, objectives):
    manifest = make_corpus(tmp_path / "corpus", count=10, seconds=1.5, vary=True)
    n = 3
    common = dict(
        # Masks, negatives, Gumbel noise, denoising mixes, dither and dropout all draw random numbers: the
        # resumed run must restore every one of their states to match the uninterrupted run bit for bit.
        model={
            "mask_strategy": "block",
            "mask_time_prob": 0.05,
            "mask_time_length": 8,
            "mask_fill": "noise",
            "bestrq_codebook_size": 64,
            "bestrq_codebook_dim": 8,
            "num_codevectors_per_group": 8,
            "codevector_dim": 16,
            "proj_codevector_dim": 16,
            "num_negatives": 4,
            "clone_batch": 2,
        },
        objectives=RESUME_OBJECTIVES[objectives],
        data={
            "train_manifests": [str(manifest)],
            "valid_manifests": [str(manifest)],
            "batch_seconds": 4.0,
            "denoising_prob": 0.5,
        },
        optim={"gumbel_temperature_decay": 0.9},
    )
    train = {"max_steps": 2 * n, "save_steps": n, "eval_steps": n, "seed": 7}
    straight = write_recipe(tmp_path / "straight.yaml", **common, train={**train, "output_dir": "straight"})
    killed = write_recipe(tmp_path / "killed.yaml", **common, train={**train, "output_dir": "killed"})
    env = run_env(tmp_path)

    proc = run_script(["--config", str(straight), "--no_progress"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Checkpoint:" in proc.stdout and "Loss curves:" in proc.stdout

    script = tmp_path / "kill_after_save.py"
    script.write_text(_KILL_AFTER_SAVE)
    proc = run_script([str(n), "--config", str(killed), "--no_progress"], tmp_path, env, script=script)
    assert proc.returncode == -9, proc.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == [f"checkpoint-{n:08d}"]

    proc = run_script(["--config", str(killed), "--resume", "--no_progress"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resumed from killed/checkpoints/checkpoint-{n:08d} at step {n}" in proc.stdout

    expected, resumed = final_params(tmp_path / "straight", 2 * n), final_params(tmp_path / "killed", 2 * n)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    # The whole training state, the EMA teacher included, is the uninterrupted run's.
    states = [
        load_file(tmp_path / run / "checkpoints" / f"checkpoint-{2 * n:08d}" / "accelerate" / "model.safetensors")
        for run in ("straight", "killed")
    ]
    assert states[0].keys() == states[1].keys()
    assert any(k.startswith("teacher.") for k in states[0]) == (objectives == "ema_teacher")
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # The losses logged after the resume are the uninterrupted run's, and the objective joined at its step.
    history = train_history(tmp_path / "killed", 2 * n)
    assert [row["step"] for row in history] == list(range(1, 2 * n + 1))
    assert history == train_history(tmp_path / "straight", 2 * n)
    late = "contrastive" if objectives == "bestrq_contrastive" else "dinosr"
    assert f"train/loss/{late}" not in history[0] and f"train/loss/{late}" in history[-1]
    if objectives == "ema_teacher":  # the teacher moved, and code usage is logged per codebook
        assert "train/ema_decay" in history[-1] and "train/dinosr_codebook1_coverage" in history[-1]
        teacher = {k[len("teacher.") :]: v for k, v in states[0].items() if k.startswith("teacher.")}
        student = {k[len("conformer.") :]: v for k, v in states[0].items() if k.startswith("conformer.")}
        assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    else:
        assert "train/bestrq_codebook0_entropy" in history[-1]
    assert (tmp_path / "killed" / "loss_curves.png").is_file()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # Equal-length clips, 2 per batch: the epoch plan is the same for 1 and 2 processes, and every micro-batch
    # has the same target count, so one process accumulating batches (2k, 2k+1) computes the same update as
    # two processes taking one each. APC has no random masks; without dropout and dither nothing is random.
    manifest = make_corpus(tmp_path / "corpus", count=16, seconds=1.0)
    common = dict(
        model={"causal": True, "apc_shift": 3, "hidden_dropout": 0.0},
        objectives={"apc": {}},
        data={
            "train_manifests": [str(manifest)],
            "valid_manifests": [str(manifest)],
            "batch_seconds": 2.0,
            "dither": 0.0,
        },
        optim={},
    )
    steps = 4
    one = write_recipe(
        tmp_path / "one.yaml",
        **common,
        train={"max_steps": steps, "save_steps": steps, "output_dir": "one", "grad_accum": 2},
    )
    two = write_recipe(
        tmp_path / "two.yaml",
        **common,
        train={"max_steps": steps, "save_steps": steps, "output_dir": "two", "grad_accum": 1},
    )
    env = run_env(tmp_path)
    for recipe, processes in ((one, 1), (two, 2)):
        proc = accelerate_launch(SCRIPT, ["--config", str(recipe), "--no_progress"], processes, env, tmp_path, 300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    checkpoint = tmp_path / "two" / "checkpoints" / f"checkpoint-{steps:08d}"
    ranks = [torch.load(checkpoint / f"rank_{r}.pt", weights_only=False)["data"] for r in (0, 1)]
    assert [s["rank"] for s in ranks] == [0, 1] and all(s["world_size"] == 2 for s in ranks)
    assert all(s["position"] == steps for s in ranks)  # each rank consumed one batch per step
    one_history, two_history = train_history(tmp_path / "one", steps), train_history(tmp_path / "two", steps)
    assert len(one_history) == len(two_history) == steps
    for a, b in zip(one_history, two_history):
        # If both ranks had read the same batch, the pooled loss would differ from the 1-process one.
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-9), (a, b)
    state_one = json.loads(
        (tmp_path / "one" / "checkpoints" / f"checkpoint-{steps:08d}" / "trainer_state.json").read_text()
    )
    state_two = json.loads((checkpoint / "trainer_state.json").read_text())
    # Validation ran on both ranks (each its share of the held-out batches) and pooled the result.
    valid = [row for row in state_two["metrics"]["history"] if "valid/loss" in row]
    assert [row["step"] for row in valid] == [steps] and valid[0]["valid/loss/apc"] > 0
    assert state_one["audio_seconds_total"] == pytest.approx(state_two["audio_seconds_total"]) == steps * 2 * 2.0
    expected, got = final_params(tmp_path / "one", steps), final_params(tmp_path / "two", steps)
    # BatchNorm running statistics are buffers, not trained: DDP keeps rank 0's (4 batches), one process
    # updated them on all 8 micro-batches. Everything trained must agree.
    trained = [k for k in expected if "running_" not in k and "num_batches_tracked" not in k]
    assert len(trained) > 20
    # Bitwise: scaling by the number of processes and DDP's averaging are exact powers of two, and a sum of two
    # gradients is the same in either order. (With dither the tiny per-rank noise would be amplified by Adam
    # in weights whose gradient is ~0, e.g. conv biases before a BatchNorm.)
    for key in trained:
        assert torch.equal(got[key], expected[key]), key


# Records, on every rank, a fingerprint of the teacher and of DinoSR's codewords after each EMA step.
_RECORD_TEACHER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
    from hf_ssl_speech.pretrain.cli import pretrain_main

    out_dir, original = sys.argv[1], ConformerSslForPreTraining.update_teacher
    trace = []

    def update_teacher(self, decay, statistics=None):
        original(self, decay, statistics)
        trace.append({
            "teacher": sum(float(p.double().sum()) for p in self.teacher.parameters()),
            "codewords": float(self.dinosr_codebooks.codewords.double().sum()),
            "picked": float(statistics["dinosr_codebooks/counts"].sum()),
        })

    ConformerSslForPreTraining.update_teacher = update_teacher
    code = pretrain_main(sys.argv[2:])
    with open(os.path.join(out_dir, f"trace_{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(trace, f)
    sys.exit(code)
    """
)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_gloo_processes_keep_one_teacher_and_one_set_of_codewords(tmp_path):
    # Each rank masks its own batch differently, so only pooled codeword statistics keep the ranks in step; the
    # teacher's parameters are not trained, so DDP never all-reduces them: each rank applies the same EMA.
    manifest = make_corpus(tmp_path / "corpus", count=8, seconds=1.5, vary=True)
    recipe = write_recipe(
        tmp_path / "ema.yaml",
        model={"mask_strategy": "span", "mask_time_prob": 0.1, "mask_time_length": 8},
        objectives={
            "data2vec": {"top_k_layers": 2, "decoder_layers": 1, "decoder_dim": 32, "decoder_groups": 4},
            "dinosr": {"top_k_layers": 2, "codebook_size": 16},
        },
        data={"train_manifests": [str(manifest)], "batch_seconds": 3.0},
        optim={"ema_decay_start": 0.9, "ema_decay_end": 0.99, "ema_anneal_steps": 4},
        train={"max_steps": 4, "save_steps": 4, "output_dir": "ema"},
    )
    script = tmp_path / "record_teacher.py"
    script.write_text(_RECORD_TEACHER)
    proc = accelerate_launch(
        script, [str(tmp_path), "--config", str(recipe), "--no_progress"], 2, run_env(tmp_path), tmp_path, 300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = [json.loads((tmp_path / f"trace_{rank}.json").read_text()) for rank in (0, 1)]
    assert len(traces[0]) == len(traces[1]) == 4
    assert traces[0] == traces[1]  # identical teachers and codewords on both ranks after every step
    assert len({row["codewords"] for row in traces[0]}) == 4  # the codewords moved at every step
    assert len({row["teacher"] for row in traces[0]}) == 4


# Poisons the loss sums with NaN in the given training forward calls (1-based; `all` = every one), as a
# diverging run would. (Not keyed on the step: a skipped update retries the same step with the next batch.)
_NAN_AT_STEPS = textwrap.dedent(
    """
    import sys
    from hf_ssl_speech.pretrain.cli import pretrain_main
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining

    bad = sys.argv[1]
    original_forward = ConformerSslForPreTraining.forward
    calls = 0

    def forward(self, *args, **kwargs):
        global calls
        out = original_forward(self, *args, **kwargs)
        calls += self.training
        if self.training and (bad == "all" or calls in {int(s) for s in bad.split(",")}):
            out.loss_sums = {name: value * float("nan") for name, value in out.loss_sums.items()}
        return out

    ConformerSslForPreTraining.forward = forward
    sys.exit(pretrain_main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_a_diverged_run_stops(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=6, seconds=1.0)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={"mask_time_length": 8, "mask_time_prob": 0.05, "bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 2.0},
        optim={},
        train={"max_steps": 4, "save_steps": 4, "output_dir": "run", "max_nonfinite": 3},
    )
    script = tmp_path / "nan.py"
    script.write_text(_NAN_AT_STEPS)
    env = run_env(tmp_path)
    proc = run_script(["2", "--config", str(recipe), "--no_progress"], tmp_path, env, script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Step 1: non-finite loss (nan); skipping the update (1 in a row, 1 in total)" in proc.stderr
    history = train_history(tmp_path / "run", 4)
    assert [row["step"] for row in history] == [1, 2, 3, 4]  # the skipped update did not count as a step
    assert history[-1]["train/skipped_steps"] == 1
    assert all(torch.isfinite(value).all() for value in final_params(tmp_path / "run", 4).values())

    # The same command again without --resume would mix two runs in one folder: refused, nothing touched.
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    proc = run_script(["--config", str(recipe), "--no_progress"], tmp_path, env)
    assert proc.returncode == 2 and "already holds a run (newest checkpoint checkpoint-00000004)" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before

    proc = run_script(
        ["all", "--config", str(recipe), "--no_progress", "train.output_dir=diverged"], tmp_path, env, script=script
    )
    assert proc.returncode == 2  # a user-facing stop: one clear message, no traceback
    assert "error: 3 consecutive steps (up to step 0) had a non-finite loss" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_reports_bad_overrides(tmp_path):
    proc = run_script(["train.max_step=3"], tmp_path, run_env(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "Did you mean 'train.max_steps'?" in proc.stderr


@pytest.mark.slow
def test_cli_errors_are_one_clear_line_before_any_model_is_built(tmp_path):
    """A manifest that does not exist, named in a recipe or an override: the field and the path, exit 2, no
    traceback (the review got a 20-line FileNotFoundError from the data pipeline); --debug brings it back."""
    manifest = make_corpus(tmp_path / "corpus", count=2, seconds=1.0)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)], "valid_manifests": ["missing/test.jsonl"]},
        optim={},
        train={"max_steps": 1, "output_dir": "run"},
    )
    env = run_env(tmp_path)
    for args, field in (
        ([], "data.valid_manifests"),
        (["data.train_manifests=[/nonexistent.jsonl]"], "data.train_manifests"),
    ):
        proc = run_script(["--config", str(recipe), *args], tmp_path, env, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"error: {field}: path" in proc.stderr and "does not exist" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "run").exists()  # refused before anything was written
    proc = run_script(["--config", str(recipe), "--debug"], tmp_path, env, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "MissingPathError" in proc.stderr


@pytest.mark.slow
def test_cli_starts_once_and_says_which_precision_it_chose(tmp_path):
    """The default path: one interpreter start (no re-exec to tune malloc, nothing set for child processes), and
    the log names the precision `train.mixed_precision: auto` chose and why."""
    from hf_ssl_speech.precision import describe, resolve_mixed_precision

    manifest = make_corpus(tmp_path / "corpus", count=2, seconds=1.0)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model={},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)]},
        optim={},
        train={"max_steps": 1, "output_dir": "run", "save_steps": 1},
    )
    starts = tmp_path / "starts.txt"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # runs at every interpreter start
        f"import os\nwith open({str(starts)!r}, 'a') as f:\n    f.write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n')\n"
    )
    env = run_env(tmp_path)
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    proc = run_script(["--config", str(recipe), "--no_progress"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert starts.read_text().splitlines() == ["-"], "the command restarted itself or set GLIBC_TUNABLES"
    precision, why = resolve_mixed_precision("auto", torch.device("cpu"))
    assert describe(precision, why) in proc.stdout + proc.stderr


def test_tune_malloc_is_applied_in_process():
    from hf_ssl_speech.pretrain.malloc import keep_freed_memory

    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("mallopt is glibc's: this C library has none")
    assert keep_freed_memory()
