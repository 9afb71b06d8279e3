"""Encoder augmentation: an extra ELBO term, on randomly deformed copies of each batch, that
trains only the encoder.

Why: with a small latent space (MNIST z = 2) the test loss stalls because the encoder
over-fits the training images (its amortization gap on test images grows while the decoder
keeps generalising; RESULTS.md). Teaching the encoder to infer the latents of slightly
rotated, scaled, sheared, shifted, warped, thickened or thinned digits widens what it has seen
without asking the decoder to model deformed digits: the decoder runs with detached weights in
this term, so its weights are trained on the real images only, and the reported neg. ELBO is
that of the real images.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from vae_scale.losses import ELBOTerms, neg_elbo
from vae_scale.models import VAE
from vae_scale.schema import NonNegativeFloat, Positive, Section


class Deformation(Section):
    """Ranges of a random per-image deformation (all zero: the identity).

    Affine: rotation uniform in +-rotate_deg, zoom in 1 +- scale, shear factor in +-shear,
    shift in +-shift_px pixels per axis. Elastic (Simard et al. 2003): a per-pixel displacement
    drawn uniform in [-1, 1], smoothed by a Gaussian of elastic_sigma pixels and scaled by
    elastic_alpha pixels (0 = off). Stroke thickness: each image blended toward its 3x3 grey
    dilation (thicker strokes) or erosion (thinner) by a factor uniform in +-thickness.
    """

    rotate_deg: Annotated[float, Field(ge=0, le=180)] = 0.0
    scale: Annotated[float, Field(ge=0, lt=1)] = 0.0
    shear: NonNegativeFloat = 0.0
    shift_px: NonNegativeFloat = 0.0
    elastic_alpha: NonNegativeFloat = 0.0
    elastic_sigma: Annotated[float, Field(gt=0)] = 4.0
    thickness: Annotated[float, Field(ge=0, le=1)] = 0.0


class EncoderAugConfig(Deformation):
    """Encoder augmentation (this file): an extra neg. ELBO term, weighted
    by `weight` (0 = off), on `copies` randomly deformed copies of each batch, that trains
    only the encoder; the deformation's ranges are the fields of `Deformation`."""

    weight: NonNegativeFloat = 0.0
    copies: Positive = 1
    rotate_deg: Annotated[float, Field(ge=0, le=180)] = 10.0
    scale: Annotated[float, Field(ge=0, lt=1)] = 0.1
    shear: NonNegativeFloat = 0.1
    shift_px: NonNegativeFloat = 1.0


def random_deform(
    x: Tensor, deformation: Deformation, generator: torch.Generator | None = None
) -> Tensor:
    """Each image of `x` (B, C, H, W) under its own random draw of `deformation`; bilinear,
    zeros outside."""
    d = deformation
    batch, _, height, width = x.shape

    def uniform(*shape: int) -> Tensor:
        u = torch.rand(shape, generator=generator, device="cpu").to(x.device, torch.float32)
        return 2 * u - 1

    out = x.float()
    if d.thickness > 0:
        amount = rearrange(uniform(batch) * d.thickness, "b -> b 1 1 1")
        dilated = F.max_pool2d(out, 3, stride=1, padding=1)
        eroded = -F.max_pool2d(-out, 3, stride=1, padding=1)
        out = out + amount.abs() * (torch.where(amount > 0, dilated, eroded) - out)
    angle = uniform(batch) * math.radians(d.rotate_deg)
    zoom = 1 + uniform(batch) * d.scale
    shear_factor = uniform(batch) * d.shear
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size
    pixel = torch.tensor([2 / width, 2 / height], device=x.device)
    shift = uniform(batch, 2) * d.shift_px * pixel
    cos, sin = torch.cos(angle), torch.sin(angle)
    linear = (
        torch.stack(
            [
                torch.stack([cos, shear_factor * cos - sin], dim=1),
                torch.stack([sin, shear_factor * sin + cos], dim=1),
            ],
            dim=1,
        )
        / zoom[:, None, None]
    )
    theta = torch.cat([linear, shift[:, :, None]], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if d.elastic_alpha > 0:
        field = smooth_gaussian(uniform(batch * 2, 1, height, width), d.elastic_sigma)
        field = rearrange(field, "(b xy) 1 h w -> b h w xy", xy=2)
        grid = grid + field * d.elastic_alpha * pixel
    return F.grid_sample(out, grid, align_corners=False, padding_mode="zeros").to(x.dtype)


def smooth_gaussian(images: Tensor, sigma: float) -> Tensor:
    """(N, 1, H, W) images blurred by a Gaussian of `sigma` pixels (separable, zero padded)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    images = F.conv2d(images, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return F.conv2d(images, kernel.view(1, 1, 1, -1), padding=(0, radius))


class _FrozenDecode(nn.Module):
    """`vae.decode` as a module's forward, so `functional_call` can run it on detached weights."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z)


def encoder_augmentation_terms(
    model: VAE,
    x: Tensor,
    deformation: Deformation,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    copies: int = 1,
) -> ELBOTerms:
    """Neg. ELBO of `copies` independently deformed copies of each image of `x` (a batch of
    copies * B), whose gradient reaches only the encoder.

    The decoder (and any learned likelihood parameter) runs on detached copies of its weights,
    so one backward of `main_loss + weight * terms.loss` leaves the decoder's gradient exactly
    that of the main loss; under DDP every parameter still gets its gradient in that one
    backward. `model` is the unwrapped VAE with one Gaussian latent.
    """
    with torch.no_grad():
        x_aug = random_deform(repeat(x, "b ... -> (copies b) ...", copies=copies), deformation)
    mu, logvar = model.encode(x_aug)
    z = model.reparameterize(mu, logvar)
    frozen = {f"vae.{name}": p.detach() for name, p in model.named_parameters()}
    x_params = functional_call(_FrozenDecode(model), frozen, (z,))
    return neg_elbo(model.likelihood, x_params, x_aug, mu, logvar, kl_weight, free_bits)
