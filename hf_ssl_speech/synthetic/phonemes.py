"""Phone labels from text: espeak-ng's own phonemes (IPA), through the same ctypes library that speaks the corpus.

`espeak_TextToPhonemes(&text, espeakCHARS_UTF8, mode)` translates one clause per call and advances the text
pointer; `mode` bit 1 asks for IPA, bits 8-23 for a separator character between the phonemes of a word. With
"_" as separator "the cat" comes back as "ð_ə k_ˈæ_t": words are split on spaces, phonemes on "_", and the
stress marks (ˈ ˌ) are dropped. A multi-letter espeak phoneme stays one token ("aɪ", "ɑːɹ", "tʃ"), so the
inventory is espeak's own, not a split into IPA letters.

Why the library is loaded and unloaded around every batch: `synthesize_espeak` relies on `dlclose` resetting the
library's C statics before each utterance; a copy kept open here would keep its reference count above zero and
make later syntheses in this process depend on what ran before. One load per `phonemize_many` call costs a few
milliseconds, and results are cached per (text, voice).
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence

from .espeak import _CHARS_UTF8, _ERRORS, _SYNTH_CALLBACK, EspeakError, _load, _unload, espeak_paths

_IPA = 0x02  # phonememode bit 1: IPA as UTF-8 instead of espeak's ASCII mnemonics
_SEPARATOR = "_"  # between the phonemes of a word (phonememode bits 8-23)
_MODE = _IPA | (ord(_SEPARATOR) << 8)
_STRESS = str.maketrans("", "", "ˈˌ'")
_LANGUAGE_SWITCH = re.compile(r"\([a-z-]+\)")  # "(fr)" ... "(en)" around words espeak reads in another language
_CACHE: dict[tuple[str, str], tuple[str, ...]] = {}


def _split(phonemes: str) -> list[str]:
    """ "ð_ə k_ˈæ_t" -> ["ð", "ə", "k", "æ", "t"]: word boundaries and stress marks dropped."""
    phonemes = _LANGUAGE_SWITCH.sub(" ", phonemes)
    tokens = []
    for word in phonemes.split():
        tokens += [t for t in word.translate(_STRESS).split(_SEPARATOR) if t]
    return tokens


def _translate(lib: ctypes.CDLL, text: str) -> list[str]:
    encoded = ctypes.create_string_buffer(text.encode("utf-8") + b"\0")  # kept alive while espeak reads it
    pointer = ctypes.c_void_p(ctypes.addressof(encoded))
    tokens: list[str] = []
    while pointer.value:  # espeak sets it to NULL after the last clause
        clause = lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _MODE)
        if clause is None:
            break
        tokens += _split(clause.decode("utf-8", errors="replace"))
    return tokens


def phonemize_many(
    texts: Sequence[str], voice: str = "en-us", library_path: str | None = None, data_path: str | None = None
) -> list[list[str]]:
    """espeak-ng phones of each text (one library load for all the uncached ones); see `phonemize`."""
    missing = sorted({t for t in texts if (t, voice) not in _CACHE})
    if missing:
        library_path, data_path = espeak_paths(library_path, data_path)
        callback = _SYNTH_CALLBACK(lambda wav, n, events: 0)  # no audio is made; the library needs a callback
        lib = _load(library_path, data_path, callback)
        try:
            lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
            lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
            status = lib.espeak_SetVoiceByName(voice.encode())
            if status != 0:
                raise EspeakError(
                    f"espeak-ng: phonemize voice={voice!r} failed ({_ERRORS.get(status, status)}); use a language "
                    "such as 'en-us' or 'en'"
                )
            for text in missing:
                _CACHE[(text, voice)] = tuple(_translate(lib, text))
        finally:
            _unload(lib)
    return [list(_CACHE[(t, voice)]) for t in texts]


def phonemize(text: str, voice: str = "en-us") -> list[str]:
    """The phones espeak-ng says for `text` in `voice` (a language, e.g. "en-us"), as IPA tokens.

    Deterministic; stress marks and word boundaries are dropped. `phonemize("cat")` -> ["k", "æ", "t"].
    """
    return phonemize_many([text], voice)[0]


__all__ = ["phonemize", "phonemize_many"]
