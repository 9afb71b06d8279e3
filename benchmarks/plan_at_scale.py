"""The epoch plan at web scale, simulated (issue 43, the 2-billion-image plan): for growing
shard counts at a fixed shard size, with 1,024 ranks x 8 loader workers, how long each process
takes to compute the epoch's global order and plan, one worker's stream, an elastic re-plan
after half an epoch, and the memory each holds; and the size of index.json's entries (count,
sha256, member table) per shard. Every process computes the same plan itself, so these are
per-process costs. Nothing is read: the plan is arithmetic on shard counts.

    python -m benchmarks.plan_at_scale [--shards 1000 10000 100000] [--per-shard 1000]
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np

from vae_scale.data.members import MemberTable
from vae_scale.data.streaming.order import EpochPlan, Topology, batches_for, global_order

TOPOLOGY = Topology(world_size=1024, workers=8, batch_size=32)


def timed(fn, *args):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak


def index_bytes_per_shard(per_shard: int) -> int:
    """index.json bytes of one shard's entry: name, count, sha256 and the member table of
    per_shard samples with jpg + json + txt members of typical, varying sizes."""
    rng = np.random.default_rng(0)
    fields = ("jpg", "json", "txt")
    sizes = np.stack([rng.integers(15_000, 40_000, per_shard), rng.integers(300, 600, per_shard),
                      rng.integers(20, 200, per_shard)], 1)  # fmt: skip
    blocks = (sizes + 511) // 512 * 512 + 512  # tar header + padded data
    offsets = np.cumsum(blocks.ravel()).reshape(sizes.shape) - blocks + 512
    keys = [f"{i:09d}" for i in range(per_shard)]
    entry = {
        "name": "train-000000.tar", "num_samples": per_shard, "sha256": "0" * 64,
        "members": MemberTable(fields, keys, offsets, sizes).encode(),
    }  # fmt: skip
    return len(json.dumps(entry))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args()
    print(f"topology: {TOPOLOGY.world_size} ranks x {TOPOLOGY.workers} workers x batch "
          f"{TOPOLOGY.batch_size}; {args.per_shard} samples per shard")  # fmt: skip
    for shards in args.shards:
        counts = [args.per_shard] * shards
        n = shards * args.per_shard
        order, t_order, m_order = timed(global_order, counts, 0, 1, True)
        batches = batches_for(n, TOPOLOGY, True)
        plan, t_plan, m_plan = timed(EpochPlan, order, TOPOLOGY, batches, 0, 1, 0, 256)
        _, t_stream, _ = timed(plan.worker_stream, TOPOLOGY.world_size - 1, TOPOLOGY.workers - 1)
        _, t_replan, m_replan = timed(plan.remaining_after, batches // 2)
        row = {
            "shards": shards, "samples": n,
            "global_order_s": round(t_order, 3), "global_order_MiB": round(m_order / 2**20, 1),
            "plan_s": round(t_plan, 3), "plan_MiB": round(m_plan / 2**20, 1),
            "one_worker_stream_s": round(t_stream, 4),
            "elastic_replan_s": round(t_replan, 2),
            "elastic_replan_MiB": round(m_replan / 2**20, 1),
            "index_MiB": round(index_bytes_per_shard(args.per_shard) * shards / 2**20, 1),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        del order, plan


if __name__ == "__main__":
    main()
