"""The low-resource experiment: does self-supervised pretraining pay when labels are scarce?

`run_experiment(config)` runs seven stages, each in its own folder under `config.output_dir` and each skipped
when its `done.json` marker exists (a marker made with other settings is an error, never silently reused):

1. **corpus**: the demo corpus (`synthetic.corpus.make_demo_corpus`): unlabeled pretraining audio, a labeled pool
   (finetune.jsonl) and a test split of held-out talkers. Nested labeled subsets (e.g. 10 minutes inside 1
   hour) are drawn from the pool. The stage asserts that no test voice or speaker occurs in pretraining or
   fine-tuning data.
2. **pretrain**: one encoder per objective family (NEST/BEST-RQ, contrastive + MLM, reconstruction, APC, CPC,
   mixed) from its recipe plus the SAME overrides for every family (model size, batch seconds, steps), so
   each gets the same compute budget. Wall time is recorded. APC and CPC need causal encoders. With
   `pretrain.curve_fractions`, each run also keeps its encoders part-way (e.g. at 1/4 and 1/2 of the steps).
3. **finetune**: character CTC on each labeled subset from every pretrained encoder (`pretrained`), from a
   frozen encoder with only the CTC head trained (`probe`), and from random weights of the same architecture
   (`scratch`; one per distinct encoder architecture, so causal families get a causal baseline). Every init gets
   the same protocol, the papers' (see "Fine-tuning protocol" below), and every choice is made on validation:
   the test split is never looked at while training. In three phases (`stage_finetune`): the grid on one
   subset, which also chooses the best pretraining run; the other subsets (the label-efficiency curve); the
   encoders kept part-way through that run's pretraining, on the grid subset (the pretraining-compute curve).
4. **evaluate**: greedy-CTC WER/CER of every fine-tuned model on the held-out-voice test split.
5. **probes**: SUPERB-style probes of the frozen encoders (`experiments.probes`), and the fine-tuned keyword
   spotter with 1-10 labels per keyword (`experiments.kws`, `probes.kws`).
6. **transducer** (`transducer.enabled`): TDT fine-tuning of the chosen SSL encoder and its scratch twin, with a
   prediction network from scratch or pretrained on the LM text (`experiments.transducers`), on the same subsets.
7. **report**: `low_resource.json` (one row per run), `low_resource.md` (tables, corpus, machine, the command),
   `wer_vs_labeled_minutes.png`, `cer_vs_labeled_minutes.png`, `pretraining_loss.png` and
   `cer_vs_pretraining_compute.png` in `config.results_dir`.

Fine-tuning protocol (`FinetuneSpec`), as wav2vec 2.0 fine-tunes on 10 minutes of labels (Baevski et al. 2020:
13k updates of which the first 10k train only the output layer, a tri-stage learning rate of 10% warmup, 40%
hold and 50% decay, time masking with p = 0.65 during fine-tuning) and as LP-FT recommends (Kumar et al. 2022:
fitting the new head on frozen features first keeps its random gradients from distorting the pretrained
features, which full fine-tuning from a random head does):

- a head-only phase (`head_only_steps`, fairseq's `freeze_finetune_updates`), then the whole model; for
  `pretrained` and `scratch` alike, so neither gets a protocol the other lacks (`probe` is head-only throughout);
- a `tri_stage` (warmup-hold-decay) or `cosine` learning rate over the subset's step cap;
- a learning-rate grid per init spanning at least a decade, the pretrained one reaching 10x below the scratch
  one with as many points (validated in `config.validate_finetune_protocol`), crossed with fine-tuning masking
  settings (`masking`); the grid subset runs every pair and validation CER keeps one per (encoder, init);
- early stopping on validation CER (`patience` evaluations without improvement, the head-only phase's and those
  before `patience_start` of the cap not counted) under a step cap per subset, the best checkpoint kept; every
  row records `best_step`, `steps` (run) and `max_steps` (the cap), and the report flags any kept run whose best
  step is its last evaluation (it was still improving when the cap ended it).

Everything runs through the library (`pretrain.loop.pretrain`, `finetune.run.run_ctc` on the stock `Trainer`),
in this process or, with `parallel_runs` > 1, the independent runs of a phase in that many spawned processes;
devices are chosen by accelerate (a GPU when there is one). The settings are
`experiments/config.py`; the report's rows, tables and plots are `experiments/report.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import AutoProcessor, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .. import config_io
from ..data import DataConfig
from ..finetune.args import DataArguments, FinetuneArguments, ModelArguments
from ..finetune.ctc import ctc_outputs
from ..finetune.inference import score
from ..finetune.rows import decode_rows, manifest_rows
from ..finetune.run import run_ctc
from ..finetune.text import normalize_transcript
from ..modeling_conformer_ssl import ConformerSslForCTC, ConformerSslModel
from ..precision import launch_device, resolve_mixed_precision
from ..preemption import PREEMPTED_EXIT_CODE
from ..pretrain.checkpoints import CheckpointManager
from ..pretrain.loop import pretrain
from ..pretrain.recipe import load_recipe, model_config
from ..synthetic.corpus import make_demo_corpus, resolve_voices
from ..synthetic.sentences import SentenceGenerator
from .compute import matmul_peak_flops, training_flops_per_audio_second, utilisation
from .config import (
    IN_DOMAIN,
    INITS,
    ROW_KEYS,
    STAGES,
    CorpusSpec,
    EvaluateSpec,
    ExperimentConfig,
    ExperimentError,
    FinetuneSpec,
    MaskingSpec,
    PretrainSpec,
    SubsetSpec,
    head_only_steps,
    load_experiment_config,
    patience_start_step,
)
from .report import (
    check_rows,
    compute_curve,
    compute_curve_lines,
    format_duration,
    full_pretraining,
    kws_lines,
    label_efficiency_lines,
    machine_description,
    markdown_report,
    plot_compute_curve,
    plot_error_curves,
    plot_pretraining_losses,
    result_rows,
    seed_rows,
    selection_rows,
    transducer_rows,
    transducer_table,
)

logger = logging.getLogger(__name__)


REPO_ROOT = Path(__file__).resolve().parents[2]
DONE = "done.json"
SETTINGS = "settings.json"
# The ConformerSslConfig fields that define the encoder network itself (not the SSL heads, masks or CTC head):
# two pretrained checkpoints with equal values here have the same architecture, and need one scratch baseline.
ENCODER_FIELDS = (
    "num_mel_bins",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "conv_depthwise_kernel_size",
    "conv_norm_type",
    "subsampling",
    "subsampling_factor",
    "subsampling_conv_channels",
    "max_position_embeddings",
    "xscaling",
    "attention_bias",
    "convolution_bias",
    "causal",
    "hop_length",
)


def resolve_path(path: str | Path) -> Path:
    """A config path: as given if it exists (relative to the current folder), else relative to the repository."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


# ============================================================================================ markers
# Two levels of `done.json`:
# - a stage (stages/<stage>/done.json) records the config settings it ran with and the identity (finish time) of
#   the upstream stages it used. Other config settings are an error (hours of work are never thrown away because
#   of an edit); a re-done upstream stage simply makes it run again.
# - a unit inside a stage (one pretraining family, one fine-tuning run, one evaluation) writes settings.json when
#   it starts and done.json when it ends. A unit folder started with other settings (including another upstream
#   result) is cleared and redone, so a resumed run never continues from a checkpoint of another recipe.
def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_ready(data), indent=2) + "\n")
    tmp.replace(path)


def stage_done(
    folder: Path, settings: Mapping[str, Any], upstream: Mapping[str, Any], what: str, strict: bool = True
) -> dict[str, Any] | None:
    """The result of a finished stage, or None when it must run (never ran, or upstream was redone).

    Args:
        folder: stages/<stage>.
        settings: the config settings the stage depends on.
        upstream: finish times of the stages it reads.
        what: names the stage in errors.
        strict: other `settings` are an error (True) or just mean "run again" (False, for the cheap report).
    """
    marker = folder / DONE
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    wanted = _json_ready(settings)
    if done.get("settings") != wanted:
        if not strict:
            return None
        old = done.get("settings") or {}
        differing = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
        raise ExperimentError(
            f"{what}: {folder} was finished with other settings ({differing}); use another --out folder, or "
            f"delete {folder} to redo the stage with the new settings"
        )
    return done["result"] if done.get("upstream") == _json_ready(upstream) else None


def write_stage_done(
    folder: Path, settings: Mapping[str, Any], upstream: Mapping[str, Any], result: Mapping[str, Any]
) -> dict[str, Any]:
    result = {**result, "finished_at": time.time()}
    _write_json(folder / DONE, {"settings": settings, "upstream": upstream, "result": result})
    return _json_ready(result)


