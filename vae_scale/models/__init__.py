"""Model families, picked by `model.name` in a config."""

from __future__ import annotations

from typing import Any

from vae_scale.losses import Likelihood
from vae_scale.models.base import VAE, VAEOutput
from vae_scale.models.conv import ConvVAE, ConvVAEConfig
from vae_scale.models.hierarchical import HierarchicalVAE, HierarchicalVAEConfig
from vae_scale.models.mlp import MLPVAE, MLPVAEConfig
from vae_scale.models.resnet import ResNetVAE, ResNetVAEConfig

# name -> (config dataclass, model class)
MODELS: dict[str, tuple[type, type[VAE]]] = {
    "conv": (ConvVAEConfig, ConvVAE),
    "hierarchical": (HierarchicalVAEConfig, HierarchicalVAE),
    "mlp": (MLPVAEConfig, MLPVAE),
    "resnet": (ResNetVAEConfig, ResNetVAE),
}
MODEL_CONFIGS: dict[str, type] = {name: cfg for name, (cfg, _) in MODELS.items()}


def build_model(cfg: Any, image_shape: tuple[int, int, int], likelihood: Likelihood) -> VAE:
    """Instantiate the model family named by `cfg.name` for images of `image_shape` (C, H, W)."""
    _, model_cls = MODELS[cfg.name]
    return model_cls(cfg, tuple(image_shape), likelihood)


__all__ = ["MODELS", "MODEL_CONFIGS", "VAE", "VAEOutput", "build_model"]
