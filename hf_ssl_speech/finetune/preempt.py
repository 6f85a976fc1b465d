"""Preemption for the `Trainer` runs: a stop signal ends training after the current step with Trainer's own
checkpoint (`checkpoint-N/`: weights, optimiser, scheduler, RNG, trainer_state.json), then exit status 75.

`StopRequest` (hf_ssl_speech.preemption) catches SIGTERM / SIGUSR1 / SIGINT; `PreemptionCallback` looks at it at the
end of every optimiser step, agrees on it over all processes (one all-reduce when torch.distributed runs) and sets
Trainer's `should_save` and `should_training_stop`, so Trainer writes the checkpoint the usual way and returns.
`--resume_from_checkpoint` continues it.

`WallClock` keeps a run's training time whole across such stops: every checkpoint records the seconds spent up to
it, and a resumed run starts its count from there, so its summary (and the audio-s/s worked out from it) covers
every leg, not only the last one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..preemption import StopRequest


class PreemptionCallback(TrainerCallback):
    """Save and stop after the step in which any process received a stop signal."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self.stopped_by: str | None = None  # the signal's name once training stopped for it

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> TrainerControl:
        if _any_process(self.stop.received is not None, args.device):
            self.stopped_by = self.stop.received or "a signal to another process"
            control.should_save = True
            control.should_training_stop = True
        return control


def _any_process(flag: bool, device: torch.device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    total = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(total)
    return bool(total.item() > 0)


WALL_CLOCK_FILE = "wall_clock.json"


class WallClock(TrainerCallback):
    """Training seconds summed over the legs of a run (a kill or preemption, then `--resume_from_checkpoint`).

    Each checkpoint gets `wall_clock.json` with the seconds spent up to it. The time between the last checkpoint and
    a kill is not counted: those steps are trained again after the resume, and counted then.
    """

    def __init__(self, resume_from: str | Path | None = None) -> None:
        self.before = seconds_at(resume_from)
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> TrainerControl:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():  # Trainer calls on_save once the folder is written
            (folder / WALL_CLOCK_FILE).write_text(json.dumps({"train_seconds": round(self.seconds, 1)}))
        return control


def seconds_at(checkpoint: str | Path | None) -> float:
    """The training seconds recorded in a checkpoint; 0 for none, or one written before this record existed."""
    record = Path(checkpoint) / WALL_CLOCK_FILE if checkpoint else None
    return float(json.loads(record.read_text())["train_seconds"]) if record and record.is_file() else 0.0


__all__ = ["PreemptionCallback", "WallClock", "seconds_at"]
