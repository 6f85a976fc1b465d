"""Transducer fine-tuning: a pretrained FastConformer becomes the encoder of transformers' `ParakeetForTDT` (or
`ParakeetForRNNT`), trained with the stock `Trainer` and transformers' own losses.

What `scripts/finetune_transducer.py` runs (`run_transducer`). Same arguments, data rules and output folder as
`run_ctc` (`_train_and_report`: preemption, results.md/json, curves, push), plus `TransducerArguments`. Tokens: a
BPE (or unigram) tokenizer trained with HF `tokenizers` on the normalised training transcripts, `<blank>` last (the
Parakeet convention: blank = vocab_size - 1, also the pad of label batches). The output folder is all stock
transformers classes (`ParakeetForTDT`, `ParakeetProcessor` = `ParakeetFeatureExtractor` + `ParakeetTokenizer`):
`AutoProcessor`, `AutoModelForTDT` / `AutoModelForRNNT` and `pipeline("automatic-speech-recognition")` need no package.
With `predictor_from` (a `scripts/pretrain_predictor.py` folder, `predictor.py`) the tokenizer and the prediction
network's starting weights come from text-only pretraining (the joint stays new); `tokenizer_from` takes a saved
tokenizer alone.

Training features are our extractor's (NeMo parity, dither for training audio); the saved `ParakeetFeatureExtractor`
computes the same values on the valid frames (it returns one extra, masked, trailing frame).

Facts of transformers 5.25 handled here:
- `ParakeetForTDT.generate` takes the greedy arg-max over the token *and* duration logits, so a model whose
  duration logits win (any freshly initialised joint) emits ids >= vocab_size and crashes in the decoder embedding.
  The saved generation config suppresses those ids (`suppress_tokens`), which the stock pipeline honours.
- `ParakeetForRNNT`'s loss is `torchaudio.functional.rnnt_loss`: where it cannot run (no torchaudio; torchaudio
  2.11.1, the newest, installs next to torch 2.13 but its native library does not load) `--head rnnt` is refused
  up front (`rnnt_loss_problem`). An RNN-T folder still decodes and transcribes.
- Batched transducer decoding is not the pipeline's: the amount of padding (not its values) changes
  `ParakeetEncoder`'s outputs on the valid frames from its first block on (its subsampling output is unchanged;
  ~3e-2 after 2 blocks of the tiny NEST encoder, where our encoder with the same weights stays within ~7e-7), and
  in a batched `generate` an utterance whose frames are exhausted keeps emitting tokens. Evaluation and `transcribe.py`
  decode each utterance alone (`generate_each`, `transducer_outputs`), as the pipeline does.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    EvalPrediction,
    ParakeetFeatureExtractor,
    ParakeetProcessor,
    ParakeetTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ..data import DataConfig
from ..data.augment import SpecAugmentConfig, spec_augment
from ..errors import ConfigError, UserError, check_model_source, check_paths
from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from ..frames import SAMPLING_RATE
from ..interop.convert import NEMO_SUFFIX
from ..interop.parakeet import check_parakeet_compatible, export_parakeet_for_asr
from ..modeling_conformer_ssl import ConformerSslModel
from .args import DataArguments, FinetuneArguments, ModelArguments
from .metrics import load_metrics
from .model_init import (
    LoadReport,
    _load_report,
    _warn_encoder_keys,
    converted_source,
    model_input_config,
    without_load_report,
)
from .optim import set_unused_parameter_search, train_time_options, unused_parameter_reasons
from .report import card_base_model, ctc_model_card
from .rows import decode_rows, rows_to_dataset
from .run import (
    FinetuneResult,
    _train_and_report,
    apply_mixed_precision,
    check_model_argument,
    check_output_dir,
    transcribed_rows,
)
from .text import normalize_transcript

logger = logging.getLogger(__name__)

BLANK_TOKEN = "<blank>"  # Parakeet's blank: the last id; also the pad of label batches
UNK_TOKEN = "<unk>"
HEADS = ("tdt", "rnnt")
TRANSDUCER_DEFAULTS = {"output_dir": "runs/transducer", "metric_for_best_model": "wer", "greater_is_better": False}


@dataclass
class TransducerArguments:
    """The transducer head and its tokenizer (the `finetune_transducer.py`-only keys of a recipe)."""

    head: str = field(default="tdt", metadata={"help": "tdt (ParakeetForTDT) or rnnt (ParakeetForRNNT)."})
    tokenizer_vocab_size: int = field(
        default=128,
        metadata={"help": "Tokens of the BPE/unigram tokenizer trained on the training text, blank included."},
    )
    tokenizer_model: str = field(default="bpe", metadata={"help": "bpe or unigram (HF tokenizers trainers)."})
    decoder_hidden_size: int = field(default=320, metadata={"help": "LSTM prediction network and joint width."})
    num_decoder_layers: int = field(default=1, metadata={"help": "LSTM layers of the prediction network."})
    max_symbols_per_step: int | None = field(
        default=None,
        metadata={
            "help": "Greedy decoding's length budget: at most this many tokens per encoder frame of an utterance "
            "(transformers' max_symbols_per_step, 10 by default; saved with the model). A model early in training "
            "can emit tokens without moving on until the budget runs out, which makes its validation slow."
        },
    )
    predictor_from: str | None = field(
        default=None,
        metadata={
            "help": "A pretrain_predictor.py folder: its tokenizer is used and the prediction network starts from "
            "its weights (trained on text); the joint stays new."
        },
    )
    tokenizer_from: str | None = field(
        default=None,
        metadata={
            "help": "A folder with a saved ParakeetTokenizer (a pretrain_predictor.py or finetune_transducer.py "
            "output folder) to use instead of training one."
        },
    )


def rnnt_loss_problem() -> str | None:
    """Why torchaudio's `rnnt_loss` (what `ParakeetForRNNT` trains with) cannot run here, or None when it can.

    torchaudio 2.11.1, the newest release, installs next to torch 2.13 (it asks for torch>=2.11) but its compiled
    library does not load, so importing it is not enough: a 1-frame loss is computed."""
    if importlib.util.find_spec("torchaudio") is None:
        return "torchaudio is not installed"
    try:
        import torchaudio.functional

        logits = torch.zeros(1, 1, 2, 2)
        one = torch.ones(1, dtype=torch.int32)
        torchaudio.functional.rnnt_loss(logits, one[None] * 0, one, one, blank=1)
    except Exception as error:  # noqa: BLE001  (an OSError, ImportError or RuntimeError from the native library)
        return f"torchaudio {getattr(torchaudio, '__version__', '?')} fails: {type(error).__name__}: {error}"
    return None


def check_transducer_arguments(args: TransducerArguments, finetune_args: FinetuneArguments) -> None:
    """Refuse what this path does not do, in one line each, before any data is made."""
    if args.head not in HEADS:
        raise ConfigError(f"head={args.head!r}: choose one of {', '.join(HEADS)}")
    if args.tokenizer_model not in ("bpe", "unigram"):
        raise ConfigError(f"tokenizer_model={args.tokenizer_model!r}: choose bpe or unigram")
    if args.max_symbols_per_step is not None and args.max_symbols_per_step < 1:
        raise ConfigError(f"max_symbols_per_step={args.max_symbols_per_step}: use at least 1 (or leave it unset: 10)")
    if args.tokenizer_vocab_size < 8:
        raise ConfigError(
            f"tokenizer_vocab_size={args.tokenizer_vocab_size}: use at least 8 (blank and <unk> included)"
        )
    if args.head == "rnnt":
        problem = rnnt_loss_problem()
        if problem:
            raise ConfigError(
                f"head=rnnt: transformers' RNN-T loss (transformers/loss/loss_rnnt.py) is torchaudio's rnnt_loss, "
                f"which does not run here ({problem}); use head=tdt"
            )
    unsupported = {
        "freeze_encoder": finetune_args.freeze_encoder,
        "freeze_encoder_steps": finetune_args.freeze_encoder_steps,
        "layer_decay": finetune_args.layer_decay if finetune_args.layer_decay != 1.0 else 0,
    }
    for name, value in unsupported.items():
        if value:
            raise ConfigError(f"{name}={value!r} is not supported by finetune_transducer.py yet (CTC only)")


# ============================================================================================ tokenizer
def build_transducer_tokenizer(texts: Sequence[str], vocab_size: int, model: str = "bpe") -> ParakeetTokenizer:
    """A `ParakeetTokenizer` trained on the normalised `texts`: `<unk>` 0, subwords, `<blank>` last (= pad).

    The trainer may stop below `vocab_size` on little text (all merges used); the real size is `len(tokenizer)`.
    """
    normalised = [text for text in (normalize_transcript(t) for t in texts) if text]
    if not normalised:
        raise ConfigError("the training transcripts are empty after normalisation; check the 'text' field")
    if model == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size - 1, special_tokens=[UNK_TOKEN], unk_token=UNK_TOKEN, show_progress=False
        )
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[UNK_TOKEN], show_progress=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(normalised, trainer)
    tokenizer.add_special_tokens([BLANK_TOKEN])
    wrapped = ParakeetTokenizer(tokenizer_object=tokenizer, unk_token=UNK_TOKEN, pad_token=BLANK_TOKEN)
    if wrapped.pad_token_id != len(wrapped) - 1:
        raise RuntimeError(f"{BLANK_TOKEN} has id {wrapped.pad_token_id}, expected the last id {len(wrapped) - 1}")
    return wrapped


def check_transducer_tokenizer(tokenizer: Any, source: str) -> None:
    """Refuse a tokenizer whose last id is not `<blank>` (what Parakeet transducers and the collator expect)."""
    blank = getattr(tokenizer, "pad_token_id", None)
    if blank != len(tokenizer) - 1 or tokenizer.convert_ids_to_tokens(blank) != BLANK_TOKEN:
        raise ConfigError(
            f"{source}: its pad token (id {blank}) is not {BLANK_TOKEN} as the last of {len(tokenizer)} ids; "
            "give a tokenizer made by finetune_transducer.py or pretrain_predictor.py"
        )


def load_transducer_tokenizer(path: str | Path, argument: str = "tokenizer_from") -> ParakeetTokenizer:
    """The `ParakeetTokenizer` saved in a predictor or transducer output folder."""
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(
            f"{argument} {str(path)!r}: no tokenizer.json there; give a pretrain_predictor.py or "
            "finetune_transducer.py output folder"
        )
    tokenizer = ParakeetTokenizer.from_pretrained(folder)
    check_transducer_tokenizer(tokenizer, f"{argument} {str(path)!r}")
    return tokenizer


def build_transducer_processor(
    tokenizer: ParakeetTokenizer, num_mel_bins: int, head: str = "tdt"
) -> tuple[ParakeetProcessor, ConformerSslFeatureExtractor]:
    """(the stock `ParakeetProcessor` saved with the model, our extractor of the same features for training)."""
    ours = ConformerSslFeatureExtractor(feature_size=num_mel_bins)
    stock = ParakeetFeatureExtractor(
        feature_size=num_mel_bins,
        sampling_rate=ours.sampling_rate,
        hop_length=ours.hop_length,
        n_fft=ours.n_fft,
        win_length=ours.win_length,
        preemphasis=ours.preemphasis,
    )
    return ParakeetProcessor(stock, tokenizer, blank_token=BLANK_TOKEN, decoder_type=head), ours


def tokens_and_predictor(
    args: TransducerArguments,
) -> tuple[TransducerArguments, ParakeetTokenizer | None, tuple[dict[str, torch.Tensor], dict[str, Any]] | None]:
    """What `predictor_from` / `tokenizer_from` bring: (args with the predictor's decoder sizes, the saved tokenizer
    or None (train one), (the decoder state dict, the predictor config) or None (a new prediction network))."""
    if args.predictor_from and args.tokenizer_from:
        raise ConfigError(
            f"predictor_from={args.predictor_from!r} and tokenizer_from={args.tokenizer_from!r}: the predictor "
            "brings its own tokenizer; drop tokenizer_from"
        )
    if args.tokenizer_from:
        check_paths([args.tokenizer_from], "tokenizer_from", "folder")
        return args, load_transducer_tokenizer(args.tokenizer_from), None
    if not args.predictor_from:
        return args, None, None
    from .predictor import load_predictor  # here, not at the top: predictor.py imports this module

    tokenizer, state, config = load_predictor(args.predictor_from)
    sizes = {}
    for name in ("decoder_hidden_size", "num_decoder_layers"):
        given, saved = getattr(args, name), config[name]
        if given != saved and given != getattr(TransducerArguments(), name):  # a default is not a request
            raise ConfigError(
                f"{name}={given}, but predictor_from={args.predictor_from!r} has {name}={saved}: drop {name} "
                "(it is taken from the predictor) or pretrain a predictor of that size"
            )
        sizes[name] = saved
    return replace(args, **sizes), tokenizer, (state, config)


def load_prediction_network(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str
) -> None:
    """The pretrained prediction network into `model.decoder`, every tensor (strict)."""
    model.decoder.load_state_dict(state, strict=True)
    perplexity = config.get("results", {}).get("perplexity")
    logger.info("prediction network: %d tensors from %s (text perplexity %s)", len(state), source, perplexity)


# ============================================================================================ model
def check_transducer_encoder(config: Any, model_args: ModelArguments, head: str) -> None:
    """One `ConfigError` line naming each field (and value) of an encoder that `ParakeetEncoder` cannot hold, e.g.
    a Conformer's `subsampling='striding'` (4x)."""
    try:
        check_parakeet_compatible(config)
    except ValueError as error:
        source = model_args.model_name_or_path or f"preset {model_args.model_preset}"
        raise ConfigError(
            f"{source}: a transducer here is transformers' Parakeet{head.upper()}, whose encoder cannot hold "
            f"{str(error).split(': ', 1)[1]}; fine-tune this encoder with finetune_ctc.py instead"
        ) from None


