"""Self-supervised losses as pure functions returning a sum and a count.

Hub-bound: copied next to the weights by `save_pretrained`; imports only torch.

Each function returns `LossOutput(loss_sum, count, metrics)`:
  - `loss_sum`: float32 scalar tensor, the un-normalised sum over targets (differentiable);
  - `count`: float32 scalar tensor, the number of targets in that sum (what the sum is divided by);
  - `metrics`: detached float32 sums over the same count (e.g. "correct" for accuracy), so they too are
    normalised once, after gathering across processes: accuracy = all_reduce(correct) / all_reduce(count).
The caller normalises ONCE: loss = weight * sum / count per objective, with sums and counts all-reduced
over processes and accumulation steps (never average per-batch means).

Logits and losses are computed in float32 with autocast disabled (fp16 logits / 0.1 overflow).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class LossOutput(NamedTuple):
    loss_sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def _info_nce(logits: torch.Tensor, candidate_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy with the positive at column 0 over (N, 1 + K) fp32 logits; invalid columns get -inf.

    Returns per-row loss (N,) and per-row correctness (N,) (positive strictly above every valid negative).
    """
    logits = logits.masked_fill(~candidate_valid, float("-inf"))
    loss = torch.logsumexp(logits, dim=-1) - logits[:, 0]
    best_negative = logits[:, 1:].max(dim=-1).values if logits.shape[1] > 1 else torch.full_like(logits[:, 0], -1e30)
    correct = (logits[:, 0] > best_negative).float()
    return loss, correct


def contrastive_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    token_mask: torch.Tensor,
    negative_indices: torch.Tensor,
    negative_valid: torch.Tensor,
    temperature: float,
    target_ids: torch.Tensor | None = None,
) -> LossOutput:
    """wav2vec 2.0 contrastive loss (Baevski et al. 2020, eq. 3) over masked tokens.

    L_t = -log exp(sim(c_t, q_t) / kappa) / sum_{q in {q_t} + Q_t} exp(sim(c_t, q) / kappa), sim = cosine.

    Args:
        predictions: (batch, T', D) context vectors c_t projected to the target width (model head).
        targets: (batch, T', D) positives q_t (quantized or projected clean stacked frames).
        token_mask: (batch, T') bool, the masked tokens that are predicted.
        negative_indices / negative_valid: (batch, T', K) from `masking.sample_negatives(token_mask, K)`.
        temperature: kappa (config `contrastive_logits_temperature`, 0.1).
        target_ids: optional (batch, T', G) code ids of the targets; a negative whose ids all equal the
            positive's is the positive itself (wav2vec2 gives it -inf). Without ids, a negative with
            cosine similarity to the positive >= 1 - 1e-6 counts as equal.

    Rows (masked tokens) with no valid negative are skipped: they would give a trivial zero loss.
    count = number of scored masked tokens; metrics: "correct" (positive ranked first).
    """
    with _no_autocast(predictions.device):
        pred = nn.functional.normalize(predictions.float(), dim=-1, eps=1e-8)
        targ = nn.functional.normalize(targets.float(), dim=-1, eps=1e-8)
        # All-pairs cosine per utterance, (batch, T', T'): cheaper in memory than gathering (N, K, D)
        # negative vectors (8 x 1500 x 100 x 256 floats = 1.2 GB at 60 s) and exact per utterance.
        sims = torch.bmm(pred, targ.transpose(1, 2))  # (batch, T', T')
        batch_index, time_index = token_mask.nonzero(as_tuple=True)  # N masked tokens
        neg_index = negative_indices[batch_index, time_index]  # (N, K)
        neg_valid = negative_valid[batch_index, time_index]  # (N, K)
        candidates = torch.cat([time_index[:, None], neg_index], dim=1)  # (N, 1 + K)
        logits = sims[batch_index[:, None], time_index[:, None], candidates] / temperature  # (N, 1 + K)
        if target_ids is not None:
            pos_ids = target_ids[batch_index, time_index]  # (N, G)
            neg_ids = target_ids[batch_index[:, None], neg_index]  # (N, K, G)
            neg_is_pos = (neg_ids == pos_ids[:, None, :]).all(dim=-1)
        else:
            self_sims = torch.bmm(targ, targ.transpose(1, 2))  # (batch, T', T')
            neg_is_pos = self_sims[batch_index[:, None], time_index[:, None], neg_index] >= 1 - 1e-6
        scored = neg_valid.any(dim=-1)  # rows that have real negatives (before the equal-to-positive rule)
        neg_valid = neg_valid & ~neg_is_pos
        candidate_valid = torch.cat([torch.ones_like(neg_valid[:, :1]), neg_valid], dim=1)
        loss, correct = _info_nce(logits, candidate_valid)
        # A row whose negatives all equal the positive has loss 0 and is still counted (wav2vec2 behaviour).
        loss_sum = (loss * scored).sum()
        return LossOutput(loss_sum, scored.sum().float(), {"correct": (correct * scored).sum().detach()})


