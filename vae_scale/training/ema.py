"""An exponential moving average of a model's weights (for evaluation and sampling).

Built on `torch.optim.swa_utils.AveragedModel`. The decay warms up as
min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's ExponentialMovingAverage), so
short runs get an average of their recent weights, not of their initialisation. Checkpoints
hold the averaged weights as `ema.safetensors` (a plain state dict of the model, so `vae-scale
eval` and `sample` load it like `model.safetensors`) and the update count in the train state.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from vae_scale.run_files.checkpoints import EMA_FILE


def make_ema(shadow: nn.Module) -> AveragedModel:
    """`shadow`: a plain copy of the trained model (no DDP, compile or autocast wrappers),
    already holding its weights; it becomes the average (updated by `update_ema`)."""
    return AveragedModel(shadow, use_buffers=True)


@torch.no_grad()
def update_ema(
    ema: AveragedModel,
    model: nn.Module,
    updates: int,
    decay: float,
    applied: Tensor | None = None,
) -> None:
    """Move the average towards `model`'s weights and buffers after `updates` earlier updates
    (a host count: AveragedModel's own update reads its device counter on the host every
    step). `applied` (a 0-dim bool tensor): where false the average stays as it is, decided
    on the device; the update is counted either way."""
    averaged = [t.detach() for t in itertools.chain(ema.module.parameters(), ema.module.buffers())]
    current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
    if updates == 0 and applied is None:
        torch._foreach_copy_(averaged, current)
    else:
        weight = 1.0 if updates == 0 else 1.0 - min(decay, (1.0 + updates) / (10.0 + updates))
        if applied is None:
            torch._foreach_lerp_(averaged, current, weight)
        else:  # lerp with weight 0 and 1 is exact: the average, or the model's weights
            weights = [applied.to(averaged[0].dtype) * weight] * len(averaged)
            torch._foreach_lerp_(averaged, current, weights)
    ema.n_averaged += 1


def ema_tensors(ema: AveragedModel) -> dict[str, Tensor]:
    """The averaged model's state dict, ready for safetensors (contiguous, on the CPU)."""
    return {k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()}


def load_ema(ema: AveragedModel, ckpt: Path, updates: int) -> bool:
    """Restore the average from a checkpoint; False when it holds none (EMA newly enabled)."""
    path = Path(ckpt) / EMA_FILE
    if not path.is_file():
        return False
    ema.module.load_state_dict(load_file(path))
    ema.n_averaged.fill_(updates)
    return True
