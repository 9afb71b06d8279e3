"""Likelihoods, KL and the negative ELBO, all in nats per image.

Everything here runs in float32 even under autocast: exp(logvar) overflows fp16 for
logvar > 11.09, and sums over thousands of pixels lose precision in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class Likelihood(nn.Module):
    """p(x | z) given the decoder's output tensor `params` (B, param_channels, H, W)."""

    name: str = ""
    #: True when the likelihood models 8-bit pixel values, so bits/dim is meaningful.
    discrete_8bit: bool = False

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = tuple(image_shape)

    def param_channels(self, channels: int) -> int:
        return channels

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        """-log p(x | z) per image, shape (B,), float32. `x` is in [0, 1]."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """The image the decoder predicts, in [0, 1] (for pictures)."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Bernoulli on grey values in [0, 1] (BCE with logits), as in the study."""

    name = "bernoulli"

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        with _no_autocast(params.device.type):
            bce = F.binary_cross_entropy_with_logits(params.float(), x.float(), reduction="none")
            return bce.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params.float())


LIKELIHOODS: dict[str, type[Likelihood]] = {"bernoulli": Bernoulli}


def build_likelihood(name: str, image_shape: tuple[int, int, int]) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ValueError(f"loss.likelihood: expected one of {sorted(LIKELIHOODS)}, got {name!r}")
    return LIKELIHOODS[name](image_shape)


def kl_normal_standard(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per latent dimension, float32, same shape as mu."""
    with _no_autocast(mu.device.type):
        mu, logvar = mu.float(), logvar.float()
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_weight(step: int, beta: float, warmup_steps: int, beta_start: float = 0.0) -> float:
    """Linear KL warm-up from `beta_start` to `beta` over `warmup_steps` optimizer steps."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return beta
    return beta_start + (beta - beta_start) * step / warmup_steps


@dataclass
class ELBOTerms:
    """Per-image terms (shape (B,)) of one batch; `loss` is the scalar to minimise."""

    loss: Tensor
    neg_elbo: Tensor
    recon: Tensor
    kl: Tensor


def neg_elbo(
    likelihood: Likelihood,
    x_params: Tensor,
    x: Tensor,
    mu: Tensor,
    logvar: Tensor,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
) -> ELBOTerms:
    """Negative ELBO = recon NLL + KL, in nats per image.

    `loss` is the batch mean of recon + kl_weight * KL, where KL may be floored per latent
    dimension at `free_bits` nats (batch-averaged, as in Kingma et al. 2016); the reported
    `neg_elbo` and `kl` are always the true, unweighted values.
    """
    recon = likelihood.nll(x_params, x)
    kl_dims = kl_normal_standard(mu, logvar).flatten(1)
    kl = kl_dims.sum(1)
    if free_bits > 0:
        kl_for_loss = torch.clamp(kl_dims.mean(0), min=free_bits).sum().expand_as(kl)
    else:
        kl_for_loss = kl
    loss = (recon + kl_weight * kl_for_loss).mean()
    return ELBOTerms(loss=loss, neg_elbo=recon + kl, recon=recon, kl=kl)


def bits_per_dim(nats_per_image: Tensor | float, num_dims: int) -> Tensor | float:
    """nats per image -> bits per dimension (num_dims = C*H*W)."""
    return nats_per_image / (num_dims * math.log(2.0))
