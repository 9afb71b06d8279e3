"""Checkpoints that are either complete or invisible.

`accelerator.save_state` writes into a temporary folder; the main process adds every
component's state and a manifest (file sizes and sha256), fsyncs, then renames the folder to
`checkpoints/step_XXXXXXXX`. Only folders with a valid manifest count, so a crash or a full disk
mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator

from vae_scale.errors import ConfigError
from vae_scale.run_files.checkpoints import (  # noqa: F401  (the format, re-exported)
    EMA_FILE,
    MANIFEST,
    PREFIX,
    TRAIN_STATE,
    check_plain_data,
    checkpoint_step,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    load_plain,
    read_state,
    read_train_state,
    write_state,
)
from vae_scale.run_files.logs import SAMPLE_KEYS_DIR, sample_keys_file, truncate_logs
from vae_scale.utils.fsutil import fsync, sha256_file


def save_checkpoint(
    accelerator: Accelerator,
    ckpt_root: Path,
    step: int,
    states: dict[str, dict[str, Any]],
    keep: int,
    background: Finisher | None = None,
) -> Path:
    """Collective: every process must call it (each saves its own RNG state). `states`:
    component name -> its state dict, written by the main process (`write_state`).
    `background`: every state is copied (`snapshot`) and the main process hands the writing,
    fsync, sha256 manifest, rename and pruning to it; the checkpoint becomes visible when it
    finishes. None: written and finished before returning."""
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    try:
        if background is None:
            accelerator.save_state(str(tmp))
            if main:
                for name, values in states.items():
                    write_state(tmp, name, values)
            accelerator.wait_for_everyone()
            if main:
                _finish(tmp, final, ckpt_root, step, keep)
        else:
            write = snapshot(accelerator, tmp, states, background.staging)
            accelerator.wait_for_everyone()  # every rank's RNG file is written
            if main:

                def finish() -> None:
                    write()
                    _finish(tmp, final, ckpt_root, step, keep)

                background.start(tmp, final, finish)
    except Exception as err:  # the previous checkpoint stays the latest
        raise _failed(err, tmp, final, ckpt_root) from err
    accelerator.wait_for_everyone()
    return final


def snapshot(
    accelerator: Accelerator, tmp: Path, states: dict[str, dict[str, Any]], staging: dict
) -> Callable[[], None]:
    """Copies of what `accelerator.save_state` writes, and of `states`, taken now (the
    training goes on changing the originals); returns what writes them into `tmp` in
    Accelerate's layout. Each process's RNG file is written now, by Accelerate itself.
    `staging`: the buffers of the previous snapshot (its write is finished), refilled in
    place: allocating fresh memory for every checkpoint costs more than the copy."""
    from accelerate.checkpointing import save_accelerator_state
    from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCALER_NAME, save

    if accelerator._schedulers or accelerator._dataloaders or accelerator._custom_objects:
        raise NotImplementedError("train.checkpoint_async: Accelerate holds more than it copies")
    process = accelerator.process_index
    save_accelerator_state(str(tmp), [], [], [], [], process, accelerator.step, None)
    if not accelerator.is_main_process:
        return lambda: None
    weights = [accelerator.get_state_dict(m, unwrap=False) for m in accelerator._models]
    staging.update(
        weights=_stage(weights, staging.get("weights"), torch.device("cpu")),
        optimizers=_stage(
            [o.state_dict() for o in accelerator._optimizers], staging.get("optimizers")
        ),
        states=_stage(states, staging.get("states")),
    )
    scaler = None if accelerator.scaler is None else accelerator.scaler.state_dict()
    weights, optimizers, states = staging["weights"], staging["optimizers"], staging["states"]

    def write() -> None:
        for i, values in enumerate(weights):
            name = SAFE_WEIGHTS_NAME.replace(".", f"_{i}.") if i else SAFE_WEIGHTS_NAME
            save(values, tmp / name, safe_serialization=True)
        for i, values in enumerate(optimizers):
            name = f"{OPTIMIZER_NAME}{f'_{i}' if i else ''}.bin"
            save(values, tmp / name, safe_serialization=False)
        if scaler is not None:
            torch.save(scaler, tmp / SCALER_NAME)
        for name, values in states.items():
            write_state(tmp, name, values)

    return write


def _stage(value: Any, old: Any, device: torch.device | None = None) -> Any:
    """A copy of `value` (nested dicts, lists, tensors), its tensors copied into `old`'s where
    they match (on `device`, else each tensor's own)."""
    if isinstance(value, torch.Tensor):
        target = device or value.device
        same = isinstance(old, torch.Tensor) and old.device == target
        if same and old.shape == value.shape and old.dtype == value.dtype:
            return old.copy_(value.detach())
        return value.detach().to(target, copy=True)
    if isinstance(value, dict):
        old = old if isinstance(old, dict) else {}
        return {k: _stage(v, old.get(k), device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        old = (
            old if isinstance(old, type(value)) and len(old) == len(value) else [None] * len(value)
        )
        return type(value)(_stage(v, o, device) for v, o in zip(value, old))
    return copy.deepcopy(value)


def _failed(err: Exception, tmp: Path, final: Path, ckpt_root: Path) -> Exception:
    """What to raise when writing `final` failed: the temporary folder is removed; a full
    disk becomes an OSError naming the checkpoint and what is kept, anything else itself."""
    # judged before the temporary folder goes: torch's own write errors carry no errno,
    # and once its bytes are freed the disk no longer looks full
    code = _disk_full_errno(err, ckpt_root)
    shutil.rmtree(tmp, ignore_errors=True)
    if code is None:
        return err
    previous = latest_checkpoint(ckpt_root)
    kept = (
        f"the previous checkpoint {previous} is intact and `--resume auto` will use it"
        if previous
        else "no earlier checkpoint exists"
    )
    return OSError(code, f"writing checkpoint {final} failed ({err}); {kept}")


class Finisher:
    """The main process's checkpoint finishing on one thread while training goes on
    (train.checkpoint_async). One at a time: `wait` joins it (before the next checkpoint, at
    the run's end, on errors) and raises what it failed with. A process killed before it
    finished leaves a `.tmp-` folder, swept at the next start: the previous checkpoint stays
    the latest, as with a kill during a blocking save."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None
        self.finished: Path | None = None  # the last checkpoint it made visible
        self.staging: dict[str, Any] = {}  # the copies it writes from (`snapshot`)

    def start(self, tmp: Path, final: Path, finish: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                finish()
                self.finished = final
            except Exception as err:
                self._error = _failed(err, tmp, final, final.parent)

        self._thread = threading.Thread(target=run, name=f"finish {final.name}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


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


def _finish(tmp: Path, final: Path, ckpt_root: Path, step: int, keep: int) -> None:
    """Main process: manifest, fsync, then the atomic rename and pruning."""
    files = {}
    for path in sorted(tmp.iterdir()):
        if path.is_file():
            fsync(path)
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    fsync(tmp / MANIFEST)
    fsync(tmp)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    fsync(ckpt_root)
    for old in complete_checkpoints(ckpt_root)[:-keep]:
        _remove(old)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder by first renaming it to a temporary name (atomic): a kill
    during the slow deletion leaves a `.tmp-` folder the next start sweeps, never a
    half-deleted `step_*` folder that looks like a damaged checkpoint forever."""
    doomed = folder.with_name(f".tmp-del-{folder.name}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, values: dict[str, Any]) -> None: ...


class Checkpointer:
    """A run folder's checkpoints: which one to resume from, restoring it, and saving new
    ones (collective). A checkpoint holds Accelerate's states (weights, optimizer, scaler, RNG)
    and the state dict of every object in `components` under its name (`write_state`)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, train: Any):
        """`train`: the train section (keep_checkpoints, checkpoint_every_steps)."""
        self.accelerator, self.run_dir = accelerator, run_dir
        self.keep, self.every = train.keep_checkpoints, train.checkpoint_every_steps
        self.root = run_dir / "checkpoints"
        self._plan_next(0)
        self.components: dict[str, Stateful] = {}  # handed over once they exist
        self._latest: Path | None = None  # the newest complete checkpoint of this run
        main = accelerator.is_main_process
        self.finisher = Finisher() if train.checkpoint_async and main else None

    @property
    def latest(self) -> Path | None:
        """The newest complete checkpoint (once a background finish is done)."""
        self.wait()
        return self._latest

    def wait(self) -> None:
        """Join a checkpoint finishing in the background; raise what it failed with."""
        if self.finisher is not None:
            self.finisher.wait()
            self._latest = self.finisher.finished or self._latest

    @contextmanager
    def finishing(self) -> Iterator[None]:
        """Wait for a background finish when the block ends; on an error in the block, a
        failed finish is reported beside it, not in its place."""
        try:
            yield
        except BaseException:
            try:
                self.wait()
            except Exception as err:
                warnings.warn(f"the last checkpoint was not finished: {err}", stacklevel=3)
            raise
        self.wait()

    def find(self, resume: str, from_another_run: bool = False) -> Path | None:
        """The checkpoint `--resume` asks for: 'auto' (the newest that verifies, if any),
        'none' (refuse a folder that has checkpoints) or a checkpoint folder. The main process
        chooses and verifies, and every rank gets its choice (ranks on a network file system
        could otherwise see different folders, and each would hash every file)."""
        choice: list[Any] = [None, None]
        if self.accelerator.is_main_process:
            try:
                self._clean_partial()
                choice[0] = self._choose(resume, from_another_run)
                if choice[0] is not None:  # before anything unpickles a file of it
                    check_plain_data(Path(choice[0]))
            except ConfigError as err:
                choice[1] = str(err)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(choice, from_process=0)
        if choice[1] is not None:
            raise ConfigError(choice[1])
        self._latest = None if choice[0] is None else Path(choice[0])
        return self._latest

    def _clean_partial(self) -> None:
        """Remove what trainers killed mid-write or mid-prune left (this process holds the run
        folder's lock, so none of it is in use): temporary folders, and incomplete `step_*`
        folders older than the newest complete checkpoint (a newer incomplete one is left for
        `--resume auto` to report)."""
        if not self.root.is_dir():
            return
        for partial in self.root.glob(".tmp-*"):
            shutil.rmtree(partial, ignore_errors=True)
        complete = complete_checkpoints(self.root, quiet=True)
        if complete:
            for folder in self.root.glob(f"{PREFIX}*"):
                if folder.name < complete[-1].name and folder not in complete:
                    shutil.rmtree(folder, ignore_errors=True)

    def _choose(self, resume: str, from_another_run: bool = False) -> str | None:
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
        owner = path.resolve().parent.parent
        if owner != self.root.resolve().parent and not from_another_run:
            raise ConfigError(
                f"--resume {path}: a checkpoint of another run folder ({owner}), not of "
                f"{self.run_dir}; its settings were not checked against this run's. "
                f"To start this run from it on purpose, add --from-another-run"
            )
        return str(path)

    def restore(self, path: Path) -> list[str]:
        """Load `path` into the prepared objects and every component; drop the log rows past
        it. Returns the components it holds nothing of (switched on since)."""
        self.accelerator.load_state(str(path))
        older = _older_states(path)
        missing = []
        for name, component in self.components.items():
            values = read_state(path, name)
            if values is None and name in FORMER_NAMES:
                values = read_state(path, FORMER_NAMES[name])
            if name in older:
                values = {**older[name], **(values or {})}
            if values is None:
                missing.append(name)
            else:
                component.load_state_dict(values)
        step = checkpoint_step(path)
        self._plan_next(step)
        rank = self.accelerator.process_index
        if self.accelerator.is_main_process:
            truncate_logs(self.run_dir, step)
            # ranks that ran before an elastic resume onto fewer processes: their rows past
            # the checkpoint were never trained into it either
            for old in (self.run_dir / SAMPLE_KEYS_DIR).glob("rank*.jsonl"):
                if int(old.stem.removeprefix("rank")) >= self.accelerator.num_processes:
                    truncate_logs(self.run_dir, step, (f"{SAMPLE_KEYS_DIR}/{old.name}",))
        truncate_logs(self.run_dir, step, (sample_keys_file(rank),))
        check_rng_restored(path, rank)
        return missing

    def save(self, step: int) -> Path:
        """Collective: a checkpoint of the current weights and components at optimizer step
        `step` (every rank asks every component for its state, in the same order)."""
        self.wait()
        states = {name: c.state_dict() for name, c in self.components.items()}
        main = self.accelerator.is_main_process
        path = save_checkpoint(
            self.accelerator, self.root, step, states if main else {}, self.keep, self.finisher
        )
        if self.finisher is None:
            self._latest = path
        self._plan_next(step)
        return path

    def _plan_next(self, step: int) -> None:
        """`next_step`: the optimizer step of the next mid-epoch checkpoint after `step`, a
        multiple of train.checkpoint_every_steps (epoch ends always get one). The loop
        compares; the checkpointer decides."""
        every = self.every
        self.next_step = (step // every + 1) * every if every else float("inf")


def check_rng_restored(path: Path, rank: int) -> None:
    """Accelerate's load_state swallows any error restoring the random number generators
    (an info log): compare them with the saved states, and say so when they differ."""
    file = path / f"random_states_{rank}.pkl"
    # each process of the checkpointed run wrote its file (rank 0 always): a missing one
    # of a higher rank is an elastic resume onto more processes, re-planned on purpose
    written = {int(p.stem.rsplit("_", 1)[1]) for p in path.glob("random_states_*.pkl")}
    if not file.is_file():
        problem = None if rank and max(written, default=-1) < rank else "is missing"
    else:
        try:  # checked as plain data when the checkpoint was chosen (check_plain_data)
            saved = load_plain(file)
            same = torch.equal(torch.get_rng_state(), saved["torch_manual_seed"])
            same = same and random.getstate() == saved["random_state"]
            problem = None if same else "was not restored"
        except Exception as err:  # unreadable: the same warning, with why
            problem = f"could not be read ({type(err).__name__}: {err})"
    if problem:
        warnings.warn(
            f"{file} {problem}: process {rank}'s random number generators start afresh, "
            f"so this resume is not bit-exact (the run goes on)",
            stacklevel=4,
        )


#: components renamed since checkpoints were written: name -> its former name
FORMER_NAMES = {"discriminator_policy": "critic_policy"}


def _older_states(path: Path) -> dict[str, dict[str, Any]]:
    """Checkpoints written before the components saved their own files kept their values in
    train_state.json (with the policy's counts): the values each component takes from there."""
    record = read_train_state(path)
    if "bad_steps" not in record:
        return {}
    older = {
        "update_policy": record,  # the policy takes its counts' fields, ignores the rest
        "train_data": {"plan": record.get("data_plan")},
    }
    if (path / EMA_FILE).is_file():  # the count meant something only beside the weights
        older["ema"] = {"updates": record["ema_updates"]}
    return older
