"""The pretraining loop, readable top to bottom: `setup` -> `train_step` -> `log_train` / `evaluate` /
`save_checkpoint`, driven by `_train`; `pretrain` is the entry point.

One optimiser step = `train.grad_accum` micro-batches. For each micro-batch every process featurises its own
batch (the data plan gives each rank different batches), runs `ConformerSslForPreTraining`, sums the
per-objective loss sums/counts over processes in one all-reduce, and back-propagates its local sums divided
by the GLOBAL counts (`training.backward_loss`). Then: clip, non-finite guard, AdamW, LR schedule, and the EMA
teacher's step (data2vec, dinosr: `update_teacher` with statistics summed over micro-batches and processes). Every
`log_steps` the global losses go to TensorBoard and the progress bar, every `eval_steps` the held-out
manifests are scored with fixed masks, every `save_steps` an atomic checkpoint is written (with the loss-curve
PNG and a model card). `resume` continues a run exactly: weights, optimiser, schedule, RNGs, mask generator,
data position. After every step the processes agree (one all-reduce) on whether to stop early: `train.max_minutes`
ran out, or a stop signal (SIGTERM / SIGUSR1 / SIGINT, `hf_ssl_speech.preemption`) reached any of them; either way
the step is checkpointed first.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

from ..data import BadExampleCounter, build_dataloader
from ..data.augment import mix_for_denoising
from ..errors import UserError
from ..feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from ..interop.hub import push_checkpoint, write_model_card
from ..modeling_conformer_ssl import ConformerSslForPreTraining
from ..precision import describe, launch_device, resolve_mixed_precision
from ..preemption import StopRequest
from . import sharding
from .bookkeeping import CodeUsage, LossTracker, MetricsLogger, NonFiniteGuard, backward_loss, global_totals
from .checkpoints import CheckpointManager, any_process, check_output_dir
from .compiling import compile_encoders, pad_to_bucket
from .features import batch_extractor
from .init_from import init_source, initialise, resumed_config
from .malloc import keep_freed_memory
from .optim import build_optimizer, build_scheduler, ema_decay, gumbel_temperature
from .recipe import Recipe, check_recipe_paths, model_config, save_recipe

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What a run leaves behind (paths are None when nothing was written)."""

    output_dir: Path
    step: int
    checkpoint: Path | None = None
    plot: Path | None = None
    hub_url: str | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    valid_metrics: dict[str, float] = field(default_factory=dict)
    data_counts: dict[str, Any] = field(default_factory=dict)  # training examples read and skipped, all processes
    stopped_by: str | None = None  # before max_steps: "max_minutes", or the stop signal's name (e.g. "SIGTERM")

    @property
    def data_summary(self) -> str:
        """ "N training examples read, M bad ones skipped (reason: count, ...)"."""
        bad = self.data_counts.get("bad", {})
        skipped = sum(bad.values())
        reasons = f" ({', '.join(f'{k}: {v}' for k, v in sorted(bad.items()))})" if bad else ""
        return f"{self.data_counts.get('good', 0)} training examples read, {skipped} bad ones skipped{reasons}"


