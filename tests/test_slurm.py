"""slurm/train.sbatch and launch/multi_node.sh: the command lines they build (with stand-in
srun/scontrol/accelerate programs), and a real job on a one-node Slurm started on localhost
(tests/helpers/slurm_local.sh) that is signalled, checkpoints, requeues itself and completes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from vae_scale.training.signals import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow  # every test here launches real processes

SBATCH = REPO / "slurm" / "train.sbatch"
MULTI_NODE = REPO / "launch" / "multi_node.sh"
SLURM_LOCAL = REPO / "tests" / "helpers" / "slurm_local.sh"

FAKE_SRUN = """#!/bin/bash
# stand-in srun: one task per node, run one after the other with that node's SLURM_NODEID
while [[ $1 == -* ]]; do echo "$1" >>"$FAKE_LOG.srun"; shift; done
status=0
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" || status=$?
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in
    show) printf '%s\\n' $FAKE_HOSTS ;;
    requeue) echo "requeue $2" >>"$FAKE_LOG.scontrol" ;;
esac
"""
FAKE_ACCELERATE = f"""#!{sys.executable}
# stand-in accelerate: record how it was called; act as the trainer processes for the status
import json, os, signal, sys

args = sys.argv[1:]
record = dict(
    argv=args,
    usr1_ignored=signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
    omp=os.environ.get("OMP_NUM_THREADS"),
    use_cpu=os.environ.get("ACCELERATE_USE_CPU"),
    cwd=os.getcwd(),
)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
status_dir, trainer = os.environ.get("VAE_SCALE_EXIT_STATUS_DIR"), os.environ.get("FAKE_TRAINER")
if status_dir and trainer and "--machine_rank" in args:
    # the second process of each machine exits first; the launcher stops the others
    machine = int(args[args.index("--machine_rank") + 1])
    os.makedirs(status_dir, exist_ok=True)
    with open(os.path.join(status_dir, f"rank{{2 * machine + 1}}"), "w") as f:
        f.write(trainer + "\\n")
