"""The stock model code against checkpoints and outputs saved by the earlier code with hand-written autograd
functions (tests/fixtures/stock_parity, written by its make_reference.py at commit 322f51c): the same weights give
the same eval logits, and one seeded training step with dropout p = 0.1 everywhere the same logits, loss and
gradients, within fp32 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_ssl_speech import ConformerSslForCTC

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "stock_parity"
CASES = sorted(folder.name for folder in FIXTURES.iterdir() if (folder / "reference.safetensors").exists())
TRAIN_SEED = 1234  # make_reference.py's
# Gradients that are zero in exact arithmetic, so both sides hold rounding noise: a key bias adds the same q . b to
# every score of a query's row (softmax ignores it), and a conv bias right before training-mode BatchNorm is
# subtracted again with the batch mean.
ZERO_IN_EXACT_ARITHMETIC = ("self_attn.k_proj.bias", "conv.depthwise_conv.bias")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal within fp32 rounding, relative to the tensor's own scale (gradients span orders of magnitude)."""
    scale = expected.abs().max().clamp(min=1e-12)
    error = (actual - expected).abs().max() / scale
    assert error < 2e-5, f"{what}: max |difference| / max |reference| = {error:.2e}"


def test_every_case_is_there():
    assert CASES == ["causal", "conformer", "fastconformer", "gated_fast4x"]


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_the_earlier_code(case):
    reference = load_file(FIXTURES / case / "reference.safetensors")
    model = ConformerSslForCTC.from_pretrained(FIXTURES / case)
    features, attention_mask = reference["input_features"], reference["attention_mask"]
    assert bool((attention_mask == 0).any()), "the fixture must exercise padding"

    model.eval()
    with torch.no_grad():
        _close(model(features, attention_mask=attention_mask).logits, reference["eval.logits"], "eval logits")

    model.train()
    torch.manual_seed(TRAIN_SEED)
    out = model(features, attention_mask=attention_mask, labels=reference["labels"])
    out.loss.backward()
    _close(out.logits, reference["train.logits"], "training logits (dropout masks from the same RNG draws)")
    _close(out.loss[None], reference["train.loss"], "training loss")
    grads = {name: param.grad for name, param in model.named_parameters()}
    expected = {key.removeprefix("grad."): value for key, value in reference.items() if key.startswith("grad.")}
    assert grads.keys() == expected.keys()
    scale = max(grad.abs().max() for grad in expected.values())
    batch_norm = model.config.conv_norm_type == "batch_norm"
    for name, grad in grads.items():
        if name.endswith(ZERO_IN_EXACT_ARITHMETIC[0]) or (batch_norm and name.endswith(ZERO_IN_EXACT_ARITHMETIC[1])):
            assert max(grad.abs().max(), expected[name].abs().max()) < 1e-5 * scale, f"gradient of {name} not ~0"
        else:
            _close(grad, expected[name], f"gradient of {name}")


@pytest.mark.parametrize("case", CASES)
def test_every_module_with_weights_runs_as_a_module(case):
    """Forward hooks see every layer that owns a parameter (no weight used through F.* behind its module's back):
    hooks, quantisation and PEFT adapters rely on it."""
    reference = load_file(FIXTURES / case / "reference.safetensors")
    model = ConformerSslForCTC.from_pretrained(FIXTURES / case).train()
    owners = {name: module for name, module in model.named_modules() if any(True for _ in module.parameters(False))}
    called = set()
    for name, module in owners.items():
        module.register_forward_hook(lambda m, i, o, name=name: called.add(name))
    model(reference["input_features"], attention_mask=reference["attention_mask"], labels=reference["labels"])
    assert sorted(set(owners) - called) == []
