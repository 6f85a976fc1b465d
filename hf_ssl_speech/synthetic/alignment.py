"""Frame-level phone labels for the demo corpus, from espeak-ng's own phoneme events (no forced aligner).

Why this is exact rather than estimated: every demo-corpus utterance is a pure function of its plan
(`corpus.plan_utterance`, seeded by (corpus seed, split, index)), so the plan of `audio/pretrain-000123.wav`
can be rebuilt from the corpus's summary.json. We synthesise its speech again with espeak's phoneme events on:
the synth callback then reports where espeak itself placed each phoneme, as a sample index of its output. The
rest of the pipeline only moves those positions by known amounts:

    espeak output (22050 Hz) --trim leading near-silence (t0 samples)--> --resample by 16000 / (22050 * vtl)-->
    --prepend `lead_s` of silence--> the file       i.e.  t_file = lead + (t_espeak - t0) * 16000 / (22050 * vtl)

(soxr's resampler is linear-phase and delay-compensated, so times map through it unchanged.) The re-rendered
waveform is then compared sample for sample with the WAV on disk; only an utterance whose audio is identical
gets labels, so a label never describes audio other than the file's. Recorded-voice utterances (flite,
festival, pico) have no phoneme events and are skipped, counted by reason.

Frame `i` (10 ms, the feature extractor's frame centred on sample `i * 160`) is labelled with the phoneme
whose onset is the last one at or before that sample; before the first phoneme, in pauses (espeak's unnamed
pause phonemes and clause ends) and in the padding it is "sil". The boundaries are the synthesiser's own
phoneme onsets, i.e. ground truth for this audio, not an acoustic estimate; espeak's co-articulation still
spreads each phoneme's sound a little into its neighbours, as in natural speech.

Output of `write_phone_labels(manifest, out_dir)`: labels/<id>.npy (int16, one phone index per 10 ms frame of
the file, `samples // 160` frames), inventory.json (index -> phone name), summary.json (aligned / skipped).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ..errors import UserError
from ..frames import HOP_LENGTH, SAMPLING_RATE
from . import corpus
from .espeak import synthesize_espeak
from .sentences import SentenceGenerator

logger = logging.getLogger(__name__)

SILENCE = "sil"
_STRESS = str.maketrans("", "", "ˈˌ'")  # as `phonemes.phonemize`: stress is not a phone


class AlignmentError(UserError):
    """A manifest or corpus for which phone labels cannot be made; the message says why and what to do."""


@dataclass
class CorpusPlans:
    """The demo corpus a manifest belongs to, able to rebuild the plan of any of its utterances."""

    folder: Path
    params: dict
    speakers: dict[str, list]  # split -> the speakers plan_utterance drew from
    babble_speakers: list
    generator: SentenceGenerator

    def plan(self, split: str, index: int) -> corpus.UtterancePlan:
        p = self.params
        return corpus.plan_utterance(
            split,
            index,
            p["seed"],
            self.speakers[split],
            self.babble_speakers,
            self.generator,
            p["noise_fraction"],
            p["noise_types"],
            tuple(p["snr_db"]),
            p["recorded_share"],
        )


def demo_corpus_of(manifest: str | os.PathLike) -> CorpusPlans | None:
    """The demo corpus whose folder holds `manifest` (None if it is not one), with its speakers rebuilt.

    The speaker roster is rebuilt exactly as `make_demo_corpus` built it; it must list the same voices as the
    corpus's summary.json (a recorded engine installed or removed since would change it).
    """
    folder = Path(manifest).resolve().parent
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return None
    if summary.get("generator") != "hf_ssl_speech.synthetic.corpus" or "params" not in summary:
        return None
    params = summary["params"]
    if params.get("format_version") != corpus.FORMAT_VERSION:
        raise AlignmentError(
            f"{summary_path}: demo corpus format_version={params.get('format_version')}, this code reads "
            f"{corpus.FORMAT_VERSION}; rebuild the corpus (scripts/make_demo_corpus.py) to get phone labels"
        )
    voices = corpus.resolve_voices(params["engines"], params["voices"])
    # a corpus without a validation split has no valid_fraction in its params: no validation talkers
    valid_ids = params.get("valid_voices") if params.get("valid_fraction") else []
    train_voices, valid_voices, test_voices = corpus.hold_out_voices(voices, params["test_voices"], valid_ids)
    if (
        [v.id for v in train_voices] != summary.get("train_voices")
        or [v.id for v in test_voices] != summary.get("test_voices")
        or [v.id for v in valid_voices] != summary.get("valid_voices", [])
    ):
        raise AlignmentError(
            f"{folder}: the corpus was made with voices {summary.get('train_voices')} + {summary.get('test_voices')}, "
            f"but the installed engines give {[v.id for v in voices]}; install the same engines "
            f"({corpus.RECORDED_VOICES_HINT}) or set phone_labels: none"
        )
    per_voice = params["speakers_per_voice"]
    train_speakers = corpus.build_speakers(train_voices, per_voice)
    test_speakers = corpus.build_speakers(test_voices, per_voice)
    babble = [s for s in train_speakers if s.voice.engine == "espeak"] or train_speakers
    speakers = {"test": test_speakers, "finetune": train_speakers, "pretrain": train_speakers}
    if valid_voices:
        speakers["valid"] = corpus.build_speakers(valid_voices, per_voice)
    return CorpusPlans(folder, params, speakers, babble, SentenceGenerator())


def phone_segments(plan: corpus.UtterancePlan) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Render `plan`'s audio as `render_utterance` does, with espeak's phoneme onsets mapped into it.

    Returns (the int16 samples the corpus file must hold, [(onset sample in that file, phone or "")]).
    """
    speaker = plan.speaker
    if speaker.voice.engine != "espeak":
        raise ValueError(f"{speaker.voice.id} has no phoneme events (only espeak voices do)")
    events: list[tuple[int, str]] = []
    # The same call as corpus._synthesize makes, plus the event list.
    samples, rate = synthesize_espeak(
        plan.synth_text,
        f"{speaker.accent}+{speaker.voice.name}",
        rate=int(plan.rate),
        pitch=int(plan.pitch),
        pitch_range=int(speaker.pitch_range),
        seed=plan.seed,
        phoneme_events=events,
    )
    raw = samples.astype(np.float32) / 32768.0
    trimmed = corpus._trim(raw)
    # _trim keeps raw[t0 : t0 + len(trimmed)]: find t0 by the same rule (and check that it is that slice).
    loud = np.flatnonzero(np.abs(raw) > 0.01 * max(float(np.abs(raw).max()), 1e-9))
    t0 = int(loud[0]) if loud.size else 0
    if not np.array_equal(raw[t0 : t0 + trimmed.size], trimmed):
        raise RuntimeError("corpus._trim no longer cuts where alignment expects; update phone_segments")
    speech = corpus._to_16k(trimmed, rate, speaker.vtl_scale)
    pcm = corpus.to_pcm16(corpus.render_audio(plan, speech), plan.peak_dbfs)
    lead = int(plan.lead_s * SAMPLING_RATE)
    scale = SAMPLING_RATE / (rate * speaker.vtl_scale)  # espeak samples -> file samples
    onsets = [(lead + round((sample - t0) * scale), name.translate(_STRESS)) for sample, name in events]
    return pcm, onsets


