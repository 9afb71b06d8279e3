"""A frozen rank and a killed launcher, through real 2-process `accelerate launch` runs:
a process stopped with SIGSTOP (a stuck node) or orphaned by `kill -9` of its launcher ends
the job within a bounded time, with a message naming the process and exit status 3 (requeue),
and the same command resumes the run."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from conftest import TINY_FREY as TINY
from helpers.processes import command, descendants
from vae_scale.training import checkpoint

pytestmark = pytest.mark.slow


def launch(shards: Path, run_dir: Path, status_dir: Path, *extra: str) -> subprocess.Popen:
    args = [
        *command(2), "train", str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(shards, run_dir, *TINY), "model.base_channels=4", "model.latent_dim=4",
        "data.batch_size=10", "train.epochs=2", "train.log_every_steps=1",
        "train.checkpoint_every_steps=10", "train.heartbeat_timeout_s=6", "eval.picture_epochs=[]",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(PYTHONPATH=str(REPO), VAE_SCALE_EXIT_STATUS_DIR=str(status_dir))
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def trainers(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's trainer processes (not their loader workers)."""
    found = {}
    for pid in descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks and b"vae_scale.cli" in cmdline:
            found.setdefault(int(ranks[0]), pid)
    return found


def wait_for_steps(proc: subprocess.Popen, run: Path, rows: int) -> None:
    deadline = time.time() + 180
    steps = run / "steps.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if steps.is_file() and len(steps.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached {rows} steps: {proc.communicate()[0][-3000:]}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def resume_finishes(shards: Path, tmp_path: Path) -> None:
    proc = launch(shards, tmp_path, tmp_path / "status2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    epochs = [json.loads(r)["epoch"] for r in (tmp_path / "tiny" / "metrics.jsonl").open()]
    assert epochs == [1, 2]


@pytest.mark.parametrize(
    "settings, said",
    [
        ((), "process 1 of 2 has not been heard from"),
        # a process that still beats but never reaches the collective (a hung file read)
        (("train.heartbeat_timeout_s=600", "train.ddp_timeout_s=6"), "train.ddp_timeout_s=6"),
    ],
    ids=["heartbeat", "ddp-timeout"],
)
def test_a_frozen_rank_ends_the_job_naming_it_with_status_3(frey_shards, tmp_path, settings, said):
    status = tmp_path / "status"
    proc = launch(frey_shards, tmp_path, status, *settings)
    wait_for_steps(proc, tmp_path / "tiny", 25)
    ranks = trainers(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGSTOP)  # a stuck node: its process runs no more
    stopped_at = time.time()
    try:  # bounded: rank 0 gives up within the timeout (then the launcher's own teardown
        # waits 30 s for the stopped process before killing it: ended here instead)
        while not (status / "rank0").is_file() and time.time() - stopped_at < 90:
            time.sleep(0.1)
        took = time.time() - stopped_at
        os.kill(ranks[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        for pid in descendants(proc.pid) + list(ranks.values()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert said in out and "vae_scale/training" not in out, out[-3000:]  # no traceback of ours
    assert took < 6 + 20
    assert (status / "rank0").read_text().strip() == "3"
    # the checkpoint the requeued job resumes from (resuming: the killed-launcher test)
    assert checkpoint.latest_checkpoint(tmp_path / "tiny" / "checkpoints", verify_hashes=True)


def test_a_killed_launcher_makes_its_ranks_checkpoint_and_exit_3(frey_shards, tmp_path):
    status = tmp_path / "status"
    proc = launch(frey_shards, tmp_path, status)
    wait_for_steps(proc, tmp_path / "tiny", 25)
    ranks = trainers(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(proc.pid, signal.SIGKILL)  # the launcher alone
    trained = len((tmp_path / "tiny" / "steps.jsonl").read_text().splitlines())
    out, _ = proc.communicate(timeout=120)  # its output pipe closes when the ranks are gone
    deadline = time.time() + 60
    while any(alive(p) for p in ranks.values()) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in ranks.values()), "orphaned ranks went on training"
    assert "launcher" in out and "checkpointed at step" in out, out[-3000:]
    assert {(status / f"rank{r}").read_text().strip() for r in (0, 1)} == {"3"}
    latest = checkpoint.latest_checkpoint(tmp_path / "tiny" / "checkpoints", verify_hashes=True)
    assert checkpoint.checkpoint_step(latest) >= trained  # written after the kill, not before
    resume_finishes(frey_shards, tmp_path)
