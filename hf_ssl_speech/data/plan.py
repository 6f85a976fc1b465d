"""The epoch plan: a pure function of (durations, weights, seed, epoch) -> batches for every process."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import DataConfig

# ---------------------------------------------------------------------------------------------------------
# Epoch plan


@dataclass
class EpochPlan:
    """The batches of one epoch for all processes, as global row ids (`source_offsets[s] + row`).

    `filtered` lists `(global row id, reason)` of rows left out by their metadata duration.
    """

    batches: list[np.ndarray]
    filtered: list[tuple[int, str]] = field(default_factory=list)

    def for_rank(self, rank: int, world_size: int) -> list[np.ndarray]:
        return self.batches[rank::world_size]


def pack_sorted(durations: np.ndarray, order: np.ndarray, batch_seconds: float, max_batch_size: int | None) -> list:
    """Greedily cut `order` (row ids sorted by ascending duration) into batches whose padded length
    (rows × longest) stays within `batch_seconds`; a row longer than the budget gets a batch of its own."""
    batches, start = [], 0
    limit = max_batch_size or len(order) + 1
    for end in range(1, len(order) + 1):
        longest = durations[order[end - 1]]  # ascending, so the newest row is the longest
        if end - start > 1 and ((end - start) * longest > batch_seconds or end - start > limit):
            batches.append(order[start : end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


def plan_epoch(
    durations: np.ndarray,
    source_offsets: Sequence[int],
    weights: Sequence[float],
    config: DataConfig,
    seed: int,
    epoch: int,
    world_size: int,
) -> EpochPlan:
    """Plan one epoch (see the module docstring). Pure: the same arguments give the same plan everywhere.

    Args:
        durations: float32 `(rows,)` estimated duration of every row of every source, concatenated.
        source_offsets: first global row id of each source, plus the total at the end.
        weights: per source, how many times each of its rows is used per epoch: 1.0 = once, 2.0 = twice,
            0.5 = a random half (a new half every epoch). Sources mix uniformly through the epoch.
        config: duration limits and batching.
        seed, epoch: the randomness of this epoch.
        world_size: processes; the number of batches is made a multiple of it by splitting the largest.
    """
    rng = np.random.default_rng([seed, epoch])
    effective = durations.astype(np.float64)
    if config.max_duration is not None and config.crop_long:
        effective = np.minimum(effective, config.max_duration)
    too_short = durations < config.min_duration
    too_long = (
        durations > config.max_duration
        if config.max_duration is not None and not config.crop_long
        else np.zeros_like(too_short)
    )
    filtered = [(int(g), "too_short") for g in np.flatnonzero(too_short)]
    filtered += [(int(g), "too_long") for g in np.flatnonzero(too_long & ~too_short)]
    keep = ~(too_short | too_long)
    chosen = []
    for source, weight in enumerate(weights):
        rows = np.arange(source_offsets[source], source_offsets[source + 1])
        rows = rows[keep[rows]]
        whole, fraction = int(math.floor(weight)), weight - math.floor(weight)
        chosen.extend([rows] * whole)
        if fraction > 0:
            chosen.append(rng.choice(rows, size=int(round(fraction * len(rows))), replace=False))
    items = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    if config.shuffle:
        items = rng.permutation(items)
    batches: list[np.ndarray] = []
    for start in range(0, len(items), config.bucket_window):
        window = items[start : start + config.bucket_window]
        window = window[np.argsort(effective[window], kind="stable")]
        batches.extend(pack_sorted(effective, window, config.batch_seconds, config.max_batch_size))
    if config.shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    while len(batches) % world_size:
        # Split the largest batch so every process gets the same number of batches (no DDP straggler).
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            raise ValueError(
                f"cannot give {world_size} processes the same number of batches: only {len(batches)} batches of "
                f"one clip each. Use more data, fewer processes, or a larger batch_seconds."
            )
        half = len(batches[largest]) // 2
        batches[largest : largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return EpochPlan(batches=batches, filtered=filtered)
