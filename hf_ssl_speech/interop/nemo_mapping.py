"""How NeMo's settings and parameter names map to ours, both ways: pure functions, no archive reading.

`nemo.py` reads a `.nemo` archive and builds our models with these; `convert_preprocessor` /
`convert_encoder_config` turn NeMo config sections into our settings (refusing what has no exact counterpart),
`nemo_encoder_key_to_ours` / `our_encoder_key_to_nemo` rename parameters, and `nemo_preprocessor_config` /
`nemo_encoder_config` write the NeMo sections that describe one of our models.
"""

from __future__ import annotations

import math
import re

import torch

from ..configuration_conformer_ssl import ConformerSslConfig
from ..feature_extraction_conformer_ssl import LOG_ZERO_GUARD, ConformerSslFeatureExtractor


class NemoConversionError(ValueError):
    """A checkpoint, or a part of it, that has no exact counterpart in our classes. The message says which."""


# ----------------------------------------------------------------------------------------------- settings


def target_name(section: dict | None) -> str:
    """The class name of a Hydra section (`_target_: a.b.ClassName` -> "ClassName")."""
    return str((section or {}).get("_target_", "")).rsplit(".", 1)[-1]


def refuse(problems: list[str], what: str) -> None:
    if problems:
        raise NemoConversionError(f"{what} cannot be represented exactly:\n  - " + "\n  - ".join(problems))


# Preprocessor keys that change nothing in eval-mode features (or only padded frames), with the reason.
_PREPROCESSOR_IGNORED = {
    "_target_": "checked separately",
    "pad_to": "pads the batch to a multiple of frames; padded frames are masked",
    "pad_value": "value of padded frames, which the encoder masks",
    "nb_augmentation_prob": "narrow-band augmentation, training only",
    "nb_max_freq": "narrow-band augmentation, training only",
    "stft_conv": "deprecated flag, no effect",
    "use_grads": "autograd through the front end, no effect on values",
    "rng": "random generator of the training-time augmentations",
}
# Preprocessor keys whose value must be NeMo's default: our feature extractor implements only that.
_PREPROCESSOR_FIXED = {
    "window": "hann",
    "normalize": "per_feature",
    "log": True,
    "log_zero_guard_type": "add",
    "log_zero_guard_value": LOG_ZERO_GUARD,
    "frame_splicing": 1,
    "exact_pad": False,
    "stft_exact_pad": False,
    "mag_power": 2.0,
    "mel_norm": "slaney",
    "lowfreq": 0,
}
_PREPROCESSOR_MAPPED = (
    "sample_rate",
    "window_size",
    "window_stride",
    "n_window_size",
    "n_window_stride",
    "n_fft",
    "features",
    "dither",
    "preemph",
    "highfreq",
)


