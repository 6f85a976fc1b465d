"""Pretraining recipes: typed sections, YAML loading and dotted command-line overrides.

A recipe is a YAML file with five sections:

```yaml
model:      {preset: fastconformer_s, num_hidden_layers: 4}   # configs/model/<preset>.yaml + ConformerSslConfig fields
objectives: {bestrq: {weight: 1.0, start_step: 0, layer: -1}}
data:       {train_manifests: [...], valid_manifests: [...], batch_seconds: 160, ...}
optim:      {lr: 5.0, scheduler: noam, warmup_steps: 25000, ...}
train:      {output_dir: runs/nest, max_steps: 100000, save_steps: 2500, ...}
```

Every key is checked against the schema when the file is read and when a `section.key=value` override is
applied: an unknown key names the valid keys of its section (with the closest match), a wrong type names
the key, the value and the expected type. `model_config(recipe)` turns a recipe into a `ConformerSslConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configuration_conformer_ssl import OBJECTIVES, ConformerSslConfig

SECTIONS = ("model", "objectives", "data", "optim", "train")
# Where `model.preset: <name>` is looked up, after the folder `../model` next to the recipe file.
PACKAGE_PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "model"
SCHEDULERS = ("noam", "cosine", "linear", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
REPORT_TO = ("tensorboard", "none")


class RecipeError(ValueError):
    """A recipe key or value that does not fit the schema; the message says which and how to fix it."""


@dataclass
class ObjectiveSpec:
    """One pretraining objective's share of the loss (becomes `ConformerSslConfig.objectives[name]`)."""

    weight: float = 1.0  # w_o in loss = sum_o w_o * sum_o / count_o
    start_step: int = 0  # the objective contributes from this optimiser step on
    layer: int = -1  # hidden state it reads: -1 final block, 0 subsampling output, k block k


@dataclass
class DataSection:
    """Where the audio comes from and how batches are made (consumed by `hf_ssl_speech.data`)."""

    train_manifests: list[str] = field(default_factory=list)  # NeMo JSONL manifests (paths relative to the cwd)
    valid_manifests: list[str] = field(default_factory=list)  # held-out manifests for validation losses
    weights: list[float] | None = None  # sampling weight per train manifest (None: proportional to size)
    batch_seconds: float = 160.0  # audio seconds per batch per process (length-bucketed batches)
    max_batch_size: int = 64  # cap on utterances per batch whatever their length
    max_duration: float = 20.0  # longer clips are randomly cropped to this many seconds
    min_duration: float = 0.5  # shorter clips are skipped (and counted)
    sampling_rate: int = 16000
    dither: float = 1e-5  # NeMo: std of Gaussian noise added to the training waveforms before the log-mel
    num_workers: int = 0  # DataLoader worker processes per training process
    shuffle: bool = True
    frame_labels_key: str | None = None  # manifest key holding frame labels (HuBERT external targets)
    # NEST denoising: with this probability mix white noise or another utterance of the batch into the input
    # (targets stay clean). No noise corpus is read: NEST's MUSAN noise is replaced by Gaussian noise.
    denoising_prob: float = 0.0
    noise_snr_db: tuple[float, float] = (-5.0, 20.0)  # NEST: noise at -5..20 dB
    speech_snr_db: tuple[float, float] = (-5.0, 5.0)  # NEST: another utterance at -5..5 dB


@dataclass
class OptimSection:
    """AdamW, the learning-rate schedule, clipping and the Gumbel temperature schedule."""

    lr: float = 1e-3  # peak LR, or NeMo's Noam `lr` (scaled by (d_model * warmup)^-0.5 at the peak)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 1e-3  # not applied to norms, biases and embeddings
    scheduler: str = "noam"  # noam | cosine | linear | constant (the last three with linear warmup)
    warmup_steps: int = 1000
    min_lr: float = 1e-6  # floor of the Noam decay (NeMo NoamAnnealing.min_lr)
    clip: float = 1.0  # max gradient norm; <= 0 disables clipping
    gumbel_temperature_start: float = 2.0  # wav2vec 2.0 / NeMo: 2 -> 0.5, x0.999995 per step
    gumbel_temperature_end: float = 0.5
    gumbel_temperature_decay: float = 0.999995


@dataclass
class TrainSection:
    """The run: length, checkpoints, logging, precision, Hub push."""

    output_dir: str = "runs/pretrain"
    max_steps: int = 1000  # optimiser steps
    max_minutes: float | None = None  # stop (and checkpoint) after this wall time, whatever max_steps says
    save_steps: int = 500
    eval_steps: int = 500
    eval_batches: int | None = 20  # validation batches per evaluation (None: the whole valid set)
    eval_seed: int = 0  # generator seed of the validation masks: every evaluation sees the same masks
    log_steps: int = 10
    seed: int = 1234
    grad_accum: int = 1  # micro-batches per optimiser step
    mixed_precision: str = "no"  # no | bf16 | fp16 (logits and losses stay float32 inside the model)
    keep_last: int = 3  # checkpoints kept on disk
    max_nonfinite: int = 10  # consecutive non-finite steps tolerated before the run stops
    report_to: str = "tensorboard"  # tensorboard | none
    push_to_hub: str | None = None  # repo id to push the final checkpoint to
    hub_private: bool = False


