"""One converter for every source: `.nemo` archives, w2v-BERT 2.0 and Parakeet folders / Hub repos, and back.

`load_source(src)` detects what `src` is and returns our model holding its weights:

| source | detected by | becomes |
|---|---|---|
| a `.nemo` file | the suffix | `interop.nemo.convert_nemo` (NEST keeps its quantizer and decoder head) |
| `Wav2Vec2BertModel` / `Wav2Vec2BertForCTC` | config.json `model_type: wav2vec2-bert` | `interop.w2v_bert` |
| `ParakeetEncoder` / `ParakeetForCTC` / `ForRNNT` / `ForTDT` | `model_type: parakeet_*` | `interop.parakeet` (encoder) |
| a folder of ours | `model_type: conformer_ssl` | loaded as it is |

`save_source` writes a `save_pretrained` folder that `AutoModel.from_pretrained` loads; `export_model` converts a
folder of ours back to `wav2vec2_bert` or `parakeet` (`EXPORTS`). `scripts/convert_checkpoint.py` is the command,
`model.init_from` in a pretraining recipe (`pretrain/init_from.py`) the other user. Anything else is refused with a
`ConversionError` naming the architecture found and the supported ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, check_model_source

NEMO_SUFFIX = ".nemo"
# config.json `model_type` -> the source family (the transformers classes each family loads are in `_load_*`).
MODEL_TYPES = {
    "conformer_ssl": "ours",
    "wav2vec2-bert": "wav2vec2_bert",
    "parakeet_encoder": "parakeet",
    "parakeet_ctc": "parakeet",
    "parakeet_rnnt": "parakeet",
    "parakeet_tdt": "parakeet",
}
SUPPORTED = (
    "a NeMo .nemo file (Conformer / FastConformer: CTC, NEST, SSL; other models with their encoder alone), "
    "Wav2Vec2BertModel / Wav2Vec2BertForCTC, ParakeetEncoder / ParakeetForCTC / ParakeetForRNNT / ParakeetForTDT, "
    "or a conformer_ssl folder"
)
# `--to` targets: what a folder of ours can be converted back into.
EXPORTS = {
    "wav2vec2_bert": "Wav2Vec2BertModel / Wav2Vec2BertForCTC (w2v-BERT 2.0 architecture only)",
    "parakeet": "ParakeetEncoder, or ParakeetForCTC / ForRNNT / ForTDT with a new head (FastConformer only)",
}
PARAKEET_HEADS = ("encoder", "ctc", "rnnt", "tdt")
# Preprocessor settings that must agree between a Parakeet folder and our log-mel extractor.
_PARAKEET_FEATURE_FIELDS = ("sampling_rate", "hop_length", "win_length", "n_fft", "preemphasis")


class ConversionError(UserError, ValueError):
    """A source that cannot be converted; the message names what was found and what is supported."""


@dataclass
class SourceModel:
    """A source converted into our classes.

    model: `ConformerSslModel`, `ConformerSslForCTC` or `ConformerSslForPreTraining` holding the source's weights.
    feature_extractor: the extractor the model expects (log-mel, or stacked fbank for w2v-BERT).
    family: "nemo", "wav2vec2_bert", "parakeet" or "ours"; description: e.g. "Wav2Vec2BertForCTC (path)".
    tokenizer: the source's CTC tokenizer, or None. notes: what was dropped or approximated.
    nemo: the full `interop.nemo.Conversion` of a .nemo source (its model card and report), else None.
    """

    model: Any
    feature_extractor: Any
    family: str
    description: str
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)
    nemo: Any = None


def _read_config(src: str) -> dict[str, Any]:
    """config.json of a local folder or a Hub repo (a missing local path is refused before any Hub access)."""
    check_model_source(src, "SRC")
    path = Path(src).expanduser()
    if path.is_dir():
        file = path / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(src, "config.json"))
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{src}: config.json is not readable JSON ({error})") from error


def source_family(src: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """("nemo" | "wav2vec2_bert" | "parakeet" | "ours", config.json) of `src`; a `ConversionError` otherwise."""
    text = os.fspath(src)
    if text.endswith(NEMO_SUFFIX):
        if not Path(text).expanduser().is_file():
            raise ConversionError(f"SRC {text!r}: no such .nemo file; fix the path.")
        return "nemo", {}
    if Path(text).expanduser().is_file():
        raise ConversionError(f"SRC {text!r} is a file but not a .nemo archive: supported sources are {SUPPORTED}.")
    config = _read_config(text)
    model_type = config.get("model_type")
    family = MODEL_TYPES.get(model_type)
    if family is None:
        architectures = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ConversionError(
            f"{text}: model_type={model_type!r} ({architectures}) is not a supported speech encoder; "
            f"supported: {SUPPORTED}."
        )
    return family, config


def load_source(src: str | os.PathLike, drop_unmappable: bool = True, license: str | None = None) -> SourceModel:
    """Our model holding the weights of `src` (see the module docstring for what is detected).

    Args:
        src: a .nemo file, a local folder, or a Hub repo id.
        drop_unmappable: .nemo only: convert what maps exactly and list the rest (NeMo's contrastive decoder,
            transducer heads) instead of refusing; a NeMo model class we have no head for keeps its encoder alone.
        license: .nemo only: the licence of the source weights for the model card.
    """
    family, config = source_family(src)
    return {"nemo": _load_nemo, "wav2vec2_bert": _load_w2v_bert, "parakeet": _load_parakeet, "ours": _load_ours}[
        family
    ](os.fspath(src), config, drop_unmappable=drop_unmappable, license=license)


def _load_nemo(src: str, config: dict, drop_unmappable: bool, license: str | None) -> SourceModel:
    from .nemo import MODEL_KINDS, NemoConversionError, _model_class_name, convert_checkpoint, read_nemo

    try:
        checkpoint = read_nemo(src)
        # A model class without a head of ours (RNN-T, TDT, hybrid) still has a ConformerEncoder to continue from.
        encoder_only = (
            drop_unmappable and _model_class_name(checkpoint.config, checkpoint.state_dict) not in MODEL_KINDS
        )
        conversion = convert_checkpoint(
            checkpoint, license=license, drop_unmappable=drop_unmappable, encoder_only=encoder_only
        )
    except NemoConversionError as error:
        raise ConversionError(str(error)) from error
    notes = list(conversion.notes)
    dropped = {k: v for k, v in conversion.dropped.items() if not k.startswith("preprocessor.featurizer.")}
    notes += [f"dropped {key}: {why}" for key, why in sorted(dropped.items())]
    return SourceModel(
        conversion.model,
        conversion.feature_extractor,
        "nemo",
        f"NeMo {conversion.nemo_class} ({src})",
        conversion.tokenizer,
        notes,
        conversion,
    )


def _load_w2v_bert(src: str, config: dict, **_: Any) -> SourceModel:
    from transformers import Wav2Vec2BertForCTC, Wav2Vec2BertModel

    from .w2v_bert import feature_extractor_for, from_wav2vec2_bert

    architectures = config.get("architectures") or ["Wav2Vec2BertModel"]
    notes = []
    if "Wav2Vec2BertForCTC" in architectures:
        source = Wav2Vec2BertForCTC.from_pretrained(src)
    else:
        # Any other head (sequence classification, ...) is dropped: its encoder is what continues.
        source = Wav2Vec2BertModel.from_pretrained(src)
        if architectures != ["Wav2Vec2BertModel"]:
            notes.append(f"the head of {architectures[0]} was dropped: only the encoder is converted")
    model = from_wav2vec2_bert(source)
    return SourceModel(
        model, feature_extractor_for(model.config), "wav2vec2_bert", f"{type(source).__name__} ({src})",
        _tokenizer(src) if "Wav2Vec2BertForCTC" in architectures else None, notes,
    )  # fmt: skip


def _load_parakeet(src: str, config: dict, **_: Any) -> SourceModel:
    from transformers import ParakeetEncoder, ParakeetForCTC, ParakeetForRNNT, ParakeetForTDT

    from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
    from .parakeet import from_parakeet

    classes = {
        "parakeet_encoder": ParakeetEncoder,
        "parakeet_ctc": ParakeetForCTC,
        "parakeet_rnnt": ParakeetForRNNT,
        "parakeet_tdt": ParakeetForTDT,
    }
    source_class = classes[config["model_type"]]
    source = source_class.from_pretrained(src)
    encoder = source if isinstance(source, ParakeetEncoder) else source.encoder
    try:
        model = from_parakeet(encoder)
    except ValueError as error:
        raise ConversionError(f"{src}: {error}") from error
    extractor = ConformerSslFeatureExtractor(feature_size=model.config.num_mel_bins, hop_length=model.config.hop_length)
    _check_parakeet_features(src, extractor)
    notes = [] if source_class is ParakeetEncoder else [f"the {source_class.__name__} head was dropped (encoder only)"]
    return SourceModel(model, extractor, "parakeet", f"{source_class.__name__} ({src})", None, notes)


def _check_parakeet_features(src: str, extractor: Any) -> None:
    """A local Parakeet folder's preprocessor_config.json must describe our log-mel front end."""
    file = Path(src).expanduser() / "preprocessor_config.json"
    if not file.is_file():
        return
    theirs = json.loads(file.read_text())
    for key in ("feature_size", *_PARAKEET_FEATURE_FIELDS):
        if key in theirs and theirs[key] != getattr(extractor, key):
            raise ConversionError(
                f"{src}: preprocessor_config.json {key}={theirs[key]!r} but the converted model's log-mel front "
                f"end uses {getattr(extractor, key)!r}; such a Parakeet model has no exact counterpart here."
            )


