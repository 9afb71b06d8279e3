"""The optimizer, the learning-rate schedule and the update policy: what happens between a
backward pass and the next forward (clipping, skipped spikes, non-finite steps, divergence).

Two ways to apply the policy, with the same rules and counters:
- on the host: the gradient norm is read every step (what the CPU, fp16's GradScaler and an
  unfused optimizer need);
- on the device (a fused AdamW, no fp16 scaler: the GPU default): the decision is a tensor
  that the fused kernel reads, the counters stay on the device, and nothing waits for the GPU
  until `settle` copies them to the host (log steps, checkpoints, epoch ends).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vae_scale.config import TrainConfig
from vae_scale.utils.compat import skip_step_if


@dataclass
class UpdateCounts:
    """What the policy has done so far (its checkpointed state; on the device path in this
    order on the device, then the peak run of bad steps since the last `settle`)."""

    bad_steps: int = 0  # steps skipped for non-finite loss or gradients
    consecutive_bad: int = 0
    skipped_updates: int = 0  # gradient-norm spikes skipped (train.skip_threshold)
    consecutive_skips: int = 0
    forced_updates: int = 0  # applied after max_consecutive_skips skips in a row


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite for `train.max_bad_steps` steps in a row."""


def use_fused(cfg: TrainConfig, device: torch.device) -> bool:
    """train.fused_adamw, else fused on CUDA (one kernel for all parameters)."""
    return cfg.fused_adamw if cfg.fused_adamw is not None else device.type == "cuda"


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, fused: bool = False
) -> torch.optim.Optimizer:
    # AdamW: decoupled weight decay (VDVAE's; with weight_decay 0 it is exactly Adam)
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        fused=fused or None,
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


class UpdatePolicy:
    """Clip, then step, unless the gradients are non-finite (skip and count), or their norm
    exceeds train.skip_threshold (skip and count, but at most train.max_consecutive_skips
    times in a row: the next one is applied, clipped). Every call is one optimizer step of
    `TrainState.opt_step`, applied or skipped.

    The gradient norm is computed after DDP's all-reduce, so every rank decides the same.
    Under fp16 the grad scaler owns overflow handling; we only count its skips.
    """

    def __init__(self, cfg: TrainConfig, on_device: bool, device: torch.device):
        self.cfg, self.on_device, self.device = cfg, on_device, device
        self.peak_bad = 0
        self.load_state_dict({})

    def state_dict(self) -> dict[str, Any]:
        """The counts, the device's settled first."""
        self.settle()
        return dataclasses.asdict(self.counts)

    def load_state_dict(self, values: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(UpdateCounts)}
        self.counts = UpdateCounts(**{k: int(v) for k, v in values.items() if k in names})
        self.counters: Tensor | None = None  # on the device: UpdateCounts, then the peak run
        if self.on_device:
            values = [*dataclasses.astuple(self.counts), self.counts.consecutive_bad]
            self.counters = torch.tensor(values, dtype=torch.int64, device=self.device)

    def settle(self) -> None:
        """Copy the device's counters into `counts` (one host synchronisation)."""
        if not self.on_device:
            return
        *values, peak = self.counters.tolist()
        self.counts = UpdateCounts(*values)
        self.peak_bad = max(self.peak_bad, peak)
        self.counters[-1] = self.counters[1]  # the peak restarts from the current run

    def step(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
        total_steps: int,
    ) -> tuple[bool | Tensor, Tensor]:
        """Optimizer step `step` of `total_steps` (the lr schedule's position; the caller counts
        it); returns (applied: a bool, or a 0-dim bool tensor on the device path; the gradient
        norm before clipping, a 0-dim tensor)."""
        # Clipping at the skip threshold too: a forced update after a run of skips is clipped.
        limits = [c for c in (self.cfg.grad_clip, self.cfg.skip_threshold) if c > 0]
        limit = min(limits, default=float("inf"))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), limit)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg, total_steps)
        if self.on_device:
            applied = self._on_device(optimizer, grad_norm)
        else:
            applied = self._on_host(accelerator, optimizer, step, float(grad_norm))
        optimizer.zero_grad(set_to_none=True)
        return applied, grad_norm

    def _on_host(
        self,
        accelerator: Accelerator,
        optimizer: torch.optim.Optimizer,
        step: int,
        norm: float,
    ) -> bool:
        cfg, counts = self.cfg, self.counts
        if cfg.skip_threshold > 0 and math.isfinite(norm) and norm > cfg.skip_threshold:
            if counts.consecutive_skips < cfg.max_consecutive_skips:
                counts.skipped_updates += 1
                counts.consecutive_skips += 1
                if accelerator.scaler is not None:
                    accelerator.scaler.update()  # end this step's unscale_, as a step would
                return False
            counts.forced_updates += 1
            accelerator.print(
                f"warning: step {step}: gradient norm {norm:.4g} > "
                f"train.skip_threshold={cfg.skip_threshold:g} after {counts.consecutive_skips} "
                f"skipped updates in a row; applying it clipped (raise the threshold if this "
                f"repeats)"
            )
        if accelerator.scaler is None and not math.isfinite(norm):
            skipped = True
        else:
            optimizer.step()
            skipped = bool(optimizer.step_was_skipped)
        if skipped:
            counts.bad_steps += 1
            counts.consecutive_bad += 1
        else:
            counts.consecutive_bad = 0
            counts.consecutive_skips = 0
        return not skipped

    def _on_device(self, optimizer: torch.optim.Optimizer, grad_norm: Tensor) -> Tensor:
        bad_steps, run_bad, skipped, run_skips, forced, peak = self.counters.unbind()
        bad = ~torch.isfinite(grad_norm)
        if self.cfg.skip_threshold > 0:
            spike = ~bad & (grad_norm > self.cfg.skip_threshold)
            skip = spike & (run_skips < self.cfg.max_consecutive_skips)
        else:
            spike = skip = torch.zeros_like(bad)
        with skip_step_if(optimizer, bad | skip):
            optimizer.step()
        zero = torch.zeros_like(run_bad)
        run_bad = torch.where(bad, run_bad + 1, torch.where(skip, run_bad, zero))
        self.counters = torch.stack(
            [
                bad_steps + bad,
                run_bad,
                skipped + skip,
                torch.where(skip, run_skips + 1, torch.where(bad, run_skips, zero)),
                forced + (spike & ~skip),
                torch.maximum(peak, run_bad),
            ]
        )
        return ~(bad | skip)

    def check_divergence(self, last_good: str | None) -> None:
        """Stop after train.max_bad_steps non-finite steps in a row, naming what is kept (on
        the device path: as of the last `settle`)."""
        run = max(self.counts.consecutive_bad, self.peak_bad)
        if run < self.cfg.max_bad_steps:
            return
        kept = (
            f"the last good checkpoint is {last_good}"
            if last_good
            else "no checkpoint was written yet"
        )
        raise TrainingDiverged(
            f"{run} optimizer steps in a row had non-finite loss or gradients "
            f"(train.max_bad_steps={self.cfg.max_bad_steps}); stopping; {kept}; try a lower "
            f"train.lr, train.grad_clip, or bf16 instead of fp16."
        )
