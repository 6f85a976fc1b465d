"""Fine-tuning with the stock transformers `Trainer`: CTC speech recognition and audio classification.

The pieces `scripts/finetune_ctc.py`, `scripts/finetune_classification.py` and `scripts/transcribe.py` are
built from, each small and testable on its own:

- **Arguments**: `ModelArguments`, `DataArguments`, `FinetuneArguments` (+ `transformers.TrainingArguments`)
  parsed by `parse_args` from a YAML recipe (defaults) and the command line (`--flag value` or `key=value`).
- **Text**: `normalize_transcript`, a character vocabulary from the training transcripts (`build_vocab`) in a
  `Wav2Vec2CTCTokenizer` (`<pad>` = CTC blank = id 0, `<unk>`, `|` between words), paired with our feature
  extractor in a `Wav2Vec2Processor` (`build_processor`): `AutoProcessor` loads the pair from a saved folder.
- **Data**: NeMo manifests indexed by `hf_ssl_speech.data.ManifestSource` into a `datasets.Dataset` of
  metadata rows (path, text, `length` for `train_sampling_strategy="group_by_length"`); the collators decode
  audio with `hf_ssl_speech.data.decode_example`, featurise, and on training rows add dither and SpecAugment
  (`spec_augment`, NeMo defaults, vectorised).
- **Model**: `init_ctc_model` / `init_classification_model` from a checkpoint (encoder transferred, a loud
  warning naming any encoder weight that is missing or mismatched) or from scratch (same architecture).
- **Optimisation**: layer-wise learning-rate decay (`layerwise_param_groups`), `FreezeEncoderCallback`
  (encoder frozen for the first N steps), early stopping on WER via `transformers.EarlyStoppingCallback`.
- **Evaluation**: `CtcTrainer` (a `Trainer` whose prediction step returns greedy CTC ids with padded steps
  blanked), WER/CER from the local `evaluate` modules in `hf_ssl_speech/metrics/` (`metric_path`), a results
  table (`write_results`), training curves (`plot_training_curves`), `transcribe` for plain inference.
- **Hub**: `ctc_model_card` (with `model-index` WER/CER) and `push_folder`.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import sys
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from transformers import (
    EarlyStoppingCallback,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2Processor,
)

from .audio_io import AudioError
from .configuration_conformer_ssl import ConformerSslConfig
from .data import DataConfig, ManifestSource, RawExample, SpeechCollator, decode_example
from .feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from .modeling_conformer_ssl import ConformerSslForCTC, ConformerSslForSequenceClassification
from .presets import preset_config

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
PAD_TOKEN = "<pad>"  # id 0: padding of label batches and the CTC blank
UNK_TOKEN = "<unk>"  # characters of eval transcripts that training never saw
WORD_DELIMITER = "|"  # stands for the space between words
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, WORD_DELIMITER)
SAMPLING_RATE = 16000


# ============================================================================================ arguments
@dataclass
class ModelArguments:
    """Which model to start from and how it is built (the `model_*` keys of a fine-tuning recipe)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretraining checkpoint (save_pretrained folder or Hub repo id) whose encoder is fine-tuned."
        },
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Random init of the same architecture (from the checkpoint's config, or --model_preset)."},
    )
    model_preset: str | None = field(
        default=None,
        metadata={
            "help": "Preset name (configs/model/<name>.yaml) or YAML path, for --from_scratch without checkpoint."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "ConformerSslConfig fields to change, 'key=value,key=value' (e.g. 'final_dropout=0.0')."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})


@dataclass
class DataArguments:
    """Where the labelled audio comes from and how it is augmented."""

    train_manifests: list[str] = field(
        default_factory=list, metadata={"help": "NeMo JSONL manifests to train on (empty: the demo corpus)."}
    )
    eval_manifests: list[str] = field(
        default_factory=list, metadata={"help": "NeMo JSONL manifests to evaluate on, each reported separately."}
    )
    min_duration: float = field(default=0.1, metadata={"help": "Leave out shorter utterances (seconds)."})
    max_duration: float | None = field(
        default=30.0, metadata={"help": "Leave out longer training utterances (CTC), crop them (classification)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows per eval set."})
    label_column: str = field(
        default="speaker", metadata={"help": "Manifest field holding the class (classification only)."}
    )
    demo_corpus_dir: str = field(
        default="data/demo_corpus", metadata={"help": "Demo corpus folder, made when no manifests are given."}
    )
    demo_minutes: float = field(default=10.0, metadata={"help": "Minutes of demo audio to make (all splits)."})
    spec_augment: bool = field(default=True, metadata={"help": "SpecAugment on training features."})
    freq_masks: int = field(default=2, metadata={"help": "SpecAugment frequency masks per utterance (NeMo: 2)."})
    freq_width: int = field(default=27, metadata={"help": "Widest frequency mask in mel bins (NeMo: 27)."})
    time_masks: int = field(default=10, metadata={"help": "SpecAugment time masks per utterance (NeMo: 10)."})
    time_width: float = field(
        default=0.05,
        metadata={"help": "Widest time mask: a fraction of the utterance if < 1, else frames (NeMo: 0.05)."},
    )
    dither: bool = field(default=True, metadata={"help": "Add the feature extractor's dither to training audio."})


