"""8-bit likelihoods against scipy, their normalisation, float32 under autocast, bits/dim."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from vae_scale.config import config_from_dict
from vae_scale.errors import ConfigError
from vae_scale.losses import (
    LIKELIHOODS,
    DiscretizedGaussian,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    bits_per_dim,
    build_likelihood,
    discretized_logistic_log_prob,
    discretized_normal_log_prob,
    neg_elbo,
)

LEVELS = np.array([0, 1, 2, 77, 102, 128, 200, 253, 254, 255])  # 102 sits at y = -0.2
# (mean, scale) in y = 2x - 1 units: broad, narrow (1/8 of a bin), off the edges, far tails
CASES = [(0.0, 0.05), (0.5, 3.0), (-0.99, 0.3), (0.9, 0.02), (-0.2, 0.001), (1.2, 0.1)]


def bin_edges(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin of each 8-bit level in y units; the end bins reach to -inf / +inf."""
    y = 2 * levels / 255 - 1
    lower = np.where(levels == 0, -np.inf, y - 1 / 255)
    upper = np.where(levels == 255, np.inf, y + 1 / 255)
    return lower, upper


def scipy_log_mass(dist, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """log(F(upper) - F(lower)) in float64, from whichever tail keeps the precision."""
    with np.errstate(divide="ignore"):
        left = np.log(dist.cdf(upper) - dist.cdf(lower))
        right = np.log(dist.sf(lower) - dist.sf(upper))
    return np.where(np.isfinite(right) & ((lower + upper) / 2 > dist.mean()), right, left)


def as_y(levels: np.ndarray) -> torch.Tensor:
    return torch.tensor(2 * levels / 255 - 1, dtype=torch.float32)


# family -> (our binned log-prob, the scipy distribution, the rtol it is held to)
BINNED = {
    "logistic": (discretized_logistic_log_prob, stats.logistic, 2e-5),
    "normal": (discretized_normal_log_prob, stats.norm, 5e-5),
}


@pytest.mark.parametrize("family", sorted(BINNED))
@pytest.mark.parametrize("mean, scale", CASES)
def test_discretized_log_prob_matches_scipy(family, mean, scale):
    log_prob, scipy_dist, rtol = BINNED[family]
    lower, upper = bin_edges(LEVELS)
    expected = scipy_log_mass(scipy_dist(loc=mean, scale=scale), lower, upper)
    got = log_prob(as_y(LEVELS), torch.tensor(mean), torch.tensor(math.log(scale))).double()
    finite = np.isfinite(expected)  # scipy underflows to -inf in the far tails; we do not
    assert finite.any()
    np.testing.assert_allclose(got.numpy()[finite], expected[finite], rtol=rtol, atol=1e-4)
    assert torch.isfinite(got).all()


def test_far_tail_log_probs_match_scipy_log_cdf():
    """Where the bin mass underflows float64, compare with scipy's log-space tails."""
    y = as_y(np.array([0, 255]))
    mean, scale = torch.tensor([0.9, -0.9]), 0.01
    got = discretized_normal_log_prob(y, mean, torch.tensor(math.log(scale)))
    expected = [
        stats.norm.logcdf(-1 + 1 / 255, loc=0.9, scale=scale),  # pixel 0: all mass below
        stats.norm.logsf(1 - 1 / 255, loc=-0.9, scale=scale),  # pixel 255: all mass above
    ]
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)
    got = discretized_logistic_log_prob(y, mean, torch.tensor(math.log(scale)))
    expected = [
        stats.logistic.logcdf(-1 + 1 / 255, loc=0.9, scale=scale),
        stats.logistic.logsf(1 - 1 / 255, loc=-0.9, scale=scale),
    ]
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["gaussian", "logistic", "logistic_mixture"])
def test_probabilities_of_all_256_levels_sum_to_one(name):
    likelihood = build_likelihood(name, (1, 1, 1))
    torch.manual_seed(0)
    params = torch.randn(3, likelihood.param_channels(1), 1, 1)
    x = torch.arange(256.0).div(255).view(256, 1, 1, 1)  # every level, one per "image"
    for p in params:
        log_p = -likelihood.nll(p.expand(256, -1, -1, -1), x)
        assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-4)


def test_logistic_likelihood_nll_sums_scipy_over_pixels_and_channels():
    shape = (2, 1, 2)  # C, H, W
    likelihood = DiscretizedLogistic(shape)
    means = np.array([[[-0.5, 0.0]], [[0.3, 0.99]]])
    log_scales = np.array([[[-2.0, -3.0]], [[-1.0, -4.0]]])
    levels = np.array([[[0, 130]], [[160, 255]]])
    params = torch.tensor(np.concatenate([means, log_scales])[None], dtype=torch.float32)
    x = torch.tensor(levels[None] / 255, dtype=torch.float32)
    lower, upper = bin_edges(levels)
    expected = -scipy_log_mass(stats.logistic(means, np.exp(log_scales)), lower, upper).sum()
    assert likelihood.param_channels(2) == 4
    assert likelihood.nll(params, x).item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(
        likelihood.mean(params), torch.tensor((np.clip(means, -1, 1) + 1) / 2).float()[None]
    )


