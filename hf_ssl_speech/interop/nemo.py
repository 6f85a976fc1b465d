"""Convert NeMo `.nemo` checkpoints (Conformer / FastConformer SSL and CTC models) into our transformers classes.

A `.nemo` file is a tar archive holding `model_config.yaml` (the model's Hydra config), `model_weights.ckpt` (a
plain `state_dict`) and artifacts such as a SentencePiece tokenizer (members may be prefixed by "./"). This module
reads the archive itself, without NeMo (the name and setting maps are `nemo_mapping.py`): the weights are loaded with `torch.load(..., weights_only=True)`, so a
checkpoint holding anything but tensors and plain containers is refused instead of executed.

What is mapped (NeMo name -> ours; pointwise convs are Conv1d (out, in, 1) in NeMo and Linear (out, in) here):
- `preprocessor` (AudioToMelSpectrogramPreprocessor) -> `ConformerSslFeatureExtractor` settings; its stored
  mel filterbank and window are compared with ours, so a silently different front end cannot pass.
- `encoder` (ConformerEncoder, `striding` or `dw_striding`, batch/layer/fused-batch norm, rel-pos) ->
  `ConformerSslModel`: `pre_encode.conv.{i}` -> `subsampling.layers.{i}`, `pre_encode.out` -> `subsampling.linear`,
  `layers.{n}.self_attn.linear_{q,k,v,out,pos}` -> `{q,k,v,o,relative_k}_proj`, `pos_bias_{u,v}` -> `bias_{u,v}`,
  `conv.batch_norm` -> `conv.norm`; the other per-layer names are the same.
- CTC models (`EncDecCTCModel`, `EncDecCTCModelBPE`): `decoder.decoder_layers.0` -> `lm_head` of
  `ConformerSslForCTC` (blank = last class = `pad_token_id`), with a `Wav2Vec2CTCTokenizer` (characters) or a
  `ParakeetTokenizer` converted from the SentencePiece model (BPE).
- NEST / BEST-RQ (`EncDecMaskedTokenPredModel`, `EncDecDenoiseMaskedTokenPredModel`): `quantizer.proj` /
  `quantizer.codebooks` -> `bestrq_quantizer.projection` / `.codebooks`, `decoder` (MultiSoftmaxDecoder) ->
  `bestrq_head` (its class-major rows reordered book-major), `mask_processor.mask_embedding` -> `masked_spec_embed`.
- Contrastive SSL (`SpeechEncDecSelfSupervisedModel`): the Gumbel quantizer of the contrastive loss ->
  `quantizer` and the MLM decoder -> `mlm_head`. The contrastive prediction head (`ConvASRDecoderReconstruction`:
  1x1 conv, ReLU, 1x1 conv) has no counterpart in our single-Linear `project_hid`, so the contrastive objective
  itself cannot be carried over: conversion refuses, or drops it when asked (`drop_unmappable=True`).

Anything else is refused with the names of the keys or settings involved; nothing is left at a random
initialisation: every parameter and buffer of the target model must be written from the checkpoint.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..configuration_conformer_ssl import ConformerSslConfig
from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from ..modeling_conformer_ssl import ConformerSslForCTC, ConformerSslForPreTraining, ConformerSslModel
from .nemo_mapping import (
    NemoConversionError,
    check_featurizer_buffers,
    conv1x1_to_linear,
    convert_encoder_config,
    convert_preprocessor,
    encoder_state_dict_to_ours,
    multisoftmax_rows_to_book_major,
    nemo_encoder_config,
    nemo_encoder_key_to_ours,
    nemo_preprocessor_config,
    our_encoder_key_to_nemo,
    our_encoder_state_dict_to_nemo,
    refuse,
    rpq_projection_to_ours,
    target_name,
)

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
DEFAULT_LICENSE = "unknown — check the source"

# NeMo model classes (the `target` recorded in model_config.yaml) -> what we convert them to.
MODEL_KINDS = {
    "EncDecCTCModel": "ctc",
    "EncDecCTCModelBPE": "ctc",
    "EncDecMaskedTokenPredModel": "nest",
    "EncDecDenoiseMaskedTokenPredModel": "nest",
    "SpeechEncDecSelfSupervisedModel": "contrastive",
}


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class NemoCheckpoint:
    """The contents of a `.nemo` archive.

    config: model_config.yaml as a dict (`${...}` references resolved).
    state_dict: NeMo parameter name -> tensor, from model_weights.ckpt.
    artifacts: every other regular member, by its name without the leading "./" (tokenizer files, ...).
    path: where it was read from.
    """

    config: dict
    state_dict: dict[str, torch.Tensor]
    artifacts: dict[str, bytes]
    path: Path


def _member_name(name: str) -> str:
    """NeMo writes members as "./model_config.yaml"; older archives without the prefix."""
    while name.startswith("./"):
        name = name[2:]
    return name


def load_weights(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """A state dict from checkpoint bytes, loaded with `weights_only=True` (no arbitrary unpickling).

    NeMo's model_weights.ckpt is a plain (Ordered)dict of tensors, which the restricted unpickler accepts without
    extra safe globals; a Lightning-style {"state_dict": {...}} wrapper is unwrapped. Anything else is refused.
    """
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise NemoConversionError(
            f"{source}: refused by torch.load(weights_only=True): the checkpoint contains objects other than "
            f"tensors and plain containers, which would run arbitrary code to load ({str(error).splitlines()[0]}). "
            "Only load it with NeMo if you trust its origin, then re-save `model.state_dict()`."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise NemoConversionError(f"{source}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
    not_tensors = sorted(k for k, v in loaded.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise NemoConversionError(f"{source}: these entries are not tensors: {not_tensors}")
    return dict(loaded)


_REFERENCE = re.compile(r"\$\{([^}]+)\}")


def _resolve_references(config: dict) -> dict:
    """Resolve OmegaConf interpolations `${a.b}` (absolute, optionally prefixed by "model.") in string values."""

    def lookup(path: str) -> Any:
        node: Any = config
        parts = path.split(".")
        if parts[0] == "model" and "model" not in config:
            parts = parts[1:]
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                raise NemoConversionError(f"{CONFIG_MEMBER}: cannot resolve the reference ${{{path}}}")
            node = node[part]
        return resolve(node)

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if isinstance(node, str):
            whole = _REFERENCE.fullmatch(node)
            if whole:
                return lookup(whole.group(1))
            if _REFERENCE.search(node):
                return _REFERENCE.sub(lambda m: str(lookup(m.group(1))), node)
        return node

    return resolve(config)


def read_nemo(path: str | Path) -> NemoCheckpoint:
    """Read a `.nemo` archive (plain or gzipped tar) into memory, without extracting anything to disk."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .nemo file")
    try:
        archive = tarfile.open(path, "r:*")
    except tarfile.ReadError as error:
        raise NemoConversionError(
            f"{path}: not a tar archive ({error}); a .nemo file is a tar of {CONFIG_MEMBER} + {WEIGHTS_MEMBER}"
        ) from error
    members: dict[str, bytes] = {}
    with archive:
        for member in archive.getmembers():
            if member.isfile():
                members[_member_name(member.name)] = archive.extractfile(member).read()
    for required in (CONFIG_MEMBER, WEIGHTS_MEMBER):
        if required not in members:
            raise NemoConversionError(
                f"{path}: no {required} in the archive (members: {sorted(members)}); distributed (Megatron) "
                "checkpoints are not supported"
            )
    config = yaml.safe_load(members.pop(CONFIG_MEMBER).decode("utf-8"))
    if not isinstance(config, dict):
        raise NemoConversionError(f"{path}: {CONFIG_MEMBER} is not a mapping")
    state_dict = load_weights(members.pop(WEIGHTS_MEMBER), f"{path}:{WEIGHTS_MEMBER}")
    return NemoCheckpoint(_resolve_references(config), state_dict, members, path)


