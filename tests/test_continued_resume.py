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

import json
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


# ---------------------------------------------------------------------------------------------- 2. a .nemo source
def test_init_from_a_nest_nemo_keeps_its_quantizer_and_decoder_head_then_trains(tmp_path):
    import io
    import tarfile

    from hf_ssl_speech.interop.nemo_mapping import book_major_rows_to_multisoftmax, rpq_projection_to_nemo
    from hf_ssl_speech.pretrain.init_from import initialise
    from hf_ssl_speech.pretrain.loop import pretrain as pretrain_in_process
    from hf_ssl_speech.pretrain.recipe import load_recipe

    nemo_file, original = _nest_source(tmp_path)
    manifest = make_corpus(tmp_path / "corpus", count=6, seconds=1.5, vary=True)
    overrides = [
        f"model.init_from={nemo_file}",
        f"data.train_manifests=[{manifest}]",
        "data.valid_manifests=[]",
        "data.batch_seconds=4",
        "data.max_batch_size=4",
        "data.min_duration=0.5",
        "data.num_workers=0",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=4",
        "train.save_steps=4",
        "train.log_steps=1",
        "train.report_to=none",
        "train.mixed_precision=no",
        "optim.warmup_steps=1",
        "optim.lr=3e-3",
    ]
    recipe = load_recipe(CONTINUE_NEST, overrides)
    init = initialise(recipe, seed=0)
    assert "heads loaded: bestrq_head, bestrq_quantizer, masked_spec_embed" in init.report, init.report
    assert "new: none" in init.report and "nest.nemo" in init.report, init.report

    model = init.model
    config = model.config
    assert config.bestrq_num_codebooks == 2 and config.bestrq_normalize_input is False
    with tarfile.open(nemo_file) as archive:  # the archive's own tensors, NeMo's layouts
        state = torch.load(io.BytesIO(archive.extractfile("./model_weights.ckpt").read()), weights_only=True)
    quantizer, head = model.bestrq_quantizer, model.bestrq_head
    books, classes = config.bestrq_num_codebooks, config.bestrq_codebook_size
    assert torch.equal(rpq_projection_to_nemo(quantizer.projection), state["quantizer.proj.weight"])
    assert quantizer.codebooks.dtype == torch.float32
    assert torch.equal(quantizer.codebooks, state["quantizer.codebooks"].float())
    head_weight = book_major_rows_to_multisoftmax(head.weight.detach(), classes, books).unsqueeze(-1)
    assert torch.equal(head_weight, state["decoder.decoder_layers.0.weight"])
    assert torch.equal(
        book_major_rows_to_multisoftmax(head.bias.detach(), classes, books), state["decoder.decoder_layers.0.bias"]
    )
    assert torch.equal(model.masked_spec_embed, state["mask_processor.mask_embedding"])
    for name, value in original.state_dict().items():  # and so the model the .nemo was written from, whole
        assert torch.equal(model.state_dict()[name], value), name

    result = pretrain_in_process(recipe, progress=False)
    assert result.step == 4
    history = json.loads((result.checkpoint / "trainer_state.json").read_text())["metrics"]["history"]
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    # The quantizer is frozen (the targets stay NeMo's) while the encoder and the decoder head train.
    from safetensors.torch import load_file

    trained = load_file(result.checkpoint / "accelerate" / "model.safetensors")
    assert torch.equal(trained["bestrq_quantizer.projection"], quantizer.projection)
    assert torch.equal(trained["bestrq_quantizer.codebooks"], quantizer.codebooks)
    assert not torch.equal(trained["bestrq_head.weight"], head.weight)
