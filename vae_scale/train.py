"""The one training loop: every dataset and model, 1 process or N, through Accelerate."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from einops import repeat
from tqdm.auto import tqdm

from vae_scale import checkpoint, pictures, tracking
from vae_scale.augment import Deformation, encoder_augmentation_terms
from vae_scale.config import Config, ConfigError
from vae_scale.data.loader import ShardSplit, derive_seed
from vae_scale.ema import EMA_FILE, ema_tensors, load_ema, make_ema
from vae_scale.evaluate import (
    evaluate_split,
    first_images,
    prepare_inputs,
    summarize,
)
from vae_scale.losses import ELBOTerms, build_likelihood, kl_weight, neg_elbo
from vae_scale.models import VAE, build_model
from vae_scale.models.base import check_single_latent
from vae_scale.signals import StopFlag, TrainingInterrupted

METRICS_FILE = "metrics.jsonl"  # one row per epoch
STEPS_FILE = "steps.jsonl"  # one row every train.log_every_steps optimizer steps


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite for `train.max_bad_steps` steps in a row."""


def lr_at(step: int, cfg: Config, total_steps: int) -> float:
    """Learning rate as a pure function of the optimizer step (so resume needs no scheduler
    state and N processes follow the same schedule as 1)."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has bf16 kernels for this CPU (AVX-512 or newer, e.g. AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: assume fast rather than nag
        return True


def make_accelerator(cfg: Config, wandb_mode: str) -> Accelerator:
    use_cpu = cfg.train.cpu or not torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and use_cpu:
        raise ConfigError("train.mixed_precision: 'fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    if cfg.train.mixed_precision == "bf16" and use_cpu and not cpu_has_fast_bf16():
        # oneDNN then emulates bf16 convolutions: ~8x slower than fp32 on our AVX2 dev CPU.
        warnings.warn(
            "train.mixed_precision: 'bf16' on a CPU without AVX-512 (no oneDNN bf16 kernels) is "
            "several times slower than fp32; use 'no' on this machine",
            stacklevel=2,
        )
    # cpu=True also matters under `accelerate launch --multi_gpu` on a CPU machine: without it
    # every process believes it is rank 0 of 1 (see docs/known-traps).
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="wandb" if wandb_mode != "disabled" else None,
        project_dir=str(cfg.run_dir),
        dynamo_backend="inductor" if cfg.train.compile else "no",
    )


def open_splits(cfg: Config, accelerator: Accelerator) -> dict[str, ShardSplit]:
    common: dict[str, Any] = dict(
        shard_dir=cfg.shard_dir,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.run.seed,
        on_error=cfg.data.on_error,
        cache_in_memory=cfg.data.cache_in_memory,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    splits = {
        "train": ShardSplit(
            split="+".join(cfg.data.train_splits),
            shuffle=True,
            shuffle_buffer=cfg.data.shuffle_buffer,
            verify=cfg.data.verify_shards and accelerator.is_local_main_process,
            **common,
        ),
    }
    for name in ("val", "test"):
        if name in splits["train"].index["splits"] and name not in cfg.data.train_splits:
            splits[name] = ShardSplit(split=name, **common)
    splits["train"].check_enough_shards()
    return splits


def train(cfg: Config, resume: str = "auto") -> Path:
    """Train `cfg`; returns the run folder. `resume`: 'auto', 'none' or a checkpoint path."""
    run_dir = cfg.run_dir
    wandb_mode = tracking.resolve_mode(cfg.wandb.mode)
    accelerator = make_accelerator(cfg, wandb_mode)
    try:
        with StopFlag() as stop:
            return _train(cfg, accelerator, run_dir, wandb_mode, resume, stop)
    finally:
        # A clean process-group teardown, also on errors (rank 0 otherwise may abort); then
        # forget Accelerate's process-wide singletons so another train() call in this process
        # (tests, notebooks, sweeps) can choose its own precision and device.
        accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _find_resume_point(run_dir: Path, resume: str) -> Path | None:
    ckpt_root = run_dir / "checkpoints"
    if resume == "none":
        if checkpoint.latest_checkpoint(ckpt_root) is not None:
            raise ConfigError(
                f"--resume none: {run_dir} already holds checkpoints; pass "
                f"--resume auto to continue it, or choose another run.name"
            )
        return None
    if resume == "auto":
        return checkpoint.latest_checkpoint(ckpt_root, verify_hashes=True)
    path = Path(resume)
    if not checkpoint.is_complete(path, verify_hashes=True):
        raise ConfigError(
            f"--resume {path}: not a complete checkpoint folder (no valid {checkpoint.MANIFEST})"
        )
    return path


def _truncate_logs(run_dir: Path, opt_step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be redone)."""
    for name in (METRICS_FILE, STEPS_FILE):
        path = run_dir / name
        if path.is_file():
            rows = path.read_text().splitlines()
            kept = [r for r in rows if r and json.loads(r)["global_step"] <= opt_step]
            path.write_text("".join(r + "\n" for r in kept))