# ----------------------------------------------------------------------------------------------- heads


@dataclass
class HeadPlan:
    """What a model kind adds on top of the encoder: config fields, mapped weights, used / refused NeMo keys."""

    config: dict = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    unmappable: dict[str, str] = field(default_factory=dict)  # NeMo key -> why it cannot be mapped
    notes: list[str] = field(default_factory=list)
    tokenizer: Any = None


def _ctc_head(checkpoint: NemoCheckpoint) -> HeadPlan:
    """EncDecCTCModel(BPE): ConvASRDecoder 1x1 conv over vocabulary + blank (last) -> lm_head, blank = pad id."""
    plan = HeadPlan()
    state = checkpoint.state_dict
    weight_key, bias_key = "decoder.decoder_layers.0.weight", "decoder.decoder_layers.0.bias"
    if target_name(checkpoint.config.get("decoder")) != "ConvASRDecoder" or weight_key not in state:
        raise NemoConversionError(
            f"decoder._target_={checkpoint.config.get('decoder', {}).get('_target_')!r}: only ConvASRDecoder CTC "
            "heads (decoder.decoder_layers.0) can be converted; pass encoder_only=True for the encoder alone"
        )
    weight = conv1x1_to_linear(state[weight_key], weight_key)
    num_classes = weight.shape[0]
    plan.weights = {"lm_head.weight": weight, "lm_head.bias": state[bias_key]}
    plan.used = {weight_key, bias_key}
    plan.config = {"vocab_size": num_classes, "pad_token_id": num_classes - 1}
    plan.tokenizer, tokenizer_notes = build_ctc_tokenizer(checkpoint, num_classes)
    plan.notes += tokenizer_notes
    return plan