def unit_done(folder: Path, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result of a finished unit, or None after making sure `folder` holds only work with these settings."""
    wanted = _json_ready(settings)
    started = folder / SETTINGS
    if started.is_file() and json.loads(started.read_text()) != wanted:
        logger.warning("%s was started with other settings: clearing it to redo the work", folder)
        shutil.rmtree(folder)
    if (folder / DONE).is_file():
        return json.loads((folder / DONE).read_text())["result"]
    _write_json(started, wanted)
    return None


def finish_unit(folder: Path, result: Mapping[str, Any]) -> dict[str, Any]:
    result = _json_ready({**result, "finished_at": time.time()})
    _write_json(folder / DONE, {"result": result})
    return result


# ============================================================================================ 1. corpus
def read_manifest(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_manifest(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    # Written whole, then renamed: a run in another process never reads half a manifest.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows))
    tmp.replace(path)


def _speaker_index(speaker: str) -> int:
    """Pseudo-speaker ids end in their index within the base voice ("flite-slt-2" -> 2)."""
    return int(speaker.rsplit("-", 1)[1])


def subset_speakers(rows: Sequence[Mapping[str, Any]], voices: Sequence[str], count: int | None) -> list[str]:
    """Up to `count` speakers of `voices`, taken round-robin over the voices by speaker index (so 8 speakers of
    3 voices are 3 + 3 + 2), which makes the speakers of a smaller subset a subset of a larger one's."""
    by_voice = {v: sorted({r["speaker"] for r in rows if r["voice"] == v}, key=_speaker_index) for v in voices}
    order = [
        spk
        for depth in range(max(map(len, by_voice.values()), default=0))
        for v in voices
        for spk in by_voice[v][depth : depth + 1]
    ]
    return order if count is None else order[:count]


def draw_nested_subsets(
    rows: Sequence[Mapping[str, Any]], subsets: Sequence[SubsetSpec], labeled_voices: Sequence[str], seed: int
) -> list[list[dict]]:
    """Nested labeled subsets from few speakers: each subset keeps the rows of the smaller one and adds rows of its
    own (larger) speaker set, in one seeded order, until it reaches its minutes.

    Nesting (10 min inside 1 h, as in Libri-light) makes the curves comparable: a larger subset only adds data.
    """
    order = np.random.default_rng([seed, 7]).permutation(len(rows))
    shuffled = [dict(rows[i]) for i in order]
    drawn: list[list[dict]] = []
    previous: list[dict] = []
    previous_speakers: set[str] = set()
    for spec in subsets:
        voices = list(labeled_voices[: spec.voices] if spec.voices else labeled_voices)
        speakers = set(subset_speakers(rows, voices, spec.speakers))
        if not previous_speakers <= speakers:
            raise ExperimentError(
                f"labeled subset of {spec.minutes} min: its speakers do not include the smaller subset's; give it at "
                "least as many voices and speakers"
            )
        chosen = list(previous)
        total = sum(float(r["duration"]) for r in chosen)
        taken = {r["audio_filepath"] for r in chosen}
        for row in shuffled:
            if total >= 60.0 * spec.minutes:
                break
            if row["speaker"] in speakers and row["audio_filepath"] not in taken:
                chosen.append(row)
                total += float(row["duration"])
        if total < 60.0 * spec.minutes:
            raise ExperimentError(
                f"labeled subset of {spec.minutes} min: its {len(speakers)} speakers have only {total / 60:.1f} min; "
                "raise corpus.labeled_minutes or the subset's voices/speakers"
            )
        drawn.append(chosen)
        previous, previous_speakers = chosen, speakers
    return drawn


def check_held_out(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Assert that no valid or test voice or speaker occurs in the pool or the labels, that valid and test share
    none either, and that in-domain audio never repeats a valid/test sentence; returns the sets for the report."""
    seen = [r for s in ("pretrain", "finetune") for r in splits[s]]
    train_voices, train_speakers = {r["voice"] for r in seen}, {r["speaker"] for r in seen}
    report: dict[str, Any] = {"train_voices": sorted(train_voices), "train_speakers": len(train_speakers)}
    for split in ("valid", "test"):
        if not splits[split]:
            raise ExperimentError(f"the {split} split is empty: raise corpus.{split}_minutes")
        voices, speakers = {r["voice"] for r in splits[split]}, {r["speaker"] for r in splits[split]}
        shared = sorted((voices & train_voices) | (speakers & train_speakers))
        if shared:
            raise ExperimentError(f"{split} voices/speakers {shared} also occur in pretrain/finetune: hold them out")
        report[f"{split}_voices"], report[f"{split}_speakers"] = sorted(voices), len(speakers)
    both = set(report["valid_voices"]) & set(report["test_voices"])
    if both:
        raise ExperimentError(f"voices {sorted(both)} are in both the valid and the test split")
    held_texts = {r["text"] for s in ("valid", "test") for r in splits[s]}
    repeated = [r["text"] for r in splits.get("in_domain", []) if r["text"] in held_texts]
    if repeated:
        raise ExperimentError(f"in-domain audio repeats {len(repeated)} valid/test utterance(s), e.g. {repeated[0]!r}")
    return report


def lm_sentences(count: int, seed: int, held_out_texts: Sequence[str]) -> tuple[list[str], int]:
    """`count` grammar sentences for the word LM, dropping any that occurs inside a valid or test utterance (so
    the LM never saw a sentence it is scored on); returns (sentences, how many were dropped)."""
    generator = SentenceGenerator()
    rng = np.random.default_rng([seed, 11])
    held = "\n".join(normalize_transcript(t) for t in held_out_texts)
    kept, dropped = [], 0
    while len(kept) < count:
        sentence = normalize_transcript(generator.sentence(rng))
        if sentence and sentence in held:
            dropped += 1
            continue
        kept.append(sentence)
    return kept, dropped


# Corpus parts: (folder, which make_demo_corpus split holds the audio, seed offset). Different seeds give the
# parts different sentences; voices come from the config.
CORPUS_PARTS = {
    "pool": ("pretrain", 0),
    "labeled": ("finetune", 1),
    "valid": ("test", 2),
    "test": ("test", 3),
    "in_domain": ("pretrain", 4),
}


def corpus_voices(c: CorpusSpec) -> dict[str, list[str]]:
    """Voice ids per corpus part. The pool gets every available voice whose talker is not held out."""
    available = resolve_voices(c.engines)
    by_id = {v.id: v for v in available}
    for key in ("labeled_voices", "valid_voices", "test_voices"):
        missing = [v for v in getattr(c, key) if v not in by_id]
        if missing:
            raise ExperimentError(
                f"corpus.{key}: {missing} not available (install the voices: bash scripts/setup_voices.sh); "
                f"available: {sorted(by_id)}"
            )
    held_talkers = {by_id[v].talker for v in [*c.valid_voices, *c.test_voices]}
    pool = [v.id for v in available if v.talker not in held_talkers]
    leaked = [v for v in c.labeled_voices if v not in pool]
    if leaked:
        raise ExperimentError(f"corpus.labeled_voices {leaked} share a talker with a held-out voice; choose others")
    valid_talkers = {by_id[v].talker for v in c.valid_voices}
    test_talkers = {by_id[v].talker for v in c.test_voices}
    if valid_talkers & test_talkers:
        raise ExperimentError(f"valid and test voices share talkers {sorted(valid_talkers & test_talkers)}")
    return {
        "pool": pool,
        "labeled": list(c.labeled_voices),
        "valid": [v.id for v in available if v.talker in valid_talkers],
        "test": [v.id for v in available if v.talker in test_talkers],
        "in_domain": [v.id for v in available if v.talker in test_talkers],
    }


def _relative_rows(rows: Sequence[Mapping[str, Any]], part: str) -> list[dict[str, Any]]:
    """A part's manifest rows with audio paths relative to corpus/ (where the experiment's manifests live)."""
    return [{**r, "audio_filepath": f"{part}/{r['audio_filepath']}", "part": part} for r in rows]


def stage_corpus(config: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Make (or reuse) the corpus parts, check the hold-out, write the manifests, subsets and LM text."""
    c = config.corpus
    corpus_dir = out / "corpus"
    voices = corpus_voices(c)
    minutes = {
        "pool": c.pool_minutes,
        "labeled": c.labeled_minutes,
        "valid": c.valid_minutes,
        "test": c.test_minutes,
        "in_domain": c.in_domain_minutes,
    }
    splits: dict[str, list[dict[str, Any]]] = {}
    summaries = {}
    for part, (split, seed_offset) in CORPUS_PARTS.items():
        if minutes[part] <= 0:
            splits[part] = []
            continue
        summary = make_demo_corpus(
            corpus_dir / part,
            minutes[part],
            c.seed + seed_offset,
            finetune_fraction=1.0 if split == "finetune" else 0.0,
            test_fraction=1.0 if split == "test" else 0.0,
            test_voices=voices[part] if split == "test" else [],
            valid_fraction=0.0,  # each part is one split; the experiment holds out its own valid talkers
            engines=c.engines,
            voices=voices[part],
            speakers_per_voice=c.labeled_speakers_per_voice if part == "labeled" else c.speakers_per_voice,
            recorded_share=c.recorded_share,
            noise_fraction=c.noise_fraction,
            num_workers=c.num_workers,
            progress=config.pretrain.progress,
        )
        summaries[part] = summary
        splits[part] = _relative_rows(read_manifest(corpus_dir / part / f"{split}.jsonl"), part)
    held_texts = {r["text"] for p in ("valid", "test") for r in splits[p]}
    splits["in_domain"] = [r for r in splits["in_domain"] if r["text"] not in held_texts]  # other sentences only
    named = {
        "pretrain": splits["pool"],
        "finetune": splits["labeled"],
        "valid": splits["valid"],
        "test": splits["test"],
        "in_domain": splits["in_domain"],
    }
    held_out = check_held_out(named)
    for name, rows in named.items():
        _write_manifest(corpus_dir / f"{name}.jsonl", rows)
    pretrain_hours = sum(r["duration"] for r in named["pretrain"]) / 3600
    if pretrain_hours < c.min_pretrain_hours:
        raise ExperimentError(
            f"corpus: {pretrain_hours:.2f} h of pretraining audio < corpus.min_pretrain_hours={c.min_pretrain_hours}; "
            "raise corpus.pool_minutes"
        )
    sentences, dropped = lm_sentences(c.lm_sentences, c.seed, sorted(held_texts))
    (corpus_dir / "lm_text.txt").write_text("\n".join(sentences) + "\n")
    subsets = {}
    drawn = draw_nested_subsets(named["finetune"], config.finetune.subsets, c.labeled_voices, config.seed)
    for spec, rows in zip(config.finetune.subsets, drawn):
        name = subset_name(spec.minutes)
        _write_manifest(corpus_dir / f"{name}.jsonl", rows)
        subsets[name] = {
            "manifest": f"corpus/{name}.jsonl",
            "nominal_minutes": spec.minutes,
            "utterances": len(rows),
            "minutes": round(sum(r["duration"] for r in rows) / 60, 3),
            "speakers": len({r["speaker"] for r in rows}),
            "voices": sorted({r["voice"] for r in rows}),
        }
    engines = sorted({v.split(":", 1)[0] for vs in voices.values() for v in vs})
    return {
        "corpus_dir": "corpus",
        "engines": engines,
        "minutes": {k: round(sum(r["duration"] for r in rows) / 60, 2) for k, rows in named.items()},
        "pretrain_hours": round(pretrain_hours, 3),
        "in_domain_hours": round(sum(r["duration"] for r in named["in_domain"]) / 3600, 3),
        "pool_voices": len(voices["pool"]),
        "utterances": {s: len(rows) for s, rows in named.items()},
        "subsets": subsets,
        "lm_sentences": len(sentences),
        "lm_sentences_dropped": dropped,
        "generation_wall_s": round(sum(s.get("wall_time_s") or 0.0 for s in summaries.values()), 1),
        **held_out,
    }


def subset_name(minutes: float) -> str:
    return f"labeled_{minutes:g}min"


# ============================================================================================ 2. pretrain
def base_family(key: str) -> str:
    """ "nest@in_domain" -> "nest": the objective family of a pretraining key."""
    return key.removesuffix(IN_DOMAIN)


def arm_of(key: str) -> str:
    return "in_domain" if key.endswith(IN_DOMAIN) else "standard"


def pretrain_keys(config: ExperimentConfig) -> list[str]:
    """One pretraining run per family on the pool (standard arm), and one more per `pretrain.in_domain` family on
    the pool plus the in-domain audio."""
    return [*config.pretrain.recipes, *(f"{family}{IN_DOMAIN}" for family in config.pretrain.in_domain)]


def family_recipe_overrides(config: ExperimentConfig, key: str, out: Path) -> list[str]:
    """The overrides that turn a family's recipe into this experiment's run (data, budget, output folder)."""
    corpus = out / "corpus"
    family = base_family(key)
    train = [corpus / "pretrain.jsonl"] + ([corpus / "in_domain.jsonl"] if arm_of(key) == "in_domain" else [])
    return [
        f"data.train_manifests=[{','.join(map(str, train))}]",
        f"data.valid_manifests=[{corpus / 'valid.jsonl'}]",  # held-out voices: losses only, no selection
        "train.max_minutes=null",  # the budget is steps, equal for all; a wall-clock stop would differ per family
        *config.pretrain.overrides,
        f"train.max_steps={config.pretrain.max_steps}",
        f"train.keep_steps=[{','.join(str(s) for s in curve_steps(config))}]",
        f"train.output_dir={out / 'pretrain' / key}",
        *config.pretrain.family_overrides.get(family, []),
    ]


def curve_steps(config: ExperimentConfig) -> list[int]:
    """The pretraining steps kept for the compute curve (`pretrain.curve_fractions` of `pretrain.max_steps`)."""
    return [round(fraction * config.pretrain.max_steps) for fraction in config.pretrain.curve_fractions]


def _parent_died(signum: int, frame: Any) -> None:
    """SIGUSR2 handler of a worker: turn the parent-death signal into ONE SIGTERM to itself. Some kernels report a
    parent's death more than once (once per exiting thread: seen in this project's sandbox), and a second SIGTERM
    would mean "stop at once" to a training run's `StopRequest`, killing it in the middle of its checkpoint."""
    import signal

    if not getattr(_parent_died, "fired", False):
        _parent_died.fired = True  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGTERM)


