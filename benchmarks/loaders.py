"""Our shard reader and the loader a user would write instead, for every dataset.

Both sides read the same images (the first `n` of the train split), in the same order, into
batches of the same size, with the same DataLoader worker count, prefetch and pinning:
- ours: `ShardSplit(...).eval_batches()` over the first shards of shards/DATASET (decoded
  uint8 CHW batches; the float conversion happens on the device in the training loop), also
  with `cache_in_memory` (what `data.cache_in_memory: true` gives from epoch 2);
- baseline: torchvision's `MNIST` / `CIFAR10` datasets over the publisher's raw files with
  `ToTensor()`, the Frey `.mat` loaded into a `TensorDataset` (what the study's code did), and
  `ImageFolder` of the CelebA JPEGs with the sharder's exact crop + resize + `ToTensor()`.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from benchmarks.data_pipeline import CropResize
from vae_scale.config import DataConfig
from vae_scale.data.streaming.loader import ShardSplit

Batches = Callable[[], Iterable[torch.Tensor]]  # one pass -> image batches


@dataclass
class LoaderPair:
    dataset: str
    baseline_name: str
    samples: int
    ours: Callable[[int, bool], Batches]  # (workers, RAM cache) -> one pass of our reader
    baseline: Callable[[int], Batches]  # workers -> one pass of the baseline


def loader_kwargs(workers: int) -> dict:
    """What our WebLoader uses, so the baseline gets the same process setup."""
    extra = {"prefetch_factor": 4} if workers else {}
    return {"num_workers": workers, "pin_memory": torch.cuda.is_available(), **extra}


def first_shards(shard_dir: Path, n: int, min_shards: int) -> ShardSplit:
    """The train split cut to its first shards holding >= n samples (>= min_shards shards,
    so every loader worker gets one)."""
    split = ShardSplit(shard_dir, "train", DataConfig(batch_size=1))
    total, keep = 0, []
    for shard in split.catalog.shards:
        if total >= n and len(keep) >= min_shards:
            break
        keep.append(shard)
        total += shard.num_samples
    split.catalog.leave_out({s.name for s in split.catalog.shards[len(keep) :]})
    return split


def ours_reader(split: ShardSplit, batch_size: int) -> Callable[[int, bool], Batches]:
    def make(workers: int, cache: bool = False) -> Batches:
        reader = ShardSplit(
            split.catalog.location,
            "train",
            DataConfig(batch_size=batch_size, num_workers=workers, cache_in_memory=cache),
        )
        kept = len(split.catalog.shards)
        reader.catalog.leave_out({s.name for s in reader.catalog.shards[kept:]})
        return lambda: (b["image"] for b in reader.eval_batches())

    return make


def baseline_reader(dataset: Dataset, batch_size: int) -> Callable[[int], Batches]:
    def make(workers: int) -> Batches:
        loader = DataLoader(dataset, batch_size=batch_size, **loader_kwargs(workers))
        return lambda: (b[0] for b in loader)

    return make


class LocalCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 over the batches that exist, without md5 checks: our copy holds
    only data_batch_1 and is re-encoded, so the stock class refuses it as corrupt."""

    train_list = [["data_batch_1", None]]
    test_list = [["test_batch", None]]
    meta = {"filename": "batches.meta", "key": "label_names", "md5": None}


def mnist_root(raw_dir: Path, work: Path) -> Path:
    """A torchvision MNIST root: the idx files decompressed into ROOT/MNIST/raw (our train
    .gz is recompressed, so torchvision's .gz md5 check would try to download it)."""
    raw = work / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in sorted(raw_dir.glob("*-ubyte.gz")):
        target = raw / gz.name.removesuffix(".gz")
        if not target.is_file():
            with gzip.open(gz) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return work


def frey_baseline(data_root: Path) -> Dataset:
    from vae_scale.data.sourcing import frey

    images = frey.load_images(data_root / "freyface" / frey.FILENAME)
    return TensorDataset(torch.from_numpy(images).unsqueeze(1).float().div(255.0))


def celeba_baseline(data_root: Path, shard_dir: Path, work: Path) -> Dataset:
    """ImageFolder over the JPEGs of the shards' train split, with the sharder's crop."""
    import json

    from vae_scale.data.sourcing.folder_sharder import Preprocess, parse_crop
    from vae_scale.data.sourcing.recipes import recipes

    params = json.loads((shard_dir / "index.json").read_text())["params"]
    collection = recipes()["celeba"].collect(data_root / "celeba", seed=params["seed"])
    preprocess = Preprocess(params["size"], parse_crop(params["crop"]))
    # ImageFolder wants ROOT/CLASS/files: a link makes the image folder the one class.
    link_root = work / "imagefolder"
    link_root.mkdir(parents=True, exist_ok=True)
    if not (link_root / "faces").exists():
        (link_root / "faces").symlink_to(collection.root.resolve(), target_is_directory=True)
    train = {Path(item.path).name for item in collection.splits["train"]}
    return datasets.ImageFolder(
        str(link_root),
        transform=transforms.Compose([CropResize(preprocess), transforms.ToTensor()]),
        is_valid_file=lambda p: Path(p).name in train,
    )


def build_pairs(
    shard_dirs: dict[str, Path],
    data_root: Path,
    sizes: dict[str, int],
    batch_size: int,
    work: Path,
    min_shards: int = 2,
) -> list[LoaderPair]:
    """One LoaderPair per dataset in `sizes` (dataset -> samples per pass)."""
    pairs = []
    to_tensor = transforms.ToTensor()
    for name, n in sizes.items():
        split = first_shards(shard_dirs[name], n, min_shards)
        if name == "frey":
            base, label = frey_baseline(data_root), "TensorDataset of the .mat (float)"
        elif name == "mnist":
            root = mnist_root(data_root / "mnist", work)
            base = datasets.MNIST(str(root), train=True, transform=to_tensor)
            label = "torchvision MNIST + ToTensor"
        elif name == "cifar10":
            root = work / "cifar"
            root.mkdir(parents=True, exist_ok=True)
            link = root / "cifar-10-batches-py"
            if not link.exists():
                link.symlink_to((data_root / "cifar10").resolve(), target_is_directory=True)
            base = LocalCIFAR10(str(root), train=True, transform=to_tensor)
            label = "torchvision CIFAR10 + ToTensor"
        elif name == "celeba":
            base = celeba_baseline(data_root, shard_dirs[name], work)
            label = "ImageFolder JPEG + crop/resize + ToTensor"
        else:
            raise ValueError(f"no baseline for {name}")
        if len(base) < split.num_samples:
            raise ValueError(f"{name}: baseline has {len(base)} samples, need {split.num_samples}")
        base = Subset(base, range(split.num_samples))
        pairs.append(
            LoaderPair(
                name,
                label,
                split.num_samples,
                ours_reader(split, batch_size),
                baseline_reader(base, batch_size),
            )
        )
    return pairs