@dataclass
class FinetuneArguments:
    """How the pretrained encoder is fine-tuned, beyond what TrainingArguments covers."""

    freeze_encoder_steps: int = field(
        default=0, metadata={"help": "Train only the new head for the first N optimiser steps (then everything)."}
    )
    freeze_encoder: bool = field(
        default=False, metadata={"help": "Keep the encoder frozen for the whole run (probing)."}
    )
    layer_decay: float = field(
        default=1.0,
        metadata={"help": "Layer-wise LR decay: block i of L trains at lr * decay^(L + 1 - i), the head at lr."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improving metric_for_best_model."}
    )
    use_weighted_layer_sum: bool = field(
        default=False, metadata={"help": "Classification: learned softmax-weighted sum of all layers (SUPERB)."}
    )
    classifier_proj_size: int | None = field(default=None, metadata={"help": "Classification projection width."})


# Forced on every run: our datasets hold metadata rows that the collator turns into model inputs, so the
# Trainer must not drop "unused" columns; every other TrainingArguments default is the recipe's to choose.
FORCED_TRAINING_ARGS = {"remove_unused_columns": False}


def _flatten_recipe(data: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe is a flat mapping, or sections (model/data/finetune/training) of flat mappings."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "data", "finetune", "training") and isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Remove `--config PATH` / `--config=PATH` / `config=PATH` from argv; return (PATH, rest)."""
    config, rest, index = None, [], 0
    while index < len(argv):
        token = argv[index]
        if token == "--config":
            if index + 1 >= len(argv):
                raise SystemExit("--config needs a YAML file path")
            config, index = argv[index + 1], index + 2
            continue
        if token.startswith("--config=") or token.startswith("config="):
            config = token.split("=", 1)[1]
        else:
            rest.append(token)
        index += 1
    return config, rest


def _expand_key_values(argv: list[str], destinations: set[str], list_dests: set[str]) -> list[str]:
    """`key=value` tokens naming an argument become `--key value` (`a,b` splits for list-valued keys).

    Other tokens pass unchanged, so a flag's value may itself contain `=` (`--config_overrides layerdrop=0.1`).
    """
    out: list[str] = []
    for token in argv:
        key, _, value = token.partition("=")
        key = key.replace("-", "_")
        if not token.startswith("-") and _ and key in destinations:
            out.append(f"--{key}")
            out.extend([v for v in value.split(",") if v] if key in list_dests else [value])
        else:
            out.append(token)
    return out


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> tuple:
    """
    Parse `--config recipe.yaml` plus command-line overrides into one instance of each dataclass.

    Args:
        dataclass_types: e.g. (ModelArguments, DataArguments, FinetuneArguments, TrainingArguments).
        argv: the arguments (default `sys.argv[1:]`). Overrides come as `--key value`, `--flag` (booleans) or
            `key=value`; list-valued keys take several values after `--key`, or `key=a,b`.
        defaults: script-level defaults, below the recipe's values.

    Precedence: dataclass defaults < `FORCED_TRAINING_ARGS` < `defaults` < recipe YAML < command line. Unknown
    recipe keys are refused with the closest valid name; a recipe or flag that changes one of
    `FORCED_TRAINING_ARGS` is overruled with a warning.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _split_config_flag(argv)
    parser = HfArgumentParser(dataclass_types)
    destinations = {action.dest for action in parser._actions if action.dest != "help"}
    list_dests = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
    values = {**FORCED_TRAINING_ARGS, **(defaults or {})}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_path}: no such file (recipes live in configs/finetune/)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a recipe must be a YAML mapping of argument names to values")
        recipe = _flatten_recipe(data)
        unknown = sorted(set(recipe) - destinations)
        if unknown:
            hints = [f"{key} (did you mean {difflib.get_close_matches(key, destinations, 1)})" for key in unknown]
            raise ValueError(f"{path}: unknown keys {', '.join(hints)}; run the script with --help for the list.")
        values.update(recipe)
    parser.set_defaults(**{key: value for key, value in values.items() if key in destinations})
    *parsed, unknown_args = parser.parse_args_into_dataclasses(
        args=_expand_key_values(argv, destinations, list_dests), return_remaining_strings=True
    )
    if unknown_args:
        hints = []
        for token in unknown_args:
            name = token.lstrip("-").partition("=")[0].replace("-", "_")
            hints.append(f"{token!r} (did you mean {difflib.get_close_matches(name, destinations, 1)})")
        raise ValueError(f"unknown arguments {', '.join(hints)}; run the script with --help for the list.")
    for item in parsed:
        for key, forced in FORCED_TRAINING_ARGS.items():
            if hasattr(item, key) and getattr(item, key) != forced:
                logger.warning("%s=%r is not supported by these scripts; using %r.", key, getattr(item, key), forced)
                setattr(item, key, forced)
    return tuple(parsed)


def parse_config_overrides(overrides: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`'a=1,b=x'` (values read as YAML scalars) or a mapping -> dict of ConformerSslConfig fields."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    result = {}
    for item in str(overrides).split(","):
        if "=" not in item:
            raise ValueError(
                f"config_overrides item {item!r} is not key=value (e.g. 'final_dropout=0.0,layerdrop=0.1')"
            )
        key, value = item.split("=", 1)
        result[key.strip()] = yaml.safe_load(value)
    return result


# ============================================================================================ text
def normalize_transcript(text: str | None) -> str:
    """Lower-case, NFKC, keep letters, digits and apostrophes; everything else separates words.

    The vocabulary is built from normalised training transcripts, and references are normalised the same
    way, so punctuation and case never count as recognition errors.
    """
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    kept = [ch if (ch.isalnum() or ch == "'") else " " for ch in text]
    return " ".join("".join(kept).split())


def build_vocab(texts: Iterable[str]) -> dict[str, int]:
    """Character vocabulary: `<pad>` 0 (CTC blank), `<unk>` 1, `|` 2 (word delimiter), then sorted characters."""
    chars = sorted({ch for text in texts for ch in normalize_transcript(text) if ch != " "})
    if not chars:
        raise ValueError("build_vocab: the training transcripts are empty after normalisation; check the 'text' field")
    return {token: index for index, token in enumerate([*SPECIAL_TOKENS, *chars])}


def build_tokenizer(vocab: Mapping[str, int]) -> Wav2Vec2CTCTokenizer:
    """A `Wav2Vec2CTCTokenizer` over `vocab` (no BOS/EOS: CTC has none, and they would grow the vocabulary)."""
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        vocab_file.write_text(json.dumps(dict(vocab), ensure_ascii=False))
        tokenizer = Wav2Vec2CTCTokenizer(
            str(vocab_file),
            unk_token=UNK_TOKEN,
            pad_token=PAD_TOKEN,
            word_delimiter_token=WORD_DELIMITER,
            bos_token=None,
            eos_token=None,
            do_lower_case=False,
        )
    if len(tokenizer) != len(vocab) or tokenizer.pad_token_id != 0:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens / pad id {tokenizer.pad_token_id}; expected "
                           f"{len(vocab)} / 0 (a special token was added to the vocabulary)")  # fmt: skip
    return tokenizer


def build_processor(
    texts: Iterable[str], feature_extractor: ConformerSslFeatureExtractor | None = None
) -> Wav2Vec2Processor:
    """Our feature extractor + a character CTC tokenizer built from `texts`, as one `Wav2Vec2Processor`.

    `processor.save_pretrained(folder)` writes `processor_config.json` (with the feature extractor's settings
    and `auto_map`), `vocab.json`, `tokenizer_config.json` and the feature extractor's code; `AutoProcessor`,
    `AutoFeatureExtractor` and `AutoTokenizer` load them back.
    """
    feature_extractor = feature_extractor or ConformerSslFeatureExtractor()
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=build_tokenizer(build_vocab(texts)))


def text_to_ids(tokenizer: Wav2Vec2CTCTokenizer, text: str) -> list[int]:
    """Label ids of a transcript (normalised first; unseen characters become `<unk>`)."""
    return tokenizer(normalize_transcript(text)).input_ids


# ============================================================================================ data
ROW_COLUMNS = ("id", "audio_filepath", "where", "offset", "read_duration", "text", "speaker", "source")


def manifest_rows(
    manifests: Sequence[str],
    min_duration: float = 0.0,
    max_duration: float | None = None,
    require_text: bool = False,
    label_column: str | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """
    Index NeMo manifests into metadata rows (no audio is decoded).

    Args:
        manifests: JSONL files; relative audio paths resolve against each manifest's folder.
        min_duration / max_duration: rows outside [min, max] seconds are left out (and counted).
        require_text: leave out rows with an empty transcript (CTC).
        label_column: also read this manifest field into `label` (classification); rows without it are left out.
        limit: keep only the first N rows (over all manifests).

    Returns:
        rows: dicts with `ROW_COLUMNS`, `duration` (seconds), `length` (samples, for group_by_length) and
        `label` when `label_column` is set; left_out: count of rows left out per reason.
    """
    rows: list[dict[str, Any]] = []
    left_out: dict[str, int] = {}

    def leave_out(reason: str) -> None:
        left_out[reason] = left_out.get(reason, 0) + 1

    for manifest in manifests:
        source = ManifestSource(manifest)
        for reason, _, _ in source.problems:
            leave_out(reason)
        labels = _read_column(manifest, label_column) if label_column else None
        for index in range(len(source)):
            duration = float(source.durations[index])
            if duration < min_duration:
                leave_out("too_short")
                continue
            if max_duration is not None and duration > max_duration:
                leave_out("too_long")
                continue
            raw = source.raw(index)
            if require_text and not normalize_transcript(raw.text):
                leave_out("no_text")
                continue
            row = {
                "id": raw.id,
                "audio_filepath": os.fspath(raw.audio),
                "where": raw.where,
                "offset": float(raw.offset),
                "read_duration": raw.duration,
                "text": raw.text,
                "speaker": raw.speaker,
                "source": raw.source,
                "duration": duration,
                "length": int(round(duration * SAMPLING_RATE)),
            }
            if labels is not None:
                value = labels.get(int(source.line_numbers[index]))
                if value is None:
                    leave_out(f"no_{label_column}")
                    continue
                row["label"] = str(value)
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    if left_out:
        logger.warning("left out of %s: %s", ", ".join(manifests), left_out)
    return rows, left_out


def _read_column(manifest: str, column: str) -> dict[int, Any]:
    """line number (1-based) -> value of `column`, for the lines that have it."""
    values = {}
    with open(manifest, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    value = json.loads(line).get(column)
                except (json.JSONDecodeError, AttributeError):
                    continue
                if value is not None:
                    values[number] = value
    return values


def eval_set_names(manifests: Sequence[str]) -> list[str]:
    """Short unique names for eval manifests: the file stem, or `<folder>_<stem>` when stems repeat."""
    stems = [Path(m).stem for m in manifests]
    names = [s if stems.count(s) == 1 else f"{Path(m).parent.name}_{s}" for m, s in zip(manifests, stems)]
    if len(set(names)) < len(names):
        names = [f"{index}_{name}" for index, name in enumerate(names)]
    return names


def rows_to_dataset(rows: Sequence[Mapping[str, Any]], augment: bool):
    """A `datasets.Dataset` of metadata rows; `augment` marks training rows (dither + SpecAugment)."""
    import datasets

    if not rows:
        raise ValueError("no usable rows: every manifest row was left out (see the warning above) or none was given")
    return datasets.Dataset.from_list([{**row, "augment": augment} for row in rows])


def _raw_example(row: Mapping[str, Any]) -> RawExample:
    return RawExample(
        id=row["id"],
        audio=row["audio_filepath"],
        where=row["where"],
        offset=row["offset"] or 0.0,
        duration=row["read_duration"],
        text=row["text"],
        speaker=row["speaker"],
        source=row["source"],
    )


def decode_rows(
    rows: Sequence[Mapping[str, Any]], config: DataConfig, rng: np.random.Generator | None = None
) -> list[dict[str, Any]]:
    """Decode the audio of metadata rows; an unreadable row is logged and dropped (never the whole batch)."""
    examples = []
    for row in rows:
        try:
            example = decode_example(_raw_example(row), config, rng)
        except AudioError as error:
            logger.warning("skipping %s: %s", row["where"], error)
            continue
        example["label"] = row.get("label")
        examples.append(example)
    if not examples:
        raise RuntimeError(f"every example of a batch was unreadable: {[row['where'] for row in rows]}")
    return examples


@dataclass
class SpecAugmentConfig:
    """SpecAugment (Park et al. 2019) as NeMo's `SpectrogramAugmentation` defaults it for Conformer CTC."""

    freq_masks: int = 2
    freq_width: int = 27  # widest frequency mask, mel bins
    time_masks: int = 10
    time_width: float = 0.05  # widest time mask: fraction of the utterance (< 1) or frames (>= 1)
    fill_value: float = 0.0  # features are normalised per utterance, so 0 is each bin's mean


def spec_augment(
    features: torch.Tensor,
    lengths: torch.Tensor,
    config: SpecAugmentConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Mask random frequency bands and time spans of each utterance, all utterances at once (no Python loops).

    Args:
        features (`torch.Tensor` of shape (batch, frames, mels)): normalised log-mels from the collator.
        lengths (`torch.Tensor` of shape (batch,)): valid frames per utterance; masks stay inside them.
        config: mask counts and widths.
        generator: source of randomness (None: torch's global RNG, seeded per dataloader worker by torch).

    Returns:
        A new tensor, `features` with masked cells set to `config.fill_value`. Mask widths are uniform in
        [0, width] and starts uniform over the positions where the whole mask fits (NeMo's sampling).
    """
    batch, frames, mels = features.shape
    device = features.device
    lengths = lengths.to(device)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device="cpu" if generator is None else generator.device).to(
            device
        )

    masked = torch.zeros(batch, frames, mels, dtype=torch.bool, device=device)
    if config.freq_masks > 0 and config.freq_width > 0:
        max_width = min(config.freq_width, mels)
        widths = (draw((batch, config.freq_masks)) * (max_width + 1)).long()  # (batch, masks) in [0, max_width]
        starts = (draw((batch, config.freq_masks)) * (mels - widths + 1)).long()
        bins = torch.arange(mels, device=device)[None, None, :]  # (1, 1, mels)
        in_band = (bins >= starts[..., None]) & (bins < (starts + widths)[..., None])  # (batch, masks, mels)
        masked |= in_band.any(dim=1)[:, None, :]
    if config.time_masks > 0 and config.time_width > 0:
        if config.time_width < 1:
            max_width = (lengths.float() * config.time_width).long().clamp(min=1)  # (batch,)
        else:
            max_width = torch.full_like(lengths, int(config.time_width))
        max_width = torch.minimum(max_width, lengths)
        widths = (draw((batch, config.time_masks)) * (max_width[:, None] + 1)).long().clamp(max=max_width[:, None])
        starts = (draw((batch, config.time_masks)) * (lengths[:, None] - widths + 1)).long()
        steps = torch.arange(frames, device=device)[None, None, :]  # (1, 1, frames)
        in_span = (steps >= starts[..., None]) & (steps < (starts + widths)[..., None])  # (batch, masks, frames)
        masked |= in_span.any(dim=1)[:, :, None]
    return features.masked_fill(masked, config.fill_value)


class CtcCollator:
    """Metadata rows -> `{"input_features", "attention_mask", "labels"}` for `ConformerSslForCTC`.

    Rows with `augment=True` (the training set) get dither and SpecAugment; eval rows are featurised
    deterministically. Decoding and padding are `hf_ssl_speech.data`'s (`decode_example`, `SpeechCollator`).

    Args:
        processor: the `Wav2Vec2Processor` (our feature extractor + the CTC tokenizer).
        spec_augment: masking settings, or None for no SpecAugment.
        dither: add the feature extractor's dither to training audio.
    """

    def __init__(
        self, processor: Wav2Vec2Processor, spec_augment: SpecAugmentConfig | None = None, dither: bool = True
    ) -> None:
        self.processor = processor
        self.spec_augment = spec_augment
        self.dither = dither
        self.decode_config = DataConfig(min_duration=0.0, max_duration=None, crop_long=False, require_text=True)

    def _collator(self, augment: bool) -> SpeechCollator:
        extractor = self.processor.feature_extractor
        if augment and self.dither:
            extractor = functools.partial(extractor, dither=extractor.dither)
        return SpeechCollator(extractor, text_to_ids=functools.partial(text_to_ids, self.processor.tokenizer))

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        augment = all(row.get("augment", False) for row in rows)
        batch = self._collator(augment)(decode_rows(rows, self.decode_config))
        out = {key: batch[key] for key in ("input_features", "attention_mask", "labels")}
        if augment and self.spec_augment is not None:
            out["input_features"] = spec_augment(
                out["input_features"], out["attention_mask"].sum(-1), self.spec_augment
            )
        return out


class ClassificationCollator:
    """Metadata rows (with `label`) -> `{"input_features", "attention_mask", "labels"}` for classification.

    Args:
        feature_extractor: our feature extractor.
        label2id: class name -> id (from the training rows).
        max_duration: clips are cropped to this many seconds (random window for training rows, the start for
            eval rows); None keeps whole clips.
        spec_augment: masking for training rows, or None.
    """

    def __init__(
        self,
        feature_extractor: ConformerSslFeatureExtractor,
        label2id: Mapping[str, int],
        max_duration: float | None = None,
        spec_augment: SpecAugmentConfig | None = None,
    ) -> None:
        self.feature_extractor = feature_extractor
        self.label2id = dict(label2id)
        self.spec_augment = spec_augment
        self.decode_config = DataConfig(min_duration=0.0, max_duration=max_duration, crop_long=True)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        augment = all(row.get("augment", False) for row in rows)
        # Crop windows from torch's RNG: seeded by Trainer, and differently in each dataloader worker.
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, ()))) if augment else None
        examples = decode_rows(rows, self.decode_config, rng)
        batch = SpeechCollator(self.feature_extractor)(examples)
        out = {key: batch[key] for key in ("input_features", "attention_mask")}
        out["labels"] = torch.tensor([self.label2id[example["label"]] for example in examples], dtype=torch.long)
        if augment and self.spec_augment is not None:
            out["input_features"] = spec_augment(
                out["input_features"], out["attention_mask"].sum(-1), self.spec_augment
            )
        return out


# ============================================================================================ model init
@dataclass
class LoadReport:
    """What `from_pretrained` did with the checkpoint's tensors (names relative to the head model)."""

    missing_encoder: list[str]
    mismatched_encoder: list[str]
    new_head: list[str]
    unused: list[str]

    @property
    def encoder_complete(self) -> bool:
        return not self.missing_encoder and not self.mismatched_encoder


def _load_report(info: Mapping[str, Any], base_prefix: str = "conformer.") -> LoadReport:
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(key if isinstance(key, str) else key[0] for key in info.get("mismatched_keys", []))
    return LoadReport(
        missing_encoder=[k for k in missing if k.startswith(base_prefix)],
        mismatched_encoder=[k for k in mismatched if k.startswith(base_prefix)],
        new_head=[k for k in [*missing, *mismatched] if not k.startswith(base_prefix)],
        unused=sorted(info.get("unexpected_keys", [])),
    )


def _warn_encoder_keys(report: LoadReport, source: str) -> None:
    if report.encoder_complete:
        logger.info("encoder weights loaded from %s; new head tensors: %s", source, report.new_head)
        return
    problems = []
    if report.missing_encoder:
        problems.append(f"{len(report.missing_encoder)} missing: {report.missing_encoder}")
    if report.mismatched_encoder:
        problems.append(f"{len(report.mismatched_encoder)} with another shape: {report.mismatched_encoder}")
    message = (
        f"!!! ENCODER WEIGHTS NOT LOADED from {source} — these encoder tensors are RANDOMLY INITIALISED: "
        f"{'; '.join(problems)}. The checkpoint does not match this architecture (config overrides that change "
        "shapes? a checkpoint of another model?). Fine-tuning continues, but not from the pretrained encoder."
    )
    logger.warning(message)
    warnings.warn(message, stacklevel=3)


def _model_config(
    model_name_or_path: str | None, model_preset: str | None, overrides: Mapping[str, Any], cache_dir: str | None
) -> ConformerSslConfig:
    if model_name_or_path:
        config = ConformerSslConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"config_overrides: {key!r} is not a ConformerSslConfig field")
            setattr(config, key, value)
        config.validate()
        return config
    if model_preset:
        return preset_config(model_preset, **overrides)
    raise ValueError(
        "no model given: pass --model_name_or_path (a pretraining checkpoint folder or Hub repo), or "
        "--from_scratch with --model_preset (e.g. 'tiny', 'fastconformer_s')."
    )


def init_ctc_model(
    vocab_size: int,
    pad_token_id: int = 0,
    model_name_or_path: str | None = None,
    from_scratch: bool = False,
    model_preset: str | None = None,
    config_overrides: str | Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
) -> tuple[ConformerSslForCTC, LoadReport | None]:
    """
    `ConformerSslForCTC` from a checkpoint's encoder (new CTC head) or, `from_scratch`, randomly initialised.

    Args:
        vocab_size / pad_token_id: from the tokenizer (`len(tokenizer)`, `tokenizer.pad_token_id` = blank).
        model_name_or_path: a save_pretrained folder or Hub repo of any ConformerSsl model (pretraining,
            base, or another CTC model: a head of another size is re-initialised).
        from_scratch: same architecture, random weights (the checkpoint's config, or `model_preset`).
        model_preset: a preset name / YAML path, for from-scratch runs without a checkpoint.
        config_overrides: ConformerSslConfig fields to change ('a=1,b=2' or a dict), e.g. dropouts.
        cache_dir: Hub download cache.

    Returns:
        (model, report): `report` lists missing / mismatched encoder tensors (a loud warning names them)
        and is None for from-scratch models.
    """
    overrides = {**parse_config_overrides(config_overrides), "vocab_size": vocab_size, "pad_token_id": pad_token_id}
    config = _model_config(model_name_or_path, model_preset, overrides, cache_dir)
    if from_scratch or not model_name_or_path:
        if not from_scratch:
            raise ValueError("--model_preset without --model_name_or_path builds a random model: add --from_scratch")
        return ConformerSslForCTC(config), None
    model, info = ConformerSslForCTC.from_pretrained(
        model_name_or_path, config=config, ignore_mismatched_sizes=True, output_loading_info=True, cache_dir=cache_dir
    )
    report = _load_report(info)
    _warn_encoder_keys(report, model_name_or_path)
    return model, report


def init_classification_model(
    label2id: Mapping[str, int],
    model_name_or_path: str | None = None,
    from_scratch: bool = False,
    model_preset: str | None = None,
    config_overrides: str | Mapping[str, Any] | None = None,
    use_weighted_layer_sum: bool = False,
    classifier_proj_size: int | None = None,
    cache_dir: str | None = None,
) -> tuple[ConformerSslForSequenceClassification, LoadReport | None]:
    """`ConformerSslForSequenceClassification` with `len(label2id)` classes; arguments as `init_ctc_model`."""
    overrides = {
        **parse_config_overrides(config_overrides),
        "num_labels": len(label2id),
        "use_weighted_layer_sum": use_weighted_layer_sum,
    }
    if classifier_proj_size is not None:
        overrides["classifier_proj_size"] = classifier_proj_size
    config = _model_config(model_name_or_path, model_preset, overrides, cache_dir)
    config.label2id = dict(label2id)
    config.id2label = {index: name for name, index in label2id.items()}
    if from_scratch or not model_name_or_path:
        if not from_scratch:
            raise ValueError("--model_preset without --model_name_or_path builds a random model: add --from_scratch")
        return ConformerSslForSequenceClassification(config), None
    model, info = ConformerSslForSequenceClassification.from_pretrained(
        model_name_or_path, config=config, ignore_mismatched_sizes=True, output_loading_info=True, cache_dir=cache_dir
    )
    report = _load_report(info)
    _warn_encoder_keys(report, model_name_or_path)
    return model, report


def model_num_mel_bins(
    model_name_or_path: str | None, model_preset: str | None, config_overrides: Any, cache_dir: str | None = None
) -> int:
    """Mel bins the model expects (its config's `num_mel_bins`), to build a matching feature extractor."""
    overrides = parse_config_overrides(config_overrides)
    return _model_config(model_name_or_path, model_preset, overrides, cache_dir).num_mel_bins


def load_feature_extractor(
    model_name_or_path: str | None, num_mel_bins: int, cache_dir: str | None = None
) -> ConformerSslFeatureExtractor:
    """The checkpoint's feature extractor if it saved one, else our default with `num_mel_bins` bins."""
    if model_name_or_path:
        try:
            extractor = ConformerSslFeatureExtractor.from_pretrained(model_name_or_path, cache_dir=cache_dir)
        except (OSError, ValueError) as error:
            logger.info("no feature extractor in %s (%s); using the default", model_name_or_path, error)
        else:
            if extractor.feature_size != num_mel_bins:
                raise ValueError(
                    f"{model_name_or_path}: feature extractor has feature_size={extractor.feature_size} but the model "
                    f"expects num_mel_bins={num_mel_bins}; fix preprocessor_config.json or the config overrides."
                )
            return extractor
    return ConformerSslFeatureExtractor(feature_size=num_mel_bins)


def resolve_manifests(data_args: DataArguments, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval) manifests: the given ones, or the demo corpus' finetune/test splits (made if missing)."""
    if data_args.train_manifests:
        return list(data_args.train_manifests), list(data_args.eval_manifests)
    from .demo_corpus import make_demo_corpus

    folder = Path(data_args.demo_corpus_dir)
    logger.warning("no --train_manifests: using the demo corpus in %s (%s minutes)", folder, data_args.demo_minutes)
    make_demo_corpus(folder, minutes=data_args.demo_minutes, seed=seed)
    eval_manifests = list(data_args.eval_manifests) or [str(folder / "test.jsonl")]
    return [str(folder / "finetune.jsonl")], eval_manifests


def ctc_output_steps(num_samples: int, config: ConformerSslConfig) -> int:
    """Encoder steps for an utterance of `num_samples` samples: samples // hop frames, ceil(L / 2) per stage."""
    steps = num_samples // config.hop_length
    for _ in range(int(math.log2(config.subsampling_factor))):
        steps = (steps - 1) // 2 + 1
    return steps


def ctc_min_steps(label_ids: Sequence[int]) -> int:
    """Fewest CTC steps that can emit `label_ids`: one per label, plus a blank between repeated labels."""
    return len(label_ids) + sum(1 for a, b in zip(label_ids, label_ids[1:]) if a == b)


def split_ctc_feasible(
    rows: Sequence[Mapping[str, Any]], tokenizer: Wav2Vec2CTCTokenizer, config: ConformerSslConfig
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(feasible, infeasible) rows: infeasible transcripts need more CTC steps than the encoder emits.

    Their CTC loss is infinite (zeroed by `ctc_zero_infinity`, so they silently teach nothing). Characters at
    ~15 per second of speech do not fit 8x subsampling (12.5 steps per second): use a 4x (Conformer) model or
    a subword vocabulary for those.
    """
    feasible, infeasible = [], []
    for row in rows:
        needed = ctc_min_steps(text_to_ids(tokenizer, row["text"]))
        (feasible if needed <= ctc_output_steps(row["length"], config) else infeasible).append(row)
    return feasible, infeasible


def drop_infeasible_ctc(
    rows: list[dict[str, Any]], tokenizer: Wav2Vec2CTCTokenizer, config: ConformerSslConfig, what: str
) -> list[dict[str, Any]]:
    """Training rows without the CTC-infeasible ones; warns with counts, refuses when most are infeasible."""
    feasible, infeasible = split_ctc_feasible(rows, tokenizer, config)
    if not infeasible:
        return list(feasible)
    message = (
        f"{what}: {len(infeasible)} of {len(rows)} transcripts are longer than the encoder's output "
        f"({config.subsampling_factor}x subsampling = {config.inputs_to_logits_ratio / 16:.0f} ms per CTC step), "
        f"e.g. {infeasible[0]['where']} ({row_rate(infeasible[0]):.1f} characters/s)"
    )
    if len(infeasible) * 2 > len(rows):
        raise ValueError(
            f"{message}. CTC cannot learn them: fine-tune a model with subsampling_factor=4 (e.g. "
            "config_overrides='subsampling=striding,subsampling_factor=4' from scratch), or use shorter units."
        )
    logger.warning("%s; leaving them out of training.", message)
    return list(feasible)


def row_rate(row: Mapping[str, Any]) -> float:
    """Characters of normalised transcript per second of audio."""
    return len(normalize_transcript(row["text"])) / max(row["length"] / SAMPLING_RATE, 1e-6)


# ============================================================================================ optimisation
NO_DECAY_SUFFIXES = ("bias", "bias_u", "bias_v", "layer_weights")


def parameter_layer(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: 0 subsampling/positions, i + 1 block i, L + 1 heads."""
    if name.startswith("conformer.layers."):
        return int(name.split(".")[2]) + 1
    if name.startswith("conformer."):
        return 0
    return num_layers + 1


def layerwise_param_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """
    AdamW parameter groups with layer-wise learning-rate decay (Clark et al. 2020, ELECTRA; BEiT).

    lr(depth d) = learning_rate * layer_decay^(L + 1 - d): the new head (d = L + 1) trains at `learning_rate`,
    the top block at lr * decay, ..., the subsampling (d = 0) at lr * decay^(L + 1). Norm scales, biases, the
    relative-position biases and layer weights get no weight decay. Every parameter is included, trainable or
    not, so an encoder frozen now (`FreezeEncoderCallback`) trains once unfrozen. The head's group comes first,
    so Trainer logs the peak learning rate. The scheduler scales every group's lr by the same factor.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay={layer_decay}: must be in (0, 1] (1 = no decay)")
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        depth = parameter_layer(name, num_layers)
        no_decay = param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_SUFFIXES or "norm" in name
        group = groups.setdefault(
            (depth, no_decay),
            {
                "params": [],
                "lr": learning_rate * layer_decay ** (num_layers + 1 - depth),
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"depth{depth}{'_no_decay' if no_decay else ''}",
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], key[1]))]


def build_optimizer(model: nn.Module, args: Any, layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW from TrainingArguments' learning_rate / weight_decay / adam_beta1, adam_beta2 / adam_epsilon."""
    groups = layerwise_param_groups(model, args.learning_rate, args.weight_decay, layer_decay)
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def set_encoder_trainable(model: nn.Module, trainable: bool) -> None:
    """Switch `requires_grad` of the encoder (`model.conformer`); the head is untouched."""
    if trainable:
        model.unfreeze_base_model()
    else:
        model.freeze_base_model()


class FreezeEncoderCallback(TrainerCallback):
    """Train only the new head for the first `freeze_steps` optimiser steps, then the whole model.

    A fresh head on a pretrained encoder sends large, random gradients into it at first; freezing the encoder
    until the head is sensible protects the pretrained features (NeMo / fairseq `freeze_finetune_updates`).
    The optimiser must hold the encoder's parameters from the start (`layerwise_param_groups` does): frozen
    parameters simply get no gradient, so AdamW leaves them (and their moments) untouched. BatchNorm running
    statistics stay fixed while frozen (`SslTrainer` keeps a frozen encoder in eval mode).
    Under DDP, set `ddp_find_unused_parameters=True`: the frozen encoder's parameters get no gradient.
    """

    def __init__(self, freeze_steps: int) -> None:
        self.freeze_steps = freeze_steps
        self.frozen = False

    def _update(self, state, model) -> None:
        should_freeze = state.global_step < self.freeze_steps
        if model is not None and should_freeze != self.frozen:
            set_encoder_trainable(model, not should_freeze)
            self.frozen = should_freeze
            logger.info("step %d: encoder %s", state.global_step, "frozen" if should_freeze else "unfrozen")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._update(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._update(state, model)


def train_time_options(
    data_args: DataArguments, finetune_args: FinetuneArguments
) -> tuple[SpecAugmentConfig | None, list[TrainerCallback]]:
    """The SpecAugment settings and Trainer callbacks (encoder freeze, early stopping) that both fine-tuning
    scripts (CTC and classification) derive from their arguments."""
    spec = None
    if data_args.spec_augment:
        spec = SpecAugmentConfig(data_args.freq_masks, data_args.freq_width, data_args.time_masks, data_args.time_width)
    callbacks: list[TrainerCallback] = []
    if finetune_args.freeze_encoder_steps > 0 and not finetune_args.freeze_encoder:
        callbacks.append(FreezeEncoderCallback(finetune_args.freeze_encoder_steps))
    if finetune_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(finetune_args.early_stopping_patience))
    return spec, callbacks


# ============================================================================================ evaluation
def metric_path(name: str) -> str:
    """Folder of a shipped `evaluate` module ("wer" or "cer"), for `evaluate.load(metric_path(name))`."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"no local metric {name!r} in {METRICS_DIR}; available: wer, cer")
    return str(folder)


def load_metrics(names: Sequence[str] = ("wer", "cer")) -> dict[str, Any]:
    """The local `evaluate` modules by path: no Hub access (`evaluate.load("wer")` needs the Hub)."""
    import evaluate

    return {name: evaluate.load(metric_path(name)) for name in names}


def greedy_ctc_ids(logits: torch.Tensor, output_lengths: torch.Tensor, blank_id: int) -> torch.Tensor:
    """Best path ids (batch, steps): argmax per step, steps past each utterance's length set to the blank."""
    ids = logits.argmax(dim=-1)
    steps = torch.arange(ids.shape[1], device=ids.device)[None, :]
    return ids.masked_fill(steps >= output_lengths.to(ids.device)[:, None], blank_id)


class SslTrainer(Trainer):
    """`Trainer` that keeps a frozen encoder in eval mode: a linear probe must see fixed features.

    `Trainer.training_step` puts the whole model in train mode before `compute_loss`; with the encoder frozen
    (`--freeze_encoder`, or the first `--freeze_encoder_steps`), its BatchNorm statistics would otherwise
    follow the labeled data and its dropout stay on, so the "frozen" features would still change.
    """

    def compute_loss(self, model, inputs, *args, **kwargs):
        encoder = self.accelerator.unwrap_model(model).conformer
        if not any(p.requires_grad for p in encoder.parameters()):
            encoder.eval()
        return super().compute_loss(model, inputs, *args, **kwargs)


class CtcTrainer(SslTrainer):
    """`SslTrainer` whose evaluation gathers greedy CTC ids instead of full logits.

    The model emits logits on padded steps too (nothing there to predict, but not necessarily blank); without
    the output lengths, `compute_metrics` would decode them as text. This prediction step blanks them, and
    gathering (batch, steps) ids instead of (batch, steps, vocab) logits keeps evaluation memory small.
    """

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if prediction_loss_only or logits is None:
            return loss, logits, labels
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        unwrapped = self.accelerator.unwrap_model(model)
        output_lengths = unwrapped._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
        return loss, greedy_ctc_ids(logits, output_lengths, unwrapped.config.pad_token_id), labels


def decode_predictions(tokenizer: Wav2Vec2CTCTokenizer, pred_ids: np.ndarray, label_ids: np.ndarray):
    """(hypotheses, references) from Trainer-gathered ids (-100 padding); CTC grouping on hypotheses only."""
    pad = tokenizer.pad_token_id
    hypotheses = tokenizer.batch_decode(np.where(pred_ids == -100, pad, pred_ids))
    references = tokenizer.batch_decode(np.where(label_ids == -100, pad, label_ids), group_tokens=False)
    return hypotheses, references


def make_ctc_compute_metrics(
    tokenizer: Wav2Vec2CTCTokenizer, metrics: Mapping[str, Any] | None = None
) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for `CtcTrainer`: corpus WER and CER of the greedy transcripts."""
    metrics = metrics or load_metrics()

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        hypotheses, references = decode_predictions(tokenizer, prediction.predictions, prediction.label_ids)
        return {name: metric.compute(predictions=hypotheses, references=references) for name, metric in metrics.items()}

    return compute


def classification_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for classification: accuracy of the arg-max class."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == prediction.label_ids).mean())}


@torch.no_grad()
def transcribe(
    model: ConformerSslForCTC,
    processor: Wav2Vec2Processor,
    audios: Sequence[np.ndarray],
    batch_size: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> list[str]:
    """
    Greedy CTC transcripts of 16 kHz mono float32 arrays, in batches, padded steps ignored.

    Args:
        model / processor: a fine-tuned pair (e.g. `AutoModelForCTC` / `AutoProcessor` of one folder).
        audios: the waveforms; batches are formed in the given order.
        batch_size: utterances per forward pass.
        progress: called with the number of utterances done after each batch (e.g. `tqdm.update`).
    """
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(audios), batch_size):
        chunk = list(audios[start : start + batch_size])
        inputs = processor.feature_extractor(chunk, sampling_rate=SAMPLING_RATE, return_tensors="pt", device=device)
        logits = model(**inputs).logits  # (batch, steps, vocab)
        lengths = model._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
        texts.extend(processor.batch_decode(greedy_ctc_ids(logits, lengths, model.config.pad_token_id).cpu()))
        if progress is not None:
            progress(len(chunk))
    return texts


# ============================================================================================ reports
def write_results(results: Mapping[str, Mapping[str, float]], output_dir: str | Path) -> tuple[Path, Path]:
    """Write `results.json` and `results.md` (one row per eval set: utterances, WER, CER as percentages)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if not results:
        md_path = output_dir / "results.md"
        md_path.write_text("No eval set was given: nothing was evaluated.\n")
        return md_path, json_path
    keys = sorted({key for values in results.values() for key in values if key not in ("utterances",)})
    header = "| eval set | utterances | " + " | ".join(_column_name(key) for key in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for name, values in results.items():
        cells = [_format_cell(key, values.get(key)) for key in keys]
        lines.append(f"| {name} | {values.get('utterances', '')} | " + " | ".join(cells) + " |")
    md_path = output_dir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path


def _column_name(key: str) -> str:
    return f"{key.upper()} (%)" if key in ("wer", "cer") else key


def _format_cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key in ("wer", "cer"):
        return f"{100 * value:.2f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_training_curves(log_history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """PNG of train/eval loss and eval WER/CER (or accuracy) against the step, from `trainer.state.log_history`.

    Returns the path, or None when the history holds nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        return [p[0] for p in points], [p[1] for p in points]

    losses = {key: series(key) for key in ("loss", "eval_loss")}
    scores = {key: series(key) for key in ("eval_wer", "eval_cer", "eval_accuracy")}
    if not any(xs for xs, _ in [*losses.values(), *scores.values()]):
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, (xs, ys) in losses.items():
        if xs:
            left.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
    left.set(xlabel="step", ylabel="loss", title="loss")
    left.legend()
    for key, (xs, ys) in scores.items():
        if xs:
            right.plot(xs, [100 * y for y in ys], marker="o", label=key)
    right.set(xlabel="step", ylabel="%", title="evaluation")
    if right.lines:
        right.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def model_index(
    model_name: str, results: Mapping[str, Mapping[str, float]], dataset_name: str, dataset_type: str
) -> list[dict[str, Any]]:
    """Hub `model-index` metadata: one result per eval set with WER and CER in percent."""
    entries = []
    for split, values in results.items():
        metrics = [
            {"type": key, "value": round(100 * float(values[key]), 2), "name": f"{split} {key.upper()} (%)"}
            for key in ("wer", "cer")
            if values.get(key) is not None and math.isfinite(values[key])
        ]
        if metrics:
            entries.append(
                {
                    "task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
                    "dataset": {"name": dataset_name, "type": dataset_type, "split": split},
                    "metrics": metrics,
                }
            )
    return [{"name": model_name, "results": entries}]


def ctc_model_card(
    repo_id: str,
    results: Mapping[str, Mapping[str, float]],
    base_model: str | None = None,
    dataset_name: str = "hf_ssl_speech demo corpus",
    dataset_type: str = "hf_ssl_speech-demo",
    language: str = "en",
    training_summary: Mapping[str, Any] | None = None,
) -> str:
    """README.md of a fine-tuned CTC model: metadata with `model-index` (WER/CER), usage, results table."""
    name = repo_id.split("/")[-1]
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "automatic-speech-recognition",
        "license": "apache-2.0",
        "language": [language],
        "tags": ["automatic-speech-recognition", "ctc", "conformer", "hf_ssl_speech"],
    }
    if base_model and "/" in base_model and not os.path.exists(base_model):
        metadata["base_model"] = base_model  # only a Hub id is meaningful on the Hub
    metadata["model-index"] = model_index(name, results, dataset_name, dataset_type)
    table = ["| eval set | WER (%) | CER (%) |", "|---|---|---|"]
    for split, values in results.items():
        table.append(
            f"| {split} | {_format_cell('wer', values.get('wer'))} | {_format_cell('cer', values.get('cer'))} |"
        )
    summary = "\n".join(f"- {key}: {value}" for key, value in (training_summary or {}).items())
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {name}

A Conformer CTC speech recogniser fine-tuned with `hf_ssl_speech` (`scripts/finetune_ctc.py`)
{f"from `{base_model}`" if base_model else "from scratch"}. Character vocabulary, greedy CTC decoding.

## Results

{chr(10).join(table)}

## Usage

```python
import hf_ssl_speech  # or pass trust_remote_code=True when the package is not installed
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="{repo_id}")
print(asr(audio_16khz_float32)["text"])
# long recordings: asr(audio, chunk_length_s=20, stride_length_s=4)
```

## Training

{summary or "See training_args.bin and results.json."}
"""


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload fine-tuned hf_ssl_speech model",
) -> str:
    """Create `repo_id` if needed and upload a finished output folder (checkpoints and logs left out).

    The endpoint is `HF_ENDPOINT` (the Hub by default); returns the commit URL.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: push the output_dir after training finished.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "demo_corpus/**", "*.tmp"],
    )
    return info.commit_url


__all__ = [
    "ClassificationCollator",
    "CtcCollator",
    "CtcTrainer",
    "DataArguments",
    "FinetuneArguments",
    "FreezeEncoderCallback",
    "LoadReport",
    "ModelArguments",
    "SpecAugmentConfig",
    "build_optimizer",
    "build_processor",
    "build_tokenizer",
    "build_vocab",
    "classification_accuracy",
    "ctc_model_card",
    "ctc_min_steps",
    "ctc_output_steps",
    "decode_predictions",
    "drop_infeasible_ctc",
    "eval_set_names",
    "greedy_ctc_ids",
    "init_classification_model",
    "init_ctc_model",
    "layerwise_param_groups",
    "load_metrics",
    "make_ctc_compute_metrics",
    "manifest_rows",
    "metric_path",
    "model_index",
    "normalize_transcript",
    "parse_args",
    "plot_training_curves",
    "push_folder",
    "rows_to_dataset",
    "spec_augment",
    "split_ctc_feasible",
    "transcribe",
    "write_results",
]
