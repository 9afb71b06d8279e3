"""Training throughput of 1 process versus 2 DDP processes (gloo, CPU), through the real
`accelerate launch` and `vae-scale train`.

    python benchmarks/ddp_throughput.py configs/frey_conv.yaml --epochs 3 [SECTION.KEY=VALUE ...]

Four runs of the same config (W&B disabled, evaluation only after the last epoch):
  1 process,  batch B,   all CPU threads           (accelerate launch --num_processes 1)
  1 process,  batch B,   1 thread
  2 processes, batch B/2 each (same global batch)   (accelerate launch -c launch/cpu_2proc.yaml)
  2 processes, batch B each   (twice the global batch)
Reported: images/s of the training loop (`throughput/train_img_per_s`, summed over ranks), the
median over epochs 2..E (epoch 1 pays the warm-up), the ratio to 1 process, the training
images per CPU-second of the whole launch (start-up and evaluation included; less sensitive to
other jobs on the machine) and the launch's wall time. The load average is printed before and
after: wall-clock rates mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def accelerate() -> str:
    beside = Path(sys.executable).with_name("accelerate")
    return str(beside) if beside.is_file() else shutil.which("accelerate") or "accelerate"


def children_cpu_seconds() -> float:
    """CPU time of finished child processes: the launcher and every rank it started."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    label: str,
    launch_args: list[str],
    threads: int,
    config: str,
    overrides: list[str],
    run_dir: Path,
) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    cmd = [accelerate(), "launch", *launch_args, "-m", "vae_scale.cli", "train", config]
    cmd += [*overrides, f"run.dir={run_dir}", f"run.name={label}", "wandb.mode=disabled"]
    start, cpu_start = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_start
    if proc.returncode != 0:
        sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
    metrics = (run_dir / label / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    rates = [r["throughput/train_img_per_s"] for r in rows[1:]] or [
        rows[0]["throughput/train_img_per_s"]
    ]
    config_json = json.loads((run_dir / label / "config.json").read_text())
    images = sum(r["train/num_samples"] for r in rows)
    print(f"{label}: epochs img/s {[round(r) for r in rates]}, wall {wall:.0f} s", flush=True)
    return {
        "label": label,
        "processes": config_json["num_processes"],
        "global_batch": config_json["global_batch_size"],
        "img_per_s": statistics.median(rates),
        "wall_s": wall,
        "img_per_cpu_s": images / cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads")
    args = parser.parse_args()

    batch = int(
        next(
            (o.split("=", 1)[1] for o in args.overrides if o.startswith("data.batch_size=")),
            yaml.safe_load(Path(args.config).read_text())["data"]["batch_size"],
        )
    )
    common = [o for o in args.overrides if not o.startswith("data.batch_size=")]
    common += [f"train.epochs={args.epochs}", f"eval.every_epochs={args.epochs}"]
    common += ["eval.picture_epochs=[]"]
    per_proc_threads = max(1, args.threads // 2)
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run(
                "p1",
                ["--num_processes", "1", "--num_cpu_threads_per_process", str(args.threads)],
                args.threads,
                args.config,
                [*common, f"data.batch_size={batch}"],
                Path(tmp),
            ),
            run(
                "p1_one_thread",
                ["--num_processes", "1", "--num_cpu_threads_per_process", "1"],
                1,
                args.config,
                [*common, f"data.batch_size={batch}"],
                Path(tmp),
            ),
            run(
                "p2_same_global_batch",
                ["--config_file", "launch/cpu_2proc.yaml"],
                per_proc_threads,
                args.config,
                [*common, f"data.batch_size={batch // 2}"],
                Path(tmp),
            ),
            run(
                "p2_same_batch_per_process",
                ["--config_file", "launch/cpu_2proc.yaml"],
                per_proc_threads,
                args.config,
                [*common, f"data.batch_size={batch}"],
                Path(tmp),
            ),
        ]
    print(f"load average after: {os.getloadavg()}")
    base = results[0]["img_per_s"]
    print(
        "| run | processes x threads | global batch | train img/s | vs 1 process | "
        "train images per CPU-s (whole launch) | wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r, threads in zip(results, [args.threads, 1, per_proc_threads, per_proc_threads]):
        print(
            f"| {r['label']} | {r['processes']} x {threads} | {r['global_batch']} | "
            f"{r['img_per_s']:.0f} | {r['img_per_s'] / base:.2f} | {r['img_per_cpu_s']:.0f} | "
            f"{r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
