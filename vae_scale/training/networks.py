"""A network being trained: the one type for the VAE, the discriminator and whatever network
an objective declares next (objectives/base.py's NetworkSpec)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vae_scale.config import TrainConfig
from vae_scale.objectives import Objective
from vae_scale.training.ema import EMA
from vae_scale.training.optim import UpdatePolicy, build_optimizer, use_fused
from vae_scale.utils.compat import uncompiled


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
        nets[name] = TrainedNetwork(name, model, unwrapped, optimizer, policy, ema, i == 0)
    return nets
