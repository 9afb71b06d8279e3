"""A native-resolution ResNet VAE for small RGB images (32x32, 64x64).

Encoder: 3x3 stem, then one stage per entry of `widths`, each `blocks_per_stage`
pre-activation residual blocks (GroupNorm -> SiLU -> conv, twice, plus the identity), with a
stride-2 3x3 conv between stages. The decoder mirrors it with nearest-neighbour (or
pixel-shuffle) x2 upsampling. An image of H x W thus reaches H / 2^(S-1) x W / 2^(S-1) with
S = len(widths) stages (8x8 for 32x32 and three stages).

The latent is either a vector (`latent: vector`, `latent_dim` numbers, via a linear layer from
the flattened last feature map) or a spatial map (`latent: spatial`, `latent_channels` x the
last stage's resolution, via 3x3 convs), which keeps far more detail at the same depth.

GroupNorm, not BatchNorm: its statistics do not depend on the batch, so it behaves the same
for any per-GPU batch size and needs no synchronisation under DDP. Every op here accepts
channels_last inputs; reshapes go through einops (reshape, never view).
"""

from __future__ import annotations

from typing import Annotated, Literal

from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from vae_scale.errors import ConfigError
from vae_scale.models.base import VAE, register
from vae_scale.schema import FieldError, NonNegative, Positive, Section


def num_groups(channels: int, groups: int) -> int:
    return min(groups, channels)


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels, groups), channels)


class ResNetVAEConfig(Section):
    """The ResNet VAE (vae_scale/models/resnet.py)."""

    name: Literal["resnet"] = "resnet"
    widths: Annotated[list[Positive], Field(min_length=1)] = Field(
        default_factory=lambda: [64, 128, 256]
    )  # channels per stage
    blocks_per_stage: NonNegative = 2
    latent: Literal["vector", "spatial"] = "spatial"
    latent_dim: Positive = 128  # used when latent is 'vector'
    latent_channels: Positive = 16  # used when latent is 'spatial'
    groups: Positive = 32  # GroupNorm groups (fewer when a stage has fewer channels)
    upsample: Literal["nearest", "pixel_shuffle"] = "nearest"

    @model_validator(mode="after")
    def _groups_divide_widths(self) -> ResNetVAEConfig:
        for i, width in enumerate(self.widths):
            if width % min(self.groups, width):
                raise FieldError(
                    f"widths[{i}]",
                    f"{width} channels cannot be split into model.groups={self.groups} "
                    f"GroupNorm groups; use a multiple of it",
                )
        return self


class PreActBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))): identity skip, constant width."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            norm(channels, groups),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            norm(channels, groups),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        # Start each block as the identity: deep stacks train stably from the first step.
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def upsample(c_in: int, c_out: int, mode: str) -> nn.Module:
    if mode == "pixel_shuffle":
        return nn.Sequential(nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2))
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)
    )


@register(ResNetVAEConfig)
class ResNetVAE(VAE):
    def build(self, cfg: ResNetVAEConfig, channels: int, height: int, width: int) -> None:
        widths, groups, blocks = list(cfg.widths), cfg.groups, cfg.blocks_per_stage
        factor = 2 ** (len(widths) - 1)
        if height % factor or width % factor:
            raise ConfigError(
                f"model.widths: {len(widths)} stages halve the image {len(widths) - 1} times, "
                f"so height and width must be multiples of {factor}; a {height}x{width} image "
                f"is not (use fewer stages)"
            )
        self.feature_shape = (widths[-1], height // factor, width // factor)
        self.latent_kind = cfg.latent

        encoder: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        for i, w in enumerate(widths):
            encoder += [PreActBlock(w, groups) for _ in range(blocks)]
            if i + 1 < len(widths):
                encoder.append(nn.Conv2d(w, widths[i + 1], 3, stride=2, padding=1))
        encoder += [norm(widths[-1], groups), nn.SiLU()]
        self.encoder = nn.Sequential(*encoder)

        c_last, h_last, w_last = self.feature_shape
        if cfg.latent == "vector":
            self._latent_shape: tuple[int, ...] = (cfg.latent_dim,)
            self.to_posterior = nn.Linear(c_last * h_last * w_last, 2 * cfg.latent_dim)
            self.from_latent = nn.Linear(cfg.latent_dim, c_last * h_last * w_last)
        else:
            self._latent_shape = (cfg.latent_channels, h_last, w_last)
            self.to_posterior = nn.Conv2d(c_last, 2 * cfg.latent_channels, 3, padding=1)
            self.from_latent = nn.Conv2d(cfg.latent_channels, c_last, 3, padding=1)

        decoder: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            decoder += [PreActBlock(widths[i], groups) for _ in range(blocks)]
            if i > 0:
                decoder.append(upsample(widths[i], widths[i - 1], cfg.upsample))
        decoder += [
            norm(widths[0], groups),
            nn.SiLU(),
            nn.Conv2d(widths[0], self.likelihood.param_channels(channels), 3, padding=1),
        ]
        self.decoder = nn.Sequential(*decoder)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._latent_shape

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        if self.latent_kind == "vector":
            h = rearrange(h, "b c h w -> b (c h w)")
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        if self.latent_kind == "vector":
            c, h, w = self.feature_shape
            features = rearrange(self.from_latent(z), "b (c h w) -> b c h w", c=c, h=h, w=w)
        else:
            features = self.from_latent(z)
        return self.decoder(features)