sys.exit(int(os.environ.get("FAKE_LAUNCHER_STATUS", "0")))
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """Stand-in srun/scontrol/accelerate on PATH; returns a runner for a script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("srun", FAKE_SRUN),
        ("scontrol", FAKE_SCONTROL),
        ("accelerate", FAKE_ACCELERATE),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()

    def run(script: Path, args: list[str], **env: str):
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "VAE_SCALE_", "ACCELERATE", "OMP_", "LAUNCH_"))
        }
        base.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            FAKE_LOG=str(log),
            SLURM_SUBMIT_DIR=str(submit_dir),
            **env,
        )
        proc = subprocess.run(
            ["bash", str(script), *args], env=base, capture_output=True, text=True, timeout=60
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        scontrol, srun = Path(f"{log}.scontrol"), Path(f"{log}.srun")
        requeues = scontrol.read_text().splitlines() if scontrol.exists() else []
        run.srun_options = srun.read_text().split() if srun.exists() else []
        for path in (log, scontrol, srun):
            path.unlink(missing_ok=True)
        return proc, calls, requeues

    run.submit_dir = submit_dir
    return run


def test_scripts_parse():
    for script in (SBATCH, MULTI_NODE, SLURM_LOCAL):
        subprocess.run(["bash", "-n", str(script)], check=True)
    assert f"\nREQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in SBATCH.read_text()
    header = SBATCH.read_text()
    for option in ("--ntasks-per-node=1", "--signal=USR1@120", "--requeue", "--open-mode=append"):
        assert re.search(rf"^#SBATCH {re.escape(option)}$", header, re.M), option


def test_sbatch_starts_one_launcher_per_node_with_its_machine_rank(fake_slurm):
    proc, calls, requeues = fake_slurm(
        SBATCH,
        ["configs/frey_conv.yaml", "train.lr=0.1", "run.name=a b"],
        SLURM_JOB_ID="1234",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu[07-08]",
        FAKE_HOSTS="gpu07 gpu08",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="64",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 2 and not requeues
    port = str(20000 + 1234 % 12000)
    assert "--cpus-per-task=64" in fake_slurm.srun_options  # srun does not inherit it
    assert "--ntasks-per-node=1" in fake_slurm.srun_options
    for node, call in enumerate(calls):
        assert call["argv"] == [
            "launch",
            "--config_file",
            "launch/multi_node.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "16",
            "--machine_rank",
            str(node),  # evaluated on each node, not once in the batch script
            "--main_process_ip",
            "gpu07",
            "--main_process_port",
            port,
            "-m",
            "vae_scale.cli",
            "train",
            "configs/frey_conv.yaml",
            "train.lr=0.1",
            "run.name=a b",
        ]
        assert call["usr1_ignored"]  # the launcher must survive the time-limit signal
        assert call["omp"] == "8" and call["use_cpu"] is None
        assert call["cwd"] == str(fake_slurm.submit_dir)


def test_sbatch_refuses_more_than_one_launcher_per_node_and_keeps_ports_low(fake_slurm):
    proc, calls, _ = fake_slurm(
        SBATCH,
        [],
        SLURM_JOB_ID="7",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS="16",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_JOB_NODELIST="gpu[1-2]",
        FAKE_HOSTS="gpu1 gpu2",
        SLURM_GPUS_ON_NODE="8",
    )
    assert proc.returncode == 2 and "one task per node" in proc.stderr and not calls
    proc, calls, _ = fake_slurm(
        SBATCH,
        [],
        SLURM_JOB_ID="31999",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="gpu1",
        FAKE_HOSTS="gpu1",
        SLURM_GPUS_ON_NODE="8",
    )
    port = int(calls[0]["argv"][calls[0]["argv"].index("--main_process_port") + 1])
    assert proc.returncode == 0 and 20000 <= port < 32768  # below the ephemeral range


def test_sbatch_cpu_mode_uses_the_gloo_config(fake_slurm):
    proc, calls, _ = fake_slurm(
        SBATCH,
        [],
        SLURM_JOB_ID="7",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="vm",
        FAKE_HOSTS="vm",
        SLURM_CPUS_PER_TASK="2",
        VAE_SCALE_CPU_PROCESSES="2",
    )
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    argv = call["argv"]
    assert argv[argv.index("--config_file") + 1] == "launch/cpu_2proc.yaml"
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[-3:] == ["vae_scale.cli", "train", "configs/frey_conv.yaml"]  # the default
    assert call["use_cpu"] == "1" and call["omp"] == "1"


@pytest.mark.parametrize(
    ("trainer", "launcher", "expect_requeue", "expect_status"),
    [
        (str(REQUEUE_EXIT_CODE), "1", True, 0),  # checkpointed after the signal
        ("2", "1", False, 1),  # a real failure: no requeue loop
        ("0", "0", False, 0),  # finished
    ],
)
def test_sbatch_requeues_only_after_a_checkpointed_stop(
    fake_slurm, trainer, launcher, expect_requeue, expect_status
):
    proc, calls, requeues = fake_slurm(
        SBATCH,
        ["configs/frey_conv.yaml"],
        SLURM_JOB_ID="99",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="n[1-2]",
        FAKE_HOSTS="n1 n2",
        SLURM_GPUS_PER_NODE="a100:4",
        FAKE_TRAINER=trainer,
        FAKE_LAUNCHER_STATUS=launcher,
    )
    assert len(calls) == 2
    assert calls[0]["argv"][calls[0]["argv"].index("--num_processes") + 1] == "8"
    assert requeues == (["requeue 99"] if expect_requeue else [])
    assert proc.returncode == expect_status, proc.stdout + proc.stderr
    assert not list(fake_slurm.submit_dir.iterdir())  # the status folder is cleaned up


def test_sbatch_without_gpus_or_cpu_mode_is_a_clear_error(fake_slurm):
    proc, calls, _ = fake_slurm(
        SBATCH, [], SLURM_JOB_ID="5", SLURM_JOB_NUM_NODES="1", FAKE_HOSTS="vm"
    )
    assert proc.returncode == 2 and not calls
    assert "VAE_SCALE_CPU_PROCESSES" in proc.stderr


def test_multi_node_wrapper_takes_values_from_the_environment(fake_slurm):
    env = dict(
        NUM_MACHINES="3",
        MACHINE_RANK="2",
        MAIN_PROCESS_IP="10.0.0.1",
        MAIN_PROCESS_PORT="29500",
        PROCESSES_PER_MACHINE="4",
    )
    proc, calls, _ = fake_slurm(MULTI_NODE, ["-m", "vae_scale.cli", "train", "c.yaml"], **env)
    assert proc.returncode == 0, proc.stderr
    argv = calls[0]["argv"]
    assert argv[argv.index("--config_file") + 1] == str(REPO / "launch" / "multi_node.yaml")
    pairs = dict(zip(argv[3:13:2], argv[4:14:2]))
    assert pairs == {
        "--num_machines": "3",
        "--num_processes": "12",
        "--machine_rank": "2",
        "--main_process_ip": "10.0.0.1",
        "--main_process_port": "29500",
    }
    assert argv[-4:] == ["-m", "vae_scale.cli", "train", "c.yaml"]
    for missing in env:
        partial = {k: v for k, v in env.items() if k != missing}
        proc, calls, _ = fake_slurm(MULTI_NODE, ["x.py"], **partial)
        assert proc.returncode == 2 and not calls and missing in proc.stderr
    proc, calls, _ = fake_slurm(MULTI_NODE, ["x.py"], **{**env, "MACHINE_RANK": "3"})
    assert proc.returncode == 2 and "expected 0..2" in proc.stderr


# ---------------------------------------------------------------------- a real Slurm


def _slurm_installed() -> bool:
    return all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged"))


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """slurmctld + slurmd + munge on localhost (installed with apt-get when missing)."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd and munged run as root/munge)")
    if not _slurm_installed():
        if not shutil.which("apt-get"):
            pytest.skip("Slurm is not installed and there is no apt-get to install it")
        proc = subprocess.run(
            ["bash", str(SLURM_LOCAL), "install"], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0 or not _slurm_installed():
            pytest.skip(f"apt-get could not install Slurm: {proc.stderr[-500:]}")
    base = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(
        ["bash", str(SLURM_LOCAL), "start", str(base)], capture_output=True, text=True, timeout=90
    )
    env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf")}
    jobs: list[str] = []
    try:
        assert proc.returncode == 0, f"local Slurm did not start:\n{proc.stdout}\n{proc.stderr}"
        yield env, jobs
    finally:
        for job in jobs:
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(base)], timeout=60)


