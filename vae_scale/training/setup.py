"""Everything the loop needs before its first step (`start_run`): the Accelerator, the run
folder and the checkpoint to resume, the data splits, the objective and the networks it trains,
the run's config record and W&B."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin, set_seed
from torch import nn

from vae_scale.config import Config
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.data.streaming.remote import TransferStats
from vae_scale.errors import ConfigError, DataError
from vae_scale.losses import likelihood_convention
from vae_scale.models.base import check_single_latent
from vae_scale.objectives import Objective, build_objective
from vae_scale.run_files.logs import (
    METRICS_FILE,
    STEPS_FILE,
    read_run_record,
    sample_keys_file,
    truncate_logs,
)
from vae_scale.training import process_group, tracking
from vae_scale.training.checkpoint import Checkpointer
from vae_scale.training.evaluation import EpochEvaluation
from vae_scale.training.init_from import initialize
from vae_scale.training.networks import TrainedNetwork, build_networks
from vae_scale.training.run_folder import RunLock, check_same_run
from vae_scale.training.signals import StopFlag, ignore_stop_signals
from vae_scale.training.state import TrainState
from vae_scale.utils.compat import cpu_has_fast_bf16
from vae_scale.utils.fsutil import write_json_atomic


def make_accelerator(cfg: Config, wandb_mode: str) -> Accelerator:
    use_cpu = cfg.train.cpu or not torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and use_cpu:
        raise ConfigError("train.mixed_precision: 'fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    if cfg.train.mixed_precision == "bf16" and use_cpu and not cpu_has_fast_bf16():
        # oneDNN then emulates bf16 convolutions: several times slower than fp32.
        warnings.warn(
            "train.mixed_precision: 'bf16' on a CPU without AVX-512 (no oneDNN bf16 kernels) is "
            "several times slower than fp32; use 'no' on this machine",
            stacklevel=2,
        )
    # cpu=True also matters under `accelerate launch --multi_gpu` on a CPU machine: without it
    # every process believes it is rank 0 of 1 (same data, no gradient sync, no error).
    train = cfg.train
    return process_group.join(
        lambda: _accelerator(cfg, wandb_mode, use_cpu),
        use_cpu,
        train.connect_timeout_s,
        train.ddp_timeout_s,
    )


def _accelerator(cfg: Config, wandb_mode: str, use_cpu: bool) -> Accelerator:
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_batches,
        log_with="wandb" if wandb_mode != "disabled" else None,
        project_dir=str(cfg.run_dir),
        dynamo_plugin=TorchDynamoPlugin(
            backend="inductor" if cfg.train.compile else "no", mode=cfg.train.compile_mode
        ),
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.connect_timeout_s))
        ],
    )


def agree(accelerator: Accelerator, refusal: Exception | None) -> None:
    """Raise on every rank when any rank refuses to start (a refusal on one rank alone would
    leave the others waiting at the next collective)."""
    failed = refusal is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(failed), device=accelerator.device)
        failed = accelerator.reduce(flag, "max").item() > 0
    if failed:
        raise refusal or ConfigError("another process refused to start this run (see its error)")


def open_splits(cfg: Config, accelerator: Accelerator) -> dict[str, ShardSplit]:
    """The training split (data.train_splits read as one) and val/test where they exist and
    are not trained on."""
    common: dict[str, Any] = dict(
        seed=cfg.run.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        worker_init=ignore_stop_signals,  # the main process alone stops (and checkpoints)
    )
    trained = "+".join(cfg.data.train_splits)
    # training reads images only (labels and JSON undecoded); val/test keep labels for the
    # pictures that colour latents by class
    train = ShardSplit(cfg.shard_dir, trained, cfg.data, shuffle=True, labels=False, **common)
    splits = {"train": train}
    for name in ("val", "test"):
        if train.catalog.has(name) and name not in cfg.data.train_splits:
            split = ShardSplit(cfg.shard_dir, name, cfg.data, **common)
            if checked_for_evaluation(split, cfg, accelerator):
                splits[name] = split
    train.catalog.check_enough_shards()
    return splits


def checked_for_evaluation(split: ShardSplit, cfg: Config, accelerator: Accelerator) -> bool:
    """A split training only evaluates, its local shards verified before epoch 1: damaged
    ones are an error now (not after an epoch of training), or with data.on_error=skip left
    out with a warning; False when none is left (the split is then not evaluated)."""
    if not cfg.data.verify_shards:
        return True
    damaged = split.damaged_local_shards()
    if not damaged:
        return True
    listed = "; ".join(f"{name}: {why}" for name, why in sorted(damaged.items()))
    if cfg.data.on_error != "skip":
        raise DataError(
            f"{split.split} shards of {split.catalog.location} are damaged ({listed}); re-shard "
            f"(`vae-scale shard ... --force`), or set data.on_error=skip to evaluate without them"
        )
    split.catalog.leave_out(set(damaged))
    left = f"{split.num_samples} samples left" if split.catalog.shards else "not evaluated"
    accelerator.print(
        f"warning: {split.split}: leaving out damaged shards ({listed}), data.on_error=skip; {left}"
    )
    return bool(split.catalog.shards)


def batches_per_epoch(cfg: Config, train_data: ShardSplit, world_size: int) -> int:
    """Batches each rank trains per full epoch: whole optimizer steps only (multiples of
    train.grad_accum_batches), so every epoch ends on an optimizer step."""
    accum = cfg.train.grad_accum_batches
    batches = train_data.planner.batches_in_epoch(multiple=accum)
    if batches == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} x {accum} batches per step x "
            f"{world_size} processes is more than one epoch of {train_data.num_samples} "
            f"training samples holds"
        )
    return batches


def record_run(
    cfg: Config,
    accelerator: Accelerator,
    vae: nn.Module,
    train_data: ShardSplit,
    batches: int,
    command: str | None = None,
    write: bool = True,
    warm_start: dict[str, Any] | None = None,
    init_from: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's config.json (main process; {} elsewhere): the resolved config and the facts
    of this run (what trained it, where, on how many processes and machines, the checkpoint
    of another run it started from, the weights model.init_from loaded: kept by every later
    start)."""
    if not accelerator.is_main_process:
        return {}
    global_batch = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum_batches
    index = train_data.catalog.index or {"image_shape": list(train_data.image_shape), "splits": {}}
    index_summary = {k: v for k, v in index.items() if k != "splits"}
    index_summary["splits"] = {k: v["num_samples"] for k, v in index["splits"].items()}
    index_summary["image_shape"] = list(train_data.image_shape)
    run_config = {
        **cfg.to_dict(),
        "git_commit": tracking.git_commit(),
        "git_dirty": tracking.git_dirty(),
        "command": command,
        "dataset_index": index_summary,
        "global_batch_size": global_batch,
        "num_processes": accelerator.num_processes,
        **tracking.cluster_facts(accelerator.num_processes),
        "num_parameters": sum(p.numel() for p in vae.parameters()),
        # what the nats of */neg_elbo and */recon measure (bce_grey, bce_binarized, ...)
        "likelihood_convention": likelihood_convention(cfg.loss.likelihood, cfg.data.binarize),
    }
    path = Path(cfg.run_dir) / "config.json"
    before = read_run_record(cfg.run_dir) if path.is_file() else {}
    for key, fact in (("warm_start", warm_start), ("init_from", init_from)):
        fact = fact if fact is not None else before.get(key)
        if fact is not None:
            run_config[key] = fact
    if write:
        write_json_atomic(path, run_config, indent=1, default=str)
    accelerator.print(
        f"{cfg.run.name}: {run_config['num_parameters']:,} parameters, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, global batch "
        f"{global_batch} per optimizer step, {batches} batches/epoch"
    )
    return run_config