def build_ctc_tokenizer(checkpoint: NemoCheckpoint, num_classes: int) -> tuple[Any, list[str]]:
    """The tokenizer of a NeMo CTC model: characters -> Wav2Vec2CTCTokenizer, SentencePiece -> ParakeetTokenizer.

    Ids follow NeMo: token i is NeMo's label i and the blank is the last class (`<pad>` here). Returns (tokenizer
    or None, notes); None when the SentencePiece model cannot be converted (its files are then written as is).
    """
    config = checkpoint.config
    if "tokenizer" in config:
        return _bpe_tokenizer(checkpoint, num_classes)
    labels = config.get("labels") or (config.get("decoder") or {}).get("vocabulary")
    if not labels:
        raise NemoConversionError("no `labels` / `decoder.vocabulary` in the config: cannot build the CTC vocabulary")
    labels = list(labels)
    if len(labels) + 1 != num_classes:
        raise NemoConversionError(
            f"decoder has {num_classes} classes but the vocabulary has {len(labels)} labels + blank"
        )
    if "|" in labels or "<pad>" in labels:
        raise NemoConversionError(
            "the NeMo vocabulary contains '|' or '<pad>', which our CTC tokenizer reserves for "
            "the word delimiter and the blank"
        )
    from transformers import Wav2Vec2CTCTokenizer

    vocab = {("|" if label == " " else label): index for index, label in enumerate(labels)}
    vocab["<pad>"] = len(labels)
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
        # No <unk>: NeMo's vocabulary has none (its char parser drops unknown characters); adding one would grow
        # the vocabulary past the CTC head. Normalise transcripts to the vocabulary before tokenising.
        tokenizer = Wav2Vec2CTCTokenizer(
            str(vocab_file),
            unk_token=None,
            pad_token="<pad>",
            word_delimiter_token="|",
            bos_token=None,
            eos_token=None,
            do_lower_case=False,
        )
    if len(tokenizer) != num_classes or tokenizer.pad_token_id != num_classes - 1:
        raise NemoConversionError(
            f"built a tokenizer of {len(tokenizer)} tokens / pad {tokenizer.pad_token_id}, "
            f"expected {num_classes} / {num_classes - 1}"
        )
    notes = [
        "character vocabulary from NeMo's labels: '|' stands for the space, '<pad>' (last id) is the CTC blank; "
        "it has no <unk>, so transcripts must be normalised to these characters (NeMo drops the others)"
    ]
    return tokenizer, notes


def _artifact(checkpoint: NemoCheckpoint, reference: str | None) -> tuple[str, bytes] | None:
    """A "nemo:<member>" config reference -> (member name, bytes)."""
    if not reference:
        return None
    name = Path(str(reference).removeprefix("nemo:")).name
    return (name, checkpoint.artifacts[name]) if name in checkpoint.artifacts else None


def _bpe_tokenizer(checkpoint: NemoCheckpoint, num_classes: int) -> tuple[Any, list[str]]:
    tokenizer_config = checkpoint.config["tokenizer"]
    if tokenizer_config.get("type") not in ("bpe", "wpe"):
        raise NemoConversionError(
            f"tokenizer.type={tokenizer_config.get('type')!r}: only 'bpe' (SentencePiece) tokenizers are supported"
        )
    model = _artifact(checkpoint, tokenizer_config.get("model_path"))
    if tokenizer_config.get("type") != "bpe" or model is None:
        raise NemoConversionError(
            f"tokenizer: no SentencePiece model in the archive (model_path={tokenizer_config.get('model_path')!r})"
        )
    try:
        from tokenizers import AddedToken
        from transformers import ParakeetTokenizer
        from transformers.convert_slow_tokenizer import ParakeetConverter

        with tempfile.TemporaryDirectory() as folder:
            model_file = Path(folder) / "tokenizer.model"
            model_file.write_bytes(model[1])
            tokenizer = ParakeetTokenizer(
                tokenizer_object=ParakeetConverter(str(model_file)).converted(), clean_up_tokenization_spaces=False
            )
        # NeMo's CTC blank is one past the SentencePiece vocabulary: add it as <pad> (transformers' Parakeet does too).
        tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", normalized=False, special=True)})
    except (ImportError, RuntimeError, ValueError) as error:
        return None, [
            f"the SentencePiece tokenizer could not be converted ({error}); its files are written under "
            "nemo_tokenizer/ for use with sentencepiece"
        ]
    if len(tokenizer) != num_classes or tokenizer.pad_token_id != num_classes - 1:
        raise NemoConversionError(
            f"SentencePiece tokenizer has {len(tokenizer) - 1} pieces + blank, but the CTC "
            f"head has {num_classes} classes"
        )
    return tokenizer, [
        "SentencePiece BPE tokenizer converted to a ParakeetTokenizer (CTC decoding merges repeats "
        "and drops the blank '<pad>', the last id)"
    ]


