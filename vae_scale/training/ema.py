"""An exponential moving average of a model's weights (for evaluation and sampling).

Built on `torch.optim.swa_utils.AveragedModel`. The decay warms up as
min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's ExponentialMovingAverage), so
short runs get an average of their recent weights, not of their initialisation. Checkpoints
hold the averaged weights as `ema.safetensors` (a plain state dict of the model, so `vae-scale
eval` and `sample` load it like `model.safetensors`) and the update count in the train state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

EMA_FILE = "ema.safetensors"


def warmup_ema_fn(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def make_ema(shadow: nn.Module, decay: float) -> AveragedModel:
    """`shadow`: a plain copy of the trained model (no DDP, compile or autocast wrappers),
    already holding its weights; it becomes the average."""
    return AveragedModel(shadow, multi_avg_fn=warmup_ema_fn(decay), use_buffers=True)


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
