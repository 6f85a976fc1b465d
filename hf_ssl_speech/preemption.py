"""Preemption: turn SIGTERM / SIGUSR1 / SIGINT into "finish this optimiser step, checkpoint, exit 75".

Clusters ask a job to stop before they kill it: SLURM sends SIGTERM at the end of the time limit or on
preemption (SIGUSR1 with `#SBATCH --signal=USR1@120`), Kubernetes sends SIGTERM, a person presses Ctrl-C.
`StopRequest` records the first such signal; the training loops look at it after every optimiser step, agree
across processes on the step to stop at (one all-reduce), write a complete checkpoint there and exit with
`PREEMPTED_EXIT_CODE`, which a requeue script tests (docs/scaling.md). A second signal means "now": the
default action runs at once (the process dies by that signal), and the newest complete checkpoint is intact
because checkpoints are written to a temporary folder and renamed only when complete.

Handlers are installed only in the main thread (Python's rule) and the previous ones are put back on exit, so
calling the loops from a notebook or a test leaves the interpreter as it was.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType

logger = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". Distinct from 0 (done), 1 (a bug),
# 2 (a user error) and 128+N (killed by signal N), so `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID` is exact.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Context manager: while active, the first stop signal sets `received` (its name) instead of killing.

    Example:
        with StopRequest() as stop:
            while training:
                step()
                if stop.received: save(); break
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the second signal: stop now, by that signal's default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = name
        # Not through `logging` (a handler may run inside a logging call and take its lock again): stderr is safe.
        os.write(
            2,
            f"\n{name} received: finishing this optimiser step, then writing a checkpoint "
            f"(send it again to stop at once)\n".encode(),
        )


def preempted_message(step: int, checkpoint: object, name: str, rerun: str = "--resume") -> str:
    """The line every loop prints when it stops for a signal (tests and requeue scripts look for it).

    Args:
        rerun: the option that continues the run (`--resume` for pretraining, `--resume_from_checkpoint ...` for
            fine-tuning).
    """
    return (
        f"preempted at step {step} ({name}): checkpoint {checkpoint} written; rerun with {rerun} "
        f"(exit status {PREEMPTED_EXIT_CODE})"
    )


__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "StopRequest", "preempted_message"]