def _nest_head(checkpoint: NemoCheckpoint, factor: int, num_mel_bins: int) -> HeadPlan:
    """NEST / BEST-RQ: random-projection quantizer + MultiSoftmaxDecoder -> the `bestrq` objective."""
    config, state, plan = checkpoint.config, checkpoint.state_dict, HeadPlan()
    quantizer, decoder, masking = config.get("quantizer", {}), config.get("decoder", {}), config.get("masking", {})
    problems = []
    if target_name(quantizer) != "RandomProjectionVectorQuantizer":
        problems.append(f"quantizer._target_={quantizer.get('_target_')!r}")
    if target_name(decoder) != "MultiSoftmaxDecoder":
        problems.append(f"decoder._target_={decoder.get('_target_')!r} (expected MultiSoftmaxDecoder)")
    if config.get("mask_position", "pre_conv") != "pre_conv":
        problems.append(
            f"mask_position={config['mask_position']!r} (ours masks and quantizes log-mel frames, 'pre_conv')"
        )
    if int(quantizer.get("combine_time_steps", 1)) != factor or int(quantizer.get("feat_in", 0)) != num_mel_bins:
        problems.append(
            f"quantizer stacks {quantizer.get('combine_time_steps')} frames of {quantizer.get('feat_in')} "
            f"features (ours: subsampling_factor={factor} frames of {num_mel_bins})"
        )
    if quantizer.get("time_ahead", False):
        problems.append("quantizer.time_ahead=True")
    refuse(problems, "the NEST quantizer / decoder")
    books, classes, dim = int(quantizer["num_books"]), int(quantizer["num_classes"]), int(quantizer["code_dim"])
    if int(decoder.get("num_decoders", 1)) != books or int(decoder["num_classes"]) != classes:
        raise NemoConversionError(
            f"decoder has {decoder.get('num_decoders')} x {decoder.get('num_classes')} outputs "
            f"but the quantizer {books} books x {classes} codes"
        )
    proj, codebooks = state["quantizer.proj.weight"], state["quantizer.codebooks"]
    head_weight = conv1x1_to_linear(state["decoder.decoder_layers.0.weight"], "decoder.decoder_layers.0.weight")
    head_bias = state.get("decoder.decoder_layers.0.bias")
    if head_bias is None:  # use_bias=False: a zero bias computes the same function
        head_bias = torch.zeros(head_weight.shape[0])
        plan.notes.append("NeMo's decoder had no bias (use_bias=false): bestrq_head.bias is zero")
    plan.weights = {
        "bestrq_quantizer.projection": rpq_projection_to_ours(proj.float(), books),
        # NeMo keeps the unit codebooks in float64; ours are float32 (ids agree: see the module docs / notes).
        "bestrq_quantizer.codebooks": codebooks.float(),
        "bestrq_head.weight": multisoftmax_rows_to_book_major(head_weight, classes, books),
        "bestrq_head.bias": multisoftmax_rows_to_book_major(head_bias, classes, books),
    }
    plan.used = {
        "quantizer.proj.weight",
        "quantizer.codebooks",
        "decoder.decoder_layers.0.weight",
        "decoder.decoder_layers.0.bias",
    } & set(state)
    if "mask_processor.mask_embedding" in state:
        plan.weights["masked_spec_embed"] = state["mask_processor.mask_embedding"]
        plan.used.add("mask_processor.mask_embedding")
    plan.config = {
        "objectives": {"bestrq": {"weight": 1.0, "start_step": 0, "layer": -1}},
        "bestrq_num_codebooks": books,
        "bestrq_codebook_size": classes,
        "bestrq_codebook_dim": dim,
        # NeMo's RandomBlockMasking freezes its mask embedding unless told otherwise (freeze=True by default).
        "mask_fill": "frozen" if masking.get("freeze", True) else "learned",
        "mask_token_threshold": float(config.get("loss", {}).get("mask_threshold", 0.8)),
    }
    if target_name(masking) == "RandomBlockMasking":
        plan.config.update(
            mask_strategy="block",
            mask_time_prob=float(masking.get("mask_prob", 0.5)),
            mask_time_length=int(masking.get("block_size", 48)),
        )
        if not masking.get("allow_overlap", False):
            plan.notes.append(
                "NeMo masking used allow_overlap=false (a masked fraction); our block masking draws "
                "overlapping blocks with a start probability: check mask_time_prob"
            )
    plan.notes.append(
        f"quantizer.dist_fn={quantizer.get('dist_fn', 'cosine')!r}: on unit vectors the nearest code "
        "by l2 is the code of highest cosine (|x - c|^2 = 2 - 2 x.c), which is what ours computes"
    )
    # NeMo projects the stacked features as they are; ours standardises them unless told not to.
    plan.config["bestrq_normalize_input"] = False
    return plan


