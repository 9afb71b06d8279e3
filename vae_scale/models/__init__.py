"""Model families, picked by `model.name` in a config (sections: `vae_scale.config`)."""

from __future__ import annotations

from vae_scale.config import ModelConfig
from vae_scale.losses import Likelihood
from vae_scale.models.base import VAE, VAEOutput
from vae_scale.models.conv import ConvVAE
from vae_scale.models.hierarchical import HierarchicalVAE
from vae_scale.models.mlp import MLPVAE
from vae_scale.models.resnet import ResNetVAE

MODELS: dict[str, type[VAE]] = {
    "conv": ConvVAE,
    "hierarchical": HierarchicalVAE,
    "mlp": MLPVAE,
    "resnet": ResNetVAE,
}


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], likelihood: Likelihood) -> VAE:
    """Instantiate the model family named by `cfg.name` for images of `image_shape` (C, H, W)."""
    return MODELS[cfg.name](cfg, tuple(image_shape), likelihood)


__all__ = ["MODELS", "VAE", "VAEOutput", "build_model"]