# ---------------------------------------------------------------------------------------------- batches
def featurise(
    batch: dict[str, Any],
    extractor: ConformerSslFeatureExtractor,
    device: torch.device,
    recipe: Recipe,
    generator: torch.Generator | None,
    train: bool,
) -> dict[str, torch.Tensor]:
    """Collator waveforms -> model inputs on `device`: log-mels (dither and denoising in training only).

    With denoising the model sees the noisy features while its targets come from the clean ones
    (`target_features`), as in NEST; frame labels (HuBERT / WavLM targets) belong to the clean, primary utterance
    and pass through untouched. `data.mix_segment_fraction` switches NEST's whole-utterance mix to WavLM's segment.
    """
    waveforms = batch["waveforms"].to(device)  # (batch, samples)
    lengths = batch["waveform_lengths"].to(device)  # (batch,)
    inputs: dict[str, torch.Tensor] = {}
    data = recipe.data
    if train and data.denoising_prob > 0:
        clean, _ = extractor.extract_batch(waveforms, lengths)
        inputs["target_features"] = clean
        waveforms, _ = mix_for_denoising(
            waveforms,
            lengths,
            data.denoising_prob,
            None,
            data.noise_snr_db,
            data.speech_snr_db,
            data.noise_ratio,
            generator=generator,
            segment_fraction=data.mix_segment_fraction,
        )
    dither = data.dither if train else 0.0
    features, frames = extractor.extract_batch(waveforms, lengths, dither=dither, generator=generator)  # (B, T, F)
    inputs["input_features"] = features
    inputs["attention_mask"] = (torch.arange(features.shape[1], device=device)[None, :] < frames[:, None]).long()
    if "frame_labels" in batch:
        inputs["frame_labels"] = batch["frame_labels"].to(device)[:, : features.shape[1]]  # (B, T)
    return pad_to_bucket(inputs, recipe.train.compile_bucket_frames) if recipe.train.compile else inputs


def forever(loader: Any) -> Iterator[dict[str, Any]]:
    """Batches across epochs (the loader advances its epoch at the end of each pass)."""
    empty_passes = 0
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        empty_passes = 0 if yielded else empty_passes + 1
        if empty_passes >= 2:  # one empty pass is normal right after resuming at an epoch's end
            raise RuntimeError(
                "The training data yields no batch: check data.train_manifests and the duration filters."
            )


def _objective_totals(out: Any, audio_seconds: float, reduce: Any, num_processes: int) -> tuple[dict, dict, dict]:
    """Global (all processes) per-objective sums and counts, and metrics, from one all-reduce."""
    local: dict[str, Any] = {"audio_seconds": audio_seconds}
    for name in out.loss_sums:
        local[f"sum/{name}"] = out.loss_sums[name].detach().float()
        local[f"count/{name}"] = out.loss_counts[name]
    local.update({f"metric/{k}": v for k, v in (out.metrics or {}).items()})
    total = global_totals(local, reduce if num_processes > 1 else None)
    sums = {n: total[f"sum/{n}"] for n in out.loss_sums}
    counts = {n: total[f"count/{n}"] for n in out.loss_sums}
    # `<objective>_correct` are counts (summed over processes); other metrics are averaged over processes.
    metrics = {
        k[7:]: float(v) / (1 if k.endswith("_correct") else num_processes)
        for k, v in total.items()
        if k.startswith("metric/")
    }
    metrics["audio_seconds"] = float(total["audio_seconds"])
    return sums, counts, metrics


def evaluate(
    model: torch.nn.Module,
    loader: Any,
    extractor: ConformerSslFeatureExtractor,
    accelerator: Accelerator,
    recipe: Recipe,
    temperature: float,
) -> dict[str, float]:
    """Validation losses of every objective with the same masks at each evaluation (fixed generator seed)."""
    model.eval()
    generator = torch.Generator(device=accelerator.device).manual_seed(
        recipe.train.eval_seed + accelerator.process_index
    )
    tracker = LossTracker()
    reduce = lambda t: accelerator.reduce(t.to(accelerator.device), "sum")  # noqa: E731
    loader.set_epoch(0)
    # fork_rng: validation leaves the training random streams as they were (how often it runs changes nothing).
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for index, batch in enumerate(loader):
            if recipe.train.eval_batches is not None and index >= recipe.train.eval_batches:
                break
            inputs = featurise(batch, extractor, accelerator.device, recipe, generator, train=False)
            with accelerator.autocast():
                out = model(**inputs, gumbel_temperature=temperature, step=None, generator=generator)
            sums, counts, metrics = _objective_totals(out, batch["audio_seconds"], reduce, accelerator.num_processes)
            metrics.pop("audio_seconds")
            tracker.update(sums, counts, metrics, out.loss_weights)
    model.train()
    return tracker.compute()


