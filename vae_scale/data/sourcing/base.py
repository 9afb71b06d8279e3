"""What a dataset converter hands to the shard writer (SourceData), and the seeded split every
converter uses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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
