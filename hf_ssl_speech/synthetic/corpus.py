"""Built-in demo corpus: multi-voice English speech with transcripts, made offline and deterministically.

`make_demo_corpus(out_dir, minutes, seed)` writes

    out_dir/audio/<id>.wav        16 kHz mono PCM16
    out_dir/pretrain.jsonl        NeMo manifests: audio_filepath (relative to out_dir), duration, text,
    out_dir/finetune.jsonl                        speaker, voice
    out_dir/valid.jsonl
    out_dir/test.jsonl
    out_dir/summary.json          parameters, minutes / speakers / voices per split, engines, wall time

Voices. espeak-ng (always; pip-only through `espeakng-loader`, see `tts_espeak`) gives formant "talkers"
(its voice variants m1..m8, f1..f5, klatt..., each with its own formants and pitch) that can speak with 8
English accents. Recorded-voice engines are used when installed and never required: `flite` (slt, rms, awb,
kal16), `festival` (kallpc16k, kdlpc16k, us-slt-hts, rablpc16k, don, and the MBROLA diphone voices us1, us2,
us3, en1) and SVOX `pico` (en-US, en-GB), voices built from real talkers; `scripts/setup_voices.sh` installs
them all from Debian.

Speakers. Each base voice becomes several pseudo-speakers: an accent (espeak), a speaking rate, a pitch and a
vocal-tract-length factor. The last one resamples the waveform by 0.88-0.96 or 1.04-1.12 (and plays it back
at 16 kHz), which scales every formant like a shorter or longer vocal tract. Speaker ids are stable strings
derived from the voice and the speaker's index; the roster does not depend on the corpus seed.

Splits. Whole talkers are held out for the test split (`test_voices`): none of their speakers appears in
pretrain or finetune, so test WER measures unseen talkers. Other whole talkers are held out for the validation
split (`valid_voices`), which fine-tuning selects its checkpoint and early-stops on: choosing on test would make
test WER an optimistic, selected figure. Validation talkers are neither test nor training talkers. Voices of
different engines built from the same person (flite slt and festival us-slt-hts, flite kal16 and festival
kallpc16k) are held out together. pretrain and finetune are disjoint utterance sets over the same training
talkers.

Determinism. Every utterance is decided in the parent process from its own generator seeded by
(seed, split, index): speaker, text, jitter, padding, gain, noise. Workers only render, each utterance in a
freshly loaded espeak (see `tts_espeak`), so the files are byte-identical for a seed whatever the worker
count. A split stops at the first utterance that makes its cumulative duration reach the target.
"""

from __future__ import annotations

import argparse
import html
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm.auto import tqdm

from ..errors import UserError
from .espeak import ESPEAK_ACCENTS, EspeakError, check_espeak, espeak_variants, synthesize_espeak
from .sentences import SentenceGenerator

SAMPLE_RATE = 16000
FORMAT_VERSION = 1
SPLITS = ("test", "valid", "finetune", "pretrain")  # generation order: the small splits first
# valid has a code of its own (4): adding it left the seeds, hence the plans, of the other splits unchanged
_SPLIT_CODES = {"test": 1, "finetune": 2, "pretrain": 3, "valid": 4}
_MEAN_UTTERANCE_S = 6.8  # measured mean utterance length with the default sentence mix (sizes batches)
_MARKER = ".demo_corpus"  # written first: a folder holding it may be regenerated over
_ROSTER_SEED = 20240917  # fixes the speaker roster independently of the corpus seed

# espeak variants used as talkers: the standard male/female/klatt sets plus community variants with natural
# settings (no whisper, robot, or breathy-only voices).
ESPEAK_TALKERS: tuple[str, ...] = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "croak",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt4",
    "klatt5",
    "klatt6",
    "Andrea",
    "belinda",
    "steph",
    "grandma",
    "anika",
    "zac",
    "ed",
    "grandpa",
    "michel",
    "paul",
    "quincy",
    "robert",
    "travis",
    "Denis",
    "Michael",
    "Lee",
)

# Recorded-voice engines: voice id -> (talker, engine-specific voice name).
FLITE_VOICES: dict[str, tuple[str, str]] = {
    "flite:slt": ("slt", "slt"),
    "flite:rms": ("rms", "rms"),
    "flite:awb": ("awb", "awb"),
    "flite:kal16": ("kal", "kal16"),
}
# festival's own diphone and HTS voices, and the MBROLA diphone databases us1/us2/us3/en1 through festival's
# MBROLA front end (Debian contrib/non-free: festvox-us1 ... festvox-en1 pull mbrola and its voice data).
FESTIVAL_VOICES: dict[str, tuple[str, str]] = {
    "festival:kallpc16k": ("kal", "kal_diphone"),
    "festival:kdlpc16k": ("ked", "ked_diphone"),
    "festival:us-slt-hts": ("slt", "cmu_us_slt_arctic_hts"),
    "festival:rablpc16k": ("rab", "rab_diphone"),
    "festival:don": ("don", "don_diphone"),
    "festival:us1-mbrola": ("mbrola-us1", "us1_mbrola"),
    "festival:us2-mbrola": ("mbrola-us2", "us2_mbrola"),
    "festival:us3-mbrola": ("mbrola-us3", "us3_mbrola"),
    "festival:en1-mbrola": ("mbrola-en1", "en1_mbrola"),
}
# SVOX Pico (Debian non-free: libttspico-utils): two female talkers, American and British.
PICO_VOICES: dict[str, tuple[str, str]] = {
    "pico:en-US": ("pico-lh0", "en-US"),
    "pico:en-GB": ("pico-kh0", "en-GB"),
}
ENGINES = ("espeak", "flite", "festival", "pico")
# Installs every recorded voice above (the experiment's set-up step: scripts/setup_voices.sh).
RECORDED_VOICES_HINT = (
    "bash scripts/setup_voices.sh (apt-get install flite festival festvox-* mbrola-* libttspico-utils, "
    "with Debian contrib/non-free enabled)"
)