def _contrastive_head(checkpoint: NemoCheckpoint, factor: int, num_mel_bins: int) -> HeadPlan:
    """NeMo SSL Conformer: Gumbel quantizer (from the contrastive loss) + MLM decoder -> `quantizer`, `mlm_head`.

    The contrastive decoder (ConvASRDecoderReconstruction: 1x1 conv -> ReLU -> 1x1 conv) cannot become our
    single-Linear `project_hid`; its keys are reported as unmappable.
    """
    config, state, plan = checkpoint.config, checkpoint.state_dict, HeadPlan()
    if "loss_list" in config:
        entries = {
            name: (f"decoder_losses.{name}.decoder.", f"decoder_losses.{name}.loss.", spec)
            for name, spec in config["loss_list"].items()
            if spec.get("is_active", True)
        }
    else:
        entries = {
            "contrastive": ("decoder_ssl.", "loss.", {"decoder": config.get("decoder"), "loss": config.get("loss")})
        }
    objectives, quantizer_source = {}, None
    for name, (decoder_prefix, loss_prefix, spec) in entries.items():
        loss_type, decoder_type = target_name(spec.get("loss")), target_name(spec.get("decoder"))
        loss_cfg = spec.get("loss") or {}
        decoder_keys = sorted(k for k in state if k.startswith(decoder_prefix))
        loss_keys = sorted(k for k in state if k.startswith(loss_prefix))
        if int(loss_cfg.get("combine_time_steps", factor)) != factor:
            for key in decoder_keys + loss_keys:
                plan.unmappable[key] = (
                    f"{name}: combine_time_steps={loss_cfg.get('combine_time_steps')} != subsampling_factor={factor}"
                )
            continue
        if loss_type == "ContrastiveLoss":
            if loss_cfg.get("quantized_targets", False):
                quantizer_source = (name, loss_prefix + "quantizer.", loss_cfg)
            else:
                for key in loss_keys:
                    plan.unmappable[key] = "contrastive target projection: only used by the contrastive head"
            for key in decoder_keys:
                plan.unmappable[key] = (
                    f"{name}: {decoder_type} (1x1 conv, ReLU, 1x1 conv) has no counterpart in our "
                    "single-Linear contrastive head `project_hid`"
                )
            plan.config.update(
                num_negatives=int(loss_cfg.get("num_negatives", 100)),
                contrastive_logits_temperature=float(loss_cfg.get("logit_temp", 0.1)),
                mask_token_threshold=float(loss_cfg.get("mask_threshold", 0.8)),
            )
        elif loss_type == "MLMLoss" and decoder_type == "ConvASRDecoder":
            objectives["mlm"] = {
                "weight": float(spec.get("loss_alpha", 1.0)),
                "start_step": int(spec.get("start_step", 0)),
                "layer": _layer_index(spec.get("output_from_layer"), name),
                "_decoder": decoder_prefix,
                "_targets_from": spec.get("targets_from_loss"),
            }
        else:
            for key in decoder_keys + loss_keys:
                plan.unmappable[key] = f"{name}: {decoder_type} + {loss_type} has no counterpart here"

    mlm = objectives.get("mlm")
    if mlm is not None and (quantizer_source is None or mlm["_targets_from"] != quantizer_source[0]):
        for key in (k for k in state if k.startswith(mlm["_decoder"])):
            plan.unmappable[key] = "mlm: its targets do not come from a quantized contrastive loss"
        objectives.pop("mlm")
    if quantizer_source is not None:
        source_name, prefix, loss_cfg = quantizer_source
        groups, codes = int(loss_cfg.get("num_groups", 2)), int(loss_cfg.get("codebook_size", 320))
        codevectors = state[prefix + "vars"]  # (1, codes, dim/groups) with NeMo's combine_groups=True
        if prefix + "weight_proj.weight" not in state:
            for key in (k for k in state if k.startswith(prefix)):
                plan.unmappable[key] = "Gumbel quantizer with weight_proj_depth > 1 (ours projects with one Linear)"
        elif "mlm" in objectives:
            shared = codevectors.shape[1] == codes
            table = codevectors[0].expand(groups, -1, -1) if shared else codevectors[0].reshape(groups, codes, -1)
            plan.weights.update(
                {
                    "quantizer.weight_proj.weight": state[prefix + "weight_proj.weight"],
                    "quantizer.weight_proj.bias": state[prefix + "weight_proj.bias"],
                    "quantizer.codevectors": table.contiguous().clone(),
                }
            )
            plan.used |= {prefix + "vars", prefix + "weight_proj.weight", prefix + "weight_proj.bias"}
            if shared:
                plan.notes.append(
                    "NeMo's Gumbel groups share one code table (combine_groups); each of our groups "
                    "holds a copy, which trains separately from here on"
                )
            weight = conv1x1_to_linear(state[mlm["_decoder"] + "decoder_layers.0.weight"], mlm["_decoder"])
            bias = state[mlm["_decoder"] + "decoder_layers.0.bias"]
            classes = codes**groups
            if weight.shape[0] not in (classes, classes + 1):
                raise NemoConversionError(
                    f"mlm decoder has {weight.shape[0]} classes, expected codebook_size^groups = {classes} (+1 blank)"
                )
            if weight.shape[0] == classes + 1:
                plan.notes.append(
                    "NeMo's MLM decoder (ConvASRDecoder) has one extra 'blank' class that no target "
                    "uses; it was dropped: logits agree, NeMo's log-softmax also spread mass onto it"
                )
            plan.weights.update({"mlm_head.weight": weight[:classes], "mlm_head.bias": bias[:classes]})
            plan.used |= {mlm["_decoder"] + "decoder_layers.0.weight", mlm["_decoder"] + "decoder_layers.0.bias"}
            plan.config.update(
                num_codevector_groups=groups,
                num_codevectors_per_group=codes,
                codevector_dim=int(codevectors.shape[-1]) * groups,
                proj_codevector_dim=int(codevectors.shape[-1]) * groups,
            )
        else:
            for key in (k for k in state if k.startswith(prefix)):
                plan.unmappable[key] = (
                    f"{source_name}: the Gumbel quantizer is only used by objectives that cannot be mapped"
                )
    if objectives:
        plan.config["objectives"] = {
            n: {k: v for k, v in s.items() if not k.startswith("_")} for n, s in objectives.items()
        }
        plan.config.update(_nemo_masking(config.get("spec_augment") or {}, plan.notes))
        # NeMo's spec augmentation writes zeros into masked frames: a learned embedding that starts at zero.
        plan.weights["masked_spec_embed"] = torch.zeros(int(num_mel_bins))
    return plan


