"""Scale-out paths tested on CPU: bf16 autocast through the real loop (and fp16 refused on the CPU: accelerate
enables fp16 autocast and its gradient scaler on accelerators only), Hub-layout streaming split by rank, DDP's
unused-parameter search and gradient layout, FSDP2 kill/resume, and torch.compile. CUDA-only checks live in
benchmarks/gpu_check.py, not here."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import soundfile as sf
import torch
from support import (
    PRETRAIN_MODEL,
    REPO_ROOT,
    accelerate_launch,
    make_corpus,
    make_tiny_config,
    run_env,
    write_recipe,
)
from test_pretrain import _KILL_AFTER_SAVE, train_history

from hf_ssl_speech.configuration_conformer_ssl import ConformerSslConfig
from hf_ssl_speech.data import build_dataloader
from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining, ConformerSslModel
from hf_ssl_speech.pretrain.compiling import bucket_length, compile_encoders, pad_to_bucket
from hf_ssl_speech.pretrain.loop import featurise
from hf_ssl_speech.pretrain.recipe import RecipeError, recipe_from_dict

SCRIPT = REPO_ROOT / "scripts" / "pretrain.py"
STEPS = 20


def _pretrain(tmp_path, recipe) -> subprocess.CompletedProcess:
    """scripts/pretrain.py in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(recipe), "--no_progress"],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run(tmp_path, manifest, precision: str) -> list[dict]:
    recipe = write_recipe(
        tmp_path / f"{precision}.yaml",
        model={"mask_time_length": 8, "mask_time_prob": 0.05, "bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 4.0},
        optim={},
        train={
            "max_steps": STEPS,
            "save_steps": STEPS,
            "output_dir": precision,
            "seed": 3,
            "mixed_precision": precision,
        },
    )
    proc = _pretrain(tmp_path, recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_history(tmp_path / precision, STEPS)


@pytest.mark.slow
def test_bf16_pretraining_runs_the_whole_loop_and_tracks_fp32(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=8, seconds=1.5, vary=True)
    full = [row["train/loss"] for row in _run(tmp_path, manifest, "no")]
    half = [row["train/loss"] for row in _run(tmp_path, manifest, "bf16")]
    assert len(full) == len(half) == STEPS and all(math.isfinite(v) for v in half)
    assert half[-1] < half[0]  # it learns
    # bf16 matmuls (8-bit mantissa) change every step a little; the curves must stay together. Measured on this
    # machine (2026-12-04): the largest relative gap over the 20 steps is 0.03%; the bound is 1%.
    gaps = [abs(h - f) / abs(f) for h, f in zip(half, full)]
    assert max(gaps) < 0.01, gaps
    assert half != full  # autocast really ran: bf16 cannot reproduce fp32 bit for bit


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: accelerate runs fp16 autocast and its GradScaler on GPUs only (benchmarks/gpu_check.py)",
)
def test_fp16_with_a_gradient_scaler_on_cuda_tracks_fp32(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=8, seconds=1.5, vary=True)
    full = [row["train/loss"] for row in _run(tmp_path, manifest, "no")]
    half = [row["train/loss"] for row in _run(tmp_path, manifest, "fp16")]
    # The GradScaler may skip its first updates (its scale search): those steps leave the weights as they were.
    assert len(half) == STEPS and all(math.isfinite(v) for v in half)
    assert half[-1] < half[0] and half != full
    gaps = [abs(h - f) / abs(f) for h, f in zip(half, full)]
    assert max(gaps) < 0.05, gaps  # fp16's 10-bit mantissa; a skipped scaler step shifts the curve by one step


def test_pretraining_in_a_process_that_trained_before_takes_its_own_precision(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from hf_ssl_speech.pretrain.loop import pretrain
    from hf_ssl_speech.pretrain.recipe import load_recipe

    manifest = make_corpus(tmp_path / "corpus", count=2, seconds=1.0)
    recipe = write_recipe(
        tmp_path / "fp32.yaml",
        model={"bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 4.0},
        optim={},
        train={"max_steps": 1, "save_steps": 1, "output_dir": str(tmp_path / "out"), "mixed_precision": "no"},
    )
    AcceleratorState._reset_state(reset_partial_state=True)  # whatever tests before this one left
    Accelerator(mixed_precision="bf16", cpu=True)  # what an earlier bf16 run in this process leaves behind
    try:
        result = pretrain(load_recipe(recipe), progress=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.step == 1 and result.checkpoint is not None


def test_fp16_on_the_cpu_is_refused_with_the_fix(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=2, seconds=1.0)
    recipe = write_recipe(
        tmp_path / "fp16.yaml",
        model={"bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 2.0},
        optim={},
        train={"max_steps": 1, "output_dir": "fp16", "mixed_precision": "fp16"},
    )
    proc = _pretrain(tmp_path, recipe)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.mixed_precision=fp16 on the CPU" in proc.stderr and "use train.mixed_precision=bf16" in proc.stderr
    assert not (tmp_path / "fp16" / "checkpoints").exists()


# --- Hub-layout streaming (parquet Audio column, webdataset tars), split by rank, exact resume
# A corpus of 12 one-second clips (half WAV, half FLAC); with batch_seconds=2 every batch holds two clips, so
# one pass of a rank's share is a known number of batches and the ranks can be compared step by step, as DDP
# runs them.
CLIPS = 12


def _clip_bytes(corpus: Path) -> dict[str, tuple[str, bytes]]:
    """id -> (file name, encoded bytes): the WAVs of `make_corpus`, every other one re-encoded as FLAC."""
    out = {}
    for index, wav in enumerate(sorted((corpus / "audio").glob("*.wav"))):
        if index % 2:
            audio, rate = sf.read(wav, dtype="int16")
            buffer = io.BytesIO()
            sf.write(buffer, audio, rate, format="FLAC")
            out[wav.stem] = (f"{wav.stem}.flac", buffer.getvalue())
        else:
            out[wav.stem] = (wav.name, wav.read_bytes())
    return out


def _hub_parquet(folder: Path, clips: dict[str, tuple[str, bytes]], shards: int) -> str:
    """Parquet shards as `datasets` writes them for the Hub: an `Audio` column of `{bytes, path}` structs."""
    import datasets

    folder.mkdir(parents=True)
    names = sorted(clips)
    for shard in range(shards):
        mine = names[shard::shards] if shards > 1 else names
        rows = {"audio": [{"bytes": clips[n][1], "path": clips[n][0]} for n in mine], "speaker": ["s"] * len(mine)}
        dataset = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
        dataset.to_parquet(folder / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return str(folder / "train-*.parquet")


def _webdataset_tars(folder: Path, clips: dict[str, tuple[str, bytes]], shards: int) -> str:
    """Webdataset shards: `key.wav|flac` + `key.json` (with the duration for half the keys, probed for the rest)."""
    folder.mkdir(parents=True)
    names = sorted(clips)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:06d}.tar", "w") as archive:
            for index, key in enumerate(names[shard::shards]):
                file_name, blob = clips[key]
                meta = json.dumps({"speaker": "s", **({"duration": 1.0} if index % 2 else {})}).encode()
                for member, data in ((f"{key}.{file_name.rsplit('.', 1)[1]}", blob), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(folder / "shard-*.tar")


def _take(loader, count: int) -> list[list[str]]:
    """The ids of the next `count` batches, across epochs (a planned loader ends each pass; a stream never ends)."""
    out: list[list[str]] = []
    empty = 0
    while len(out) < count and empty < 2:  # one empty pass is normal right after resuming at an epoch's end
        before = len(out)
        for batch in loader:
            out.append(list(batch["ids"]))
            if len(out) == count:
                return out
        empty = empty + 1 if len(out) == before else 0
    return out


def _first_pass(batches: list[list[str]]) -> list[list[str]]:
    """The batches before the first one whose ids were all seen already (a pass never shares a batch)."""
    seen: set[str] = set()
    for index, ids in enumerate(batches):
        if seen & set(ids):
            assert seen >= set(ids), f"batch {index} mixes new and repeated ids: {ids}"
            return batches[:index]
        seen |= set(ids)
    raise AssertionError(f"no second pass within {len(batches)} batches")


STREAM_ARGS = dict(batch_seconds=2.0, return_waveforms=True, return_ids=True, seed=5)


@pytest.mark.parametrize("shards, workers", [(3, 0), (1, 0), (3, 2), (2, 1)])
def test_hub_parquet_stream_splits_over_two_ranks_once_per_pass_and_resumes_exactly(tmp_path, shards, workers):
    import pyarrow.parquet as pq

    from hf_ssl_speech.data import build_dataloader

    clips = _clip_bytes(make_corpus(tmp_path / "corpus", count=CLIPS, seconds=1.0).parent)
    pattern = _hub_parquet(tmp_path / "hub", clips, shards)
    # What the Hub serves: a struct column holding the encoded file, tagged as datasets' Audio feature.
    table = pq.read_table(sorted((tmp_path / "hub").glob("*.parquet"))[0])
    assert str(table.schema.field("audio").type) == "struct<bytes: binary, path: string>"
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["audio"]["_type"] == "Audio"
    cell = table.column("audio")[0].as_py()
    assert cell["bytes"] == clips[Path(cell["path"]).stem][1] and cell["bytes"][:4] in (b"RIFF", b"fLaC")
    spec = {"builder": "parquet", "data_files": pattern, "streaming": True, "audio_column": "audio"}

    def loader(rank):
        return build_dataloader(spec, rank=rank, world_size=2, num_workers=workers, **STREAM_ARGS)

    per_pass = CLIPS // 2 // 2 if workers <= 1 else 4  # 2 workers: 4 parts of 3 clips, each a batch of 2 and of 1
    reference = [_take(loader(rank), per_pass + 3) for rank in range(2)]
    passes = [_first_pass(batches) for batches in reference]
    # The same number of batches per pass on both ranks (3 shards over 2 ranks: 1.5 shards each, not 2 and 1),
    # so in lockstep neither rank repeats a clip before the other has read its share.
    assert [len(p) for p in passes] == [per_pass, per_pass]
    ids = [i for p in passes for batch in p for i in batch]
    assert sorted(ids) == sorted(clips) and len(set(ids)) == CLIPS  # the corpus, once, across both ranks
    for rank in range(2):  # the next pass reads the same share again, in a new order
        again = [i for batch in reference[rank][per_pass:] for i in batch]
        assert set(again) <= {i for batch in passes[rank] for i in batch}
    for rank in range(2):  # exact resume per rank, from a mid-pass position and across the pass boundary
        for stop in (2, per_pass + 1):
            interrupted = loader(rank)
            head = _take(interrupted, stop)
            state = json.loads(json.dumps(interrupted.state_dict()))
            resumed = loader(rank)
            resumed.load_state_dict(state)
            assert head + _take(resumed, per_pass + 3 - stop) == reference[rank], (rank, stop)
    # The resumed counter carries on from the saved one: replaying the stream up to the position counts nothing.
    assert resumed.counter.good == sum(map(len, reference[rank])) and resumed.counter.total_bad == 0


@pytest.mark.parametrize("shards, workers", [(3, 0), (1, 0), (3, 2)])
def test_webdataset_tars_are_planned_over_two_ranks_once_per_epoch_and_resume_exactly(tmp_path, shards, workers):
    from hf_ssl_speech.data import build_dataloader

    clips = _clip_bytes(make_corpus(tmp_path / "corpus", count=CLIPS + 1, seconds=1.0).parent)  # 13: odd
    pattern = _webdataset_tars(tmp_path / "wds", clips, shards)
    # The tar source is indexed (member offsets), not streamed: every rank plans the same epoch over all rows
    # and takes every other batch, so shard counts do not matter and the ranks get equal batch counts.

    def loader(rank):
        return build_dataloader({"tar": pattern}, rank=rank, world_size=2, num_workers=workers, **STREAM_ARGS)

    loaders = [loader(rank) for rank in range(2)]
    assert len(loaders[0]) == len(loaders[1])  # 13 clips: the plan splits a batch so both ranks get as many
    epochs = [[[list(b["ids"]) for b in ld] for _ in range(2)] for ld in loaders]  # two epochs per rank
    for epoch in range(2):
        ids = [i for rank in range(2) for batch in epochs[rank][epoch] for i in batch]
        assert sorted(ids) == sorted(clips), epoch  # every clip once per epoch, over both ranks
        assert len(epochs[0][epoch]) == len(epochs[1][epoch])
    assert epochs[0][0] != epochs[0][1]  # a new order each epoch
    for rank in range(2):  # exact resume per rank, mid-epoch and just after the epoch boundary
        full = epochs[rank][0] + epochs[rank][1]
        for stop in (2, len(epochs[rank][0]), len(epochs[rank][0]) + 1):
            interrupted = loader(rank)
            head = _take(interrupted, stop)
            state = json.loads(json.dumps(interrupted.state_dict()))
            resumed = loader(rank)
            resumed.load_state_dict(state)
            assert head + _take(resumed, len(full) - stop) == full, (rank, stop)
        assert resumed.counter.good == sum(map(len, full)) and resumed.counter.total_bad == 0


def test_stream_spec_mistakes_name_the_key_the_value_and_the_fix(tmp_path):
    from hf_ssl_speech.data import open_source
    from hf_ssl_speech.errors import ConfigError, MissingPathError, check_paths

    clips = _clip_bytes(make_corpus(tmp_path / "corpus", count=2, seconds=1.0).parent)
    spec = {"builder": "parquet", "data_files": _hub_parquet(tmp_path / "hub", clips, 1), "streaming": True}
    with pytest.raises(ConfigError, match=r"audio_column='audio_filepath' is not a column .*\['audio', 'speaker'\]"):
        open_source(spec)  # the NeMo default name; Hub datasets call it `audio`
    with pytest.raises(ConfigError, match=r"text_column='transcript' is not a column.*leave text_column out"):
        open_source({**spec, "audio_column": "audio", "text_column": "transcript"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['audio_colum'\]"):
        open_source({**spec, "audio_colum": "audio"})
    with pytest.raises(ConfigError, match="'data_files' is missing"):
        open_source({"builder": "parquet", "streaming": True, "audio_column": "audio"})
    with pytest.raises(MissingPathError, match=r"data.train_manifests: the pattern '.*nowhere/\*.parquet' matches"):
        check_paths([{**spec, "data_files": [str(tmp_path / "nowhere" / "*.parquet")]}], "data.train_manifests")
    check_paths([spec, {**spec, "data_files": "hf://datasets/x/y/*.parquet"}], "data.train_manifests", kind="path")
    source = open_source({**spec, "audio_column": "audio"})  # defaults that the dataset lacks are fine
    assert source.columns == {**dict.fromkeys(source.columns), "audio": "audio", "speaker": "speaker"}


# scripts/pretrain.py's recipe schema types `data.train_manifests` as `list[str]`, so a `{builder: parquet, ...}`
# entry is refused there (recipe.py); this worker reads the same YAML recipe and hands the specs to the loop.
# --- DDP's unused-parameter search only where an objective can leave parameters without a gradient
def _unused_after_one_backward(config) -> list[str]:
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(config).train()
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 400, config.num_mel_bins, generator=generator)
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 300:] = 0
    extra = {}
    if "hubert" in config.objectives:
        extra["frame_labels"] = torch.randint(0, config.hubert_num_labels, (2, 400), generator=generator)
    out = model(features, mask, step=0, generator=generator, **extra)
    out.loss.backward()
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


SHIPPED_RECIPES = sorted((REPO_ROOT / "configs" / "pretrain").glob("tiny_*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.stem)
def test_ddp_searches_for_unused_parameters_only_when_some_can_be_unused(path):
    from hf_ssl_speech.pretrain.loop import unused_parameter_reasons
    from hf_ssl_speech.pretrain.recipe import load_recipe, model_config

    config = model_config(load_recipe(path))
    unused, reasons = _unused_after_one_backward(config), unused_parameter_reasons(config)
    # Missing a reason would crash DDP at the first step ("Expected to have finished reduction").
    assert not unused or reasons, (unused, reasons)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"objectives": {"bestrq": {}, "contrastive": {"start_step": 5}}}, "objectives.contrastive.start_step=5"),
        ({"objectives": {"bestrq": {"layer": 1}}}, "the highest block any objective reads is 1 of 2"),
    ],
)
def test_the_reasons_are_real_parameters_without_gradient(change, reason):
    from hf_ssl_speech.pretrain.loop import unused_parameter_reasons
    from hf_ssl_speech.pretrain.recipe import load_recipe, model_config

    base = load_recipe(REPO_ROOT / "configs" / "pretrain" / "tiny_nest.yaml")
    raw = base.to_dict()
    raw.update(change)
    config = model_config(load_recipe(base=raw))
    assert reason in unused_parameter_reasons(config)
    assert _unused_after_one_backward(config)  # and DDP would indeed have met them


# --- FSDP2 through the loop (train.fsdp), 2 gloo processes: kill/resume bit-identical, agreement with DDP
def _fsdp_recipe(tmp_path, manifest, name: str, fsdp: bool, steps: int, save_steps: int):
    return write_recipe(
        tmp_path / f"{name}.yaml",
        model={
            "subsampling": "dw_striding",  # its depthwise convs were the source of DDP's stride warning
            "mask_time_length": 4,
            "mask_time_prob": 0.1,
            "bestrq_codebook_size": 64,
            "bestrq_codebook_dim": 8,
        },
        # NEST's objective, and an EMA teacher (sharded like the student) with DinoSR's codewords (buffers)
        objectives={
            "bestrq": {},
            "data2vec": {"weight": 0.5, "top_k_layers": 2, "decoder_layers": 2, "decoder_dim": 32, "decoder_groups": 4},
            "dinosr": {"weight": 0.5, "top_k_layers": 2, "codebook_size": 16},
        },
        data={"train_manifests": [str(manifest)], "batch_seconds": 2.0},
        optim={},
        # fp32: the FSDP-vs-DDP agreement bounds below are fp32 rounding (bf16 has its own test above)
        train={
            "max_steps": steps,
            "save_steps": save_steps,
            "output_dir": name,
            "seed": 5,
            "fsdp": fsdp,
            "mixed_precision": "no",
        },
    )


@pytest.mark.parametrize("written_with_fsdp", [True, False])
def test_resuming_across_the_fsdp_setting_is_refused_with_the_fix(tmp_path, written_with_fsdp):
    from hf_ssl_speech.errors import UserError
    from hf_ssl_speech.pretrain.checkpoints import STATE_FILE, CheckpointManager
    from hf_ssl_speech.pretrain.sharding import SHARDED_STATE

    checkpoint = tmp_path / "checkpoint-00000002"
    (checkpoint / "accelerate").mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text("{}")
    if written_with_fsdp:
        (checkpoint / SHARDED_STATE).mkdir()
    sharded = None if written_with_fsdp else (torch.nn.Linear(2, 2), None)  # this run: the other setting
    with pytest.raises(UserError, match=f"resume with train.fsdp={str(written_with_fsdp).lower()}"):
        CheckpointManager.load(checkpoint, accelerator=None, sharded=sharded)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_kill_and_resume_is_bitwise_identical_and_agrees_with_ddp(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    import hf_ssl_speech  # noqa: F401  (registers the Auto classes)

    manifest = make_corpus(tmp_path / "corpus", count=8, seconds=1.0, vary=True)
    n = 2
    env = run_env(tmp_path)
    args = ["--no_progress"]
    straight = _fsdp_recipe(tmp_path, manifest, "straight", True, 2 * n, n)
    killed = _fsdp_recipe(tmp_path, manifest, "killed", True, 2 * n, n)
    ddp = _fsdp_recipe(tmp_path, manifest, "ddp", False, 2 * n, n)
    for recipe in (straight, ddp):
        proc = accelerate_launch(SCRIPT, ["--config", str(recipe), *args], 2, env, tmp_path, 300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # DDP that costs nothing extra: no graph walk for unused parameters (every parameter gets a gradient with
    # these objectives), and no gradient that must be reordered into its bucket. DDP copies every gradient into its
    # bucket anyway (gradient_as_bucket_view is off) and warns once per process when the strides differ: the stem's
    # convs read channels-last memory, so its depthwise and pointwise kernels' gradients come back with channels-last
    # strides, which differ from the parameters' only on dimensions of size 1 (the same memory order, the same copy).
    assert "find_unused_parameters=True" not in proc.stderr and "looks for parameters" not in proc.stdout
    reported = re.findall(
        r"grad\.sizes\(\) = \[([\d, ]+)\], strides\(\) = \[([\d, ]+)\]\s*"
        r"bucket_view\.sizes\(\) = \[[\d, ]+\], strides\(\) = \[([\d, ]+)\]",
        proc.stderr,
    )
    assert reported or "Grad strides do not match" not in proc.stderr, proc.stderr[-3000:]  # the format changed
    for sizes, grad_strides, bucket_strides in reported:
        dims = zip(*(map(int, text.split(", ")) for text in (sizes, grad_strides, bucket_strides)))
        assert all(size == 1 or g == b for size, g, b in dims), (sizes, grad_strides, bucket_strides)
    # SIGKILL of one process right after checkpoint n is written (a preempted node): the launcher stops the other.
    script = tmp_path / "kill_after_save.py"
    script.write_text(_KILL_AFTER_SAVE)
    proc = accelerate_launch(script, [str(n), "--config", str(killed), *args], 2, env, tmp_path, 300)
    assert proc.returncode != 0
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == [f"checkpoint-{n:08d}"]
    sharded = tmp_path / "killed" / "checkpoints" / f"checkpoint-{n:08d}" / "fsdp"
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # each rank's shards
    proc = accelerate_launch(SCRIPT, ["--config", str(killed), "--resume", *args], 2, env, tmp_path, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def final(run: str) -> Path:
        return tmp_path / run / "checkpoints" / f"checkpoint-{2 * n:08d}" / "model"

    expected, resumed = (
        load_file(final("straight") / "model.safetensors"),
        load_file(final("killed") / "model.safetensors"),
    )
    assert expected.keys() == resumed.keys() and len(expected) > 50
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert train_history(tmp_path / "straight", 2 * n) == train_history(tmp_path / "killed", 2 * n)

    # The exported model is whole (not rank 0's shard) and loads with the Auto classes, no encoder weight missing
    # (the pretraining heads are the only keys the bare encoder does not take).
    model, info = AutoModel.from_pretrained(final("killed"), output_loading_info=True)
    assert not info["missing_keys"] and not any(k.startswith("conformer.") for k in info["unexpected_keys"])
    encoder = {k.removeprefix("conformer."): v for k, v in expected.items() if k.startswith("conformer.")}
    for key, value in model.state_dict().items():
        assert torch.equal(value, encoder[key]), key

    # Against DDP from the same initial weights and batches: the sharded reduce-scatter and the all-reduce sum
    # gradients in another order, so bitwise equality is not expected, and the EMA teacher's targets (DinoSR's
    # nearest codeword is an argmax) pass the tiny differences on. Left out: weights whose gradient is zero in exact
    # arithmetic (the depthwise-conv bias right before BatchNorm, the attention key bias under softmax): Adam turns
    # their rounding noise into lr-sized steps on either side. Measured here (2026-12-06) after 4 steps at LR 3e-3:
    # weights within 7e-5 (they moved ~4e-3), DinoSR's codeword sums within 2.3e-4 of their size, losses within
    # 1.2e-5 relative. Bounds: 2e-4, 1e-3, 1e-4.
    reference = load_file(final("ddp") / "model.safetensors")
    skip = ("depthwise_conv.bias", "k_proj.bias", "running_", "num_batches_tracked", "dinosr_codebooks.")
    trained = [k for k in expected if not any(part in k for part in skip)]
    worst = max(float((expected[k] - reference[k]).abs().max()) for k in trained)
    assert len(trained) > 50 and worst < 2e-4, worst
    sums = expected["dinosr_codebooks.sums"]
    assert float((sums - reference["dinosr_codebooks.sums"]).abs().max()) < 1e-3 * float(sums.abs().max())
    losses = [row["train/loss"] for row in train_history(tmp_path / "straight", 2 * n)]
    ddp_losses = [row["train/loss"] for row in train_history(tmp_path / "ddp", 2 * n)]
    # The loss is normalised by the global target count under both (the sums and counts of both ranks).
    assert losses == pytest.approx(ddp_losses, rel=1e-4)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_gloo_processes_pretrain_from_a_hub_parquet_stream(tmp_path):
    clips = _clip_bytes(make_corpus(tmp_path / "corpus", count=CLIPS, seconds=1.0).parent)
    pattern = _hub_parquet(tmp_path / "hub", clips, 3)  # 3 shards over 2 processes
    steps = 4  # past one pass (3 batches of 2 clips per process)
    spec = {"builder": "parquet", "data_files": pattern, "streaming": True, "audio_column": "audio"}
    recipe = write_recipe(
        tmp_path / "stream.yaml",
        model={"bestrq_codebook_size": 64, "bestrq_codebook_dim": 8, "mask_time_length": 4},
        objectives={"bestrq": {}},
        data={"train_manifests": [spec], "batch_seconds": 2.0, "max_batch_size": 2},
        optim={},
        train={"max_steps": steps, "save_steps": steps, "output_dir": "run", "seed": 2},
    )
    # The recipe is what a user writes: the stream spec in data.train_manifests, run by scripts/pretrain.py.
    proc = accelerate_launch(SCRIPT, ["--config", str(recipe), "--no_progress"], 2, run_env(tmp_path), tmp_path, 300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Both processes read 2 clips per step, none bad: 2 processes x 4 steps x 2 clips.
    assert "16 training examples read, 0 bad ones skipped" in proc.stdout + proc.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / f"checkpoint-{steps:08d}"
    for rank in range(2):  # each process saved its own stream position, for an exact resume
        data = torch.load(checkpoint / f"rank_{rank}.pt", weights_only=False)["data"]
        assert data["streaming"] and data["rank"] == rank and data["world_size"] == 2
        assert data["position"] == steps and data["counter"]["good"] == steps * 2


# --- Mixed precision: under bf16 autocast the matmuls run in bf16, the logits, losses and counts stay float32
class _RecordDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtype of the first tensor argument of the functions named (what autocast hands them)."""

    WATCHED = {"cross_entropy", "log_softmax", "logsumexp", "linear", "bmm"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in self.WATCHED and isinstance(out, torch.Tensor):
            self.seen.setdefault(name, set()).add(out.dtype)
        return out


def test_bf16_autocast_keeps_logits_and_losses_in_float32():
    torch.manual_seed(0)
    config = make_tiny_config(
        objectives={"bestrq": {}, "contrastive": {"weight": 0.5}, "mlm": {"weight": 0.5}},
        mask_time_prob=0.2,
        mask_time_length=4,
    )
    model = ConformerSslForPreTraining(config).train()
    features = torch.randn(2, 160, config.num_mel_bins, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 160, dtype=torch.long)
    mask[1, 120:] = 0
    recorder = _RecordDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
        out = model(features, mask, step=0, generator=torch.Generator().manual_seed(2))
    assert torch.bfloat16 in recorder.seen["linear"]  # autocast really ran the encoder's matmuls in bf16
    # the objectives' logits (InfoNCE over cosine similarities, BEST-RQ/MLM classes) and their normalisers: fp32
    assert recorder.seen["cross_entropy"] == {torch.float32}
    assert recorder.seen["bmm"] >= {torch.float32}
    assert out.loss.dtype == torch.float32 and set(out.loss_sums) == {"bestrq", "contrastive", "diversity", "mlm"}
    assert all(v.dtype == torch.float32 for v in [*out.loss_sums.values(), *out.loss_counts.values()])
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)  # fp32 master weights


# --- train.compile (pretrain/compiling.py): the compiled encoder is the eager one (values, gradients, state_dict
# keys), bucket padding changes nothing, an epoch of varied lengths compiles once per time bucket, the command runs
NO_DROPOUT = {"hidden_dropout": 0.0, "activation_dropout": 0.0, "attention_dropout": 0.0, "feat_proj_dropout": 0.0}


def _padded_batch(lengths: list[int], frames: int, mels: int = 16, seed: int = 0):
    """Features zero past each length (as the extractor makes them) and the matching attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), frames, mels, generator=generator)
    mask = (torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]).long()
    return features * mask[..., None], mask


def test_encoder_traces_as_one_graph_without_breaks():
    model = ConformerSslModel(make_tiny_config(**NO_DROPOUT)).train()
    features, mask = _padded_batch([96, 70, 41], 96)
    explained = torch._dynamo.explain(model)(features, attention_mask=mask, output_hidden_states=True)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_encoder_matches_eager_with_padding_inductor():
    """Inductor on CPU, eval mode, a batch of three lengths: every hidden state within 1e-4 on the real steps."""
    torch.manual_seed(0)
    model = ConformerSslModel(make_tiny_config(num_hidden_layers=1, **NO_DROPOUT)).eval()
    features, mask = _padded_batch([64, 45, 23], 64)
    with torch.no_grad():
        expected = model(features, attention_mask=mask, output_hidden_states=True)
        counter = compile_encoders(model)
        got = model(features, attention_mask=mask, output_hidden_states=True)
    valid = expected.attention_mask.bool()
    diffs = [(e - g)[valid].abs().max().item() for e, g in zip(expected.hidden_states, got.hidden_states)]
    print(f"compiled vs eager, max abs diff per hidden state: {diffs}; graphs compiled: {counter.graphs}")
    assert max(diffs) < 1e-4, diffs
    assert torch.equal(expected.output_lengths, got.output_lengths) and counter.graphs == 1
    assert got.hidden_states[-1][valid].abs().max() > 0.1  # a real output, not zeros on both sides


@pytest.mark.slow
def test_compiled_encoder_gradients_match_eager_inductor():
    """Training mode, padded batch, inductor: every gradient within 1e-4 of its largest entry. Left out: the two
    parameters whose gradient is zero in exact arithmetic (the depthwise-conv bias right before BatchNorm, the key
    bias under softmax): both sides hold rounding noise there (~1e-7 of the largest gradient), which differs."""
    torch.manual_seed(0)
    eager = ConformerSslModel(make_tiny_config(num_hidden_layers=1, **NO_DROPOUT)).train()
    compiled = ConformerSslModel(eager.config).train()
    compiled.load_state_dict(eager.state_dict())
    counter = compile_encoders(compiled)
    features, mask = _padded_batch([64, 45, 23], 64)
    weights = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1)) * mask[:, ::4, None]  # real steps
    for model in (eager, compiled):
        (model(features, attention_mask=mask).last_hidden_state * weights).sum().backward()
    largest = max(p.grad.abs().max().item() for p in eager.parameters())
    errors = {
        name: ((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp(min=1e-12)).item()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters())
    }
    zero_gradient = [n for n in errors if n.endswith(("depthwise_conv.bias", "k_proj.bias"))]
    assert all(eager.get_parameter(n).grad.abs().max() < 1e-5 * largest for n in zero_gradient)
    worst = max(v for n, v in errors.items() if n not in zero_gradient)
    print(f"compiled vs eager gradients, max diff relative to each gradient's largest entry: {worst:.2e}")
    assert worst < 1e-4 and counter.graphs >= 1 and len(errors) - len(zero_gradient) > 20


def test_bucket_padding_changes_nothing():
    """Eval mode (BatchNorm's running statistics): encoder outputs on real steps and the BEST-RQ loss with fixed
    masks are the same for the batch and for it padded to a multiple of 64 frames."""
    config = make_tiny_config(**NO_DROPOUT, objectives={"bestrq": {}})
    model = ConformerSslForPreTraining(config).eval()
    features, mask = _padded_batch([90, 77, 50], 90)
    inputs = {"input_features": features, "attention_mask": mask, "frame_labels": torch.zeros(3, 85).long()}
    padded = pad_to_bucket(inputs, 64)
    assert padded["input_features"].shape[1] == padded["attention_mask"].shape[1] == 128 == bucket_length(90, 64)
    assert (padded["frame_labels"][:, 85:] == -100).all() and padded["attention_mask"][:, 90:].sum() == 0
    assert pad_to_bucket(padded, 64) is padded
    frame_mask = torch.zeros(3, 90, dtype=torch.bool)
    frame_mask[:, 8:40] = True
    with torch.no_grad():
        plain = model.conformer(features, attention_mask=mask)
        longer = model.conformer(padded["input_features"], attention_mask=padded["attention_mask"])
        steps = plain.last_hidden_state.shape[1]
        valid = plain.attention_mask.bool()
        diff = (plain.last_hidden_state - longer.last_hidden_state[:, :steps])[valid].abs().max().item()
        loss = model(features, attention_mask=mask, mask_time_indices=frame_mask).loss
        padded_mask = torch.nn.functional.pad(frame_mask, (0, 128 - 90))
        padded_loss = model(
            padded["input_features"], attention_mask=padded["attention_mask"], mask_time_indices=padded_mask
        ).loss
    print(f"bucket padding: max abs diff of the encoder output {diff:.2e}, loss {loss.item():.6f} vs {padded_loss:.6f}")
    assert diff < 1e-5
    assert abs(loss.item() - padded_loss.item()) < 1e-5


def test_compiled_model_keeps_its_state_dict_keys(tmp_path):
    model = ConformerSslForPreTraining(
        make_tiny_config(objectives={"data2vec": {"top_k_layers": 2}})
    )  # student, EMA teacher
    keys = list(model.state_dict())
    compile_encoders(model, backend="eager")
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    model.save_pretrained(tmp_path / "model")
    reloaded = ConformerSslForPreTraining.from_pretrained(tmp_path / "model")
    assert reloaded.conformer.state_dict().keys() == model.conformer.state_dict().keys()


def _recipe(manifest, **train):
    return recipe_from_dict(
        {
            "model": {**PRETRAIN_MODEL, "num_hidden_layers": 1},
            "objectives": {"bestrq": {}},
            "data": {"train_manifests": [str(manifest)], "batch_seconds": 3.0, "min_duration": 0.5},
            "train": {"compile": True, **train},
        }
    )


def test_recompiles_over_an_epoch_of_varied_lengths(tmp_path):
    """A real epoch of the data loader (varied lengths and batch sizes), the training graph forward + backward:
    traced by dynamo and compiled by the counting backend ("aot_eager": the same graphs inductor would get, without
    code generation). The batch dim is dynamic and the time dim bucketed: one compilation per time bucket (and one
    more for one-utterance batches), however many batches and batch sizes the epoch holds."""
    manifest = make_corpus(tmp_path / "corpus", count=24, seconds=0.8, vary=True)
    recipe = _recipe(manifest, compile_bucket_frames=32)
    config = ConformerSslConfig(**recipe.model, objectives=recipe.objectives)
    model = ConformerSslForPreTraining(config).train()
    counter = compile_encoders(model, backend="aot_eager")
    extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins)
    loader = build_dataloader(
        recipe.data.train_manifests, None, **recipe.data.loader_config(), num_workers=0, return_waveforms=True
    )
    generator = torch.Generator().manual_seed(0)
    shapes = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            inputs = featurise(batch, extractor, torch.device("cpu"), recipe, generator, train=True)
            shapes.append(tuple(inputs["input_features"].shape[:2]))
            model(**inputs, step=0, generator=generator).loss.backward()
    buckets = {frames for _, frames in shapes}
    print(
        f"2 epochs: {len(shapes)} batches, {len(set(shapes))} distinct (batch, frames) shapes {sorted(set(shapes))}, "
        f"{len(buckets)} time buckets, graphs compiled {counter.graphs}, recompiles {counter.recompiles}"
    )
    assert all(frames % 32 == 0 for frames in buckets)
    assert len({b for b, _ in shapes}) >= 2 and len(buckets) >= 2  # batch sizes and lengths really vary
    # dynamo specialises a dynamic dim of size 1 (its 0/1 rule): a one-utterance batch is its own graph per bucket
    expected = len({(frames, batch == 1) for batch, frames in shapes})
    assert counter.graphs == expected <= 2 * len(buckets) and counter.graphs < len(shapes)


def test_compile_fields_are_validated():
    with pytest.raises(RecipeError, match=r"train\.compile_mode.*fastest.*one of"):
        recipe_from_dict({"objectives": {"bestrq": {}}, "train": {"compile_mode": "fastest"}})
    with pytest.raises(RecipeError, match=r"train\.compile_bucket_frames.*12.*multiple of model\.subsampling_factor=8"):
        recipe_from_dict(
            {"model": {"subsampling_factor": 8}, "objectives": {"bestrq": {}}, "train": {"compile_bucket_frames": 12}}
        )
    assert recipe_from_dict({"objectives": {"bestrq": {}}}).train.compile is False


@pytest.mark.slow
def test_pretrain_command_with_compile_logs_recompiles_and_resumes(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=8, seconds=1.0, vary=True)

    def run(steps: int, *extra: str) -> subprocess.CompletedProcess:
        recipe = write_recipe(
            tmp_path / "compile.yaml",
            model={"num_hidden_layers": 1, "bestrq_codebook_size": 64, "bestrq_codebook_dim": 8},
            objectives={"bestrq": {}},
            data={"train_manifests": [str(manifest)], "batch_seconds": 3.0},
            optim={},
            # every clip (1-1.5 s) in one 256-frame bucket: one graph, and one more for a one-clip batch
            train={
                "max_steps": steps,
                "save_steps": 3,
                "output_dir": "run",
                "compile": True,
                "compile_bucket_frames": 256,
            },
        )
        return subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "pretrain.py"), "--config", str(recipe), "--no_progress"]
            + list(extra),
            cwd=tmp_path,
            # this checkout first, whichever hf_ssl_speech the environment has installed
            env={**run_env(tmp_path), "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"},
            capture_output=True,
            text=True,
            timeout=900,
        )

    first = run(3)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-00000003"
    rows = [
        r
        for r in json.loads((checkpoint / "trainer_state.json").read_text())["metrics"]["history"]
        if "train/loss" in r
    ]
    print(
        "train/compile_graphs, compile_recompiles per step:",
        [(r["train/compile_graphs"], r["train/compile_recompiles"]) for r in rows],
    )
    assert len(rows) == 3 and all(r["train/compile_graphs"] >= 1 for r in rows)
    assert rows[-1]["train/compile_graphs"] <= 2  # over 3 batches of varied lengths and sizes
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model" / "model.safetensors")
    accelerate_state = load_file(checkpoint / "accelerate" / "model.safetensors")
    assert not any("_orig_mod" in key for key in list(saved) + list(accelerate_state))
    resumed = run(6, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-00000006" / "trainer_state.json").is_file()
