"""Logs that read well where users run: output to a file (Slurm, CI, nohup) gets whole,
rare progress lines and no carriage return; a real terminal (a pty) still gets tqdm's live
bar."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import REPO, TINY_FREY, tiny_overrides
from vae_scale.utils.progress import Progress, resolve_mode


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_in_files_and_under_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert resolve_mode("auto", FakeTerminal()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "lines"
    monkeypatch.setenv("SLURM_JOB_ID", "123")  # srun --pty: a terminal, but a job's log
    assert resolve_mode("auto", FakeTerminal()) == "lines"
    assert resolve_mode("bar", io.StringIO()) == "bar"


def test_lines_are_whole_and_as_rare_as_the_rarer_of_steps_and_seconds(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    progress = Progress(total=100, desc="epoch 2/5", mode="lines", every=10, every_s=5,
                        stream=out)  # fmt: skip
    for step in range(1, 101):
        clock[0] = step * 0.1  # 10 steps a second: the 5 s bound is the rarer one
        progress.update(1, samples=32, neg_elbo=1000.0 - step)
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 2  # at 50 steps (5 s), and the end (at 100 steps only once)
    assert lines[0] == (
        "epoch 2/5: step 50/100 (50%), 320.0 samples/s, neg_elbo 950.00, ETA 0:00:05"
    )
    assert lines[-1].startswith("epoch 2/5: step 100/100 (100%)") and "took 0:00:10" in lines[-1]


def test_lines_follow_the_step_bound_when_steps_are_slow(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    progress = Progress(total=40, mode="lines", every=10, every_s=5, stream=out,
                        final_line=False, initial=5)  # fmt: skip
    for _ in range(6, 41):
        clock[0] += 2.0  # a step every 2 s: the 10-step bound is the rarer one
        progress.update(1)
    progress.close()
    steps = [line.split()[1] for line in out.getvalue().splitlines()]
    assert steps == ["15/40", "25/40", "35/40"]  # resumed at 5; no line at the end


def run_tiny_training(frey_shards, tmp_path, stdout, stderr, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "vae_scale", "train", str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(frey_shards, tmp_path, *TINY_FREY), "train.epochs=3",
        "data.batch_size=20", "train.log_every_steps=5", "eval.picture_epochs=[]", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen(args, stdout=stdout, stderr=stderr, env=env)


@pytest.mark.slow
def test_training_written_to_a_file_has_no_carriage_return_and_few_lines(frey_shards, tmp_path):
    log = tmp_path / "job.out"
    with open(log, "w") as f:  # `vae-scale train ... > job.out 2>&1`, as a Slurm job writes
        proc = run_tiny_training(frey_shards, tmp_path, f, subprocess.STDOUT)
        assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "\r" not in text and "\x1b[" not in text  # no redraws, no cursor codes
    lines = text.splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch ") and "train/neg_elbo" in line]
    assert len(epoch_lines) == 3
    # 89 steps an epoch, each a fraction of a second: no progress line is due (30 s), so the
    # whole log is the start-up lines and one line per epoch
    assert len(lines) <= 3 + 2 * 3, text


@pytest.mark.slow
def test_a_real_terminal_still_shows_a_live_bar(frey_shards, tmp_path):
    leader, follower = pty.openpty()  # a pseudo-terminal, as ssh or tmux give
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # its size
    proc = run_tiny_training(frey_shards, tmp_path, follower, follower, "train.epochs=1")
    os.close(follower)
    seen = b""
    deadline = time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    assert proc.wait(timeout=60) == 0, seen[-2000:]
    os.close(leader)
    text = seen.decode(errors="replace")
    bars = re.findall(r"\repoch 1/1: +\d+%\|[^|]*\| *(\d+)/88 \[", text)  # tqdm's redrawn bar
    assert len(bars) >= 2 and int(bars[-1]) > int(bars[0]), text[-2000:]


@pytest.mark.slow
def test_progress_lines_come_every_log_every_steps_optimizer_steps(
    frey_shards, tmp_path, capsys, monkeypatch
):
    """With 2 batches per optimizer step, a line every 3 steps is one every 6 batches, and it
    says which optimizer step the run is at."""
    from conftest import tiny_frey_config
    from vae_scale.training.loop import train
    from vae_scale.utils import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    cfg = tiny_frey_config(
        frey_shards, tmp_path, "train.epochs=1", "data.batch_size=50", "train.progress=lines",
        "train.grad_accum_batches=2", "train.log_every_steps=3", "eval.picture_epochs=[]",
    )  # fmt: skip
    train(cfg)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 1/1:")]
    batches = [int(line.split()[3].split("/")[0]) for line in lines]
    assert batches == [6, 12, 18, 24, 30]  # 35 batches -> 34 (whole steps); none at the end
    steps = [int(line.split("step ")[1].split(",")[0]) for line in lines]
    assert steps == [3, 6, 9, 12, 15]
