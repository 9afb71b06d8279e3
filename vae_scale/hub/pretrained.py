"""`vae_scale.from_pretrained`: a trained VAE from an exported folder, a run folder or a Hub
repository, with an image-in, image-out interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from vae_scale.analysis.runs import CONFIG_FILE, RECORD_FILE, WEIGHTS_FILE, load_model
from vae_scale.data.streaming.inputs import images_to_float
from vae_scale.errors import ConfigError
from vae_scale.models import VAE


class Posterior(NamedTuple):
    """q(z | x) = N(mean, exp(log_var)) per image."""

    mean: Tensor
    log_var: Tensor

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator).to(self.mean.device)
        return self.mean + eps * torch.exp(0.5 * self.log_var)


class PretrainedVAE(nn.Module):
    """A trained VAE for use from Python. Images go in as uint8 (0..255) or float in [0, 1],
    shaped (B, C, H, W) or (C, H, W) as the model was trained; images come out as float in
    [0, 1] (the decoder's mean). Inference only: eval mode, no gradients."""

    def __init__(self, vae: VAE, record: dict[str, Any]):
        super().__init__()
        self.vae = vae.eval()
        self.record = record  # config.json: the config sections and the facts of the run

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.vae.image_shape)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.vae.latent_shape)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def images(self, images: Tensor | np.ndarray) -> Tensor:
        """Images as the model takes them: float (B, C, H, W) in [0, 1] on its device."""
        x = torch.as_tensor(images)
        if tuple(x.shape) == self.image_shape:
            x = x.unsqueeze(0)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images: expected shape (B, {', '.join(map(str, self.image_shape))}) or "
                f"{self.image_shape}, got {tuple(x.shape)}"
            )
        if x.dtype == torch.uint8:
            return images_to_float(x, self.device)
        if not x.is_floating_point():
            raise ValueError(f"images: expected uint8 or float pixels, got {x.dtype}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"images: float pixels must be in [0, 1], got {x.min().item():.3g}.."
                f"{x.max().item():.3g} (uint8 images are divided by 255 for you)"
            )
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def encode(self, images: Tensor | np.ndarray) -> Posterior:
        mean, log_var = self.vae.encode(self.images(images))
        return Posterior(mean, log_var)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, *latent_shape) -> images."""
        z = torch.as_tensor(z).to(self.device, torch.float32)
        return self.vae.likelihood.mean(self.vae.decode(z))

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """n images decoded from z ~ N(0, temperature^2 I)."""
        return self.vae.sample(n, generator, temperature)

    @torch.no_grad()
    def reconstruct(self, images: Tensor | np.ndarray) -> Tensor:
        """The decoder's mean at the posterior mean of each image."""
        return self.vae.reconstruct(self.images(images))

    def forward(self, images: Tensor | np.ndarray) -> Tensor:
        return self.reconstruct(images)


def from_pretrained(
    path: str | Path,
    device: torch.device | str = "cpu",
    weights: Literal["ema", "raw"] = "ema",
) -> PretrainedVAE:
    """Load a trained VAE from `vae-scale export`'s folder, a run folder (its latest complete
    checkpoint; `weights`: the EMA when the run kept one, or the raw weights) or a Hugging
    Face Hub repository id (`owner/name`) that holds an exported folder."""
    folder = Path(path)
    if not folder.exists() and _looks_like_repo_id(str(path)):
        folder = _download(str(path))
    return PretrainedVAE(*load_model(folder, device, weights))


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE])
        )
    except Exception as err:  # offline, unknown repo, no access: all say the same to a user
        raise ConfigError(
            f"{repo_id}: no such folder here, and downloading it from the Hugging Face Hub "
            f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
