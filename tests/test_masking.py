"""Property tests of the time masks, the token-level reduction, mask filling and negative sampling."""

from __future__ import annotations

import math

import pytest
import torch

from hf_ssl_speech.masking import (
    apply_frame_mask,
    compute_frame_mask,
    frame_to_token_mask,
    sample_negatives,
)

STRATEGIES = ("span", "patch", "block")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, current = [], 0
    for value in row.tolist():
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masks_stay_inside_utterances_and_short_ones_never_crash(strategy):
    lengths = torch.tensor([0, 1, 2, 39, 40, 41, 300, 123])
    max_len = 300
    for prob in (0.0, 0.01, 0.5, 1.0):
        mask = compute_frame_mask(strategy, lengths, max_len, prob, 40, min_masks=2, generator=_gen(1))
        assert mask.shape == (8, max_len) and mask.dtype == torch.bool
        padding = torch.arange(max_len)[None, :] >= lengths[:, None]
        assert not (mask & padding).any(), "a padding frame was masked"
        assert not mask[0].any()  # empty utterance
        # min_masks >= 1: every non-empty utterance has something masked, even 1-frame ones.
        assert mask[1:].any(dim=1).all()
    # A batch of only a 1-frame utterance, and max_len smaller than the mask length.
    one = compute_frame_mask(strategy, torch.tensor([1]), 1, 0.5, 40, min_masks=1, generator=_gen(2))
    assert one.tolist() == [[True]]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_mask_and_different_seed_differs(strategy):
    lengths = torch.tensor([2000, 1500, 700])
    prob = 0.5 if strategy == "patch" else 0.05
    a = compute_frame_mask(strategy, lengths, 2000, prob, 20, 1, _gen(7))
    b = compute_frame_mask(strategy, lengths, 2000, prob, 20, 1, _gen(7))
    c = compute_frame_mask(strategy, lengths, 2000, prob, 20, 1, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_block_coverage_matches_analytic_expectation():
    # NEST: p = 0.01, L = 40. Frame t is covered unless none of its min(t + 1, L) possible starts fired.
    p, span, max_len, batch = 0.01, 40, 2000, 256
    lengths = torch.full((batch,), max_len)
    mask = compute_frame_mask("block", lengths, max_len, p, span, min_masks=0, generator=_gen(3))
    t = torch.arange(max_len, dtype=torch.float64)
    expected = (1 - (1 - p) ** torch.clamp(t + 1, max=span)).mean().item()
    assert abs(expected - (1 - 0.99**40)) < 0.01  # ~33% as NEST states, minus a small edge effect
    # Blocks per utterance ~ Binomial(2000, 0.01) (about 20 +- 4.5), each covering up to 40 frames, so the
    # per-utterance coverage has std < 0.1 and the mean over 256 utterances std < 0.0063: tolerance 0.025 (4 sigma).
    assert abs(mask.float().mean().item() - expected) < 0.025


def test_span_coverage_matches_analytic_expectation_and_spans_fit():
    # wav2vec 2.0: p = 0.065, L = 10 -> interior coverage 1 - 0.935^10 = 49%.
    p, span, max_len, batch = 0.065, 10, 1000, 256
    lengths = torch.full((batch,), max_len)
    mask = compute_frame_mask("span", lengths, max_len, p, span, min_masks=0, generator=_gen(4))
    # Starts are allowed at s <= max_len - L; frame t is covered by starts in [max(0, t - L + 1), min(t, max_len - L)].
    t = torch.arange(max_len)
    possible = (torch.clamp(t, max=max_len - span) - torch.clamp(t - span + 1, min=0) + 1).to(torch.float64)
    expected = (1 - (1 - p) ** possible).mean().item()
    assert abs(mask.float().mean().item() - expected) < 0.02  # std of the mean < 0.005
    # Every masked run is made of whole spans, so it is at least L frames long.
    for row in mask[:16]:
        assert all(run >= span for run in _runs(row))


def test_span_shorter_than_length_masks_whole_utterance_once():
    lengths = torch.tensor([5, 3])
    mask = compute_frame_mask("span", lengths, 5, 0.0, 10, min_masks=1, generator=_gen(0))
    assert mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]


def test_patch_masks_a_fraction_of_whole_patches():
    p, span, max_len, batch = 0.5, 48, 48 * 25, 200
    lengths = torch.randint(1, max_len + 1, (batch,), generator=_gen(5))
    lengths[:100] = max_len
    mask = compute_frame_mask("patch", lengths, max_len, p, span, min_masks=0, generator=_gen(6))
    for b in range(batch):
        n = lengths[b].item()
        patches = mask[b, : math.ceil(n / span) * span].view(-1, span)
        # each patch is masked entirely (within the valid frames) or not at all
        covered = patches.any(dim=1)
        num_patches = math.ceil(n / span)
        assert math.floor(p * num_patches) <= covered.sum().item() <= math.ceil(p * num_patches)
        for i in torch.nonzero(covered).flatten().tolist():
            assert mask[b, i * span : min((i + 1) * span, n)].all()
    # random rounding keeps the expectation exact: 25 patches, p = 0.5 -> mean 12.5 patches (std 0.5 / sqrt(100))
    full = mask[:100].float().mean().item()
    assert abs(full - p) < 0.02