def convert_preprocessor(preprocessor: dict) -> tuple[ConformerSslFeatureExtractor, list[str]]:
    """`ConformerSslFeatureExtractor` for a NeMo AudioToMelSpectrogramPreprocessor section.

    Returns the extractor and notes (settings that were dropped because they do not change eval features).
    """
    if target_name(preprocessor) != "AudioToMelSpectrogramPreprocessor":
        raise NemoConversionError(
            f"preprocessor._target_={preprocessor.get('_target_')!r}: only AudioToMelSpectrogramPreprocessor "
            "(log-mel) front ends can be converted"
        )
    problems, notes = [], []
    for key, expected in _PREPROCESSOR_FIXED.items():
        value = preprocessor.get(key, expected)
        same = (
            math.isclose(value, expected)
            if isinstance(expected, float) and isinstance(value, (int, float))
            else value == expected
        )
        if not same:
            problems.append(f"preprocessor.{key}={value!r} (ours implements only {expected!r})")
    unknown = sorted(
        set(preprocessor) - set(_PREPROCESSOR_FIXED) - set(_PREPROCESSOR_IGNORED) - set(_PREPROCESSOR_MAPPED)
    )
    problems += [f"preprocessor.{key}={preprocessor[key]!r} (unknown setting)" for key in unknown]
    sample_rate = int(preprocessor.get("sample_rate", 16000))

    def samples(size_key: str, count_key: str, default_seconds: float) -> int:
        if preprocessor.get(count_key) is not None:
            return int(preprocessor[count_key])
        seconds = preprocessor.get(size_key, default_seconds)
        value = seconds * sample_rate
        if abs(value - round(value)) > 1e-6:
            problems.append(f"preprocessor.{size_key}={seconds} is not a whole number of samples at {sample_rate} Hz")
        return int(round(value))

    win_length = samples("window_size", "n_window_size", 0.02)
    hop_length = samples("window_stride", "n_window_stride", 0.01)
    n_fft = preprocessor.get("n_fft") or 2 ** math.ceil(math.log2(win_length))
    highfreq = preprocessor.get("highfreq")
    if highfreq is not None and not math.isclose(float(highfreq), sample_rate / 2):
        problems.append(f"preprocessor.highfreq={highfreq} (ours uses sample_rate / 2 = {sample_rate / 2})")
    preemphasis = preprocessor.get("preemph", 0.97)
    refuse(problems, "the NeMo preprocessor")
    if float(preprocessor.get("nb_augmentation_prob", 0.0) or 0.0) > 0:
        notes.append(
            f"preprocessor.nb_augmentation_prob={preprocessor['nb_augmentation_prob']} not carried over "
            "(narrow-band augmentation, training only)"
        )
    extractor = ConformerSslFeatureExtractor(
        feature_size=int(preprocessor.get("features", 64)),
        sampling_rate=sample_rate,
        hop_length=hop_length,
        n_fft=int(n_fft),
        win_length=win_length,
        preemphasis=float(preemphasis or 0.0),
        dither=float(preprocessor.get("dither", 1e-5)),
    )
    return extractor, notes


def check_featurizer_buffers(extractor: ConformerSslFeatureExtractor, state_dict: dict[str, torch.Tensor]) -> None:
    """Compare NeMo's stored mel filterbank and window with ours: a different front end must not pass unnoticed."""
    filterbank = state_dict.get("preprocessor.featurizer.fb")
    if filterbank is not None:
        ours = extractor.mel_filters.to(torch.float64)
        theirs = filterbank.reshape(filterbank.shape[-2:]).to(torch.float64)
        if theirs.shape != ours.shape or (theirs - ours).abs().max() > 1e-5 * max(1.0, float(ours.abs().max())):
            raise NemoConversionError(
                f"preprocessor.featurizer.fb {tuple(filterbank.shape)} differs from our slaney mel filterbank "
                f"{tuple(ours.shape)}: the checkpoint's mel front end is not the one its config describes or not ours"
            )
    window = state_dict.get("preprocessor.featurizer.window")
    if window is not None:
        ours = torch.hann_window(extractor.win_length, periodic=False, dtype=torch.float64)
        if window.shape != ours.shape or (window.to(torch.float64) - ours).abs().max() > 1e-6:
            raise NemoConversionError(
                f"preprocessor.featurizer.window is not a symmetric Hann window of {extractor.win_length} samples"
            )


