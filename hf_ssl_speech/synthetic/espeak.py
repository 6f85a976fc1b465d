"""In-process espeak-ng speech synthesis through ctypes, from the `espeakng-loader` wheel (pip only).

`espeakng-loader` ships `libespeak-ng.so` and its `espeak-ng-data` folder; `get_library_path()` and
`get_data_path()` locate them. We drive the C API directly (speak_lib.h):

    espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, espeakINITIALIZE_DONT_EXIT) -> sample rate (22050)
    espeak_SetSynthCallback(cb)              cb(short *wav, int n, espeak_EVENT *events) receives the samples
    espeak_SetVoiceByName("en-us+f3")        language (accent) + variant (talker)
    espeak_SetParameter(RATE/PITCH/RANGE, value, 0)
    espeak_Synth(text, ...); espeak_Synchronize()

Determinism: espeak-ng keeps synthesis state in C statics that no API call resets (the pitch-flutter phase,
the automatic gain control, the glottal cycle counter), and seeds its breath-noise generator from the clock
in espeak_Initialize. The same text and voice therefore gives different samples depending on what was spoken
before in the process and on the time of day. We load a fresh copy of the library for every utterance
(dlopen ... dlclose resets every static, about 0.5 ms) and seed the noise with the utterance seed
(`espeak_ng_SetRandSeed`, plus libc `srand` for code that still calls `rand()`), so an utterance's audio
depends only on its own arguments, whatever ran before it and however work is split across processes.
"""

from __future__ import annotations

import _ctypes
import ctypes
import os
from pathlib import Path

import numpy as np

from ..errors import UserError

# English accents shipped in espeak-ng-data/lang/gmw (names as espeak_SetVoiceByName accepts them). "en" is
# southern British; "en-gb" would be the same voice under an alias, so it is not listed twice.
ESPEAK_ACCENTS: tuple[str, ...] = (
    "en",
    "en-us",
    "en-029",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-gb-x-rp",
    "en-us-nyc",
)

# Constants from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it espeak_Initialize calls exit() when the data folder is bad
_INITIALIZE_PHONEME_EVENTS = 0x0001  # the synth callback also gets one espeakEVENT_PHONEME per phoneme
_INITIALIZE_PHONEME_IPA = 0x0002  # ... named in IPA (as `phonemes.phonemize` writes them)
_EVENT_LIST_TERMINATED = 0
_EVENT_END = 5  # end of a sentence or clause: the audio after it (up to the next phoneme) is a pause
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMETERS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}
_PARAMETER_LIMITS = {"rate": (80, 450), "volume": (0, 200), "pitch": (0, 100), "range": (0, 100)}
_ERRORS = {-1: "EE_INTERNAL_ERROR", 1: "EE_BUFFER_FULL", 2: "EE_NOT_FOUND"}

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_LIBC = ctypes.CDLL(None)

_INSTALL_HINT = "install the espeak-ng wheel with `pip install espeakng-loader` (a dependency of hf_ssl_speech)"