def _layer_index(output_from_layer: str | None, name: str) -> int:
    """NeMo `output_from_layer` ("layers.5" = output of block 5) -> our hidden-state index (block k is k + 1)."""
    if output_from_layer is None:
        return -1
    match = re.fullmatch(r"layers\.(\d+)", str(output_from_layer))
    if match is None:
        raise NemoConversionError(f"loss_list.{name}.output_from_layer={output_from_layer!r}: expected 'layers.N'")
    return int(match.group(1)) + 1


def _nemo_masking(spec_augment: dict, notes: list[str]) -> dict:
    """Our masking fields for NeMo's MaskedPatchAugmentation (patch masking); other augmentations are noted."""
    if target_name(spec_augment) == "MaskedPatchAugmentation":
        fields = {"mask_strategy": "patch", "mask_time_length": int(spec_augment.get("patch_size", 48))}
        patches = float(spec_augment.get("mask_patches", 10))
        if patches < 1:
            fields["mask_time_prob"] = patches
        else:
            fields["mask_time_prob"] = 0.5
            notes.append(
                f"spec_augment.mask_patches={patches:g} is a count of patches; ours masks a fraction "
                "(mask_time_prob=0.5 set, NeMo's recipe default): adjust it for your utterance lengths"
            )
        if int(spec_augment.get("freq_masks", 0)) > 0:
            notes.append(
                f"spec_augment.freq_masks={spec_augment['freq_masks']}: frequency masking is not one of our "
                "pretraining masks (use the fine-tuning SpecAugment options)"
            )
        return fields
    if spec_augment:
        notes.append(f"spec_augment ({target_name(spec_augment)}) not carried over: pick mask_strategy yourself")
    return {}


# ----------------------------------------------------------------------------------------------- conversion


@dataclass
class Conversion:
    """A converted model ready to save, and the account of how it was made.

    model: the transformers model (eval mode) holding NeMo's weights.
    feature_extractor: its feature extractor; tokenizer: its tokenizer (CTC) or None.
    kind: "ctc", "nest", "contrastive" or "encoder" (see MODEL_KINDS); nemo_class: NeMo's model class.
    dropped: NeMo keys not carried over -> why (only with drop_unmappable / encoder_only, or verified buffers).
    notes: every approximation or dropped setting, for the model card.
    """

    model: torch.nn.Module
    feature_extractor: ConformerSslFeatureExtractor
    tokenizer: Any
    kind: str
    nemo_class: str
    source: str
    license: str
    dropped: dict[str, str]
    notes: list[str]
    artifacts: dict[str, bytes] = field(default_factory=dict)


def _nemo_license(config: dict) -> str | None:
    for key in ("license", "licence"):
        if config.get(key):
            return str(config[key])
    for section in ("info", "metadata", "model_card"):
        if isinstance(config.get(section), dict) and config[section].get("license"):
            return str(config[section]["license"])
    return None


