"""Faults that real clusters throw at pretraining: stop signals, a full disk, torn checkpoints, another process count.

Every run is `scripts/pretrain.py` in a subprocess on a tiny model (the way a user or a scheduler runs it). The
faults are real: the process sends itself the signal a scheduler sends, or lowers its own file-size limit
(`RLIMIT_FSIZE`: the kernel then refuses the write with EFBIG, as a full disk refuses it with ENOSPC), or a file
is cut short on disk. A short wrapper script only decides *when* (at which step) the fault happens.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import REPO_ROOT, accelerate_launch, free_port, make_corpus, run_env, write_recipe

from hf_ssl_speech.preemption import PREEMPTED_EXIT_CODE

SCRIPT = REPO_ROOT / "scripts" / "pretrain.py"

# Runs pretrain_main with faults injected at chosen points. argv: a JSON list of faults, then the CLI's arguments.
# A fault is {"at": step, "signal": "SIGTERM"|"SIGKILL"|..., "ranks": [0], "times": 1, "when": "step"|"save"}:
# "step": at the start of the optimiser step that begins at `at` (the signal lands mid-step), "save": while
# checkpoint `at` is being written (after every file but the final rename), "fsize": after checkpoint `at`,
# lower RLIMIT_FSIZE to `bytes` (every later write past that size fails with EFBIG).
_FAULTS = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from hf_ssl_speech.pretrain import checkpoints, loop
    from hf_ssl_speech.pretrain.cli import pretrain_main

    faults = json.loads(sys.argv[1])
    step_with, save = loop.train_step, checkpoints.CheckpointManager.save

    def fire(fault, rank):
        if rank in fault.get("ranks", [0]):
            for _ in range(fault.get("times", 1)):
                if fault.get("group"):  # the whole process group, data-loader workers included (Ctrl-C, SLURM)
                    os.killpg(os.getpgid(0), getattr(signal, fault["signal"]))
                else:
                    os.kill(os.getpid(), getattr(signal, fault["signal"]))

    def train_step(run, batches, interval):
        for fault in faults:
            if fault["when"] == "step" and fault["at"] == run.step:
                fire(fault, run.accelerator.process_index)
        return step_with(run, batches, interval)

    def save_with(self, step, accelerator, *args, **kwargs):
        for fault in faults:
            if fault["when"] == "save" and fault["at"] == step:
                kwargs["before_rename"] = lambda tmp, f=fault: fire(f, accelerator.process_index)
        path = save(self, step, accelerator, *args, **kwargs)
        for fault in faults:
            if fault["when"] == "fsize" and fault["at"] == step:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fault["bytes"], resource.RLIM_INFINITY))
        return path

    loop.train_step, checkpoints.CheckpointManager.save = train_step, save_with
    sys.exit(pretrain_main(sys.argv[2:]))
    """
)


def pretrain(tmp_path: Path, args: list[str], faults: list[dict] | None = None) -> subprocess.CompletedProcess:
    """`scripts/pretrain.py args...` in `tmp_path` (through the fault wrapper when `faults` are given), in a
    process group of its own (a fault may signal the whole group)."""
    command = [sys.executable, str(SCRIPT), *args]
    if faults:
        wrapper = tmp_path / "with_faults.py"
        wrapper.write_text(_FAULTS)
        command = [sys.executable, str(wrapper), json.dumps(faults), *args]
    return subprocess.run(
        command,
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )


def launch(tmp_path: Path, args: list[str], processes: int, faults: list[dict]) -> subprocess.CompletedProcess:
    """The same under `accelerate launch` with `processes` gloo workers."""
    wrapper = tmp_path / "with_faults.py"
    wrapper.write_text(_FAULTS)
    return accelerate_launch(wrapper, [json.dumps(faults), *args], processes, run_env(tmp_path), tmp_path, 300)


def launch_like_srun(tmp_path: Path, args: list[str], faults: list[dict]) -> list[subprocess.CompletedProcess]:
    """Two gloo processes started the way `srun --ntasks 2` starts them: each runs the script itself, with the rank
    in its environment and no launcher in between, so each process's own exit status is what the scheduler sees."""
    wrapper = tmp_path / "with_faults.py"
    wrapper.write_text(_FAULTS)
    base = {**run_env(tmp_path), "ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}
    base["MASTER_PORT"] = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(wrapper), json.dumps(faults), *args],
            cwd=tmp_path,
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The whole training state's weights (student, heads, EMA teacher) at checkpoint `step`."""
    return load_file(run / "checkpoints" / f"checkpoint-{step:08d}" / "accelerate" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def checkpoint_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("checkpoint-"))


