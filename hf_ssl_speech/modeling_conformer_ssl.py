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
from .masking import apply_frame_mask, compute_frame_mask, frame_to_token_mask
from .objectives import OBJECTIVES, LossBook, ObjectiveContext, objective_settings
from .targets import GumbelVectorQuantizer, OnlineCodebooks, RandomProjectionQuantizer, stack_frames

# ----------------------------------------------------------------------------------------------- blocks


def _strided_conv2d(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int, causal: bool):
    """3x3 stride-2 conv of channels-last (B, T, F, C) -> (B, C, T', F') in channels-last memory."""
    nchw = hidden.permute(0, 3, 1, 2)  # a channels-last view of (B, C, T, F)
    if causal:
        nchw = F.pad(nchw, (0, 0, 2, 0)).contiguous(memory_format=torch.channels_last)
        out = F.conv2d(nchw, weight, bias, stride=2, padding=(0, 1), groups=groups)
    else:
        out = F.conv2d(nchw, weight, bias, stride=2, padding=1, groups=groups)
    return out


def _conv_weight_grad_taps(grad_out: torch.Tensor, inputs: torch.Tensor, padding: tuple[int, int], out: torch.Tensor):
    """out (O, I, 3, 3) += the weight gradient of a 3x3 stride-2 conv, one (O x N) @ (N x I) matmul per tap.

    grad_out (b, T', F', O) and inputs (b, T, F, I) channels-last; padding = (time, freq) zeros before the input:
    output (t, f) reads input (2t + kt - pt, 2f + kf - pf), so each tap sums over the outputs whose input is real.
    """
    steps, freqs = grad_out.shape[1:3]
    for kt in range(3):
        t0 = max(0, -((kt - padding[0]) // 2))  # first output whose input row 2t + kt - pt is >= 0
        t1 = min(steps, (inputs.shape[1] - 1 - kt + padding[0]) // 2 + 1)
        for kf in range(3):
            f0 = max(0, -((kf - padding[1]) // 2))
            f1 = min(freqs, (inputs.shape[2] - 1 - kf + padding[1]) // 2 + 1)
            if t1 <= t0 or f1 <= f0:
                continue
            tap = inputs[:, 2 * t0 + kt - padding[0] : 2 * t1 + kt - padding[0] - 1 : 2]
            tap = tap[:, :, 2 * f0 + kf - padding[1] : 2 * f1 + kf - padding[1] - 1 : 2]
            grads = grad_out[:, t0:t1, f0:f1]
            out[:, :, kt, kf] += grads.reshape(-1, grads.shape[-1]).t().mm(tap.reshape(-1, tap.shape[-1]))


class _SubsamplingStem(torch.autograd.Function):
    """first conv (a matmul over 3x3 patches) -> zero padding -> ReLU -> the second strided conv, in batch chunks.

    The first activation (B, T/2, F/2, C) is the encoder's largest tensor (164 MB for 8 x 10 s at C = 256, four
    times a block's input) and held only one chunk at a time: backward recomputes it from the saved patches (a
    matmul with 9 columns, ~1% of the second conv's work) and frees it chunk by chunk. Same maths as the unfused
    path; peak memory falls by the full activation, its ReLU mask and its gradient.
    """

    CHUNK_BYTES = 32 * 2**20  # the first activation of one chunk (glibc heap-sized: no mmap churn)

    @staticmethod
    def _first(patches, weight1, bias1, lengths, rows):
        """ReLU(mask(conv1)) of the batch rows `rows`: (b, T1, F1, C)."""
        chunk = patches[rows]
        hidden = torch.addmm(bias1, chunk.reshape(-1, 9), weight1.t()).view(*chunk.shape[:3], -1)
        if lengths is not None:
            hidden.masked_fill_(lengths_to_padding_mask(lengths[rows], hidden.shape[1])[:, :, None, None], 0.0)
        return hidden.relu_()

    @staticmethod
    def _chunks(patches, channels):
        batch = patches.shape[0]
        per_row = patches[0, ..., 0].numel() * channels * patches.element_size()
        size = max(1, min(batch, _SubsamplingStem.CHUNK_BYTES // max(per_row, 1)))
        return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]

    @staticmethod
    def forward(ctx, patches, weight1, bias1, weight2, bias2, lengths, groups, causal):
        outputs = []
        for rows in _SubsamplingStem._chunks(patches, weight1.shape[0]):
            first = _SubsamplingStem._first(patches, weight1, bias1, lengths, rows)
            outputs.append(_strided_conv2d(first, weight2, bias2, groups, causal))
            del first
        ctx.save_for_backward(patches, weight1, bias1, weight2, lengths)
        ctx.groups, ctx.causal, ctx.has_bias2 = groups, causal, bias2 is not None
        # (B, T', F', C) contiguous and not a view (the caller works on it in place): one copy out of the chunks
        return torch.cat([out.permute(0, 2, 3, 1) for out in outputs])

    @staticmethod
    def backward(ctx, grad_output):
        patches, weight1, bias1, weight2, lengths = ctx.saved_tensors
        need_patches, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_patches = torch.empty_like(patches) if need_patches else None
        grad_w1 = torch.zeros_like(weight1) if need_w1 else None
        grad_b1 = torch.zeros_like(bias1) if need_b1 else None
        grad_w2 = torch.zeros_like(weight2) if need_w2 else None
        grad_b2 = torch.zeros(weight2.shape[0], dtype=weight2.dtype, device=weight2.device) if need_b2 else None
        channels = weight1.shape[0]
        for rows in _SubsamplingStem._chunks(patches, channels):
            first = _SubsamplingStem._first(patches, weight1, bias1, lengths, rows)  # (b, T1, F1, C)
            nchw = first.permute(0, 3, 1, 2)
            padding = [1, 1]
            if ctx.causal:
                nchw = F.pad(nchw, (0, 0, 2, 0)).contiguous(memory_format=torch.channels_last)
                padding = [0, 1]
            grad_out = grad_output[rows].permute(0, 3, 1, 2)
            if not grad_out.is_contiguous(memory_format=torch.channels_last):
                grad_out = grad_out.contiguous(memory_format=torch.channels_last)
            # A full conv's weight gradient as 9 tap matmuls: ~2x faster on CPU than oneDNN's channels-last one.
            taps = ctx.groups == 1 and first.device.type == "cpu"
            grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out,
                nchw,
                weight2,
                [weight2.shape[0]] if ctx.has_bias2 else None,
                [2, 2],
                padding,
                [1, 1],
                False,
                [0, 0],
                ctx.groups,
                [True, need_w2 and not taps, need_b2 and not taps],
            )
            if need_w2 and taps:
                _conv_weight_grad_taps(grad_out.permute(0, 2, 3, 1), first, (2 if ctx.causal else 1, 1), grad_w2)
            elif need_w2:
                grad_w2 += grad_w
            if need_b2 and taps:
                grad_b2 += grad_out.sum((0, 2, 3))
            elif need_b2:
                grad_b2 += grad_b
            del nchw, grad_w, grad_b
            if ctx.causal:
                grad_in = grad_in[:, :, 2:, :]
            grad_in = grad_in.permute(0, 2, 3, 1)  # (b, T1, F1, C)
            # ReLU and padding: zero where the recomputed activation is 0 (one pass, unlike masked_fill_ + le)
            grad_in = torch.ops.aten.threshold_backward(grad_in, first, 0.0)
            del first
            flat = grad_in.reshape(-1, channels)
            chunk_patches = patches[rows].reshape(-1, 9)
            if need_w1:  # (9 x N) @ (N x C): BLAS is ~7x slower at the (C x N) @ (N x 9) form
                grad_w1 += chunk_patches.t().mm(flat).t()
            if need_b1:
                grad_b1 += flat.sum(0)
            if need_patches:
                grad_patches[rows] = weight1.t().mm(flat.t()).t().view(grad_patches[rows].shape)  # as above
            del grad_in, flat
        return grad_patches, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


class ConformerSslSubsampling(nn.Module):
    """Conv2d front end over (time, mel): `striding` (Conformer) or `dw_striding` (FastConformer).

    `striding`:    log2(f) x [Conv2d 3x3 stride 2 -> ReLU], channels = conv_channels.
    `dw_striding`: Conv2d 3x3 s2 -> ReLU, then (log2(f) - 1) x [depthwise 3x3 s2 -> pointwise 1x1 -> ReLU].
    Then (B, C, T', F') -> (B, T', C * F') -> Linear -> D. Layer indices in `layers` follow NeMo's
    `pre_encode.conv` and transformers' Parakeet `subsampling.layers`, so checkpoints map index to index.

    Padded frames are zeroed after every conv (before its ReLU: ReLU(0) = 0), so they never leak into real
    frames. In causal mode the time axis is padded on the left only (2 frames), which keeps the output length
    at ceil(L / 2) while each output step sees only current and past frames.

    Speed (this front end dominates a FastConformer's cost on CPU): activations stay channels-last
    (B, T, F, C) throughout; the 1-channel first conv is a (patches x 9) @ (9 x C) matmul, the 1x1 convs are
    matmuls, masking and ReLU run in place, and the final flatten permutes the small Linear weight instead of
    the large activation. The parameters keep their Conv2d shapes and meaning.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        self.causal = config.causal
        self.num_stages = int(math.log2(config.subsampling_factor))
        channels = config.conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        for _ in range(self.num_stages - 1):
            if config.subsampling == "dw_striding":
                layers += [
                    nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1, groups=channels),
                    nn.Conv2d(channels, channels, kernel_size=1),
                    nn.ReLU(),
                ]
            else:
                layers += [nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        self.layers = nn.ModuleList(layers)
        freq = config.num_mel_bins
        for _ in range(self.num_stages):
            freq = (freq - 1) // 2 + 1
        self.out_freq = freq
        self.linear = nn.Linear(channels * freq, config.hidden_size)

    def _time_padding(self) -> tuple[int, int]:
        return (2, 0) if self.causal else (1, 1)

    def _patches(self, features: torch.Tensor) -> torch.Tensor:
        """The 3x3 stride-2 patches of the first conv: (B, T, F) -> (B, T1, F1, 9)."""
        padded = F.pad(features, (1, 1, *self._time_padding()))  # (B, T + 2, F + 2)
        patches = padded.unfold(1, 3, 2).unfold(2, 3, 2)  # (B, T1, F1, 3, 3), a view
        return patches.reshape(*patches.shape[:3], 9)

    def _first_conv(self, features: torch.Tensor) -> torch.Tensor:
        """Conv2d(1 -> C, 3x3, stride 2) as a matmul over 3x3 patches. (B, T, F) -> (B, T1, F1, C)."""
        conv = self.layers[0]
        patches = self._patches(features)
        return torch.addmm(conv.bias, patches.reshape(-1, 9), conv.weight.view(conv.out_channels, 9).t()).view(
            *patches.shape[:3], conv.out_channels
        )

    def _strided_conv(self, conv: nn.Conv2d, hidden: torch.Tensor) -> torch.Tensor:
        """3x3 stride-2 conv (full or depthwise) on channels-last (B, T, F, C) -> (B, T', F', C)."""
        # A depthwise weight (C, 1, 3, 3) is the same memory in both formats, but its gradient comes back with
        # channels-last strides (9, 1, 3, 1) unlike the parameter's (9, 9, 3, 1), and DDP then copies it into its
        # bucket every step ("Grad strides do not match bucket view strides"). Through flatten + view, autograd
        # reshapes the gradient to the parameter's own strides.
        weight = conv.weight.flatten(1).view_as(conv.weight) if conv.groups > 1 else conv.weight
        # channels-last memory: (B, T', F', C) is contiguous
        return _strided_conv2d(hidden, weight, conv.bias, conv.groups, self.causal).permute(0, 2, 3, 1)

    @staticmethod
    def _mask_(hidden: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Zero the padded time steps of a fresh conv output (B, T, F, C), in place."""
        if lengths is not None:
            hidden.masked_fill_(lengths_to_padding_mask(lengths, hidden.shape[1])[:, :, None, None], 0.0)
        return hidden

    def _stage_tail(
        self, hidden: torch.Tensor, index: int, lengths: torch.Tensor, padded: bool
    ) -> tuple[torch.Tensor, int]:
        """What follows the strided conv before `layers[index]`: dw_striding's pointwise 1x1 conv (as a matmul, then
        re-masked) if there, then the ReLU. Returns the hidden (B, T', F', C) and the index of the next strided conv."""
        if isinstance(self.layers[index], nn.Conv2d):  # dw_striding: pointwise 1x1 conv as a matmul
            pointwise = self.layers[index]
            hidden = F.linear(hidden, pointwise.weight.flatten(1), pointwise.bias)
            hidden = self._mask_(hidden, lengths if padded else None)
            index += 1
        return hidden.relu_(), index + 1  # past the ReLU module

    def forward(self, input_features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_features (B, T, n_mels) from the feature extractor; lengths (B,) valid frames.
        Returns hidden (B, T', D) and the new lengths (B,)."""
        # Compiled: always the masked path (a no-op without padding), no data-dependent branch to break the graph.
        padded = torch.compiler.is_compiling() or bool((lengths < input_features.shape[1]).any())
        if padded:
            input_features = input_features.masked_fill(
                lengths_to_padding_mask(lengths, input_features.shape[1])[..., None], 0.0
            )
        lengths = output_lengths(lengths, 2)
        index = 2
        lean = not torch.is_autocast_enabled(input_features.device.type) and not torch.compiler.is_compiling()
        if len(self.layers) > 2 and lean:  # (torch.compile: inductor plans the memory of the stock ops itself)
            # First conv + ReLU + the next strided conv in batch chunks, the first activation recomputed in
            # backward (_SubsamplingStem): it is the encoder's largest tensor, (B, T/2, F/2, C).
            first, conv = self.layers[0], self.layers[2]
            hidden = _SubsamplingStem.apply(
                self._patches(input_features),
                first.weight.view(first.out_channels, 9),
                first.bias,
                conv.weight,
                conv.bias,
                lengths if padded else None,
                conv.groups,
                self.causal,
            )
            lengths = output_lengths(lengths, 2)
            hidden, index = self._stage_tail(self._mask_(hidden, lengths if padded else None), 3, lengths, padded)
        else:
            hidden = self._mask_(self._first_conv(input_features), lengths if padded else None).relu_()
        while index < len(self.layers):
            conv = self.layers[index]
            lengths = output_lengths(lengths, 2)
            hidden = self._mask_(self._strided_conv(conv, hidden), lengths if padded else None)
            hidden, index = self._stage_tail(hidden, index + 1, lengths, padded)
        batch, steps, freq, channels = hidden.shape
        # NeMo flattens (C, F) channel-major; permute the Linear's columns to our (F, C) order instead.
        weight = self.linear.weight.view(-1, channels, freq).transpose(1, 2).reshape(-1, freq * channels)
        return F.linear(hidden.reshape(batch, steps, freq * channels), weight, self.linear.bias), lengths


class ConformerSslRelPositionalEncoding(nn.Module):
    """Transformer-XL sinusoidal embeddings of relative distances T'-1 ... -(T'-1) (sin/cos interleaved)."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, config.hidden_size, 2, dtype=torch.float) / config.hidden_size))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

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
        inv_freq = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, steps: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos, sin), each (T', d_head): the two halves of the channels share one frequency per pair."""
        angles = torch.arange(steps, device=self.inv_freq.device, dtype=torch.float)[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # (T', d_head): pair k is channels k and k + d_head / 2
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _cpu_training_path(tensor: torch.Tensor) -> bool:
    """The memory-lean autograd functions below run where they pay and match the stock ops exactly: CPU tensors,
    gradients on, no autocast (their backward recomputes in the forward's dtype), not under torch.compile (which
    traces the stock ops and plans their memory itself). Elsewhere the stock ops run."""
    return (
        tensor.device.type == "cpu"
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _dropout_noise(like: torch.Tensor, p: float) -> torch.Tensor:
    """The float keep-mask / (1 - p) that `F.dropout` draws on CPU (same RNG draws, so the same mask)."""
    return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)


class _Dropout(torch.autograd.Function):
    """F.dropout (training, CPU) that saves a one-byte keep mask instead of the float one (4x less)."""

    @staticmethod
    def forward(ctx, hidden, p):
        noise = _dropout_noise(hidden, p)
        ctx.save_for_backward(noise.bool())
        ctx.p = p
        return hidden * noise

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).div_(1 - ctx.p), None


class ConformerSslDropout(nn.Dropout):
    """nn.Dropout whose CPU training path saves a bool mask (`_Dropout`); identical outputs and RNG draws."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and not self.inplace and _cpu_training_path(hidden):
            return _Dropout.apply(hidden, self.p)
        return super().forward(hidden)


class _SiluDropoutLinear(torch.autograd.Function):
    """linear(dropout(silu(h))): the feed-forward's second half, saving h and a one-byte dropout mask.

    The stock ops save three (B, T', FFN) float tensors (silu's input, the float dropout mask, linear2's input);
    this saves one plus the bool mask and recomputes silu and the mask product in backward (elementwise, <1% of
    the block's work).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, p):
        act = F.silu(hidden)
        keep = None
        if p > 0.0:
            noise = _dropout_noise(act, p)
            act = act.mul_(noise)
            keep = noise.bool()
            del noise
        ctx.save_for_backward(hidden, weight, keep)
        ctx.p, ctx.has_bias = p, bias is not None
        return F.linear(act, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, keep = ctx.saved_tensors
        noise = None if keep is None else keep.to(hidden.dtype).div_(1 - ctx.p)
        grad_weight = grad_bias = None
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            act = F.silu(hidden)
            if noise is not None:
                act = act.mul_(noise)
            grad_weight = flat.t().mm(act.reshape(-1, act.shape[-1]))
            del act
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_act = grad.matmul(weight)
            if noise is not None:
                grad_act = grad_act.mul_(noise)
            grad_hidden = torch.ops.aten.silu_backward(grad_act, hidden)
        return grad_hidden, grad_weight, grad_bias, None


class _BiasedAttention(torch.autograd.Function):
    """dropout(softmax(q k^T * scale + bias)) v for a full additive bias (the rel-pos / gated position term).

    What `scaled_dot_product_attention` does on CPU with a bias that needs gradients (its math path), saving
    q, k, v, the probabilities and a one-byte dropout mask instead of the probabilities, the float dropout mask
    and the dropped probabilities (three (B, H, T', T') float tensors), and without the masked-row passes of
    its safe softmax (the bias here is finite, so no row is all -inf).
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, scale, p):
        scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale).add_(bias)
        probs = torch.softmax(scores, dim=-1)
        del scores
        keep = None
        dropped = probs
        if p > 0.0:
            noise = _dropout_noise(probs, p)
            dropped = probs * noise
            keep = noise.bool()
            del noise
        context = torch.matmul(dropped, value)
        ctx.save_for_backward(query, key, value, probs, keep)
        ctx.scale, ctx.p, ctx.bias_shape = scale, p, bias.shape
        return context

    @staticmethod
    def backward(ctx, grad):
        query, key, value, probs, keep = ctx.saved_tensors
        noise = None if keep is None else keep.to(probs.dtype).div_(1 - ctx.p)
        grad_value = None
        if ctx.needs_input_grad[2]:
            dropped = probs if noise is None else probs * noise
            grad_value = torch.matmul(dropped.transpose(-1, -2), grad)
            del dropped
        grad_probs = torch.matmul(grad, value.transpose(-1, -2))
        if noise is not None:
            grad_probs = grad_probs.mul_(noise)
            del noise
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        grad_query = torch.matmul(grad_scores, key).mul_(ctx.scale) if ctx.needs_input_grad[0] else None
        grad_key = (
            torch.matmul(grad_scores.transpose(-1, -2), query).mul_(ctx.scale) if ctx.needs_input_grad[1] else None
        )
        grad_bias = grad_scores.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None
        return grad_query, grad_key, grad_value, grad_bias, None, None


class ConformerSslFeedForward(nn.Module):
    """Linear -> Swish -> dropout -> Linear (the caller halves the residual: macaron)."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        self.linear1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.attention_bias)
        self.activation = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.activation_dropout)
        self.linear2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.attention_bias)
        self.silu = config.hidden_act in ("silu", "swish")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        linear2 = self.linear2
        if (
            self.silu
            and _cpu_training_path(hidden)
            and type(linear2) is nn.Linear  # not wrapped (adapters) or hooked: the fused tail calls F.linear
            and not (linear2._forward_hooks or linear2._forward_pre_hooks)
            and not (self.dropout._forward_hooks or self.dropout._forward_pre_hooks)
        ):
            p = self.dropout.p if self.training else 0.0
            return _SiluDropoutLinear.apply(self.linear1(hidden), linear2.weight, linear2.bias, p)
        return self.linear2(self.dropout(self.activation(self.linear1(hidden))))


class ConformerSslAttention(nn.Module):
    """Query / key / value / output projections and the attention itself, shared by the position variants.

    Every variant ends in `torch.nn.functional.scaled_dot_product_attention`, its position term (if any) and the
    padding / causal mask added into one `attn_mask`; "eager" (transformers' attn_implementation) or
    `output_attentions` take the explicit softmax instead, which also returns the weights.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
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
        elif bias is not None and bias.requires_grad and _cpu_training_path(query):
            weights = None  # the position term needs gradients: SDPA's math path, with less saved (_BiasedAttention)
            context = _BiasedAttention.apply(query, key, value, bias, scale, dropout)
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


# One attention class and one position module per ConformerSslConfig.position_embeddings_type.
ATTENTION_CLASSES: dict[str, type[ConformerSslAttention]] = {
    "rel_pos": ConformerSslRelPositionAttention,
    "gated_rel_pos": ConformerSslGatedRelPositionAttention,
    "rotary": ConformerSslRotaryAttention,
}
POSITION_CLASSES: dict[str, type[nn.Module]] = {
    "rel_pos": ConformerSslRelPositionalEncoding,
    "gated_rel_pos": ConformerSslRelPositionBias,
    "rotary": ConformerSslRotaryEmbedding,
}


class ConformerSslConvModule(nn.Module):
    """Pointwise (D -> 2D) + GLU -> depthwise conv (k) -> BatchNorm | LayerNorm -> Swish -> pointwise (D -> D).

    Pointwise convs are Linear layers over (B, T', D) (same maths as a 1x1 Conv1d, no transposes). Padding is
    zeroed right before the depthwise conv, the only place where time steps mix. Causal mode pads k - 1 steps
    on the left instead of (k - 1) / 2 on each side.
    """

    def __init__(self, config: ConformerSslConfig):
        super().__init__()
        channels, kernel = config.hidden_size, config.conv_depthwise_kernel_size
        self.causal_padding = kernel - 1 if config.causal else 0
        bias = config.convolution_bias
        self.pointwise_conv1 = nn.Linear(channels, 2 * channels, bias=bias)
        self.depthwise_conv = nn.Conv1d(
            channels, channels, kernel, padding=0 if config.causal else (kernel - 1) // 2, groups=channels, bias=bias
        )
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
        self.dropout = ConformerSslDropout(config.hidden_dropout)

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


# ----------------------------------------------------------------------------------------------- base


@dataclass
class ConformerSslModelOutput(ModelOutput):
    """
    last_hidden_state: (B, T', D) output of the last block.
    hidden_states: num_hidden_layers + 1 tensors (B, T', D): the scaled subsampling output, then every block.
    attentions: one (B, H, T', T') tensor per block, when asked for.
    output_lengths: (B,) valid encoder steps per utterance.
    attention_mask: (B, T') long, 1 on valid encoder steps.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    output_lengths: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None


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
    # masked_spec_embed, layer_weights): the rel-pos attention biases u, v, the Gumbel code vectors and the
    # gated_rel_pos bucket table.
    _no_weight_decay_names = ("bias_u", "bias_v", "codevectors", "relative_attention_bias")

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
            hidden = self.config.hidden_size
            init.copy_(module.inv_freq, 1.0 / (10000.0 ** (torch.arange(0, hidden, 2, dtype=torch.float) / hidden)))
        elif isinstance(module, ConformerSslGatedRelPositionAttention):
            init.ones_(module.gate_scale)  # WavLM: w starts at 1
        elif isinstance(module, ConformerSslRelPositionBias):
            init.normal_(module.relative_attention_bias, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ConformerSslRotaryEmbedding):
            head_dim = module.inv_freq.shape[0] * 2
            exponent = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
            init.copy_(module.inv_freq, 1.0 / (module.base**exponent))
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
        """Encoder steps for `input_lengths` feature frames: `frames.output_lengths` (ceil(L / subsampling))."""
        return output_lengths(input_lengths, self.config.subsampling_factor)

    def _input_lengths(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return torch.full((input_features.shape[0],), input_features.shape[1], device=input_features.device)
        return attention_mask.sum(-1).to(torch.long)


class ConformerSslModel(ConformerSslPreTrainedModel):
    """The bare encoder: subsampling -> xscaling -> Conformer blocks. Outputs every layer for probing."""

    def __init__(self, config: ConformerSslConfig):
        super().__init__(config)
        self.subsampling = ConformerSslSubsampling(config)
        self.position_encoding = POSITION_CLASSES[config.position_embeddings_type](config)
        self.xscale = math.sqrt(config.hidden_size) if config.xscaling else 1.0
        self.dropout = nn.Dropout(config.feat_proj_dropout)
        self.dropout_positions = nn.Dropout(config.dropout_positions)
        self.layers = nn.ModuleList([ConformerSslLayer(config) for _ in range(config.num_hidden_layers)])
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
        **kwargs,
    ) -> ConformerSslModelOutput | tuple:
        r"""
        input_features (`torch.FloatTensor` of shape `(batch, frames, num_mel_bins)`):
            Log-mel features from `ConformerSslFeatureExtractor`.
        attention_mask (`torch.LongTensor` of shape `(batch, frames)`, *optional*):
            1 for real frames, 0 for padding (from the feature extractor).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        lengths = self._input_lengths(input_features, attention_mask)
        hidden, lengths = self.subsampling(input_features, lengths)  # (B, T', D)
        hidden = self.dropout(hidden * self.xscale)
        steps = hidden.shape[1]
        # rel_pos: the sinusoid table (2T'-1, D); gated_rel_pos: the ungated bias (H, T', T'); rotary: (cos, sin).
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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
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
        self.conformer = ConformerSslModel(config)
        self.objectives = objective_settings(config.objectives)
        entries = [OBJECTIVES[name] for name in OBJECTIVES if name in self.objectives]
        if any(entry.reads == "masked" for entry in entries) and config.mask_fill == "learned":
            self.masked_spec_embed = nn.Parameter(torch.empty(config.num_mel_bins))
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
