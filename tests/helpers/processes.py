"""Real training processes: the launch command for N of them, a helper script run as 1 and
as 2 processes, and every process below one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def launch(processes: int) -> list[str]:
    """The real `accelerate launch` of N CPU processes, before the script and its args."""
    accelerate = Path(sys.executable).with_name("accelerate")
    return [
        str(accelerate), "launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
        "--num_processes", str(processes),
    ]  # fmt: skip


def command(processes: int) -> list[str]:
    """The CLI as 1 process, or as N under `accelerate launch`."""
    return [*([sys.executable] if processes == 1 else launch(processes)), "-m", "vae_scale.cli"]


def one_and_two(script: str, args: list[str], out_dir: Path, timeout: float = 300):
    """tests/helpers/SCRIPT run as 1 process, then as 2 under the real `accelerate launch`,
    each writing `--out NAME.json`: the two JSON results."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    # one thread, as each launched rank has: kernels then sum in the same order, and Adam's
    # first steps do not blow thread-count rounding up into visible differences
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    results = []
    for name, prefix in (("one", [sys.executable]), ("two", launch(2))):
        out = out_dir / f"{name}.json"
        done = subprocess.run(
            [*prefix, str(REPO / "tests" / "helpers" / script), *args, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    return tuple(results)


def kill_after_rows(args: list[str], log: Path, rows: int) -> None:
    """`vae-scale ARGS` as one process (one thread), SIGKILLed once `log` has `rows` lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_scale", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    while not (log.is_file() and len(log.read_text().splitlines()) >= rows):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in new sessions, so a
    process-group signal would miss them; Slurm signals every process of the step)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += parents.get(p, [])
    return found
