"""Pretraining recipes: typed sections, YAML loading and dotted command-line overrides.

A recipe is a YAML file with five sections:

```yaml
model:      {preset: fastconformer_s, num_hidden_layers: 4}   # a packaged preset + ConformerSslConfig fields
objectives: {bestrq: {weight: 1.0, start_step: 0, layer: -1}}
data:       {train_manifests: [...], valid_manifests: [...], batch_seconds: 160, ...}
optim:      {lr: 5.0, scheduler: noam, warmup_steps: 25000, ...}
train:      {output_dir: runs/nest, max_steps: 100000, save_steps: 2500, ...}
```

Every key is checked when the file is read and after `section.key=value` overrides are applied (by the
package's one config layer, `hf_ssl_speech.config_io`): an unknown key names the valid keys of its section
(with the closest match), a wrong type names the key, the value and the expected type. The objectives and
their settings are the entries of `objectives.OBJECTIVES`; the model fields are `ConformerSslConfig`'s.
`model_config(recipe)` turns a recipe into a `ConformerSslConfig`.

`--config` takes a file, or the name of a recipe packaged with hf_ssl_speech (`tiny_nest`: the default of
`scripts/pretrain.py`, which works from any folder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import config_io
from ..configuration_conformer_ssl import ConformerSslConfig
from ..data.config import DataConfig
from ..errors import ConfigError, check_model_source, check_paths
from ..objectives import OBJECTIVES, objective_settings
from ..precision import MIXED_PRECISION
from ..presets import RECIPE_DIR, PresetError, load_preset
from .compiling import COMPILE_MODES

SECTIONS = ("model", "objectives", "data", "optim", "train")
SCHEDULERS = ("noam", "cosine", "linear", "constant")
REPORT_TO = ("tensorboard", "none")
DEFAULT_RECIPE = "tiny_nest"  # packaged: what `scripts/pretrain.py` runs without --config


class RecipeError(ConfigError):
    """A recipe key or value that does not fit the schema; the message says which and how to fix it."""


@dataclass
class DataSection(DataConfig):
    """Where the audio comes from (`hf_ssl_speech.data`), plus `DataConfig`'s filtering and batching fields."""

    # NeMo JSONL manifests (paths relative to the cwd), tar shards, or source specs ({builder: parquet, ...})
    train_manifests: list[str | dict[str, Any]] = field(default_factory=list)
    valid_manifests: list[str | dict[str, Any]] = field(default_factory=list)  # held-out sources, validation losses
    weights: list[float] | None = None  # sampling weight per train manifest (None: each row once per epoch)
    dither: float = 1e-5  # NeMo: std of Gaussian noise added to the training waveforms before the log-mel
    num_workers: int = 0  # DataLoader worker processes per training process
    frame_labels_key: str | None = None  # manifest key holding frame labels (HuBERT external targets)
    # Denoising (data/augment.py): with this probability mix white noise or another utterance of the batch into
    # the input (targets stay clean). No noise corpus is read: NEST's MUSAN noise is replaced by Gaussian noise.
    denoising_prob: float = 0.0  # NEST: 0.5; WavLM: 0.2
    noise_snr_db: tuple[float, float] = (-5.0, 20.0)  # NEST: noise at -5..20 dB
    speech_snr_db: tuple[float, float] = (-5.0, 5.0)  # NEST and WavLM: another utterance at -5..5 dB
    noise_ratio: float = 0.5  # of the mixed utterances, the share that gets noise rather than another utterance
    # None: the interferer covers the whole utterance (NEST); a fraction: one segment of at most that fraction of
    # the utterance, at a random place (WavLM utterance mixing: 0.5).
    mix_segment_fraction: float | None = None

    def loader_config(self) -> dict[str, Any]:
        """The `DataConfig` fields, as keyword arguments of `build_dataloader`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)}


@dataclass
class OptimSection:
    """AdamW, the learning-rate schedule, clipping and the Gumbel temperature schedule."""

    lr: float = 1e-3  # peak LR, or NeMo's Noam `lr` (scaled by (d_model * warmup)^-0.5 at the peak)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 1e-3  # not applied to norms, biases and embeddings (the model's no-decay rule)
    scheduler: str = "noam"  # noam | cosine | linear | constant (the last three with linear warmup)
    warmup_steps: int = 1000
    min_lr: float = 1e-6  # floor of the Noam decay (NeMo NoamAnnealing.min_lr)
    clip: float = 1.0  # max gradient norm; <= 0 disables clipping
    gumbel_temperature_start: float = 2.0  # wav2vec 2.0 / NeMo: 2 -> 0.5, x0.999995 per step
    gumbel_temperature_end: float = 0.5
    gumbel_temperature_decay: float = 0.999995
    # EMA teacher of data2vec / dinosr: momentum rises linearly from start to end over ema_anneal_steps steps.
    ema_decay_start: float = 0.999  # data2vec 2.0: 0.999 -> 0.99999
    ema_decay_end: float = 0.99999
    ema_anneal_steps: int = 75000
    # Continued pretraining (model.init_from): the pretrained encoder learns slower than the new heads.
    encoder_lr_scale: float = 1.0  # LR of the encoder's top block / LR of the heads (e.g. 0.1)
    layer_decay: float = 1.0  # layer-wise LR decay as in fine-tuning: top block x decay, each block below x decay more


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
    # auto | no | bf16 | fp16. auto: bf16 where the hardware has bf16 matrix units (CPU AMX / AVX512-BF16, CUDA
    # bf16), fp32 elsewhere (hf_ssl_speech/precision.py); logits and losses stay float32 inside the model.
    mixed_precision: str = "auto"
    # glibc malloc keeps freed activation memory instead of mapping it afresh every step (pretrain/malloc.py):
    # applied in-process; faster on some CPU hosts, at a resident size that never shrinks.
    tune_malloc: bool = False
    # FSDP2 (`fully_shard` per Conformer block + root) instead of DDP when launched on several processes
    fsdp: bool = False
    keep_last: int = 3  # checkpoints kept on disk (the newest is never deleted)
    # checkpoints also written at these steps and never deleted (not counted in keep_last): e.g. the encoders at
    # 1/4 and 1/2 of the run, for a downstream-accuracy-against-pretraining-compute curve
    keep_steps: list[int] = field(default_factory=list)
    max_nonfinite: int = 10  # consecutive non-finite steps tolerated before the run stops
    report_to: str = "tensorboard"  # tensorboard | none
    push_to_hub: str | None = None  # repo id to push the final checkpoint to
    hub_private: bool = False
    # torch.compile of the encoder(s) (pretrain/compiling.py): inductor, dynamic batch dim; batches padded to a
    # multiple of compile_bucket_frames feature frames (masked, results unchanged), one graph per bucket. The
    # objectives stay eager.
    compile: bool = False
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    compile_bucket_frames: int = 128  # a multiple of model.subsampling_factor (128 frames = 1.28 s of audio)
    # Heads-only warm-up: the encoder (model.init_from) stays frozen for this many optimiser steps, then trains.
    freeze_encoder_steps: int = 0


SECTION_TYPES: dict[str, type] = {"data": DataSection, "optim": OptimSection, "train": TrainSection}


@dataclass
class Recipe:
    """A whole pretraining recipe. `model` is a plain dict of `ConformerSslConfig` fields (preset resolved);
    `objectives` maps objective names to their settings, each entry's defaults filled in."""

    model: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (tuples become lists) of the resolved recipe."""
        return config_io.plain(self)


# ---------------------------------------------------------------------------------------------- sections
def model_field_types() -> dict[str, Any]:
    """ConformerSslConfig's own fields and their types (the keys allowed in the `model` section)."""
    namespace = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "list": list}
    hints = {}
    for name, annotation in ConformerSslConfig.__annotations__.items():
        hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
    hints.pop("objectives", None)  # set by the `objectives` section
    # Not a config field: the checkpoint to continue from (a folder, Hub repo or .nemo; pretrain/init_from.py).
    hints["init_from"] = str | None
    return hints


