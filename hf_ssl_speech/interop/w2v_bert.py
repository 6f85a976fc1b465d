"""transformers' Wav2Vec2Bert (w2v-BERT 2.0) <-> ConformerSsl: configs, weights and the feature extractor.

w2v-BERT 2.0 is one of our Conformers with these options (`config_from_wav2vec2_bert` sets them):
    subsampling="feature_projection", subsampling_factor=1, num_mel_bins=160, hop_length=320   stacked-fbank input
    position_embeddings_type="relative_key" (left / right_max_position_embeddings)             Shaw attention
    conv_norm_type="layer_norm", conv_depthwise_causal=True, convolution_bias=False             its conv module
    xscaling=False, attention_bias=True                                                         no input scaling
    add_adapter, adapter_*, output_hidden_size, use_intermediate_ffn_before_adapter             its adapter
Both sides read the features of transformers' `SeamlessM4TFeatureExtractor` (`feature_extractor_for`), and the
converted models give the same outputs (tests/test_w2v_bert.py: within 1e-5, padded batches included).

Not carried over, because neither side's outputs depend on them in eval mode:
    - Wav2Vec2Bert's SpecAugment (`apply_spec_augment`, `mask_time_*`, `mask_feature_*`, `masked_spec_embed`): it
      masks the projected features while fine-tuning; ours mask in `ConformerSslForPreTraining` (input frames) and
      keep their own `mask_time_*` defaults. `to_wav2vec2_bert` leaves transformers' defaults (a fresh embedding).
    - Dropout placement: Wav2Vec2Bert drops out after attention with `attention_dropout` and after the conv module
      with `conformer_conv_dropout`, ours with `hidden_dropout`; its encoder adds `hidden_dropout` on the projected
      input, ours `feat_proj_dropout` only.
"""

from __future__ import annotations

import re

import torch
from transformers import (
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertForCTC,
    Wav2Vec2BertModel,
)

from ..configuration_conformer_ssl import ConformerSslConfig
from ..modeling_conformer_ssl import ConformerSslForCTC, ConformerSslModel

STACK_STRIDE = 2  # SeamlessM4TFeatureExtractor(stride=2): two 10 ms fbank frames per model frame
FBANK_HOP = 160  # its fbank hop in samples (10 ms at 16 kHz, fixed in the extractor)
SUPPORTED_POSITIONS = ("relative_key",)

# Settings both configs share under the same name.
SHARED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "conv_depthwise_kernel_size",
    "left_max_position_embeddings",
    "right_max_position_embeddings",
    "hidden_dropout",
    "activation_dropout",
    "attention_dropout",
    "feat_proj_dropout",
    "layerdrop",
    "layer_norm_eps",
    "initializer_range",
    "vocab_size",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "ctc_loss_reduction",
    "ctc_zero_infinity",
    "final_dropout",
    "use_weighted_layer_sum",
    "classifier_proj_size",
    "add_adapter",
    "adapter_kernel_size",
    "adapter_stride",
    "num_adapter_layers",
    "adapter_act",
    "use_intermediate_ffn_before_adapter",
)

# Our module path (under the encoder) -> Wav2Vec2Bert's (under `wav2vec2_bert.` in its heads). `{i}` is a layer index.
LAYER_NAMES = {
    "norm_feed_forward1": "ffn1_layer_norm",
    "feed_forward1.linear1": "ffn1.intermediate_dense",
    "feed_forward1.linear2": "ffn1.output_dense",
    "norm_self_att": "self_attn_layer_norm",
    "self_attn.q_proj": "self_attn.linear_q",
    "self_attn.k_proj": "self_attn.linear_k",
    "self_attn.v_proj": "self_attn.linear_v",
    "self_attn.o_proj": "self_attn.linear_out",
    "norm_conv": "conv_module.layer_norm",
    "conv.pointwise_conv1": "conv_module.pointwise_conv1",
    "conv.depthwise_conv": "conv_module.depthwise_conv",
    "conv.norm": "conv_module.depthwise_layer_norm",
    "conv.pointwise_conv2": "conv_module.pointwise_conv2",
    "norm_feed_forward2": "ffn2_layer_norm",
    "feed_forward2.linear1": "ffn2.intermediate_dense",
    "feed_forward2.linear2": "ffn2.output_dense",
    "norm_out": "final_layer_norm",
}
ADAPTER_LAYER_NAMES = {
    "self_attn.q_proj": "self_attn.linear_q",
    "self_attn.k_proj": "self_attn.linear_k",
    "self_attn.v_proj": "self_attn.linear_v",
    "self_attn.o_proj": "self_attn.linear_out",
    "ffn.linear1": "ffn.intermediate_dense",
    "ffn.linear2": "ffn.output_dense",
}
TOP_NAMES = {
    "subsampling.layer_norm": "feature_projection.layer_norm",
    "subsampling.linear": "feature_projection.projection",
    "intermediate_ffn.linear1": "intermediate_ffn.intermediate_dense",
    "intermediate_ffn.linear2": "intermediate_ffn.output_dense",
}


