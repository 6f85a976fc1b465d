"""Prediction targets for self-supervised pretraining: frame stacking and the two quantizers.

Hub-bound: copied next to the weights by `save_pretrained`; imports only torch (flat siblings otherwise).

- `stack_frames`: the clean log-mel frames grouped by the subsampling factor, one target per encoder step.
- `GumbelVectorQuantizer` (wav2vec 2.0, Baevski et al. 2020, §2): G groups of V learned codes, a code
  per group picked by straight-through hard Gumbel-softmax in training and argmax in eval; the codes of
  the groups are concatenated.
- `RandomProjectionQuantizer` (BEST-RQ, Chiu et al. 2022; NEST, Huang et al. 2024): a frozen random
  projection and frozen random unit codebooks; the target id is the nearest code (cosine) of the
  projected, normalised input. Stored as float32 buffers so they are saved with the model.
- `teacher_layers` (data2vec 2.0, DinoSR): the top-K hidden states of the EMA teacher, each instance-normalised
  over the valid steps of its utterance.
- `OnlineCodebooks` (DinoSR, Liu et al. 2023): one codebook per teacher layer, updated by an exponential
  moving average of the teacher vectors assigned to each code; buffers, synced by the caller across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from .frames import output_lengths


def stack_frames(features: torch.Tensor, lengths: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group `factor` consecutive frames into one token: (batch, T, F) -> (batch, ceil(T / factor), factor * F).

    Args:
        features: clean log-mel features (batch, T, n_mels) from the feature extractor.
        lengths: valid frames per utterance (batch,), e.g. `attention_mask.sum(-1)`.
        factor: config `subsampling_factor`.

    Returns:
        stacked (batch, T', factor * F) with frames past each length zeroed (the last token of an
        utterance may be partial), and token_lengths = ceil(lengths / factor), which equals the
        encoder's output lengths (ceil(L/2) per stride-2 stage).
    """
    batch, max_len, num_features = features.shape
    num_tokens = -(-max_len // factor)
    valid = torch.arange(max_len, device=features.device)[None, :] < lengths[:, None]  # (batch, T)
    features = features.masked_fill(~valid[..., None], 0.0)
    features = nn.functional.pad(features, (0, 0, 0, num_tokens * factor - max_len))
    stacked = features.reshape(batch, num_tokens, factor * num_features)  # frame-major: [f0 mels, f1 mels, ...]
    return stacked, output_lengths(lengths, factor)


def step_labels(frame_labels: torch.Tensor, lengths: torch.Tensor, factor: int, steps: int) -> torch.Tensor:
    """Frame-rate labels (batch, T) -> (batch, steps): the label of each step's middle valid frame, -100 past the end.

    Args:
        frame_labels: external labels per 10 ms frame (HuBERT k-means ids), -100 padded (from the collator).
        lengths: valid frames per utterance (batch,).
        factor: config `subsampling_factor`: frames per encoder step.
        steps: encoder steps of the batch (T').
    """
    step = torch.arange(steps, device=frame_labels.device)
    frame = torch.minimum(step[None, :] * factor + factor // 2, (lengths - 1).clamp(min=0)[:, None])
    labels = torch.gather(frame_labels, 1, frame.clamp(max=frame_labels.shape[1] - 1))  # (batch, steps)
    return labels.masked_fill(step[None, :] >= output_lengths(lengths, factor)[:, None], -100)


def normalize_per_utterance(x: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-utterance, per-dimension standardisation over the valid steps of x (batch, T, D), in float32.

    Padding steps are ignored by the statistics and zeroed in the output.
    """
    x = x.float()
    valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[..., None]  # (batch, T, 1)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)  # (batch, 1, 1)
    mean = (x * valid).sum(dim=1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
    return ((x - mean) / torch.sqrt(var + eps)).masked_fill(~valid, 0.0)


def teacher_layers(hidden_states: tuple[torch.Tensor, ...], lengths: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """The top `top_k` block outputs of the teacher, each instance-normalised (data2vec 2.0 §3, DinoSR §2.2).

    Args:
        hidden_states: the teacher's num_hidden_layers + 1 hidden states (batch, T', D) (`ConformerSslModel`
            with `output_hidden_states=True`, unmasked input).
        lengths: (batch,) valid encoder steps; padding is left out of the statistics and zeroed.
        top_k: how many of the last blocks (data2vec 2.0 and DinoSR: 8).

    Instance norm = per utterance and channel, over time: the same statistics as `normalize_per_utterance`.
    Returns top_k float32 tensors (batch, T', D), lowest block first.
    """
    return [normalize_per_utterance(h.detach(), lengths, eps=1e-5) for h in hidden_states[-top_k:]]


class OnlineCodebooks(nn.Module):
    """DinoSR's online-clustered codebooks (Liu et al. 2023, §2.2), one per teacher layer.

    Codeword v of codebook k is e_kv = s_kv / n_kv, where after every optimiser step

        s_kv <- tau * s_kv + (1 - tau) * sum of the teacher vectors assigned to v
        n_kv <- tau * n_kv + (1 - tau) * number of those vectors

    (tau = `decay`, DinoSR: 0.9). A code that nobody picked keeps its codeword (s and n shrink together).
    `sums` and `counts` are persistent float32 buffers: saved with the model, never trained. The statistics
    of a step come from `statistics()`; the caller sums them over micro-batches and processes before
    `update()`, so every process holds the same codebooks (never updated inside `forward`).

    Args:
        num_codebooks: K, one per teacher layer (the objective's `top_k_layers`).
        codebook_size: V codes per codebook (DinoSR: 256).
        dim: width of the teacher vectors (hidden_size).
    """

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.num_codebooks, self.codebook_size, self.dim = num_codebooks, codebook_size, dim
        self.register_buffer("sums", torch.zeros(num_codebooks, codebook_size, dim), persistent=True)
        self.register_buffer("counts", torch.ones(num_codebooks, codebook_size), persistent=True)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Codewords from N(0, 1), the scale of instance-normalised teacher vectors (counts 1)."""
        init.copy_(self.sums, torch.randn(self.sums.shape, generator=generator, device="cpu").to(self.sums.device))
        init.ones_(self.counts)

    @property
    def codewords(self) -> torch.Tensor:
        """(K, V, D) float32: s / n."""
        return self.sums.float() / self.counts.float().clamp(min=1e-6)[..., None]

    @torch.no_grad()
    def assign(self, vectors: torch.Tensor) -> torch.Tensor:
        """Nearest codeword (L2) of each vector: (K, N, D) -> (N, K) long ids."""
        with torch.autocast(device_type=vectors.device.type, enabled=False):
            x, codes = vectors.float(), self.codewords
            # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 is the same for every code of a row.
            scores = torch.baddbmm(codes.pow(2).sum(-1)[:, None, :], x, codes.transpose(1, 2), alpha=-2.0)
            return scores.argmin(dim=-1).transpose(0, 1)  # (N, K)

    @torch.no_grad()
    def statistics(self, vectors: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's per-code sums (K, V, D) and counts (K, V) of `vectors` (K, N, D) under `ids` (N, K)."""
        k, _, d = vectors.shape
        flat = (ids.T + torch.arange(k, device=ids.device)[:, None] * self.codebook_size).reshape(-1)  # (K * N,)
        sums = torch.zeros(k * self.codebook_size, d, device=vectors.device, dtype=torch.float32)
        sums.index_add_(0, flat, vectors.float().reshape(-1, d))
        counts = torch.bincount(flat, minlength=k * self.codebook_size).float()
        return sums.view(k, self.codebook_size, d), counts.view(k, self.codebook_size)

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor, decay: float) -> None:
        """One EMA step with the statistics of a whole optimiser step, summed over processes (see the class)."""
        self.sums.mul_(decay).add_(sums.to(self.sums), alpha=1.0 - decay)
        self.counts.mul_(decay).add_(counts.to(self.counts), alpha=1.0 - decay)


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    codevectors: (batch, T, dim) quantized vectors (Gumbel only; None for the random-projection quantizer).
    code_ids: (batch, T, groups or codebooks) long.
    marginal_probs: (groups, codes) soft code distribution averaged over the selected steps (Gumbel: the
        input of the diversity loss) or None.
    perplexity: sum over groups of exp(entropy of the marginal) (soft for Gumbel, hard for random projection).
    codes_used: fraction of all codes picked (hard ids) at least once among the selected steps.
    greedy_ids: (batch, T, groups) argmax of the noise-free code logits (Gumbel: stable MLM targets; equals
        code_ids in eval and for the random-projection quantizer).
    """

    codevectors: torch.Tensor | None
    code_ids: torch.Tensor
    marginal_probs: torch.Tensor | None
    perplexity: torch.Tensor
    codes_used: torch.Tensor
    greedy_ids: torch.Tensor | None = None


def _perplexity(marginal: torch.Tensor) -> torch.Tensor:
    """sum_g exp(-sum_v p_gv log p_gv) for a (groups, codes) distribution."""
    entropy = -(marginal * torch.log(marginal.clamp(min=1e-7))).sum(dim=-1)  # (groups,)
    return torch.exp(entropy).sum()


def code_histogram(code_ids: torch.Tensor, selected: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each code is picked at the selected steps: (batch, T, groups) ids -> (groups, codes) int64.

    Histograms add up over batches and processes, so coverage and entropy of a whole logging interval and of
    all processes come from their sum (`codebook_usage`), not from an average of per-batch figures.
    """
    ids = code_ids[selected]  # (N, groups)
    groups = code_ids.shape[-1]
    offsets = torch.arange(groups, device=ids.device) * num_codes
    return torch.bincount((ids + offsets).reshape(-1), minlength=groups * num_codes).view(groups, num_codes)


def codebook_usage(histogram: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per codebook of a (groups, codes) histogram: "coverage" (fraction of codes used), "entropy" (nats) and
    "perplexity" (exp entropy), each (groups,)."""
    marginal = histogram.double() / histogram.double().sum(dim=-1, keepdim=True).clamp(min=1)
    entropy = -(marginal * torch.log(marginal.clamp(min=1e-12))).sum(dim=-1)
    return {"coverage": (histogram > 0).float().mean(dim=-1), "entropy": entropy, "perplexity": entropy.exp()}


def _hard_usage(code_ids: torch.Tensor, selected: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard code histogram of the selected steps: (perplexity, fraction of codes used)."""
    counts = code_histogram(code_ids, selected, num_codes)
    marginal = counts.float() / counts.sum(dim=-1, keepdim=True).clamp(min=1).float()
    return _perplexity(marginal), (counts > 0).float().mean()


class GumbelVectorQuantizer(nn.Module):
    """Product quantizer with Gumbel-softmax code selection (wav2vec 2.0 §2, "Quantization module").

    Args:
        input_dim: width of the vectors to quantize (stacked frames, factor * n_mels).
        num_groups: G (config `num_codevector_groups`).
        num_codes: V per group (config `num_codevectors_per_group`).
        codevector_dim: width of the concatenated output (config `codevector_dim`), split evenly over groups.
    """

    def __init__(self, input_dim: int, num_groups: int, num_codes: int, codevector_dim: int) -> None:
        super().__init__()
        if codevector_dim % num_groups != 0:
            raise ValueError(
                f"codevector_dim={codevector_dim} must be a multiple of num_codevector_groups={num_groups}."
            )
        self.num_groups = num_groups
        self.num_codes = num_codes
        self.weight_proj = nn.Linear(input_dim, num_groups * num_codes)
        # (groups, codes, dim / groups): one table per group, picked entries are concatenated.
        self.codevectors = nn.Parameter(torch.empty(num_groups, num_codes, codevector_dim // num_groups))
        self.reset_parameters()

    @property
    def weight_proj_std(self) -> float:
        """Init std of the code-logit projection: 1 / sqrt(input_dim), so the logits start at unit scale."""
        return self.weight_proj.in_features**-0.5

    def reset_parameters(self) -> None:
        """Codes U(0, 1); the code-logit projection N(0, 1 / input_dim) with zero bias: small logits at the start,
        so every code gets probability mass (wav2vec2 inits the projection N(0, 1); we only need the first choices spread out).

        The model's `_init_weights` calls this too (after the generic Linear init), so the init sticks; the
        `transformers.initialization` functions leave tensors loaded from a checkpoint alone.
        """
        init.uniform_(self.codevectors)
        init.normal_(self.weight_proj.weight, std=self.weight_proj_std)
        init.zeros_(self.weight_proj.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temperature: float,
        selected: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> QuantizerOutput:
        """Quantize (batch, T, input_dim).

        Args:
            hidden_states: vectors to quantize (stacked clean frames).
            temperature: Gumbel temperature tau, from the training loop's schedule (2 -> 0.5).
            selected: (batch, T) bool, the steps whose code statistics feed the diversity loss and the
                usage metrics (masked tokens in wav2vec2); None = all steps.
            generator: randomness of the Gumbel noise.
        """
        batch, steps, _ = hidden_states.shape
        if selected is None:
            selected = torch.ones(batch, steps, dtype=torch.bool, device=hidden_states.device)
        # Code logits and softmaxes in float32 even under autocast: fp16 Gumbel noise overflows.
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            logits = nn.functional.linear(
                hidden_states.float(), self.weight_proj.weight.float(), self.weight_proj.bias.float()
            )
            logits = logits.view(batch, steps, self.num_groups, self.num_codes)
            if self.training:
                gen_device = generator.device if generator is not None else logits.device
                u = torch.rand(logits.shape, generator=generator, device=gen_device).to(logits.device)
                gumbel = -torch.log(-torch.log(u.clamp(min=1e-10, max=1.0 - 1e-7)))
                soft = torch.softmax((logits + gumbel) / temperature, dim=-1)
                code_ids = soft.argmax(dim=-1)  # (batch, T, groups)
                hard = nn.functional.one_hot(code_ids, self.num_codes).to(soft.dtype)
                weights = hard - soft.detach() + soft  # straight-through: hard forward, soft gradient
            else:
                code_ids = logits.argmax(dim=-1)
                weights = nn.functional.one_hot(code_ids, self.num_codes).to(logits.dtype)
            # Diversity uses the noise-free softmax averaged over the selected steps (wav2vec2 eq. 4).
            probs = torch.softmax(logits[selected], dim=-1)  # (N, groups, codes)
            marginal = probs.mean(dim=0) if probs.shape[0] > 0 else torch.full_like(logits[0, 0], 1.0 / self.num_codes)
            perplexity = _perplexity(marginal)
            # (batch, T, groups, codes) x (groups, codes, d) -> (batch, T, groups, d): a one-hot lookup.
            codevectors = torch.einsum("btgv,gvd->btgd", weights, self.codevectors.float())
        codevectors = codevectors.reshape(batch, steps, -1)
        _, codes_used = _hard_usage(code_ids, selected, self.num_codes)
        greedy_ids = logits.argmax(dim=-1) if self.training else code_ids
        return QuantizerOutput(codevectors, code_ids, marginal, perplexity, codes_used, greedy_ids)


class RandomProjectionQuantizer(nn.Module):
    """Frozen random-projection quantizer (BEST-RQ §2.1; NEST uses the stacked 8x frames).

    target_c = argmax_k <normalize(P_c^T x), e_ck> for codebook c: nearest unit code by cosine, found by
    one matmul on unit vectors (no (batch, T, codes, dim) distance tensor, unlike NeMo's float64 l2
    search that took 6 GB at 8 x 60 s).

    Args:
        input_dim: width of the quantized input (factor * n_mels).
        codebook_dim: projection width (config `bestrq_codebook_dim`, 16).
        codebook_size: codes per codebook (config `bestrq_codebook_size`, 8192).
        num_codebooks: independent codebooks (config `bestrq_num_codebooks`); each gives its own id.
        normalize_input: standardise the input per utterance over its valid steps first.
        input_layer_norm: LayerNorm (no affine) over each step's stacked input before projecting (NeMo NEST's
            2026 option, NVIDIA-NeMo PR #15589): every step's vector has zero mean and unit variance across its
            features, so loud and quiet steps fall into the same codes.
        seed: the projection and codebooks are drawn from a CPU generator with this seed, so they are a pure
            function of the configuration: the same after re-initialisation on the meta device, and
            reproducible across runs (BEST-RQ needs them random, not different per run). They are also saved.
    """

    def __init__(
        self,
        input_dim: int,
        codebook_dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        normalize_input: bool = True,
        input_layer_norm: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.input_layer_norm = input_layer_norm
        self.codebook_dim = codebook_dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.normalize_input = normalize_input
        self.seed = seed
        projection, codebooks = self.draw_buffers()
        # Persistent float32 buffers: saved in the checkpoint, never trained, identical after reload.
        self.register_buffer("projection", projection, persistent=True)
        self.register_buffer("codebooks", codebooks, persistent=True)

    def draw_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(projection (books, input_dim, dim), unit codebooks (books, codes, dim)), float32 on the CPU, from `seed`.

        Used at construction and by the model's `_init_weights` (e.g. after building on the meta device).
        """
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        # Xavier-normal projection (BEST-RQ): std = sqrt(2 / (fan_in + fan_out)).
        std = (2.0 / (self.input_dim + self.codebook_dim)) ** 0.5
        shape = (self.num_codebooks, self.input_dim, self.codebook_dim)
        projection = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu") * std
        codebook_shape = (self.num_codebooks, self.codebook_size, self.codebook_dim)
        codebooks = torch.randn(codebook_shape, generator=generator, dtype=torch.float32, device="cpu")
        codebooks = codebooks / codebooks.norm(dim=-1, keepdim=True)
        return projection, codebooks

    @torch.no_grad()
    def forward(
        self, inputs: torch.Tensor, lengths: torch.Tensor, selected: torch.Tensor | None = None, chunk: int = 4096
    ) -> QuantizerOutput:
        """Target ids for (batch, T, input_dim) clean stacked frames.

        Args:
            inputs: stacked clean features (from `stack_frames`).
            lengths: valid steps per utterance (token lengths), for the input normalisation.
            selected: (batch, T) bool, the steps counted in the usage metrics (default: valid steps).
            chunk: steps per matmul, bounding the (steps, codes) score tensor to chunk x codebook_size.

        Returns code_ids (batch, T, num_codebooks); codevectors and marginal_probs are None.
        """
        batch, steps, _ = inputs.shape
        if selected is None:
            selected = torch.arange(steps, device=inputs.device)[None, :] < lengths[:, None]
        # float32 even under autocast / bf16 inputs: ids must not depend on the compute precision.
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            x = normalize_per_utterance(inputs, lengths) if self.normalize_input else inputs.float()
            if self.input_layer_norm:  # padding rows are zero and stay zero
                x = nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-5)
            flat = x.reshape(batch * steps, -1)
            projection = self.projection.float()
            codebooks = self.codebooks.float()
            ids = []
            for start in range(0, flat.shape[0], chunk):  # bounded memory; a handful of chunks per batch
                proj = torch.einsum("nd,cdk->cnk", flat[start : start + chunk], projection)  # (books, n, k)
                proj = proj / proj.norm(dim=-1, keepdim=True).clamp(min=1e-8)
                scores = torch.bmm(proj, codebooks.transpose(1, 2))  # (books, n, codes)
                ids.append(scores.argmax(dim=-1).transpose(0, 1))  # (n, books)
            code_ids = torch.cat(ids, dim=0).view(batch, steps, self.num_codebooks)
        perplexity, codes_used = _hard_usage(code_ids, selected, self.codebook_size)
        return QuantizerOutput(None, code_ids, None, perplexity, codes_used, code_ids)


__all__ = [
    "GumbelVectorQuantizer",
    "OnlineCodebooks",
    "QuantizerOutput",
    "RandomProjectionQuantizer",
    "code_histogram",
    "codebook_usage",
    "normalize_per_utterance",
    "stack_frames",
    "step_labels",
    "teacher_layers",
]