SECTION_TYPES: dict[str, type] = {"data": DataSection, "optim": OptimSection, "train": TrainSection}


@dataclass
class Recipe:
    """A whole pretraining recipe. `model` is a plain dict of `ConformerSslConfig` fields (preset resolved)."""

    model: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, ObjectiveSpec] = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (tuples become lists) of the resolved recipe."""
        out = dataclasses.asdict(self)
        return yaml.safe_load(yaml.safe_dump(_tuples_to_lists(out)))


# ---------------------------------------------------------------------------------------------- type checks
def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples_to_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(v) for v in value]
    return value


def _type_name(annotation: Any) -> str:
    if typing.get_args(annotation):  # list[str], tuple[float, float], float | None
        return str(annotation).replace("typing.", "").replace("NoneType", "None")
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation` (int -> float, "1e-3" -> float, list -> tuple) or raise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except RecipeError:
                continue
        raise _type_error(key, value, annotation)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str) and args and args[0] is str:
            return [value]  # a single manifest needs no brackets
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict or annotation is dict:
        if isinstance(value, dict):
            return dict(value)
    raise _type_error(key, value, annotation)


def _type_error(key: str, value: Any, annotation: Any) -> RecipeError:
    return RecipeError(f"{key}={value!r} has the wrong type: expected {_type_name(annotation)}.")


def _unknown_key(section: str, key: str, valid: typing.Iterable[str]) -> RecipeError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    if section == "<recipe>":
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return RecipeError(f"Unknown recipe section '{key}'.{hint} Valid sections: {', '.join(SECTIONS)}.")
    hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
    return RecipeError(f"Unknown recipe key '{section}.{key}'.{hint} Valid keys of '{section}': {', '.join(valid)}.")


def _dataclass_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def model_field_types() -> dict[str, Any]:
    """ConformerSslConfig's own fields and their types (the keys allowed in the `model` section)."""
    namespace = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "list": list}
    hints = {}
    for name, annotation in ConformerSslConfig.__annotations__.items():
        hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
    hints.pop("objectives", None)  # set by the `objectives` section
    return hints


# ---------------------------------------------------------------------------------------------- building
def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe section '{section}' must be a mapping of keys to values, got {values!r}.")
    hints = _dataclass_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(section, key, hints)
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _build_objectives(values: dict[str, Any]) -> dict[str, ObjectiveSpec]:
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe section 'objectives' must map objective names to settings, got {values!r}.")
    specs = {}
    for name, spec in values.items():
        if name not in OBJECTIVES:
            raise _unknown_key("objectives", name, OBJECTIVES)
        specs[name] = _build_section(ObjectiveSpec, spec or {}, f"objectives.{name}")
    return specs