# ConformerEncoder settings: mapped to a config field (name -> ours), ignored (with the reason), or fixed.
_ENCODER_MAPPED = {
    "feat_in": "num_mel_bins",
    "n_layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "conv_kernel_size": "conv_depthwise_kernel_size",
    "subsampling": "subsampling",
    "subsampling_factor": "subsampling_factor",
    "subsampling_conv_channels": "subsampling_conv_channels",
    "pos_emb_max_len": "max_position_embeddings",
    "xscaling": "xscaling",
    "dropout": "hidden_dropout",
    "dropout_pre_encoder": "feat_proj_dropout",
    "dropout_emb": "dropout_positions",
    "dropout_att": "attention_dropout",
}
_ENCODER_IGNORED = {
    "_target_": "checked separately",
    "ff_expansion_factor": "becomes intermediate_size = d_model * ff_expansion_factor",
    "use_bias": "becomes attention_bias and convolution_bias",
    "conv_norm_type": "becomes conv_norm_type",
    "untie_biases": "shared u/v biases are copied into every layer (they train separately from here on)",
    "stochastic_depth_drop_prob": "stochastic depth (training only); set layerdrop when fine-tuning",
    "stochastic_depth_mode": "stochastic depth (training only)",
    "stochastic_depth_start_layer": "stochastic depth (training only)",
    "subsampling_conv_chunking_factor": "memory chunking of the subsampling convs, same values",
    "use_pytorch_sdpa": "attention kernel choice, same values",
    "use_pytorch_sdpa_backends": "attention kernel choice, same values",
    "sync_max_audio_length": "multi-GPU position-table sizing, same values",
    "att_context_style": "only matters with a limited attention context (refused)",
    "att_context_probs": "only matters with several attention contexts (refused)",
    "conv_context_style": "only matters with a limited conv context (refused)",
    "global_attn_separate": "only matters with global tokens (refused)",
    "global_tokens_spacing": "only matters with global tokens (refused)",
}


