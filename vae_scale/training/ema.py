"""An exponential moving average of a model's weights (for evaluation and sampling).

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's
ExponentialMovingAverage), so short runs get an average of their recent weights, not of their
initialisation. Its state is the averaged model's state dict (a checkpoint's
`ema.safetensors`, loaded by `vae-scale eval` and `sample` like `model.safetensors`) and the
update count.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn


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