# Held out by default: two female, one male and one klatt espeak talker, one recorded male per engine.
DEFAULT_TEST_VOICES: tuple[str, ...] = (
    "espeak:f2",
    "espeak:m5",
    "espeak:klatt2",
    "espeak:steph",
    "flite:rms",
    "festival:kdlpc16k",
)
# Held out for validation by default, mirroring the test set's mix: two female, one male and one klatt espeak
# talker, one recorded male per engine; none shares a talker with DEFAULT_TEST_VOICES.
DEFAULT_VALID_VOICES: tuple[str, ...] = (
    "espeak:f4",
    "espeak:m3",
    "espeak:klatt4",
    "espeak:belinda",
    "flite:awb",
    "festival:don",
)
NOISE_TYPES = ("white", "pink", "babble")

MANIFEST_KEYS = ("audio_filepath", "duration", "text", "speaker", "voice")


class DemoCorpusError(UserError, RuntimeError):
    """A demo-corpus request that cannot be satisfied; the message names the argument and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Voices and speakers
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseVoice:
    """One voice of one engine. `talker` names the person or formant set behind it (the hold-out unit)."""

    engine: str
    name: str
    talker: str

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}"


@dataclass(frozen=True)
class Speaker:
    """A pseudo-speaker: a base voice rendered with fixed accent, rate, pitch and vocal-tract scale.

    `rate` is words per minute for espeak and a duration stretch (1.0 = as recorded) for recorded engines;
    `pitch` / `pitch_range` are espeak's 0..100 parameters (None for recorded engines).
    """

    id: str
    voice: BaseVoice
    accent: str | None
    vtl_scale: float
    rate: float
    pitch: int | None
    pitch_range: int | None


def _flite_voices_installed() -> set[str]:
    flite = shutil.which("flite")
    if flite is None:
        return set()
    listing = subprocess.run([flite, "-lv"], capture_output=True, text=True, check=False).stdout
    names = set(listing.replace("Voices available:", "").split())
    return {vid for vid, (_, name) in FLITE_VOICES.items() if name in names}


def _festival_voices_installed() -> set[str]:
    if shutil.which("text2wave") is None:
        return set()
    roots = [Path("/usr/share/festival/voices"), Path("/usr/lib/festival/voices")]
    found = {p.name for root in roots if root.is_dir() for p in root.glob("*/*") if p.is_dir()}
    return {vid for vid, (_, name) in FESTIVAL_VOICES.items() if name in found}


def _pico_voices_installed() -> set[str]:
    if shutil.which("pico2wave") is None:
        return set()
    roots = [Path("/usr/share/pico/lang"), Path("/usr/lib/pico/lang")]
    found = {p.name.split("_", 1)[0] for root in roots if root.is_dir() for p in root.glob("*_sg.bin")}
    return {vid for vid, (_, name) in PICO_VOICES.items() if name in found}


def resolve_voices(engines: str | Sequence[str] = "auto", voices: Sequence[str] | None = None) -> list[BaseVoice]:
    """The base voices to use.

    Args:
        engines: "auto" (espeak plus every recorded engine found on PATH) or a list from `ENGINES`; an
            explicitly named engine that is not installed is an error.
        voices: optional subset of voice ids ("espeak:m3", "flite:slt", ...) to restrict to.
    """
    check_espeak()  # raises EspeakError with the fix when the pip wheel is missing or broken
    installed_variants = set(espeak_variants())
    if engines == "auto":
        wanted = list(ENGINES)
    else:
        wanted = [engines] if isinstance(engines, str) else list(engines)
        unknown = [e for e in wanted if e not in ENGINES]
        if unknown:
            raise DemoCorpusError(f"engines={wanted}: unknown engine(s) {unknown}; choose from {ENGINES} or 'auto'")
    found: list[BaseVoice] = []
    if "espeak" in wanted:
        found += [BaseVoice("espeak", v, v.lower()) for v in ESPEAK_TALKERS if v in installed_variants]
    for engine, table, installed, hint in (
        ("flite", FLITE_VOICES, _flite_voices_installed, "apt-get install flite"),
        ("festival", FESTIVAL_VOICES, _festival_voices_installed, RECORDED_VOICES_HINT),
        ("pico", PICO_VOICES, _pico_voices_installed, RECORDED_VOICES_HINT),
    ):
        if engine not in wanted:
            continue
        present = installed()
        if not present and engines != "auto":
            raise DemoCorpusError(f"engines={wanted}: engine {engine!r} is not installed; `{hint}` or drop it")
        found += [BaseVoice(engine, vid.split(":", 1)[1], table[vid][0]) for vid in table if vid in present]
    if voices is not None:
        by_id = {v.id: v for v in found}
        missing = [v for v in voices if v not in by_id]
        if missing:
            raise DemoCorpusError(f"voices={list(voices)}: {missing} not available; available: {sorted(by_id)}")
        found = [by_id[v] for v in voices]
    if not found:
        raise DemoCorpusError(f"engines={engines!r}, voices={voices!r}: no voice is available")
    return found


def _stable_rng(*keys: str | int) -> np.random.Generator:
    """A generator seeded from strings and ints in a way that is stable across runs (unlike hash())."""
    return np.random.default_rng([_ROSTER_SEED] + [zlib.crc32(str(k).encode()) for k in keys])


def build_speakers(voices: Sequence[BaseVoice], speakers_per_voice: int) -> list[Speaker]:
    """Pseudo-speakers for each base voice; speaker k of a voice is the same whichever other voices exist.

    Speaker 0 keeps the voice's own vocal tract (scale 1.0); odd speakers get a scale of 0.88-0.96 (formants
    lowered, like a longer vocal tract), even ones 1.04-1.12 (raised, like a shorter one); see `_to_16k`.
    espeak speakers of one talker get distinct accents.
    """
    speakers = []
    for voice in voices:
        rng = _stable_rng(voice.id)
        accents = [ESPEAK_ACCENTS[i] for i in rng.permutation(len(ESPEAK_ACCENTS))]
        for k in range(speakers_per_voice):
            if k == 0:
                scale = 1.0
            elif k % 2 == 1:
                scale = float(rng.uniform(0.88, 0.96))
            else:
                scale = float(rng.uniform(1.04, 1.12))
            if voice.engine == "espeak":
                accent = accents[k % len(accents)]
                speaker_id = f"espeak-{voice.name.lower()}-{accent}-{k}"
                rate, pitch, pitch_range = (
                    float(rng.integers(130, 181)),
                    int(rng.integers(35, 66)),
                    int(rng.integers(30, 91)),
                )
            else:
                accent, pitch, pitch_range = None, None, None
                speaker_id = f"{voice.engine}-{voice.name}-{k}"
                rate = float(rng.uniform(0.85, 1.15))
            speakers.append(Speaker(speaker_id, voice, accent, round(scale, 3), round(rate, 3), pitch, pitch_range))
    return speakers


def split_voices(voices: Sequence[BaseVoice], test_voices: Sequence[str] | None) -> tuple[list, list]:
    """(train voices, test voices): every voice whose talker matches a held-out voice's talker is held out.

    Args:
        voices: the available base voices (`resolve_voices`).
        test_voices: voice ids to hold out; None = `DEFAULT_TEST_VOICES` that are available.
    """
    train, _, test = hold_out_voices(voices, test_voices, [])
    return train, test


def hold_out_voices(
    voices: Sequence[BaseVoice], test_voices: Sequence[str] | None, valid_voices: Sequence[str] | None
) -> tuple[list[BaseVoice], list[BaseVoice], list[BaseVoice]]:
    """(train, valid, test) voices: whole talkers are held out for test and, disjoint from them, for validation.

    Args:
        voices: the available base voices (`resolve_voices`).
        test_voices: voice ids held out for test; None = `DEFAULT_TEST_VOICES` that are available.
        valid_voices: voice ids held out for validation; None = `DEFAULT_VALID_VOICES` that are available and
            share no talker with a test voice; [] = no validation talkers.
    """
    by_id = {v.id: v for v in voices}

    def chosen(ids: Sequence[str], field: str) -> list[BaseVoice]:
        missing = [v for v in ids if v not in by_id]
        if missing:
            raise DemoCorpusError(f"{field}={list(ids)}: {missing} not available; choose from {sorted(by_id)}")
        return [by_id[v] for v in ids]

    test = chosen([v for v in DEFAULT_TEST_VOICES if v in by_id] if test_voices is None else test_voices, "test_voices")
    test_talkers = {v.talker for v in test}
    if valid_voices is None:
        valid = [by_id[v] for v in DEFAULT_VALID_VOICES if v in by_id and by_id[v].talker not in test_talkers]
    else:
        valid = chosen(valid_voices, "valid_voices")
        shared = [v.id for v in valid if v.talker in test_talkers]
        if shared:
            raise DemoCorpusError(
                f"valid_voices={list(valid_voices)}: {shared} share a talker with the test voices "
                f"{[v.id for v in test]}; validation and test talkers must differ, choose other valid_voices"
            )
    valid_talkers = {v.talker for v in valid}
    return (
        [v for v in voices if v.talker not in test_talkers | valid_talkers],
        [v for v in voices if v.talker in valid_talkers],
        [v for v in voices if v.talker in test_talkers],
    )


# ---------------------------------------------------------------------------------------------------------------
# Utterance plans (parent process) and rendering (workers)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BabblePart:
    speaker: Speaker
    text: str
    seed: int


@dataclass(frozen=True)
class UtterancePlan:
    """Everything needed to render one file; rendering is a pure function of it."""

    id: str
    split: str
    text: str  # transcript (normalised)
    synth_text: str  # what the engine reads: the sentences with full stops for natural pauses
    speaker: Speaker
    rate: float  # the speaker's rate with this utterance's jitter
    pitch: int | None
    seed: int
    lead_s: float  # silence before and after the speech
    trail_s: float
    peak_dbfs: float
    floor_db: float  # level of a faint white noise floor below the speech (espeak pauses are exact zeros)
    noise_type: str | None
    snr_db: float | None
    babble: tuple[BabblePart, ...]


def _sentences(generator: SentenceGenerator, rng: np.random.Generator) -> list[str]:
    """1-4 sentences totalling about 6-30 words, so utterances span roughly 2-12 seconds."""
    target_words = int(rng.integers(6, 31))
    sentences = [generator.sentence(rng)]
    while sum(len(s.split()) for s in sentences) < target_words and len(sentences) < 4:
        sentences.append(generator.sentence(rng))
    return sentences


def plan_utterance(
    split: str,
    index: int,
    seed: int,
    speakers: Sequence[Speaker],
    babble_speakers: Sequence[Speaker],
    generator: SentenceGenerator,
    noise_fraction: float,
    noise_types: Sequence[str],
    snr_db: tuple[float, float],
    recorded_share: float | None = None,
) -> UtterancePlan:
    """Decide utterance `index` of `split` from a generator seeded by (seed, split, index) alone.

    The speaker is uniform over `speakers`, or, with `recorded_share`, drawn from the recorded-voice speakers
    with that probability and from the espeak ones otherwise (when both kinds are present).
    """
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    pool = list(speakers)
    if recorded_share is not None:
        recorded = [s for s in speakers if s.voice.engine != "espeak"]
        formant = [s for s in speakers if s.voice.engine == "espeak"]
        if recorded and formant:
            pool = recorded if rng.random() < recorded_share else formant
    speaker = pool[int(rng.integers(len(pool)))]
    sentences = _sentences(generator, rng)
    if speaker.voice.engine == "espeak":
        rate = float(np.clip(round(speaker.rate * rng.uniform(0.93, 1.07)), 80, 450))
        pitch = int(np.clip(speaker.pitch + rng.integers(-4, 5), 0, 100))
    else:
        rate, pitch = round(speaker.rate * float(rng.uniform(0.95, 1.05)), 3), None
    lead_s, trail_s = (round(float(x), 3) for x in rng.uniform(0.05, 0.3, size=2))
    peak_dbfs = round(float(rng.uniform(-9.0, -1.0)), 2)
    floor_db = round(float(rng.uniform(50.0, 70.0)), 2)
    noise_type, snr, babble = None, None, ()
    if rng.random() < noise_fraction:
        noise_type = noise_types[int(rng.integers(len(noise_types)))]
        snr = round(float(rng.uniform(*snr_db)), 2)
        if noise_type == "babble":
            babble = tuple(
                BabblePart(
                    babble_speakers[int(rng.integers(len(babble_speakers)))],
                    ". ".join(_sentences(generator, rng)) + ".",
                    int(rng.integers(2**31)),
                )
                for _ in range(int(rng.integers(3, 6)))
            )
    return UtterancePlan(
        id=f"{split}-{index:06d}",
        split=split,
        text=" ".join(sentences),
        synth_text=". ".join(sentences) + ".",
        speaker=speaker,
        rate=rate,
        pitch=pitch,
        seed=int(rng.integers(2**31)),
        lead_s=lead_s,
        trail_s=trail_s,
        peak_dbfs=peak_dbfs,
        floor_db=floor_db,
        noise_type=noise_type,
        snr_db=snr,
        babble=babble,
    )


def _run_recorder(command: list[str], wav_path: Path) -> tuple[np.ndarray, int]:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not wav_path.is_file():
        raise DemoCorpusError(f"{command[0]} failed (exit {result.returncode}): {result.stderr.strip()[-400:]}")
    audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def _synthesize(speaker: Speaker, text: str, rate: float, pitch: int | None, seed: int) -> tuple[np.ndarray, int]:
    """Raw engine output as float32 in [-1, 1] and its sample rate."""
    engine = speaker.voice.engine
    if engine == "espeak":
        voice = f"{speaker.accent}+{speaker.voice.name}"
        samples, sample_rate = synthesize_espeak(
            text, voice, rate=int(rate), pitch=int(pitch), pitch_range=int(speaker.pitch_range), seed=seed
        )
        return samples.astype(np.float32) / 32768.0, sample_rate
    with tempfile.TemporaryDirectory(prefix="demo_corpus_") as tmp:
        wav_path = Path(tmp) / "out.wav"
        if engine == "flite":
            name = FLITE_VOICES[speaker.voice.id][1]
            command = ["flite", "-voice", name, "--setf", f"duration_stretch={rate}", "-t", text, "-o", str(wav_path)]
        elif engine == "festival":
            name = FESTIVAL_VOICES[speaker.voice.id][1]
            text_path = Path(tmp) / "text.txt"
            text_path.write_text(text + "\n")
            command = [
                "text2wave",
                "-eval",
                f"(voice_{name})",
                "-eval",
                f"(Parameter.set 'Duration_Stretch {rate})",
                "-o",
                str(wav_path),
                str(text_path),
            ]
        elif engine == "pico":
            # pico2wave has no rate flag; its SVOX markup sets speed in percent (100 = as recorded)
            name = PICO_VOICES[speaker.voice.id][1]
            markup = f"<speed level='{round(100 / rate)}'>{html.escape(text)}</speed>"
            command = ["pico2wave", "-l", name, "-w", str(wav_path), markup]
        else:
            raise DemoCorpusError(f"speaker {speaker.id}: unknown engine {engine!r}; choose from {ENGINES}")
        return _run_recorder(command, wav_path)


def _trim(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Cut leading and trailing near-silence (below `threshold` of the peak); the plan adds its own padding."""
    loud = np.flatnonzero(np.abs(audio) > threshold * max(float(np.abs(audio).max()), 1e-9))
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


