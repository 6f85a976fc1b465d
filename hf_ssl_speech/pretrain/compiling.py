"""`train.compile`: torch.compile of the encoder, length buckets, and an honest count of the compilations.

What is compiled: every `ConformerSslModel` inside the pretraining model (the student `conformer`, and the EMA
`teacher` of data2vec / dinosr), in place (its `forward` replaced by the compiled one), so parameter names, `state_dict` keys,
`save_pretrained` and accelerate's `save_state` are those of the eager model (no `_orig_mod.` prefix) and DDP
wraps the pretraining model as usual afterwards. The encoder is > 95% of a step's time (benchmarks/README.md) and
traces as one graph with no break (`torch._dynamo.explain`; tests/test_scale.py checks it). The objectives
(masking, negative sampling, codebook look-ups) stay eager: their shapes depend on the data (how many steps are
masked), which would recompile or break the graph on every batch for about 2-6% of the step.

Recompilations. The batch dim is symbolic (marked dynamic), the time dim is static: batches are padded on the time
axis to a multiple of `bucket_frames` feature frames (`pad_to_bucket`, `train.compile_bucket_frames`, 128 = 1.28 s
by default), and each bucket compiles once. So an epoch compiles at most (longest - shortest) / bucket_frames + 1
training graphs (plus one per bucket for an EMA teacher's no-grad call, and one per bucket for one-utterance
batches: dynamo specialises a dynamic dim of size 1), whatever the batch sizes. A symbolic
time dim would compile once in principle, but torch 2.13's inductor fails on the training graph with it
("ValueRangeError: Invalid ranges", "cannot determine truth value of Relational"; measured 2026-12-06 on the
Conformer and FastConformer alike). The padding is masked like any other (attention_mask 0, frame labels -100):
encoder outputs on real steps and losses do not change (tested), except through BatchNorm's batch statistics in
training mode, which include padded steps, as they already do for the padding of a variable-length batch.
`torch._dynamo.config.recompile_limit` is raised to `RECOMPILE_LIMIT` so that buckets past torch's default 8 do
not fall back to eager silently.

`CompileCounter` is the dynamo backend: inductor (or any backend, e.g. "aot_eager" for tests), counting every
graph handed to it. A new graph is a compilation: the first one, or a recompilation after a guard failed (a new
shape the dynamic graph does not cover, train <-> eval mode, grad on/off, the teacher's no-grad eval call). The
loop logs `compile_graphs` and `compile_recompiles` (graphs after the first) with the training metrics.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_conformer_ssl import ConformerSslModel

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Pad value of each input that can be bucketed; every other tensor passes through untouched.
PAD_VALUES = {"input_features": 0.0, "target_features": 0.0, "attention_mask": 0, "frame_labels": -100}


class CompileCounter:
    """A torch.compile backend that counts the graphs it compiles and the seconds spent compiling them.

    Args:
        backend: "inductor" (what `train.compile` uses) or any registered dynamo backend name ("aot_eager",
            "eager": no code generation, for cheap tests of tracing and recompilation).
        mode: inductor's mode (`COMPILE_MODES`); ignored by other backends.
    """

    def __init__(self, backend: str = "inductor", mode: str = "default") -> None:
        self.backend, self.mode = backend, mode
        self.graphs = 0
        self.seconds = 0.0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        start = time.perf_counter()
        try:
            if self.backend == "inductor":
                from torch._inductor import list_mode_options
                from torch._inductor.compile_fx import compile_fx

                compiled = compile_fx(graph, example_inputs, config_patches=list_mode_options(self.mode))
            else:
                compiled = torch._dynamo.lookup_backend(self.backend)(graph, example_inputs)
        finally:
            self.seconds += time.perf_counter() - start
        # Counted once it returns: dynamo may abandon a graph inside the backend and trace it again ("restarting
        # analysis", e.g. to turn Python float scalars into tensors); that attempt is not a compiled graph.
        self.graphs += 1
        return compiled

    @property
    def recompiles(self) -> int:
        """Compilations after the first (new shapes not covered, mode or grad changes, the teacher's call)."""
        return max(self.graphs - 1, 0)

    def metrics(self) -> dict[str, float]:
        """What the loop logs: graphs compiled so far, recompilations, and backend seconds (ahead-of-time part;
        inductor may compile a backward lazily, inside the first backward)."""
        return {"compile_graphs": self.graphs, "compile_recompiles": self.recompiles, "compile_seconds": self.seconds}


RECOMPILE_LIMIT = 64  # graphs per compiled encoder forward (time buckets x train/eval x grad/no-grad)


def compile_encoders(model: nn.Module, mode: str = "default", backend: str = "inductor") -> CompileCounter:
    """Compile every `ConformerSslModel` inside `model` in place (call before `accelerator.prepare`).

    Args:
        model: a `ConformerSslForPreTraining` (or any module holding encoders; a bare encoder is compiled itself).
        mode: inductor's compile mode (`COMPILE_MODES`).
        backend: the dynamo backend the counter wraps ("inductor"; "aot_eager" in tests).

    Returns:
        The `CompileCounter`; its `metrics()` go to the training log.
    """
    counter = CompileCounter(backend, mode)
    encoders = [module for module in model.modules() if isinstance(module, ConformerSslModel)]
    if not encoders:
        raise ValueError(f"compile_encoders: {type(model).__name__} holds no ConformerSslModel to compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for encoder in encoders:
        _compile_forward(encoder, counter)
    return counter


def _compile_forward(encoder: ConformerSslModel, counter: CompileCounter) -> None:
    """Replace `encoder.forward` (an instance attribute: parameters, hooks and `state_dict` untouched) by the
    compiled forward, which first marks the batch dim of its inputs dynamic (the time dim stays static: buckets)."""
    compiled = torch.compile(encoder.forward, backend=counter, dynamic=False)

    @functools.wraps(encoder.forward)
    def forward(input_features: torch.Tensor, *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        if args and attention_mask is None:  # passed by position, as `ConformerSslModel.forward`'s second argument
            attention_mask, args = args[0], args[1:]
        for tensor in (input_features, attention_mask):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(input_features, *args, attention_mask=attention_mask, **kwargs)

    encoder.forward = forward


def bucket_length(frames: int, bucket_frames: int) -> int:
    """`frames` rounded up to a multiple of `bucket_frames` (1 leaves it as it is)."""
    return -(-frames // bucket_frames) * bucket_frames


def pad_to_bucket(inputs: dict[str, torch.Tensor], bucket_frames: int) -> dict[str, torch.Tensor]:
    """Pad the time axis of a featurised batch (`loop.featurise`'s dict) to a multiple of `bucket_frames` frames.

    `input_features` / `target_features` (B, T, F) get zero frames, `attention_mask` (B, T) zeros (the model
    ignores those frames), `frame_labels` (B, <= T) -100 (the ignore label). Returns a new dict; the input is
    returned as is when T is already a multiple.
    """
    frames = inputs["input_features"].shape[1]
    target = bucket_length(frames, bucket_frames)
    if target == frames:
        return inputs
    out = dict(inputs)
    for key, value in inputs.items():
        if key not in PAD_VALUES:
            continue
        missing = target - value.shape[1]
        widths = (0, 0, 0, missing) if value.ndim == 3 else (0, missing)
        out[key] = F.pad(value, widths, value=PAD_VALUES[key])
    return out


__all__ = ["COMPILE_MODES", "CompileCounter", "bucket_length", "compile_encoders", "pad_to_bucket"]
