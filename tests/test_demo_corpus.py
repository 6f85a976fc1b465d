"""Built-in demo corpus: real espeak-ng audio, written to disk and read back with soundfile.

Corpora here are about a minute of audio (about a second to render). Recorded-voice engines are only exercised
when `flite` happens to be installed; everything else runs pip-only.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hf_ssl_speech.synthetic import corpus as dc
from hf_ssl_speech.synthetic.espeak import EspeakError, espeak_variants, synthesize_espeak
from hf_ssl_speech.synthetic.sentences import SentenceGenerator, normalize_text, number_words

TRANSCRIPT = re.compile(r"[a-z']+( [a-z']+)*")
MINUTES = 1.0
COMMON = dict(engines=["espeak"], finetune_fraction=0.25, test_fraction=0.25, noise_fraction=0.5, progress=False)


def _manifest(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _fingerprint(folder: Path) -> dict[str, str]:
    """md5 of every manifest and audio file, keyed by relative path."""
    files = [folder / f"{s}.jsonl" for s in dc.SPLITS] + sorted((folder / "audio").iterdir())
    return {str(f.relative_to(folder)): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("demo") / "corpus"
    summary = dc.make_demo_corpus(folder, MINUTES, seed=0, num_workers=2, **COMMON)
    return folder, summary


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------


def test_sentences_are_normalised_deterministic_and_within_the_vocabulary():
    generator = SentenceGenerator()
    vocabulary = generator.vocabulary()
    assert len(vocabulary) >= 3000

    first = [generator.sentence(np.random.default_rng(7)) for _ in range(3)]
    assert len(set(first)) == 1  # a sentence is a function of the generator state alone
    rng = np.random.default_rng(7)
    sentences = [generator.sentence(rng) for _ in range(2000)]
    assert sentences[0] == first[0]
    assert all(TRANSCRIPT.fullmatch(s) for s in sentences)
    words = {w for s in sentences for w in s.split()}
    assert words <= vocabulary
    assert len(words) > 1500  # 2000 sentences already draw a wide vocabulary
    assert len(set(sentences)) > 1990  # practically no repeats
    other = [generator.sentence(np.random.default_rng(8)) for _ in range(1)]
    assert other[0] != first[0]


def test_normalize_text_maps_to_the_transcript_alphabet():
    assert normalize_text("Café – it\u2019s 42 O'Neil's!  \u201cHello\u201d 'quoted'") == (
        "cafe it's forty two o'neil's hello quoted"
    )
    assert number_words(312) == "three hundred and twelve"
    assert number_words(90) == "ninety"
    with pytest.raises(ValueError, match="n=1000"):
        number_words(1000)


# ---------------------------------------------------------------------------------------------------------------
# espeak-ng through ctypes
# ---------------------------------------------------------------------------------------------------------------


def _md5(samples: np.ndarray) -> str:
    return hashlib.md5(samples.tobytes()).hexdigest()


def test_espeak_is_deterministic_whatever_ran_before_and_whenever():
    text = "every stormy afternoon the lion slept."
    # f2 has breath noise (espeak seeds it from the clock), klatt3 uses the Klatt synthesiser
    first = {v: _md5(synthesize_espeak(text, v, rate=160, seed=3)[0]) for v in ("en+f2", "en-us+klatt3")}
    synthesize_espeak("some other words to change the internal state", "en-gb-scotland+croak", pitch=20)
    time.sleep(1.1)  # the clock-seeded noise generator would now start elsewhere
    again = {v: _md5(synthesize_espeak(text, v, rate=160, seed=3)[0]) for v in ("en-us+klatt3", "en+f2")}
    assert first == again
    audio, rate = synthesize_espeak(text, "en+f2", rate=160, seed=4)
    assert rate == 22050 and audio.dtype == np.int16 and audio.size > rate  # more than a second of speech
    assert _md5(audio) != first["en+f2"]  # the seed reaches the noise


def test_espeak_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(EspeakError, match=r"library_path=.*nowhere.*pip install espeakng-loader"):
        synthesize_espeak("hello", "en", library_path=str(tmp_path / "nowhere" / "libespeak-ng.so"))
    not_a_library = tmp_path / "libespeak-ng.so"
    not_a_library.write_text("this is not an ELF file\n")
    with pytest.raises(EspeakError, match="cannot load library_path"):
        synthesize_espeak("hello", "en", library_path=str(not_a_library))
    with pytest.raises(EspeakError, match=r"data_path=.*phontab"):
        synthesize_espeak("hello", "en", data_path=str(tmp_path))
    with pytest.raises(EspeakError, match="unknown variant 'nobody'"):
        synthesize_espeak("hello", "en-us+nobody")
    with pytest.raises(EspeakError, match="EE_NOT_FOUND"):
        synthesize_espeak("hello", "xx-nowhere")
    with pytest.raises(EspeakError, match="rate=10"):
        synthesize_espeak("hello", "en", rate=10)


# ---------------------------------------------------------------------------------------------------------------
# Speakers and signal processing
# ---------------------------------------------------------------------------------------------------------------


def test_speaker_roster_is_stable_and_varied():
    voices = dc.resolve_voices(["espeak"])
    assert {v.name for v in voices} == set(dc.ESPEAK_TALKERS) & set(espeak_variants())
    speakers = dc.build_speakers(voices, 3)
    assert len({s.id for s in speakers}) == len(speakers) >= 100
    assert dc.build_speakers(voices, 3) == speakers
    # a voice's speakers do not depend on which other voices are in the roster
    assert dc.build_speakers(voices[5:6], 3) == speakers[15:18]
    scales = [s.vtl_scale for s in speakers]
    assert all(s == 1.0 or 0.88 <= s <= 0.96 or 1.04 <= s <= 1.12 for s in scales)
    assert sum(s < 1 for s in scales) == sum(s > 1 for s in scales) == len(voices)
    for voice_index in range(len(voices)):  # one talker's speakers speak with distinct accents
        assert len({s.accent for s in speakers[3 * voice_index : 3 * voice_index + 3]}) == 3


def test_vocal_tract_scaling_shifts_frequencies_and_shortens():
    rate = 22050
    tone = np.sin(2 * np.pi * 1000 * np.arange(rate) / rate).astype(np.float32)  # 1 s at 1 kHz
    shifted = dc._to_16k(tone, rate, 1.1)
    assert abs(shifted.size - dc.SAMPLE_RATE / 1.1) <= 2
    spectrum = np.abs(np.fft.rfft(shifted * np.hanning(shifted.size)))
    peak_hz = np.argmax(spectrum) * dc.SAMPLE_RATE / shifted.size
    assert abs(peak_hz - 1100) < 5


def test_pink_noise_falls_three_db_per_octave():
    noise = dc._pink_noise(np.random.default_rng(0), 2**18)
    power = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(noise.size, 1 / dc.SAMPLE_RATE)
    band = lambda lo: power[(freqs >= lo) & (freqs < 2 * lo)].mean()  # noqa: E731
    drop_db = 10 * np.log10(band(500) / band(1000))
    assert 2.5 < drop_db < 3.5


def test_held_out_talkers_include_same_person_voices_of_other_engines():
    voices = [
        dc.BaseVoice("espeak", "m1", "m1"),
        dc.BaseVoice("flite", "slt", "slt"),
        dc.BaseVoice("festival", "us-slt-hts", "slt"),
        dc.BaseVoice("flite", "awb", "awb"),
    ]
    train, test = dc.split_voices(voices, ["flite:slt"])
    assert [v.id for v in test] == ["flite:slt", "festival:us-slt-hts"]
    assert [v.id for v in train] == ["espeak:m1", "flite:awb"]
    with pytest.raises(dc.DemoCorpusError, match="test_voices=.*espeak:nobody"):
        dc.split_voices(voices, ["espeak:nobody"])


# ---------------------------------------------------------------------------------------------------------------
# The corpus on disk
# ---------------------------------------------------------------------------------------------------------------


def test_corpus_files_are_16k_mono_pcm16_matching_the_manifests(corpus):
    folder, summary = corpus
    listed = set()
    for split in dc.SPLITS:
        rows = _manifest(folder, split)
        assert rows, f"{split} is empty"
        total = 0.0
        for row in rows:
            assert tuple(row) == dc.MANIFEST_KEYS
            assert TRANSCRIPT.fullmatch(row["text"])
            path = folder / row["audio_filepath"]
            assert not Path(row["audio_filepath"]).is_absolute() and path.is_file()
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "WAV", "PCM_16")
            assert info.frames / 16000 == pytest.approx(row["duration"], abs=1e-6)
            audio, _ = sf.read(path, dtype="float32")
            assert np.isfinite(audio).all() and 0.3 < np.abs(audio).max() <= 1.0
            assert 1.0 < row["duration"] < 20.0
            total += row["duration"]
            listed.add(path.name)
        # a split reaches its target and overshoots by less than its last utterance
        target = 60 * MINUTES * {"test": 0.25, "valid": 0.1, "finetune": 0.25, "pretrain": 0.4}[split]
        assert target <= total < target + rows[-1]["duration"]
        assert summary["splits"][split]["minutes"] == pytest.approx(total / 60, abs=1e-3)
        assert summary["splits"][split]["utterances"] == len(rows)
    assert {p.name for p in (folder / "audio").iterdir()} == listed  # nothing rendered past a cut is left
    assert summary["engines"] == ["espeak"] and summary["sample_rate"] == 16000
    assert summary["engine_minutes"]["espeak"] == pytest.approx(summary["total_minutes"], abs=2e-3)
    assert summary["params"]["seed"] == 0 and summary["wall_time_s"] > 0
    assert sum(summary["noise"].values()) > 0  # noise_fraction=0.5 reached some utterances


def test_test_talkers_never_appear_in_pretrain_or_finetune(corpus):
    folder, summary = corpus
    test_voices = {r["voice"] for r in _manifest(folder, "test")}
    train_rows = _manifest(folder, "pretrain") + _manifest(folder, "finetune")
    assert test_voices and test_voices <= set(summary["test_voices"])
    assert set(summary["test_voices"]) == {v for v in dc.DEFAULT_TEST_VOICES if v.startswith("espeak:")}
    assert not {r["voice"] for r in train_rows} & set(summary["test_voices"])
    assert not {r["speaker"] for r in train_rows} & {r["speaker"] for r in _manifest(folder, "test")}
    # pretrain and finetune are disjoint utterances
    assert not {r["audio_filepath"] for r in _manifest(folder, "pretrain")} & {
        r["audio_filepath"] for r in _manifest(folder, "finetune")
    }


def test_valid_talkers_are_held_out_apart_from_test_and_training(corpus):
    folder, summary = corpus
    valid_rows, test_rows = _manifest(folder, "valid"), _manifest(folder, "test")
    train_rows = _manifest(folder, "pretrain") + _manifest(folder, "finetune")
    assert valid_rows and {r["voice"] for r in valid_rows} <= set(summary["valid_voices"])
    assert set(summary["valid_voices"]) == {v for v in dc.DEFAULT_VALID_VOICES if v.startswith("espeak:")}
    assert not set(summary["valid_voices"]) & (set(summary["test_voices"]) | set(summary["train_voices"]))
    for other in (test_rows, train_rows):
        assert not {r["speaker"] for r in valid_rows} & {r["speaker"] for r in other}
    assert summary["splits"]["valid"]["utterances"] == len(valid_rows)


def test_valid_and_test_talkers_must_differ():
    voices = [
        dc.BaseVoice("espeak", "m1", "m1"),
        dc.BaseVoice("espeak", "m3", "m3"),
        dc.BaseVoice("flite", "slt", "slt"),
        dc.BaseVoice("festival", "us-slt-hts", "slt"),
    ]
    train, valid, test = dc.hold_out_voices(voices, ["flite:slt"], ["espeak:m3"])
    assert [v.id for v in (*train, *valid, *test)] == ["espeak:m1", "espeak:m3", "flite:slt", "festival:us-slt-hts"]
    assert [v.id for v in valid] == ["espeak:m3"]
    with pytest.raises(dc.DemoCorpusError, match=r"valid_voices=\['festival:us-slt-hts'\].*share a talker"):
        dc.hold_out_voices(voices, ["flite:slt"], ["festival:us-slt-hts"])
    # the defaults skip a validation voice that the caller chose for test
    assert "espeak:m3" not in [v.id for v in dc.hold_out_voices(voices, ["espeak:m3"], None)[1]]


def test_a_demo_corpus_made_before_the_valid_split_is_rebuilt_on_use(tmp_path, capsys):
    old = tmp_path / "old"
    summary = dc.make_demo_corpus(old, 0.3, seed=0, valid_fraction=0.0, progress=False, num_workers=2)
    assert "valid_fraction" not in summary["params"] and not (old / "valid.jsonl").exists()  # the old format
    dc.ensure_demo_corpus(old, minutes=0.3)
    assert "rebuilding it" in capsys.readouterr().out
    assert _manifest(old, "valid") and dc._read_summary(old)["params"]["valid_fraction"] == 0.1
    # ...with the README's LM text: grammar sentences, none inside a valid or test utterance
    lm_text = (old / "lm_text.txt").read_text().splitlines()
    assert len(lm_text) == dc.DEMO_LM_SENTENCES and all(lm_text)
    held = "\n".join(row["text"].lower() for split in ("valid", "test") for row in _manifest(old, split))
    assert not [sentence for sentence in lm_text if sentence in held]
    # a corpus made there with other parameters is still refused, naming them
    other = tmp_path / "other"
    dc.make_demo_corpus(other, 0.3, seed=0, engines=["espeak"], valid_fraction=0.0, progress=False, num_workers=2)
    with pytest.raises(dc.DemoCorpusError, match=r"different parameters \['engines', 'valid_fraction'\]"):
        dc.ensure_demo_corpus(other, minutes=0.3)


def test_many_speakers_even_in_a_small_corpus(corpus):
    folder, summary = corpus
    rows = [r for s in dc.SPLITS for r in _manifest(folder, s)]
    speakers = {r["speaker"] for r in rows}
    assert summary["num_speakers"] == len(speakers) == len(summary["speaker_params"])
    assert set(summary["speaker_params"]) == speakers
    assert len(speakers) >= 0.7 * len(rows)  # drawn from ~100 speakers, few repeats
    assert len({r["voice"] for r in rows}) >= 0.5 * len(rows)


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(corpus, tmp_path):
    folder, _ = corpus
    dc.make_demo_corpus(tmp_path / "again", MINUTES, seed=0, num_workers=1, **COMMON)
    assert _fingerprint(tmp_path / "again") == _fingerprint(folder)
    dc.make_demo_corpus(tmp_path / "other", MINUTES, seed=1, num_workers=2, **COMMON)
    other = _fingerprint(tmp_path / "other")
    assert other["pretrain.jsonl"] != _fingerprint(folder)["pretrain.jsonl"]
    assert _manifest(tmp_path / "other", "pretrain")[0]["text"] != _manifest(folder, "pretrain")[0]["text"]


def test_reuse_refuse_overwrite_and_resume(tmp_path):
    folder = tmp_path / "c"
    first = dc.make_demo_corpus(folder, 0.3, seed=2, engines=["espeak"], progress=False, num_workers=1)
    stamp = {p.name: p.stat().st_mtime_ns for p in (folder / "audio").iterdir()}
    # same parameters: returned as is, nothing rewritten
    assert dc.make_demo_corpus(folder, 0.3, seed=2, engines=["espeak"], progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "audio").iterdir()} == stamp
    # other parameters: refused with the differing field named, unless overwrite
    with pytest.raises(dc.DemoCorpusError, match=r"different parameters \['seed'\].*overwrite=True"):
        dc.make_demo_corpus(folder, 0.3, seed=3, engines=["espeak"], progress=False)
    third = dc.make_demo_corpus(folder, 0.3, seed=3, engines=["espeak"], progress=False, overwrite=True)
    assert third["params"]["seed"] == 3
    # an incomplete corpus (a file lost, or a run killed before summary.json) is rebuilt
    lost = folder / _manifest(folder, "pretrain")[0]["audio_filepath"]
    lost.unlink()
    dc.make_demo_corpus(folder, 0.3, seed=3, engines=["espeak"], progress=False)
    assert lost.is_file()
    (folder / "summary.json").unlink()
    dc.make_demo_corpus(folder, 0.3, seed=3, engines=["espeak"], progress=False)
    assert (folder / "summary.json").is_file()
    # a folder with someone else's audio/ is never deleted without overwrite
    foreign = tmp_path / "foreign"
    (foreign / "audio").mkdir(parents=True)
    (foreign / "audio" / "mine.wav").write_bytes(b"")
    with pytest.raises(dc.DemoCorpusError, match="did not write"):
        dc.make_demo_corpus(foreign, 0.3, engines=["espeak"], progress=False)


def test_corpus_reports_an_unloadable_espeak(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_SSL_SPEECH_ESPEAK_LIBRARY", str(tmp_path / "missing" / "libespeak-ng.so"))
    with pytest.raises(EspeakError, match=r"missing.*pip install espeakng-loader"):
        dc.make_demo_corpus(tmp_path / "c", 0.2, engines=["espeak"], progress=False)
    assert not (tmp_path / "c" / "audio").exists()  # nothing was started
    assert dc.main(["--out", str(tmp_path / "c"), "--minutes", "0.2", "--no-progress"]) == 2
    assert "espeakng-loader" in capsys.readouterr().err


def test_bad_arguments_are_named():
    with pytest.raises(dc.DemoCorpusError, match="minutes=0"):
        dc.make_demo_corpus("unused", 0)
    with pytest.raises(dc.DemoCorpusError, match="test_fraction=0.6"):
        dc.make_demo_corpus("unused", 1, finetune_fraction=0.5, test_fraction=0.6)
    with pytest.raises(dc.DemoCorpusError, match="noise_types"):
        dc.make_demo_corpus("unused", 1, noise_fraction=0.5, noise_types=["traffic"])
    with pytest.raises(dc.DemoCorpusError, match="unknown engine"):
        dc.resolve_voices(["mbrola"])


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--minutes", "0.3", "--engines", "espeak", "--no-progress", "--workers", "1"]
    assert dc.main(argv + ["--test-voices", "espeak:m1", "espeak:f1"]) == 0
    assert "speakers" in capsys.readouterr().out
    assert {r["voice"] for r in _manifest(out, "test")} <= {"espeak:m1", "espeak:f1"}
    assert dc.main(argv + ["--test-voices", "espeak:nobody", "--overwrite"]) == 2
    assert "espeak:nobody" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("flite") is None, reason="flite not installed: run `sudo bash scripts/setup_voices.sh` (Debian voices)"
)
def test_recorded_voices_join_when_installed(tmp_path):
    summary = dc.make_demo_corpus(
        tmp_path / "rec",
        1.0,
        engines=["espeak", "flite"],
        voices=["espeak:m1", "espeak:f3", "flite:slt", "flite:rms"],
        test_voices=["flite:rms"],
        valid_fraction=0.0,  # none of the default validation voices is among these four
        recorded_share=1.0,
        progress=False,
        num_workers=2,
    )
    assert summary["engines"] == ["espeak", "flite"]
    assert summary["test_voices"] == ["flite:rms"]
    rows = _manifest(tmp_path / "rec", "pretrain") + _manifest(tmp_path / "rec", "finetune")
    assert {r["voice"] for r in rows} == {"flite:slt"}  # recorded_share=1: only the recorded training voice
    assert {r["voice"] for r in _manifest(tmp_path / "rec", "test")} == {"flite:rms"}
    assert summary["engine_minutes"]["espeak"] == 0 and summary["engine_minutes"]["flite"] >= 1.0


@pytest.mark.parametrize("engine", ["flite", "festival", "pico"])
def test_every_installed_recorded_voice_speaks(engine):
    """Each voice of an installed engine (scripts/setup_voices.sh) renders a sentence: 16 kHz speech, not silence."""
    voices = [v for v in dc.resolve_voices("auto") if v.engine == engine]
    if not voices:
        pytest.skip(f"no {engine} voice installed: run `sudo bash scripts/setup_voices.sh` (Debian voices)")
    for speaker in dc.build_speakers(voices, 1):
        audio = dc._render_speech(speaker, "the quick brown fox jumps", 1.0, None, seed=0)
        assert audio.dtype == np.float32 and 0.8 < len(audio) / dc.SAMPLE_RATE < 5.0, speaker.id
        assert np.sqrt(np.mean(audio**2)) > 0.01, f"{speaker.id} rendered (near) silence"