def test_gaussian_learned_per_pixel_scale_matches_scipy_and_learns():
    shape = (1, 2, 2)
    likelihood = DiscretizedGaussian(shape)
    assert isinstance(likelihood.log_scale, torch.nn.Parameter)
    assert likelihood.log_scale.shape == shape
    assert likelihood.param_channels(1) == 1
    with torch.no_grad():
        likelihood.log_scale.copy_(torch.tensor([[[-3.0, -2.0], [-1.0, -20.0]]]))
    means = np.array([[[0.1, -0.4], [0.95, 0.0]]])
    levels = np.array([[[140, 70], [255, 128]]])
    params = torch.tensor(means[None], dtype=torch.float32)
    x = torch.tensor(levels[None] / 255, dtype=torch.float32)
    # -20 is clamped to the floor of -7 (in float32) before use
    scales = np.exp(np.array([[[-3.0, -2.0], [-1.0, -7.0]]]))
    lower, upper = bin_edges(levels)
    expected = -scipy_log_mass(stats.norm(means, scales), lower, upper).sum()
    nll = likelihood.nll(params, x)
    assert nll.item() == pytest.approx(expected, rel=1e-5)
    nll.sum().backward()
    grad = likelihood.log_scale.grad
    assert grad is not None and (grad[0, :, 0] != 0).all()  # the learned scale gets gradients
    assert grad[0, 1, 1] == 0  # clamped pixel: no gradient below the floor


def test_mixture_matches_scipy_and_one_component_is_the_logistic():
    shape = (1, 1, 3)
    k = 2
    likelihood = DiscretizedLogisticMixture(shape, components=k)
    assert likelihood.param_channels(1) == 3 * k
    logits = np.array([[0.3, -1.0, 2.0], [-0.2, 0.5, 0.0]])  # (K, W) for C = H = 1
    means = np.array([[-0.5, 0.1, 0.9], [0.4, -0.8, 0.2]])
    log_scales = np.array([[-2.0, -3.0, -1.5], [-1.0, -2.5, -4.0]])
    levels = np.array([12, 140, 255])
    params = np.stack([logits, means, log_scales])[:, :, None, None, :]  # (p, k, c, h, w)
    params = torch.tensor(params.reshape(1, 3 * k, 1, 3), dtype=torch.float32)
    x = torch.tensor(levels / 255, dtype=torch.float32).view(1, 1, 1, 3)
    lower, upper = bin_edges(levels)
    log_weights = logits - logsumexp(logits, axis=0)
    per_component = [
        scipy_log_mass(stats.logistic(means[j], np.exp(log_scales[j])), lower, upper)
        for j in range(k)
    ]
    expected = -logsumexp(log_weights + np.stack(per_component), axis=0).sum()
    assert likelihood.nll(params, x).item() == pytest.approx(expected, rel=1e-5)
    weights = np.exp(log_weights)
    expected_mean = ((weights * means).sum(0) + 1) / 2
    np.testing.assert_allclose(likelihood.mean(params).flatten().numpy(), expected_mean, rtol=1e-6)

    one = DiscretizedLogisticMixture(shape, components=1)
    single = torch.randn(1, 2, 1, 3)
    with_logit = torch.cat([torch.zeros(1, 1, 1, 3), single], dim=1)
    assert one.nll(with_logit, x).item() == pytest.approx(
        DiscretizedLogistic(shape).nll(single, x).item(), rel=1e-6
    )


@pytest.mark.parametrize("name", ["gaussian", "logistic", "logistic_mixture"])
def test_likelihoods_are_float32_under_bf16_autocast(name):
    likelihood = build_likelihood(name, (3, 4, 4))
    assert likelihood.discrete_8bit
    params = torch.randn(2, likelihood.param_channels(3), 4, 4)
    x = torch.randint(0, 256, (2, 3, 4, 4)).float() / 255
    reference = likelihood.nll(params, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = likelihood.nll(params.bfloat16(), x)
        mean = likelihood.mean(params.bfloat16())
    assert nll.dtype == torch.float32 and mean.dtype == torch.float32
    assert mean.shape == (2, 3, 4, 4) and 0 <= mean.min() and mean.max() <= 1
    # only the bf16 rounding of the inputs differs: 8 bits of mantissa
    assert torch.allclose(nll, reference, rtol=2e-2)


def test_bits_per_dim_of_a_uniform_8bit_model_is_8():
    # 256 equally likely levels: 8 bits per dimension, whatever the image size
    dims = 3 * 32 * 32
    assert bits_per_dim(dims * math.log(256), dims) == pytest.approx(8.0)
    nats = torch.tensor([dims * math.log(2) * 3.5, dims * math.log(2) * 4.5])
    assert torch.allclose(bits_per_dim(nats, dims), torch.tensor([3.5, 4.5]))


def test_neg_elbo_with_logistic_is_recon_plus_kl():
    likelihood = DiscretizedLogistic((3, 2, 2))
    params = torch.randn(4, 6, 2, 2)
    x = torch.randint(0, 256, (4, 3, 2, 2)).float() / 255
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    terms = neg_elbo(likelihood, params, x, mu, logvar)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    assert torch.allclose(terms.recon, likelihood.nll(params, x))
    assert torch.allclose(terms.neg_elbo, terms.recon + kl, rtol=1e-6)


def test_config_accepts_the_new_likelihoods_and_names_the_key():
    base = {"model": {"name": "resnet"}}
    for name in ("gaussian", "logistic", "logistic_mixture"):
        assert name in LIKELIHOODS
        assert config_from_dict({**base, "loss": {"likelihood": name}}).loss.likelihood == name
    with pytest.raises(ConfigError, match="loss.likelihood: expected one of"):
        config_from_dict({**base, "loss": {"likelihood": "laplace"}})