class W2vBertConversionError(ValueError):
    """A setting one side has and the other cannot hold; the message names the field, its value and the fix."""


def _refuse(field: str, value: object, why: str) -> None:
    raise W2vBertConversionError(f"{field}={value!r}: {why}")


# ----------------------------------------------------------------------------------------------- configs


def config_from_wav2vec2_bert(config: Wav2Vec2BertConfig) -> ConformerSslConfig:
    """Our config of the same network as `config` (a transformers `Wav2Vec2BertConfig`)."""
    if config.position_embeddings_type not in SUPPORTED_POSITIONS:
        _refuse(
            "Wav2Vec2BertConfig.position_embeddings_type",
            config.position_embeddings_type,
            f"supported: {SUPPORTED_POSITIONS} (w2v-BERT 2.0's). 'rotary' rotates the attention input before its "
            "projections and 'relative' uses a separate sinusoid table; neither is converted.",
        )
    if config.feature_projection_input_dim % STACK_STRIDE:
        _refuse(
            "Wav2Vec2BertConfig.feature_projection_input_dim",
            config.feature_projection_input_dim,
            f"a multiple of {STACK_STRIDE} (SeamlessM4TFeatureExtractor stacks {STACK_STRIDE} fbank frames), e.g. 160",
        )
    output_hidden_size = config.output_hidden_size
    return ConformerSslConfig(
        **{name: getattr(config, name) for name in SHARED_FIELDS},
        num_mel_bins=config.feature_projection_input_dim,
        subsampling="feature_projection",
        subsampling_factor=1,
        hop_length=FBANK_HOP * STACK_STRIDE,
        position_embeddings_type="relative_key",
        conv_norm_type="layer_norm",
        conv_depthwise_causal=True,
        convolution_bias=False,
        attention_bias=True,
        xscaling=False,
        causal=False,
        output_hidden_size=None if output_hidden_size in (None, config.hidden_size) else output_hidden_size,
        attn_implementation=config._attn_implementation,  # "eager" stays eager: the explicit softmax on both sides
    )


def config_to_wav2vec2_bert(config: ConformerSslConfig) -> Wav2Vec2BertConfig:
    """transformers' `Wav2Vec2BertConfig` of the same network as `config`; refuses what Wav2Vec2Bert cannot hold."""
    required = {
        "subsampling": "feature_projection",
        "position_embeddings_type": "relative_key",
        "conv_norm_type": "layer_norm",
        "conv_depthwise_causal": True,
        "causal": False,
        "xscaling": False,
        "convolution_bias": False,
        "attention_bias": True,
    }
    for field, wanted in required.items():
        value = getattr(config, field)
        if value != wanted:
            _refuse(
                f"ConformerSslConfig.{field}",
                value,
                f"Wav2Vec2Bert needs {field}={wanted!r} (its only {field.replace('_', ' ')}); models with other "
                "settings do not convert to it (config_from_wav2vec2_bert shows the whole set).",
            )
    return Wav2Vec2BertConfig(
        **{name: getattr(config, name) for name in SHARED_FIELDS},
        feature_projection_input_dim=config.num_mel_bins,
        position_embeddings_type="relative_key",
        conformer_conv_dropout=config.hidden_dropout,
        output_hidden_size=config.output_hidden_size or config.hidden_size,
        attn_implementation=config._attn_implementation,
    )


def feature_extractor_for(config: ConformerSslConfig | Wav2Vec2BertConfig) -> SeamlessM4TFeatureExtractor:
    """transformers' `SeamlessM4TFeatureExtractor` whose frames fit `config` (num_mel_bins / 2 fbank bins, stride 2).

    Save it next to a converted model (`save_pretrained`): `AutoFeatureExtractor` / `AutoProcessor` then return it.
    """
    if isinstance(config, Wav2Vec2BertConfig):
        dims = config.feature_projection_input_dim
    else:
        if config.subsampling != "feature_projection" or config.hop_length != FBANK_HOP * STACK_STRIDE:
            _refuse(
                "ConformerSslConfig.subsampling",
                config.subsampling,
                f"'feature_projection' with hop_length={FBANK_HOP * STACK_STRIDE} (got {config.hop_length}) for "
                "SeamlessM4T features; other front ends read ConformerSslFeatureExtractor's log-mels",
            )
        dims = config.num_mel_bins
    if dims % STACK_STRIDE:
        _refuse("num_mel_bins", dims, f"a multiple of {STACK_STRIDE} (stacked fbank frames), e.g. 160")
    bins = dims // STACK_STRIDE
    return SeamlessM4TFeatureExtractor(feature_size=bins, num_mel_bins=bins, stride=STACK_STRIDE)


# ----------------------------------------------------------------------------------------------- weights


