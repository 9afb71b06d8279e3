"""Encoder augmentation: an extra ELBO term, on randomly deformed copies of each batch, that
trains only the encoder.

Why: with a small latent space (MNIST z = 2) the test loss stalls because the encoder
over-fits the training images (its amortization gap on test images grows while the decoder
keeps generalising; RESULTS.md). Teaching the encoder to infer the latents of slightly
rotated, scaled, sheared and shifted digits widens what it has seen without asking the decoder
to model deformed digits: the decoder runs with detached weights in this term, so its weights
are trained on the real images only, and the reported neg. ELBO is that of the real images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.func import functional_call

from vae_scale.losses import ELBOTerms, neg_elbo
from vae_scale.models import VAE


def random_affine(
    x: Tensor,
    rotate_deg: float,
    scale: float,
    shear: float,
    shift_px: float,
    generator: torch.Generator | None = None,
    elastic_alpha: float = 0.0,
    elastic_sigma: float = 4.0,
) -> Tensor:
    """Each image of `x` (B, C, H, W) under its own random affine map: rotation uniform in
    +-rotate_deg, zoom in 1 +- scale, shear factor in +-shear, shift in +-shift_px pixels per
    axis; bilinear, zeros outside. All zeros gives back `x`.

    `elastic_alpha` > 0 adds an elastic distortion on top (Simard et al. 2003): a per-pixel
    displacement drawn uniform in [-1, 1], smoothed by a Gaussian of `elastic_sigma` pixels
    and scaled by `elastic_alpha` pixels."""
    batch, _, height, width = x.shape

    def uniform(*shape: int) -> Tensor:
        u = torch.rand(shape, generator=generator, device="cpu").to(x.device, torch.float32)
        return 2 * u - 1

    angle = uniform(batch) * math.radians(rotate_deg)
    zoom = 1 + uniform(batch) * scale
    shear_factor = uniform(batch) * shear
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size
    shift = uniform(batch, 2) * shift_px * torch.tensor([2 / width, 2 / height], device=x.device)
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
    if elastic_alpha > 0:
        field = smooth_gaussian(uniform(batch * 2, 1, height, width), elastic_sigma)
        field = rearrange(field, "(b xy) 1 h w -> b h w xy", xy=2)
        grid = grid + field * elastic_alpha * torch.tensor([2 / width, 2 / height], device=x.device)
    return F.grid_sample(x.float(), grid, align_corners=False, padding_mode="zeros").to(x.dtype)


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
    rotate_deg: float,
    scale: float,
    shear: float,
    shift_px: float,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    elastic_alpha: float = 0.0,
    elastic_sigma: float = 4.0,
) -> ELBOTerms:
    """Neg. ELBO of deformed copies of `x` whose gradient reaches only the encoder.

    The decoder (and any learned likelihood parameter) runs on detached copies of its weights,
    so one backward of `main_loss + weight * terms.loss` leaves the decoder's gradient exactly
    that of the main loss; under DDP every parameter still gets its gradient in that one
    backward. `model` is the unwrapped VAE with one Gaussian latent.
    """
    with torch.no_grad():
        x_aug = random_affine(
            x,
            rotate_deg,
            scale,
            shear,
            shift_px,
            elastic_alpha=elastic_alpha,
            elastic_sigma=elastic_sigma,
        )
    mu, logvar = model.encode(x_aug)
    z = model.reparameterize(mu, logvar)
    frozen = {f"vae.{name}": p.detach() for name, p in model.named_parameters()}
    x_params = functional_call(_FrozenDecode(model), frozen, (z,))
    return neg_elbo(model.likelihood, x_params, x_aug, mu, logvar, kl_weight, free_bits)