def _to_16k(audio: np.ndarray, sample_rate: int, vtl_scale: float) -> np.ndarray:
    """Resample to 16 kHz, treating the input as if recorded at `sample_rate * vtl_scale`.

    Declaring an input rate `vtl_scale` times the true one plays the signal `vtl_scale` times faster: every
    frequency, formants included, is multiplied by `vtl_scale` and the duration divided by it. Formant
    frequencies scale inversely with vocal-tract length, so scale > 1 sounds like a shorter tract and scale < 1
    like a longer one (pitch moves too; the speaker's pitch setting varies it independently). One soxr call
    does both the shift and the rate conversion.
    """
    return soxr.resample(audio, sample_rate * vtl_scale, SAMPLE_RATE, quality="HQ").astype(np.float32)


def _render_speech(speaker: Speaker, text: str, rate: float, pitch: int | None, seed: int) -> np.ndarray:
    audio, sample_rate = _synthesize(speaker, text, rate, pitch, seed)
    return _to_16k(_trim(audio), sample_rate, speaker.vtl_scale)


def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """1/f noise: white noise shaped by 1/sqrt(f) in the frequency domain (power falls 3 dB per octave)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(freqs), n)


def _noise(plan: UtterancePlan, n: int) -> np.ndarray:
    rng = np.random.default_rng([plan.seed, 7])
    if plan.noise_type == "white":
        return rng.standard_normal(n)
    if plan.noise_type == "pink":
        return _pink_noise(rng, n)
    # babble: several other talkers, each at equal power, each looped from a random offset
    mix = np.zeros(n)
    for part in plan.babble:
        voice = _render_speech(part.speaker, part.text, part.speaker.rate, part.speaker.pitch, part.seed)
        voice = voice / (np.sqrt(np.mean(voice.astype(np.float64) ** 2)) + 1e-12)
        reps = int(np.ceil(n / voice.size)) + 1
        start = int(rng.integers(voice.size))
        mix += np.tile(voice, reps)[start : start + n]
    return mix


def _write_wav(path: Path, pcm: np.ndarray) -> None:
    """Canonical 44-byte-header PCM16 mono WAV at 16 kHz.

    Written by hand rather than with soundfile.write, whose close() fsyncs every file (4 ms each here).
    """
    data = pcm.astype("<i2").tobytes()
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(data),
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        SAMPLE_RATE,
        SAMPLE_RATE * 2,
        2,
        16,  # PCM, mono, rate, byte rate, block align, bits
        b"data",
        len(data),
    )
    path.write_bytes(header + data)


def render_audio(plan: UtterancePlan, speech: np.ndarray | None = None) -> np.ndarray:
    """The waveform of `plan` (float64, 16 kHz) before `write_clip` scales it: padding, noise floor, noise.

    `speech` is the engine's trimmed 16 kHz speech when the caller rendered it already (the phone alignment of
    `synthetic.alignment` does, to keep espeak's phoneme events); None renders it here.
    """
    if speech is None:
        speech = _render_speech(plan.speaker, plan.synth_text, plan.rate, plan.pitch, plan.seed)
    speech = speech.astype(np.float64)
    lead, trail = int(plan.lead_s * SAMPLE_RATE), int(plan.trail_s * SAMPLE_RATE)
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    speech_power = np.mean(speech**2) + 1e-12  # SNRs are measured against the speech, not the padded file
    floor = np.random.default_rng([plan.seed, 11]).standard_normal(audio.size)
    audio = audio + floor * np.sqrt(speech_power / 10 ** (plan.floor_db / 10))
    if plan.noise_type is not None:
        noise = _noise(plan, audio.size)
        noise_power = np.mean(noise**2) + 1e-12
        audio = audio + noise * np.sqrt(speech_power / (noise_power * 10 ** (plan.snr_db / 10)))
    return audio


def render_utterance(plan: UtterancePlan, out_dir: str) -> dict:
    """Render `plan` to `out_dir/audio/<id>.wav`; return its manifest line. Runs in worker processes."""
    relative, duration = write_clip(render_audio(plan), plan.peak_dbfs, f"audio/{plan.id}.wav", out_dir)
    return {
        "audio_filepath": relative,
        "duration": duration,
        "text": plan.text,
        "speaker": plan.speaker.id,
        "voice": plan.speaker.voice.id,
        "_noise": plan.noise_type,
    }


def _render_star(args: tuple[UtterancePlan, str]) -> dict:
    return render_utterance(*args)


# ---------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork on Linux: workers inherit the imported package instead of re-importing transformers/torch (~3 s and
    # ~350 MB each). Workers touch only numpy, soxr, soundfile and the espeak library, never torch threads.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


def _read_summary(out_dir: Path) -> dict | None:
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


@dataclass(frozen=True)
class GeneratedFolder:
    """What a generator writes into its folder, for reusing, refusing or clearing one: the manifests of `splits`
    (each with `summary["splits"][split][count_key]` lines), summary.json, audio/ and the `marker` file."""

    what: str  # "a demo corpus", in error messages
    marker: str
    splits: tuple[str, ...]
    count_key: str
    error: type[Exception]
    writer: str  # the module named in the marker file


def _is_complete(out_dir: Path, summary: dict, layout: GeneratedFolder) -> bool:
    """Every manifest holds the summary's count and every listed audio file exists."""
    try:
        for split in layout.splits:
            manifest = out_dir / f"{split}.jsonl"
            if not manifest.is_file():
                return False
            lines = manifest.read_text().splitlines()
            if len(lines) != summary["splits"][split][layout.count_key]:
                return False
            if not all((out_dir / json.loads(line)["audio_filepath"]).is_file() for line in lines):
                return False
    except (KeyError, TypeError, json.JSONDecodeError):
        return False
    return True