# ---------------------------------------------------------------------------------------------- the run
def unused_parameter_reasons(config: Any) -> list[str]:
    """Why some trainable parameters may get no gradient in a step (empty: every one gets one, every step).

    DDP's `find_unused_parameters=True` walks the autograd graph after every forward to find them: a cost on every
    step, and a warning on every rank when nothing is unused. It is turned on only for these reasons:
    an objective that starts later (its head idles until then), layerdrop (skipped blocks), and objectives that all
    read a lower block (the blocks above feed no loss). `tests/test_scale.py` checks this list against a real
    backward of every shipped recipe.
    """
    reasons = [
        f"objectives.{name}.start_step={spec['start_step']}"
        for name, spec in config.objectives.items()
        if spec["start_step"] > 0
    ]
    if config.layerdrop > 0:
        reasons.append(f"layerdrop={config.layerdrop}")
    top = config.num_hidden_layers
    read = [spec["layer"] % (top + 1) for spec in config.objectives.values()]  # hidden_states index; -1 = the top
    if read and max(read) < top:
        reasons.append(f"the highest block any objective reads is {max(read)} of {top}")
    return reasons


def _flat_hparams(recipe: Recipe) -> dict[str, Any]:
    """TensorBoard hparams take flat scalars only."""
    flat: dict[str, Any] = {}
    for section, values in recipe.to_dict().items():
        for key, value in (values or {}).items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _resume_path(resume: bool | str | Path, checkpoints: CheckpointManager) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:  # the newest checkpoint that passes the checks (a torn one falls back, with a warning)
        latest = checkpoints.latest_usable()
        if latest is None:
            logger.warning("--resume: no complete checkpoint under %s; starting from scratch", checkpoints.root)
        return latest
    return checkpoints.check_usable(Path(resume))