def recipe(tmp_path: Path, name: str, max_steps: int, save_steps: int) -> Path:
    """A tiny BEST-RQ + data2vec run: masks, dropout, dither and the EMA teacher all carry state across a resume."""
    manifest = tmp_path / "corpus" / "train.jsonl"
    if not manifest.is_file():
        make_corpus(tmp_path / "corpus", count=8, seconds=1.5, vary=True)
    return write_recipe(
        tmp_path / f"{name}.yaml",
        model={"mask_time_prob": 0.05, "mask_time_length": 8, "bestrq_codebook_size": 32, "bestrq_codebook_dim": 8},
        objectives={"bestrq": {}, "data2vec": {"top_k_layers": 2, "decoder_layers": 1, "decoder_dim": 32}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 3.0, "dither": 1e-5},
        optim={},
        train={"max_steps": max_steps, "save_steps": save_steps, "eval_steps": 1000, "seed": 3, "output_dir": name},
    )


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_resume_is_bitwise_identical(tmp_path):
    straight = recipe(tmp_path, "straight", 6, 3)
    proc = pretrain(tmp_path, ["--config", str(straight), "--no_progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    # SIGTERM lands during the second optimiser step: the step finishes, checkpoint 2 is written, exit 75.
    run = recipe(tmp_path, "run", 6, 3)
    proc = pretrain(tmp_path, ["--config", str(run), "--no_progress"], [{"at": 1, "signal": "SIGTERM", "when": "step"}])
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert "preempted at step 2 (SIGTERM): checkpoint run/checkpoints/checkpoint-00000002 written" in proc.stdout
    assert "rerun with --resume" in proc.stdout and "Traceback" not in proc.stderr
    assert checkpoint_steps(tmp_path / "run") == [2]
    assert os.readlink(tmp_path / "run" / "model") == "checkpoints/checkpoint-00000002/model"

    # Resumed, then a second signal right after the first (a scheduler that insists): it stops at once, by the
    # signal, without a checkpoint of its own; checkpoint 3 (save_steps) is complete and untouched.
    faults = [{"at": 4, "signal": "SIGUSR1", "when": "step", "times": 2}]
    proc = pretrain(tmp_path, ["--config", str(run), "--resume", "--no_progress"], faults)
    assert proc.returncode == -signal.SIGUSR1, proc.stderr[-3000:]
    assert checkpoint_steps(tmp_path / "run") == [2, 3]

    proc = pretrain(tmp_path, ["--config", str(run), "--resume", "--no_progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed from run/checkpoints/checkpoint-00000003 at step 3" in proc.stdout
    assert_same_weights(weights(tmp_path / "straight", 6), weights(tmp_path / "run", 6))


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_spares_the_data_workers_until_the_checkpoint(tmp_path):
    run = recipe(tmp_path, "run", 6, 3)
    text = run.read_text().replace("num_workers: 0", "num_workers: 1")
    assert text != run.read_text()
    run.write_text(text)
    fault = {"at": 1, "signal": "SIGINT", "when": "step", "group": True}
    proc = pretrain(tmp_path, ["--config", str(run), "--no_progress"], [fault])
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert "preempted at step 2 (SIGINT)" in proc.stdout and "Traceback" not in proc.stderr
    assert checkpoint_steps(tmp_path / "run") == [2]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    straight = recipe(tmp_path, "straight", 4, 4)
    proc = launch(tmp_path, ["--config", str(straight), "--no_progress"], 2, [])
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Only rank 1 is told (SIGTERM mid-step 2): both processes finish step 2, write checkpoint 2 and exit 75.
    run = recipe(tmp_path, "run", 4, 4)
    proc = launch(
        tmp_path,
        ["--config", str(run), "--no_progress"],
        2,
        [{"at": 1, "signal": "SIGTERM", "when": "step", "ranks": [1]}],
    )
    assert "preempted at step 2 (a signal to another process)" in proc.stdout, proc.stderr[-3000:]
    assert checkpoint_steps(tmp_path / "run") == [2]
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-00000002" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2

    # One process cannot continue a two-process run exactly: refused with the setting to use, nothing written.
    proc = pretrain(tmp_path, ["--config", str(run), "--resume", "--no_progress"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "written by 2 process(es) and this run has 1: resume with `accelerate launch --num_processes 2" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and checkpoint_steps(tmp_path / "run") == [2]

    proc = launch(tmp_path, ["--config", str(run), "--resume", "--no_progress"], 2, [])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "straight", 4), weights(tmp_path / "run", 4))


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    run = recipe(tmp_path, "run", 4, 2)
    # After checkpoint 2, no file may grow past 20 kB: checkpoint 4's weights cannot be written (EFBIG).
    faults = [{"at": 2, "when": "fsize", "bytes": 20_000}]
    proc = pretrain(tmp_path, ["--config", str(run), "--no_progress"], faults)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write checkpoint run/checkpoints/.tmp-checkpoint-00000004 (")
    assert "File too large" in last, last  # EFBIG, in safetensors' or the OS's words
    assert "needs about" in last and "checkpoint-00000002 is intact" in last and "--resume" in last
    assert "Traceback" not in proc.stderr
    assert checkpoint_steps(tmp_path / "run") == [2] and not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))

    proc = pretrain(tmp_path, ["--config", str(run), "--resume", "--no_progress"])  # space again: it carries on
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed from run/checkpoints/checkpoint-00000002 at step 2" in proc.stdout
    assert checkpoint_steps(tmp_path / "run") == [2, 4]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_resume_falls_back_past_a_torn_checkpoint(tmp_path, caplog):
    from accelerate import Accelerator
    from support import make_tiny_config

    from hf_ssl_speech import ConformerSslModel
    from hf_ssl_speech.errors import UserError
    from hf_ssl_speech.pretrain.checkpoints import CheckpointManager, checkpoint_problem

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(ConformerSslModel(make_tiny_config()))
    manager = CheckpointManager(tmp_path / "run", keep_last=3)
    for step in (1, 2, 3):
        manager.save(step, accelerator, model, {}, {"generator": torch.get_rng_state()})
    assert manager.latest_usable().name == "checkpoint-00000003"
    assert all(checkpoint_problem(p) is None for p in manager.complete())

    # A network filesystem cut the newest weights short after the rename: resume says so and takes checkpoint 2.
    _truncate(manager.path_for(3) / "accelerate" / "model.safetensors")
    with caplog.at_level("WARNING"):
        assert manager.latest_usable().name == "checkpoint-00000002"
    assert "checkpoint-00000003 is damaged (accelerate/model.safetensors has" in caplog.text
    assert "falling back to checkpoint-00000002" in caplog.text
    with pytest.raises(UserError, match="checkpoint is damaged.*pick an earlier one"):
        CheckpointManager.check_usable(manager.path_for(3))

    # A file cut to the length its header still fits (recorded sizes catch what the header cannot), a missing
    # per-process file, and a checkpoint from before sizes were recorded (its safetensors header is checked).
    _truncate(manager.path_for(2) / "rank_0.pt", keep=0.9)
    (manager.path_for(1) / "rank_0.pt").unlink()
    assert "rank_0.pt has" in checkpoint_problem(manager.path_for(2))
    assert checkpoint_problem(manager.path_for(1)) == "rank_0.pt is missing"
    state_file = manager.path_for(3) / "trainer_state.json"
    state_file.write_text(json.dumps({k: v for k, v in json.loads(state_file.read_text()).items() if k != "files"}))
    assert checkpoint_problem(manager.path_for(3)).startswith("accelerate/model.safetensors: truncated")
    with pytest.raises(
        UserError, match=r"no usable checkpoint under .*checkpoint-00000003 is damaged.*checkpoint-00000001"
    ):
        manager.latest_usable()

    # The stable model link follows the newest checkpoint written.
    assert (tmp_path / "run" / "model").resolve() == (manager.path_for(3) / "model").resolve()
    assert ConformerSslModel.from_pretrained(tmp_path / "run" / "model") is not None


@pytest.mark.slow
def test_chaos_kills_and_a_preemption_end_with_the_uninterrupted_weights(tmp_path):
    """Three SIGKILLs at random points (mid-step or mid-checkpoint), one SIGTERM, and a torn newest checkpoint:
    each time `--resume` continues, and the final weights equal an uninterrupted run's bit for bit."""
    steps = 8
    straight = recipe(tmp_path, "straight", steps, 2)
    assert pretrain(tmp_path, ["--config", str(straight), "--no_progress"]).returncode == 0
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, steps), 4))  # optimiser steps at which something goes wrong
    faults = [
        {"at": at, "signal": "SIGKILL", "when": rng.choice(["step", "save"] if at % 2 == 0 else ["step"])}
        for at in points
    ]
    faults[rng.randrange(4)].update(signal="SIGTERM", when="step")
    run = recipe(tmp_path, "run", steps, 2)
    for index, fault in enumerate(faults):
        args = ["--config", str(run), "--no_progress", *(["--resume"] if index else [])]
        proc = pretrain(tmp_path, args, [fault])
        expected = PREEMPTED_EXIT_CODE if fault["signal"] == "SIGTERM" else -signal.SIGKILL
        assert proc.returncode == expected, (seed, fault, proc.stderr[-3000:])
    # A crash on a network filesystem also cut the newest checkpoint short: resume falls back one.
    newest = checkpoint_steps(tmp_path / "run")[-1]
    if newest > 2:
        _truncate(tmp_path / "run" / "checkpoints" / f"checkpoint-{newest:08d}" / "model" / "model.safetensors")
    proc = pretrain(tmp_path, ["--config", str(run), "--resume", "--no_progress"])
    assert proc.returncode == 0, (seed, faults, proc.stderr[-3000:])
    if newest > 2:
        assert "falling back to" in proc.stderr, (seed, proc.stderr[-3000:])
    assert_same_weights(weights(tmp_path / "straight", steps), weights(tmp_path / "run", steps))