def _model_class_name(config: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """NeMo's model class, from the config's `target` (written by save_to) or, failing that, from the keys."""
    name = str(config.get("target", "")).rsplit(".", 1)[-1]
    if name:
        return name
    if "quantizer.proj.weight" in state_dict:
        return "EncDecDenoiseMaskedTokenPredModel"
    if any(k.startswith(("decoder_losses.", "decoder_ssl.")) for k in state_dict):
        return "SpeechEncDecSelfSupervisedModel"
    return "EncDecCTCModelBPE" if "tokenizer" in config else "EncDecCTCModel"


def convert_checkpoint(
    checkpoint: NemoCheckpoint,
    license: str | None = None,
    drop_unmappable: bool = False,
    encoder_only: bool = False,
) -> Conversion:
    """Build our model from a read `.nemo` checkpoint.

    Args:
        checkpoint: from `read_nemo`.
        license: licence of the source weights for the model card (default: the config's, else "unknown").
        drop_unmappable: convert what can be converted and list the rest instead of refusing (an objective whose
            head cannot be mapped is removed from the config; no weight is ever left random).
        encoder_only: convert the preprocessor and encoder into a bare `ConformerSslModel`, dropping every head
            (works for any ConformerEncoder model, e.g. RNN-T / TDT / hybrid ASR models).
    """
    config, state = checkpoint.config, checkpoint.state_dict
    nemo_class = _model_class_name(config, state)
    kind = "encoder" if encoder_only else MODEL_KINDS.get(nemo_class)
    if kind is None:
        raise NemoConversionError(
            f"{checkpoint.path}: NeMo model class {nemo_class!r} is not supported (supported: {sorted(MODEL_KINDS)}); "
            "pass encoder_only=True (--encoder-only) to convert its encoder alone"
        )
    extractor, notes = convert_preprocessor(config.get("preprocessor") or {})
    check_featurizer_buffers(extractor, state)
    encoder_kwargs, encoder_notes = convert_encoder_config(config.get("encoder") or {})
    notes += encoder_notes
    if int(encoder_kwargs["num_mel_bins"]) != extractor.feature_size:
        raise NemoConversionError(
            f"encoder.feat_in={encoder_kwargs['num_mel_bins']} != preprocessor.features={extractor.feature_size}"
        )
    encoder_weights, used = encoder_state_dict_to_ours(
        state, fused_batch_norm=(config["encoder"].get("conv_norm_type") == "fused_batch_norm")
    )
    factor, mels = encoder_kwargs["subsampling_factor"], encoder_kwargs["num_mel_bins"]
    if kind == "ctc":
        plan = _ctc_head(checkpoint)
    elif kind == "nest":
        plan = _nest_head(checkpoint, factor, mels)
    elif kind == "contrastive":
        plan = _contrastive_head(checkpoint, factor, mels)
    else:
        plan = HeadPlan()
    notes += plan.notes
    used |= plan.used
    # The mel filterbank and window were compared with ours above; they are not weights of the model.
    dropped = {
        k: "mel filterbank / window of NeMo's preprocessor, checked against ours"
        for k in state
        if k.startswith("preprocessor.featurizer.")
    }
    leftover = {
        k: plan.unmappable.get(k, "no counterpart in our classes") for k in state if k not in used and k not in dropped
    }
    if leftover and not (drop_unmappable or encoder_only):
        listing = "\n  ".join(f"{k}: {why}" for k, why in sorted(leftover.items()))
        raise NemoConversionError(
            f"{checkpoint.path}: {len(leftover)} NeMo weights cannot be mapped:\n  {listing}\n"
            "Pass --drop-unmappable to convert the rest (these are then listed in the model card), or "
            "--encoder-only for the encoder alone."
        )
    dropped.update(leftover)

    model_config = ConformerSslConfig(**encoder_kwargs, hop_length=extractor.hop_length, **plan.config)
    weights = dict(plan.weights)
    if kind == "ctc":
        model, prefix = ConformerSslForCTC(model_config), "conformer."
    elif kind in ("nest", "contrastive") and model_config.objectives:
        model, prefix = ConformerSslForPreTraining(model_config), "conformer."
    else:
        if weights:
            dropped.update({k: "head weights dropped with their objective" for k in plan.used})
            weights = {}
        model, prefix = ConformerSslModel(model_config), ""
    weights.update({prefix + k: v for k, v in encoder_weights.items()})
    load_all_weights(model, weights)
    model.eval()
    return Conversion(
        model=model,
        feature_extractor=extractor,
        tokenizer=plan.tokenizer if kind == "ctc" else None,
        kind=kind,
        nemo_class=nemo_class,
        source=str(checkpoint.path),
        license=license or _nemo_license(config) or DEFAULT_LICENSE,
        dropped=dropped,
        notes=notes,
        artifacts=_tokenizer_artifacts(checkpoint) if kind == "ctc" and plan.tokenizer is None else {},
    )


def _tokenizer_artifacts(checkpoint: NemoCheckpoint) -> dict[str, bytes]:
    tokenizer_config = checkpoint.config.get("tokenizer") or {}
    found = {}
    for key in ("model_path", "vocab_path", "spe_tokenizer_vocab"):
        artifact = _artifact(checkpoint, tokenizer_config.get(key))
        if artifact is not None:
            found[key.replace("_path", "").replace("spe_tokenizer_vocab", "tokenizer.vocab")] = artifact[1]
    return found


def load_all_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Write every persistent parameter and buffer of `model` from `weights`, or raise naming what is missing.

    A key absent from `weights` would keep its random initialisation: that is an error, never a warning.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(weights) & set(expected))
        if weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise NemoConversionError(
            "the mapped weights do not fill the model exactly:"
            + (f"\n  left unwritten (would stay random): {missing}" if missing else "")
            + (f"\n  without a place in the model: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {wrong}" if wrong else "")
        )
    converted = {k: v.to(expected[k].dtype) for k, v in weights.items()}
    model.load_state_dict(converted, strict=True)


def convert_nemo(
    path: str | Path, license: str | None = None, drop_unmappable: bool = False, encoder_only: bool = False
) -> Conversion:
    """`read_nemo` + `convert_checkpoint` (see its arguments)."""
    return convert_checkpoint(
        read_nemo(path), license=license, drop_unmappable=drop_unmappable, encoder_only=encoder_only
    )


# ----------------------------------------------------------------------------------------------- saving


# Licence names the Hub knows as `license:` ids; any other text goes to `license_name` under `license: other`.
HUB_LICENSES = {
    "cc-by-4.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "apache-2.0",
    "mit",
    "openrail",
    "bsd-3-clause",
    "cc0-1.0",
    "gpl-3.0",
    "llama2",
    "other",
}

