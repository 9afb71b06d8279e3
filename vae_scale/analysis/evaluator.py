"""What an objective's evaluation offers the end of an epoch (training/evaluation.py decides
when): val/test metrics, and for autoencoders the pictures and the latent statistics. An
objective names its evaluator (`Objective.evaluator`, "module:Class"); the VAEs' is
vae_evaluation.py's, the diffusion probe's probe.py's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


class Evaluator:
    """Built before the run starts (a missing frozen network ends the start with one line)
    and before a checkpoint restores the random generators (building draws from them)."""

    def __init__(self, cfg: Any, accelerator: Any, objective: Any):
        self.cfg, self.accelerator, self.objective = cfg, accelerator, objective

    def open(self, splits: Mapping[str, Any]) -> None:
        """Read what evaluation keeps from the splits (e.g. the pictures' fixed images)."""

    def evaluate(
        self, model: nn.Module, splits: Mapping[str, Any], epoch: int, last: bool
    ) -> dict[str, Any]:
        raise NotImplementedError

    def pictures_due(self, epoch: int) -> bool:
        return False

    def make_pictures(
        self, model: nn.Module, epoch: int, step: int, test: Any, metrics: dict | None = None
    ) -> None:
        """Main process only (`metrics`: the epoch's row, when it was just made)."""

    def lacking(self, model: nn.Module, epoch: int, last: bool, has_test: bool) -> list[str]:
        """What a kill after epoch `epoch`'s metrics row left unmade ("pictures",
        "latent statistics")."""
        return []

    def measure_latents(self, model: nn.Module, train: Any, step: int, weights: str) -> None:
        """The finished run's latent statistics (a collective)."""
