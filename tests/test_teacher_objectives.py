"""The EMA-teacher objectives (data2vec 2.0, DinoSR), w2v-BERT's layer split and the NEST refinements: properties
of their targets, the teacher's EMA, the online codebooks, and code-usage statistics gathered across processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from support import REPO_ROOT, free_port, make_tiny_config
from transformers import AutoModel

from hf_ssl_speech.losses import regression_loss
from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForCTC, ConformerSslForPreTraining
from hf_ssl_speech.pretrain.bookkeeping import CodeUsage
from hf_ssl_speech.pretrain.optim import build_optimizer, ema_decay
from hf_ssl_speech.targets import (
    OnlineCodebooks,
    RandomProjectionQuantizer,
    code_histogram,
    codebook_usage,
    stack_frames,
    teacher_layers,
)

NO_DROPOUT = {"hidden_dropout": 0.0, "activation_dropout": 0.0, "attention_dropout": 0.0, "feat_proj_dropout": 0.0}
DATA2VEC = {"top_k_layers": 2, "decoder_layers": 2, "decoder_dim": 32, "decoder_groups": 4}
DINOSR = {"top_k_layers": 2, "codebook_size": 16}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(objectives: dict, **overrides) -> ConformerSslForPreTraining:
    config = make_tiny_config(
        objectives=objectives, mask_strategy="span", mask_time_prob=0.1, mask_time_length=8, **NO_DROPOUT, **overrides
    )
    return ConformerSslForPreTraining(config)


def _batch(batch: int = 3, frames: int = 203) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel-like features (batch, frames, 16) with unequal lengths (one not a multiple of the 4x factor)."""
    features = torch.randn(batch, frames, 16, generator=_gen(5))
    mask = torch.ones(batch, frames, dtype=torch.long)
    mask[1, 150:] = 0
    mask[2, 97:] = 0
    return features * mask[..., None], mask


# ----------------------------------------------------------------------------------------------- targets
def test_teacher_layers_are_the_top_k_instance_normalised_over_valid_steps():
    lengths = torch.tensor([7, 4])
    states = tuple(torch.randn(2, 7, 5, generator=_gen(i)) * (i + 1) + i for i in range(4))
    layers = teacher_layers(states, lengths, top_k=2)
    assert len(layers) == 2
    for layer, state in zip(layers, states[-2:]):
        for b, n in enumerate(lengths.tolist()):
            valid = state[b, :n]
            expected = (valid - valid.mean(0)) / torch.sqrt(valid.var(0, unbiased=False) + 1e-5)
            torch.testing.assert_close(layer[b, :n], expected, rtol=1e-5, atol=1e-5)
            assert layer[b, n:].eq(0).all()  # padding zeroed, never in the statistics


def test_online_codebooks_assign_nearest_and_follow_the_ema_of_assigned_vectors():
    books = OnlineCodebooks(num_codebooks=2, codebook_size=3, dim=2)
    words = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], [[1.0, 1.0], [-5.0, -5.0], [5.0, 5.0]]])
    books.sums.copy_(words * 2.0)
    books.counts.fill_(2.0)  # codewords = sums / counts = words
    vectors = torch.tensor([[[9.0, 1.0], [1.0, 8.0], [0.5, 0.0]], [[4.0, 6.0], [-4.0, -6.0], [4.0, 4.0]]])
    ids = books.assign(vectors)  # (N, K)
    assert ids.tolist() == [[1, 2], [2, 1], [0, 2]]
    sums, counts = books.statistics(vectors, ids)
    assert counts.tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]]
    torch.testing.assert_close(sums[1, 2], torch.tensor([8.0, 10.0]))  # two vectors in code 2 of codebook 1
    tau = 0.9
    books.update(sums, counts, tau)
    # e = (tau * s + (1 - tau) * sum) / (tau * n + (1 - tau) * count); a code nobody picked keeps its codeword
    expected = (tau * words[1, 2] * 2 + (1 - tau) * torch.tensor([8.0, 10.0])) / (tau * 2 + (1 - tau) * 2)
    torch.testing.assert_close(books.codewords[1, 2], expected)
    torch.testing.assert_close(books.codewords[1, 0], words[1, 0])


def test_data2vec_regression_scales_the_squared_error_per_step():
    predictions, targets = torch.zeros(3, 4), torch.ones(3, 4)
    out = regression_loss(predictions, targets)
    assert out.count.item() == 3 and out.loss_sum.item() == pytest.approx(3 * 4 / math.sqrt(4))


def test_ema_decay_schedule_is_linear_then_flat():
    assert ema_decay(0, 0.999, 0.99999, 100) == 0.999
    assert ema_decay(50, 0.999, 0.99999, 100) == pytest.approx((0.999 + 0.99999) / 2)
    assert ema_decay(100, 0.999, 0.99999, 100) == ema_decay(10**6, 0.999, 0.99999, 100) == 0.99999
    assert ema_decay(5, 0.9, 0.99, 0) == 0.99


