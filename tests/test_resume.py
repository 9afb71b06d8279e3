"""Never lose a run: kills, preemption signals, failed checkpoint writes."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_frey_config
from vae_scale.training import checkpoint
from vae_scale.training.loop import train
from vae_scale.training.signals import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow  # every test here launches real processes


def cli_args(shards: Path, run_dir: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vae_scale",
        "train",
        str(REPO / "configs" / "frey_conv.yaml"),
        f"data.shards_dir={shards}",
        f"run.dir={run_dir}",
        f"run.name={name}",
        "model.base_channels=4",
        "model.latent_dim=4",
        "data.batch_size=25",
        "train.epochs=2",
        "train.checkpoint_every_steps=7",
        "train.log_every_steps=1",
        "train.keep_checkpoints=100",
        "eval.picture_epochs=[]",
        "wandb.mode=disabled",
    ]


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, **kw)


def start_and_signal(args: list[str], after_lines: int, sig: int, log: Path) -> int:
    """Start a training run, send `sig` once `log` has `after_lines` rows; its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= after_lines:
            break
        assert proc.poll() is None, f"run ended before the signal: {proc.stderr.read()[-2000:]}"
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=240)
    return proc.returncode


def final_state(
    run: Path, weights: tuple[str, ...] = ("model",)
) -> tuple[dict, list[str], list[dict]]:
    """The latest checkpoint's tensors (of each file in `weights`, keyed `file/name` when more
    than one), the step rows and the epoch rows without their wall-clock columns."""
    ckpt = checkpoint.latest_checkpoint(run / "checkpoints")
    params = {
        (f"{name}/{k}" if len(weights) > 1 else k): v
        for name in weights
        for k, v in load_file(ckpt / f"{name}.safetensors").items()
    }
    steps = (run / "steps.jsonl").read_text().splitlines()
    epochs = [
        {k: v for k, v in json.loads(r).items() if not k.startswith(("time/", "throughput/"))}
        for r in (run / "metrics.jsonl").read_text().splitlines()
    ]  # wall-clock columns legitimately differ
    return params, steps, epochs