class _Event(ctypes.Structure):
    """espeak_EVENT (speak_lib.h); `sample` is the event's position in the output, in samples from the start."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # the same position in whole milliseconds
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # a union; for a phoneme event its UTF-8 name (not 0-terminated at 8 bytes)
    ]


class EspeakError(UserError, RuntimeError):
    """espeak-ng cannot be loaded or refused a request; the message names the path or value and the fix."""


def espeak_paths(library_path: str | None = None, data_path: str | None = None) -> tuple[str, str]:
    """Locate libespeak-ng and espeak-ng-data.

    Args:
        library_path: explicit path to libespeak-ng (default: the `espeakng-loader` wheel's copy, or the
            `HF_SSL_SPEECH_ESPEAK_LIBRARY` environment variable).
        data_path: explicit espeak-ng-data folder (default: the wheel's, or `HF_SSL_SPEECH_ESPEAK_DATA`).
    """
    library_path = library_path or os.environ.get("HF_SSL_SPEECH_ESPEAK_LIBRARY")
    data_path = data_path or os.environ.get("HF_SSL_SPEECH_ESPEAK_DATA")
    if library_path is None or data_path is None:
        try:
            import espeakng_loader
        except ImportError as error:
            raise EspeakError(
                f"espeak-ng: the package `espeakng_loader` is not importable ({error}); {_INSTALL_HINT}"
            ) from error
        library_path = library_path or espeakng_loader.get_library_path()
        if data_path is None:
            try:
                data_path = espeakng_loader.get_data_path()
            except RuntimeError as error:
                raise EspeakError(
                    f"espeak-ng: {error}; reinstall with `pip install --force-reinstall espeakng-loader`"
                ) from error
    if not Path(library_path).is_file():
        raise EspeakError(f"espeak-ng: library_path={library_path!r} does not exist; {_INSTALL_HINT}")
    if not (Path(data_path) / "phontab").is_file():
        raise EspeakError(
            f"espeak-ng: data_path={data_path!r} is not an espeak-ng-data folder (no 'phontab' in it); {_INSTALL_HINT}"
        )
    return str(library_path), str(data_path)


def espeak_variants(data_path: str | None = None) -> list[str]:
    """Names of the voice variants (talkers) shipped in espeak-ng-data/voices/!v ("m3", "f1", "klatt2", ...)."""
    _, data_path = espeak_paths(data_path=data_path)
    return sorted(p.name for p in (Path(data_path) / "voices" / "!v").iterdir() if p.is_file())


def _load(library_path: str, data_path: str, callback, options: int = 0) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(library_path)
    except OSError as error:
        raise EspeakError(f"espeak-ng: cannot load library_path={library_path!r} ({error}); {_INSTALL_HINT}") from error
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    sample_rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT | options
    )
    if sample_rate <= 0:
        _unload(lib)
        raise EspeakError(
            f"espeak-ng: espeak_Initialize failed ({_ERRORS.get(sample_rate, sample_rate)}) with "
            f"data_path={data_path!r}; {_INSTALL_HINT}"
        )
    lib.espeak_SetSynthCallback(callback)
    lib.sample_rate = sample_rate
    return lib


def _unload(lib: ctypes.CDLL) -> None:
    """Terminate espeak and dlclose the library so the next load starts with fresh C statics."""
    handle = lib._handle
    lib.espeak_Terminate()
    del lib
    _ctypes.dlclose(handle)


def synthesize_espeak(
    text: str,
    voice: str,
    *,
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    seed: int = 0,
    library_path: str | None = None,
    data_path: str | None = None,
    phoneme_events: list[tuple[int, str]] | None = None,
) -> tuple[np.ndarray, int]:
    """Speak `text` with espeak-ng and return (int16 samples (n,), sample rate).

    Args:
        text: UTF-8 text; punctuation controls pauses and intonation.
        voice: "<accent>+<variant>" as espeak_SetVoiceByName accepts it, e.g. "en-us+f3" (accent from
            `ESPEAK_ACCENTS`, variant from `espeak_variants()`), or a bare accent.
        rate: words per minute, 80..450 (espeakRATE).
        pitch: base pitch, 0..100 (espeakPITCH; 50 is the voice's own).
        pitch_range: intonation range, 0..100 (espeakRANGE; 0 is monotone).
        seed: seeds espeak's breath/aspiration noise generator (and libc rand()).
        library_path, data_path: see `espeak_paths`.
        phoneme_events: a list to fill with espeak's own phoneme onsets, (sample index in the returned audio,
            IPA name with stress marks, "" for a pause or the end of a clause), in order. The events only
            report where the synthesiser placed each phoneme; the samples are the same with or without them.
    """
    library_path, data_path = espeak_paths(library_path, data_path)
    accent, _, variant = voice.partition("+")
    if variant and not (Path(data_path) / "voices" / "!v" / variant).is_file():
        # espeak_SetVoiceByName silently ignores an unknown variant, so check it ourselves.
        raise EspeakError(f"espeak-ng: voice={voice!r} names an unknown variant {variant!r}; see espeak_variants()")
    values = {"rate": rate, "pitch": pitch, "range": pitch_range}
    for name, value in values.items():
        low, high = _PARAMETER_LIMITS[name]
        if not low <= value <= high:
            raise EspeakError(f"espeak-ng: {name}={value} is outside {low}..{high}")

    chunks: list[bytes] = []

    def on_samples(wav, num_samples, events):
        if phoneme_events is not None and events:
            event = ctypes.cast(events, ctypes.POINTER(_Event))
            index = 0
            while event[index].type != _EVENT_LIST_TERMINATED:
                kind = event[index].type
                if kind == _EVENT_PHONEME:
                    name = event[index].id.decode("utf-8", errors="replace")
                    phoneme_events.append((int(event[index].sample), name))
                elif kind == _EVENT_END:
                    phoneme_events.append((int(event[index].sample), ""))
                index += 1
        if wav and num_samples > 0:
            chunks.append(ctypes.string_at(wav, num_samples * 2))
        return 0  # 0 = continue synthesis

    callback = _SYNTH_CALLBACK(on_samples)  # kept alive until _unload: the library holds a pointer to it
    options = 0 if phoneme_events is None else _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_PHONEME_IPA
    lib = _load(library_path, data_path, callback, options)
    try:
        sample_rate = lib.sample_rate
        status = lib.espeak_SetVoiceByName(voice.encode())
        if status != 0:
            raise EspeakError(
                f"espeak-ng: espeak_SetVoiceByName({voice!r}) failed ({_ERRORS.get(status, status)}); "
                f"use an accent from {ESPEAK_ACCENTS} and an existing variant"
            )
        for name, value in values.items():
            lib.espeak_SetParameter(_PARAMETERS[name], int(value), 0)
        # espeak-ng >= 1.52 has its own noise generator, seeded from time() in espeak_Initialize; older code
        # paths still call libc rand(). Seed both.
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        _LIBC.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
        encoded = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise EspeakError(f"espeak-ng: espeak_Synth failed ({_ERRORS.get(status, status)}) for text={text!r}")
        lib.espeak_Synchronize()
    finally:
        _unload(lib)
    return np.frombuffer(b"".join(chunks), dtype=np.int16).copy(), sample_rate


def check_espeak(library_path: str | None = None, data_path: str | None = None) -> int:
    """Load and initialise espeak-ng once; return its sample rate or raise `EspeakError` saying what to fix."""
    library_path, data_path = espeak_paths(library_path, data_path)
    callback = _SYNTH_CALLBACK(lambda wav, n, events: 0)
    lib = _load(library_path, data_path, callback)
    sample_rate = lib.sample_rate
    _unload(lib)
    return sample_rate
