"""Progress of a long loop, readable where it is shown: tqdm's live bar on a terminal; plain,
whole lines where output goes to a file (Slurm job files, CI logs, `nohup`, W&B's console
tab), which a bar fills with carriage-return redraws.

`train.progress` (and `--progress` of `shard` and `eval`; benchmarks run these): `auto` (a bar
when stderr is a terminal and no Slurm job is running, else lines), `bar`, `lines` or `off`.
In `lines` mode a line is written when at least `every` units (batches, for training) and
`every_s` seconds have passed since the last one (whichever is rarer), and at the end:

    epoch 3/20: batch 60/110 (55%), 310.4 samples/s, step 1234, neg_elbo 2301.55, ETA 0:00:07
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

MODES = ("auto", "bar", "lines", "off")
EVERY_S = 30.0  # seconds between plain lines at the least
_default_mode = "auto"


def set_default_mode(mode: str) -> None:
    """The mode of every Progress not given one (the CLI's --progress)."""
    global _default_mode
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {MODES}")
    _default_mode = mode


def resolve_mode(mode: str | None = None, stream: TextIO | None = None) -> str:
    """'bar' or 'lines' (or 'off') for `mode`; 'auto' decides by where the output goes."""
    mode = _default_mode if mode is None else mode
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    interactive = getattr(stream, "isatty", lambda: False)()
    return "bar" if interactive and not os.environ.get("SLURM_JOB_ID") else "lines"


class Progress:
    """Wraps an iterable (or is updated by hand) of `total` units (batches, images, shards),
    `initial` already done. `update(n, samples=..., **values)`: n units done, the samples they
    held (for samples/s) and values to show (the latest of each)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        mode: str | None = None,
        initial: int = 0,
        every: int = 1,
        every_s: float | None = None,  # None: EVERY_S
        unit: str = "step",
        disable: bool = False,
        stream: TextIO | None = None,
        final_line: bool = True,
    ):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.mode = "off" if disable else resolve_mode(mode, self.stream)
        self.n = self.last_n = self.initial = initial
        self.every, self.every_s = max(1, every), EVERY_S if every_s is None else every_s
        self.final_line = final_line
        self.values: dict[str, Any] = {}
        self.samples = 0
        self.start = self.last_t = time.monotonic()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, leave=False, unit=unit, file=self.stream
            )

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1, samples: int = 0, **values: Any) -> None:
        self.n += n
        self.samples += samples
        self.values.update(values)
        if self.bar is not None:
            self.bar.update(n)
            if values:
                self.bar.set_postfix({k: _fmt(v) for k, v in self.values.items()}, refresh=False)
        elif self.mode == "lines":
            now = time.monotonic()
            due = self.n - self.last_n >= self.every and now - self.last_t >= self.every_s
            if due and self.n != self.total:  # the last unit is close()'s line
                self._line(now)

    def set_values(self, **values: Any) -> None:
        """Values to show from now on, without a step."""
        self.update(0, **values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines":
            if self.final_line and self.n > self.last_n:
                self._line(time.monotonic())
            self.mode = "closed"

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = self.n - self.initial
        parts = [f"{self.unit} {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if self.samples and elapsed > 0:
            parts.append(f"{self.samples / elapsed:.1f} samples/s")
        parts += [f"{k} {_fmt(v)}" for k, v in self.values.items()]
        if self.total and done and self.n < self.total:
            left = elapsed / done * (self.total - self.n)
            parts.append(f"ETA {datetime.timedelta(seconds=round(left))}")
        elif self.n == self.total:
            parts.append(f"took {datetime.timedelta(seconds=round(elapsed))}")
        prefix = f"{self.desc}: " if self.desc else ""
        print(prefix + ", ".join(parts), file=self.stream, flush=True)
        self.last_n, self.last_t = self.n, now


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
