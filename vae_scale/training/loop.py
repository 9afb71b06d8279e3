"""The one training loop: every dataset, objective and model, 1 process or N, through Accelerate.

Read top to bottom: `train` starts the run (training/setup.py: run folder, data, the objective
and the networks it trains, the checkpoint to resume), then for every epoch
`train_one_epoch` (a `train_step` per batch, training/step.py), an epoch-end checkpoint
(training/checkpoint.py) and the epoch's evaluation (training/evaluation.py). Checkpointing
and evaluation decide their own cadence; the objective decides what is trained and when.
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from vae_scale.config import Config
from vae_scale.data.streaming.inputs import DeviceBatches
from vae_scale.data.streaming.order import EpochPlan
from vae_scale.data.streaming.workers import WorkerLost
from vae_scale.metrics import MetricSums
from vae_scale.run_files.logs import STEPS_FILE, append_row, sample_keys_file
from vae_scale.training import tracking
from vae_scale.training.evaluation import transfer_metrics
from vae_scale.training.networks import TrainingDiverged
from vae_scale.training.run_folder import RunLock
from vae_scale.training.setup import Run, StartRequest, make_accelerator, start_run
from vae_scale.training.signals import StopFlag, TrainingInterrupted, record_exit_status
from vae_scale.training.step import StepOutput, step_means, train_step
from vae_scale.training.watchdog import Watchdog, is_collective_failure
from vae_scale.utils.compat import reset_accelerate_state
from vae_scale.utils.progress import Progress
from vae_scale.utils.seeding import derive_seed

__all__ = ["TrainingDiverged", "train"]


def train(
    cfg: Config,
    resume: str = "auto",
    command: str | None = None,
    from_another_run: bool = False,
    restart_epoch: bool = False,
) -> Path:
    """Train `cfg`; returns the run folder. `resume`: 'auto', 'none' or a checkpoint path
    (of another run folder only with `from_another_run`); `command`: the command line that
    asked for it (recorded with the run); `restart_epoch`: a checkpoint inside an epoch whose
    shards have changed since starts that epoch over."""
    wandb_mode = tracking.resolve_mode(cfg.wandb.mode)
    request = StartRequest(resume, command, from_another_run, restart_epoch, wandb_mode)
    accelerator = make_accelerator(cfg, wandb_mode)
    lock = RunLock(cfg.run_dir)
    watchdog, stop = None, StopFlag()
    try:
        with stop:
            if Watchdog.wanted():
                ranks = (accelerator.process_index, accelerator.num_processes)
                timeout = cfg.train.heartbeat_timeout_s
                watchdog = Watchdog(*ranks, timeout, stop.request, record_exit_status).start()
            run = start_run(cfg, accelerator, stop, lock, request)
            with run.checkpointer.finishing():
                return train_epochs(run)
    except RuntimeError as err:
        if accelerator.num_processes > 1 and is_collective_failure(err):
            raise TrainingInterrupted(
                f"process {accelerator.process_index}: a collective with the other processes "
                f"failed or waited longer than train.ddp_timeout_s={cfg.train.ddp_timeout_s:g} "
                f"s during {stop.doing} ({str(err).splitlines()[0][:200]}): another process "
                f"is blocked (a hung file system or device) or gone"
                f"{rank0_work_hint(stop.doing, accelerator.process_index)}. The latest "
                f"checkpoint stands; the same command resumes from it"
            ) from err
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        lock.release()
        # A clean process-group teardown, also on errors (rank 0 otherwise may abort); then
        # forget Accelerate's singletons so another train() in this process starts afresh.
        accelerator.end_training()
        reset_accelerate_state()


def rank0_work_hint(doing: str, rank: int) -> str:
    """At the end of an epoch process 0 alone writes the metrics row and makes the pictures
    while the others wait in their next collective: work that may outlast the timeout."""
    if rank == 0 or not doing.startswith("the end of epoch"):
        return ""
    return (
        ", or process 0 was still doing what it does alone at the end of an epoch (its "
        "metrics row, pictures, W&B): if that takes longer than train.ddp_timeout_s, raise "
        "it (docs/never-lose-a-run.md, 'Sizing the timeouts')"
    )


def train_epochs(run: Run) -> Path:
    """for epoch: train_one_epoch, checkpoint, evaluate (the checkpoint first, so a failed
    or killed evaluation does not cost the epoch's training)."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    if state.epoch > cfg.train.epochs and not state.unevaluated:
        accelerator.print(
            f"{cfg.run_dir} has already trained {state.epoch - 1} epochs (train.epochs="
            f"{cfg.train.epochs}): nothing to do; raise train.epochs to train longer"
        )
    trained_last = False
    if state.unevaluated:  # its checkpoint came before a failed or interrupted evaluation
        epoch, sums, seconds = unevaluated_epoch(state.unevaluated, accelerator.device)
        accelerator.print(f"epoch {epoch} was trained and checkpointed; evaluating it now")
        run.evaluation.end_of_epoch(state, run.vae, epoch, sums, seconds)
        state.unevaluated = {}
        trained_last = epoch == cfg.train.epochs
    for epoch in range(state.epoch, cfg.train.epochs + 1):
        trained_last = epoch == cfg.train.epochs
        run.stop.doing = f"the training of epoch {epoch}"
        sums, seconds = train_one_epoch(run, epoch)
        run.stop.doing = f"the end of epoch {epoch} (checkpoint, evaluation, pictures)"
        state.epoch, state.batch_in_epoch, state.epoch_sums = epoch + 1, 0, {}
        run.splits["train"].planner.position = None
        sums_record = {k: v.tolist() for k, v in sums.items()}
        state.unevaluated = {"epoch": epoch, "sums": sums_record, "seconds": seconds}
        run.checkpointer.save(state.opt_step)
        run.evaluation.end_of_epoch(state, run.vae, epoch, sums, seconds)
        state.unevaluated = {}
        if epoch < cfg.train.epochs and stop_requested(run):
            raise TrainingInterrupted(
                f"{run.stop.reason}: checkpointed at the end of epoch {epoch}; run the "
                f"same command to resume"
            )
    if trained_last:
        run.evaluation.measure_latents(state, run.vae)
    accelerator.wait_for_everyone()
    return cfg.run_dir


def unevaluated_epoch(
    record: dict[str, Any], device: torch.device
) -> tuple[int, dict[str, torch.Tensor], float]:
    """The checkpointed epoch still to evaluate: its number, train sums and seconds."""
    sums = {
        name: torch.tensor(value, dtype=torch.float64, device=device)
        for name, value in record["sums"].items()
    }
    return record["epoch"], sums, record["seconds"]


def train_one_epoch(run: Run, epoch: int) -> tuple[dict[str, torch.Tensor], float]:
    """Train the epoch's batches from where the state says it stands; returns the epoch's
    sums (over all ranks) and its seconds."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    planner = run.splits["train"].planner
    record = planner.position  # set by a mid-epoch checkpoint this run resumed from
    plan, start = planner.plan(epoch, cfg.train.grad_accum_batches, record)
    rank = accelerator.process_index
    if record is not None and start == 0:  # checkpointed on another topology: re-planned
        accelerator.print(f"elastic resume: {plan.describe()}")
        torch.manual_seed(derive_seed(cfg.run.seed, "noise", epoch, rank, plan.generation))
    elif start == 0:
        # Each rank its own noise stream, a pure function of (seed, epoch, rank); a
        # mid-epoch resume continues the stream restored by load_state instead.
        torch.manual_seed(derive_seed(cfg.run.seed, "noise", epoch, rank))
    if epoch == run.first_epoch:
        accelerator.print(plan.describe())
    for net in run.nets.values():
        net.model.train()
    sums = MetricSums.lazy(accelerator.device)  # named by the objective's terms
    if state.batch_in_epoch > 0 and accelerator.is_main_process:  # the earlier batches' sums
        sums.load_state_dict(state.epoch_sums)
    t0 = time.perf_counter()
    batches = run.splits["train"].train_batches(epoch, start, plan)
    progress = epoch_progress(run, epoch, plan.batches, start)
    # exactly plan.batches - start of them; on a GPU the next is copied while a step runs
    device, channels_last = accelerator.device, cfg.train.channels_last
    on_device = DeviceBatches(batches, device, channels_last, cfg.data.binarize)
    done, synced = start, True  # batches of the epoch trained; whether they end a step
    mark = t0  # productive time is counted up to here (checkpoint writes are not)
    with closing(progress), closing(batches):  # its loader workers end with the epoch
        try:
            for i, (batch, x) in enumerate(on_device, start=start):
                out = train_batch(run, epoch, batch, x)
                sums.add_terms(out.terms, x.shape[0])
                if out.synced:  # its log row first: the progress line shows its values
                    after_step(run, epoch, out, progress)
                progress.update(1, samples=x.shape[0] * accelerator.num_processes)
                done, synced = i + 1, out.synced
                now = time.perf_counter()
                state.productive_s, mark = state.productive_s + now - mark, now
                if synced and done < plan.batches:
                    mid_epoch_checkpoint(run, epoch, done, sums, plan)
                    mark = time.perf_counter()
        except WorkerLost as err:  # the OOM killer, most often: retryable, exit 3
            raise worker_lost(run, err, epoch, done if synced else None, sums, plan) from None
    seconds = time.perf_counter() - t0
    state.productive_s += time.perf_counter() - mark
    for net in run.nets.values():
        net.policy.settle()
    run.settle_transfers()
    run.vae.policy.check_divergence(run.checkpointer.latest)
    return sums.reduce(accelerator), seconds


def epoch_progress(run: Run, epoch: int, batches: int, start: int) -> Progress:
    """The epoch's progress in batches: a line every train.log_every_steps optimizer steps
    (lines mode), none at the end (the epoch's own line follows)."""
    train = run.cfg.train
    return Progress(
        total=batches,
        desc=f"epoch {epoch}/{train.epochs}",
        mode=train.progress,
        initial=start,
        every=train.log_every_steps * train.grad_accum_batches,
        unit="batch",
        disable=not run.accelerator.is_main_process,
        final_line=False,
    )


def train_batch(run: Run, epoch: int, batch: dict[str, Any], x: torch.Tensor) -> StepOutput:
    """One batch through `train_step`, with its counters and its sample keys (audit)."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    state.skipped_samples += batch["skipped"]
    run.transfers.retries += batch["transfers"]["retries"]
    run.transfers.refetched_bytes += batch["transfers"]["refetched_bytes"]
    state.samples_seen += x.shape[0] * accelerator.num_processes  # every rank's batch is full
    out = train_step(accelerator, run.objective, run.nets, x, state, run.total_steps)
    if cfg.train.log_sample_keys:
        # the optimizer step this batch counts toward (a checkpoint at step S keeps <= S)
        step = state.opt_step + (0 if out.synced else 1)
        row = {"epoch": epoch, "global_step": step, "keys": batch["key"]}
        append_row(cfg.run_dir, sample_keys_file(accelerator.process_index), row)
    return out


def after_step(run: Run, epoch: int, out: StepOutput, progress: Progress) -> None:
    """At an optimizer step: its log row every train.log_every_steps, and the divergence
    check when non-finite steps are running."""
    if run.state.opt_step % run.cfg.train.log_every_steps == 0:
        log_step(run, epoch, out, progress)
    policy = run.vae.policy
    if policy.counts.consecutive_bad or policy.peak_bad:
        policy.check_divergence(run.checkpointer.latest)


def log_step(run: Run, epoch: int, out: StepOutput, progress: Progress) -> None:
    """A steps.jsonl row and a W&B row: each objective term's mean over all ranks, the step's
    values, and every network's learning rate, gradient norm and skipped updates."""
    state = run.state
    for net in run.nets.values():
        net.policy.settle()  # the device's counters, read at log steps only
    means = step_means(out)
    reduced = run.accelerator.reduce(torch.stack(list(means.values())), "mean").tolist()
    step_terms = dict(zip(means, reduced, strict=True))
    headline = run.objective.headline
    progress.set_values(step=state.opt_step, **{headline: step_terms[headline]})
    run.settle_transfers()
    row = {
        "global_step": state.opt_step,
        "epoch": epoch,
        "train/samples_seen": state.samples_seen,
        **{f"train/step_{k}": v for k, v in step_terms.items()},
        **{f"train/{k}": float(v) for k, v in out.values.items()},
    }
    for net in run.nets.values():
        row.update(net.row(out.updates.get(net.name)))
    row.update(transfer_metrics(state))
    if run.accelerator.is_main_process:
        append_row(run.cfg.run_dir, STEPS_FILE, row)
    run.accelerator.log(row, step=state.opt_step)


def mid_epoch_checkpoint(
    run: Run, epoch: int, batch: int, sums: MetricSums, plan: EpochPlan, stop: bool = False
) -> None:
    """After a stop signal: checkpoint and stop; else when the checkpointer says it is due.
    `batch`: the rank batches of the epoch trained (whole optimizer steps); `stop`: checkpoint
    now (this process alone: a lost loader worker)."""
    state = run.state
    stopping = stop or stop_requested(run, every=run.cfg.train.log_every_steps)
    if not (stopping or state.opt_step >= run.checkpointer.next_step):
        return
    for net in run.nets.values():
        net.policy.settle()
    run.settle_transfers()
    state.epoch, state.batch_in_epoch = epoch, batch
    planner = run.splits["train"].planner
    planner.position = planner.record(plan, batch)
    state.epoch_sums = sums.state_dict(run.accelerator)
    run.checkpointer.save(state.opt_step)
    if stopping and not stop:
        raise TrainingInterrupted(
            f"{run.stop.reason}: checkpointed at step {state.opt_step} (epoch {epoch}, "
            f"batch {batch}); run the same command to resume"
        )


def worker_lost(
    run: Run, err: WorkerLost, epoch: int, done: int | None, sums: MetricSums, plan: EpochPlan
) -> TrainingInterrupted:
    """A loader worker died: one process checkpoints where its last optimizer step left it
    (`done` rank batches, None inside a step's accumulation: not safely) and stops with exit
    3 (retryable: Slurm requeue, torchrun restarts). With several processes a checkpoint needs
    them all; this one stops, the others stop by their collective timeout or watchdog (exit 3),
    and the latest checkpoint stands."""
    kept = f"the latest checkpoint {run.checkpointer.latest or '(none yet)'} stands"
    if run.accelerator.num_processes == 1 and done is not None and done > 0:
        mid_epoch_checkpoint(run, epoch, done, sums, plan, stop=True)
        kept = f"checkpointed at step {run.state.opt_step} (epoch {epoch}, batch {done})"
    return TrainingInterrupted(f"{err}; {kept}: run the same command to resume")


def stop_requested(run: Run, every: int = 1) -> bool:
    """True on every rank when any rank received a stop signal. With several processes the
    ranks agree through an all-reduce read on the host, so mid-epoch they ask only every
    `every` optimizer steps (the same steps on every rank)."""
    flag = float(run.stop.received is not None)
    if run.accelerator.num_processes > 1:
        if run.state.opt_step % every:
            return False
        accelerator = run.accelerator
        flag = accelerator.reduce(torch.tensor(flag, device=accelerator.device), "max").item()
    return flag > 0
