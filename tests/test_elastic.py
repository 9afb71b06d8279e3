"""Elastic resume through the real CLI: a run stopped mid-epoch by a signal on one topology
continues on another (2 processes -> 1 process with 2 loader workers, 1 process -> 3
processes); the keys trained in the interrupted epoch, read back from every rank's
sample_keys log, hold each sample at most once and leave out less than one global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from conftest import TINY_FREY as TINY
from helpers.processes import command, descendants
from vae_scale.training import checkpoint

pytestmark = pytest.mark.slow

BATCH = 10
TOTAL = 1765  # Frey training faces


def run_trainer(shards, run_dir, processes, workers, stop_after_rows=None):
    args = [
        *command(processes),
        "train",
        str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(shards, run_dir, *TINY),
        "run.name=elastic",
        f"data.batch_size={BATCH}",
        f"data.num_workers={workers}",
        "train.epochs=1",  # the interrupted epoch is what is checked; no second one needed
        "train.log_every_steps=1",
        "train.log_sample_keys=true",
        "eval.picture_epochs=[]",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env["PYTHONPATH"] = str(REPO)
    # The launcher ignores SIGUSR1 (as slurm/train.sbatch makes it); the trainers checkpoint.
    proc = subprocess.Popen(
        ["bash", "-c", 'trap "" USR1; exec "$@"', "bash", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    steps = run_dir / "elastic" / "steps.jsonl"
    if stop_after_rows is not None:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if steps.is_file() and len(steps.read_text().splitlines()) >= stop_after_rows:
                for pid in descendants(proc.pid):
                    try:
                        os.kill(pid, signal.SIGUSR1)
                    except ProcessLookupError:
                        pass
                break
            time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def trained_keys(run_dir: Path, epoch: int, name: str = "elastic") -> list[str]:
    keys = []
    for path in sorted((run_dir / name / "sample_keys").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["epoch"] == epoch:
                keys += row["keys"]
    return keys


@pytest.mark.parametrize("before, after", [((2, 0), (1, 2)), ((1, 0), (3, 0))])
def test_stopped_run_resumes_on_another_topology_without_repeating_a_sample(
    frey_shards, tmp_path, before, after
):
    code, out = run_trainer(frey_shards, tmp_path, *before, stop_after_rows=12)
    assert code != 0, out  # stopped by the signal (3 from the trainer)
    latest = checkpoint.latest_checkpoint(tmp_path / "elastic" / "checkpoints")
    state = checkpoint.read_train_state(latest)
    epoch = state["epoch"]
    plan = checkpoint.read_state(latest, "train_data")["plan"]
    assert state["batch_in_epoch"] > 0 and plan["topology"][0] == before[0], out
    code, out = run_trainer(frey_shards, tmp_path, *after)
    assert code == 0, out
    assert "elastic resume" in out
    keys = trained_keys(tmp_path, epoch)
    assert len(keys) == len(set(keys))  # no sample of the interrupted epoch twice
    left_out = TOTAL - len(keys)
    assert 0 <= left_out <= after[0] * BATCH - 1  # only the last plan leaves any out
    rows = [json.loads(r) for r in (tmp_path / "elastic" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in rows] == [1]
    assert rows[epoch - 1]["train/num_samples"] == len(keys)


def torchrun_trainer(shards, run_dir, name, *extra, kill_rank_after_rows=None):
    """`torchrun --nnodes=1:2 --max-restarts=3` of 2 trainers (`extra`: more overrides); with
    `kill_rank_after_rows`, SIGKILL rank 1 (what the OOM killer does) once steps.jsonl has
    that many rows."""
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
        "--max-restarts=3", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
        "--rdzv-conf=last_call_timeout=1", "--monitor-interval=0.2",
        "-m", "vae_scale.cli", "train", str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(shards, run_dir, *TINY), f"run.name={name}", f"data.batch_size={BATCH}",
        "data.num_workers=0", "train.epochs=1", "train.log_every_steps=1",
        "train.log_sample_keys=true", "train.checkpoint_every_steps=10",
        "eval.picture_epochs=[]",
        # a restarted group whose gloo mesh never connects (seen on this CPU) retries at once
        "train.connect_timeout_s=20", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    steps = run_dir / name / "steps.jsonl"
    killed = None
    if kill_rank_after_rows is not None:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and killed is None:
            if steps.is_file() and len(steps.read_text().splitlines()) >= kill_rank_after_rows:
                for pid in descendants(proc.pid):
                    try:
                        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    if b"RANK=1" in environ and b"TORCHELASTIC_RESTART_COUNT=0" in environ:
                        os.kill(pid, signal.SIGKILL)
                        killed = pid
                        break
            time.sleep(0.05)
        assert killed is not None, "rank 1 was not found to kill"
    try:
        out, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:  # leave no trainer behind (its own session)
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out


def test_torchrun_restarts_a_killed_rank_and_the_run_equals_an_uninterrupted_one(
    frey_shards, tmp_path
):
    from test_resume import final_state

    code, out = torchrun_trainer(frey_shards, tmp_path, "whole")
    assert code == 0, out[-4000:]
    # its checkpoints finished in the background (train.checkpoint_async): the same run
    async_ = "train.checkpoint_async=true"
    code, out = torchrun_trainer(frey_shards, tmp_path, "killed", async_, kill_rank_after_rows=14)
    assert code == 0, out[-4000:]  # torchrun restarted the group; our resume re-planned
    assert "resumed from" in out and "step 10" in out, out[-4000:]
    keys = trained_keys(tmp_path, 1, "killed")
    # every sample of the epoch trained once after the restart's re-plan (a plan that leaves
    # out less than one global batch, as an uninterrupted one does)
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(trained_keys(tmp_path, 1, "whole"))
    params, steps, epochs = final_state(tmp_path / "killed")
    params_ref, steps_ref, epochs_ref = final_state(tmp_path / "whole")
    assert steps == steps_ref and epochs == epochs_ref  # every row, bitwise
    for key in params_ref:
        assert (params[key] == params_ref[key]).all(), key


def test_a_process_whose_peers_never_come_ends_retryable_within_the_connect_timeout(
    frey_shards, tmp_path
):
    """Rank 0 of 2 started alone (a peer that never came, or a restart whose group never
    connects): it ends with exit 3 (what torchrun and Slurm retry) after
    train.connect_timeout_s, not after train.ddp_timeout_s, saying so."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    args = [sys.executable, "-m", "vae_scale", "train", str(REPO / "configs" / "frey_conv.yaml"),
            *tiny_overrides(frey_shards, tmp_path, "train.connect_timeout_s=4")]  # fmt: skip
    t0 = time.time()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 3, done.stderr[-3000:]
    assert 4 <= time.time() - t0 < 60  # ddp_timeout_s is 1800
    assert "could not join the other 1 process(es) within train.connect_timeout_s=4 s" in (
        done.stderr
    ), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "tiny" / "checkpoints").exists()
