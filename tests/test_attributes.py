"""Attribute vectors and latent moves, on synthetic latents with a known direction."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from vae_scale.analysis.attributes import (
    attribute_position,
    attribute_vector,
    interpolate,
    move_along,
    posterior_means,
)
from vae_scale.errors import DataError


def test_attribute_vector_recovers_a_known_direction():
    gen = torch.Generator().manual_seed(0)
    n, dim = 4000, 16
    direction = torch.zeros(dim)
    direction[3], direction[7] = 2.0, -1.5  # what "smiling" adds to a face's latent
    has = torch.rand(n, generator=gen) < 0.3
    means = torch.randn(n, dim, generator=gen) + has[:, None] * direction
    found = attribute_vector(means, has)
    expected = means[has].numpy().mean(0) - means[~has].numpy().mean(0)
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-5, atol=1e-6)
    # Within sampling noise of the true direction (std of the estimate ~0.04 per element).
    assert (found - direction).abs().max() < 0.2
    assert torch.nn.functional.cosine_similarity(found, direction, dim=0) > 0.99


def test_spatial_latents_and_0_1_flags():
    means = torch.zeros(4, 2, 3, 3)
    means[:2] = 1.0  # the first two have the attribute
    found = attribute_vector(means, torch.tensor([1, 1, 0, 0]))
    assert found.shape == (2, 3, 3) and torch.equal(found, torch.ones(2, 3, 3))


def test_attribute_vector_needs_both_groups():
    with pytest.raises(DataError, match="4 with and 0 without"):
        attribute_vector(torch.randn(4, 3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attribute flags"):
        attribute_vector(torch.randn(4, 3), torch.ones(5, dtype=torch.bool))


def test_move_along_and_interpolate_values():
    z = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    direction = torch.tensor([1.0, 0.5])
    moved = move_along(z, direction, steps=[-2, -1, 0, 1, 2])
    assert moved.shape == (2, 5, 2)
    assert torch.equal(moved[:, 2], z)  # step 0 is the face itself
    assert torch.equal(moved[1, 4], torch.tensor([4.0, 0.0]))
    assert torch.equal(moved[0, 0], torch.tensor([-2.0, 0.0]))
    a, b = torch.zeros(3, 2, 4, 4), torch.ones(3, 2, 4, 4)
    line = interpolate(a, b, steps=5)
    assert line.shape == (3, 5, 2, 4, 4)
    assert torch.equal(line[:, 0], a) and torch.equal(line[:, -1], b)
    assert torch.allclose(line[:, 1], torch.full((3, 2, 4, 4), 0.25))


def test_posterior_means_reads_attr_vectors_and_encodes_every_image():
    class Scale(torch.nn.Module):  # a linear "encoder": mu = 2 * mean pixel
        def encode(self, x):
            mu = 2 * x.mean(dim=(1, 2, 3), keepdim=False)[:, None]
            return mu, torch.zeros_like(mu)

    images = torch.tensor([0, 51, 255], dtype=torch.uint8)[:, None, None, None].expand(3, 3, 4, 4)
    batch = {"image": images, "json": [{"attr_vector": [i % 2, 1]} for i in range(3)]}
    means, attrs = posterior_means(Scale(), [batch, batch])
    assert means.shape == (6, 1) and attrs.shape == (6, 2)
    assert torch.allclose(means[:3, 0], torch.tensor([0.0, 0.4, 2.0]))
    assert attrs[:, 0].tolist() == [0, 1, 0, 0, 1, 0]
    with pytest.raises(DataError, match="no attr_vector"):
        posterior_means(Scale(), [{"image": images, "json": [{"path": "x"}] * 3}])


def test_attribute_position_names_the_choices():
    index = {"dataset": "celeba", "params": {"attributes": ["Male", "Smiling"]}}
    assert attribute_position(index, "Smiling") == 1
    with pytest.raises(DataError, match="Male, Smiling"):
        attribute_position(index, "Smiles")
    with pytest.raises(DataError, match="no attributes"):
        attribute_position({"dataset": "frey", "params": {}}, "Smiling")


# ---------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny_attr_run(tmp_path_factory):
    """A tiny ResNet VAE trained one epoch on 16x16 shards of 28 synthetic faces that carry
    two attributes (the sharder and training path of celeba, in seconds)."""
    from PIL import Image

    from conftest import REPO
    from vae_scale.config import load_config
    from vae_scale.data.sourcing.folder_sharder import (
        ImageCollection,
        ImageItem,
        Preprocess,
        shard_collection,
    )
    from vae_scale.training.loop import train

    root = tmp_path_factory.mktemp("attr_faces")
    rng = np.random.default_rng(0)
    items = []
    for i in range(28):
        low = rng.uniform(0, 255, (3, 3, 3)).astype(np.uint8)
        Image.fromarray(low).resize((20, 20), Image.Resampling.BICUBIC).save(root / f"{i:02d}.png")
        items.append(ImageItem(key=f"{i:02d}", path=f"{i:02d}.png", attrs=f"{i % 2}{i // 14}"))
    collection = ImageCollection(
        name="faces",
        root=root,
        splits={"train": items[:16], "val": items[16:20], "test": items[20:]},
        source={"synthetic": True},
        attr_names=("Smiling", "Male"),
    )
    shards = root / "shards"
    shard_collection(collection, shards / "faces", Preprocess(16, "square"), 8, workers=1)
    cfg = load_config(
        REPO / "configs" / "celeba64_resnet.yaml",
        [
            "data.dataset=faces",
            f"data.shards_dir={shards}",
            f"run.dir={root / 'runs'}",
            "run.name=tiny",
            "data.batch_size=8",
            "data.num_workers=0",
            "model.widths=[4,8]",
            "model.blocks_per_stage=0",
            "model.groups=4",
            "model.latent_dim=4",
            "train.epochs=1",
            "train.mixed_precision='no'",
            "train.channels_last=false",
            "train.warmup_steps=0",
            "loss.kl_warmup_steps=0",
            "eval.num_samples=4",
            "eval.recon_rows=2",
            "wandb.mode=disabled",
        ],
    )
    return train(cfg)


@pytest.mark.slow
def test_edit_and_interpolate_commands_write_grids_and_log_them(tiny_attr_run, monkeypatch):
    from PIL import Image

    from vae_scale import cli
    from vae_scale.training import tracking

    logged: list[dict] = []

    class FakeRun:  # what tracking.command_run gives when W&B is on
        def log(self, row):
            logged.append(row)

    monkeypatch.setattr(tracking, "command_run", lambda cfg, run_dir, kind: nullcontext(FakeRun()))
    run = str(tiny_attr_run)
    cell = 16 * 4 + 2  # 16x16 images are upscaled x4 for viewing; 2 px padding
    assert cli.main(["edit", run, "--attribute", "Smiling", "--n", "3"]) == 0
    with Image.open(tiny_attr_run / "edit_Smiling_test_n3.png") as grid:
        # 3 faces, each: the original + 5 steps (-2..+2) along the vector
        assert grid.size == (6 * cell + 2, 3 * cell + 2)
    assert cli.main(["interpolate", run, "--n", "2", "--steps", "4"]) == 0
    with Image.open(tiny_attr_run / "interpolate_test_n2.png") as grid:
        # 2 pairs, each: face A, 4 points from A's to B's latent, face B
        assert grid.size == (6 * cell + 2, 2 * cell + 2)
    assert [sorted(row) for row in logged] == [["pictures/edit_Smiling"], ["pictures/interpolate"]]


@pytest.mark.slow
def test_edit_names_the_attributes_of_the_dataset(tiny_attr_run, capsys):
    from vae_scale import cli

    assert cli.main(["edit", str(tiny_attr_run), "--attribute", "Smiles"]) == 2
    assert "unknown attribute 'Smiles'; the dataset has: Smiling, Male" in capsys.readouterr().err
