"""PEFT adapters on the CTC model: LoRA with a frozen base and gradient checkpointing gets gradients, and a stock
`Trainer` step moves it. Re-entrant checkpointing (`use_reentrant=True`, still common in recipes) passes no
gradient through a checkpointed block whose inputs do not require grad; `enable_input_require_grads` (which PEFT
calls) hooks `get_input_embeddings()` to make them require it, so that module must run in every forward."""

from __future__ import annotations

import peft  # in the [test] extra: missing or broken, this module fails (never skips)
import pytest
import torch
from support import make_tiny_config
from transformers import Trainer, TrainingArguments

from hf_ssl_speech import ConformerSslForCTC

LENGTHS = [64, 48, 40, 56]


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    frames = max(LENGTHS)
    return {
        "input_features": torch.randn(len(LENGTHS), frames, 16, generator=generator),
        "attention_mask": (torch.arange(frames)[None, :] < torch.tensor(LENGTHS)[:, None]).long(),
        "labels": torch.randint(1, 10, (len(LENGTHS), 5), generator=generator),
    }


def _lora_model(subsampling: str, reentrant: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ConformerSslForCTC(make_tiny_config(subsampling=subsampling, vocab_size=10, pad_token_id=0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "linear1"], lora_dropout=0.0)
    return peft.get_peft_model(model, lora)  # freezes every base weight; calls enable_input_require_grads


@pytest.mark.parametrize("subsampling", ["striding", "dw_striding"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_lora_adapters_get_gradients_under_checkpointing(subsampling, reentrant):
    model = _lora_model(subsampling, reentrant)
    model.train()
    base = model.get_base_model()
    assert all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)

    # enable_input_require_grads' hook must fire: the embedding module runs and its output requires grad.
    seen = []
    handle = base.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    out = model(**_batch())
    handle.remove()
    assert seen == [True], f"get_input_embeddings() ran {len(seen)} times; outputs requiring grad: {seen}"

    out.loss.backward()
    adapters = {n: p for n, p in model.named_parameters() if "lora_B" in n}  # lora_A's gradient is 0 while B = 0
    assert len(adapters) == 2 * 4  # 2 layers x (q_proj, v_proj, feed_forward1.linear1, feed_forward2.linear1)
    for name, param in adapters.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"


def test_a_trainer_step_moves_the_adapters(tmp_path):
    model = _lora_model("dw_striding", reentrant=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    batch = _batch()
    dataset = [{key: value[i] for key, value in batch.items()} for i in range(len(LENGTHS))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    after = dict(model.named_parameters())
    moved = [n for n, value in before.items() if not torch.equal(value, after[n].detach())]
    assert moved and all(("lora_A" in n or "lora_B" in n) for n in moved)
    assert {n.split(".lora_")[0] for n in moved} == {n.split(".lora_")[0] for n in before}, "an adapter did not move"
    assert all(torch.equal(value, after[n].detach()) for n, value in frozen.items()), "a frozen weight moved"
