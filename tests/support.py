"""Helpers shared by the test modules (imported as `from support import ...`; fixtures are in conftest.py).

- The tiny model: `TINY_CONFIG` / `make_tiny_config(**overrides)`; every other tiny model here is an override
  of it (`PRETRAIN_MODEL` for the end-to-end pretraining runs) or of the `tiny` preset (`TINY_CTC_OVERRIDES`).
- Real audio: `make_speech_like`, `write_speech_wav`, `make_corpus` (WAVs + a NeMo manifest).
- Commands: `load_script(name)` imports scripts/<name>.py; `accelerate_launch` runs a script under
  `accelerate launch` (gloo on CPU); `run_env` is a clean subprocess environment; `write_recipe` a tiny recipe.
- "Tone words" (`write_tone_corpus`, `train_tone_ctc`): a labelled corpus CTC learns in ~100 steps on one core.
  Real speech needs the demo corpus (espeak) and minutes of CPU to overfit; instead each letter of an 8-letter
  alphabet is a 150 ms two-tone chord of its own (a low and a high partial, with a little pitch jitter per
  utterance), letters are separated by 30 ms of silence and words by 120 ms. conftest's session-scoped
  `tone_ctc` fixture trains the shared tiny CTC model once per session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLING_RATE = 16000


# ----------------------------------------------------------------------------------------------- tiny model
TINY_CONFIG = {
    "num_mel_bins": 16,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "conv_depthwise_kernel_size": 3,
    "subsampling": "striding",
    "subsampling_factor": 4,
    "max_position_embeddings": 512,
    # Small pretraining heads so ForPreTraining stays tiny too.
    "num_codevectors_per_group": 8,
    "codevector_dim": 16,
    "proj_codevector_dim": 16,
    "classifier_proj_size": 16,
    "num_negatives": 4,
    "bestrq_codebook_size": 32,
    "bestrq_codebook_dim": 8,
    "hubert_num_labels": 10,
    "mask_time_length": 4,
    "cpc_steps": 2,
    "cpc_num_negatives": 2,
}


def make_tiny_config(**overrides):
    """A tiny ConformerSslConfig (TINY_CONFIG updated with `overrides`), e.g. `subsampling="dw_striding"`."""
    from hf_ssl_speech.configuration_conformer_ssl import ConformerSslConfig

    settings = {**TINY_CONFIG, **overrides}
    if settings["subsampling"] == "dw_striding" and "subsampling_factor" not in overrides:
        settings["subsampling_factor"] = 8  # FastConformer
    return ConformerSslConfig(**settings)


def make_speech_like(seconds: float, sampling_rate: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    """
    Deterministic audio with the broad structure of speech: voiced syllables (a gliding pitch of 90-250 Hz
    with harmonics shaped by two moving formants, amplitude-modulated at a syllable rate of ~4 Hz),
    short noise bursts (fricatives) and pauses.

    Returns float32 in [-1, 1]: shape (samples,) for mono, (samples, channels) otherwise (soundfile's layout;
    the channels differ by a small delay and gain, like a stereo recording).
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sampling_rate))
    t = np.arange(n) / sampling_rate
    f0 = rng.uniform(90, 250) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t))  # pitch glide
    phase = 2 * np.pi * np.cumsum(f0) / sampling_rate
    formants = (rng.uniform(400, 900) * (1 + 0.3 * np.sin(2 * np.pi * 3.1 * t)), rng.uniform(1100, 2200))
    voiced = np.zeros(n)
    for k in range(1, 25):
        frequency = k * f0
        gain = sum(np.exp(-(((frequency - f) / 150.0) ** 2)) for f in formants) / k**0.5
        voiced += gain * np.sin(k * phase) * (frequency < sampling_rate / 2)
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t + rng.uniform(0, np.pi)), 0, None) ** 2
    fricative = rng.standard_normal(n) * (np.sin(2 * np.pi * 1.3 * t + 1.0) > 0.85)
    pause = np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, np.pi)) > -0.8  # a few silent stretches
    signal = (voiced * syllables + 0.05 * fricative) * pause + 1e-4 * rng.standard_normal(n)
    signal = 0.5 * signal / max(np.abs(signal).max(), 1e-9)
    if channels == 1:
        return signal.astype(np.float32)
    shifted = [np.roll(signal, 7 * c) * (1 - 0.1 * c) for c in range(channels)]
    return np.stack(shifted, axis=1).astype(np.float32)


