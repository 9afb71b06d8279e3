"""The run folder's JSON-lines logs: one row per epoch and one every few optimizer steps,
each with its `global_step`, so a resumed run can drop the rows it will redo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from vae_scale.errors import ConfigError

METRICS_FILE = "metrics.jsonl"  # one row per epoch
STEPS_FILE = "steps.jsonl"  # one row every train.log_every_steps optimizer steps
SAMPLE_KEYS_DIR = "sample_keys"  # train.log_sample_keys: per rank, the keys of every batch


def append_row(run_dir: Path, name: str, row: dict[str, Any]) -> None:
    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir / name, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(run_dir: Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """The rows of a log. A last line cut off mid-write (a kill, a full disk) is dropped with
    a warning; a damaged line before it is an error naming the file and line."""
    path = Path(run_dir) / name
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ConfigError(
                    f"{path}: line {number} is not a JSON row ({line[:60]!r}); the file was "
                    f"edited or damaged: fix or delete that line"
                ) from None
            print(f"warning: {path}: dropped a torn last line (a write cut off by a kill or a "
                  f"full disk): {line[:60]!r}", file=sys.stderr)  # fmt: skip
    return rows


def sample_keys_file(rank: int) -> str:
    return f"{SAMPLE_KEYS_DIR}/rank{rank}.jsonl"


def truncate_logs(run_dir: Path, opt_step: int, names: tuple[str, ...] | None = None) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be redone)."""
    for name in names or (METRICS_FILE, STEPS_FILE):
        path = run_dir / name
        if path.is_file():
            kept = [r for r in read_rows(run_dir, name) if r["global_step"] <= opt_step]
            # complete or not at all: a full disk mid-rewrite keeps the old file
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


RUN_RECORD = "config.json"  # the resolved config and the facts of the run


def read_run_record(run_dir: Path, name: str = RUN_RECORD) -> dict[str, Any]:
    """A run's config.json (or an export's record `name`), a JSON object; a damaged one is
    an error naming it (a copy of the config is in the W&B run)."""
    path = Path(run_dir) / name
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} is damaged ({err}): the settings this run was trained with cannot be "
            f"read. Restore it (a copy is in the W&B run's config)"
        ) from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: expected a JSON object of config sections")
    return record
