"""Likelihoods, KL and the negative ELBO, all in nats per image.

Everything here runs in float32 even under autocast: exp(logvar) overflows fp16 for
logvar > 11.09, and sums over thousands of pixels lose precision in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
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


# ------------------------------------------------------------------ 8-bit pixel likelihoods
#
# Pixels are 8-bit: x = k / 255 for k in 0..255. These likelihoods work on y = 2x - 1 in
# [-1, 1] (PixelCNN++'s convention), where level k sits at 2k/255 - 1 and owns the bin
# y +- 1/255; pixel 0 owns (-inf, -1 + 1/255] and pixel 255 owns [1 - 1/255, inf). The
# probability of the observed level is the continuous distribution's mass over its bin, so
# -log p is a true discrete NLL and bits/dim is meaningful (`discrete_8bit = True`).

BIN_HALF_WIDTH = 1.0 / 255.0  # in y units
EDGE = 1.0 - BIN_HALF_WIDTH / 2  # |y| beyond this is pixel 0 or 255
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 5.0  # in y units; exp(-7) is ~1/9 of a bin


def to_signed(x: Tensor) -> Tensor:
    """Pixels in [0, 1] -> y in [-1, 1], float32."""
    return x.float() * 2.0 - 1.0


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for small and large d."""
    return torch.log(-torch.expm1(-d))


def discretized_logistic_log_prob(y: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(level of y) under Logistic(mean, exp(log_scale)) binned to 8 bits (elementwise).

    With u and l the standardized bin edges, F(u) - F(l) = sigmoid(u) * sigmoid(-l) *
    (1 - exp(l - u)) exactly, so the log needs no subtraction of nearly equal numbers and no
    fallback branch, in either tail.
    """
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (y - mean + BIN_HALF_WIDTH)
    lower = inv_scale * (y - mean - BIN_HALF_WIDTH)
    log_cdf_upper = F.logsigmoid(upper)  # log F(upper): all of pixel 0's mass
    log_sf_lower = F.logsigmoid(-lower)  # log (1 - F(lower)): all of pixel 255's mass
    log_mid = log_cdf_upper + log_sf_lower + _log1mexp(upper - lower)
    return torch.where(y < -EDGE, log_cdf_upper, torch.where(y > EDGE, log_sf_lower, log_mid))


def discretized_normal_log_prob(y: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(level of y) under Normal(mean, exp(log_scale)) binned to 8 bits (elementwise)."""
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (y - mean + BIN_HALF_WIDTH)
    lower = inv_scale * (y - mean - BIN_HALF_WIDTH)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    # Mirror bins right of the mean into the left tail, where both CDF values are small and
    # log Phi(b) - log Phi(a) keeps its precision: Phi(u) - Phi(l) = Phi(-l) - Phi(-u).
    right = (upper + lower) > 0
    b = torch.where(right, -lower, upper)
    a = torch.where(right, -upper, lower)
    log_b = torch.special.log_ndtr(b)
    log_mid = log_b + _log1mexp(log_b - torch.special.log_ndtr(a))
    return torch.where(y < -EDGE, log_cdf_upper, torch.where(y > EDGE, log_sf_lower, log_mid))


def _signed_to_image(mean: Tensor) -> Tensor:
    return (mean.float().clamp(-1.0, 1.0) + 1.0) / 2.0


class DiscretizedGaussian(Likelihood):
    """Normal(mean, sigma) on 8-bit bins; the decoder predicts the mean (C channels, y units),
    sigma is a learned per-pixel parameter of the image's shape (not a function of z)."""

    name = "gaussian"
    discrete_8bit = True
    INIT_LOG_SCALE = -2.0  # sigma = 0.14 in y units (~17 grey levels): a fair first guess

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__(image_shape)
        self.log_scale = nn.Parameter(torch.full(self.image_shape, self.INIT_LOG_SCALE))

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        with _no_autocast(params.device.type):
            log_scale = self.log_scale.float().clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
            log_p = discretized_normal_log_prob(to_signed(x), params.float(), log_scale)
            return -log_p.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return _signed_to_image(params)


class DiscretizedLogistic(Likelihood):
    """Logistic(mean, scale) on 8-bit bins (PixelCNN++ / VDVAE style, one component): the
    decoder predicts 2C channels per pixel, the means then the log-scales, in y units."""

    name = "logistic"
    discrete_8bit = True

    def param_channels(self, channels: int) -> int:
        return 2 * channels

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        with _no_autocast(params.device.type):
            mean, log_scale = params.float().chunk(2, dim=1)
            log_scale = log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
            log_p = discretized_logistic_log_prob(to_signed(x), mean, log_scale)
            return -log_p.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return _signed_to_image(params.chunk(2, dim=1)[0])


class DiscretizedLogisticMixture(Likelihood):
    """A mixture of K discretized logistics per pixel and channel (channels independent given
    z, unlike PixelCNN++'s channel coupling). The decoder predicts 3*K*C channels laid out
    (part, component, channel) with part = mixture logits, means, log-scales."""

    name = "logistic_mixture"
    discrete_8bit = True

    def __init__(self, image_shape: tuple[int, int, int], components: int = 5):
        super().__init__(image_shape)
        self.components = components

    def param_channels(self, channels: int) -> int:
        return 3 * self.components * channels

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        parts = rearrange(params.float(), "b (p k c) h w -> p b k c h w", p=3, k=self.components)
        return parts[0], parts[1], parts[2].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        with _no_autocast(params.device.type):
            logits, means, log_scales = self._split(params)
            y = to_signed(x).unsqueeze(1)  # broadcast over components
            log_p = discretized_logistic_log_prob(y, means, log_scales)
            log_p = torch.logsumexp(torch.log_softmax(logits, dim=1) + log_p, dim=1)
            return -log_p.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        logits, means, _ = self._split(params)
        return _signed_to_image((torch.softmax(logits, dim=1) * means).sum(1))


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": Bernoulli,
    "gaussian": DiscretizedGaussian,
    "logistic": DiscretizedLogistic,
    "logistic_mixture": DiscretizedLogisticMixture,
}


