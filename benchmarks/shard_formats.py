"""Image formats in shards (issue 43): `vae-scale shard celeba --format npy|png|jpg|webp` at
64 and 256 px: bytes on disk per image, and images read per CPU-second (one process, no
workers: what one loader worker core delivers) by our loader (sliced fast path, batched) and
by webdataset's own pipeline decoding the same shards (`.decode("rgb8")`), in alternating
rounds, the median of each.

    VAE_SCALE_DATA=../shared/data python -m benchmarks.shard_formats --work /tmp/formats \\
        [--images 1000] [--rounds 3]

The CelebA files here are half resolution (89x109): 64 px crops are downscaled as usual, 256 px
ones are upscaled, which flatters lossy compression at 256 px.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from vae_scale.config import DataConfig
from vae_scale.data.image_format import ImageFormat
from vae_scale.data.sourcing import folder_sharder
from vae_scale.data.sourcing.fetch import resolve_data_root
from vae_scale.data.sourcing.recipes import recipes
from vae_scale.data.streaming.loader import ShardSplit

CODECS = ("npy", "png", "jpg", "webp")


def shard(work: Path, images: int, size: int, codec: str) -> Path:
    recipe = recipes()["celeba"]
    collection = recipe.collect(resolve_data_root(None) / recipe.default_subdir, seed=0)
    train = collection.splits["train"][:images]
    collection = dataclasses.replace(collection, splits={"train": train})
    preprocess = folder_sharder.Preprocess(size, "74/89", ImageFormat(codec))
    out = work / f"{size}px" / codec
    folder_sharder.shard_collection(collection, out, preprocess, 500, workers=2)
    return out


def ours(folder: Path) -> tuple[int, float]:
    split = ShardSplit(folder, "train", DataConfig(batch_size=100, num_workers=0), shuffle=False)
    t0, n = time.process_time(), 0
    for batch in split.eval_batches():
        n += batch["image"].shape[0]
    return n, time.process_time() - t0


def webdataset(folder: Path, codec: str) -> tuple[int, float]:
    import webdataset as wds

    urls = [str(p) for p in sorted(folder.glob("train-*.tar"))]
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
    t0, n = time.process_time(), 0
    for sample in pipeline.to_tuple(codec):
        n += sample[0].shape[0] > 0
    return n, time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for size in (64, 256):
        folders = {c: shard(args.work, args.images, size, c) for c in CODECS}
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):  # alternating: a slow moment hits every reader alike
            for codec, folder in folders.items():
                for reader, read in (("ours", ours), ("webdataset", webdataset)):
                    n, cpu = read(folder) if reader == "ours" else read(folder, codec)
                    assert n == args.images, (reader, codec, n)
                    rates.setdefault((codec, reader), []).append(n / cpu)
        for codec, folder in folders.items():
            disk = sum(p.stat().st_size for p in folder.glob("*.tar"))
            mine = statistics.median(rates[(codec, "ours")])
            theirs = statistics.median(rates[(codec, "webdataset")])
            rows.append({
                "size": size, "format": codec, "kib_per_image": disk / args.images / 1024,
                "ours_images_per_cpu_s": mine, "webdataset_images_per_cpu_s": theirs,
                "ratio": mine / theirs,
            })  # fmt: skip
            print(json.dumps(rows[-1]))
    print("| px | format | KiB / image | ours, images / CPU-s | webdataset | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['size']} | {r['format']} | {r['kib_per_image']:.1f} | "
            f"{r['ours_images_per_cpu_s']:,.0f} | {r['webdataset_images_per_cpu_s']:,.0f} | "
            f"{r['ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
