"""One batch of training (`train_step`): the objective's loss and its backward, and at the end
of an optimizer step (the last batch of gradient accumulation) the update of every network the
objective trains. `benchmarks/steps.py` times exactly this function."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from vae_scale.objectives import Objective
from vae_scale.training.networks import TrainedNetwork
from vae_scale.training.state import TrainState


@dataclass
class StepOutput:
    terms: dict[str, torch.Tensor]  # the objective's terms (rows; see objectives.Loss)
    values: dict[str, Any]  # the step's scalars (the KL weight, the adaptive weight)
    synced: bool  # an optimizer step ended with this batch: the networks were updated
    # network name -> (applied, gradient norm before clipping) of its update, tensors read on
    # the host at log steps only; absent: it did not train in this step
    updates: dict[str, tuple[Any, torch.Tensor]] = field(default_factory=dict)


def train_step(
    accelerator: Accelerator,
    objective: Objective,
    nets: Mapping[str, TrainedNetwork],
    x: torch.Tensor,
    state: TrainState,
    total_steps: int,
) -> StepOutput:
    """Forward and backward of batch `x` (float pixels on the device); when the optimizer step
    ends with it, each network whose start has come is updated (its lr schedule counted from
    its start), then `state.opt_step` advances. Nothing here reads a device value on the host
    when the update policies decide on the device."""
    step = state.opt_step
    with accelerator.accumulate(*(net.model for net in nets.values())):
        loss = objective.loss(nets, x, step)
        accelerator.backward(loss.loss)  # one backward: the networks' losses reach disjoint weights
        synced = accelerator.sync_gradients
        out = StepOutput(loss.terms, dict(loss.values or {}), synced)
        if synced:
            if objective.before_update is not None:
                out.values.update(objective.before_update(nets, step))
            for name, net in nets.items():
                start = net.start_step
                if step >= start:
                    out.updates[name] = net.update(accelerator, step - start, total_steps - start)
            state.opt_step += 1
    return out


def step_means(out: StepOutput) -> dict[str, torch.Tensor]:
    """Each term's mean over the batch's rows (a steps.jsonl / W&B row's train/step_<term>)."""
    return {k: v.detach().float().mean() for k, v in out.terms.items()}
