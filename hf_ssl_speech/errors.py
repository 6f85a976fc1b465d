"""The errors a user can fix, and how commands end on them: one clear message and a non-zero exit.

`UserError` marks an expected problem with what the user gave: a recipe key or value, a path, too many bad
audio files, a diverged run. Every command runs its work through `run_command`, which prints such an error as
`error: <message>` and exits with status 2; anything else is a bug and keeps its traceback. Pass `--debug`
(or set `HF_SSL_SPEECH_DEBUG=1`) to see the traceback of a user error too.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HF_SSL_SPEECH_DEBUG"


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong, where, and what to do."""


class Preempted(Exception):  # noqa: N818 - not an error: a run that stopped on request, with a checkpoint
    """A run stopped by a stop signal after writing its checkpoint; `run_command` prints the message (which says
    how to continue) and exits with `PREEMPTED_EXIT_CODE` (hf_ssl_speech.preemption)."""


class ConfigError(UserError, ValueError):
    """A config key or value that does not fit its schema (the message names the key, the value and the fix)."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder named in a config does not exist."""


def check_paths(paths: Sequence[str | os.PathLike], field: str, kind: str = "file") -> None:
    """Raise `MissingPathError` naming `field` and the path, for the first of `paths` that does not exist.

    Args:
        paths: the values of a config field (manifests, shards, folders).
        field: the field, as the user wrote it (e.g. "data.train_manifests").
        kind: "file", "folder", or "path" (either); a glob pattern must match at least one file.
    """
    for path in paths:
        if isinstance(path, Mapping):  # a source spec (`hf_ssl_speech.data.open_source`): the local files it names
            check_paths(_spec_paths(path), field, kind)
            continue
        text = os.fspath(path)
        if any(ch in text for ch in "*?["):
            if not glob.glob(text):
                raise MissingPathError(
                    f"{field}: the pattern {text!r} matches no file (run from the folder it is relative to?)"
                )
            continue
        target = Path(text)
        ok = {"file": target.is_file, "folder": target.is_dir, "path": target.exists}[kind]()
        if not ok:
            where = f" (relative to {Path.cwd()})" if not target.is_absolute() else ""
            raise MissingPathError(f"{field}: {kind} {text!r} does not exist{where}; fix the path or make it first.")


# A Hub repo id is `name` or `namespace/name` (huggingface_hub's rule: letters, digits, `-`, `_`, `.`; at most 96
# each; no `--` or `..`). Anything else can only be a local path.
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9_.-]{1,96}(/[A-Za-z0-9_.-]{1,96})?")
_LOCAL_PREFIXES = (".", "/", "~", "runs/")
HUB_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def looks_local(value: str | os.PathLike) -> bool:
    """Whether `value` can only mean a local path, never a Hub repo id.

    True when it starts with `.`, `/`, `~` or `runs/` (where this project's commands write), contains a
    backslash, or is not a valid repo id (`name` or `namespace/name`: so `a/b/c` is local). A bare `user/model`
    that is not on disk is left to the Hub.
    """
    text = os.fspath(value)
    if text.startswith(_LOCAL_PREFIXES) or "\\" in text:
        return True
    return not _HUB_REPO_ID.fullmatch(text) or "--" in text or ".." in text


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true") for name in HUB_OFFLINE_ENVS)


def check_model_source(value: str | os.PathLike, argument: str, marker: str | None = "config.json") -> None:
    """Refuse a model argument that names a local folder that is not there, before anything asks the Hub.

    A local-looking path (`looks_local`) that does not exist, an existing folder without `marker`, or a Hub id
    while the Hub is switched off (HF_HUB_OFFLINE) raises `MissingPathError` naming `argument`, the path and
    the fix. A Hub id is left alone: only then may transformers go to the network.

    Args:
        value: what the user gave (a folder, or a Hub repo id).
        argument: the argument as the user wrote it (e.g. "--model_name_or_path"), for the message.
        marker: a file the folder must hold (None: any existing folder or file will do).
    """
    text = os.fspath(value)
    target = Path(text).expanduser()
    if target.is_dir():
        if marker is None or (target / marker).is_file():
            return
        # A pretraining checkpoint keeps the model one level down (checkpoint-N/model): name what is there.
        inside = sorted(str(found.parent) for found in target.glob(f"*/{marker}"))[:3]
        hint = f"; it holds {', '.join(inside)}" if inside else ""
        raise MissingPathError(
            f"{argument} {text!r} is a folder without {marker}{hint}: give a save_pretrained folder "
            "(e.g. runs/<run>/checkpoints/checkpoint-N/model)."
        )
    if target.exists():
        if marker is None:
            return
        raise MissingPathError(f"{argument} {text!r} is a file: give the save_pretrained folder that holds it.")
    if looks_local(text):
        where = f" (relative to {Path.cwd()})" if not target.is_absolute() else ""
        raise MissingPathError(
            f"{argument} {text!r}: no such folder{where}; fix the path, or give a Hub repo id (user/model)."
        )
    if _hub_offline():
        raise MissingPathError(
            f"{argument} {text!r} is not a local folder, and the Hub is off (HF_HUB_OFFLINE=1): fix the path, "
            "or unset HF_HUB_OFFLINE to download it."
        )


def option_value(argv: Sequence[str], name: str) -> str | None:
    """The last value given to `name` in argv as `--name value`, `--name=value` or `name=value` (None if absent):
    for the checks a command makes before its heavy imports, without its full parser."""
    found = None
    for index, token in enumerate(argv):
        for prefix in (f"--{name}=", f"{name}="):
            if token.startswith(prefix):
                found = token[len(prefix) :]
        if token == f"--{name}" and index + 1 < len(argv):
            found = argv[index + 1]
    return found


def _spec_paths(spec: Mapping) -> list[str]:
    """The local paths a dict source spec names: `manifest`, `tar`, `data_files` (a path, a list, or split ->
    paths); remote `data_files` (hf://, https://, s3://) are left to `datasets`, which names them if missing."""
    out: list[str] = []
    for key in ("manifest", "tar", "data_files"):
        values = [spec[key]] if key in spec else []
        while values:
            value = values.pop(0)
            if isinstance(value, Mapping):
                values.extend(value.values())
            elif isinstance(value, (list, tuple)):
                values.extend(value)
            elif isinstance(value, (str, os.PathLike)) and "://" not in os.fspath(value):
                out.append(os.fspath(value))
    return out


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main(argv)`; a `UserError` becomes `error: ...` on stderr and exit status 2.

    `--debug` is taken out of argv (and re-raises user errors with their traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        status = main(argv)
    except UserError as error:
        if debug:
            raise
        # One line: the message says what to fix; the traceback is for bug reports.
        print(f"error: {error} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        return 2
    except Preempted as stopped:
        from .preemption import PREEMPTED_EXIT_CODE

        print(stopped, flush=True)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


__all__ = [
    "ConfigError",
    "MissingPathError",
    "Preempted",
    "UserError",
    "check_model_source",
    "check_paths",
    "debug_requested",
    "looks_local",
    "option_value",
    "run_command",
]
