"""A run folder's checkpoints as files: `checkpoints/step_XXXXXXXX/` folders, each complete
only with a manifest (file sizes and sha256) whose files match. Training writes them
(training/checkpoint.py); analysis, export and resume read them through this module."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from vae_scale.utils.fsutil import sha256_file

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
PREFIX = "step_"
EMA_FILE = "ema.safetensors"  # the averaged weights, a plain state dict of the model


def is_complete(path: Path, verify_hashes: bool = False) -> bool:
    """A checkpoint folder whose manifest exists and whose files have the recorded sizes
    (and sha256, when `verify_hashes`)."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, meta in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != meta["size"]:
            return False
        if verify_hashes and sha256_file(file) != meta["sha256"]:
            return False
    return True


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones are reported and ignored."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for path in sorted(ckpt_root.glob(f"{PREFIX}*")):
        if is_complete(path):
            found.append(path)
        else:
            warnings.warn(f"ignoring incomplete checkpoint {path}", stacklevel=2)
    return found


def latest_checkpoint(ckpt_root: Path, verify_hashes: bool = False) -> Path | None:
    """The newest complete checkpoint; with `verify_hashes`, the newest whose files all match
    their manifest (a damaged newer one is skipped with a warning)."""
    for path in reversed(complete_checkpoints(ckpt_root)):
        if not verify_hashes or is_complete(path, verify_hashes=True):
            return path
        warnings.warn(f"skipping checkpoint {path}: a file does not match its sha256", stacklevel=2)
    return None


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAIN_STATE).read_text())
