"""W&B through Accelerate's trackers: mode resolution, run identity, run config."""

from __future__ import annotations

import netrc
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from vae_scale.netutil import is_online

WANDB_HOST = "https://api.wandb.ai"
RUN_ID_FILE = "wandb_run_id.txt"


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str) -> str:
    """'auto' -> online with a key and a network, else offline; never a mode that hangs.

    Online without a key raises in wandb.init, and online without a network waits ~30 s before
    failing, so an explicit 'online' that cannot work also falls back to offline (with a note).
    """
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("disabled", "offline"):
        return env_mode
    if mode in ("disabled", "offline"):
        return mode
    if has_wandb_key() and is_online(WANDB_HOST, timeout=3.0):
        return "online"
    if mode == "online":
        print("wandb: no API key or no network; logging offline (sync later with `wandb sync`)")
    return "offline"


def run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, created once, so resumed runs continue the same run."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    new_id = uuid.uuid4().hex[:12]
    path.write_text(new_id + "\n")
    return new_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def init_kwargs(cfg: Any, run_dir: Path, mode: str, tags: list[str]) -> dict[str, Any]:
    return {
        "wandb": {
            "mode": mode,
            "dir": str(run_dir),
            "id": run_id(run_dir),
            "resume": "allow",
            "name": cfg.run.name,
            "group": cfg.wandb.group,
            "entity": cfg.wandb.entity,
            "tags": sorted(set(cfg.wandb.tags) | set(tags)),
        }
    }


def reopen_run(cfg: Any, run_dir: Path) -> Any:
    """The run's W&B run, reopened (same id, resume='allow') to add pictures and summary
    metrics after training; None when W&B is disabled."""
    mode = resolve_mode(cfg.wandb.mode)
    if mode == "disabled":
        return None
    import wandb

    kwargs = init_kwargs(cfg, run_dir, mode, [])["wandb"]
    kwargs.pop("tags")
    return wandb.init(project=cfg.wandb.project, **kwargs)
