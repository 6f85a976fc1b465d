"""The checks a command makes before torch and transformers load (importing them takes 4-10 s on a small CPU).

A missing local path is refused at once, with the same one `error:` line and exit status 2 as every later user
error, and before anything could ask huggingface.co. The checks are `hf_ssl_speech.errors`' own (one place for
the rules). That module needs only the standard library, but importing it through the package would run the
package's `__init__`, which imports torch and transformers: so it is run here from its file. The commands check
the same paths again after the imports, which is what library callers get.

Used from the `if __name__ == "__main__":` block of scripts/*.py (this folder is then first on sys.path).
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def errors_module() -> SimpleNamespace:
    """`hf_ssl_speech/errors.py` run on its own (its functions and classes), without importing the package."""
    spec = importlib.util.find_spec("hf_ssl_speech")  # a top-level find_spec does not run the package's __init__
    if spec is None or spec.origin is None:
        raise SystemExit("error: hf_ssl_speech is not installed here: pip install -e '.[train]' in the repository")
    return SimpleNamespace(**runpy.run_path(str(Path(spec.origin).with_name("errors.py"))))


def recipe_value(errors: SimpleNamespace, argv: Sequence[str], name: str) -> Any:
    """`name` from the command line, else from the `--config` recipe (flat or under a section), else None."""
    value = errors.option_value(argv, name)
    recipe = errors.option_value(argv, "config")
    if value is not None or recipe is None or not Path(recipe).is_file():
        return value  # a missing recipe is named by the full parser
    import yaml  # a dependency of the package, and quick to import

    try:
        data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # the full parser names what is wrong with it
    if not isinstance(data, dict):
        return None
    sections = [data, *(part for part in data.values() if isinstance(part, dict))]
    return next((section[name] for section in sections if section.get(name) is not None), None)


def check_finetune_model(errors: SimpleNamespace, argv: Sequence[str]) -> None:
    """The fine-tuning commands' `--model_name_or_path` (command line or recipe)."""
    model = recipe_value(errors, argv, "model_name_or_path")
    if model:
        errors.check_model_source(model, "--model_name_or_path")


def preflight(check: Callable[[SimpleNamespace, list[str]], None], argv: Sequence[str] | None = None) -> None:
    """Run `check(errors, argv)` (argv without `--debug`); a user error prints its one line and exits 2 now."""
    errors = errors_module()
    status = errors.run_command(lambda args: check(errors, args), list(sys.argv[1:] if argv is None else argv))
    if status:
        sys.exit(status)
