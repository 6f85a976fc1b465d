"""Time masks and negative sampling for self-supervised pretraining.

Hub-bound: copied next to the weights by `save_pretrained`; imports only torch (flat siblings otherwise).

Everything here is vectorised over the batch (no Python loop over utterances: NeMo #13619 measured a
250x slow-down from per-utterance loops) and draws its randomness from an explicit `torch.Generator`, so
the same seed gives the same masks (fixed validation masks) and the module holds no hidden RNG state.

Polarity: `lengths` are valid frame counts (LongTensor (batch,)); returned masks are `frame_mask` /
`token_mask` with True = masked. Padding frames (t >= length) are never masked.

Strategies on the feature-frame axis (`mask_time_prob` = p, `mask_time_length` = L):
  - span (wav2vec 2.0, Baevski et al. 2020, §3.1): every frame that can start a whole span inside the
    utterance (t <= length - L) starts one with probability p; spans of L frames, may overlap. At least
    `min_masks` spans per non-empty utterance. Interior coverage 1 - (1 - p)^L (p = 0.065, L = 10: 49%).
  - patch (NeMo SSL): the utterance is cut into consecutive patches of L frames and round(p * patches)
    of them (random rounding, so the expectation is exact) are masked, at least `min_masks`.
  - block (NEST, Huang et al. 2024): every valid frame starts a block with probability p; blocks of L
    frames, overlapping, clipped at the utterance end. p = 0.01, L = 40: coverage 1 - 0.99^40 = 33%.
    At least `min_masks` blocks per non-empty utterance.
"""

from __future__ import annotations

import torch