@dataclass
class Run:
    """Everything `setup` builds once, and the counters the steps move on."""

    recipe: Recipe
    accelerator: Accelerator
    precision: str
    model: torch.nn.Module  # prepared (DDP-wrapped, or FSDP-sharded)
    optimizer: Any
    scheduler: Any
    extractor: ConformerSslFeatureExtractor
    generator: torch.Generator  # this process's masks, negatives, noise and dither
    train_loader: Any
    valid_loader: Any
    checkpoints: CheckpointManager
    metrics: MetricsLogger
    guard: NonFiniteGuard
    tracker: LossTracker
    code_usage: CodeUsage
    compiled: Any = None
    sharded: tuple[Any, Any] | None = None  # (model, optimiser) of an FSDP run
    step: int = 0
    audio_seconds_total: float = 0.0
    resumed_from: Path | None = None
    encoder_frozen: bool = False  # train.freeze_encoder_steps: the heads-only warm-up is on

    @property
    def out_dir(self) -> Path:
        return Path(self.recipe.train.output_dir)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @cached_property
    def unwrapped(self) -> ConformerSslForPreTraining:
        return self.accelerator.unwrap_model(self.model)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes."""
        return self.accelerator.reduce(tensor.to(self.accelerator.device), "sum")


@dataclass
class StepOutcome:
    """One optimiser step: whether it was applied, and what the log line reports of it."""

    finite: bool
    temperature: float
    decay: float
    grad_norm: float


@dataclass
class Interval:
    """Throughput between two log lines; validation and checkpoints are not counted."""

    start: float
    wait: float = 0.0  # seconds spent waiting for batches
    audio: float = 0.0  # audio seconds trained on (all processes)


# ---------------------------------------------------------------------------------------------- set-up
def _make_accelerator(recipe: Recipe, find_unused: bool) -> tuple[Accelerator, str]:
    """The Accelerator for the recipe's precision and tracker; refuses the settings it would silently ignore."""
    t = recipe.train
    precision, why = resolve_mixed_precision(t.mixed_precision, launch_device())
    # An earlier run in this process (a Trainer, the experiment's units in-process, a notebook cell) leaves
    # accelerate's state with its own precision, and Accelerator() refuses another. Start from a fresh one, as
    # transformers' TrainingArguments does; the process state (the distributed set-up) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with="tensorboard" if t.report_to == "tensorboard" else None,
        project_dir=str(t.output_dir),
        # One scheduler step per optimiser step: by default accelerate steps it once per process.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    accelerator.print(describe(precision, why))
    if precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate turns fp16 autocast and its gradient scaler on for accelerators only: on the CPU the run
        # would silently stay fp32 while its logs said fp16.
        raise UserError(
            "train.mixed_precision=fp16 on the CPU: accelerate runs fp16 (with a gradient scaler) on GPUs only, so "
            "this run would silently be fp32; use train.mixed_precision=bf16 (CPU autocast) or no"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Never run with this loop (docs/scaling.md): DeepSpeed steps its engine inside every `backward` made
        # outside `accelerator.accumulate`, which would turn each accumulation micro-batch into an optimiser step.
        if t.grad_accum > 1 or t.fsdp:
            raise UserError(
                f"accelerate's DeepSpeed plugin with train.grad_accum={t.grad_accum}, train.fsdp={t.fsdp}: the "
                "loop has not been run under DeepSpeed and would step it once per micro-batch; use train.fsdp=true "
                "without --use_deepspeed for sharding (or train.grad_accum=1 to try DeepSpeed at your own risk)"
            )
        logger.warning("accelerate's DeepSpeed plugin: this loop has not been run under DeepSpeed (docs/scaling.md)")
    if t.fsdp and accelerator.num_processes == 1:
        logger.warning("train.fsdp=true with one process: nothing to shard, the run is a plain single-process run")
    return accelerator, precision


def setup(recipe: Recipe, resume: bool | str | Path) -> Run:
    """Accelerator, model, optimiser, schedule, data and bookkeeping; restored from a checkpoint when resuming."""
    t, o, d = recipe.train, recipe.optim, recipe.data
    out_dir = Path(t.output_dir)
    # Checked by every process before any writes (no process writes until all have joined the Accelerator).
    checkpoints = CheckpointManager(out_dir, t.keep_last, t.keep_steps)
    start = _resume_path(resume, checkpoints)
    check_recipe_paths(recipe, source_needed=start is None)  # a resumed run never reads model.init_from again
    check_output_dir(out_dir, resume)
    if t.tune_malloc:  # before the model's first large allocation
        keep_freed_memory()
    initialised, extractor = None, None
    if init_source(recipe) is None:
        config = model_config(recipe)
    elif start is not None:  # the checkpoint holds every weight: only its config and extractor are needed
        config, extractor = resumed_config(start, recipe)
    else:  # model.init_from on a fresh start: convert the source, load its encoder (and heads), seed the new heads
        initialised = initialise(recipe, seed=t.seed)
        config, extractor = initialised.model.config, initialised.feature_extractor
    unused = unused_parameter_reasons(config)
    if t.freeze_encoder_steps > 0:  # the frozen encoder gets no gradient during the warm-up
        unused.append(f"train.freeze_encoder_steps={t.freeze_encoder_steps}")
    accelerator, precision = _make_accelerator(recipe, find_unused=bool(unused))
    rank, world = accelerator.process_index, accelerator.num_processes
    fsdp = t.fsdp and world > 1

    # --- model, feature extractor, optimiser, schedule. Same initial weights on every process.
    if unused and world > 1 and not fsdp:
        accelerator.print(f"DDP looks for parameters without a gradient every step: {'; '.join(unused)}")
    set_seed(t.seed)
    if initialised is not None:
        model = initialised.model
        accelerator.print(initialised.report)
    else:
        model = ConformerSslForPreTraining(config)
    compiled = compile_encoders(model, t.compile_mode) if t.compile else None  # in place, before DDP wraps it
    if extractor is None and getattr(config, "subsampling", None) == "feature_projection":
        from ..interop.w2v_bert import feature_extractor_for  # w2v-BERT 2.0's stacked fbank front end

        extractor = feature_extractor_for(config)
    elif extractor is None:
        extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins, hop_length=config.hop_length)
    extractor = batch_extractor(extractor)
    if fsdp:  # shard before the optimiser exists: it must hold the shards (sharding.py says why not accelerate's)
        model = sharding.shard_model(model.to(accelerator.device), accelerator.device)
    # Every parameter is in the optimiser from the start, frozen or not: a resumed run finds the same groups.
    optimizer = build_optimizer(model, o.lr, o.betas, o.weight_decay, o.eps, o.encoder_lr_scale, o.layer_decay)
    scheduler = build_scheduler(optimizer, o.scheduler, o.warmup_steps, t.max_steps, config.hidden_size, o.lr, o.min_lr)
    if fsdp:  # accelerate keeps the scheduler and the RNG states; model and optimiser state are ours to save
        scheduler = accelerator.prepare(scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # Per-process randomness: dropout uses the global RNG; masks, negatives, noise and dither the generator.
    set_seed(t.seed + 1 + rank)
    generator = torch.Generator(device=accelerator.device).manual_seed(1_000_003 * (t.seed + 1) + rank)

    # --- data: one planned loader per process, NOT passed to accelerator.prepare (it would shard it again).
    loader_args = {
        **d.loader_config(),
        "num_workers": d.num_workers,
        "rank": rank,
        "world_size": world,
        "seed": t.seed,
        "return_waveforms": True,
        "frame_labels_key": d.frame_labels_key or "frame_labels",
    }
    train_loader = build_dataloader(d.train_manifests, d.weights, **loader_args)
    valid_loader = (
        build_dataloader(d.valid_manifests, None, **{**loader_args, "shuffle": False}) if d.valid_manifests else None
    )
    run = Run(
        recipe,
        accelerator,
        precision,
        model,
        optimizer,
        scheduler,
        extractor,
        generator,
        train_loader,
        valid_loader,
        checkpoints,
        MetricsLogger(accelerator.log if t.report_to != "none" else None),
        NonFiniteGuard(t.max_nonfinite),
        LossTracker(),
        CodeUsage(),
        compiled,
        (model, optimizer) if fsdp else None,
    )
    if start is not None:
        _restore(run, start)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out_dir / "recipe.yaml")
    if t.report_to != "none":
        accelerator.init_trackers("tensorboard", config=_flat_hparams(recipe))
    return run


