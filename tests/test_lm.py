"""Beam search with an n-gram word LM: irstlm builds the ARPA file, kenlm + pyctcdecode decode, and the folder's
`ConformerSslProcessorWithLM` (a `Wav2Vec2ProcessorWithLM`) is what `from_pretrained`, `pipeline("automatic-speech-recognition")` and
scripts/transcribe.py use. Tests that build an LM skip when Debian's irstlm is not installed (CI installs it)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from support import load_script
from transformers import AutoModelForCTC, AutoProcessor, Wav2Vec2ProcessorWithLM, pipeline

import hf_ssl_speech  # noqa: F401  (Auto registration)
from hf_ssl_speech.finetune import lm as lm_module
from hf_ssl_speech.finetune.ctc import ctc_outputs
from hf_ssl_speech.finetune.inference import transcribe_files
from hf_ssl_speech.finetune.lm import (
    LmError,
    arpa_unigrams,
    attach_lm,
    build_arpa,
    ctc_labels,
    has_lm,
    irstlm_available,
    lm_decode,
    tune_lm_weights,
)
from hf_ssl_speech.finetune.text import build_processor

# irstlm is a Debian package, not a Python dependency: without it only the tests that build an LM skip.
IRSTLM_MISSING = "irstlm not installed: run `sudo bash scripts/setup_voices.sh` (it runs apt-get install irstlm)"
needs_irstlm = pytest.mark.skipif(not irstlm_available(), reason=IRSTLM_MISSING)

SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and the dog",
    "the cat ran to the dog",
    "the mat is on the floor",
    "a dog sat on a mat",
    "the cat is here",
    "the dog is there",
    "the cat and a dog sat",
    "on the mat sat the cat",
    "the log is on the floor",
    "a cat ran to a log",
] * 5


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    if not irstlm_available():
        pytest.skip(IRSTLM_MISSING)
    return build_arpa(SENTENCES, tmp_path_factory.mktemp("lm") / "lm.arpa", order=3)


@needs_irstlm
def test_build_arpa_is_a_kneser_ney_lm_that_kenlm_reads(arpa):
    import kenlm

    model = kenlm.Model(str(arpa))
    assert model.order == 3
    assert set(arpa_unigrams(arpa)) == {w for s in SENTENCES for w in s.split()}
    # Seen word order scores higher than the same words shuffled.
    assert model.score("the cat sat on the mat") > model.score("mat the on sat cat the") + 3.0


def test_build_arpa_refuses_bad_requests(tmp_path):
    """Refused before irstlm is looked for: this runs with or without irstlm installed."""
    with pytest.raises(LmError, match="order=9"):
        build_arpa(SENTENCES, tmp_path / "x.arpa", order=9)
    with pytest.raises(LmError, match="at least 10"):
        build_arpa(["one sentence", "  ", "!!"], tmp_path / "x.arpa")
    assert not (tmp_path / "x.arpa").exists()


def test_build_arpa_without_irstlm_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv(lm_module.IRSTLM_ENV, raising=False)
    monkeypatch.setattr(lm_module, "_IRSTLM_DEFAULT", str(tmp_path / "no-irstlm"))
    assert not irstlm_available()
    with pytest.raises(LmError, match="apt-get install irstlm"):
        build_arpa(SENTENCES, tmp_path / "x.arpa")
    assert not (tmp_path / "x.arpa").exists()


def _letter_folder(tmp_path):
    """A folder with a CTC processor whose characters cover SENTENCES (attach_lm reads the tokenizer)."""
    processor = build_processor(SENTENCES)
    processor.save_pretrained(tmp_path)
    return processor


def _spell(tokenizer, text: str, confusions: dict[int, tuple[str, float]], rng) -> np.ndarray:
    """CTC log-probabilities spelling `text`: each character for 2 steps then a blank; at character positions in
    `confusions` a wrong letter takes the given share of the probability (greedy would pick it when > 0.5)."""
    vocab = tokenizer.get_vocab()
    rows = []
    for position, char in enumerate(text):
        token = "|" if char == " " else char
        for _ in range(2):
            p = np.full(len(vocab), 1e-4)
            if position in confusions:
                wrong, share = confusions[position]
                p[vocab[wrong]], p[vocab[token]] = share, 1.0 - share
            else:
                p[vocab[token]] = 1.0
            rows.append(p / p.sum())
        blank = np.full(len(vocab), 1e-4)
        blank[vocab["<pad>"]] = 1.0
        rows.append(blank / blank.sum())
    noise = rng.normal(0, 1e-3, size=(len(rows), len(vocab)))
    return np.log(np.clip(np.array(rows) + np.abs(noise), 1e-8, None)).astype(np.float32)


@needs_irstlm
def test_lm_corrects_what_greedy_gets_wrong_and_tuning_picks_a_weight_that_helps(tmp_path, arpa):
    processor = _letter_folder(tmp_path)
    labels = ctc_labels(processor.tokenizer)
    assert labels[0] == "" and " " in labels  # blank and word delimiter as pyctcdecode wants them
    rng = np.random.default_rng(0)
    # "the cat sat": 'e' (position 2) looks like 'a' and the second 'a' (position 5) like 'o': greedy says "tha cot sat".
    log_probs = [_spell(processor.tokenizer, "the cat sat", {2: ("a", 0.6), 5: ("o", 0.6)}, rng)]
    greedy = "".join(labels[i] for i in _collapse(log_probs[0].argmax(-1)))
    assert greedy == "tha cot sat"
    processor_lm = attach_lm(tmp_path, arpa, alpha=0.0, beta=0.0, save=False)
    assert lm_decode(processor_lm, log_probs) == ["tha cot sat"]  # alpha 0: the acoustic score alone
    assert lm_decode(processor_lm, log_probs, alpha=1.0, beta=1.0) == ["the cat sat"]
    alpha, beta, table = tune_lm_weights(processor_lm, log_probs, ["the cat sat"], [0.0, 1.0], [0.0, 1.0])
    assert len(table) == 4 and alpha == 1.0
    assert min(r["wer"] for r in table) == 0.0 and max(r["wer"] for r in table) > 0.0


def _collapse(ids):
    out, previous = [], None
    for i in ids:
        if i != previous and i != 0:
            out.append(int(i))
        previous = i
    return out


@pytest.fixture(scope="module")
def lm_folder(tone_ctc, tmp_path_factory):
    """The shared tiny tone CTC model, copied, with a 3-gram LM of tone-word sentences attached."""
    if not irstlm_available():
        pytest.skip(IRSTLM_MISSING)
    folder = tmp_path_factory.mktemp("ctc_lm") / "model"
    shutil.copytree(tone_ctc["output_dir"], folder)
    rows = [json.loads(line) for line in tone_ctc["manifest"].read_text().splitlines()]
    lm = build_arpa([r["text"] for r in rows] * 3, folder.parent / "tones.arpa", order=2)
    attach_lm(folder, lm, alpha=0.4, beta=0.5)
    return folder


@needs_irstlm
def test_processor_with_lm_round_trips_and_the_pipeline_decodes_with_it(lm_folder, tone_ctc):
    assert has_lm(lm_folder) and not has_lm(tone_ctc["output_dir"])
    processor_lm = AutoProcessor.from_pretrained(str(lm_folder))
    assert isinstance(processor_lm, Wav2Vec2ProcessorWithLM)  # ConformerSslProcessorWithLM, by processor_class
    assert (processor_lm.language_model.alpha, processor_lm.language_model.beta) == (0.4, 0.5)
    assert type(processor_lm.feature_extractor).__name__ == "ConformerSslFeatureExtractor"

    rows = [json.loads(line) for line in tone_ctc["heldout"].read_text().splitlines()]
    import soundfile as sf

    audios = [sf.read(tone_ctc["heldout"].parent / r["audio_filepath"], dtype="float32")[0] for r in rows[:4]]
    model = AutoModelForCTC.from_pretrained(str(lm_folder))
    _, log_probs = ctc_outputs(model, AutoProcessor.from_pretrained(str(lm_folder)), audios)
    expected = lm_decode(processor_lm, log_probs)

    asr = pipeline("automatic-speech-recognition", model=str(lm_folder))
    assert asr.type == "ctc_with_lm"  # the pipeline found alphabet.json + language_model/ by itself
    assert [asr(a)["text"] for a in audios] == expected

    by_script = transcribe_files(lm_folder, manifests=[str(tone_ctc["heldout"])], decoder="lm")
    assert [r["hypothesis"] for r in by_script.records[:4]] == expected
    greedy = transcribe_files(lm_folder, manifests=[str(tone_ctc["heldout"])], decoder="greedy")
    plain = transcribe_files(tone_ctc["output_dir"], manifests=[str(tone_ctc["heldout"])])  # auto: no LM there
    assert [r["hypothesis"] for r in greedy.records] == [r["hypothesis"] for r in plain.records]


def test_transcribe_decoder_lm_without_an_lm_is_a_clear_error(tone_ctc, capsys):
    with pytest.raises(LmError, match="no language model in this folder"):
        transcribe_files(tone_ctc["output_dir"], manifests=[str(tone_ctc["heldout"])], decoder="lm")
    with pytest.raises(ValueError, match="decoder='beam'"):
        transcribe_files(tone_ctc["output_dir"], manifests=[str(tone_ctc["heldout"])], decoder="beam")


@needs_irstlm
def test_build_lm_script_tunes_weights_on_validation(tone_ctc, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tone_ctc["output_dir"], folder)
    rows = [json.loads(line) for line in tone_ctc["manifest"].read_text().splitlines()]
    text = tmp_path / "lm.txt"
    text.write_text("\n".join(r["text"] for r in rows * 3) + "\n")
    summary = load_script("build_lm").main(
        [
            str(folder),
            "--text",
            str(text),
            "--order",
            "2",
            "--valid_manifest",
            str(tone_ctc["heldout"]),
            "--alphas",
            "0.0",
            "0.5",
            "--betas",
            "0.0",
            "1.0",
        ]
    )
    assert len(summary["grid"]) == 4
    best = min(summary["grid"], key=lambda r: (r["wer"], r["cer"]))
    assert (summary["alpha"], summary["beta"]) == (best["alpha"], best["beta"])
    saved = json.loads((folder / "language_model" / "attrs.json").read_text())
    assert (saved["alpha"], saved["beta"]) == (summary["alpha"], summary["beta"])
    assert not (folder / "lm_2gram.arpa").exists()  # only the folder's language_model/ copy remains
