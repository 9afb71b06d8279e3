"""Diffusability of an autoencoder's latents (analysis/diffusability.py): slerp and the DCT
energy split against hand computations, iFID against a direct computation of the same
definition, and every measure in a real autoencoder run's metrics and `vae-scale eval`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from scipy.fft import dctn

from helpers.processes import one_and_two
from vae_scale.analysis.diffusability import (
    DiffusabilityOptions,
    diffusability,
    high_frequency_share,
    slerp,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_WEIGHTS = REPO.parent / "shared" / "weights"
HAVE_FID = (SHARED_WEIGHTS / "pt_inception-2015-12-05.safetensors").is_file()


def test_slerp_against_the_formula():
    a = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [2.0, 1e-9, 0.0]])  # orthogonal; and all but parallel
    half = slerp(a, b, 0.5)
    assert torch.allclose(half[0], torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    assert torch.allclose(half[1], torch.tensor([2.0, 0.0, 0.0]))  # the linear fallback
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    theta = math.pi / 3  # 60 degrees between two unit vectors: halfway is 30 degrees
    c = torch.tensor([[math.cos(theta), math.sin(theta), 0.0]])
    halfway = torch.tensor([[math.cos(0.5 * theta), math.sin(0.5 * theta), 0.0]])
    assert torch.allclose(slerp(a[:1], c, 0.5), halfway)


def test_high_frequency_share_against_hand_computations():
    maps = np.zeros((3, 2, 4, 4))
    maps[0, 0] = 5.0  # constant: all energy at (0, 0)
    maps[0, 1] = np.indices((4, 4)).sum(0) % 2 * 2 - 1  # a checkerboard: nearly all high
    high, total = high_frequency_share(maps[:1])
    assert high[0] == pytest.approx(0.0, abs=1e-12) and total[0] == pytest.approx(16 * 25)
    assert high[1] / total[1] > 0.95 and total[1] == pytest.approx(16.0)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(5, 1, 6, 8))
    high, total = high_frequency_share(noise)
    coeffs = dctn(noise, axes=(-2, -1), norm="ortho") ** 2
    u, v = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    mask = (u >= 3) | (v >= 4)
    assert high[0] == pytest.approx(coeffs[..., mask].sum())
    assert total[0] == pytest.approx((noise**2).sum())  # orthonormal: energy kept


@pytest.fixture(scope="module")
def tiny_autoencoder():
    from helpers.diffusability_probe import tiny_autoencoder

    return tiny_autoencoder((3, 16, 16))


def test_scale_equivariance_and_statistics_without_inception(tiny_autoencoder, blob_split):
    out = diffusability(
        Accelerator(cpu=True), tiny_autoencoder, blob_split, None, DiffusabilityOptions(12, 3, 0)
    )
    assert "test/ifid" not in out and out["test/diffusability_samples"] == 12
    assert 0 < out["test/latent_high_freq_share"] < 1 and 0 < out["test/image_high_freq_share"] < 1
    assert 0 < out["test/scale_equivariance_psnr"] < 60
    with torch.no_grad():
        x = torch.cat([b["image"] for b in blob_split.eval_batches()]).float()[:12] / 255
        mu = tiny_autoencoder.encode(x)[0].double()
    for c in range(4):
        assert out[f"test/latent_mean_c{c}"] == pytest.approx(mu[:, c].mean().item(), rel=1e-6)
        std = mu[:, c].std(unbiased=False).item()
        assert out[f"test/latent_std_c{c}"] == pytest.approx(std, rel=1e-5)


@pytest.fixture(scope="module")
def blob_shards(tmp_path_factory) -> Path:
    from test_autoencoder import blobs

    from vae_scale.data.sourcing.base import SourceData
    from vae_scale.data.sourcing.shards import write_dataset

    out = tmp_path_factory.mktemp("blobs")
    splits = {"train": list(blobs(16, 0)), "test": list(blobs(12, 2))}
    write_dataset(SourceData("blobs", (3, 16, 16), splits, {"synthetic": True}), out / "b", 8)
    return out / "b"


@pytest.fixture(scope="module")
def blob_split(blob_shards):
    from vae_scale.config import DataConfig
    from vae_scale.data.streaming.loader import ShardSplit

    return ShardSplit(blob_shards, "test", DataConfig(batch_size=5))


@pytest.mark.slow
def test_two_processes_measure_what_one_does(blob_shards, tmp_path):
    """Through the real `accelerate launch`: 2 ranks each encode 6 of the 12 images; the
    gathered latents give the same neighbours, statistics and (with the shared Inception)
    iFID as 1 process."""
    weights = ["--weights", str(SHARED_WEIGHTS)] if HAVE_FID else []
    shards = ["--shards", str(blob_shards)]
    one, two = one_and_two("diffusability_probe.py", [*shards, *weights], tmp_path)
    assert (one.pop("num_processes"), two.pop("num_processes")) == (1, 2)
    assert one.keys() == two.keys() and two["test/diffusability_samples"] == 12
    assert ("test/ifid" in two) == HAVE_FID
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.skipif(not HAVE_FID, reason="../shared/weights has no FID Inception")
def test_ifid_equals_a_direct_computation_of_its_definition(tiny_autoencoder, blob_split):
    """Brute-force neighbours in numpy, the same seeded pick among the k nearest, slerp by its
    formula, decoded, and the FID of their Inception features against the images'."""
    from vae_scale.perception.fid import frechet_distance
    from vae_scale.perception.networks import perception_networks
    from vae_scale.utils.seeding import derive_seed

    nets = perception_networks("off", "on", (3, 16, 16), str(SHARED_WEIGHTS), "cpu")
    model, k, seed = tiny_autoencoder, 3, 7
    out = diffusability(
        Accelerator(cpu=True), model, blob_split, nets.inception, DiffusabilityOptions(12, k, seed)
    )
    batches = list(blob_split.eval_batches())
    keys = [key for b in batches for key in b["key"]]
    x = torch.cat([b["image"] for b in batches]).float() / 255
    with torch.no_grad():
        flat = model.encode(x)[0].flatten(1).double().numpy()
        distances = ((flat[:, None] - flat[None]) ** 2).sum(-1)
        np.fill_diagonal(distances, np.inf)
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
        picks = [
            torch.randint(k, (1,), generator=torch.Generator().manual_seed(
                derive_seed(seed, "ifid", key))).item()
            for key in keys
        ]  # fmt: skip
        a, b = flat, flat[nearest[np.arange(12), picks]]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        omega = np.arccos(np.clip(cos, -1, 1))
        mid = (np.sin(0.5 * omega) / np.sin(omega))[:, None] * (a + b)
        z = torch.from_numpy(mid).float().view(12, *model.latent_shape)
        decoded = model.likelihood.mean(model.decode(z)).float().clamp(0, 1)
        real, fake = nets.inception(x), nets.inception(decoded)
    direct = frechet_distance(real.sum(0), real.T @ real, fake.sum(0), fake.T @ fake, 12)
    assert out["test/ifid"] == pytest.approx(direct, rel=1e-4)
    assert out["test/ifid"] > 0