def test_min_masks_with_zero_probability():
    lengths = torch.tensor([500, 200, 60])
    for strategy in STRATEGIES:
        mask = compute_frame_mask(strategy, lengths, 500, 0.0, 10, min_masks=3, generator=_gen(9))
        counts = mask.sum(dim=1)
        # 3 distinct starts (or patches): at least 10 frames (overlap possible), at most 30
        assert ((counts >= 10) & (counts <= 30)).all(), (strategy, counts)
        if strategy == "patch":
            assert (counts == 30).all()


def test_unknown_strategy_names_the_field():
    with pytest.raises(ValueError, match="mask_strategy"):
        compute_frame_mask("random", torch.tensor([10]), 10, 0.1, 2)


def test_frame_to_token_mask_matches_a_direct_count():
    g = _gen(10)
    lengths = torch.tensor([37, 40, 1, 0, 23])
    frame_mask = torch.rand(5, 40, generator=g) < 0.6
    for factor in (2, 4, 8):
        for threshold in (0.25, 0.8, 1.0):
            tokens = frame_to_token_mask(frame_mask, lengths, factor, threshold)
            assert tokens.shape == (5, math.ceil(40 / factor))
            for b in range(5):
                n = lengths[b].item()
                for j in range(tokens.shape[1]):
                    frames = frame_mask[b, j * factor : min((j + 1) * factor, n)]
                    want = len(frames) > 0 and frames.sum().item() >= threshold * len(frames) - 1e-6
                    assert tokens[b, j].item() == want, (factor, threshold, b, j)


def test_apply_frame_mask_learned_and_noise():
    g = _gen(11)
    features = torch.randn(2, 30, 8, generator=g, requires_grad=True)
    frame_mask = torch.zeros(2, 30, dtype=torch.bool)
    frame_mask[0, 3:13] = True
    frame_mask[1, 20:] = True
    embed = torch.nn.Parameter(torch.arange(8, dtype=torch.float32))
    out = apply_frame_mask(features, frame_mask, "learned", embed)
    assert torch.equal(out[frame_mask], embed.detach().expand(20, 8))
    assert torch.equal(out[~frame_mask], features.detach()[~frame_mask])
    out.sum().backward()
    assert embed.grad is not None and torch.equal(embed.grad, torch.full((8,), 20.0))
    assert features.grad[~frame_mask].eq(1).all() and features.grad[frame_mask].eq(0).all()

    big = torch.zeros(4, 1000, 80)
    big_mask = torch.zeros(4, 1000, dtype=torch.bool)
    big_mask[:, :500] = True
    noisy = apply_frame_mask(big, big_mask, "noise", generator=_gen(12))
    assert abs(noisy[big_mask].std().item() - 0.1) < 0.005  # 160k samples of N(0, 0.01)
    assert noisy[~big_mask].eq(0).all()
    assert torch.equal(noisy, apply_frame_mask(big, big_mask, "noise", generator=_gen(12)))
    with pytest.raises(ValueError, match="masked_embed"):
        apply_frame_mask(big, big_mask, "learned", None)


def _random_pool(batch: int, steps: int, sizes: list[int], g: torch.Generator) -> torch.Tensor:
    pool = torch.zeros(batch, steps, dtype=torch.bool)
    for b, size in enumerate(sizes):
        pool[b, torch.randperm(steps, generator=g)[:size]] = True
    return pool


def test_negatives_come_from_other_pool_positions_of_the_same_utterance():
    g = _gen(13)
    # unequal masked counts, fewer masked than K, a single masked token, none at all
    sizes = [50, 7, 2, 1, 0, 60]
    pool = _random_pool(6, 60, sizes, g)
    k = 20
    index, valid = sample_negatives(pool, k, generator=g)
    assert index.shape == valid.shape == (6, 60, k)
    for b, size in enumerate(sizes):
        for t in range(60):
            if not pool[b, t] or size < 2:
                assert not valid[b, t].any()
                continue
            assert valid[b, t].all()
            drawn = index[b, t]
            assert (drawn != t).all(), "a negative is the positive's own step"
            assert pool[b, drawn].all(), "a negative is not a masked step of this utterance"


def test_negatives_are_uniform_over_the_other_positions():
    g = _gen(14)
    pool = torch.zeros(1, 30, dtype=torch.bool)
    pool[0, ::3] = True  # 10 positions
    index, valid = sample_negatives(pool, 2000, generator=g)
    drawn = index[0, 0]  # the negatives of position 0: uniform over the 9 others
    counts = torch.bincount(drawn, minlength=30)[pool[0]]
    assert counts[0] == 0
    expected = 2000 / 9
    # chi-square with 8 degrees of freedom: 26.1 is the 0.999 quantile
    chi2 = ((counts[1:].float() - expected) ** 2 / expected).sum().item()
    assert chi2 < 26.1, counts


def test_negatives_same_seed_same_draw():
    pool = _random_pool(3, 40, [10, 20, 5], _gen(15))
    a = sample_negatives(pool, 8, _gen(16))
    b = sample_negatives(pool, 8, _gen(16))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = sample_negatives(pool, 8, _gen(17))
    assert not torch.equal(a[0], c[0])
