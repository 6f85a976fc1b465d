"""`train.compile` (pretrain/compiling.py): the compiled encoder is the eager one (values, gradients, state_dict keys),
bucket padding changes nothing, an epoch of varied lengths compiles once, and the real command runs and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support import PRETRAIN_MODEL, REPO_ROOT, make_corpus, make_tiny_config, run_env, write_recipe

from hf_ssl_speech.configuration_conformer_ssl import ConformerSslConfig
from hf_ssl_speech.data import build_dataloader
from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining, ConformerSslModel
from hf_ssl_speech.pretrain.compiling import bucket_length, compile_encoders, pad_to_bucket
from hf_ssl_speech.pretrain.loop import featurise
from hf_ssl_speech.pretrain.recipe import RecipeError, recipe_from_dict

NO_DROPOUT = {"hidden_dropout": 0.0, "activation_dropout": 0.0, "attention_dropout": 0.0, "feat_proj_dropout": 0.0}


def _padded_batch(lengths: list[int], frames: int, mels: int = 16, seed: int = 0):
    """Features zero past each length (as the extractor makes them) and the matching attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), frames, mels, generator=generator)
    mask = (torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]).long()
    return features * mask[..., None], mask


def test_encoder_traces_as_one_graph_without_breaks():
    model = ConformerSslModel(make_tiny_config(**NO_DROPOUT)).train()
    features, mask = _padded_batch([96, 70, 41], 96)
    explained = torch._dynamo.explain(model)(features, attention_mask=mask, output_hidden_states=True)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_encoder_matches_eager_with_padding_inductor():
    """Inductor on CPU, eval mode, a batch of three lengths: every hidden state within 1e-4 on the real steps."""
    torch.manual_seed(0)
    model = ConformerSslModel(make_tiny_config(num_hidden_layers=1, **NO_DROPOUT)).eval()
    features, mask = _padded_batch([64, 45, 23], 64)
    with torch.no_grad():
        expected = model(features, attention_mask=mask, output_hidden_states=True)
        counter = compile_encoders(model)
        got = model(features, attention_mask=mask, output_hidden_states=True)
    valid = expected.attention_mask.bool()
    diffs = [(e - g)[valid].abs().max().item() for e, g in zip(expected.hidden_states, got.hidden_states)]
    print(f"compiled vs eager, max abs diff per hidden state: {diffs}; graphs compiled: {counter.graphs}")
    assert max(diffs) < 1e-4, diffs
    assert torch.equal(expected.output_lengths, got.output_lengths) and counter.graphs == 1
    assert got.hidden_states[-1][valid].abs().max() > 0.1  # a real output, not zeros on both sides


@pytest.mark.slow
def test_compiled_encoder_gradients_match_eager_inductor():
    """Training mode, padded batch, inductor: every gradient within 1e-4 of its largest entry. Left out: the two
    parameters whose gradient is zero in exact arithmetic (the depthwise-conv bias right before BatchNorm, the key
    bias under softmax): both sides hold rounding noise there (~1e-7 of the largest gradient), which differs."""
    torch.manual_seed(0)
    eager = ConformerSslModel(make_tiny_config(num_hidden_layers=1, **NO_DROPOUT)).train()
    compiled = ConformerSslModel(eager.config).train()
    compiled.load_state_dict(eager.state_dict())
    counter = compile_encoders(compiled)
    features, mask = _padded_batch([64, 45, 23], 64)
    weights = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1)) * mask[:, ::4, None]  # real steps
    for model in (eager, compiled):
        (model(features, attention_mask=mask).last_hidden_state * weights).sum().backward()
    largest = max(p.grad.abs().max().item() for p in eager.parameters())
    errors = {
        name: ((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp(min=1e-12)).item()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters())
    }
    zero_gradient = [n for n in errors if n.endswith(("depthwise_conv.bias", "k_proj.bias"))]
    assert all(eager.get_parameter(n).grad.abs().max() < 1e-5 * largest for n in zero_gradient)
    worst = max(v for n, v in errors.items() if n not in zero_gradient)
    print(f"compiled vs eager gradients, max diff relative to each gradient's largest entry: {worst:.2e}")
    assert worst < 1e-4 and counter.graphs >= 1 and len(errors) - len(zero_gradient) > 20


def test_bucket_padding_changes_nothing():
    """Eval mode (BatchNorm's running statistics): encoder outputs on real steps and the BEST-RQ loss with fixed
    masks are the same for the batch and for it padded to a multiple of 64 frames."""
    config = make_tiny_config(**NO_DROPOUT, objectives={"bestrq": {}})
    model = ConformerSslForPreTraining(config).eval()
    features, mask = _padded_batch([90, 77, 50], 90)
    inputs = {"input_features": features, "attention_mask": mask, "frame_labels": torch.zeros(3, 85).long()}
    padded = pad_to_bucket(inputs, 64)
    assert padded["input_features"].shape[1] == padded["attention_mask"].shape[1] == 128 == bucket_length(90, 64)
    assert (padded["frame_labels"][:, 85:] == -100).all() and padded["attention_mask"][:, 90:].sum() == 0
    assert pad_to_bucket(padded, 64) is padded
    frame_mask = torch.zeros(3, 90, dtype=torch.bool)
    frame_mask[:, 8:40] = True
    with torch.no_grad():
        plain = model.conformer(features, attention_mask=mask)
        longer = model.conformer(padded["input_features"], attention_mask=padded["attention_mask"])
        steps = plain.last_hidden_state.shape[1]
        valid = plain.attention_mask.bool()
        diff = (plain.last_hidden_state - longer.last_hidden_state[:, :steps])[valid].abs().max().item()
        loss = model(features, attention_mask=mask, mask_time_indices=frame_mask).loss
        padded_mask = torch.nn.functional.pad(frame_mask, (0, 128 - 90))
        padded_loss = model(
            padded["input_features"], attention_mask=padded["attention_mask"], mask_time_indices=padded_mask
        ).loss
    print(f"bucket padding: max abs diff of the encoder output {diff:.2e}, loss {loss.item():.6f} vs {padded_loss:.6f}")
    assert diff < 1e-5
    assert abs(loss.item() - padded_loss.item()) < 1e-5


