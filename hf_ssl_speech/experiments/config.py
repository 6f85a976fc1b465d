"""The experiment's settings: one YAML file (configs/experiments/*.yaml) read into `ExperimentConfig`.

`load_experiment_config` reads it through `config_io` (the recipes' parser) and `validate_config` checks what
spans several fields; errors (`ExperimentError`) name the field and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config_io
from ..errors import ConfigError

# "transducer" sits after "probes" so that adding it left the markers of finished experiments valid.
STAGES = ("corpus", "pretrain", "finetune", "evaluate", "probes", "transducer", "report")
INITS = ("pretrained", "probe", "scratch")
ARMS = ("standard", "in_domain")
HEADS = ("ctc", "tdt")
IN_DOMAIN = "@in_domain"  # suffix of a family trained on the in-domain pool: "nest@in_domain"
ROW_KEYS = {
    "arm": str,  # standard (unlabeled pool of other voices) | in_domain (the pool + unlabeled test-voice audio)
    "objective": str,  # pretraining family, or "none" for scratch baselines
    "labeled_minutes": float,  # the nominal size of the labeled subset (10, 60, ...)
    "init": str,  # pretrained | probe | scratch (the encoder's start)
    "head": str,  # ctc (character CTC) | tdt (transformers' ParakeetForTDT, subword tokens)
    "wer": float,  # fraction (0.25 = 25 %) on the held-out-voice test split, greedy CTC
    "cer": float,
    "wer_lm": float,  # the same model, beam search with the n-gram word LM (weights chosen on validation); None: tdt
    "cer_lm": float,
    "steps": int,  # fine-tuning optimiser steps actually run (early stopping may end a run before its cap)
    "best_step": int,  # the step of the checkpoint kept (lowest validation CER)
    "stopped_early": bool,  # early stopping ended the run before its step cap
    "wall_s": float,  # fine-tuning wall time
    "pretrain_fraction": float,  # share of the pretraining run the encoder had seen (< 1: compute curve; scratch 0)
}


class ExperimentError(ConfigError):
    """An experiment setting or state that cannot be used; the message names the field or folder and the fix."""


# ============================================================================================ configuration
@dataclass
class CorpusSpec:
    """The experiment's corpus: five parts made with `make_demo_corpus`, each from its own voices and seed.

    - pool (`pool_minutes`): unlabeled pretraining audio of every voice not held out, `speakers_per_voice`
      pseudo-speakers each;
    - labeled (`labeled_minutes`): transcribed audio of `labeled_voices` only, `labeled_speakers_per_voice`
      pseudo-speakers each; the nested subsets (`finetune.subsets`) are drawn from it;
    - valid / test (`valid_minutes` / `test_minutes`): held-out voices (`valid_voices` / `test_voices`, with every
      voice of the same talker), never in the pool or the labels (asserted);
    - in_domain (`in_domain_minutes`, 0 = no in-domain arm): unlabeled audio of the test voices, other sentences.
    `lm_sentences` grammar sentences, none of which occurs in a valid or test utterance, train the word LM.
    """

    pool_minutes: float = 600.0
    labeled_minutes: float = 66.0
    valid_minutes: float = 12.0
    test_minutes: float = 20.0
    in_domain_minutes: float = 0.0
    lm_sentences: int = 20000
    seed: int = 0
    engines: str | list[str] = "auto"
    speakers_per_voice: int = 8
    labeled_voices: list[str] = field(default_factory=list)  # ordered: a subset's `voices` takes the first N
    labeled_speakers_per_voice: int = 3
    valid_voices: list[str] = field(default_factory=list)
    test_voices: list[str] = field(default_factory=list)
    recorded_share: float | None = None
    noise_fraction: float = 0.0
    num_workers: int | None = None
    min_pretrain_hours: float = 0.0  # refuse to run when the pool is smaller (guards the full config)


@dataclass
class SubsetSpec:
    """One labeled subset: `minutes` of transcribed audio from the first `voices` labeled voices (None: all) and at
    most `speakers` of their pseudo-speakers (None: all), fine-tuned for at most `steps` steps (the cap: with
    `finetune.patience`, early stopping on validation CER usually ends a run before it)."""

    minutes: float
    steps: int
    voices: int | None = None
    speakers: int | None = None


@dataclass
class PretrainSpec:
    """One encoder per family: `recipes[name]` (a configs/pretrain YAML) + `overrides` shared by all families.

    `family_overrides[name]` may add settings that only make sense for one family (never the budget: model size,
    batch seconds and steps come from `overrides` and `max_steps`, the same for everybody).
    """

    recipes: dict[str, str] = field(default_factory=dict)
    in_domain: list[str] = field(default_factory=list)  # families also pretrained on pool + in-domain audio
    overrides: list[str] = field(default_factory=list)
    family_overrides: dict[str, list[str]] = field(default_factory=dict)
    max_steps: int = 1000
    # Also keep each encoder at these fractions of max_steps (e.g. [0.25, 0.5]): the pretraining-compute curve
    # fine-tunes them on `finetune.headline_minutes` of labels beside the finished encoder.
    curve_fractions: list[float] = field(default_factory=list)
    progress: bool = True


@dataclass(frozen=True)
class MaskingSpec:
    """One SpecAugment setting of fine-tuning (`DataArguments` freq/time masks): `time_masks` spans of up to
    `time_width` (a fraction of the utterance if < 1, else frames) and `freq_masks` bands of up to `freq_width`
    mel bins. All zero: no masking. `finetune.masking` lists the settings validation chooses from."""

    time_masks: int = 10
    time_width: float = 0.05
    freq_masks: int = 2
    freq_width: int = 27

    @property
    def label(self) -> str:
        """Short and unique, for run names and tables: "t10x0.05-f2x27"."""
        return f"t{self.time_masks}x{self.time_width:g}-f{self.freq_masks}x{self.freq_width}"


LR_SCHEDULERS = ("cosine", "tri_stage")


@dataclass
class FinetuneSpec:
    """CTC fine-tuning of every (init, subset): the same protocol for every init; every choice made on validation.

    The protocol follows wav2vec 2.0's low-resource recipe (Baevski et al. 2020: a head-only phase
    `freeze_finetune_updates`, a tri-stage learning rate, heavy time masking) and LP-FT (Kumar et al. 2022:
    training the new head first keeps a random head's gradients from distorting the pretrained features):

    - `head_only_steps`: the encoder is frozen and only the CTC head trains for the first N steps, then the whole
      model, for `pretrained` and `scratch` alike (`probe` keeps its encoder frozen throughout);
    - `lr_scheduler`: `cosine` (linear warmup of `warmup_steps`, cosine decay) or `tri_stage` (warmup, hold,
      decay over the `tri_stage` fractions of the step cap, to `final_lr_scale` x the peak; fairseq's
      tri-stage, through the stock `warmup_stable_decay` schedule);
    - `learning_rates[init]` x `masking` is a grid: on the grid subset (`grid_minutes`, default the first) every
      pair runs (the probe: the first masking only) and the one with the lowest validation CER is kept per
      (pretraining run, init); the other subsets reuse it (`curve_runs`: every run, only the family validation
      chose beside scratch, or none: a grid-subset-only measurement such as an encoder-size comparison), except
      on `rate_grid_minutes`, where every rate of the grid runs again with the kept masking and validation picks;
    - `patience`: a run stops after that many evaluations (every `eval_steps`, those of the head-only phase not
      counted) without a better validation CER; a subset's `steps` is only the cap. The checkpoint with the best
      validation CER is the model kept, so the number of steps is chosen on validation too;
    - `patience_start`: nor do the evaluations before that fraction of the cap count towards the patience (0.5:
      the end of the tri-stage hold): a model from scratch at the peak rate can sit on CTC's initial plateau for
      several evaluations and still train well after it;
    - `seeds`: > 1 trains the headline subset's kept runs (the chosen family's whole-model fine-tune and scratch)
      that many times, with Trainer seeds `seed`, `seed` + 1, ... (the head's initialisation, a scratch model's
      weights, the batch order and the masks change; the pretrained encoder does not): the report gives each
      init's mean and spread, so a gain can be told from the noise of one run.
    """

    subsets: list[SubsetSpec] = field(default_factory=list)
    batch_size: int = 8
    learning_rates: dict[str, list[float]] = field(
        default_factory=lambda: {"pretrained": [2e-4, 2e-3], "probe": [2e-3, 2e-2], "scratch": [2e-3, 2e-2]}
    )
    warmup_steps: int = 100  # lr_scheduler: cosine
    lr_scheduler: str = "cosine"  # cosine | tri_stage
    tri_stage: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.5])  # warmup, hold, decay (wav2vec 2.0)
    final_lr_scale: float = 0.05  # tri_stage: the last rate as a fraction of the peak (wav2vec 2.0: 0.05)
    weight_decay: float = 1e-3
    head_only_steps: int = 0  # pretrained and scratch: CTC head only first (fairseq freeze_finetune_updates)
    layer_decay: float = 1.0  # pretrained runs: layer-wise LR decay
    spec_augment: bool = True  # False: no masking at all (then `masking` must hold one setting, unused)
    masking: list[MaskingSpec] = field(default_factory=lambda: [MaskingSpec()])
    patience: int | None = None  # evaluations without a better validation CER before stopping (None: never)
    patience_start: float = 0.0  # fraction of the cap before which evaluations do not count towards the patience
    seeds: int = 1  # > 1: the headline subset's kept runs again with other Trainer seeds (the noise of one run)
    # The subset the verdict, the sample transcripts and the exported models are about (None: the fewest labels);
    # a label-efficiency curve may start below it (1 and 3 minutes under a 10-minute headline).
    headline_minutes: float | None = None
    grid_minutes: float | None = None  # the subset the learning-rate x masking grid runs on (None: the first)
    # The other subsets: "all" (every pretraining run and init) or "best" (the label-efficiency curve: the
    # pretraining run validation chose on the grid subset, whole-model fine-tuned, beside scratch) or "none" (only
    # the grid subset and the compute curve run)
    curve_runs: str = "all"
    # The other subsets the curve runs on (None: all of them); the subsets list still draws every nested subset,
    # so leaving one out here changes no other subset's utterances.
    curve_minutes: list[float] | None = None
    # The other subsets on which the curve runs search `learning_rates[init]` again, with the masking kept on the grid
    # subset, and validation picks the rate there: a rate chosen on 10 minutes need not suit 1 hour of labels.
    rate_grid_minutes: list[float] = field(default_factory=list)
    max_duration: float = 20.0
    inits: list[str] = field(default_factory=lambda: list(INITS))
    eval_steps: int = 100  # validation CER every N steps; the best checkpoint is the model kept
    valid_utterances: int | None = None  # validation utterances scored during training (None: all)
    dataloader_num_workers: int = 1  # features are made in loader workers, not in the training process
    save_steps: int = 250  # unused when eval_steps is set: checkpoints follow the evaluations
    logging_steps: int = 25
    progress: bool = False


@dataclass
class EvaluateSpec:
    """Greedy and n-gram-LM decoding of every kept model on validation (to tune the LM weights) and test."""

    batch_size: int = 16
    max_utterances: int | None = None  # None: the whole test split
    lm_order: int = 3
    lm_alphas: list[float] = field(default_factory=lambda: [0.3, 0.6, 1.0])
    lm_betas: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0])
    beam_width: int = 32


@dataclass
class ProbeStageSpec:
    """SUPERB-style probes on the frozen encoders of the standard arm (`experiments.probes`); `settings` fill its
    `ProbeSpec`. `command_train_voices` speak the keyword training set (default: the first labeled voices)."""

    enabled: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    command_train_voices: list[str] = field(default_factory=list)
    # whose speakers speaker_id tells apart: the unlabeled pool's ("pretrain") or, where the pool is too small
    # to give each speaker a few utterances (the toy config), the labeled pool's ("finetune")
    speaker_manifest: str = "pretrain"
    # the fine-tuned keyword spotter (`experiments.kws.KwsSpec`: enabled, labels_per_keyword, learning_rates, ...),
    # run on the encoder of the pretraining run the fine-tuning stage chose, beside scratch
    kws: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransducerArm:
    """One transducer run per subset: the encoder's start (`pretrained`: the chosen SSL family, or `scratch`) and
    the prediction network's (`scratch`, or `text`: pretrained as a next-token model on the LM sentences)."""

    encoder: str = "pretrained"
    predictor: str = "scratch"


