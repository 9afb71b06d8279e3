"""W&B through Accelerate's trackers: mode resolution, run identity, the facts of a run, the
dashboard's axes and best-so-far summary."""

from __future__ import annotations

import netrc
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vae_scale.run_files.logs import METRICS_FILE, STEPS_FILE, read_rows
from vae_scale.run_files.wandb_records import last_offline_step
from vae_scale.utils.netutil import is_online

WANDB_HOST = "https://api.wandb.ai"
RUN_ID_FILE = "wandb_run_id.txt"
RUN_FOLDER_FILE = "wandb_run_folder.txt"  # where the id was made (a copy is told apart)


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


def sweep_run_id() -> str | None:
    """The run id a `wandb agent` chose for this process (None outside a sweep)."""
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    return None


def run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, created once, so resumed runs continue the same run
    (under a sweep agent: the agent's id, which the sweep knows the run by). Beside it the
    folder it was made in: a renamed or moved folder keeps the id, but a copy (`cp -a`, the
    original still there with the same id) gets an id of its own, said once, so that two
    folders never write into one W&B run."""
    path, where = run_dir / RUN_ID_FILE, run_dir / RUN_FOLDER_FILE
    folder = str(Path(run_dir).resolve())
    if path.is_file():
        known = path.read_text().strip()
        made_in = where.read_text().strip() if where.is_file() else folder
        if made_in == folder or not _holds_run(Path(made_in), known):
            where.write_text(folder + "\n")  # here, moved or renamed: the same run
            return known
        new_id = uuid.uuid4().hex[:12]
        print(
            f"warning: {run_dir} is a copy of the run folder {made_in} (W&B run {known}): "
            f"it logs to a W&B run of its own, {new_id}, so the two never mix their histories"
        )
    else:
        new_id = sweep_run_id() or uuid.uuid4().hex[:12]
    path.write_text(new_id + "\n")
    where.write_text(folder + "\n")
    return new_id


def _holds_run(folder: Path, known: str) -> bool:
    """Whether `folder` still holds a run whose W&B id is `known` (the original of a copy)."""
    try:
        return (folder / RUN_ID_FILE).read_text().strip() == known
    except OSError:
        return False


def _git(*args: str) -> str | None:
    """Output of a git command in the checkout vae_scale runs from (None: not a checkout)."""
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """True when tracked files differ from the commit (the commit alone does not say what
    trained); None outside a git checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def cluster_facts(num_processes: int) -> dict[str, Any]:
    """Where the run ran: machines (torchrun's LOCAL_WORLD_SIZE processes each) and the Slurm
    job (array jobs as JOB_TASK), recorded in the run config."""
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes) or num_processes)
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"num_machines": max(1, num_processes // max(per_machine, 1)), "slurm_job_id": job}


def define_metrics(run: Any) -> None:
    """Every metric is plotted against global_step (the optimizer step); train/samples_seen,
    logged in every row, is the second x-axis that lines up runs of different global batch
    sizes and process counts."""
    run.define_metric("global_step")
    run.define_metric("train/samples_seen", step_metric="global_step")
    run.define_metric("*", step_metric="global_step")
    # the numbers runs are compared by in W&B's runs table: each run's final value
    compared = ("test/rfid", "test/ifid", "test/gfid", "test/fm_loss", "val/fm_loss")
    for name in (*compared, "time/goodput"):
        run.define_metric(name, step_metric="global_step", summary="last")


def best_so_far(state: Any, metrics: dict[str, Any], term: str = "neg_elbo") -> dict[str, Any]:
    """Update `state.best` with this epoch's val (else test) `term` (the objective's headline:
    the negative ELBO, the probe's loss); returns the best/* entries (logged every epoch, so
    the summary's last value is the best)."""
    split = next((s for s in ("val", "test") if f"{s}/{term}" in metrics), None)
    best = state.best
    if split is not None and (not best or metrics[f"{split}/{term}"] < best["value"]):
        best = state.best = {
            "split": split,
            "value": metrics[f"{split}/{term}"],
            "step": metrics["global_step"],
            "epoch": metrics["epoch"],
            "samples_seen": state.samples_seen,
        }
    if not best:
        return {}
    name = f"best/{best['split']}_{term}"
    return {
        name: best["value"],
        f"{name}_step": best["step"],
        f"{name}_epoch": best["epoch"],
        f"{name}_samples_seen": best["samples_seen"],
    }


def init_kwargs(cfg: Any, run_dir: Path, mode: str, tags: list[str]) -> dict[str, Any]:
    return {
        "wandb": {
            "mode": mode,
            "dir": str(run_dir),
            "id": run_id(run_dir),
            "resume": "allow",
            "name": cfg.run.name,
            "group": cfg.wandb.group,
            "job_type": cfg.wandb.job_type,
            "notes": cfg.wandb.notes,
            "entity": cfg.wandb.entity,
            "tags": sorted(set(cfg.wandb.tags) | set(tags)),
        }
    }


@contextmanager
def command_run(cfg: Any, run_dir: Path, kind: str) -> Iterator[Any]:
    """The run's W&B run, reopened (same id, resume='allow') for what a command adds after
    training (`eval`'s numbers, a picture), finished when the block ends; None when W&B is
    disabled. Offline, its record becomes the folder wandb/offline-<kind>-<id> (`kind`: what
    it wrote, eval_test or sample_t1_n64), replacing that kind's previous one, whose numbers
    or picture the command has just superseded: one folder per kind, not one per command,
    and `wandb sync RUN/wandb` uploads them all into the same W&B run."""
    mode = resolve_mode(cfg.wandb.mode)
    if mode == "disabled":
        yield None
        return
    import wandb

    kwargs = init_kwargs(cfg, run_dir, mode, [])["wandb"]
    kwargs.pop("tags")
    run = wandb.init(project=cfg.wandb.project, **kwargs)
    try:
        yield run
    finally:
        run.finish()
    if mode == "offline":
        made = Path(run.settings.sync_dir)
        kept = made.with_name(f"offline-{kind}-{run.id}")
        if kept.exists():
            shutil.rmtree(kept)
        made.rename(kept)
        latest = made.with_name("latest-run")
        if latest.is_symlink():  # wandb's pointer to the folder it just made
            latest.unlink()
            latest.symlink_to(kept.name)


def rows_missing(cfg: Any, run_dir: Path, mode: str, opt_step: int) -> bool:
    """Whether W&B may lack logged rows up to `opt_step` (a kill after the last metrics row):
    offline, its own records say; online only the server knows (the resumed run asks it)."""
    if mode == "disabled" or not read_rows(run_dir, STEPS_FILE) and not read_rows(run_dir):
        return False
    if mode == "online":
        return True
    logged = [
        r["global_step"] for name in (STEPS_FILE, METRICS_FILE) for r in read_rows(run_dir, name)
    ]
    return last_offline_step(run_dir, run_id(run_dir)) < min(max(logged), opt_step)


def replay_missing_rows(accelerator: Any, run_dir: Path, opt_step: int) -> tuple[int, int]:
    """A resumed run's W&B history may end before its checkpoint (a killed process loses what
    W&B had not written yet, offline or not uploaded): log again the rows of steps.jsonl and
    metrics.jsonl after what W&B holds, up to the checkpoint's `opt_step`, so that its curves
    equal the local logs. Returns (rows replayed, the last step W&B held)."""
    run = accelerator.get_tracker("wandb", unwrap=True)
    held = max(last_offline_step(run_dir, run.id), run.starting_step - 1)
    rows = [
        (row["global_step"], order, row)
        for order, name in enumerate((STEPS_FILE, METRICS_FILE))  # a step's row, then its epoch's
        for row in read_rows(run_dir, name)
        if held < row["global_step"] <= opt_step
    ]
    for step, _, row in sorted(rows, key=lambda r: r[:2]):
        accelerator.log(row, step=step)
    return len(rows), held
