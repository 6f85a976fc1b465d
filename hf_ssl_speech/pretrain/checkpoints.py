"""Complete-or-absent checkpoints: `save_pretrained` + `accelerator.save_state` + per-rank state, renamed when complete."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .sharding import SHARDED_STATE, full_model_state, load_sharded, save_sharded

logger = logging.getLogger(__name__)

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
    intact. A write that fails (disk full, I/O error, file too large) removes the temporary folder and stops the
    run with one line naming the path and the bytes needed (`CheckpointWriteError`). `trainer_state.json` records
    every file's size, so `--resume` can tell a checkpoint torn outside this rename (a truncated file on a network
    filesystem) and fall back to the previous one (`latest_usable`). Only the newest `keep_last` complete
    checkpoints are kept (plus those at `keep_steps`, never deleted), by the time they were written, and only after the new one is complete: the one just
    written is never deleted, even when its step is lower than older ones' (a run resumed from an earlier
    checkpoint). `<output_dir>/model` is a relative link to the newest checkpoint's `model/`, replaced atomically,
    so the run's model has one stable path.
    """

    def __init__(self, output_dir: str | Path, keep_last: int = 3, keep_steps: Sequence[int] = ()) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_steps = set(keep_steps)  # never pruned, not counted in keep_last

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

    def latest_usable(self) -> Path | None:
        """The newest complete checkpoint whose files pass `checkpoint_problem`, warning about each newer one that
        does not; None if there is no complete checkpoint. Raises `UserError` when there are some and none is
        usable."""
        done = self.complete()
        damaged: list[str] = []
        for path in reversed(done):
            problem = checkpoint_problem(path)
            if problem is None:
                if damaged:
                    logger.warning(
                        "--resume: %s; falling back to %s, the newest checkpoint that is complete",
                        "; ".join(damaged),
                        path.name,
                    )
                return path
            damaged.append(f"{path.name} is damaged ({problem})")
        if damaged:
            raise UserError(
                f"--resume: no usable checkpoint under {self.root}: {'; '.join(damaged)}. Start a new run in another "
                "train.output_dir (or restore the files from a backup)"
            )
        return None

    @staticmethod
    def check_usable(path: Path) -> Path:
        """`path` if it is a complete, undamaged checkpoint; else a `UserError` saying what is wrong with it."""
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume {path}: not a complete checkpoint (no {STATE_FILE}); pick another one")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise UserError(f"--resume {path}: the checkpoint is damaged ({problem}); pick an earlier one")
        return path

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
        # Each process writes its part; a failed write is caught so that every process still reaches the
        # agreement after each phase (a process that raised here would leave the others in a collective forever).
        failure: BaseException | None = None
        try:
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
        except Exception as error:  # noqa: BLE001 - diagnosed in _write_error, re-raised unless the disk refused it
            failure = error
        (failed,) = any_process(accelerator, failure is not None)  # also the barrier: every part is written
        if accelerator.is_main_process and not failed:
            try:
                if before_rename is not None:
                    before_rename(tmp)
                state = {"step": step, "saved_at": time.time(), "num_processes": accelerator.num_processes}
                state["files"] = _file_sizes(tmp)  # what `checkpoint_problem` checks at resume
                _write_json_atomic(tmp / STATE_FILE, {**state, **trainer_state})
                _fsync_dir(tmp)
            except Exception as error:  # noqa: BLE001
                failure = error
        if failed or any_process(accelerator, failure is not None)[0]:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # the previous complete checkpoint stays as it was
            accelerator.wait_for_everyone()
            raise self._write_error(tmp, failure) from failure
        if accelerator.is_main_process:
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self.link_model(final)
            self._prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def link_model(self, checkpoint: Path) -> None:
        """Point `<output_dir>/model` at `checkpoint/model` (a relative link, replaced atomically)."""
        link = self.root.parent / "model"
        if link.exists() and not link.is_symlink():
            logger.warning("%s exists and is not a link: not replacing it with the newest model", link)
            return
        tmp = self.root.parent / ".model-link.tmp"
        try:
            if tmp.is_symlink():
                tmp.unlink()
            os.symlink(Path(self.root.name) / checkpoint.name / "model", tmp, target_is_directory=True)
            os.replace(tmp, link)
        except OSError as error:  # e.g. a filesystem without links: the checkpoint paths still work
            logger.warning("could not link %s to the newest model (%s)", link, error)

    def _write_error(self, tmp: Path, failure: BaseException | None) -> BaseException:
        """A one-line `CheckpointWriteError` for a write that failed because of the disk; other errors as they are."""
        reason = _write_failure_reason(failure)
        if failure is not None and reason is None:
            return failure  # not a write failure: a bug, keep its traceback
        previous = self.latest()
        needed = _folder_size(previous) if previous is not None else None
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        need = f"needs about {_bytes(needed)}" if needed else "needs space for one more checkpoint"
        have = f", {_bytes(free)} free there" if free is not None else ""
        kept = f"{previous} is intact" if previous is not None else "no earlier checkpoint exists"
        return CheckpointWriteError(
            f"could not write checkpoint {tmp} ({reason or 'another process failed to write its part'}): it "
            f"{need}{have}. {kept}; free space (or lower train.keep_last) and rerun with --resume"
        )

    def _prune(self, keep: Path) -> None:
        others = [path for path in self.complete() if path != keep and _step_of(path) not in self.keep_steps]
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
        trainer_state = json.loads(state_file.read_text())
        written_by = int(trainer_state.get("num_processes", len(list(path.glob("rank_*.pt")))))
        if written_by and written_by != accelerator.num_processes:
            # Each process's data position, mask generator and RNG states are in the checkpoint: another process
            # count would replay or skip data and change every random stream, so the run could not continue exactly.
            raise UserError(
                f"{path} was written by {written_by} process(es) and this run has {accelerator.num_processes}: "
                f"resume with `accelerate launch --num_processes {written_by} ...` (the data position and random "
                "streams are per process); to go on with another count, start a new run"
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
        return trainer_state, rank_state


def _step_of(folder: Path) -> int:
    return int(CHECKPOINT_RE.match(folder.name).group(1))


def _saved_at(folder: Path) -> float:
    try:
        return float(json.loads((folder / STATE_FILE).read_text()).get("saved_at", 0.0))
    except (OSError, ValueError):
        return 0.0


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, I/O error, file size limit); the previous one is intact."""


# errno of a write that failed because of the storage, not the program: disk full, quota, I/O error, file too large.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}
# torch.save and safetensors report a failed write in their own words, without an errno.
WRITE_FAILURE_WORDS = ("file write failed", "no space left", "file too large", "input/output error", "quota")


def _write_failure_reason(failure: BaseException | None) -> str | None:
    """What went wrong, if `failure` is a write that the storage refused (None: not such an error)."""
    if failure is None:
        return None
    for error in (failure, failure.__cause__, failure.__context__):
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return f"{os.strerror(error.errno)}: {error.filename or ''}".rstrip(": ")
    text = str(failure).lower()
    if any(word in text for word in WRITE_FAILURE_WORDS):
        return str(failure).splitlines()[0][:200]
    return None


def any_process(accelerator: Any, *flags: object) -> tuple[bool, ...]:
    """Each flag: True if it is set on any process (one all-reduce for all of them)."""
    local = [bool(flag) for flag in flags]
    if accelerator.num_processes == 1:
        return tuple(local)
    total = accelerator.reduce(torch.tensor([float(f) for f in local], device=accelerator.device), "sum")
    return tuple(bool(v > 0) for v in total.tolist())


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _bytes(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (a missing or truncated file, an unreadable safetensors
    header), or None when it looks whole. Checks the sizes recorded at save time (checkpoints written before they
    were recorded: the safetensors headers only)."""
    try:
        recorded = json.loads((path / STATE_FILE).read_text()).get("files", {})
    except (OSError, ValueError) as error:
        return f"{STATE_FILE} unreadable: {error}"
    for name, size in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size:,} bytes, {size:,} were written"
    for file in sorted(path.rglob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem is not None:
            return f"{file.relative_to(path)}: {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes the header spans."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length <= 0 or 8 + length > size:
                return "header cut off"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        return f"header unreadable ({error})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return f"truncated: {size:,} bytes, the header needs {8 + length + max(ends):,}"
    return None


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
