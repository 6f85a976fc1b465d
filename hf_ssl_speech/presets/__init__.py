"""Model size presets: `configs/model/<name>.yaml` -> ConformerSslConfig keyword arguments.

Preset files hold ConformerSslConfig fields; keys starting with "_" (e.g. `_reference`, the published size a
preset mirrors) are documentation and are not passed to the config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..configuration_conformer_ssl import ConformerSslConfig

PRESET_DIR = Path(__file__).resolve().parent / "model"


def preset_names() -> list[str]:
    """Names of the shipped presets (file stems under configs/model/)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read(name_or_path: str | Path) -> tuple[dict, Path]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"model preset {str(name_or_path)!r} not found (looked for {path}); presets: {', '.join(preset_names())}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a model preset must be a YAML mapping of ConformerSslConfig fields")
    return data, path


def load_preset(name_or_path: str | Path, **overrides) -> dict:
    """ConformerSslConfig keyword arguments of a preset, with `overrides` applied on top."""
    data, _ = _read(name_or_path)
    kwargs = {k: v for k, v in data.items() if not k.startswith("_")}
    kwargs.update(overrides)
    return kwargs


def preset_reference(name_or_path: str | Path) -> dict | None:
    """The `_reference` block of a preset (published size and what it counts), or None."""
    return _read(name_or_path)[0].get("_reference")


def preset_config(name_or_path: str | Path, **overrides) -> ConformerSslConfig:
    return ConformerSslConfig(**load_preset(name_or_path, **overrides))