# How to load each kind of converted folder (the README's usage snippet).
USAGE = {
    "ctc": (
        "from transformers import pipeline\n"
        "import hf_ssl_speech  # registers the classes (or pass trust_remote_code=True)\n"
        "asr = pipeline('automatic-speech-recognition', model=PATH)\n"
        "print(asr({'raw': audio_16khz, 'sampling_rate': 16000})['text'])"
    ),
    "nest": (
        "from transformers import AutoFeatureExtractor, AutoModelForPreTraining\n"
        "import hf_ssl_speech\n"
        "model = AutoModelForPreTraining.from_pretrained(PATH)  # continue pretraining, or AutoModel for the encoder"
    ),
    "contrastive": (
        "from transformers import AutoFeatureExtractor, AutoModelForPreTraining\n"
        "import hf_ssl_speech\n"
        "model = AutoModelForPreTraining.from_pretrained(PATH)  # or AutoModel for the encoder"
    ),
    "encoder": (
        "from transformers import AutoFeatureExtractor, AutoModel\n"
        "import hf_ssl_speech\n"
        "extractor = AutoFeatureExtractor.from_pretrained(PATH)\n"
        "model = AutoModel.from_pretrained(PATH)"
    ),
}


def model_card(conversion: Conversion) -> str:
    """README.md for the converted folder: source, licence, what was mapped, dropped and approximated."""
    config = conversion.model.config
    licence_id = conversion.license.strip().lower()
    front = (
        [f"license: {licence_id}"]
        if licence_id in HUB_LICENSES
        else ["license: other", f"license_name: {json.dumps(conversion.license, ensure_ascii=False)}"]
    )
    objectives = sorted(config.objectives) if getattr(conversion.model, "objectives", None) else "none"
    lines = [
        "---",
        *front,
        "library_name: transformers",
        "tags: [speech, conformer, nemo-conversion]",
        "---",
        "",
        f"# {Path(conversion.source).stem} (converted from NeMo)",
        "",
        f"- **Source checkpoint:** `{Path(conversion.source).name}` (NeMo `{conversion.nemo_class}`)",
        f"- **Licence of the source weights:** {conversion.license}. The converted weights are a derivative and "
        "inherit it.",
        f"- **Converted to:** `{type(conversion.model).__name__}` (hf_ssl_speech), {config.subsampling} subsampling "
        f"x{config.subsampling_factor}, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, kernel {config.conv_depthwise_kernel_size}, {config.conv_norm_type}.",
        f"- **Pretraining objectives kept:** {objectives}.",
        "- Converted with `scripts/convert_nemo_checkpoint.py`, which reads the .nemo archive without NeMo and loads "
        "the weights with `weights_only=True`; every weight of this model comes from the checkpoint.",
        "",
        "## Usage",
        "",
        "```python",
        USAGE[conversion.kind],
        "```",
        "",
    ]
    if conversion.notes:
        lines += ["## Differences from the NeMo model", ""] + [f"- {note}" for note in conversion.notes] + [""]
    real_drops = {k: v for k, v in conversion.dropped.items() if not k.startswith("preprocessor.featurizer.")}
    if real_drops:
        lines += ["## NeMo weights not carried over", ""]
        lines += [f"- `{key}`: {why}" for key, why in sorted(real_drops.items())] + [""]
    return "\n".join(lines)


def save_conversion(conversion: Conversion, out_dir: str | Path) -> Path:
    """Write the model, feature extractor (+ tokenizer / processor), README.md and nemo_conversion.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conversion.model.save_pretrained(out_dir)
    tokenizer = conversion.tokenizer
    if tokenizer is not None:
        from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

        if isinstance(tokenizer, Wav2Vec2CTCTokenizer):
            Wav2Vec2Processor(feature_extractor=conversion.feature_extractor, tokenizer=tokenizer).save_pretrained(
                out_dir
            )
        else:
            tokenizer.save_pretrained(out_dir)
            conversion.feature_extractor.save_pretrained(out_dir)
    else:
        conversion.feature_extractor.save_pretrained(out_dir)
    if conversion.artifacts:
        folder = out_dir / "nemo_tokenizer"
        folder.mkdir(exist_ok=True)
        for name, data in conversion.artifacts.items():
            (folder / name).write_bytes(data)
    (out_dir / "README.md").write_text(model_card(conversion))
    report = {
        "source": Path(conversion.source).name,
        "nemo_class": conversion.nemo_class,
        "kind": conversion.kind,
        "model_class": type(conversion.model).__name__,
        "license": conversion.license,
        "dropped": conversion.dropped,
        "notes": conversion.notes,
    }
    (out_dir / "nemo_conversion.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return out_dir


__all__ = [
    "Conversion",
    "NemoCheckpoint",
    "NemoConversionError",
    "convert_checkpoint",
    "convert_encoder_config",
    "convert_nemo",
    "convert_preprocessor",
    "load_weights",
    "model_card",
    "nemo_encoder_config",
    "nemo_encoder_key_to_ours",
    "nemo_preprocessor_config",
    "our_encoder_key_to_nemo",
    "our_encoder_state_dict_to_nemo",
    "read_nemo",
    "save_conversion",
]