def convert_encoder_config(encoder: dict) -> tuple[dict, list[str]]:
    """ConformerSslConfig keyword arguments for a NeMo ConformerEncoder section, and notes on what was dropped."""
    if target_name(encoder) != "ConformerEncoder":
        raise NemoConversionError(
            f"encoder._target_={encoder.get('_target_')!r}: only ConformerEncoder (Conformer / FastConformer) "
            "encoders can be converted"
        )
    problems, notes = [], []
    d_model, kernel = int(encoder["d_model"]), int(encoder.get("conv_kernel_size", 31))
    if encoder.get("subsampling", "striding") not in ("striding", "dw_striding"):
        problems.append(f"encoder.subsampling={encoder['subsampling']!r} (ours: 'striding' or 'dw_striding')")
    if encoder.get("causal_downsampling", False):
        problems.append(
            "encoder.causal_downsampling=True (NeMo pads its causal subsampling convs by (2, 1) on both the time and "
            "mel axes, which changes the output lengths and the mel grid; our causal front end pads time by (2, 0))"
        )
    if encoder.get("self_attention_model", "rel_pos") != "rel_pos":
        problems.append(f"encoder.self_attention_model={encoder['self_attention_model']!r} (ours: 'rel_pos')")
    context = encoder.get("att_context_size")
    if context is not None and [int(c) for c in context] != [-1, -1]:
        problems.append(
            f"encoder.att_context_size={context!r} (ours: unlimited context [-1, -1]; our `causal` also "
            "makes the subsampling causal, which NeMo does differently)"
        )
    conv_context = encoder.get("conv_context_size")
    symmetric = [(kernel - 1) // 2, (kernel - 1) // 2]
    if conv_context is not None and conv_context != symmetric:
        problems.append(
            f"encoder.conv_context_size={conv_context!r} (ours: centred {symmetric}; a causal conv "
            "context alone, without causal attention and subsampling, is not one of our settings)"
        )
    feat_out = encoder.get("feat_out", -1)
    if feat_out not in (-1, None, d_model) and feat_out > 0:
        problems.append(f"encoder.feat_out={feat_out} (an output projection, ours has none)")
    if encoder.get("reduction") or int(encoder.get("reduction_factor", 1) or 1) > 1:
        problems.append(f"encoder.reduction={encoder.get('reduction')!r} (time reduction inside the encoder)")
    if int(encoder.get("global_tokens", 0) or 0) > 0:
        problems.append(f"encoder.global_tokens={encoder['global_tokens']}")
    if encoder.get("att_chunk_context_size") is not None:
        problems.append(f"encoder.att_chunk_context_size={encoder['att_chunk_context_size']!r}")
    norm = encoder.get("conv_norm_type", "batch_norm")
    if norm not in ("batch_norm", "layer_norm", "fused_batch_norm"):
        problems.append(f"encoder.conv_norm_type={norm!r} (ours: batch_norm, layer_norm; fused_batch_norm as BN)")
    known = (
        set(_ENCODER_MAPPED)
        | set(_ENCODER_IGNORED)
        | {
            "causal_downsampling",
            "self_attention_model",
            "att_context_size",
            "conv_context_size",
            "feat_out",
            "reduction",
            "reduction_position",
            "reduction_factor",
            "global_tokens",
            "att_chunk_context_size",
        }
    )
    problems += [f"encoder.{k}={encoder[k]!r} (unknown setting)" for k in sorted(set(encoder) - known)]
    refuse(problems, "the NeMo encoder")

    kwargs = {ours: encoder[theirs] for theirs, ours in _ENCODER_MAPPED.items() if theirs in encoder}
    kwargs["subsampling"] = encoder.get("subsampling", "striding")
    kwargs["subsampling_factor"] = int(encoder.get("subsampling_factor", 4))
    kwargs["intermediate_size"] = d_model * int(encoder.get("ff_expansion_factor", 4))
    kwargs["conv_depthwise_kernel_size"] = kernel
    kwargs["conv_norm_type"] = "layer_norm" if norm == "layer_norm" else "batch_norm"
    kwargs["attention_bias"] = kwargs["convolution_bias"] = bool(encoder.get("use_bias", True))
    kwargs["activation_dropout"] = float(encoder.get("dropout", 0.1))  # NeMo's feed-forward dropout is `dropout`
    kwargs["layerdrop"] = 0.0
    kwargs["causal"] = False
    kwargs["hidden_act"] = "silu"
    kwargs["layer_norm_eps"] = 1e-5
    if float(encoder.get("stochastic_depth_drop_prob", 0.0) or 0.0) > 0:
        notes.append(
            f"encoder.stochastic_depth_drop_prob={encoder['stochastic_depth_drop_prob']} not carried over "
            "(training-time regulariser; set `layerdrop` to fine-tune with one)"
        )
    if norm == "fused_batch_norm":
        notes.append(
            "conv_norm_type=fused_batch_norm became batch_norm with running mean 0 and variance 1 - eps: "
            "identical in eval mode; in training it normalises by batch statistics, unlike NeMo's affine"
        )
    if not encoder.get("untie_biases", True):
        notes.append("NeMo shared pos_bias_u/v across layers (untie_biases=false); each layer now holds a copy")
    return kwargs, notes


# ----------------------------------------------------------------------------------------------- weights

# Per-layer module names: NeMo -> ours (longest prefix wins); names not listed are the same on both sides.
_LAYER_RENAMES = {
    "self_attn.linear_q": "self_attn.q_proj",
    "self_attn.linear_k": "self_attn.k_proj",
    "self_attn.linear_v": "self_attn.v_proj",
    "self_attn.linear_out": "self_attn.o_proj",
    "self_attn.linear_pos": "self_attn.relative_k_proj",
    "self_attn.pos_bias_u": "self_attn.bias_u",
    "self_attn.pos_bias_v": "self_attn.bias_v",
    "conv.batch_norm": "conv.norm",
}
_LAYER_SAME = (
    "norm_feed_forward1",
    "feed_forward1.linear1",
    "feed_forward1.linear2",
    "norm_self_att",
    "norm_conv",
    "conv.pointwise_conv1",
    "conv.depthwise_conv",
    "conv.pointwise_conv2",
    "norm_feed_forward2",
    "feed_forward2.linear1",
    "feed_forward2.linear2",
    "norm_out",
)
_POINTWISE = ("conv.pointwise_conv1.weight", "conv.pointwise_conv2.weight")
_ENCODER_KEY = re.compile(
    r"encoder\.(?:pre_encode\.conv\.(\d+)\.(weight|bias)|pre_encode\.out\.(weight|bias)|"
    r"layers\.(\d+)\.(.+))"
)


def _rename_layer_key(rest: str) -> str | None:
    """Map a per-layer name (self_attn.linear_q.weight -> self_attn.q_proj.weight); None if not a Conformer layer's."""
    for theirs in sorted(_LAYER_RENAMES, key=len, reverse=True):
        if rest == theirs or rest.startswith(theirs + "."):
            return _LAYER_RENAMES[theirs] + rest[len(theirs) :]
    for same in _LAYER_SAME:
        if rest.startswith(same + "."):
            return rest
    return None


def nemo_encoder_key_to_ours(key: str) -> str | None:
    """A NeMo `encoder.*` parameter name -> the `ConformerSslModel` name, or None when it has no counterpart."""
    match = _ENCODER_KEY.fullmatch(key)
    if match is None:
        return None
    conv, conv_param, out_param, layer, rest = match.groups()
    if conv is not None:
        return f"subsampling.layers.{conv}.{conv_param}"
    if out_param is not None:
        return f"subsampling.linear.{out_param}"
    renamed = _rename_layer_key(rest)
    return None if renamed is None else f"layers.{layer}.{renamed}"


def check_rel_pos(position_embeddings_type: str) -> None:
    """NeMo's ConformerEncoder has our "rel_pos" attention only: refuse the other position types by name."""
    if position_embeddings_type != "rel_pos":
        raise NemoConversionError(
            f"ConformerSslConfig.position_embeddings_type={position_embeddings_type!r} has no NeMo ConformerEncoder "
            "equivalent (NeMo's self_attention_model='rel_pos' is ours 'rel_pos'): keep this model in our classes, "
            "or pretrain with position_embeddings_type='rel_pos' to export to NeMo"
        )


def our_encoder_key_to_nemo(key: str) -> str:
    """The inverse of `nemo_encoder_key_to_ours` for every `ConformerSslModel` state-dict name."""
    if key.startswith("subsampling.layers."):
        return "encoder.pre_encode.conv." + key[len("subsampling.layers.") :]
    if key.startswith("subsampling.linear."):
        return "encoder.pre_encode.out." + key[len("subsampling.linear.") :]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if match is None:
        raise KeyError(f"{key}: not a ConformerSslModel encoder weight")
    rest = match.group(2)
    for theirs, ours in sorted(_LAYER_RENAMES.items(), key=lambda item: len(item[1]), reverse=True):
        if rest == ours or rest.startswith(ours + "."):
            return f"encoder.layers.{match.group(1)}.{theirs}{rest[len(ours) :]}"
    return f"encoder.layers.{match.group(1)}.{rest}"


def encoder_state_dict_to_ours(
    state_dict: dict[str, torch.Tensor], fused_batch_norm: bool = False
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """NeMo `encoder.*` tensors -> `ConformerSslModel` names. Returns (ours, the NeMo keys used)."""
    ours, used = {}, set()
    for key, value in state_dict.items():
        name = nemo_encoder_key_to_ours(key)
        if name is None:
            continue
        if name.endswith(_POINTWISE):
            if value.dim() != 3 or value.shape[-1] != 1:
                raise NemoConversionError(f"{key}: expected a 1x1 Conv1d weight (out, in, 1), got {tuple(value.shape)}")
            value = value.squeeze(-1)
        ours[name] = value
        used.add(key)
    if fused_batch_norm:
        # FusedBatchNorm1d is x * weight + bias: BatchNorm with mean 0 and var + eps = 1 computes exactly that.
        for name in [k for k in ours if k.endswith("conv.norm.weight")]:
            prefix = name[: -len("weight")]
            channels = ours[name].shape[0]
            ours[prefix + "running_mean"] = torch.zeros(channels)
            ours[prefix + "running_var"] = torch.full((channels,), 1.0 - 1e-5)
            ours[prefix + "num_batches_tracked"] = torch.tensor(0)
    return ours, used


def our_encoder_state_dict_to_nemo(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ConformerSslModel` tensors -> NeMo `encoder.*` names (the inverse map; pointwise weights regain (out, in, 1)).

    Only a "rel_pos" encoder has NeMo names for its attention: a state dict without the rel-pos projection (rotary)
    or with WavLM's gate and bucket table (gated_rel_pos) is refused."""
    attention = {key for key in state_dict if ".self_attn." in key}
    if any(".self_attn.gate_" in key for key in attention):
        check_rel_pos("gated_rel_pos")
    if attention and not any(key.endswith(".self_attn.relative_k_proj.weight") for key in attention):
        check_rel_pos("rotary")
    theirs = {}
    for key, value in state_dict.items():
        if key.endswith(_POINTWISE):
            value = value.unsqueeze(-1)
        theirs[our_encoder_key_to_nemo(key)] = value
    return theirs


def conv1x1_to_linear(weight: torch.Tensor, key: str) -> torch.Tensor:
    if weight.dim() != 3 or weight.shape[-1] != 1:
        raise NemoConversionError(f"{key}: expected a 1x1 Conv1d weight (out, in, 1), got {tuple(weight.shape)}")
    return weight.squeeze(-1)


def multisoftmax_rows_to_book_major(tensor: torch.Tensor, num_classes: int, num_books: int) -> torch.Tensor:
    """NeMo's MultiSoftmaxDecoder output channel c * books + h (class-major) -> our bestrq_head row h * classes + c."""
    return tensor.reshape(num_classes, num_books, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def book_major_rows_to_multisoftmax(tensor: torch.Tensor, num_classes: int, num_books: int) -> torch.Tensor:
    """The inverse of `multisoftmax_rows_to_book_major`."""
    return tensor.reshape(num_books, num_classes, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def rpq_projection_to_ours(weight: torch.Tensor, num_books: int) -> torch.Tensor:
    """NeMo `quantizer.proj.weight` (books * dim, input) -> our `projection` (books, input, dim)."""
    return weight.reshape(num_books, -1, weight.shape[-1]).transpose(1, 2).contiguous()


def rpq_projection_to_nemo(projection: torch.Tensor) -> torch.Tensor:
    """Our `projection` (books, input, dim) -> NeMo `quantizer.proj.weight` (books * dim, input)."""
    return projection.transpose(1, 2).reshape(-1, projection.shape[1]).contiguous()


# ----------------------------------------------------------------------------------------------- inverse (export)


def nemo_preprocessor_config(extractor: ConformerSslFeatureExtractor) -> dict:
    """The NeMo AudioToMelSpectrogramPreprocessor section describing our feature extractor (inverse mapping)."""
    return {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": extractor.sampling_rate,
        "normalize": "per_feature",
        "n_window_size": extractor.win_length,
        "n_window_stride": extractor.hop_length,
        "window": "hann",
        "features": extractor.feature_size,
        "n_fft": extractor.n_fft,
        "preemph": extractor.preemphasis,
        "log": True,
        "frame_splicing": 1,
        "dither": extractor.dither,
        "pad_to": 16,
        "pad_value": 0.0,
    }


def nemo_encoder_config(config: ConformerSslConfig) -> dict:
    """The NeMo ConformerEncoder section of the same network as `config` (inverse mapping; non-causal only)."""
    if config.causal:
        raise NemoConversionError("causal=True has no NeMo ConformerEncoder equivalent (see convert_encoder_config)")
    check_rel_pos(config.position_embeddings_type)
    if config.intermediate_size % config.hidden_size:
        raise NemoConversionError(f"intermediate_size={config.intermediate_size} is not a multiple of hidden_size")
    section = {theirs: getattr(config, ours) for theirs, ours in _ENCODER_MAPPED.items()}
    section.update(
        _target_="nemo.collections.asr.modules.ConformerEncoder",
        feat_out=-1,
        ff_expansion_factor=config.intermediate_size // config.hidden_size,
        self_attention_model="rel_pos",
        att_context_size=[-1, -1],
        untie_biases=True,
        conv_norm_type=config.conv_norm_type,
        use_bias=config.attention_bias,
        causal_downsampling=False,
    )
    return section
