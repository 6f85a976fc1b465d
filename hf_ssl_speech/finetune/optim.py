"""Optimisation of fine-tuning: layer-wise learning-rate decay, encoder freezing, the shared Trainer callbacks."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import (
    EarlyStoppingCallback,
    TrainerCallback,
)

from ..data.augment import SpecAugmentConfig
from ..errors import ConfigError
from .args import DataArguments, FinetuneArguments

logger = logging.getLogger(__name__)


# ============================================================================================ optimisation
def parameter_layer(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: 0 subsampling/positions, i + 1 block i, L + 1 heads."""
    if name.startswith("conformer.layers."):
        return int(name.split(".")[2]) + 1
    if name.startswith("conformer."):
        return 0
    return num_layers + 1


def layerwise_param_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """
    AdamW parameter groups with layer-wise learning-rate decay (Clark et al. 2020, ELECTRA; BEiT).

    lr(depth d) = learning_rate * layer_decay^(L + 1 - d): the new head (d = L + 1) trains at `learning_rate`,
    the top block at lr * decay, ..., the subsampling (d = 0) at lr * decay^(L + 1). Norm scales, biases, the
    relative-position biases and layer weights get no weight decay. Every parameter is included, trainable or
    not, so an encoder frozen now (`FreezeEncoderCallback`) trains once unfrozen. The head's group comes first,
    so Trainer logs the peak learning rate. The scheduler scales every group's lr by the same factor.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay={layer_decay}: must be in (0, 1] (1 = no decay)")
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    exempt = model.no_weight_decay_parameters()  # the model's one no-decay rule, shared with pretraining
    for name, param in model.named_parameters():
        depth = parameter_layer(name, num_layers)
        no_decay = name in exempt
        group = groups.setdefault(
            (depth, no_decay),
            {
                "params": [],
                "lr": learning_rate * layer_decay ** (num_layers + 1 - depth),
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"depth{depth}{'_no_decay' if no_decay else ''}",
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], key[1]))]


def build_optimizer(model: nn.Module, args: Any, layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW from TrainingArguments' learning_rate / weight_decay / adam_beta1, adam_beta2 / adam_epsilon."""
    groups = layerwise_param_groups(model, args.learning_rate, args.weight_decay, layer_decay)
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def set_encoder_trainable(model: nn.Module, trainable: bool) -> None:
    """Switch `requires_grad` of the encoder (`model.conformer`); the head is untouched."""
    if trainable:
        model.unfreeze_base_model()
    else:
        model.freeze_base_model()


