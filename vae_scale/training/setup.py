"""Everything the loop needs before its first step: the Accelerator, the data splits, the
model with its optimizer and EMA, the run's config record and W&B."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

from vae_scale.config import Config
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import ConfigError, DataError
from vae_scale.losses import build_likelihood, likelihood_convention
from vae_scale.models import VAE, build_model
from vae_scale.models.base import check_single_latent
from vae_scale.objectives.adversarial import LeCam, PatchDiscriminator
from vae_scale.perception.lpips import LPIPS, MIN_SIDE
from vae_scale.training import tracking
from vae_scale.training.ema import EMA
from vae_scale.training.optim import UpdatePolicy, build_optimizer, use_fused
from vae_scale.training.signals import ignore_stop_signals
from vae_scale.utils.compat import cpu_has_fast_bf16, uncompiled
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
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="wandb" if wandb_mode != "disabled" else None,
        project_dir=str(cfg.run_dir),
        dynamo_plugin=TorchDynamoPlugin(
            backend="inductor" if cfg.train.compile else "no", mode=cfg.train.compile_mode
        ),
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.ddp_timeout_s))
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
        if train.has(name) and name not in cfg.data.train_splits:
            split = ShardSplit(cfg.shard_dir, name, cfg.data, **common)
            if checked_for_evaluation(split, cfg, accelerator):
                splits[name] = split
    train.check_enough_shards()
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
            f"{split.split} shards of {split.shard_dir} are damaged ({listed}); re-shard "
            f"(`vae-scale shard ... --force`), or set data.on_error=skip to evaluate without them"
        )
    split.leave_out(set(damaged))
    left = f"{split.num_samples} samples left" if split.shards else "not evaluated"
    accelerator.print(
        f"warning: {split.split}: leaving out damaged shards ({listed}), data.on_error=skip; {left}"
    )
    return bool(split.shards)


@dataclass
class Critic:
    """The adversarial objective's discriminator, trained beside the model with its own
    optimizer and update policy (loss.adversarial): inactive before its start_step."""

    model: torch.nn.Module  # prepared (DDP): its gradients are all-reduced
    plain: PatchDiscriminator
    optimizer: torch.optim.Optimizer
    policy: UpdatePolicy
    lecam: LeCam
    start_step: int


@dataclass
class Models:
    """The trained model in its three wrappings, its optimizer, and the EMA of its weights;
    for the autoencoder objective also the frozen LPIPS network and the discriminator."""

    model: torch.nn.Module  # prepared: DDP and/or torch.compile around the VAE
    plain: VAE  # the bare VAE inside (its parameters are the trained ones)
    optimizer: torch.optim.Optimizer
    policy: UpdatePolicy  # what an update does with skips and non-finite gradients
    ema: EMA | None
    core: torch.nn.Module  # unwrapped from DDP, possibly still compiled
    perceptual: LPIPS | None = None  # frozen: not prepared, not checkpointed
    critic: Critic | None = None

    @property
    def for_eval(self) -> VAE:
        """What evaluation and pictures use: the EMA when kept, never the compiled wrapper."""
        return self.plain if self.ema is None else self.ema.module


def build_models(cfg: Config, accelerator: Accelerator, image_shape: tuple[int, ...]) -> Models:
    def fresh() -> VAE:
        return build_model(
            cfg.model, image_shape, build_likelihood(cfg.loss.likelihood, image_shape)
        )

    model = fresh()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.trainable == "decoder":
        for p in model.encoder_parameters():
            p.requires_grad_(False)
    fused = use_fused(cfg.train, accelerator.device)
    optimizer = build_optimizer(model, cfg.train, fused)
    # fused AdamW reads a skip decision on the device; fp16's GradScaler decides itself
    on_device = fused and cfg.train.mixed_precision != "fp16"
    policy = UpdatePolicy(cfg.train, on_device, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)  # the loader is never prepared
    # prepared second: a checkpoint's model_1 / optimizer_1
    critic = build_critic(cfg, accelerator, image_shape, on_device)
    core = accelerator.unwrap_model(model)
    plain = uncompiled(core)
    check_capabilities(plain, cfg)
    ema = None
    if cfg.train.ema_decay > 0:  # built fresh: no DDP, compile or autocast wrappers
        shadow = fresh()
        shadow.load_state_dict(plain.state_dict())
        fmt = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        ema = EMA(shadow.to(accelerator.device, memory_format=fmt), cfg.train.ema_decay)
    perceptual = None
    if cfg.loss.objective == "autoencoder" and cfg.loss.perceptual.weight:
        if min(image_shape[1:]) < MIN_SIDE:
            raise ConfigError(
                f"loss.perceptual.weight: LPIPS-VGG needs images of at least {MIN_SIDE}x"
                f"{MIN_SIDE}; these are {image_shape[1]}x{image_shape[2]} (set it to 0)"
            )
        perceptual = LPIPS.pretrained(cfg.run.weights_dir).to(accelerator.device)
    return Models(model, plain, optimizer, policy, ema, core, perceptual, critic)


def build_critic(
    cfg: Config, accelerator: Accelerator, image_shape: tuple[int, ...], on_device: bool
) -> Critic | None:
    """The discriminator, its AdamW (loss.adversarial's lr, betas, schedule) and update policy
    (train's clipping and skip rules), prepared like the model; None without one."""
    adv = cfg.loss.adversarial
    if cfg.loss.objective != "autoencoder" or not adv.weight:
        return None
    side = min(image_shape[1:])
    if side // 2**adv.layers < 3:  # then two stride-1 4x4 convs leave no patch
        raise ConfigError(
            f"loss.adversarial.layers: {adv.layers} halvings leave no patch of a "
            f"{side}-pixel image; use at most {max(1, (side // 3).bit_length() - 1)}"
        )
    plain = PatchDiscriminator(image_shape[0], adv)
    if cfg.train.channels_last:
        plain = plain.to(memory_format=torch.channels_last)
    rules = cfg.train.model_copy(
        update={"lr": adv.lr, "betas": adv.betas, "weight_decay": 0.0,
                "lr_schedule": adv.lr_schedule, "warmup_steps": 0}
    )  # fmt: skip
    optimizer = build_optimizer(plain, rules, use_fused(cfg.train, accelerator.device))
    model, optimizer = accelerator.prepare(plain, optimizer)
    policy = UpdatePolicy(rules, on_device, accelerator.device)
    lecam = LeCam(adv.lecam_decay, accelerator.device)
    return Critic(model, plain, optimizer, policy, lecam, adv.start_step)


def check_capabilities(model: VAE, cfg: Config) -> None:
    """Refuse settings the model family cannot serve, naming the key."""
    needs_single_latent = {
        "eval.refine_steps": (cfg.eval.refine_steps, "posterior refinement"),
        "loss.encoder_aug.weight": (cfg.loss.encoder_aug.weight, "encoder augmentation"),
        "loss.z_samples": (cfg.loss.z_samples > 1, "several posterior draws per image"),
    }
    for key, (asked, feature) in needs_single_latent.items():
        if asked:
            check_single_latent(model, key, feature)


def steps_per_epoch(cfg: Config, train_data: ShardSplit, world_size: int) -> int:
    """Batches each rank trains per full epoch: whole accumulation cycles only, so every epoch
    ends on an optimizer step."""
    accum = cfg.train.grad_accum_steps
    steps = train_data.steps_in_epoch(multiple=accum)
    if steps == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} x {accum} accumulation steps x "
            f"{world_size} processes is more than one epoch of {train_data.num_samples} "
            f"training samples holds"
        )
    return steps


def record_run(
    cfg: Config,
    accelerator: Accelerator,
    models: Models,
    train_data: ShardSplit,
    steps: int,
    command: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """The run's config.json (main process; {} elsewhere): the resolved config and the facts
    of this run (what trained it, where, on how many processes and machines)."""
    if not accelerator.is_main_process:
        return {}
    global_batch = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
    index = train_data.index or {"image_shape": list(train_data.image_shape), "splits": {}}
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
        "num_parameters": sum(p.numel() for p in models.core.parameters()),
        # what the nats of */neg_elbo and */recon measure (bce_grey, bce_binarized, ...)
        "likelihood_convention": likelihood_convention(cfg.loss.likelihood, cfg.data.binarize),
    }
    if write:
        write_json_atomic(Path(cfg.run_dir) / "config.json", run_config, indent=1, default=str)
    accelerator.print(
        f"{cfg.run.name}: {run_config['num_parameters']:,} parameters, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, global batch "
        f"{global_batch}, {steps} batches/epoch"
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
