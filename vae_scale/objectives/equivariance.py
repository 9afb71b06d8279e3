"""Equivariance terms of the KL autoencoder (`loss.equivariance`): the decoder of a transformed
latent should give the equally transformed image, so the latents keep the image's geometry
and lose the high frequencies a diffusion model finds hard to learn.

- **EQ-VAE** (Kouzelis et al. 2025, arXiv 2502.09509; `variant: eq_vae`): tau is a downscale of
  the latent by a factor s (from `scales`) and a rotation by k x 90 degrees (k from
  `rotations`); with probability `p_prior` a step keeps only the plain reconstruction (EQ-VAE's
  "prior preservation").
- **Scale equivariance** (Skorokhodov et al. 2025, "Improving the diffusability of
  autoencoders"; `variant: scale`): tau is a 2x or 4x downsampling (scales 0.5 / 0.25, no
  rotation): decode(downsample(z)) ~ downsample(x).

Each optimizer step draws its tau from the run's seed and the step alone (the same on every
process and every accumulated batch, so the update is that of the global batch however it is
split, and a resumed run draws what the uninterrupted one did). The term is the
reconstruction's own pixel + perceptual error between decode(tau(z)) and tau(x), at `weight`.
Downscaling is bilinear with antialiasing for latents and images alike. LPIPS-VGG needs images
of at least 16 px a side: below that the term is the pixel part only.

One difference from EQ-VAE, on purpose: EQ-VAE replaces the reconstruction of a transformed
batch by the transformed one; here the plain reconstruction (and the KL, GAN and the reported
neg. ELBO) stays every step and the transformed one is added, so every row stays comparable
with a run without the term.
"""

from __future__ import annotations

import random
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from vae_scale.schema import FieldError, NonNegative, NonNegativeFloat, Section
from vae_scale.utils.seeding import derive_seed

Scale = Annotated[float, Field(gt=0, le=1)]
DEFAULTS = {"eq_vae": ([0.5, 0.75], [0, 1, 2, 3]), "scale": ([0.5, 0.25], [0])}


class EquivarianceConfig(Section):
    """loss.equivariance (this file): `weight` 0 = off, from optimizer step `start_step`;
    `variant` picks the paper's defaults
    for `scales` and `rotations` (EQ-VAE: s in {0.5, 0.75} and any multiple of 90 degrees;
    scale: s in {0.5, 0.25}, no rotation), which may be given instead."""

    weight: NonNegativeFloat = 0.0
    start_step: NonNegative = 0  # the first optimizer step with the term
    variant: Literal["eq_vae", "scale"] = "eq_vae"
    p_prior: Annotated[float, Field(ge=0, lt=1)] = 0.5
    scales: list[Scale] | None = None
    rotations: list[Annotated[int, Field(ge=0, le=3)]] | None = None

    @model_validator(mode="after")
    def _some_transform(self) -> EquivarianceConfig:
        scales, rotations = self.drawn()
        if not scales or not rotations:
            raise FieldError("scales" if not scales else "rotations", "expected at least one")
        if all(s == 1 for s in scales) and set(rotations) == {0}:
            raise FieldError("scales", "scale 1 and rotation 0 alone are the identity")
        return self

    def drawn(self) -> tuple[list[float], list[int]]:
        scales, rotations = DEFAULTS[self.variant]
        return (
            scales if self.scales is None else self.scales,
            rotations if self.rotations is None else self.rotations,
        )


def downscale(t: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of (B, C, H, W) to `size` (the term's and the diffusability
    measure's one downsampling)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t.float(), size=size, mode="bilinear", antialias=True).to(t.dtype)


class Transform:
    """tau: a latent scale and a rotation by k x 90 degrees."""

    def __init__(self, scale: float, k: int):
        self.scale, self.k = scale, k

    def latent(self, z: Tensor) -> Tensor:
        h, w = z.shape[-2:]
        size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        return torch.rot90(downscale(z, size), self.k, dims=(-2, -1))

    def image(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x transformed to the decoded size (rotated first: `size` is the rotated one)."""
        return downscale(torch.rot90(x, self.k, dims=(-2, -1)), size)

    def __repr__(self) -> str:
        return f"Transform(scale={self.scale}, k={self.k})"


def draw(cfg: EquivarianceConfig, seed: int, step: int) -> Transform | None:
    """Step `step`'s transform (None: a prior-preservation step, or before the term's
    start), a pure function of its arguments."""
    if step < cfg.start_step:
        return None
    rng = random.Random(derive_seed(seed, "equivariance", step))
    if rng.random() < cfg.p_prior:
        return None
    scales, rotations = cfg.drawn()
    while True:  # the identity is not a transform: draw again
        tau = Transform(rng.choice(scales), rng.choice(rotations))
        if tau.scale != 1 or tau.k:
            return tau