def build_likelihood(name: str, image_shape: tuple[int, int, int]) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ValueError(f"loss.likelihood: expected one of {sorted(LIKELIHOODS)}, got {name!r}")
    return LIKELIHOODS[name](image_shape)


def likelihood_convention(likelihood: str, binarize: str) -> str:
    """What a run's nats measure: the likelihood and, for Bernoulli, the data it scores (grey
    values or binarized draws): recorded with every run, so unlike numbers never mix."""
    if likelihood == "bernoulli":
        return "bce_binarized" if binarize == "dynamic" else "bce_grey"
    return likelihood


def kl_normal_standard(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per latent dimension, float32, same shape as mu."""
    with _no_autocast(mu.device.type):
        mu, logvar = mu.float(), logvar.float()
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_normal(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) per dimension, float32 (a
    hierarchical model's learned priors)."""
    with _no_autocast(mu_q.device.type):
        mu_q, logvar_q, mu_p, logvar_p = (t.float() for t in (mu_q, logvar_q, mu_p, logvar_p))
        return 0.5 * (
            logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0
        )


def kl_per_dim(mu: Tensor, logvar: Tensor, kl_groups: dict[str, Tensor] | None = None) -> Tensor:
    """(B, D) KL per latent dimension: against N(0, I), or, for a model that computes its own
    KLs (latent groups with learned priors), its groups' KLs side by side."""
    if kl_groups:
        return torch.cat([kl.float().flatten(1) for kl in kl_groups.values()], dim=1)
    return kl_normal_standard(mu, logvar).flatten(1)


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
    kl_groups: dict[str, Tensor] | None = None  # per latent group, for hierarchical models
    # Every reported term by name (per image): what training's epoch sums, step rows and W&B
    # rows and evaluation's metrics take, key by key (`kl_<group>` per group).
    named: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        values = {name: getattr(self, name) for name in ELBO_TERMS}
        self.named = {**values, **{f"kl_{g}": v for g, v in (self.kl_groups or {}).items()}}


#: The reported fields of ELBOTerms, in order (a new term: a field above and its name here).
ELBO_TERMS = ("neg_elbo", "recon", "kl")


def elbo_term_names(groups: list[str]) -> list[str]:
    """The keys of `ELBOTerms.named` for a model with latent `groups`."""
    return [*ELBO_TERMS, *(f"kl_{g}" for g in groups)]


def neg_elbo(
    likelihood: Likelihood,
    x_params: Tensor,
    x: Tensor,
    mu: Tensor,
    logvar: Tensor,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    kl_groups: dict[str, Tensor] | None = None,
) -> ELBOTerms:
    """Negative ELBO = recon NLL + KL, in nats per image.

    `loss` is the batch mean of recon + kl_weight * KL, where KL may be floored per latent
    dimension at `free_bits` nats (batch-averaged, as in Kingma et al. 2016); the reported
    `neg_elbo` and `kl` are always the true, unweighted values. `kl_groups` (name -> per
    dimension KL, from a hierarchical model's output) replaces the N(0, I) KL of (mu, logvar).
    """
    recon = likelihood.nll(x_params, x)
    kl_dims = kl_per_dim(mu, logvar, kl_groups)
    kl = kl_dims.sum(1)
    if free_bits > 0:
        kl_for_loss = torch.clamp(kl_dims.mean(0), min=free_bits).sum().expand_as(kl)
    else:
        kl_for_loss = kl
    loss = (recon + kl_weight * kl_for_loss).mean()
    groups = {k: v.float().flatten(1).sum(1) for k, v in kl_groups.items()} if kl_groups else None
    return ELBOTerms(loss=loss, neg_elbo=recon + kl, recon=recon, kl=kl, kl_groups=groups)


def bits_per_dim(nats_per_image: Tensor | float, num_dims: int) -> Tensor | float:
    """nats per image -> bits per dimension (num_dims = C*H*W)."""
    return nats_per_image / (num_dims * math.log(2.0))
