"""What a dataset converter hands to the shard writer, and the registry of converters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SourceData:
    """Samples of every split, ready to write: dicts with `__key__`, `npy` (uint8 HWC) and
    optionally `cls` (int label) and `json` (metadata)."""

    name: str
    image_shape: tuple[int, int, int]  # C, H, W
    splits: dict[str, Iterable[dict[str, Any]]]
    source: dict[str, Any]  # files used and their checksums
    params: dict[str, Any] = field(default_factory=dict)  # what else determines the shards


def seeded_split(count: int, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """A fixed random partition of range(count) into named parts of the given sizes."""
    if sum(sizes.values()) != count:
        raise ValueError(f"split sizes {sizes} do not add up to {count}")
    perm = np.random.default_rng(seed).permutation(count)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = np.sort(perm[start : start + size])
        start += size
    return out


@dataclass
class DatasetRecipe:
    """How `vae-scale shard NAME` finds and converts a dataset."""

    prepare: Callable[..., SourceData] | None  # (source_dir, seed, download_ok) -> SourceData
    default_subdir: str  # default --source: <data root>/<default_subdir> ("": --source needed)
    default_shard_size: int
    # Image-file datasets go to the parallel, resumable writer (data/folder_sharder.py)
    # instead: (source_dir, seed, labels_from_subfolders) -> folder_sharder.ImageCollection.
    collect: Callable[..., Any] | None = None


def recipes() -> dict[str, DatasetRecipe]:
    from vae_scale.data import celeba, cifar10, folder, frey, mnist

    return {
        "frey": DatasetRecipe(frey.prepare, "freyface", default_shard_size=128),
        # 800 per shard: 69 train shards, enough for 8 processes x 8 loader workers.
        "mnist": DatasetRecipe(mnist.prepare, "mnist", default_shard_size=800),
        # 500 per shard: 90 train shards for the full 45,000, enough for 64+ GPU workers.
        "cifar10": DatasetRecipe(cifar10.prepare, "cifar10", default_shard_size=500),
        # 1000 per shard (~14 MB at 64x64): 163 train shards for the full 162,770.
        "celeba": DatasetRecipe(None, "celeba", 1000, collect=celeba.collect),
        "folder": DatasetRecipe(None, "", 1000, collect=folder.collect),
    }


def source_dir_for(name: str, data_root: Path, source: str | Path | None) -> Path:
    return Path(source) if source else data_root / recipes()[name].default_subdir
