"""Interop with transformers' native FastConformer (`ParakeetEncoder`, `ParakeetForCTC/RNNT/TDT`).

Our FastConformer (`subsampling="dw_striding"`, factor 8, batch-norm conv module, non-causal) is the same
network as `ParakeetEncoder`; only the pointwise convs differ in storage (our Linear (out, in) versus their
Conv1d (out, in, 1)). These functions move weights both ways, so:
- a Parakeet checkpoint proves our architecture against an independent implementation (same outputs);
- a FastConformer pretrained here can be fine-tuned as a transducer with `ParakeetForRNNT` / `ParakeetForTDT`
  (or CTC with `ParakeetForCTC`) without any remote code.
"""

from __future__ import annotations

import torch
from transformers import (
    ParakeetCTCConfig,
    ParakeetEncoder,
    ParakeetEncoderConfig,
    ParakeetForCTC,
    ParakeetForRNNT,
    ParakeetForTDT,
    ParakeetRNNTConfig,
    ParakeetTDTConfig,
)

from ..configuration_conformer_ssl import ConformerSslConfig
from ..modeling_conformer_ssl import ConformerSslModel

# Our field -> Parakeet encoder field, for the fields that exist on both sides under different names.
_RENAMED = {
    "conv_depthwise_kernel_size": "conv_kernel_size",
    "hidden_dropout": "dropout",
    "xscaling": "scale_input",
}
_SAME = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "attention_bias",
    "convolution_bias",
    "subsampling_factor",
    "num_mel_bins",
    "dropout_positions",
    "layerdrop",
    "activation_dropout",
    "attention_dropout",
    "max_position_embeddings",
    "initializer_range",
)
_POINTWISE = ("conv.pointwise_conv1.weight", "conv.pointwise_conv2.weight")


def check_parakeet_compatible(config: ConformerSslConfig) -> None:
    """Raise a ValueError naming every field that Parakeet's encoder cannot represent."""
    problems = []
    if config.subsampling != "dw_striding":
        problems.append(f"subsampling={config.subsampling!r} (Parakeet has only 'dw_striding')")
    if config.conv_norm_type != "batch_norm":
        problems.append(f"conv_norm_type={config.conv_norm_type!r} (Parakeet has only 'batch_norm')")
    if config.causal:
        problems.append("causal=True (Parakeet's encoder is not causal)")
    if config.position_embeddings_type != "rel_pos":
        problems.append(
            f"position_embeddings_type={config.position_embeddings_type!r} (Parakeet has only 'rel_pos' attention; "
            "keep such a model in our classes, or pretrain with position_embeddings_type='rel_pos' to export)"
        )
    if config.layer_norm_eps != 1e-5:
        problems.append(f"layer_norm_eps={config.layer_norm_eps} (Parakeet uses 1e-5)")
    if problems:
        raise ValueError("this ConformerSslConfig has no Parakeet equivalent: " + "; ".join(problems))


def to_parakeet_config(config: ConformerSslConfig) -> ParakeetEncoderConfig:
    """The `ParakeetEncoderConfig` of the same network."""
    check_parakeet_compatible(config)
    kwargs = {name: getattr(config, name) for name in _SAME}
    kwargs.update({theirs: getattr(config, ours) for ours, theirs in _RENAMED.items()})
    return ParakeetEncoderConfig(subsampling_conv_channels=config.conv_channels, **kwargs)


def from_parakeet_config(parakeet: ParakeetEncoderConfig, **overrides) -> ConformerSslConfig:
    """The `ConformerSslConfig` (FastConformer) of a Parakeet encoder config; `overrides` add head fields."""
    if parakeet.subsampling_conv_kernel_size != 3 or parakeet.subsampling_conv_stride != 2:
        raise ValueError(
            "only Parakeet encoders with 3x3 stride-2 subsampling convs can be converted, got kernel "
            f"{parakeet.subsampling_conv_kernel_size}, stride {parakeet.subsampling_conv_stride}"
        )
    kwargs = {name: getattr(parakeet, name) for name in _SAME}
    kwargs.update({ours: getattr(parakeet, theirs) for ours, theirs in _RENAMED.items()})
    kwargs.update(
        subsampling="dw_striding",
        subsampling_conv_channels=parakeet.subsampling_conv_channels,
        conv_norm_type="batch_norm",
        feat_proj_dropout=parakeet.dropout,
    )
    kwargs.update(overrides)
    return ConformerSslConfig(**kwargs)


