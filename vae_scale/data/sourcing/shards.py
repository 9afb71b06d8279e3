"""Datasets -> WebDataset tar shards, plus `index.json` describing them.

Samples are stored as raw uint8 `.npy` (H, W, C) by default: lossless, no codec, and 5-10x
faster to decode than PNG for the small images VAEs train on; the price is no compression,
which small datasets do not notice. At web scale `--format png|jpg|webp` stores each image
compressed (ImageFormat); benchmarks/RESULTS.md has sizes and decode rates.

A dataset is built in a hidden sibling folder and only renamed into place once every shard and
the index are complete, so an interrupted or failed run never leaves a half-written dataset
behind and never destroys the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from vae_scale.data.image_format import NPY, ImageFormat
from vae_scale.data.index import INDEX_NAME, SHARD_PATTERN, index_matches, make_index, publish
from vae_scale.data.members import member_table
from vae_scale.data.sourcing.base import SourceData
from vae_scale.errors import DataError
from vae_scale.utils.fsutil import fsync, sha256_file


def encode_sample(
    sample: dict[str, Any], dtype: type = np.uint8, image_format: ImageFormat = NPY
) -> dict[str, Any]:
    """Sample dict -> tar members (bytes). Only the image (npy of `dtype`: uint8 images,
    float16 latents; or `image_format`'s png/jpg/webp), cls and json: never pickle."""
    out: dict[str, Any] = {"__key__": sample["__key__"]}
    out[image_format.codec] = image_format.encode(sample["npy"], dtype)
    if "cls" in sample:
        out["cls"] = str(int(sample["cls"])).encode()
    if "json" in sample:
        out["json"] = json.dumps(sample["json"], sort_keys=True).encode()
    return out


def write_split(
    samples: Iterable[dict[str, Any]],
    out_dir: Path,
    split: str,
    shard_size: int,
    image_shape: tuple[int, int, int],
    image_format: ImageFormat = NPY,
) -> list[dict[str, Any]]:
    """Write one split with `wds.ShardWriter`; return the shard entries for the index."""
    c, h, w = image_shape
    shards: list[dict[str, Any]] = []
    in_shard = [0]  # samples in the shard being written

    def finished(fname: str) -> None:  # ShardWriter calls this after closing each shard
        path = Path(fname)
        fsync(path)
        shards.append({
            "name": path.name, "num_samples": in_shard[0], "sha256": sha256_file(path),
            "members": member_table(path).encode(),  # where each sample lies: readers slice
        })  # fmt: skip
        in_shard[0] = 0

    count = 0
    # mtime fixed so the same samples always give byte-identical shards (checksums repeat).
    with wds.ShardWriter(
        str(out_dir / SHARD_PATTERN.format(split=split)),
        maxcount=shard_size,
        verbose=0,
        post=finished,
        mtime=0,
        encoder=False,
    ) as writer:
        for sample in samples:
            arr = sample["npy"]
            if arr.shape != (h, w, c):
                raise DataError(
                    f"sample {sample['__key__']}: image shape {arr.shape}, expected "
                    f"{(h, w, c)} (H, W, C)"
                )
            # may close the previous shard first
            writer.write(encode_sample(sample, image_format=image_format))
            in_shard[0] += 1
            count += 1
    if count == 0:
        raise DataError(f"split {split!r} has no samples")
    return shards


def write_dataset(
    data: SourceData,
    out_dir: Path,
    shard_size: int,
    force: bool = False,
    image_format: ImageFormat = NPY,
) -> dict:
    """Write every split of `data` into `out_dir` (e.g. shards/frey) and its index, each
    image stored as `image_format` says.

    A no-op returning the existing index when the shards were made from the same inputs and
    settings, unless `force`.
    """
    out_dir = Path(out_dir)
    data = replace(data, params={**data.params, **image_format.params})
    if not force and index_matches(out_dir, data, shard_size):
        print(f"{out_dir} is up to date ({INDEX_NAME} matches the source); --force rebuilds")
        return json.loads((out_dir / INDEX_NAME).read_text())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    building = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        splits = {}
        for split, samples in data.splits.items():
            shards = write_split(
                samples, building, split, shard_size, data.image_shape, image_format
            )
            splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
            print(f"  {split}: {splits[split]['num_samples']} samples in {len(shards)} shards")
        index = make_index(
            data.name, data.image_shape, splits, data.source,
            {**data.params, "shard_size": shard_size}, image_format.encoding,
        )  # fmt: skip
        publish(building, out_dir, index)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return index


def load_index(shard_dir: Path | str) -> dict[str, Any]:
    """index.json of a shard folder (or URL), with a clear error when it is missing or
    unreadable."""
    from vae_scale.data.streaming.catalog import read_index
    from vae_scale.data.streaming.remote import FetchPolicy

    return read_index(str(shard_dir), FetchPolicy())
