"""Graceful stop on SIGTERM / SIGUSR1 (Slurm preemption) and Ctrl-C (SIGINT): finish the
step, checkpoint, exit.

The handler only sets a flag; the training loop polls it at optimizer-step boundaries and, under
DDP, all ranks agree (max-reduce) so every rank stops after the same step. A second SIGTERM or
Ctrl-C exits at once. Loader workers ignore the stop signals (`ignore_stop_signals`): a
scheduler that signals the whole process group must not kill them under the main process.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

#: Exit status of a run that checkpointed after a stop signal: "requeue me" (slurm/train.sbatch).
REQUEUE_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: `accelerate launch` (torchrun) reports any failed process as exit status 1 and stops the
#: others as soon as one exits. A job script that must tell "checkpointed after a stop signal,
#: requeue me" (3) from a failure names a folder here; every process writes its own exit status
#: into <folder>/rank<RANK> (slurm/train.sbatch reads them).
EXIT_STATUS_DIR_ENV = "VAE_SCALE_EXIT_STATUS_DIR"


def record_exit_status(code: int) -> int:
    """Write `code` to $VAE_SCALE_EXIT_STATUS_DIR/rank<RANK> (when set), then return it."""
    folder = os.environ.get(EXIT_STATUS_DIR_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"rank{os.environ.get('RANK', '0')}").write_text(f"{code}\n")
    return code


class TrainingInterrupted(Exception):
    """Raised after the checkpoint is written; the CLI exits with REQUEUE_EXIT_CODE."""

    exit_code = REQUEUE_EXIT_CODE


class StopFlag:
    """Installs handlers for STOP_SIGNALS while active (a context manager)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.reason = "stop signal received"  # what the interruption's message starts with
        # where the loop stands (training, the end of an epoch), for a failed collective's
        # message: the other processes may be waiting for work process 0 does alone
        self.doing = "starting"
        self._previous: dict[int, object] = {}

    def request(self, reason: str) -> None:
        """A stop asked for by this process itself (training/watchdog.py), as a SIGTERM."""
        self.reason = reason
        self.received = signal.SIGTERM

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum in (signal.SIGTERM, signal.SIGINT):
            os._exit(128 + signum)  # a second SIGTERM or Ctrl-C: the user (or Slurm) means it
        if signum == signal.SIGINT:
            print("\nCtrl-C: stopping after this step with a checkpoint (again: stop now)")
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


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the main process alone decides when to stop."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def kill_stray_loader_workers() -> None:
    """At exit: SIGKILL the daemonic children (loader workers) still alive. They ignore
    SIGTERM, which multiprocessing's own exit handler sends before joining them forever."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