def init_transducer_model(
    head: str,
    tokenizer: ParakeetTokenizer,
    model_args: ModelArguments,
    transducer_args: TransducerArguments,
) -> tuple[torch.nn.Module, LoadReport | None]:
    """`ParakeetForTDT` / `ParakeetForRNNT` whose encoder is the checkpoint's FastConformer (or a random one
    `--from_scratch`), with a new prediction network and joint. An encoder Parakeet cannot hold is refused."""
    config = model_input_config(
        model_args.model_name_or_path, model_args.model_preset, model_args.config_overrides, model_args.cache_dir
    )
    check_transducer_encoder(config, model_args, head)
    report = None
    if model_args.from_scratch or not model_args.model_name_or_path:
        if not model_args.from_scratch:
            raise ConfigError("--model_preset without --model_name_or_path builds a random model: add --from_scratch")
        encoder = ConformerSslModel(config)
    else:
        with without_load_report():
            encoder, info = ConformerSslModel.from_pretrained(
                model_args.model_name_or_path, config=config, output_loading_info=True, cache_dir=model_args.cache_dir
            )
        report = _load_report(info, base_prefix="")
        report.new_head = ["encoder_projector", "decoder", "joint"]
        _warn_encoder_keys(report, model_args.model_name_or_path)
    blank = tokenizer.pad_token_id
    model = export_parakeet_for_asr(
        encoder,
        head,
        len(tokenizer),
        blank_token_id=blank,
        pad_token_id=blank,
        decoder_hidden_size=transducer_args.decoder_hidden_size,
        num_decoder_layers=transducer_args.num_decoder_layers,
    )
    if transducer_args.max_symbols_per_step is not None:  # read by generate through the model attribute
        model.config.max_symbols_per_step = model.max_symbols_per_step = transducer_args.max_symbols_per_step
    generation = model.generation_config
    generation.decoder_start_token_id = generation.pad_token_id = generation.bos_token_id = blank
    if head == "tdt":  # see the module docstring: greedy generate would otherwise pick duration slots as tokens
        generation.suppress_tokens = list(range(len(tokenizer), len(tokenizer) + len(model.config.durations)))
    return model, report


