"""Shards -> batches: the one streaming loader every dataset uses, on 1 process or N.

Design (each point answers a known trap of webdataset under Accelerate, or of data at scale):
- Every rank and loader worker reads its own contiguous slice of the epoch's global order
  (data/order.py), so ranks see disjoint samples, run the same number of steps (no hang at
  the epoch end), and an epoch leaves out at most one global batch minus one sample. The
  loader is never passed through `accelerator.prepare` (that would broadcast or double-split).
- The order is a function of (seed, epoch); a checkpoint's plan record lets a resumed run
  continue at once (consumed shards are never opened) on the same or another topology.
- Shards live anywhere data/remote.py reaches; index.json gives counts and hashes. Without an
  index (another tool's WebDataset), training resamples shards (data.samples_per_epoch per
  epoch) and evaluation reads every shard once.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.utils import pytorch_worker_info

from vae_scale.data.config import DataConfig
from vae_scale.data.streaming import remote
from vae_scale.data.streaming.catalog import SplitCatalog
from vae_scale.data.streaming.decode import DecodeSpec
from vae_scale.data.streaming.order import EpochPlan, Topology
from vae_scale.data.streaming.planner import EpochPlanner
from vae_scale.data.streaming.reader import BadSample, ReadOptions, ShardReader
from vae_scale.data.streaming.remote import TransferStats
from vae_scale.data.streaming.shard_view import ShardView, verified_shards
from vae_scale.errors import DataError
from vae_scale.utils.compat import seeded_shuffle, shut_down_loader_workers
from vae_scale.utils.seeding import derive_seed

WORKER_ERROR = f"{DataError.__module__}.{DataError.__qualname__}"  # as a worker's traceback ends


class ShardSplit:
    """One split of a dataset's shards as the `data` config section describes them, read by
    the streaming loader: `catalog` (what shards and samples it has), `planner` (the epoch
    plans and the checkpointed position: training) and the batches. `location`: the dataset
    folder or URL holding index.json ('' when data.urls names the shards); `split`: a split of
    index.json, or several joined by "+" ("train+val") read as one. The rest is where this
    process stands in the job and whether it trains (`shuffle`: shard order and sample
    shuffle)."""

    def __init__(
        self,
        location: str | Path,
        split: str,
        data: DataConfig | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        worker_init: Callable[[int], None] | None = None,  # DataLoader worker_init_fn
        labels: bool = True,  # decode labels and JSON (training and evaluation need neither)
    ):
        data = data or DataConfig()
        self.split, self.data = split, data
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.worker_init = worker_init
        self.batch_size = data.batch_size
        policy = fetch_policy(data)
        self.catalog = SplitCatalog(location, split, data, policy)
        topology = Topology(world_size, max(1, data.num_workers), self.batch_size)
        self.planner = EpochPlanner(self.catalog, topology, seed, shuffle)
        h, w, c = self.catalog.stored_hwc
        keys = tuple(data.image_key.split(";"))
        spec = DecodeSpec((h, w, c), data.image_size is not None, keys, data.label_key, labels)
        self.read_options = ReadOptions(spec, data.on_error, data.verify_shards, policy)
        self._cache: dict[str, list[Any]] | None = {} if data.cache_in_memory else None
        # local shards with a member table are sliced (shard_view.py); the record of verified
        # shards exists before loader workers fork, so they share it
        self.verified = verified_shards()
        _check_distributed_view(rank, world_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) as the model sees it (data.random_crop's window)."""
        return self.catalog.image_shape

    @property
    def num_samples(self) -> int:
        return self.catalog.num_samples

    def damaged_local_shards(self) -> dict[str, str]:
        """Local shards that are missing or whose sha256 differs from index.json, checked
        before training for the splits it only evaluates (name -> what is wrong)."""
        return self.catalog.damaged_local_shards(self.verified)

    def train_batches(
        self, epoch: int, start: int = 0, plan: EpochPlan | None = None
    ) -> Iterator[dict[str, Any]]:
        """The plan's batches of this rank from rank batch `start` on (exactly
        plan.batches - start of them)."""
        if plan is None:
            plan, _ = self.planner.plan(epoch)
        self.catalog.check_enough_shards()
        stream = _TrainStream(self, plan, start)
        yield from self._loader(stream, derive_seed(self.seed, "loader", epoch))

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """Every sample of this rank's share of the split exactly once (partial batches)."""
        yield from self._loader(_EvalStream(self), derive_seed(self.seed, "loader", 0))

    def _loader(self, stream: IterableDataset, seed: int) -> Iterator[dict[str, Any]]:
        """The stream's batches through a DataLoader; its workers end with the iteration,
        also on an error, and a worker's DataError reaches the caller with its own message."""
        workers = self.data.num_workers
        if self._cache is not None and workers > 0:
            self.fill_cache()
        extra = {"prefetch_factor": 4} if workers > 0 else {}
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the
        # global torch RNG, shifting the reparameterization noise after a mid-epoch resume.
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=_as_is,  # batches are already tensors (default_convert is slow)
            worker_init_fn=self.worker_init if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            **extra,
        )
        iterator = iter(loader)
        try:
            yield from iterator
        except DataError as err:  # from a worker: "Caught DataError in ... Traceback ..."
            raise DataError(str(err).rsplit(f"{WORKER_ERROR}: ", 1)[-1].strip()) from None
        finally:
            shut_down_loader_workers(iterator)

    def fill_cache(self) -> None:
        """Decode every shard of the split into the RAM cache in this process, so that loader
        workers (forked each epoch; their own additions die with them) find it complete."""
        reader = ShardReader(self.read_options, self._cache)
        for entry in self.catalog.shards:
            if entry.url not in self._cache:
                reader.load(entry)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def read_ids(split: ShardSplit, ids: np.ndarray, stats: TransferStats) -> Iterator[Any]:
    """The decoded samples (or BadSample) of global `ids`, in that order. Each shard is
    loaded once, with all the samples these ids need of it, when first reached."""
    reader = ShardReader(split.read_options, split._cache, stats)
    shards, members = split.catalog.locate(ids)
    needed: dict[int, list[int]] = {}
    for s, m in zip(shards.tolist(), members.tolist()):
        needed.setdefault(s, []).append(m)
    left = {s: len(ms) for s, ms in needed.items()}
    loaded: dict[int, Any] = {}
    options = split.read_options
    for s, m in zip(shards.tolist(), members.tolist()):
        source = loaded.get(s)
        if source is None:
            entry = split.catalog.shards[s]
            source = None if split._cache is not None else ShardView.open(
                entry, options.spec, split.verified, options.verify
            )  # fmt: skip
            if source is None:  # read the checked way, which reports what is wrong
                source = reader.load(entry, sorted(set(needed[s])))
            loaded[s] = source
        yield (source, m) if type(source) is ShardView else source[m]
        left[s] -= 1
        if not left[s]:
            del loaded[s]  # the worker has moved past this shard


