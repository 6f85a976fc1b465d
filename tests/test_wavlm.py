"""WavLM-style pretraining: utterance mixing, the position types (gated relative bias, rotary), the tiny recipe."""

from __future__ import annotations

import math

import pytest
import soundfile as sf
import torch
from support import REPO_ROOT, make_tiny_config, write_speech_wav

from hf_ssl_speech.data.augment import mix_for_denoising
from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from hf_ssl_speech.modeling_conformer_ssl import (
    ConformerSslForPreTraining,
    ConformerSslGatedRelPositionAttention,
    ConformerSslModel,
    ConformerSslRelPositionBias,
    ConformerSslRotaryEmbedding,
    rotate_half,
)
from hf_ssl_speech.pretrain.loop import featurise
from hf_ssl_speech.pretrain.recipe import DataSection, Recipe, RecipeError, load_recipe, model_config

POSITION_TYPES = ("rel_pos", "gated_rel_pos", "rotary")
TINY_WAVLM = REPO_ROOT / "configs" / "pretrain" / "tiny_wavlm.yaml"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- utterance mixing


def _speech_batch(batch: int, num_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded noise-like "speech" (no exact zeros inside an utterance) of random lengths, and the lengths."""
    generator = _gen(seed)
    lengths = torch.randint(num_samples // 4, num_samples + 1, (batch,), generator=generator)
    gains = torch.rand(batch, 1, generator=generator) * 0.5 + 0.05  # utterances of different loudness
    audio = torch.randn(batch, num_samples, generator=generator) * gains
    return audio * (torch.arange(num_samples)[None, :] < lengths[:, None]), lengths


def _overlay(clean: torch.Tensor, noisy: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(start, length, added samples) of the one contiguous overlay in an utterance."""
    changed = (noisy - clean).nonzero().flatten()
    start, end = int(changed[0]), int(changed[-1]) + 1
    return start, end - start, (noisy - clean)[start:end]


def test_wavlm_mix_overlays_one_segment_of_another_utterance_at_the_drawn_energy_ratio():
    batch, num_samples = 48, 3200
    clean, lengths = _speech_batch(batch, num_samples)
    before = clean.clone()
    noisy, kind = mix_for_denoising(clean, lengths, prob=1.0, noise_ratio=0.0, generator=_gen(1), segment_fraction=0.5)
    assert torch.equal(clean, before)  # the clean input (the targets' source) is not modified
    assert kind.eq(2).all()
    padding = torch.arange(num_samples)[None, :] >= lengths[:, None]
    assert noisy[padding].eq(0).all()
    ratios, fractions = [], []
    for b in range(batch):
        n = int(lengths[b])
        start, seg, added = _overlay(clean[b], noisy[b])
        assert 1 <= seg <= n // 2 and start + seg <= n, (b, start, seg, n)
        assert added.ne(0).all()  # one contiguous segment
        # WavLM's energy ratio: primary power over its valid samples / overlay power over the overlap.
        ratio = 10 * math.log10(clean[b, :n].pow(2).mean().item() / added.pow(2).mean().item())
        assert -5.0 - 1e-3 <= ratio <= 5.0 + 1e-3, (b, ratio)
        ratios.append(ratio)
        fractions.append(seg / n)
        # The overlay is a scaled, contiguous piece of exactly one other utterance, inside its valid samples.
        matches = []
        for c in range(batch):
            if c == b or int(lengths[c]) < seg:
                continue
            pieces = clean[c, : int(lengths[c])].unfold(0, seg, 1)  # (offsets, seg)
            cosine = torch.nn.functional.cosine_similarity(pieces, added[None, :], dim=1)
            if cosine.max() > 1 - 1e-5:
                matches.append(c)
        assert len(matches) == 1, (b, matches)
    # the draws spread over the ranges (uniform ratio, uniform segment length up to half)
    assert min(ratios) < -3.5 and max(ratios) > 3.5
    assert min(fractions) < 0.1 and max(fractions) > 0.4
    again, _ = mix_for_denoising(clean, lengths, prob=1.0, noise_ratio=0.0, generator=_gen(1), segment_fraction=0.5)
    assert torch.equal(again, noisy)  # the explicit generator makes the mix reproducible


def test_wavlm_mix_probability_and_noise_segments():
    clean, lengths = _speech_batch(50, 800, seed=3)
    generator = _gen(4)
    mixed = draws = 0
    for _ in range(200):
        noisy, kind = mix_for_denoising(
            clean, lengths, prob=0.2, noise_ratio=0.0, generator=generator, segment_fraction=0.5
        )
        assert kind.ne(1).all()  # noise_ratio=0: another utterance or nothing
        untouched = kind == 0
        assert torch.equal(noisy[untouched], clean[untouched])
        mixed += int((kind > 0).sum())
        draws += kind.numel()
    # 10,000 draws: the standard deviation of the rate is 0.004, so +-0.015 is about 3.7 sigma.
    assert abs(mixed / draws - 0.2) < 0.015, mixed / draws
    # a batch of one has no other utterance: it gets a noise segment in the noise SNR range
    one, kind = mix_for_denoising(clean[:1], lengths[:1], prob=1.0, generator=_gen(5), segment_fraction=0.5)
    assert kind.tolist() == [1]
    n = int(lengths[0])
    start, seg, added = _overlay(clean[0], one[0])
    assert seg <= n // 2 and start + seg <= n
    ratio = 10 * math.log10(clean[0, :n].pow(2).mean().item() / added.pow(2).mean().item())
    assert -5.0 - 1e-3 <= ratio <= 20.0 + 1e-3


def _waveform_batch(folder) -> dict[str, torch.Tensor]:
    """Three real WAVs (1.0, 1.6, 2.0 s) as the collator gives them, with frame labels that depend on the audio."""
    audio = [
        torch.from_numpy(sf.read(write_speech_wav(folder / f"u{i}.wav", s, seed=i), dtype="float32")[0])
        for i, s in enumerate([1.0, 1.6, 2.0])
    ]
    lengths = torch.tensor([len(a) for a in audio])
    waveforms = torch.zeros(len(audio), int(lengths.max()))
    for i, a in enumerate(audio):
        waveforms[i, : len(a)] = a
    features, frames = ConformerSslFeatureExtractor().extract_batch(waveforms, lengths)
    projections = torch.randn(features.shape[-1], 50, generator=_gen(0))
    labels = (features @ projections).argmax(-1)  # a function of the clean audio, like k-means ids
    labels = labels.masked_fill(torch.arange(features.shape[1])[None, :] >= frames[:, None], -100)
    return {"waveforms": waveforms, "waveform_lengths": lengths, "frame_labels": labels}


def test_featurise_mixes_the_input_only(tmp_path):
    """Targets (clean features) and frame labels belong to the primary utterance and are never mixed."""
    batch = _waveform_batch(tmp_path)
    before = {k: v.clone() for k, v in batch.items()}
    data = DataSection(denoising_prob=1.0, noise_ratio=0.0, mix_segment_fraction=0.5, dither=0.0)
    extractor = ConformerSslFeatureExtractor()
    inputs = featurise(batch, extractor, torch.device("cpu"), Recipe(data=data), _gen(0), train=True)
    clean, _ = extractor.extract_batch(batch["waveforms"], batch["waveform_lengths"])
    assert torch.equal(inputs["target_features"], clean)
    assert torch.equal(inputs["frame_labels"], batch["frame_labels"][:, : clean.shape[1]])
    assert all(torch.equal(batch[k], before[k]) for k in batch)
    valid = inputs["attention_mask"].bool()
    assert ((inputs["input_features"] - clean).abs().amax((1, 2)) > 1e-2).all()  # every utterance got an overlay
    assert inputs["input_features"][~valid].eq(0).all()  # padding stays zero
    evaluation = featurise(batch, extractor, torch.device("cpu"), Recipe(data=data), _gen(0), train=False)
    assert "target_features" not in evaluation and torch.equal(evaluation["input_features"], clean)


def test_recipe_checks_the_mixing_settings():
    base = {"objectives": {"hubert": {}}}
    with pytest.raises(RecipeError, match=r"data\.mix_segment_fraction.*0\.0.*WavLM: 0\.5"):
        load_recipe(base=base, overrides=["data.mix_segment_fraction=0.0"])
    with pytest.raises(RecipeError, match=r"data\.noise_ratio"):
        load_recipe(base=base, overrides=["data.noise_ratio=1.5"])
    recipe = load_recipe(TINY_WAVLM)
    assert (recipe.data.denoising_prob, recipe.data.mix_segment_fraction, recipe.data.noise_ratio) == (0.2, 0.5, 0.0)
    assert tuple(recipe.data.speech_snr_db) == (-5.0, 5.0)
    assert model_config(recipe).position_embeddings_type == "gated_rel_pos"


# ----------------------------------------------------------------------------------------------- gated relative bias


def _exact_bucket(relative: int, num_buckets: int, max_distance: int) -> int:
    """The bucket by counting log-spaced thresholds in exact integer arithmetic (no floating point):
    distance d >= E gets E + k for the largest k < half - E with E * (max_distance / E)^(k / (half - E)) <= d."""
    half = num_buckets // 2
    exact = half // 2
    steps = half - exact
    offset = half if relative > 0 else 0
    d = abs(relative)
    if d < exact:
        return offset + d
    k = 0
    # E (M/E)^((k+1)/n) <= d  <=>  M^(k+1) E^(n-k-1) <= d^n
    while k + 1 < steps and max_distance ** (k + 1) * exact ** (steps - k - 1) <= d**steps:
        k += 1
    return offset + exact + k


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(320, 800), (32, 128), (6, 5)])
def test_bucketing_matches_a_direct_computation(num_buckets, max_distance):
    relative = torch.arange(-2000, 2001)
    got = ConformerSslRelPositionBias.bucket(relative, num_buckets, max_distance)
    want = torch.tensor([_exact_bucket(int(r), num_buckets, max_distance) for r in relative])
    assert torch.equal(got, want)
    assert got.min() == 0 and got.max() == num_buckets - 1


