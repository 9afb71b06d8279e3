"""A network being trained (`TrainedNetwork`): the one type for the VAE, the discriminator and
whatever network an objective declares next (objectives/base.py's NetworkSpec), with what
happens between a backward pass and the next forward: its optimizer and learning-rate
schedule, the update policy (clipping, skipped spikes, non-finite steps, divergence) and the
EMA of its weights.

The update policy runs one of two ways, with the same rules and counters:
- on the host: the gradient norm is read every step (what the CPU, fp16's GradScaler and an
  unfused optimizer need);
- on the device (a fused AdamW, no fp16 scaler: the GPU default): the decision is a tensor
  that the fused kernel reads, the counters stay on the device, and nothing waits for the GPU
  until `settle` copies them to the host (log steps, checkpoints, epoch ends).

The EMA's decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's
ExponentialMovingAverage), so short runs get an average of their recent weights, not of their
initialisation. Its state is the averaged network's state dict (a checkpoint's
`ema.safetensors`, loaded by `vae-scale eval` and `sample` like `model.safetensors`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vae_scale.config import TrainConfig
from vae_scale.objectives import Objective
from vae_scale.utils.compat import skip_step_if, uncompiled


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


class EMA:
    """`module`: a plain copy of the trained model (no DDP, compile or autocast wrappers),
    already holding its weights; it becomes the average."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.updates = 0  # counted on the host: nothing reads the device to decide the weight

    @torch.no_grad()
    def update(self, model: nn.Module, applied: Tensor | bool | None = None) -> None:
        """Move the average towards `model`'s weights and buffers. `applied`: False (the
        optimizer skipped the step) leaves the average as it is; a 0-dim bool tensor decides
        the same on the device. The update is counted either way."""
        if applied is not False:
            self._lerp(model, applied if isinstance(applied, Tensor) else None)
        self.updates += 1

    def _lerp(self, model: nn.Module, applied: Tensor | None) -> None:
        averaged = [
            t.detach() for t in itertools.chain(self.module.parameters(), self.module.buffers())
        ]
        current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        n = self.updates
        if n == 0 and applied is None:
            torch._foreach_copy_(averaged, current)
            return
        weight = 1.0 if n == 0 else 1.0 - min(self.decay, (1.0 + n) / (10.0 + n))
        if applied is None:
            torch._foreach_lerp_(averaged, current, weight)
        else:  # lerp with weight 0 and 1 is exact: the average, or the model's weights
            weights = [applied.to(averaged[0].dtype) * weight] * len(averaged)
            torch._foreach_lerp_(averaged, current, weights)

    def start_from(self, model: nn.Module) -> None:
        """Restart the average at `model`'s weights (EMA switched on for a resumed run)."""
        self.updates = 0
        self.update(model)

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's tensors (as the model names them) and the update count."""
        return {**self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        values = dict(values)
        self.updates = int(values.pop("updates"))
        self.module.load_state_dict(values)


@dataclass
class TrainedNetwork:
    """`model`: prepared by Accelerate (DDP, compile) around `unwrapped`, the bare network
    whose parameters `optimizer` trains under `policy` (clipping, skips); `ema`: an average of
    its weights, when kept. `first`: the network a run exports (its state keeps the names
    checkpoints always had: update_policy, ema)."""

    name: str
    model: nn.Module
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer
    policy: UpdatePolicy
    ema: EMA | None = None
    first: bool = False
    start_step: int = 0  # as its objective declared it (NetworkSpec)

    @property
    def for_eval(self) -> nn.Module:
        """The weights evaluation, pictures and exports use: the EMA when kept."""
        return self.unwrapped if self.ema is None else self.ema.module

    def update(
        self, accelerator: Accelerator, step: int, total_steps: int
    ) -> tuple[bool | Tensor, Tensor]:
        """Optimizer step `step` of `total_steps` of its lr schedule, then the EMA; returns
        (applied, gradient norm) as UpdatePolicy.step does."""
        applied, norm = self.policy.step(accelerator, self.model, self.optimizer, step, total_steps)
        if self.ema is not None:  # counts every step; a skipped one leaves the average as is
            self.ema.update(self.unwrapped, applied)
        return applied, norm

    @property
    def state_names(self) -> tuple[str, str]:
        """The names its update policy and EMA keep in checkpoints."""
        return (
            ("update_policy", "ema") if self.first else (f"{self.name}_policy", f"{self.name}_ema")
        )

    def components(self) -> dict[str, Any]:
        """Its checkpointed state beside Accelerate's (weights, optimizer)."""
        policy, ema = self.state_names
        return {policy: self.policy, **({ema: self.ema} if self.ema is not None else {})}

    def row(self, applied: tuple[Any, Tensor] | None) -> dict[str, float]:
        """Its learning rate, gradient norm and skipped updates for a step row (`applied`:
        what its last update returned; None: it did not train yet)."""
        prefix = "train/" if self.first else f"train/{self.name}_"
        self.policy.settle()
        return {
            f"{prefix}lr": self.optimizer.param_groups[0]["lr"] if applied else 0.0,
            f"{prefix}grad_norm": float(applied[1]) if applied else 0.0,
            f"{prefix}skipped_updates": self.policy.counts.skipped_updates,
        }


def build_networks(
    accelerator: Accelerator, objective: Objective, train: TrainConfig
) -> dict[str, TrainedNetwork]:
    """Every network `objective` trains, prepared in the order it declares them (Accelerate's
    model / model_1 / ... and optimizer / optimizer_1 / ... in checkpoints)."""
    fused = use_fused(train, accelerator.device)
    # fused AdamW reads a skip decision on the device; fp16's GradScaler decides itself
    on_device = fused and train.mixed_precision != "fp16"
    fmt = torch.channels_last if train.channels_last else torch.preserve_format
    nets = {}
    for i, (name, spec) in enumerate(objective.networks().items()):
        module = spec.module
        if train.channels_last:
            module = module.to(memory_format=fmt)
        optimizer = build_optimizer(module, spec.rules, fused)
        policy = UpdatePolicy(spec.rules, on_device, accelerator.device)
        # the average starts as a plain copy: no DDP, compile or autocast wrappers
        shadow = copy.deepcopy(module) if spec.ema_decay > 0 else None
        model, optimizer = accelerator.prepare(module, optimizer)  # the loader never is
        ema = None
        if shadow is not None:
            ema = EMA(shadow.to(accelerator.device, memory_format=fmt), spec.ema_decay)
        unwrapped = uncompiled(accelerator.unwrap_model(model))
        nets[name] = TrainedNetwork(
            name, model, unwrapped, optimizer, policy, ema, i == 0, spec.start_step
        )
    return nets
