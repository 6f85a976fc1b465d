"""WER and CER as local `evaluate` modules, loaded by path: `evaluate.load("wer")` needs the Hub and fails offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Folder of a shipped `evaluate` module ("wer" or "cer"), for `evaluate.load(metric_path(name))`."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"no local metric {name!r} in {METRICS_DIR}; available: wer, cer")
    return str(folder)


def load_metrics(names: Sequence[str] = ("wer", "cer")) -> dict[str, Any]:
    """The local `evaluate` modules by path: no Hub access."""
    import evaluate

    return {name: evaluate.load(metric_path(name)) for name in names}