def _stop_with_parent() -> None:
    """Worker initialiser: on Linux, SIGTERM this worker once when the experiment process dies (killed, preempted),
    so no orphan keeps writing into a unit folder that the rerun will use (a training run checkpoints and stops)."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    signal.signal(signal.SIGUSR2, _parent_died)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGUSR2)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.warning("could not tie this worker to the experiment process; stop it by hand if that one dies")


def _run_for_parent(function: Callable[..., Any], *args: Any) -> Any:
    """A worker's task: `function(*args)`, unless the experiment process (this worker's parent) has died.

    The parent's death sends SIGTERM (`_stop_with_parent`), which a training run catches to finish its step and
    write a checkpoint (`StopRequest`) before it raises. The worker must then exit: the pool queues the next
    calls in advance, and an orphan would start them. The parent's sentinel (a pipe that closes when it dies)
    says whether it lives; the signal may arrive a moment before the pipe closes, hence the short wait.
    """
    import multiprocessing

    parent = multiprocessing.parent_process()

    def orphaned(wait: float = 0.0) -> bool:
        if parent is None:  # not a spawned worker
            return False
        parent.join(timeout=wait)  # returns at once if the parent died
        return not parent.is_alive()

    if orphaned():
        os._exit(PREEMPTED_EXIT_CODE)
    try:
        result = function(*args)
    except BaseException:
        if orphaned(wait=2.0):  # nobody reads the error; a rerun resumes from the checkpoint written (an error
            os._exit(PREEMPTED_EXIT_CODE)  # while the parent lives is raised 2 s late)
        raise
    if orphaned():
        os._exit(PREEMPTED_EXIT_CODE)
    return result


def run_in_parallel(function: Callable[..., Any], calls: Sequence[tuple], processes: int) -> list[Any]:
    """`function(*call)` for every call, in order; with `processes` > 1, in that many spawned processes at once.

    The runs are independent units (their own folders and done.json), so they may finish in any order; an error
    in one is raised here once the others have finished (their units are then done and a rerun skips them).
    """
    if processes <= 1 or len(calls) <= 1:
        return [function(*call) for call in calls]
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch/accelerate state inherited
    workers = min(processes, len(calls))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_stop_with_parent) as pool:
        futures = [pool.submit(_run_for_parent, function, *call) for call in calls]
        concurrent.futures.wait(futures)
    return [future.result() for future in futures]


def encoder_signature(model_config: Any) -> dict[str, Any]:
    return {name: getattr(model_config, name) for name in ENCODER_FIELDS}


def architecture_label(model_config: Any) -> str:
    return "causal" if model_config.causal else "non-causal"


def _count_encoder_params(model_config: Any) -> int:

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        encoder = ConformerSslModel(model_config)
    return sum(p.numel() for p in encoder.parameters())


def pretrain_family(config: ExperimentConfig, key: str, out: Path, corpus_id: float) -> dict[str, Any]:
    """Pretrain one family on one arm's pool (or continue its newest checkpoint); returns its done.json result.

    Args:
        config / key / out: the experiment, the run ("nest", "nest@in_domain": `pretrain_keys`), the working folder.
        corpus_id: finish time of the corpus stage (a new corpus invalidates the encoders trained on the old).
    """
    family = base_family(key)
    recipe_path = resolve_path(config.pretrain.recipes[family])
    overrides = family_recipe_overrides(config, key, out)
    settings = {"recipe": str(config.pretrain.recipes[family]), "overrides": overrides, "corpus": corpus_id}
    folder = out / "pretrain" / key
    done = unit_done(folder, settings)
    if done is not None:
        return done
    recipe = load_recipe(recipe_path, overrides)
    cfg = model_config(recipe)
    has_checkpoint = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").glob("checkpoint-*"))
    logger.info(
        "pretrain %s: %s + %d overrides%s", key, recipe_path, len(overrides), " (resuming)" if has_checkpoint else ""
    )
    start = time.perf_counter()
    # resume=True: continue the newest checkpoint when there is one (the unit folder is this family's own).
    result = pretrain(recipe, resume=True, progress=config.pretrain.progress)
    wall = time.perf_counter() - start
    if result.checkpoint is None or result.step < recipe.train.max_steps:
        raise ExperimentError(f"pretrain {key}: stopped at step {result.step} of {recipe.train.max_steps}")
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    history = state["metrics"]["history"]
    throughput = [row["train/audio_seconds_per_s"] for row in history if "train/audio_seconds_per_s" in row]
    flops = training_flops_per_audio_second(cfg)
    audio_per_s = float(np.mean(throughput)) if throughput else None
    precision, _ = resolve_mixed_precision(recipe.train.mixed_precision, launch_device())
    summary = {
        "family": family,
        "arm": arm_of(key),
        "objectives": sorted(recipe.objectives),
        "recipe": str(config.pretrain.recipes[family]),
        "architecture": architecture_label(cfg),
        "encoder": encoder_signature(cfg),
        "encoder_params": _count_encoder_params(cfg),
        "steps": result.step,
        "batch_seconds": recipe.data.batch_seconds,
        "audio_hours_seen": round(state.get("audio_seconds_total", 0.0) / 3600, 3),
        "wall_s": round(wall, 1),
        "resumed": has_checkpoint,
        "audio_seconds_per_s": round(audio_per_s, 2) if audio_per_s else None,
        "flops_per_audio_second": flops,
        "precision": precision,
        "flop_utilisation": utilisation(flops, audio_per_s, precision),  # against the peak of that precision
        "final_train": {k: v for k, v in result.train_metrics.items() if k.startswith("loss")},
        "final_valid": {k: v for k, v in result.valid_metrics.items() if k.startswith("loss")},
        "checkpoint": str(result.checkpoint.relative_to(out) / "model"),
        # the encoders of the compute curve: fraction of the run -> its kept checkpoint's model folder
        "curve_checkpoints": {
            str(fraction): str(CheckpointManager(folder).path_for(step).relative_to(out) / "model")
            for fraction, step in zip(config.pretrain.curve_fractions, curve_steps(config))
        },
        "history": [{k: v for k, v in row.items() if k == "step" or "/loss" in k} for row in history],
    }
    return finish_unit(folder, summary)


def stage_pretrain(config: ExperimentConfig, out: Path, corpus_id: float) -> dict[str, Any]:
    keys = pretrain_keys(config)
    results = run_in_parallel(pretrain_family, [(config, key, out, corpus_id) for key in keys], config.parallel_runs)
    families = dict(zip(keys, results))
    return {
        "families": families,
        "matmul_peak_flops": matmul_peak_flops(),
        "bf16_matmul_peak_flops": matmul_peak_flops(precision="bf16"),
    }


# ============================================================================================ 3. finetune
@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run: `key` = the pretraining run ("nest", "nest@in_domain"; "none" for scratch)."""

    key: str
    init: str
    architecture: str
    subset: str
    minutes: float
    steps: int  # the cap (early stopping may end the run before)
    learning_rate: float
    masking: MaskingSpec | None  # fine-tuning SpecAugment; None: finetune.spec_augment is off
    checkpoint: str  # relative to the experiment folder: the weights (pretrained, probe) or the config (scratch)
    encoder_id: float  # finish time of that pretraining run (a redone pretraining invalidates this run)
    pretrain_fraction: float = 1.0  # < 1: an encoder kept part-way through pretraining (the compute curve)
    repeat: int = 0  # > 0: a kept run trained again with Trainer seed `seed` + repeat (`finetune.seeds`)

    @property
    def objective(self) -> str:
        return base_family(self.key) if self.init != "scratch" else "none"

    @property
    def arm(self) -> str:
        return arm_of(self.key) if self.init != "scratch" else "standard"

    @property
    def name(self) -> str:
        who = self.key if self.init != "scratch" else f"scratch-{self.architecture}"
        mask = self.masking.label if self.masking is not None else "nomask"
        part = f"@{self.pretrain_fraction:g}" if self.pretrain_fraction < 1 else ""
        again = f"__seed+{self.repeat}" if self.repeat else ""
        return f"{who}{part}__{self.init}__{self.subset}__lr{self.learning_rate:g}__{mask}{again}"

    @property
    def group(self) -> str:
        """Runs that differ only in learning rate and masking share a group: validation picks one run per group
        (a seed repeat is in its original's group, but never among the runs validation picks from)."""
        return self.name.rsplit("__lr", 1)[0]