def _stop_requested(accelerator: Accelerator, stop: StopFlag) -> bool:
    """True on every rank when any rank received a stop signal."""
    flag = float(stop.received is not None)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(torch.tensor(flag, device=accelerator.device), "max").item()
    return flag > 0


def _train(
    cfg: Config,
    accelerator: Accelerator,
    run_dir: Path,
    wandb_mode: str,
    resume: str,
    stop: StopFlag,
) -> Path:
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    resume_from = _find_resume_point(run_dir, resume)

    set_seed(cfg.run.seed)  # identical initial weights on every rank
    splits = open_splits(cfg, accelerator)
    train_data = splits["train"]
    image_shape = train_data.image_shape
    model = build_model(cfg.model, image_shape, build_likelihood(cfg.loss.likelihood, image_shape))
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # AdamW: decoupled weight decay (VDVAE's; with weight_decay 0 it is exactly Adam)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        betas=tuple(cfg.train.betas),
        weight_decay=cfg.train.weight_decay,
    )
    model, optimizer = accelerator.prepare(model, optimizer)  # the loader is never prepared
    core = accelerator.unwrap_model(model)
    device = accelerator.device
    plain = getattr(core, "_orig_mod", core)  # without the torch.compile wrapper
    ema = None
    if cfg.train.ema_decay > 0:  # built fresh: no DDP, compile or autocast wrappers
        shadow = build_model(
            cfg.model, image_shape, build_likelihood(cfg.loss.likelihood, image_shape)
        )
        shadow.load_state_dict(plain.state_dict())
        fmt = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        ema = make_ema(shadow.to(device, memory_format=fmt), cfg.train.ema_decay)
    # What evaluation and pictures use (never the compiled wrapper: eval shapes differ).
    eval_model = plain if ema is None else ema.module
    groups = core.latent_group_names  # KLs logged one by one (hierarchical models)
    if cfg.eval.refine_steps:
        check_single_latent(core, "eval.refine_steps", "posterior refinement")
    if cfg.loss.encoder_aug_weight:
        check_single_latent(core, "loss.encoder_aug_weight", "encoder augmentation")
    if cfg.loss.z_samples > 1:
        check_single_latent(core, "loss.z_samples", "several posterior draws per image")
    n_sums = 4 + len(groups)

    accum = cfg.train.grad_accum_steps
    # Whole accumulation cycles only, so every epoch ends on an optimizer step.
    steps_in = {
        e: train_data.steps_in_epoch(e) // accum * accum for e in range(1, cfg.train.epochs + 1)
    }
    if steps_in[1] == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} x {accum} accumulation steps is more than "
            f"one {accelerator.num_processes}-process epoch of {train_data.num_samples} "
            f"training samples holds"
        )
    total_opt_steps = sum(steps_in.values()) // accum

    # What a resumed run needs beyond model/optimizer/scaler/RNG (save_state keeps those);
    # `epoch_sums`: the current epoch's metric sums so far, summed over ranks.
    state: dict[str, Any] = {
        "epoch": 1,
        "batch_in_epoch": 0,
        "opt_step": 0,
        "bad_steps": 0,
        "consecutive_bad": 0,
        "skipped_samples": 0,
        "skipped_updates": 0,  # gradient-norm spikes skipped (train.skip_threshold)
        "consecutive_skips": 0,
        "forced_updates": 0,  # applied after max_consecutive_skips skips in a row
        "ema_updates": 0,
        "epoch_sums": [0.0] * n_sums,
    }
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state.update(checkpoint.read_train_state(resume_from))
        if ema is not None and not load_ema(ema, resume_from, state["ema_updates"]):
            ema.n_averaged.zero_()  # EMA newly switched on: start from the loaded weights
            ema.update_parameters(core)
        if main:
            _truncate_logs(run_dir, state["opt_step"])
        accelerator.print(
            f"resumed from {resume_from} (epoch {state['epoch']}, batch "
            f"{state['batch_in_epoch']}, step {state['opt_step']})"
        )

    global_batch = cfg.data.batch_size * accelerator.num_processes * accum
    if main:
        index_summary = {k: v for k, v in train_data.index.items() if k != "splits"}
        index_summary["splits"] = {
            k: v["num_samples"] for k, v in train_data.index["splits"].items()
        }
        run_config = {
            **cfg.to_dict(),
            "git_commit": tracking.git_commit(),
            "dataset_index": index_summary,
            "global_batch_size": global_batch,
            "num_processes": accelerator.num_processes,
            "num_parameters": sum(p.numel() for p in core.parameters()),
        }
        (run_dir / "config.json").write_text(json.dumps(run_config, indent=1, default=str))
        accelerator.print(
            f"{cfg.run.name}: {run_config['num_parameters']:,} parameters, "
            f"{accelerator.num_processes} process(es) on {device}, global batch "
            f"{global_batch}, {steps_in[1]} batches/epoch, wandb {wandb_mode}"
        )
    if wandb_mode != "disabled":
        tags = [cfg.data.dataset, cfg.model.name, cfg.loss.likelihood]
        accelerator.init_trackers(
            cfg.wandb.project,
            config=run_config if main else None,
            init_kwargs=tracking.init_kwargs(cfg, run_dir, wandb_mode, tags) if main else {},
        )

    picture_inputs = None
    if main and "test" in splits:
        picture_inputs = first_images(splits["test"], cfg.eval.recon_rows)
    ckpt_root = run_dir / "checkpoints"

    def save(epoch: int, batch_in_epoch: int, sums: torch.Tensor | None = None) -> None:
        epoch_sums = [0.0] * n_sums
        if sums is not None:  # mid-epoch: keep what the epoch's metrics have summed so far
            epoch_sums = accelerator.reduce(sums.clone(), reduction="sum").tolist()
        state.update(epoch=epoch, batch_in_epoch=batch_in_epoch, epoch_sums=epoch_sums)
        extra = None
        if ema is not None:
            state["ema_updates"] = int(ema.n_averaged)
            extra = {EMA_FILE: ema_tensors(ema)} if main else None
        checkpoint.save_checkpoint(
            accelerator,
            ckpt_root,
            state["opt_step"],
            dict(state),
            cfg.train.keep_checkpoints,
            extra,
        )

    for epoch in range(state["epoch"], cfg.train.epochs + 1):
        start = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        if start == 0:
            # Each rank its own noise stream, a pure function of (seed, epoch, rank); a
            # mid-epoch resume continues the stream restored by load_state instead.
            torch.manual_seed(derive_seed(cfg.run.seed, "noise", epoch, accelerator.process_index))
        model.train()
        sums = torch.zeros(n_sums, dtype=torch.float64, device=device)
        if start > 0 and main:  # resumed mid-epoch: the global sums of the earlier batches
            sums += torch.tensor(state["epoch_sums"], dtype=torch.float64, device=device)
        steps = steps_in[epoch]
        t0 = time.perf_counter()
        batches = train_data.train_batches(epoch, start)
        progress = tqdm(
            batches,
            total=steps,
            initial=start,
            disable=not main,
            desc=f"epoch {epoch}/{cfg.train.epochs}",
            leave=False,
        )
        for i, batch in enumerate(progress, start=start):
            if i >= steps:
                break
            x = prepare_inputs(batch["image"], device, cfg.data.binarize)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            state["skipped_samples"] += batch["skipped"]
            with accelerator.accumulate(model):
                beta = kl_weight(
                    state["opt_step"], cfg.loss.beta, cfg.loss.kl_warmup_steps, cfg.loss.beta_start
                )
                terms, aug, objective = training_objective(accelerator, model, plain, x, cfg, beta)
                accelerator.backward(objective)
                if accelerator.sync_gradients:
                    stepped, grad_norm = _optimizer_step(
                        accelerator, model, optimizer, cfg, state, total_opt_steps
                    )
                    if stepped and ema is not None:
                        ema.update_parameters(core)
            group_kls = [terms.kl_groups[g].detach() for g in groups]
            draws = cfg.loss.z_samples  # rows per image in `terms`: sum their per-image means
            sums += torch.stack(
                [
                    terms.neg_elbo.detach().sum() / draws,
                    terms.recon.detach().sum() / draws,
                    terms.kl.detach().sum() / draws,
                    torch.tensor(float(x.shape[0]), device=device),
                    *[kl.sum() for kl in group_kls],
                ]
            ).double()
            if not accelerator.sync_gradients:
                continue
            if state["opt_step"] % cfg.train.log_every_steps == 0:
                aug_mean = [] if aug is None else [aug.neg_elbo.detach().float().mean()]
                means = torch.stack(
                    [terms.neg_elbo.detach().mean(), *[k.mean() for k in group_kls], *aug_mean]
                )
                loss, *rest = accelerator.reduce(means, "mean").tolist()
                step_kls, aug_loss = rest[: len(groups)], rest[len(groups) :]
                progress.set_postfix(neg_elbo=f"{loss:.2f}")
                row = {
                    "global_step": state["opt_step"],
                    "epoch": epoch,
                    "train/step_neg_elbo": loss,
                    "train/kl_weight": beta,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/grad_norm": grad_norm,
                    "train/skipped_updates": state["skipped_updates"],
                    **{f"train/step_kl_{g}": v for g, v in zip(groups, step_kls, strict=True)},
                }
                if aug_loss:
                    row["train/step_encoder_aug_neg_elbo"] = aug_loss[0]
                if main:
                    with open(run_dir / STEPS_FILE, "a") as f:
                        f.write(json.dumps(row) + "\n")
                accelerator.log(row, step=state["opt_step"])
            if i + 1 < steps:
                if _stop_requested(accelerator, stop):
                    save(epoch, i + 1, sums)
                    raise TrainingInterrupted(
                        f"stop signal received: checkpointed at step {state['opt_step']} "
                        f"(epoch {epoch}, batch {i + 1}); run the same command to resume"
                    )
                every = cfg.train.checkpoint_every_steps
                if every and state["opt_step"] % every == 0:
                    save(epoch, i + 1, sums)
        epoch_time = time.perf_counter() - t0

        totals = accelerator.reduce(sums, reduction="sum")
        n = totals[3].item()
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "global_step": state["opt_step"],
            "train/neg_elbo": totals[0].item() / n,
            "train/recon": totals[1].item() / n,
            "train/kl": totals[2].item() / n,
            **{f"train/kl_{g}": totals[4 + j].item() / n for j, g in enumerate(groups)},
            "train/num_samples": n,
            "train/bad_steps": state["bad_steps"],
            "train/skipped_updates": state["skipped_updates"],
            "train/forced_updates": state["forced_updates"],
            "train/skipped_samples": state["skipped_samples"],
            "time/epoch_s": epoch_time,
            "throughput/train_img_per_s": n / max(epoch_time, 1e-9),
        }
        picture_epoch = epoch in cfg.eval.picture_epochs or epoch == cfg.train.epochs
        if epoch % cfg.eval.every_epochs == 0 or epoch == cfg.train.epochs:
            for name in ("val", "test"):
                if name in splits:
                    # refinement costs ~100 evaluations: test split, picture epochs only
                    refine = cfg.eval.refine_steps if name == "test" and picture_epoch else 0
                    metrics.update(
                        evaluate_split(
                            accelerator,
                            eval_model,
                            splits[name],
                            cfg.run.seed,
                            cfg.data.binarize,
                            refine,
                        )
                    )
        if main:
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            accelerator.print(
                f"epoch {epoch}: train/neg_elbo {metrics['train/neg_elbo']:.2f}  "
                f"{summarize({k: v for k, v in metrics.items() if 'train' not in k})}"
                f"  ({epoch_time:.1f}s)"
            )
            if picture_epoch:
                _pictures(
                    accelerator,
                    eval_model,
                    picture_inputs,
                    epoch,
                    run_dir,
                    cfg,
                    state["opt_step"],
                    splits.get("test"),
                )
        accelerator.log(metrics, step=state["opt_step"])
        save(epoch + 1, 0)
        if epoch < cfg.train.epochs and _stop_requested(accelerator, stop):
            raise TrainingInterrupted(
                f"stop signal received: checkpointed at the end of epoch {epoch}; run the "
                f"same command to resume"
            )
    accelerator.wait_for_everyone()
    return run_dir