# ----------------------------------------------------------------------------------------------- the teacher
def test_teacher_is_an_ema_copy_without_gradients_and_outside_the_optimiser():
    torch.manual_seed(0)
    model = _model({"data2vec": DATA2VEC, "dinosr": DINOSR}).train()
    assert not model.teacher.training  # eval mode whatever model.train() says: no dropout in the targets
    for (name, teacher), student in zip(model.teacher.state_dict().items(), model.conformer.state_dict().values()):
        assert torch.equal(teacher, student), name  # starts as the student
    assert not any(p.requires_grad for p in model.teacher.parameters())
    optimised = {
        id(p) for group in build_optimizer(model, 1e-3, (0.9, 0.98), 0.01).param_groups for p in group["params"]
    }
    assert not optimised & {id(p) for p in model.teacher.parameters()}

    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    with torch.no_grad():
        for p in model.conformer.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(1)))
        model.conformer.layers[0].conv.norm.running_mean.fill_(3.0)
    model.update_teacher(0.9)
    student = dict(model.conformer.named_parameters())
    for name, param in model.teacher.named_parameters():
        torch.testing.assert_close(param, 0.9 * before[name] + 0.1 * student[name], rtol=1e-6, atol=1e-6)
    assert model.teacher.layers[0].conv.norm.running_mean.eq(3.0).all()  # buffers are copied


def test_teacher_reads_the_clean_unmasked_batch_once_and_clones_get_their_own_masks():
    torch.manual_seed(0)
    model = _model({"data2vec": DATA2VEC, "dinosr": DINOSR}, clone_batch=3).train()
    features, mask = _batch()
    clean = features + 0.5  # as with NEST denoising: the student reads `features`, targets come from `clean`
    seen = []
    hook = model.teacher.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0]))
    out = model(features, mask, target_features=clean, generator=_gen(0))
    hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], clean)  # one teacher pass, clean and unmasked, batch of 3
    assert out.token_mask.shape[0] == 9 and out.loss_counts["data2vec"] == out.token_mask.sum()
    clones = out.token_mask.view(3, 3, -1)
    assert not torch.equal(clones[0], clones[1]) and not torch.equal(clones[1], clones[2])
    assert out.teacher_statistics["dinosr_codebooks/counts"].sum() == 2 * out.token_mask.sum()  # K = 2 layers
    model.eval()
    assert model(features, mask).token_mask.shape[0] == 3  # no clones outside training


def test_data2vec_target_is_the_average_of_the_top_k_normalised_teacher_layers():
    torch.manual_seed(0)
    model = _model({"data2vec": DATA2VEC}).eval()
    features, mask = _batch()
    out = model(features, mask, generator=_gen(3))
    with torch.no_grad():
        teacher = model.teacher(features, mask, output_hidden_states=True)
        steps = teacher.output_lengths
        target = torch.stack(teacher_layers(teacher.hidden_states, steps, 2)).mean(0)
    b, t = out.token_mask.bool().nonzero(as_tuple=True)
    encoded = model(features, mask, generator=_gen(3), output_hidden_states=True).hidden_states[-1]
    predictions = model.data2vec_decoder(encoded, steps)
    expected = regression_loss(predictions[b, t], target[b, t])
    torch.testing.assert_close(out.loss_sums["data2vec"], expected.loss_sum)


def test_save_pretrained_exports_the_student_and_codewords_not_the_teacher(tmp_path):
    torch.manual_seed(0)
    model = _model({"dinosr": DINOSR}).train()
    features, mask = _batch()
    out = model(features, mask, generator=_gen(0))
    with torch.no_grad():
        model.conformer.subsampling.linear.weight.add_(1.0)
    model.update_teacher(0.5, out.teacher_statistics)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    assert keys and not any(k.startswith("teacher.") for k in keys)
    assert {"dinosr_codebooks.sums", "dinosr_codebooks.counts"} <= keys

    loaded = ConformerSslForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(loaded.dinosr_codebooks.sums, model.dinosr_codebooks.sums)
    for teacher, student in zip(loaded.teacher.state_dict().values(), loaded.conformer.state_dict().values()):
        assert torch.equal(teacher, student)  # the teacher restarts as the loaded student
    encoder = AutoModel.from_pretrained(tmp_path)
    ctc = ConformerSslForCTC.from_pretrained(tmp_path, vocab_size=8)
    for name, value in model.conformer.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value) and torch.equal(ctc.conformer.state_dict()[name], value)


