"""Real training processes: the launch command for N of them, and every process below one."""

import sys
from pathlib import Path

from conftest import REPO


def command(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "vae_scale.cli"]
    accelerate = Path(sys.executable).with_name("accelerate")
    return [
        str(accelerate), "launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
        "--num_processes", str(processes), "-m", "vae_scale.cli",
    ]  # fmt: skip


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