def _job_fields(job: str, env: dict) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_real_slurm_job_checkpoints_on_signal_requeues_and_completes(
    local_slurm, frey_shards, tmp_path
):
    env, jobs = local_slurm
    home = tmp_path / "home"
    home.mkdir()
    run_dir = tmp_path / "runs" / "slurm"
    job_env = {
        k: v for k, v in env.items() if not k.startswith(("WANDB_", "ACCELERATE", "VAE_SCALE_"))
    }
    job_env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(REPO),
        HOME=str(home),
        WANDB_SILENT="true",
        VAE_SCALE_CPU_PROCESSES="2",
    )
    log = tmp_path / "job.out"
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=debug",
            "--gpus-per-node=0",
            f"--cpus-per-task={min(2, os.cpu_count() or 1)}",
            "--time=10",
            f"--output={log}",
            str(SBATCH),
            "configs/frey_conv.yaml",
            f"data.shards_dir={frey_shards}",
            f"run.dir={run_dir.parent}",
            "run.name=slurm",
            "model.base_channels=4",
            "model.latent_dim=4",
            "data.batch_size=50",
            "train.epochs=3",
            "eval.picture_epochs=[1]",
            "wandb.mode=offline",
        ],
        cwd=REPO,
        env=job_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    jobs.append(job)

    def job_log() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    # The trainer is in its loop (signal handlers installed) once config.json exists.
    _wait(lambda: (run_dir / "config.json").exists(), 300, f"job {job} to start training")
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)

    def finished() -> dict | None:
        fields = _job_fields(job, env)
        done = fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
        return fields if done else None

    fields = _wait(finished, 600, f"job {job} to finish", poll=1)
    text = job_log()
    assert fields["JobState"] == "COMPLETED", text[-3000:]
    assert fields["Restarts"] == "1" and fields["ExitCode"] == "0:0", fields
    assert "interrupted: stop signal received" in text, text[-3000:]  # printed by each rank
    assert text.count(f"requeueing job {job}") == 1 and "(restart 1)" in text
    assert "(restart 2)" not in text
    assert "resumed from" in text and "finished: launcher status 0" in text

    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_processes"] == 2 and config["num_machines"] == 1
    assert config["slurm_job_id"] == job  # in W&B's config too (the runs' records)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # nothing lost, nothing logged twice
    steps = [r["global_step"] for r in rows]
    assert steps == sorted(steps) and steps[-1] == 3 * steps[0]
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(r.name.endswith(run_id) for r in wandb_runs)
    from vae_scale.run_files.wandb_records import read_runs

    assert [r.config["slurm_job_id"] for r in read_runs(run_dir)] == [job, job]
    assert not list(REPO.glob(f".vae_scale_exit_status.{job}"))