# FSDP2 (torch's fully_shard, every encoder block of student and teacher and the root) over 2 gloo processes: the
# EMA runs on the local shards, and the teacher after 3 steps equals the EMA chain of the gathered student weights.
_FSDP_TEACHER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    sys.path.insert(0, sys.argv[1])
    from support import make_tiny_config
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = make_tiny_config(
        objectives={"data2vec": {"top_k_layers": 2, "decoder_dim": 32, "decoder_groups": 4},
                    "dinosr": {"top_k_layers": 2, "codebook_size": 16}},
        mask_strategy="span", mask_time_prob=0.1, mask_time_length=8, conv_norm_type="layer_norm",
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)
    model = ConformerSslForPreTraining(config).train()
    full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    expected = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    codewords = model.dinosr_codebooks.codewords.clone()
    for layer in [*model.conformer.layers, *model.teacher.layers]:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    features = torch.randn(2, 120, 16, generator=torch.Generator().manual_seed(rank))
    for step in range(3):
        out = model(features, generator=torch.Generator().manual_seed(10 * rank + step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        statistics = {k: v.clone() for k, v in out.teacher_statistics.items()}
        for value in statistics.values():
            dist.all_reduce(value)  # what the loop's accelerator.reduce does
        model.update_teacher(0.9, statistics)
        student = {n: full(p) for n, p in model.conformer.named_parameters()}
        expected = {n: 0.9 * e + 0.1 * student[n] for n, e in expected.items()}
    teacher = {n: full(p) for n, p in model.teacher.named_parameters()}
    gathered = [torch.zeros_like(codewords) for _ in range(2)]
    dist.all_gather(gathered, model.dinosr_codebooks.codewords.contiguous())
    with open(f"{sys.argv[2]}/result_{rank}.json", "w") as f:  # one file per rank: their stdout lines interleave
        json.dump({
            "sharded": all(type(p).__name__ == "DTensor" for p in model.teacher.parameters()),
            "ema_error": max(float((teacher[n] - expected[n]).abs().max()) for n in teacher),
            "teacher_moved": max(float((teacher[n] - student[n]).abs().max()) for n in teacher),
            "codewords_equal": bool(torch.equal(gathered[0], gathered[1])),
            "codewords_moved": float((gathered[0] - codewords).abs().max()),
        }, f)
    # Leave without interpreter finalisation. gloo's worker threads outlive destroy_process_group here: DTensor's
    # sharding-propagation cache keeps the device mesh, and so the process group, alive to the end. A worker that
    # frees a finished collective (this all_gather, held by the barrier's work) needs the GIL for the tensors'
    # Python objects; during finalisation taking the GIL ends the thread inside that C++ destructor, and
    # std::terminate aborts the rank ("terminate called without an active exception": a core dump of the CI
    # flake showed exactly this stack). Once both ranks are past the barrier and the result is on disk,
    # nothing is left to finalise.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ema_teacher_under_fsdp2_updates_its_shards_and_keeps_one_set_of_codewords(tmp_path):
    script = tmp_path / "fsdp_teacher.py"
    script.write_text(_FSDP_TEACHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    proc = subprocess.run(
        [*command, str(free_port()), str(script), str(REPO_ROOT / "tests"), str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["sharded"]  # the teacher is sharded like the student, never gathered to update
        assert result["ema_error"] < 1e-6 and result["teacher_moved"] > 1e-4
        assert result["codewords_equal"] and result["codewords_moved"] > 1e-4


@pytest.mark.parametrize(
    ("objectives", "message"),
    [
        ({"data2vec": {"top_k_layers": 3}}, "objectives.data2vec.top_k_layers=3"),
        (
            {"data2vec": {"top_k_layers": 2, "decoder_dim": 30, "decoder_groups": 4}},
            "objectives.data2vec.decoder_dim=30",
        ),
        ({"data2vec": {"top_k_layers": 2, "decoder_kernel": 4}}, "objectives.data2vec.decoder_kernel=4"),
        ({"dinosr": {"top_k_layers": 1, "codebook_decay": 1.0}}, "objectives.dinosr.codebook_decay=1.0"),
        ({"dinosr": {"top_k_layers": 1, "codebooks": 8}}, "objectives.dinosr=['codebooks']"),
    ],
)
def test_teacher_objective_settings_are_checked(objectives, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_tiny_config(objectives=objectives)


# ----------------------------------------------------------------------------------------------- w2v-BERT
def test_w2v_bert_contrastive_reads_the_lower_block_and_mlm_the_top_with_one_codebook():
    """w2v-BERT's two modules are per-objective layers of one encoder: contrastive on block 1 of 3, MLM on block 3,
    both targets from the same Gumbel quantizer."""
    torch.manual_seed(0)
    model = _model(
        {"contrastive": {"layer": 1}, "mlm": {}},
        num_hidden_layers=3,
        num_codevector_groups=1,
        num_codevectors_per_group=16,
    ).train()
    features, mask = _batch()
    out = model(features, mask, generator=_gen(0))
    assert set(out.loss_sums) == {"contrastive", "diversity", "mlm"}
    grads = torch.autograd.grad(out.loss_sums["contrastive"], list(model.conformer.parameters()), allow_unused=True)
    reached = {name.split(".")[1] for (name, _), g in zip(model.conformer.named_parameters(), grads) if g is not None}
    assert "0" in reached and not {"1", "2"} & reached  # blocks above the contrastive module get nothing from it
    grads = torch.autograd.grad(out.loss_sums["mlm"], [model.conformer.layers[2].feed_forward2.linear1.weight])
    assert grads[0].abs().sum() > 0
    assert model.mlm_head.out_features == 16 and model.quantizer.num_groups == 1  # one codebook, its ids are MLM's


# ----------------------------------------------------------------------------------------------- NEST refinements
def test_layer_norm_on_the_quantizer_input_makes_codes_gain_invariant_per_step():
    inputs = torch.randn(2, 9, 24, generator=_gen(2))
    lengths = torch.tensor([9, 6])
    gains = torch.rand(2, 9, 1, generator=_gen(3)) * 10 + 0.1
    with_norm = RandomProjectionQuantizer(24, 8, 64, num_codebooks=2, normalize_input=False, input_layer_norm=True)
    assert torch.equal(with_norm(inputs, lengths).code_ids, with_norm(inputs * gains, lengths).code_ids)
    # the same input shifted by a constant per step: LayerNorm removes it, the bare projection does not
    shifted = inputs + torch.randn(2, 9, 1, generator=_gen(4)) * 5
    plain = RandomProjectionQuantizer(24, 8, 64, num_codebooks=2, normalize_input=False)
    assert torch.equal(with_norm(inputs, lengths).code_ids, with_norm(shifted, lengths).code_ids)
    assert not torch.equal(plain(inputs, lengths).code_ids, plain(shifted, lengths).code_ids)


@pytest.mark.parametrize("frames", [197, 198, 199, 200, 203])
def test_masked_prediction_targets_line_up_with_encoder_steps_for_any_length(frames):
    """NeMo's NEST fix (PR #15589): targets and encoder steps must agree when frames are not a multiple of 8."""
    torch.manual_seed(0)
    model = _model({"bestrq": {}}, subsampling="dw_striding", bestrq_num_codebooks=2).eval()
    features, mask = _batch(frames=frames)
    out = model(features, mask, output_hidden_states=True)
    lengths = mask.sum(-1)
    stacked, step_lengths = stack_frames(features, lengths, 8)
    assert stacked.shape[1] == out.hidden_states[-1].shape[1] == out.token_mask.shape[1]
    assert torch.equal(step_lengths, model.conformer(features, mask).output_lengths)
    assert not (out.token_mask.bool() & (torch.arange(stacked.shape[1])[None] >= step_lengths[:, None])).any()
    assert out.loss_counts["bestrq"] == 2 * out.token_mask.sum() and torch.isfinite(out.loss)
    assert out.code_counts["bestrq"].shape == (2, model.config.bestrq_codebook_size)
    assert out.code_counts["bestrq"].sum() == 2 * out.token_mask.sum()


def test_code_usage_pools_histograms_across_processes_before_coverage_and_entropy():
    ids_a = torch.tensor([[[0], [1], [1], [2]]])  # (batch, T, books): process A
    ids_b = torch.tensor([[[3], [3], [3], [3]]])  # process B uses a code A never does
    every = torch.ones(1, 4, dtype=torch.bool)
    usage_a, usage_b = CodeUsage(), CodeUsage()
    usage_a.update({"bestrq": code_histogram(ids_a, every, 8)})
    usage_b.update({"bestrq": code_histogram(ids_b, every, 8)})
    other = usage_b.counts["bestrq"]
    pooled = usage_a.compute(lambda local: local + other)  # what the all-reduce returns on process A
    expected = codebook_usage(code_histogram(torch.cat([ids_a, ids_b], 1), torch.ones(1, 8, dtype=torch.bool), 8))
    assert pooled["bestrq_codebook0_coverage"] == pytest.approx(4 / 8)
    assert pooled["bestrq_codebook0_entropy"] == pytest.approx(float(expected["entropy"][0]))
    p = torch.tensor([1, 2, 1, 4]) / 8.0
    assert pooled["bestrq_codebook0_perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert usage_a.compute(None)["bestrq_codebook0_coverage"] == pytest.approx(3 / 8)  # one process alone
    restored = CodeUsage()
    restored.load_state_dict(usage_a.state_dict())
    assert restored.compute(None) == usage_a.compute(None)
