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
from vae_scale.data.index import stored_dtype
from vae_scale.data.streaming import remote
from vae_scale.data.streaming.batches import Crop, batches_of
from vae_scale.data.streaming.catalog import SplitCatalog
from vae_scale.data.streaming.decode import DecodeSpec
from vae_scale.data.streaming.order import EpochPlan, Topology
from vae_scale.data.streaming.planner import EpochPlanner
from vae_scale.data.streaming.reader import BadSample, ReadOptions, ShardReader
from vae_scale.data.streaming.remote import TransferStats
from vae_scale.data.streaming.shard_view import ShardView, verified_shards
from vae_scale.data.streaming.workers import WorkerLost, WorkerMemory
from vae_scale.errors import DataError
from vae_scale.utils.compat import (
    loader_workers,
    seeded_shuffle,
    shut_down_loader_workers,
    worker_deaths_found_by_the_loader,
)
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
        spec = DecodeSpec(
            (h, w, c), data.image_size is not None, keys, data.label_key, labels,
            stored_dtype(self.catalog.index),
        )  # fmt: skip
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

    def range_batches(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Samples start..stop-1 of the split in stored order (an indexed split), whichever
        process asks: work divided by the caller (`vae-scale encode`'s shards)."""
        if not self.catalog.indexed:
            raise DataError(
                f"{self.catalog.location or self.data.urls}: split {self.split!r} has no "
                f"per-shard sample counts (index.json); a range of it cannot be read"
            )
        stream = _EvalStream(self, (start, stop))
        yield from self._loader(stream, derive_seed(self.seed, "loader", 0))

    def _loader(self, stream: IterableDataset, seed: int) -> Iterator[dict[str, Any]]:
        """The stream's batches through a DataLoader; its workers end with the iteration,
        also on an error, and a worker's DataError reaches the caller with its own message."""
        workers = self.data.num_workers
        if self._cache is not None and workers > 0:
            self.fill_cache()
        extra = {"prefetch_factor": 4} if workers > 0 else {}
        if workers > 0:
            worker_deaths_found_by_the_loader()  # a dead one: WorkerLost between batches
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
        memory = WorkerMemory(loader_workers(iterator))
        try:
            for batch in iterator:
                memory.look()
                yield batch
        except DataError as err:  # from a worker: "Caught DataError in ... Traceback ..."
            raise DataError(str(err).rsplit(f"{WORKER_ERROR}: ", 1)[-1].strip()) from None
        except (RuntimeError, OSError, EOFError) as err:
            # A dead worker surfaces as DataLoader's "worker (pid N) is killed by signal",
            # or as a broken pipe while its last batch was handed over
            lost = memory.lost()
            if lost is None:
                raise
            raise WorkerLost(memory, lost, self.rank) from err
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
            source = None
            if split._cache is None:
                limit = options.policy.max_in_memory_bytes
                source = ShardView.open(entry, options.spec, split.verified, options.verify, limit)
            if source is None:  # read the checked way, which reports what is wrong
                source = reader.load(entry, sorted(set(needed[s])))
            else:
                source.on_error = options.on_error
            loaded[s] = source
        if type(source) is not ShardView:
            yield source[m]
        elif options.on_error == "skip" and not source.unchanged():  # (one fstat a sample)
            yield BadSample(str(source.changed_error()))
        else:
            yield source, m
        left[s] -= 1
        if not left[s]:
            del loaded[s]  # the worker has moved past this shard (a view closes its file)


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
        yield from batches_of(samples, split.batch_size, count, True, stats, crop)


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
    """Evaluation: this rank's contiguous share of the split in stored order (or `bounds`:
    samples [start, stop)), each worker a contiguous part of it (index-less: whole shards,
    shard i to rank i % world_size)."""

    def __init__(self, split: ShardSplit, bounds: tuple[int, int] | None = None):
        self.split, self.bounds = split, bounds

    def __iter__(self) -> Iterator[dict[str, Any]]:
        split = self.split
        w, workers = _worker()
        parts, part = split.world_size * workers, split.rank * workers + w
        if self.bounds is not None:  # the caller's range, divided among this one's workers
            parts, part = workers, w
        stats = TransferStats()
        if split.catalog.indexed:
            first, stop = self.bounds or (0, split.num_samples)
            n = stop - first
            ids = np.arange(
                first + part * n // parts, first + (part + 1) * n // parts, dtype=np.int64
            )
            samples: Iterator[Any] = read_ids(split, ids, stats)
        else:
            reader = ShardReader(split.read_options, split._cache, stats)
            mine = split.catalog.shards[split.rank :: split.world_size][w::workers]
            samples = (s for entry in mine for s in reader.load(entry).values())
        crop = Crop(split.data.random_crop, split.seed, None)
        yield from batches_of(samples, split.batch_size, None, False, stats, crop)


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
