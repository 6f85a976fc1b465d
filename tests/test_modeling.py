"""The encoder and its heads: padding invariance, causality, lengths, CTC / classification heads, checkpointing."""

from __future__ import annotations

import pytest
import torch

from hf_ssl_speech import ConformerSslForCTC, ConformerSslForSequenceClassification, ConformerSslModel


def _batch(lengths: list[int], num_mel_bins: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features (B, T, F) with zero padding after each length, and the matching attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    frames = max(lengths)
    features = torch.randn(len(lengths), frames, num_mel_bins, generator=generator)
    attention_mask = (torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]).long()
    return features * attention_mask[..., None], attention_mask


def _randomise_norm_statistics(model: torch.nn.Module) -> None:
    """Give BatchNorm non-trivial running statistics so eval-mode tests exercise them."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


@pytest.mark.parametrize("subsampling", ["striding", "dw_striding"])
@pytest.mark.parametrize("conv_norm_type", ["batch_norm", "layer_norm"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(tiny_config, subsampling, conv_norm_type, causal):
    """In eval mode an utterance's outputs in a padded batch equal its outputs alone (docs/architecture.md §2)."""
    config = tiny_config(subsampling=subsampling, conv_norm_type=conv_norm_type, causal=causal)
    model = ConformerSslModel(config).eval()
    _randomise_norm_statistics(model)
    lengths = [123, 80, 37, 9]
    features, attention_mask = _batch(lengths, config.num_mel_bins)
    with torch.no_grad():
        batched = model(features, attention_mask=attention_mask, output_hidden_states=True)
        for i, length in enumerate(lengths):
            alone = model(features[i : i + 1, :length], output_hidden_states=True)
            steps = int(batched.output_lengths[i])
            assert alone.last_hidden_state.shape[1] == steps
            for layer, (b, a) in enumerate(zip(batched.hidden_states, alone.hidden_states)):
                diff = (b[i, :steps] - a[0]).abs().max().item()
                assert diff <= 1e-4, f"utterance {i} layer {layer}: max abs diff {diff}"


@pytest.mark.parametrize("subsampling", ["striding", "dw_striding"])
def test_subsampling_convs_run_channels_last_and_depthwise_in_float32_under_bf16(tiny_config, subsampling):
    """Under bf16 autocast every conv after the first reads channels-last memory (a 1-channel input is both layouts,
    so the first conv alone would hand on (B, C, T, F) memory), and a depthwise conv reads and computes float32:
    torch 2.13's bf16 input gradient of a strided depthwise conv is ~5x slower on CPUs. The outputs stay those of
    the float32 model, and gradients reach the first conv."""
    config = tiny_config(subsampling=subsampling)
    model = ConformerSslModel(config).eval()  # no dropout: the bf16 and float32 outputs are compared below
    convs = [layer for layer in model.subsampling.layers if isinstance(layer, torch.nn.Conv2d)]
    seen: list[tuple[int, torch.dtype, bool]] = []
    for conv in convs[1:]:
        conv.register_forward_hook(
            lambda module, args, output: seen.append(
                (module.groups, output.dtype, args[0].is_contiguous(memory_format=torch.channels_last))
            )
        )
    features, attention_mask = _batch([123, 80, 37], config.num_mel_bins)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(features, attention_mask=attention_mask).last_hidden_state
    assert len(seen) == len(convs) - 1 >= 1
    for groups, dtype, channels_last in seen:
        assert channels_last, "a conv after the first read (B, C, T, F) memory"
        assert dtype == (torch.float32 if groups > 1 else torch.bfloat16), (groups, dtype)
    assert any(groups > 1 for groups, _, _ in seen) == (subsampling == "dw_striding")
    out.float().square().mean().backward()
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        reference = model(features, attention_mask=attention_mask).last_hidden_state
    valid = attention_mask[:, :: config.subsampling_factor].bool()[..., None]
    error = ((out.float() - reference) * valid).abs().max() / reference.abs().max()
    assert error < 0.05, f"bf16 output strays {error:.3f} from float32 (relative to its largest value)"