def _restore(run: Run, start: Path) -> None:
    """Continue exactly where checkpoint `start` stopped: every state the next step reads."""
    state, rank_state = CheckpointManager.load(start, run.accelerator, run.sharded)
    run.step, run.audio_seconds_total = int(state["step"]), float(state.get("audio_seconds_total", 0.0))
    run.metrics.load_state_dict(state["metrics"])
    run.guard.load_state_dict(state["guard"])
    run.generator.set_state(rank_state["generator"])
    run.train_loader.load_state_dict(rank_state["data"])
    run.tracker.load_state_dict(rank_state["tracker"])
    run.code_usage.load_state_dict(rank_state.get("code_usage", {}))
    run.resumed_from = start
    run.accelerator.print(f"Resumed from {start} at step {run.step}")


# ---------------------------------------------------------------------------------------------- one step
def train_step(run: Run, batches: Iterator[dict[str, Any]], interval: Interval) -> StepOutcome:
    """One optimiser step: `train.grad_accum` micro-batches, clip, non-finite guard, AdamW, schedule, EMA teacher."""
    recipe, accelerator, model = run.recipe, run.accelerator, run.model
    t, o = recipe.train, recipe.optim
    fsdp = run.sharded is not None
    temperature = gumbel_temperature(
        run.step, o.gumbel_temperature_start, o.gumbel_temperature_end, o.gumbel_temperature_decay
    )
    finite = True
    teacher_statistics: dict[str, torch.Tensor] = {}  # summed over this step's micro-batches
    _set_encoder_frozen(run, run.step < t.freeze_encoder_steps)
    for micro in range(t.grad_accum):
        before = time.monotonic()
        batch = next(batches)
        interval.wait += time.monotonic() - before
        inputs = featurise(batch, run.extractor, accelerator.device, recipe, run.generator, train=True)
        # DDP all-reduces (FSDP reduce-scatters) gradients in the backward of the last micro-batch only.
        last = micro == t.grad_accum - 1
        sync = contextlib.nullcontext() if last or fsdp else accelerator.no_sync(model)
        if fsdp:  # FSDP2's no_sync: no reduce-scatter on accumulation micro-batches
            model.set_requires_gradient_sync(last)
        with sync:
            with accelerator.autocast():
                out = model(**inputs, gumbel_temperature=temperature, step=run.step, generator=run.generator)
            sums, counts, micro_metrics = _objective_totals(out, batch["audio_seconds"], run.reduce, run.world)
            loss_value = sum(out.loss_weights[n] * float(sums[n]) / max(float(counts[n]), 1.0) for n in sums)
            if not math.isfinite(loss_value):  # identical on every process: all skip together
                finite = False
                continue
            accelerator.backward(backward_loss(out.loss_sums, counts, out.loss_weights, run.world, t.grad_accum))
        interval.audio += micro_metrics.pop("audio_seconds")
        run.tracker.update(sums, counts, micro_metrics, out.loss_weights)
        run.code_usage.update(out.code_counts)
        for key, value in (out.teacher_statistics or {}).items():
            teacher_statistics[key] = teacher_statistics.get(key, 0) + value

    grad_norm = float("nan")
    if finite:
        max_norm = o.clip if o.clip > 0 else float("inf")
        if fsdp:
            grad_norm = sharding.clip_grad_norm(list(model.parameters()), max_norm)
        else:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        # fp16: an overflow is the GradScaler's business (it skips the step and lowers the scale).
        if not math.isfinite(grad_norm) and run.precision != "fp16":
            finite = run.guard.ok(grad_norm, run.step, "gradient norm")
        else:
            run.guard.ok(0.0, run.step)  # resets the streak
    else:
        run.guard.ok(float("nan"), run.step, "loss")
    decay = ema_decay(run.step, o.ema_decay_start, o.ema_decay_end, o.ema_anneal_steps)
    if finite:
        if run.encoder_frozen:  # no update at all, not even weight decay or a moment decaying on a zero gradient
            for param in run.unwrapped.conformer.parameters():
                param.grad = None
        run.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            run.scheduler.step()
            if hasattr(run.unwrapped, "teacher"):  # every process applies the same update (statistics summed)
                run.unwrapped.update_teacher(decay, {k: run.reduce(v) for k, v in teacher_statistics.items()})
        run.step += 1
    run.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(finite, temperature, decay, grad_norm)