def training_objective(
    accelerator: Accelerator,
    model: torch.nn.Module,
    plain: VAE,
    x: torch.Tensor,
    cfg: Config,
    beta: float,
) -> tuple[ELBOTerms, ELBOTerms | None, torch.Tensor]:
    """What one step minimises: the batch's neg. ELBO (KL weight `beta`, free bits), averaged
    over loss.z_samples posterior draws per image (the terms then have one row per draw,
    draw-major), and, with loss.encoder_aug_weight > 0, the encoder-only term on deformed
    copies of the batch. `model` is the prepared (DDP/compiled) model, `plain` the bare VAE
    inside it. Returns (the batch's terms, the augmented terms or None, the scalar to
    backpropagate)."""
    draws = cfg.loss.z_samples
    out = model(x, samples=draws) if draws > 1 else model(x)
    terms = neg_elbo(
        plain.likelihood,
        out.x_params,
        repeat(x, "b ... -> (k b) ...", k=draws) if draws > 1 else x,
        out.mu,
        out.logvar,
        beta,
        cfg.loss.free_bits,
        out.kl_groups,
    )
    if not cfg.loss.encoder_aug_weight:
        return terms, None, terms.loss
    # outside DDP's and compile's forward: the extra pass reaches the weights through autograd
    with accelerator.autocast():
        aug = encoder_augmentation_terms(
            plain,
            x,
            Deformation.from_loss_config(cfg.loss),
            beta,
            cfg.loss.free_bits,
            copies=cfg.loss.encoder_aug_copies,
        )
    return terms, aug, terms.loss + cfg.loss.encoder_aug_weight * aug.loss


