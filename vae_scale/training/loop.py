"""The one training loop: every dataset and model, 1 process or N, through Accelerate.

Read top to bottom: `train` sets up (training/setup.py), then for every epoch
`train_one_epoch` (training/step.py does a step), `end_of_epoch` (evaluation, logs,
pictures) and a checkpoint (training/checkpoint.py).
"""

from __future__ import annotations

import shutil
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_scale.analysis.evaluate import EvalOptions, evaluate_split, first_images, summarize
from vae_scale.analysis.latents import LATENT_STATS_FILE, latent_statistics, write_latent_stats
from vae_scale.analysis.pictures import epoch_pictures
from vae_scale.config import Config
from vae_scale.data.streaming.inputs import DeviceBatches
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.data.streaming.order import EpochPlan
from vae_scale.data.streaming.remote import TransferStats
from vae_scale.errors import ConfigError
from vae_scale.metrics import MetricSums
from vae_scale.perception.networks import PerceptionNets, perception_networks
from vae_scale.run_files.logs import (
    METRICS_FILE,
    STEPS_FILE,
    append_row,
    read_rows,
    sample_keys_file,
    truncate_logs,
)
from vae_scale.training import setup, tracking
from vae_scale.training.checkpoint import Checkpointer
from vae_scale.training.optim import TrainingDiverged
from vae_scale.training.run_folder import RunLock, check_same_run
from vae_scale.training.signals import StopFlag, TrainingInterrupted, record_exit_status
from vae_scale.training.state import TrainState
from vae_scale.training.step import StepOutput, batch_sums, step_means, train_step
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
    accelerator = setup.make_accelerator(cfg, wandb_mode)
    lock = RunLock(cfg.run_dir)
    watchdog = None
    try:
        with StopFlag() as stop:
            if Watchdog.wanted():
                watchdog = Watchdog(
                    accelerator.process_index, accelerator.num_processes,
                    cfg.train.heartbeat_timeout_s, stop.request, record_exit_status,
                ).start()  # fmt: skip
            run = start_run(
                cfg, accelerator, wandb_mode, resume, stop, lock, command, from_another_run,
                restart_epoch,
            )  # fmt: skip
            return train_epochs(run)
    except RuntimeError as err:
        if accelerator.num_processes > 1 and is_collective_failure(err):
            raise TrainingInterrupted(
                f"process {accelerator.process_index}: a collective with the other processes "
                f"failed or waited longer than train.ddp_timeout_s={cfg.train.ddp_timeout_s:g} "
                f"s ({str(err).splitlines()[0][:200]}): another process is blocked (a hung "
                f"file system or device) or gone. The latest checkpoint stands; the same "
                f"command resumes from it"
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


@dataclass
class Run:
    """What the loop's pieces share."""

    cfg: Config
    accelerator: Accelerator
    splits: dict[str, ShardSplit]
    models: setup.Models
    checkpointer: Checkpointer
    state: TrainState
    total_steps: int  # optimizer steps of the whole run (the lr schedule's length)
    stop: StopFlag
    first_epoch: int  # the first epoch this process trains (its plan is printed)
    # this rank's transport retries and refetched bytes since they were last added to `state`
    transfers: TransferStats = field(default_factory=TransferStats)
    nets: PerceptionNets = field(default_factory=PerceptionNets)  # LPIPS / rFID for evaluation


def start_run(
    cfg: Config,
    accelerator: Accelerator,
    wandb_mode: str,
    resume: str,
    stop: StopFlag,
    lock: RunLock,
    command: str | None = None,
    from_another_run: bool = False,
    restart_epoch: bool = False,
) -> Run:
    """Lock the run folder, choose what to resume, build data and models. A start that fails
    leaves no run folder behind that it created."""
    run_dir, main = cfg.run_dir, accelerator.is_main_process
    created = main and not run_dir.exists()
    try:
        refusal = None
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire()
            except ConfigError as err:
                created, refusal = False, err  # the folder is the other trainer's
        setup.agree(accelerator, refusal)
        checkpointer = Checkpointer(accelerator, run_dir, cfg.train.keep_checkpoints)
        resume_from = checkpointer.find(resume, from_another_run)
        if resume_from is not None:
            check_same_run(cfg, run_dir)
        else:  # a fresh start: no rows of an attempt that died before its first checkpoint
            logs = (sample_keys_file(accelerator.process_index),)
            truncate_logs(run_dir, 0, (METRICS_FILE, STEPS_FILE, *logs) if main else logs)
        set_seed(cfg.run.seed)  # identical initial weights on every rank
        splits = setup.open_splits(cfg, accelerator)
        models = setup.build_models(cfg, accelerator, splits["train"].image_shape)
        steps = setup.steps_per_epoch(cfg, splits["train"], accelerator.num_processes)
        total_steps = steps * cfg.train.epochs // cfg.train.grad_accum_steps
        state = TrainState()
        # what a checkpoint holds beside Accelerate's states, each saving its own
        checkpointer.components = {
            "train_state": state, "update_policy": models.policy, "train_data": splits["train"],
            **({"ema": models.ema} if models.ema is not None else {}),
            **critic_components(models.critic),
        }  # fmt: skip
        splits["train"].restart_epoch = restart_epoch
        if resume_from is not None:
            missing = checkpointer.restore(resume_from)
            note_layout_change(accelerator, splits["train"], state)
            if "ema" in missing:  # EMA switched on since: it starts from the loaded weights
                models.ema.start_from(models.plain)
            accelerator.print(
                f"resumed from {resume_from} (epoch {state.epoch}, batch "
                f"{state.batch_in_epoch}, step {state.opt_step})"
            )
        if state.unevaluated:  # the metrics of the run the checkpoint was written by
            settle_evaluation(resume_from.parent.parent, state)
        # a run with nothing left to train keeps its record as it is
        finished = state.epoch > cfg.train.epochs and not state.unevaluated
        run_config = setup.record_run(
            cfg, accelerator, models, splits["train"], steps, command, write=not finished
        )
        # a run with nothing left to do opens no W&B run (offline: no new folder to sync)
        setup.start_tracking(cfg, accelerator, run_config, "disabled" if finished else wandb_mode)
        if resume_from is not None and main and wandb_mode != "disabled" and not finished:
            replayed, held = tracking.replay_missing_rows(accelerator, run_dir, state.opt_step)
            if replayed:
                accelerator.print(
                    f"W&B: its history ended at step {held} (the rest was lost with the stopped "
                    f"process): {replayed} rows replayed from the run folder's logs"
                )
        nets = perception_networks(
            cfg.eval.lpips, cfg.eval.rfid, splits["train"].image_shape, cfg.run.weights_dir,
            accelerator.device, models.perceptual,
        )  # fmt: skip
        for metric, why in nets.unavailable.items():
            accelerator.print(f"note: {metric} is not evaluated: {why}")
    except BaseException:
        if created and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return Run(
        cfg, accelerator, splits, models, checkpointer, state, total_steps, stop,
        state.epoch, nets=nets,
    )  # fmt: skip


def note_layout_change(accelerator: Accelerator, train_data: ShardSplit, state: TrainState) -> None:
    """Say how the training shards changed since the checkpoint, and what happens to the epoch
    it stopped in (re-planned, or started over with --restart-epoch)."""
    change = train_data.layout_change
    if change is None:
        return
    if state.batch_in_epoch and train_data.position is None:  # --restart-epoch
        then = f"epoch {state.epoch} starts over on the current shards"
        state.batch_in_epoch, state.epoch_sums = 0, {}
    elif state.batch_in_epoch:
        then = f"the rest of epoch {state.epoch} is re-planned onto them, each sample once"
    else:
        then = "the next epochs are planned on the current shards"
    accelerator.print(
        f"the training shards changed since the checkpoint ({change.describe()}): {then}"
    )


def critic_components(critic: setup.Critic | None) -> dict[str, Any]:
    """The discriminator's checkpointed parts beside Accelerate's (its weights and optimizer
    are model_1 / optimizer_1 there)."""
    if critic is None:
        return {}
    return {"critic_policy": critic.policy, "lecam": critic.lecam}


def train_epochs(run: Run) -> Path:
    """for epoch: train_one_epoch, checkpoint, end_of_epoch (evaluate, log, pictures)."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    if state.epoch > cfg.train.epochs and not state.unevaluated:
        accelerator.print(
            f"{cfg.run_dir} has already trained {state.epoch - 1} epochs (train.epochs="
            f"{cfg.train.epochs}): nothing to do; raise train.epochs to train longer"
        )
    picture_inputs = None
    if accelerator.is_main_process and "test" in run.splits:
        picture_inputs = first_images(run.splits["test"], cfg.eval.recon_rows)
    trained_last = False
    if state.unevaluated:  # its checkpoint came before a failed or interrupted evaluation
        epoch, sums, seconds = unevaluated_epoch(state, accelerator.device)
        accelerator.print(f"epoch {epoch} was trained and checkpointed; evaluating it now")
        end_of_epoch(run, epoch, sums, seconds, picture_inputs)
        state.unevaluated = {}
        trained_last = epoch == cfg.train.epochs
    for epoch in range(state.epoch, cfg.train.epochs + 1):
        trained_last = epoch == cfg.train.epochs
        sums, seconds = train_one_epoch(run, epoch)
        state.epoch, state.batch_in_epoch, state.epoch_sums = epoch + 1, 0, {}
        run.splits["train"].position = None
        state.unevaluated = {
            "epoch": epoch, "sums": {k: v.tolist() for k, v in sums.items()}, "seconds": seconds
        }  # fmt: skip
        run.checkpointer.save(state.opt_step)
        end_of_epoch(run, epoch, sums, seconds, picture_inputs)
        state.unevaluated = {}
        if epoch < cfg.train.epochs and stop_requested(run):
            raise TrainingInterrupted(
                f"{run.stop.reason}: checkpointed at the end of epoch {epoch}; run the "
                f"same command to resume"
            )
    if trained_last:
        measure_latents(run)
    accelerator.wait_for_everyone()
    return cfg.run_dir


def unevaluated_epoch(
    state: TrainState, device: torch.device
) -> tuple[int, dict[str, torch.Tensor], float]:
    """The checkpointed epoch still to evaluate: its number, train sums and seconds."""
    record = state.unevaluated
    sums = {
        name: torch.tensor(value, dtype=torch.float64, device=device)
        for name, value in record["sums"].items()
    }
    return record["epoch"], sums, record["seconds"]


def settle_evaluation(run_dir: Path, state: TrainState) -> None:
    """A checkpoint taken before its epoch's evaluation: when `run_dir`'s metrics.jsonl holds
    that evaluation's row (it finished before the process stopped), take what the evaluation
    changed from it (the best value so far, the transport counters) and consider it done."""
    epoch = state.unevaluated["epoch"]
    rows = read_rows(run_dir, METRICS_FILE)
    row = next(
        (r for r in rows if r.get("epoch") == epoch and r.get("global_step") == state.opt_step),
        None,
    )
    if row is None:
        return
    tracking.best_so_far(state, row)
    state.data_retries = row.get("data/retries", state.data_retries)
    state.data_refetched_bytes = row.get("data/refetched_bytes", state.data_refetched_bytes)
    state.unevaluated = {}


def measure_latents(run: Run) -> None:
    """The finished run's latent statistics for diffusion (analysis/latents.py)."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.models.for_eval
    if not cfg.eval.latent_stats_samples or len(model.latent_shape) != 3:
        return
    stats = latent_statistics(
        accelerator, model, run.splits["train"], cfg.run.seed, cfg.eval.latent_stats_samples
    )
    stats["checkpoint_step"] = run.state.opt_step
    if accelerator.is_main_process:
        write_latent_stats(cfg.run_dir, stats)
        accelerator.print(
            f"latents: scaling_factor {stats['scaling_factor']:.5f}, shift_factor "
            f"{stats['shift_factor']:.5f} over {stats['samples']} training images "
            f"({LATENT_STATS_FILE})"
        )
    keys = ("scaling_factor", "shift_factor")
    accelerator.log({f"latents/{k}": stats[k] for k in keys}, step=run.state.opt_step)


def train_one_epoch(run: Run, epoch: int) -> tuple[dict[str, torch.Tensor], float]:
    """Train the epoch's batches from where the state says it stands; returns the epoch's
    sums (over all ranks) and its seconds."""
    cfg, accelerator, state, models = run.cfg, run.accelerator, run.state, run.models
    main, device = accelerator.is_main_process, accelerator.device
    train_data = run.splits["train"]
    record = train_data.position  # set by a mid-epoch checkpoint this run resumed from
    plan, start = train_data.plan(epoch, cfg.train.grad_accum_steps, record)
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
    models.model.train()
    sums = MetricSums.lazy(device)  # named by the objective's terms
    if state.batch_in_epoch > 0 and main:  # resumed mid-epoch: the earlier batches' sums
        sums.load_state_dict(state.epoch_sums)
    steps = plan.steps
    t0 = time.perf_counter()
    batches = train_data.train_batches(epoch, start, plan)
    progress = Progress(
        total=steps, desc=f"epoch {epoch}/{cfg.train.epochs}", mode=cfg.train.progress,
        initial=start, every_steps=cfg.train.log_every_steps, disable=not main,
        final_line=False,  # the epoch's own line follows
    )  # fmt: skip
    # exactly plan.steps - start batches; on a GPU the next one is copied while a step runs
    on_device = DeviceBatches(batches, device, cfg.train.channels_last, cfg.data.binarize)
    with closing(progress):
        train_batches_of_epoch(run, epoch, on_device, start, sums, plan, progress)
    seconds = time.perf_counter() - t0
    models.policy.settle()
    settle_transfers(run)
    models.policy.check_divergence(run.checkpointer.latest)
    return sums.reduce(accelerator), seconds


def train_batches_of_epoch(
    run: Run,
    epoch: int,
    on_device: DeviceBatches,
    start: int,
    sums: MetricSums,
    plan: EpochPlan,
    progress: Progress,
) -> None:
    """The epoch's steps from rank batch `start` on: a step per batch, logs every
    train.log_every_steps optimizer steps, mid-epoch checkpoints."""
    cfg, accelerator, state, models = run.cfg, run.accelerator, run.state, run.models
    for i, (batch, x) in enumerate(on_device, start=start):
        state.skipped_samples += batch["skipped"]
        run.transfers.retries += batch["transfers"]["retries"]
        run.transfers.refetched_bytes += batch["transfers"]["refetched_bytes"]
        state.samples_seen += x.shape[0] * accelerator.num_processes  # every rank's batch is full
        m = models
        out = train_step(
            accelerator, m.model, m.plain, m.optimizer, m.policy, x, cfg, state,
            run.total_steps, m.ema, m.perceptual, m.critic,
        )  # fmt: skip
        sums.add(**batch_sums(out, x.shape[0]))
        progress.update(1, samples=x.shape[0] * accelerator.num_processes)
        if cfg.train.log_sample_keys:
            # the optimizer step this batch counts toward (a checkpoint at step S keeps <= S)
            step = state.opt_step + (0 if out.synced else 1)
            row = {"epoch": epoch, "global_step": step, "keys": batch["key"]}
            append_row(cfg.run_dir, sample_keys_file(accelerator.process_index), row)
        if not out.synced:
            continue
        if state.opt_step % cfg.train.log_every_steps == 0:
            models.policy.settle()  # the device's counters, read at log steps only
            log_step(run, epoch, out, progress)
        if models.policy.counts.consecutive_bad or models.policy.peak_bad:
            models.policy.check_divergence(run.checkpointer.latest)
        if i + 1 < plan.steps:
            mid_epoch_checkpoint(run, epoch, i + 1, sums, plan)


def log_step(run: Run, epoch: int, out: StepOutput, progress: Progress) -> None:
    """A steps.jsonl row and a W&B row: each objective term's mean over all ranks."""
    state = run.state
    means = step_means(out)
    reduced = run.accelerator.reduce(torch.stack(list(means.values())), "mean").tolist()
    step_terms = dict(zip(means, reduced, strict=True))
    progress.set_values(neg_elbo=step_terms["neg_elbo"])
    settle_transfers(run)
    row = {
        "global_step": state.opt_step,
        "epoch": epoch,
        "train/samples_seen": state.samples_seen,
        **{f"train/step_{k}": v for k, v in step_terms.items()},
        "train/kl_weight": out.beta,
        "train/lr": run.models.optimizer.param_groups[0]["lr"],
        "train/grad_norm": float(out.grad_norm),
        "train/skipped_updates": run.models.policy.counts.skipped_updates,
        **transfer_metrics(state),
        **critic_metrics(run.models.critic, out),
    }
    if run.accelerator.is_main_process:
        append_row(run.cfg.run_dir, STEPS_FILE, row)
    run.accelerator.log(row, step=state.opt_step)


def critic_metrics(critic: setup.Critic | None, out: StepOutput) -> dict[str, float]:
    """The discriminator's learning rate, gradient norm and skipped updates (once it trains)."""
    if critic is None:
        return {}
    critic.policy.settle()
    norm = out.critic_grad_norm
    return {
        "train/disc_lr": critic.optimizer.param_groups[0]["lr"] if norm is not None else 0.0,
        "train/disc_grad_norm": float(norm) if norm is not None else 0.0,
        "train/disc_skipped_updates": critic.policy.counts.skipped_updates,
    }


def mid_epoch_checkpoint(
    run: Run, epoch: int, batch: int, sums: MetricSums, plan: EpochPlan
) -> None:
    """After a stop signal: checkpoint and stop; else every train.checkpoint_every_steps."""
    state, every = run.state, run.cfg.train.checkpoint_every_steps
    stopping = stop_requested(run, every=run.cfg.train.log_every_steps)
    if not (stopping or (every and state.opt_step % every == 0)):
        return
    run.models.policy.settle()
    settle_transfers(run)
    state.epoch, state.batch_in_epoch = epoch, batch
    train_data = run.splits["train"]
    train_data.position = train_data.record(plan, batch)
    state.epoch_sums = sums.state_dict(run.accelerator)
    run.checkpointer.save(state.opt_step)
    if stopping:
        raise TrainingInterrupted(
            f"{run.stop.reason}: checkpointed at step {state.opt_step} (epoch {epoch}, "
            f"batch {batch}); run the same command to resume"
        )


def settle_transfers(run: Run) -> None:
    """Add every rank's transport retries and refetched bytes since the last call to the
    state's totals. Collective: called at the same steps on every rank."""
    pending = run.transfers.take()
    counts = torch.tensor([pending["retries"], pending["refetched_bytes"]], dtype=torch.float64)
    if run.accelerator.num_processes > 1:
        counts = run.accelerator.reduce(counts.to(run.accelerator.device), "sum").cpu()
    retries, refetched = (int(c) for c in counts.tolist())
    run.state.data_retries += retries
    run.state.data_refetched_bytes += refetched


def transfer_metrics(state: TrainState) -> dict[str, int]:
    return {"data/retries": state.data_retries, "data/refetched_bytes": state.data_refetched_bytes}


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


def end_of_epoch(
    run: Run,
    epoch: int,
    totals: dict[str, torch.Tensor],
    seconds: float,
    picture_inputs: torch.Tensor | None,
) -> dict[str, Any]:
    """The epoch's metrics row (train sums, val/test evaluation), logged everywhere, and the
    pictures at picture epochs."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    counts = run.models.policy.counts
    n = totals["count"].item()
    metrics: dict[str, Any] = {
        "epoch": epoch,
        "global_step": state.opt_step,
        **{f"train/{k}": v.item() / n for k, v in totals.items() if k != "count"},
        "train/num_samples": n,
        "train/samples_seen": state.samples_seen,
        "train/bad_steps": counts.bad_steps,
        "train/skipped_updates": counts.skipped_updates,
        "train/forced_updates": counts.forced_updates,
        "train/skipped_samples": state.skipped_samples,
        **transfer_metrics(state),
        "time/epoch_s": seconds,
        "throughput/train_img_per_s": n / max(seconds, 1e-9),
    }
    picture_epoch = epoch in cfg.eval.picture_epochs or epoch == cfg.train.epochs
    eval_model = run.models.for_eval
    # rFID (Inception at 299 px on every image twice) at the last epoch only
    last = epoch == cfg.train.epochs
    nets = PerceptionNets(run.nets.lpips, run.nets.inception if last else None)
    if epoch % cfg.eval.every_epochs == 0 or epoch == cfg.train.epochs:
        for name in ("val", "test"):
            if name in run.splits:
                # refinement costs ~100 evaluations: test split, picture epochs only
                refine = cfg.eval.refine_steps if name == "test" and picture_epoch else 0
                options = EvalOptions(
                    cfg.run.seed, cfg.data.binarize, refine_steps=refine, nets=nets
                )
                metrics.update(evaluate_split(accelerator, eval_model, run.splits[name], options))
    for name in ("val", "test"):  # the run's transport totals count evaluation's reads too
        state.data_retries += metrics.get(f"{name}/data_retries", 0)
        state.data_refetched_bytes += metrics.get(f"{name}/data_refetched_bytes", 0)
    metrics.update(transfer_metrics(state))
    metrics.update(tracking.best_so_far(state, metrics))
    if accelerator.is_main_process:
        append_row(cfg.run_dir, METRICS_FILE, metrics)
        accelerator.print(
            f"epoch {epoch}: train/neg_elbo {metrics['train/neg_elbo']:.2f}  "
            f"{summarize({k: v for k, v in metrics.items() if 'train' not in k})}"
            f"  ({seconds:.1f}s)"
        )
        if picture_epoch and state.opt_step >= cfg.loss.kl_warmup_steps:  # judged on the ELBO
            warn_if_collapsed(metrics, eval_model)
        if picture_epoch:
            epoch_pictures(
                accelerator, eval_model, picture_inputs, epoch, cfg, state.opt_step,
                run.splits.get("test"),
            )  # fmt: skip
    accelerator.log(metrics, step=state.opt_step)
    return metrics


def warn_if_collapsed(metrics: dict[str, Any], model: torch.nn.Module) -> None:
    """Posterior collapse is silent in the loss: say so when under 10 % of the latent units
    carry information about the input."""
    dims = int(torch.tensor(model.latent_shape).prod())
    for split in ("test", "val"):
        active = metrics.get(f"{split}/active_units")
        if active is not None:
            break
    else:
        return
    if active >= 0.1 * dims:
        return
    ratio = metrics.get(f"{split}/recon_mse_ratio", float("nan"))
    print(
        f"warning: {active} of {dims} latent units are active on {split} (reconstruction "
        f"MSE {ratio:.2f} x the mean image's): the posterior is collapsing and the "
        f"reconstructions barely follow their inputs. Usual remedies: a likelihood that fits "
        f"the pixels (loss.likelihood=logistic or gaussian), a KL warm-up "
        f"(loss.kl_warmup_steps), free bits (loss.free_bits), a smaller KL weight "
        f"(loss.beta < 1, no longer an ELBO), or a lower train.lr"
    )
