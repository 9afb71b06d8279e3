"""Named sums of per-sample metrics over an epoch or a split, reduced over processes.

Training and evaluation both add per-batch sums here (float64, on the device, so a step needs
no host synchronisation) and read means once at the end, after one all-reduce.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator


class MetricSums:
    """float64 sums laid out in one flat tensor: `names` maps each metric to its length (1 for
    a scalar, D for a per-dimension profile)."""

    def __init__(self, names: dict[str, int], device: torch.device | str):
        self.layout: dict[str, slice] = {}
        offset = 0
        for name, size in names.items():
            self.layout[name] = slice(offset, offset + size)
            offset += size
        self.device = device
        self.pending: dict[str, list[float]] | None = None  # a lazy layout's loaded state
        self.values = torch.zeros(offset, dtype=torch.float64, device=device)

    @classmethod
    def lazy(cls, device: torch.device | str) -> MetricSums:
        """Sums whose names are those of the first `add`: the terms a step returns, whatever
        they are (a checkpoint's sums loaded before it are added then)."""
        return cls({}, device)

    def add(self, **sums: torch.Tensor) -> None:
        """Add each metric's batch sum (a tensor of its length); all metrics at once in one
        fused add, or any subset."""
        if not self.layout:  # lazy: the first batch names the sums (the same on every rank)
            pending = self.pending
            self.__init__({name: value.numel() for name, value in sums.items()}, self.device)
            if pending:
                self.load_state_dict(pending)
        if sums.keys() == self.layout.keys():
            self.values += torch.cat([sums[n].reshape(-1).double() for n in self.layout])
            return
        for name, value in sums.items():
            self.values[self.layout[name]] += value.reshape(-1).double()

    def add_terms(self, terms: dict[str, torch.Tensor], num_images: int) -> None:
        """A training batch's objective terms (rows: images, posterior draws, deformed copies):
        each term's rows summed and scaled to the batch's images (the mean over an image's
        draws or copies), and the number of images (`count`)."""
        sums = {k: v.detach().sum() * (num_images / v.numel()) for k, v in terms.items()}
        # a fill kernel: torch.tensor(n, device=cuda) would copy from the host and wait
        count = torch.full((), float(num_images), device=next(iter(terms.values())).device)
        self.add(**sums, count=count)

    def reduce(self, accelerator: Accelerator) -> dict[str, torch.Tensor]:
        """Every metric summed over all processes (collective: every rank must call it)."""
        total = accelerator.reduce(self.values.clone(), reduction="sum")
        return {name: total[where] for name, where in self.layout.items()}

    def state_dict(self, accelerator: Accelerator) -> dict[str, list[float]]:
        """The sums over all processes, for a mid-epoch checkpoint (collective)."""
        return {name: value.tolist() for name, value in self.reduce(accelerator).items()}

    def load_state_dict(self, state: dict[str, list[float]] | Any) -> None:
        """Add the sums of a checkpoint (the main process only: they are already global)."""
        if not isinstance(state, dict):
            raise ValueError(
                "a mid-epoch checkpoint of a vae_scale older than its named epoch sums: resume "
                "from an epoch-end checkpoint (--resume PATH)"
            )
        if not self.layout:  # lazy: added once the first batch names the sums
            self.pending = state
            return
        for name, value in state.items():
            self.values[self.layout[name]] += torch.tensor(value, dtype=torch.float64).to(
                self.values.device
            )
