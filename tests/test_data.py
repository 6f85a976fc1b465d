"""Data pipeline on real audio files written here: decoding, bad input, sources, plan, collator, resume."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from hf_ssl_speech.data import (
    BadExampleCounter,
    DataConfig,
    DatasetSource,
    ManifestSource,
    SpeechCollator,
    StreamingDatasetSource,
    TarShardSource,
    TooManyBadExamplesError,
    build_dataloader,
    decode_example,
    plan_epoch,
)
from hf_ssl_speech.data.audio_io import AudioError, load_audio


def tone(seconds: float, sampling_rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A 220 Hz tone plus a little noise, (samples,) or (samples, channels) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(len(t))
    if channels == 1:
        return mono.astype(np.float32)
    return np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)


def write_corpus(folder: Path, count: int, seconds=(0.6, 2.0), name="u", seed=0, fmt="flac") -> list[dict]:
    """`count` real clips of random length in `folder`, as manifest rows (paths relative to `folder.parent`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        duration = float(rng.uniform(*seconds))
        rate = (16000, 8000, 44100, 48000)[index % 4]
        path = folder / f"{name}{index:03d}.{fmt}"
        sf.write(path, tone(duration, rate, seed=index), rate)
        rows.append({"audio_filepath": f"{folder.name}/{path.name}", "duration": duration, "text": f"utt {index}"})
    return rows


def write_manifest(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def collect(loader) -> list[str]:
    return [example_id for batch in loader for example_id in batch["ids"]]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    rows = write_corpus(tmp_path / "audio", 24)
    return write_manifest(tmp_path / "train.jsonl", rows), [f"audio/u{i:03d}" for i in range(24)]


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_load_audio_formats_rates_channels(tmp_path, fmt, rate, channels):
    audio = tone(0.5, rate, channels)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, audio, rate, format=fmt)
    out, crop_start = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1 and crop_start == 0.0
    assert abs(len(out) - 8000) <= 2  # 0.5 s at 16 kHz
    # The 220 Hz tone survives decode, mix-down and resampling: its spectral peak is still at 220 Hz.
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 220) < 5
    expected_rms = 0.3 / np.sqrt(2) * (1 if channels == 1 else 0.9)  # stereo: mean of gains 1.0 and 0.8
    assert abs(np.sqrt(np.mean(out**2)) - expected_rms) < 0.03