def start_tracking(
    cfg: Config, accelerator: Accelerator, run_config: dict[str, Any], wandb_mode: str
) -> None:
    """W&B through Accelerate's tracker (main process only; `disabled` starts nothing)."""
    if wandb_mode == "disabled":
        return
    main = accelerator.is_main_process
    tags = [cfg.data.dataset, cfg.model.name, cfg.loss.likelihood]
    accelerator.init_trackers(
        cfg.wandb.project,
        config=run_config or None,
        init_kwargs=tracking.init_kwargs(cfg, cfg.run_dir, wandb_mode, tags) if main else {},
    )
    if main:
        tracking.define_metrics(accelerator.get_tracker("wandb", unwrap=True))


@dataclass
class StartRequest:
    """How a run is asked to start: `resume` 'auto', 'none' or a checkpoint folder (of another
    run folder only with `from_another_run`); `restart_epoch`: a checkpoint inside an epoch
    whose shards have changed since starts that epoch over; `command`: the command line
    (recorded with the run); `wandb_mode` as tracking.resolve_mode chose it."""

    resume: str = "auto"
    command: str | None = None
    from_another_run: bool = False
    restart_epoch: bool = False
    wandb_mode: str = "disabled"


@dataclass
class Run:
    """What the loop's pieces share."""

    cfg: Config
    accelerator: Accelerator
    splits: dict[str, ShardSplit]
    objective: Objective
    nets: dict[str, TrainedNetwork]  # what the objective trains, the exported network first
    checkpointer: Checkpointer
    evaluation: EpochEvaluation
    state: TrainState
    total_steps: int  # optimizer steps of the whole run (the lr schedule's length)
    stop: StopFlag
    first_epoch: int  # the first epoch this process trains (its plan is printed)
    # this rank's transport retries and refetched bytes since they were last added to `state`
    transfers: TransferStats = field(default_factory=TransferStats)
    vae: TrainedNetwork = field(init=False)  # the network a run exports and evaluates

    def __post_init__(self) -> None:
        self.vae = next(iter(self.nets.values()))  # the objective's first

    def settle_transfers(self) -> None:
        """Add every rank's transport retries and refetched bytes since the last call to the
        state's totals. Collective: called at the same steps on every rank."""
        pending = self.transfers.take()
        counts = torch.tensor([pending["retries"], pending["refetched_bytes"]], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            counts = self.accelerator.reduce(counts.to(device), "sum").cpu()
        retries, refetched = (int(c) for c in counts.tolist())
        self.state.data_retries += retries
        self.state.data_refetched_bytes += refetched


def start_run(
    cfg: Config, accelerator: Accelerator, stop: StopFlag, lock: RunLock, request: StartRequest
) -> Run:
    """Lock the run folder, choose what to resume, build data, objective and networks, restore
    the checkpoint, record the run and start W&B. A start that fails leaves no run folder
    behind that it created."""
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
        agree(accelerator, refusal)
        checkpointer = Checkpointer(accelerator, run_dir, cfg.train)
        resume_from = checkpointer.find(request.resume, request.from_another_run)
        if resume_from is not None:
            check_same_run(cfg, run_dir)
        else:  # a fresh start: no rows of an attempt that died before its first checkpoint
            logs = (sample_keys_file(accelerator.process_index),)
            truncate_logs(run_dir, 0, (METRICS_FILE, STEPS_FILE, *logs) if main else logs)
        set_seed(cfg.run.seed)  # identical initial weights on every rank
        splits = open_splits(cfg, accelerator)
        train_data = splits["train"]
        objective, nets = build_training(
            cfg, accelerator, train_data.image_shape, fresh=resume_from is None
        )
        batches = batches_per_epoch(cfg, train_data, accelerator.num_processes)
        state = TrainState()
        components = {"train_state": state, "train_data": train_data.planner}
        for net in nets.values():
            components.update(net.components())
        checkpointer.components = {**components, **objective.components()}
        train_data.planner.restart_epoch = request.restart_epoch
        evaluation = EpochEvaluation(cfg, accelerator, splits, objective)
        evaluation.open_networks()  # before the restore: it draws from the random generators
        if resume_from is not None:
            restore(checkpointer, resume_from, nets, train_data, state)
        state.started_at = state.started_at or time.time()  # goodput's clock: the first start
        if state.unevaluated:  # the metrics of the run the checkpoint was written by
            evaluation.settle(resume_from.parent.parent, state)
        # a run with nothing left to train keeps its record as it is, and opens W&B only for
        # what a kill after its last metrics row left out (W&B rows, pictures, latent stats)
        finished = state.epoch > cfg.train.epochs and not state.unevaluated
        first = next(iter(nets.values()))
        lacking = evaluation.missing(state, first) if resume_from is not None else []
        warm_start = None
        if resume_from is not None and resume_from.resolve().parent.parent != run_dir.resolve():
            warm_start = {"checkpoint": str(resume_from.resolve()), "step": state.opt_step}
        run_config = record_run(
            cfg, accelerator, first.unwrapped, train_data, batches, request.command,
            write=not finished, warm_start=warm_start, init_from=objective.init_from,
        )  # fmt: skip
        quiet = finished and not lacking
        if quiet and tracking.rows_missing(cfg, run_dir, request.wandb_mode, state.opt_step):
            quiet = False
        mode = "disabled" if quiet else request.wandb_mode
        start_tracking(cfg, accelerator, run_config, mode)
        if resume_from is not None and main and mode != "disabled":
            replayed, held = tracking.replay_missing_rows(accelerator, run_dir, state.opt_step)
            if replayed:
                accelerator.print(
                    f"W&B: its history ended at step {held} (the rest was lost with the stopped "
                    f"process): {replayed} rows replayed from the run folder's logs"
                )
        if lacking:
            evaluation.catch_up(state, first, lacking)
    except BaseException:
        if created and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    total_steps = batches * cfg.train.epochs // cfg.train.grad_accum_batches
    return Run(
        cfg,
        accelerator,
        splits,
        objective,
        nets,
        checkpointer,
        evaluation,
        state,
        total_steps,
        stop,
        state.epoch,
    )


def build_training(
    cfg: Config, accelerator: Accelerator, image_shape: tuple[int, int, int], fresh: bool = True
) -> tuple[Objective, dict[str, TrainedNetwork]]:
    """The objective `cfg` names and every network it trains, prepared: fresh weights, or
    (`fresh` and model.init_from) those of an existing autoencoder, which
    `objective.init_from` then records."""
    objective = build_objective(cfg, image_shape, accelerator)
    if cfg.eval.refine_steps:
        check_single_latent(objective.vae, "eval.refine_steps", "posterior refinement")
    source = getattr(cfg.model, "init_from", None)
    if fresh and source:  # before the networks are prepared: the EMA starts from these
        objective.init_from = initialize(objective.vae, source)
    return objective, build_networks(accelerator, objective, cfg.train)


def restore(
    checkpointer: Checkpointer,
    path: Path,
    nets: dict[str, TrainedNetwork],
    train_data: ShardSplit,
    state: TrainState,
) -> None:
    """Load checkpoint `path` into the networks and components, and say what changed since."""
    missing = checkpointer.restore(path)
    note_layout_change(checkpointer.accelerator, train_data, state)
    for net in nets.values():
        if net.ema is not None and net.state_names[1] in missing:
            net.ema.start_from(net.unwrapped)  # EMA switched on since: from the loaded weights
    checkpointer.accelerator.print(
        f"resumed from {path} (epoch {state.epoch}, batch {state.batch_in_epoch}, step "
        f"{state.opt_step})"
    )


def note_layout_change(accelerator: Accelerator, train_data: ShardSplit, state: TrainState) -> None:
    """Say how the training shards changed since the checkpoint, and what happens to the epoch
    it stopped in (re-planned, or started over with --restart-epoch)."""
    planner = train_data.planner
    change = planner.layout_change
    if change is None:
        return
    if state.batch_in_epoch and planner.position is None:  # --restart-epoch
        then = f"epoch {state.epoch} starts over on the current shards"
        state.batch_in_epoch, state.epoch_sums = 0, {}
    elif state.batch_in_epoch:
        then = f"the rest of epoch {state.epoch} is re-planned onto them, each sample once"
    else:
        then = "the next epochs are planned on the current shards"
    accelerator.print(
        f"the training shards changed since the checkpoint ({change.describe()}): {then}"
    )
