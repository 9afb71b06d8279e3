"""Shards -> batches: the one streaming loader every dataset uses, on 1 process or N.

Design (each point answers a known trap of webdataset under Accelerate):
- Shards are split with `wds.split_by_node` + `wds.split_by_worker`; the loader is never passed
  through `accelerator.prepare` (that would broadcast or double-split it).
- The shard order of an epoch and every worker's shuffle buffer are seeded from
  (seed, epoch[, rank, worker]), so an epoch's batches are a pure function of those numbers:
  a different order every epoch, the same order when a run is resumed.
- The number of training batches per epoch is computed from the shard sample counts in
  index.json and is the same on every rank (the smallest rank's count), so DDP never hangs on
  uneven shards. Each worker drops its last partial batch; the rule is: an epoch sees every
  sample of its rank's shards except each worker's remainder and the batches beyond the
  smallest rank's count.
- Only npy, images, json and cls are decoded; pickle members are refused, never unpickled.
- Tar members come from `tar_members` (webdataset's pipeline, a faster tar walk); with
  `cache_in_memory`, decoded shards stay in RAM so later epochs read no files at all (with
  loader workers, the split is decoded in the main process first and the forked workers
  share it).
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from vae_scale.compat import seeded_shuffle
from vae_scale.data.shards import load_index, split_shards
from vae_scale.data.tar_members import tar_samples
from vae_scale.errors import DataError
from vae_scale.seeding import derive_seed

PICKLE_SUFFIXES = {"pyd", "pickle", "pkl", "pth", "pt"}
IMAGE_SUFFIXES = ("npy", "png", "jpg", "jpeg", "webp")


def epoch_shard_order(
    shards: list[dict[str, Any]], seed: int, epoch: int, shuffle: bool
) -> list[dict[str, Any]]:
    order = list(shards)
    if shuffle:
        random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    return order


def worker_assignment(
    shards: list[dict[str, Any]], world_size: int, num_workers: int
) -> list[list[list[dict[str, Any]]]]:
    """[rank][worker] -> shards, exactly as split_by_node then split_by_worker assign them."""
    workers = max(1, num_workers)
    return [
        [shards[rank::world_size][w::workers] for w in range(workers)] for rank in range(world_size)
    ]


def batches_per_rank(
    shards: list[dict[str, Any]], world_size: int, num_workers: int, batch_size: int
) -> list[int]:
    """Full batches each rank's loader yields for this shard order (partial batches dropped)."""
    return [
        sum(sum(s["num_samples"] for s in ws) // batch_size for ws in rank_workers)
        for rank_workers in worker_assignment(shards, world_size, num_workers)
    ]


# ---------------------------------------------------------------------------- decoding


def _where(sample: dict[str, Any]) -> str:
    """ "shard NAME, sample KEY" for error messages (built only when one is raised)."""
    return f"shard {Path(str(sample.get('__url__', '?'))).name}, sample {sample.get('__key__')}"


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """`np.load(..., allow_pickle=False)` with the header parsed once per distinct header: every
    image of a dataset has the same one, and parsing it (`ast.literal_eval`) is a large part
    of reading a small image (benchmarks/RESULTS.md)."""
    if data[:8] == b"\x93NUMPY\x01\x00":  # format 1.0: 2-byte little-endian header length
        end = 10 + int.from_bytes(data[8:10], "little")
        cached = _NPY_HEADERS.get(data[:end])
        if cached is not None:
            dtype, shape, nbytes = cached
            if len(data) - end != nbytes:
                raise ValueError(
                    f"npy payload of {len(data) - end} bytes, expected {shape} {dtype}"
                )
            return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.flags.c_contiguous and not array.dtype.hasobject:
            _NPY_HEADERS[data[:end]] = (array.dtype, array.shape, array.nbytes)
        return array
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(sample: dict[str, Any], image_hwc: tuple[int, int, int]) -> dict[str, Any]:
    """Raw tar members -> {"key", "image" (uint8 CHW), "cls"?, "json"?}; errors name the shard
    and key."""
    key = sample.get("__key__")
    bad = PICKLE_SUFFIXES.intersection(sample)
    if bad:
        raise DataError(
            f"{_where(sample)}: refusing to decode pickle member(s) "
            f"{sorted(bad)} (pickle can run code; vae_scale shards hold npy/png/"
            f"json/cls only)"
        )
    suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
    if suffix is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(
            f"{_where(sample)}: no image member (expected one of "
            f"{list(IMAGE_SUFFIXES)}, found {members})"
        )
    data = sample[suffix]
    try:
        if suffix == "npy":
            image = load_npy(data)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                image = np.asarray(im.convert("L" if image_hwc[2] == 1 else "RGB"))
    except Exception as err:
        raise DataError(f"{_where(sample)}: unreadable {suffix} ({err})") from err
    if image.ndim == 2:
        image = image[..., None]
    if image.shape != tuple(image_hwc) or image.dtype != np.uint8:
        raise DataError(
            f"{_where(sample)}: image of shape {image.shape} "
            f"{image.dtype}, expected {tuple(image_hwc)} uint8 (H, W, C) as in "
            f"index.json"
        )
    out: dict[str, Any] = {"key": key, "image": np.ascontiguousarray(image.transpose(2, 0, 1))}
    if "cls" in sample:
        out["cls"] = int(sample["cls"])
    if "json" in sample:
        out["json"] = json.loads(sample["json"])
    return out


class _ReadShards:
    """Pipeline stage: shard urls -> decoded samples, shard by shard. With on_error='skip', bad
    samples are dropped and counted. With a `cache` dict, a shard that decoded cleanly is kept
    (url -> samples) and served from RAM when it comes round again in a later epoch."""

    def __init__(
        self,
        image_hwc: tuple[int, int, int],
        on_error: str,
        cache: dict[str, list[dict[str, Any]]] | None = None,
    ):
        self.image_hwc, self.on_error, self.cache = image_hwc, on_error, cache

    def __call__(self, sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        skipped = 0
        for source in sources:
            cached = self.cache.get(source["url"]) if self.cache is not None else None
            if cached is not None:
                yield from cached
                continue
            kept: list[dict[str, Any]] | None = [] if self.cache is not None else None
            tar_errors = _TarErrors(self.on_error)
            for sample in tar_samples([source], handler=tar_errors):
                try:
                    decoded = decode_sample(sample, self.image_hwc)
                except DataError as err:
                    if self.on_error != "skip":
                        raise
                    warnings.warn(f"skipping: {err}", stacklevel=1)
                    skipped += 1
                    kept = None  # a damaged shard is re-read (and re-reported) every time
                    continue
                decoded["skipped_before"], skipped = skipped, 0
                if kept is not None:
                    kept.append({**decoded, "skipped_before": 0})
                yield decoded
            if kept is not None and not tar_errors.skipped:
                self.cache[source["url"]] = kept


class _TarErrors:
    """Handler for tar reading errors: name the shard; raise, or warn and skip."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.skipped = 0  # shards whose rest was skipped

    def __call__(self, exn: Exception) -> bool:
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and ".tar" in a), "?")
        detail = exn.args[0] if exn.args else exn
        message = f"shard {where}: corrupt or truncated tar ({type(exn).__name__}: {detail})"
        if self.on_error == "skip":
            warnings.warn(f"skipping rest of {message}", stacklevel=1)
            self.skipped += 1
            return True
        raise DataError(message) from exn


class _SeededShuffle:
    """Shuffle buffer whose RNG is a function of (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(derive_seed(self.seed, "samples", self.epoch, rank, worker))
        yield from seeded_shuffle(samples, self.bufsize, rng)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "key": [s["key"] for s in samples],
        "skipped": sum(s["skipped_before"] for s in samples),
    }
    if all("cls" in s for s in samples):
        batch["cls"] = torch.tensor([s["cls"] for s in samples])
    if any("json" in s for s in samples):
        batch["json"] = [s.get("json") for s in samples]
    return batch


# ---------------------------------------------------------------------------- loader


@dataclass
class ShardSplit:
    """One split of a shard folder, read by the streaming loader."""

    shard_dir: Path
    split: str  # a split of index.json, or several joined by "+" ("train+val") read as one
    batch_size: int
    num_workers: int = 0
    seed: int = 0
    shuffle: bool = False  # shard order + sample shuffle (training)
    shuffle_buffer: int = 1000
    on_error: str = "raise"
    verify: bool = False
    world_size: int = 1
    rank: int = 0
    # Keep decoded shards in RAM after their first read: for splits that fit in memory, later
    # epochs skip the tar walk and the decoding.
    cache_in_memory: bool = False

    def __post_init__(self) -> None:
        self._cache: dict[str, list[dict[str, Any]]] | None = {} if self.cache_in_memory else None
        self.shard_dir = Path(self.shard_dir)
        self.index = load_index(self.shard_dir)
        self.shards = [
            shard
            for part in self.split.split("+")
            for shard in split_shards(self.shard_dir, self.index, part, verify=self.verify)
        ]
        c, h, w = self.index["image_shape"]
        self.image_shape = (c, h, w)
        self.num_samples = sum(s["num_samples"] for s in self.shards)
        _check_distributed_view(self.rank, self.world_size)

    def check_enough_shards(self) -> None:
        """Training needs a shard for every (rank, worker); say so at start-up, not by a hang."""
        needed = self.world_size * max(1, self.num_workers)
        if len(self.shards) < needed:
            raise DataError(
                f"{self.shard_dir}: split {self.split!r} has {len(self.shards)} shards but "
                f"{self.world_size} processes x {max(1, self.num_workers)} loader workers need "
                f"at least {needed}; lower data.num_workers or re-shard with a smaller "
                f"--shard-size"
            )

    def steps_in_epoch(self, epoch: int) -> int:
        """Batches every rank runs in `epoch` (identical on all ranks)."""
        order = epoch_shard_order(self.shards, self.seed, epoch, self.shuffle)
        return min(batches_per_rank(order, self.world_size, self.num_workers, self.batch_size))

    def _pipeline(self, epoch: int, train: bool) -> wds.DataPipeline:
        order = epoch_shard_order(self.shards, self.seed, epoch, self.shuffle)
        stages: list[Any] = [
            wds.SimpleShardList([s["path"] for s in order]),
            wds.split_by_node,
            wds.split_by_worker,
            self._reader(),
        ]
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(_SeededShuffle(self.shuffle_buffer, self.seed, epoch))
        stages.append(wds.batched(self.batch_size, collation_fn=collate, partial=not train))
        return wds.DataPipeline(*stages)

    def _reader(self) -> _ReadShards:
        c, h, w = self.image_shape
        return _ReadShards((h, w, c), self.on_error, self._cache)

    def fill_cache(self) -> None:
        """Decode every shard of the split into the RAM cache in this process, so that loader
        workers (forked each epoch; their own additions die with them) find it complete."""
        missing = [{"url": s["path"]} for s in self.shards if s["path"] not in self._cache]
        for _ in self._reader()(iter(missing)):
            pass

    def _loader(self, epoch: int, train: bool) -> wds.WebLoader:
        if self._cache is not None and self.num_workers > 0:
            self.fill_cache()
        extra = {"prefetch_factor": 4} if self.num_workers > 0 else {}
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the
        # global torch RNG, shifting the reparameterization noise after a mid-epoch resume.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "loader", epoch))
        # collate_fn: our batches are already tensors; the default would walk every batch
        # recursively through default_convert (slow; benchmarks/RESULTS.md).
        return wds.WebLoader(
            self._pipeline(epoch, train),
            batch_size=None,
            num_workers=self.num_workers,
            generator=generator,
            collate_fn=_as_is,
            pin_memory=torch.cuda.is_available(),
            **extra,
        )

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """Exactly `steps_in_epoch(epoch)` batches, skipping the first `start` (resume).

        If samples were skipped as bad (on_error='skip') and the stream ends early, it is
        topped up from a second pass, so every rank still runs the same number of steps.
        """
        steps = self.steps_in_epoch(epoch)
        produced, attempt = 0, 0
        while produced < steps:
            pass_epoch = epoch if attempt == 0 else f"{epoch}.refill{attempt}"
            before = produced
            for batch in self._loader(pass_epoch, train=True):
                if produced >= start:
                    yield batch
                produced += 1
                if produced >= steps:
                    return
            if produced == before:
                raise DataError(
                    f"{self.shard_dir}: split {self.split!r} produced no batches "
                    f"of {self.batch_size} on rank {self.rank}"
                )
            attempt += 1

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """Every sample of this rank's share of the split exactly once (partial last batch)."""
        yield from self._loader(0, train=False)


def _check_distributed_view(rank: int, world_size: int) -> None:
    """webdataset splits by RANK/WORLD_SIZE (or torch.distributed); it must agree with the
    trainer's view, else ranks silently read the same data."""
    wds_rank, wds_world, _, _ = pytorch_worker_info()
    if (wds_rank, wds_world) != (rank, world_size):
        raise RuntimeError(
            f"process {rank} of {world_size} (Accelerate) but webdataset sees rank {wds_rank} "
            f"of {wds_world}: the processes are not one distributed job. On CPU, launch with "
            f"`accelerate launch --config_file launch/cpu_2proc.yaml` (multi_gpu + "
            f"use_cpu), not `--cpu --num_processes N`."
        )
