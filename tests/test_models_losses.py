import math

import pytest
import torch

from vae_scale.errors import ConfigError
from vae_scale.losses import Bernoulli, bits_per_dim, kl_normal_standard, kl_weight, neg_elbo
from vae_scale.models import build_model
from vae_scale.models.conv import ConvVAEConfig


def test_conv_vae_shapes_on_28x20_and_mirrored_channels():
    model = build_model(ConvVAEConfig(latent_dim=7), (1, 28, 20), Bernoulli((1, 28, 20)))
    x = torch.rand(3, 1, 28, 20)
    x_params, z, mu, logvar, kl_groups = model(x)
    assert kl_groups is None  # one latent: KL against N(0, I) from (mu, logvar)
    assert x_params.shape == (3, 1, 28, 20)
    assert z.shape == mu.shape == logvar.shape == (3, 7)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == len(deconvs) == 5
    enc = [(c.in_channels, c.out_channels) for c in convs]
    dec = [(d.in_channels, d.out_channels) for d in deconvs]
    assert dec == [(o, i) for i, o in reversed(enc)]
    assert model.sample(4).shape == (4, 1, 28, 20)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 17, 23)])
def test_conv_vae_gives_back_any_input_size(shape):
    model = build_model(ConvVAEConfig(base_channels=4, num_layers=3), shape, Bernoulli(shape))
    assert model(torch.rand(2, *shape)).x_params.shape == (2, *shape)


def test_conv_vae_rejects_image_too_small():
    with pytest.raises(ConfigError, match="shrink"):
        build_model(
            ConvVAEConfig(kernel_size=5, padding=0, num_layers=5), (1, 8, 8), Bernoulli((1, 8, 8))
        )


def test_neg_elbo_matches_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0]]]])  # one image, 1x1x2 pixels
    x = torch.tensor([[[[0.25, 1.0]]]])
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])

    def bce(logit, target):
        p = 1 / (1 + math.exp(-logit))
        return -(target * math.log(p) + (1 - target) * math.log(1 - p))

    recon = bce(0.0, 0.25) + bce(2.0, 1.0)
    kl = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 4 - 1 - math.log(4.0))
    terms = neg_elbo(Bernoulli((1, 1, 2)), logits, x, mu, logvar)
    assert terms.recon.item() == pytest.approx(recon, rel=1e-6)
    assert terms.kl.item() == pytest.approx(kl, rel=1e-6)
    assert terms.loss.item() == pytest.approx(recon + kl, rel=1e-6)
    half = neg_elbo(Bernoulli((1, 1, 2)), logits, x, mu, logvar, kl_weight=0.5)
    assert half.loss.item() == pytest.approx(recon + 0.5 * kl, rel=1e-6)
    assert half.neg_elbo.item() == pytest.approx(recon + kl, rel=1e-6)  # reported unweighted


def test_kl_and_likelihood_stay_float32_under_bf16_autocast():
    mu = torch.randn(4, 8, dtype=torch.bfloat16)
    logvar = torch.full((4, 8), 15.0, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = kl_normal_standard(mu, logvar)
        nll = Bernoulli((1, 2, 2)).nll(
            torch.randn(4, 1, 2, 2, dtype=torch.bfloat16), torch.rand(4, 1, 2, 2)
        )
    assert kl.dtype == nll.dtype == torch.float32
    assert torch.isfinite(kl).all()


def test_kl_warmup_and_free_bits():
    assert [kl_weight(s, 1.0, 4) for s in (0, 2, 4, 10)] == [0.0, 0.5, 1.0, 1.0]
    assert kl_weight(1, 1.0, 4, beta_start=0.2) == pytest.approx(0.4)
    assert kl_weight(0, 0.7, 0) == 0.7
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)  # KL = 0 in every dimension
    logits, x = torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    terms = neg_elbo(Bernoulli((1, 1, 1)), logits, x, mu, logvar, free_bits=0.5)
    assert terms.loss.item() == pytest.approx(math.log(2) + 3 * 0.5)
    assert terms.kl.sum().item() == 0.0


def test_bits_per_dim():
    assert bits_per_dim(3072 * math.log(2), 3072) == pytest.approx(1.0)


def test_several_posterior_draws_encode_once_and_average_the_same_elbo():
    from einops import repeat

    from vae_scale.models.mlp import MLPVAE, MLPVAEConfig

    torch.manual_seed(0)
    model = MLPVAE(MLPVAEConfig(latent_dim=2, hidden=[16]), (1, 6, 5), Bernoulli((1, 6, 5)))
    x = torch.rand(4, 1, 6, 5)
    eps = torch.randn(3, 4, 2)  # draw k of image i: eps[k, i]
    out = model(x, eps=eps.flatten(0, 1), samples=3)
    assert out.x_params.shape == (12, 1, 6, 5) and out.z.shape == (12, 2)
    mu, logvar = model.encode(x)
    torch.testing.assert_close(out.mu, mu.repeat(3, 1))  # draw-major rows, one encoding
    torch.testing.assert_close(out.logvar, logvar.repeat(3, 1))
    terms = neg_elbo(
        model.likelihood, out.x_params, repeat(x, "b ... -> (k b) ...", k=3), out.mu, out.logvar
    )
    # the loss is the mean over the three single-draw losses with the same noise
    singles = [model(x, eps=eps[k]) for k in range(3)]
    one_draw = [neg_elbo(model.likelihood, o.x_params, x, o.mu, o.logvar).loss for o in singles]
    assert terms.loss.item() == pytest.approx(torch.stack(one_draw).mean().item(), rel=1e-6)
    assert len({round(v.item(), 4) for v in one_draw}) == 3  # the draws really differ