def _valid_frames(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(batch, max_len) bool, True where t < length."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) samples; drawn on the generator's device then moved (a CPU generator on CUDA data works)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _draw_starts(
    allowed: torch.Tensor, start_prob: float, min_starts: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Bernoulli(start_prob) starts at the allowed positions, topped up to `min_starts` per row.

    One uniform draw u serves both: starts are u < p; a row with fewer than `min_starts` starts takes
    its `min_starts` smallest u instead, which contain its Bernoulli starts plus uniformly chosen others
    (rows with fewer allowed positions than `min_starts` get all of them). top-k, not a full sort.
    """
    u = _uniform(tuple(allowed.shape), generator, allowed.device).masked_fill(~allowed, 2.0)  # (batch, time)
    starts = u < start_prob
    if min_starts <= 0 or u.shape[1] == 0:
        return starts
    k = min(min_starts, u.shape[1])
    kth_smallest = u.topk(k, dim=1, largest=False).values[:, -1:]  # (batch, 1)
    forced = (u <= kth_smallest) & allowed
    needs = starts.sum(dim=1, keepdim=True) < min_starts  # (batch, 1)
    return torch.where(needs, forced, starts)


def _expand_starts(starts: torch.Tensor, span: int) -> torch.Tensor:
    """Frame t is covered when a start lies in [t - span + 1, t]: a running count via cumsum, no loop."""
    count = starts.to(torch.int32).cumsum(dim=1)  # (batch, time)
    shifted = torch.nn.functional.pad(count, (span, 0))[:, : count.shape[1]]  # count[t - span], 0 before start
    return (count - shifted) > 0


def compute_span_mask(
    lengths: torch.Tensor,
    max_len: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """wav2vec 2.0 span mask: (batch, max_len) bool, True = masked.

    Args:
        lengths: valid frames per utterance (from the attention mask), LongTensor (batch,).
        max_len: padded frame count T of the batch.
        mask_prob: per-frame span start probability p (config `mask_time_prob`). Note: fairseq / HF
            wav2vec2 call p * L "mask_prob" (0.65); here p itself is configured (0.065).
        mask_length: span length L in frames (config `mask_time_length`).
        min_masks: minimum spans per non-empty utterance (config `mask_time_min_masks`).
        generator: source of randomness (same seed, same mask).
    """
    valid = _valid_frames(lengths, max_len)  # (batch, time)
    # A span must fit: starts at t <= length - L; an utterance shorter than L may start only at 0
    # (its span is clipped to the utterance).
    last_start = (lengths - mask_length).clamp(min=0)  # (batch,)
    allowed = (torch.arange(max_len, device=lengths.device)[None, :] <= last_start[:, None]) & valid
    starts = _draw_starts(allowed, mask_prob, min_masks, generator)
    return _expand_starts(starts, mask_length) & valid


def compute_block_mask(
    lengths: torch.Tensor,
    max_len: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """NEST block mask: (batch, max_len) bool, True = masked.

    Every valid frame starts a block of `mask_length` frames with probability `mask_prob`; blocks
    overlap and are clipped at the utterance end. Expected coverage of frame t (0-based) is
    1 - (1 - p)^min(t + 1, L), before the `min_masks` top-up. Arguments as in `compute_span_mask`.
    """
    valid = _valid_frames(lengths, max_len)
    starts = _draw_starts(valid, mask_prob, min_masks, generator)
    return _expand_starts(starts, mask_length) & valid


def compute_patch_mask(
    lengths: torch.Tensor,
    max_len: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """NeMo patch mask: (batch, max_len) bool, True = masked.

    Utterance b has ceil(length_b / L) patches (the last may be partial); floor(p * patches + u),
    u ~ U[0, 1), of them are masked, chosen without replacement (at least `min_masks`, at most all).
    Arguments as in `compute_span_mask`; `mask_prob` here is the fraction of patches.
    """
    batch = lengths.shape[0]
    num_slots = -(-max_len // mask_length)  # patches of the longest possible utterance
    num_patches = torch.div(lengths + mask_length - 1, mask_length, rounding_mode="floor")  # (batch,)
    rounding = _uniform((batch,), generator, lengths.device)
    count = torch.floor(num_patches.to(torch.float64) * mask_prob + rounding.to(torch.float64)).long()
    count = torch.minimum(count.clamp(min=min_masks), num_patches)  # (batch,)
    # Choose `count` patches per row without replacement: rank random scores (few patches, cheap sort).
    scores = _uniform((batch, num_slots), generator, lengths.device)
    patch_exists = torch.arange(num_slots, device=lengths.device)[None, :] < num_patches[:, None]
    scores = scores.masked_fill(~patch_exists, 2.0)  # non-existent patches sort last
    order = scores.argsort(dim=1)  # (batch, slots)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_slots, device=lengths.device).expand_as(order))
    patch_mask = rank < count[:, None]  # (batch, slots)
    frame_mask = patch_mask.repeat_interleave(mask_length, dim=1)[:, :max_len]
    return frame_mask & _valid_frames(lengths, max_len)


MASK_FUNCTIONS = {"span": compute_span_mask, "patch": compute_patch_mask, "block": compute_block_mask}


def compute_frame_mask(
    strategy: str,
    lengths: torch.Tensor,
    max_len: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch on `strategy` (config `mask_strategy`: one of `MASK_FUNCTIONS`). Returns (batch, max_len) bool."""
    if strategy not in MASK_FUNCTIONS:
        raise ValueError(f"mask_strategy={strategy!r} is unknown: use one of {sorted(MASK_FUNCTIONS)}.")
    if mask_length < 1:
        raise ValueError(f"mask_time_length={mask_length} must be >= 1 frame.")
    lengths = lengths.long()
    return MASK_FUNCTIONS[strategy](lengths, max_len, mask_prob, mask_length, min_masks, generator)


def frame_to_token_mask(frame_mask: torch.Tensor, lengths: torch.Tensor, factor: int, threshold: float) -> torch.Tensor:
    """Token-level mask (batch, ceil(T / factor)) from a frame mask (batch, T).

    A token stacks `factor` consecutive frames; it counts as masked when at least `threshold` (config
    `mask_token_threshold`) of its *valid* frames are masked (the last token of an utterance may hold
    fewer than `factor` valid frames). Tokens past `ceil(length / factor)` are never masked.
    """
    batch, max_len = frame_mask.shape
    num_tokens = -(-max_len // factor)
    pad = num_tokens * factor - max_len
    valid = _valid_frames(lengths, max_len)
    masked = torch.nn.functional.pad((frame_mask & valid).float(), (0, pad)).view(batch, num_tokens, factor)
    present = torch.nn.functional.pad(valid.float(), (0, pad)).view(batch, num_tokens, factor)
    masked_count = masked.sum(dim=2)  # (batch, tokens)
    present_count = present.sum(dim=2)
    # Compare counts rather than a fraction: masked >= threshold * present (present > 0 for real tokens).
    return (masked_count >= threshold * present_count - 1e-6) & (present_count > 0)


def apply_frame_mask(
    features: torch.Tensor,
    frame_mask: torch.Tensor,
    mask_fill: str,
    masked_embed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_std: float = 0.1,
) -> torch.Tensor:
    """Replace masked frames of `features` (batch, T, n_mels) and return a new tensor.

    Args:
        features: log-mel features from the feature extractor (model input).
        frame_mask: (batch, T) bool, True = replace.
        mask_fill: config `mask_fill`: "learned" and "frozen" use `masked_embed` (the model's `masked_spec_embed`,
            shape (n_mels,); "frozen" keeps it fixed, as NeMo's NEST does); "noise" draws fresh N(0, noise_std^2)
            values per frame (BEST-RQ: 0.1).
        masked_embed: the vector for "learned" / "frozen"; gradients flow into it unless it is frozen.
        generator: randomness for "noise".
    """
    if mask_fill in ("learned", "frozen"):
        if masked_embed is None:
            raise ValueError(f"mask_fill={mask_fill!r} needs masked_embed (the model's masked_spec_embed).")
        fill = masked_embed.to(features.dtype).expand_as(features)
    elif mask_fill == "noise":
        gen_device = generator.device if generator is not None else features.device
        noise = torch.randn(features.shape, generator=generator, device=gen_device, dtype=torch.float32)
        fill = (noise * noise_std).to(device=features.device, dtype=features.dtype)
    else:
        raise ValueError(f"mask_fill={mask_fill!r} is unknown: use 'learned', 'frozen' or 'noise'.")
    return torch.where(frame_mask[..., None], fill, features)


def sample_negatives(
    pool_mask: torch.Tensor, num_negatives: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distractor positions for contrastive / CPC losses, from the same utterance only.

    For every position (b, t) in the pool (masked tokens for contrastive, valid tokens for CPC),
    `num_negatives` indices are drawn uniformly *with replacement* from the OTHER pool positions of
    utterance b (never t itself, never padding, never another utterance). Utterances may have unequal
    pool sizes and fewer pool positions than `num_negatives` (NeMo #4856 / #4587 / #7078 crashed there):
    duplicates are then allowed, and a pool of a single position has no negatives at all.

    Args:
        pool_mask: (batch, T') bool, True = position can be a target and a distractor.
        num_negatives: K (config `num_negatives` / `cpc_num_negatives`).
        generator: source of randomness.

    Returns:
        negative_indices: (batch, T', K) long, time indices into the same utterance (0 where invalid).
        negative_valid: (batch, T', K) bool (an expanded view), True where the index is a real distractor:
            position (b, t) is in the pool and utterance b has >= 2 pool positions.
    """
    batch, num_tokens = pool_mask.shape
    device = pool_mask.device
    pool_size = pool_mask.sum(dim=1)  # (batch,)
    rank = pool_mask.long().cumsum(dim=1) - 1  # (batch, T') rank of each pool position within its row
    # pool_positions[b, r] = time index of the r-th pool position of row b (scatter, no sort).
    slot = torch.where(pool_mask, rank, torch.full_like(rank, num_tokens))  # non-pool -> dump column
    pool_positions = torch.zeros(batch, num_tokens + 1, dtype=torch.long, device=device)
    pool_positions.scatter_(1, slot, torch.arange(num_tokens, device=device).expand(batch, -1))
    # Only rows that have distractors are drawn (masked tokens are a fraction of all tokens).
    drawn = pool_mask & (pool_size >= 2)[:, None]  # (batch, T')
    batch_index, time_index = drawn.nonzero(as_tuple=True)  # N rows
    others = pool_size[batch_index] - 1  # (N,) >= 1
    # j uniform over the other (pool_size - 1) positions, then skip the own rank: j' = j + (j >= rank).
    u = _uniform((batch_index.shape[0], num_negatives), generator, device)
    j = (u * others[:, None]).long()  # truncation = floor for u >= 0
    j = torch.minimum(j, others[:, None] - 1)  # guard u * n rounding up to n in float32
    j = j + (j >= rank[batch_index, time_index][:, None]).long()
    negative_indices = torch.zeros(batch, num_tokens, num_negatives, dtype=torch.long, device=device)
    negative_indices[batch_index, time_index] = pool_positions[batch_index[:, None], j]  # (N, K)
    negative_valid = drawn[:, :, None].expand(-1, -1, num_negatives)
    return negative_indices, negative_valid


# ----------------------------------------------------------------------------------------------- MAE-style student
# data2vec 2.0 (Baevski et al. 2022, §3): the student encoder sees only the unmasked time steps (as in MAE, He et
# al. 2022), a light decoder gets the full-length sequence back. These three functions move encoder steps between
# the full (batch, T', D) layout and a compacted one (batch, K, D), K = the most kept steps of any row.


def keep_at_least_one_step(token_mask: torch.Tensor, step_lengths: torch.Tensor) -> torch.Tensor:
    """`token_mask` (batch, T') with the first step of every fully masked, non-empty utterance unmasked again, so
    the compacted student batch has no empty row (an empty row would attend to nothing). Returns a new tensor."""
    num_steps = token_mask.shape[1]
    valid = torch.arange(num_steps, device=token_mask.device)[None, :] < step_lengths[:, None]  # (batch, T')
    all_masked = ((valid & ~token_mask).sum(dim=1) == 0) & (step_lengths > 0)  # (batch,)
    first = torch.zeros_like(token_mask)
    first[:, 0] = True
    return token_mask & ~(first & all_masked[:, None])


def gather_kept_steps(hidden: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact every row to its kept steps, in their original order, left-aligned.

    Args:
        hidden: (batch, T', D).
        keep: (batch, T') bool, True = the step is kept (unmasked and valid).

    Returns:
        compact: (batch, K, D), K = max kept steps of a row; row b holds its kept steps at 0..lengths[b]-1, then
            the dropped steps that follow in order (padding: never attended to, zeroed before convolutions).
        lengths: (batch,) long, kept steps per row (the compacted batch's valid lengths).
    """
    lengths = keep.sum(dim=1)  # (batch,)
    # A stable sort of "dropped" (0 = kept first) lists each row's kept steps, then its dropped ones, both in order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # (batch, T')
    num_kept = int(lengths.max()) if lengths.numel() else 0
    order = order[:, :num_kept]  # (batch, K)
    compact = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))  # (batch, K, D)
    return compact, lengths


def scatter_kept_steps(compact: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `gather_kept_steps`: (batch, K, D) -> (batch, T', D), kept steps back in place.

    Args:
        compact: (batch, K, D) from `gather_kept_steps` (or an encoder that read it).
        keep: (batch, T') bool, the same mask.
        fill: (D,) what the dropped steps hold (data2vec 2.0's mask token for the decoder), or None for zeros.
    """
    batch, num_steps = keep.shape
    lengths = keep.sum(dim=1)
    compact_valid = torch.arange(compact.shape[1], device=keep.device)[None, :] < lengths[:, None]  # (batch, K)
    full = compact.new_zeros(batch, num_steps, compact.shape[-1])
    # Row-major order on both sides: the r-th kept step of row b is compact[b, r].
    full = full.index_put((*keep.nonzero(as_tuple=True),), compact[compact_valid])
    if fill is not None:
        full = torch.where(keep[..., None], full, fill.to(full.dtype))
    return full


__all__ = [
    "MASK_FUNCTIONS",
    "apply_frame_mask",
    "compute_block_mask",
    "compute_frame_mask",
    "compute_patch_mask",
    "compute_span_mask",
    "frame_to_token_mask",
    "gather_kept_steps",
    "keep_at_least_one_step",
    "sample_negatives",
    "scatter_kept_steps",
]
