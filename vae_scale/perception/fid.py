"""rFID: the Fréchet distance between InceptionV3 pool features of a split's images and of
their reconstructions.

Protocol (pinned): pytorch-fid's InceptionV3 with the TF FID weights
(`pt_inception-2015-12-05-6726825d.pth`), 2048-d pool3 features, images in [0, 1] resized
bilinearly to 299x299 inside the network (grey images repeated to RGB), float32 network,
float64 statistics from every sample of the split (summed over processes, so N processes give
the same number as one). Needs `pip install 'vae_scale[fid]'` and the weights file where
vae_scale/perception/weights.py looks; otherwise rFID is reported as unavailable, never guessed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from vae_scale.perception.weights import FID_INCEPTION, find_weights, missing_message

FEATURES = 2048


class Unavailable(RuntimeError):
    """Why rFID cannot be computed here (one line)."""


class InceptionFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def pretrained(cls, weights_dir: str | None) -> InceptionFeatures:
        try:
            from pytorch_fid import inception
        except ImportError:
            raise Unavailable("needs pytorch-fid (pip install 'vae_scale[fid]')") from None
        path = find_weights(FID_INCEPTION, weights_dir)
        if path is None:
            raise Unavailable(missing_message(FID_INCEPTION, weights_dir))
        # pytorch-fid loads its weights through torch.hub's cache: point a private cache at
        # the file found, so nothing is downloaded
        with tempfile.TemporaryDirectory() as hub:
            (Path(hub) / "checkpoints").mkdir()
            os.symlink(path.resolve(), Path(hub) / "checkpoints" / path.name)
            previous = torch.hub.get_dir()
            torch.hub.set_dir(hub)
            try:
                net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURES]])
            finally:
                torch.hub.set_dir(previous)
        return cls(net)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 2048) float64 features of images in [0, 1]."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.float().clamp(0, 1))[0].flatten(1).double()


def frechet_distance(
    sum_a: Tensor, outer_a: Tensor, sum_b: Tensor, outer_b: Tensor, n: float
) -> float:
    """FID from the sums of features and of their outer products over n samples each."""
    mu_a, mu_b = (s.double().cpu().numpy() / n for s in (sum_a, sum_b))
    cov_a = (outer_a.double().cpu().numpy() - n * np.outer(mu_a, mu_a)) / (n - 1)
    cov_b = (outer_b.double().cpu().numpy() - n * np.outer(mu_b, mu_b)) / (n - 1)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # pytorch-fid's remedy for a singular product
        offset = np.eye(len(mu_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
