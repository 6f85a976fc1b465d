"""Beam search with an n-gram word LM, the transformers way: a `Wav2Vec2ProcessorWithLM` beside the CTC model.

Nothing here is an n-gram toolkit. The pieces are the field's own:

- **Building** the LM: Debian's `irstlm` (`add-start-end.sh`, `build-lm.sh` with improved Kneser-Ney,
  `compile-lm --text=yes`) writes an ARPA file (`build_arpa`). Any ARPA file from KenLM's `lmplz` or SRILM works
  the same way.
- **Querying** it: pip `kenlm` reads the ARPA file; `pyctcdecode` runs the CTC prefix beam search with shallow
  fusion, score = log p_ctc + alpha * log p_lm + beta * words.
- **Shipping** it: `attach_lm` wraps the folder's feature extractor and tokenizer with a pyctcdecode decoder in a
  `Wav2Vec2ProcessorWithLM` and saves it into the model folder (`alphabet.json`, `language_model/` with the ARPA
  file, unigrams and `attrs.json` holding alpha and beta). `Wav2Vec2ProcessorWithLM.from_pretrained(folder)` and
  `pipeline("automatic-speech-recognition", model=folder)` then decode with the LM.

The alpha/beta of a folder are chosen on validation data (`tune_lm_weights`), never on test.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..processing_conformer_ssl_lm import ConformerSslProcessorWithLM
from .text import normalize_transcript

logger = logging.getLogger(__name__)

# pyctcdecode declares numpy<2 but runs on numpy 2: a plain `pip install pyctcdecode` would downgrade numpy, so it
# goes in without its pins (docs/dependencies.md); the extra brings kenlm and pyctcdecode's real dependency.
LM_INSTALL = "pip install 'hf_ssl_speech[lm]' && pip install --no-deps pyctcdecode==0.5.0"
IRSTLM_ENV = "IRSTLM"
_IRSTLM_DEFAULT = "/usr/lib/irstlm"  # Debian's irstlm package


class LmError(UserError, RuntimeError):
    """The LM could not be built or attached; the message says what is missing and how to get it."""


# ============================================================================================ building
def irstlm_home() -> Path | None:
    """The irstlm installation ($IRSTLM, else Debian's /usr/lib/irstlm), or None when it is not installed."""
    for candidate in (os.environ.get(IRSTLM_ENV), _IRSTLM_DEFAULT):
        if candidate and (Path(candidate) / "bin" / "build-lm.sh").is_file():
            return Path(candidate)
    return None


def irstlm_available() -> bool:
    return irstlm_home() is not None


def build_arpa(texts: Iterable[str], out_path: str | Path, order: int = 3) -> Path:
    """Train a word `order`-gram LM (improved Kneser-Ney) on `texts` with irstlm and write it as ARPA.

    Args:
        texts: training sentences (normalised here as the transcripts are: lower case, no punctuation); they must
            be disjoint from validation and test sentences, which the caller checks.
        out_path: the ARPA file to write (its folder is created).
        order: n-gram order, 2..6.
    """
    if not 2 <= order <= 6:
        raise LmError(f"order={order}: an n-gram LM order must be between 2 and 6 (3 is usual for small corpora)")
    lines = [normalize_transcript(t) for t in texts]
    lines = [line for line in lines if line]
    if len(lines) < 10:
        raise LmError(f"build_arpa: {len(lines)} non-empty sentences after normalisation; an LM needs at least 10")
    # The request is checked first: a bad one is refused the same way with or without irstlm installed.
    home = irstlm_home()
    if home is None:
        raise LmError(
            "building an n-gram LM needs irstlm: install it with `apt-get install irstlm` (Debian/Ubuntu) or set "
            f"${IRSTLM_ENV} to its folder; any ARPA file (KenLM lmplz, SRILM) can be used instead"
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, IRSTLM_ENV: str(home)}
    with tempfile.TemporaryDirectory(prefix="irstlm-") as work:
        work_dir = Path(work)
        plain, marked, model = work_dir / "text.txt", work_dir / "text.se", work_dir / "lm.ilm.gz"
        plain.write_text("\n".join(lines) + "\n")
        _irstlm(f"{home}/bin/add-start-end.sh < {plain} > {marked}", "add-start-end.sh", env)
        # Improved Kneser-Ney needs n-grams seen once and twice (its discounts come from those counts); on tiny
        # or repetitive text build-sublm.pl fails on it, and Witten-Bell, which needs no such counts, is used.
        for smoothing in ("improved-kneser-ney", "witten-bell"):
            _irstlm(
                f"{home}/bin/build-lm.sh -i {marked} -n {order} -o {model} -k 1 -s {smoothing} -t {work_dir / 'tmp'}",
                "build-lm.sh",
                env,
            )
            if model.is_file():
                break
            logger.warning("irstlm: %s smoothing failed on this text; trying the next one", smoothing)
        else:
            raise LmError("irstlm build-lm.sh wrote no LM with Kneser-Ney or Witten-Bell smoothing; is the text empty?")
        _irstlm(f"{home}/bin/compile-lm {model} --text=yes {work_dir / 'lm.arpa'}", "compile-lm", env)
        shutil.move(str(work_dir / "lm.arpa"), out_path)
    return out_path


def _irstlm(command: str, name: str, env: dict[str, str]) -> None:
    done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise LmError(f"irstlm {name} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")


def arpa_unigrams(arpa_path: str | Path) -> list[str]:
    """The words of an ARPA file's 1-gram section (pyctcdecode uses them to score partial words)."""
    words, inside = [], False
    with open(arpa_path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line == "\\1-grams:":
                inside = True
            elif inside and line.startswith("\\"):
                break
            elif inside and line:
                word = line.split("\t")[1] if "\t" in line else line.split()[1]
                if word not in ("<s>", "</s>", "<unk>"):
                    words.append(word)
    if not words:
        raise LmError(f"{arpa_path}: no 1-grams found; is it an ARPA file?")
    return words


# ============================================================================================ decoding
class _DeprecationToDebug(logging.Filter):
    """transformers' notice that pyctcdecode decoding through it ends in v6 (we call pyctcdecode ourselves)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Transformers v6" not in record.getMessage():
            return True
        logger.debug("transformers: %s", record.getMessage())
        return False


_V6_NOTICE_LOGGERS = (
    "transformers.models.wav2vec2_with_lm.processing_wav2vec2_with_lm",
    "transformers.pipelines.automatic_speech_recognition",
)


@contextmanager
def lm_chatter_to_debug_log() -> Iterator[None]:
    """Send what loading an LM prints to this module's debug log: kenlm's progress bars (its C++ writes to the
    process's stderr, so file descriptor 2 is redirected) and transformers' v6 deprecation notice. If the block
    fails, what was printed is logged as a warning instead, next to the error."""
    dropper = _DeprecationToDebug()
    for name in _V6_NOTICE_LOGGERS:
        logging.getLogger(name).addFilter(dropper)
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            for name in _V6_NOTICE_LOGGERS:
                logging.getLogger(name).removeFilter(dropper)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace").strip()
            if text:
                logger.log(logging.WARNING if failed else logging.DEBUG, "while loading the LM:\n%s", text)


def ctc_labels(tokenizer: Any) -> list[str]:
    """The tokenizer's vocabulary as pyctcdecode labels, in id order: blank `<pad>` -> "", `|` -> " "."""
    vocab = tokenizer.get_vocab()
    labels = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    if [vocab[t] for t in labels] != list(range(len(labels))):
        raise LmError(f"tokenizer ids are not 0..{len(labels) - 1}; pyctcdecode needs one label per logit column")
    mapping = {tokenizer.pad_token: "", tokenizer.word_delimiter_token: " "}
    return [mapping.get(token, token) for token in labels]


def attach_lm(
    model_dir: str | Path,
    arpa_path: str | Path,
    alpha: float = 0.5,
    beta: float = 1.0,
    save: bool = True,
) -> Any:
    """A `ConformerSslProcessorWithLM` (transformers' `Wav2Vec2ProcessorWithLM`) of the folder's processor and the ARPA LM; saved into `model_dir` by default.

    Args:
        model_dir: a fine-tuned CTC folder (`save_pretrained` of the model and its `Wav2Vec2Processor`).
        arpa_path: a word n-gram LM in ARPA format (`build_arpa`).
        alpha: LM weight; beta: word insertion bonus (pyctcdecode's names). Choose both on validation.
        save: write `alphabet.json` and `language_model/` into `model_dir` (replacing an earlier LM).
    """
    try:
        from pyctcdecode import build_ctcdecoder
        from transformers import AutoProcessor
    except ImportError as error:
        raise LmError(f"LM decoding needs pyctcdecode and kenlm: {LM_INSTALL} ({error})") from error
    model_dir = Path(model_dir)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise LmError(f"{model_dir}: no CTC tokenizer in this folder; attach an LM to a fine-tuned CTC model")
    with lm_chatter_to_debug_log():
        decoder = build_ctcdecoder(
            ctc_labels(tokenizer),
            kenlm_model_path=str(arpa_path),
            unigrams=arpa_unigrams(arpa_path),
            alpha=alpha,
            beta=beta,
        )
        processor_lm = ConformerSslProcessorWithLM(
            feature_extractor=processor.feature_extractor, tokenizer=tokenizer, decoder=decoder
        )
    if save:
        save_lm(processor_lm, model_dir)
    return processor_lm


def save_lm(processor_lm: Any, model_dir: str | Path, alpha: float | None = None, beta: float | None = None) -> None:
    """Write the processor with its LM into `model_dir` (replacing an earlier LM), first setting alpha/beta when
    given: e.g. the weights `tune_lm_weights` chose, without building the decoder again."""
    if alpha is not None or beta is not None:
        processor_lm.decoder.reset_params(alpha=alpha, beta=beta)
    model_dir = Path(model_dir)
    for stale in ("alphabet.json", "language_model"):
        target = model_dir / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    processor_lm.save_pretrained(str(model_dir))


def lm_decode(
    processor_lm: Any,
    log_probs: Sequence[np.ndarray],
    beam_width: int = 24,
    alpha: float | None = None,
    beta: float | None = None,
) -> list[str]:
    """Beam-search transcripts of unpadded CTC outputs, one (steps, vocab) array each; alpha/beta override the
    processor's for this call only (the saved values are restored)."""
    decoder = processor_lm.decoder
    lm = decoder.model_container[decoder._model_key]
    saved = (lm.alpha, lm.beta)
    decoder.reset_params(alpha=saved[0] if alpha is None else alpha, beta=saved[1] if beta is None else beta)
    try:
        texts = [
            decoder.decode_beams(np.asarray(lp, dtype=np.float32), beam_width=beam_width)[0][0] for lp in log_probs
        ]
    finally:
        decoder.reset_params(alpha=saved[0], beta=saved[1])
    return [normalize_transcript(t) for t in texts]


def tune_lm_weights(
    processor_lm: Any,
    log_probs: Sequence[np.ndarray],
    references: Sequence[str],
    alphas: Sequence[float],
    betas: Sequence[float],
    beam_width: int = 24,
) -> tuple[float, float, list[dict[str, float]]]:
    """Grid search of (alpha, beta) by WER on VALIDATION outputs; returns the best pair and the whole table."""
    import jiwer

    references = [normalize_transcript(r) for r in references]
    table = []
    for alpha, beta in itertools.product(alphas, betas):
        hypotheses = lm_decode(processor_lm, log_probs, beam_width=beam_width, alpha=alpha, beta=beta)
        table.append(
            {
                "alpha": float(alpha),
                "beta": float(beta),
                "wer": float(jiwer.wer(references, hypotheses)),
                "cer": float(jiwer.cer(references, hypotheses)),
            }
        )
    best = min(table, key=lambda row: (row["wer"], row["cer"]))
    return best["alpha"], best["beta"], table


def has_lm(model_dir: str | Path) -> bool:
    """Whether a folder carries an LM decoder (`attach_lm`): `alphabet.json` and `language_model/`."""
    return (Path(model_dir) / "alphabet.json").is_file() and (Path(model_dir) / "language_model").is_dir()


__all__ = [
    "LM_INSTALL",
    "LmError",
    "arpa_unigrams",
    "attach_lm",
    "build_arpa",
    "ctc_labels",
    "has_lm",
    "irstlm_available",
    "lm_chatter_to_debug_log",
    "lm_decode",
    "save_lm",
    "tune_lm_weights",
]