def test_compiled_model_keeps_its_state_dict_keys(tmp_path):
    model = ConformerSslForPreTraining(
        make_tiny_config(objectives={"data2vec": {"top_k_layers": 2}})
    )  # student, EMA teacher
    keys = list(model.state_dict())
    compile_encoders(model, backend="eager")
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    model.save_pretrained(tmp_path / "model")
    reloaded = ConformerSslForPreTraining.from_pretrained(tmp_path / "model")
    assert reloaded.conformer.state_dict().keys() == model.conformer.state_dict().keys()


def _recipe(manifest, **train):
    return recipe_from_dict(
        {
            "model": {**PRETRAIN_MODEL, "num_hidden_layers": 1},
            "objectives": {"bestrq": {}},
            "data": {"train_manifests": [str(manifest)], "batch_seconds": 3.0, "min_duration": 0.5},
            "train": {"compile": True, **train},
        }
    )


def test_recompiles_over_an_epoch_of_varied_lengths(tmp_path):
    """A real epoch of the data loader (varied lengths and batch sizes), the training graph forward + backward:
    traced by dynamo and compiled by the counting backend ("aot_eager": the same graphs inductor would get, without
    code generation). Dynamic shapes: one compilation for the whole epoch."""
    manifest = make_corpus(tmp_path / "corpus", count=18, seconds=0.8, vary=True)
    recipe = _recipe(manifest)
    config = ConformerSslConfig(**recipe.model, objectives=recipe.objectives)
    model = ConformerSslForPreTraining(config).train()
    counter = compile_encoders(model, backend="aot_eager")
    extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins)
    loader = build_dataloader(
        recipe.data.train_manifests, None, **recipe.data.loader_config(), num_workers=0, return_waveforms=True
    )
    generator = torch.Generator().manual_seed(0)
    shapes = []
    for batch in loader:
        inputs = featurise(batch, extractor, torch.device("cpu"), recipe, generator, train=True)
        shapes.append(tuple(inputs["input_features"].shape[:2]))
        model(**inputs, step=0, generator=generator).loss.backward()
    distinct = len(set(shapes))
    print(
        f"epoch: {len(shapes)} batches, {distinct} distinct (batch, frames) shapes {sorted(set(shapes))}, "
        f"graphs compiled {counter.graphs}, recompiles {counter.recompiles}"
    )
    assert all(frames % recipe.train.compile_bucket_frames == 0 for _, frames in shapes)
    assert distinct >= 3 and len(shapes) >= 4  # the epoch really varies
    assert counter.graphs == 1 and counter.recompiles == 0


def test_compile_fields_are_validated():
    with pytest.raises(RecipeError, match=r"train\.compile_mode.*fastest.*one of"):
        recipe_from_dict({"objectives": {"bestrq": {}}, "train": {"compile_mode": "fastest"}})
    with pytest.raises(RecipeError, match=r"train\.compile_bucket_frames.*12.*multiple of model\.subsampling_factor=8"):
        recipe_from_dict(
            {"model": {"subsampling_factor": 8}, "objectives": {"bestrq": {}}, "train": {"compile_bucket_frames": 12}}
        )
    assert recipe_from_dict({"objectives": {"bestrq": {}}}).train.compile is False


@pytest.mark.slow
def test_pretrain_command_with_compile_logs_recompiles_and_resumes(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=8, seconds=1.0, vary=True)

    def run(steps: int, *extra: str) -> subprocess.CompletedProcess:
        recipe = write_recipe(
            tmp_path / "compile.yaml",
            model={"num_hidden_layers": 1, "bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
            objectives={"bestrq": {}},
            data={"train_manifests": [str(manifest)], "batch_seconds": 3.0},
            optim={},
            train={"max_steps": steps, "save_steps": 3, "output_dir": "run", "compile": True},
        )
        return subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "pretrain.py"), "--config", str(recipe), "--no_progress"]
            + list(extra),
            cwd=tmp_path,
            # this checkout first, whichever hf_ssl_speech the environment has installed
            env={**run_env(tmp_path), "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"},
            capture_output=True,
            text=True,
            timeout=900,
        )

    first = run(3)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-00000003"
    rows = [
        r
        for r in json.loads((checkpoint / "trainer_state.json").read_text())["metrics"]["history"]
        if "train/loss" in r
    ]
    print(
        "train/compile_graphs, compile_recompiles per step:",
        [(r["train/compile_graphs"], r["train/compile_recompiles"]) for r in rows],
    )
    assert len(rows) == 3 and all(r["train/compile_graphs"] >= 1 for r in rows)
    assert rows[-1]["train/compile_recompiles"] <= 1  # over 3 batches of varied lengths
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model" / "model.safetensors")
    accelerate_state = load_file(checkpoint / "accelerate" / "model.safetensors")
    assert not any("_orig_mod" in key for key in list(saved) + list(accelerate_state))
    resumed = run(6, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-00000006" / "trainer_state.json").is_file()
