"""A tiny labelled corpus for the fine-tuning tests, and one shared tiny CTC model trained on it.

Real speech needs the demo corpus (espeak) and minutes of CPU to overfit; the fast tests instead use "tone
words": each letter of an 8-letter alphabet is a 150 ms two-tone chord of its own (a low and a high partial,
with a little pitch jitter per utterance), letters are separated by 30 ms of silence and words by 120 ms, so
CTC can learn the letters in ~100 steps on one core. `train_tone_ctc(root)` fine-tunes a tiny model on 16
such utterances once per test session (through `scripts/finetune_ctc.py`) and returns where everything is;
tests/test_finetune.py and tests/test_pipeline.py share it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ALPHABET = "abcdefgh"
SAMPLING_RATE = 16000
REPO_ROOT = Path(__file__).resolve().parent.parent

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


def load_script(name: str):
    """Import scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TRAINED: dict[str, dict[str, Any]] = {}
OVERFIT_STEPS = 200


def train_tone_ctc(root: Path) -> dict[str, Any]:
    """Fine-tune (once per session) a tiny CTC model from scratch on 32 tone-word utterances of 1-6 words.

    Varied lengths and enough distinct letter sequences make the model learn the letters rather than memorise
    the utterances, so it also transcribes unseen sequences and long concatenations (the pipeline test needs
    that). Exercises the script end to end: flags without a recipe, SpecAugment (light), encoder frozen for
    5 steps, layer-wise LR decay, group_by_length batches, evaluation every 100 steps with early stopping on
    WER, two eval sets (the training utterances and 8 unseen ones).
    Returns {"output_dir", "manifest" (train), "heldout", "result" (main()'s return value)}.
    """
    key = str(root)
    if key not in _TRAINED:
        manifest = write_tone_corpus(Path(root) / "tones", count=32, seed=0, words=(1, 6), name="train")
        heldout = write_tone_corpus(Path(root) / "tones", count=8, seed=7, words=(1, 6), name="heldout")
        output_dir = Path(root) / "ctc"
        argv = [
            "--from_scratch", "--model_preset", "tiny", f"config_overrides={TINY_CTC_OVERRIDES}",
            "--train_manifests", str(manifest), "--eval_manifests", str(manifest), str(heldout),
            "--output_dir", str(output_dir), "--use_cpu", "--seed", "0",
            "--max_steps", str(OVERFIT_STEPS), "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--learning_rate", "3e-3", "--warmup_steps", "20", "--lr_scheduler_type", "linear",
            "--train_sampling_strategy", "group_by_length",
            "--eval_strategy", "steps", "--eval_steps", "100", "--logging_steps", "10", "--save_strategy", "no",
            "early_stopping_patience=5", "freeze_encoder_steps=5", "layer_decay=0.9",
            "freq_masks=1", "freq_width=10", "time_masks=1", "time_width=0.03",
            "--disable_tqdm", "true", "--report_to", "none",
        ]  # fmt: skip
        result = load_script("finetune_ctc").main(argv)
        _TRAINED[key] = {"output_dir": output_dir, "manifest": manifest, "heldout": heldout, "result": result}
    return _TRAINED[key]


# ------------------------------------------------------------------------------------------ corpus checks
def test_tone_corpus_is_readable_and_letters_are_distinct(tmp_path):
    manifest = write_tone_corpus(tmp_path, count=3, seed=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        audio, rate = sf.read(tmp_path / row["audio_filepath"], dtype="float32")
        assert rate == SAMPLING_RATE and abs(len(audio) / rate - row["duration"]) < 1e-6
        assert set(row["text"]) <= set(ALPHABET + " ")
        assert all(a != b for word in row["text"].split() for a, b in zip(word, word[1:]))
    # Each letter's chord has its own pair of partials: the spectra's peak bins differ pairwise.
    rng = np.random.default_rng(0)
    peaks = set()
    for letter in ALPHABET:
        spectrum = np.abs(np.fft.rfft(letter_chord(letter, rng)))
        low, high = spectrum[:100].argmax(), 100 + spectrum[100:].argmax()  # 100 bins = 667 Hz
        peaks.add((int(low) // 3, int(high) // 10))
    assert len(peaks) == len(ALPHABET)
