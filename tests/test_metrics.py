"""The local WER/CER `evaluate` modules: load by path without the Hub, agree with jiwer, handle empty texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import evaluate
import jiwer
import numpy as np
import pytest

from hf_ssl_speech.finetune.metrics import load_metrics, metric_path


@pytest.fixture(scope="module")
def metrics():
    return load_metrics()


def _random_texts(rng: np.random.Generator, count: int) -> list[str]:
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
    return [" ".join(rng.choice(words, size=int(rng.integers(0, 8)))) for _ in range(count)]


def test_modules_load_offline_by_path(tmp_path):
    """A fresh process with every Hub route closed (offline flags, an endpoint nobody listens on)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf_home"),  # empty cache: nothing can come from an earlier download
    }
    code = (
        "import evaluate, json\n"
        "from hf_ssl_speech.finetune.metrics import metric_path\n"
        "wer = evaluate.load(metric_path('wer'))\n"
        "cer = evaluate.load(metric_path('cer') + '/cer.py')\n"
        "print(json.dumps([wer.compute(predictions=['a b c'], references=['a x c']),\n"
        "                  cer.compute(predictions=['abd'], references=['abc'])]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    wer, cer = json.loads(done.stdout.strip().splitlines()[-1])
    assert wer == pytest.approx(1 / 3) and cer == pytest.approx(1 / 3)


def test_agree_with_jiwer_on_random_corpora(metrics):
    rng = np.random.default_rng(0)
    for _ in range(5):
        references = [text or "cat" for text in _random_texts(rng, 12)]  # jiwer's own call needs non-empty refs
        predictions = _random_texts(rng, 12)  # some hypotheses empty
        assert metrics["wer"].compute(predictions=predictions, references=references) == pytest.approx(
            jiwer.wer(references, predictions)
        )
        assert metrics["cer"].compute(predictions=predictions, references=references) == pytest.approx(
            jiwer.cer(references, predictions)
        )


def test_known_values_and_empty_texts(metrics):
    wer, cer = metrics["wer"], metrics["cer"]
    assert wer.compute(predictions=["hello word"], references=["hello world"]) == 0.5
    assert cer.compute(predictions=["helo"], references=["hello"]) == pytest.approx(0.2)
    # Empty hypothesis: all deletions.
    assert wer.compute(predictions=["", "a b"], references=["x y", "a b"]) == 0.5
    # Empty reference among others: its words count as insertions only; None is an empty text.
    assert wer.compute(predictions=["a b", "c"], references=["a b", ""]) == pytest.approx(0.5)
    assert wer.compute(predictions=[None, "a"], references=["a", "a"]) == 0.5
    # Both empty: nothing to get wrong.
    assert wer.compute(predictions=[""], references=[""]) == 0.0
    assert cer.compute(predictions=["  "], references=[""]) == 0.0
    # Whitespace around words does not count.
    assert wer.compute(predictions=["  a   b "], references=["a b"]) == 0.0
    with pytest.raises(ValueError):
        wer.compute(predictions=["a"], references=["a", "b"])


def test_metric_path_names_the_choices():
    assert metric_path("wer").endswith(os.path.join("metrics", "wer"))
    with pytest.raises(FileNotFoundError, match="wer, cer"):
        metric_path("bleu")
    # Loading the same path twice gives independent, working modules (no Hub lookup in between).
    again = evaluate.load(metric_path("cer"))
    assert again.compute(predictions=["ab"], references=["ab"]) == 0.0