# ============================================================================================ data and trainer
class TransducerCollator:
    """Metadata rows -> `{"input_features", "attention_mask", "labels", "decoder_input_ids"}` for Parakeet
    transducers: labels padded with blank (what both losses count as padding), decoder inputs = [blank, labels]."""

    def __init__(
        self,
        feature_extractor: ConformerSslFeatureExtractor,
        tokenizer: ParakeetTokenizer,
        spec_augment: SpecAugmentConfig | None = None,
        dither: bool = True,
    ) -> None:
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.spec_augment = spec_augment
        self.dither = dither
        self.decode_config = DataConfig(min_duration=0.0, max_duration=None, crop_long=False, require_text=True)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        augment = all(row.get("augment", False) for row in rows)
        examples = decode_rows(rows, self.decode_config)
        dither = self.feature_extractor.dither if augment and self.dither else 0.0
        features = self.feature_extractor(
            [example["audio"] for example in examples], sampling_rate=SAMPLING_RATE, return_tensors="pt", dither=dither
        )
        blank = self.tokenizer.pad_token_id
        texts = [normalize_transcript(example.get("text")) for example in examples]
        labels = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").input_ids
        out = {
            "input_features": features["input_features"],
            "attention_mask": features["attention_mask"].long(),
            "labels": labels,
            "decoder_input_ids": torch.cat([torch.full((len(texts), 1), blank, dtype=labels.dtype), labels], 1),
        }
        if augment and self.spec_augment is not None:
            out["input_features"] = spec_augment(
                out["input_features"], out["attention_mask"].sum(-1), self.spec_augment
            )
        return out


