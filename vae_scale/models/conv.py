"""The study's convolutional VAE: 5 Conv2d down, 5 ConvTranspose2d up with mirrored channels.

Works on non-square images (Frey Face is 28x20): the decoder's output padding is chosen per
layer so it gives back exactly the input size.
"""

from __future__ import annotations

from typing import Literal

from einops import rearrange
from torch import Tensor, nn

from vae_scale.errors import ConfigError
from vae_scale.models.base import VAE, register
from vae_scale.schema import Activation, NonNegative, Positive, Section

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvVAEConfig(Section):
    """The study's conv VAE (vae_scale/models/conv.py)."""

    name: Literal["conv"] = "conv"
    latent_dim: Positive = 20
    base_channels: Positive = 32  # filters of the first conv; doubled at every layer
    num_layers: Positive = 5
    kernel_size: Positive = 3
    stride: Positive = 2
    padding: NonNegative = 1
    activation: Activation = "relu"


@register(ConvVAEConfig)
class ConvVAE(VAE):
    def build(self, cfg: ConvVAEConfig, channels: int, height: int, width: int) -> None:
        k, s, p = cfg.kernel_size, cfg.stride, cfg.padding
        widths = [cfg.base_channels * 2**i for i in range(cfg.num_layers)]

        sizes = [(height, width)]
        for _ in widths:
            h, w = (conv_out(d, k, s, p) for d in sizes[-1])
            if h < 1 or w < 1:
                raise ConfigError(
                    f"model: {cfg.num_layers} conv layers (kernel {k}, stride {s}, padding {p}) "
                    f"shrink a {height}x{width} image to nothing; use fewer layers or a smaller "
                    f"stride"
                )
            sizes.append((h, w))
        self.feature_shape = (widths[-1], *sizes[-1])
        self._latent_dim = cfg.latent_dim
        act = ACTIVATIONS[cfg.activation]

        encoder: list[nn.Module] = []
        for c_in, c_out in zip([channels, *widths[:-1]], widths):
            encoder += [nn.Conv2d(c_in, c_out, k, s, p), act()]
        self.encoder = nn.Sequential(*encoder)
        flat = widths[-1] * sizes[-1][0] * sizes[-1][1]
        self.to_posterior = nn.Linear(flat, 2 * cfg.latent_dim)
        self.from_latent = nn.Linear(cfg.latent_dim, flat)

        # Mirror: channel counts reversed, output padding picked to hit each encoder size.
        out_channels = self.likelihood.param_channels(channels)
        dec_widths = [*reversed(widths[:-1]), out_channels]
        decoder: list[nn.Module] = []
        c_in = widths[-1]
        for i, c_out in enumerate(dec_widths):
            (h_in, w_in), (h_out, w_out) = sizes[-1 - i], sizes[-2 - i]
            pads = tuple(t - ((d - 1) * s - 2 * p + k) for d, t in ((h_in, h_out), (w_in, w_out)))
            if not all(0 <= op < s for op in pads):
                raise ConfigError(
                    f"model: kernel {k}, stride {s}, padding {p} cannot be mirrored back to "
                    f"{h_out}x{w_out} by ConvTranspose2d (output padding {pads})"
                )
            decoder.append(nn.ConvTranspose2d(c_in, c_out, k, s, p, output_padding=pads))
            if i < len(dec_widths) - 1:
                decoder.append(act())
            c_in = c_out
        self.decoder = nn.Sequential(*decoder)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self._latent_dim,)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = rearrange(self.encoder(x), "b c h w -> b (c h w)")
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        c, h, w = self.feature_shape
        return self.decoder(rearrange(self.from_latent(z), "b (c h w) -> b c h w", c=c, h=h, w=w))