def _check_model(values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe section 'model' must be a mapping of ConformerSslConfig fields, got {values!r}.")
    hints = model_field_types()
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise config_io.unknown_key(key, hints, "model", "recipe key", RecipeError)
        out[key] = config_io.coerce(value, hints[key], f"model.{key}", RecipeError)
    return out


def _check_objectives(values: Any) -> dict[str, dict[str, Any]]:
    """Names from `OBJECTIVES`, each entry's own keys, values of its defaults' types; then the defaults filled in."""
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe section 'objectives' must map objective names to settings, got {values!r}.")
    specs = {}
    for name, spec in values.items():
        if name not in OBJECTIVES:
            raise config_io.unknown_key(name, OBJECTIVES, "objectives", "recipe key", RecipeError)
        if spec is not None and not isinstance(spec, dict):
            raise RecipeError(f"objectives.{name} must be a mapping of its settings, got {spec!r}.")
        defaults = OBJECTIVES[name].defaults
        specs[name] = {}
        for key, value in (spec or {}).items():
            if key not in defaults:
                raise config_io.unknown_key(key, defaults, f"objectives.{name}", "recipe key", RecipeError)
            specs[name][key] = config_io.coerce(value, type(defaults[key]), f"objectives.{name}.{key}", RecipeError)
    return objective_settings(specs)


def _resolve_preset(model: dict[str, Any], search_dirs: list[Path]) -> dict[str, Any]:
    """Replace `preset: <name>` by the preset's fields (`presets.load_preset`); the recipe's own fields win."""
    model = dict(model)
    preset = model.pop("preset", None)
    if preset is None:
        return model
    try:
        fields = load_preset(preset, search_dirs)
    except PresetError as error:
        raise RecipeError(f"model.preset={preset!r}: {error}") from None
    return {**fields, **model}


def recipe_from_dict(raw: dict[str, Any], preset_dirs: list[Path] | None = None) -> Recipe:
    """Validate a raw dict (from YAML) into a `Recipe`; `preset_dirs` is where `model.preset` is looked up before
    the packaged presets."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"A recipe must be a mapping with sections {SECTIONS}, got {type(raw).__name__}.")
    for section in raw:
        if section not in SECTIONS:
            raise config_io.unknown_key(section, SECTIONS, "", "recipe section", RecipeError)
    recipe = Recipe(
        model=_check_model(_resolve_preset(raw.get("model") or {}, list(preset_dirs or []))),
        objectives=_check_objectives(raw.get("objectives") or {}),
        **{
            name: config_io.build(cls, raw.get(name) or {}, name, "recipe key", RecipeError)
            for name, cls in SECTION_TYPES.items()
        },
    )
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Cross-field checks that a type cannot express."""

    def check(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise config_io.invalid(key, value, expected, RecipeError)

    o, t, d = recipe.optim, recipe.train, recipe.data
    check(o.scheduler in SCHEDULERS, "optim.scheduler", o.scheduler, f"one of {SCHEDULERS}")
    check(o.lr > 0, "optim.lr", o.lr, "> 0")
    check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    check(0 < o.gumbel_temperature_decay <= 1, "optim.gumbel_temperature_decay", o.gumbel_temperature_decay, "(0, 1]")
    for key in ("ema_decay_start", "ema_decay_end"):
        check(
            0 <= getattr(o, key) <= 1,
            f"optim.{key}",
            getattr(o, key),
            "a momentum in [0, 1] (data2vec: 0.999 .. 0.99999)",
        )
    check(o.ema_anneal_steps >= 0, "optim.ema_anneal_steps", o.ema_anneal_steps, "an integer >= 0")
    check(
        o.encoder_lr_scale > 0,
        "optim.encoder_lr_scale",
        o.encoder_lr_scale,
        "> 0 (the encoder's LR relative to the heads', e.g. 0.1; train.freeze_encoder_steps freezes it)",
    )
    check(0 < o.layer_decay <= 1, "optim.layer_decay", o.layer_decay, "in (0, 1] (e.g. 0.9; 1.0 = no decay)")
    check(
        0 <= t.freeze_encoder_steps and (t.freeze_encoder_steps == 0 or t.freeze_encoder_steps < t.max_steps),
        "train.freeze_encoder_steps",
        t.freeze_encoder_steps,
        f"an integer in [0, train.max_steps={t.max_steps}) (the encoder must train after the warm-up)",
    )
    check(
        t.freeze_encoder_steps == 0 or recipe.model.get("init_from") is not None,
        "train.freeze_encoder_steps",
        t.freeze_encoder_steps,
        "0 without model.init_from (a heads-only warm-up needs a pretrained encoder to keep)",
    )
    check(
        t.freeze_encoder_steps == 0 or not t.fsdp,
        "train.freeze_encoder_steps",
        t.freeze_encoder_steps,
        "0 with train.fsdp=true (freezing sharded parameters mid-run is not supported; use DDP for the warm-up)",
    )
    check(t.mixed_precision in MIXED_PRECISION, "train.mixed_precision", t.mixed_precision, f"one of {MIXED_PRECISION}")
    check(t.report_to in REPORT_TO, "train.report_to", t.report_to, f"one of {REPORT_TO}")
    check(
        not (t.fsdp and t.mixed_precision == "fp16"),
        "train.mixed_precision",
        t.mixed_precision,
        "bf16 or no with train.fsdp=true (fp16 needs a gradient scaler that knows the shards; bf16 needs none)",
    )
    check(t.compile_mode in COMPILE_MODES, "train.compile_mode", t.compile_mode, f"one of {COMPILE_MODES}")
    factor = recipe.model.get("subsampling_factor", ConformerSslConfig.subsampling_factor)
    check(
        t.compile_bucket_frames >= 1 and t.compile_bucket_frames % factor == 0,
        "train.compile_bucket_frames",
        t.compile_bucket_frames,
        f"a positive multiple of model.subsampling_factor={factor} (e.g. {max(8 // factor, 1) * factor})",
    )
    for key in ("max_steps", "save_steps", "eval_steps", "log_steps", "grad_accum", "keep_last", "max_nonfinite"):
        check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "an integer >= 1")
    check(
        all(isinstance(k, int) and 1 <= k <= t.max_steps for k in t.keep_steps),
        "train.keep_steps",
        t.keep_steps,
        f"a list of steps between 1 and train.max_steps={t.max_steps}",
    )
    check(d.batch_seconds > 0, "data.batch_seconds", d.batch_seconds, "> 0")
    check(
        d.max_duration is None or d.min_duration <= d.max_duration,
        "data.min_duration",
        d.min_duration,
        f"<= max_duration={d.max_duration}",
    )
    if d.weights is not None:
        check(
            len(d.weights) == len(d.train_manifests),
            "data.weights",
            d.weights,
            f"one weight per train manifest ({len(d.train_manifests)})",
        )
    check(0.0 <= d.denoising_prob <= 1.0, "data.denoising_prob", d.denoising_prob, "a probability in [0, 1]")
    check(0.0 <= d.noise_ratio <= 1.0, "data.noise_ratio", d.noise_ratio, "a probability in [0, 1]")
    check(
        d.mix_segment_fraction is None or 0.0 < d.mix_segment_fraction <= 1.0,
        "data.mix_segment_fraction",
        d.mix_segment_fraction,
        "None (mix over the whole utterance, NEST) or a fraction in (0, 1] (WavLM: 0.5)",
    )
    for key in ("noise_snr_db", "speech_snr_db"):
        low, high = getattr(d, key)
        check(low <= high, f"data.{key}", getattr(d, key), "[low, high] in dB with low <= high")
    check(bool(recipe.objectives), "objectives", recipe.objectives, f"at least one objective from {tuple(OBJECTIVES)}")


def check_recipe_paths(recipe: Recipe, source_needed: bool = True) -> None:
    """Every manifest the recipe names exists: a `MissingPathError` naming the field, before any model is built.

    `source_needed=False` (resuming from a checkpoint, which holds every weight and the config) skips
    `model.init_from`: the source is never read again and may since have been moved or deleted.
    """
    if not recipe.data.train_manifests:
        raise RecipeError("data.train_manifests is empty: give at least one JSONL manifest of training audio.")
    check_paths(recipe.data.train_manifests, "data.train_manifests", kind="path")
    check_paths(recipe.data.valid_manifests, "data.valid_manifests", kind="path")
    source = recipe.model.get("init_from")
    # Before any Hub access: a local-looking path that is not there is named now.
    if source is not None and source_needed:
        if str(source).endswith(".nemo"):
            check_paths([source], "model.init_from", kind="file")
        else:
            check_model_source(source, "model.init_from")


# ---------------------------------------------------------------------------------------------- loading
def recipe_path(config: str | Path) -> Path:
    """A `--config` value: a file, or the name of a packaged recipe (`tiny_nest`)."""
    path = Path(config)
    packaged = RECIPE_DIR / f"{config}.yaml"
    if not path.is_file() and path.suffix == "" and packaged.is_file():
        return packaged
    return path


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> Recipe:
    """Read a recipe YAML file (or start from `base`), apply `section.key=value` overrides, validate.

    Args:
        path: the recipe given on the command line (`--config`): a file or a packaged recipe's name; None uses
            `base` alone.
        overrides: the extra command-line arguments, e.g. `["train.max_steps=100", "optim.lr=2e-3"]`.
        base: a raw recipe dict used when no file is given.
    """
    raw: dict[str, Any] = dict(base or {})
    preset_dirs: list[Path] = []
    if path is not None:
        path = recipe_path(path)
        if not path.is_file():
            known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
            raise RecipeError(
                f"Recipe file {str(path)!r} does not exist: pass --config configs/pretrain/<name>.yaml, or the "
                f"name of a packaged recipe ({', '.join(known)})."
            )
        raw = config_io.read_yaml(path, "Recipe", RecipeError)
        preset_dirs = [path.resolve().parent.parent / "model", path.resolve().parent]
    for text in overrides or []:
        section = config_io.parse_override(text, RecipeError)[0][0]
        if section not in SECTIONS:
            raise config_io.unknown_key(section, SECTIONS, "", "recipe section", RecipeError)
    raw = config_io.apply_overrides(raw, overrides or [], remove_none_at=2, error=RecipeError)
    return recipe_from_dict(raw, preset_dirs)


def model_config(recipe: Recipe, **extra: Any) -> ConformerSslConfig:
    """The `ConformerSslConfig` of a recipe: its model fields plus the objectives (weights, start steps, layers)."""
    # init_from is not a config field: `pretrain.init_from` builds the config of such a run from its source.
    fields = {**{k: v for k, v in recipe.model.items() if k != "init_from"}, **extra}
    try:
        return ConformerSslConfig(**fields, objectives={name: dict(spec) for name, spec in recipe.objectives.items()})
    except ValueError as error:  # the config names the field; say that it comes from the recipe
        raise RecipeError(f"Recipe 'model'/'objectives' sections give an invalid model config: {error}") from error


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (preset expanded, overrides applied) next to the run for reproducibility."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


__all__ = [
    "DEFAULT_RECIPE",
    "DataSection",
    "OptimSection",
    "Recipe",
    "RecipeError",
    "TrainSection",
    "check_recipe_paths",
    "load_recipe",
    "model_config",
    "recipe_from_dict",
    "recipe_path",
    "save_recipe",
]