def write_speech_wav(
    path: str | Path,
    seconds: float,
    sampling_rate: int = 16000,
    channels: int = 1,
    seed: int = 0,
    subtype: str = "PCM_16",
) -> Path:
    """Write `make_speech_like(...)` as a real audio file (format from the suffix, WAV by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, make_speech_like(seconds, sampling_rate, seed, channels), sampling_rate, subtype=subtype)
    return path


# ------------------------------------------------------------------------------------------------ commands
def load_script(name: str):
    """Import scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(
    script: Path, args: list[str], num_processes: int, env: dict[str, str], cwd: Path, timeout: float = 180
) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` (N gloo workers; N=1: one process).

    The rendezvous port is picked free just before the launch; another process on this shared machine can still
    take it in between, so an "address already in use" failure (only that) is retried with a new port.
    """
    for _ in range(3):
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
        launch += (
            ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
        )
        proc = subprocess.run(
            [*launch, str(script), *args],
            env={**env, "ACCELERATE_USE_CPU": "1"},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            return proc
    return proc


# The end-to-end pretraining runs: the tiny model with 32 mel bins and dropout only on hidden states.
PRETRAIN_MODEL = {
    **TINY_CONFIG,
    "num_mel_bins": 32,
    "hidden_dropout": 0.1,
    "activation_dropout": 0.0,
    "attention_dropout": 0.0,
    "feat_proj_dropout": 0.0,
}


def make_corpus(folder: Path, count: int, seconds: float, vary: bool = False) -> Path:
    """`count` speech-like WAVs (equal length unless `vary`) and a NeMo manifest; returns the manifest path."""
    lines = []
    for index in range(count):
        duration = seconds * (1.0 + 0.5 * (index % 3) / 2) if vary else seconds
        path = write_speech_wav(folder / "audio" / f"utt{index:03d}.wav", duration, seed=index)
        lines.append(json.dumps({"audio_filepath": f"audio/{path.name}", "duration": duration}))
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_recipe(path: Path, model: dict, objectives: dict, data: dict, optim: dict, train: dict) -> Path:
    recipe = {
        "model": {**PRETRAIN_MODEL, **model},
        "objectives": objectives,
        "data": {"num_workers": 0, "min_duration": 0.5, "max_duration": 10.0, **data},
        "optim": {"lr": 3e-3, "scheduler": "cosine", "warmup_steps": 2, **optim},
        "train": {"report_to": "none", "log_steps": 1, "eval_batches": 2, "keep_last": 5, **train},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_"))}
    env.update(
        OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT / "tests")
    )
    return env


# ---------------------------------------------------------------------------------------------- tone words
ALPHABET = "abcdefgh"

# A model small enough to train in seconds: 2 Conformer blocks of width 64, 4x subsampling, no dropout.
TINY_CTC_OVERRIDES = (
    "hidden_size=64,num_hidden_layers=2,intermediate_size=128,num_attention_heads=4,subsampling=striding,"
    "subsampling_factor=4,subsampling_conv_channels=32,conv_depthwise_kernel_size=9,hidden_dropout=0.0,"
    "activation_dropout=0.0,attention_dropout=0.0,feat_proj_dropout=0.0,final_dropout=0.0"
)


def letter_chord(letter: str, rng: np.random.Generator) -> np.ndarray:
    """150 ms of the letter's two partials: low in {250..550 Hz} (4 values), high in {1400..3400 Hz}."""
    index = ALPHABET.index(letter)
    low = 250.0 * 1.3 ** (index % 4)
    high = 1400.0 * 1.35 ** (index // 4 * 2 + index % 2)
    t = np.arange(int(0.15 * SAMPLING_RATE)) / SAMPLING_RATE
    envelope = np.sin(np.pi * t / t[-1]) ** 0.5
    jitter = rng.uniform(0.97, 1.03)
    return envelope * (np.sin(2 * np.pi * low * jitter * t) + 0.6 * np.sin(2 * np.pi * high * jitter * t))


def render_tone_words(text: str, rng: np.random.Generator) -> np.ndarray:
    """float32 audio of `text` (letters of ALPHABET and spaces), 100 ms of silence at both ends."""
    parts = [np.zeros(int(0.1 * SAMPLING_RATE))]
    for letter in text:
        if letter == " ":
            parts.append(np.zeros(int(0.12 * SAMPLING_RATE)))
        else:
            parts += [letter_chord(letter, rng), np.zeros(int(0.03 * SAMPLING_RATE))]
    parts.append(np.zeros(int(0.1 * SAMPLING_RATE)))
    audio = np.concatenate(parts)
    audio = audio + 1e-3 * rng.standard_normal(len(audio))
    return (0.4 * audio / np.abs(audio).max()).astype(np.float32)


def random_tone_text(rng: np.random.Generator, alphabet: str = ALPHABET, words: tuple[int, int] = (2, 3)) -> str:
    """`words` (min, max) words of 2-4 letters; no letter doubled (CTC needs a blank between identical chords)."""
    out = []
    for _ in range(int(rng.integers(words[0], words[1] + 1))):
        length, word = int(rng.integers(2, 5)), ""
        while len(word) < length:
            letter = alphabet[int(rng.integers(len(alphabet)))]
            if not word or letter != word[-1]:
                word += letter
        out.append(word)
    return " ".join(out)


def write_tone_corpus(
    folder: Path,
    count: int,
    seed: int = 0,
    alphabet: str = ALPHABET,
    speaker: str | None = None,
    words: tuple[int, int] = (2, 3),
    name: str = "manifest",
) -> Path:
    """Write `count` tone-word WAVs (PCM16) and `folder/<name>.jsonl` (relative paths); returns the manifest."""
    folder = Path(folder)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(count):
        text = random_tone_text(rng, alphabet, words)
        audio = render_tone_words(text, rng)
        path = f"audio/{name}-{speaker or 'utt'}-{index:03d}.wav"
        sf.write(folder / path, audio, SAMPLING_RATE, subtype="PCM_16")
        record = {"audio_filepath": path, "duration": len(audio) / SAMPLING_RATE, "text": text}
        if speaker is not None:
            record["speaker"] = speaker
        lines.append(json.dumps(record))
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def tiny_scratch_args(overrides: str = TINY_CTC_OVERRIDES) -> list[str]:
    """Fine-tuning flags for the tiny model from scratch: the `tiny` preset with `overrides` (the CTC ones)."""
    return ["--from_scratch", "--model_preset", "tiny", f"config_overrides={overrides}"]


OVERFIT_STEPS = 200


def train_tone_ctc(root: Path) -> dict[str, Any]:
    """Fine-tune a tiny CTC model from scratch on 32 tone-word utterances of 1-6 words.

    Varied lengths and enough distinct letter sequences make the model learn the letters rather than memorise
    the utterances, so it also transcribes unseen sequences and long concatenations (the pipeline test needs
    that). Exercises the script end to end: flags without a recipe, SpecAugment (light), encoder frozen for
    5 steps, layer-wise LR decay, group_by_length batches, evaluation every 100 steps with early stopping on
    WER, two eval sets (the training utterances and 8 unseen ones).
    Returns {"output_dir", "manifest" (train), "heldout", "result" (main()'s return value)}.
    """
    manifest = write_tone_corpus(Path(root) / "tones", count=32, seed=0, words=(1, 6), name="train")
    heldout = write_tone_corpus(Path(root) / "tones", count=8, seed=7, words=(1, 6), name="heldout")
    output_dir = Path(root) / "ctc"
    argv = [
        *tiny_scratch_args(),
        "--train_manifests",
        str(manifest),
        "--eval_manifests",
        str(manifest),
        str(heldout),
        "--output_dir",
        str(output_dir),
        "--use_cpu",
        "--seed",
        "0",
        "--max_steps",
        str(OVERFIT_STEPS),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "20",
        "--lr_scheduler_type",
        "linear",
        "--train_sampling_strategy",
        "group_by_length",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "100",
        "--logging_steps",
        "10",
        "--save_strategy",
        "no",
        "early_stopping_patience=5",
        "freeze_encoder_steps=5",
        "layer_decay=0.9",
        "freq_masks=1",
        "freq_width=10",
        "time_masks=1",
        "time_width=0.03",
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
    ]
    result = load_script("finetune_ctc").main(argv)
    return {"output_dir": output_dir, "manifest": manifest, "heldout": heldout, "result": result}