@pytest.mark.parametrize("subsampling", ["striding", "dw_striding"])
def test_output_lengths_and_masks(tiny_config, subsampling):
    config = tiny_config(subsampling=subsampling)
    model = ConformerSslModel(config).eval()
    lengths = [101, 64, 1]
    features, attention_mask = _batch(lengths, config.num_mel_bins)
    out = model(features, attention_mask=attention_mask, output_hidden_states=True)
    factor = config.subsampling_factor
    expected = torch.tensor([-(-length // factor) for length in lengths])  # ceil(L / factor)
    assert torch.equal(out.output_lengths, expected)
    assert torch.equal(model._get_feat_extract_output_lengths(torch.tensor(lengths)), expected)
    assert model._get_feat_extract_output_lengths(101) == expected[0].item()
    assert out.last_hidden_state.shape == (3, int(expected.max()), config.hidden_size)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert torch.equal(out.attention_mask.sum(-1), expected)


def test_causal_mode_ignores_the_future(tiny_config):
    """With causal=True, changing frames after t never changes encoder outputs at steps covering frames <= t."""
    config = tiny_config(causal=True)
    model = ConformerSslModel(config).eval()
    features, _ = _batch([96], config.num_mel_bins)
    changed = features.clone()
    changed[:, 60:] = torch.randn_like(changed[:, 60:])
    with torch.no_grad():
        a = model(features).last_hidden_state
        b = model(changed).last_hidden_state
    # Step s sees frames up to s * factor (left-padded strided convs): steps < 60 / 4 = 15 are untouched.
    assert (a[:, :15] - b[:, :15]).abs().max() < 1e-5
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3
    non_causal = ConformerSslModel(tiny_config(causal=False)).eval()
    with torch.no_grad():
        assert (
            non_causal(features).last_hidden_state[:, :10] - non_causal(changed).last_hidden_state[:, :10]
        ).abs().max() > 1e-4


def test_eager_attention_matches_sdpa_and_returns_weights(tiny_config):
    config = tiny_config()
    model = ConformerSslModel(config).eval()
    features, attention_mask = _batch([50, 30], config.num_mel_bins)
    with torch.no_grad():
        fused = model(features, attention_mask=attention_mask)
        eager = model(features, attention_mask=attention_mask, output_attentions=True)
    assert (fused.last_hidden_state - eager.last_hidden_state).abs().max() < 1e-5
    assert len(eager.attentions) == config.num_hidden_layers
    weights = eager.attentions[0]  # (B, H, T', T')
    assert weights.shape == (2, config.num_attention_heads, 13, 13)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    # No query attends to padding keys of the second utterance (8 valid steps).
    assert weights[1, :, :, 8:].abs().max() < 1e-6


def test_gradients_reach_subsampling_and_checkpointing_matches(tiny_config):
    config = tiny_config(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0)
    features, attention_mask = _batch([64, 40], config.num_mel_bins)
    torch.manual_seed(0)
    model = ConformerSslModel(config).train()
    model(features, attention_mask=attention_mask).last_hidden_state.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["subsampling.layers.0.weight"].abs().sum() > 0
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    model(features, attention_mask=attention_mask).last_hidden_state.pow(2).mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_layerdrop_skips_layers_in_training_only(tiny_config):
    config = tiny_config(
        layerdrop=0.99, hidden_dropout=0.0, feat_proj_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0
    )
    model = ConformerSslModel(config)
    features, _ = _batch([40], config.num_mel_bins)
    torch.manual_seed(3)
    with torch.no_grad():
        trained = model.train()(features, output_hidden_states=True).hidden_states
        # with p=0.99 every layer is (almost surely) skipped: all hidden states equal the input of the blocks
        assert all(torch.equal(h, trained[0]) for h in trained[1:])
        evaluated = model.eval()(features, output_hidden_states=True).hidden_states
        assert not torch.equal(evaluated[-1], evaluated[0])


def test_ctc_head_loss_and_conventions(tiny_config):
    config = tiny_config(vocab_size=12, pad_token_id=0, ctc_loss_reduction="mean")
    model = ConformerSslForCTC(config)
    features, attention_mask = _batch([80, 60], config.num_mel_bins)
    labels = torch.tensor([[3, 4, 5, 6], [7, 8, -100, -100]])
    out = model(features, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, 20, 12)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    # The same loss computed by hand with torch's CTC over the valid steps (blank = pad_token_id).
    model.eval()
    with torch.no_grad():
        logits = model(features, attention_mask=attention_mask).logits
        loss = model(features, attention_mask=attention_mask, labels=labels).loss
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    reference = torch.nn.functional.ctc_loss(
        log_probs,
        torch.tensor([3, 4, 5, 6, 7, 8]),
        torch.tensor([20, 15]),
        torch.tensor([4, 2]),
        blank=0,
        reduction="mean",
        zero_infinity=True,
    )
    torch.testing.assert_close(loss, reference)
    with pytest.raises(ValueError, match="vocab_size"):
        model(features, attention_mask=attention_mask, labels=torch.tensor([[12, 1], [1, 1]]))


def test_ctc_requires_vocab_size(tiny_config):
    with pytest.raises(ValueError, match="vocab_size=None"):
        ConformerSslForCTC(tiny_config())


def test_ctc_freeze_base_model(tiny_config):
    model = ConformerSslForCTC(tiny_config(vocab_size=5))
    model.freeze_base_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lm_head.weight", "lm_head.bias"}
    model.unfreeze_base_model()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("weighted", [False, True])
def test_sequence_classification_pools_valid_steps(tiny_config, weighted):
    config = tiny_config(num_labels=3, use_weighted_layer_sum=weighted)
    model = ConformerSslForSequenceClassification(config).eval()
    features, attention_mask = _batch([70, 33], config.num_mel_bins)
    with torch.no_grad():
        batched = model(features, attention_mask=attention_mask).logits
        alone = model(features[1:, :33]).logits
    torch.testing.assert_close(batched[1:], alone, atol=1e-4, rtol=1e-4)
    model.train()
    out = model(features, attention_mask=attention_mask, labels=torch.tensor([0, 2]))
    out.loss.backward()
    if weighted:
        assert model.layer_weights.grad is not None and model.layer_weights.grad.abs().sum() > 0
        assert model.layer_weights.shape == (config.num_hidden_layers + 1,)


def test_too_long_input_names_the_limit(tiny_config):
    model = ConformerSslModel(tiny_config(max_position_embeddings=8)).eval()
    features, _ = _batch([64], 16)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(features)


def test_inputs_to_logits_ratio(tiny_config):
    assert tiny_config().inputs_to_logits_ratio == 160 * 4
    assert tiny_config(subsampling="dw_striding").inputs_to_logits_ratio == 160 * 8


def test_fresh_models_have_the_intended_init_statistics(tiny_config, tmp_path):
    """`_init_weights` owns every module's init, and what it sets sticks (the review measured the Gumbel
    projection reset to N(0, 0.02) after the quantizer had set N(0, 1/sqrt(dim)))."""
    from hf_ssl_speech import ConformerSslForPreTraining

    torch.manual_seed(0)
    config = tiny_config(
        objectives={"contrastive": {}, "mlm": {}},
        mask_fill="learned",
        num_codevectors_per_group=64,
        codevector_dim=256,
        initializer_range=0.02,
    )
    model = ConformerSslForPreTraining(config)
    projection = model.quantizer.weight_proj
    intended = projection.in_features**-0.5  # 1 / sqrt(subsampling_factor * num_mel_bins) = 0.125
    assert projection.weight.std().item() == pytest.approx(intended, rel=0.05)
    assert projection.bias.abs().max().item() == 0.0
    codes = model.quantizer.codevectors
    assert (
        0.0 <= codes.min().item() and codes.max().item() <= 1.0 and codes.mean().item() == pytest.approx(0.5, abs=0.02)
    )
    assert model.project_hid.weight.std().item() == pytest.approx(0.02, rel=0.1)  # the generic Linear init
    embed = model.masked_spec_embed
    assert 0.0 <= embed.min().item() and embed.max().item() <= 1.0
    for layer in model.conformer.layers:
        assert layer.self_attn.bias_u.abs().max().item() == 0.0 and layer.self_attn.bias_v.abs().max().item() == 0.0
    # Loading keeps the saved values: the init does not overwrite checkpoint tensors.
    with torch.no_grad():
        projection.weight.mul_(3.0)
    model.save_pretrained(tmp_path)
    reloaded = ConformerSslForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(reloaded.quantizer.weight_proj.weight, projection.weight)


def test_weighted_layer_sum_starts_uniform(tiny_config):
    model = ConformerSslForSequenceClassification(tiny_config(use_weighted_layer_sum=True, num_labels=3))
    expected = torch.full((model.config.num_hidden_layers + 1,), 1.0 / (model.config.num_hidden_layers + 1))
    assert torch.allclose(model.layer_weights.detach(), expected)
