"""Shared fixtures: real data from ../shared/data when present, else tiny data we make."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests and CI use the real files when they are beside the checkout.
if not os.environ.get("VAE_SCALE_DATA") and SHARED_DATA.is_dir():
    os.environ["VAE_SCALE_DATA"] = str(SHARED_DATA)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def real_data_root() -> Path | None:
    root = os.environ.get("VAE_SCALE_DATA")
    return Path(root) if root and Path(root).is_dir() else None


@pytest.fixture(scope="session")
def frey_source(tmp_path_factory) -> Path:
    """A folder holding frey_rawface.mat: the real one if available, else a synthetic one
    of the same format (smooth random faces, uint8 (560, 1965), variable 'ff')."""
    root = real_data_root()
    if root and (root / "freyface" / "frey_rawface.mat").is_file():
        return root / "freyface"
    from scipy.io import savemat

    folder = tmp_path_factory.mktemp("freyface")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:20]
    blobs = [
        np.exp(-((yy - rng.uniform(5, 23)) ** 2 + (xx - rng.uniform(4, 16)) ** 2) / 30.0)
        for _ in range(1965)
    ]
    images = (np.stack(blobs) * 200 + 20).astype(np.uint8)  # (1965, 28, 20)
    savemat(folder / "frey_rawface.mat", {"ff": images.reshape(1965, -1).T})
    return folder


@pytest.fixture(scope="session")
def frey_shards(frey_source, tmp_path_factory) -> Path:
    """shards/ folder (parent of frey/) built once per test session."""
    from vae_scale.data.sourcing import frey
    from vae_scale.data.sourcing.shards import write_dataset

    out = tmp_path_factory.mktemp("shards")
    write_dataset(
        frey.prepare(frey_source, seed=0, download_ok=False), out / "frey", shard_size=128
    )
    return out


def tiny_overrides(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    """Command-line overrides that put a run on test shards and a test run folder, W&B off."""
    return [
        f"data.shards_dir={shards}",
        f"run.dir={run_dir}",
        "run.name=tiny",
        "wandb.mode=disabled",
        *overrides,
    ]


def tiny_config(config: str, shards: Path, run_dir: Path, *overrides: str):
    """A shipped config (configs/CONFIG.yaml) through `tiny_overrides`, shrunk by `overrides`
    (each test file's preset first, then the test's own): the one tiny-config builder."""
    from vae_scale.config import load_config

    return load_config(
        REPO / "configs" / f"{config}.yaml", tiny_overrides(shards, run_dir, *overrides)
    )


# Pinned so tests do not follow the shipped config's tuning.
TINY_FREY = (
    "model.base_channels=8 model.latent_dim=8 train.epochs=2 data.batch_size=100 "
    "loss.kl_warmup_steps=0 model.activation=relu eval.picture_epochs=[1] "
    "loss.likelihood=bernoulli"
).split()


def tiny_frey_config(shards: Path, run_dir: Path, *overrides: str):
    """A small conv VAE on Frey shards that trains in seconds on the CPU."""
    return tiny_config("frey_conv", shards, run_dir, *TINY_FREY, *overrides)
