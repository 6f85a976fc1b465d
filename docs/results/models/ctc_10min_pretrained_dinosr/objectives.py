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
  - `teacher`: it predicts from an EMA teacher (data2vec 2.0, DinoSR): the model then holds `teacher`, a frozen
    copy of the encoder that reads the unmasked input and follows the student after each optimiser step
    (`ConformerSslForPreTraining.update_teacher`).
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
    regression_loss,
)
from .masking import sample_negatives
from .targets import (
    GumbelVectorQuantizer,
    OnlineCodebooks,
    QuantizerOutput,
    RandomProjectionQuantizer,
    code_histogram,
    step_labels,
    teacher_layers,
)

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
    # objective -> (books, codes) histogram of its target ids at the masked steps: summed over batches and
    # processes by the loop before coverage and entropy are computed (`targets.codebook_usage`).
    code_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    # "<module>/<name>" -> statistics for `update_teacher` after the optimiser step (DinoSR's codebook sums and
    # counts): summed over micro-batches and processes first, so every process applies the same update.
    teacher_statistics: dict[str, torch.Tensor] = field(default_factory=dict)

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
        teacher_hidden_states: the EMA teacher's hidden states over the clean, unmasked input, or None. With
            `config.clone_batch` = c the student batch is c copies of the teacher's: student row i reads
            teacher row i % teacher batch.
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
    teacher_hidden_states: tuple[torch.Tensor, ...] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def hidden(self, spec: Mapping[str, Any]) -> torch.Tensor:
        """The hidden state an objective reads: `spec["layer"]` indexes `hidden_states`."""
        return self.hidden_states[spec["layer"]]

    def teacher_targets(self, top_k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(teacher row of each masked step (N,), the top_k instance-normalised teacher layers (B0, T', D)),
        computed once per forward whoever asks first (data2vec and DinoSR read the same layers)."""
        if self.teacher_hidden_states is None:
            raise ValueError("this objective reads the EMA teacher, but forward ran without one")
        key = f"teacher_top{top_k}"
        if key not in self.cache:
            teacher_batch = self.teacher_hidden_states[0].shape[0]
            lengths = self.step_lengths[:teacher_batch]  # the clones are tiled copies: rows 0..B0-1 are the originals
            self.cache[key] = teacher_layers(self.teacher_hidden_states, lengths, top_k)
        b, _ = self.masked
        return b % self.teacher_hidden_states[0].shape[0], self.cache[key]

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
    teacher: bool = False


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
    ctx.book.code_counts["bestrq"] = code_histogram(codes.code_ids, ctx.token_mask, config.bestrq_codebook_size)
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


class Data2VecDecoder(nn.Module):
    """data2vec 2.0's light convolutional decoder (Baevski et al. 2022, §3): the student's output at every step
    -> a prediction of the teacher target, so the encoder itself need not fill in the masked steps.

    input Linear(hidden -> dim), then `layers` x [Conv1d(kernel, groups) -> LayerNorm (no affine) -> GELU] with a
    residual around every block but the first, then Linear(dim -> hidden). Padded steps are zeroed before each
    convolution so padding never leaks into real steps (lengths from the forward's `step_lengths`).

    With `mask_token=True` (data2vec's `encode_unmasked_only`: the student encoder skipped the masked steps) a
    learned vector `mask_token` (hidden,) stands at the masked steps of the decoder's input: the decoder sees the
    encoder's outputs at the unmasked steps and mask tokens at the masked ones (data2vec 2.0, §3; the paper fills
    them with N(0, 0.01^2) noise, a learned token is ours).
    """

    def __init__(self, hidden_size: int, dim: int, kernel: int, layers: int, groups: int, mask_token: bool = False):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(hidden_size)) if mask_token else None  # init: _init_weights
        self.input = nn.Linear(hidden_size, dim)
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups) for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False) for _ in range(layers))
        self.output = nn.Linear(dim, hidden_size)

    def forward(
        self, hidden: torch.Tensor, lengths: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch, T', hidden), (batch,) valid steps [, (batch, T') bool masked steps that the encoder skipped, filled
        with `mask_token`] -> (batch, T', hidden)."""
        if token_mask is not None:
            hidden = torch.where(token_mask[..., None], self.mask_token.to(hidden.dtype), hidden)
        valid = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None])[..., None]
        x = self.input(hidden)  # (batch, T', dim)
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = conv((x * valid).transpose(1, 2)).transpose(1, 2)
            y = nn.functional.gelu(norm(y))
            x = y if index == 0 else x + y
        return self.output(x)


def _data2vec(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """data2vec 2.0 (Baevski et al. 2022): regress the average of the teacher's top-K instance-normalised layers
    (teacher: EMA of the student, unmasked input) at the masked steps, through a light conv decoder."""
    b, t = ctx.masked
    rows, layers = ctx.teacher_targets(spec["top_k_layers"])
    targets = torch.stack(layers).mean(dim=0)  # y_t = 1/K sum_l IN(a_t^l), (B0, T', hidden)
    # f(x) at every step; with encode_unmasked_only the masked steps were never encoded: the decoder's mask token
    skipped = ctx.token_mask if spec["encode_unmasked_only"] else None
    predictions = model.data2vec_decoder(ctx.hidden(spec), ctx.step_lengths, skipped)
    return regression_loss(predictions[b, t], targets[rows, t])


def _dinosr(model: nn.Module, ctx: ObjectiveContext, spec: Mapping[str, Any]) -> LossOutput:
    """DinoSR (Liu et al. 2023): the id of each top-K teacher layer's nearest online codeword at the masked
    steps, one cross-entropy per codebook, averaged. The codeword statistics go to `update_teacher`."""
    b, t = ctx.masked
    rows, layers = ctx.teacher_targets(spec["top_k_layers"])
    vectors = torch.stack([layer[rows, t] for layer in layers])  # (K, N, hidden)
    codebooks: OnlineCodebooks = model.dinosr_codebooks
    ids = codebooks.assign(vectors)  # (N, K): nearest codeword of each layer's vector
    sums, counts = codebooks.statistics(vectors, ids)
    if model.training:  # validation never moves the codebooks
        ctx.book.teacher_statistics["dinosr_codebooks/sums"] = sums
        ctx.book.teacher_statistics["dinosr_codebooks/counts"] = counts
    ctx.book.code_counts["dinosr"] = counts.long()
    logits = model.dinosr_head(ctx.hidden(spec)[b, t]).view(-1, codebooks.num_codebooks, codebooks.codebook_size)
    return masked_prediction_loss(logits, ids)


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
                input_layer_norm=c.bestrq_input_layer_norm,
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
    "data2vec": Objective(
        reads="masked",
        loss=_data2vec,
        heads=lambda c: {
            "data2vec_decoder": lambda: Data2VecDecoder(
                c.hidden_size,
                c.objectives["data2vec"]["decoder_dim"],
                c.objectives["data2vec"]["decoder_kernel"],
                c.objectives["data2vec"]["decoder_layers"],
                c.objectives["data2vec"]["decoder_groups"],
                mask_token=c.objectives["data2vec"]["encode_unmasked_only"],
            )
        },
        # data2vec 2.0 audio: K = 8 top layers; decoder 4 x conv(kernel 7), 384 wide in 16 groups.
        # encode_unmasked_only: the paper's MAE-style student (only the unmasked steps through the blocks); False
        # keeps data2vec 1.0's student, which encodes the masked steps with the mask embedding.
        defaults={
            **COMMON_DEFAULTS,
            "top_k_layers": 8,
            "decoder_layers": 4,
            "decoder_kernel": 7,
            "decoder_dim": 384,
            "decoder_groups": 16,
            "encode_unmasked_only": False,
        },
        teacher=True,
        summary="data2vec 2.0: the EMA teacher's averaged top-K layers at masked steps (L2, conv decoder)",
    ),
    "dinosr": Objective(
        reads="masked",
        loss=_dinosr,
        heads=lambda c: {
            "dinosr_codebooks": lambda: OnlineCodebooks(
                c.objectives["dinosr"]["top_k_layers"], c.objectives["dinosr"]["codebook_size"], c.hidden_size
            ),
            "dinosr_head": lambda: nn.Linear(
                c.hidden_size, c.objectives["dinosr"]["top_k_layers"] * c.objectives["dinosr"]["codebook_size"]
            ),
        },
        # DinoSR: 8 codebooks of 256 codes on the top 8 teacher layers, codeword EMA decay 0.9.
        defaults={**COMMON_DEFAULTS, "top_k_layers": 8, "codebook_size": 256, "codebook_decay": 0.9},
        fp32_modules=("dinosr_codebooks",),
        teacher=True,
        summary="DinoSR: each top-K teacher layer's online-clustered codeword id at masked steps",
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
    "Data2VecDecoder",
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "PASSES",
    "LossBook",
    "Objective",
    "ObjectiveContext",
    "objective_settings",
]
