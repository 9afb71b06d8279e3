"""Evaluation: IWAE bound and refined posteriors against closed forms, active units, compare,
the eval command."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import tiny_frey_config
from vae_scale.analysis.evaluate import SampleNoise, iwae_nll, refined_neg_elbo
from vae_scale.config import DataConfig
from vae_scale.losses import Likelihood
from vae_scale.models.base import VAE
from vae_scale.run_files.logs import read_rows


class FixedGaussian(Likelihood):
    """Continuous N(x; mean, sigma^2) per pixel (for a model whose log p(x) is known)."""

    def __init__(self, shape, sigma):
        super().__init__(shape)
        self.sigma = sigma

    def nll(self, params, x):
        dist = torch.distributions.Normal(params.float(), self.sigma)
        return -dist.log_prob(x.float()).flatten(1).sum(1)

    def mean(self, params):
        return params


class LinearGaussianVAE(VAE):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I): log p(x) = log N(x; b, WW^T + s^2 I).
    The encoder is a deliberately imperfect linear Gaussian q(z|x)."""

    def __init__(self, w, b, sigma):
        super().__init__(None, (1, 2, 2), FixedGaussian((1, 2, 2), sigma))
        self.w, self.b = w, b
        post_cov = torch.linalg.inv(torch.eye(2) + w.T @ w / sigma**2)
        self.enc = post_cov @ w.T / sigma**2 * 0.85  # 15% off the true posterior mean
        self.logvar = torch.log(torch.diagonal(post_cov)) + 0.3

    @property
    def latent_shape(self):
        return (2,)

    def encode(self, x):
        flat = x.flatten(1) - self.b
        return flat @ self.enc.T, self.logvar.expand(len(x), 2)

    def decode(self, z):
        return (z @ self.w.T + self.b).view(-1, 1, 2, 2)


def test_iwae_converges_to_closed_form_log_likelihood():
    torch.manual_seed(0)
    w, b, sigma = torch.randn(4, 2), torch.randn(4), 0.5
    model = LinearGaussianVAE(w, b, sigma)
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(4))
    x = marginal.sample((128,))
    true_nll = -marginal.log_prob(x)
    keys = [f"k{i}" for i in range(128)]
    bounds = {
        k: iwae_nll(model, x.view(-1, 1, 2, 2), k, SampleNoise(keys, 0, "t"), max_decode=64)
        for k in (1, 10, 100, 2000)
    }
    gaps = {k: (v - true_nll).mean().item() for k, v in bounds.items()}
    # An upper bound on -log p(x) in expectation (128 points: within sampling noise) ...
    assert all(g > -0.05 for g in gaps.values()), gaps
    assert gaps[1] > gaps[10] > gaps[100]  # ... tighter as K grows ...
    assert abs(gaps[2000]) < 0.02 < 0.5 < gaps[1]  # ... and converging to the closed form


