"""HuBERT iterations (`scripts/hubert_iterations.py`): the targets, the label-quality measures, the demo corpus's
phone alignment, and the whole command at tiny scale with its resumability.

The property tests check each piece against an independent computation or a hand-made case with a known
answer; the command test runs both iterations on a half-minute espeak corpus with a 2-layer model and a few
steps, then reruns it to check that finished stages are skipped and interrupted ones continued or redone.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from support import REPO_ROOT, run_env

from hf_ssl_speech.errors import ConfigError, MissingPathError, UserError
from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from hf_ssl_speech.pretrain.hubert_iterations import StageMismatchError, load_config, run_hubert_iterations
from hf_ssl_speech.pretrain.kmeans import dct_matrix, deltas, make_kmeans_labels, mfcc_features, safe_name
from hf_ssl_speech.pretrain.label_quality import code_usage, joint_counts, label_quality, phone_code_metrics
from hf_ssl_speech.synthetic.alignment import (
    SILENCE,
    _utterance_key,
    demo_corpus_of,
    frame_phones,
    phone_segments,
    read_phone_labels,
    write_phone_labels,
)
from hf_ssl_speech.synthetic.corpus import make_demo_corpus
from hf_ssl_speech.synthetic.phonemes import phonemize

SCRIPT = REPO_ROOT / "scripts" / "hubert_iterations.py"
CONFIG = REPO_ROOT / "configs" / "hubert_iterations" / "tiny.yaml"


# ----------------------------------------------------------------------------------------------- MFCC targets
def dct_ii_by_fft(x: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II along the last axis through a 2N-point FFT of the mirrored signal (an independent route:
    no cosine matrix)."""
    n = x.shape[-1]
    mirrored = np.concatenate([x, x[..., ::-1]], axis=-1)
    spectrum = np.fft.fft(mirrored, axis=-1)[..., :n]
    out = np.real(spectrum * np.exp(-1j * np.pi * np.arange(n) / (2 * n))) / 2  # sum_m x_m cos(pi k (2m+1) / 2N)
    out *= np.sqrt(2.0 / n)
    out[..., 0] /= np.sqrt(2.0)
    return out