def _existing_folder(out_dir: Path, params: dict, overwrite: bool, layout: GeneratedFolder) -> dict | None:
    """The summary of a complete folder made with the same params in `out_dir`, if there is one.

    One made with other parameters is an error unless `overwrite` (it is then rebuilt).
    """
    summary = _read_summary(out_dir)
    if summary is None:
        return None
    if summary.get("params") == params:
        return summary if _is_complete(out_dir, summary, layout) else None
    if not overwrite:
        old = summary.get("params") or {}
        differing = sorted(k for k in params if old.get(k) != params[k])
        raise layout.error(
            f"out_dir={str(out_dir)!r} already holds {layout.what} made with different parameters {differing}; "
            "choose another out_dir or pass overwrite=True (--overwrite) to replace it"
        )
    return None


def _clear_folder(out_dir: Path, overwrite: bool, layout: GeneratedFolder) -> None:
    """Remove a previous (or partial) folder's outputs and mark the folder as ours; never foreign audio."""
    audio_dir = out_dir / "audio"
    ours = (out_dir / layout.marker).is_file() or (out_dir / "summary.json").is_file()
    if audio_dir.is_dir() and any(audio_dir.iterdir()) and not ours and not overwrite:
        raise layout.error(
            f"out_dir={str(out_dir)!r} has an audio/ folder that this generator did not write; "
            "choose an empty out_dir or pass overwrite=True (--overwrite)"
        )
    if audio_dir.is_dir():
        shutil.rmtree(audio_dir)
    for name in ["summary.json"] + [f"{s}.jsonl" for s in layout.splits]:
        (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / layout.marker).write_text(f"folder written by {layout.writer}; safe to regenerate\n")
    audio_dir.mkdir()