def _their_key(ours: str) -> str:
    """Key of our encoder's state dict (no `conformer.` prefix) -> Wav2Vec2BertModel's."""
    module, _, param = ours.rpartition(".")
    if ours.endswith("self_attn.distance_embedding"):  # our bare Parameter is their nn.Embedding's weight
        return "encoder." + ours + ".weight"
    if match := re.fullmatch(r"layers\.(\d+)\.(.+)", module):
        index, rest = match.groups()
        return f"encoder.layers.{index}.{LAYER_NAMES[rest]}.{param}"
    if match := re.fullmatch(r"adapter\.layers\.(\d+)\.(.+)", module):
        index, rest = match.groups()
        return f"adapter.layers.{index}.{ADAPTER_LAYER_NAMES.get(rest, rest)}.{param}"
    if module.startswith("adapter."):
        return ours  # proj, proj_layer_norm: same names
    return f"{TOP_NAMES[module]}.{param}"


def _key_map(model: ConformerSslModel | ConformerSslForCTC) -> dict[str, str]:
    """Every key of our state dict -> Wav2Vec2Bert's key in the matching class."""
    head = isinstance(model, ConformerSslForCTC)
    mapping = {}
    for key in model.state_dict():
        if head and not key.startswith("conformer."):
            mapping[key] = key  # lm_head
            continue
        inner = key.removeprefix("conformer.") if head else key
        mapping[key] = ("wav2vec2_bert." if head else "") + _their_key(inner)
    return mapping


def _copy(source: dict[str, torch.Tensor], target: torch.nn.Module, mapping: dict[str, str]) -> None:
    """target[k] <- source[mapping[k]] reshaped to the target's shape (1x1 Conv1d <-> Linear); exact key sets."""
    target_state = target.state_dict()
    missing = sorted(set(mapping.values()) - set(source))
    if missing:
        raise W2vBertConversionError(f"weights missing from the source model: {missing[:5]} (of {len(missing)})")
    weights = {key: source[mapping[key]].reshape(value.shape) for key, value in target_state.items()}
    result = target.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result


def from_wav2vec2_bert(model: Wav2Vec2BertModel | Wav2Vec2BertForCTC) -> ConformerSslModel | ConformerSslForCTC:
    """Our `ConformerSslModel` / `ConformerSslForCTC` with `model`'s weights, in eval mode.

    Every weight of `model` is used except `masked_spec_embed` (its SpecAugment fill; see the module docstring).
    """
    if not isinstance(model, (Wav2Vec2BertModel, Wav2Vec2BertForCTC)):
        _refuse("model", type(model).__name__, "a Wav2Vec2BertModel or Wav2Vec2BertForCTC")
    config = config_from_wav2vec2_bert(model.config)
    ours = ConformerSslForCTC(config) if isinstance(model, Wav2Vec2BertForCTC) else ConformerSslModel(config)
    mapping = _key_map(ours)
    source = model.state_dict()
    unused = set(source) - set(mapping.values())
    unused = {key for key in unused if not key.endswith("masked_spec_embed")}
    if unused:
        raise W2vBertConversionError(f"weights of the Wav2Vec2Bert model with no place in ours: {sorted(unused)[:5]}")
    _copy(source, ours, mapping)
    return ours.eval()


def to_wav2vec2_bert(model: ConformerSslModel | ConformerSslForCTC) -> Wav2Vec2BertModel | Wav2Vec2BertForCTC:
    """transformers' `Wav2Vec2BertModel` / `Wav2Vec2BertForCTC` with `model`'s weights, in eval mode (its
    `masked_spec_embed`, used only by its SpecAugment while fine-tuning, is freshly initialised)."""
    if not isinstance(model, (ConformerSslModel, ConformerSslForCTC)):
        _refuse(
            "model",
            type(model).__name__,
            "a ConformerSslModel or ConformerSslForCTC (Wav2Vec2Bert has no pretraining model with our objectives)",
        )
    config = config_to_wav2vec2_bert(model.config)
    theirs = Wav2Vec2BertForCTC(config) if isinstance(model, ConformerSslForCTC) else Wav2Vec2BertModel(config)
    forward = _key_map(model)
    mapping = {their: our for our, their in forward.items()}
    source = model.state_dict()
    keep = {key for key in theirs.state_dict() if key.endswith("masked_spec_embed")}
    target_keys = set(theirs.state_dict()) - keep
    if set(mapping) != target_keys:
        raise W2vBertConversionError(
            f"key sets differ: only ours {sorted(set(mapping) - target_keys)[:5]}, "
            f"only theirs {sorted(target_keys - set(mapping))[:5]}"
        )
    weights = {key: source[mapping[key]].reshape(theirs.state_dict()[key].shape) for key in target_keys}
    theirs.load_state_dict(weights, strict=False)
    return theirs.eval()


__all__ = [
    "W2vBertConversionError",
    "config_from_wav2vec2_bert",
    "config_to_wav2vec2_bert",
    "feature_extractor_for",
    "from_wav2vec2_bert",
    "to_wav2vec2_bert",
]
