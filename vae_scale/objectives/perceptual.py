"""The perceptual term of a KL autoencoder: LPIPS-VGG (vae_scale/perception/lpips.py) between
each image and its reconstruction."""

from __future__ import annotations

from vae_scale.schema import NonNegativeFloat, Section


class PerceptualConfig(Section):
    """loss.perceptual: LPIPS weight per pixel (latent diffusion's `perceptual_weight`: the
    per-image LPIPS counts once per pixel, like the pixel term); 0 = off. Its weights are
    looked up offline first (run.weights_dir, $VAE_SCALE_WEIGHTS, torch's cache)."""

    weight: NonNegativeFloat = 1.0
