"""Continued pretraining (`model.init_from`) under the faults and sources its own tests leave out.

1. `--resume` of an `init_from` run: preempted (SIGTERM, exit 75) during the heads-only warm-up and again at its last
   frozen step, then resumed with the source folder renamed away, it ends bit-identical to the same run uninterrupted
   (student, loaded and new heads, EMA teacher). The checkpoint alone rebuilds the run: the source is never read again.
2. `init_from` a NEST `.nemo` (written from one of our models through the inverse key map, as tests/test_nemo_convert.py
   does): its random-projection quantizer, MultiSoftmax decoder head and mask embedding are loaded, the report says
   so, and a few steps run with finite losses.
3. With NeMo (`NEMO_PYTHON`, docs/nemo.md): the first training step's loss of a NEST `.nemo` written by NeMo itself
   equals NeMo's own `training_step` loss on the same batch (tests/nemo_parity/nest_step.py says what is shared).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support import REPO_ROOT, make_corpus, run_env
from test_preemption import assert_same_weights, pretrain, weights

from hf_ssl_speech.preemption import PREEMPTED_EXIT_CODE

CONVERT = REPO_ROOT / "scripts" / "convert_checkpoint.py"
CONTINUE_NEST = REPO_ROOT / "configs" / "pretrain" / "continue_nest.yaml"


def _continue_nest_recipe(path: Path, init_from: Path, manifest: Path, output_dir: str, **train) -> Path:
    """configs/pretrain/continue_nest.yaml at test scale (its objective, denoising, optimiser), plus a data2vec
    objective so the run also has a new head and an EMA teacher that starts as the loaded encoder."""
    recipe = yaml.safe_load(CONTINUE_NEST.read_text())
    recipe["model"] = {"init_from": str(init_from)}
    recipe["objectives"]["data2vec"] = {"top_k_layers": 2, "decoder_layers": 1, "decoder_dim": 32, "decoder_groups": 4}
    recipe["data"].update(
        train_manifests=[str(manifest)],
        valid_manifests=[],
        batch_seconds=4.0,
        max_batch_size=4,
        max_duration=10.0,
        min_duration=0.5,
        num_workers=0,
    )
    recipe["optim"].update(lr=3e-3, warmup_steps=2)
    recipe["train"].update(
        output_dir=output_dir,
        save_steps=2,
        eval_steps=1000,
        log_steps=1,
        mixed_precision="no",
        report_to="none",
        keep_last=10,
        seed=5,
        **train,
    )
    path.write_text(yaml.safe_dump(recipe))
    return path


def _nest_source(tmp_path: Path) -> tuple[Path, object]:
    """A NEST .nemo written from one of our tiny models (tests/test_nemo_convert.py's `fake_nest`)."""
    from test_nemo_convert import fake_nest

    folder = tmp_path / "nemo"
    folder.mkdir()
    nemo_file, original, _ = fake_nest(folder)
    return nemo_file, original


# ---------------------------------------------------------------------------------------------- 1. --resume
@pytest.mark.slow
def test_resume_of_an_init_from_run_is_bitwise_identical_across_the_unfreeze_without_the_source(tmp_path):
    nemo_file, _ = _nest_source(tmp_path)
    source = tmp_path / "source"
    done = subprocess.run(
        [sys.executable, str(CONVERT), str(nemo_file), str(source)],
        capture_output=True,
        text=True,
        env=run_env(tmp_path),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = make_corpus(tmp_path / "corpus", count=8, seconds=1.5, vary=True)
    steps, frozen = 6, 3

    straight = _continue_nest_recipe(
        tmp_path / "straight.yaml", source, manifest, "straight", max_steps=steps, freeze_encoder_steps=frozen
    )
    proc = pretrain(tmp_path, ["--config", str(straight), "--no_progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heads loaded: bestrq_head, bestrq_quantizer, masked_spec_embed" in proc.stdout, proc.stdout[-3000:]
    assert f"step {frozen}: encoder unfrozen" in proc.stdout

    run = _continue_nest_recipe(
        tmp_path / "run.yaml", source, manifest, "run", max_steps=steps, freeze_encoder_steps=frozen
    )
    # SIGTERM mid-step 2 of the warm-up: checkpoint 2, exit 75.
    proc = pretrain(tmp_path, ["--config", str(run), "--no_progress"], [{"at": 1, "signal": "SIGTERM", "when": "step"}])
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert "preempted at step 2 (SIGTERM)" in proc.stdout

    # The source is gone (renamed): --resume rebuilds everything from the checkpoint. Preempted again during the
    # last frozen step, so the next resume starts exactly at the unfreeze.
    source.rename(tmp_path / "source-moved")
    proc = pretrain(
        tmp_path, ["--config", str(run), "--resume", "--no_progress"], [{"at": 2, "signal": "SIGTERM", "when": "step"}]
    )
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert "Resumed from run/checkpoints/checkpoint-00000002 at step 2" in proc.stdout
    assert "preempted at step 3 (SIGTERM)" in proc.stdout
    assert "init_from" not in proc.stdout and "unfrozen" not in proc.stdout

    proc = pretrain(tmp_path, ["--config", str(run), "--resume", "--no_progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed from run/checkpoints/checkpoint-00000003 at step 3" in proc.stdout
    assert "init_from" not in proc.stdout

    for step in (2, 4, steps):
        assert_same_weights(weights(tmp_path / "straight", step), weights(tmp_path / "run", step))
    # The warm-up kept the encoder (and so the teacher) exactly the source's; the steps after it moved it.
    moved = weights(tmp_path / "run", steps)
    at_unfreeze = weights(tmp_path / "run", frozen)
    from safetensors.torch import load_file

    encoder = {
        k: v
        for k, v in load_file(tmp_path / "source-moved" / "model.safetensors").items()
        if k.startswith("conformer.")
    }
    assert encoder and all(torch.equal(at_unfreeze[k], v) for k, v in encoder.items())
    assert not all(torch.equal(moved[k], v) for k, v in encoder.items())


def test_a_missing_source_is_refused_unless_a_checkpoint_is_resumed(tmp_path, capsys):
    from hf_ssl_speech.pretrain.cli import pretrain_main

    manifest = make_corpus(tmp_path / "corpus", count=2, seconds=1.0)
    recipe = _continue_nest_recipe(tmp_path / "r.yaml", tmp_path / "gone", manifest, str(tmp_path / "out"), max_steps=2)
    # A fresh run, and --resume with no checkpoint to resume (it would start fresh): both need the source.
    for extra in ([], ["--resume"]):
        assert pretrain_main(["--config", str(recipe), "--no_progress", *extra]) == 2
        err = capsys.readouterr().err
        assert "model.init_from" in err and "no such folder" in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()