def test_load_audio_offset_duration_and_seeded_crop(tmp_path):
    rate = 16000
    ramp = np.linspace(-0.5, 0.5, 3 * rate, dtype=np.float32)  # value tells the position
    path = tmp_path / "ramp.wav"
    sf.write(path, ramp, rate, subtype="FLOAT")
    out, _ = load_audio(path, offset=1.0, duration=0.5)
    np.testing.assert_allclose(out, ramp[rate : rate + rate // 2], atol=1e-6)
    crops = [load_audio(path, max_duration=1.0, crop=True, rng=np.random.default_rng(s)) for s in range(6)]
    for audio, start in crops:
        assert len(audio) == rate
        assert round(start * 100) == pytest.approx(start * 100)  # starts on a 10 ms frame
        np.testing.assert_allclose(audio, ramp[round(start * rate) : round(start * rate) + rate], atol=1e-6)
    assert len({start for _, start in crops}) > 1  # different seeds, different windows
    again, start0 = load_audio(path, max_duration=1.0, crop=True, rng=np.random.default_rng(0))
    assert start0 == crops[0][1]
    with pytest.raises(AudioError) as error:
        load_audio(path, max_duration=1.0, crop=False)
    assert error.value.reason == "too_long"


def test_mp3_and_nist_sphere_when_libsndfile_has_them(tmp_path):
    formats = sf.available_formats()
    checked = 0
    for fmt, subtype, ext in (("MP3", "MPEG_LAYER_III", "mp3"), ("NIST", "PCM_16", "sph")):
        if fmt not in formats:
            continue
        path = tmp_path / f"x.{ext}"
        try:
            sf.write(path, tone(1.0, 16000), 16000, format=fmt, subtype=subtype)
        except sf.LibsndfileError:
            continue  # readable but not writable in this libsndfile build
        audio, _ = load_audio(path)
        assert abs(len(audio) - 16000) < 1200 and np.isfinite(audio).all()
        checked += 1
    # soundfile is a declared dependency and its wheels bundle a libsndfile (>= 1.1) that writes both: a build
    # that writes neither is a broken install, which fails here rather than skipping.
    assert checked, "this libsndfile writes neither MP3 nor NIST SPHERE: reinstall soundfile (pip, bundled libsndfile)"


def make_bad_files(folder: Path) -> dict[str, str]:
    """Each kind of bad input the pipeline must survive → the reason it must be counted under."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "template.flac"
    sf.write(good, tone(1.0, 16000), 16000)
    blob = good.read_bytes()
    (folder / "corrupt_header.flac").write_bytes(b"\0" * 64 + blob[64:])
    (folder / "truncated.flac").write_bytes(blob[: len(blob) // 2])
    wav = folder / "template.wav"
    sf.write(wav, tone(1.0, 16000), 16000)
    (folder / "truncated.wav").write_bytes(wav.read_bytes()[:16000])
    (folder / "zero_length.wav").write_bytes(b"")
    nan = np.full(16000, np.nan, dtype=np.float32)
    sf.write(folder / "all_nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(folder / "one_sample.wav", np.array([0.5], dtype=np.float32), 16000)
    sf.write(folder / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    (folder / "a_directory.wav").mkdir()
    good.unlink()
    wav.unlink()
    return {
        "corrupt_header.flac": "unreadable",
        "truncated.flac": "truncated",
        "truncated.wav": "truncated",
        "zero_length.wav": "empty",
        "all_nan.wav": "non_finite",
        "one_sample.wav": "too_short",
        "silent.wav": "silent",
        "a_directory.wav": "not_a_file",
        "missing.wav": "missing",
    }


def test_each_bad_file_gets_its_reason(tmp_path):
    for name, reason in make_bad_files(tmp_path).items():
        with pytest.raises(AudioError) as error:
            load_audio(tmp_path / name, min_duration=0.1)
        assert error.value.reason == reason, name
        assert name in error.value.where


def test_stream_yields_exactly_the_good_examples_and_counts_the_bad(tmp_path, caplog):
    good_rows = write_corpus(tmp_path / "audio", 10)
    expected = make_bad_files(tmp_path / "bad")
    # Durations in the manifest are plausible lies, so every bad file reaches the decoder.
    bad_rows = [{"audio_filepath": f"bad/{name}", "duration": 1.0} for name in expected]
    rows = good_rows[:5] + bad_rows + good_rows[5:]
    manifest = write_manifest(tmp_path / "mixed.jsonl", rows)
    caplog.set_level(logging.WARNING, logger="hf_ssl_speech.data")
    loader = build_dataloader(
        manifest,
        batch_seconds=4.0,
        num_workers=0,
        return_waveforms=True,
        return_ids=True,
        max_bad_fraction=1.0,
        min_duration=0.1,
    )
    ids = collect(loader)
    assert sorted(ids) == sorted(f"audio/u{i:03d}" for i in range(10))
    counter = loader.counter
    assert counter.good == 10 and counter.total_bad == len(expected)
    reasons = {reason: count for reason, count in counter.bad.items()}
    assert reasons == {reason: list(expected.values()).count(reason) for reason in set(expected.values())}
    for name, reason in expected.items():
        assert any(name in where for where in counter.names[reason]), (name, counter.names)
        assert name in caplog.text
    assert "truncated" in counter.summary() and "a_directory.wav" in counter.summary()


def test_malformed_manifest_lines_name_file_and_line(tmp_path):
    rows = write_corpus(tmp_path / "audio", 3)
    lines = [
        rows[0],
        "{not json",
        {"duration": 1.0, "text": "no path"},
        {"audio_filepath": 7, "duration": 1.0},
        {"audio_filepath": "audio/u001.flac", "duration": "long"},
        {"audio_filepath": "audio/u001.flac", "duration": 1.0, "text": ["a", "list"]},
        "",
        rows[2],
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    source = ManifestSource(manifest)
    assert len(source) == 2
    where = {w.rsplit(":", 1)[-1]: (reason, detail) for reason, w, detail in source.problems}
    assert set(where) == {"2", "3", "4", "5", "6"}
    assert all(reason == "malformed" for reason, _ in where.values())
    assert "audio_filepath" in where["3"][1] and "audio_filepath" in where["4"][1]
    assert "duration" in where["5"][1] and "text" in where["6"][1]
    # The JSON parser's own "line 1" would contradict the manifest line number given in `where`.
    assert "column" in where["2"][1] and "line 1" not in where["2"][1]
    assert all(str(manifest) in w for _, w, _ in source.problems)


def test_too_many_bad_examples_stops_the_run(tmp_path):
    good = write_corpus(tmp_path / "audio", 4)
    bad = [{"audio_filepath": f"audio/gone{i}.wav", "duration": 1.0} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.jsonl", good + bad)
    loader = build_dataloader(
        manifest,
        batch_seconds=2.0,
        num_workers=0,
        return_waveforms=True,
        max_bad_fraction=0.25,
        min_examples_before_check=4,
        shuffle=False,
    )
    with pytest.raises(TooManyBadExamplesError, match=r"max_bad_fraction=0.25[\s\S]*missing"):
        list(loader)
    # Malformed lines are checked when the loader is built.
    write_manifest(tmp_path / "broken.jsonl", good[:1] + ["{"] * 3)
    with pytest.raises(TooManyBadExamplesError, match="malformed"):
        build_dataloader(tmp_path / "broken.jsonl", num_workers=0, return_waveforms=True)


def test_counter_rate_limits_logging_and_merges(caplog):
    caplog.set_level(logging.WARNING, logger="hf_ssl_speech.data")
    counter = BadExampleCounter(log_first=3, log_interval=3600)
    for index in range(50):
        counter.add_bad("missing", f"f{index}.wav")
    assert counter.total_bad == 50
    assert len(caplog.records) == 3  # the rest waits for the next summary line
    merged = BadExampleCounter.merge([counter.state_dict(), {"good": 5, "bad": {"silent": 2}, "names": {}}])
    assert merged["good"] == 5 and merged["bad"] == {"missing": 50, "silent": 2}


# ------------------------------------------------------------------------------------------------ sources


def test_manifest_fields_offset_relative_paths_and_frame_labels(tmp_path):
    rate = 16000
    sf.write(tmp_path / "long.wav", tone(3.0, rate), rate)
    np.save(tmp_path / "labels.npy", np.arange(300, dtype=np.int64))
    rows = [
        {"audio_filepath": "long.wav", "duration": 1.0, "offset": 1.0, "speaker": 7, "frame_labels": "labels.npy"},
        {
            "audio_filepath": str(tmp_path / "long.wav"),
            "duration": 3.0,
            "id": "whole",
            "frame_labels": list(range(300)),
        },
    ]
    source = ManifestSource(write_manifest(tmp_path / "m.jsonl", rows))
    first, second = source.raw(0), source.raw(1)
    assert first.audio == str(tmp_path / "long.wav") and first.offset == 1.0 and first.duration == 1.0
    assert first.id == "long@1.000" and first.speaker == "7"
    assert second.duration is None and second.id == "whole"  # no offset: NeMo reads the whole file
    np.testing.assert_allclose(source.durations, [1.0, 3.0])
    # Frame labels follow the random crop (one label per 10 ms frame).
    config = DataConfig(max_duration=1.0, crop_long=True)
    example = decode_example(second, config, np.random.default_rng(3))
    assert example["duration"] == 1.0 and len(example["frame_labels"]) == 100
    start = example["frame_labels"][0]
    np.testing.assert_array_equal(example["frame_labels"], np.arange(start, start + 100))
    assert start > 0  # seed 3 does not pick the first window


def test_tar_shards_and_datasets_builders_give_the_same_examples(tmp_path):
    rows = write_corpus(tmp_path / "audio", 8)
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    ids = [f"audio/u{i:03d}" for i in range(8)]
    # Webdataset layout: key.flac + key.json (half) or key.txt (other half), in 2 shards.
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as archive:
            for index in range(shard * 4, shard * 4 + 4):
                key = f"audio/u{index:03d}"
                archive.add(tmp_path / rows[index]["audio_filepath"], arcname=f"{key}.flac")
                meta = json.dumps({"text": rows[index]["text"]}) if index % 2 else rows[index]["text"]
                info = tarfile.TarInfo(f"{key}.{'json' if index % 2 else 'txt'}")
                info.size = len(meta.encode())
                archive.addfile(info, fileobj=io.BytesIO(meta.encode()))
    tar = TarShardSource(str(tmp_path / "shard-*.tar"))
    assert len(tar) == 8 and not tar.problems
    assert sorted(tar.raw(i).id for i in range(8)) == ids
    assert {tar.raw(i).text for i in range(8)} == {row["text"] for row in rows}
    import datasets

    json_dataset = datasets.load_dataset("json", data_files=str(manifest), split="train")
    csv_path = tmp_path / "m.csv"
    json_dataset.to_csv(csv_path)
    csv_dataset = datasets.load_dataset("csv", data_files=str(csv_path), split="train")
    with_bytes = json_dataset.map(
        lambda row: {"audio": {"bytes": (tmp_path / row["audio_filepath"]).read_bytes(), "path": row["audio_filepath"]}}
    )
    parquet_path = tmp_path / "m.parquet"
    with_bytes.to_parquet(parquet_path)
    parquet_dataset = datasets.load_dataset("parquet", data_files=str(parquet_path), split="train")
    sources = {
        "manifest": ManifestSource(manifest),
        "tar": tar,
        "json": DatasetSource(json_dataset, base_dir=str(tmp_path)),
        "csv": DatasetSource(csv_dataset, base_dir=str(tmp_path)),
        "parquet-bytes": DatasetSource(parquet_dataset, audio_column="audio"),
    }
    reference = None
    for name, source in sources.items():
        loader = build_dataloader(source, batch_seconds=3.0, num_workers=0, return_waveforms=True, return_ids=True)
        seconds = sum(batch["audio_seconds"] for batch in loader)
        assert loader.counter.good == 8 and loader.counter.total_bad == 0, name
        reference = reference or seconds
        assert seconds == pytest.approx(reference, abs=1e-3), name
    # Streaming: the same rows, exactly once per pass of each part, from an IterableDataset.
    streaming = datasets.load_dataset("json", data_files=str(manifest), split="train", streaming=True)
    loader = build_dataloader(
        StreamingDatasetSource(streaming, base_dir=str(tmp_path)),
        batch_seconds=3.0,
        num_workers=0,
        return_waveforms=True,
        return_ids=True,
        bucket_window=8,
    )
    seen: list[str] = []
    for batch in loader:
        seen += batch["ids"]
        if len(seen) >= 8:
            break
    assert sorted(seen) == sorted(Path(r["audio_filepath"]).with_suffix("").name for r in rows)


# ------------------------------------------------------------------------------------------------ plan


def test_plan_covers_every_row_once_with_equal_batches_per_rank():
    rng = np.random.default_rng(0)
    durations = rng.uniform(0.2, 25.0, size=503).astype(np.float32)
    config = DataConfig(batch_seconds=40.0, min_duration=0.5, max_duration=20.0, bucket_window=64)
    plan = plan_epoch(durations, [0, 300, 503], [1.0, 1.0], config, seed=1, epoch=0, world_size=3)
    rows = np.concatenate(plan.batches)
    filtered = {g for g, _ in plan.filtered}
    assert filtered == set(np.flatnonzero(durations < 0.5).tolist())
    assert sorted(rows.tolist()) == sorted(set(range(503)) - filtered)  # exactly once
    assert len(plan.batches) % 3 == 0
    effective = np.minimum(durations, 20.0)
    for batch in plan.batches:
        assert len(batch) == 1 or len(batch) * effective[batch].max() <= 40.0 + 1e-4
    other = plan_epoch(durations, [0, 300, 503], [1.0, 1.0], config, seed=1, epoch=1, world_size=3)
    assert [b.tolist() for b in other.batches] != [b.tolist() for b in plan.batches]  # new epoch, new order
    same = plan_epoch(durations, [0, 300, 503], [1.0, 1.0], config, seed=1, epoch=0, world_size=3)
    assert [b.tolist() for b in same.batches] == [b.tolist() for b in plan.batches]  # pure
    # Weights: source 0 twice per epoch, source 1 a random half.
    weighted = plan_epoch(durations, [0, 300, 503], [2.0, 0.5], config, seed=1, epoch=0, world_size=1)
    counts = np.bincount(np.concatenate(weighted.batches), minlength=503)
    kept = np.ones(503, bool)
    kept[list(filtered)] = False
    assert set(counts[:300][kept[:300]].tolist()) == {2}
    assert set(counts[300:][kept[300:]].tolist()) <= {0, 1}
    assert counts[300:].sum() == round(0.5 * kept[300:].sum())


# ------------------------------------------------------------------------------------------------ collator


def test_collator_features_and_waveforms_agree():
    from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor

    extractor = ConformerSslFeatureExtractor()
    examples = [
        {"id": "a", "audio": tone(1.0, 16000), "sampling_rate": 16000, "text": "ab", "frame_labels": np.arange(100)},
        {
            "id": "b",
            "audio": tone(0.55, 16000, seed=1),
            "sampling_rate": 16000,
            "text": "b",
            "frame_labels": np.arange(55),
        },
    ]
    features = SpeechCollator(extractor, text_to_ids=lambda text: [ord(c) - 96 for c in text], return_ids=True)(
        examples
    )
    assert features["input_features"].shape == (2, 100, 80)
    assert features["attention_mask"].dtype == torch.long
    assert features["attention_mask"].sum(1).tolist() == [100, 55]
    assert features["labels"].tolist() == [[1, 2], [2, -100]]
    assert features["frame_labels"][1, 54] == 54 and (features["frame_labels"][1, 55:] == -100).all()
    assert features["audio_seconds"] == pytest.approx(1.55) and features["ids"] == ["a", "b"]
    raw = SpeechCollator(return_waveforms=True)(examples)
    assert raw["waveforms"].shape == (2, 16000) and raw["waveform_lengths"].tolist() == [16000, 8800]
    assert (raw["waveforms"][1, 8800:] == 0).all()
    assert raw["frame_labels"].shape == (2, 100)
    on_device, lengths = extractor.extract_batch(raw["waveforms"], raw["waveform_lengths"])
    torch.testing.assert_close(on_device, features["input_features"], atol=1e-4, rtol=1e-4)
    assert lengths.tolist() == [100, 55]


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_next_unseen_batch(corpus, num_workers):
    manifest, all_ids = corpus
    kwargs = dict(batch_seconds=3.0, num_workers=num_workers, return_waveforms=True, return_ids=True, seed=5)
    uninterrupted = [batch["ids"] for batch in build_dataloader(manifest, **kwargs)]
    assert sorted(i for ids in uninterrupted for i in ids) == sorted(all_ids)
    first = build_dataloader(manifest, **kwargs)
    seen = []
    for step, batch in enumerate(first):
        seen.append(batch["ids"])
        if step == 2:
            break
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["position"] == 3
    resumed = build_dataloader(manifest, **kwargs)
    resumed.load_state_dict(state)
    seen += [batch["ids"] for batch in resumed]
    assert seen == uninterrupted  # same batches, same order, nothing repeated or lost
    assert resumed.state_dict()["epoch"] == 1 and resumed.counter.good == len(all_ids)
    with pytest.raises(ValueError, match="world_size"):
        build_dataloader(manifest, **{**kwargs, "world_size": 2}).load_state_dict(state)


def test_weighted_sources_dict_specs_and_audio_feature_column(tmp_path):
    import datasets
    from datasets import Audio

    first = write_manifest(tmp_path / "a.jsonl", write_corpus(tmp_path / "a", 4, name="a"))
    second = write_manifest(tmp_path / "b.jsonl", write_corpus(tmp_path / "b", 6, name="b", seed=1))
    specs = [{"builder": "json", "data_files": str(first), "weight": 2.0}, {"manifest": str(second)}]
    loader = build_dataloader(specs, batch_seconds=4.0, num_workers=0, return_waveforms=True, return_ids=True)
    ids = collect(loader)
    # The json builder has no `id` column: ids are the file stems. Weight 2 → each of its rows twice.
    assert sorted(ids) == sorted([f"a{i:03d}" for i in range(4)] * 2 + [f"b/b{i:03d}" for i in range(6)])
    # An `Audio` column (decoding needs torchcodec) is read undecoded and decoded with soundfile.
    dataset = datasets.load_dataset("json", data_files=str(second), split="train")
    dataset = dataset.cast_column("audio_filepath", Audio())
    source = DatasetSource(dataset, base_dir=str(tmp_path))
    assert len(source) == 6 and not source.problems
    assert decode_example(source.raw(0), DataConfig())["audio"].dtype == np.float32


def test_batches_of_only_bad_examples_are_skipped_but_counted(tmp_path):
    good = write_corpus(tmp_path / "audio", 3)
    bad = [{"audio_filepath": f"audio/gone{i}.flac", "duration": 1.0} for i in range(3)]
    manifest = write_manifest(tmp_path / "m.jsonl", good + bad)
    # One clip per batch, so three batches hold nothing but a missing file.
    loader = build_dataloader(
        manifest,
        batch_seconds=1.0,
        max_batch_size=1,
        num_workers=2,
        return_waveforms=True,
        return_ids=True,
        max_bad_fraction=0.6,
        shuffle=False,
    )
    planned = len(loader)
    assert planned == 6
    assert sorted(collect(loader)) == [f"audio/u{i:03d}" for i in range(3)]
    assert loader.counter.bad == {"missing": 3} and loader.counter.good == 3
    assert loader.state_dict()["epoch"] == 1  # all six planned batches were consumed


def test_streaming_resume_with_two_workers(tmp_path):
    import datasets

    manifest = write_manifest(tmp_path / "m.jsonl", write_corpus(tmp_path / "audio", 12))
    kwargs = dict(batch_seconds=3.0, num_workers=2, return_waveforms=True, return_ids=True, bucket_window=4)

    def stream_loader():
        dataset = datasets.load_dataset("json", data_files=str(manifest), split="train", streaming=True)
        return build_dataloader(StreamingDatasetSource(dataset, base_dir=str(tmp_path)), **kwargs)

    def take(loader, count):
        out = []
        for batch in loader:
            out.append(batch["ids"])
            if len(out) == count:
                return out

    reference = take(stream_loader(), 10)  # more than one pass over the 12 clips
    first_pass = {i for ids in reference for i in ids}
    assert first_pass == {f"u{i:03d}" for i in range(12)}
    interrupted = stream_loader()
    head = take(interrupted, 3)
    state = interrupted.state_dict()
    resumed = stream_loader()
    resumed.load_state_dict(state)
    assert head + take(resumed, 7) == reference
    with pytest.raises(TypeError, match="forever"):
        len(resumed)


def test_metadata_filtered_rows_are_counted_once_across_ranks(tmp_path):
    good = write_corpus(tmp_path / "audio", 8)
    sf.write(tmp_path / "audio" / "short.flac", tone(0.2, 16000), 16000)
    sf.write(tmp_path / "audio" / "long.flac", tone(3.0, 16000), 16000)
    rows = good + [
        {"audio_filepath": "audio/short.flac", "duration": 0.2},
        {"audio_filepath": "audio/long.flac", "duration": 3.0},
        "{broken",
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    kwargs = dict(batch_seconds=4.0, num_workers=0, return_waveforms=True, return_ids=True, world_size=2)
    kwargs.update(max_duration=2.5, crop_long=False, max_bad_fraction=0.5)
    loaders = [build_dataloader(manifest, rank=rank, **kwargs) for rank in range(2)]
    ids = [collect(loader) for loader in loaders]
    assert sorted(ids[0] + ids[1]) == [f"audio/u{i:03d}" for i in range(8)]
    assert len(loaders[0]) == len(loaders[1])
    merged = BadExampleCounter.merge([loader.counter.state_dict() for loader in loaders])
    assert merged["bad"] == {"too_short": 1, "too_long": 1, "malformed": 1} and merged["good"] == 8
    names = [name for where in merged["names"].values() for name in where]
    assert any("short.flac" in n for n in names) and any("long.flac" in n for n in names)
    assert any(n.endswith("m.jsonl:11") for n in names)  # the broken line, by file and line number
