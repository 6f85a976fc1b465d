"""Character error rate as a local `evaluate` module, backed by jiwer (no Hub access).

`evaluate.load("cer")` downloads its script from the Hub and fails offline, so this module ships with
hf_ssl_speech and is loaded by path:

    import evaluate
    from hf_ssl_speech.finetune.metrics import metric_path
    cer = evaluate.load(metric_path("cer"))
    cer.compute(predictions=["helo"], references=["hello"])  # 0.2

CER = (substitutions + deletions + insertions) / reference characters (spaces included), summed over the
whole corpus, as jiwer's `process_characters` counts them. Empty texts are allowed: an empty hypothesis is
all deletions; an empty reference contributes only insertions (when every reference is empty the result is
the number of inserted characters, jiwer's convention). `None` counts as an empty text.
"""

from __future__ import annotations

import datasets
import evaluate
import jiwer

_CITATION = """\
@misc{jiwer, title = {JiWER: Similarity measures for automatic speech recognition evaluation},
       author = {Vaessen, Nik}, howpublished = {https://github.com/jitsi/jiwer}}
"""

_DESCRIPTION = "Character error rate (corpus level) of transcripts against references, computed with jiwer."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): hypotheses (transcripts from the model); None or "" for an empty transcript.
    references (`list[str]`): reference transcripts, same length as `predictions`.
    concatenate_texts (`bool`, default False): accepted for compatibility with the Hub's `cer`; the
        result is corpus-level either way.
Returns:
    `float`: the character error rate (0.0 = perfect; can exceed 1.0 with many insertions).
"""


def _clean(texts: list[str | None]) -> list[str]:
    """None -> "" and surrounding whitespace removed, so jiwer sees plain (possibly empty) strings."""
    return ["" if text is None else str(text).strip() for text in texts]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cer(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/cer"],
        )

    # None is accepted as an empty transcript: replaced before evaluate's Arrow type check sees it.
    def compute(self, *, predictions=None, references=None, **kwargs):
        """Corpus-level score of `predictions` against `references` (see the module docstring)."""
        predictions = _clean(predictions) if predictions is not None else None
        references = _clean(references) if references is not None else None
        return super().compute(predictions=predictions, references=references, **kwargs)

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Queue a batch of `predictions` / `references` for a later `compute()`."""
        predictions = _clean(predictions) if predictions is not None else None
        references = _clean(references) if references is not None else None
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions: list[str], references: list[str], concatenate_texts: bool = False) -> float:
        if len(predictions) != len(references):
            raise ValueError(f"cer: {len(predictions)} predictions but {len(references)} references; pass one each.")
        if not references:
            raise ValueError("cer: no predictions/references were given.")
        return float(jiwer.process_characters(_clean(references), _clean(predictions)).cer)
