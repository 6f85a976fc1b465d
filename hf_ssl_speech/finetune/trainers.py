"""`Trainer` subclasses: a frozen encoder stays in eval mode; CTC evaluation gathers greedy ids, not logits."""

from __future__ import annotations

import numpy as np
from transformers import (
    EvalPrediction,
    Trainer,
)

from .ctc import greedy_ctc_ids


class SslTrainer(Trainer):
    """`Trainer` that keeps a frozen encoder in eval mode: a linear probe must see fixed features.

    `Trainer.training_step` puts the whole model in train mode before `compute_loss`; with the encoder frozen
    (`--freeze_encoder`, or the first `--freeze_encoder_steps`), its BatchNorm statistics would otherwise
    follow the labeled data and its dropout stay on, so the "frozen" features would still change.
    """

    def compute_loss(self, model, inputs, *args, **kwargs):
        encoder = self.accelerator.unwrap_model(model).conformer
        if not any(p.requires_grad for p in encoder.parameters()):
            encoder.eval()
        return super().compute_loss(model, inputs, *args, **kwargs)


class CtcTrainer(SslTrainer):
    """`SslTrainer` whose evaluation gathers greedy CTC ids instead of full logits.

    The model emits logits on padded steps too (nothing there to predict, but not necessarily blank); without
    the output lengths, `compute_metrics` would decode them as text. This prediction step blanks them, and
    gathering (batch, steps) ids instead of (batch, steps, vocab) logits keeps evaluation memory small.
    """

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if prediction_loss_only or logits is None:
            return loss, logits, labels
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        unwrapped = self.accelerator.unwrap_model(model)
        output_lengths = unwrapped._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
        return loss, greedy_ctc_ids(logits, output_lengths, unwrapped.config.pad_token_id), labels


def classification_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for classification: accuracy of the arg-max class."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == prediction.label_ids).mean())}