def test_bucketing_and_gated_attention_match_transformers_wavlm():
    """Same function as transformers' WavLMAttention (gate and bucketed bias), with its weights converted."""
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    config = make_tiny_config(position_embeddings_type="gated_rel_pos", attention_dropout=0.0)
    hidden, heads, steps = config.hidden_size, config.num_attention_heads, 37
    torch.manual_seed(0)
    theirs = WavLMAttention(hidden, heads, num_buckets=320, max_distance=800).eval()
    with torch.no_grad():
        theirs.gru_rel_pos_const.uniform_(0.5, 1.5)  # not the initial 1, so w matters
        theirs.rel_attn_embed.weight.normal_()
    ours = ConformerSslGatedRelPositionAttention(config).eval()
    table = ConformerSslRelPositionBias(config)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())
        ours.o_proj.load_state_dict(theirs.out_proj.state_dict())
        # WavLM's Linear(d, 8) summed in fours == our Linear(d, 2)
        ours.gate_proj.weight.copy_(theirs.gru_rel_pos_linear.weight.view(2, 4, -1).sum(1))
        ours.gate_proj.bias.copy_(theirs.gru_rel_pos_linear.bias.view(2, 4).sum(1))
        ours.gate_scale.copy_(theirs.gru_rel_pos_const.flatten())
        table.relative_attention_bias.copy_(theirs.rel_attn_embed.weight)
    relative = torch.arange(-1500, 1501)
    assert torch.equal(table.bucket(relative, 320, 800), theirs._relative_positions_bucket(relative))
    x = torch.randn(2, steps, hidden, generator=_gen(1))
    with torch.no_grad():
        want = theirs(x)[0]
        got, _ = ours(x, table(steps, x.dtype), None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _manual_attention(module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v and the output projection, written out."""
    q, k, v = module.project(x)
    scores = q @ k.transpose(-1, -2) / math.sqrt(module.head_dim)
    if bias is not None:
        scores = scores + bias
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    return module.o_proj(context)


def test_gate_identities():
    config = make_tiny_config(position_embeddings_type="gated_rel_pos", attention_dropout=0.0)
    model = ConformerSslModel(config).eval()
    attention = model.layers[0].self_attn
    table = model.position_encoding(21, torch.float32)  # (H, T', T')
    x = torch.randn(2, 21, config.hidden_size, generator=_gen(2))
    with torch.no_grad():
        # At initialisation (w = 1) the gate g_a (g_b - 1) + 2 lies in (1, 2).
        gate = attention.gate(x)
        assert gate.shape == (2, config.num_attention_heads, 21, 1)
        assert gate.min() > 1.0 and gate.max() < 2.0
        # g_a = 1, g_b = 0 gives gate 1: the plain (ungated) T5 bias, added to the scores.
        attention.gate_proj.weight.zero_()
        attention.gate_proj.bias.copy_(torch.tensor([40.0, -40.0]))
        torch.testing.assert_close(attention.gate(x), torch.ones_like(gate))
        torch.testing.assert_close(attention(x, table, None)[0], _manual_attention(attention, x, table))
        # g_a = 0 gives gate 2 whatever g_b and w: twice the bias.
        attention.gate_proj.bias.copy_(torch.tensor([-40.0, 3.0]))
        attention.gate_scale.fill_(7.0)
        torch.testing.assert_close(attention(x, table, None)[0], _manual_attention(attention, x, 2 * table))
        # A zero table is plain attention whatever the gate.
        attention.gate_proj.weight.normal_()
        zero = torch.zeros_like(table)
        torch.testing.assert_close(attention(x, zero, None)[0], _manual_attention(attention, x, None))


def test_rotary_scores_depend_on_the_distance_only():
    config = make_tiny_config(position_embeddings_type="rotary")
    cos, sin = ConformerSslRotaryEmbedding(config)(64, torch.float32)  # (T', d) each
    q, k = torch.randn(2, cos.shape[-1], generator=_gen(3))

    def rotated(v: torch.Tensor, t: int) -> torch.Tensor:
        return v * cos[t] + rotate_half(v) * sin[t]

    for i, j, shift in [(3, 10, 20), (40, 2, 13), (5, 5, 50)]:
        torch.testing.assert_close(rotated(q, i) @ rotated(k, j), rotated(q, i + shift) @ rotated(k, j + shift))
    torch.testing.assert_close(rotated(q, 0), q)  # position 0 is not rotated
    torch.testing.assert_close(rotated(q, 17).norm(), q.norm())  # a rotation


# ----------------------------------------------------------------------------------------------- every position type


def _features(lengths: list[int], num_mel_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    frames = max(lengths)
    features = torch.randn(len(lengths), frames, num_mel_bins, generator=_gen(0))
    attention_mask = (torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]).long()
    return features * attention_mask[..., None], attention_mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("position_type", POSITION_TYPES)
def test_padding_invariance_per_position_type(position_type, causal):
    """Outputs at real frames do not change when padding is appended (eval mode), for SDPA and eager."""
    model = ConformerSslModel(make_tiny_config(position_embeddings_type=position_type, causal=causal)).eval()
    with torch.no_grad():  # non-trivial biases and BatchNorm statistics, so every term matters
        for name, param in model.named_parameters():
            if name.endswith(("bias_u", "bias_v", "gate_proj.bias")):
                param.normal_(0.0, 0.5)
            if name.endswith("relative_attention_bias"):
                param.normal_(0.0, 1.0)
    lengths = [123, 80, 37, 9]
    features, attention_mask = _features(lengths, model.config.num_mel_bins)
    with torch.no_grad():
        batched = model(features, attention_mask=attention_mask, output_hidden_states=True)
        eager = model(features, attention_mask=attention_mask, output_attentions=True)
        padded_more = model(
            torch.cat([features, torch.randn(4, 24, features.shape[-1])], 1),  # garbage in the new padding
            attention_mask=torch.cat([attention_mask, torch.zeros(4, 24, dtype=torch.long)], 1),
        )
        for i, length in enumerate(lengths):
            alone = model(features[i : i + 1, :length], output_hidden_states=True)
            steps = int(batched.output_lengths[i])
            for layer, (b, a) in enumerate(zip(batched.hidden_states, alone.hidden_states)):
                diff = (b[i, :steps] - a[0]).abs().max().item()
                assert diff <= 1e-4, f"{position_type} utterance {i} layer {layer}: {diff}"
            more = (padded_more.last_hidden_state[i, :steps] - batched.last_hidden_state[i, :steps]).abs().max()
            assert more <= 1e-4
    assert (eager.last_hidden_state - batched.last_hidden_state).abs().max() < 1e-5
    weights = eager.attentions[0]  # (B, H, T', T')
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert weights[3, :, :, int(batched.output_lengths[3]) :].abs().max() < 1e-6  # no query sees padding


@pytest.mark.parametrize("position_type", POSITION_TYPES)
def test_position_types_train_and_checkpoint(position_type):
    """Gradients reach every attention parameter, and activation checkpointing gives the same gradients."""
    config = make_tiny_config(
        position_embeddings_type=position_type,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
    )
    features, attention_mask = _features([64, 40], config.num_mel_bins)
    torch.manual_seed(0)
    model = ConformerSslModel(config).train()
    model(features, attention_mask=attention_mask).last_hidden_state.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads.items():
        if "self_attn" in name or "position_encoding" in name:
            assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(features, attention_mask=attention_mask).last_hidden_state.pow(2).mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gated_parameters_init_and_weight_decay():
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(
        make_tiny_config(position_embeddings_type="gated_rel_pos", objectives={"hubert": {}}, initializer_range=0.02)
    )
    table = model.conformer.position_encoding.relative_attention_bias
    assert table.shape == (320, 4) and table.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(layer.self_attn.gate_scale.eq(1).all() for layer in model.conformer.layers)
    no_decay = model.no_weight_decay_parameters()
    assert "conformer.position_encoding.relative_attention_bias" in no_decay  # an embedding table
    assert "conformer.layers.0.self_attn.gate_scale" in no_decay  # 1-d
    assert "conformer.layers.0.self_attn.gate_proj.weight" not in no_decay
    rotary = ConformerSslModel(make_tiny_config(position_embeddings_type="rotary"))
    assert not any("relative" in n or "bias_u" in n for n, _ in rotary.named_parameters())


def test_config_validates_the_position_settings():
    with pytest.raises(ValueError, match=r"position_embeddings_type='alibi'.*'rel_pos'.*'gated_rel_pos'.*'rotary'"):
        make_tiny_config(position_embeddings_type="alibi")
    with pytest.raises(ValueError, match=r"dropout_positions=0\.1.*0\.0 with position_embeddings_type='rotary'"):
        make_tiny_config(position_embeddings_type="rotary", dropout_positions=0.1)
    with pytest.raises(ValueError, match=r"relative_attention_num_buckets=7"):
        make_tiny_config(position_embeddings_type="gated_rel_pos", relative_attention_num_buckets=7)
    with pytest.raises(ValueError, match=r"relative_attention_max_distance=80 .*more than 80"):
        make_tiny_config(position_embeddings_type="gated_rel_pos", relative_attention_max_distance=80)
    with pytest.raises(ValueError, match=r"hidden_size=36.*head size 9"):
        make_tiny_config(position_embeddings_type="rotary", hidden_size=36)
    make_tiny_config(relative_attention_num_buckets=7)  # ignored (and unchecked) unless gated_rel_pos


def test_gated_model_save_and_load_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModel

    config = make_tiny_config(position_embeddings_type="gated_rel_pos", objectives={"hubert": {}})
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(config).eval()
    with torch.no_grad():
        model.conformer.position_encoding.relative_attention_bias.normal_()
        model.conformer.layers[1].self_attn.gate_scale.fill_(1.7)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).position_embeddings_type == "gated_rel_pos"
    reloaded = ConformerSslForPreTraining.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    features, attention_mask = _features([90, 61], config.num_mel_bins)
    labels = torch.randint(0, config.hubert_num_labels, features.shape[:2], generator=_gen(0))
    with torch.no_grad():
        want = model(features, attention_mask, frame_labels=labels, generator=_gen(1))
        got = reloaded(features, attention_mask, frame_labels=labels, generator=_gen(1))
        torch.testing.assert_close(got.loss, want.loss)
        encoder = AutoModel.from_pretrained(tmp_path).eval()  # the encoder alone, from the pretraining folder
        torch.testing.assert_close(
            encoder(features, attention_mask=attention_mask).last_hidden_state,
            model.conformer(features, attention_mask=attention_mask).last_hidden_state,
        )


@pytest.mark.parametrize("position_type", ["gated_rel_pos", "rotary"])
def test_nemo_and_parakeet_export_refuse_other_position_types(position_type):
    from hf_ssl_speech.interop.nemo_mapping import (
        NemoConversionError,
        nemo_encoder_config,
        our_encoder_state_dict_to_nemo,
    )
    from hf_ssl_speech.interop.parakeet import to_parakeet, to_parakeet_config

    config = make_tiny_config(position_embeddings_type=position_type, subsampling="dw_striding")
    model = ConformerSslModel(config)
    fix = rf"position_embeddings_type='{position_type}'.*rel_pos"
    with pytest.raises(ValueError, match=fix):
        to_parakeet_config(config)
    with pytest.raises(ValueError, match=fix):
        to_parakeet(model)
    with pytest.raises(NemoConversionError, match=fix):
        nemo_encoder_config(config)
    with pytest.raises(NemoConversionError, match=fix):
        our_encoder_state_dict_to_nemo(model.state_dict())
    rel_pos = ConformerSslModel(make_tiny_config(subsampling="dw_striding"))
    assert our_encoder_state_dict_to_nemo(rel_pos.state_dict())  # the rel_pos export is unchanged


# ----------------------------------------------------------------------------------------------- the tiny recipe


def test_tiny_wavlm_recipe_overfits_one_fixed_batch(tmp_path):
    """The tiny_wavlm model (HuBERT targets, gated bias) on one batch of real audio, every utterance mixed by
    featurise with the same draws each step: 50 AdamW steps cut the loss by at least 30%."""
    recipe = load_recipe(TINY_WAVLM, overrides=["data.denoising_prob=1.0", "data.dither=0.0"])
    config = model_config(recipe)
    assert config.position_embeddings_type == "gated_rel_pos" and set(config.objectives) == {"hubert"}
    batch = _waveform_batch(tmp_path)
    extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins)
    inputs = featurise(batch, extractor, torch.device("cpu"), recipe, _gen(0), train=True)
    assert not torch.equal(inputs["input_features"], inputs["target_features"])
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.optim.lr)
    history = []
    for step in range(50):
        out = model(**inputs, generator=_gen(0), step=step)
        assert torch.isfinite(out.loss)
        history.append(out.loss.item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert min(history[-5:]) <= 0.7 * history[0], (history[0], history[-5:])