def plan_finetune_runs(
    config: ExperimentConfig,
    pretrained: Mapping[str, Mapping[str, Any]],
    subset: SubsetSpec,
    chosen: Mapping[tuple[str, str], tuple[float, MaskingSpec | None]] | None = None,
    inits: Sequence[str] | None = None,
    rate_grid: bool = False,
) -> list[FinetuneRun]:
    """The runs of one subset: every (pretraining run, init), plus one scratch run per distinct encoder
    architecture; each with every (rate, masking) pair of `finetune.learning_rates[init]` x `finetune.masking`,
    or, when `chosen` is given ((key, init) -> (rate, masking), from the grid subset), only the chosen pair, or with
    `rate_grid` every rate with the chosen masking. `pretrained` may be a part of the pretraining runs and `inits` a
    part of `finetune.inits`."""
    runs = []
    architectures: dict[str, tuple[str, str, float]] = {}  # signature -> (label, checkpoint, id) of its 1st family
    for info in pretrained.values():
        key = json.dumps(info["encoder"], sort_keys=True)
        architectures.setdefault(key, (info["architecture"], info["checkpoint"], info["finished_at"]))
    labels = [label for label, _, _ in architectures.values()]
    name = subset_name(subset.minutes)
    rates = config.finetune.learning_rates
    masks: list[MaskingSpec | None] = list(config.finetune.masking) if config.finetune.spec_augment else [None]

    def add(key: str, init: str, label: str, checkpoint: str, encoder_id: float) -> None:
        # The probe's encoder is frozen: input masking barely changes what its head sees, so it takes the first
        # masking setting and searches only the rate.
        options = masks[:1] if init == "probe" else masks
        if chosen is None:
            grid = [(lr, m) for lr in rates[init] for m in options]
        else:
            grid = [(lr, chosen[(key, init)][1]) for lr in rates[init]] if rate_grid else [chosen[(key, init)]]
        for lr, mask in grid:
            runs.append(
                FinetuneRun(key, init, label, name, subset.minutes, subset.steps, lr, mask, checkpoint, encoder_id)
            )

    inits = config.finetune.inits if inits is None else inits
    for key, info in pretrained.items():
        for init in ("pretrained", "probe"):
            if init in inits:
                add(key, init, info["architecture"], info["checkpoint"], info["finished_at"])
    if "scratch" in inits:
        for index, (label, checkpoint, encoder_id) in enumerate(architectures.values()):
            # Two different non-causal encoders would share a label: number them apart.
            label = label if labels.count(label) == 1 else f"{label}{index}"
            add(f"scratch-{label}", "scratch", label, checkpoint, encoder_id)
    return runs