class _TrainStream(IterableDataset):
    """A rank's training batches: each DataLoader worker plays one worker of the plan."""

    def __init__(self, split: ShardSplit, plan: EpochPlan, start: int):
        self.split, self.plan, self.start = split, plan, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        split, plan = self.split, self.plan
        loader_worker, workers = _worker()
        # Rank batch i comes from plan worker i % workers; a resumed loader starts with the
        # worker whose batch is next.
        w = (loader_worker + self.start) % workers
        count = plan.worker_batches(w) - plan.worker_batches_before(w, self.start)
        stats = TransferStats()
        if split.catalog.indexed:
            skip = plan.worker_batches_before(w, self.start) * split.batch_size
            samples = read_ids(split, plan.worker_stream(split.rank, w)[skip:], stats)
        else:
            samples = _resampled(split, plan, w, stats)
        crop = Crop(split.data.random_crop, split.seed, plan.epoch)
        yield from _batches(samples, split.batch_size, count, True, stats, crop)


def _resampled(
    split: ShardSplit, plan: EpochPlan, worker: int, stats: TransferStats
) -> Iterator[Any]:
    """Index-less training: shards drawn with replacement, seeded per (rank, worker), through a
    shuffle buffer (no exact-once guarantee; open_clip's resampled shards)."""
    rng = random.Random(
        derive_seed(split.seed, "resample", plan.epoch, plan.generation, split.rank, worker)
    )
    reader = ShardReader(split.read_options, split._cache, stats)

    def endless() -> Iterator[Any]:
        while True:
            entry = rng.choice(split.catalog.shards)
            yield from reader.load(entry).values()

    if split.data.shuffle_buffer > 1:
        yield from seeded_shuffle(endless(), split.data.shuffle_buffer, rng)
    else:
        yield from endless()