_CORPUS_FOLDER = GeneratedFolder(
    "a demo corpus", _MARKER, SPLITS, "utterances", DemoCorpusError, "hf_ssl_speech.synthetic.corpus"
)


def to_pcm16(audio: np.ndarray, peak_dbfs: float) -> np.ndarray:
    """`audio` scaled to a peak of `peak_dbfs` and quantised to int16: the samples `write_clip` writes."""
    audio = audio * (10 ** (peak_dbfs / 20) / (np.abs(audio).max() + 1e-12))
    return np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)


def write_clip(audio: np.ndarray, peak_dbfs: float, relative: str, out_dir: str | os.PathLike) -> tuple[str, float]:
    """Scale `audio` to `peak_dbfs`, write it as 16 kHz PCM16 at `out_dir/relative`; returns (relative, seconds)."""
    pcm = to_pcm16(audio, peak_dbfs)
    _write_wav(Path(out_dir) / relative, pcm)
    return relative, round(pcm.size / SAMPLE_RATE, 6)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def make_demo_corpus(
    out_dir: str | os.PathLike,
    minutes: float,
    seed: int = 0,
    *,
    finetune_fraction: float = 0.2,
    test_fraction: float = 0.1,
    test_voices: Sequence[str] | None = None,
    valid_fraction: float = 0.1,
    valid_voices: Sequence[str] | None = None,
    engines: str | Sequence[str] = "auto",
    voices: Sequence[str] | None = None,
    speakers_per_voice: int = 3,
    recorded_share: float | None = None,
    noise_fraction: float = 0.0,
    noise_types: Sequence[str] = NOISE_TYPES,
    snr_db: tuple[float, float] = (5.0, 20.0),
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate (or reuse) a demo corpus in `out_dir` and return its summary dict.

    Args:
        out_dir: destination folder (created). If it already holds a complete corpus with the same parameters,
            that corpus is returned untouched.
        minutes: total audio minutes over the three splits (each split overshoots by at most one utterance).
        seed: corpus seed; the same seed and parameters give byte-identical audio and manifests.
        finetune_fraction, test_fraction: shares of `minutes` for finetune.jsonl and test.jsonl; pretrain.jsonl
            gets the rest. pretrain and finetune never share an utterance.
        test_voices: voice ids held out for the test split (with every voice of the same talker); None =
            `DEFAULT_TEST_VOICES` that are available.
        valid_fraction: share of `minutes` for valid.jsonl, spoken by other held-out talkers (`valid_voices`);
            0 = no validation split (no valid.jsonl, and the parameters of a corpus made before it existed).
        valid_voices: voice ids held out for validation (with every voice of the same talker), none of a test
            talker; None = `DEFAULT_VALID_VOICES` that are available and not test talkers.
        engines: "auto" (espeak + installed recorded engines) or a list from `ENGINES`.
        voices: optional subset of voice ids to use at all (see `resolve_voices`).
        speakers_per_voice: pseudo-speakers made from each base voice.
        recorded_share: probability (0..1) that an utterance uses a recorded-voice (flite/festival) speaker when
            any is available; None = uniform over all speakers (recorded ones are then a small minority).
        noise_fraction: share of utterances (0..1) that get additive noise.
        noise_types: kinds of noise to draw from ("white", "pink", "babble" = 3-5 other training talkers).
        snr_db: (low, high) range of the signal-to-noise ratio drawn per noisy utterance.
        num_workers: rendering processes (default: the CPUs this process may use). Output does not depend on it.
        overwrite: replace a corpus made with other parameters (or a foreign audio/ folder) in `out_dir`.
        progress: show a tqdm bar.
    """
    start = time.perf_counter()
    out_path = Path(out_dir)
    if not minutes > 0:
        raise DemoCorpusError(f"minutes={minutes}: must be > 0")
    fractions = (finetune_fraction, test_fraction, valid_fraction)
    if not (all(0 <= f <= 1 for f in fractions) and sum(fractions) <= 1 + 1e-9):
        raise DemoCorpusError(
            f"finetune_fraction={finetune_fraction}, test_fraction={test_fraction}, valid_fraction={valid_fraction}: "
            "each must be in [0, 1] and their sum at most 1 (pass valid_fraction=0 for no validation split)"
        )
    if speakers_per_voice < 1:
        raise DemoCorpusError(f"speakers_per_voice={speakers_per_voice}: must be >= 1")
    if recorded_share is not None and not 0 <= recorded_share <= 1:
        raise DemoCorpusError(f"recorded_share={recorded_share}: must be in [0, 1] or None")
    if not 0 <= noise_fraction <= 1:
        raise DemoCorpusError(f"noise_fraction={noise_fraction}: must be in [0, 1]")
    bad_noise = [n for n in noise_types if n not in NOISE_TYPES]
    if bad_noise or (noise_fraction > 0 and not noise_types):
        raise DemoCorpusError(f"noise_types={list(noise_types)}: choose one or more of {NOISE_TYPES}")
    low_snr, high_snr = (float(x) for x in snr_db)
    if low_snr > high_snr:
        raise DemoCorpusError(f"snr_db={tuple(snr_db)}: low must not exceed high")

    params = {
        "format_version": FORMAT_VERSION,
        "minutes": float(minutes),
        "seed": int(seed),
        "finetune_fraction": float(finetune_fraction),
        "test_fraction": float(test_fraction),
        "test_voices": None if test_voices is None else list(test_voices),
        "engines": engines if isinstance(engines, str) else list(engines),
        "voices": None if voices is None else list(voices),
        "speakers_per_voice": int(speakers_per_voice),
        "recorded_share": None if recorded_share is None else float(recorded_share),
        "noise_fraction": float(noise_fraction),
        "noise_types": list(noise_types),
        "snr_db": [low_snr, high_snr],
        "sample_rate": SAMPLE_RATE,
        "text_source": "grammar",
    }
    # Recorded only with a validation split, so a corpus without one keeps the parameters it had before the split
    # existed (the low-resource experiment's parts are reused, not rebuilt or refused).
    if valid_fraction > 0:
        params["valid_fraction"] = float(valid_fraction)
        params["valid_voices"] = None if valid_voices is None else list(valid_voices)
    splits = tuple(s for s in SPLITS if s != "valid" or valid_fraction > 0)
    existing = _existing_folder(out_path, params, overwrite, replace(_CORPUS_FOLDER, splits=splits))
    if existing is not None:
        return existing  # reusing needs no synthesiser

    all_voices = resolve_voices(engines, voices)
    train_voices, valid_voice_list, test_voice_list = hold_out_voices(
        all_voices, test_voices, valid_voices if valid_fraction > 0 else []
    )
    targets = {
        "test": 60.0 * minutes * test_fraction,
        "valid": 60.0 * minutes * valid_fraction,
        "finetune": 60.0 * minutes * finetune_fraction,
        "pretrain": 60.0 * minutes * max(0.0, 1.0 - test_fraction - valid_fraction - finetune_fraction),
    }
    if targets["test"] > 0 and not test_voice_list:
        raise DemoCorpusError("test_fraction > 0 but no test voice is available; pass test_voices or test_fraction=0")
    if targets["valid"] > 0 and not valid_voice_list:
        raise DemoCorpusError(
            f"valid_fraction={valid_fraction} but no validation voice is available (valid_voices={valid_voices}); "
            "pass valid_voices (not test talkers) or valid_fraction=0"
        )
    if targets["pretrain"] + targets["finetune"] > 0 and not train_voices:
        raise DemoCorpusError(
            f"test_voices={test_voices}, valid_voices={valid_voices}: every available voice is held out, none is "
            "left for pretrain/finetune"
        )
    train_speakers = build_speakers(train_voices, speakers_per_voice)
    valid_speakers = build_speakers(valid_voice_list, speakers_per_voice)
    test_speakers = build_speakers(test_voice_list, speakers_per_voice)
    split_speakers = {"test": test_speakers, "valid": valid_speakers}
    babble_speakers = [s for s in train_speakers if s.voice.engine == "espeak"] or train_speakers
    generator = SentenceGenerator()
    workers = num_workers or _default_workers()
    _clear_folder(out_path, overwrite, _CORPUS_FOLDER)  # every split's manifest, valid.jsonl of an earlier one too

    bar = tqdm(total=round(sum(targets.values())), unit="s", desc="demo corpus (audio seconds)", disable=not progress)
    pool = _pool_context().Pool(workers) if workers > 1 else None
    records: dict[str, list[dict]] = {}
    try:
        for split in splits:
            records[split] = _render_split(
                split,
                targets[split],
                seed,
                split_speakers.get(split, train_speakers),
                babble_speakers,
                generator,
                params,
                out_path,
                pool,
                bar,
                mean_s=_MEAN_UTTERANCE_S,
            )
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()

    noise_counts: dict[str, int] = {}
    for split in splits:
        for record in records[split]:
            kind = record.pop("_noise")
            if kind is not None:
                noise_counts[kind] = noise_counts.get(kind, 0) + 1
        _write_atomic(out_path / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records[split]))

    summary = _summarize(records, params, all_voices, train_voices, test_voice_list, noise_counts)
    if valid_fraction > 0:
        summary["valid_voices"] = [v.id for v in valid_voice_list]
    used = {r["speaker"] for split in splits for r in records[split]}
    summary["speaker_params"] = {
        s.id: {k: v for k, v in asdict(s).items() if k not in ("id", "voice")} | {"voice": s.voice.id}
        for s in train_speakers + valid_speakers + test_speakers
        if s.id in used
    }
    summary["workers"] = workers
    summary["wall_time_s"] = round(time.perf_counter() - start, 2)
    _write_atomic(out_path / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _render_split(split, target_s, seed, speakers, babble_speakers, generator, params, out_path, pool, bar, mean_s):
    """Render utterances of `split` in index order until their total duration reaches `target_s`.

    Batches are sized from the mean duration seen so far; anything rendered past the cut is deleted, so the
    result depends only on the plans, not on batch sizes or workers.
    """
    records: list[dict] = []
    total = 0.0
    index = 0
    while total < target_s:
        remaining = target_s - total
        mean = total / len(records) if len(records) >= 8 else mean_s
        # aim a little short while the mean is a guess (another batch is cheap, discarded audio is not)
        count = max(2, int(np.ceil(remaining / mean * (1.02 if len(records) >= 8 else 0.8))))
        plans = [
            plan_utterance(
                split,
                i,
                seed,
                speakers,
                babble_speakers,
                generator,
                params["noise_fraction"],
                params["noise_types"],
                tuple(params["snr_db"]),
                params["recorded_share"],
            )
            for i in range(index, index + count)
        ]
        index += count
        jobs = [(plan, str(out_path)) for plan in plans]
        results = pool.imap(_render_star, jobs, chunksize=4) if pool is not None else map(_render_star, jobs)
        for result in results:
            if total >= target_s:  # past the cut: keep draining the batch, then delete its files
                (out_path / result["audio_filepath"]).unlink(missing_ok=True)
                continue
            records.append(result)
            total += result["duration"]
            bar.update(result["duration"])
    return records


def _summarize(records, params, all_voices, train_voices, test_voices, noise_counts) -> dict:
    made = tuple(records)  # the splits made: valid only with a validation split
    splits = {}
    for split in made:
        rows = records[split]
        splits[split] = {
            "utterances": len(rows),
            "minutes": round(sum(r["duration"] for r in rows) / 60.0, 3),
            "speakers": sorted({r["speaker"] for r in rows}),
            "voices": sorted({r["voice"] for r in rows}),
        }
    engines = sorted({v.engine for v in all_voices}, key=ENGINES.index)
    engine_seconds = {e: 0.0 for e in engines}
    for split in made:
        for r in records[split]:
            engine_seconds[r["voice"].split(":", 1)[0]] += r["duration"]
    words = {w for split in made for r in records[split] for w in r["text"].split()}
    return {
        "params": params,
        "engines": engines,
        "sample_rate": SAMPLE_RATE,
        "splits": splits,
        "minutes": {s: splits[s]["minutes"] for s in made},
        "total_minutes": round(sum(splits[s]["minutes"] for s in made), 3),
        "engine_minutes": {e: round(sec / 60.0, 3) for e, sec in engine_seconds.items()},
        "num_speakers": len({sp for s in made for sp in splits[s]["speakers"]}),
        "train_voices": [v.id for v in train_voices],
        "test_voices": [v.id for v in test_voices],
        "noise": noise_counts,
        "distinct_words": len(words),
        "generator": "hf_ssl_speech.synthetic.corpus",
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Make the built-in demo corpus: multi-voice English speech with transcripts, offline and "
        "deterministic (espeak-ng from pip; flite/festival voices too when installed)."
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--minutes", type=float, required=True, help="total audio minutes over all splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--test-voices", nargs="+", default=None, help="voice ids held out, e.g. espeak:f2 flite:rms")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="0 = no validation split")
    parser.add_argument(
        "--valid-voices", nargs="+", default=None, help="voice ids held out for validation (not test talkers)"
    )
    parser.add_argument("--engines", nargs="+", default=["auto"], help=f"'auto' or some of {ENGINES}")
    parser.add_argument("--voices", nargs="+", default=None, help="restrict to these voice ids")
    parser.add_argument("--speakers-per-voice", type=int, default=3)
    parser.add_argument(
        "--recorded-share", type=float, default=None, help="share of utterances from flite/festival voices if installed"
    )
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of utterances with additive noise")
    parser.add_argument("--noise-types", nargs="+", default=list(NOISE_TYPES), choices=NOISE_TYPES)
    parser.add_argument("--snr-db", type=float, nargs=2, default=[5.0, 20.0], metavar=("LOW", "HIGH"))
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: all CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus with other parameters")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--list-voices", action="store_true", help="print the available voice ids and exit")
    args = parser.parse_args(argv)
    engines = "auto" if args.engines == ["auto"] else args.engines
    try:
        if args.list_voices:
            train, valid, test = hold_out_voices(
                resolve_voices(engines, args.voices), args.test_voices, args.valid_voices
            )
            print("train voices:", " ".join(v.id for v in train))
            print("valid voices:", " ".join(v.id for v in valid))
            print("test voices: ", " ".join(v.id for v in test))
            return 0
        summary = make_demo_corpus(
            args.out,
            args.minutes,
            args.seed,
            finetune_fraction=args.finetune_fraction,
            test_fraction=args.test_fraction,
            test_voices=args.test_voices,
            valid_fraction=args.valid_fraction,
            valid_voices=args.valid_voices,
            engines=engines,
            voices=args.voices,
            speakers_per_voice=args.speakers_per_voice,
            recorded_share=args.recorded_share,
            noise_fraction=args.noise,
            noise_types=args.noise_types,
            snr_db=tuple(args.snr_db),
            num_workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (DemoCorpusError, EspeakError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    splits = summary["splits"]
    print(
        f"{args.out}: {summary['total_minutes']:.1f} min, {summary['num_speakers']} speakers, "
        f"engines {'+'.join(summary['engines'])}, wall {summary.get('wall_time_s', 0)} s"
    )
    for split in (s for s in SPLITS if s in splits):
        s = splits[split]
        print(f"  {split:9s} {s['minutes']:8.2f} min  {s['utterances']:6d} utts  {len(s['speakers']):4d} speakers")
    return 0


# The one demo corpus of the README's commands: pretraining, CTC fine-tuning and the speaker-ID demo share it.
DEMO_DIR = "demo_corpus"  # relative to the current folder
DEMO_MINUTES = 20.0


def ensure_demo_corpus(folder: str | os.PathLike = DEMO_DIR, minutes: float = DEMO_MINUTES, seed: int = 0) -> Path:
    """Make the demo corpus in `folder` unless it is already complete; safe under `accelerate launch`.

    The main process builds it while the others wait, then they find it complete and reuse it.
    """
    from accelerate import PartialState

    folder = Path(folder)
    state = PartialState()
    with state.main_process_first():
        stale = _made_without_valid_split(folder, minutes, seed)
        if state.is_main_process and stale:
            print(
                f"{folder} holds a demo corpus made before it had a validation split (valid.jsonl, other held-out "
                "talkers that fine-tuning selects on); rebuilding it. Runs trained on the old one are not comparable."
            )
        elif state.is_main_process and not (folder / "summary.json").is_file():
            print(f"Building the demo corpus ({minutes:g} min of synthetic speech) in {folder}")
        make_demo_corpus(folder, minutes=minutes, seed=seed, progress=state.is_main_process, overwrite=stale)
        if state.is_main_process:
            write_demo_lm_text(folder, seed)
    return folder


DEMO_LM_SENTENCES = 5000  # a 3-gram over the demo grammar: enough to help, seconds for irstlm to build


def write_demo_lm_text(folder: Path, seed: int = 0, count: int = DEMO_LM_SENTENCES) -> Path:
    """`folder/lm_text.txt`: grammar sentences for the README's `build_lm.py` step, none of them inside a valid or
    test utterance (the LM never saw what it is scored on). Written once, atomically."""
    from ..experiments.low_resource import lm_sentences  # the experiment's rule; imported late (it loads torch)

    path = folder / "lm_text.txt"
    if path.is_file():
        return path
    held: list[str] = []
    for split in ("valid", "test"):
        manifest = folder / f"{split}.jsonl"
        if manifest.is_file():
            held += [json.loads(line)["text"] for line in manifest.read_text().splitlines() if line.strip()]
    sentences, _ = lm_sentences(count, seed + 7, held)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(sentences) + "\n")
    os.replace(tmp, path)
    return path


def _made_without_valid_split(folder: Path, minutes: float, seed: int) -> bool:
    """Whether `folder` holds this demo corpus as made before the validation split existed (rebuilt on use).

    Only the default demo (all engines, these minutes and seed) is rebuilt silently: a corpus made there with
    other parameters is still refused by `make_demo_corpus`, naming them.
    """
    summary = _read_summary(folder)
    if summary is None or summary.get("generator") != "hf_ssl_speech.synthetic.corpus":
        return False
    params = summary.get("params") or {}
    return (
        "valid_fraction" not in params
        and params.get("engines") == "auto"
        and params.get("minutes") == float(minutes)
        and params.get("seed") == int(seed)
    )
