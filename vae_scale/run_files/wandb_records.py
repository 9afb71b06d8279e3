"""W&B run files (`run-<id>.wandb`, offline or synced) read back as wandb's own protobuf
records: what W&B holds of a run, not what our logs say. A resumed run replays the rows its
W&B history lacks (a killed process loses the file's unwritten tail); the tests read them.

The file is a leveldb-style log (a 7-byte ":W&B" header, then 32 KiB blocks of records, each
with a 7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST); every record's payload
is a serialized `wandb_internal_pb2.Record`. wandb >= 0.20 no longer ships a Python reader.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: Path, torn_ok: bool = False) -> list[bytes]:
    """The file's records. `torn_ok`: a file cut off by a kill (an incomplete or garbled
    tail, or only the header) yields the records before the damage instead of raising."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        if torn_ok:
            return []
        raise ValueError(f"{path}: not a W&B run file")
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's zero trailer
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            if torn_ok:
                break
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class WandbRun:
    """What the records say: the run record, config, history rows, summary, metric
    definitions (name -> {step_metric, ...}), in file order."""

    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_run(path: Path, torn_ok: bool = False) -> WandbRun:
    from wandb.proto import wandb_internal_pb2 as pb

    result = WandbRun()
    for raw in payloads(path, torn_ok):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result.run = record.run
            for item in record.run.config.update:
                result.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                result.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            result.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                result.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            m = record.metric
            result.metrics[m.name or m.glob_name] = {"step_metric": m.step_metric}
    return result


def run_files(run_dir: Path, run_id: str = "*") -> list[Path]:
    """The W&B run files under a run folder's wandb/: one per training process start, by
    their folders' start times, then one per kind of command output (tracking.command_run),
    the newest last."""
    files = Path(run_dir).glob(f"wandb/*/run-{run_id}.wandb")
    unique = {p.resolve(): p for p in files}.values()  # wandb's latest-run link

    def order(path: Path) -> tuple[bool, str, float]:
        name = path.parent.name
        started = name.startswith(("offline-run-", "run-"))
        return (not started, name if started else "", 0 if started else path.stat().st_mtime)

    return sorted(unique, key=order)


def read_runs(run_dir: Path) -> list[WandbRun]:
    return [read_run(f) for f in run_files(run_dir)]


def last_offline_step(run_dir: Path, run_id: str) -> int:
    """The highest `global_step` in the history W&B recorded offline for run `run_id` in this
    folder (0: none): what `wandb sync` will upload of it."""
    steps = [
        int(row["global_step"])
        for path in run_files(run_dir, run_id)
        for row in read_run(path, torn_ok=True).history
        if "global_step" in row
    ]
    return max(steps, default=0)
