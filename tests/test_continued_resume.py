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
import os
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
    # So is the mask embedding (NeMo's RandomBlockMasking freezes it): mask_fill="frozen", as NeMo trains.
    assert config.mask_fill == "frozen" and not model.masked_spec_embed.requires_grad
    assert torch.equal(trained["masked_spec_embed"], state["mask_processor.mask_embedding"])


# ---------------------------------------------------------------------------------------------- 3. NeMo's own loss
def _nemo_python() -> str | None:
    from test_nemo_convert import nemo_python

    return nemo_python()


NEMO_SETUP = (
    "NeMo not installed: set NEMO_PYTHON to the python of a NeMo 3.0 venv (python3 -m venv /opt/nemo_env && "
    "/opt/nemo_env/bin/pip install torch==2.13.0 'nemo_toolkit[asr]==3.0.0'; docs/nemo.md)"
)


def _run_nemo(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "NEMO_PARITY_MODELS": "nest"}
    done = subprocess.run([_nemo_python(), *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.nemo
@pytest.mark.skipif(_nemo_python() is None, reason=NEMO_SETUP)
def test_nest_first_step_loss_equals_nemos_on_the_same_batch(tmp_path):
    """Our first continue_nest step from a NeMo-written NEST .nemo has NeMo's loss (and gradient norm).

    Compared: NeMo's `training_step` loss (MultiMLMLoss over the block-masked steps, mean over books) and ours
    (`ForPreTraining.forward` with the loop's `featurise`: clean features -> targets, noisy -> encoder), both in
    training mode (BatchNorm batch statistics) on the same two utterances and the same noisy versions of them
    (white noise into one, the other utterance into the other). Shared, because a random draw cannot be: NeMo's
    block mask (its RandomBlockMasking draw, given to ours as `mask_time_indices`) and the noisy audio (NeMo's data
    layer mixes it, ours `mix_for_denoising`). Off on both sides: dither and dropout. Our features are zero-padded to
    NeMo's frame count (its preprocessor pads to a multiple of 16): BatchNorm's batch statistics in training count
    the padded steps, and without that padding the losses differ by ~6e-3. Lengths are multiples of 8 frames: NeMo
    judges a partial last step over 8 frames, ours over its valid frames.
    """
    import numpy as np
    import soundfile as sf
    from support import make_speech_like

    from hf_ssl_speech.pretrain import loop
    from hf_ssl_speech.pretrain.features import batch_extractor
    from hf_ssl_speech.pretrain.init_from import initialise
    from hf_ssl_speech.pretrain.recipe import load_recipe

    clean = [make_speech_like(3.2, seed=1), make_speech_like(2.56, seed=2)]  # 320 and 256 frames
    noise = 0.05 * np.random.default_rng(0).standard_normal(len(clean[0]))
    noisy = [clean[0] + noise, clean[1] + 0.5 * clean[0][: len(clean[1])]]
    names = []
    for stem, waves in (("clean", clean), ("noisy", noisy)):
        for index, wave in enumerate(waves):
            path = tmp_path / f"{stem}{index}.wav"
            sf.write(path, np.asarray(wave, dtype=np.float32), 16000, subtype="FLOAT")
            names.append(str(path))
    parity = REPO_ROOT / "tests" / "nemo_parity"
    _run_nemo(str(parity / "make_models.py"), str(tmp_path / "out"), *names[:2])  # NeMo's own NEST .nemo
    nemo_file = tmp_path / "out" / "nest.nemo"
    _run_nemo(
        str(parity / "nest_step.py"), str(nemo_file), str(tmp_path / "nemo_step.pt"), *names[:2], "--", *names[2:]
    )
    ref = torch.load(tmp_path / "nemo_step.pt", weights_only=True)

    no_dropout = [
        f"model.{k}=0.0"
        for k in ("hidden_dropout", "activation_dropout", "attention_dropout", "feat_proj_dropout", "dropout_positions")
    ]
    recipe = load_recipe(CONTINUE_NEST, [f"model.init_from={nemo_file}", "data.dither=0.0", *no_dropout])
    assert recipe.data.denoising_prob > 0  # the NEST setting: the loop's featurise takes the denoising path
    init = initialise(recipe, seed=0)
    assert "heads loaded: bestrq_head, bestrq_quantizer, masked_spec_embed; new: none" in init.report
    model = init.model.train()

    def read(paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        audio = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in paths]
        return torch.nn.utils.rnn.pad_sequence(audio, batch_first=True), torch.tensor([len(a) for a in audio])

    waveforms, lengths = read(names[:2])
    noisy_waveforms, _ = read(names[2:])
    batch = {"waveforms": waveforms, "waveform_lengths": lengths}
    mixed = loop.mix_for_denoising
    loop.mix_for_denoising = lambda *args, **kwargs: (noisy_waveforms, None)  # NeMo's noisy batch, not a new draw
    try:
        extractor = batch_extractor(init.feature_extractor)
        inputs = loop.featurise(batch, extractor, torch.device("cpu"), recipe, torch.Generator(), train=True)
    finally:
        loop.mix_for_denoising = mixed
    frames = ref["frame_mask"].shape[1]
    extra = frames - inputs["input_features"].shape[1]
    assert extra > 0
    inputs = {
        k: torch.nn.functional.pad(v, (0, 0, 0, extra) if v.dim() == 3 else (0, extra)) for k, v in inputs.items()
    }
    lengths = inputs["attention_mask"].sum(-1)
    assert torch.equal(lengths, ref["feature_lengths"])
    for ours, theirs in (("target_features", "features"), ("input_features", "noisy_features")):
        difference = max(float((inputs[ours][i, :n] - ref[theirs][i, :n]).abs().max()) for i, n in enumerate(lengths))
        assert difference <= 1e-4, (ours, difference)

    out = model(**inputs, mask_time_indices=ref["frame_mask"], step=0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    # NeMo freezes its mask embedding (RandomBlockMasking freeze: true): compare the gradients both sides have.
    grads = [p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None and n != "masked_spec_embed"]
    grad_norm = torch.cat(grads).norm()
    ours, theirs = float(out.loss.detach()), float(ref["loss"])
    print(
        f"first-step loss: ours {ours:.7f}, NeMo {theirs:.7f} (|diff| {abs(ours - theirs):.1e}); grad norm: ours "
        f"{float(grad_norm):.6f}, NeMo {float(ref['grad_norm']):.6f}; masked steps {int(out.token_mask.sum())}"
    )
    assert int(out.token_mask.sum()) == int(ref["masked_steps"]) > 0
    assert abs(ours - theirs) <= 1e-4
    assert abs(float(grad_norm) - float(ref["grad_norm"])) <= 1e-4 * float(ref["grad_norm"])