def _check_model(values: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe section 'model' must be a mapping of ConformerSslConfig fields, got {values!r}.")
    hints = model_field_types()
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key("model", key, hints)
        out[key] = _coerce(value, hints[key], f"model.{key}")
    return out


def _resolve_preset(model: dict[str, Any], search_dirs: list[Path]) -> dict[str, Any]:
    """Replace `preset: <name>` by the fields of `<dir>/<name>.yaml`; the recipe's own fields win."""
    model = dict(model)
    preset = model.pop("preset", None)
    if preset is None:
        return model
    candidates = [Path(preset)] if str(preset).endswith((".yaml", ".yml")) else []
    candidates += [d / f"{preset}.yaml" for d in search_dirs]
    for path in candidates:
        if path.is_file():
            fields = yaml.safe_load(path.read_text()) or {}
            fields = fields.get("model", fields)  # a preset may be a bare field dict or a `model:` section
            # `_reference` and other underscored keys document the preset (sizes, sources); not config fields.
            fields = {k: v for k, v in fields.items() if not str(k).startswith("_")}
            return {**fields, **model}
    known = sorted({p.stem for d in search_dirs if d.is_dir() for p in d.glob("*.yaml")})
    raise RecipeError(
        f"model.preset={preset!r}: no such preset in {[str(d) for d in search_dirs]}. Known presets: {known}."
    )


def recipe_from_dict(raw: dict[str, Any], preset_dirs: list[Path] | None = None) -> Recipe:
    """Validate a raw dict (from YAML) into a `Recipe`; `preset_dirs` is where `model.preset` is looked up."""
    raw = raw or {}
    for section in raw:
        if section not in SECTIONS:
            raise _unknown_key("<recipe>", section, SECTIONS)
    dirs = list(preset_dirs or []) + [PACKAGE_PRESET_DIR]
    model = _check_model(_resolve_preset(raw.get("model") or {}, dirs))
    recipe = Recipe(
        model=model,
        objectives=_build_objectives(raw.get("objectives") or {}),
        **{name: _build_section(cls, raw.get(name) or {}, name) for name, cls in SECTION_TYPES.items()},
    )
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Cross-field checks that a type cannot express."""

    def check(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise RecipeError(f"{key}={value!r} is invalid: expected {expected}.")

    o, t, d = recipe.optim, recipe.train, recipe.data
    check(o.scheduler in SCHEDULERS, "optim.scheduler", o.scheduler, f"one of {SCHEDULERS}")
    check(o.lr > 0, "optim.lr", o.lr, "> 0")
    check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    check(0 < o.gumbel_temperature_decay <= 1, "optim.gumbel_temperature_decay", o.gumbel_temperature_decay, "(0, 1]")
    check(t.mixed_precision in MIXED_PRECISION, "train.mixed_precision", t.mixed_precision, f"one of {MIXED_PRECISION}")
    check(t.report_to in REPORT_TO, "train.report_to", t.report_to, f"one of {REPORT_TO}")
    for key in ("max_steps", "save_steps", "eval_steps", "log_steps", "grad_accum", "keep_last", "max_nonfinite"):
        check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "an integer >= 1")
    check(d.batch_seconds > 0, "data.batch_seconds", d.batch_seconds, "> 0")
    check(d.min_duration <= d.max_duration, "data.min_duration", d.min_duration, f"<= max_duration={d.max_duration}")
    if d.weights is not None:
        check(len(d.weights) == len(d.train_manifests), "data.weights", d.weights,
              f"one weight per train manifest ({len(d.train_manifests)})")  # fmt: skip
    check(bool(recipe.objectives), "objectives", recipe.objectives, f"at least one objective from {OBJECTIVES}")


# ---------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=100` -> (["train", "max_steps"], 100); the value is read as YAML (`null`, `[a, b]`, `true`)."""
    if "=" not in text:
        raise RecipeError(f"Override {text!r} is not of the form section.key=value (e.g. train.max_steps=100).")
    key, _, value = text.partition("=")
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise RecipeError(f"Override key {key!r} must be dotted, section.key (e.g. optim.lr=1e-3).")
    return path, yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw recipe dict (before validation, so the usual checks name any error).

    `objectives.<name>=null` removes an objective; `objectives.<name>.weight=0.5` adds or changes one.
    """
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for text in overrides:
        path, value = parse_override(text)
        section = path[0]
        if section not in SECTIONS:
            raise _unknown_key("<recipe>", section, SECTIONS)
        node = raw.setdefault(section, {}) or {}
        raw[section] = node
        for part in path[1:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        if value is None and section == "objectives" and len(path) == 2:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
        # Validate now so the message points at this override rather than at the merged recipe.
        _check_one(section, path[1:], value)
    return raw


def _check_one(section: str, keys: list[str], value: Any) -> None:
    label = ".".join([section, *keys])
    if section == "model":
        hints = model_field_types()
        if keys[0] == "preset":
            return
        if keys[0] not in hints:
            raise _unknown_key("model", keys[0], hints)
        _coerce(value, hints[keys[0]], label)
    elif section == "objectives":
        if keys[0] not in OBJECTIVES:
            raise _unknown_key("objectives", keys[0], OBJECTIVES)
        if len(keys) > 1:
            hints = _dataclass_types(ObjectiveSpec)
            if keys[1] not in hints:
                raise _unknown_key(f"objectives.{keys[0]}", keys[1], hints)
            _coerce(value, hints[keys[1]], label)
    else:
        hints = _dataclass_types(SECTION_TYPES[section])
        if keys[0] not in hints:
            raise _unknown_key(section, keys[0], hints)
        _coerce(value, hints[keys[0]], label)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Recipe:  # fmt: skip
    """Read a recipe YAML file (or start from `base`), apply `section.key=value` overrides, validate.

    Args:
        path: the recipe file given on the command line (`--config`); None uses `base` alone.
        overrides: the extra command-line arguments, e.g. `["train.max_steps=100", "optim.lr=2e-3"]`.
        base: a raw recipe dict used when no file is given (the CLI's embedded tiny default).
    """
    raw: dict[str, Any] = dict(base or {})
    preset_dirs: list[Path] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"Recipe file {str(path)!r} does not exist (pass --config configs/pretrain/<name>.yaml).")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise RecipeError(f"Recipe file {str(path)!r} must hold a mapping with sections {SECTIONS}.")
        preset_dirs = [path.resolve().parent.parent / "model", path.resolve().parent]
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, preset_dirs)


def model_config(recipe: Recipe, **extra: Any) -> ConformerSslConfig:
    """The `ConformerSslConfig` of a recipe: its model fields plus the objectives (weights, start steps, layers)."""
    objectives = {name: dataclasses.asdict(spec) for name, spec in recipe.objectives.items()}
    fields = {**recipe.model, **extra}
    try:
        return ConformerSslConfig(**fields, objectives=objectives)
    except ValueError as error:  # the config names the field; say that it comes from the recipe
        raise RecipeError(f"Recipe 'model'/'objectives' sections give an invalid model config: {error}") from error


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (preset expanded, overrides applied) next to the run for reproducibility."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


__all__ = [
    "DataSection",
    "ObjectiveSpec",
    "OptimSection",
    "Recipe",
    "RecipeError",
    "TrainSection",
    "apply_overrides",
    "load_recipe",
    "model_config",
    "parse_override",
    "recipe_from_dict",
    "save_recipe",
]