def schedule_arguments(spec: FinetuneSpec, max_steps: int) -> dict[str, Any]:
    """`TrainingArguments` keywords of the learning-rate schedule over a run's step cap.

    `cosine`: linear warmup of `warmup_steps` (at most half the run), then cosine decay to 0. `tri_stage`
    (wav2vec 2.0's fine-tuning schedule): linear warmup from `final_lr_scale` x the peak, a hold at the peak and
    a decay to `final_lr_scale` x the peak, over the `tri_stage` fractions of the cap, with the stock
    `warmup_stable_decay` schedule (its decay is a half cosine where fairseq's is exponential; both end at the
    same rate). The schedule spans the cap: a run that early stopping ends sooner stops in the hold or decay.
    """
    if spec.lr_scheduler == "cosine":
        return {"lr_scheduler_type": "cosine", "warmup_steps": min(spec.warmup_steps, max_steps // 2)}
    warmup = round(spec.tri_stage[0] * max_steps)
    hold = round(spec.tri_stage[1] * max_steps)
    # The hold is what is left of Trainer's num_training_steps (max_steps) after warmup and decay.
    return {
        "lr_scheduler_type": "warmup_stable_decay",
        "warmup_steps": warmup,
        "lr_scheduler_kwargs": {"num_decay_steps": max_steps - warmup - hold, "min_lr_ratio": spec.final_lr_scale},
    }


def evaluation_steps(log_history: Sequence[Mapping[str, Any]]) -> list[int]:
    """The steps at which validation was scored during training (Trainer's `eval_cer` log entries)."""
    return sorted({int(e["step"]) for e in log_history if "eval_cer" in e and "step" in e})


def training_valid_manifest(config: ExperimentConfig, out: Path) -> Path:
    """What fine-tuning runs score during training: the validation split, or its first `finetune.valid_utterances`
    (a fixed slice, the same for every run)."""
    valid = out / "corpus" / "valid.jsonl"
    if config.finetune.valid_utterances is None:
        return valid
    sliced = out / "corpus" / "valid_during_training.jsonl"
    if not sliced.is_file():
        _write_manifest(sliced, read_manifest(valid)[: config.finetune.valid_utterances])
    return sliced


def resume_point(run_dir: Path) -> str | None:
    """The Trainer checkpoint an interrupted run continues from; a run killed before its first checkpoint has
    nothing to continue, so its folder is cleared."""
    resume = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if run_dir.is_dir() and resume is None:
        shutil.rmtree(run_dir)
    return resume


def trainer_arguments(
    config: ExperimentConfig,
    run_dir: Path,
    steps: int,
    learning_rate: float,
    schedule: Mapping[str, Any],
    resume,
    seed: int | None = None,
) -> TrainingArguments:
    """The `TrainingArguments` of every fine-tuning run (CTC and transducer): validation CER every
    `finetune.eval_steps` with a checkpoint each time, the best one loaded at the end, resumable. `seed`: the
    Trainer seed (default the experiment's)."""
    f = config.finetune
    eval_steps = min(f.eval_steps, steps)
    return TrainingArguments(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=f.batch_size,
        per_device_eval_batch_size=config.evaluate.batch_size,
        learning_rate=learning_rate,
        **schedule,
        weight_decay=f.weight_decay,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,  # a checkpoint per evaluation: the best one is loaded at the end
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="cer",
        greater_is_better=False,
        logging_steps=f.logging_steps,
        seed=config.seed if seed is None else seed,
        report_to="none",
        disable_tqdm=not f.progress,
        # Features (decode, log-mel, SpecAugment) are made in loader workers, overlapping the step.
        dataloader_num_workers=f.dataloader_num_workers,
        dataloader_persistent_workers=f.dataloader_num_workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        resume_from_checkpoint=resume,
    )


def run_outcome(run_dir: Path, result: Any) -> dict[str, Any]:
    """Steps run, the kept checkpoint's step and validation CER, evaluations, early stop, of a finished run (a
    `FinetuneResult`); its resume points are removed (the kept model is in `run_dir`)."""
    state = json.loads((run_dir / "trainer_state.json").read_text())
    steps = int(result.summary["steps"])
    evaluated = evaluation_steps(state.get("log_history", []))
    for stale in run_dir.glob("checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return {
        "steps": steps,
        "best_step": int(str(state.get("best_model_checkpoint") or f"-{steps}").rsplit("-", 1)[1]),
        "last_eval_step": evaluated[-1] if evaluated else steps,
        "evaluations": len(evaluated),
        "stopped_early": "early_stopped" in result.summary,
        "valid_cer": next(iter(result.results.values()))["cer"],  # the kept (best) model, scored again at the end
    }


def finetune_one(config: ExperimentConfig, run: FinetuneRun, out: Path, alphabet_texts: Sequence[str]) -> dict:
    """Train one CTC model with `finetune.run.run_ctc` (resuming its Trainer checkpoint if an attempt was killed).

    The validation split is scored every `finetune.eval_steps`; the best checkpoint (validation CER) is the model
    kept, and its validation CER is what the learning-rate and masking choice compares. With `finetune.patience`,
    the run stops after that many evaluations without improvement (the head-only phase's not counted).
    """
    f = config.finetune
    folder = out / "finetune" / run.name
    schedule = schedule_arguments(f, run.steps)
    identity = dataclasses.asdict(run)
    if not run.repeat:
        del identity["repeat"]  # so the runs finished before seed repeats existed are still found finished
    settings = {
        **identity,
        "batch_size": f.batch_size,
        "schedule": schedule,
        "weight_decay": f.weight_decay,
        "head_only_steps": head_only_steps(f, run.init),
        "layer_decay": f.layer_decay if run.init == "pretrained" else 1.0,
        "patience": f.patience,
        **({"patience_start": f.patience_start} if f.patience_start else {}),  # runs from before it: as they were
        "eval_steps": f.eval_steps,
        "valid_utterances": f.valid_utterances,
        "seed": config.seed + run.repeat,
    }
    uncounted = patience_start_step(f, run.steps, head_only_steps(f, run.init))
    done = unit_done(folder, settings)
    if done is not None:
        return done
    logger.info("finetune %s: %d steps", run.name, run.steps)
    run_dir = folder / "model"  # run_ctc saves the finished model here, beside its resume points
    resume = resume_point(run_dir)
    valid = training_valid_manifest(config, out)
    model_args = ModelArguments(model_name_or_path=str(out / run.checkpoint), from_scratch=run.init == "scratch")
    data_args = DataArguments(
        train_manifests=[str(out / "corpus" / f"{run.subset}.jsonl")],
        eval_manifests=[str(valid)],
        min_duration=0.1,
        max_duration=f.max_duration,
        spec_augment=run.masking is not None,
        **(dataclasses.asdict(run.masking) if run.masking is not None else {}),
    )
    finetune_args = FinetuneArguments(
        freeze_encoder=run.init == "probe",
        freeze_encoder_steps=settings["head_only_steps"],
        layer_decay=settings["layer_decay"],
        early_stopping_patience=f.patience,
        early_stopping_start_step=uncounted,
    )
    training_args = trainer_arguments(
        config, run_dir, run.steps, run.learning_rate, schedule, resume, seed=settings["seed"]
    )
    # One character set for every run: the labeled pool's. A 10-minute subset may miss a rare letter; that
    # would be an alphabet gap, not a measure of how well an encoder learns from few labels.
    result = run_ctc(
        model_args,
        data_args,
        finetune_args,
        training_args,
        vocabulary_texts=alphabet_texts,
        require_complete_encoder=run.init != "scratch",
    )
    outcome = run_outcome(run_dir, result)
    steps = outcome["steps"]
    train_audio_s = result.summary.get("train_audio_seconds")
    cfg = ConformerSslForCTC.config_class.from_pretrained(str(run_dir))
    flops = training_flops_per_audio_second(cfg) / (3 if run.init == "probe" else 1)  # probe: forward only
    precision = "bf16" if training_args.bf16 else "no"  # what run_ctc's mixed_precision=auto resolved to
    audio_per_s = None
    if train_audio_s and result.summary.get("train_seconds"):
        epochs = steps * f.batch_size / max(result.summary["train_utterances"], 1)
        audio_per_s = round(train_audio_s * epochs / result.summary["train_seconds"], 1)
    result_row = {
        **dataclasses.asdict(run),
        "objective": run.objective,
        "arm": run.arm,
        "group": run.group,
        "run": run.name,
        "max_steps": run.steps,
        **outcome,
        "masking": run.masking.label if run.masking is not None else "none",
        "head_only_steps": settings["head_only_steps"],
        **({"patience_start_step": uncounted} if f.patience_start else {}),
        "lr_scheduler": f.lr_scheduler,
        "wall_s": result.summary["train_seconds"],
        "audio_seconds_per_s": audio_per_s,
        "precision": precision,
        "flop_utilisation": utilisation(flops, audio_per_s, precision),
        "resumed": resume is not None,
        "train_loss": result.summary["train_loss"],
        "train_utterances": result.summary["train_utterances"],
        "trainable_params": result.summary["trainable_params"],
        "loss_curve": result.loss_curve,
        "model": str(run_dir.relative_to(out)),
    }
    return finish_unit(folder, result_row)


def choose_by_validation(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """group -> the run name with the lowest validation CER (ties: the first rate of the grid)."""
    best: dict[str, str] = {}
    for name, info in results.items():
        current = best.get(info["group"])
        if current is None or (info["valid_cer"] or 1e9) < (results[current]["valid_cer"] or 1e9):
            best[info["group"]] = name
    return best


def grid_subset(spec: FinetuneSpec) -> SubsetSpec:
    """The subset the learning-rate x masking grid runs on: `finetune.grid_minutes`, else the first."""
    minutes = spec.grid_minutes if spec.grid_minutes is not None else spec.subsets[0].minutes
    return next(s for s in spec.subsets if s.minutes == minutes)


def best_pretrained_key(results: Mapping[str, Mapping[str, Any]], picks: Sequence[str]) -> str | None:
    """The pretraining run whose whole-model fine-tune (`pretrained` init) has the lowest validation CER among the
    runs validation kept; None without such runs."""
    rows = [results[n] for n in picks if results[n]["init"] == "pretrained"]
    return min(rows, key=lambda r: r["valid_cer"] if r["valid_cer"] is not None else 1e9)["key"] if rows else None


def plan_later_runs(
    config: ExperimentConfig, pretrained: Mapping[str, Any], picks: Sequence[FinetuneRun], best: str | None
) -> list[FinetuneRun]:
    """Phases 2 and 3 of `stage_finetune`: the other subsets with the pairs validation kept on the grid subset
    (`picks`, one run per group), per `finetune.curve_runs` (on `finetune.curve_minutes`; on
    `finetune.rate_grid_minutes` every rate of the grid with the kept masking, and validation picks again), then the
    best pretraining run's part-way encoders."""
    f = config.finetune
    first = grid_subset(f)
    chosen = {(run.key, run.init): (run.learning_rate, run.masking) for run in picks}
    later: list[FinetuneRun] = []
    for subset in f.subsets:
        if subset is first or f.curve_runs == "none":
            continue
        if f.curve_minutes is not None and subset.minutes not in f.curve_minutes:
            continue
        rate_grid = subset.minutes in f.rate_grid_minutes  # the rate chosen again on this subset
        if f.curve_runs == "all" or best is None:
            later += plan_finetune_runs(config, pretrained, subset, chosen, rate_grid=rate_grid)
        else:
            inits = ["pretrained", "scratch"]
            later += plan_finetune_runs(config, {best: pretrained[best]}, subset, chosen, inits, rate_grid)
    if best is not None:
        anchor = next(run for run in picks if run.key == best and run.init == "pretrained")
        for fraction, checkpoint in pretrained[best].get("curve_checkpoints", {}).items():
            later.append(dataclasses.replace(anchor, checkpoint=checkpoint, pretrain_fraction=float(fraction)))
    return later


def headline_subset(spec: FinetuneSpec) -> float:
    """The minutes of labels the verdict is about: `finetune.headline_minutes`, else the fewest."""
    return spec.headline_minutes if spec.headline_minutes is not None else min(s.minutes for s in spec.subsets)


def plan_seed_repeats(config: ExperimentConfig, kept: Sequence[FinetuneRun], best: str | None) -> list[FinetuneRun]:
    """Phase 4 of `stage_finetune`: the headline subset's kept runs of the verdict (the best pretraining run's
    whole-model fine-tune on its finished encoder, and the scratch run of its architecture) again with
    `finetune.seeds` - 1 other seeds."""
    headline = [run for run in kept if run.minutes == headline_subset(config.finetune) and run.pretrain_fraction == 1]
    ours = next((run for run in headline if run.init == "pretrained" and run.key == best), None)
    if ours is None:
        return []
    verdict = [ours, *(run for run in headline if run.init == "scratch" and run.architecture == ours.architecture)]
    return [dataclasses.replace(run, repeat=i) for i in range(1, config.finetune.seeds) for run in verdict]


def stage_finetune(config: ExperimentConfig, out: Path, pretrained: Mapping[str, Any]) -> dict[str, Any]:
    """Four phases, each a set of independent runs (`parallel_runs` at once):

    1. the grid subset (`grid_subset`) runs every (learning rate, masking) pair for every (pretraining run, init);
       validation CER picks one pair per (run, init) and the best pretraining run (`best_pretrained_key`);
    2. the other subsets reuse those pairs: every run and init (`finetune.curve_runs: all`), only the best
       pretraining run's whole-model fine-tune beside scratch (`best`: the label-efficiency curve), or none;
    3. the compute curve: the best run's encoders kept part-way (`pretrain.curve_fractions`), fine-tuned on the
       grid subset with its chosen pair;
    4. seed repeats (`finetune.seeds` > 1, `plan_seed_repeats`) of the headline subset's kept runs.

    Every run of phases 1-3 is kept in `runs`; `chosen` names the one per group that goes on to test. The seed
    repeats are in `repeats` (all go on to test): they measure noise and take no part in any choice.
    """
    f = config.finetune
    alphabet_texts = [r["text"] for r in read_manifest(out / "corpus" / "finetune.jsonl")]

    def train(runs: list[FinetuneRun]) -> dict[str, Any]:
        runs = sorted(runs, key=lambda run: -run.steps)  # longest first: the processes finish together
        rows = run_in_parallel(finetune_one, [(config, run, out, alphabet_texts) for run in runs], config.parallel_runs)
        return {run.name: row for run, row in zip(runs, rows)}

    training_valid_manifest(config, out)  # made here, once, before runs in other processes read it
    first = grid_subset(f)
    grid = plan_finetune_runs(config, pretrained, first)
    results = train(grid)
    by_name = {run.name: run for run in grid}
    picks = list(choose_by_validation(results).values())
    best = best_pretrained_key(results, picks)

    later = plan_later_runs(config, pretrained, [by_name[n] for n in picks], best)
    results.update(train(later))
    by_name.update({run.name: run for run in later})
    kept = sorted(choose_by_validation(results).values())
    repeats = train(plan_seed_repeats(config, [by_name[n] for n in kept], best))
    return {
        "runs": results,
        "chosen": kept,
        "best_pretrained": best,
        "grid_minutes": first.minutes,
        "repeats": repeats,
    }


# ============================================================================================ 4. evaluate
def _decode_split(model, processor, manifest: Path, batch_size: int, limit: int | None):
    rows, _ = manifest_rows([str(manifest)], 0.0, None, require_text=True, limit=limit)
    examples = decode_rows(rows, DataConfig(min_duration=0.0, max_duration=None, crop_long=False))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["audio"]))  # little padding per batch
    texts_sorted, probs_sorted = ctc_outputs(model, processor, [examples[i]["audio"] for i in order], batch_size)
    texts, probs = [""] * len(examples), [None] * len(examples)
    for position, index in enumerate(order):
        texts[index], probs[index] = texts_sorted[position], probs_sorted[position]
    references = [normalize_transcript(e["text"]) for e in examples]
    return references, texts, probs


def _scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    return score([{"hypothesis": h, "reference": r} for h, r in zip(hypotheses, references)])


def evaluate_model(
    model_dir: Path, valid: Path, test: Path, lm_path: Path | None, spec: EvaluateSpec
) -> dict[str, Any]:
    """Greedy and LM WER/CER of a fine-tuned folder on the test split; the LM weights are tuned on validation.

    With `lm_path` (an ARPA file), the folder gets a `Wav2Vec2ProcessorWithLM` holding that LM and the chosen
    weights, so `pipeline("automatic-speech-recognition", model=model_dir)` decodes the same way.
    """
    from ..finetune.lm import attach_lm, lm_decode, save_lm, tune_lm_weights  # pyctcdecode + kenlm: only when decoding

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = ConformerSslForCTC.from_pretrained(str(model_dir))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    valid_refs, valid_greedy, valid_probs = _decode_split(model, processor, valid, spec.batch_size, None)
    test_refs, test_greedy, test_probs = _decode_split(model, processor, test, spec.batch_size, spec.max_utterances)
    result: dict[str, Any] = {
        **_scores(test_refs, test_greedy),
        "valid": _scores(valid_refs, valid_greedy),
        "utterances": len(test_refs),
    }
    examples = [{"reference": r, "hypothesis": h} for r, h in list(zip(test_refs, test_greedy))[:3]]
    if lm_path is not None:
        processor_lm = attach_lm(model_dir, lm_path, save=False)
        alpha, beta, table = tune_lm_weights(
            processor_lm, valid_probs, valid_refs, spec.lm_alphas, spec.lm_betas, beam_width=spec.beam_width
        )
        save_lm(processor_lm, model_dir, alpha=alpha, beta=beta)  # the folder decodes with the chosen weights
        test_lm = lm_decode(processor_lm, test_probs, beam_width=spec.beam_width)
        lm_scores = _scores(test_refs, test_lm)
        result.update({"wer_lm": lm_scores["wer"], "cer_lm": lm_scores["cer"], "lm_alpha": alpha, "lm_beta": beta})
        result["lm_grid"] = table
        for example, hypothesis in zip(examples, test_lm):
            example["hypothesis_lm"] = hypothesis
    result["examples"] = examples
    result["eval_wall_s"] = round(time.perf_counter() - start, 1)
    return result


def build_lm(config: ExperimentConfig, out: Path) -> Path:
    """The word n-gram LM of the experiment (irstlm, from corpus/lm_text.txt), built once."""
    from ..finetune.lm import build_arpa

    arpa = out / "corpus" / f"lm_{config.evaluate.lm_order}gram.arpa"
    if not arpa.is_file():
        text = (out / "corpus" / "lm_text.txt").read_text().splitlines()
        build_arpa(text, arpa, order=config.evaluate.lm_order)
    return arpa


def evaluate_one(config: ExperimentConfig, out: Path, name: str, info: Mapping[str, Any], lm_path: Path) -> dict:
    """Score one kept run (`evaluate_model`), or read back its finished unit."""
    corpus = out / "corpus"
    folder = out / "evaluate" / name
    settings = {
        "model": info["model"],
        "model_id": info["finished_at"],
        "test": "corpus/test.jsonl",
        "lm": lm_path.name,
        **dataclasses.asdict(config.evaluate),
    }
    done = unit_done(folder, settings)
    if done is None:
        logger.info("evaluate %s", name)
        result = evaluate_model(
            out / info["model"], corpus / "valid.jsonl", corpus / "test.jsonl", lm_path, config.evaluate
        )
        done = finish_unit(folder, result)
    return done


def stage_evaluate(config: ExperimentConfig, out: Path, finetuned: Mapping[str, Any]) -> dict[str, Any]:
    """Score the runs validation chose (one per group) and their seed repeats, never the others, on test: greedy
    and with the LM (`parallel_runs` at once)."""
    lm_path = build_lm(config, out)
    runs = {**finetuned["runs"], **finetuned.get("repeats", {})}
    names = [*finetuned["chosen"], *finetuned.get("repeats", {})]
    calls = [(config, out, name, runs[name], lm_path) for name in names]
    return {"scores": dict(zip(names, run_in_parallel(evaluate_one, calls, config.parallel_runs)))}


# ============================================================================================ 5. probes
def stage_probes(
    config: ExperimentConfig,
    out: Path,
    corpus: Mapping[str, Any],
    pretrained: Mapping[str, Any],
    finetuned: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """SUPERB-style probes (`experiments.probes`) of every standard-arm encoder against FBANK, on held-out data:
    speaker ID on pool speakers (disjoint utterances), keywords spoken by held-out voices, phones of test voices.
    With `probes.kws.enabled`, also the fine-tuned keyword spotter (`experiments.kws`) from the encoder of the
    pretraining run fine-tuning chose (`finetuned["best_pretrained"]`) beside scratch."""
    from .kws import KwsSpec, run_kws
    from .probes import ProbeData, ProbeSpec, run_probes  # matplotlib and the keyword synthesiser: only here

    if not config.probes.enabled:
        return {"rows": []}
    c = out / "corpus"
    largest = subset_name(config.finetune.subsets[-1].minutes)
    data = ProbeData(
        speaker_manifest=c / f"{config.probes.speaker_manifest}.jsonl",
        phone_train_manifest=c / f"{largest}.jsonl",
        phone_valid_manifest=c / "valid.jsonl",
        phone_test_manifest=c / "test.jsonl",
        command_train_voices=config.probes.command_train_voices or list(config.corpus.labeled_voices),
        command_test_voices=list(corpus["test_voices"]),
        commands_dir=out / "probes" / "commands",
    )
    spec = config_io.build(ProbeSpec, dict(config.probes.settings), "probes.settings", "probe setting", ExperimentError)
    standard = [key for key in pretrained if arm_of(key) == "standard"]
    encoders = {key: out / pretrained[key]["checkpoint"] for key in standard}
    # Two units (markers under probes/units/): the frozen probes depend on the encoders and the corpus only, the
    # keyword spotter on the encoder fine-tuning chose; so a redone fine-tuning run does not redo them.
    common = {"corpus": corpus["finished_at"], "results_dir": str(Path(config.results_dir).resolve())}
    units = out / "probes" / "units"
    frozen_settings = {
        **common,
        "spec": dataclasses.asdict(spec),
        "encoders": {key: pretrained[key]["finished_at"] for key in standard},
    }
    probed = unit_done(units / "frozen", frozen_settings)
    if probed is None:
        start = time.perf_counter()
        rows = run_probes(spec, encoders, data, out / "probes", Path(config.results_dir))
        probed = finish_unit(units / "frozen", {"rows": rows, "wall_s": round(time.perf_counter() - start, 1)})
    result: dict[str, Any] = dict(probed)  # its finished_at, as the keyword spotter's, gives way to the stage's
    kws = config_io.build(KwsSpec, dict(config.probes.kws), "probes.kws", "kws setting", ExperimentError)
    if kws.enabled and encoders:
        best = (finetuned or {}).get("best_pretrained")
        key = best if best in encoders else next(iter(encoders))
        kws_settings = {**common, "spec": dataclasses.asdict(kws), "encoder": [key, pretrained[key]["finished_at"]]}
        spotted = unit_done(units / "kws", kws_settings)
        if spotted is None:
            start = time.perf_counter()
            rows = run_kws(
                kws,
                encoders[key],
                data.command_train_voices,
                data.command_test_voices,
                out / "probes" / "kws",
                Path(config.results_dir),
                config.parallel_runs,
                encoder_name=str(Path(config.output_dir) / pretrained[key]["checkpoint"]),  # as configured
            )
            spotted = finish_unit(
                units / "kws", {"kws": rows, "kws_encoder": key, "kws_wall_s": round(time.perf_counter() - start, 1)}
            )
        result.update(spotted)
    return result


# ============================================================================================ 6. report
def export_models(
    config: ExperimentConfig, out: Path, rows: Sequence[Mapping[str, Any]], pretrained: Mapping[str, Any]
) -> dict[str, Any]:
    """Copy the best pretrained -> CTC model on `finetune.headline_minutes` of labels (default: the fewest;
    standard arm, lowest VALIDATION CER), its scratch twin and its pretrained encoder to `config.models_dir` as
    plain save_pretrained folders."""
    if not config.models_dir:
        return {}
    fewest = config.finetune.headline_minutes or min(r["labeled_minutes"] for r in rows)
    candidates = [r for r in rows if r["labeled_minutes"] == fewest and r["arm"] == "standard"]
    tuned = [r for r in candidates if r["init"] == "pretrained"]
    scratch = [r for r in candidates if r["init"] == "scratch"]
    if not tuned or not scratch:
        return {}
    best = min(tuned, key=lambda r: r["valid_cer"])
    # The twin has the same architecture (a causal APC encoder's twin is causal), chosen on validation too.
    twin = min(
        [r for r in scratch if r["architecture"] == best["architecture"]] or scratch, key=lambda r: r["valid_cer"]
    )
    target = Path(config.models_dir)
    chosen = {
        f"ctc_{_minutes_tag(fewest)}_pretrained_{best['objective']}": out / best["model"],
        f"ctc_{_minutes_tag(fewest)}_scratch": out / twin["model"],
        f"encoder_{best['objective']}": out / pretrained[best["key"]]["checkpoint"],
    }
    keep = {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer_config.json",
        "vocab.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "alphabet.json",
        "language_model",
        "README.md",
    }
    exported = {}
    # Models of an earlier run (another family was best then) would sit beside these as if they were current.
    for stale in [*target.glob("ctc_*"), *target.glob("encoder_*")] if target.is_dir() else []:
        if stale.is_dir() and stale.name not in chosen:
            shutil.rmtree(stale)
    for name, source in chosen.items():
        folder = target / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for item in source.iterdir():
            # *.py: the model's own code (save_pretrained writes it), for trust_remote_code without the package
            if item.name in keep or item.suffix == ".py":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
        card = folder / "README.md"
        if card.is_file():  # a committed card names the working folder as configured, not this machine's path
            card.write_text(card.read_text().replace(str(out), str(config.output_dir)))
        exported[name] = {
            "from": str(source.relative_to(out)),
            "megabytes": round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6, 2),
        }
    return exported


def _minutes_tag(minutes: float) -> str:
    return f"{minutes:g}min"


def stage_report(
    config: ExperimentConfig, out: Path, results: Mapping[str, Any], command: str, total_wall_s: float | None
) -> dict[str, Any]:
    pretrained = results["pretrain"]["families"]
    finetuned = results["finetune"]
    chosen = {name: finetuned["runs"][name] for name in finetuned["chosen"]}
    ctc_rows = result_rows(pretrained, chosen, results["evaluate"]["scores"])
    rows = full_pretraining(ctc_rows)  # CTC from finished encoders: the tables, verdict, plots and exports
    best = finetuned.get("best_pretrained")
    repeat_rows = result_rows(pretrained, finetuned.get("repeats", {}), results["evaluate"]["scores"])
    seeds = seed_rows(rows, repeat_rows, headline_subset(config.finetune), best)
    curve, curve_scratch = compute_curve(ctc_rows, best, finetuned.get("grid_minutes"))
    transducer = results.get("transducer") or {}
    all_rows = ctc_rows + transducer_rows(pretrained, transducer)
    check_rows(all_rows)
    results_dir = Path(config.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    machine["matmul_peak_gflops"] = round(results["pretrain"].get("matmul_peak_flops", 0.0) / 1e9, 1)
    machine["bf16_matmul_peak_gflops"] = round(
        results["pretrain"].get("bf16_matmul_peak_flops", matmul_peak_flops(precision="bf16")) / 1e9, 1
    )
    probes = results.get("probes", {})
    models = export_models(config, out, rows, pretrained)
    selection = selection_rows(finetuned["runs"], set(finetuned["chosen"]))
    selection += selection_rows(transducer.get("runs", {}), set(transducer.get("chosen", [])))
    document = {
        "experiment": config.name,
        "command": command,
        "machine": machine,
        "corpus": results["corpus"],
        "pretraining": {k: {key: v for key, v in info.items() if key != "history"} for k, info in pretrained.items()},
        "rows": all_rows,
        "selection": selection,
        "transducer": {"family": transducer.get("family"), "predictor": transducer.get("predictor")},
        "best_pretrained": best,
        "compute_curve": [
            {k: r[k] for k in ("key", "pretrain_fraction", "pretrain_steps", "valid_cer", "cer", "cer_lm", "wer_lm")}
            for r in ([curve_scratch] if curve_scratch else []) + curve
        ],
        "kws": probes.get("kws", []),
        "seeds": seeds,  # the verdict's runs and their seed repeats (`finetune.seeds`)
        "models": models,
    }
    (results_dir / "low_resource.json").write_text(json.dumps(_json_ready(document), indent=2) + "\n")
    markdown = markdown_report(
        config,
        results["corpus"],
        pretrained,
        rows,
        command,
        machine,
        total_wall_s,
        results["evaluate"]["scores"],
        selection=selection,
        probes=probes.get("rows", []),
        models=models,
        transducer=transducer_table(all_rows, transducer.get("predictor")),
        curves=label_efficiency_lines(rows, best) + compute_curve_lines(curve, curve_scratch, pretrained),
        kws=kws_lines(probes.get("kws", []), probes.get("kws_encoder")),
        seeds=seeds,
    )
    (results_dir / "low_resource.md").write_text(markdown + "\n")
    plot_error_curves(rows, pretrained, results_dir / "wer_vs_labeled_minutes.png", "wer")
    plot_error_curves(rows, pretrained, results_dir / "cer_vs_labeled_minutes.png", "cer")
    plot_pretraining_losses(pretrained, results_dir / "pretraining_loss.png")
    files = ["cer_vs_pretraining_compute.png"] if len(curve) >= 2 and curve_scratch else []
    if files:
        plot_compute_curve(curve, curve_scratch, results_dir / files[0])
    return {
        "results_dir": str(results_dir),
        "rows": len(all_rows),
        "models": models,
        "files": [
            "low_resource.json",
            "low_resource.md",
            "wer_vs_labeled_minutes.png",
            "cer_vs_labeled_minutes.png",
            "pretraining_loss.png",
            *files,
        ],
    }


def compute_wall_s(results: Mapping[str, Any], processes: int = 1) -> float:
    """Seconds of wall time behind a report: every stage's units, wherever they ran.

    A stage resumed in another invocation records only its last part, and there a unit finished before costs
    nothing (a redone fine-tuning run re-evaluates one model and no probe). So each stage counts its units' own
    times: the pretraining, fine-tuning and evaluation units summed and divided by `processes` (`parallel_runs`:
    the least wall time that many processes at once took for them), the frozen probes and the keyword spotter
    (one after the other) added; or the stage's time where that is larger (units waiting on each other).
    """
    processes = max(processes, 1)
    total = results["corpus"]["stage_wall_s"]
    finetune_runs = {**results["finetune"]["runs"], **results["finetune"].get("repeats", {})}
    probes = results.get("probes", {})
    units = {
        "pretrain": sum(info["wall_s"] for info in results["pretrain"]["families"].values()) / processes,
        "finetune": sum(info["wall_s"] for info in finetune_runs.values()) / processes,
        "evaluate": sum(s.get("eval_wall_s", 0.0) for s in results["evaluate"].get("scores", {}).values()) / processes,
        "probes": probes.get("wall_s", 0.0) + probes.get("kws_wall_s", 0.0),
    }
    for stage, seconds in units.items():
        total += max(results.get(stage, {}).get("stage_wall_s", 0.0), seconds)
    return total


# ============================================================================================ driver
@dataclass
class ExperimentResult:
    """What `run_experiment` did: per stage "ran" or "skipped", the stage results, the wall time of this call."""

    status: dict[str, str]
    results: dict[str, Any]
    wall_s: float


# Options added after experiments had been run, per config section, with the value that means "as before": at that
# value they are left out of the stage's settings, so the experiments finished earlier are not "other settings".
_ADDED_LATER: dict[str, dict[str, Any]] = {
    "finetune": {"seeds": 1, "curve_minutes": None, "patience_start": 0.0, "rate_grid_minutes": []},
    "transducer": {"max_symbols_per_step": None},
}


def _section_settings(config: ExperimentConfig, section: str, leave_out: Sequence[str] = ()) -> dict[str, Any]:
    """A config section as a stage marker's settings, without `leave_out` and the options added later at their
    "as before" value (`_ADDED_LATER`)."""
    later = _ADDED_LATER.get(section, {})
    return {
        k: v
        for k, v in dataclasses.asdict(getattr(config, section)).items()
        if k not in leave_out and not (k in later and v == later[k])
    }


def _stage_settings(config: ExperimentConfig, stage: str) -> dict[str, Any]:
    """The settings a stage's output depends on (a changed setting means the marker no longer applies)."""
    if stage == "corpus":
        return {
            "corpus": dataclasses.asdict(config.corpus),
            # What the draw depends on: a subset's step cap is a fine-tuning setting, not a corpus one.
            "subsets": [
                {k: v for k, v in dataclasses.asdict(s).items() if k != "steps"} for s in config.finetune.subsets
            ],
            "seed": config.seed,
        }
    if stage == "pretrain":
        return {"pretrain": {k: v for k, v in dataclasses.asdict(config.pretrain).items() if k != "progress"}}
    if stage == "finetune":  # headline_minutes: the report's only
        return {
            "finetune": _section_settings(
                config, "finetune", ("progress", "logging_steps", "save_steps", "headline_minutes")
            )
        }
    if stage == "evaluate":
        return {"evaluate": dataclasses.asdict(config.evaluate)}
    if stage == "probes":
        return {"probes": dataclasses.asdict(config.probes), "results_dir": str(Path(config.results_dir).resolve())}
    if stage == "transducer":
        return {"transducer": _section_settings(config, "transducer")}
    return {
        "results_dir": str(Path(config.results_dir).resolve()),
        "models_dir": config.models_dir,
        "headline_minutes": config.finetune.headline_minutes,
    }


def run_experiment(
    config: ExperimentConfig, stages: Sequence[str] | None = None, command: str = "", log: Callable[[str], None] = print
) -> ExperimentResult:
    """Run the `stages` (default: all) in order; finished ones (done.json) are read back, not redone.

    Args:
        config: the experiment (`load_experiment_config`).
        stages: subset of `STAGES`; a later stage needs the earlier ones finished (run before, or now). The
            report is regenerated when named here, and otherwise only when something upstream ran.
        command: the command line that started this, recorded in the report.
        log: where one status line per stage goes.
    """
    requested = list(stages or [])
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise ExperimentError(f"stages {unknown} unknown; choose from {STAGES}")
    wanted = requested or list(STAGES)
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(_json_ready(dataclasses.asdict(config)), sort_keys=False))
    start = time.perf_counter()
    status: dict[str, str] = {}
    results: dict[str, Any] = {}
    for index, stage in enumerate(STAGES):
        folder = out / "stages" / stage
        settings = _stage_settings(config, stage)
        before = STAGES[:index]
        upstream = {s: results[s]["finished_at"] for s in before if s in results}
        # The report, and the transducer stage whose runs guard their own settings (`unit_done`; so it can be
        # switched on after an experiment finished), simply run again with other settings.
        done = stage_done(folder, settings, upstream, f"stage {stage}", strict=stage not in ("transducer", "report"))
        if done is not None and not (stage == "report" and stage in requested):
            results[stage], status[stage] = done, "skipped"
            log(f"[{stage}] done before ({folder / DONE}): skipped")
            continue
        if stage not in wanted:
            continue
        missing = [s for s in before if s not in results]
        if missing:
            raise ExperimentError(
                f"stage {stage} needs stage(s) {missing} finished first: add them to --stages or run them before"
            )
        log(f"[{stage}] running")
        stage_start = time.perf_counter()
        if stage == "corpus":
            result = stage_corpus(config, out)
        elif stage == "pretrain":
            result = stage_pretrain(config, out, results["corpus"]["finished_at"])
        elif stage == "finetune":
            result = stage_finetune(config, out, results["pretrain"]["families"])
        elif stage == "evaluate":
            result = stage_evaluate(config, out, results["finetune"])
        elif stage == "probes":
            result = stage_probes(
                config, out, results["corpus"], results["pretrain"]["families"], results.get("finetune")
            )
        elif stage == "transducer":
            from .transducers import stage_transducer  # imports this module

            result = stage_transducer(config, out, results["pretrain"]["families"], results["finetune"])
        else:
            total = compute_wall_s(results, config.parallel_runs)
            result = stage_report(config, out, results, command, total)
        result = {**result, "stage_wall_s": round(time.perf_counter() - stage_start, 1)}
        results[stage] = write_stage_done(folder, settings, upstream, result)
        status[stage] = "ran"
        log(f"[{stage}] finished in {format_duration(result['stage_wall_s'])}")
    return ExperimentResult(status, results, time.perf_counter() - start)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a person would type it again: `python` for the interpreter, OMP_NUM_THREADS if set.

    `--stages ...` is left out: it only chooses what runs in one invocation, and the results of a resumable,
    seeded experiment are those of the plain command (a report regenerated with `--stages report` must not
    name that as the command that made it).
    """
    args = list(sys.argv if argv is None else argv)
    if "--stages" in args:
        at = args.index("--stages")
        end = next((i for i in range(at + 1, len(args)) if args[i].startswith("--")), len(args))
        args = args[:at] + args[end:]
    script = args[0] if args else "scripts/low_resource_experiment.py"
    try:
        script = str(Path(script).resolve().relative_to(Path.cwd()))
    except ValueError:
        pass
    # Thread settings change the wall times in the report: keep them in the command that made it.
    env = [f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS",) if name in os.environ]
    return " ".join([*env, "python", script, *(a if " " not in a else repr(a) for a in args[1:])])


__all__ = [
    "ENCODER_FIELDS",
    "INITS",
    "ROW_KEYS",
    "STAGES",
    "CorpusSpec",
    "EvaluateSpec",
    "ExperimentConfig",
    "ExperimentError",
    "ExperimentResult",
    "FinetuneRun",
    "FinetuneSpec",
    "MaskingSpec",
    "PretrainSpec",
    "SubsetSpec",
    "check_held_out",
    "check_rows",
    "draw_nested_subsets",
    "evaluate_model",
    "load_experiment_config",
    "markdown_report",
    "plan_finetune_runs",
    "run_experiment",
    "schedule_arguments",
]
