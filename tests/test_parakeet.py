"""Our FastConformer against transformers' independent implementation (`ParakeetEncoder`), both ways."""

from __future__ import annotations

import pytest
import torch
from transformers import ParakeetEncoder, ParakeetEncoderConfig

from hf_ssl_speech.interop.parakeet import (
    export_parakeet_for_asr,
    from_parakeet,
    load_from_parakeet_asr,
    to_parakeet,
    to_parakeet_config,
)


def _random_parakeet() -> ParakeetEncoder:
    config = ParakeetEncoderConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_kernel_size=9,
        subsampling_conv_channels=32,
        num_mel_bins=80,
    )
    torch.manual_seed(0)
    encoder = ParakeetEncoder(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero biases, u/v and BatchNorm statistics, so every weight matters
        for name, param in encoder.named_parameters():
            if name.endswith("bias") or "bias_u" in name or "bias_v" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return encoder


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 200, 80, generator=generator)
    attention_mask = torch.ones(2, 200, dtype=torch.long)
    attention_mask[1, 150:] = 0
    return features * attention_mask[..., None], attention_mask


def test_parakeet_weights_give_the_same_outputs():
    parakeet = _random_parakeet()
    ours = from_parakeet(parakeet).eval()
    features, attention_mask = _features()
    with torch.no_grad():
        theirs = parakeet(features, attention_mask=attention_mask)
        mine = ours(features, attention_mask=attention_mask)
    valid = mine.output_lengths.tolist()
    assert valid == theirs.attention_mask.sum(-1).tolist() == [25, 19]
    for i, steps in enumerate(valid):
        diff = (theirs.last_hidden_state[i, :steps] - mine.last_hidden_state[i, :steps]).abs().max().item()
        assert diff <= 1e-4, f"utterance {i}: max abs diff {diff}"


def test_round_trip_ours_to_parakeet_to_ours_is_identical():
    ours = from_parakeet(_random_parakeet()).eval()
    back = from_parakeet(to_parakeet(ours)).eval()
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    features, attention_mask = _features()
    with torch.no_grad():
        assert torch.equal(
            ours(features, attention_mask).last_hidden_state, back(features, attention_mask).last_hidden_state
        )


@pytest.mark.parametrize("head", ["ctc", "rnnt", "tdt"])
def test_export_to_parakeet_asr_models(head):
    ours = from_parakeet(_random_parakeet()).eval()
    asr = export_parakeet_for_asr(ours, head, vocab_size=16).eval()
    assert type(asr).__name__ == {"ctc": "ParakeetForCTC", "rnnt": "ParakeetForRNNT", "tdt": "ParakeetForTDT"}[head]
    features, attention_mask = _features()
    with torch.no_grad():
        encoded = asr.encoder(features, attention_mask=attention_mask).last_hidden_state
        mine = ours(features, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(encoded[0], mine[0], atol=1e-5, rtol=1e-5)
    back = load_from_parakeet_asr(asr).eval()
    with torch.no_grad():
        assert torch.equal(back(features, attention_mask).last_hidden_state, mine)


def test_incompatible_configs_are_refused(tiny_config):
    with pytest.raises(ValueError, match="subsampling='striding'.*conv_norm_type='layer_norm'"):
        to_parakeet_config(tiny_config(subsampling="striding", conv_norm_type="layer_norm"))
    with pytest.raises(ValueError, match="head='lstm'"):
        export_parakeet_for_asr(from_parakeet(_random_parakeet()), "lstm", vocab_size=8)
