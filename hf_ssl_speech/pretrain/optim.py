"""The optimiser, the learning-rate schedules, and the Gumbel temperature and EMA-teacher momentum schedules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------- optimiser
def lr_scale(name: str, num_layers: int, encoder_lr_scale: float = 1.0, layer_decay: float = 1.0) -> float:
    """The LR multiplier of parameter `name` of `ConformerSslForPreTraining` (continued pretraining).

    Heads (everything outside `conformer.`) get 1. The encoder gets `encoder_lr_scale` times fine-tuning's
    layer-wise decay (`finetune.optim.layerwise_param_groups`, BEiT / ELECTRA): block k (0-based) of L
    `layer_decay^(L - k)`, so the top block `layer_decay`, the front end (subsampling, positions) `layer_decay^(L + 1)`.
    Lower layers hold the most general features, so they move least.
    """
    if not name.startswith("conformer."):
        return 1.0
    parts = name.split(".")
    depth = num_layers - int(parts[2]) if parts[1] == "layers" else num_layers + 1
    return encoder_lr_scale * layer_decay**depth


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    encoder_lr_scale: float = 1.0,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: weight matrices and conv kernels decay; the norms, biases
    and embeddings of `model.no_weight_decay_parameters()` (the model's one rule, shared with fine-tuning) don't.

    With `encoder_lr_scale` or `layer_decay` other than 1 (and `lr` given), each (decay, `lr_scale`) pair is its own
    group with `lr * scale`, the heads' groups first (the loop logs the first group's LR). Otherwise the two groups
    of a run from scratch, exactly as before (a checkpoint's optimiser state keeps loading).
    """
    exempt = model.no_weight_decay_parameters()
    scaled = lr is not None and (encoder_lr_scale != 1.0 or layer_decay != 1.0)
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 0)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = lr_scale(name, num_layers, encoder_lr_scale, layer_decay) if scaled else 1.0
            groups.setdefault((scale, name in exempt), []).append(param)
    ordered = sorted(groups, key=lambda key: (-key[0], key[1]))
    if not scaled:  # the historical two groups, both present even when empty
        ordered = [(1.0, False), (1.0, True)]
    out = []
    for scale, no_decay in ordered:
        group: dict[str, Any] = {
            "params": groups.get((scale, no_decay), []),
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        if scaled:
            group["lr"] = lr * scale
        out.append(group)
    return out


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float = 1e-8,
    encoder_lr_scale: float = 1.0,
    layer_decay: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(...)`; arguments come from the recipe's `optim` section."""
    groups = param_groups(model, weight_decay, lr, encoder_lr_scale, layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


# ---------------------------------------------------------------------------------------------- schedules
def noam_factor(step: int, d_model: int, warmup_steps: int, min_factor: float = 0.0) -> float:
    """NeMo's NoamAnnealing multiplier: d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).

    It rises linearly to d_model^-0.5 * warmup^-0.5 at `warmup_steps`, then decays as step^-0.5. `lr` in a
    NeMo recipe is multiplied by this (lr 5.0, d_model 512, warmup 25k -> peak 1.4e-3). After warmup the
    multiplier is floored at `min_factor` (= min_lr / lr). Step 0 counts as step 1 so the first update is not
    taken with a zero learning rate.
    """
    step = max(step, 1)
    if warmup_steps > 0:
        factor = d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)
    else:
        factor = d_model**-0.5 * step**-0.5
    return max(factor, min_factor) if step > warmup_steps else factor


# transformers.get_scheduler names for the recipe's schedulers (all with linear warmup).
HF_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    max_steps: int,
    d_model: int,
    lr: float,
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's LR schedule, stepped once per optimiser step.

    Args:
        name: `optim.scheduler`: "noam" (NeMo NoamAnnealing) or one of `HF_SCHEDULERS`.
        warmup_steps, lr, min_lr: from the `optim` section; max_steps from `train`; d_model = model hidden_size.
    """
    if name == "noam":
        min_factor = min_lr / lr
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: noam_factor(step, d_model, warmup_steps, min_factor)
        )
    if name not in HF_SCHEDULERS:
        raise ValueError(f"optim.scheduler={name!r} is unknown: expected 'noam' or one of {tuple(HF_SCHEDULERS)}.")
    from transformers import get_scheduler

    return get_scheduler(HF_SCHEDULERS[name], optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def gumbel_temperature(step: int, start: float, end: float, decay: float) -> float:
    """wav2vec 2.0's Gumbel-softmax temperature: max(end, start * decay^step) (2 -> 0.5, decay 0.999995)."""
    return max(end, start * decay**step)


def ema_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """data2vec's teacher momentum: linear from `start` to `end` over `anneal_steps` optimiser steps, then `end`
    (data2vec 2.0: 0.999 -> 0.99999); recipe keys `optim.ema_decay_start/end`, `optim.ema_anneal_steps`."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps
