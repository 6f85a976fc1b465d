"""The self-supervised objectives of `ConformerSslForPreTraining`, as one closed dict: `OBJECTIVES`.

Hub-bound: copied next to the weights by `save_pretrained`; imports only torch and flat siblings.

Each entry is everything one objective adds:
  - `reads`: the encoder pass it predicts from. "masked": the features are masked before the encoder and the
    objective predicts at the masked steps (wav2vec 2.0, BEST-RQ, HuBERT, reconstruction). "clean": the causal
    encoder reads the clean features and the objective predicts the future (APC, CPC). A recipe that mixes
    both kinds runs the encoder once per kind.
  - `defaults`: its settings in `config.objectives[name]`: `weight`, `start_step`, `layer` (the hidden state
    it reads: -1 last block, 0 subsampling output, k block k), plus any settings of its own.
  - `heads`: the modules it adds to the model, by attribute name (a module that two objectives share, like
    the Gumbel quantizer of contrastive and mlm, is built once; the names are the checkpoint keys).
  - `loss(model, ctx, spec)`: its `LossOutput` (sum, count, metrics) from a pure function of `losses.py`.
Adding an objective means adding its entry here and its loss function in `losses.py`; the config, the model,
its initialisation and the pretraining recipes read everything else from the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .losses import (
    LossOutput,
    apc_loss,
    contrastive_loss,
    cpc_loss,
    diversity_loss,
    masked_prediction_loss,
    reconstruction_loss,
)
from .masking import sample_negatives
from .targets import GumbelVectorQuantizer, QuantizerOutput, RandomProjectionQuantizer, step_labels

# The settings every objective has, and their defaults (an entry may add its own).
COMMON_DEFAULTS: dict[str, Any] = {"weight": 1.0, "start_step": 0, "layer": -1}
PASSES = ("masked", "clean")
DEFAULT_OBJECTIVE = "bestrq"  # config.objectives=None means NEST / BEST-RQ alone


@dataclass
class LossBook:
    """Each objective's (sum, count, weight) and the metrics of one forward, in the order they were added."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, result: LossOutput, weight: float) -> None:
        self.sums[name], self.counts[name], self.weights[name] = result.loss_sum, result.count, float(weight)
        if "correct" in result.metrics:
            self.metrics[f"{name}_correct"] = result.metrics["correct"]
            self.metrics[f"{name}_accuracy"] = result.metrics["correct"] / result.count.clamp(min=1.0)


@dataclass
class ObjectiveContext:
    """What one encoder pass offers the objectives that read it (made once per pass in `forward`).

    Args:
        config: the model's `ConformerSslConfig`.
        hidden_states: num_hidden_layers + 1 tensors (batch, T', hidden): subsampling output, then each block.
        stacked: (batch, T', factor * n_mels) clean log-mel frames stacked per encoder step (`stack_frames`):
            what reconstruction, APC and the quantizers predict or encode.
        step_lengths: (batch,) valid encoder steps.
        frame_lengths: (batch,) valid feature frames.
        book: where losses (also auxiliary ones) and metrics go.
        generator: randomness of negatives and Gumbel noise (the forward's `generator`).
        gumbel_temperature: this step's Gumbel-softmax temperature (forward argument, the loop's schedule).
        token_mask: (batch, T') bool, the masked encoder steps ("masked" pass only).
        frame_labels: (batch, frames) long external labels, -100 padded (HuBERT), or None.
        sampled_negative_indices: explicit contrastive distractors (batch, T', K), -1 = none, or None.
    """

    config: Any
    hidden_states: tuple[torch.Tensor, ...]
    stacked: torch.Tensor
    step_lengths: torch.Tensor
    frame_lengths: torch.Tensor
    book: LossBook
    generator: torch.Generator | None = None
    gumbel_temperature: float = 2.0
    token_mask: torch.Tensor | None = None
    frame_labels: torch.Tensor | None = None
    sampled_negative_indices: torch.Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def hidden(self, spec: Mapping[str, Any]) -> torch.Tensor:
        """The hidden state an objective reads: `spec["layer"]` indexes `hidden_states`."""
        return self.hidden_states[spec["layer"]]

    @property
    def masked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, step index) of the N masked steps, in row-major order."""
        if "masked" not in self.cache:
            self.cache["masked"] = self.token_mask.nonzero(as_tuple=True)
        return self.cache["masked"]


@dataclass(frozen=True)
class Objective:
    """One self-supervised objective: see the module docstring."""

    reads: str
    loss: Callable[[nn.Module, ObjectiveContext, Mapping[str, Any]], LossOutput]
    heads: Callable[[Any], dict[str, Callable[[], nn.Module]]]
    defaults: Mapping[str, Any] = field(default_factory=lambda: dict(COMMON_DEFAULTS))
    fp32_modules: tuple[str, ...] = ()  # kept in float32 whatever dtype the model is loaded in
    summary: str = ""


def _stacked_dim(config: Any) -> int:
    return config.subsampling_factor * config.num_mel_bins


def _gumbel_quantizer(config: Any) -> Callable[[], nn.Module]:
    return lambda: GumbelVectorQuantizer(
        _stacked_dim(config), config.num_codevector_groups, config.num_codevectors_per_group, config.codevector_dim
    )


def _gumbel_codes(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> QuantizerOutput:
    """The Gumbel codes of the clean stacked frames, shared by contrastive and mlm (quantized once per forward).

    wav2vec 2.0's diversity penalty (eq. 4) keeps the codes in use; the first objective that asks owns it, with
    weight `diversity_loss_weight` times its own weight (contrastive comes before mlm in `OBJECTIVES`).
    """
    if "gumbel" not in ctx.cache:
        quantized = model.quantizer(
            ctx.stacked, ctx.gumbel_temperature, selected=ctx.token_mask, generator=ctx.generator
        )
        ctx.book.metrics["codebook_perplexity"] = quantized.perplexity.detach()
        ctx.book.metrics["codebook_usage"] = quantized.codes_used.detach()
        num_masked = ctx.token_mask.sum().float()
        weight = ctx.config.diversity_loss_weight * spec["weight"]
        ctx.book.add("diversity", diversity_loss(quantized.marginal_probs, num_masked), weight)
        ctx.cache["gumbel"] = quantized
    return ctx.cache["gumbel"]


# ----------------------------------------------------------------------------------------------- masked


def _contrastive(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """wav2vec 2.0 (Baevski et al. 2020, eq. 3): pick the true target of each masked step among K distractors."""
    config = ctx.config
    quantized = _gumbel_codes(model, ctx, spec)
    if config.contrastive_target == "quantized":
        targets, target_ids = model.project_q(quantized.codevectors), quantized.code_ids  # q_t
    else:
        targets, target_ids = model.project_q(ctx.stacked), None
    predictions = model.project_hid(ctx.hidden(spec))  # c_t, (batch, T', P)
    if ctx.sampled_negative_indices is None:
        negatives, negative_valid = sample_negatives(ctx.token_mask, config.num_negatives, ctx.generator)
    else:
        negatives = ctx.sampled_negative_indices.clamp(min=0)
        negative_valid = (ctx.sampled_negative_indices >= 0) & ctx.token_mask[..., None]
    return contrastive_loss(
        predictions,
        targets,
        ctx.token_mask,
        negatives,
        negative_valid,
        config.contrastive_logits_temperature,
        target_ids,
    )


def _mlm(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """Masked prediction of the Gumbel ids (NeMo's MLM): one class per combination of group codes (V^G)."""
    config = ctx.config
    b, t = ctx.masked
    ids = _gumbel_codes(model, ctx, spec).greedy_ids[b, t]  # (N, G): noise-free ids are stable targets
    place = config.num_codevectors_per_group ** torch.arange(
        config.num_codevector_groups - 1, -1, -1, device=ids.device
    )
    logits = model.mlm_head(ctx.hidden(spec)[b, t])
    return masked_prediction_loss(logits, (ids * place).sum(-1))


def _bestrq(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """BEST-RQ / NEST (Chiu et al. 2022, Huang et al. 2024): predict a frozen random-projection quantizer's ids
    of the clean stacked frames at masked steps; with several codebooks the cross-entropies are averaged."""
    config = ctx.config
    b, t = ctx.masked
    codes = model.bestrq_quantizer(ctx.stacked, ctx.step_lengths, selected=ctx.token_mask)
    ctx.book.metrics["bestrq_perplexity"] = codes.perplexity.detach()
    ctx.book.metrics["bestrq_usage"] = codes.codes_used.detach()
    logits = model.bestrq_head(ctx.hidden(spec)[b, t])
    logits = logits.view(-1, config.bestrq_num_codebooks, config.bestrq_codebook_size)  # (N, books, codes)
    return masked_prediction_loss(logits, codes.code_ids[b, t])


def _hubert(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """HuBERT (Hsu et al. 2021): predict external frame labels (k-means ids) at masked steps."""
    config = ctx.config
    if ctx.frame_labels is None:
        raise ValueError(
            "objective 'hubert' needs frame_labels (batch, frames), -100 padded: add `frame_labels` to the "
            "manifest (scripts/make_kmeans_labels.py writes them)."
        )
    labels = step_labels(
        ctx.frame_labels.to(ctx.stacked.device).long(),
        ctx.frame_lengths,
        config.subsampling_factor,
        ctx.token_mask.shape[1],
    )
    if int(labels.max()) >= config.hubert_num_labels:
        raise ValueError(
            f"frame_labels contain {int(labels.max())} >= ConformerSslConfig.hubert_num_labels="
            f"{config.hubert_num_labels}: set hubert_num_labels to the number of clusters."
        )
    b, t = ctx.masked
    return masked_prediction_loss(model.hubert_head(ctx.hidden(spec)[b, t]), labels[b, t])


def _reconstruction(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """Masked reconstruction: regress the clean stacked frames of each masked step (L1 or L2)."""
    b, t = ctx.masked
    predictions = model.reconstruction_head(ctx.hidden(spec)[b, t])
    return reconstruction_loss(predictions, ctx.stacked[b, t], ctx.config.reconstruction_loss)


# ----------------------------------------------------------------------------------------------- clean (causal)


def _apc(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """APC (Chung et al. 2019): from causal context, predict the stacked frames `apc_shift` steps ahead."""
    predictions = model.apc_head(ctx.hidden(spec))  # (batch, T', factor * n_mels): frame t + n
    return apc_loss(predictions, ctx.stacked, ctx.step_lengths, ctx.config.apc_shift)


def _cpc(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """CPC (van den Oord et al. 2018): InfoNCE of the latents 1..k steps ahead, one linear predictor W_k each."""
    config = ctx.config
    context = ctx.hidden(spec)  # c_t from causal context
    latents = ctx.hidden_states[0]  # z_t: the subsampling output (CPC's g_enc)
    batch, steps, width = context.shape
    predictions = model.cpc_predictors(context).view(batch, steps, config.cpc_steps, width).permute(2, 0, 1, 3)
    valid_steps = torch.arange(steps, device=context.device)[None, :] < ctx.step_lengths[:, None]
    negatives, negative_valid = sample_negatives(valid_steps, config.cpc_num_negatives, ctx.generator)
    return cpc_loss(predictions, latents, ctx.step_lengths, negatives, negative_valid)


OBJECTIVES: dict[str, Objective] = {
    "contrastive": Objective(
        reads="masked",
        loss=_contrastive,
        heads=lambda c: {
            "quantizer": _gumbel_quantizer(c),
            "project_q": lambda: nn.Linear(
                c.codevector_dim if c.contrastive_target == "quantized" else _stacked_dim(c), c.proj_codevector_dim
            ),
            "project_hid": lambda: nn.Linear(c.hidden_size, c.proj_codevector_dim),
        },
        summary="wav2vec 2.0: the true (quantized or projected) target of each masked step among distractors",
    ),
    "mlm": Objective(
        reads="masked",
        loss=_mlm,
        heads=lambda c: {
            "quantizer": _gumbel_quantizer(c),
            "mlm_head": lambda: nn.Linear(c.hidden_size, c.num_codevectors_per_group**c.num_codevector_groups),
        },
        summary="the Gumbel quantizer's id of each masked step (NeMo's MLM)",
    ),
    "bestrq": Objective(
        reads="masked",
        loss=_bestrq,
        heads=lambda c: {
            "bestrq_quantizer": lambda: RandomProjectionQuantizer(
                _stacked_dim(c),
                c.bestrq_codebook_dim,
                c.bestrq_codebook_size,
                c.bestrq_num_codebooks,
                normalize_input=c.bestrq_normalize_input,
            ),
            "bestrq_head": lambda: nn.Linear(c.hidden_size, c.bestrq_num_codebooks * c.bestrq_codebook_size),
        },
        fp32_modules=("bestrq_quantizer",),
        summary="BEST-RQ / NEST: a frozen random-projection codebook's id of each masked step",
    ),
    "hubert": Objective(
        reads="masked",
        loss=_hubert,
        heads=lambda c: {"hubert_head": lambda: nn.Linear(c.hidden_size, c.hubert_num_labels)},
        summary="HuBERT: external frame labels (k-means ids) at masked steps",
    ),
    "reconstruction": Objective(
        reads="masked",
        loss=_reconstruction,
        heads=lambda c: {"reconstruction_head": lambda: nn.Linear(c.hidden_size, _stacked_dim(c))},
        summary="the clean stacked frames of each masked step (L1 or L2)",
    ),
    "apc": Objective(
        reads="clean",
        loss=_apc,
        heads=lambda c: {"apc_head": lambda: nn.Linear(c.hidden_size, _stacked_dim(c))},
        summary="APC: the frames apc_shift steps ahead, from causal context",
    ),
    "cpc": Objective(
        reads="clean",
        loss=_cpc,
        # W_1 .. W_k stacked in one matrix
        heads=lambda c: {"cpc_predictors": lambda: nn.Linear(c.hidden_size, c.cpc_steps * c.hidden_size, bias=False)},
        summary="CPC: the latents 1..cpc_steps ahead among same-utterance negatives, from causal context",
    ),
}


def objective_settings(objectives: Mapping[str, Mapping[str, Any] | None] | None) -> dict[str, dict[str, Any]]:
    """`config.objectives` with every entry's defaults filled in (None: `DEFAULT_OBJECTIVE` alone).

    Unknown names and keys are left for `ConformerSslConfig.validate` to report.
    """
    if objectives is None:
        objectives = {DEFAULT_OBJECTIVE: None}
    filled = {}
    for name, spec in dict(objectives).items():
        defaults = OBJECTIVES[name].defaults if name in OBJECTIVES else COMMON_DEFAULTS
        filled[name] = {**defaults, **(spec or {})}
    return filled


__all__ = [
    "COMMON_DEFAULTS",
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "PASSES",
    "LossBook",
    "Objective",
    "ObjectiveContext",
    "objective_settings",
]
