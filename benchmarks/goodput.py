"""Goodput under repeated failures (issue 44): a 2-process CPU run under
`torchrun --max-restarts` whose random rank is SIGKILLed (what the OOM killer does) at random
times, every `--every` seconds on average (uniform in 0.5x..1.5x), for `--minutes` of
training; torchrun restarts the group, the run resumes from its latest checkpoint. Reports the
run's own goodput (productive training seconds / wall seconds since the first start:
`time/goodput` of its last epoch row), the number of failures, the median recovery time (kill
-> the next new step row) and whether the final weights equal those of the same run left
alone, bit for bit.

    VAE_SCALE_DATA=../shared/data python -m benchmarks.goodput --work /tmp/goodput \\
        --shards SHARDS [--minutes 30] [--every 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from vae_scale.training.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


def command(shards: str, work: Path, name: str, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
        "--max-restarts=1000", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
        "--rdzv-conf=last_call_timeout=1", "--monitor-interval=0.2",
        "-m", "vae_scale.cli", "train", str(REPO / "configs" / "frey_conv.yaml"),
        f"data.shards_dir={shards}", f"run.dir={work}", f"run.name={name}",
        "wandb.mode=disabled", "data.num_workers=0", f"train.epochs={epochs}",
        "train.checkpoint_every_steps=20", "eval.picture_epochs=[]", "train.progress=off",
        # a restarted group whose gloo mesh does not connect (it happens under torchrun on
        # this CPU: docs/never-lose-a-run.md) gives up after 30 s, and torchrun retries
        "train.connect_timeout_s=30",
    ]  # fmt: skip


def rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


ATTEMPTS: set[int] = set()  # every TORCHELASTIC_RESTART_COUNT seen: the group's starts


def ranks(pid: int) -> list[int]:
    """The trainer processes under a torchrun agent (its children with RANK set)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and b"\0RANK=" in b"\0" + environ:
            found.append(int(stat.parent.name))
            for item in environ.split(b"\0"):
                if item.startswith(b"TORCHELASTIC_RESTART_COUNT="):
                    ATTEMPTS.add(int(item.split(b"=")[1]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--every", type=float, default=300, help="mean seconds between kills")
    parser.add_argument("--epochs", type=int, default=0, help="0: sized from timed epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    epochs = args.epochs
    if not epochs:  # timed epochs size the run to --minutes
        subprocess.run(command(args.shards, args.work, "probe_epoch", 3), env=env, cwd=REPO,
                       check=True, capture_output=True)  # fmt: skip
        # the last of 3 (the first epoch's start-up made a 30-minute run 21.5 minutes):
        # an epoch's wall time, its evaluation included
        probe = rows(args.work / "probe_epoch" / "metrics.jsonl")
        epoch_s = probe[-1]["time/wall_s"] - probe[-2]["time/wall_s"]
        epochs = max(2, round(args.minutes * 60 / epoch_s))
    rng = random.Random(args.seed)
    killed = args.work / "killed"
    proc = subprocess.Popen(
        command(args.shards, args.work, "killed", epochs), env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    kills, recoveries = 0, []
    next_kill = time.time() + rng.uniform(0.5, 1.5) * args.every
    # a kill's recovery: the restarted group's processes are there and steps.jsonl is written
    # after they appeared (the resume cuts it back to the checkpoint, then trains on)
    pending: dict | None = None
    while proc.poll() is None:
        time.sleep(0.2)
        now = time.time()
        current = set(ranks(proc.pid))  # every poll: each start of the group is seen
        if pending is not None:
            if current and not current & pending["old"] and pending["seen"] is None:
                pending["seen"] = now
            log = killed / "steps.jsonl"
            if pending["seen"] and log.is_file() and log.stat().st_mtime > pending["seen"]:
                recoveries.append(now - pending["time"])
                pending = None
            elif now - pending["time"] > 300:  # not seen to recover: do not wait for ever
                pending = None
        if now >= next_kill and pending is None:
            victims = sorted(current)
            if victims:
                os.kill(rng.choice(victims), signal.SIGKILL)
                kills += 1
                pending = {"time": now, "old": set(victims), "seen": None}
            next_kill = now + rng.uniform(0.5, 1.5) * args.every
    assert proc.returncode == 0, f"the killed run ended with {proc.returncode}"
    subprocess.run(command(args.shards, args.work, "whole", epochs), env=env, cwd=REPO,
                   check=True, capture_output=True)  # fmt: skip
    last = rows(killed / "metrics.jsonl")[-1]
    a, b = (load_file(latest_checkpoint(args.work / n / "checkpoints") / "model.safetensors")
            for n in ("killed", "whole"))  # fmt: skip
    equal = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    result = {
        "epochs": epochs, "kills": kills, "group_starts_seen": len(ATTEMPTS),
        "wall_s": last["time/wall_s"],
        "productive_s": last["time/productive_s"], "goodput": last["time/goodput"],
        "median_recovery_s": statistics.median(recoveries) if recoveries else None,
        "recoveries_s": recoveries, "final_weights_bitwise_equal": equal,
    }  # fmt: skip
    (args.work / "goodput.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
