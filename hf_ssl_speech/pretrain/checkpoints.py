"""Complete-or-absent checkpoints: `save_pretrained` + `accelerator.save_state` + per-rank state, renamed when complete."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .sharding import SHARDED_STATE, full_model_state, load_sharded, save_sharded

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointManager:
    """Complete-or-absent checkpoints under `<output_dir>/checkpoints/checkpoint-<step>/`.

    A checkpoint folder holds
      - `model/`: `save_pretrained` of the model and the feature extractor (loadable with `from_pretrained`),
      - `accelerate/`: `accelerator.save_state` (weights, optimiser, scheduler, GradScaler, RNG of every process),
      - `fsdp/` instead of the weights and optimiser in `accelerate/` under `train.fsdp`: every process's shards
        of both, written by `torch.distributed.checkpoint` (`sharding.save_sharded`),
      - `rank_<i>.pt`: what each process needs beyond that (mask generator state, its data position),
      - `trainer_state.json`: step, data position, metric history, guard counters; written last.
    Everything is written into `.tmp-checkpoint-<step>` and renamed when complete: a crash or kill while writing
    leaves a `.tmp-*` folder that `latest()` ignores (and the next save removes), and the previous checkpoint
    intact. Only the newest `keep_last` complete checkpoints are kept, by the time they were written: the one just
    written is never deleted, even when its step is lower than older ones' (a run resumed from an earlier
    checkpoint).
    """

    def __init__(self, output_dir: str | Path, keep_last: int = 3) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"checkpoint-{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest written first (then by step)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = CHECKPOINT_RE.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((_saved_at(child), int(match.group(1)), child))
        return [path for _, _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    def save(
        self,
        step: int,
        accelerator: Any,
        model: nn.Module,
        trainer_state: Mapping[str, Any],
        rank_state: Mapping[str, Any] | None = None,
        feature_extractor: Any = None,
        before_rename: Callable[[Path], None] | None = None,
        sharded: tuple[nn.Module, torch.optim.Optimizer] | None = None,
    ) -> Path:
        """Write checkpoint `step` from every process (all must call this); returns its final path.

        Args:
            accelerator: the run's `Accelerator` (its prepared model/optimiser/scheduler are saved).
            model: the prepared model (unwrapped here for `save_pretrained`).
            trainer_state: JSON-able dict from the main process (step, data position, history, ...).
            rank_state: this process's own state (torch-saveable), stored as `rank_<i>.pt`.
            feature_extractor: saved next to the model so the folder is a complete `from_pretrained` source.
            before_rename: called on the main process with the temporary folder just before the rename
                (the loop draws the loss-curve PNG there; tests use it to simulate a crash mid-write).
            sharded: (model, optimiser) of an FSDP run: their shards go to `fsdp/`, and the model is gathered
                whole for `save_pretrained` (every process takes part).
        """
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-checkpoint-*"):  # leftovers of an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))
        torch.save(dict(rank_state or {}), tmp / f"rank_{accelerator.process_index}.pt")
        full_state = None
        if sharded is not None:
            save_sharded(tmp / SHARDED_STATE, *sharded)
            full_state = full_model_state(sharded[0])  # collective: the main process gets the whole model
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(tmp / "model", state_dict=full_state)
            if feature_extractor is not None:
                feature_extractor.save_pretrained(tmp / "model")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if before_rename is not None:
                before_rename(tmp)
            _write_json_atomic(tmp / STATE_FILE, {"step": step, "saved_at": time.time(), **trainer_state})
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        others = [path for path in self.complete() if path != keep]
        for old in others[: max(0, len(others) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(
        path: str | Path, accelerator: Any, sharded: tuple[nn.Module, torch.optim.Optimizer] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the accelerate state (and, for FSDP runs, the `sharded` model and optimiser) from checkpoint
        `path`; returns (trainer_state, this rank's state)."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pick another one.")
        written_sharded = (path / SHARDED_STATE).is_dir()
        if written_sharded != (sharded is not None):
            raise UserError(
                f"{path} was written {'with' if written_sharded else 'without'} FSDP and this run has "
                f"train.fsdp={str(sharded is not None).lower()}: resume with train.fsdp={str(written_sharded).lower()} "
                "(and as many processes)"
            )
        accelerator.load_state(str(path / "accelerate"))
        if sharded is not None:
            load_sharded(path / SHARDED_STATE, *sharded)
        rank_file = path / f"rank_{accelerator.process_index}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{rank_file} is missing: the checkpoint was written by fewer processes than this run has "
                f"({accelerator.num_processes}). Resume with the same number of processes."
            )
        rank_state = torch.load(rank_file, weights_only=False)
        return json.loads(state_file.read_text()), rank_state


def _saved_at(folder: Path) -> float:
    try:
        return float(json.loads((folder / STATE_FILE).read_text()).get("saved_at", 0.0))
    except (OSError, ValueError):
        return 0.0


class OutputDirError(UserError):
    """A fresh run pointed at a folder that holds another run."""


def check_output_dir(output_dir: str | Path, resume: bool | str | Path) -> None:
    """Refuse to start a fresh run in a folder that already holds files: runs never mix, nothing is lost.

    Without this, a second run wrote its checkpoints, curves and TensorBoard events next to the first one's, and
    the rotation could delete the new run's checkpoint as the oldest step.
    """
    folder = Path(output_dir)
    if resume not in (False, None) or not folder.is_dir() or not any(folder.iterdir()):
        return
    latest = CheckpointManager(folder).latest()
    held = f"a run (newest checkpoint {latest.name})" if latest else "files of an earlier run"
    raise OutputDirError(
        f"train.output_dir={str(folder)!r} already holds {held}. Add --resume to continue it, choose a new folder "
        f"(train.output_dir={folder}-2), or delete {folder} first."
    )


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
