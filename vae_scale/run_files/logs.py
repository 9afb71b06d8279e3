"""The run folder's JSON-lines logs: one row per epoch and one every few optimizer steps,
each with its `global_step`, so a resumed run can drop the rows it will redo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # one row per epoch
STEPS_FILE = "steps.jsonl"  # one row every train.log_every_steps optimizer steps
SAMPLE_KEYS_DIR = "sample_keys"  # train.log_sample_keys: per rank, the keys of every batch


def append_row(run_dir: Path, name: str, row: dict[str, Any]) -> None:
    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir / name, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(run_dir: Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    path = Path(run_dir) / name
    if not path.is_file():
        return []
    return [json.loads(r) for r in path.read_text().splitlines() if r]


def sample_keys_file(rank: int) -> str:
    return f"{SAMPLE_KEYS_DIR}/rank{rank}.jsonl"


def truncate_logs(run_dir: Path, opt_step: int, names: tuple[str, ...] | None = None) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be redone)."""
    for name in names or (METRICS_FILE, STEPS_FILE):
        path = run_dir / name
        if path.is_file():
            kept = [r for r in read_rows(run_dir, name) if r["global_step"] <= opt_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
