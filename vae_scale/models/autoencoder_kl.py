"""The KL-regularised autoencoder of latent diffusion (Stable Diffusion's kl-f8, SDXL, FLUX):
diffusers' `AutoencoderKL` as the network, so an export loads in diffusers as is.

`widths` are the encoder's block widths (diffusers' `block_out_channels`): len(widths) - 1
halvings, i.e. a downsampling factor f = 2^(len(widths) - 1), and `latent_channels` c: f8c4 is
widths [128, 256, 512, 512] with c = 4 (SD), f8c16 the newer ones. Images go in as [-1, 1]
(diffusers' convention) and the decoder's output is the mean of the reconstruction in the same
units: with `loss.likelihood: gaussian` (required) a learned per-pixel scale around it makes
a discretized Gaussian, so neg. ELBO and bits/dim are reported beside PSNR/SSIM/LPIPS.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from vae_scale.errors import ConfigError
from vae_scale.models.base import VAE, register
from vae_scale.schema import FieldError, Positive, Section


class AutoencoderKLConfig(Section):
    """diffusers' AutoencoderKL (vae_scale/models/autoencoder_kl.py)."""

    name: Literal["autoencoder_kl"] = "autoencoder_kl"
    widths: Annotated[list[Positive], Field(min_length=1)] = Field(
        default_factory=lambda: [128, 256, 512, 512]
    )  # f = 2^(len - 1)
    layers_per_block: Positive = 2
    latent_channels: Positive = 4
    groups: Positive = 32  # GroupNorm groups
    mid_attention: bool = True  # self-attention in the middle block (SD's)
    # a fresh run starts from these weights: a diffusers AutoencoderKL folder, or a vae_scale
    # run or export (vae_scale/training/init_from.py)
    init_from: str | None = None

    @model_validator(mode="after")
    def _groups_divide_widths(self) -> AutoencoderKLConfig:
        for i, width in enumerate(self.widths):
            if width % self.groups:
                raise FieldError(
                    f"widths[{i}]",
                    f"{width} channels cannot be split into model.groups={self.groups} "
                    f"GroupNorm groups; use a multiple of it",
                )
        return self


def diffusers_config(cfg: AutoencoderKLConfig, image_shape: tuple[int, int, int]) -> dict:
    """AutoencoderKL's constructor arguments (also its exported config.json's fields)."""
    channels, height, _ = image_shape
    stages = len(cfg.widths)
    return {
        "in_channels": channels,
        "out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * stages,
        "up_block_types": ["UpDecoderBlock2D"] * stages,
        "block_out_channels": list(cfg.widths),
        "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.groups,
        "sample_size": height,
        "mid_block_add_attention": cfg.mid_attention,
    }


@register(AutoencoderKLConfig)
class AutoencoderKLVAE(VAE):
    encoder_modules = ("encoder", "quant_conv")

    def build(self, cfg: AutoencoderKLConfig, channels: int, height: int, width: int) -> None:
        from diffusers import AutoencoderKL  # a heavy import: only for this family

        if self.likelihood.param_channels(channels) != channels:
            raise ConfigError(
                f"loss.likelihood: the autoencoder_kl decoder predicts the image itself; use "
                f"'gaussian', got {self.likelihood.name!r}"
            )
        factor = 2 ** (len(cfg.widths) - 1)
        if height % factor or width % factor:
            raise ConfigError(
                f"model.widths: {len(cfg.widths)} stages downsample by {factor}, so height and "
                f"width must be multiples of {factor}; a {height}x{width} image is not"
            )
        self.diffusers_config = diffusers_config(cfg, self.image_shape)
        self.net = AutoencoderKL(**self.diffusers_config)
        self._latent_shape = (cfg.latent_channels, height // factor, width // factor)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    @property
    def quant_conv(self) -> nn.Module:
        return self.net.quant_conv

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._latent_shape

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        moments = self.net.quant_conv(self.net.encoder(x * 2 - 1))
        mu, logvar = moments.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution's bound

    def decode(self, z: Tensor) -> Tensor:
        return self.net.decoder(self.net.post_quant_conv(z))

    def last_decoder_layer(self) -> nn.Parameter:
        return self.net.decoder.conv_out.weight

    def to_diffusers(self, latent_stats: dict | None = None):
        """A `diffusers.AutoencoderKL` holding these weights, with the latents' global scale
        and shift measured on the training split when given. Per-channel latents_mean/std stay
        unset: SDXL's pipelines switch to a per-channel convention when they are set (then
        z * latents_std / scaling_factor + latents_mean, which our scaling_factor is not for);
        SD reads scaling_factor, SD3 / Flux scaling_factor and shift_factor (docs)."""
        from diffusers import AutoencoderKL

        extra = {}
        if latent_stats:
            extra = {k: latent_stats[k] for k in ("scaling_factor", "shift_factor")}
        net = AutoencoderKL(**self.diffusers_config, **extra)
        net.load_state_dict(self.net.state_dict())
        return net.eval()
