"""Preemption for the `Trainer` runs: a stop signal ends training after the current step with Trainer's own
checkpoint (`checkpoint-N/`: weights, optimiser, scheduler, RNG, trainer_state.json), then exit status 75.

`StopRequest` (hf_ssl_speech.preemption) catches SIGTERM / SIGUSR1 / SIGINT; `PreemptionCallback` looks at it at the
end of every optimiser step, agrees on it over all processes (one all-reduce when torch.distributed runs) and sets
Trainer's `should_save` and `should_training_stop`, so Trainer writes the checkpoint the usual way and returns.
`--resume_from_checkpoint` continues it.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

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


__all__ = ["PreemptionCallback"]
