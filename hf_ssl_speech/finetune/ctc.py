"""CTC specifics: which transcripts fit the encoder's output, greedy decoding, WER/CER of the greedy transcripts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    EvalPrediction,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2Processor,
)

from ..configuration_conformer_ssl import ConformerSslConfig
from ..frames import SAMPLING_RATE, num_frames
from ..modeling_conformer_ssl import ConformerSslForCTC, encoder_output_lengths
from .metrics import load_metrics
from .text import normalize_transcript, text_to_ids

logger = logging.getLogger(__name__)


def ctc_output_steps(num_samples: int, config: ConformerSslConfig) -> int:
    """Encoder steps (CTC emissions) for an utterance of `num_samples` samples (w2v-BERT's adapter pools them
    further: `adapter_stride` per adapter layer, with the count transformers' Wav2Vec2Bert uses)."""
    return encoder_output_lengths(num_frames(num_samples, config.hop_length), config)


def ctc_min_steps(label_ids: Sequence[int]) -> int:
    """Fewest CTC steps that can emit `label_ids`: one per label, plus a blank between repeated labels."""
    return len(label_ids) + sum(1 for a, b in zip(label_ids, label_ids[1:]) if a == b)


def split_ctc_feasible(
    rows: Sequence[Mapping[str, Any]], tokenizer: Wav2Vec2CTCTokenizer, config: ConformerSslConfig
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(feasible, infeasible) rows: infeasible transcripts need more CTC steps than the encoder emits.

    Their CTC loss is infinite (zeroed by `ctc_zero_infinity`, so they silently teach nothing). Characters at
    ~15 per second of speech do not fit 8x subsampling (12.5 steps per second): use a 4x (Conformer) model or
    a subword vocabulary for those.
    """
    feasible, infeasible = [], []
    for row in rows:
        needed = ctc_min_steps(text_to_ids(tokenizer, row["text"]))
        (feasible if needed <= ctc_output_steps(row["length"], config) else infeasible).append(row)
    return feasible, infeasible


def drop_infeasible_ctc(
    rows: list[dict[str, Any]], tokenizer: Wav2Vec2CTCTokenizer, config: ConformerSslConfig, what: str
) -> list[dict[str, Any]]:
    """Training rows without the CTC-infeasible ones; warns with counts, refuses when most are infeasible."""
    feasible, infeasible = split_ctc_feasible(rows, tokenizer, config)
    if not infeasible:
        return list(feasible)
    message = (
        f"{what}: {len(infeasible)} of {len(rows)} transcripts are longer than the encoder's output "
        f"({config.subsampling_factor}x subsampling = {1000 * config.inputs_to_logits_ratio / SAMPLING_RATE:.0f} ms per CTC step), "
        f"e.g. {infeasible[0]['where']} ({row_rate(infeasible[0]):.1f} characters/s)"
    )
    if len(infeasible) * 2 > len(rows):
        raise ValueError(
            f"{message}. CTC cannot learn them: fine-tune a model with subsampling_factor=4 (e.g. "
            "config_overrides='subsampling=striding,subsampling_factor=4' from scratch), or use shorter units."
        )
    logger.warning("%s; leaving them out of training.", message)
    return list(feasible)


def row_rate(row: Mapping[str, Any]) -> float:
    """Characters of normalised transcript per second of audio."""
    return len(normalize_transcript(row["text"])) / max(row["length"] / SAMPLING_RATE, 1e-6)


def greedy_ctc_ids(logits: torch.Tensor, output_lengths: torch.Tensor, blank_id: int) -> torch.Tensor:
    """Best path ids (batch, steps): argmax per step, steps past each utterance's length set to the blank."""
    ids = logits.argmax(dim=-1)
    steps = torch.arange(ids.shape[1], device=ids.device)[None, :]
    return ids.masked_fill(steps >= output_lengths.to(ids.device)[:, None], blank_id)


def decode_predictions(tokenizer: Wav2Vec2CTCTokenizer, pred_ids: np.ndarray, label_ids: np.ndarray):
    """(hypotheses, references) from Trainer-gathered ids (-100 padding); CTC grouping on hypotheses only."""
    pad = tokenizer.pad_token_id
    hypotheses = tokenizer.batch_decode(np.where(pred_ids == -100, pad, pred_ids))
    references = tokenizer.batch_decode(np.where(label_ids == -100, pad, label_ids), group_tokens=False)
    return hypotheses, references


def make_ctc_compute_metrics(
    tokenizer: Wav2Vec2CTCTokenizer, metrics: Mapping[str, Any] | None = None
) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for `CtcTrainer`: corpus WER and CER of the greedy transcripts."""
    metrics = metrics or load_metrics()

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        hypotheses, references = decode_predictions(tokenizer, prediction.predictions, prediction.label_ids)
        return {name: metric.compute(predictions=hypotheses, references=references) for name, metric in metrics.items()}

    return compute


@torch.no_grad()
def ctc_outputs(
    model: ConformerSslForCTC,
    processor: Wav2Vec2Processor,
    audios: Sequence[np.ndarray],
    batch_size: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> tuple[list[str], list[np.ndarray]]:
    """Greedy CTC transcripts and the unpadded log-probabilities (steps, vocab) of each waveform, in batches.

    Args:
        model / processor: a fine-tuned pair (e.g. `AutoModelForCTC` / `AutoProcessor` of one folder).
        audios: 16 kHz mono float32 arrays; batches are formed in the given order (sort by length for speed).
        batch_size: utterances per forward pass.
        progress: called with the number of utterances done after each batch (e.g. `tqdm.update`).
    The log-probabilities are what a beam search with an LM (`finetune.lm.lm_decode`) takes.
    """
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    log_probs: list[np.ndarray] = []
    for start in range(0, len(audios), batch_size):
        chunk = list(audios[start : start + batch_size])
        inputs = processor.feature_extractor(chunk, sampling_rate=SAMPLING_RATE, return_tensors="pt", device=device)
        logits = model(**inputs).logits.float()  # (batch, steps, vocab)
        lengths = model._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
        texts.extend(processor.tokenizer.batch_decode(greedy_ctc_ids(logits, lengths, model.config.pad_token_id).cpu()))
        scores = torch.log_softmax(logits, dim=-1).cpu().numpy()
        log_probs.extend(scores[i, : int(n)] for i, n in enumerate(lengths))
        if progress is not None:
            progress(len(chunk))
    return texts, log_probs


def transcribe(
    model: ConformerSslForCTC,
    processor: Wav2Vec2Processor,
    audios: Sequence[np.ndarray],
    batch_size: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> list[str]:
    """Greedy CTC transcripts of 16 kHz mono float32 arrays, padded steps ignored (see `ctc_outputs`)."""
    return ctc_outputs(model, processor, audios, batch_size, progress)[0]
