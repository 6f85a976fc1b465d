"""Tests of the SSL losses against direct per-target computations, padding invariance and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_ssl_speech.losses import (
    apc_loss,
    contrastive_loss,
    cpc_loss,
    diversity_loss,
    masked_prediction_loss,
    reconstruction_loss,
)
from hf_ssl_speech.masking import sample_negatives


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _contrastive_reference(pred, targ, token_mask, neg_index, neg_valid, temperature, ids=None):
    """One masked token at a time, with Python lists of candidates; equality by vectors or by code ids."""
    total, count, correct = 0.0, 0, 0
    for b in range(pred.shape[0]):
        for t in range(pred.shape[1]):
            if not token_mask[b, t]:
                continue
            negs = [int(n) for n, ok in zip(neg_index[b, t], neg_valid[b, t]) if ok]
            if not negs:
                continue
            pos = targ[b, t]
            scores = [F.cosine_similarity(pred[b, t], pos, dim=0) / temperature]
            for n in negs:
                same = torch.equal(targ[b, n], pos) if ids is None else torch.equal(ids[b, n], ids[b, t])
                if same:
                    continue  # a negative equal to the positive is excluded (-inf)
                scores.append(F.cosine_similarity(pred[b, t], targ[b, n], dim=0) / temperature)
            scores = torch.stack(scores)
            total += (torch.logsumexp(scores, 0) - scores[0]).item()
            count += 1
            correct += int(len(scores) == 1 or scores[0] > scores[1:].max())
    return total, count, correct


def _setup(batch=3, steps=20, dim=6, sizes=(12, 4, 1), k=5, seed=0):
    g = _gen(seed)
    pred = torch.randn(batch, steps, dim, generator=g)
    targ = torch.randn(batch, steps, dim, generator=g)
    lengths = torch.tensor([steps, 9, 5][:batch])
    token_mask = torch.zeros(batch, steps, dtype=torch.bool)
    for b, size in enumerate(sizes):
        token_mask[b, torch.randperm(int(lengths[b]), generator=g)[:size]] = True
    neg_index, neg_valid = sample_negatives(token_mask, k, generator=g)
    return pred, targ, lengths, token_mask, neg_index, neg_valid


def test_contrastive_matches_reference_and_skips_rows_without_negatives():
    pred, targ, _, token_mask, neg_index, neg_valid = _setup()
    # make one negative identical to its positive: wav2vec2 gives it -inf
    t = torch.nonzero(token_mask[0])[0, 0].item()
    targ[0, neg_index[0, t, 0]] = targ[0, t]
    out = contrastive_loss(pred, targ, token_mask, neg_index, neg_valid, temperature=0.1)
    ref_total, ref_count, ref_correct = _contrastive_reference(pred, targ, token_mask, neg_index, neg_valid, 0.1)
    assert ref_count == 12 + 4  # the utterance with one masked token has no negatives
    assert out.count.item() == ref_count
    assert math.isclose(out.loss_sum.item(), ref_total, rel_tol=1e-5)
    assert out.metrics["correct"].item() == ref_correct
    assert out.loss_sum.dtype == torch.float32


def test_contrastive_with_target_ids_excludes_equal_codes():
    pred, targ, _, token_mask, neg_index, neg_valid = _setup(seed=1)
    ids = torch.arange(3 * 20).view(3, 20, 1).repeat(1, 1, 2)  # all distinct ...
    t = torch.nonzero(token_mask[0])[0, 0].item()
    ids[0, neg_index[0, t]] = ids[0, t].clone()  # ... except every negative of one row equals its positive
    with_ids = contrastive_loss(pred, targ, token_mask, neg_index, neg_valid, 0.1, target_ids=ids)
    plain = contrastive_loss(pred, targ, token_mask, neg_index, neg_valid, 0.1)
    ref_total, ref_count, ref_correct = _contrastive_reference(pred, targ, token_mask, neg_index, neg_valid, 0.1, ids)
    assert with_ids.count.item() == ref_count == plain.count.item()  # that row is still counted (loss 0)
    assert math.isclose(with_ids.loss_sum.item(), ref_total, rel_tol=1e-5)
    assert with_ids.loss_sum.item() < plain.loss_sum.item()  # fewer competing negatives, smaller loss
    assert with_ids.metrics["correct"].item() == ref_correct


def test_contrastive_padding_invariance_and_fp32_under_autocast():
    pred, targ, lengths, token_mask, neg_index, neg_valid = _setup(seed=2)
    batched = contrastive_loss(pred, targ, token_mask, neg_index, neg_valid, 0.1)
    total, count = 0.0, 0.0
    for b in range(3):
        n = int(lengths[b])
        # each utterance alone, cut to its own length, with its own fixed mask and negatives
        part = contrastive_loss(
            pred[b : b + 1, :n],
            targ[b : b + 1, :n],
            token_mask[b : b + 1, :n],
            neg_index[b : b + 1, :n],
            neg_valid[b : b + 1, :n],
            0.1,
        )
        total += part.loss_sum.item()
        count += part.count.item()
    assert math.isclose(batched.loss_sum.item(), total, rel_tol=1e-5) and batched.count.item() == count
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = contrastive_loss(pred.bfloat16(), targ.bfloat16(), token_mask, neg_index, neg_valid, 0.1)
    assert auto.loss_sum.dtype == torch.float32 and torch.isfinite(auto.loss_sum)


def test_contrastive_gradients_are_finite_with_all_invalid_rows():
    pred, targ, _, token_mask, neg_index, neg_valid = _setup(sizes=(1, 1, 1), seed=3)
    pred.requires_grad_(True)
    out = contrastive_loss(pred, targ, token_mask, neg_index, neg_valid, 0.1)
    assert out.count.item() == 0 and out.loss_sum.item() == 0
    out.loss_sum.backward()
    assert torch.isfinite(pred.grad).all()


def test_diversity_loss_bounds():
    uniform = torch.full((2, 5), 0.2)
    out = diversity_loss(uniform, 10)
    assert abs(out.loss_sum.item()) < 1e-5 and out.count.item() == 10
    one_hot = F.one_hot(torch.tensor([1, 3]), 5).float()
    out = diversity_loss(one_hot, 4)
    assert math.isclose(out.loss_sum.item() / 4, (10 - 2) / 10, rel_tol=1e-5)


def test_masked_prediction_matches_cross_entropy_and_averages_codebooks():
    g = _gen(4)
    logits = torch.randn(7, 3, 11, generator=g)
    labels = torch.randint(0, 11, (7, 3), generator=g)
    out = masked_prediction_loss(logits, labels)
    per_book = [F.cross_entropy(logits[:, c], labels[:, c]) for c in range(3)]
    assert math.isclose(out.loss_sum.item() / out.count.item(), torch.stack(per_book).mean().item(), rel_tol=1e-5)
    assert out.count.item() == 21
    assert out.metrics["correct"].item() == (logits.argmax(-1) == labels).sum().item()
    # HuBERT labels with -100 holes
    labels[2, 1] = -100
    labels[5] = -100
    out = masked_prediction_loss(logits, labels)
    keep = labels != -100
    want = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert math.isclose(out.loss_sum.item(), want.item(), rel_tol=1e-5) and out.count.item() == keep.sum().item()


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_reconstruction_is_a_per_element_mean(kind):
    g = _gen(5)
    pred, targ = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    out = reconstruction_loss(pred, targ, kind)
    want = F.l1_loss(pred, targ) if kind == "l1" else F.mse_loss(pred, targ)
    assert out.count.item() == 60
    assert math.isclose(out.loss_sum.item() / out.count.item(), want.item(), rel_tol=1e-5)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        reconstruction_loss(pred, targ, "huber")


def test_apc_pairs_and_padding_invariance():
    g = _gen(6)
    pred, targ = torch.randn(3, 12, 4, generator=g), torch.randn(3, 12, 4, generator=g)
    lengths = torch.tensor([12, 5, 2])
    shift = 3
    out = apc_loss(pred, targ, lengths, shift)
    total, pairs = 0.0, 0
    for b in range(3):
        for t in range(int(lengths[b]) - shift):
            total += (pred[b, t] - targ[b, t + shift]).abs().sum().item()
            pairs += 1
    assert pairs == 9 + 2 + 0
    assert math.isclose(out.loss_sum.item(), total, rel_tol=1e-5) and out.count.item() == pairs * 4
    # garbage in the padding does not change anything
    pred2, targ2 = pred.clone(), targ.clone()
    pred2[1, 5:] = 1e6
    targ2[1, 5:] = -1e6
    assert math.isclose(apc_loss(pred2, targ2, lengths, shift).loss_sum.item(), total, rel_tol=1e-5)
    short = apc_loss(pred[:, :2], targ[:, :2], torch.tensor([2, 2, 2]), shift)
    assert short.count.item() == 0 and short.loss_sum.item() == 0


def test_cpc_matches_reference_and_padding_invariance():
    g = _gen(7)
    steps_ahead, batch, steps, dim, k = 3, 3, 10, 4, 4
    preds = torch.randn(steps_ahead, batch, steps, dim, generator=g)
    z = torch.randn(batch, steps, dim, generator=g)
    lengths = torch.tensor([10, 6, 1])
    valid = torch.arange(steps)[None, :] < lengths[:, None]
    neg_index, neg_valid = sample_negatives(valid, k, generator=g)
    out = cpc_loss(preds, z, lengths, neg_index, neg_valid)
    total, count, correct = 0.0, 0, 0
    for s in range(1, steps_ahead + 1):
        for b in range(batch):
            for t in range(int(lengths[b]) - s):
                target = t + s
                scores = [preds[s - 1, b, t] @ z[b, target]]
                for n, ok in zip(neg_index[b, target], neg_valid[b, target]):
                    assert ok and int(n) != target and int(n) < lengths[b]
                    scores.append(preds[s - 1, b, t] @ z[b, int(n)])
                scores = torch.stack(scores)
                total += (torch.logsumexp(scores, 0) - scores[0]).item()
                count += 1
                correct += int(scores[0] > scores[1:].max())
    assert count == (9 + 8 + 7) + (5 + 4 + 3)
    assert out.count.item() == count and math.isclose(out.loss_sum.item(), total, rel_tol=1e-5)
    assert out.metrics["correct"].item() == correct
    # per utterance, cut to its length, same sums
    parts = [
        cpc_loss(
            preds[:, b : b + 1, : int(n)],
            z[b : b + 1, : int(n)],
            lengths[b : b + 1],
            neg_index[b : b + 1, : int(n)],
            neg_valid[b : b + 1, : int(n)],
        )
        for b, n in enumerate(lengths)
    ]
    assert math.isclose(sum(p.loss_sum.item() for p in parts), total, rel_tol=1e-5)
    assert sum(p.count.item() for p in parts) == count
