"""FSDP2 for the pretraining loop (`train.fsdp: true`): torch's `fully_shard` per Conformer block and the root.

Why our own wrapping instead of `accelerate launch --use_fsdp`: accelerate switches to FSDP only on accelerator
devices; on CPU processes (gloo) its FSDP plugin is silently ignored and the run is plain DDP. `fully_shard` itself
runs on both, so one path is the one that is tested here on CPU and the one used on GPUs.

What changes under sharding, and where:
- parameters are `DTensor` shards (`Shard(0)` over one flat mesh of all processes); each block all-gathers its
  parameters just before its forward/backward and frees them after (`reshard_after_forward`), gradients are
  reduce-scattered and averaged over processes, exactly as DDP's all-reduce averages them (so the loop's
  global-count loss normalisation, `bookkeeping.backward_loss`, is unchanged);
- gradient accumulation: `set_requires_gradient_sync(False)` instead of DDP's `no_sync`;
- clipping: the norm of sharded gradients is a `DTensor`; `clip_grad_norm` returns the global norm as a float;
- checkpoints: model and optimiser state go through `torch.distributed.checkpoint` (every process writes its own
  shards; accelerate's `save_state` would write the optimiser from the main process only and lose the others'
  shards), and `full_model_state` gathers the whole model for `save_pretrained` on the main process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SHARDED_STATE = "fsdp"  # folder of the torch.distributed.checkpoint files inside a checkpoint


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Apply `fully_shard` to every Conformer block (student and EMA teacher) and then the root, in place.

    Args:
        model: a `ConformerSslForPreTraining` on `device`, identical on every process (same seed).
        device: the process's device; CPU runs shard over gloo.
    Returns the same module (now an `FSDPModule`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    encoders = [model.conformer] + ([model.teacher] if hasattr(model, "teacher") else [])
    for encoder in encoders:
        for block in encoder.layers:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: front end, heads, quantizers, projections
    return model


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """`clip_grad_norm_` over sharded gradients; returns the global norm (all processes' shards) as a float."""
    total = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(total, "full_tensor"):  # a DTensor whose placement holds the pending reduction over shards
        total = total.full_tensor()
    return float(total)


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process the main process's buffers, as DDP does before each forward.

    FSDP shards parameters only: buffers stay per process, and BatchNorm's running statistics drift apart (each
    process normalises its own batches). Before a checkpoint they are made one set, so the checkpoint (which stores
    a replicated tensor once, from whichever process) and the exported model hold the same values a resumed run
    continues from. Fixed buffers (random projections, DinoSR codewords) are identical everywhere already.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the model (teacher included) and the optimiser into `folder`."""
    import torch.distributed.checkpoint as dcp

    broadcast_buffers(model)

    dcp.save(_state(model, optimizer), checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read back what `save_sharded` wrote, into the same sharding (same number of processes or a re-shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"{folder} is missing: the checkpoint was not written with train.fsdp=true. Resume it with the setting "
            "it was written with."
        )
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on the CPU of the main process; every process must call it (collective).
    Other processes get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = [
    "broadcast_buffers",
    "SHARDED_STATE",
    "clip_grad_norm",
    "full_model_state",
    "load_sharded",
    "save_sharded",
    "shard_model",
]
