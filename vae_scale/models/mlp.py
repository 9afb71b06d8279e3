"""The study's MNIST MLP VAE: fc 784-512-256 then two heads to (mu, log_var); the decoder
mirrors it (z-256-512-784). Works for any (C, H, W): images are flattened in and out."""

from __future__ import annotations

from typing import Literal

from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from vae_scale.models.base import VAE, register
from vae_scale.models.conv import ACTIVATIONS
from vae_scale.schema import Activation, Positive, Section


def mlp(widths: list[int], act: type[nn.Module]) -> nn.Sequential:
    """Linear layers between consecutive widths, each followed by the activation."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), act()]
    return nn.Sequential(*layers)


class MLPVAEConfig(Section):
    """The study's MNIST MLP VAE (vae_scale/models/mlp.py)."""

    name: Literal["mlp"] = "mlp"
    latent_dim: Positive = 2
    hidden: list[Positive] = Field(default_factory=lambda: [512, 256])  # encoder widths
    activation: Activation = "relu"


@register(MLPVAEConfig)
class MLPVAE(VAE):
    def build(self, cfg: MLPVAEConfig, channels: int, height: int, width: int) -> None:
        act = ACTIVATIONS[cfg.activation]
        in_features = channels * height * width
        last = cfg.hidden[-1] if cfg.hidden else in_features
        self._latent_dim = cfg.latent_dim
        self.out_channels = self.likelihood.param_channels(channels)

        self.encoder = mlp([in_features, *cfg.hidden], act)
        self.to_mu = nn.Linear(last, cfg.latent_dim)
        self.to_logvar = nn.Linear(last, cfg.latent_dim)
        dec_hidden = list(reversed(cfg.hidden))
        self.decoder = nn.Sequential(
            mlp([cfg.latent_dim, *dec_hidden], act),
            # logits (or likelihood parameters); the sigmoid lives in the likelihood
            nn.Linear(
                dec_hidden[-1] if dec_hidden else cfg.latent_dim, self.out_channels * height * width
            ),
        )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self._latent_dim,)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(rearrange(x, "b c h w -> b (c h w)"))
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: Tensor) -> Tensor:
        _, h, w = self.image_shape
        return rearrange(self.decoder(z), "b (c h w) -> b c h w", c=self.out_channels, h=h, w=w)