def _set_encoder_frozen(run: Run, frozen: bool) -> None:
    """train.freeze_encoder_steps: the encoder takes no gradient while the new heads warm up (the EMA teacher has
    none anyway). Its parameters stay in the optimiser, so resuming finds the same groups and state. Its batch norms
    use and keep their running statistics (eval mode, re-applied every step: validation sets train mode again), so
    the frozen encoder is exactly the source's."""
    encoder = run.unwrapped.conformer
    if frozen != run.encoder_frozen:
        encoder.requires_grad_(not frozen)
        run.encoder_frozen = frozen
        if not frozen:
            encoder.train(run.model.training)
        if run.step > 0 or not frozen:
            run.accelerator.print(f"step {run.step}: encoder {'frozen' if frozen else 'unfrozen'}")
    if frozen:
        for module in encoder.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def log_train(run: Run, outcome: StepOutcome, interval: Interval) -> dict[str, float]:
    """The training metrics since the last log line (global over processes), to TensorBoard and the history."""
    elapsed = time.monotonic() - interval.start
    latest = {
        **run.tracker.compute(),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": outcome.grad_norm,
        "gumbel_temperature": outcome.temperature,
        "audio_seconds_per_s": interval.audio / elapsed,
        "data_wait_fraction": interval.wait / elapsed,
        "skipped_steps": run.guard.total_skipped,
        **({"ema_decay": outcome.decay} if hasattr(run.unwrapped, "teacher") else {}),
        **run.code_usage.compute(run.reduce if run.world > 1 else None),
        **(run.compiled.metrics() if run.compiled else {}),
    }
    run.audio_seconds_total += interval.audio
    run.metrics.log(run.step, latest, "train")
    run.tracker.reset()
    run.code_usage.reset()
    return latest


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Run, latest_metrics: dict[str, float]) -> Path:
    """A complete checkpoint of this step (all processes call it); the run's `model` link then points at it."""
    recipe, out_dir, step = run.recipe, run.out_dir, run.step
    recipe_file = out_dir / "recipe.yaml"

    def finish(folder: Path) -> None:  # main process, inside the temporary folder, before the rename
        run.metrics.plot(folder / "loss_curves.png", title=f"{out_dir.name}: step {step}")
        summary = {
            "optimiser steps": step,
            "audio hours seen": run.audio_seconds_total / 3600,
            "processes": run.world,
            **{k: v for k, v in latest_metrics.items() if "loss" in k},
        }
        card_yaml = recipe_file.read_text() if recipe_file.is_file() else ""
        write_model_card(folder / "model", recipe.train.push_to_hub or out_dir.name, summary, recipe_yaml=card_yaml)

    trainer_state = {
        "audio_seconds_total": run.audio_seconds_total,
        "metrics": run.metrics.state_dict(),
        "guard": run.guard.state_dict(),
        "recipe": recipe.to_dict(),
    }
    rank_state = {
        "generator": run.generator.get_state(),
        "data": run.train_loader.state_dict(),
        "tracker": run.tracker.state_dict(),
        "code_usage": run.code_usage.state_dict(),
    }
    return run.checkpoints.save(
        step,
        run.accelerator,
        run.model,
        trainer_state,
        rank_state,
        run.extractor,
        before_rename=finish,
        sharded=run.sharded,
    )


