"""The resumable loader: bad-example accounting, the iterable datasets the DataLoader runs, `build_dataloader`."""

from __future__ import annotations

import atexit
import bisect
import collections
import logging
import math
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .audio_io import BAD_REASONS, AudioError, probe_duration
from .collate import SpeechCollator
from .config import DataConfig
from .decode import decode_example
from .plan import EpochPlan, pack_sorted, plan_epoch
from .sources import IndexedSource, RawExample, StreamingDatasetSource, open_source

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Bad-example accounting


class TooManyBadExamplesError(UserError, RuntimeError):
    """Raised when the fraction of bad examples exceeds `DataConfig.max_bad_fraction`."""


class BadExampleCounter:
    """Counts good and bad examples (by reason), logs bad ones rate-limited, enforces `max_bad_fraction`.

    Lives in the main process of each rank: workers report the bad examples of each batch along with it.
    `state_dict()` is plain JSON, so a loop can all-gather the ranks' counters and `merge` them.

    Args:
        max_bad_fraction: see `DataConfig`.
        min_examples_before_check: see `DataConfig`.
        log_first: log this many bad examples one by one, then one summary line per `log_interval` seconds.
        log_interval: seconds between summary lines after the first `log_first`.
        keep_names: remember this many file names per reason for `summary()`.
        settings_prefix: how the messages name `DataConfig` fields: their override key in a recipe
            (`data.max_bad_fraction=0.1` on the command line), so the fix can be typed as printed.
    """

    def __init__(
        self,
        max_bad_fraction: float = 0.05,
        min_examples_before_check: int = 200,
        log_first: int = 20,
        log_interval: float = 60.0,
        keep_names: int = 5,
        settings_prefix: str = "data.",
    ) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.settings_prefix = settings_prefix
        self.min_examples_before_check = min_examples_before_check
        self.log_first = log_first
        self.log_interval = log_interval
        self.keep_names = keep_names
        self.good = 0
        self.bad: collections.Counter[str] = collections.Counter()
        self.names: dict[str, list[str]] = {}
        self._logged = 0
        self._last_log = 0.0
        self._unlogged = 0

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def attempted(self) -> int:
        return self.good + self.total_bad

    def add_good(self, count: int = 1) -> None:
        self.good += count

    def add_bad(self, reason: str, where: str, detail: str = "", log: bool = True) -> None:
        """Count one bad example; `where` names the file (and manifest line) for the log and the summary.
        `log=False` for rows already logged elsewhere (left out while indexing)."""
        self.bad[reason] += 1
        names = self.names.setdefault(reason, [])
        if len(names) < self.keep_names:
            names.append(where)
        if not log:
            return
        if self._logged < self.log_first:
            self._logged += 1
            logger.warning("skipping bad example %s: %s%s", where, reason, f" ({detail})" if detail else "")
            self._last_log = time.monotonic()
            return
        self._unlogged += 1
        if time.monotonic() - self._last_log >= self.log_interval:
            logger.warning("skipped %d more bad examples; so far %s", self._unlogged, dict(self.bad))
            self._unlogged = 0
            self._last_log = time.monotonic()

    def check(self, force: bool = False) -> None:
        """Raise `TooManyBadExamplesError` if too many examples were bad (`force`: even before the minimum)."""
        if self.attempted == 0 or (not force and self.attempted < self.min_examples_before_check):
            return
        fraction = self.total_bad / self.attempted
        if fraction > self.max_bad_fraction:
            key = f"{self.settings_prefix}max_bad_fraction"
            raise TooManyBadExamplesError(
                f"{self.total_bad} of {self.attempted} examples ({fraction:.1%}) were bad, more than "
                f"{key}={self.max_bad_fraction}. Fix or remove them (e.g. regenerate the manifest "
                f"with scripts/make_manifest.py), or raise {key}.\n{self.summary()}"
            )

    def summary(self) -> str:
        """Multi-line report: counts per reason with a few of the file names."""
        lines = [f"data: {self.good} good, {self.total_bad} bad examples"]
        for reason, count in sorted(self.bad.items(), key=lambda item: -item[1]):
            lines.append(f"  {reason} ({BAD_REASONS.get(reason, '?')}): {count}, e.g. {self.names.get(reason, [])}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"good": self.good, "bad": dict(self.bad), "names": {k: list(v) for k, v in self.names.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.good = int(state["good"])
        self.bad = collections.Counter({k: int(v) for k, v in state["bad"].items()})
        self.names = {k: list(v) for k, v in state["names"].items()}

    @staticmethod
    def merge(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Sum the `state_dict()`s of several ranks (e.g. from `accelerate.utils.gather_object`)."""
        bad: collections.Counter[str] = collections.Counter()
        names: dict[str, list[str]] = {}
        for state in states:
            bad.update(state["bad"])
            for reason, where in state["names"].items():
                names.setdefault(reason, []).extend(where)
        return {"good": sum(s["good"] for s in states), "bad": dict(bad), "names": names}


# ---------------------------------------------------------------------------------------------------------
# Iterable datasets for the DataLoader


def _example_rng(seed: int, epoch: int, position: int, slot: int) -> np.random.Generator:
    # Per example, not per worker: the crop is the same whatever worker decodes it, so resume is exact.
    return np.random.default_rng([seed, epoch, position, slot])


def _decode_batch(
    raws: Sequence[tuple[str, Callable[[], RawExample], np.random.Generator]],
    config: DataConfig,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    position: int,
) -> dict[str, Any]:
    """Decode and collate one planned batch; bad examples go to `_bad`, the batch is `_empty` if all were bad."""
    examples, bad = [], []
    for where, get_raw, rng in raws:
        try:
            examples.append(decode_example(get_raw(), config, rng))
        except AudioError as error:
            bad.append((error.reason, error.where, error.detail))
        except Exception as error:  # noqa: BLE001 - one odd file must not kill the run; it is counted and named
            bad.append(("unreadable", where, f"{type(error).__name__}: {error}"))
    batch = collator(examples) if examples else {"_empty": True}
    batch["_position"] = position
    batch["_bad"] = bad
    batch["_good"] = len(examples)
    return batch


class PlannedBatchDataset(torch.utils.data.IterableDataset):
    """Yields this rank's planned batches from position `start` on; worker `w` of `M` yields positions
    `start + w, start + w + M, ...`, so the DataLoader's round-robin returns them in plan order.

    Args:
        sources: indexed sources (see `open_source`).
        weights: per source, see `plan_epoch`.
        config: see `DataConfig`.
        collator: turns a list of example dicts into a batch.
        rank, world_size: this process and the number of processes.
        seed: seed of the plan and the crops.
    `epoch` and `start` are set by `SpeechDataLoader` before each pass.
    """

    def __init__(
        self,
        sources: Sequence[IndexedSource],
        weights: Sequence[float],
        config: DataConfig,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.sources = list(sources)
        self.weights = list(weights)
        self.config = config
        self.collator = collator
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.source_offsets = np.cumsum([0] + [len(source) for source in self.sources]).tolist()
        self.durations = (
            np.concatenate([source.durations for source in self.sources]) if self.sources else np.zeros(0, np.float32)
        )
        self.epoch = 0
        self.start = 0
        self._plan_cache: tuple[int, EpochPlan] | None = None

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            plan = plan_epoch(
                self.durations, self.source_offsets, self.weights, self.config, self.seed, epoch, self.world_size
            )
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        return self.plan(epoch).for_rank(self.rank, self.world_size)

    def locate(self, global_row: int) -> tuple[IndexedSource, int]:
        source = bisect.bisect_right(self.source_offsets, global_row) - 1
        return self.sources[source], global_row - self.source_offsets[source]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.rank_batches(self.epoch)
        for position in range(self.start + worker, len(batches), workers):
            raws = []
            for slot, global_row in enumerate(batches[position].tolist()):
                source, row = self.locate(global_row)
                rng = _example_rng(self.seed, self.epoch, position, slot)
                raws.append((f"{source.name} row {row}", (lambda s=source, r=row: s.raw(r)), rng))
            yield _decode_batch(raws, self.config, self.collator, position)


class StreamingBatchDataset(torch.utils.data.IterableDataset):
    """Yields batches from one part of a streaming source, forever; see "Streaming" in the `hf_ssl_speech.data` docstring.

    Part `rank * M + w` of `world_size * M` is stream `w` of process `rank`; its batches are global positions
    `w, w + M, ...`, in the order the DataLoader's round robin returns them. Each pass over the part
    (a "part epoch") buckets windows of `bucket_window` rows with a fresh shuffle. `start` (set by
    `SpeechDataLoader`) is the number of batches this process already consumed; the worker skips its share
    by replaying the row metadata without decoding.
    """

    def __init__(
        self,
        source: StreamingDatasetSource,
        config: DataConfig,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.source = source
        self.config = config
        self.collator = collator
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = 0
        self.epoch = 0  # unused: parts restart on their own

    def _pack_window(self, window: list[tuple[RawExample, float]], rng: np.random.Generator) -> list[list]:
        durations = np.asarray([duration for _, duration in window], dtype=np.float64)
        order = rng.permutation(len(window))
        order = order[np.argsort(durations[order], kind="stable")]
        batches = pack_sorted(durations, order, self.config.batch_seconds, self.config.max_batch_size)
        return [[window[i][0] for i in batches[b]] for b in rng.permutation(len(batches))]

    def _planned(self, part: int, parts: int) -> Iterator[tuple[list[RawExample], list[tuple[str, str, str]], int]]:
        """(raw examples of a batch, bad reports since the previous batch, part epoch) forever, no decoding."""
        config, part_epoch = self.config, 0
        bad: list[tuple[str, str, str]] = []  # bad rows after a pass's last batch ride with the next batch
        while True:
            rng = np.random.default_rng([self.seed, part, part_epoch])
            window: list[tuple[RawExample, float]] = []
            rows = 0
            for raw, duration, error in self.source.part(part, parts):
                rows += 1
                if error is not None:
                    bad.append((error.reason, error.where, error.detail))
                elif duration < config.min_duration:
                    bad.append(("too_short", raw.where, f"{duration:.3f}s (metadata)"))
                elif config.max_duration is not None and duration > config.max_duration and not config.crop_long:
                    bad.append(("too_long", raw.where, f"{duration:.3f}s (metadata)"))
                else:
                    window.append((raw, min(duration, config.max_duration or math.inf)))
                if len(window) >= config.bucket_window:
                    for batch in self._pack_window(window, rng):
                        yield batch, bad, part_epoch
                        bad = []
                    window = []
            for batch in self._pack_window(window, rng) if window else []:
                yield batch, bad, part_epoch
                bad = []
            if rows == 0:
                raise ValueError(
                    f"streaming source {self.source.name}: part {part} of {parts} (processes x num_workers) has no "
                    f"rows: the stream has fewer rows than parts. Use fewer processes or num_workers, or more data."
                )
            part_epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Global batch p comes from stream (p mod M). The DataLoader asks worker 0 first, so worker w serves
        # stream (w + start) mod M: the stream that holds batch `start`, then `start + 1`, ...
        stream = (worker + self.start) % workers
        part, parts = self.rank * workers + stream, self.world_size * workers
        skip = len(range(stream, self.start, workers))  # batches of this stream among the first `start`
        for index, (raws, bad, part_epoch) in enumerate(self._planned(part, parts)):
            if index < skip:
                continue
            position = index * workers + stream
            pairs = [
                (raw.where, (lambda r=raw: r), _example_rng(self.seed, part_epoch, position, slot))
                for slot, raw in enumerate(raws)
            ]
            batch = _decode_batch(pairs, self.config, self.collator, position)
            batch["_bad"] = bad + batch["_bad"]
            yield batch


def _identity(batch: Any) -> Any:
    return batch


def _single_thread_worker(worker_id: int) -> None:
    # Each worker featurises on one thread: M workers × several torch threads would oversubscribe the cores.
    torch.set_num_threads(1)
    # A stop signal is the training process's business (it finishes the step and checkpoints; see
    # hf_ssl_speech/preemption.py): Ctrl-C or a scheduler's signal to the whole process group must not kill the
    # workers first (torch would then fail the step in progress). They end when their loader shuts them down, when
    # their parent dies (torch's watchdog), or at the parent's exit (`_kill_leftover_workers`).
    for stop in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)


@atexit.register
def _kill_leftover_workers() -> None:
    """At exit, multiprocessing ends daemonic children with SIGTERM and then joins them; our workers ignore
    SIGTERM, so a loader left mid-pass (a run stopped before the end of its data) would hang the exit. Registered
    after multiprocessing's own exit hook, so it runs before it (atexit is last in, first out)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------
# The loader


class SpeechDataLoader:
    """A resumable loader over `PlannedBatchDataset` or `StreamingBatchDataset` (see `build_dataloader`).

    Iterating yields the rest of the current epoch (planned sources; then the epoch advances) or batches
    forever (streaming). Batches are dicts from the collator. Bad examples are counted in `counter`.

    Args:
        dataset: the batch dataset.
        counter: the bad-example counter of this process.
        num_workers: DataLoader worker processes (0 = decode in this process).
        pin_memory: pin batch tensors (for CUDA).
        prefetch_factor: batches each worker prepares ahead.
        problems: rows left out while indexing (reason, where, detail); this rank counts its share.
    """

    def __init__(
        self,
        dataset: PlannedBatchDataset | StreamingBatchDataset,
        counter: BadExampleCounter,
        num_workers: int = 2,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        problems: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        self.dataset = dataset
        self.counter = counter
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.streaming = isinstance(dataset, StreamingBatchDataset)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed to the caller
        self._counted_epoch: int | None = None  # epoch whose metadata-filtered rows are already counted
        rank, world_size = dataset.rank, dataset.world_size
        for index, (reason, where, detail) in enumerate(problems):
            if index % world_size == rank:  # each rank counts a disjoint share, so the ranks' sum is the total
                self.counter.add_bad(reason, where, detail, log=False)

    def __len__(self) -> int:
        """Batches per epoch for this process (planned sources only)."""
        if self.streaming:
            raise TypeError("a streaming SpeechDataLoader has no length: it yields batches forever")
        return len(self.dataset.rank_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of `epoch` (not needed in a plain loop: the epoch advances on its own)."""
        self.epoch, self.position = epoch, 0

    def _count_filtered(self) -> None:
        plan = self.dataset.plan(self.epoch)
        rank, world_size = self.dataset.rank, self.dataset.world_size
        for index, (global_row, reason) in enumerate(plan.filtered[rank::world_size]):
            source, row = self.dataset.locate(global_row)
            where = f"{source.name} row {row}"
            if index < self.counter.log_first:  # name the file for the rows that get logged
                try:
                    where = source.raw(row).where
                except AudioError:
                    pass
            self.counter.add_bad(reason, where, f"{float(source.durations[row]):.3f}s (metadata)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.streaming and self.position == 0 and self._counted_epoch != self.epoch:
            self._count_filtered()
            self._counted_epoch = self.epoch
        self.dataset.epoch, self.dataset.start = self.epoch, self.position
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            worker_init_fn=_single_thread_worker if self.num_workers > 0 else None,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,  # the workers must see the new epoch/start each pass
            # Its own generator: starting a pass would otherwise draw the workers' base seed from the global
            # torch RNG and shift the training loop's random stream (dropout, masks) on every epoch or resume.
            generator=torch.Generator().manual_seed(self.epoch),
        )
        for batch in loader:
            position = batch.pop("_position")
            if position != self.position:  # the round robin over workers must reproduce the plan order
                raise RuntimeError(f"data order broken: got batch {position}, expected {self.position}")
            for reason, where, detail in batch.pop("_bad"):
                self.counter.add_bad(reason, where, detail)
            self.counter.add_good(batch.pop("_good"))
            self.counter.check()
            self.position = position + 1
            if batch.pop("_empty", False):
                continue
            yield batch
        self.counter.check(force=True)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The data position of this process (JSON-serialisable); save one per rank with the checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": self.num_workers,
            "seed": self.dataset.seed,
            "streaming": self.streaming,
            "config": asdict(self.dataset.config),
            "counter": self.counter.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next batch is the first one not yet handed out."""
        for key in ("rank", "world_size", "seed", "streaming"):
            mine = getattr(self, key) if key == "streaming" else getattr(self.dataset, key)
            if state[key] != mine:
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r} but this loader has {key}={mine!r}; "
                    f"resume with the same {key} (and the same sources, weights and DataConfig)"
                )
        if self.streaming and state["num_workers"] != self.num_workers:
            raise ValueError(
                f"streaming data state was saved with num_workers={state['num_workers']}, this loader has "
                f"{self.num_workers}: each worker reads its own part of the stream, so resume with the same number"
            )
        if state["config"] != asdict(self.dataset.config):
            logger.warning("DataConfig changed since the data state was saved: the epoch plan will differ")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._counted_epoch = self.epoch if self.position > 0 else None  # the saved counter has them already
        self.counter.load_state_dict(state["counter"])


def _examine_prefix(
    sources: Sequence[IndexedSource], config: DataConfig, counter: BadExampleCounter, limit: int
) -> int:
    """Count into `counter` what the first `limit` rows show without decoding: the duration filters on their
    metadata and a header read of each file (missing, not a file, empty, unreadable). Returns the bad rows."""
    limit = max(limit, 1)
    examined = bad = 0
    for source in sources:
        for row in range(len(source)):
            if examined >= limit:
                return bad
            examined += 1
            where = f"{source.name} row {row}"
            try:
                raw = source.raw(row)
                where = raw.where
                duration = float(source.durations[row])
                if duration < config.min_duration:
                    raise AudioError("too_short", where, f"{duration:.3f}s < data.min_duration={config.min_duration}")
                if config.max_duration is not None and duration > config.max_duration and not config.crop_long:
                    raise AudioError("too_long", where, f"{duration:.3f}s > data.max_duration={config.max_duration}")
                probe_duration(raw.audio, where)
            except AudioError as error:
                counter.add_bad(error.reason, error.where, error.detail, log=False)
                bad += 1
    return bad


def build_dataloader(
    sources: Any,
    weights: Sequence[float] | None = None,
    *,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    feature_extractor: Any = None,
    return_waveforms: bool = False,
    text_to_ids: Callable[[str], Sequence[int]] | None = None,
    return_ids: bool = False,
    pin_memory: bool = False,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    frame_labels_key: str = "frame_labels",
    **config: Any,
) -> SpeechDataLoader:
    """Build the training loader of one process.

    Args:
        sources: one source or a list; each a manifest path, tar pattern, `datasets` object, source object or
            dict spec (see `open_source`; a dict's `weight` key is used when `weights` is None).
        weights: per source, uses per epoch (see `plan_epoch`); default 1.0 each. Streaming sources take none.
        num_workers: dataloader worker processes per process.
        rank, world_size: `accelerator.process_index`, `accelerator.num_processes` (do not `prepare` the loader).
        seed: seed of the epoch plans and crops (the same on every rank).
        feature_extractor, return_waveforms, text_to_ids, return_ids: see `SpeechCollator`.
        pin_memory: pin batches for faster host-to-GPU copies.
        collator: a custom collator instead of `SpeechCollator`.
        frame_labels_key: manifest field of the frame labels (`recipe.data.frame_labels_key`).
        **config: `DataConfig` fields (batch_seconds: padded audio seconds per batch per process,
            min_duration, max_duration, crop_long, max_batch_size, bucket_window, max_bad_fraction, ...).
    Example:
        loader = build_dataloader(["a.jsonl", "b.jsonl"], [1.0, 0.5], batch_seconds=300, num_workers=4,
                                  rank=acc.process_index, world_size=acc.num_processes, seed=1,
                                  feature_extractor=fe)
        for batch in loader: ...          # one epoch; state = loader.state_dict() at any time
        while step < max_steps:           # step-based training: each pass is the next epoch
            for batch in loader: ...
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    data_config = DataConfig(**config)
    specs = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if weights is None:
        weights = [float(spec.get("weight", 1.0)) if isinstance(spec, dict) else 1.0 for spec in specs]
    if len(weights) != len(specs) or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights={list(weights)} must be one finite number >= 0 per source ({len(specs)} sources)")
    opened = [open_source(spec, frame_labels_key) for spec in specs]
    collator = collator or SpeechCollator(
        feature_extractor,
        return_waveforms=return_waveforms,
        text_to_ids=text_to_ids,
        sampling_rate=data_config.sampling_rate,
        return_ids=return_ids,
    )
    counter = BadExampleCounter(data_config.max_bad_fraction, data_config.min_examples_before_check)
    streaming = [source for source in opened if isinstance(source, StreamingDatasetSource)]
    if streaming:
        if len(opened) != 1:
            raise ValueError("a streaming dataset must be the only source of a loader (mixing needs row counts)")
        dataset: PlannedBatchDataset | StreamingBatchDataset = StreamingBatchDataset(
            streaming[0], data_config, collator, rank, world_size, seed
        )
        return SpeechDataLoader(dataset, counter, num_workers, pin_memory)
    problems = [problem for source in opened for problem in source.problems]
    rows = sum(len(source) for source in opened)
    if rows == 0:
        raise ValueError(f"no usable rows in {specs}: {len(problems)} left out, e.g. {problems[:3]}")
    if problems and len(problems) / (rows + len(problems)) > data_config.max_bad_fraction:
        counter = BadExampleCounter(data_config.max_bad_fraction, 0, log_first=0, log_interval=math.inf)
        for problem in problems:  # already logged while indexing
            counter.add_bad(*problem, log=False)
        # Report every kind of bad example, not only the indexing's: look at the first rows as decoding would.
        bad_in_prefix = _examine_prefix(opened, data_config, counter, data_config.min_examples_before_check)
        counter.add_good(rows - bad_in_prefix)
        counter.check(force=True)
    dataset = PlannedBatchDataset(opened, weights, data_config, collator, rank, world_size, seed)
    return SpeechDataLoader(dataset, counter, num_workers, pin_memory, problems=problems)