def diversity_loss(marginal_probs: torch.Tensor, count: torch.Tensor | float) -> LossOutput:
    """wav2vec 2.0 codebook diversity penalty (eq. 4): (G V - sum_g exp(H(p̄_g))) / (G V).

    Args:
        marginal_probs: (groups, codes) softmax of the code logits averaged over the masked tokens
            (`QuantizerOutput.marginal_probs`).
        count: the number of tokens the marginal was averaged over (masked tokens). As in wav2vec2 the
            per-batch penalty is scaled by it, so the sum / count form of the other losses applies:
            loss_sum = penalty * count. (The marginal itself is per process; that is the reference behaviour.)
    """
    with _no_autocast(marginal_probs.device):
        marginal = marginal_probs.float()
        groups, codes = marginal.shape
        entropy = -(marginal * torch.log(marginal.clamp(min=1e-7))).sum(dim=-1)
        perplexity = torch.exp(entropy).sum()
        penalty = (groups * codes - perplexity) / (groups * codes)
        count = torch.as_tensor(count, dtype=torch.float32, device=marginal.device)
        return LossOutput(penalty * count, count, {"perplexity_sum": (perplexity * count).detach()})


def masked_prediction_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> LossOutput:
    """Cross-entropy on discrete targets at the selected tokens (MLM on Gumbel ids, BEST-RQ/NEST, HuBERT).

    Args:
        logits: (N, C) or (N, books, C) head outputs at the N predicted tokens (masked ones).
        labels: (N,) or (N, books) target ids (quantizer ids or frame labels); `ignore_index` is skipped.

    With several codebooks each (token, codebook) pair is one target, so sum / count is the CE averaged
    over codebooks and tokens (BEST-RQ: average of the per-codebook CEs when every label is present).
    count = valid (token, codebook) pairs; metrics: "correct" (argmax == label).
    """
    with _no_autocast(logits.device):
        logits = logits.float().reshape(-1, logits.shape[-1])  # (N * books, C)
        labels = labels.reshape(-1)
        valid = labels != ignore_index
        loss = nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        correct = (logits.argmax(dim=-1) == labels) & valid
        return LossOutput((loss * valid).sum(), valid.sum().float(), {"correct": correct.sum().float().detach()})


