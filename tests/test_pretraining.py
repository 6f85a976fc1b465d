"""Pretraining: the NEST denoising mix, ConformerSslForPreTraining objectives, and the k-means label script."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from support import make_tiny_config, write_speech_wav

from hf_ssl_speech.data.augment import mix_for_denoising
from hf_ssl_speech.errors import run_command
from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from hf_ssl_speech.masking import frame_to_token_mask, sample_negatives
from hf_ssl_speech.modeling_conformer_ssl import (
    ConformerSslForCTC,
    ConformerSslForPreTraining,
    ConformerSslModel,
)
from hf_ssl_speech.pretrain.kmeans import assign, fit_kmeans, make_kmeans_labels
from hf_ssl_speech.targets import stack_frames


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tones(batch: int, num_samples: int, lengths: torch.Tensor) -> torch.Tensor:
    t = torch.arange(num_samples) / 16000
    freqs = 200.0 + 100.0 * torch.arange(batch)[:, None]
    wave = 0.3 * torch.sin(2 * math.pi * freqs * t)
    return wave * (torch.arange(num_samples)[None, :] < lengths[:, None])


def _snr_db(clean: torch.Tensor, noisy: torch.Tensor, n: int) -> float:
    added = noisy[:n] - clean[:n]
    return 10 * math.log10(clean[:n].pow(2).mean().item() / added.pow(2).mean().item())


def test_denoising_mix_hits_the_drawn_snr_ranges_and_keeps_padding_zero():
    batch, num_samples = 64, 4000
    lengths = torch.randint(1000, num_samples + 1, (batch,), generator=_gen(0))
    clean = _tones(batch, num_samples, lengths)
    noisy, kind = mix_for_denoising(clean, lengths, prob=0.5, generator=_gen(1))
    assert noisy.shape == clean.shape
    assert set(kind.unique().tolist()) == {0, 1, 2}
    # about half corrupted: Binomial(64, 0.5) lies in [16, 48] with probability > 0.9999
    assert 16 <= (kind > 0).sum().item() <= 48
    padding = torch.arange(num_samples)[None, :] >= lengths[:, None]
    assert noisy[padding].eq(0).all()
    for b in range(batch):
        n = int(lengths[b])
        if kind[b] == 0:
            assert torch.equal(noisy[b], clean[b])
            continue
        snr = _snr_db(clean[b], noisy[b], n)
        low, high = (-5.0, 20.0) if kind[b] == 1 else (-5.0, 5.0)
        assert low - 0.01 <= snr <= high + 0.01, (b, int(kind[b]), snr)
    # same seed, same mix
    again, _ = mix_for_denoising(clean, lengths, prob=0.5, generator=_gen(1))
    assert torch.equal(again, noisy)


def test_denoising_mixes_another_utterance_of_the_batch():
    batch, num_samples = 4, 1600
    lengths = torch.full((batch,), num_samples)
    clean = _tones(batch, num_samples, lengths)
    noisy, kind = mix_for_denoising(clean, lengths, prob=1.0, noise_ratio=0.0, generator=_gen(2))
    assert kind.eq(2).all()
    for b in range(batch):
        added = noisy[b] - clean[b]
        # the added signal is a scaled copy of exactly one other utterance
        matches = [c for c in range(batch) if c != b and abs(_cosine(added, clean[c]) - 1) < 1e-4]
        assert len(matches) == 1
    # a batch of one falls back to noise
    single, kind = mix_for_denoising(clean[:1], lengths[:1], prob=1.0, noise_ratio=0.0, generator=_gen(3))
    assert kind.tolist() == [1] and not torch.equal(single, clean[:1])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


# ----------------------------------------------------------------------------------------------- the model


NO_DROPOUT = {"hidden_dropout": 0.0, "activation_dropout": 0.0, "attention_dropout": 0.0, "feat_proj_dropout": 0.0}
# Span masks of 8 frames (2 tokens of 4 frames) at p = 0.04: about a third of the frames, a few dozen tokens.
MASKING = {"mask_strategy": "span", "mask_time_prob": 0.04, "mask_time_length": 8}
ALL_MASKED = {"contrastive": {}, "mlm": {}, "bestrq": {}, "hubert": {}, "reconstruction": {}}


def _config(objectives: dict, **overrides):
    return make_tiny_config(objectives=objectives, **{**NO_DROPOUT, **MASKING, **overrides})


@pytest.fixture(scope="module")
def audio_batch(tmp_path_factory):
    """Three real WAV files (1.0, 1.6 and 2.0 s) read back and featurised: features, attention mask, labels."""
    folder = tmp_path_factory.mktemp("ssl_audio")
    paths = [write_speech_wav(folder / f"utt{i}.wav", seconds, seed=i) for i, seconds in enumerate([1.0, 1.6, 2.0])]
    audio = [sf.read(path, dtype="float32")[0] for path in paths]
    extractor = ConformerSslFeatureExtractor(feature_size=16)
    batch = extractor(audio, sampling_rate=16000, return_tensors="pt")
    features, attention_mask = batch["input_features"], batch["attention_mask"]
    # HuBERT-style frame labels that are a function of the audio: the best of 10 fixed projections per frame.
    projections = torch.randn(16, 10, generator=_gen(0))
    frame_labels = (features @ projections).argmax(-1).masked_fill(attention_mask == 0, -100)
    return {
        "features": features,
        "attention_mask": attention_mask,
        "frame_labels": frame_labels,
        "paths": paths,
        "folder": folder,
    }


def _forward(model, batch, **kwargs):
    return model(batch["features"], batch["attention_mask"], frame_labels=batch["frame_labels"], **kwargs)


RECIPES = {
    "contrastive": ({"contrastive": {}}, {}),
    "contrastive_projected": ({"contrastive": {}}, {"contrastive_target": "projected"}),
    "mlm": ({"mlm": {}}, {}),
    "bestrq": ({"bestrq": {}}, {"bestrq_num_codebooks": 2}),
    "hubert": ({"hubert": {"layer": 1}}, {}),
    "reconstruction": ({"reconstruction": {}}, {"reconstruction_loss": "l2", "mask_fill": "noise"}),
    "apc": ({"apc": {}}, {"causal": True}),
    "cpc": ({"cpc": {}}, {"causal": True}),
    "mixed": ({"contrastive": {}, "mlm": {"weight": 0.5}, "bestrq": {}, "reconstruction": {"weight": 0.5}}, {}),
    "mixed_causal_scheduled": ({"bestrq": {}, "apc": {"weight": 0.5, "start_step": 5}}, {"causal": True}),
    "bestrq_input_layer_norm": ({"bestrq": {}}, {"bestrq_num_codebooks": 2, "bestrq_input_layer_norm": True}),
    # EMA-teacher objectives: the teacher follows the student after every step (update_teacher below).
    "data2vec": ({"data2vec": {"top_k_layers": 2, "decoder_dim": 32, "decoder_groups": 4}}, {"clone_batch": 2}),
    "dinosr": ({"dinosr": {"top_k_layers": 2, "codebook_size": 16}}, {}),
    # w2v-BERT: contrastive on a lower block, MLM on the same quantizer's ids at the top.
    "w2v_bert": (
        {"contrastive": {"layer": 1}, "mlm": {}},
        {"num_codevector_groups": 1, "num_codevectors_per_group": 16},
    ),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_objective_overfits_one_fixed_batch(audio_batch, recipe):
    """Each objective alone and mixed: 50 AdamW steps on one batch of real audio (fixed masks) cut the loss by 30%."""
    objectives, overrides = RECIPES[recipe]
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(_config(objectives, **overrides)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A single objective is judged on its own loss (contrastive's total also holds the diversity penalty);
    # a mixture on the total, which changes definition at a start step, so it is compared from there on.
    name = next(iter(objectives)) if len(objectives) == 1 else None
    first_full_step = max(spec.get("start_step", 0) for spec in objectives.values())
    history = []
    for step in range(50):
        out = _forward(model, audio_batch, generator=_gen(0), step=step, gumbel_temperature=2.0)
        assert torch.isfinite(out.loss)
        if step >= first_full_step:
            history.append(out.objective_losses[name].item() if name else out.loss.item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_teacher(0.99, out.teacher_statistics)  # a no-op without an EMA teacher
    assert set(out.loss_sums) >= set(objectives)
    assert min(history[-5:]) <= 0.7 * history[0], (recipe, history[0], history[-5:])


def test_explicit_masks_and_negatives_are_deterministic_and_used(audio_batch):
    model = ConformerSslForPreTraining(_config({"contrastive": {}, "bestrq": {}, "hubert": {}})).eval()
    features, attention_mask = audio_batch["features"], audio_batch["attention_mask"]
    frame_mask = torch.zeros(features.shape[:2], dtype=torch.bool)
    frame_mask[:, 20:60] = True
    frame_mask[2, 120:160] = True
    lengths = attention_mask.sum(-1)
    token_mask = frame_to_token_mask(frame_mask, lengths, 4, model.config.mask_token_threshold)
    negatives, valid = sample_negatives(token_mask, model.config.num_negatives, _gen(3))
    explicit = negatives.masked_fill(~valid, -1)
    outs = [
        _forward(
            model, audio_batch, mask_time_indices=frame_mask, sampled_negative_indices=explicit, generator=_gen(seed)
        )
        for seed in (1, 2)
    ]
    for name in ("contrastive", "bestrq", "hubert"):
        assert torch.equal(outs[0].loss_sums[name], outs[1].loss_sums[name]), name
    assert torch.equal(outs[0].mask_time_indices.bool(), frame_mask)
    assert torch.equal(outs[0].token_mask.bool(), token_mask)
    assert outs[0].loss_counts["bestrq"].item() == token_mask.sum().item() * 1  # one codebook
    # drawn masks: same generator seed -> same masks and losses (fixed validation), another seed differs
    a = _forward(model, audio_batch, generator=_gen(5))
    b = _forward(model, audio_batch, generator=_gen(5))
    c = _forward(model, audio_batch, generator=_gen(6))
    assert torch.equal(a.mask_time_indices, b.mask_time_indices) and torch.equal(a.loss, b.loss)
    assert not torch.equal(a.mask_time_indices, c.mask_time_indices)
    # eval without a generator: a fixed seed, so validation losses are comparable between evaluations
    first, second = _forward(model, audio_batch), _forward(model, audio_batch)
    assert torch.equal(first.mask_time_indices, second.mask_time_indices) and torch.equal(first.loss, second.loss)
    model.train()
    assert not torch.equal(
        _forward(model, audio_batch).mask_time_indices, _forward(model, audio_batch).mask_time_indices
    )
    model.eval()
    # padding frames are never masked, even when the explicit mask says so
    everything = torch.ones_like(frame_mask)
    out = _forward(model, audio_batch, mask_time_indices=everything)
    assert torch.equal(out.mask_time_indices, attention_mask)


def test_gradients_reach_subsampling_and_mask_embedding(audio_batch):
    model = ConformerSslForPreTraining(_config({"bestrq": {}, "reconstruction": {}})).train()
    out = _forward(model, audio_batch, generator=_gen(0))
    out.loss.backward()
    first_conv = model.conformer.subsampling.layers[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert model.masked_spec_embed.grad is not None and model.masked_spec_embed.grad.abs().sum() > 0
    assert all(b.grad is None for b in model.bestrq_quantizer.buffers())


def test_targets_come_from_target_features_for_denoising(audio_batch):
    model = ConformerSslForPreTraining(_config({"reconstruction": {}})).eval()
    features, attention_mask = audio_batch["features"], audio_batch["attention_mask"]
    noisy = features + 0.5 * torch.randn(features.shape, generator=_gen(7)) * attention_mask[..., None]
    frame_mask = torch.zeros(features.shape[:2], dtype=torch.bool)
    frame_mask[:, 8:48] = True
    out = model(
        noisy, attention_mask, mask_time_indices=frame_mask, target_features=features, output_hidden_states=True
    )
    # recompute: the head reads the encoder of the noisy input, the target is the clean stacked input
    stacked, _ = stack_frames(features, attention_mask.sum(-1), 4)
    token_mask = out.token_mask.bool()
    predictions = model.reconstruction_head(out.hidden_states[-1])[token_mask]
    want = (predictions - stacked[token_mask]).abs().sum()
    assert torch.allclose(out.loss_sums["reconstruction"], want, rtol=1e-5)
    noisy_targets = model(noisy, attention_mask, mask_time_indices=frame_mask)
    assert not torch.allclose(noisy_targets.loss_sums["reconstruction"], want)


def test_start_steps_switch_objectives_on(audio_batch):
    model = ConformerSslForPreTraining(_config({"bestrq": {}, "reconstruction": {"start_step": 10}}))
    early = _forward(model, audio_batch, step=9, generator=_gen(0))
    late = _forward(model, audio_batch, step=10, generator=_gen(0))
    assert set(early.loss_sums) == {"bestrq"} and set(late.loss_sums) == {"bestrq", "reconstruction"}
    everything = _forward(model, audio_batch, generator=_gen(0))  # step=None: all objectives
    assert set(everything.loss_sums) == {"bestrq", "reconstruction"}
    waiting = ConformerSslForPreTraining(_config({"bestrq": {"start_step": 5}}))
    out = _forward(waiting, audio_batch, step=0)
    assert out.loss.item() == 0 and out.loss.requires_grad and out.loss_sums == {}


def test_losses_are_float32_under_bf16_autocast(audio_batch):
    model = ConformerSslForPreTraining(_config({"contrastive": {}, "mlm": {}, "bestrq": {}})).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _forward(model, audio_batch, generator=_gen(0))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(v.dtype == torch.float32 for v in out.loss_sums.values())
    out.loss.backward()


def test_batched_sums_equal_per_utterance_sums_and_global_normalisation(audio_batch):
    """Padding invariance with fixed masks/negatives: batch sums = sums over utterances run alone (eval mode),
    and combining per-"process" sums with the global counts gives the batch's loss."""
    objectives = {"contrastive": {}, "mlm": {}, "bestrq": {}, "hubert": {}, "reconstruction": {}}
    model = ConformerSslForPreTraining(_config(objectives)).eval()
    features, attention_mask = audio_batch["features"], audio_batch["attention_mask"]
    lengths = attention_mask.sum(-1)
    frame_mask = torch.zeros(features.shape[:2], dtype=torch.bool)
    frame_mask[:, 10:50] = True
    frame_mask[1:, 100:140] = True
    token_mask = frame_to_token_mask(frame_mask, lengths, 4, model.config.mask_token_threshold)
    negatives, valid = sample_negatives(token_mask, model.config.num_negatives, _gen(1))
    explicit = negatives.masked_fill(~valid, -1)
    batched = model(
        features,
        attention_mask,
        mask_time_indices=frame_mask,
        sampled_negative_indices=explicit,
        frame_labels=audio_batch["frame_labels"],
    )
    names = [n for n in batched.loss_sums if n != "diversity"]  # diversity is a batch-level marginal
    parts = []
    for b in range(3):
        n, steps = int(lengths[b]), int((lengths[b] + 3) // 4)
        parts.append(
            model(
                features[b : b + 1, :n],
                attention_mask[b : b + 1, :n],
                mask_time_indices=frame_mask[b : b + 1, :n],
                sampled_negative_indices=explicit[b : b + 1, :steps],
                frame_labels=audio_batch["frame_labels"][b : b + 1, :n],
            )
        )
    for name in names:
        total = sum(p.loss_sums[name] for p in parts)
        assert torch.allclose(batched.loss_sums[name], total, rtol=1e-4), name
        assert batched.loss_counts[name] == sum(p.loss_counts[name] for p in parts), name
    # "processes" holding utterances {0} and {1, 2}: global counts, scale = world size, mean of the two
    counts = {n: parts[0].loss_counts[n] + parts[1].loss_counts[n] + parts[2].loss_counts[n] for n in names}
    weights = {n: batched.loss_weights[n] for n in names}
    rank0 = model.combine_losses({n: parts[0].loss_sums[n] for n in names}, counts, weights, scale=2)
    rank1 = model.combine_losses(
        {n: parts[1].loss_sums[n] + parts[2].loss_sums[n] for n in names}, counts, weights, scale=2
    )
    whole = model.combine_losses({n: batched.loss_sums[n] for n in names}, batched.loss_counts, weights)
    assert torch.allclose((rank0 + rank1) / 2, whole, rtol=1e-4)


def test_save_and_load_keeps_frozen_quantizer_and_ctc_takes_the_encoder(audio_batch, tmp_path):
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(_config({"contrastive": {}, "bestrq": {}}, bestrq_num_codebooks=2)).train()
    projection = model.bestrq_quantizer.projection.clone()
    codebooks = model.bestrq_quantizer.codebooks.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):  # training never changes the frozen random-projection quantizer
        out = _forward(model, audio_batch, generator=_gen(0))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert torch.equal(model.bestrq_quantizer.projection, projection)
    assert torch.equal(model.bestrq_quantizer.codebooks, codebooks)
    model.save_pretrained(tmp_path)

    loaded = ConformerSslForPreTraining.from_pretrained(tmp_path).eval()
    assert loaded.bestrq_quantizer.codebooks.dtype == torch.float32
    assert torch.equal(loaded.bestrq_quantizer.projection, projection)
    assert torch.equal(loaded.bestrq_quantizer.codebooks, codebooks)
    model.eval()
    frame_mask = torch.zeros(audio_batch["features"].shape[:2], dtype=torch.bool)
    frame_mask[:, 16:56] = True
    with torch.no_grad():
        before = _forward(model, audio_batch, mask_time_indices=frame_mask, generator=_gen(1))
        after = _forward(loaded, audio_batch, mask_time_indices=frame_mask, generator=_gen(1))
    for name in before.loss_sums:
        assert torch.allclose(before.loss_sums[name], after.loss_sums[name], rtol=1e-5, atol=1e-6), name

    # loaded in bf16, the frozen codebooks stay float32 (and the rest follows the requested dtype)
    half = ConformerSslForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.bestrq_quantizer.codebooks.dtype == torch.float32
    assert torch.equal(half.bestrq_quantizer.codebooks, codebooks)
    assert half.conformer.subsampling.linear.weight.dtype == torch.bfloat16

    # fine-tuning starts from the pretrained encoder: every encoder tensor is transferred
    ctc = ConformerSslForCTC.from_pretrained(tmp_path, vocab_size=12)
    pretrained = model.conformer.state_dict()
    for key, value in ctc.conformer.state_dict().items():
        assert torch.equal(value, pretrained[key]), key
    base = ConformerSslModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = base(audio_batch["features"], audio_batch["attention_mask"]).last_hidden_state
        b = model.conformer(audio_batch["features"], audio_batch["attention_mask"]).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6)