@dataclass
class TransducerStageSpec:
    """TDT fine-tuning (transformers' `ParakeetForTDT`, `finetune.transducer.run_transducer`) on the same subsets,
    validation split and test voices as the CTC runs.

    `family` None: the standard-arm family whose pretrained CTC run had the lowest validation CER on the first
    subset. Every arm uses one tokenizer, trained on the LM sentences with the text predictor, so the arms differ
    only in their starting weights. `learning_rates[encoder]` is a grid run on the first subset, as for CTC.
    """

    enabled: bool = False
    family: str | None = None
    arms: list[TransducerArm] = field(
        default_factory=lambda: [
            TransducerArm("pretrained", "scratch"),
            TransducerArm("scratch", "scratch"),
            TransducerArm("pretrained", "text"),
        ]
    )
    learning_rates: dict[str, list[float]] = field(default_factory=lambda: {"pretrained": [1e-3], "scratch": [1e-3]})
    minutes: list[float] = field(default_factory=list)  # the subsets it runs on (empty: every subset)
    steps_scale: float = 1.0  # steps of a subset = its CTC steps x this (a transducer may need more)
    tokenizer_vocab_size: int = 128
    tokenizer_model: str = "bpe"
    decoder_hidden_size: int = 160
    num_decoder_layers: int = 1
    max_symbols_per_step: int | None = None  # greedy decoding's tokens per encoder frame (None: transformers' 10)
    predictor_steps: int = 2000
    predictor_batch_size: int = 64
    predictor_learning_rate: float = 2e-3


