"""Conformer / FastConformer speech encoders and their heads, as transformers `PreTrainedModel`s.

Read top to bottom: blocks (subsampling, positions, feed-forward, attention, convolution, layer), then the
pretrained base, then the heads (CTC, sequence classification, self-supervised pretraining).

Hub-bound: copied next to the weights by `save_pretrained`; imports only torch, numpy, transformers and
flat siblings.

Shapes: B = batch, T = feature frames, T' = encoder steps (T / subsampling_factor), D = hidden_size,
H = attention heads. Inside the model padding travels as `lengths` (B,) and `padding_mask` (B, T', True =
pad); at the HF boundary it is `attention_mask` (1 = real).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutput, ModelOutput, SequenceClassifierOutput

from .configuration_conformer_ssl import ConformerSslConfig
from .frames import lengths_to_padding_mask, output_lengths
from .masking import (
    apply_frame_mask,
    compute_frame_mask,
    frame_to_token_mask,
    gather_kept_steps,
    keep_at_least_one_step,
    scatter_kept_steps,
)
from .objectives import OBJECTIVES, Data2VecDecoder, LossBook, ObjectiveContext, objective_settings
from .targets import GumbelVectorQuantizer, OnlineCodebooks, RandomProjectionQuantizer, stack_frames

# ----------------------------------------------------------------------------------------------- blocks


def conv_time_padding(kernel_size: int, causal: bool) -> tuple[int, int]:
    """The one padding rule of every conv over time (subsampling and conv module), in frames:
    (padding inside the conv, zeros added on the left before it). A centred conv pads (k - 1) / 2 on each side;
    a causal one pads k - 1 on the left only, so output step t sees input steps <= t and the length is unchanged
    (a stride-2 conv still gives ceil(L / 2) steps)."""
    return (0, kernel_size - 1) if causal else ((kernel_size - 1) // 2, 0)


def inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    """base^(-2k / dim) for k = 0 .. dim/2 - 1: the sinusoid frequencies of the rel-pos table and of RoPE."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def depthwise_in_float32(conv: nn.Conv2d, hidden: torch.Tensor) -> torch.Tensor:
    """A depthwise conv computed in float32 under any autocast; its output goes back to the input's dtype.

    The strided depthwise 3x3 of `dw_striding` does 9 multiply-adds per output value: memory, not matrix units,
    bounds it, so half precision buys it little. And in torch 2.13 its bf16 input gradient is slow on CPUs
    (pytorch/pytorch#183815: oneDNN's bf16 grouped convolutions): 139 ms against 29 ms in float32 for a
    (8, 64, 540, 40) input, a quarter of a fine-tuning step. Float32 costs two casts of a tensor instead.
    """
    if conv.weight.dtype != torch.float32:  # a model cast to half precision as a whole: no float32 weights to use
        return conv(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return conv(hidden.float()).to(hidden.dtype)


class ConformerSslSubsampling(nn.Module):
    """Conv2d front end over (time, mel): `striding` (Conformer) or `dw_striding` (FastConformer).

    `striding`:    log2(f) x [Conv2d 3x3 stride 2 -> ReLU], channels = conv_channels.
    `dw_striding`: Conv2d 3x3 s2 -> ReLU, then (log2(f) - 1) x [depthwise 3x3 s2 -> pointwise 1x1 -> ReLU].
    Then (B, C, T', F') -> (B, T', C * F') -> Linear -> D. Layer indices in `layers` follow NeMo's
    `pre_encode.conv` and transformers' Parakeet `subsampling.layers`, so checkpoints map index to index.

    Padded frames are zeroed after every conv (before its ReLU: ReLU(0) = 0), so they never leak into real
    frames. In causal mode the time axis is padded on the left only (`conv_time_padding`).
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        num_stages = int(math.log2(config.subsampling_factor))
        channels = config.conv_channels
        time_padding, self.causal_padding = conv_time_padding(3, config.causal)
        padding = (time_padding, 1)  # frequency: always centred

        def strided(in_channels: int, groups: int = 1) -> nn.Conv2d:
            return nn.Conv2d(in_channels, channels, kernel_size=3, stride=2, padding=padding, groups=groups)

        layers: list[nn.Module] = [strided(1), nn.ReLU()]
        for _ in range(num_stages - 1):
            if config.subsampling == "dw_striding":
                layers += [strided(channels, groups=channels), nn.Conv2d(channels, channels, kernel_size=1), nn.ReLU()]
            else:
                layers += [strided(channels), nn.ReLU()]
        self.layers = nn.ModuleList(layers)
        freq = config.num_mel_bins
        for _ in range(num_stages):
            freq = (freq - 1) // 2 + 1
        self.linear = nn.Linear(channels * freq, config.hidden_size)

    def forward(self, input_features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_features (B, T, n_mels) from the feature extractor; lengths (B,) valid frames.
        Returns hidden (B, T', D) and the new lengths (B,)."""
        # Compiled: always the masked path (a no-op without padding), no data-dependent branch to break the graph.
        padded = torch.compiler.is_compiling() or bool((lengths < input_features.shape[1]).any())
        # Channels-last memory (B, T, F, C strides): the layout the convolution kernels of recent CPUs and GPUs
        # (oneDNN, cuDNN NHWC) run fastest in, bf16 above all. The shapes and the maths are unchanged.
        hidden = input_features[:, None].contiguous(memory_format=torch.channels_last)  # (B, 1, T, F)
        if padded:
            hidden = hidden.masked_fill(lengths_to_padding_mask(lengths, hidden.shape[2])[:, None, :, None], 0.0)
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d) and layer.stride[0] > 1:
                lengths = output_lengths(lengths, 2)
                if self.causal_padding:
                    hidden = F.pad(hidden, (0, 0, self.causal_padding, 0))
            hidden = depthwise_in_float32(layer, hidden) if getattr(layer, "groups", 1) > 1 else layer(hidden)
            if layer is self.layers[0]:
                # A 1-channel input is both layouts at once, so the first conv returns (B, C, T, F) contiguous
                # memory: make it channels-last here, or every later conv and mask runs in the slow layout.
                hidden = hidden.contiguous(memory_format=torch.channels_last)
            if padded and isinstance(layer, nn.Conv2d):  # a fresh conv output: zero its padded steps in place
                hidden.masked_fill_(lengths_to_padding_mask(lengths, hidden.shape[2])[:, None, :, None], 0.0)
        batch, channels, steps, freq = hidden.shape
        hidden = hidden.transpose(1, 2).reshape(batch, steps, channels * freq)  # (B, T', C * F'), NeMo's order
        return self.linear(hidden), lengths


class ConformerSslFeatureProjection(nn.Module):
    """w2v-BERT 2.0's front end (subsampling="feature_projection"): LayerNorm -> Linear on every input frame.

    Its frames are already stacked by transformers' `SeamlessM4TFeatureExtractor` (2 fbank frames of 80 bins: 160
    dims, 20 ms), so time is not reduced: one encoder step per input frame. Named like `ConformerSslSubsampling`'s
    projection (`linear`) so `get_input_embeddings` finds it the same way.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.num_mel_bins, eps=config.layer_norm_eps)
        self.linear = nn.Linear(config.num_mel_bins, config.hidden_size)

    def forward(self, input_features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_features (B, T, num_mel_bins); lengths (B,). Returns hidden (B, T, D), zero at padded frames (what
        Wav2Vec2Bert's encoder does before its first layer), and the same lengths."""
        hidden = self.linear(self.layer_norm(input_features))
        if torch.compiler.is_compiling() or bool((lengths < input_features.shape[1]).any()):
            hidden = hidden.masked_fill(lengths_to_padding_mask(lengths, hidden.shape[1])[..., None], 0.0)
        return hidden, lengths


