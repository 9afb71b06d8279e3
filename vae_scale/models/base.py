"""What every VAE family shares: the reparameterization trick, forward and sampling."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vae_scale.losses import Likelihood


class VAEOutput(NamedTuple):
    x_params: Tensor  # decoder output: logits (Bernoulli) or likelihood parameters
    z: Tensor
    mu: Tensor
    logvar: Tensor


class VAE(nn.Module):
    """Subclasses build `encode(x) -> (mu, logvar)` and `decode(z) -> x_params`.

    `likelihood` belongs to the model so that learned likelihood parameters (e.g. a per-pixel
    scale) are trained, checkpointed and synchronised like every other weight.
    """

    def __init__(self, image_shape: tuple[int, int, int], likelihood: Likelihood):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.likelihood = likelihood

    @property
    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> Tensor:
        # float32 so exp() cannot overflow under fp16 autocast
        std = torch.exp(0.5 * logvar.float())
        if eps is None:
            eps = torch.randn_like(std)
        return (mu.float() + eps * std).to(mu.dtype)

    def forward(self, x: Tensor, eps: Tensor | None = None) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, eps)
        return VAEOutput(self.decode(z), z, mu, logvar)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decode n draws of z ~ N(0, I) into images in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn((n, *self.latent_shape), generator=generator, device="cpu").to(device)
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean: the usual picture of a reconstruction."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))
