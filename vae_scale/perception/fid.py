"""rFID: the Fréchet distance between InceptionV3 pool features of a split's images and of
their reconstructions.

Protocol (pinned): pytorch-fid's InceptionV3 with the TF FID weights (its own
`pt_inception-2015-12-05-6726825d.pth`, or the same tensors as
`pt_inception-2015-12-05.safetensors`), 2048-d pool3 features, images in [0, 1] resized
bilinearly to 299x299 inside the network (grey images repeated to RGB), float32 network,
float64 statistics from every sample of the split (summed over processes, so N processes give
the same number as one). The weights are looked for where vae_scale/perception/weights.py
looks (offline first; `eval.rfid: on` may then download pytorch-fid's file); without them rFID
is reported as unavailable, never guessed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from vae_scale.errors import ConfigError
from vae_scale.perception.weights import (
    FID_INCEPTION,
    find_weights,
    load_pretrained,
    missing_message,
)

FEATURES = 2048
SUMS = FEATURES + FEATURES * FEATURES + 1  # the length of `feature_sums`


class Unavailable(RuntimeError):
    """Why rFID cannot be computed here (one line)."""


class InceptionFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def pretrained(cls, weights_dir: str | None, download: bool = False) -> InceptionFeatures:
        """pytorch-fid's network with the weights found offline (or, with `download`, its own
        download as a last resort); Unavailable (one line) otherwise."""
        try:
            from pytorch_fid import inception
        except ImportError:
            raise Unavailable("needs pytorch-fid (pip install pytorch-fid)") from None
        if find_weights(FID_INCEPTION, weights_dir) is None and not download:
            raise Unavailable(missing_message(FID_INCEPTION, weights_dir))
        try:
            state = load_pretrained(FID_INCEPTION, weights_dir)
        except ConfigError as err:
            raise Unavailable(str(err)) from None
        # pytorch-fid fetches its weights with this function: hand it the ones found
        fetch = inception.load_state_dict_from_url
        inception.load_state_dict_from_url = lambda *_a, **_k: state
        try:
            net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURES]])
        finally:
            inception.load_state_dict_from_url = fetch
        return cls(net)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 2048) float64 features of images in [0, 1]."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.float().clamp(0, 1))[0].flatten(1).double()


def feature_sums(features: Tensor) -> Tensor:
    """One flat float64 tensor of what FID needs from a set of features: their sum, the sum of
    their outer products and their count; sums of it over batches and processes stay exact."""
    f = features.double()
    return torch.cat([f.sum(0), (f.T @ f).flatten(), f.new_tensor([len(f)])])


def fid_from_sums(a: Tensor, b: Tensor) -> float:
    """FID between two sets given as (summed) `feature_sums`."""
    square = (FEATURES, FEATURES)
    return frechet_distance(
        a[:FEATURES], a[FEATURES:-1].view(square), b[:FEATURES], b[FEATURES:-1].view(square),
        a[-1].item(), b[-1].item(),
    )  # fmt: skip


def frechet_distance(
    sum_a: Tensor, outer_a: Tensor, sum_b: Tensor, outer_b: Tensor, n: float, n_b: float = 0
) -> float:
    """FID from the sums of features and of their outer products over n samples each (or n
    of a and `n_b` of b)."""
    n_b = n_b or n
    mu_a, mu_b = sum_a.double().cpu().numpy() / n, sum_b.double().cpu().numpy() / n_b
    cov_a = (outer_a.double().cpu().numpy() - n * np.outer(mu_a, mu_a)) / (n - 1)
    cov_b = (outer_b.double().cpu().numpy() - n_b * np.outer(mu_b, mu_b)) / (n_b - 1)
    # tr(sqrtm(A B)) for covariances A, B: the square roots of the eigenvalues of
    # sqrt(A) B sqrt(A), a symmetric matrix (two symmetric eigendecompositions: ~10x faster
    # than sqrtm's Schur form at 2048 x 2048, and no imaginary parts to round away)
    values, vectors = linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_covmean = np.sqrt(np.clip(linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)
