"""The registry `vae-scale shard NAME` reads: how each dataset is found and converted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vae_scale.data.sourcing import celeba, cifar10, folder, frey, mnist
from vae_scale.data.sourcing.base import SourceData


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
