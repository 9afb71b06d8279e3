"""Data at cluster scale: samples an epoch leaves out (the loader before and after the global
epoch order), HTTP-loopback against local-file streaming, and time to the first batch of a
resumed epoch at 10 % and 90 % of a CIFAR-10-sized epoch.

    python benchmarks/data_at_scale.py [--workers 0 2] [--repeats 5] [--out DIR]

Shards: 90 x 500 synthetic CIFAR-shaped samples (32x32x3 uint8 npy, the size and layout
`vae-scale shard cifar10` writes), built once in --out. Throughput and latency rows run the
compared settings alternately in one process, median of --repeats, so only ratios count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vae_scale.config import DataConfig
from vae_scale.data.sourcing.base import SourceData
from vae_scale.data.sourcing.shards import write_dataset
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.data.streaming.order import EpochPlan, Topology, batches_for, global_order

CIFAR = [500] * 90
FREY = [128] * 13 + [101]


def old_batches_per_rank(counts: list[int], world: int, workers: int, batch: int) -> list[int]:
    """The rule of the loader before the global order (commit 487c4b9): whole shards per rank
    (split_by_node) and worker (split_by_worker), each worker dropping its partial batch."""
    w = max(1, workers)
    return [sum(sum(counts[rank::world][v::w]) // batch for v in range(w)) for rank in range(world)]


def dropped_rows() -> list[str]:
    rows = [
        "| dataset | ranks x workers | batch | before: left out | after: left out | bound W*B-1 |",
        "|---|---|---|---|---|---|",
    ]
    cases = [("CIFAR-10 90x500", CIFAR, 128, rw) for rw in [(8, 0), (8, 4), (16, 0), (16, 4)]]
    cases += [("CIFAR-10 90x500", CIFAR, 128, (64, 8)), ("Frey 14 shards", FREY, 32, (8, 4))]
    for name, counts, batch, (world, workers) in cases:
        total = sum(counts)
        before = world * batch * min(old_batches_per_rank(counts, world, workers, batch))
        topo = Topology(world, max(1, workers), batch)
        order = global_order(counts, 0, 1, True)
        plan = EpochPlan(order, topo, batches_for(total, topo, True), 0, 1)
        old = "no batch (error)" if before == 0 else f"{100 * (total - before) / total:.1f} %"
        rows.append(
            f"| {name} | {world} x {workers} | {batch} | {old} | "
            f"{100 * plan.dropped / total:.2f} % ({plan.dropped}) | {world * batch - 1} |"
        )
    return rows


def build_shards(root: Path) -> Path:
    folder = root / "cifar_like"
    if (folder / "index.json").is_file():
        return folder
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (sum(CIFAR), 32, 32, 3), dtype=np.uint8)
    samples = ({"__key__": f"s{i:06d}", "npy": im} for i, im in enumerate(images))
    data = SourceData("cifar_like", (3, 32, 32), {"train": samples}, source={"synthetic": 1})
    write_dataset(data, folder, shard_size=500)
    return folder


def median_s(runs: list[float]) -> float:
    return statistics.median(runs)


def throughput_rows(folder: Path, workers: list[int], repeats: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.http_shards import ShardServer

    rows = ["| workers | local img/s | HTTP loopback img/s | HTTP / local |", "|---|---|---|---|"]
    with ShardServer(folder.parent) as server:
        for w in workers:
            sources = {"local": str(folder), "http": f"{server.url}/{folder.name}"}
            times: dict[str, list[float]] = {k: [] for k in sources}
            for _ in range(repeats):
                for name, location in sources.items():
                    split = ShardSplit(
                        location, "train", DataConfig(batch_size=128, num_workers=w), shuffle=True
                    )
                    start = time.perf_counter()
                    n = sum(len(b["key"]) for b in split.train_batches(1))
                    times[name].append(time.perf_counter() - start)
            local, http = (n / median_s(times[k]) for k in ("local", "http"))
            rows.append(f"| {w} | {local:,.0f} | {http:,.0f} | {http / local:.2f} |")
    return rows


def first_batch_s(split: ShardSplit, fraction: float) -> float:
    plan, _ = split.planner.plan(1)
    start = int(plan.batches * fraction)
    t = time.perf_counter()
    next(iter(split.train_batches(1, start, plan)))
    return time.perf_counter() - t


def resume_rows(folder: Path, workers: list[int], repeats: int) -> list[str]:
    rows = [
        "| workers | first batch at 10 % (s) | at 90 % (s) | 90 % / 10 % |",
        "|---|---|---|---|",
    ]
    for w in workers:
        split = ShardSplit(
            folder,
            "train",
            DataConfig(batch_size=128, num_workers=w, shuffle_buffer=2000),
            shuffle=True,
        )
        times: dict[float, list[float]] = {0.1: [], 0.9: []}
        for _ in range(repeats):
            for fraction in times:
                times[fraction].append(first_batch_s(split, fraction))
        early, late = median_s(times[0.1]), median_s(times[0.9])
        rows.append(f"| {w} | {early:.3f} | {late:.3f} | {late / early:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="folder for the shards (default: a temp dir)")
    args = parser.parse_args()
    print("\n".join(dropped_rows()), flush=True)
    root = Path(args.out or tempfile.mkdtemp(prefix="data_at_scale_"))
    folder = build_shards(root)
    print()
    print("\n".join(resume_rows(folder, args.workers, args.repeats)), flush=True)
    print()
    print("\n".join(throughput_rows(folder, args.workers, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
