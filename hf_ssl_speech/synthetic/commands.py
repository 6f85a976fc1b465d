"""A synthetic speech-commands set (keyword spotting, as Google Speech Commands v1 in SUPERB's KS task).

`make_command_set(out_dir, train_voices, test_voices, ...)` writes

    out_dir/audio/<split>-<index>.wav    16 kHz mono PCM16 clips of about 1 s
    out_dir/train.jsonl                  manifests: audio_filepath (relative to out_dir), duration, label, word,
    out_dir/valid.jsonl                             speaker, voice (None for `_silence_` clips)
    out_dir/test.jsonl
    out_dir/summary.json                 parameters, clips per split and label, voices, wall time

Classes: the 12 `COMMAND_WORDS`, `_unknown_` (other words of the sentence grammar's vocabulary) and `_silence_`
(low-level white or pink noise, no speech): `LABELS`, 14 in all.

Speakers. Pseudo-speakers of the demo corpus (`corpus.build_speakers`: accent, rate, pitch, vocal-tract scale per
base voice). train: speakers 0..S-1 of each train voice; valid: speakers S..S+V-1 of the same voices (unseen in
training, same talkers); test: speakers of the test voices, whose talkers must not occur among the train voices.
Every speaker says every command `repeats` times (rate and pitch jittered per clip), `unknown_per_speaker` other
words and owns `silence_per_speaker` noise clips.

Determinism and caching: each clip is planned in the parent from a generator seeded by (seed, split, index) and
rendered by `corpus._render_speech` in workers, so the files do not depend on the worker count. A folder that
already holds a complete set made with the same parameters is reused untouched.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from .corpus import (
    SAMPLE_RATE,
    BaseVoice,
    GeneratedFolder,
    Speaker,
    _clear_folder,
    _default_workers,
    _existing_folder,
    _pink_noise,
    _pool_context,
    _render_speech,
    _write_atomic,
    build_speakers,
    resolve_voices,
    write_clip,
)
from .sentences import SentenceGenerator

FORMAT_VERSION = 1
COMMAND_WORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
LABELS: tuple[str, ...] = (*COMMAND_WORDS, UNKNOWN, SILENCE)
SPLITS = ("train", "valid", "test")
_SPLIT_CODES = {"train": 1, "valid": 2, "test": 3}
# Words that sound like a command: an `_unknown_` clip saying them would be a mislabelled command.
_HOMOPHONES = frozenset({"know", "won", "write", "rite", "wright", "oh", "owe", "yess", "of"})
_MAX_UNKNOWN_LETTERS = 8  # keeps `_unknown_` clips near 1 s like the commands
CLIP_SECONDS = 1.0
_MARKER = ".command_set"
MANIFEST_KEYS = ("audio_filepath", "duration", "label", "word", "speaker", "voice")


class CommandSetError(UserError, RuntimeError):
    """A command-set request that cannot be satisfied; the message names the argument and the fix."""


_FOLDER = GeneratedFolder(
    "a command set", _MARKER, SPLITS, "clips", CommandSetError, "hf_ssl_speech.synthetic.commands"
)


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip; rendering is a pure function of it."""

    id: str
    label: str
    word: str  # what is spoken; "" for silence
    speaker: Speaker | None  # None for silence
    rate: float
    pitch: int | None
    seed: int
    offset: float  # where the word sits in the clip, as a fraction of the free room
    peak_dbfs: float
    floor_db: float  # noise floor below the speech power (speech clips)
    noise_type: str  # "white" or "pink" (silence clips)


def unknown_words() -> list[str]:
    """The `_unknown_` vocabulary: short grammar words that are neither a command nor sound like one (sorted)."""
    vocabulary = SentenceGenerator().vocabulary()
    banned = set(COMMAND_WORDS) | _HOMOPHONES
    return sorted(w for w in vocabulary if w not in banned and "'" not in w and len(w) <= _MAX_UNKNOWN_LETTERS)


def _slots(speakers: Sequence[Speaker], repeats: int, unknown: int, silence: int) -> list[tuple[str, Speaker]]:
    """(label, speaker) of every clip of a split, speaker by speaker."""
    slots = []
    for speaker in speakers:
        slots += [(word, speaker) for _ in range(repeats) for word in COMMAND_WORDS]
        slots += [(UNKNOWN, speaker)] * unknown + [(SILENCE, speaker)] * silence
    return slots


