"""Tests of frame stacking and the two quantizers."""

from __future__ import annotations

import math

import torch

from hf_ssl_speech.targets import (
    GumbelVectorQuantizer,
    RandomProjectionQuantizer,
    normalize_per_utterance,
    stack_frames,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_stack_frames_groups_consecutive_frames_and_zeroes_padding():
    g = _gen(0)
    features = torch.randn(3, 21, 5, generator=g)
    lengths = torch.tensor([21, 9, 1])
    for factor in (2, 4, 8):
        stacked, token_lengths = stack_frames(features, lengths, factor)
        num_tokens = math.ceil(21 / factor)
        assert stacked.shape == (3, num_tokens, factor * 5)
        assert token_lengths.tolist() == [math.ceil(n / factor) for n in lengths.tolist()]
        for b in range(3):
            for j in range(num_tokens):
                for i in range(factor):
                    frame = j * factor + i
                    want = features[b, frame] if frame < lengths[b] else torch.zeros(5)
                    assert torch.equal(stacked[b, j, i * 5 : (i + 1) * 5], want)


def test_normalize_per_utterance_ignores_padding():
    g = _gen(1)
    x = torch.randn(2, 12, 4, generator=g) * 3 + 5
    lengths = torch.tensor([12, 7])
    out = normalize_per_utterance(x, lengths)
    # the second utterance alone gives the same values on its valid steps
    alone = normalize_per_utterance(x[1:, :7], torch.tensor([7]))
    assert torch.allclose(out[1, :7], alone[0], atol=1e-5)
    assert out[1, 7:].eq(0).all()
    assert torch.allclose(out[0].mean(dim=0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(out[0].var(dim=0, unbiased=False), torch.ones(4), atol=1e-3)


def _brute_force_nearest(x: torch.Tensor, lengths: torch.Tensor, rpq: RandomProjectionQuantizer) -> torch.Tensor:
    """Nearest unit code by explicit L2 distance in float64, one vector and one code at a time in numpy-ish loops."""
    x = normalize_per_utterance(x, lengths).double()
    batch, steps, _ = x.shape
    out = torch.zeros(batch, steps, rpq.num_codebooks, dtype=torch.long)
    for c in range(rpq.num_codebooks):
        proj = x @ rpq.projection[c].double()
        proj = proj / proj.norm(dim=-1, keepdim=True)
        for b in range(batch):
            for t in range(steps):
                dists = ((rpq.codebooks[c].double() - proj[b, t]) ** 2).sum(dim=-1)
                out[b, t, c] = dists.argmin()
    return out


def test_random_projection_nearest_code_equals_brute_force_l2():
    torch.manual_seed(0)
    rpq = RandomProjectionQuantizer(input_dim=24, codebook_dim=4, codebook_size=64, num_codebooks=2, seed=2)
    x = torch.randn(2, 9, 24, generator=_gen(3))
    lengths = torch.tensor([9, 6])
    out = rpq(x, lengths)
    assert out.code_ids.shape == (2, 9, 2) and out.code_ids.dtype == torch.long
    want = _brute_force_nearest(x, lengths, rpq)
    valid = torch.arange(9)[None, :] < lengths[:, None]
    assert torch.equal(out.code_ids[valid], want[valid])
    # chunking the matmul does not change the ids
    assert torch.equal(rpq(x, lengths, chunk=4).code_ids, out.code_ids)
    # usage statistics are over the valid steps: 15 steps x 2 books can use at most 30 of 128 codes
    assert 0 < out.codes_used.item() <= 15 / 64
    assert 1.0 <= out.perplexity.item() <= 2 * 15


def test_random_projection_buffers_are_persistent_float32_and_never_trained():
    rpq = RandomProjectionQuantizer(input_dim=16, codebook_dim=8, codebook_size=32, seed=4)
    assert rpq.projection.dtype == torch.float32 and rpq.codebooks.dtype == torch.float32
    assert torch.allclose(rpq.codebooks.norm(dim=-1), torch.ones(1, 32))
    state = rpq.state_dict()
    assert set(state) == {"projection", "codebooks"}
    assert list(rpq.parameters()) == []

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 32)
            self.quantizer = rpq

    model = Tiny()
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(2, 10, 16, generator=_gen(5))
    lengths = torch.tensor([10, 8])
    for _ in range(3):
        ids = model.quantizer(x, lengths).code_ids[..., 0]
        loss = torch.nn.functional.cross_entropy(model.head(x).transpose(1, 2), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, value in model.quantizer.state_dict().items():
        assert torch.equal(value, before[name]) and value.dtype == torch.float32

    reloaded = RandomProjectionQuantizer(input_dim=16, codebook_dim=8, codebook_size=32, seed=99)
    assert not torch.equal(reloaded.codebooks, rpq.codebooks)
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded(x, lengths).code_ids, rpq(x, lengths).code_ids)


def test_random_projection_ids_are_float32_under_bf16_autocast():
    rpq = RandomProjectionQuantizer(input_dim=32, codebook_dim=16, codebook_size=256, seed=6)
    x = torch.randn(2, 20, 32, generator=_gen(7))
    lengths = torch.tensor([20, 20])
    plain = rpq(x, lengths).code_ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = rpq(x, lengths).code_ids
    assert torch.equal(plain, auto)


def test_gumbel_quantizer_hard_codes_straight_through_and_eval_argmax():
    torch.manual_seed(0)
    gq = GumbelVectorQuantizer(input_dim=12, num_groups=2, num_codes=7, codevector_dim=6)
    x = torch.randn(3, 5, 12, generator=_gen(8), requires_grad=True)
    selected = torch.ones(3, 5, dtype=torch.bool)
    selected[2, 3:] = False
    gq.train()
    out = gq(x, temperature=2.0, selected=selected, generator=_gen(9))
    assert out.codevectors.shape == (3, 5, 6) and out.code_ids.shape == (3, 5, 2)
    # forward values are exactly the picked code vectors of each group, concatenated
    for g in range(2):
        picked = gq.codevectors[g][out.code_ids[..., g]]  # (3, 5, 3)
        assert torch.allclose(out.codevectors[..., g * 3 : (g + 1) * 3], picked, atol=1e-6)
    # same generator -> same codes; Gumbel noise makes another seed differ somewhere
    again = gq(x, temperature=2.0, selected=selected, generator=_gen(9))
    assert torch.equal(again.code_ids, out.code_ids)
    other = gq(x, temperature=2.0, selected=selected, generator=_gen(10))
    assert not torch.equal(other.code_ids, out.code_ids)
    # straight-through: the soft path carries gradient to the projection and the inputs
    (out.codevectors.sum() + out.marginal_probs.pow(2).sum()).backward()
    assert gq.weight_proj.weight.grad.abs().sum() > 0 and gq.codevectors.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    # marginal over the selected steps, and its perplexity within [1, G * V]
    assert out.marginal_probs.shape == (2, 7)
    assert torch.allclose(out.marginal_probs.sum(dim=-1), torch.ones(2))
    assert 1.0 <= out.perplexity.item() <= 14.0 + 1e-4
    assert 0 < out.codes_used.item() <= 1.0

    gq.eval()
    with torch.no_grad():
        evald = gq(x, temperature=2.0)
        logits = gq.weight_proj(x).view(3, 5, 2, 7)
    assert torch.equal(evald.code_ids, logits.argmax(dim=-1))
