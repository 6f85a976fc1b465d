"""Fine-tuning models from a pretraining checkpoint (encoder transferred, loudly checked) or from scratch."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from transformers import AutoFeatureExtractor

from ..configuration_conformer_ssl import ConformerSslConfig
from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from ..modeling_conformer_ssl import ConformerSslForCTC, ConformerSslForSequenceClassification
from ..presets import preset_config
from .args import parse_config_overrides

logger = logging.getLogger(__name__)


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


def _modules(keys: Sequence[str]) -> str:
    """Tensor names -> the modules that own them, in order ('bestrq_head.weight', 'bestrq_head.bias' -> 'bestrq_head')."""
    names = dict.fromkeys(key.rsplit(".", 1)[0] if "." in key else key for key in keys)
    return ", ".join(names) or "none"


def describe_load(report: LoadReport, source: str) -> str:
    """Our one line about a checkpoint loaded into a fine-tuning head: what was dropped and what is new."""
    return (
        f"encoder loaded from {source}; dropped (not used by this head): {_modules(report.unused)}; "
        f"new (randomly initialised): {_modules(report.new_head)}"
    )


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def without_load_report() -> Iterator[None]:
    """Drop transformers' LOAD REPORT table (13 lines with ANSI colour codes) while a checkpoint is loaded into a
    fine-tuning head: dropping the pretraining heads and adding a new one is expected there, and `describe_load`
    says it in one line (`_warn_encoder_keys` warns loudly when the encoder itself did not load)."""
    target = logging.getLogger("transformers.modeling_utils")
    dropper = _DropLoadReport()
    target.addFilter(dropper)
    try:
        yield
    finally:
        target.removeFilter(dropper)


def _warn_encoder_keys(report: LoadReport, source: str) -> None:
    if report.encoder_complete:
        logger.info(describe_load(report, source))
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


def _head_model(
    model_class: type,
    config: ConformerSslConfig,
    model_name_or_path: str | None,
    from_scratch: bool,
    cache_dir: str | None,
) -> tuple[Any, LoadReport | None]:
    """`model_class` from scratch, or with the checkpoint's encoder (our one load line, a loud warning for missing
    encoder tensors); the report is None from scratch."""
    if from_scratch or not model_name_or_path:
        if not from_scratch:
            raise ValueError("--model_preset without --model_name_or_path builds a random model: add --from_scratch")
        return model_class(config), None
    with without_load_report():
        model, info = model_class.from_pretrained(
            model_name_or_path,
            config=config,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            cache_dir=cache_dir,
        )
    report = _load_report(info)
    _warn_encoder_keys(report, model_name_or_path)
    return model, report


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
    return _head_model(ConformerSslForCTC, config, model_name_or_path, from_scratch, cache_dir)


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
    return _head_model(ConformerSslForSequenceClassification, config, model_name_or_path, from_scratch, cache_dir)


def model_num_mel_bins(
    model_name_or_path: str | None, model_preset: str | None, config_overrides: Any, cache_dir: str | None = None
) -> int:
    """Mel bins the model expects (its config's `num_mel_bins`), to build a matching feature extractor."""
    return model_input_config(model_name_or_path, model_preset, config_overrides, cache_dir).num_mel_bins


def model_input_config(
    model_name_or_path: str | None, model_preset: str | None, config_overrides: Any, cache_dir: str | None = None
) -> ConformerSslConfig:
    """The config the fine-tuned model will have (checkpoint or preset, with the overrides): what its features are."""
    overrides = parse_config_overrides(config_overrides)
    return _model_config(model_name_or_path, model_preset, overrides, cache_dir)


def _feature_dims(extractor: Any) -> int:
    """Feature dimensions an extractor gives: SeamlessM4T's stacks `stride` fbank frames (80 bins x 2 = 160)."""
    return int(extractor.feature_size) * int(getattr(extractor, "stride", 1))


def load_feature_extractor(
    model_name_or_path: str | None, num_mel_bins: int, cache_dir: str | None = None, stacked_fbank: bool = False
) -> Any:
    """The checkpoint's feature extractor if it saved one (ours, or transformers' `SeamlessM4TFeatureExtractor` in a
    folder converted from w2v-BERT), else the default for the model: our log-mels with `num_mel_bins` bins, or with
    `stacked_fbank` (a `feature_projection` model from scratch) SeamlessM4T's stacked fbank."""
    if model_name_or_path:
        try:
            extractor = AutoFeatureExtractor.from_pretrained(model_name_or_path, cache_dir=cache_dir)
        except (OSError, ValueError) as error:
            logger.info("no feature extractor in %s (%s); using the default", model_name_or_path, error)
        else:
            if _feature_dims(extractor) != num_mel_bins:
                raise ValueError(
                    f"{model_name_or_path}: feature extractor gives {_feature_dims(extractor)} dimensions but the "
                    f"model expects num_mel_bins={num_mel_bins}; fix preprocessor_config.json or the config overrides."
                )
            return extractor
    if stacked_fbank:
        from ..interop.w2v_bert import STACK_STRIDE, SeamlessM4TFeatureExtractor

        bins = num_mel_bins // STACK_STRIDE
        return SeamlessM4TFeatureExtractor(feature_size=bins, num_mel_bins=bins, stride=STACK_STRIDE)
    return ConformerSslFeatureExtractor(feature_size=num_mel_bins)


# ============================================================================================ other checkpoints
CONVERTED_FAMILIES = ("nemo", "parakeet")  # sources whose encoder is converted into ours before fine-tuning


@contextmanager
def converted_source(model_name_or_path: str | None, from_scratch: bool = False) -> Iterator[str | None]:
    """`model_name_or_path`, or, for a NeMo `.nemo` file or a Parakeet folder / Hub repo, a temporary folder of ours
    holding its encoder (`interop.convert.load_source`: identical outputs), removed on exit.

    What the fine-tuning scripts load is then always a folder of ours, so every later check (encoder keys, features,
    Parakeet compatibility) is the same whatever the source was."""
    import tempfile

    from ..interop.convert import NEMO_SUFFIX, ConversionError, load_source, source_family

    if not model_name_or_path or from_scratch:
        yield model_name_or_path
        return
    family = "nemo" if model_name_or_path.endswith(NEMO_SUFFIX) else None
    if family is None:
        try:
            family = source_family(model_name_or_path)[0]
        except ConversionError:
            family = None  # not a convertible source: the normal loading path says what is wrong
    if family not in CONVERTED_FAMILIES:
        yield model_name_or_path
        return
    source = load_source(model_name_or_path)
    with tempfile.TemporaryDirectory(prefix="converted_encoder_") as folder:
        source.model.save_pretrained(folder)
        source.feature_extractor.save_pretrained(folder)
        logger.info("%s: converted to our classes (%s)%s", model_name_or_path, source.description,
                    "; " + "; ".join(source.notes) if source.notes else "")  # fmt: skip
        yield folder