def frame_phones(onsets: list[tuple[int, str]], num_samples: int) -> list[str]:
    """One phone per 10 ms frame (`num_samples // 160` frames), from phone onsets in file samples.

    Frame i is centred on sample i * 160 (the extractor's centred STFT); it takes the phone of the last onset at
    or before its centre; "" (a pause or clause end) and anything before the first onset is `SILENCE`.
    """
    frames = num_samples // HOP_LENGTH
    positions = np.array([s for s, _ in onsets], dtype=np.int64)
    names = [n or SILENCE for _, n in onsets]
    if np.any(np.diff(positions) < 0):
        order = np.argsort(positions, kind="stable")
        positions, names = positions[order], [names[i] for i in order]
    centres = np.arange(frames) * HOP_LENGTH
    which = np.searchsorted(positions, centres, side="right") - 1  # (frames,) index of the active onset, -1 = none
    return [SILENCE if w < 0 else names[w] for w in which]


def _utterance_key(row: dict) -> tuple[str, int] | None:
    """("pretrain", 123) for audio/pretrain-000123.wav, None for a file that is not a demo-corpus utterance."""
    split, _, index = Path(row["audio_filepath"]).stem.rpartition("-")
    if split in corpus.SPLITS and index.isdigit():
        return split, int(index)
    return None


