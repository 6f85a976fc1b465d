"""data2vec 2.0's efficiency: the MAE-style student (`objectives.data2vec.encode_unmasked_only`: the blocks encode
only the unmasked steps, the decoder gets mask tokens at the masked ones) and several masks per teacher pass
(`clone_batch`)."""

from __future__ import annotations

import pytest
import torch
from support import make_tiny_config

from hf_ssl_speech.masking import gather_kept_steps, keep_at_least_one_step, scatter_kept_steps
from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
from hf_ssl_speech.pretrain.optim import build_optimizer

NO_DROPOUT = {"hidden_dropout": 0.0, "activation_dropout": 0.0, "attention_dropout": 0.0, "feat_proj_dropout": 0.0}
DATA2VEC = {"top_k_layers": 2, "decoder_layers": 2, "decoder_dim": 32, "decoder_groups": 4}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(mae: bool, **overrides) -> ConformerSslForPreTraining:
    settings = {"mask_strategy": "span", "mask_time_prob": 0.04, "mask_time_length": 20, **NO_DROPOUT, **overrides}
    config = make_tiny_config(objectives={"data2vec": {**DATA2VEC, "encode_unmasked_only": mae}}, **settings)
    return ConformerSslForPreTraining(config)


def _batch(batch: int = 3, frames: int = 203) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel-like features (batch, frames, 16) with unequal lengths (one not a multiple of the 4x factor)."""
    features = torch.randn(batch, frames, 16, generator=_gen(5))
    mask = torch.ones(batch, frames, dtype=torch.long)
    mask[1, 150:] = 0
    mask[2, 97:] = 0
    return features * mask[..., None], mask


# ----------------------------------------------------------------------------------------------- gather / scatter
def test_gather_then_scatter_puts_every_kept_step_back_exactly():
    hidden = torch.randn(4, 9, 5, generator=_gen(1))
    keep = torch.rand(4, 9, generator=_gen(2)) < 0.5
    keep[0] = True  # a row that keeps everything
    keep[1] = False
    keep[1, 6] = True  # a row that keeps one step
    compact, lengths = gather_kept_steps(hidden, keep)
    assert lengths.tolist() == keep.sum(1).tolist() and compact.shape == (4, 9, 5)
    for b in range(4):  # kept steps, in order, left-aligned
        assert torch.equal(compact[b, : lengths[b]], hidden[b][keep[b]])
    full = scatter_kept_steps(compact, keep)
    assert torch.equal(full[keep], hidden[keep]) and full[~keep].eq(0).all()
    token = torch.randn(5, generator=_gen(3))
    filled = scatter_kept_steps(compact, keep, fill=token)
    assert torch.equal(filled[keep], hidden[keep]) and torch.equal(filled[~keep], token.expand(int((~keep).sum()), 5))


def test_gather_compacts_to_the_longest_kept_row():
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]])
    compact, lengths = gather_kept_steps(torch.arange(8.0).view(2, 4, 1), keep)
    assert lengths.tolist() == [2, 1] and compact.shape == (2, 2, 1)
    assert compact[0, :, 0].tolist() == [0.0, 2.0] and compact[1, 0, 0].item() == 7.0


def test_every_utterance_keeps_at_least_one_step():
    token_mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False, False, False, False]])
    lengths = torch.tensor([3, 2, 0])  # row 0: all 3 valid steps masked; row 1 likewise; row 2 empty
    fixed = keep_at_least_one_step(token_mask, lengths)
    assert fixed.tolist() == [[False, True, True, False], [False, True, False, False], [False] * 4]
    untouched = torch.tensor([[True, False, True, False]])
    assert torch.equal(keep_at_least_one_step(untouched, torch.tensor([4])), untouched)


# ----------------------------------------------------------------------------------------------- the model
def _pair() -> tuple[ConformerSslForPreTraining, ConformerSslForPreTraining]:
    """The full student and the MAE-style one with the same weights (the MAE one has the decoder's mask token
    instead of the frame mask embedding: it drops masked steps rather than filling masked frames)."""
    torch.manual_seed(0)
    full = _model(mae=False, mask_fill="learned")
    mae = _model(mae=True, mask_fill="learned")
    missing, unexpected = mae.load_state_dict(full.state_dict(), strict=False)
    assert missing == ["data2vec_decoder.mask_token"] and unexpected == ["masked_spec_embed"]
    return full, mae


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_with_nothing_masked_the_mae_student_equals_the_full_student(mode):
    full, mae = _pair()
    full.train(mode == "train")
    mae.train(mode == "train")
    features, mask = _batch()
    nothing = torch.zeros(features.shape[:2], dtype=torch.bool)
    a = full(features, mask, mask_time_indices=nothing, output_hidden_states=True)
    b = mae(features, mask, mask_time_indices=nothing, output_hidden_states=True)
    steps = a.hidden_states[0].shape[1]
    lengths = mae._get_feat_extract_output_lengths(mask.sum(-1))
    valid = torch.arange(steps)[None, :] < lengths[:, None]
    assert b.metrics["encoded_step_fraction"].item() == 1.0
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(y[valid], x[valid], rtol=0, atol=0)
        assert y[~valid].eq(0).all()  # the scattered layout: zeros wherever nothing was encoded


def test_mae_student_encodes_each_utterance_as_if_alone():
    """Compacted rows of unequal kept lengths: the padding (zeroed before every depthwise convolution, masked in
    attention) never reaches a real step, so an utterance's kept steps encode the same in a batch as alone (eval:
    BatchNorm uses its running statistics)."""
    _, model = _pair()
    model.eval()
    features, mask = _batch()
    frames = torch.zeros(features.shape[:2], dtype=torch.bool)
    frames[:, 40:80] = True  # 10 masked steps in every row
    frames[1, 100:140] = True
    batched = model(features, mask, mask_time_indices=frames, output_hidden_states=True)
    for b in range(3):
        n = int(mask[b].sum())
        alone = model(features[b : b + 1, :n], mask_time_indices=frames[b : b + 1, :n], output_hidden_states=True)
        kept = ~alone.token_mask[0].bool()
        for x, y in zip(batched.hidden_states, alone.hidden_states):
            torch.testing.assert_close(x[b, : kept.shape[0]][kept], y[0][kept], rtol=1e-4, atol=1e-5)


def test_mae_student_runs_fewer_steps_through_the_blocks():
    _, model = _pair()
    model.train()
    features, mask = _batch()
    seen = []
    hook = model.conformer.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    out = model(features, mask, generator=_gen(0))
    hook.remove()
    steps = out.token_mask.shape[1]
    kept = (mask.sum(-1) // 4 + 1 - out.token_mask.sum(-1)).max()  # upper bound on the longest kept row
    assert seen[0] < steps and seen[0] <= kept
    assert 0 < out.metrics["encoded_step_fraction"].item() < 1


def test_one_teacher_pass_serves_every_clone_of_the_mae_student():
    torch.manual_seed(0)
    model = _model(mae=True, clone_batch=4).train()
    features, mask = _batch()
    teacher_batches, student_batches, block_batches = [], [], []
    hooks = [
        model.teacher.register_forward_hook(lambda module, args, out: teacher_batches.append(args[0].shape[0])),
        model.conformer.subsampling.register_forward_hook(
            lambda module, args, out: student_batches.append(args[0].shape[0])
        ),
        model.conformer.layers[0].register_forward_hook(
            lambda module, args, out: block_batches.append(args[0].shape[0])
        ),
    ]
    out = model(features, mask, generator=_gen(0))
    for hook in hooks:
        hook.remove()
    # one teacher pass and one student subsampling pass on the B utterances; the student's blocks see 4 * B rows
    assert teacher_batches == [3] and student_batches == [3] and block_batches == [12]
    # the loss is normalised over the masked steps of all 4 copies
    assert out.loss_counts["data2vec"].item() == out.token_mask.sum().item() > 0
    torch.testing.assert_close(out.loss, out.loss_sums["data2vec"] / out.loss_counts["data2vec"])
    clones = out.token_mask.view(4, 3, -1)
    assert not torch.equal(clones[0], clones[1])


def test_mae_student_gradients_reach_decoder_mask_token_and_blocks_and_the_loss_falls():
    torch.manual_seed(0)
    model = _model(mae=True, clone_batch=2).train()
    features, mask = _batch()
    optimizer = build_optimizer(model, 3e-3, (0.9, 0.98), 0.0)
    losses = []
    for step in range(8):
        out = model(features, mask, generator=_gen(step % 2))
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            decoder = model.data2vec_decoder
            for name, param in [
                ("mask_token", decoder.mask_token),
                ("decoder conv", decoder.convs[0].weight),
                ("decoder output", decoder.output.weight),
                ("block 0", model.conformer.layers[0].self_attn.q_proj.weight),
                ("last block", model.conformer.layers[-1].feed_forward2.linear2.weight),
                ("subsampling", model.conformer.subsampling.linear.weight),
                ("first subsampling conv", model.conformer.subsampling.layers[0].weight),
            ]:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
        optimizer.step()
        model.update_teacher(0.99)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


def test_encode_unmasked_only_refuses_other_masked_objectives():
    with pytest.raises(ValueError, match="encode_unmasked_only"):
        make_tiny_config(
            objectives={"data2vec": {**DATA2VEC, "encode_unmasked_only": True}, "dinosr": {"top_k_layers": 2}}
        )
    with pytest.raises(ValueError, match="encode_unmasked_only"):
        make_tiny_config(objectives={"data2vec": {**DATA2VEC, "encode_unmasked_only": 1}})