# ---------------------------------------------------------------------------------------------- the run
def pretrain(recipe: Recipe, resume: bool | str | Path = False, progress: bool = True) -> PretrainResult:
    """Run (or continue) the pretraining described by `recipe`; call from every process of `accelerate launch`.

    Args:
        recipe: the validated recipe (`recipe.load_recipe`).
        resume: False: fresh run; True: continue from the newest usable checkpoint in `train.output_dir`;
            a path: continue from that checkpoint folder.
        progress: show the tqdm bar (main process only).

    SIGTERM, SIGUSR1 or SIGINT end the run after the current optimiser step, with a checkpoint; the result's
    `stopped_by` says so (the CLI then exits with `PREEMPTED_EXIT_CODE`).
    """
    with StopRequest() as stop:
        run = setup(recipe, resume)
        return _train(run, stop, progress)


def _train(run: Run, stop: StopRequest, progress: bool) -> PretrainResult:
    """The loop: steps, log lines, validation, checkpoints, until max_steps, max_minutes or a stop signal."""
    t, accelerator = run.recipe.train, run.accelerator
    batches = forever(run.train_loader)
    latest_metrics: dict[str, float] = {}
    valid_metrics: dict[str, float] = {}
    last_saved = run.step if run.resumed_from is not None else None
    stopped_by: str | None = None
    bar = tqdm(
        total=t.max_steps,
        initial=run.step,
        disable=not (progress and accelerator.is_local_main_process),
        dynamic_ncols=True,
        desc="pretrain",
    )
    started = time.monotonic()
    interval = Interval(started)
    run.model.train()
    while run.step < t.max_steps:
        outcome = train_step(run, batches, interval)
        bar.update(int(outcome.finite))
        if outcome.finite and run.step % t.log_steps == 0:
            latest_metrics = log_train(run, outcome, interval)
            bar.set_postfix(
                loss=f"{latest_metrics.get('loss', float('nan')):.3f}",
                lr=f"{latest_metrics['lr']:.2e}",
                audio_s_per_s=f"{latest_metrics['audio_seconds_per_s']:.1f}",
                wait=f"{latest_metrics['data_wait_fraction']:.0%}",
            )
            interval = Interval(time.monotonic())
        # Every process stops at the same step: wall clocks and signals differ between processes.
        out_of_time, preempted = any_process(
            accelerator, t.max_minutes is not None and time.monotonic() - started > 60 * t.max_minutes, stop.received
        )
        done = run.step >= t.max_steps or out_of_time or preempted
        paused = time.monotonic()  # validation and checkpoints do not count in the training throughput
        if outcome.finite and run.valid_loader is not None and (run.step % t.eval_steps == 0 or done):
            valid_metrics = evaluate(
                run.model, run.valid_loader, run.extractor, accelerator, run.recipe, outcome.temperature
            )
            run.metrics.log(run.step, valid_metrics, "valid")
            accelerator.print(
                f"step {run.step}: valid "
                + ", ".join(f"{k} {v:.4g}" for k, v in valid_metrics.items() if k.startswith("loss"))
            )
        due = run.step % t.save_steps == 0 or run.step in t.keep_steps or done
        if (outcome.finite or done) and due and last_saved != run.step:
            save_checkpoint(run, latest_metrics)
            last_saved = run.step
        interval.start += time.monotonic() - paused
        if preempted:
            stopped_by = stop.received or "a signal to another process"
            break
        if out_of_time:
            stopped_by = "max_minutes"
            break
    bar.close()
    # Shuts the data workers down now (a pass left half-read keeps them waiting, and they ignore stop signals).
    batches.close()
    return _finish(run, last_saved, stopped_by, latest_metrics, valid_metrics)