class TransducerTrainer(Trainer):
    """`Trainer` whose evaluation decodes with the model's greedy `generate` (what the pipeline runs) instead of
    gathering (batch, T, U + 1, vocab) joint logits."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = model(**inputs).loss.detach()
        if prediction_loss_only:
            return loss, None, None
        unwrapped = self.accelerator.unwrap_model(model)
        sequences = generate_each(unwrapped, inputs["input_features"], inputs["attention_mask"])
        padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=-100)
        return loss, padded, inputs["labels"]


@torch.no_grad()
def generate_each(model: torch.nn.Module, input_features: torch.Tensor, attention_mask: torch.Tensor) -> list:
    """Greedy ids of each utterance of a padded batch, decoded alone on its valid frames.

    Not one batched `generate`: in transformers 5.25 a batch element whose encoder frames are exhausted keeps
    emitting tokens while the others decode, and padding changes ParakeetEncoder's outputs on the valid frames
    (~1e-2), so batched transcripts differ from the pipeline's (which decodes one utterance at a time)."""
    sequences = []
    for features, mask in zip(input_features, attention_mask):
        valid = int(mask.sum())
        output = model.generate(input_features=features[None, :valid], attention_mask=mask[None, :valid])
        sequences.append(output.sequences[0])
    return sequences


