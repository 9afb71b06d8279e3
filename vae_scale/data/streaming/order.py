"""Which samples each (rank, loader worker) reads in an epoch, and in which order.

Pure functions of numbers, computed identically in every process (no communication):

- The epoch's *global order* is a function of (seed, epoch) alone: the split's shards in a
  seeded permutation, each shard's samples in their stored order. A sample is named by its
  global id (its position in the split's index: shard offsets plus member number).
- A *plan* cuts the order (or what remains of it after an elastic resume) into `batches`
  global batches of world_size x batch_size samples. Rank r reads the r-th contiguous slice
  of batches x batch_size samples; within the rank, worker w reads a contiguous sub-slice
  holding its batches (the DataLoader takes batches from workers round robin, so rank batch i
  comes from worker i mod workers). Ranks therefore run exactly the same number of batches.
- `drop_last` (default) leaves out the short tail: at most one global batch minus one sample.
  Without it the tail is filled by wrapping to the order's start, and the repeats are counted.
- Inside a worker's slice, blocks of `shuffle_block` consecutive samples are permuted (seeded
  by the plan, the rank, the worker and the block): a bounded shuffle whose state is a pure
  function of the position, so a resumed worker starts at any position without replaying.
- A checkpoint records the plan (its topology and the samples it started from) and how many
  batches each rank consumed. The same topology continues the same plan; another topology
  (processes, workers, batch size) re-plans what remains, so no sample of the interrupted
  epoch is trained twice or skipped.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from vae_scale.utils.seeding import derive_seed


@dataclass(frozen=True)
class Topology:
    world_size: int
    workers: int  # DataLoader workers per rank, at least 1 (0 workers read like 1)
    batch_size: int  # per rank and batch

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size


def global_order(counts: list[int], seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Global sample ids of the whole split in the epoch's order (shards permuted)."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shards = np.arange(len(counts))
    if shuffle:
        shards = np.random.default_rng(derive_seed(seed, "shards", epoch)).permutation(shards)
    return np.concatenate(
        [np.arange(offsets[s], offsets[s + 1]) for s in shards] or [np.zeros(0, np.int64)]
    )


def batches_for(num_samples: int, topo: Topology, drop_last: bool, multiple: int = 1) -> int:
    """Batches per rank for `num_samples`: whole multiples of `multiple` (gradient
    accumulation), rounded down (drop_last) or up (the tail wrapped)."""
    unit = topo.global_batch * multiple
    cycles = num_samples // unit if drop_last else -(-num_samples // unit)
    return cycles * multiple


@dataclass
class EpochPlan:
    """One plan of an epoch (see the module docstring). `samples`: the global ids it covers,
    in order; `generation`: 0 for an epoch's first plan, +1 per elastic re-plan."""

    samples: np.ndarray
    topo: Topology
    batches: int  # per rank
    seed: int
    epoch: int
    generation: int = 0
    shuffle_block: int = 1

    def __post_init__(self) -> None:
        used = self.batches * self.topo.global_batch
        n = len(self.samples)
        self.dropped = max(0, n - used)
        self.padded = max(0, used - n)  # tail filled from the order's start (repeats)
        if self.padded:
            self.sequence = np.concatenate([self.samples, np.resize(self.samples, self.padded)])
        else:
            self.sequence = self.samples[:used]

    def worker_batches(self, worker: int) -> int:
        """Batches worker `worker` yields on every rank."""
        w = self.topo.workers
        return self.batches // w + (worker < self.batches % w)

    def worker_slice(self, rank: int, worker: int) -> np.ndarray:
        """The global ids worker `worker` of `rank` reads, in read (unshuffled) order."""
        b = self.topo.batch_size
        first = rank * self.batches * b + sum(self.worker_batches(v) for v in range(worker)) * b
        return self.sequence[first : first + self.worker_batches(worker) * b]

    def worker_stream(self, rank: int, worker: int) -> np.ndarray:
        """The worker's ids in the order it emits them: blocks of `shuffle_block` permuted."""
        ids = self.worker_slice(rank, worker)
        size = self.shuffle_block
        if size <= 1:
            return ids
        out = ids.copy()
        for start in range(0, len(ids), size):
            seed = derive_seed(self.seed, "block", self.epoch, self.generation, rank, worker, start)
            block = out[start : start + size]
            out[start : start + size] = block[np.random.default_rng(seed).permutation(len(block))]
        return out

    def worker_batches_before(self, worker: int, rank_batches: int) -> int:
        """How many of the first `rank_batches` batches of a rank came from `worker`."""
        return max(0, -(-(rank_batches - worker) // self.topo.workers))

    def consumed(self, rank_batches: int) -> np.ndarray:
        """Global ids trained by every rank's first `rank_batches` batches."""
        b = self.topo.batch_size
        parts = [
            self.worker_stream(r, w)[: self.worker_batches_before(w, rank_batches) * b]
            for r in range(self.topo.world_size)
            for w in range(self.topo.workers)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def remaining_after(self, rank_batches: int) -> np.ndarray:
        """`samples` (in order) minus those consumed: what a re-plan has left to train."""
        done = np.zeros(int(self.samples.max(initial=-1)) + 1, dtype=bool)
        done[self.consumed(rank_batches)] = True
        return self.samples[~done[self.samples]]

    def describe(self) -> str:
        t = self.topo
        text = (
            f"epoch {self.epoch}: {self.batches * t.global_batch - self.padded} of "
            f"{len(self.samples)} samples in {self.batches} batches of {t.world_size} x "
            f"{t.batch_size}; {self.dropped} left out (data.drop_last)"
        )
        return text + (f", {self.padded} repeated to fill the last batch" if self.padded else "")


# ---------------------------------------------------------------------------- checkpoints


def pack_ids(ids: np.ndarray, total: int) -> str:
    """A set of global ids as a compressed bitmask (compact in a JSON checkpoint)."""
    mask = np.zeros(total, dtype=bool)
    mask[ids] = True
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 9)).decode()


def unpack_ids(text: str, total: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8))
    return np.flatnonzero(bits[:total])


def plan_record(plan: EpochPlan, rank_batches: int, total: int, full: bool) -> dict[str, Any]:
    """What a checkpoint keeps of the epoch's position (`full`: the plan covers the whole
    order, so its samples need not be stored)."""
    t = plan.topo
    return {
        "epoch": plan.epoch,
        "generation": plan.generation,
        "topology": [t.world_size, t.workers, t.batch_size],
        "batches": plan.batches,
        "rank_batches": rank_batches,
        "samples_consumed": rank_batches * t.global_batch,
        "plan_samples": None if full else pack_ids(plan.samples, total),
    }
