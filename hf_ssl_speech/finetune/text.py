"""Transcripts and the character CTC vocabulary: normalisation, `Wav2Vec2CTCTokenizer`, `Wav2Vec2Processor`."""

from __future__ import annotations

import json
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from transformers import (
    Wav2Vec2CTCTokenizer,
    Wav2Vec2Processor,
)

from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor

PAD_TOKEN = "<pad>"  # id 0: padding of label batches and the CTC blank
UNK_TOKEN = "<unk>"  # characters of eval transcripts that training never saw
WORD_DELIMITER = "|"  # stands for the space between words
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, WORD_DELIMITER)


# ============================================================================================ text
def normalize_transcript(text: str | None) -> str:
    """Lower-case, NFKC, keep letters, digits and apostrophes; everything else separates words.

    The vocabulary is built from normalised training transcripts, and references are normalised the same
    way, so punctuation and case never count as recognition errors.
    """
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    kept = [ch if (ch.isalnum() or ch == "'") else " " for ch in text]
    return " ".join("".join(kept).split())


def build_vocab(texts: Iterable[str]) -> dict[str, int]:
    """Character vocabulary: `<pad>` 0 (CTC blank), `<unk>` 1, `|` 2 (word delimiter), then sorted characters."""
    chars = sorted({ch for text in texts for ch in normalize_transcript(text) if ch != " "})
    if not chars:
        raise ValueError("build_vocab: the training transcripts are empty after normalisation; check the 'text' field")
    return {token: index for index, token in enumerate([*SPECIAL_TOKENS, *chars])}


def build_tokenizer(vocab: Mapping[str, int]) -> Wav2Vec2CTCTokenizer:
    """A `Wav2Vec2CTCTokenizer` over `vocab` (no BOS/EOS: CTC has none, and they would grow the vocabulary)."""
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        vocab_file.write_text(json.dumps(dict(vocab), ensure_ascii=False))
        tokenizer = Wav2Vec2CTCTokenizer(
            str(vocab_file),
            unk_token=UNK_TOKEN,
            pad_token=PAD_TOKEN,
            word_delimiter_token=WORD_DELIMITER,
            bos_token=None,
            eos_token=None,
            do_lower_case=False,
        )
    if len(tokenizer) != len(vocab) or tokenizer.pad_token_id != 0:
        raise RuntimeError(
            f"tokenizer has {len(tokenizer)} tokens / pad id {tokenizer.pad_token_id}; expected "
            f"{len(vocab)} / 0 (a special token was added to the vocabulary)"
        )
    return tokenizer


def build_processor(
    texts: Iterable[str], feature_extractor: ConformerSslFeatureExtractor | None = None
) -> Wav2Vec2Processor:
    """Our feature extractor + a character CTC tokenizer built from `texts`, as one `Wav2Vec2Processor`.

    `processor.save_pretrained(folder)` writes `processor_config.json` (with the feature extractor's settings
    and `auto_map`), `vocab.json`, `tokenizer_config.json` and the feature extractor's code; `AutoProcessor`,
    `AutoFeatureExtractor` and `AutoTokenizer` load them back.
    """
    feature_extractor = feature_extractor or ConformerSslFeatureExtractor()
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=build_tokenizer(build_vocab(texts)))


def text_to_ids(tokenizer: Wav2Vec2CTCTokenizer, text: str) -> list[int]:
    """Label ids of a transcript (normalised first; unseen characters become `<unk>`)."""
    return tokenizer(normalize_transcript(text)).input_ids
