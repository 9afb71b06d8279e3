"""Data pipeline speed for an image dataset: sharding throughput, and streaming the 64x64
shards versus reading the same JPEGs with torchvision's ImageFolder + the same crop/resize.

    python benchmarks/data_pipeline.py celeba                 # $VAE_SCALE_DATA/celeba
    python benchmarks/data_pipeline.py folder --source DIR    # any image folder

Sharding: `shard_collection` with 1, 2, ... writer processes (--shard-workers) into a
temporary folder, timed end to end (plan, pool start-up, fsync, index). Reading: the train
split, one untimed pass to warm the page cache, then timed passes (median of --repeats) with
N DataLoader workers each (--loader-workers; 0 = in the main process): our `ShardSplit`
(decoded uint8 CHW batches) against `ImageFolder` (decode JPEG, crop, resize, ToTensor).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from vae_scale.config import DataConfig
from vae_scale.data.sourcing.fetch import resolve_data_root
from vae_scale.data.sourcing.folder_sharder import (
    Preprocess,
    crop_box,
    parse_crop,
    shard_collection,
)
from vae_scale.data.sourcing.recipes import recipes
from vae_scale.data.streaming.loader import ShardSplit


class CropResize:
    """PIL -> PIL: exactly the sharder's centre crop and antialiased resize."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, image):
        from PIL import Image

        square = image.crop(crop_box(self.preprocess.crop, *image.size))
        size = (self.preprocess.size, self.preprocess.size)
        return square.resize(size, Image.Resampling.BILINEAR)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader and pool workers are
    joined at the end of each pass, so their time is included)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(run):
    """(wall seconds, CPU seconds, result of run())."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def timed_passes(make_batches, repeats: int) -> tuple[float, float, int]:
    """(median wall seconds, median CPU seconds, images per pass) after a warm-up pass."""
    count = sum(len(b) for b in make_batches())
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu, seen = timed(lambda: sum(len(b) for b in make_batches()))
        assert seen == count, (seen, count)
        walls.append(wall)
        cpus.append(cpu)
    return statistics.median(walls), statistics.median(cpus), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=[n for n, r in recipes().items() if r.collect])
    parser.add_argument("--source", help="raw folder (default: <data root>/<dataset>)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--crop", default=None, help="default: the dataset's")
    parser.add_argument("--shard-size", type=int, default=None)
    parser.add_argument("--shard-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    recipe = recipes()[args.dataset]
    source = Path(args.source) if args.source else resolve_data_root() / recipe.default_subdir
    collection = recipe.collect(source, seed=0)
    preprocess = Preprocess(args.size, parse_crop(args.crop or collection.default_crop))
    shard_size = args.shard_size or recipe.default_shard_size
    total = sum(len(items) for items in collection.splits.values())
    print(
        f"# {args.dataset}: {total} images from {source}; {args.size}x{args.size}, crop "
        f"{preprocess.crop}; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        writes = []
        for workers in args.shard_workers:
            out = Path(tmp) / f"w{workers}" / collection.name
            wall, cpu, _ = timed(
                lambda o=out, w=workers: shard_collection(
                    collection, o, preprocess, shard_size, workers=w
                )
            )
            writes.append((workers, total / wall, total / wall / workers, total / cpu))
        shard_dir = Path(tmp) / f"w{args.shard_workers[0]}" / collection.name

        # ImageFolder wants ROOT/CLASS/files: a link makes the image folder the one class;
        # is_valid_file keeps exactly the train images the shards hold.
        link_root = Path(tmp) / "imagefolder"
        link_root.mkdir()
        (link_root / "images").symlink_to(collection.root.resolve(), target_is_directory=True)
        train = {str((collection.root / i.path).resolve()) for i in collection.splits["train"]}
        folder = datasets.ImageFolder(
            str(link_root),
            transform=transforms.Compose([CropResize(preprocess), transforms.ToTensor()]),
            is_valid_file=lambda p: str(Path(p).resolve()) in train,
        )
        reads = []
        for workers in args.loader_workers:
            split = ShardSplit(
                shard_dir, "train", DataConfig(batch_size=args.batch_size, num_workers=workers)
            )
            shard_wall, shard_cpu, shard_n = timed_passes(
                lambda s=split: (b["image"] for b in s.eval_batches()), args.repeats
            )
            extra = {"prefetch_factor": 4} if workers else {}
            loader = DataLoader(folder, batch_size=args.batch_size, num_workers=workers, **extra)
            jpeg_wall, jpeg_cpu, jpeg_n = timed_passes(
                lambda ld=loader: (x for x, _ in ld), args.repeats
            )
            assert shard_n == jpeg_n, (shard_n, jpeg_n)
            reads.append(
                (
                    workers,
                    shard_n / shard_wall,
                    jpeg_n / jpeg_wall,
                    shard_n / shard_cpu,
                    jpeg_n / jpeg_cpu,
                )
            )

    print("\n| writer processes | images/s (wall) | per process | images per CPU-second |")
    print("|---|---|---|---|")
    for workers, rate, per, per_cpu in writes:
        print(f"| {workers} | {rate:.0f} | {per:.0f} | {per_cpu:.0f} |")
    print(
        "\n| loader workers | shards images/s (wall) | ImageFolder images/s (wall) | ratio "
        "| shards images/CPU-s | ImageFolder images/CPU-s | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for workers, shard_rate, jpeg_rate, shard_cpu, jpeg_cpu in reads:
        print(
            f"| {workers} | {shard_rate:.0f} | {jpeg_rate:.0f} | {shard_rate / jpeg_rate:.1f}x "
            f"| {shard_cpu:.0f} | {jpeg_cpu:.0f} | {shard_cpu / jpeg_cpu:.1f}x |"
        )
    print(
        f"\n({total} images sharded; {len(train)} train images read per pass, "
        f"batch {args.batch_size}, median of {args.repeats} passes after a warm-up pass; "
        f"load average now {os.getloadavg()[0]:.1f})"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
