"""Model families, picked by `model.name` in a config. Each family's file holds its config
section and its network, registered together by `@register(Section)` (models/base.py); a new
family is a new file here and its import below."""

from __future__ import annotations

from vae_scale.losses import Likelihood
from vae_scale.models import autoencoder_kl, conv, dit, hierarchical, mlp, resnet  # noqa: F401
from vae_scale.models.autoencoder_kl import AutoencoderKLVAE
from vae_scale.models.base import FAMILIES, VAE, VAEOutput
from vae_scale.models.conv import ConvVAE
from vae_scale.models.hierarchical import HierarchicalVAE
from vae_scale.models.mlp import MLPVAE
from vae_scale.models.resnet import ResNetVAE
from vae_scale.schema import Section


def build_model(cfg: Section, image_shape: tuple[int, int, int], likelihood: Likelihood) -> VAE:
    """Instantiate the model family named by `cfg.name` for images of `image_shape` (C, H, W)."""
    return FAMILIES[cfg.name](cfg, tuple(image_shape), likelihood)


__all__ = [
    "AutoencoderKLVAE",
    "FAMILIES",
    "VAE",
    "ConvVAE",
    "HierarchicalVAE",
    "MLPVAE",
    "ResNetVAE",
    "VAEOutput",
    "build_model",
]
