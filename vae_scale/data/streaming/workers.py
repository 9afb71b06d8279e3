"""Loader worker processes as the trainer sees them: the memory each holds (looked at every
few seconds) and what to say when one dies under the loader (a worker killed by the kernel's
out-of-memory killer is the usual case): which worker, how, and what it held."""

from __future__ import annotations

import signal
import time
from typing import Any


class WorkerMemory:
    """A loader's worker processes and their resident memory, looked at every few seconds
    (one read of /proc per worker): what a worker held before it died."""

    def __init__(self, workers: list[Any], every_s: float = 2.0):
        self.workers, self.every_s = workers, every_s
        self.rss_mb: dict[int, float] = {}
        self.last = 0.0
        self.look()

    def look(self) -> None:
        now = time.monotonic()
        if not self.workers or now - self.last < self.every_s:
            return
        self.last = now
        for worker in self.workers:
            rss = resident_mb(worker.pid)
            if rss is not None:
                self.rss_mb[worker.pid] = rss

    def lost(self, wait_s: float = 5.0) -> int | None:
        """The index of a worker that has died (None: all alive); a worker being killed
        this moment gets `wait_s` to be seen dead."""
        deadline = time.monotonic() + wait_s
        while True:
            for i, worker in enumerate(self.workers):
                if worker.exitcode is not None and not worker.is_alive():
                    return i
            if time.monotonic() > deadline or not self.workers:
                return None
            time.sleep(0.1)


def resident_mb(pid: int | str = "self") -> float | None:
    """A process's resident memory in MB (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class WorkerLost(RuntimeError):
    """A loader worker process died (killed: most often by the kernel's out-of-memory killer):
    the epoch's stream cannot go on. Says which worker, how and what memory it held."""

    def __init__(self, memory: WorkerMemory, index: int, rank: int):
        worker = memory.workers[index]
        code = worker.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            how = f"was killed by {name}"
            cause = (
                "most likely the kernel's out-of-memory killer"
                if name == "SIGKILL"
                else "a signal from outside the run"
            )
        else:
            how, cause = f"exited with status {code}", "a crash in the worker"
        held = memory.rss_mb.get(worker.pid)
        mine = resident_mb()
        memory_text = (
            f"it held {held:.0f} MB at last look" if held is not None else "its memory unknown"
        ) + (f", the process {mine:.0f} MB" if mine is not None else "")
        super().__init__(
            f"loader worker {index} (pid {worker.pid}) of process {rank} {how} ({cause}: "
            f"{memory_text}). To use less memory: fewer data.num_workers, a smaller "
            f"data.shuffle_buffer or data.batch_size, or data.cache_in_memory=false"
        )