def _load_ours(src: str, config: dict, **_: Any) -> SourceModel:
    from .. import modeling_conformer_ssl as modeling

    architectures = config.get("architectures") or ["ConformerSslModel"]
    model_class = getattr(modeling, architectures[0], None) or modeling.ConformerSslModel
    return SourceModel(
        model_class.from_pretrained(src), _our_extractor(src, config), "ours", f"{model_class.__name__} ({src})"
    )


def _our_extractor(src: str, config: dict) -> Any:
    """The extractor saved next to a folder of ours (log-mel, or a w2v-BERT stacked-fbank one)."""
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(src)
    except (OSError, ValueError):
        from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor

        return ConformerSslFeatureExtractor(
            feature_size=config.get("num_mel_bins", 80), hop_length=config.get("hop_length", 160)
        )


def _tokenizer(src: str) -> Any:
    """The CTC tokenizer saved with a model, or None when the folder has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        return None


def save_source(source: SourceModel, out_dir: str | os.PathLike) -> Path:
    """Write the converted model (+ feature extractor, tokenizer) as a `save_pretrained` folder."""
    out_dir = Path(out_dir)
    if source.nemo is not None:  # the NeMo converter's own folder: model card and nemo_conversion.json included
        from .nemo import save_conversion

        return save_conversion(source.nemo, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source.model.save_pretrained(out_dir)
    source.feature_extractor.save_pretrained(out_dir)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------- back out
def export_model(
    src: str | os.PathLike, to: str, out_dir: str | os.PathLike, head: str = "encoder", vocab_size: int | None = None
) -> tuple[Any, Path]:
    """Convert a folder of ours into `to` (one of `EXPORTS`) and save it to `out_dir`; returns (model, folder).

    Args:
        head: parakeet only: "encoder" (ParakeetEncoder) or a new "ctc" / "rnnt" / "tdt" head to fine-tune.
        vocab_size: the tokenizer size of that new head (blank included); a CTC model's own vocabulary otherwise.
    """
    if to not in EXPORTS:
        raise ConversionError(
            f"--to {to!r} is not a target; choose one of: " + "; ".join(f"{k} ({v})" for k, v in EXPORTS.items())
        )
    family, _ = source_family(src)
    if family != "ours":
        raise ConversionError(
            f"--to {to}: SRC must be a conformer_ssl folder (converted or trained here), got a {family} source"
        )
    source = load_source(src)
    model = source.model
    from ..modeling_conformer_ssl import ConformerSslForCTC, ConformerSslModel

    if not isinstance(model, (ConformerSslModel, ConformerSslForCTC)):
        model = model.conformer  # pretraining heads have no counterpart in either target: the encoder goes
    out_dir = Path(out_dir)
    try:
        if to == "wav2vec2_bert":
            exported = _export_w2v_bert(model)
        else:
            exported = _export_parakeet(model, head, vocab_size)
    except ValueError as error:  # the interop modules name every field the target cannot represent
        raise ConversionError(f"--to {to}: {error}") from error
    exported.save_pretrained(out_dir)
    if to == "wav2vec2_bert":
        from .w2v_bert import feature_extractor_for

        feature_extractor_for(model.config).save_pretrained(out_dir)
    else:
        from transformers import ParakeetFeatureExtractor

        ParakeetFeatureExtractor(
            feature_size=model.config.num_mel_bins, hop_length=model.config.hop_length
        ).save_pretrained(out_dir)
    if source.tokenizer is None:
        tokenizer = _tokenizer(os.fspath(src)) if isinstance(model, ConformerSslForCTC) else None
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    return exported, out_dir


def _export_w2v_bert(model: Any) -> Any:
    from .w2v_bert import to_wav2vec2_bert

    return to_wav2vec2_bert(model)


def _export_parakeet(model: Any, head: str, vocab_size: int | None) -> Any:
    from ..modeling_conformer_ssl import ConformerSslForCTC
    from .parakeet import export_parakeet_for_asr, to_parakeet

    if head not in PARAKEET_HEADS:
        raise ConversionError(f"--head {head!r} is not one of {PARAKEET_HEADS}")
    encoder = model.conformer if isinstance(model, ConformerSslForCTC) else model
    if head == "encoder":
        return to_parakeet(encoder)
    if vocab_size is None:
        if not isinstance(model, ConformerSslForCTC):
            raise ConversionError(f"--head {head} needs --vocab-size (the tokenizer size, blank included)")
        vocab_size = model.config.vocab_size
    return export_parakeet_for_asr(encoder, head, vocab_size)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "EXPORTS",
    "MODEL_TYPES",
    "PARAKEET_HEADS",
    "SUPPORTED",
    "ConversionError",
    "SourceModel",
    "export_model",
    "load_source",
    "parameter_count",
    "save_source",
    "source_family",
]