def test_hubert_needs_frame_labels_and_apc_needs_causal(audio_batch):
    model = ConformerSslForPreTraining(_config({"hubert": {}}))
    with pytest.raises(ValueError, match="frame_labels"):
        model(audio_batch["features"], audio_batch["attention_mask"])
    with pytest.raises(ValueError, match="causal"):
        _config({"apc": {}})


# ----------------------------------------------------------------------------------------------- k-means labels


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    g = _gen(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.randint(0, 4, (400,), generator=g)
    points = centres[truth] + 0.5 * torch.randn(400, 2, generator=g)
    centroids, inertia = fit_kmeans(points, 4, iterations=10, seed=3)
    labels = assign(points, centroids)
    # each true cluster maps to exactly one k-means cluster (a permutation)
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 4 and len({p[1] for p in pairs}) == 4
    assert inertia < 0.6  # 2-D N(0, 0.25) noise: mean squared distance 0.5
    again, _ = fit_kmeans(points, 4, iterations=10, seed=3)
    assert torch.equal(again, centroids)
    with pytest.raises(ValueError, match="num_clusters"):
        fit_kmeans(points[:3], 4)


def test_make_kmeans_labels_writes_frame_labels_the_data_pipeline_and_hubert_use(audio_batch, tmp_path):
    from hf_ssl_speech.data import ManifestSource

    checkpoint = tmp_path / "ckpt"
    ConformerSslForPreTraining(_config({"bestrq": {}})).save_pretrained(checkpoint)
    manifest = tmp_path / "in" / "train.jsonl"
    manifest.parent.mkdir()
    lines = [{"audio_filepath": str(p), "duration": sf.info(p).duration} for p in audio_batch["paths"]]
    lines.append({"audio_filepath": "missing.wav", "duration": 1.0})  # a bad row is skipped and counted
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out_dir = tmp_path / "labels"
    summary = make_kmeans_labels(checkpoint, manifest, out_dir, layer=1, num_clusters=5, iterations=4)
    assert summary["labelled"] == 3 and sum(summary["skipped"].values()) == 1
    assert 1 <= summary["clusters_used"] <= 5
    source = ManifestSource(out_dir / "manifest.jsonl")
    assert len(source) == 3
    rows = []
    for i in range(3):
        raw = source.raw(i)
        labels = np.load(raw.frame_labels)
        frames = sf.info(raw.audio).frames // 160
        assert labels.dtype == np.int64 and labels.shape == (frames,)
        assert labels.min() >= 0 and labels.max() < 5
        # constant over each encoder step's 4 frames
        full = labels[: frames // 4 * 4].reshape(-1, 4)
        assert (full == full[:, :1]).all()
        rows.append(torch.from_numpy(labels))
    # the labels drive the hubert objective
    padded = torch.full(audio_batch["features"].shape[:2], -100, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    model = ConformerSslForPreTraining(_config({"hubert": {}}, hubert_num_labels=5))
    out = model(audio_batch["features"], audio_batch["attention_mask"], frame_labels=padded, generator=_gen(0))
    assert torch.isfinite(out.loss) and out.loss_counts["hubert"] > 0


def test_make_kmeans_labels_command_names_a_missing_manifest(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "make_kmeans_labels", Path(__file__).parents[1] / "scripts" / "make_kmeans_labels.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [
        "--checkpoint",
        str(tmp_path),
        "--manifest",
        str(tmp_path / "absent.jsonl"),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert run_command(script.main, argv) == 2
    err = capsys.readouterr().err
    assert "--manifest" in err and "absent.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


_REMOTE_PRETRAINING = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_ssl_speech" or name.startswith("hf_ssl_speech."):
            raise ModuleNotFoundError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForPreTraining
folder, inputs_path, out_path = sys.argv[1:4]
model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
inputs = torch.load(inputs_path)
with torch.no_grad():
    out = model(inputs["features"], inputs["mask"], mask_time_indices=inputs["frame_mask"])
buffers = {name: value for name, value in model.named_buffers() if not name.startswith(("conformer.", "teacher."))}
torch.save({"sums": out.loss_sums, "buffers": buffers}, out_path)
print(json.dumps({"module": type(model).__module__}))
"""


@pytest.mark.parametrize(
    "objectives",
    [
        {"bestrq": {}, "reconstruction": {}},
        {"data2vec": {"top_k_layers": 2, "decoder_dim": 32, "decoder_groups": 4}, "dinosr": {"top_k_layers": 2}},
    ],
    ids=["bestrq", "ema_teacher"],
)
def test_pretraining_checkpoint_loads_with_trust_remote_code_without_the_package(audio_batch, tmp_path, objectives):
    """The saved folder carries modeling + masking/targets/losses code; it loads where hf_ssl_speech is absent,
    with its buffers (random-projection codebooks, DinoSR's trained codewords) intact and the teacher rebuilt."""
    import os
    import subprocess

    from transformers import AutoModelForPreTraining

    # What hf_ssl_speech/__init__.py does for the other heads (idempotent here).
    AutoModelForPreTraining.register(type(make_tiny_config()), ConformerSslForPreTraining, exist_ok=True)
    ConformerSslForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(_config(objectives)).train()
    if hasattr(model, "teacher"):  # move the codewords and the teacher away from their initial values
        out = _forward(model, audio_batch, generator=_gen(0))
        model.conformer.subsampling.linear.weight.data.mul_(1.5)  # the student moves; the teacher follows by EMA
        model.update_teacher(0.5, out.teacher_statistics)
    model.eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    for module in ("modeling_conformer_ssl", "masking", "targets", "losses", "configuration_conformer_ssl"):
        assert (folder / f"{module}.py").is_file(), module
    frame_mask = torch.zeros(audio_batch["features"].shape[:2], dtype=torch.bool)
    frame_mask[:, 12:52] = True
    inputs = {"features": audio_batch["features"], "mask": audio_batch["attention_mask"], "frame_mask": frame_mask}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_PRETRAINING, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "o.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["module"].startswith("transformers_modules.")
    remote = torch.load(tmp_path / "o.pt")
    buffers = {n: v for n, v in model.named_buffers() if not n.startswith(("conformer.", "teacher."))}
    assert remote["buffers"].keys() == buffers.keys() and buffers
    for name, value in buffers.items():
        assert torch.equal(remote["buffers"][name], value), name
    if hasattr(model, "teacher"):  # exported without the teacher: the loaded one restarts as the student
        model.reset_teacher()
    with torch.no_grad():
        local = model(inputs["features"], inputs["mask"], mask_time_indices=frame_mask)
    for name, value in local.loss_sums.items():
        torch.testing.assert_close(remote["sums"][name], value)