class _EvalStream(IterableDataset):
    """Evaluation: this rank's contiguous share of the split in stored order, each worker a
    contiguous part of it (index-less: whole shards, shard i to rank i % world_size)."""

    def __init__(self, split: ShardSplit):
        self.split = split

    def __iter__(self) -> Iterator[dict[str, Any]]:
        split = self.split
        w, workers = _worker()
        parts = split.world_size * workers
        part = split.rank * workers + w
        stats = TransferStats()
        if split.catalog.indexed:
            n = split.num_samples
            ids = np.arange(part * n // parts, (part + 1) * n // parts, dtype=np.int64)
            samples: Iterator[Any] = read_ids(split, ids, stats)
        else:
            reader = ShardReader(split.read_options, split._cache, stats)
            mine = split.catalog.shards[split.rank :: split.world_size][w::workers]
            samples = (s for entry in mine for s in reader.load(entry).values())
        crop = Crop(split.data.random_crop, split.seed, None)
        yield from _batches(samples, split.batch_size, None, False, stats, crop)


def _batches(
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
            yield _with_transfers(collate(group, bad, last_good, crop), stats)
            made, group, bad = made + 1, [], 0
    if group and count is None:
        yield _with_transfers(collate(group, bad, last_good, crop), stats)
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
    samples: list[Any], skipped: int = 0, fallback: Any = None, crop: Crop | None = None
) -> dict[str, Any]:
    """A batch of decoded samples (dicts, BadSample) or shard-view references (view, m)."""
    if all(type(s) is tuple for s in samples):
        return _collate_views(samples, skipped, crop)
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
    refs: list[tuple[ShardView, int]], skipped: int, crop: Crop | None
) -> dict[str, Any]:
    """Samples of verified shards: every image copied into one (B, H, W, C) array, then the
    batch transposed to (B, C, H, W) at once (not image by image)."""
    spec = refs[0][0].spec
    h, w, c = spec.image_hwc
    n = h * w * c
    images = np.empty((len(refs), n), np.uint8)
    for row, (view, m) in zip(images, refs):
        start = view.starts[m]
        row[:] = view.buffer[start : start + n]
    keys = [view.keys[m] for view, m in refs]
    chw = torch.from_numpy(images).view(len(refs), h, w, c).permute(0, 3, 1, 2)
    if crop is not None and crop.size is not None:
        image = torch.stack([crop(x, k) for x, k in zip(chw, keys)])
    else:  # standard strides: for C = 1 `contiguous()` would keep channel-last ones, and
        # convolutions choose their kernel (and rounding) by the layout they see
        image = torch.empty((len(refs), c, h, w), dtype=torch.uint8).copy_(chw)
    batch: dict[str, Any] = {"image": image, "key": keys, "skipped": skipped}
    if spec.labels:
        return add_labels(batch, [view.labels_of(m) for view, m in refs])
    return batch


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


def fetch_policy(data: DataConfig) -> remote.FetchPolicy:
    """How shards are fetched: the data section's retries, timeouts, cache and memory bound."""
    return remote.FetchPolicy(
        retries=data.retries,
        retry_delay_s=data.retry_delay_s,
        timeout_s=data.read_timeout_s,
        cache_dir=data.cache_dir,
        cache_max_bytes=int(data.cache_max_gb * 2**30),
        max_in_memory_bytes=int(data.max_shard_mb_in_memory * 2**20),
    )