def make_transducer_compute_metrics(tokenizer: ParakeetTokenizer):
    """`compute_metrics`: corpus WER and CER of the greedy transcripts (ids < 0 are the Trainer's batch padding)."""
    metrics = load_metrics()

    def decode(ids) -> list[str]:
        return [
            tokenizer.decode([int(i) for i in row if i >= 0], skip_special_tokens=True, group_tokens=False)
            for row in ids
        ]

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        hypotheses, references = decode(prediction.predictions), decode(prediction.label_ids)
        return {name: metric.compute(predictions=hypotheses, references=references) for name, metric in metrics.items()}

    return compute


# ============================================================================================ inference
TRANSDUCER_MODEL_TYPES = ("parakeet_tdt", "parakeet_rnnt")


def is_transducer_folder(model_name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether a folder / Hub repo holds a Parakeet transducer (what `run_transducer` saves)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    return config.model_type in TRANSDUCER_MODEL_TYPES


def load_transducer(model_name_or_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """`AutoModelForTDT` / `AutoModelForRNNT` of a transducer folder."""
    from transformers import AutoConfig, AutoModelForRNNT, AutoModelForTDT

    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    auto = AutoModelForTDT if config.model_type == "parakeet_tdt" else AutoModelForRNNT
    return auto.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)


@torch.no_grad()
def transducer_outputs(
    model: torch.nn.Module,
    processor: ParakeetProcessor,
    audios: Sequence[Any],
    batch_size: int = 8,
    progress: Any = None,
) -> list[str]:
    """Greedy transcripts of 16 kHz waveforms, each decoded alone as the ASR pipeline does (see `generate_each`:
    batched transducer decoding differs in transformers 5.25); `batch_size` is accepted for the CTC signature."""
    hypotheses: list[str] = []
    for audio in audios:
        inputs = processor(audio=[audio], sampling_rate=SAMPLING_RATE).to(model.device)
        features = inputs["input_features"].to(model.dtype)
        sequences = model.generate(input_features=features, attention_mask=inputs["attention_mask"]).sequences
        hypotheses.extend(processor.batch_decode(sequences, skip_special_tokens=True))
        if progress is not None:
            progress(1)
    return hypotheses


# ============================================================================================ the run
def run_transducer(
    model_args: ModelArguments,
    data_args: DataArguments,
    finetune_args: FinetuneArguments,
    transducer_args: TransducerArguments,
    training_args: TrainingArguments,
) -> FinetuneResult:
    """TDT / RNN-T fine-tuning with the stock `Trainer`; the output folder is a stock Parakeet model + processor
    (`pipeline("automatic-speech-recognition", model=output_dir)` transcribes it) plus run.py's reports."""
    check_transducer_arguments(transducer_args, finetune_args)
    # Before any data is made: a wrong folder or size is refused in one line.
    transducer_args, saved_tokenizer, predictor = tokens_and_predictor(transducer_args)
    if (model_args.model_name_or_path or "").endswith(NEMO_SUFFIX):
        check_model_source(model_args.model_name_or_path, "--model_name_or_path", marker=None)  # a file
    else:
        check_model_argument(model_args)
    check_output_dir(training_args)
    # A .nemo file or a Parakeet folder / repo: its encoder converted into our classes for the run.
    with converted_source(model_args.model_name_or_path, model_args.from_scratch) as path:
        loaded = replace(model_args, model_name_or_path=path)
        return _run_transducer(
            loaded, data_args, finetune_args, transducer_args, training_args, saved_tokenizer, predictor,
            source=model_args.model_name_or_path,
        )  # fmt: skip


def _run_transducer(
    model_args: ModelArguments,
    data_args: DataArguments,
    finetune_args: FinetuneArguments,
    transducer_args: TransducerArguments,
    training_args: TrainingArguments,
    saved_tokenizer: ParakeetTokenizer | None,
    predictor: Any,
    source: str | None,
) -> FinetuneResult:
    config = model_input_config(
        model_args.model_name_or_path, model_args.model_preset, model_args.config_overrides, model_args.cache_dir
    )
    check_transducer_encoder(config, model_args, transducer_args.head)  # before the demo corpus is made
    apply_mixed_precision(training_args, finetune_args.mixed_precision)
    set_seed(training_args.seed)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    train_rows, eval_sets, load_test_sets = transcribed_rows(data_args, training_args)
    eval_rows = [row for rows in eval_sets.values() for row in rows]

    tokenizer = saved_tokenizer
    if tokenizer is None:
        texts = [row["text"] for row in train_rows]
        tokenizer = build_transducer_tokenizer(
            texts, transducer_args.tokenizer_vocab_size, transducer_args.tokenizer_model
        )
    tokens_from = transducer_args.predictor_from or transducer_args.tokenizer_from or "the training transcripts"
    logger.info("tokenizer: %d tokens (blank %d) from %s", len(tokenizer), tokenizer.pad_token_id, tokens_from)
    processor, features = build_transducer_processor(tokenizer, config.num_mel_bins, transducer_args.head)
    model, report = init_transducer_model(transducer_args.head, tokenizer, model_args, transducer_args)
    if predictor is not None:
        load_prediction_network(model, *predictor, transducer_args.predictor_from)
        if report is not None:
            report.new_head = ["encoder_projector", "joint"]

    spec, callbacks = train_time_options(data_args, finetune_args)
    set_unused_parameter_search(training_args, unused_parameter_reasons(finetune_args, model.config))
    trainer = TransducerTrainer(
        model=model,
        args=training_args,
        train_dataset=rows_to_dataset(train_rows, augment=True),
        eval_dataset=rows_to_dataset(eval_rows, augment=False) if eval_rows else None,
        data_collator=TransducerCollator(features, tokenizer, spec, dither=data_args.dither),
        processing_class=processor,
        compute_metrics=make_transducer_compute_metrics(tokenizer),
        callbacks=callbacks,
    )

    def card(repo_id: str, results: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
        base_model = card_base_model(source, model_args.from_scratch)
        text = ctc_model_card(repo_id, results, base_model=base_model, training_summary=summary)
        name = {"tdt": "TDT (token-and-duration transducer)", "rnnt": "RNN-T"}[transducer_args.head]
        return (
            text.replace("- ctc\n", f"- {transducer_args.head}\n- parakeet\n")
            .replace(
                "A Conformer CTC speech recogniser",
                f"A FastConformer {name} speech recogniser (ParakeetFor{transducer_args.head.upper()})",
            )
            .replace("finetune_ctc.py", "finetune_transducer.py")
            .replace(
                "Character vocabulary, greedy CTC decoding.",
                f"{transducer_args.tokenizer_model} subword "
                "tokens, greedy transducer decoding (stock transformers classes: no package needed).",
            )
        )

    extra = {
        "head": transducer_args.head,
        "train_utterances": len(train_rows),
        "train_audio_seconds": round(sum(float(row.get("duration") or 0.0) for row in train_rows), 1),
        "vocabulary": len(tokenizer),
        "predictor": "text" if predictor is not None else "scratch",
        "predictor_from": transducer_args.predictor_from,
        "tokenizer_from": transducer_args.tokenizer_from,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    result = _train_and_report(
        trainer, eval_sets, ("wer", "cer"), finetune_args, push_to_hub, extra, card, load_test_sets
    )
    result.load_report = report
    return result


__all__ = [
    "BLANK_TOKEN",
    "TRANSDUCER_DEFAULTS",
    "TransducerArguments",
    "TransducerCollator",
    "TransducerTrainer",
    "build_transducer_processor",
    "generate_each",
    "build_transducer_tokenizer",
    "check_transducer_arguments",
    "rnnt_loss_problem",
    "init_transducer_model",
    "is_transducer_folder",
    "load_prediction_network",
    "load_transducer",
    "load_transducer_tokenizer",
    "check_transducer_tokenizer",
    "tokens_and_predictor",
    "make_transducer_compute_metrics",
    "run_transducer",
    "transducer_outputs",
]