def _finish(
    run: Run,
    last_saved: int | None,
    stopped_by: str | None,
    latest_metrics: dict[str, float],
    valid_metrics: dict[str, float],
) -> PretrainResult:
    """The end: data counts, the final plot next to the run, the optional push, trackers closed."""
    accelerator, t = run.accelerator, run.recipe.train
    final = run.checkpoints.path_for(last_saved) if last_saved is not None else run.checkpoints.latest()
    data_counts = BadExampleCounter.merge(gather_object([run.train_loader.counter.state_dict()]))
    main = accelerator.is_main_process
    plot = run.metrics.plot(run.out_dir / "loss_curves.png", title=run.out_dir.name) if main else None
    hub_url = None
    if t.push_to_hub and final is not None and main and stopped_by is None:
        hub_url = push_checkpoint(
            final / "model",
            t.push_to_hub,
            private=t.hub_private,
            commit_message=f"Pretrained {run.step} steps ({recipe_name(run.recipe)})",
        )
        accelerator.print(f"Pushed {final / 'model'} to {hub_url}")
    accelerator.wait_for_everyone()
    # Let the model go before accelerate destroys the process group: DDP's reducer (FSDP's mesh) holds the group, and
    # a gloo group destroyed later, when the reducer is freed with the GIL held, can deadlock against a gloo thread
    # that is still releasing the last collective's tensors (it needs the GIL): seen as a hang at the end of a run.
    run.model = run.optimizer = run.sharded = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return PretrainResult(
        run.out_dir, run.step, final, plot, hub_url, latest_metrics, valid_metrics, data_counts, stopped_by
    )


def recipe_name(recipe: Recipe) -> str:
    return ", ".join(recipe.objectives) or "no objectives"


__all__ = [
    "PretrainResult",
    "Run",
    "evaluate",
    "featurise",
    "pretrain",
    "setup",
    "train_step",
    "unused_parameter_reasons",
]
