"""The errors a user can fix, and how commands end on them: one clear message and a non-zero exit.

`UserError` marks an expected problem with what the user gave: a recipe key or value, a path, too many bad
audio files, a diverged run. Every command runs its work through `run_command`, which prints such an error as
`error: <message>` and exits with status 2; anything else is a bug and keeps its traceback. Pass `--debug`
(or set `HF_SSL_SPEECH_DEBUG=1`) to see the traceback of a user error too.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HF_SSL_SPEECH_DEBUG"


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong, where, and what to do."""


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
        print(f"error: {error}", file=sys.stderr)
        print(f"(run again with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


__all__ = ["ConfigError", "MissingPathError", "UserError", "check_paths", "debug_requested", "run_command"]
