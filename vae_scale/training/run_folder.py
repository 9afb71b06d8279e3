"""A run folder's identity: one trainer at a time (a lock), and a resumed run is the same run
(its settings may change only where that cannot rewrite its history)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from vae_scale.config import Config, rename_old_keys
from vae_scale.errors import ConfigError
from vae_scale.run_files.logs import read_run_record

LOCK_FILE = ".lock"

#: Settings a resumed run may change: how long it trains, where its data and logs are read from
#: or written to, and the topology that data/order.py re-plans elastically.
MAY_CHANGE = {
    "train.epochs",
    "train.keep_checkpoints",
    "train.ddp_timeout_s",
    "train.connect_timeout_s",
    "train.heartbeat_timeout_s",
    "train.checkpoint_every_steps",
    "train.checkpoint_async",
    "train.log_sample_keys",
    "train.log_every_steps",
    "train.progress",
    "data.num_workers",
    "data.batch_size",
    "data.shards_dir",
    "data.urls",
    "data.index_url",
    "data.cache_dir",
    "data.cache_max_gb",
    "data.retries",
    "data.retry_delay_s",
    "data.read_timeout_s",
    "data.max_shard_mb_in_memory",
    "data.on_error",  # the way past a bad sample found later (earlier epochs skipped none)
    "run.dir",
    "run.name",  # the run folder's name: a renamed folder is the same run
    "run.weights_dir",
    "wandb.mode",
    "wandb.group",
    "wandb.job_type",
    "wandb.notes",
    "wandb.tags",
}


class RunLock:
    """An exclusive lock on a run folder, held by the main process while it trains; the
    operating system releases it when the process ends, however it ends."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by {holder}: one trainer per run folder (wait "
                f"for it, stop it, or choose another run.name)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key not in ("urls",):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _defaults(model_name: str) -> dict[str, Any]:
    """Every key's default, for a run of model family `model_name` (each section's own
    defaults: the checks across sections need a whole config, which this is not)."""
    from vae_scale.config import MODEL_SECTIONS, Config

    sections = {
        name: field.default_factory().model_dump(mode="json")
        for name, field in Config.model_fields.items()
        if name != "model"
    }
    sections["model"] = MODEL_SECTIONS[model_name]().model_dump(mode="json")
    return _flat(sections)


def check_same_run(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume `run_dir` with settings that differ from those it was trained with
    (except MAY_CHANGE), listing them: a resumed run must not claim settings its earlier
    epochs did not use."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    recorded = read_run_record(run_dir)
    rename_old_keys(recorded)  # a record of an older vae_scale: its keys' current names
    now = _flat(cfg.to_dict())
    # A key the record lacks was added to vae_scale after the run was written: the run did
    # what its default does. A key the code no longer has is no setting of this run.
    defaults = _defaults(recorded.get("model", {}).get("name", cfg.model.name))
    before = {**defaults, **_flat({k: recorded[k] for k in cfg.to_dict() if k in recorded})}
    differing = sorted(
        k
        for k in now
        if k not in MAY_CHANGE and json.dumps(before.get(k)) != json.dumps(now.get(k))
    )
    if differing:
        changes = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differing)
        raise ConfigError(
            f"{run_dir} was trained with other settings ({changes}); resuming would mix them. "
            f"Use another run.name for the new settings (what may change on resume: "
            f"{', '.join(sorted(MAY_CHANGE))})"
        )
