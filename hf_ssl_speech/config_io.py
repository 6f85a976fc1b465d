"""One config layer: YAML files and command-line overrides into typed dataclasses, with errors that name the key.

Pretraining recipes, fine-tuning arguments and experiment configs are all read by these functions:

- `read_yaml(path)`: a YAML mapping, or a `ConfigError` naming the file.
- `coerce(value, annotation, key)`: a value checked against a type annotation (ints widen to floats, YAML 1.1's
  "1e-3" strings become floats, lists become tuples, nested dataclasses are built, enums, literals, unions).
- `coerce_text(text, annotation, key)`: the same for a command-line string (a `str` field keeps it as written).
- `build(cls, values, where)`: a dataclass from a mapping; an unknown key names the closest valid one.
- `parse_override` / `apply_overrides`: `section.key=value` overrides (values read as YAML) onto a raw dict.
- `plain(obj)`: a dataclass (or nested containers of them) as YAML-ready dicts and lists.

Every error is a `ConfigError` (or the subclass given as `error=`) whose message names the key, the value and
what is expected, in the same words everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

NONE_WORDS = ("null", "None", "none", "~")


def type_name(annotation: Any) -> str:
    """`int`, `tuple[float, float]`, `str | None`: how an expected type reads in an error message."""
    if typing.get_args(annotation):
        return str(annotation).replace("typing.", "").replace("NoneType", "None")
    return getattr(annotation, "__name__", str(annotation))


def wrong_type(key: str, value: Any, annotation: Any, error: type[ConfigError] = ConfigError) -> ConfigError:
    return error(f"{key}={value!r} has the wrong type: expected {type_name(annotation)}.")


def invalid(key: str, value: Any, expected: str, error: type[ConfigError] = ConfigError) -> ConfigError:
    return error(f"{key}={value!r} is invalid: expected {expected}.")


def unknown_key(
    key: str,
    valid: Iterable[str],
    where: str = "",
    what: str = "config key",
    error: type[ConfigError] = ConfigError,
    listing: str | None = None,
) -> ConfigError:
    """The error for a key that is not in `valid`, with the closest valid key.

    Reads "Unknown <what> '<where>.<key>'. Did you mean '<where>.<close>'? Valid <what>s of '<where>': ...";
    `listing` replaces the list of valid names (e.g. "--help lists them" when there are a hundred).
    """
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    prefix = f"{where}." if where else ""
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    scope = f" of '{where}'" if where else ""
    noun = what.split()[-1] + "s"
    names = listing if listing is not None else f"Valid {noun}{scope}: {', '.join(valid)}."
    return error(f"Unknown {what} '{prefix}{key}'.{hint} {names}")


def coerce(value: Any, annotation: Any, key: str, error: type[ConfigError] = ConfigError) -> Any:
    """`value` converted to `annotation`, or an `error` naming `key`, the value and the expected type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key, error)
            except ConfigError:
                continue
        raise wrong_type(key, value, annotation, error)
    if origin is typing.Literal:
        if value in args:
            return value
    elif dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return build(annotation, value, key, error=error)
    elif annotation is bool:
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
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / yes / off / on as a bool (mixed_precision: no)
            return "yes" if value else "no"
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation):
            return value
        try:
            return annotation(value)
        except ValueError:
            pass
    elif origin is list or annotation is list:
        item = args[0] if args else Any
        if isinstance(value, str) and _admits(item, str):
            return [value]  # a single manifest needs no brackets
        if isinstance(value, (list, tuple)):
            return [coerce(v, item, f"{key}[{i}]", error) for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(v, a, f"{key}[{i}]", error) for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict or annotation is dict:
        if isinstance(value, Mapping):
            if len(args) == 2:
                return {str(k): coerce(v, args[1], f"{key}.{k}", error) for k, v in value.items()}
            return dict(value)
    elif isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
    raise wrong_type(key, value, annotation, error)


def _admits(annotation: Any, kind: type) -> bool:
    if annotation is kind:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and kind in typing.get_args(annotation)


def coerce_text(text: str | list[str], annotation: Any, key: str, error: type[ConfigError] = ConfigError) -> Any:
    """A command-line value: kept as written for `str` fields, read as YAML (`1e-3`, `true`, `[a, b]`) otherwise.

    A list of strings (`--train_manifests a.jsonl b.jsonl`) goes to a list field item by item.
    """
    if isinstance(text, list):
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        inner = (
            next((a for a in args if typing.get_origin(a) is list), annotation) if origin is not list else annotation
        )
        item = (typing.get_args(inner) or (Any,))[0]
        return coerce([coerce_text(t, item, f"{key}[{i}]", error) for i, t in enumerate(text)], annotation, key, error)
    if _admits(annotation, type(None)) and text in NONE_WORDS:
        return None
    if _admits(annotation, str):
        return text
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return coerce(value, annotation, key, error)


def field_types(cls: type) -> dict[str, Any]:
    """The init fields of a dataclass and their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def build(
    cls: type,
    values: Mapping[str, Any],
    where: str = "",
    what: str = "config key",
    error: type[ConfigError] = ConfigError,
) -> Any:
    """`cls(**values)` with every value coerced to its field's type; unknown keys name the closest valid one.

    A check of the dataclass itself (`__post_init__`) that fails with a ValueError becomes an `error` too.
    """
    if not isinstance(values, Mapping):
        raise error(f"'{where or cls.__name__}' must be a mapping of keys to values, got {values!r}.")
    hints = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise unknown_key(key, hints, where, what, error)
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}" if where else key, error)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as problem:
        raise error(f"{where or cls.__name__}: {problem}") from None


def read_yaml(path: str | Path, what: str = "config", error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad YAML or a non-mapping is an `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as problem:
        raise error(f"{what} file {str(path)!r} is not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"{what} file {str(path)!r} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def parse_override(text: str, error: type[ConfigError] = ConfigError) -> tuple[list[str], Any]:
    """`train.max_steps=100` -> (["train", "max_steps"], 100); the value is read as YAML (`null`, `[a, b]`, `true`)."""
    if "=" not in text:
        raise error(f"Override {text!r} is not of the form section.key=value (e.g. train.max_steps=100).")
    key, _, value = text.partition("=")
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise error(f"Override key {key!r} must be dotted, section.key (e.g. optim.lr=1e-3).")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(
    raw: Mapping[str, Any],
    overrides: Sequence[str],
    remove_none_at: int | None = None,
    error: type[ConfigError] = ConfigError,
) -> dict[str, Any]:
    """Dotted overrides applied to a copy of a raw (not yet validated) config dict; returns the copy.

    Args:
        raw: the mapping read from YAML.
        overrides: `a.b.c=value` strings.
        remove_none_at: a `null` value at this depth removes the key instead of setting it (recipes remove
            an objective with `objectives.<name>=null`).
    """
    out = _copy(raw)
    for text in overrides:
        path, value = parse_override(text, error)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child if isinstance(child, dict) else {}
            node = node[part]
        if value is None and remove_none_at is not None and len(path) == remove_none_at:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def plain(value: Any) -> Any:
    """Dataclasses, tuples and enums as YAML-ready dicts, lists and strings (what `yaml.safe_dump` takes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "coerce",
    "coerce_text",
    "field_types",
    "invalid",
    "parse_override",
    "plain",
    "read_yaml",
    "type_name",
    "unknown_key",
    "wrong_type",
]
