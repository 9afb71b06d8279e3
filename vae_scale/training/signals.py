"""Graceful stop on SIGTERM / SIGUSR1 (Slurm preemption): finish the step, checkpoint, exit.

The handler only sets a flag; the training loop polls it at optimizer-step boundaries and, under
DDP, all ranks agree (max-reduce) so every rank stops after the same step. A second SIGTERM
exits at once.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

#: Exit status of a run that checkpointed after a stop signal: "requeue me" (slurm/train.sbatch).
REQUEUE_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(Exception):
    """Raised after the checkpoint is written; the CLI exits with REQUEUE_EXIT_CODE."""

    exit_code = REQUEUE_EXIT_CODE


class StopFlag:
    """Installs handlers for STOP_SIGNALS while active (a context manager)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGTERM:
            os._exit(128 + signum)  # second SIGTERM: the user (or Slurm) means it
        self.received = signum

    def __enter__(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. notebooks' worker threads)
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