@dataclass
class ExperimentConfig:
    """A whole experiment (configs/experiments/*.yaml). Relative paths resolve against the current folder. A file
    with `base: <file>` holds only what differs from that file (`read_with_base`)."""

    name: str = "low_resource"
    description: str = ""
    output_dir: str = "runs/low_resource"  # corpus, checkpoints, fine-tuned models (large; not committed)
    results_dir: str = "docs/results"  # low_resource.json / .md / PNGs (small; committed)
    seed: int = 0
    budget_note: str = ""  # the time estimate, copied into the report
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    probes: ProbeStageSpec = field(default_factory=ProbeStageSpec)
    transducer: TransducerStageSpec = field(default_factory=TransducerStageSpec)
    models_dir: str | None = None  # where the best 10-min models are exported (docs/results/models), None: not
    # Independent runs of one stage (pretraining families; fine-tuning runs of one phase) in this many processes
    # at once. On a CPU, each run takes one core (OMP_NUM_THREADS=1) plus a little for its data loader.
    parallel_runs: int = 1


def load_experiment_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML (`config_io`, as recipes); `overrides` (e.g. {"output_dir": ...})
    replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment config {str(path)!r} does not exist (see configs/experiments/).")
    raw = read_with_base(path)
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    config = config_io.build(ExperimentConfig, raw, "", "experiment config key", ExperimentError)
    validate_config(config, str(path))
    return config