class FreezeEncoderCallback(TrainerCallback):
    """Train only the new head for the first `freeze_steps` optimiser steps, then the whole model.

    A fresh head on a pretrained encoder sends large, random gradients into it at first; freezing the encoder
    until the head is sensible protects the pretrained features (NeMo / fairseq `freeze_finetune_updates`).
    The optimiser must hold the encoder's parameters from the start (`layerwise_param_groups` does): frozen
    parameters simply get no gradient, so AdamW leaves them (and their moments) untouched. BatchNorm running
    statistics stay fixed while frozen (`SslTrainer` keeps a frozen encoder in eval mode).
    Under DDP the frozen encoder gets no gradient: `set_unused_parameter_search` turns DDP's search on for it.
    """

    def __init__(self, freeze_steps: int) -> None:
        self.freeze_steps = freeze_steps
        self.frozen = False

    def _update(self, state, model) -> None:
        should_freeze = state.global_step < self.freeze_steps
        if model is not None and should_freeze != self.frozen:
            set_encoder_trainable(model, not should_freeze)
            self.frozen = should_freeze
            logger.info("step %d: encoder %s", state.global_step, "frozen" if should_freeze else "unfrozen")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._update(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._update(state, model)


def unused_parameter_reasons(finetune_args: FinetuneArguments, model_config: Any) -> list[str]:
    """Why a trainable parameter may get no gradient in some fine-tuning step (empty: every one gets one, every step).

    DDP needs `find_unused_parameters=True` for those steps, and otherwise pays a search of the autograd graph
    after every forward for nothing (and warns on every rank). A head-only phase leaves the encoder without
    gradients until it ends; layerdrop skips whole blocks. A whole-run `freeze_encoder` is not a reason: the
    encoder is frozen before DDP wraps the model, so DDP leaves it out. `tests/test_finetune.py` checks the empty
    case against a real backward of each fine-tuning head.
    """
    reasons = []
    if finetune_args.freeze_encoder_steps > 0 and not finetune_args.freeze_encoder:
        reasons.append(f"freeze_encoder_steps={finetune_args.freeze_encoder_steps}")
    encoder_config = getattr(model_config, "encoder_config", model_config)  # Parakeet transducers nest theirs
    layerdrop = getattr(encoder_config, "layerdrop", 0.0) or 0.0
    if layerdrop > 0:
        reasons.append(f"layerdrop={layerdrop}")
    return reasons


def set_unused_parameter_search(training_args: Any, reasons: list[str]) -> None:
    """Turn DDP's unused-parameter search on only where `reasons` (`unused_parameter_reasons`) need it.

    The Trainer's default (`ddp_find_unused_parameters=None`) searches always; an explicit setting is kept, except
    that `false` with a reason under several processes is refused now rather than by DDP after the first step.
    """
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = bool(reasons)
        if reasons and training_args.world_size > 1:
            logger.info("DDP searches for unused parameters after each forward (%s)", ", ".join(reasons))
    elif not training_args.ddp_find_unused_parameters and reasons and training_args.world_size > 1:
        raise ConfigError(
            f"ddp_find_unused_parameters=False, but with {' and '.join(reasons)} some parameters get no gradient in "
            "some steps, which DDP refuses: drop --ddp_find_unused_parameters (it is chosen for you) or set it true"
        )


class HeadOnlyAwareEarlyStopping(EarlyStoppingCallback):
    """The stock `EarlyStoppingCallback`, except that evaluations up to `start_step` do not count towards the
    patience: those of the head-only phase of `freeze_encoder_steps` (the encoder has not trained yet, and a
    plateau of the head alone must not end the run before the whole model is fine-tuned), and any before
    `early_stopping_start_step` (a model from scratch can sit on CTC's initial plateau for several evaluations
    at the peak rate and still train well after it). Those evaluations still compete for the best checkpoint
    (`load_best_model_at_end`). With `start_step=0` it is the stock callback."""

    def __init__(
        self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0, start_step: int = 0
    ) -> None:
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.start_step = start_step

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        if state.global_step <= self.start_step:
            return None
        return super().on_evaluate(args, state, control, metrics, **kwargs)

    def state(self) -> dict:
        exported = super().state()
        exported["args"]["start_step"] = self.start_step  # restored with the rest when a run resumes
        return exported


def train_time_options(
    data_args: DataArguments, finetune_args: FinetuneArguments
) -> tuple[SpecAugmentConfig | None, list[TrainerCallback]]:
    """The SpecAugment settings and Trainer callbacks (encoder freeze, early stopping) that both fine-tuning
    scripts (CTC and classification) derive from their arguments."""
    spec = None
    if data_args.spec_augment:
        spec = SpecAugmentConfig(data_args.freq_masks, data_args.freq_width, data_args.time_masks, data_args.time_width)
    callbacks: list[TrainerCallback] = []
    if finetune_args.freeze_encoder_steps > 0 and not finetune_args.freeze_encoder:
        callbacks.append(FreezeEncoderCallback(finetune_args.freeze_encoder_steps))
    if finetune_args.early_stopping_start_step < 0:
        raise ValueError(
            f"early_stopping_start_step={finetune_args.early_stopping_start_step}: give a step >= 0 (0: count "
            "every evaluation after the head-only phase)"
        )
    if finetune_args.early_stopping_patience:
        head_only = 0 if finetune_args.freeze_encoder else finetune_args.freeze_encoder_steps
        start = max(head_only, finetune_args.early_stopping_start_step)
        callbacks.append(HeadOnlyAwareEarlyStopping(finetune_args.early_stopping_patience, start_step=start))
    return spec, callbacks
