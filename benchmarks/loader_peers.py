"""Our shard loader against its peers, per wall-second and per CPU-second.

The same images (CIFAR-10 train and CelebA 64x64 as `vae-scale shard` writes them), the same
batch (uint8 (B, C, H, W) tensors out, in stored order), read one pass at a time in
alternating rounds, with 0 and 1 DataLoader workers:
- ours: `ShardSplit.eval_batches` (each image once in stored order, labels off);
- webdataset: a plain `wds.WebDataset` pipeline over the same tar files (npy decoded);
- mds: MosaicML Streaming's `StreamingDataset` over an MDS copy (`ndarray:uint8:H,W,C`);
- litdata: LitData's `StreamingDataset` / `StreamingDataLoader` over an `optimize`d copy;
- raw: the limit, a loop over the same tar files with precomputed offsets (one read per
  shard, one `np.frombuffer` per image, a stack and a transpose per batch).
CPU time is this process's plus its reaped children's (the loader workers). Peers missing
from the environment are skipped and named; install them with the `bench` extra, in an
environment of their own (MosaicML Streaming pins an older numpy):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'
    .venv-bench/bin/python -m benchmarks.loader_peers --data ../shared/data --out /tmp/peers

Then the training-input overhead: steps of the CIFAR-10 ResNet VAE (`--overhead-overrides`
for a smaller one) fed by our loader, with the share of step time spent waiting for the next
batch, vs the same batches already in memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from vae_scale.config import DataConfig
from vae_scale.data.members import MemberTable
from vae_scale.data.streaming.loader import ShardSplit

Pass = Callable[[], Iterable[torch.Tensor]]  # one pass over the images -> uint8 BCHW batches


def cpu_seconds() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def chw(batch: torch.Tensor) -> torch.Tensor:
    return batch.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------- the data


def prepare(dataset: str, data_root: Path, out: Path) -> Path:
    """Our shards of `dataset` under out/shards (made once, with our sharder)."""
    from vae_scale.cli import main

    shard_dir = out / "shards" / dataset
    if not (shard_dir / "index.json").is_file():
        code = main(["shard", dataset, "--data-root", str(data_root), "--out", str(out / "shards"),
                     "--no-download"])  # fmt: skip
        if code:
            raise SystemExit(f"sharding {dataset} failed")
    return shard_dir


def train_shards(shard_dir: Path) -> tuple[list[Path], list[MemberTable], tuple[int, int, int]]:
    index = json.loads((shard_dir / "index.json").read_text())
    shards = index["splits"]["train"]["shards"]
    c, h, w = index["image_shape"]
    tables = [MemberTable.decode(s["members"]) for s in shards]
    return [shard_dir / s["name"] for s in shards], tables, (h, w, c)


def all_images(paths: list[Path], tables: list[MemberTable], hwc) -> Iterator[np.ndarray]:
    n = int(np.prod(hwc))
    for path, table in zip(paths, tables):
        data = path.read_bytes()
        offsets, sizes = table.column("npy")
        for o, s in zip(offsets.tolist(), sizes.tolist()):
            yield np.frombuffer(data, np.uint8, n, o + s - n).reshape(hwc)


# ---------------------------------------------------------------------------- the loaders


def ours(shard_dir: Path, batch: int, workers: int) -> Pass:
    data = DataConfig(batch_size=batch, num_workers=workers)
    split = ShardSplit(shard_dir, "train", data, shuffle=False, labels=False)
    return lambda: (b["image"] for b in split.eval_batches())  # each image once, in order


class _RawStream(IterableDataset):
    def __init__(self, paths, tables, hwc, batch):
        self.paths, self.tables, self.hwc, self.batch = paths, tables, hwc, batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = int(np.prod(self.hwc))
        pending: list[np.ndarray] = []
        for path, table in zip(self.paths, self.tables):
            data = path.read_bytes()  # one read per shard
            offsets, sizes = table.column("npy")
            for start in (offsets + sizes - n).tolist():
                pending.append(np.frombuffer(data, np.uint8, n, start))
                if len(pending) == self.batch:
                    yield self._batch(pending)
                    pending = []
        if pending:
            yield self._batch(pending)

    def _batch(self, images: list[np.ndarray]) -> torch.Tensor:
        return chw(torch.from_numpy(np.stack(images).reshape(-1, *self.hwc)))


def raw(shard_dir: Path, batch: int, workers: int) -> Pass:
    stream = _RawStream(*train_shards(shard_dir), batch)
    return lambda: DataLoader(stream, batch_size=None, num_workers=workers)


def webdataset(shard_dir: Path, batch: int, workers: int) -> Pass:
    import webdataset as wds

    urls = [str(p) for p in train_shards(shard_dir)[0]]
    pipeline = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode()
        .to_tuple("npy")
        .map(lambda t: t[0])
        .batched(batch, collation_fn=lambda xs: chw(torch.from_numpy(np.stack(xs))))
    )
    return lambda: DataLoader(pipeline, batch_size=None, num_workers=workers)


def mds(shard_dir: Path, batch: int, workers: int, out: Path) -> Pass:
    from streaming import MDSWriter, StreamingDataset

    paths, tables, hwc = train_shards(shard_dir)
    local = out / "mds" / shard_dir.name
    if not (local / "index.json").is_file():
        column = "ndarray:uint8:" + ",".join(map(str, hwc))
        with MDSWriter(out=str(local), columns={"image": column}, size_limit=1 << 26) as writer:
            for image in all_images(paths, tables, hwc):
                writer.write({"image": image})
    dataset = StreamingDataset(local=str(local), batch_size=batch, shuffle=False)
    loader = DataLoader(
        dataset, batch_size=batch, num_workers=workers,
        collate_fn=lambda xs: chw(torch.from_numpy(np.stack([x["image"] for x in xs]))),
    )  # fmt: skip
    return lambda: loader


def _litdata_item(item: tuple[str, int, int, int]) -> dict:
    path, offset, size, shape = item[0], item[1], item[2], item[3]
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    return {"image": np.frombuffer(data, np.uint8).reshape(shape)}


def litdata(shard_dir: Path, batch: int, workers: int, out: Path) -> Pass:
    import litdata as ld

    paths, tables, hwc = train_shards(shard_dir)
    local = out / "litdata" / shard_dir.name
    if not (local / "index.json").is_file():
        n = int(np.prod(hwc))
        inputs = [
            (str(p), int(o + s - n), n, hwc)
            for p, t in zip(paths, tables)
            for o, s in zip(*(c.tolist() for c in t.column("npy")))
        ]
        ld.optimize(fn=_litdata_item, inputs=inputs, output_dir=str(local),
                    chunk_bytes="64MB", num_workers=1)  # fmt: skip
    dataset = ld.StreamingDataset(str(local))
    loader = ld.StreamingDataLoader(
        dataset, batch_size=batch, num_workers=workers,
        collate_fn=lambda xs: chw(torch.from_numpy(np.stack([x["image"] for x in xs]))),
    )  # fmt: skip
    return lambda: loader


# ---------------------------------------------------------------------------- measuring


def one_pass(make: Pass, expected: int, passes: int = 1) -> tuple[float, float, int]:
    """Wall and CPU seconds of `passes` epochs over the images (a loader made per epoch, as a
    training loop makes one), and the images read."""
    # Linux's default; a peer's import may have switched the process to spawn
    multiprocessing.set_start_method("fork", force=True)
    gc.collect()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    seen = 0
    for _ in range(passes):
        iterator = iter(make())
        for images in iterator:
            assert images.dtype == torch.uint8 and images.is_contiguous()
            seen += len(images)
        del iterator
    gc.collect()  # loader workers joined and reaped: their CPU time is in RUSAGE_CHILDREN
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    if seen != expected * passes:
        raise RuntimeError(f"{passes} passes read {seen} images, expected {expected} each")
    return wall, cpu, seen


def compare(args: argparse.Namespace, dataset: str) -> list[dict]:
    shard_dir = prepare(dataset, args.data, args.out)
    expected = sum(len(t.keys) for t in train_shards(shard_dir)[1])
    makers: dict[str, Callable[[int], Pass]] = {
        "ours": lambda w: ours(shard_dir, args.batch, w),
        "raw": lambda w: raw(shard_dir, args.batch, w),
        "webdataset": lambda w: webdataset(shard_dir, args.batch, w),
        "mds": lambda w: mds(shard_dir, args.batch, w, args.out),
        "litdata": lambda w: litdata(shard_dir, args.batch, w, args.out),
    }
    rows = []
    for workers in args.workers:
        loaders: dict[str, Pass] = {}
        for name, make in makers.items():
            if name not in args.loaders:
                continue
            try:
                loaders[name] = make(workers)
            except ImportError as err:
                print(f"{name}: not installed ({err.name}); pip install -e '.[bench]'")
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
        passes = -(-args.min_images // expected)  # epochs per measurement
        for name in loaders:  # warm the page cache, the imports and the peers' own caches
            one_pass(loaders[name], expected)
        names = list(loaders)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # alternating
                wall, cpu, _ = one_pass(loaders[name], expected, passes)
                times[name].append((wall, cpu))
        for name, runs in times.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            rows.append({
                "dataset": dataset, "workers": workers, "loader": name,
                "images": expected * passes, "img_per_wall_s": expected * passes / wall,
                "img_per_cpu_s": expected * passes / cpu,
                "cpu_ratios": [c for _, c in runs],
            })  # fmt: skip
    return rows


def input_overhead(args: argparse.Namespace) -> list[dict]:
    """Seconds per training step of the CIFAR-10 ResNet VAE fed by our loader (and the share
    of it spent waiting for input) vs by the same batches already in memory."""
    from vae_scale.config import load_config
    from vae_scale.losses import build_likelihood
    from vae_scale.models import build_model

    steps = args.overhead_steps
    shard_dir = prepare("cifar10", args.data, args.out)
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "cifar10_resnet.yaml", args.overhead_overrides
    )
    shape = (3, 32, 32)
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape))
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    rows = []
    for workers in args.workers:
        split = ShardSplit(
            shard_dir, "train",
            DataConfig(batch_size=cfg.data.batch_size, num_workers=workers), labels=False,
        )  # fmt: skip

        def step(images: torch.Tensor) -> None:
            x = images.float().div_(255)
            out = model(x, torch.randn(len(x), *model.latent_shape))
            loss = out.x_params.float().mean() + out.mu.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        def interleaved(
            split: ShardSplit, kept: list[torch.Tensor]
        ) -> tuple[list[float], list[float], float]:
            """Seconds of each fed step (waiting for the batch included) and of each step on
            a batch already in memory, taken in turn so that drift falls on both alike, and
            the share of the fed steps' time spent waiting. The loader's start-up (its first
            batch) is timed apart."""
            batches = (b["image"] for b in split.train_batches(1))
            step(next(batches))
            fed, resident, waited = [], [], 0.0
            for i in range(steps):
                t0 = time.perf_counter()
                images = next(batches)
                t1 = time.perf_counter()
                step(images)
                fed.append(time.perf_counter() - t0)
                waited += t1 - t0
                t0 = time.perf_counter()
                step(kept[i % len(kept)])
                resident.append(time.perf_counter() - t0)
            return fed, resident, waited / sum(fed)

        def first_batch(split: ShardSplit) -> float:
            t0 = time.perf_counter()
            next(iter(split.train_batches(1)))
            return time.perf_counter() - t0

        kept = [b["image"] for _, b in zip(range(steps), split.train_batches(1))]
        fed, resident, start, wait = [], [], [], []
        for _ in range(args.rounds):
            fed_s, resident_s, wait_share = interleaved(split, kept)
            fed += fed_s
            resident += resident_s
            wait.append(wait_share)
            start.append(first_batch(split))
        fed_s, resident_s = statistics.median(fed), statistics.median(resident)
        rows.append({
            "workers": workers, "step_s_fed": fed_s, "step_s_in_memory": resident_s,
            "overhead": fed_s / resident_s - 1, "input_wait_share": statistics.median(wait),
            "first_batch_s": statistics.median(start), "steps": steps, "rounds": args.rounds,
            "batch": cfg.data.batch_size, "overrides": args.overhead_overrides,
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | workers | loader | img/wall-s | img/CPU-s | ours / it (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = (row["dataset"], row["workers"])
        base = next(
            r for r in rows if r["loader"] == "ours" and (r["dataset"], r["workers"]) == same
        )
        lines.append(
            f"| {row['dataset']} | {row['workers']} | {row['loader']} | "
            f"{row['img_per_wall_s']:,.0f} | {row['img_per_cpu_s']:,.0f} | "
            f"{base['img_per_cpu_s'] / row['img_per_cpu_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("VAE_SCALE_DATA", "data")))
    parser.add_argument("--out", type=Path, default=Path("bench_peers"))
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "celeba"])
    parser.add_argument("--loaders", nargs="*",
                        default=["ours", "raw", "webdataset", "mds", "litdata"])  # fmt: skip
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-images", type=int, default=50_000, help="per measurement")
    parser.add_argument("--no-overhead", action="store_true", help="skip the training overhead")
    parser.add_argument("--overhead-steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--overhead-overrides", nargs="*", default=[],
                        help="config overrides for the timed model")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = (
        [row for dataset in args.datasets for row in compare(args, dataset)] if args.loaders else []
    )
    if rows:
        print(table(rows))
    result = {"loaders": rows}
    if not args.no_overhead:
        result["input_overhead"] = input_overhead(args)
        for row in result["input_overhead"]:
            print(
                f"training input overhead, {row['workers']} workers "
                f"{' '.join(row['overrides'])}: waiting for input {row['input_wait_share']:.2%} "
                f"of the step time; median step time {row['overhead']:+.1%} "
                f"({row['step_s_fed'] * 1e3:.1f} vs {row['step_s_in_memory'] * 1e3:.1f} ms/step; "
                f"first batch {row['first_batch_s'] * 1e3:.0f} ms)"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loader_peers.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