def test_iwae_tightens_with_k_on_a_trained_model():
    """A small MLP VAE trained on images made from 2 latent factors: the importance-weighted
    bound is (up to MC noise) the ELBO at K = 1 and falls as K grows."""
    from vae_scale.losses import Bernoulli, neg_elbo
    from vae_scale.models.mlp import MLPVAE, MLPVAEConfig

    torch.manual_seed(0)
    mixing = torch.randn(2, 64) * 6  # sharp likelihood: a non-Gaussian posterior

    def images(n):
        return torch.sigmoid(torch.randn(n, 2) @ mixing).view(n, 1, 8, 8)

    model = MLPVAE(MLPVAEConfig(latent_dim=2, hidden=[32]), (1, 8, 8), Bernoulli((1, 8, 8)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x = images(64)
        mu, logvar = model.encode(x)
        loss = neg_elbo(
            model.likelihood, model.decode(model.reparameterize(mu, logvar)), x, mu, logvar
        )
        optimizer.zero_grad()
        loss.neg_elbo.mean().backward()
        optimizer.step()
    model.eval()
    x = images(400)
    keys = [f"s{i}" for i in range(len(x))]
    with torch.no_grad():
        mu, logvar = model.encode(x)
        elbo = torch.stack(
            [
                neg_elbo(
                    model.likelihood, model.decode(model.reparameterize(mu, logvar)), x, mu, logvar
                ).neg_elbo.mean()
                for _ in range(20)
            ]
        ).mean()
    bounds = {
        k: iwae_nll(model, x, k, SampleNoise(keys, 0, "iw")).mean().item() for k in (1, 10, 1000)
    }
    assert bounds[1] == pytest.approx(elbo.item(), abs=0.3)
    # Steps of ~10x in K: each gap (measured 0.35 and 0.12 nats) is many times the MC error.
    assert bounds[1000] < bounds[10] < bounds[1]
    assert bounds[1] - bounds[1000] > 0.2  # the trained posterior is not exact: a real gap


def test_iwae_is_independent_of_chunking_and_batch_composition():
    torch.manual_seed(1)
    model = LinearGaussianVAE(torch.randn(4, 2), torch.randn(4), 0.5)
    x = torch.randn(6, 1, 2, 2)
    keys = [f"k{i}" for i in range(6)]
    whole = iwae_nll(model, x, 50, SampleNoise(keys, 0, "t"), max_decode=10_000)
    chunked = iwae_nll(model, x, 50, SampleNoise(keys, 0, "t"), max_decode=40)
    alone = iwae_nll(model, x[2:3], 50, SampleNoise(keys[2:3], 0, "t"))
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(whole[2:3], alone)


def test_refined_posterior_reaches_the_best_diagonal_gaussian_elbo():
    """Linear-Gaussian model: the best factorized Gaussian q has the true posterior mean and
    precision diag(Lambda), so its neg. ELBO is -log p(x) + (sum log Lambda_ii - log det
    Lambda) / 2, whatever x. Refinement from the deliberately biased encoder must get there."""
    torch.manual_seed(0)
    w, b, sigma = torch.randn(4, 2), torch.randn(4), 0.5
    model = LinearGaussianVAE(w, b, sigma)
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(4))
    x = marginal.sample((512,))
    precision = torch.eye(2) + w.T @ w / sigma**2
    mean_field_gap = 0.5 * (torch.log(torch.diagonal(precision)).sum() - torch.logdet(precision))
    best = (-marginal.log_prob(x) + mean_field_gap).mean().item()
    keys = [f"k{i}" for i in range(len(x))]
    images = x.view(-1, 1, 2, 2)
    eps = SampleNoise(keys, 0, "eval").normal((2,), "cpu")
    amortized = refined_neg_elbo(model, images, eps, SampleNoise(keys, 0, "r"), steps=0)
    refined = refined_neg_elbo(model, images, eps, SampleNoise(keys, 0, "r"), steps=300)
    # 512 single-draw estimates: the mean's MC error is ~0.05 nats
    assert refined.mean().item() == pytest.approx(best, abs=0.15)
    assert amortized.mean().item() - best > 0.5  # the biased encoder leaves a real gap (0.72)


def test_refinement_is_per_image_and_leaves_the_model_alone():
    from vae_scale.losses import neg_elbo

    torch.manual_seed(1)
    model = LinearGaussianVAE(torch.randn(4, 2), torch.randn(4), 0.5)
    model.w.requires_grad_(True)
    x = torch.randn(6, 1, 2, 2)
    keys = [f"k{i}" for i in range(6)]
    eps = SampleNoise(keys, 0, "e").normal((2,), "cpu")
    mu, logvar = model.encode(x)
    amortized = neg_elbo(
        model.likelihood, model.decode(model.reparameterize(mu, logvar, eps)), x, mu, logvar
    ).neg_elbo.detach()
    torch.testing.assert_close(
        refined_neg_elbo(model, x, eps, SampleNoise(keys, 0, "r"), steps=0), amortized
    )
    w_before = model.w.detach().clone()
    batch = refined_neg_elbo(model, x, eps, SampleNoise(keys, 0, "r"), steps=40)
    alone = refined_neg_elbo(model, x[2:3], eps[2:3], SampleNoise(keys[2:3], 0, "r"), steps=40)
    torch.testing.assert_close(batch[2:3], alone)  # an image's result ignores its batch-mates
    assert torch.equal(model.w, w_before) and model.w.grad is None
    assert batch.mean() < amortized.mean()


@pytest.mark.slow
def test_eval_command_on_a_trained_run(frey_shards, tmp_path, monkeypatch):
    from vae_scale.cli import main
    from vae_scale.training.loop import train

    run = train(tiny_frey_config(frey_shards, tmp_path, "train.epochs=2", "train.lr=3e-3"))
    assert main(["eval", str(run), "--iw-samples", "50", "--refine-steps", "30"]) == 0
    result = json.loads((run / "eval_test.json").read_text())
    elbo, iw = result["test/neg_elbo"], result["test/nll_iw50_nats"]
    assert result["likelihood_convention"] == "bce_grey"
    # one name per quantity: the training loop's last test/neg_elbo, same checkpoint
    assert elbo == pytest.approx(read_rows(run)[-1]["test/neg_elbo"], rel=1e-5)
    assert iw <= elbo  # the importance-weighted bound is tighter
    refined = result["test/neg_elbo_refined"]
    assert refined < elbo and result["eval/test/refine_steps"] == 30  # a 2-epoch encoder is far off
    assert result["test/amortization_gap"] == pytest.approx(elbo - refined)
    assert result["test/num_samples"] == 100
    assert 0 <= result["test/active_units"] <= result["test/latent_dims"] == 8
    assert sum(result["test/kl_per_dim"]) == pytest.approx(result["test/kl"], rel=1e-4, abs=1e-5)
    last_epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert elbo == pytest.approx(last_epoch["test/neg_elbo"], rel=1e-6)  # same noise per sample
    for command in (
        ["sample", str(run), "--n", "16"],
        ["reconstruct", str(run)],
        ["traverse", str(run), "--dim", "1"],
    ):
        assert main(command) == 0
    assert {p.name for p in run.glob("*.png")} >= {
        "sample_t1_n16.png",
        "reconstruct_test_n8.png",
        "traverse_dim1.png",
    }


@pytest.mark.slow
def test_training_reports_refined_test_loss_at_picture_epochs(frey_shards, tmp_path):
    from vae_scale.training.loop import train

    run = train(
        tiny_frey_config(
            frey_shards,
            tmp_path,
            "train.epochs=3",
            "eval.picture_epochs=[1]",
            "eval.refine_steps=20",
        )
    )
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    refined = {r["epoch"]: r for r in rows if "test/neg_elbo_refined" in r}
    assert sorted(refined) == [1, 3]  # the picture epoch and the last one
    for r in refined.values():
        assert r["test/neg_elbo_refined"] < r["test/neg_elbo"]
        assert r["test/amortization_gap"] == pytest.approx(
            r["test/neg_elbo"] - r["test/neg_elbo_refined"]
        )
        assert "val/neg_elbo_refined" not in r


def test_active_units_count_dead_dimensions(frey_shards, tmp_path):
    from accelerate import Accelerator

    from vae_scale.analysis.evaluate import EvalOptions, full_evaluation
    from vae_scale.config import DataConfig
    from vae_scale.data.streaming.loader import ShardSplit
    from vae_scale.losses import Bernoulli

    class HalfDead(VAE):
        def __init__(self):
            super().__init__(None, (1, 28, 20), Bernoulli((1, 28, 20)))
            self.out = nn.Parameter(torch.zeros(1, 28, 20))

        @property
        def latent_shape(self):
            return (5,)

        def encode(self, x):
            live = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1) * 20  # varies with x
            dead = torch.full((len(x), 3), 0.3)  # the same for every image
            return torch.cat([live, dead], 1), torch.zeros(len(x), 5)

        def decode(self, z):
            return self.out.expand(len(z), -1, -1, -1)

    data = ShardSplit(frey_shards / "frey", "val", DataConfig(batch_size=32))
    result = full_evaluation(Accelerator(cpu=True), HalfDead(), data, EvalOptions())
    assert result["val/active_units"] == 2
    kl = result["val/kl_per_dim"]
    assert kl[2] == kl[3] == kl[4] == pytest.approx(0.5 * 0.3**2)


