"""The transformers ASR pipeline and scripts/transcribe.py on the tiny fine-tuned CTC model.

The pipeline treats our model as CTC; chunked long-form decoding converts chunk/stride sample counts to
logit steps with `config.inputs_to_logits_ratio` (= hop 160 x subsampling 4 here), featurising each chunk
with our feature extractor. If that ratio were wrong, chunk borders would drop or repeat characters.
"""

from __future__ import annotations

import json

import jiwer
import numpy as np
import pytest
import soundfile as sf
from support import load_script
from transformers import AutoModelForCTC, AutoProcessor, pipeline

import hf_ssl_speech  # noqa: F401  (Auto registration)
from hf_ssl_speech.configuration_conformer_ssl import ConformerSslConfig
from hf_ssl_speech.finetune.ctc import transcribe


@pytest.fixture(scope="module")
def trained(tone_ctc):
    return tone_ctc  # session-scoped (conftest): test_finetune.py shares the same model


@pytest.fixture(scope="module")
def asr(trained):
    processor = AutoProcessor.from_pretrained(trained["output_dir"])
    model = AutoModelForCTC.from_pretrained(trained["output_dir"])
    return pipeline(
        "automatic-speech-recognition",
        model=model,
        feature_extractor=processor.feature_extractor,
        tokenizer=processor.tokenizer,
    )


def _heldout(trained) -> tuple[list[np.ndarray], list[str]]:
    manifest = trained["heldout"]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    audios = [sf.read(manifest.parent / row["audio_filepath"], dtype="float32")[0] for row in rows]
    return audios, [row["text"] for row in rows]


def test_pipeline_on_numpy_arrays_matches_transcribe(trained, asr):
    audios, texts = _heldout(trained)
    outputs = [asr(audio)["text"] for audio in audios[:4]]
    assert outputs == transcribe(asr.model, AutoProcessor.from_pretrained(trained["output_dir"]), audios[:4])
    # The model generalised to unseen letter sequences (the pipeline is not just echoing training data).
    assert jiwer.cer(texts[:4], outputs) <= 0.15
    # pipeline(model=<folder>) finds the feature extractor and tokenizer by itself.
    by_path = pipeline("automatic-speech-recognition", model=str(trained["output_dir"]))
    assert [by_path(audio)["text"] for audio in audios[:2]] == outputs[:2]


def test_chunked_long_form_matches_unchunked(trained, asr):
    config = asr.model.config
    assert config.inputs_to_logits_ratio == config.hop_length * config.subsampling_factor == 640
    audios, texts = _heldout(trained)
    long_audio = np.concatenate(audios)  # ~15 s, about 6x the chunk below
    reference = " ".join(texts)
    unchunked = asr(long_audio)["text"]
    chunked = asr(long_audio, chunk_length_s=2.5, stride_length_s=0.5)["text"]
    batched = asr(long_audio, chunk_length_s=2.5, stride_length_s=0.5, batch_size=4)["text"]
    agreement = 1.0 - jiwer.cer(unchunked, chunked)
    print(
        f"long-form: {len(long_audio) / 16000:.1f} s, chunked vs unchunked agreement {agreement:.4f}, "
        f"CER unchunked {jiwer.cer(reference, unchunked):.4f}, chunked {jiwer.cer(reference, chunked):.4f}"
    )
    assert agreement >= 0.95
    assert jiwer.cer(reference, chunked) <= 0.15
    assert batched == chunked  # padded chunks in a batch are cut back by their strides
    # Character timestamps come out in order and inside the audio.
    chunks = asr(long_audio, chunk_length_s=2.5, stride_length_s=0.5, return_timestamps="char")["chunks"]
    starts = [chunk["timestamp"][0] for chunk in chunks]
    assert starts == sorted(starts) and 0 <= starts[0] and chunks[-1]["timestamp"][1] <= len(long_audio) / 16000 + 0.05


def test_wrong_logits_ratio_would_break_chunking(trained, asr, monkeypatch):
    """Negative control: with the hop alone (160, as if there were no subsampling) chunks misalign."""
    audios, _ = _heldout(trained)
    long_audio = np.concatenate(audios)
    good = asr(long_audio, chunk_length_s=2.5, stride_length_s=0.5)["text"]
    monkeypatch.setattr(ConformerSslConfig, "inputs_to_logits_ratio", property(lambda self: self.hop_length))
    bad = asr(long_audio, chunk_length_s=2.5, stride_length_s=0.5)["text"]
    assert jiwer.cer(good, bad) > 0.2


def test_transcribe_script_writes_jsonl_with_scores(trained, tmp_path, capsys):
    script = load_script("transcribe")
    output = tmp_path / "hyp.jsonl"
    result = script.main(
        [
            str(trained["output_dir"]),
            "--manifest",
            str(trained["heldout"]),
            "--output",
            str(output),
            "--batch_size",
            "3",
            "--device",
            "cpu",
        ]
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 8 and all(
        {"audio_filepath", "duration", "hypothesis", "reference"} <= set(r) for r in records
    )
    scores = json.loads(output.with_suffix(".metrics.json").read_text())
    assert scores["utterances"] == 8
    assert scores["cer"] == pytest.approx(trained["result"].results["heldout"]["cer"], abs=1e-6)
    assert scores["wer"] == pytest.approx(
        jiwer.wer([r["reference"] for r in records], [r["hypothesis"] for r in records])
    )
    assert "CER" in capsys.readouterr().err
    # Files on the command line, chunked through the pipeline: same text as the batched path.
    files = [records[0]["audio_filepath"], records[1]["audio_filepath"]]
    chunked = script.main(
        [str(trained["output_dir"]), *files, "--chunk_length_s", "1.5", "--stride_length_s", "0.3", "--device", "cpu"]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in printed] == [r["hypothesis"] for r in chunked.records]
    assert jiwer.cer([r["hypothesis"] for r in records[:2]], [r["hypothesis"] for r in chunked.records]) <= 0.05
    assert result.scores["cer"] == scores["cer"]