def read_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """An experiment YAML with `base: <file>` (relative to its folder) read as that file with these keys on top:
    a mapping merges key by key, any other value (a list too) replaces the base's. A variant of an experiment then
    holds only what differs, and cannot drift from the settings it shares."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ExperimentError(f"experiment config {str(path)!r}: its `base` chain loops ({chain}); remove one base")
    raw = config_io.read_yaml(path, "experiment config", ExperimentError)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ExperimentError(f"experiment config {str(path)!r}: base={base!r}: give one YAML file name, as a string")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ExperimentError(
            f"experiment config {str(path)!r}: base={base!r} names no file ({str(base_path)!r}); give a path "
            "relative to this config's folder, e.g. base: low_resource.yaml"
        )
    return _merged(read_with_base(base_path, (*seen, path.resolve())), raw)


def _merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `top` on top: mappings merge recursively, everything else is replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_config(config: ExperimentConfig, where: str = "config") -> None:
    """Cross-field checks; errors name the field and the fix."""
    f, p = config.finetune, config.pretrain
    if not p.recipes:
        raise ExperimentError(f"{where}: pretrain.recipes is empty; name at least one family: recipe YAML")
    for name in p.family_overrides:
        if name not in p.recipes:
            raise ExperimentError(f"{where}: pretrain.family_overrides.{name} names no family of pretrain.recipes")
    budget_keys = ("train.max_steps", "data.batch_seconds", "model.hidden_size", "model.num_hidden_layers")
    for name, items in p.family_overrides.items():
        for item in items:
            if item.split("=", 1)[0].strip() in budget_keys:
                raise ExperimentError(
                    f"{where}: pretrain.family_overrides.{name} sets {item!r}: the compute budget must be equal for "
                    "every family; put it in pretrain.overrides / pretrain.max_steps"
                )
    if p.max_steps < 1:
        raise ExperimentError(f"{where}: pretrain.max_steps={p.max_steps}: must be >= 1")
    for fraction in p.curve_fractions:
        if not 0 < fraction < 1 or round(fraction * p.max_steps) < 1:
            raise ExperimentError(
                f"{where}: pretrain.curve_fractions has {fraction}: each must be between 0 and 1 (exclusive) and "
                f"give at least one step of pretrain.max_steps={p.max_steps}; e.g. [0.25, 0.5]"
            )
    if config.parallel_runs < 1:
        raise ExperimentError(f"{where}: parallel_runs={config.parallel_runs}: must be >= 1 (1: one run at a time)")
    if config.probes.speaker_manifest not in ("pretrain", "finetune"):
        raise ExperimentError(
            f"{where}: probes.speaker_manifest={config.probes.speaker_manifest!r}: choose 'pretrain' (the unlabeled "
            "pool) or 'finetune' (the labeled pool)"
        )
    if not f.subsets:
        raise ExperimentError(f"{where}: finetune.subsets is empty; e.g. [{{minutes: 10, steps: 400}}]")
    minutes = [s.minutes for s in f.subsets]
    if minutes != sorted(set(minutes)) or minutes[0] <= 0:
        raise ExperimentError(f"{where}: finetune.subsets minutes {minutes} must be positive and increasing")
    if any(s.steps < 1 for s in f.subsets):
        raise ExperimentError(f"{where}: finetune.subsets steps must be >= 1")
    if f.grid_minutes is not None and f.grid_minutes not in minutes:
        raise ExperimentError(f"{where}: finetune.grid_minutes={f.grid_minutes} is not a subset's minutes {minutes}")
    if f.curve_minutes is not None and any(m not in minutes for m in f.curve_minutes):
        raise ExperimentError(
            f"{where}: finetune.curve_minutes={f.curve_minutes}: each must be a subset's minutes {minutes}"
        )
    grid_minutes = f.grid_minutes if f.grid_minutes is not None else minutes[0]
    if any(m not in minutes or m == grid_minutes for m in f.rate_grid_minutes):
        raise ExperimentError(
            f"{where}: finetune.rate_grid_minutes={f.rate_grid_minutes}: name subsets other than the grid subset "
            f"({grid_minutes}) among {minutes}"
        )
    if f.curve_runs not in ("all", "best", "none"):
        raise ExperimentError(f"{where}: finetune.curve_runs={f.curve_runs!r}: choose 'all', 'best' or 'none'")
    bad = [i for i in f.inits if i not in INITS]
    if bad or not f.inits:
        raise ExperimentError(f"{where}: finetune.inits={f.inits}: choose one or more of {INITS}")
    for name in p.in_domain:
        if name not in p.recipes:
            raise ExperimentError(f"{where}: pretrain.in_domain names {name!r}, not a family of pretrain.recipes")
    if p.in_domain and config.corpus.in_domain_minutes <= 0:
        raise ExperimentError(f"{where}: pretrain.in_domain is set but corpus.in_domain_minutes is 0; raise it")
    c = config.corpus
    for key in ("labeled_voices", "valid_voices", "test_voices"):
        if not getattr(c, key):
            raise ExperimentError(f"{where}: corpus.{key} is empty; list voice ids such as espeak:m3, flite:slt")
    clash = (set(c.labeled_voices) | set(c.valid_voices)) & set(c.test_voices) | set(c.labeled_voices) & set(
        c.valid_voices
    )
    if clash:
        raise ExperimentError(f"{where}: voices {sorted(clash)} are named in two of labeled/valid/test voices")
    for index, subset in enumerate(f.subsets):
        if subset.voices is not None and not 1 <= subset.voices <= len(c.labeled_voices):
            raise ExperimentError(
                f"{where}: finetune.subsets[{index}].voices={subset.voices}: must be 1..{len(c.labeled_voices)} "
                "(the number of corpus.labeled_voices)"
            )
    if minutes[-1] > c.labeled_minutes:
        raise ExperimentError(
            f"{where}: the largest labeled subset ({minutes[-1]} min) exceeds corpus.labeled_minutes "
            f"({c.labeled_minutes}); raise corpus.labeled_minutes"
        )
    for init in f.inits:
        rates = f.learning_rates.get(init)
        if not rates or any(not r > 0 for r in rates):
            raise ExperimentError(f"{where}: finetune.learning_rates.{init}={rates}: give one or more rates > 0")
    t = config.transducer
    if t.enabled:
        for index, arm in enumerate(t.arms):
            if arm.encoder not in ("pretrained", "scratch") or arm.predictor not in ("scratch", "text"):
                raise ExperimentError(
                    f"{where}: transducer.arms[{index}]={{encoder: {arm.encoder}, predictor: {arm.predictor}}}: "
                    "encoder is pretrained or scratch, predictor is scratch or text"
                )
            rates = t.learning_rates.get(arm.encoder)
            if not rates or any(not r > 0 for r in rates):
                raise ExperimentError(
                    f"{where}: transducer.learning_rates.{arm.encoder}={rates}: give one or more rates > 0"
                )
        if t.family is not None and t.family not in p.recipes:
            raise ExperimentError(
                f"{where}: transducer.family={t.family!r} is not a family of pretrain.recipes {sorted(p.recipes)}; "
                "name one, or null to take the one validation chose"
            )
        missing = [m for m in t.minutes if m not in [s.minutes for s in f.subsets]]
        if missing:
            raise ExperimentError(
                f"{where}: transducer.minutes {missing} are not subsets of finetune.subsets "
                f"{[s.minutes for s in f.subsets]}; choose among them, or [] for every subset"
            )
        if not t.arms or t.steps_scale <= 0:
            raise ExperimentError(f"{where}: transducer.arms must be non-empty and transducer.steps_scale > 0")
        if t.max_symbols_per_step is not None and t.max_symbols_per_step < 1:
            raise ExperimentError(
                f"{where}: transducer.max_symbols_per_step={t.max_symbols_per_step}: use at least 1, or null for 10"
            )
    validate_finetune_protocol(f, where)


def trained_minutes(f: FinetuneSpec) -> set[float]:
    """The subsets runs are fine-tuned on: the grid subset, and the curve's (`curve_minutes`, else all) unless
    `curve_runs` is none."""
    grid = f.grid_minutes if f.grid_minutes is not None else f.subsets[0].minutes
    if f.curve_runs == "none":
        return {grid}
    return {grid, *(f.curve_minutes if f.curve_minutes is not None else [s.minutes for s in f.subsets])}


def patience_start_step(spec: FinetuneSpec, max_steps: int, head_only: int = 0) -> int:
    """The step up to which a run's evaluations do not count towards early stopping: its head-only phase
    (`head_only` steps), or `finetune.patience_start` of its step cap if later (0.5: the end of the tri-stage
    hold). The CTC runs, the transducer runs (no head-only phase) and the config check all count it here."""
    return max(head_only, round(spec.patience_start * max_steps))


def head_only_steps(spec: FinetuneSpec, init: str) -> int:
    """Head-only steps of a run: `finetune.head_only_steps` for pretrained and scratch alike (LP-FT, wav2vec 2.0's
    freeze_finetune_updates); 0 for the probe, whose encoder is frozen throughout anyway."""
    return 0 if init == "probe" else spec.head_only_steps


def validate_finetune_protocol(f: FinetuneSpec, where: str = "config") -> None:
    """The fine-tuning protocol's checks: learning-rate grids, schedule, masking, head-only phase, early stopping.

    Every init's grid spans at least a decade (max / min >= 10): a grid narrower than that cannot tell whether
    the best rate lies outside it. `pretrained` and `scratch` grids have the same number of points (the same
    tuning effort for both) and the pretrained grid reaches 10x below the scratch grid's lowest rate, since a
    pretrained model is fine-tuned at rates 10-50x below those it (or a scratch model) trains at.
    """
    for init in f.inits:
        rates = sorted(f.learning_rates[init])
        if rates[-1] < 10 * rates[0] * (1 - 1e-9):
            raise ExperimentError(
                f"{where}: finetune.learning_rates.{init}={f.learning_rates[init]} spans "
                f"{rates[-1] / rates[0]:.3g}x; a grid must span at least a decade (max / min >= 10): e.g. "
                f"[{rates[0]:.3g}, {10 * rates[0]:.3g}]"
            )
    if "pretrained" in f.inits and "scratch" in f.inits:
        pre, scratch = f.learning_rates["pretrained"], f.learning_rates["scratch"]
        if len(pre) != len(scratch):
            raise ExperimentError(
                f"{where}: finetune.learning_rates.pretrained={pre} and .scratch={scratch} have {len(pre)} and "
                f"{len(scratch)} points; give both grids the same number of points (the same tuning effort)"
            )
        if min(pre) > min(scratch) / 10 * (1 + 1e-9):
            raise ExperimentError(
                f"{where}: finetune.learning_rates.pretrained={pre} starts at {min(pre):g}, less than 10x below "
                f".scratch={scratch} (lowest {min(scratch):g}); lower the pretrained grid to reach "
                f"{min(scratch) / 10:g} or below (pretrained models fine-tune at 10-50x lower rates)"
            )
    if f.lr_scheduler not in LR_SCHEDULERS:
        raise ExperimentError(f"{where}: finetune.lr_scheduler={f.lr_scheduler!r}: choose one of {LR_SCHEDULERS}")
    if len(f.tri_stage) != 3 or any(p < 0 for p in f.tri_stage) or abs(sum(f.tri_stage) - 1) > 1e-6:
        raise ExperimentError(
            f"{where}: finetune.tri_stage={f.tri_stage}: give three fractions (warmup, hold, decay) >= 0 that sum "
            "to 1, e.g. [0.1, 0.4, 0.5] (wav2vec 2.0)"
        )
    if not 0 <= f.final_lr_scale <= 1:
        raise ExperimentError(f"{where}: finetune.final_lr_scale={f.final_lr_scale}: must be in [0, 1]")
    if not f.masking:
        raise ExperimentError(f"{where}: finetune.masking is empty; give one or more settings, e.g. [{{}}]")
    for index, mask in enumerate(f.masking):
        if min(mask.time_masks, mask.freq_masks, mask.freq_width) < 0 or mask.time_width < 0:
            raise ExperimentError(f"{where}: finetune.masking[{index}]={mask}: counts and widths must be >= 0")
    if len({m.label for m in f.masking}) != len(f.masking):
        raise ExperimentError(f"{where}: finetune.masking lists a setting twice: {[m.label for m in f.masking]}")
    if not f.spec_augment and len(f.masking) > 1:
        raise ExperimentError(
            f"{where}: finetune.spec_augment is false but finetune.masking lists {len(f.masking)} settings to "
            "choose from; turn spec_augment on or give one setting"
        )
    if f.headline_minutes is not None and f.headline_minutes not in [s.minutes for s in f.subsets]:
        raise ExperimentError(
            f"{where}: finetune.headline_minutes={f.headline_minutes:g} is not the minutes of a subset "
            f"{[s.minutes for s in f.subsets]}; choose one, or null for the fewest"
        )
    if f.patience is not None and f.patience < 1:
        raise ExperimentError(f"{where}: finetune.patience={f.patience}: give >= 1 evaluations, or null (no stop)")
    if not 0 <= f.patience_start < 1:
        raise ExperimentError(
            f"{where}: finetune.patience_start={f.patience_start}: give a fraction of the step cap in [0, 1) "
            "(0: count every evaluation after the head-only phase; 0.5: from the end of the tri-stage hold)"
        )
    if f.seeds < 1:
        raise ExperimentError(f"{where}: finetune.seeds={f.seeds}: give >= 1 (1: each run once, no seed repeats)")
    if f.head_only_steps < 0 or f.eval_steps < 1:
        raise ExperimentError(f"{where}: finetune.head_only_steps must be >= 0 and finetune.eval_steps >= 1")
    trained = trained_minutes(f)
    for index, subset in enumerate(f.subsets):
        if subset.minutes not in trained:
            continue  # listed for the nested draw only (`curve_minutes`): its cap is never used
        if f.head_only_steps and subset.steps <= f.head_only_steps:
            raise ExperimentError(
                f"{where}: finetune.subsets[{index}].steps={subset.steps} <= finetune.head_only_steps="
                f"{f.head_only_steps}: the encoder would never be fine-tuned; raise the cap or lower head_only_steps"
            )
        # room for one evaluation after the uncounted ones and `patience` more that fail to beat it
        uncounted = patience_start_step(f, subset.steps, max(head_only_steps(f, init) for init in f.inits))
        needed = uncounted + (f.patience + 1) * f.eval_steps if f.patience else 0
        if subset.steps < needed:
            raise ExperimentError(
                f"{where}: finetune.subsets[{index}].steps={subset.steps} leaves no room to stop early: the "
                f"uncounted steps ({uncounted}: head_only_steps {f.head_only_steps} or patience_start "
                f"{f.patience_start:g} x steps, the later) + (patience + 1) x eval_steps = {needed}; raise the cap "
                "or lower patience / patience_start"
            )
