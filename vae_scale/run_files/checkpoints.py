"""A run folder's checkpoints as files: `checkpoints/step_XXXXXXXX/` folders, each complete
only with a manifest (file sizes and sha256) whose files match. Beside Accelerate's own files,
each component of the run keeps its state under its name: its tensors in `<name>.safetensors`
(`ema.safetensors`: the averaged model's weights, loadable like `model.safetensors`), every
other value in `<name>.json` (`train_state.json`, `update_policy.json`, `train_data.json`,
`ema.json`). Training writes them (training/checkpoint.py); analysis, export and resume read
them through this module."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vae_scale.errors import ConfigError
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


def complete_checkpoints(ckpt_root: Path, quiet: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones are ignored (and reported, unless
    `quiet`)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for path in sorted(ckpt_root.glob(f"{PREFIX}*")):
        if is_complete(path):
            found.append(path)
        elif not quiet:
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


def checkpoint_step(path: Path) -> int:
    """The optimizer step a complete checkpoint was written at (its manifest's)."""
    return int(json.loads((path / MANIFEST).read_text())["step"])


def write_state(folder: Path, name: str, values: dict[str, Any]) -> None:
    """A component's state dict as `<name>.safetensors` (its tensors, if any) and
    `<name>.json` (everything else, if anything)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        on_cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(on_cpu, folder / f"{name}.safetensors")
    if rest or not tensors:
        (folder / f"{name}.json").write_text(json.dumps(rest, indent=1))


def read_state(folder: Path, name: str) -> dict[str, Any] | None:
    """What `write_state` wrote for `name` (None: the checkpoint holds nothing of it)."""
    tensors, rest = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not tensors.is_file() and not rest.is_file():
        return None
    values: dict[str, Any] = dict(load_file(tensors)) if tensors.is_file() else {}
    if rest.is_file():
        values.update(json.loads(rest.read_text()))
    return values


#: files of a checkpoint that hold no pickle (everything else is Accelerate's torch.save output)
_DATA_SUFFIXES = (".safetensors", ".json")


def load_plain(file: Path, mmap: bool = False) -> Any:
    """A torch.save file read by torch's restricted unpickler (`weights_only=True`, plus the
    numpy types Accelerate allows for RNG states): tensors and plain values only, never code.
    `mmap` maps the tensors' bytes instead of reading them. Raises on anything else."""
    from accelerate.utils import load  # the loader (and allowlist) Accelerate restores with

    return load(file, map_location="cpu", weights_only=True, mmap=mmap)


def check_plain_data(path: Path) -> None:
    """Every pickle-based file of checkpoint `path` (optimizer, scaler, RNG states: whatever
    Accelerate's load_state could unpickle) must load as plain data; a file that needs
    anything else (a crafted `__reduce__` that would run code) is refused, naming it, before
    anything unpickles it. The tensors are mapped, not read: this costs little even for large
    optimizer states."""
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name.endswith(_DATA_SUFFIXES):
            continue
        try:
            load_plain(file, mmap=True)
        except Exception as err:  # UnpicklingError, or a file that is not torch's format
            why = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise UnsafeCheckpoint(
                f"checkpoint {path}: {file.name} is not plain saved data ({type(err).__name__}"
                f"{': ' + why if why else ''}); refusing to unpickle it, as that could run "
                f"code from the file. vae_scale and Accelerate never write such a file: this "
                f"checkpoint was altered or comes from elsewhere. Resume from another one "
                f"(--resume PATH) or move it away"
            ) from None


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file that would need more than tensors and plain values to load."""