class ConformerSslRelPositionalEncoding(nn.Module):
    """Transformer-XL sinusoidal embeddings of relative distances T'-1 ... -(T'-1) (sin/cos interleaved)."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.register_buffer("inv_freq", inverse_frequencies(config.hidden_size, 10000.0), persistent=False)

    def forward(self, steps: int, dtype: torch.dtype) -> torch.Tensor:
        """Returns (2 * steps - 1, D): row i is the embedding of distance (steps - 1 - i)."""
        if steps > self.max_positions:
            raise ValueError(
                f"input of {steps} encoder steps exceeds max_position_embeddings={self.max_positions}; "
                "raise config.max_position_embeddings or chunk the audio"
            )
        distance = torch.arange(steps - 1, -steps, -1, device=self.inv_freq.device, dtype=torch.float)
        angles = distance[:, None] * self.inv_freq[None, :]  # (2T'-1, D/2)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1).to(dtype)


class ConformerSslRelPositionBias(nn.Module):
    """WavLM / T5 bucketed relative position bias (position_embeddings_type="gated_rel_pos"), shared by all layers.

    Each head learns one scalar per bucket of the relative distance j - i (key minus query): half the buckets for
    keys after the query, half for keys before; in each half the first E = num_buckets / 4 buckets are the exact
    distances 0 .. E-1 and the rest are log-spaced up to `max_distance`, beyond which all distances share the
    half's last bucket. WavLM (Chen et al. 2022) computes this table in its first layer and passes it on to every
    layer, each of which gates it by its own input (`ConformerSslGatedRelPositionAttention`).
    WavLM's 320 buckets / 800 steps count 20 ms frames; ours count encoder steps (40 or 80 ms).
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        # A bare Parameter, not nn.Embedding, so the no-weight-decay rule finds it by name (an embedding).
        self.relative_attention_bias = nn.Parameter(torch.empty(self.num_buckets, config.num_attention_heads))

    @staticmethod
    def bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
        """Bucket index in [0, num_buckets) of each relative distance j - i (LongTensor, any shape).

        half = num_buckets / 2; E = half / 2; d = |j - i|:
            bucket = half * [j > i] + (d                                                  if d < E
                                       min(half - 1, E + floor(log(d / E) / log(max_distance / E) * (half - E)))
        """
        half = num_buckets // 2
        exact = half // 2
        offset = (relative > 0).long() * half
        distance = relative.abs()
        # float32 as in WavLM; clamp(min=1) keeps log finite where the exact branch is taken anyway.
        scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
        far = (exact + scaled.long()).clamp(max=half - 1)
        return offset + torch.where(distance < exact, distance, far)

    def forward(self, steps: int, dtype: torch.dtype) -> torch.Tensor:
        """Returns (H, T', T'): the ungated bias of query i (row) attending to key j (column)."""
        positions = torch.arange(steps, device=self.relative_attention_bias.device)
        buckets = self.bucket(positions[None, :] - positions[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias[buckets].permute(2, 0, 1).to(dtype)  # (T', T', H) -> (H, T', T')


class ConformerSslRotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) angles for position_embeddings_type="rotary": position t rotates channel pair k of every
    head by t * base^(-2k / d_head). A rotated query . rotated key depends only on the distance (i - j)."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        self.base = config.rotary_embedding_base
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, self.base), persistent=False)

    def forward(self, steps: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos, sin), each (T', d_head): the two halves of the channels share one frequency per pair."""
        angles = torch.arange(steps, device=self.inv_freq.device, dtype=torch.float)[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # (T', d_head): pair k is channels k and k + d_head / 2
        return angles.cos().to(dtype), angles.sin().to(dtype)


class ConformerSslRelativeKeyDistances(nn.Module):
    """Shaw et al. (2018) clipped distances for position_embeddings_type="relative_key" (w2v-BERT 2.0).

    No parameters: every layer's attention holds its own distance embeddings; this module computes once per
    forward which of them each (query, key) pair uses.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        self.left = config.left_max_position_embeddings
        self.right = config.right_max_position_embeddings
        # The clipping bounds as a buffer too: it moves with the model, so the indices are made on its device.
        self.register_buffer("bounds", torch.tensor([-self.left, self.right]), persistent=False)

    def forward(self, steps: int, dtype: torch.dtype) -> torch.Tensor:
        """Returns (T', T') long: clamp(j - i, -left, right) + left, the row of key j's distance to query i in a
        (left + right + 1)-row table (dtype is unused: the indices are integers)."""
        positions = torch.arange(steps, device=self.bounds.device)
        distance = (positions[None, :] - positions[:, None]).clamp(-self.left, self.right)
        return distance + self.left


class ConformerSslFeedForward(nn.Module):
    """Linear -> Swish -> dropout -> Linear (the caller halves the residual: macaron).

    `hidden_size` / `activation` default to the config's; the adapter and the intermediate feed-forward of
    w2v-BERT 2.0 pass their own (output_hidden_size, adapter_act or ReLU)."""

    def __init__(self, config: ConformerSslConfig, hidden_size: int | None = None, activation: str | None = None):
        super().__init__()
        hidden_size = hidden_size or config.hidden_size
        self.linear1 = nn.Linear(hidden_size, config.intermediate_size, bias=config.attention_bias)
        self.activation = ACT2FN[activation or config.hidden_act]
        self.dropout = nn.Dropout(config.activation_dropout)
        self.linear2 = nn.Linear(config.intermediate_size, hidden_size, bias=config.attention_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(hidden))))


class ConformerSslAttention(nn.Module):
    """Query / key / value / output projections and the attention itself, shared by the position variants.

    Every variant ends in `torch.nn.functional.scaled_dot_product_attention`, its position term (if any) and the
    padding / causal mask added into one `attn_mask`; "eager" (transformers' attn_implementation) or
    `output_attentions` take the explicit softmax instead, which also returns the weights.
    """

    def __init__(self, config: ConformerSslConfig, hidden_size: int | None = None):
        super().__init__()
        hidden_size = hidden_size or config.hidden_size  # the adapter's attention runs at output_hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.config = config

    @property
    def eager(self) -> bool:
        return self.config._attn_implementation == "eager"

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (B, T', D) -> query, key, value, each (B, H, T', d)."""
        shape = (*hidden.shape[:2], self.num_heads, self.head_dim)
        return tuple(proj(hidden).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(q k^T / sqrt(d) + bias) v, then the output projection. bias broadcasts to (B, H, T', T') or is
        None (no padding, no causal mask, no position term: the flash / memory-efficient kernels may run)."""
        scale = self.head_dim**-0.5
        dropout = self.dropout if self.training else 0.0
        if output_attentions or self.eager:
            scores = torch.matmul(query, key.transpose(-1, -2)) * scale
            weights = torch.softmax(scores + bias if bias is not None else scores, dim=-1)
            context = torch.matmul(F.dropout(weights, dropout, self.training), value)
        else:
            weights = None
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale)
        batch, _, steps, _ = query.shape
        context = context.transpose(1, 2).reshape(batch, steps, -1)  # (B, T', D)
        return self.o_proj(context), weights


class ConformerSslRelPositionAttention(ConformerSslAttention):
    """Multi-head self-attention with Transformer-XL relative positions (Dai et al. 2019, section 3.3).

    score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_r r_(i-j), all divided by sqrt(d_head). The positional term
    (b + d) is computed once against the 2T'-1 distances and "rel-shifted" into (T', T'); it then enters
    `scaled_dot_product_attention` as an additive bias together with the padding / causal mask, so the
    content term (a + c) and the softmax run in the fused kernel.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__(config)
        self.relative_k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)  # W_r
        self.bias_u = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # content bias u
        self.bias_v = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # position bias v

    @staticmethod
    def rel_shift(scores: torch.Tensor) -> torch.Tensor:
        """(B, H, T', 2T'-1) scores against distances T'-1..-(T'-1) -> (B, H, T', T') scores against key j.

        Query i and key j are at distance i - j, stored in column (T'-1) - (i - j): row i of the result starts
        at flat offset i * (2T'-1) + T'-1 - i = i * (2T'-2) + T'-1. That is a strided view: no copy. It is written
        as flatten -> slice -> view -> slice rather than `as_strided` (same view, same elements) because
        `torch.compile` cannot trace `storage_offset()`.
        """
        batch, heads, steps, positions = scores.shape
        if steps == 1:
            return scores  # (B, H, 1, 1): the only distance is 0
        flat = scores.contiguous().view(batch, heads, steps * positions)
        rows = flat[..., steps - 1 : steps - 1 + steps * (positions - 1)].view(batch, heads, steps, positions - 1)
        return rows[..., :steps]

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: torch.Tensor,
        attention_bias: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden (B, T', D); position_embeddings (2T'-1, D); attention_bias (B, 1, T', T') additive
        (-inf-like where a key is padding or in the future) or None."""
        query, key, value = self.project(hidden)  # (B, H, T', d)
        rel_key = self.relative_k_proj(position_embeddings).view(-1, self.num_heads, self.head_dim)  # (2T'-1, H, d)

        scale = self.head_dim**-0.5
        # (q + v) . W_r r / sqrt(d): one matmul against the shared distance table, no batch copy of it.
        # u and v in the query's dtype: under bf16 autocast a float32 bias would promote the query back to float32.
        position_query = (query + self.bias_v[:, None, :].to(query.dtype)) * scale
        position_scores = torch.matmul(position_query, rel_key.permute(1, 2, 0))  # (B, H, T', 2T'-1)
        bias = self.rel_shift(position_scores)  # (B, H, T', T') view
        bias = bias + attention_bias if attention_bias is not None else bias.contiguous()
        return self.attend(query + self.bias_u[:, None, :].to(query.dtype), key, value, bias, output_attentions)


class ConformerSslGatedRelPositionAttention(ConformerSslAttention):
    """Self-attention with WavLM's gated relative position bias (Chen et al. 2022).

    score(i, j) = q_i . k_j / sqrt(d) + r_(i,j), with the shared bucketed bias d_(j-i) (`ConformerSslRelPositionBias`,
    one scalar per head) scaled by a gate computed from query position i's own input:

        g_a, g_b = sigmoid(x_i W_g + c)           x_i: this head's d channels of the attention input; W_g (d, 2)
        r_(i,j)  = (g_a (g_b w - 1) + 2) d_(j-i)  w: a learned constant per head, initialised to 1

    The paper writes the gates as functions of the query q_i, with update gate g_u and reset gate g_r:
    r = d + g_u d + (1 - g_u) w g_r d. The released WavLM code (as transformers' `WavLMAttention`) instead feeds the
    attention's input x_i split into heads (before W_q) and computes d (2 - g_a + g_a g_b w), i.e. the paper's form
    with g_u = 1 - g_a and g_r = g_b; we follow the code. Its gate layer is Linear(d, 8) whose outputs are summed in
    fours: the same function as our Linear(d, 2) (sum its rows in fours to convert). For w >= 0 the gate lies in
    (1, 2 + max(w - 1, 0)); g_a = 1, g_b = 0 gives gate 1, the plain (ungated) T5 bias; g_a = 0 gives 2.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__(config)
        self.gate_proj = nn.Linear(self.head_dim, 2)  # W_g, c: shared by the heads (each reads its own slice)
        self.gate_scale = nn.Parameter(torch.ones(self.num_heads))  # w (WavLM: gru_rel_pos_const)

    def gate(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T', D) -> the gate g_a (g_b w - 1) + 2 of each query position, (B, H, T', 1)."""
        heads = hidden.view(*hidden.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T', d)
        gate_a, gate_b = torch.sigmoid(self.gate_proj(heads)).unbind(-1)  # (B, H, T') each
        return (gate_a * (gate_b * self.gate_scale[:, None] - 1.0) + 2.0)[..., None]

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: torch.Tensor,
        attention_bias: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden (B, T', D); position_embeddings (H, T', T'): the ungated bias shared by the layers;
        attention_bias (B, 1, T', T') additive padding / causal mask or None."""
        query, key, value = self.project(hidden)  # (B, H, T', d)
        bias = self.gate(hidden).to(query.dtype) * position_embeddings.to(query.dtype)  # (B, H, T', T')
        if attention_bias is not None:
            bias = bias + attention_bias
        return self.attend(query, key, value, bias, output_attentions)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: the 90-degree turn of each channel pair."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class ConformerSslRotaryAttention(ConformerSslAttention):
    """Self-attention with rotary positions (RoPE, Su et al. 2021): q_t and k_t are rotated by angles
    t * theta_k, so q_i . k_j depends on positions only through i - j. No position bias enters SDPA: without
    padding or a causal mask `attn_mask` is None and the flash / memory-efficient kernels can run on a GPU."""

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_bias: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden (B, T', D); position_embeddings (cos, sin), each (T', d); attention_bias (B, 1, T', T') or None."""
        query, key, value = self.project(hidden)  # (B, H, T', d)
        cos, sin = position_embeddings
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        return self.attend(query, key, value, attention_bias, output_attentions)


class ConformerSslRelativeKeyAttention(ConformerSslAttention):
    """Self-attention with Shaw et al. (2018) relative position embeddings, as w2v-BERT 2.0 (transformers'
    Wav2Vec2Bert with position_embeddings_type="relative_key") uses them:

        score(i, j) = (q_i . k_j + q_i . E[clamp(j - i, -left, right)]) / sqrt(d)

    with E this layer's (left + right + 1, d) table. Only left + right + 1 distinct distances exist, so q . E is
    one (B, H, T', left + right + 1) matmul, gathered into (T', T') by the shared distance indices; the result
    enters SDPA as an additive bias together with the padding mask.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__(config)
        num_distances = config.left_max_position_embeddings + config.right_max_position_embeddings + 1
        # A bare Parameter, not nn.Embedding, so the no-weight-decay rule finds it by name (an embedding).
        self.distance_embedding = nn.Parameter(torch.empty(num_distances, self.head_dim))

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: torch.Tensor,
        attention_bias: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden (B, T', D); position_embeddings (T', T') long distance indices; attention_bias (B, 1, T', T') or
        None."""
        query, key, value = self.project(hidden)  # (B, H, T', d)
        scale = self.head_dim**-0.5
        per_distance = torch.matmul(query, self.distance_embedding.to(query.dtype).t()) * scale  # (B, H, T', P)
        index = position_embeddings.expand(*per_distance.shape[:2], -1, -1)  # (B, H, T', T')
        bias = per_distance.gather(-1, index)
        if attention_bias is not None:
            bias = bias + attention_bias
        return self.attend(query, key, value, bias, output_attentions)


# One attention class and one position module per ConformerSslConfig.position_embeddings_type.
ATTENTION_CLASSES: dict[str, type[ConformerSslAttention]] = {
    "rel_pos": ConformerSslRelPositionAttention,
    "gated_rel_pos": ConformerSslGatedRelPositionAttention,
    "rotary": ConformerSslRotaryAttention,
    "relative_key": ConformerSslRelativeKeyAttention,
}
POSITION_CLASSES: dict[str, type[nn.Module]] = {
    "rel_pos": ConformerSslRelPositionalEncoding,
    "gated_rel_pos": ConformerSslRelPositionBias,
    "rotary": ConformerSslRotaryEmbedding,
    "relative_key": ConformerSslRelativeKeyDistances,
}


class ConformerSslConvModule(nn.Module):
    """Pointwise (D -> 2D) + GLU -> depthwise conv (k) -> BatchNorm | LayerNorm -> Swish -> pointwise (D -> D).

    Pointwise convs are Linear layers over (B, T', D) (same maths as a 1x1 Conv1d, no transposes). Padding is
    zeroed right before the depthwise conv, the only place where time steps mix. Causal mode (`causal`, or
    `conv_depthwise_causal` alone as in w2v-BERT 2.0) pads k - 1 steps on the left instead of (k - 1) / 2 on each
    side (`conv_time_padding`).
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        channels, kernel = config.hidden_size, config.conv_depthwise_kernel_size
        padding, self.causal_padding = conv_time_padding(kernel, config.causal or config.conv_depthwise_causal)
        bias = config.convolution_bias
        self.pointwise_conv1 = nn.Linear(channels, 2 * channels, bias=bias)
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel, padding=padding, groups=channels, bias=bias)
        self.norm_type = config.conv_norm_type
        if self.norm_type == "batch_norm":
            self.norm = nn.BatchNorm1d(channels)
        else:
            self.norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.activation = ACT2FN[config.hidden_act]
        self.pointwise_conv2 = nn.Linear(channels, channels, bias=bias)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = F.glu(self.pointwise_conv1(hidden), dim=-1)  # (B, T', D)
        if padding_mask is not None:
            hidden = hidden.masked_fill(padding_mask[..., None], 0.0)
        hidden = hidden.transpose(1, 2)  # (B, D, T')
        if self.causal_padding:
            hidden = F.pad(hidden, (self.causal_padding, 0))
        hidden = self.depthwise_conv(hidden)
        if self.norm_type == "batch_norm":
            hidden = self.norm(hidden).transpose(1, 2)
        else:
            hidden = self.norm(hidden.transpose(1, 2))
        return self.pointwise_conv2(self.activation(hidden))  # (B, T', D)


class ConformerSslLayer(GradientCheckpointingLayer):
    """Pre-LN macaron Conformer block: x + FF/2 -> + MHSA -> + Conv -> + FF/2 -> LayerNorm (Gulati et al. 2020)."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.norm_feed_forward1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.feed_forward1 = ConformerSslFeedForward(config)
        self.norm_self_att = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attn = ATTENTION_CLASSES[config.position_embeddings_type](config)
        self.norm_conv = nn.LayerNorm(config.hidden_size, eps=eps)
        self.conv = ConformerSslConvModule(config)
        self.norm_feed_forward2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.feed_forward2 = ConformerSslFeedForward(config)
        self.norm_out = nn.LayerNorm(config.hidden_size, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        attention_bias: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = torch.add(hidden, self.dropout(self.feed_forward1(self.norm_feed_forward1(hidden))), alpha=0.5)
        attended, weights = self.self_attn(
            self.norm_self_att(hidden), position_embeddings, attention_bias, output_attentions
        )
        hidden = hidden + self.dropout(attended)
        hidden = hidden + self.dropout(self.conv(self.norm_conv(hidden), padding_mask))
        hidden = torch.add(hidden, self.dropout(self.feed_forward2(self.norm_feed_forward2(hidden))), alpha=0.5)
        return self.norm_out(hidden), weights


class ConformerSslAdapterLayer(nn.Module):
    """One layer of w2v-BERT 2.0's adapter (transformers' `Wav2Vec2BertAdapterLayer`, same names): pools time by
    `adapter_stride`, then attention and a feed-forward, at width E = output_hidden_size.

        residual = GLU(Conv1d_s(LayerNorm(x)))                       the pooled input (E -> 2E -> E)
        h = residual + Attention(GLU(Conv1d_s(LayerNorm(x))))        its own LayerNorm and conv before attention
        h = h + FeedForward(LayerNorm(h))                            adapter_act, intermediate_size

    The convs pad `adapter_stride // 2` steps on each side and do not zero padded steps first (Wav2Vec2Bert's
    adapter does not either: the last valid step may read padded encoder steps, which are outputs of the blocks
    like any other, and the same in both implementations).
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        width = config.output_hidden_size or config.hidden_size
        eps = config.layer_norm_eps
        kernel, stride = config.adapter_kernel_size, config.adapter_stride
        self.residual_layer_norm = nn.LayerNorm(width, eps=eps)
        self.residual_conv = nn.Conv1d(width, 2 * width, kernel, stride=stride, padding=stride // 2)
        self.self_attn_layer_norm = nn.LayerNorm(width, eps=eps)
        self.self_attn_conv = nn.Conv1d(width, 2 * width, kernel, stride=stride, padding=stride // 2)
        self.self_attn = ConformerSslAttention(config, hidden_size=width)
        self.ffn_layer_norm = nn.LayerNorm(width, eps=eps)
        self.ffn = ConformerSslFeedForward(config, hidden_size=width, activation=config.adapter_act)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        """hidden (B, T', E); attention_bias (B, 1, 1, T'') additive mask of the pooled padded steps, or None.
        Returns (B, T'', E), T'' = floor((T' + 2 * (stride // 2) - kernel) / stride) + 1."""
        residual = F.glu(self.residual_conv(self.residual_layer_norm(hidden).transpose(1, 2)), dim=1).transpose(1, 2)
        pooled = F.glu(self.self_attn_conv(self.self_attn_layer_norm(hidden).transpose(1, 2)), dim=1).transpose(1, 2)
        query, key, value = self.self_attn.project(pooled)  # (B, H, T'', d): no position term
        attended, _ = self.self_attn.attend(query, key, value, attention_bias, output_attentions=False)
        hidden = residual + self.dropout(attended)
        return hidden + self.ffn(self.ffn_layer_norm(hidden))


class ConformerSslAdapter(nn.Module):
    """w2v-BERT 2.0's adapter (add_adapter): optional Linear + LayerNorm to output_hidden_size, then
    `num_adapter_layers` x `ConformerSslAdapterLayer`, each dividing the steps by about `adapter_stride`."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        width = config.output_hidden_size or config.hidden_size
        if width != config.hidden_size:
            self.proj = nn.Linear(config.hidden_size, width)
            self.proj_layer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(ConformerSslAdapterLayer(config) for _ in range(config.num_adapter_layers))
        self.kernel_size, self.stride = config.adapter_kernel_size, config.adapter_stride
        self.layerdrop = config.layerdrop

    def output_lengths(self, lengths: torch.Tensor | int) -> torch.Tensor | int:
        """Valid steps after one adapter layer: floor((L + 2 * (kernel // 2) - kernel) / stride) + 1, the count
        Wav2Vec2Bert uses for its masks (equal to the conv's own count when stride // 2 == kernel // 2, as 3 / 2)."""
        return (lengths + 2 * (self.kernel_size // 2) - self.kernel_size) // self.stride + 1

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, T', D), lengths (B,) -> (B, T'', E) and the pooled lengths (B,)."""
        if hasattr(self, "proj"):
            hidden = self.proj_layer_norm(self.proj(hidden))
        for layer in self.layers:
            # LayerDrop skips a whole adapter layer, pooling included, so the lengths stay (Wav2Vec2Bert shrinks them
            # anyway, which leaves its CTC lengths wrong for that step; we do not copy that).
            if self.training and self.layerdrop > 0 and torch.rand([]) <= self.layerdrop:
                continue
            lengths = self.output_lengths(lengths)
            steps = (hidden.shape[1] + 2 * (self.stride // 2) - self.kernel_size) // self.stride + 1
            padding_mask = lengths_to_padding_mask(lengths, steps)  # (B, T'')
            attention_bias = None
            if torch.compiler.is_compiling() or bool(padding_mask.any()):
                attention_bias = torch.zeros(
                    padding_mask[:, None, None, :].shape, dtype=hidden.dtype, device=hidden.device
                )
                attention_bias = attention_bias.masked_fill(
                    padding_mask[:, None, None, :], torch.finfo(hidden.dtype).min
                )
            hidden = layer(hidden, attention_bias)
        return hidden, lengths


# ----------------------------------------------------------------------------------------------- base


@dataclass
class ConformerSslModelOutput(ModelOutput):
    """
    last_hidden_state: (B, T', D) output of the last block (with `add_adapter`: the adapter's (B, T'', E)).
    hidden_states: num_hidden_layers + 1 tensors (B, T', D): the scaled subsampling output, then every block.
    attentions: one (B, H, T', T') tensor per block, when asked for.
    output_lengths: (B,) valid steps of last_hidden_state per utterance.
    attention_mask: (B, T') long, 1 on the valid steps of last_hidden_state.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    output_lengths: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None


def encoder_output_lengths(input_lengths: torch.Tensor | int, config: ConformerSslConfig) -> torch.Tensor | int:
    """Output steps for `input_lengths` feature frames: `frames.output_lengths` (ceil(L / subsampling)), then
    each adapter layer's pooling (`ConformerSslAdapter.output_lengths`) when `add_adapter`."""
    lengths = output_lengths(input_lengths, config.subsampling_factor)
    if config.add_adapter:
        padding = config.adapter_kernel_size // 2
        for _ in range(config.num_adapter_layers):
            lengths = (lengths + 2 * padding - config.adapter_kernel_size) // config.adapter_stride + 1
    return lengths


class ConformerSslPreTrainedModel(PreTrainedModel):
    config_class = ConformerSslConfig
    config: ConformerSslConfig
    base_model_prefix = "conformer"
    main_input_name = "input_features"
    input_modalities = "audio"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ConformerSslLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    # Our heads normalise their own losses and take no `num_items_in_batch`: Trainer must divide by the
    # accumulation steps itself (it skips that for models whose forward accepts **kwargs).
    accepts_loss_kwargs = False

    # Parameters that weight decay must not pull towards zero, besides every 1-d tensor (biases, norm scales,
    # masked_spec_embed, layer_weights): the rel-pos attention biases u, v, the Gumbel code vectors, the
    # gated_rel_pos bucket table and the relative_key distance embeddings.
    _no_weight_decay_names = ("bias_u", "bias_v", "codevectors", "relative_attention_bias", "distance_embedding")

    def no_weight_decay_parameters(self) -> set[str]:
        """Names of the parameters that get no weight decay: norms, biases and embeddings, by one rule.

        A norm's scale decayed towards 0 means a dead layer, a bias or an embedding has no scale to regularise.
        Every 1-d parameter is one of those; the 2-d and 3-d ones are named in `_no_weight_decay_names`. The
        pretraining and fine-tuning optimisers both build their groups from this.
        """
        return {
            name
            for name, param in self.named_parameters()
            if param.ndim <= 1 or name.rsplit(".", 1)[-1] in self._no_weight_decay_names
        }

    def _init_weights(self, module: nn.Module) -> None:
        """Every module's initialisation, in one place (transformers calls it children first, then the parent)."""
        super()._init_weights(module)  # Linear/Conv normal(0, initializer_range), zero biases, norms to identity
        if isinstance(module, ConformerSslRelPositionAttention):
            # NeMo starts u and v at zero: at initialisation attention is content + position without bias.
            init.zeros_(module.bias_u)
            init.zeros_(module.bias_v)
        elif isinstance(module, ConformerSslRelPositionalEncoding):
            init.copy_(module.inv_freq, inverse_frequencies(self.config.hidden_size, 10000.0))
        elif isinstance(module, ConformerSslGatedRelPositionAttention):
            init.ones_(module.gate_scale)  # WavLM: w starts at 1
        elif isinstance(module, ConformerSslRelPositionBias):
            init.normal_(module.relative_attention_bias, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ConformerSslRelativeKeyAttention):
            init.normal_(module.distance_embedding, mean=0.0, std=self.config.initializer_range)  # an nn.Embedding's
        elif isinstance(module, ConformerSslRelativeKeyDistances):
            init.copy_(module.bounds, torch.tensor([-module.left, module.right]))
        elif isinstance(module, ConformerSslRotaryEmbedding):
            init.copy_(module.inv_freq, inverse_frequencies(module.inv_freq.shape[0] * 2, module.base))
        elif isinstance(module, nn.BatchNorm1d) and module.running_mean is not None:
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, GumbelVectorQuantizer):
            module.reset_parameters()  # after the generic init of its weight_proj Linear, which it replaces
        elif isinstance(module, RandomProjectionQuantizer):
            # Takes effect only for buffers a checkpoint lacks: loaded tensors are flagged as initialised.
            projection, codebooks = module.draw_buffers()
            init.copy_(module.projection, projection)
            init.copy_(module.codebooks, codebooks)
        elif isinstance(module, Data2VecDecoder) and module.mask_token is not None:
            init.normal_(module.mask_token, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, OnlineCodebooks):
            module.reset_parameters()  # DinoSR codewords: N(0, 1), the scale of instance-normalised teacher layers
        if isinstance(getattr(module, "masked_spec_embed", None), nn.Parameter):
            init.uniform_(module.masked_spec_embed)  # the learned mask fill (wav2vec 2.0)
        if isinstance(getattr(module, "layer_weights", None), nn.Parameter):
            init.constant_(module.layer_weights, 1.0 / module.layer_weights.numel())  # SUPERB: start uniform

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, then the weight files made readable like the others.

        transformers writes the weights through a private temporary file (mode 0600) while config.json and the
        code are 0644; a shared checkpoint folder would then be unreadable to the rest of a team.
        """
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        umask = os.umask(0)
        os.umask(umask)
        for path in Path(save_directory).glob("*.safetensors*"):
            if path.is_file() and path.stat().st_mode & 0o077 == 0:
                path.chmod(0o666 & ~umask)
        return saved

    def freeze_base_model(self) -> None:
        """Heads: freeze the encoder so only the head trains (linear probing, or the first fine-tuning steps)."""
        self.conformer.requires_grad_(False)

    def unfreeze_base_model(self) -> None:
        self.conformer.requires_grad_(True)

    def _get_feat_extract_output_lengths(self, input_lengths: torch.Tensor | int) -> torch.Tensor | int:
        return encoder_output_lengths(input_lengths, self.config)

    def _input_lengths(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return torch.full((input_features.shape[0],), input_features.shape[1], device=input_features.device)
        return attention_mask.sum(-1).to(torch.long)


class ConformerSslModel(ConformerSslPreTrainedModel):
    """The bare encoder: subsampling -> xscaling -> Conformer blocks [-> w2v-BERT 2.0's intermediate feed-forward
    and adapter]. Outputs every layer for probing."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__(config)
        if config.subsampling == "feature_projection":
            self.subsampling = ConformerSslFeatureProjection(config)
        else:
            self.subsampling = ConformerSslSubsampling(config)
        self.position_encoding = POSITION_CLASSES[config.position_embeddings_type](config)
        self.xscale = math.sqrt(config.hidden_size) if config.xscaling else 1.0
        self.dropout = nn.Dropout(config.feat_proj_dropout)
        self.dropout_positions = nn.Dropout(config.dropout_positions)
        self.layers = nn.ModuleList([ConformerSslLayer(config) for _ in range(config.num_hidden_layers)])
        if config.use_intermediate_ffn_before_adapter:
            self.intermediate_ffn = ConformerSslFeedForward(config, activation="relu")
            self.dropout_intermediate = nn.Dropout(config.hidden_dropout)
        if config.add_adapter:
            self.adapter = ConformerSslAdapter(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The layer whose output feeds the Conformer blocks (the subsampling's projection to hidden_size).

        `PreTrainedModel.enable_input_require_grads` hooks it, so PEFT adapters keep their gradients under
        gradient checkpointing while the front end is frozen."""
        return self.subsampling.linear

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        kept_steps: torch.Tensor | None = None,
        **kwargs,
    ) -> ConformerSslModelOutput | tuple:
        r"""
        input_features (`torch.FloatTensor` of shape `(batch, frames, num_mel_bins)`):
            Log-mel features from `ConformerSslFeatureExtractor`.
        attention_mask (`torch.LongTensor` of shape `(batch, frames)`, *optional*):
            1 for real frames, 0 for padding (from the feature extractor).
        kept_steps (`torch.BoolTensor` of shape `(copies * batch, steps)`, *optional*):
            data2vec 2.0's MAE-style student: after the subsampling only these encoder steps (True = kept) go
            through the blocks, compacted to the left of each row (`masking.gather_kept_steps`). Every output
            then has the compacted layout (copies * batch, max kept steps, D) and `output_lengths` counts the kept
            steps; `masking.scatter_kept_steps` puts them back. Relative positions then count kept steps, not
            time. With copies > 1 (clone_batch) the subsampling runs once on the batch and its output is tiled:
            copy c of utterance b is row c * batch + b, as in data2vec 2.0, which clones the front end's output.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        lengths = self._input_lengths(input_features, attention_mask)
        hidden, lengths = self.subsampling(input_features, lengths)  # (B, T', D)
        if kept_steps is not None:  # one front-end pass serves every masked copy: (B, T', D) -> (c * B, T', D)
            copies = kept_steps.shape[0] // hidden.shape[0]
            hidden, lengths = hidden.repeat(copies, 1, 1), lengths.repeat(copies)
        hidden = self.dropout(hidden * self.xscale)
        if kept_steps is not None:  # (c * B, T', D) -> (c * B, K, D): the masked steps are dropped, not encoded
            hidden, lengths = gather_kept_steps(hidden, kept_steps)
        steps = hidden.shape[1]
        # rel_pos: the sinusoid table (2T'-1, D); gated_rel_pos: the ungated bias (H, T', T'); rotary: (cos, sin);
        # relative_key: the distance indices (T', T').
        position_embeddings = self.position_encoding(steps, hidden.dtype)
        if self.config.position_embeddings_type == "rel_pos":
            position_embeddings = self.dropout_positions(position_embeddings)

        padding_mask = lengths_to_padding_mask(lengths, steps)  # (B, T')
        # Compiled: always the masked path (an all-zero bias without padding), no data-dependent branch.
        has_padding = torch.compiler.is_compiling() or bool(padding_mask.any())
        blocked = padding_mask[:, None, None, :]  # keys that no query may see: (B, 1, 1, T')
        if self.config.causal:
            future = torch.ones(steps, steps, dtype=torch.bool, device=hidden.device).triu(1)
            blocked = blocked | future
        attention_bias = None
        if has_padding or self.config.causal:
            # A large finite negative (not -inf): padded query rows stay finite and are zeroed downstream anyway.
            attention_bias = torch.zeros(blocked.shape, dtype=hidden.dtype, device=hidden.device)
            attention_bias = attention_bias.masked_fill(blocked, torch.finfo(hidden.dtype).min)
        conv_padding_mask = padding_mask if has_padding else None

        all_hidden = (hidden,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if self.training and self.config.layerdrop > 0 and torch.rand([]) < self.config.layerdrop:
                layer_out = (hidden, None)  # LayerDrop (Fan et al. 2019): skip the whole block
            else:
                layer_out = layer(hidden, position_embeddings, attention_bias, conv_padding_mask, output_attentions)
            hidden = layer_out[0]
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:
                all_attentions += (layer_out[1],)

        if self.config.use_intermediate_ffn_before_adapter:  # w2v-BERT 2.0: a half-weight ReLU feed-forward
            hidden = hidden + 0.5 * self.dropout_intermediate(self.intermediate_ffn(hidden))
        if self.config.add_adapter:  # pooled steps: last_hidden_state, lengths and mask are the adapter's
            hidden, lengths = self.adapter(hidden, lengths)
            padding_mask = lengths_to_padding_mask(lengths, hidden.shape[1])
        output_mask = (~padding_mask).long()
        if not return_dict:
            return tuple(v for v in (hidden, all_hidden, all_attentions, lengths, output_mask) if v is not None)
        return ConformerSslModelOutput(
            last_hidden_state=hidden,
            hidden_states=all_hidden,
            attentions=all_attentions,
            output_lengths=lengths,
            attention_mask=output_mask,
        )


# ----------------------------------------------------------------------------------------------- heads


class ConformerSslForCTC(ConformerSslPreTrainedModel):
    """Encoder + dropout + linear over the vocabulary, trained with CTC (blank = `config.pad_token_id`)."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError(
                "ConformerSslConfig.vocab_size=None: a CTC head needs the vocabulary size. Build the tokenizer "
                "first and pass `vocab_size=len(tokenizer)` (and `pad_token_id=tokenizer.pad_token_id`, the blank)."
            )
        self.conformer = ConformerSslModel(config)
        self.dropout = nn.Dropout(config.final_dropout)
        # With the adapter, the head reads its width (output_hidden_size, None = hidden_size).
        width = (config.output_hidden_size or config.hidden_size) if config.add_adapter else config.hidden_size
        self.lm_head = nn.Linear(width, config.vocab_size)
        self.post_init()

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch, target_length)`, *optional*):
            Token ids of the transcripts (from the tokenizer), padded with -100.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.conformer(
            input_features,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(self.dropout(outputs.last_hidden_state))  # (B, T', V)

        loss = None
        if labels is not None:
            if labels.max() >= self.config.vocab_size:
                raise ValueError(f"labels contain id {int(labels.max())} >= vocab_size={self.config.vocab_size}")
            target_mask = labels >= 0
            target_lengths = target_mask.sum(-1)
            targets = labels.masked_select(target_mask)
            # CTC in fp32 even under autocast: log-probabilities of long sequences underflow in half precision.
            log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)  # (T', B, V)
            with torch.backends.cudnn.flags(enabled=False):
                loss = F.ctc_loss(
                    log_probs,
                    targets,
                    outputs.output_lengths,
                    target_lengths,
                    blank=self.config.pad_token_id,
                    reduction=self.config.ctc_loss_reduction,
                    zero_infinity=self.config.ctc_zero_infinity,
                )

        if not return_dict:
            output = (logits, outputs.hidden_states, outputs.attentions)
            output = tuple(v for v in output if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ConformerSslForSequenceClassification(ConformerSslPreTrainedModel):
    """Utterance classification (speaker, keyword, intent): optional learned weighted sum of all layers
    (SUPERB-style probing), projection, mean pooling over valid steps, linear classifier."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__(config)
        if config.add_adapter:
            raise ValueError(
                "ConformerSslConfig.add_adapter=True: sequence classification reads the blocks' hidden states and "
                "their lengths, not the adapter's pooled steps (nor does Wav2Vec2BertForSequenceClassification); "
                "set add_adapter=False."
            )
        self.conformer = ConformerSslModel(config)
        num_layers = config.num_hidden_layers + 1  # subsampling output + every block
        if config.use_weighted_layer_sum:
            self.layer_weights = nn.Parameter(torch.empty(num_layers))
        self.projector = nn.Linear(config.hidden_size, config.classifier_proj_size)
        self.classifier = nn.Linear(config.classifier_proj_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*): class ids (or float targets for regression).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        want_hidden = True if self.config.use_weighted_layer_sum else output_hidden_states
        outputs = self.conformer(
            input_features,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=want_hidden,
            return_dict=True,
        )
        if self.config.use_weighted_layer_sum:
            stacked = torch.stack(outputs.hidden_states, dim=1)  # (B, L + 1, T', D)
            weights = torch.softmax(self.layer_weights, dim=-1)
            hidden = (stacked * weights[None, :, None, None]).sum(dim=1)
        else:
            hidden = outputs.last_hidden_state
        hidden = self.projector(hidden)  # (B, T', P)
        valid = outputs.attention_mask[..., None].to(hidden.dtype)  # (B, T', 1)
        pooled = (hidden * valid).sum(1) / valid.sum(1).clamp(min=1.0)  # mean over valid steps only
        logits = self.classifier(pooled)

        loss = None
        if labels is not None:
            loss = self._classification_loss(logits, labels)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = outputs.hidden_states if output_hidden_states else None
        if not return_dict:
            output = tuple(v for v in (logits, hidden_states, outputs.attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=hidden_states, attentions=outputs.attentions
        )

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.config.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.float().view(-1, self.config.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


# ----------------------------------------------------------------------------------------------- pretraining
# ConformerSslForPreTraining: the objectives themselves (defaults, heads, losses) are the entries of
# `objectives.OBJECTIVES`; this class masks, encodes, and hands each pass to the objectives that read it.


@dataclass
class ConformerSslForPreTrainingOutput(ModelOutput):
    """
    loss: scalar, sum over the active objectives of weight * loss_sum / loss_count with this batch's own
        counts (what `Trainer` back-propagates). For normalisation by the global count across processes and
        accumulation steps, use the dicts below with `ConformerSslForPreTraining.combine_losses`.
    loss_sums: objective -> differentiable float32 sum over its targets ("diversity" is wav2vec2's codebook
        penalty, attached to contrastive or mlm).
    loss_counts: objective -> float32 number of targets in that sum (masked steps, pairs, or elements).
    loss_weights: objective -> its weight (objectives before their start step are absent from all dicts).
    objective_losses: objective -> detached loss_sum / loss_count.
    metrics: detached scalars: `<objective>_accuracy` and `<objective>_correct` (a sum over the objective's
        count), `codebook_perplexity` / `codebook_usage` (Gumbel), `bestrq_perplexity` / `bestrq_usage`
        (fraction of codes used), `masked_frame_fraction`, `masked_tokens`.
    hidden_states: encoder hidden states when asked for (those of the masked pass when both passes run).
    attentions: encoder attention weights when asked for (same pass as hidden_states).
    mask_time_indices: (B, T) long frame mask used, 1 = masked (None without masked objectives; long rather
        than bool so generic output comparisons, which subtract tensors, work).
    token_mask: (B, T') long, 1 = masked encoder step.
    code_counts: objective -> (books, codes) int64 histogram of its target ids at the masked steps (bestrq,
        dinosr): add them up over batches and processes, then `targets.codebook_usage` gives coverage and entropy.
        A whole-batch count, like `loss_counts`, not a per-example output.
    teacher_statistics: what `update_teacher` needs after the optimiser step (DinoSR's codeword sums and counts),
        to be summed over micro-batches and processes first; empty in eval.

    With `config.clone_batch` = c > 1 (training only) every per-example output has c * B rows: c tiled copies of
    the batch, each with its own masks.
    """

    loss: torch.FloatTensor | None = None
    loss_sums: dict[str, torch.Tensor] | None = None
    loss_counts: dict[str, torch.Tensor] | None = None
    loss_weights: dict[str, float] | None = None
    objective_losses: dict[str, torch.Tensor] | None = None
    metrics: dict[str, torch.Tensor] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    mask_time_indices: torch.LongTensor | None = None
    token_mask: torch.LongTensor | None = None
    code_counts: dict[str, torch.Tensor] | None = None
    teacher_statistics: dict[str, torch.Tensor] | None = None


class ConformerSslForPreTraining(ConformerSslPreTrainedModel):
    """Encoder + the self-supervised objectives of `config.objectives`, weighted and scheduled.

    "masked" objectives (contrastive, mlm, bestrq, hubert, reconstruction) mask the log-mel frames before the
    encoder (`config.mask_strategy`), fill them with `masked_spec_embed` or N(0, 0.1) noise (`mask_fill`), and
    predict targets built from the clean features stacked by `subsampling_factor` at the masked encoder steps
    (a step is masked when `mask_token_threshold` of its frames are). "clean" objectives (apc, cpc) read the
    clean features through the causal encoder. A recipe mixing both runs the encoder twice.
    `config.objectives=None` means BEST-RQ alone (the NEST recipe). In eval mode without a generator the
    masks, noise and negatives come from a generator seeded with 0: validation losses are comparable.

    Objectives with an EMA teacher (data2vec, dinosr) add `teacher`: a copy of the encoder without gradients,
    always in eval mode, that reads the clean unmasked input. It starts equal to the student and follows it
    through `update_teacher(decay, statistics)`, which the training loop calls after every optimiser step. It is
    saved in training checkpoints (the accelerate state) but not by `save_pretrained`: the exported model holds
    the student alone, and a teacher missing from loaded weights starts again as a copy of the student.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__(config)
        if config.add_adapter:
            raise ValueError(
                "ConformerSslConfig.add_adapter=True: the objectives read the blocks' hidden states, so the adapter "
                "would get no gradient; pretrain with add_adapter=False and add the adapter when fine-tuning."
            )
        self.conformer = ConformerSslModel(config)
        self.objectives = objective_settings(config.objectives)
        entries = [OBJECTIVES[name] for name in OBJECTIVES if name in self.objectives]
        # data2vec 2.0's MAE-style student drops the masked steps: no frame is filled, no mask embedding
        self.encodes_unmasked_only = bool(self.objectives.get("data2vec", {}).get("encode_unmasked_only", False))
        masked = any(entry.reads == "masked" for entry in entries)
        if masked and config.mask_fill in ("learned", "frozen") and not self.encodes_unmasked_only:
            # "frozen": NeMo NEST's mask embedding, drawn once and never trained (continued NEST stays NeMo's).
            trainable = config.mask_fill == "learned"
            self.masked_spec_embed = nn.Parameter(torch.empty(config.num_mel_bins), requires_grad=trainable)
        for entry in entries:
            for attribute, build in entry.heads(config).items():
                if not hasattr(self, attribute):  # shared by two objectives (the Gumbel quantizer): built once
                    self.add_module(attribute, build())
        if any(entry.teacher for entry in entries):
            self.teacher = ConformerSslModel(config).requires_grad_(False)  # trained by EMA, never by gradients
            self._keys_to_ignore_on_save = {f"teacher.{key}" for key in self.teacher.state_dict()}
            self._keys_to_ignore_on_load_missing = [r"^teacher\."]
        # e.g. the random-projection codebooks stay float32 when the model is loaded in fp16 / bf16 (set per
        # instance: those modules exist only with their objective).
        self._keep_in_fp32_modules_strict = [name for entry in entries for name in entry.fp32_modules]
        self.post_init()
        self.reset_teacher()

    # ------------------------------------------------------------------ the EMA teacher (data2vec, dinosr)
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; `save_pretrained` never writes the teacher, so it starts as a copy of
        the loaded student, as at the start of training (the accelerate state of a checkpoint holds the trained one)."""
        model = super().from_pretrained(*args, **kwargs)
        (model[0] if isinstance(model, tuple) else model).reset_teacher()
        return model

    def train(self, mode: bool = True) -> ConformerSslForPreTraining:
        """nn.Module.train; the teacher stays in eval mode (no dropout or layerdrop, BatchNorm running stats)."""
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """teacher <- student: every parameter and buffer copied (a no-op without a teacher)."""
        if hasattr(self, "teacher"):
            for mine, theirs in zip(self.teacher.state_dict().values(), self.conformer.state_dict().values()):
                mine.copy_(theirs)

    @torch.no_grad()
    def update_teacher(self, decay: float, statistics: dict[str, torch.Tensor] | None = None) -> None:
        """One EMA step after an optimiser step: theta_teacher <- decay * theta_teacher + (1 - decay) * theta_student
        (data2vec, §3; buffers such as BatchNorm statistics are copied), then DinoSR's codebook update with this
        step's `teacher_statistics`, summed over micro-batches and processes (identical on every process).

        Args:
            decay: this step's momentum, from the loop's schedule (data2vec 2.0: 0.999 -> 0.99999).
            statistics: summed `ConformerSslForPreTrainingOutput.teacher_statistics` of the step, or None.
        """
        if not hasattr(self, "teacher"):
            return
        student = dict(self.conformer.named_parameters())
        for name, param in self.teacher.named_parameters():
            param.lerp_(student[name].detach().to(param.dtype), 1.0 - decay)
        student_buffers = dict(self.conformer.named_buffers())
        for name, buffer in self.teacher.named_buffers():
            buffer.copy_(student_buffers[name])
        statistics = statistics or {}
        if "dinosr_codebooks/sums" in statistics:
            self.dinosr_codebooks.update(
                statistics["dinosr_codebooks/sums"],
                statistics["dinosr_codebooks/counts"],
                self.objectives["dinosr"]["codebook_decay"],
            )

    @staticmethod
    def combine_losses(
        loss_sums: dict[str, torch.Tensor],
        loss_counts: dict[str, torch.Tensor],
        loss_weights: dict[str, float],
        scale: float = 1.0,
    ) -> torch.Tensor:
        """sum_o weight_o * sum_o / count_o * scale (an objective with count 0 contributes 0).

        Normalising once by the GLOBAL count, with N processes under DDP (which averages gradients):
            counts = {o: accelerator.reduce(c.detach(), "sum") for o, c in out.loss_counts.items()}
            loss = model.combine_losses(out.loss_sums, counts, out.loss_weights, scale=N)
        With gradient accumulation, also sum the counts over the step's micro-batches (or, approximately,
        divide each micro-batch's loss by the number of micro-batches). Accuracy is normalised the same way:
        all-reduce `metrics["<objective>_correct"]` and the counts.
        """
        total = None
        for name, value in loss_sums.items():
            term = loss_weights[name] * value / loss_counts[name].clamp(min=1.0) * scale
            total = term if total is None else total + term
        return total

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        sampled_negative_indices: torch.Tensor | None = None,
        frame_labels: torch.Tensor | None = None,
        target_features: torch.Tensor | None = None,
        gumbel_temperature: float = 2.0,
        step: int | None = None,
        generator: torch.Generator | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ConformerSslForPreTrainingOutput | tuple:
        r"""
        input_features (`torch.FloatTensor` of shape `(batch, frames, num_mel_bins)`):
            Log-mel features from `ConformerSslFeatureExtractor` (the noisy ones when denoising).
        attention_mask (`torch.LongTensor` of shape `(batch, frames)`, *optional*): 1 = real frame.
        mask_time_indices (`torch.BoolTensor` of shape `(batch, frames)`, *optional*):
            Explicit frame mask (True = masked; padding is ignored) instead of drawing one; with
            `config.clone_batch` = c in training, (c * batch, frames) gives each copy its own.
        sampled_negative_indices (`torch.LongTensor` of shape `(batch, steps, num_negatives)`, *optional*):
            Explicit contrastive distractors: encoder-step indices into the same utterance, -1 = none.
        frame_labels (`torch.LongTensor` of shape `(batch, frames)`, *optional*):
            Frame-rate labels for the hubert objective (from the collator, -100 padded).
        target_features (`torch.FloatTensor` like `input_features`, *optional*):
            Clean features the targets are built from (NEST denoising); default `input_features`.
        gumbel_temperature (`float`): the Gumbel-softmax temperature of this step (the loop's 2 -> 0.5 decay).
        step (`int`, *optional*): training step; objectives whose `start_step` is later are skipped. None = all.
        generator (`torch.Generator`, *optional*): randomness of masks, noise fill, negatives and Gumbel noise.
            Default: the global RNG in training, a generator seeded with 0 in eval (fixed validation masks).
        """
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        if generator is None and not self.training:
            generator = torch.Generator().manual_seed(0)  # CPU: draws are made there and moved to the data
        active = {n: s for n, s in self.objectives.items() if step is None or step >= s["start_step"]}
        passes = {OBJECTIVES[name].reads for name in active}
        clean = input_features if target_features is None else target_features
        teacher_states = None
        if any(OBJECTIVES[name].teacher for name in active):  # the teacher reads the clean, unmasked batch once
            with torch.no_grad():
                teacher_states = self.teacher(
                    clean, attention_mask=attention_mask, output_hidden_states=True
                ).hidden_states
        utterances, utterance_mask = input_features, attention_mask  # (B0, frames): before any clone_batch tiling
        clones = config.clone_batch if self.training else 1
        if clones > 1:  # data2vec 2.0's clone_batch: c tiled copies of the batch, each masked differently
            input_features, clean = input_features.repeat(clones, 1, 1), clean.repeat(clones, 1, 1)
            attention_mask = None if attention_mask is None else attention_mask.repeat(clones, 1)
            frame_labels = None if frame_labels is None else frame_labels.repeat(clones, 1)
            if mask_time_indices is not None and mask_time_indices.shape[0] != input_features.shape[0]:
                mask_time_indices = mask_time_indices.repeat(clones, 1)
        lengths = self._input_lengths(input_features, attention_mask)  # (B,) frames
        stacked, step_lengths = stack_frames(clean, lengths, config.subsampling_factor)  # (B, T', f * F)
        book = LossBook()
        common = {
            "stacked": stacked,
            "step_lengths": step_lengths,
            "frame_lengths": lengths,
            "book": book,
            "generator": generator,
            "gumbel_temperature": gumbel_temperature,
        }
        encode = {
            "attention_mask": attention_mask,
            "output_hidden_states": True,
            "output_attentions": output_attentions,
            "return_dict": True,
        }
        contexts: dict[str, ObjectiveContext] = {}
        frame_mask = token_mask = encoded = None

        if "masked" in passes:
            frame_mask, token_mask = self._draw_masks(input_features, lengths, mask_time_indices, generator)
            if self.encodes_unmasked_only:
                # data2vec 2.0's MAE-style student (Baevski et al. 2022, §3): the subsampling reads the unmasked
                # utterances once, its output serves all c copies, and the blocks encode only each copy's
                # unmasked steps (masking drops steps instead of filling frames; a kept step still sees the edge
                # frames of a masked neighbour through the subsampling's receptive field, as the paper's CNN
                # does). Every hidden state comes back at full length with zeros at the dropped steps, where the
                # decoder puts its mask token (`Data2VecDecoder`).
                token_mask = keep_at_least_one_step(token_mask, step_lengths)
                valid_steps = torch.arange(token_mask.shape[1], device=token_mask.device) < step_lengths[:, None]
                kept = valid_steps & ~token_mask  # (c * B0, T')
                encoded = self.conformer(
                    utterances, kept_steps=kept, **{**encode, "attention_mask": utterance_mask}
                )  # hidden states (c * B0, K, D), K <= T'; attentions and last_hidden_state stay compacted
                encoded.hidden_states = tuple(scatter_kept_steps(state, kept) for state in encoded.hidden_states)
                book.metrics["encoded_step_fraction"] = (kept.sum() / step_lengths.sum().clamp(min=1)).float()
            else:
                embed = getattr(self, "masked_spec_embed", None)
                masked_input = apply_frame_mask(input_features, frame_mask, config.mask_fill, embed, generator)
                encoded = self.conformer(masked_input, **encode)
            contexts["masked"] = ObjectiveContext(
                config,
                encoded.hidden_states,
                **common,
                token_mask=token_mask,
                frame_labels=frame_labels,
                sampled_negative_indices=sampled_negative_indices,
                teacher_hidden_states=teacher_states,
            )
            book.metrics["masked_frame_fraction"] = (frame_mask.sum() / lengths.sum().clamp(min=1)).float().detach()
            book.metrics["masked_tokens"] = token_mask.sum().float().detach()
        if "clean" in passes:  # causal context (config.causal is required) over the clean input
            clean_encoded = self.conformer(input_features, **encode)
            contexts["clean"] = ObjectiveContext(config, clean_encoded.hidden_states, **common)
            encoded = clean_encoded if encoded is None else encoded

        for name, entry in OBJECTIVES.items():  # a fixed order, whatever the order of config.objectives
            if name in active:
                book.add(name, entry.loss(self, contexts[entry.reads], active[name]), active[name]["weight"])

        if book.sums:
            loss = self.combine_losses(book.sums, book.counts, book.weights)
        else:  # every objective waits for its start step: a zero that still back-propagates
            loss = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        objective_losses = {n: (book.sums[n] / book.counts[n].clamp(min=1.0)).detach() for n in book.sums}
        output = ConformerSslForPreTrainingOutput(
            loss=loss,
            loss_sums=book.sums,
            loss_counts=book.counts,
            loss_weights=book.weights,
            objective_losses=objective_losses,
            metrics=book.metrics,
            hidden_states=encoded.hidden_states if output_hidden_states and encoded is not None else None,
            attentions=encoded.attentions if output_attentions and encoded is not None else None,
            mask_time_indices=None if frame_mask is None else frame_mask.long(),
            token_mask=None if token_mask is None else token_mask.long(),
            code_counts=book.code_counts,
            teacher_statistics=book.teacher_statistics,
        )
        return output if return_dict else output.to_tuple()

    def _draw_masks(
        self,
        input_features: torch.Tensor,
        lengths: torch.Tensor,
        mask_time_indices: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame mask (B, T) (drawn, or the explicit one on valid frames) and the token mask (B, T')."""
        config = self.config
        frames = input_features.shape[1]
        if mask_time_indices is None:
            frame_mask = compute_frame_mask(
                config.mask_strategy,
                lengths,
                frames,
                config.mask_time_prob,
                config.mask_time_length,
                config.mask_time_min_masks,
                generator,
            )
        else:
            valid_frames = torch.arange(frames, device=input_features.device)[None, :] < lengths[:, None]
            frame_mask = mask_time_indices.to(device=input_features.device, dtype=torch.bool) & valid_frames
        token_mask = frame_to_token_mask(frame_mask, lengths, config.subsampling_factor, config.mask_token_threshold)
        return frame_mask, token_mask


__all__ = [
    "ConformerSslPreTrainedModel",
    "ConformerSslModel",
    "ConformerSslForCTC",
    "ConformerSslForSequenceClassification",
    "ConformerSslForPreTraining",
    "ConformerSslForPreTrainingOutput",
]
