"""Checkpoints that are either complete or invisible.

`accelerator.save_state` writes into a temporary folder; the main process adds a manifest
(file sizes and sha256) and the training counters, fsyncs, then renames the folder to
`checkpoints/step_XXXXXXXX`. Only folders with a valid manifest count, so a crash or a full disk
mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel

from vae_scale.errors import ConfigError
from vae_scale.run_files.checkpoints import (  # noqa: F401  (the format, re-exported)
    MANIFEST,
    PREFIX,
    TRAIN_STATE,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    read_train_state,
)
from vae_scale.run_files.logs import sample_keys_file, truncate_logs
from vae_scale.training.ema import EMA_FILE, ema_tensors, load_ema, update_ema
from vae_scale.training.state import TrainState
from vae_scale.utils.fsutil import fsync, sha256_file


def save_checkpoint(
    accelerator: Accelerator,
    ckpt_root: Path,
    step: int,
    train_state: dict[str, Any],
    keep: int,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Collective: every process must call it (each saves its own RNG state). `extra_files`:
    file name -> tensors that the main process adds as safetensors (e.g. EMA weights)."""
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            for name, tensors in (extra_files or {}).items():
                save_file(tensors, tmp / name)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _finish(tmp, final, ckpt_root, step, train_state, keep)
    except Exception as err:  # the previous checkpoint stays the latest
        shutil.rmtree(tmp, ignore_errors=True)
        code = _disk_full_errno(err, ckpt_root)
        if code is None:
            raise
        previous = latest_checkpoint(ckpt_root)
        kept = (
            f"the previous checkpoint {previous} is intact and `--resume auto` will use it"
            if previous
            else "no earlier checkpoint exists"
        )
        raise OSError(code, f"writing checkpoint {final} failed ({err}); {kept}") from err
    accelerator.wait_for_everyone()
    return final


def _disk_full_errno(err: BaseException, folder: Path) -> int | None:
    """ENOSPC/EDQUOT when `err` (an OSError, or torch's and safetensors' own write errors,
    which carry no errno) comes from a full disk or quota; None for other errors."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e.errno
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        full = False
    text = str(err).lower()
    return errno.ENOSPC if full or "no space" in text or "quota" in text else None


def _finish(
    tmp: Path, final: Path, ckpt_root: Path, step: int, train_state: dict[str, Any], keep: int
) -> None:
    """Main process: counters, manifest, fsync, then the atomic rename and pruning."""
    (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
    files = {}
    for path in sorted(tmp.iterdir()):
        if path.is_file():
            fsync(path)
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    fsync(tmp / MANIFEST)
    fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(ckpt_root)
    for old in complete_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """A run folder's checkpoints: which one to resume from, restoring it (weights, optimizer,
    RNG, EMA, counters; log rows past it dropped), and saving new ones (collective)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, keep: int):
        self.accelerator, self.run_dir, self.keep = accelerator, run_dir, keep
        self.root = run_dir / "checkpoints"
        self.ema: AveragedModel | None = None  # set once the models exist
        self.latest: Path | None = None  # the newest complete checkpoint of this run

    def find(self, resume: str) -> Path | None:
        """The checkpoint `--resume` asks for: 'auto' (the newest that verifies, if any),
        'none' (refuse a folder that has checkpoints) or a checkpoint folder. The main process
        chooses and verifies, and every rank gets its choice (ranks on a network file system
        could otherwise see different folders, and each would hash every file)."""
        choice: list[Any] = [None, None]
        if self.accelerator.is_main_process:
            try:
                choice[0] = self._choose(resume)
            except ConfigError as err:
                choice[1] = str(err)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(choice, from_process=0)
        if choice[1] is not None:
            raise ConfigError(choice[1])
        self.latest = None if choice[0] is None else Path(choice[0])
        return self.latest

    def _choose(self, resume: str) -> str | None:
        if resume == "none":
            if latest_checkpoint(self.root) is not None:
                raise ConfigError(
                    f"--resume none: {self.run_dir} already holds checkpoints; pass "
                    f"--resume auto to continue it, or choose another run.name"
                )
            return None
        if resume == "auto":
            path = latest_checkpoint(self.root, verify_hashes=True)
            written = sorted(self.root.glob(f"{PREFIX}*")) if self.root.is_dir() else []
            if path is None and written:
                raise ConfigError(
                    f"{self.root} holds {len(written)} checkpoint(s) but none verifies (damaged "
                    f"or incomplete); training from scratch would silently restart the run. "
                    f"Move them away and pass --resume none, or --resume a checkpoint folder"
                )
            return None if path is None else str(path)
        path = Path(resume)
        if not is_complete(path, verify_hashes=True):
            raise ConfigError(
                f"--resume {path}: not a complete checkpoint folder (no valid {MANIFEST})"
            )
        return str(path)

    def restore(self, path: Path, core: torch.nn.Module) -> TrainState:
        """Load `path` into the prepared objects; `core` is the unwrapped model (the EMA
        starts from it when EMA was newly switched on)."""
        self.accelerator.load_state(str(path))
        state = TrainState.from_dict(read_train_state(path))
        ema = self.ema
        if ema is not None and not load_ema(ema, path, state.ema_updates):
            ema.n_averaged.zero_()  # EMA newly switched on: start from the loaded weights
            update_ema(ema, core, 0, 0.0)
            state.ema_updates = 1
        if self.accelerator.is_main_process:
            truncate_logs(self.run_dir, state.opt_step)
        truncate_logs(
            self.run_dir, state.opt_step, (sample_keys_file(self.accelerator.process_index),)
        )
        self.accelerator.print(
            f"resumed from {path} (epoch {state.epoch}, batch {state.batch_in_epoch}, step "
            f"{state.opt_step})"
        )
        return state

    def save(self, state: TrainState) -> Path:
        """Collective: a checkpoint of the current weights and `state`."""
        extra = None
        if self.ema is not None:  # state.ema_updates counts the updates on the host
            extra = {EMA_FILE: ema_tensors(self.ema)} if self.accelerator.is_main_process else None
        self.latest = save_checkpoint(
            self.accelerator, self.root, state.opt_step, state.to_dict(), self.keep, extra
        )
        return self.latest