# Fine-tuning: SIGTERM at the start of optimiser step `at` (a Trainer callback sends it), then the script's own run.
_FINETUNE_SIGNAL = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from transformers import TrainerCallback
    import hf_ssl_speech.finetune.run as run

    at, script = int(sys.argv[1]), sys.argv[2]
    sys.path.insert(0, os.path.dirname(script))
    options = run.train_time_options

    class SendSignal(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at:
                os.kill(os.getpid(), signal.SIGTERM)

    def with_signal(*args, **kwargs):
        spec, callbacks = options(*args, **kwargs)
        return spec, [*callbacks, SendSignal()]

    run.train_time_options = with_signal
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
    """
)


@pytest.mark.slow
def test_sigterm_during_ctc_finetuning_writes_trainers_checkpoint_and_resumes(tmp_path):
    from support import tiny_scratch_args, write_tone_corpus

    manifest = write_tone_corpus(tmp_path / "tones", count=8, seed=0, words=(1, 2), name="train")
    output = tmp_path / "ctc"
    args = [*tiny_scratch_args(), "--train_manifests", str(manifest), "--eval_manifests", str(manifest)]
    args += ["--output_dir", str(output), "--use_cpu", "--max_steps", "6", "--per_device_train_batch_size", "4"]
    args += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    wrapper = tmp_path / "finetune_with_signal.py"
    wrapper.write_text(_FINETUNE_SIGNAL)
    script = str(REPO_ROOT / "scripts" / "finetune_ctc.py")
    env = run_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(wrapper), "2", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    checkpoint = output / "checkpoint-3"
    assert f"preempted at step 3 (SIGTERM): checkpoint {checkpoint} written" in proc.stdout
    assert f"rerun with --resume_from_checkpoint {checkpoint}" in proc.stdout
    # Trainer's own checkpoint format, though the run saves no checkpoints by itself (save_strategy=no).
    assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert not (output / "results.json").exists()  # the final evaluation is for the run that finishes
    # The checkpoint records the training seconds so far, and the resumed run counts on from them: set the record
    # far above what either leg takes, so the summary can only reach it by carrying it over.
    clock = json.loads((checkpoint / "wall_clock.json").read_text())
    assert clock["train_seconds"] > 0
    (checkpoint / "wall_clock.json").write_text(json.dumps({"train_seconds": 1000.0}))

    proc = subprocess.run(
        [sys.executable, script, *args, "--resume_from_checkpoint", str(checkpoint)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 6
    assert (output / "results.json").is_file()
    seconds = float(re.search(r"- train_seconds: ([0-9.]+)", (output / "README.md").read_text()).group(1))
    assert 1000.0 < seconds < 1300.0  # the first leg's record plus the second leg


@pytest.mark.slow  # a real run in subprocesses: in the full suite, not the quick subset
def test_a_time_capped_run_says_so_first_and_its_model_has_a_stable_path(tmp_path):
    run = recipe(tmp_path, "run", 50, 100)
    proc = pretrain(tmp_path, ["--config", str(run), "--no_progress", "train.max_minutes=0.0001"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.split("\n\n")[-1].splitlines()
    assert summary[0] == (
        "Stopped by train.max_minutes=0.0001 after 1 of 50 optimiser steps in run: continue with the same command "
        "and --resume (or raise train.max_minutes)."
    )
    assert summary[-1] == "Load it:      import hf_ssl_speech; AutoModel.from_pretrained('run/model')"
    assert os.readlink(tmp_path / "run" / "model") == "checkpoints/checkpoint-00000001/model"

    proc = pretrain(tmp_path, ["--config", str(run), "--no_progress", "--resume", "train.max_minutes=0.0001"])
    assert proc.returncode == 0 and "after 2 of 50" in proc.stdout, proc.stderr[-3000:]
    assert os.readlink(tmp_path / "run" / "model") == "checkpoints/checkpoint-00000002/model"

    from transformers import AutoModel

    import hf_ssl_speech  # noqa: F401 - registers the Auto classes

    model = AutoModel.from_pretrained(tmp_path / "run" / "model")
    saved = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-00000002" / "model" / "model.safetensors")
    for name, value in model.state_dict().items():  # the encoder of the pretraining model saved at step 2
        assert torch.equal(value, saved[f"conformer.{name}"]), name
