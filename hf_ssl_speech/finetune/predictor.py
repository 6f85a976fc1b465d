"""Prediction-network pretraining on unpaired text, for the transducers of `transducer.py` (issue 27).

A transducer's prediction network (transformers' `ParakeetRNNTDecoder`: embedding, LSTM, projector) only ever sees
label sequences, so it can learn from text alone. `pretrain_predictor` trains that very module as a next-token
language model and saves its weights with the tokenizer; `finetune_transducer.py --predictor_from DIR` then uses
the tokenizer and starts the prediction network from the weights (Rao, Sak & Prabhavalkar 2017: an RNN-T whose
prediction network is initialised from a text LM). The joint and the encoder projector stay new.

The language model is the prediction network followed by a new output head, applied as the joint applies its own:
`head(activation(decoder(ids)))`, i.e. the joint with no acoustic input, so the decoder learns features that go
through the joint's nonlinearity. The head is dropped after training. Input `[blank, t1 .. tn-1]`, target
`[t1 .. tn]`: blank is the start symbol, exactly as in transducer training (`TransducerCollator`) and greedy
decoding. The blank logit is masked out, so the next-token distribution is over the real tokens (blank is never
a label), and the unigram baseline has the same support.

Output folder (`load_predictor` reads it): the `ParakeetTokenizer` (`save_pretrained`), `predictor.safetensors`
(the decoder's state dict, keys as in `ParakeetForTDT.decoder`), `predictor_config.json` and, written last so that
a crashed run never looks complete, `results.json` (held-out perplexity against the unigram baseline).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import ParakeetRNNTConfig, ParakeetTokenizer, get_scheduler
from transformers.activations import ACT2FN
from transformers.models.parakeet.modeling_parakeet import ParakeetRNNTDecoder

from ..errors import ConfigError, UserError
from .text import normalize_transcript
from .transducer import build_transducer_tokenizer, check_transducer_tokenizer, load_transducer_tokenizer

logger = logging.getLogger(__name__)

MAX_TOKENS = 64  # tokens kept per sentence: LM context beyond this adds CPU time, not much perplexity
IGNORE_INDEX = -100  # target padding (F.cross_entropy's default ignore_index)
WEIGHTS_FILE = "predictor.safetensors"
CONFIG_FILE = "predictor_config.json"
RESULTS_FILE = "results.json"
MAKE_ONE = "make one with scripts/pretrain_predictor.py --text FILE --output_dir DIR"


@dataclass
class PredictorArguments:
    """The prediction network trained on text and its tokenizer (`scripts/pretrain_predictor.py` flags)."""

    tokenizer_vocab_size: int = field(
        default=128, metadata={"help": "Tokens of the BPE/unigram tokenizer trained on the text, blank included."}
    )
    tokenizer_model: str = field(default="bpe", metadata={"help": "bpe or unigram (HF tokenizers trainers)."})
    decoder_hidden_size: int = field(default=320, metadata={"help": "LSTM prediction network width."})
    num_decoder_layers: int = field(default=1, metadata={"help": "LSTM layers of the prediction network."})
    max_steps: int = field(default=2000, metadata={"help": "Optimiser steps (0: evaluate the untrained network)."})
    batch_size: int = field(default=64, metadata={"help": "Sentences per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warmup, then cosine decay to 0."})
    valid_fraction: float = field(
        default=0.05, metadata={"help": "Held-out sentences (after a seeded shuffle) when no valid text is given."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the split, the initialisation and the batches."})


def check_predictor_arguments(args: PredictorArguments) -> None:
    """One `ConfigError` line for the first value this cannot train with."""
    if args.tokenizer_model not in ("bpe", "unigram"):
        raise ConfigError(f"tokenizer_model={args.tokenizer_model!r}: choose bpe or unigram")
    minimum = {"tokenizer_vocab_size": 8, "decoder_hidden_size": 1, "num_decoder_layers": 1, "batch_size": 1}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            raise ConfigError(f"{name}={getattr(args, name)}: use at least {low}")
    if args.max_steps < 0 or args.warmup_steps < 0:
        raise ConfigError(f"max_steps={args.max_steps}, warmup_steps={args.warmup_steps}: use values >= 0")
    if args.learning_rate <= 0:
        raise ConfigError(f"learning_rate={args.learning_rate}: use a positive value (e.g. 2e-3)")
    if not 0.0 < args.valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction={args.valid_fraction}: use a value between 0 and 1 (e.g. 0.05)")


# ============================================================================================ data
def split_texts(
    texts: Sequence[str], valid_texts: Sequence[str] | None, valid_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(training, held-out) normalised non-empty sentences: `valid_texts` when given, else the last
    `valid_fraction` (at least one) of `texts` after a shuffle seeded with `seed`."""
    train = [text for text in (normalize_transcript(t) for t in texts) if text]
    if valid_texts is not None:
        valid = [text for text in (normalize_transcript(t) for t in valid_texts) if text]
        if not train or not valid:
            which = "training" if not train else "validation"
            raise ConfigError(f"the {which} text has no sentence left after normalisation; give one sentence a line")
        return train, valid
    if len(train) < 2:
        raise ConfigError(
            f"{len(train)} sentence(s) after normalisation: give at least 2 (one is held out for perplexity)"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(len(train) - 1, max(1, round(valid_fraction * len(train))))
    shuffled = [train[index] for index in order]
    return shuffled[:-held], shuffled[-held:]


def encode(tokenizer: ParakeetTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each sentence, at most `MAX_TOKENS`; sentences with no token are dropped."""
    ids = tokenizer(list(texts), add_special_tokens=False).input_ids
    return [row[:MAX_TOKENS] for row in ids if row]


def next_token_batch(sequences: Sequence[Sequence[int]], blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (batch, longest): inputs `[blank, t1 .. tn-1]` right-padded with blank (a causal
    LSTM never reads the padding of its own row), targets `[t1 .. tn]` padded with IGNORE_INDEX."""
    longest = max(len(row) for row in sequences)
    inputs = torch.full((len(sequences), longest), blank, dtype=torch.long)
    targets = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
    for index, row in enumerate(sequences):
        inputs[index, 1 : len(row)] = torch.tensor(row[:-1], dtype=torch.long)
        targets[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return inputs, targets


# ============================================================================================ model
def predictor_config(vocab_size: int, blank: int, args: PredictorArguments) -> ParakeetRNNTConfig:
    """The transducer config fields the prediction network reads (the encoder config is the default: unused)."""
    return ParakeetRNNTConfig(
        vocab_size=vocab_size,
        blank_token_id=blank,
        pad_token_id=blank,
        decoder_hidden_size=args.decoder_hidden_size,
        num_decoder_layers=args.num_decoder_layers,
    )


class PredictorLanguageModel(torch.nn.Module):
    """`ParakeetRNNTDecoder` + a next-token head applied as the joint applies its own (see the module docstring)."""

    def __init__(self, config: ParakeetRNNTConfig) -> None:
        super().__init__()
        self.decoder = ParakeetRNNTDecoder(config)
        self.activation = ACT2FN[config.hidden_act]
        self.head = torch.nn.Linear(config.decoder_hidden_size, config.vocab_size)
        self.blank = config.blank_token_id
        self.hidden_act = config.hidden_act

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, length) ids -> (batch, length, vocab) logits, blank's at -inf (blank is never a label)."""
        logits = self.head(self.activation(self.decoder(input_ids)))  # (batch, length, vocab)
        return logits.index_fill(-1, torch.tensor([self.blank], device=logits.device), float("-inf"))


def next_token_loss(model: PredictorLanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the non-padding targets."""
    logits = model(inputs)  # (batch, length, vocab)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def perplexity(model: PredictorLanguageModel, sequences: Sequence[Sequence[int]], batch_size: int) -> float:
    """exp(mean next-token negative log-likelihood) over every token of `sequences`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        inputs, targets = next_token_batch(sequences[start : start + batch_size], model.blank)
        total += float(next_token_loss(model, inputs, targets))
        count += int((targets != IGNORE_INDEX).sum())
    return math.exp(total / count)


def unigram_perplexity(train: Sequence[Sequence[int]], valid: Sequence[Sequence[int]], vocab_size: int) -> float:
    """The baseline: add-one smoothed unigram frequencies of the training tokens, over the `vocab_size - 1`
    non-blank tokens (the LM's support), scored on the held-out tokens."""
    counts = torch.ones(vocab_size - 1, dtype=torch.float64)  # blank is the last id: never counted nor scored
    for row in train:
        counts += torch.bincount(torch.tensor(row), minlength=vocab_size)[:-1]
    log_probs = (counts / counts.sum()).log()
    held = torch.tensor([token for row in valid for token in row])
    return math.exp(-float(log_probs[held].mean()))


def train_steps(
    model: PredictorLanguageModel,
    sequences: Sequence[Sequence[int]],
    args: PredictorArguments,
    log: Callable[[str], None],
) -> float:
    """`args.max_steps` AdamW steps on batches of `args.batch_size` sentences (seeded epoch permutations); returns
    the mean per-token loss of the last tenth of the steps (nan without steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    schedule = get_scheduler("cosine", optimizer, min(args.warmup_steps, args.max_steps), args.max_steps)
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    every = max(1, min(100, args.max_steps // 10))
    recent: list[float] = []
    model.train()
    for step in range(1, args.max_steps + 1):
        if len(order) < args.batch_size:  # a new epoch's permutation (a batch may span two epochs)
            order += torch.randperm(len(sequences), generator=generator).tolist()
        batch, order = order[: args.batch_size], order[args.batch_size :]
        inputs, targets = next_token_batch([sequences[index] for index in batch], model.blank)
        tokens = int((targets != IGNORE_INDEX).sum())
        loss = next_token_loss(model, inputs, targets) / tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-max(1, args.max_steps // 10) :]
        if step % every == 0 or step == args.max_steps:
            log(
                f"predictor step {step}/{args.max_steps}: loss {recent[-1]:.4f} (perplexity {math.exp(recent[-1]):.2f})"
            )
    return sum(recent) / len(recent) if recent else float("nan")


# ============================================================================================ the run
def check_output_folder(output_dir: Path) -> None:
    """Refuse to write into a folder that holds something other than an earlier predictor."""
    if output_dir.is_file():
        raise ConfigError(f"output_dir {str(output_dir)!r} is a file: give a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"output_dir {str(output_dir)!r} holds other files (no {CONFIG_FILE}): give a new or empty folder"
        )


def pretrain_predictor(
    texts: Sequence[str],
    output_dir: str | Path,
    args: PredictorArguments,
    valid_texts: Sequence[str] | None = None,
    tokenizer: ParakeetTokenizer | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Train the prediction network as a next-token LM on `texts`, write the predictor folder, return the summary
    (held-out `perplexity` against the add-one `unigram_perplexity` on the same tokens, sizes, `wall_s`).

    The tokenizer is trained on the training sentences (`build_transducer_tokenizer`) unless `tokenizer` is given
    (a `ParakeetTokenizer` with `<blank>` as its last id, e.g. an earlier transducer's)."""
    start = time.perf_counter()
    check_predictor_arguments(args)
    output_dir = Path(output_dir)
    check_output_folder(output_dir)
    train_texts, held_texts = split_texts(texts, valid_texts, args.valid_fraction, args.seed)
    if tokenizer is None:
        tokenizer = build_transducer_tokenizer(train_texts, args.tokenizer_vocab_size, args.tokenizer_model)
    check_transducer_tokenizer(tokenizer, "tokenizer")
    blank, vocab_size = tokenizer.pad_token_id, len(tokenizer)
    train, valid = encode(tokenizer, train_texts), encode(tokenizer, held_texts)
    if not train or not valid:
        raise ConfigError("no sentence has a token after tokenisation: check the text files")
    log(
        f"predictor: {len(train)} training / {len(valid)} held-out sentences, {vocab_size} tokens (blank {blank}), "
        f"LSTM {args.num_decoder_layers}x{args.decoder_hidden_size}, {args.max_steps} steps"
    )

    torch.manual_seed(args.seed)
    config = predictor_config(vocab_size, blank, args)
    model = PredictorLanguageModel(config)
    train_loss = train_steps(model, train, args, log)
    summary = {
        "steps": args.max_steps,
        "train_sentences": len(train),
        "train_tokens": sum(len(row) for row in train),
        "valid_sentences": len(valid),
        "valid_tokens": sum(len(row) for row in valid),
        "valid_source": "valid_texts" if valid_texts is not None else f"held out ({args.valid_fraction:g})",
        "train_loss": round(train_loss, 4) if math.isfinite(train_loss) else None,
        "perplexity": round(perplexity(model, valid, args.batch_size), 4),
        "unigram_perplexity": round(unigram_perplexity(train, valid, vocab_size), 4),
        "vocabulary": vocab_size,
        "tokenizer_model": args.tokenizer_model,
        "decoder_hidden_size": args.decoder_hidden_size,
        "num_decoder_layers": args.num_decoder_layers,
        "max_tokens": MAX_TOKENS,
    }
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    save_predictor(output_dir, tokenizer, model, args, summary)
    log(
        f"predictor: held-out perplexity {summary['perplexity']:.2f} vs unigram {summary['unigram_perplexity']:.2f} "
        f"({summary['valid_tokens']} tokens); saved to {output_dir}"
    )
    return summary


def save_predictor(
    output_dir: Path,
    tokenizer: ParakeetTokenizer,
    model: PredictorLanguageModel,
    args: PredictorArguments,
    summary: dict[str, Any],
) -> None:
    """The folder `load_predictor` reads; results.json last (a folder without it is an unfinished run)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_FILE).unlink(missing_ok=True)  # an earlier run's, which the new files would contradict
    tokenizer.save_pretrained(output_dir)
    save_file({key: value.contiguous() for key, value in model.decoder.state_dict().items()}, output_dir / WEIGHTS_FILE)
    config = {
        "vocab_size": len(tokenizer),
        "blank_token_id": tokenizer.pad_token_id,
        "decoder_hidden_size": args.decoder_hidden_size,
        "num_decoder_layers": args.num_decoder_layers,
        "hidden_act": model.hidden_act,  # the joint's activation the decoder was trained through
        "tokenizer_model": args.tokenizer_model,
    }
    (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (output_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")


# ============================================================================================ loading
def load_predictor(path: str | Path) -> tuple[ParakeetTokenizer, dict[str, torch.Tensor], dict[str, Any]]:
    """(tokenizer, decoder state dict with `ParakeetForTDT.decoder`'s keys, predictor config) of a
    `pretrain_predictor` folder; the config also holds the run's summary under "results"."""
    folder = Path(path)
    missing = [
        name for name in (CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", RESULTS_FILE) if not (folder / name).is_file()
    ]
    if missing:
        what = "no such folder" if not folder.is_dir() else f"no {', '.join(missing)}"
        unfinished = " (an unfinished run?)" if folder.is_dir() and missing == [RESULTS_FILE] else ""
        raise UserError(f"predictor folder {str(path)!r}: {what}{unfinished}; {MAKE_ONE}")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["results"] = json.loads((folder / RESULTS_FILE).read_text())
    tokenizer = load_transducer_tokenizer(folder, "predictor folder")
    state = load_file(folder / WEIGHTS_FILE)
    vocab, hidden = tuple(state["embedding.weight"].shape)
    if (vocab, hidden) != (len(tokenizer), config["decoder_hidden_size"]):
        raise UserError(
            f"predictor folder {str(path)!r}: embedding.weight is {vocab}x{hidden}, but the tokenizer has "
            f"{len(tokenizer)} tokens and {CONFIG_FILE} says decoder_hidden_size={config['decoder_hidden_size']}; "
            f"{MAKE_ONE}"
        )
    return tokenizer, state, config


__all__ = [
    "PredictorArguments",
    "PredictorLanguageModel",
    "load_predictor",
    "pretrain_predictor",
    "unigram_perplexity",
]