def parakeet_state_dict_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parakeet encoder keys -> `ConformerSslModel` keys (names match; 1x1 Conv1d weights become Linear)."""
    ours = {}
    for key, value in state_dict.items():
        if key.endswith(_POINTWISE):
            value = value.squeeze(-1)
        ours[key] = value
    return ours


def our_state_dict_to_parakeet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ConformerSslModel` keys -> Parakeet encoder keys (Linear pointwise weights become 1x1 Conv1d)."""
    theirs = {}
    for key, value in state_dict.items():
        if key.endswith(_POINTWISE):
            value = value.unsqueeze(-1)
        theirs[key] = value
    return theirs


def _load_exact(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{what}: missing keys {missing}, unexpected keys {result.unexpected_keys}")


def from_parakeet(encoder: ParakeetEncoder, **config_overrides) -> ConformerSslModel:
    """A `ConformerSslModel` holding the weights of a transformers `ParakeetEncoder`."""
    model = ConformerSslModel(from_parakeet_config(encoder.config, **config_overrides))
    _load_exact(model, parakeet_state_dict_to_ours(encoder.state_dict()), "Parakeet -> ConformerSslModel")
    return model.to(next(encoder.parameters()).dtype)


def to_parakeet(model: ConformerSslModel) -> ParakeetEncoder:
    """A transformers `ParakeetEncoder` holding the weights of our FastConformer encoder."""
    encoder = ParakeetEncoder(to_parakeet_config(model.config))
    _load_exact(encoder, our_state_dict_to_parakeet(model.state_dict()), "ConformerSslModel -> Parakeet")
    return encoder


_HEADS = {
    "ctc": (ParakeetCTCConfig, ParakeetForCTC),
    "rnnt": (ParakeetRNNTConfig, ParakeetForRNNT),
    "tdt": (ParakeetTDTConfig, ParakeetForTDT),
}


def export_parakeet_for_asr(model: ConformerSslModel, head: str, vocab_size: int, **head_config):
    """`ParakeetForCTC` / `ParakeetForRNNT` / `ParakeetForTDT` whose encoder is our pretrained encoder and whose
    decoder/joint/CTC head is freshly initialised, ready to fine-tune with stock transformers.

    head: "ctc", "rnnt" or "tdt". vocab_size: size of the tokenizer (blank included as Parakeet expects).
    head_config: extra fields of the Parakeet head config (e.g. `blank_token_id`, `decoder_hidden_size`).
    """
    if head not in _HEADS:
        raise ValueError(f"head={head!r} is not one of {sorted(_HEADS)}")
    config_class, model_class = _HEADS[head]
    encoder_config = to_parakeet_config(model.config)
    if head == "ctc":
        head_config.setdefault("pad_token_id", vocab_size - 1)
    else:
        head_config.setdefault("blank_token_id", vocab_size - 1)
    config = config_class(vocab_size=vocab_size, encoder_config=encoder_config.to_dict(), **head_config)
    asr_model = model_class(config)
    _load_exact(asr_model.encoder, our_state_dict_to_parakeet(model.state_dict()), f"encoder of Parakeet {head}")
    return asr_model


def load_from_parakeet_asr(asr_model: torch.nn.Module) -> ConformerSslModel:
    """Our encoder from the encoder of a `ParakeetForCTC` / `ParakeetForRNNT` / `ParakeetForTDT`."""
    return from_parakeet(asr_model.encoder)
