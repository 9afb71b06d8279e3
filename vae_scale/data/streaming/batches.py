"""Samples -> batches: grouping a stream's samples into batches (bad samples replaced or left
out, and counted), data.random_crop's windows, and collation: decoded samples stacked, or
samples of verified shards read straight into one array (shard_view.py), a shard changed on
disk meanwhile refused or skipped."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vae_scale.data.streaming.reader import BadSample
from vae_scale.data.streaming.remote import TransferStats
from vae_scale.data.streaming.shard_view import ShardView
from vae_scale.errors import DataError
from vae_scale.utils.seeding import derive_seed


def batches_of(
    samples: Iterator[Any],
    batch_size: int,
    count: int | None,
    fill_bad: bool,
    stats: TransferStats,
    crop: Crop | None = None,
) -> Iterator[dict[str, Any]]:
    """Group samples into batches: `count` full ones (training; a bad sample's place is taken
    by a good one of its batch, and counted), or all of them with a partial last batch
    (evaluation; bad samples are left out and counted). Each batch carries what the
    transports redid since the previous one (`transfers`: retries, refetched_bytes)."""
    made, group, bad, last_good = 0, [], 0, None
    for sample in samples:
        if count is not None and made >= count:
            return
        if isinstance(sample, BadSample):
            bad += 1
            if not fill_bad:
                continue
        else:
            last_good = sample
        group.append(sample)
        if len(group) == batch_size:
            yield _with_transfers(collate(group, bad, last_good, crop, fill_bad), stats)
            made, group, bad = made + 1, [], 0
    if group and count is None:
        yield _with_transfers(collate(group, bad, last_good, crop, fill_bad), stats)
    if count is not None and made < count:
        raise DataError(f"the loader made {made} of {count} batches: shards ended early")


def _with_transfers(batch: dict[str, Any], stats: TransferStats) -> dict[str, Any]:
    """The batch with what the transports redid since the previous one, `stats` reset (what
    TransferStats.take does, inline on this per-batch path)."""
    batch["transfers"] = {"retries": stats.retries, "refetched_bytes": stats.refetched_bytes}
    stats.retries = stats.refetched_bytes = 0
    return batch


class Crop:
    """data.random_crop's window of each image: random per (seed, epoch, sample key) in training
    (`epoch` given), the centre in evaluation (`epoch` None); `size` None: the whole image."""

    def __init__(self, size: int | None, seed: int, epoch: int | None):
        self.size, self.seed, self.epoch = size, seed, epoch

    def __call__(self, image: np.ndarray, key: str) -> np.ndarray:
        """`image`: (C, H, W)."""
        if self.size is None:
            return image
        h, w = image.shape[-2:]
        if self.epoch is None:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        else:
            rng = random.Random(derive_seed(self.seed, "crop", self.epoch, key))
            top, left = rng.randint(0, h - self.size), rng.randint(0, w - self.size)
        return image[:, top : top + self.size, left : left + self.size]


def collate(
    samples: list[Any],
    skipped: int = 0,
    fallback: Any = None,
    crop: Crop | None = None,
    fill_bad: bool = True,
) -> dict[str, Any]:
    """A batch of decoded samples (dicts, BadSample) or shard-view references (view, m)."""
    if all(type(s) is tuple for s in samples):
        return _collate_views(samples, skipped, crop, fill_bad)
    samples = [s[0].sample(s[1]) if type(s) is tuple else s for s in samples]
    if type(fallback) is tuple:
        fallback = fallback[0].sample(fallback[1])
    good = [s for s in samples if not isinstance(s, BadSample)]
    if len(good) < len(samples):
        stand_in = good[0] if good else fallback
        if stand_in is None:
            raise DataError(f"no readable sample to stand in for: {samples[0].reason}")
        samples = [stand_in if isinstance(s, BadSample) else s for s in samples]
    batch: dict[str, Any] = {
        "image": torch.from_numpy(
            np.stack([crop(s["image"], s["key"]) if crop else s["image"] for s in samples])
        ),
        "key": [s["key"] for s in samples],
        "skipped": skipped,
    }
    return add_labels(batch, samples)


def add_labels(batch: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch's `cls` (when every sample has one) and `json` (when any has one)."""
    if all("cls" in s for s in samples):
        batch["cls"] = torch.tensor([s["cls"] for s in samples])
    if any("json" in s for s in samples):
        batch["json"] = [s.get("json") for s in samples]
    return batch


def _collate_views(
    refs: list[tuple[ShardView, int]], skipped: int, crop: Crop | None, fill_bad: bool = True
) -> dict[str, Any]:
    """Samples of verified shards: every image read into one (B, H, W, C) array, then the
    batch transposed to (B, C, H, W) at once (not image by image). A shard changed on disk
    since it was verified (checked after the reads, so that no byte of the batch escapes the
    check) stops the run naming it, or with data.on_error=skip has its samples left out
    (evaluation) or replaced by others of the batch (training), counted as skipped."""
    spec = refs[0][0].spec
    h, w, c = spec.image_hwc
    images = np.empty((len(refs), h * w * c), spec.dtype)
    for row, (view, m) in zip(images, refs):
        view.read_image(m, row)
    changed = {id(view): view for view, _ in refs if not view.unchanged()}
    if changed:
        refs, images, skipped = _without_changed(refs, images, skipped, changed, fill_bad)
    keys = [view.keys[m] for view, m in refs]
    chw = torch.from_numpy(images).view(len(refs), h, w, c).permute(0, 3, 1, 2)
    if crop is not None and crop.size is not None:
        image = torch.stack([crop(x, k) for x, k in zip(chw, keys)])
    else:  # standard strides: for C = 1 `contiguous()` would keep channel-last ones, and
        # convolutions choose their kernel (and rounding) by the layout they see
        image = torch.empty((len(refs), c, h, w), dtype=chw.dtype).copy_(chw)
    batch: dict[str, Any] = {"image": image, "key": keys, "skipped": skipped}
    if spec.labels:
        return add_labels(batch, [view.labels_of(m) for view, m in refs])
    return batch


def _without_changed(
    refs: list[tuple[ShardView, int]],
    images: np.ndarray,
    skipped: int,
    changed: dict[int, ShardView],
    fill_bad: bool,
) -> tuple[list[tuple[ShardView, int]], np.ndarray, int]:
    """The batch without the samples of `changed` shards (data.on_error=skip; raise: an error
    naming the shard): left out, or their places taken by the batch's first good sample."""
    view = next(iter(changed.values()))
    if view.on_error != "skip":
        raise view.changed_error()
    good = [i for i, (v, _) in enumerate(refs) if id(v) not in changed]
    if not good:
        raise DataError(f"no readable sample left in a batch: {view.changed_error()}")
    kept = set(good)
    rows = [i if i in kept else good[0] for i in range(len(refs))] if fill_bad else good
    return [refs[i] for i in rows], images[rows], skipped + len(refs) - len(good)