@pytest.fixture(scope="module")
def uninterrupted(frey_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    done = run_cli(cli_args(frey_shards, run_dir, "ref"))
    assert done.returncode == 0, done.stderr[-3000:]
    return final_state(run_dir / "ref")


def assert_same_run(a, b):
    params_a, steps_a, epochs_a = a
    params_b, steps_b, epochs_b = b
    assert steps_a == steps_b  # every logged step loss, bitwise (CPU fp32, same threads)
    assert epochs_a == epochs_b
    assert params_a.keys() == params_b.keys()
    for key in params_a:
        assert torch.equal(params_a[key], params_b[key]), key


def test_sigkill_at_random_step_then_same_command_resumes_exactly(
    frey_shards, tmp_path, uninterrupted
):
    args = cli_args(frey_shards, tmp_path, "killed")
    kill_after = random.Random(os.getpid()).randint(9, 100)  # 140 steps in the run
    code = start_and_signal(args, kill_after, signal.SIGKILL, tmp_path / "killed" / "steps.jsonl")
    assert code == -signal.SIGKILL
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(final_state(tmp_path / "killed"), uninterrupted)


def test_sigterm_checkpoints_exits_for_requeue_and_resumes_exactly(
    frey_shards, tmp_path, uninterrupted
):
    args = cli_args(frey_shards, tmp_path, "preempted")
    code = start_and_signal(args, 30, signal.SIGTERM, tmp_path / "preempted" / "steps.jsonl")
    assert code == REQUEUE_EXIT_CODE
    ckpt = checkpoint.latest_checkpoint(tmp_path / "preempted" / "checkpoints")
    state = checkpoint.read_train_state(ckpt)
    assert state["batch_in_epoch"] > 0 and state["opt_step"] >= 30  # mid-epoch, after the signal
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    assert_same_run(final_state(tmp_path / "preempted"), uninterrupted)


def test_async_checkpoints_survive_sigkill_and_sigterm_and_resume_exactly(
    frey_shards, tmp_path, uninterrupted
):
    """train.checkpoint_async: killed while a checkpoint may still be finishing on its thread,
    the previous one stands; preempted, the run's last checkpoint is finished before exit 3."""
    args = [*cli_args(frey_shards, tmp_path, "async"), "train.checkpoint_async=true"]
    log, root = tmp_path / "async" / "steps.jsonl", tmp_path / "async" / "checkpoints"
    code = start_and_signal(args, 8, signal.SIGKILL, log)  # step 7's checkpoint just began
    assert code == -signal.SIGKILL
    code = start_and_signal(args, 30, signal.SIGTERM, log)
    assert code == REQUEUE_EXIT_CODE
    ckpt = checkpoint.latest_checkpoint(root, verify_hashes=True)
    state = checkpoint.read_train_state(ckpt)
    assert state["batch_in_epoch"] > 0 and state["opt_step"] >= 30  # the preemption's own
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(root.glob(".tmp-*"))
    assert_same_run(final_state(tmp_path / "async"), uninterrupted)


def test_second_sigterm_exits_at_once():
    code = """
import os, signal, sys, time
from vae_scale.training.signals import StopFlag

with StopFlag() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("first:", stop.received == signal.SIGTERM, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("still running")
"""
    done = run_cli([sys.executable, "-c", code])
    assert done.stdout.strip() == "first: True"  # the first only set the flag
    assert done.returncode == 128 + signal.SIGTERM  # the second ended the process


def test_failed_checkpoint_write_keeps_previous_and_resume_picks_it(
    frey_shards, tmp_path, monkeypatch
):
    cfg = tiny_frey_config(frey_shards, tmp_path, "train.epochs=1")
    run = train(cfg)
    previous = checkpoint.latest_checkpoint(run / "checkpoints")

    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def disk_full(self, output_dir=None, **kw):
        real_save(self, output_dir, **kw)
        big = Path(output_dir) / "model.safetensors"
        big.write_bytes(big.read_bytes()[:100])  # half-written ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    cfg = tiny_frey_config(frey_shards, tmp_path, "train.epochs=2")
    with pytest.raises(OSError, match=r"No space left.*previous checkpoint .* is intact"):
        train(cfg)
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert checkpoint.latest_checkpoint(run / "checkpoints", verify_hashes=True) == previous
    assert not list((run / "checkpoints").glob(".tmp-*"))
    train(cfg)  # --resume auto continues from the intact checkpoint
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_damaged_or_incomplete_checkpoints_are_skipped(frey_shards, tmp_path):
    cfg = tiny_frey_config(frey_shards, tmp_path, "train.epochs=2")
    run = train(cfg)
    first, second = checkpoint.complete_checkpoints(run / "checkpoints")
    # A newer folder without a manifest (a crash mid-write) is not "latest".
    (run / "checkpoints" / "step_99999999").mkdir()
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert checkpoint.latest_checkpoint(run / "checkpoints") == second
    # Flipped bytes in the newest: resume falls back to the one before.
    data = bytearray((second / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (second / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning):
        assert checkpoint.latest_checkpoint(run / "checkpoints", verify_hashes=True) == first


def test_full_disk_is_a_clear_cli_error(monkeypatch, capsys):
    import vae_scale.training.loop
    from vae_scale.cli import main

    def disk_full(cfg, **kw):
        raise OSError(
            errno.ENOSPC, "writing checkpoint X failed; the previous checkpoint Y is intact"
        )

    monkeypatch.setattr(vae_scale.training.loop, "train", disk_full)
    assert main(["train", str(REPO / "configs" / "frey_conv.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: disk full" in err and "previous checkpoint Y is intact" in err
    assert "Traceback" not in err
