"""The loader benchmarks read what they claim to: ours, the raw offsets loop and plain
webdataset in benchmarks/loader_peers.py (the peers that need the `bench` extra are not
installed here) yield the same images, in the same order, as the shards hold, and
benchmarks/loaders.py cuts a split to whole shards (nothing is timed here)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package beside vae_scale/
    sys.path.insert(0, str(REPO))

from benchmarks import loader_peers  # noqa: E402
from benchmarks.loaders import first_shards  # noqa: E402
from vae_scale.data.sourcing.base import SourceData  # noqa: E402
from vae_scale.data.sourcing.shards import write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """45 RGB 6x5 images, 8 to a shard, and the same images as one (N, C, H, W) tensor."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (45, 6, 5, 3), dtype=np.uint8)
    samples = [
        {"__key__": f"{i:04d}", "npy": image, "cls": i % 3} for i, image in enumerate(images)
    ]
    data = SourceData("rgb", (3, 6, 5), {"train": samples}, {})
    out = tmp_path_factory.mktemp("bench") / "rgb"
    write_dataset(data, out, shard_size=8)
    return out, torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("name", ["ours", "raw", "webdataset"])
def test_each_loader_yields_the_stored_images_in_order(shards, name, workers):
    shard_dir, expected = shards
    make = getattr(loader_peers, name)(shard_dir, 16, workers)
    batches = list(make())
    assert [len(b) for b in batches] == [16, 16, 13]
    assert torch.equal(torch.cat(batches), expected)
    wall, cpu, seen = loader_peers.one_pass(make, 45, passes=2)
    assert seen == 90 and wall > 0 and cpu > 0


def test_one_pass_refuses_a_loader_that_drops_images(shards):
    shard_dir, _ = shards
    with pytest.raises(RuntimeError, match="read 45 images, expected 50"):
        loader_peers.one_pass(loader_peers.ours(shard_dir, 16, 0), 50)


def test_first_shards_keeps_whole_shards_up_to_n(shards):
    shard_dir, _ = shards
    split = first_shards(shard_dir, n=20, min_shards=2)
    assert [s.num_samples for s in split.catalog.shards] == [8, 8, 8] and split.num_samples == 24
    split = first_shards(shard_dir, n=1, min_shards=4)
    assert len(split.catalog.shards) == 4 and split.num_samples == 32
