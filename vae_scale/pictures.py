"""The pictures people look at: originals beside reconstructions, and prior samples."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.utils import make_grid, save_image


def _upscale(images: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour upscale by an integer factor so tiny images (28x20) stay visible."""
    factor = max(1, min_side // min(images.shape[-2:]))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def recon_grid(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Grid with originals in the first column and their reconstructions in the second."""
    pairs = rearrange(torch.stack([originals, recons]), "two b c h w -> (b two) c h w")
    return make_grid(_upscale(pairs.float().cpu()), nrow=2, padding=2, pad_value=1.0)


def sample_grid(samples: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    return make_grid(_upscale(samples.float().cpu()), nrow=nrow, padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
