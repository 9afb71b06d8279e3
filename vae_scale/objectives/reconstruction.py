"""The pixel term of a KL autoencoder: L1 or L2 between image and reconstruction."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from vae_scale.schema import NonNegativeFloat, Section


class PixelLossConfig(Section):
    """loss.pixel: per-pixel distance in [-1, 1] units, summed over an image's pixels (as
    latent diffusion's autoencoders do, so loss.beta ~ 1e-6 weighs the KL of per-image sums)."""

    kind: Literal["l1", "l2"] = "l1"
    weight: NonNegativeFloat = 1.0


def pixel_error(recon: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-pixel error (B, C, H, W), float32; both in [-1, 1] units."""
    diff = recon.float() - target.float()
    return diff.abs() if kind == "l1" else diff.pow(2)
