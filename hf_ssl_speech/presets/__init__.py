"""Packaged presets: model sizes (`model/<name>.yaml`) and the default pretraining recipe (`recipes/`).

They are package data, so a wheel install has them. `configs/model` in the repository links here.

A model preset holds ConformerSslConfig fields; keys starting with "_" (e.g. `_reference`, the published size
a preset mirrors) are documentation and are not passed to the config. A preset is named (`tiny`,
`fastconformer_l`) or given as a YAML path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from ..configuration_conformer_ssl import ConformerSslConfig
from ..errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "model"
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


class PresetError(ConfigError, FileNotFoundError):
    """A preset that does not exist or is not a mapping of config fields."""


def preset_names(search_dirs: Sequence[Path] = ()) -> list[str]:
    """Names of the presets in `search_dirs` and the packaged ones."""
    return sorted({p.stem for d in [*search_dirs, PRESET_DIR] if Path(d).is_dir() for p in Path(d).glob("*.yaml")})


def preset_path(name_or_path: str | Path, search_dirs: Sequence[Path] = ()) -> Path:
    """The YAML file of a preset: a path as given, else `<dir>/<name>.yaml` in `search_dirs`, then the package."""
    path = Path(name_or_path)
    candidates = [path] if path.suffix in (".yaml", ".yml") else []
    candidates += [Path(d) / f"{name_or_path}.yaml" for d in [*search_dirs, PRESET_DIR]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PresetError(
        f"model preset {str(name_or_path)!r} not found (looked in {[str(d) for d in [*search_dirs, PRESET_DIR]]}); "
        f"known presets: {', '.join(preset_names(search_dirs))}"
    )


def _read(name_or_path: str | Path, search_dirs: Sequence[Path] = ()) -> dict:
    path = preset_path(name_or_path, search_dirs)
    data = yaml.safe_load(path.read_text()) or {}
    data = data.get("model", data) if isinstance(data, dict) else data  # a bare field dict or a `model:` section
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a model preset must be a YAML mapping of ConformerSslConfig fields")
    return data


def load_preset(name_or_path: str | Path, search_dirs: Sequence[Path] = (), **overrides) -> dict:
    """ConformerSslConfig keyword arguments of a preset, with `overrides` applied on top."""
    kwargs = {k: v for k, v in _read(name_or_path, search_dirs).items() if not str(k).startswith("_")}
    kwargs.update(overrides)
    return kwargs


def preset_reference(name_or_path: str | Path) -> dict | None:
    """The `_reference` block of a preset (published size and what it counts), or None."""
    return _read(name_or_path).get("_reference")


def preset_config(name_or_path: str | Path, **overrides) -> ConformerSslConfig:
    return ConformerSslConfig(**load_preset(name_or_path, **overrides))


__all__ = [
    "PRESET_DIR",
    "RECIPE_DIR",
    "PresetError",
    "load_preset",
    "preset_config",
    "preset_names",
    "preset_path",
    "preset_reference",
]
