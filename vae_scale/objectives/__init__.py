"""Every training objective, one file each, and the one registry that maps `loss.objective` to
its class (the only place that reads that string). An objective declares the networks it trains
and the frozen ones it uses, gates when each trains, computes its loss and the terms evaluation
reports (base.py). Terms with a config section of their own: reconstruction.py, perceptual.py,
discriminator.py, encoder_aug.py."""

from __future__ import annotations

from typing import Any

from vae_scale.objectives.autoencoder import AutoencoderObjective
from vae_scale.objectives.base import Loss, NetworkSpec, Objective
from vae_scale.objectives.elbo import ElboObjective
from vae_scale.objectives.flow_matching import FlowMatchingObjective

#: loss.objective -> its class
OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (ElboObjective, AutoencoderObjective, FlowMatchingObjective)
}


def build_objective(cfg: Any, image_shape: tuple[int, int, int], accelerator: Any) -> Objective:
    """The objective `cfg.loss.objective` names, with fresh networks for `image_shape`."""
    return OBJECTIVES[cfg.loss.objective](cfg, image_shape, accelerator)


__all__ = ["OBJECTIVES", "Loss", "NetworkSpec", "Objective", "build_objective"]