@pytest.mark.slow
def test_compare_writes_table_and_plot(frey_shards, tmp_path):
    from vae_scale.analysis.compare import compare_runs
    from vae_scale.training.loop import train

    a = train(tiny_frey_config(frey_shards, tmp_path, "run.name=a", "train.epochs=1"))
    b = train(
        tiny_frey_config(
            frey_shards, tmp_path, "run.name=b", "train.epochs=1", "train.lr=3e-3",
            "data.batch_size=50",
        )
    )  # fmt: skip
    report = compare_runs([a, b], tmp_path / "report.md")
    text = report.read_text()
    assert "| train.lr | 0.001 | 0.003 |" in text
    assert "| global_batch_size | 100 | 50 |" in text  # a run fact, not a config key
    assert "model.latent_dim" not in text and "| num_processes |" not in text  # equal: not listed
    assert "| test/neg_elbo |" in text and "| best/val_neg_elbo |" in text
    from PIL import Image

    assert Image.open(report.with_suffix(".png")).size[0] > 300


def test_bpd_uses_all_dimensions(tmp_path):
    """The real per-epoch evaluation of a 3-channel split: bits/dim divide the negative ELBO
    by C*H*W (a red, green and blue value per pixel), not by H*W or one channel's count."""
    import numpy as np
    from accelerate import Accelerator

    from vae_scale.analysis.evaluate import EvalOptions, evaluate_split
    from vae_scale.data.sourcing.base import SourceData
    from vae_scale.data.sourcing.shards import write_dataset
    from vae_scale.data.streaming.loader import ShardSplit
    from vae_scale.losses import build_likelihood
    from vae_scale.models import build_model
    from vae_scale.models.mlp import MLPVAEConfig
    from vae_scale.utils.compat import reset_accelerate_state

    shape = (3, 4, 6)  # C, H, W: every axis a different size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 6, 3), dtype=np.uint8)
    samples = [{"__key__": f"{i:04d}", "npy": im} for i, im in enumerate(images)]
    data = SourceData("rgb", shape, {"test": samples}, source={"test": "synthetic"})
    write_dataset(data, tmp_path / "rgb", shard_size=8)
    split = ShardSplit(tmp_path / "rgb", "test", DataConfig(batch_size=7))
    torch.manual_seed(0)
    model = build_model(MLPVAEConfig(hidden=[8]), shape, build_likelihood("logistic", shape))
    try:
        metrics = evaluate_split(Accelerator(cpu=True), model, split, EvalOptions())
    finally:
        reset_accelerate_state()
    assert metrics["test/num_samples"] == 20
    nats = metrics["test/neg_elbo"]
    assert metrics["test/bpd"] == pytest.approx(nats / (3 * 4 * 6 * math.log(2)))
    # a 3-channel model of random pixels costs about 8 bits per value, so the count is C*H*W
    assert 6 < metrics["test/bpd"] < 12