def reconstruction_loss(predictions: torch.Tensor, targets: torch.Tensor, kind: str = "l1") -> LossOutput:
    """Masked reconstruction of the stacked input frames.

    Args:
        predictions: (N, D) head outputs at the N masked tokens.
        targets: (N, D) clean stacked frames at those tokens (`stack_frames`).
        kind: config `reconstruction_loss`, "l1" (|x - y|) or "l2" ((x - y)^2).

    count = N * D (elements), so sum / count is the per-element mean, like `F.l1_loss(reduction="mean")`.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"reconstruction_loss={kind!r} is unknown: use 'l1' or 'l2'.")
    with _no_autocast(predictions.device):
        diff = predictions.float() - targets.float()
        per_element = diff.abs() if kind == "l1" else diff.pow(2)
        count = torch.tensor(float(diff.numel()), device=diff.device)
        return LossOutput(per_element.sum(), count, {})


def regression_loss(predictions: torch.Tensor, targets: torch.Tensor) -> LossOutput:
    """data2vec 2.0's L2 regression of the teacher's averaged layers (Baevski et al. 2022, §3, eq. 2).

    Args:
        predictions: (N, D) decoder outputs at the N masked steps.
        targets: (N, D) the averaged, instance-normalised top-K teacher layers at those steps (`teacher_layers`).

    Each step's squared error is summed over its D dimensions and scaled by 1 / sqrt(D) (fairseq's data2vec 2.0
    `loss_scale` default), so the loss does not grow with the width; count = N steps.
    """
    with _no_autocast(predictions.device):
        diff = predictions.float() - targets.float()
        per_step = diff.pow(2).sum(dim=-1) / diff.shape[-1] ** 0.5
        return LossOutput(per_step.sum(), torch.tensor(float(diff.shape[0]), device=diff.device), {})


def apc_loss(predictions: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, shift: int) -> LossOutput:
    """Autoregressive predictive coding (Chung et al. 2019): L1 between the prediction made at step t
    from causal context and the target frame at t + n.

    Args:
        predictions: (batch, T', D) head outputs of the causal encoder.
        targets: (batch, T', D) clean stacked frames (`stack_frames`).
        lengths: valid tokens per utterance (batch,).
        shift: n (config `apc_shift`, 3).

    Pairs (t, t + n) with t + n < length are scored; count = pairs * D (per-element mean, as the paper's L1).
    """
    with _no_autocast(predictions.device):
        steps = predictions.shape[1]
        if shift >= steps:
            zero = predictions.float().sum() * 0.0
            return LossOutput(zero, torch.zeros((), device=predictions.device), {})
        pred = predictions[:, : steps - shift].float()
        targ = targets[:, shift:].float()
        valid = torch.arange(steps - shift, device=pred.device)[None, :] + shift < lengths[:, None]  # (batch, T'-n)
        per_element = (pred - targ).abs() * valid[..., None]
        count = valid.sum().float() * pred.shape[-1]
        return LossOutput(per_element.sum(), count, {})


def cpc_loss(
    step_predictions: torch.Tensor,
    latents: torch.Tensor,
    lengths: torch.Tensor,
    negative_indices: torch.Tensor,
    negative_valid: torch.Tensor,
) -> LossOutput:
    """Contrastive predictive coding (van den Oord et al. 2018, eq. 4: InfoNCE with f_k = exp(z^T W_k c)).

    Args:
        step_predictions: (steps, batch, T', D) W_k c_t for k = 1..steps (the caller applies one linear
            predictor per step to the causal context c).
        latents: (batch, T', D) z, the encoder-side representations to predict.
        lengths: valid tokens per utterance (batch,).
        negative_indices / negative_valid: (batch, T', K) from `masking.sample_negatives(valid_tokens, K)`:
            for the target z_{t+k} the negatives drawn for position t + k are used, so they are other
            valid steps of the same utterance and never the positive itself.

    Each (t, k) with t + k < length is one target; count = number of such pairs; metrics: "correct".
    """
    with _no_autocast(latents.device):
        num_steps, batch, steps, _ = step_predictions.shape
        z = latents.float()
        total = z.sum() * 0.0
        count = torch.zeros((), device=z.device)
        correct_sum = torch.zeros((), device=z.device)
        time = torch.arange(steps, device=z.device)
        for k in range(1, num_steps + 1):  # k <= 12 steps: one bmm each
            if k >= steps:
                break
            scores = torch.bmm(step_predictions[k - 1].float(), z.transpose(1, 2))  # (batch, T', T'): z_s . W_k c_t
            valid = (time[None, :] + k) < lengths[:, None]  # (batch, T')
            batch_index, time_index = valid.nonzero(as_tuple=True)
            target_index = time_index + k
            neg_index = negative_indices[batch_index, target_index]  # (N, K)
            candidates = torch.cat([target_index[:, None], neg_index], dim=1)
            logits = scores[batch_index[:, None], time_index[:, None], candidates]  # (N, 1 + K)
            candidate_valid = torch.cat(
                [torch.ones_like(neg_index[:, :1], dtype=torch.bool), negative_valid[batch_index, target_index]], dim=1
            )
            loss, correct = _info_nce(logits, candidate_valid)
            total = total + loss.sum()
            count = count + loss.shape[0]
            correct_sum = correct_sum + correct.sum()
        return LossOutput(total, count.float(), {"correct": correct_sum.detach()})


__all__ = [
    "LossOutput",
    "apc_loss",
    "contrastive_loss",
    "cpc_loss",
    "diversity_loss",
    "masked_prediction_loss",
    "reconstruction_loss",
    "regression_loss",
]