def write_phone_labels(manifest: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Phone labels for every demo-corpus utterance of `manifest` that can be aligned (see the module doc).

    Returns (and writes as summary.json) the counts: utterances, aligned, skipped by reason, phones.
    Raises AlignmentError when the manifest is not in a demo-corpus folder.
    """
    from ..pretrain.kmeans import read_manifest, safe_name  # the same ids as the k-means labels

    manifest, out_dir = Path(manifest), Path(out_dir)
    plans = demo_corpus_of(manifest)
    if plans is None:
        raise AlignmentError(
            f"{manifest}: not in a demo-corpus folder (no summary.json written by hf_ssl_speech.synthetic.corpus "
            "next to it), so there are no phone labels to derive; phone purity and PNMI need them"
        )
    rows = read_manifest(manifest)
    labels_dir = out_dir / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    inventory: dict[str, int] = {SILENCE: 0}
    skipped: Counter = Counter()
    aligned = frames_total = 0
    for row in rows:
        key = _utterance_key(row)
        if key is None:
            skipped["not a demo-corpus file name"] += 1
            continue
        plan = plans.plan(*key)
        if plan.text != row.get("text", plan.text):
            skipped["text differs from its rebuilt plan"] += 1
            continue
        if plan.speaker.voice.engine != "espeak":
            skipped[f"{plan.speaker.voice.engine} voice: no phoneme events"] += 1
            continue
        expected, onsets = phone_segments(plan)
        on_disk, _ = sf.read(row["audio_filepath"], dtype="int16")
        if not np.array_equal(on_disk, expected):
            skipped["audio differs from its re-rendering"] += 1  # another espeak build, an edited file, ...
            continue
        phones = frame_phones(onsets, on_disk.size)
        ids = np.array([inventory.setdefault(p, len(inventory)) for p in phones], dtype=np.int16)  # (frames,)
        np.save(labels_dir / f"{safe_name(str(row['id']))}.npy", ids)
        aligned += 1
        frames_total += ids.size
    (out_dir / "inventory.json").write_text(json.dumps(sorted(inventory, key=inventory.get), ensure_ascii=False))
    summary = {
        "manifest": str(manifest),
        "utterances": len(rows),
        "aligned": aligned,
        "skipped": dict(skipped),
        "frames": frames_total,
        "phones": len(inventory),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("phone labels: %d of %d utterances aligned; skipped %s", aligned, len(rows), dict(skipped) or "none")
    return summary


def read_phone_labels(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """({file stem: (frames,) phone indices}, inventory) as `write_phone_labels` wrote them."""
    folder = Path(folder)
    inventory = json.loads((folder / "inventory.json").read_text())
    labels = {path.stem: np.load(path) for path in sorted((folder / "labels").glob("*.npy"))}
    return labels, inventory


__all__ = [
    "SILENCE",
    "AlignmentError",
    "demo_corpus_of",
    "frame_phones",
    "phone_segments",
    "read_phone_labels",
    "write_phone_labels",
]