def plan_clip(split: str, index: int, seed: int, label: str, speaker: Speaker, vocabulary: Sequence[str]) -> ClipPlan:
    """Decide clip `index` of `split` from a generator seeded by (seed, split, index) alone."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    if label == UNKNOWN:
        word = vocabulary[int(rng.integers(len(vocabulary)))]
    else:
        word = "" if label == SILENCE else label
    if speaker.voice.engine == "espeak":
        rate = float(np.clip(round(speaker.rate * rng.uniform(0.9, 1.1)), 80, 450))
        pitch = int(np.clip(speaker.pitch + rng.integers(-5, 6), 0, 100))
    else:
        rate, pitch = round(speaker.rate * float(rng.uniform(0.95, 1.05)), 3), None
    silent = label == SILENCE
    return ClipPlan(
        id=f"{split}-{index:06d}",
        label=label,
        word=word,
        speaker=None if silent else speaker,
        rate=rate,
        pitch=pitch,
        seed=int(rng.integers(2**31)),
        offset=round(float(rng.uniform(0.1, 0.9)), 3),
        # silence: noise peaking 30-50 dB below full scale; speech: peaks of -9..-1 dBFS over a faint floor
        peak_dbfs=round(float(rng.uniform(-50.0, -30.0) if silent else rng.uniform(-9.0, -1.0)), 2),
        floor_db=round(float(rng.uniform(40.0, 60.0)), 2),
        noise_type="white" if rng.random() < 0.5 else "pink",
    )


def render_clip(plan: ClipPlan, out_dir: str) -> dict:
    """Render `plan` to `out_dir/audio/<id>.wav`; return its manifest line. Runs in worker processes."""
    rng = np.random.default_rng([plan.seed, 13])
    if plan.speaker is None:
        audio = rng.standard_normal(int(CLIP_SECONDS * SAMPLE_RATE))
        if plan.noise_type == "pink":
            audio = _pink_noise(rng, audio.size)
    else:
        speech = _render_speech(plan.speaker, plan.word, plan.rate, plan.pitch, plan.seed).astype(np.float64)
        size = max(int(CLIP_SECONDS * SAMPLE_RATE), speech.size + int(0.1 * SAMPLE_RATE))  # long words: 50 ms pads
        start = int(plan.offset * (size - speech.size))
        audio = np.zeros(size)
        audio[start : start + speech.size] = speech
        speech_power = np.mean(speech**2) + 1e-12
        audio += rng.standard_normal(size) * np.sqrt(speech_power / 10 ** (plan.floor_db / 10))
    relative, duration = write_clip(audio, plan.peak_dbfs, f"audio/{plan.id}.wav", out_dir)
    return {
        "audio_filepath": relative,
        "duration": duration,
        "label": plan.label,
        "word": plan.word,
        "speaker": None if plan.speaker is None else plan.speaker.id,
        "voice": None if plan.speaker is None else plan.speaker.voice.id,
    }


def _render_star(args: tuple[ClipPlan, str]) -> dict:
    return render_clip(*args)


def _split_speakers(
    train_voices: Sequence[BaseVoice],
    test_voices: Sequence[BaseVoice],
    speakers_per_voice: int,
    valid_speakers_per_voice: int,
    test_speakers_per_voice: int,
) -> dict[str, list[Speaker]]:
    # build_speakers is stable (speaker k of a voice does not depend on how many are built), so the valid speakers
    # are the ones after the train speakers of the same voices.
    both = build_speakers(train_voices, speakers_per_voice + valid_speakers_per_voice)
    per_voice = speakers_per_voice + valid_speakers_per_voice
    train = [s for i, s in enumerate(both) if i % per_voice < speakers_per_voice]
    valid = [s for i, s in enumerate(both) if i % per_voice >= speakers_per_voice]
    return {"train": train, "valid": valid, "test": build_speakers(test_voices, test_speakers_per_voice)}


def make_command_set(
    out_dir: str | os.PathLike,
    train_voices: Sequence[str],
    test_voices: Sequence[str],
    *,
    speakers_per_voice: int = 4,
    valid_speakers_per_voice: int = 1,
    test_speakers_per_voice: int | None = None,
    repeats: int = 1,
    unknown_per_speaker: int = 4,
    silence_per_speaker: int = 1,
    seed: int = 0,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate (or reuse) a speech-commands set in `out_dir` and return its summary dict.

    Args:
        out_dir: destination folder (created); a complete set with the same parameters there is returned as is.
        train_voices: voice ids (as `corpus.resolve_voices` knows them, e.g. "espeak:m3", "flite:slt") whose
            pseudo-speakers speak the train and valid clips.
        test_voices: voice ids of the test clips; none may share a talker with a train voice.
        speakers_per_voice: train pseudo-speakers per train voice.
        valid_speakers_per_voice: further pseudo-speakers per train voice for the valid split (0: no valid split).
        test_speakers_per_voice: pseudo-speakers per test voice (None: `speakers_per_voice`).
        repeats: times each speaker says each command.
        unknown_per_speaker: `_unknown_` clips per speaker; silence_per_speaker: `_silence_` clips per speaker.
        seed: the same seed and parameters give byte-identical clips and manifests.
        num_workers: rendering processes (default: the CPUs this process may use); output does not depend on it.
        overwrite: replace a set made with other parameters in `out_dir`.
        progress: show a tqdm bar.
    """
    start = time.perf_counter()
    out_path = Path(out_dir)
    test_speakers_per_voice = speakers_per_voice if test_speakers_per_voice is None else test_speakers_per_voice
    for name, value, low in (
        ("speakers_per_voice", speakers_per_voice, 1),
        ("valid_speakers_per_voice", valid_speakers_per_voice, 0),
        ("test_speakers_per_voice", test_speakers_per_voice, 1),
        ("repeats", repeats, 1),
        ("unknown_per_speaker", unknown_per_speaker, 0),
        ("silence_per_speaker", silence_per_speaker, 0),
    ):
        if value < low:
            raise CommandSetError(f"{name}={value}: must be >= {low}")
    if not train_voices or not test_voices:
        raise CommandSetError(
            f"train_voices={list(train_voices)}, test_voices={list(test_voices)}: both need at least one voice id "
            "such as espeak:m3"
        )
    params = {
        "format_version": FORMAT_VERSION,
        "train_voices": list(train_voices),
        "test_voices": list(test_voices),
        "speakers_per_voice": int(speakers_per_voice),
        "valid_speakers_per_voice": int(valid_speakers_per_voice),
        "test_speakers_per_voice": int(test_speakers_per_voice),
        "repeats": int(repeats),
        "unknown_per_speaker": int(unknown_per_speaker),
        "silence_per_speaker": int(silence_per_speaker),
        "seed": int(seed),
        "labels": list(LABELS),
        "sample_rate": SAMPLE_RATE,
    }
    existing = _existing_folder(out_path, params, overwrite, _FOLDER)
    if existing is not None:
        return existing  # reusing needs no synthesiser

    train_base = resolve_voices("auto", list(train_voices))
    test_base = resolve_voices("auto", list(test_voices))
    shared = sorted({v.talker for v in train_base} & {v.talker for v in test_base})
    if shared:
        clashing = [v.id for v in test_base if v.talker in shared]
        raise CommandSetError(
            f"test_voices={list(test_voices)}: {clashing} share a talker ({shared}) with train_voices; hold out "
            "other voices or drop them from train_voices"
        )
    speakers = _split_speakers(
        train_base, test_base, speakers_per_voice, valid_speakers_per_voice, test_speakers_per_voice
    )
    vocabulary = unknown_words()
    plans = {
        split: [
            plan_clip(split, i, seed, label, speaker, vocabulary)
            for i, (label, speaker) in enumerate(
                _slots(speakers[split], repeats, unknown_per_speaker, silence_per_speaker)
            )
        ]
        for split in SPLITS
    }
    _clear_folder(out_path, overwrite, _FOLDER)
    workers = num_workers or _default_workers()
    total = sum(len(p) for p in plans.values())
    bar = tqdm(total=total, unit="clip", desc="command set", disable=not progress)
    pool = _pool_context().Pool(workers) if workers > 1 else None
    records: dict[str, list[dict]] = {}
    try:
        for split in SPLITS:
            jobs = [(plan, str(out_path)) for plan in plans[split]]
            results = pool.imap(_render_star, jobs, chunksize=8) if pool is not None else map(_render_star, jobs)
            records[split] = []
            for record in results:
                records[split].append(record)
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    for split in SPLITS:
        _write_atomic(out_path / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records[split]))
    summary = {
        "params": params,
        "splits": {
            split: {
                "clips": len(rows),
                "minutes": round(sum(r["duration"] for r in rows) / 60.0, 3),
                "labels": dict(sorted(Counter(r["label"] for r in rows).items())),
                "speakers": sorted({r["speaker"] for r in rows if r["speaker"] is not None}),
                "voices": sorted({r["voice"] for r in rows if r["voice"] is not None}),
            }
            for split, rows in records.items()
        },
        "unknown_vocabulary": len(vocabulary),
        "workers": workers,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "generator": "hf_ssl_speech.synthetic.commands",
    }
    _write_atomic(out_path / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["COMMAND_WORDS", "LABELS", "SILENCE", "UNKNOWN", "CommandSetError", "make_command_set", "unknown_words"]
