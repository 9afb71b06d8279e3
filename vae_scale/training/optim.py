"""The optimizer, the learning-rate schedule and the update policy: what happens between a
backward pass and the next forward (clipping, skipped spikes, non-finite steps, divergence)."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import nn

from vae_scale.config import TrainConfig
from vae_scale.training.state import TrainState


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite for `train.max_bad_steps` steps in a row."""


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # AdamW: decoupled weight decay (VDVAE's; with weight_decay 0 it is exactly Adam)
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate as a pure function of the optimizer step (so resume needs no scheduler
    state and N processes follow the same schedule as 1)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def optimizer_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    state: TrainState,
    total_steps: int,
) -> tuple[bool, float]:
    """Clip, then step, unless the gradients are non-finite (then skip and count), or their
    norm exceeds train.skip_threshold (then skip and count, but at most
    train.max_consecutive_skips times in a row: the next one is applied, clipped). Returns
    (whether the weights changed, the gradient norm before clipping).

    The gradient norm is computed after DDP's all-reduce, so every rank makes the same
    decision. Under fp16 the grad scaler owns overflow handling; we only count its skips.
    """
    # Clipping at the skip threshold too: a forced update after a run of skips is clipped.
    limits = [c for c in (cfg.grad_clip, cfg.skip_threshold) if c > 0]
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), min(limits, default=float("inf")))
    norm = float(grad_norm)
    if cfg.skip_threshold > 0 and math.isfinite(norm) and norm > cfg.skip_threshold:
        if state.consecutive_skips < cfg.max_consecutive_skips:
            state.skipped_updates += 1
            state.consecutive_skips += 1
            if accelerator.scaler is not None:
                accelerator.scaler.update()  # end this step's unscale_, as a step would
            optimizer.zero_grad(set_to_none=True)
            return False, norm
        state.forced_updates += 1
        accelerator.print(
            f"warning: step {state.opt_step}: gradient norm {norm:.4g} > "
            f"train.skip_threshold={cfg.skip_threshold:g} after {state.consecutive_skips} "
            f"skipped updates in a row; applying it clipped (raise the threshold if this repeats)"
        )
    if accelerator.scaler is None and not math.isfinite(norm):
        skipped = True
    else:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.opt_step, cfg, total_steps)
        optimizer.step()
        skipped = bool(optimizer.step_was_skipped)
    optimizer.zero_grad(set_to_none=True)
    if skipped:
        state.bad_steps += 1
        state.consecutive_bad += 1
    else:
        state.consecutive_bad = 0
        state.consecutive_skips = 0
        state.opt_step += 1
    return not skipped, norm


def check_divergence(state: TrainState, cfg: TrainConfig, last_good: str | None) -> None:
    """Stop after train.max_bad_steps non-finite steps in a row, naming what is kept."""
    if state.consecutive_bad < cfg.max_bad_steps:
        return
    kept = (
        f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    )
    raise TrainingDiverged(
        f"{state.consecutive_bad} optimizer steps in a row had non-finite loss or gradients "
        f"(train.max_bad_steps={cfg.max_bad_steps}); stopping; {kept}; try a lower train.lr, "
        f"train.grad_clip, or bf16 instead of fp16."
    )
