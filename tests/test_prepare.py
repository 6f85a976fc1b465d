"""Corpus preparation on small trees in the corpora's exact layouts, with real audio files written here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hf_ssl_speech.data import ManifestSource, TarShardSource, build_dataloader
from hf_ssl_speech.data.prepare import parse_an4_transcription, segments_from_vad

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clip(path: Path, seconds: float, rate: int = 16000, seed: int = 0, **kwargs) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    audio = 0.3 * np.sin(2 * np.pi * (150 + 20 * seed) * t) + 0.02 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), rate, **kwargs)
    return path


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def loader_ids(manifest_or_tar) -> list[str]:
    loader = build_dataloader(
        manifest_or_tar, batch_seconds=10.0, num_workers=0, return_waveforms=True, return_ids=True, min_duration=0.1
    )
    return sorted(i for batch in loader for i in batch["ids"])


def test_librispeech(tmp_path):
    split = tmp_path / "LibriSpeech" / "dev-clean"
    lines = {}
    for speaker, chapter, count in (("84", "121123", 3), ("174", "50561", 2)):
        folder = split / speaker / chapter
        for utt in range(count):
            uid = f"{speaker}-{chapter}-{utt:04d}"
            clip(folder / f"{uid}.flac", 0.5 + 0.25 * utt, seed=utt)
            lines.setdefault(folder / f"{speaker}-{chapter}.trans.txt", []).append(f"{uid} HELLO WORLD {utt}")
    lines[split / "84" / "121123" / "84-121123.trans.txt"].append("84-121123-0009 LISTED BUT NOT THERE")
    for path, text in lines.items():
        path.write_text("\n".join(text) + "\n")
    out = tmp_path / "dev_clean.jsonl"
    prepare = load_script("prepare_corpus")
    assert prepare.main(["librispeech", str(split), "--out", str(out), "--shards", "2", "--no-progress"]) == 0
    rows = read_manifest(out)
    assert len(rows) == 5
    by_id = {row["id"]: row for row in rows}
    assert by_id["84-121123-0002"]["text"] == "hello world 2" and by_id["84-121123-0002"]["speaker"] == "84"
    assert by_id["84-121123-0002"]["duration"] == pytest.approx(1.0)
    # Audio under the manifest's folder is stored relative to it, so the folder can move.
    assert rows[0]["audio_filepath"].startswith("LibriSpeech/dev-clean/")
    # The manifest and the shards feed the data pipeline; the shards keep the text.
    assert loader_ids(out) == sorted(by_id)  # the manifest's `id` (the utterance id) names the example
    shards = TarShardSource(str(tmp_path / "dev_clean_shards" / "*.tar"))
    assert sorted(shards.raw(i).id for i in range(len(shards))) == sorted(by_id)
    assert {shards.raw(i).text for i in range(len(shards))} == {row["text"] for row in rows}
    assert loader_ids(shards) == sorted(by_id)


def test_librispeech_reports_missing_audio(tmp_path):
    from hf_ssl_speech.data.prepare import prepare_librispeech

    folder = tmp_path / "train" / "1" / "2"
    clip(folder / "1-2-0000.flac", 0.5)
    (folder / "1-2.trans.txt").write_text("1-2-0000 A\n1-2-0001 B\n")
    rows, bad = prepare_librispeech(tmp_path / "train", progress=False)
    assert [row["id"] for row in rows] == ["1-2-0000"]
    assert len(bad) == 1 and bad[0][0].endswith("1-2-0001.flac") and bad[0][1].startswith("missing")


def test_segments_from_vad():
    segments = segments_from_vad([[0.5, 3.0], [3.2, 7.5], [8.0, 20.0], [21.0, 21.3]], max_segment=5.0, min_segment=1.0)
    assert segments[0] == (0.5, 2.5)  # [3.2, 7.5] would make the span 7 s > 5 s
    assert segments[1] == (3.2, 4.3)
    assert all(duration <= 5.0 for _, duration in segments)
    assert sum(d for o, d in segments if o >= 8.0) == pytest.approx(12.0)  # the 12 s stretch is cut in 3 pieces
    assert all(o < 21.0 for o, _ in segments)  # the 0.3 s stretch is below min_segment
    assert segments_from_vad([[0.0, 1.0], [1.5, 2.5]], max_segment=5.0) == [(0.0, 2.5)]


def test_librilight_segments_and_whole_files(tmp_path):
    root = tmp_path / "librilight" / "small"
    clip(root / "100" / "book_a" / "chapter_1.flac", 12.0)
    vad = {"speaker": "100", "snr": 12.0, "voice_activity": [[0.5, 3.0], [3.2, 7.5], [8.0, 11.9]]}
    (root / "100" / "book_a" / "chapter_1.json").write_text(json.dumps(vad))
    clip(root / "200" / "book_b" / "chapter_9.flac", 2.0, seed=1)  # no json: one whole-file row
    out = tmp_path / "ll.jsonl"
    assert (
        load_script("prepare_corpus").main(
            ["librilight", str(root), "--out", str(out), "--max-segment", "5", "--no-progress"]
        )
        == 0
    )
    rows = read_manifest(out)
    segments = [row for row in rows if "offset" in row]
    assert [(r["offset"], r["duration"]) for r in segments] == [(0.5, 2.5), (3.2, 4.3), (8.0, 3.9)]
    whole = [row for row in rows if "offset" not in row]
    assert len(whole) == 1 and whole[0]["duration"] == pytest.approx(2.0) and whole[0]["speaker"] == "200"
    assert all("text" not in row for row in rows)  # unlabelled
    # The pipeline reads exactly the segments: total decoded seconds = sum of the segment durations.
    loader = build_dataloader(out, batch_seconds=10.0, num_workers=0, return_waveforms=True, min_duration=0.1)
    assert sum(batch["audio_seconds"] for batch in loader) == pytest.approx(2.5 + 4.3 + 3.9 + 2.0, abs=1e-3)


def test_commonvoice(tmp_path):
    root = tmp_path / "cv-corpus" / "eo"
    mp3 = "MP3" in sf.available_formats()
    try:
        if mp3:
            clip(root / "clips" / "probe.mp3", 0.5, format="MP3", subtype="MPEG_LAYER_III")
    except sf.LibsndfileError:
        mp3 = False  # readable but not writable here: use FLAC in an .mp3-free tree (noted in the report)
    ext = "mp3" if mp3 else "flac"
    kwargs = {"format": "MP3", "subtype": "MPEG_LAYER_III"} if mp3 else {}
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment"
    sentences = ['Ĉu vi parolas "Esperanton"?', "Saluton, mondo.", "Ĝis revido."]
    table = [header]
    for index, sentence in enumerate(sentences):
        name = f"common_voice_eo_{index:08d}.{ext}"
        clip(root / "clips" / name, 1.0 + index * 0.5, rate=48000, seed=index, **kwargs)
        table.append(f"client{index % 2}\t{name}\t{sentence}\t2\t0\t\t\t\teo\t")
    table.append(f"client9\tcommon_voice_eo_99999999.{ext}\tmissing clip\t2\t0\t\t\t\teo\t")
    (root / "train.tsv").write_text("\n".join(table) + "\n")
    out = tmp_path / "cv.jsonl"
    prepare = load_script("prepare_corpus")
    assert prepare.main(["commonvoice", str(root), "--split", "train", "--out", str(out), "--no-progress"]) == 0
    rows = read_manifest(out)
    assert [row["text"] for row in rows] == sentences  # quotes kept (the tsv is not quoted)
    assert [row["speaker"] for row in rows] == ["client0", "client1", "client0"]
    for index, row in enumerate(rows):
        assert abs(row["duration"] - (1.0 + index * 0.5)) < 0.1  # MP3 adds encoder delay / padding
    assert len(loader_ids(out)) == 3
    # Re-encoding to FLAC keeps the rows and makes FLAC files.
    flac_out = tmp_path / "cv_flac.jsonl"
    argv = ["commonvoice", str(root), "--out", str(flac_out), "--convert-to", "flac", "--no-progress"]
    assert prepare.main(argv) == 0
    converted = read_manifest(flac_out)
    assert len(converted) == 3 and all(row["audio_filepath"].endswith(".flac") for row in converted)
    assert sf.info(tmp_path / converted[0]["audio_filepath"]).format == "FLAC"


def test_an4_sphere_to_wav(tmp_path):
    # every libsndfile build reads NIST SPHERE (soundfile's wheels bundle one): without it the install is broken
    assert "NIST" in sf.available_formats(), "this libsndfile has no NIST SPHERE support: reinstall soundfile (pip)"
    an4 = tmp_path / "an4"
    entries = [("fash", "an251", "b", "YES"), ("fash", "an253", "b", "GO"), ("mblw", "cen7", "b", "ERASE T M O")]
    lines = []
    for speaker, utt, suffix, text in entries:
        clip(
            an4 / "wav" / "an4_clstk" / speaker / f"{utt}-{speaker}-{suffix}.sph", 0.8, format="NIST", subtype="PCM_16"
        )
        lines.append(f"<s> {text} </s> ({speaker}-{utt}-{suffix})")
    lines.append("<s> NO FILE </s> (fash-an999-b)")
    lines.append("garbage line")
    (an4 / "etc").mkdir(parents=True)
    (an4 / "etc" / "an4_train.transcription").write_text("\n".join(lines) + "\n")
    assert parse_an4_transcription("<s> RUBOUT G M E F </s> (fash-an251-b)") == ("fash-an251-b", "RUBOUT G M E F")
    out = tmp_path / "an4_train.jsonl"
    from hf_ssl_speech.data.prepare import prepare_an4

    rows, bad = prepare_an4(an4, "train", progress=False)
    assert [row["text"] for row in rows] == ["yes", "go", "erase t m o"]
    assert [row["speaker"] for row in rows] == ["fash", "fash", "mblw"]
    assert all(sf.info(row["audio_filepath"]).format == "WAV" for row in rows)
    assert {reason.split(":")[0] for _, reason in bad} == {"missing", "malformed"}
    assert load_script("prepare_corpus").main(["an4", str(an4), "--out", str(out), "--no-progress"]) == 0
    assert len(ManifestSource(out)) == 3 and len(loader_ids(out)) == 3


def test_make_manifest_cli_lists_bad_files(tmp_path, capsys):
    audio = tmp_path / "audio"
    clip(audio / "a.wav", 1.0)
    clip(audio / "sub" / "b.flac", 0.5, rate=44100, seed=1)
    (audio / "sub" / "b.txt").write_text("bee\n")
    (audio / "broken.wav").write_bytes(b"RIFF not really")
    (audio / "empty.flac").write_bytes(b"")
    out = tmp_path / "m.jsonl"
    # In-process `main(argv)`: a subprocess would spend most of its time importing transformers.
    assert load_script("make_manifest").main([str(audio), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = {row["id"]: row for row in read_manifest(out)}
    assert set(rows) == {"a", "sub/b"}
    assert rows["sub/b"]["text"] == "bee" and rows["a"]["duration"] == pytest.approx(1.0)
    assert "2 file(s) left out" in printed
    assert "broken.wav: unreadable" in printed and "empty.flac: empty" in printed