def test_mfcc_is_the_dct_of_the_extractors_log_mels(speech_like):
    extractor = ConformerSslFeatureExtractor()
    audio = speech_like(1.3, seed=3)
    log_mel = extractor(audio, sampling_rate=16000, return_tensors="pt", do_normalize=False)["input_features"][0]
    mfcc = mfcc_features(log_mel)  # (frames, 39)
    assert mfcc.shape == (len(audio) // 160, 39)
    expected = dct_ii_by_fft(log_mel.double().numpy())[:, :13]
    np.testing.assert_allclose(mfcc[:, :13].numpy(), expected, rtol=1e-4, atol=1e-3)
    # Orthonormal with all coefficients kept: the transform preserves energy.
    full = dct_matrix(80, 80).double()
    torch.testing.assert_close(full.T @ full, torch.eye(80, dtype=torch.float64), atol=1e-5, rtol=0)


def test_deltas_follow_the_regression_formula_with_repeated_edges():
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    d = deltas(x)
    index = lambda t: min(max(t, 0), len(x) - 1)  # noqa: E731
    for t in range(len(x)):  # d[t] = (x[t+1] - x[t-1] + 2 (x[t+2] - x[t-2])) / 10
        manual = (x[index(t + 1)] - x[index(t - 1)] + 2 * (x[index(t + 2)] - x[index(t - 2)])) / 10
        torch.testing.assert_close(d[t], manual)
    ramp = torch.arange(12.0)[:, None] * 0.5  # slope 0.5 away from the edges, 0 for a constant
    assert torch.allclose(deltas(ramp)[2:-2], torch.full((8, 1), 0.5))
    assert torch.count_nonzero(deltas(torch.ones(6, 2))) == 0
    static = torch.randn(20, 80, generator=torch.Generator().manual_seed(1))
    mfcc = mfcc_features(static)
    torch.testing.assert_close(mfcc[:, 13:26], deltas(mfcc[:, :13]))
    torch.testing.assert_close(mfcc[:, 26:], deltas(deltas(mfcc[:, :13])))


# ----------------------------------------------------------------------------------------------- label quality
def test_purity_and_pnmi_on_hand_made_pairs():
    phones = np.array([0, 0, 1, 1])
    # One code per phone (renamed): everything is pure and the codes tell the phone exactly.
    perfect = phone_code_metrics(joint_counts(phones, np.array([5, 5, 2, 2])))
    assert perfect == pytest.approx({"phone_purity": 1.0, "cluster_purity": 1.0, "pnmi": 1.0})
    # One code for everything: no information, purity = the most frequent phone's share.
    constant = phone_code_metrics(joint_counts(np.array([0, 0, 0, 1]), np.zeros(4, dtype=int)))
    assert constant == pytest.approx({"phone_purity": 0.75, "cluster_purity": 1.0, "pnmi": 0.0})
    # p(y, z): (0,0) = 1/2, (1,0) = 1/4, (1,1) = 1/4; p(y) = (1/2, 1/2), p(z) = (3/4, 1/4).
    mixed = phone_code_metrics(joint_counts(phones, np.array([0, 0, 0, 1])))
    mutual = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) + 0.25 * math.log(2.0)
    assert mixed == pytest.approx({"phone_purity": 0.75, "cluster_purity": 0.75, "pnmi": mutual / math.log(2.0)})
    # A phone split over two codes: the codes stay phone-pure, the phone is no longer in one code.
    split = phone_code_metrics(joint_counts(phones, np.array([0, 1, 2, 2])))
    assert split["phone_purity"] == 1.0 and split["cluster_purity"] == 0.75 and split["pnmi"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one entry per frame"):
        joint_counts(phones, np.array([0, 1]))


def test_codes_used_and_entropy():
    assert code_usage(np.array([0, 0, 1, 1]), 4) == pytest.approx(
        {"codes_used": 2, "num_clusters": 4, "entropy_bits": 1.0, "normalized_entropy": 0.5}
    )
    uniform = code_usage(np.arange(64) % 8, 8)
    assert uniform["codes_used"] == 8 and uniform["entropy_bits"] == pytest.approx(3.0)
    assert uniform["normalized_entropy"] == pytest.approx(1.0)
    assert code_usage(np.zeros(10, dtype=int), 5)["entropy_bits"] == 0.0


def test_label_quality_pairs_files_by_name(tmp_path):
    for folder, arrays in (("codes", {"a": [3, 3, 1, 1], "b": [1, 1]}), ("phones", {"a": [0, 0, 2, 2, 2]})):
        (tmp_path / folder / "labels").mkdir(parents=True)
        for stem, values in arrays.items():
            np.save(tmp_path / folder / "labels" / f"{stem}.npy", np.array(values))
    report = label_quality(tmp_path / "codes", 4, tmp_path / "phones")
    assert report["frames"] == 6 and report["codes_used"] == 2 and report["phone_labelled_utterances"] == 1
    assert report["phone_labelled_frames"] == 4 and report["pnmi"] == pytest.approx(1.0)  # the extra frame is cut
    np.save(tmp_path / "phones" / "labels" / "a.npy", np.zeros(40, dtype=int))
    with pytest.raises(UserError, match="belong to other audio"):
        label_quality(tmp_path / "codes", 4, tmp_path / "phones")


# ----------------------------------------------------------------------------------------------- phone alignment
def test_frame_phones_takes_the_phone_at_each_frame_centre():
    onsets = [(200, "h"), (400, "ə"), (650, ""), (900, "l")]  # "" = a pause
    assert frame_phones(onsets, 1000) == [SILENCE, SILENCE, "h", "ə", "ə", SILENCE]  # centres 0, 160, ..., 800
    assert frame_phones([], 480) == [SILENCE] * 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A half-minute espeak demo corpus (about 5 utterances), made once for this module."""
    folder = tmp_path_factory.mktemp("hubert_corpus")
    make_demo_corpus(folder, minutes=0.5, seed=1, engines=["espeak"], num_workers=1, progress=False)
    return folder


def test_espeak_phone_events_are_the_files_phones_at_the_right_times(corpus, tmp_path):
    manifest = corpus / "pretrain.jsonl"
    summary = write_phone_labels(manifest, tmp_path / "phones")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert summary["aligned"] == summary["utterances"] == len(rows) and not summary["skipped"]
    labels, inventory = read_phone_labels(tmp_path / "phones")
    plans = demo_corpus_of(manifest)
    for row in rows:
        audio, _ = sf.read(corpus / row["audio_filepath"], dtype="float64")
        phones = [inventory[i] for i in labels[safe_name(str(Path(row["audio_filepath"]).with_suffix("")))]]
        assert len(phones) == len(audio) // 160
        # The events name the phones espeak says for the text, in order (its own phonemizer as the reference).
        plan = plans.plan(*_utterance_key(row))
        _, onsets = phone_segments(plan)
        assert [name for _, name in onsets if name] == phonemize(plan.synth_text, plan.speaker.accent)
        # ... at the right times: the padding before the speech is silence, and frames labelled silence are far
        # quieter than frames labelled with a phone.
        lead_frames = int(plan.lead_s * 16000) // 160
        assert set(phones[:lead_frames]) == {SILENCE} and phones[lead_frames + 2] != SILENCE
        energy = np.array([np.mean(audio[i * 160 : i * 160 + 160] ** 2) for i in range(len(phones))])
        silent = np.array([p == SILENCE for p in phones])
        assert np.median(energy[silent]) < 0.01 * np.median(energy[~silent])


def test_an_edited_file_gets_no_phone_labels(corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    first = json.loads((copy / "pretrain.jsonl").read_text().splitlines()[0])
    audio, rate = sf.read(copy / first["audio_filepath"], dtype="int16")
    audio[1000] += 1  # one sample off: the re-rendering no longer matches, so its alignment would be a guess
    sf.write(copy / first["audio_filepath"], audio, rate, subtype="PCM_16")
    summary = write_phone_labels(copy / "pretrain.jsonl", tmp_path / "phones")
    assert summary["skipped"] == {"audio differs from its re-rendering": 1}
    assert summary["aligned"] == summary["utterances"] - 1


# ----------------------------------------------------------------------------------------------- the command
def tiny_overrides(corpus: Path, output_dir: Path) -> list[str]:
    return [
        f"run.output_dir={output_dir}",
        "run.progress=false",
        f"data.train_manifest={corpus / 'pretrain.jsonl'}",
        f"data.valid_manifest={corpus / 'test.jsonl'}",
        "data.demo_corpus=null",
        "iteration1.num_clusters=8",
        "iteration2.num_clusters=12",
        f"pretrain.recipe={REPO_ROOT / 'configs' / 'pretrain' / 'tiny_hubert.yaml'}",
        "pretrain.overrides=[train.max_steps=4, train.save_steps=2, train.eval_steps=2, train.eval_batches=1, "
        "train.report_to=none, train.log_steps=2, train.keep_last=5, model.hidden_size=32, "
        "model.num_attention_heads=4, model.intermediate_size=64]",
    ]


STAGES = ("phones", "iter1_labels", "iter1_pretrain", "iter2_labels", "iter2_pretrain")


@pytest.mark.slow
def test_the_command_runs_both_iterations_and_resumes(corpus, tmp_path, caplog):
    out = tmp_path / "run"
    overrides = tiny_overrides(corpus, out)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(CONFIG), *overrides],
        capture_output=True,
        text=True,
        env={**run_env(tmp_path), "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"},
        cwd=tmp_path,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [it["features"] for it in report["iterations"]] == ["mfcc", "hidden"]
    assert report["iterations"][1]["layer"] == 1  # the middle of 2 blocks
    for it in report["iterations"]:
        assert it["pretrain_steps"] == 4
        for split in ("train", "valid"):
            quality = it["label_quality"][split]
            assert 2 <= quality["codes_used"] <= it["num_clusters"]
            assert 0 < quality["pnmi"] < 1 and 0 < quality["phone_purity"] <= 1
    assert "iteration 2 (hidden, k=12) valid:" in result.stdout and "PNMI" in (out / "report.md").read_text()
    # Iteration 2's labels count encoder steps (4 frames each), repeated to one label per 10 ms frame.
    labels = np.load(next((out / "iter2" / "labels" / "train" / "labels").glob("*.npy")))
    assert np.array_equal(labels, labels[np.arange(len(labels)) // 4 * 4])

    config = load_config(CONFIG, overrides)
    # Second run: every stage is skipped.
    caplog.set_level(logging.INFO, logger="hf_ssl_speech")
    again = run_hubert_iterations(config)
    assert [f"stage {s}: done" in caplog.text for s in STAGES] == [True] * 5 and ": running" not in caplog.text
    assert again["iterations"] == report["iterations"]

    # Iteration 2's pretraining interrupted after its step-2 checkpoint: it continues from there.
    (out / "stages" / "iter2_pretrain.json").unlink()
    shutil.rmtree(out / "iter2" / "pretrain" / "checkpoints" / "checkpoint-00000004")
    caplog.clear()
    resumed = run_hubert_iterations(config)
    marker = json.loads((out / "stages" / "iter2_pretrain.json").read_text())
    assert marker["result"]["resumed_from"].endswith("checkpoint-00000002") and marker["result"]["step"] == 4
    assert "continuing the interrupted run" in caplog.text and "stage iter2_labels: done" in caplog.text
    assert resumed["iterations"][1]["label_quality"] == report["iterations"][1]["label_quality"]

    # Iteration 2's labelling interrupted (no marker, partial files): redone from scratch. Its pretraining was
    # made from the old labels, so the command stops there and says what to delete instead of deleting it.
    (out / "stages" / "iter2_labels.json").unlink()
    (out / "iter2" / "labels" / "train" / "labels" / "partial.npy").write_bytes(b"")
    with pytest.raises(StageMismatchError, match="stage 'iter2_pretrain'.*input"):
        run_hubert_iterations(config)
    assert not (out / "iter2" / "labels" / "train" / "labels" / "partial.npy").exists()
    assert (out / "stages" / "iter2_labels.json").is_file()
    # A changed setting of a finished stage is refused the same way.
    with pytest.raises(StageMismatchError, match="stage 'iter1_labels'.*num_clusters"):
        run_hubert_iterations(load_config(CONFIG, [*overrides, "iteration1.num_clusters=9"]))


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_gets_a_clear_error(corpus, tmp_path):
    overrides = tiny_overrides(corpus, tmp_path / "run")
    with pytest.raises(MissingPathError, match="data.train_manifest"):
        run_hubert_iterations(load_config(CONFIG, [*overrides, f"data.train_manifest={tmp_path / 'nope.jsonl'}"]))
    with pytest.raises(ConfigError, match="iteration1.*num_clusters=100000 is larger than"):
        run_hubert_iterations(load_config(CONFIG, [*overrides, "iteration1.num_clusters=100000"]))
    with pytest.raises(ConfigError, match="Did you mean 'iteration1.num_clusters'"):
        load_config(CONFIG, ["iteration1.num_cluster=5"])
    with pytest.raises(ConfigError, match="data.phone_labels"):
        load_config(CONFIG, ["data.phone_labels=maybe"])
    with pytest.raises(ConfigError, match="no `hubert` objective"):
        run_hubert_iterations(load_config(CONFIG, [*overrides, "pretrain.recipe=tiny_nest"]))
    with pytest.raises(ConfigError, match="--features=hidden"):
        make_kmeans_labels(None, corpus / "test.jsonl", tmp_path / "k")