def _optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    state: dict[str, Any],
    total_opt_steps: int,
) -> tuple[bool, float]:
    """Clip, then step, unless the gradients are non-finite (then skip and count), or their
    norm exceeds train.skip_threshold (then skip and count, but at most
    train.max_consecutive_skips times in a row: the next one is applied, clipped). Returns
    (whether the weights changed, the gradient norm before clipping).

    The gradient norm is computed after DDP's all-reduce, so every rank makes the same
    decision. Under fp16 the grad scaler owns overflow handling; we only count its skips.
    """
    t = cfg.train
    # Clipping at the skip threshold too: a forced update after a run of skips is clipped.
    limits = [c for c in (t.grad_clip, t.skip_threshold) if c > 0]
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), min(limits, default=float("inf")))
    norm = float(grad_norm)
    if t.skip_threshold > 0 and math.isfinite(norm) and norm > t.skip_threshold:
        if state["consecutive_skips"] < t.max_consecutive_skips:
            state["skipped_updates"] += 1
            state["consecutive_skips"] += 1
            if accelerator.scaler is not None:
                accelerator.scaler.update()  # end this step's unscale_, as a step would
            optimizer.zero_grad(set_to_none=True)
            return False, norm
        state["forced_updates"] += 1
        accelerator.print(
            f"warning: step {state['opt_step']}: gradient norm {norm:.4g} > "
            f"train.skip_threshold={t.skip_threshold:g} after {state['consecutive_skips']} "
            f"skipped updates in a row; applying it clipped (raise the threshold if this repeats)"
        )
    if accelerator.scaler is None and not math.isfinite(norm):
        skipped = True
    else:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["opt_step"], cfg, total_opt_steps)
        optimizer.step()
        skipped = bool(optimizer.step_was_skipped)
    optimizer.zero_grad(set_to_none=True)
    if skipped:
        state["bad_steps"] += 1
        state["consecutive_bad"] += 1
        if state["consecutive_bad"] >= cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{state['consecutive_bad']} optimizer steps in a row had non-finite loss or "
                f"gradients (train.max_bad_steps={cfg.train.max_bad_steps}); stopping. The "
                f"last good checkpoint is kept in {cfg.run_dir / 'checkpoints'}; try a lower "
                f"train.lr, train.grad_clip, or bf16 instead of fp16."
            )
    else:
        state["consecutive_bad"] = 0
        state["consecutive_skips"] = 0
        state["opt_step"] += 1
    return not skipped, norm


def _pictures(
    accelerator: Accelerator,
    model: Any,
    inputs: torch.Tensor | None,
    epoch: int,
    run_dir: Path,
    cfg: Config,
    step: int,
    test_split: ShardSplit | None = None,
) -> None:
    model.eval()
    images = {}
    with torch.no_grad(), accelerator.autocast():
        if inputs is not None:
            x = prepare_inputs(inputs, accelerator.device, "none")
            grid = pictures.recon_grid(x, model.reconstruct(x))
            images["recon"] = pictures.save_grid(grid, run_dir / f"recon_epoch{epoch:03d}.png")
        gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "samples"))
        grid = pictures.sample_grid(model.sample(cfg.eval.num_samples, gen))
        images["samples"] = pictures.save_grid(grid, run_dir / f"samples_epoch{epoch:03d}.png")
        # 2-D latents only: the latent manifold and the test set's posterior means by label
        images.update(pictures.latent_pictures(model, test_split, run_dir, epoch))
    if accelerator.trackers:
        from PIL import Image

        accelerator.get_tracker("wandb").log_images(
            {f"pictures/{k}": [Image.open(p)] for k, p in images.items()}, step=step
        )
