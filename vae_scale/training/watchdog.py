"""A frozen or vanished process, or a killed launcher, turned into a clear end instead of a
silent hang.

Under a launcher (torchrun / `accelerate launch` / srun) every trainer process runs a daemon
thread that
- beats: adds 1 to its own counter in the job's c10d store (the launcher's TCP store, a
  connection of its own) every few seconds, and watches the other processes' counters. A
  counter that stands still for `train.heartbeat_timeout_s` means that process is frozen (a
  stopped or hung node: its threads no longer run) or gone. Its peers are then stuck in a
  collective that cannot finish, so no checkpoint can be written: each says which process
  went silent, records exit status 3 (requeue: the latest checkpoint stands) and exits.
- watches its parent: when the launcher is killed (its processes are orphaned) or its store
  stops answering, the process asks for a stop as a SIGTERM would, so the job checkpoints at
  the next step and exits with status 3 instead of training on unsupervised.
A process alive but blocked (a hung file read) keeps beating; `train.ddp_timeout_s`, the
process group's timeout, ends the collectives waiting for it (training/loop.py says so).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from vae_scale.training.signals import REQUEUE_EXIT_CODE

KEY = "vae_scale/heartbeat/{}"


class Watchdog:
    """Started by the trainer when a launcher started it; `request_stop(reason)` asks the loop
    for a graceful stop; `record_exit(code)` writes the exit status file the Slurm script
    reads."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        request_stop: Callable[[str], None],
        record_exit: Callable[[int], int],
    ):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.request_stop, self.record_exit = request_stop, record_exit
        self.interval = min(5.0, timeout_s / 4)
        self.parent = os.getppid()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vae-scale-watchdog", daemon=True)
        self._store = None

    @staticmethod
    def wanted() -> bool:
        """A launcher started this process (torchrun and accelerate launch set these)."""
        return "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ

    def start(self) -> Watchdog:
        if self.world_size > 1:
            self._store = self._connect()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _connect(self):
        """A client connection of our own to the job's store (never the one the process
        group uses from the main thread)."""
        from torch.distributed import TCPStore

        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        try:
            return TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=self.interval * 2),
                wait_for_workers=False,
            )  # fmt: skip
        except Exception as err:  # no store to watch through: the parent check still runs
            print(f"warning: no heartbeat ({host}:{port}: {err})", file=sys.stderr)
            return None

    def _run(self) -> None:
        heard = {r: (-1, time.monotonic()) for r in range(self.world_size) if r != self.rank}
        while not self._done.wait(self.interval):
            if os.getppid() != self.parent:
                self._stop(f"its launcher (pid {self.parent}) is gone")
                return
            if self._store is None:
                continue
            try:
                self._store.add(KEY.format(self.rank), 1)
                counts = {r: self._store.add(KEY.format(r), 0) for r in heard}
            except Exception as err:
                self._stop(f"the job's store (the launcher's) stopped answering: {err}")
                return
            now = time.monotonic()
            for r, (count, since) in heard.items():
                if counts[r] != count:
                    heard[r] = (counts[r], now)
                elif now - since > self.timeout_s:
                    self._silent(r, now - since)

    def _stop(self, why: str) -> None:
        print(
            f"process {self.rank}: {why}; stopping after this step with a checkpoint",
            file=sys.stderr,
            flush=True,
        )
        self.request_stop(why)

    def _silent(self, rank: int, seconds: float) -> None:
        print(
            f"error: process {rank} of {self.world_size} has not been heard from for "
            f"{seconds:.0f} s (train.heartbeat_timeout_s={self.timeout_s:g}): it is frozen (a "
            f"stopped or hung node) or gone, so the collective the others wait in cannot "
            f"finish and no checkpoint can be written. Process {self.rank} on "
            f"{socket.gethostname()} exits with status {REQUEUE_EXIT_CODE}: the latest "
            f"checkpoint stands, and the same command resumes from it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(self.record_exit(REQUEUE_EXIT_CODE))  # the main thread is stuck: no unwinding


def is_collective_failure(err: BaseException) -> bool:
    """Whether a RuntimeError is a collective that timed out or lost its peer (gloo's and
    NCCL's own texts; torch's DistBackendError)."""
    text = str(err).lower()
    words = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")
    return type(err).__name__ == "DistBackendError" or (
        any(w in text for w in words) and ("gloo" in text or "nccl" in text or "c10d" in text)
    )
