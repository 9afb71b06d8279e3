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

from vae_scale.config import DataConfig
from vae_scale.data.streaming import catalog, remote
from vae_scale.data.streaming.decode import DecodeSpec
from vae_scale.data.streaming.layout import LayoutChange, layout_of
from vae_scale.data.streaming.order import (
    EpochPlan,
    Topology,
    global_order,
    plan_record,
    steps_for,
    unpack_ids,
)
from vae_scale.data.streaming.reader import BadSample, ReadOptions, ShardReader
from vae_scale.data.streaming.remote import TransferStats
from vae_scale.data.streaming.shard_view import ShardView, verified_shards
from vae_scale.errors import ConfigError, DataError
from vae_scale.utils.compat import seeded_shuffle, shut_down_loader_workers
from vae_scale.utils.fsutil import sha256_file
from vae_scale.utils.seeding import derive_seed

WORKER_ERROR = f"{DataError.__module__}.{DataError.__qualname__}"  # as a worker's traceback ends


class ShardSplit:
    """One split of a dataset's shards as the `data` config section describes them, read by
    the streaming loader. `location`: the dataset folder or URL holding index.json ('' when
    data.urls names the shards); `split`: a split of index.json, or several joined by "+"
    ("train+val") read as one. The rest is where this process stands in the job and whether
    it trains (`shuffle`: shard order and sample shuffle)."""

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
        self.shard_dir, self.split, self.data = location, split, data
        self.shuffle, self.seed, self.world_size, self.rank = shuffle, seed, world_size, rank
        self.worker_init = worker_init
        self.batch_size = data.batch_size
        parts = split.split("+")
        urls = data.urls
        self.urls = "::".join(urls[p] for p in parts) if all(p in urls for p in parts) else None
        self.policy = fetch_policy(data)
        self.index = self._open_index()
        if self.urls:
            self.shards = catalog.pattern_entries(self.urls, self.index)
        else:
            self.shards = [
                entry
                for part in parts
                for entry in catalog.indexed_entries(str(location), self.index, part)
            ]
        self._count_samples()
        c, h, w = self._image_shape()  # as stored (decoded)
        self.image_shape = (c, h, w)  # as the model sees it
        if data.crop is not None:
            if data.crop > min(h, w):
                raise DataError(
                    f"data.crop: {data.crop} is larger than the {h}x{w} images of {location}"
                )
            self.image_shape = (c, data.crop, data.crop)
        keys = tuple(data.image_key.split(";"))
        spec = DecodeSpec((h, w, c), data.image_size is not None, keys, data.label_key, labels)
        self.read_options = ReadOptions(spec, data.on_error, data.verify_shards, self.policy)
        self._cache: dict[str, list[Any]] | None = {} if data.cache_in_memory else None
        # local shards with a member table are sliced (shard_view.py); the record of verified
        # shards exists before loader workers fork, so they share it
        self.verified = verified_shards()
        self.topology = Topology(world_size, max(1, data.num_workers), self.batch_size)
        # Training: the plan record of the epoch being trained as of the last mid-epoch
        # checkpoint (None between epochs); a resumed run continues from it.
        self.position: dict[str, Any] | None = None
        # Resuming: how the shards differ from the checkpoint's (None: the same), the rest of
        # its interrupted epoch in the current shards' ids, and whether to start that epoch
        # over when the change makes its position meaningless (--restart-epoch).
        self.layout_change: LayoutChange | None = None
        self._remapped: np.ndarray | None = None
        self.restart_epoch = False
        _check_distributed_view(rank, world_size)

    def _count_samples(self) -> None:
        self.indexed = all(s.num_samples is not None for s in self.shards)
        if self.indexed:
            self.counts = [int(s.num_samples) for s in self.shards]
            self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
            self.num_samples = int(self.offsets[-1])
        else:
            self.num_samples = self.data.samples_per_epoch or 0

    def damaged_local_shards(self) -> dict[str, str]:
        """Local shards whose bytes are not those index.json names (sha256), or missing:
        name -> what is wrong. Checked before training for the splits it only evaluates, so
        a damaged one does not surface after a whole epoch (remote shards are checked as
        they arrive)."""
        damaged = {}
        for entry in self.shards:
            if not remote.is_local(entry.url) or not entry.sha256:
                continue
            path = Path(remote.local_path(entry.url))
            if not path.is_file():
                damaged[entry.name] = "missing"
                continue
            before = path.stat()
            if sha256_file(path) != entry.sha256:
                damaged[entry.name] = "sha256 differs from index.json"
            elif path.stat() == before:  # hashed once: the first read does not hash it again
                self.verified.add(before, entry.sha256)
        return damaged

    def leave_out(self, names: set[str]) -> None:
        """Read the split without these shards (data.on_error=skip)."""
        self.shards = [s for s in self.shards if s.name not in names]
        self._count_samples()

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.position, "layout": layout_of(self.shards) if self.indexed else None}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """A checkpoint's position; when the shards changed since (data/streaming/layout.py),
        the rest of its epoch is mapped onto the current ones now, so that a change it cannot
        map is refused before anything starts."""
        self.position = values.get("plan")
        saved = values.get("layout")
        if saved is None or not self.indexed:
            return
        change = LayoutChange(saved, layout_of(self.shards))
        if not change.changed:
            return
        self.layout_change = change
        if self.position is None:
            return
        record = self.position
        try:
            self._remapped = self._remap(change, record)
        except ConfigError as err:
            if not self.restart_epoch:
                raise ConfigError(
                    f"{err}. Resume with the shards it was trained on (data.shards_dir / "
                    f"data.urls), or add --restart-epoch to train epoch {record['epoch']} from "
                    f"its start on these shards (the {record['samples_consumed']} samples it "
                    f"had trained are then trained again)"
                ) from None
            self.position = None

    def _remap(self, change: LayoutChange, record: dict[str, Any]) -> np.ndarray:
        """The current shards' ids of what `record`'s plan (over the old layout) had left."""
        counts = [s[1] for s in change.old]
        old = self._recorded_plan(
            record, global_order(counts, self.seed, record["epoch"], self.shuffle), sum(counts)
        )
        done = record["rank_batches"]
        return change.remaining(
            old.remaining_after(done), old.consumed(done), self._order(record["epoch"])
        )

    def _recorded_plan(self, record: dict[str, Any], order: np.ndarray, total: int) -> EpochPlan:
        """The plan a checkpoint's `record` describes, over the epoch's `order` of `total`."""
        samples = order
        if record.get("plan_samples") is not None:
            mask = np.zeros(total, dtype=bool)
            mask[unpack_ids(record["plan_samples"], total)] = True
            samples = order[mask[order]]
        return EpochPlan(
            samples, Topology(*record["topology"]), record["steps"], self.seed,
            record["epoch"], record["generation"], record.get("shuffle_block", self._block()),
        )  # fmt: skip

    def has(self, name: str) -> bool:
        """Whether the dataset has split `name` too (in index.json, or in data.urls)."""
        if self.urls:
            return name in self.data.urls
        return self.index is not None and name in self.index["splits"]

    def _open_index(self) -> dict[str, Any] | None:
        if self.data.index_url:
            return catalog.read_index(self.data.index_url, self.policy)
        if not self.urls:
            return catalog.read_index(str(self.shard_dir), self.policy)
        beside = catalog.index_location(self.urls)
        return None if beside is None else catalog.read_index(beside, self.policy, False)

    def _image_shape(self) -> tuple[int, int, int]:
        size = self.data.image_size
        if size is not None:
            return (self.data.channels, size, size)
        if self.index is None:
            raise DataError(
                f"{self.urls}: no index.json beside these shards, so the image size is unknown: "
                f"set data.image_size (images are resized and centre-cropped to it)"
            )
        c, h, w = self.index["image_shape"]
        return (c, h, w)

    # ------------------------------------------------------------------ epoch plans

    def check_enough_shards(self) -> None:
        """Index-less training resamples whole shards per (rank, worker): it needs enough."""
        if self.indexed:
            return
        if self.data.samples_per_epoch is None:
            raise DataError(
                f"{self.urls}: no index.json gives these shards' sample counts; set "
                f"data.samples_per_epoch (the shards are then resampled, open_clip's "
                f"convention) or shard the data with `vae-scale shard`"
            )

    def steps_in_epoch(self, epoch: int = 1, multiple: int = 1) -> int:
        """Batches every rank runs in a full epoch (identical on all ranks)."""
        return steps_for(self.num_samples, self.topology, self.data.drop_last, multiple)

    def plan(
        self, epoch: int, multiple: int = 1, record: dict[str, Any] | None = None
    ) -> tuple[EpochPlan, int]:
        """The epoch's plan and the rank batches of it already trained. `record`: a
        checkpoint's plan record of this epoch (same topology: continue it; another: re-plan
        the samples it had not trained yet)."""
        order = self._order(epoch)
        if record is None:
            return self._new_plan(order, epoch, 0, multiple), 0
        if self._remapped is not None:  # the shards changed: what was left, in their ids
            remaining, self._remapped = self._remapped, None
            return self._new_plan(remaining, epoch, record["generation"] + 1, multiple), 0
        old = self._recorded_plan(record, order, self.num_samples)
        if old.topo == self.topology:
            return old, record["rank_batches"]
        remaining = old.remaining_after(record["rank_batches"])
        return self._new_plan(remaining, epoch, old.generation + 1, multiple), 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.indexed:  # resampled: the plan only counts steps
            return np.arange(self.num_samples, dtype=np.int64)
        return global_order(self.counts, self.seed, epoch, self.shuffle)

    def _block(self) -> int:
        return self.data.shuffle_buffer if self.shuffle else 1

    def _new_plan(self, samples: np.ndarray, epoch: int, generation: int, multiple: int):
        steps = steps_for(len(samples), self.topology, self.data.drop_last, multiple)
        return EpochPlan(samples, self.topology, steps, self.seed, epoch, generation, self._block())

    def record(self, plan: EpochPlan, rank_batches: int) -> dict[str, Any]:
        """The plan record a mid-epoch checkpoint keeps."""
        out = plan_record(plan, rank_batches, self.num_samples, full=plan.generation == 0)
        out["shuffle_block"] = plan.shuffle_block
        return out

    # ------------------------------------------------------------------ batches

    def train_batches(
        self, epoch: int, start: int = 0, plan: EpochPlan | None = None
    ) -> Iterator[dict[str, Any]]:
        """The plan's batches of this rank from rank batch `start` on (exactly
        plan.steps - start of them)."""
        if plan is None:
            plan, _ = self.plan(epoch)
        self.check_enough_shards()
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
        for entry in self.shards:
            if entry.url not in self._cache:
                reader.load(entry)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ids -> (shard number, sample number within the shard)."""
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def read_ids(split: ShardSplit, ids: np.ndarray, stats: TransferStats) -> Iterator[Any]:
    """The decoded samples (or BadSample) of global `ids`, in that order. Each shard is
    loaded once, with all the samples these ids need of it, when first reached."""
    reader = ShardReader(split.read_options, split._cache, stats)
    shards, members = split.locate(ids)
    needed: dict[int, list[int]] = {}
    for s, m in zip(shards.tolist(), members.tolist()):
        needed.setdefault(s, []).append(m)
    left = {s: len(ms) for s, ms in needed.items()}
    loaded: dict[int, Any] = {}
    options = split.read_options
    for s, m in zip(shards.tolist(), members.tolist()):
        source = loaded.get(s)
        if source is None:
            entry = split.shards[s]
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
        if split.indexed:
            skip = plan.worker_batches_before(w, self.start) * split.batch_size
            samples = read_ids(split, plan.worker_stream(split.rank, w)[skip:], stats)
        else:
            samples = _resampled(split, plan, w, stats)
        crop = Crop(split.data.crop, split.seed, plan.epoch)
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
            entry = rng.choice(split.shards)
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
        if split.indexed:
            n = split.num_samples
            ids = np.arange(part * n // parts, (part + 1) * n // parts, dtype=np.int64)
            samples: Iterator[Any] = read_ids(split, ids, stats)
        else:
            reader = ShardReader(split.read_options, split._cache, stats)
            mine = split.shards[split.rank :: split.world_size][w::workers]
            samples = (s for entry in mine for s in reader.load(entry).values())
        crop = Crop(split.data.crop, split.seed, None)
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
            yield {**collate(group, bad, last_good, crop), "transfers": stats.take()}
            made, group, bad = made + 1, [], 0
    if group and count is None:
        yield {**collate(group, bad, last_good, crop), "transfers": stats.take()}
    if count is not None and made < count:
        raise DataError(f"the loader made {made} of {count} batches: shards ended early")


class Crop:
    """data.crop's window of each image: random per (seed, epoch, sample key) in training
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
