"""CIFAR-10 from the publisher's python batches (`cifar-10-batches-py`).

Each batch file is a pickled dict: b"data" (N, 3072) uint8, rows of 1024 red, 1024 green and
1024 blue values (row-major 32x32 planes), b"labels" (N ints in 0..9), b"filenames". Pickle is
the publisher's format, so it is read here once, with an unpickler that only accepts the numpy
array classes the files reference (a tampered file cannot run code); the shards we write hold
npy only.

Whichever of data_batch_1..5 and test_batch are present are used (and recorded in index.json):
the training batches form one pool split by a fixed seed into train and val (10 %: 45,000 /
5,000 for the full set), test_batch is the test split. Every split is written in a seeded
random order, because test_batch copies may be sorted by class (ours in ../shared/data is)
and a shard or a "first N images" picture must not hold a single class.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from vae_scale.data.sourcing.base import SourceData, seeded_split
from vae_scale.errors import DataError
from vae_scale.utils.fsutil import sha256_file
from vae_scale.utils.netutil import is_online

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SUBDIR = "cifar-10-batches-py"  # what torchvision's CIFAR10(root, download=True) unpacks
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
HEIGHT = WIDTH = 32
CHANNELS = 3
NUM_CLASSES = 10
VAL_FRACTION = 0.1

# The globals a CIFAR-10 batch pickle references (numpy arrays; _codecs.encode is how Python 3
# writes bytes at protocol 2, for re-pickled copies); nothing else is loaded.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def batch_folder(source_dir: Path) -> Path | None:
    """The folder holding the batch files: `source_dir` itself (flat layout) or its
    torchvision subfolder `cifar-10-batches-py/`; None when neither has any."""
    for folder in (source_dir, source_dir / SUBDIR):
        if any((folder / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
            return folder
    return None


def locate(source_dir: Path, download_ok: bool = True) -> Path:
    """The folder of batch files; downloaded with torchvision only when none is present."""
    folder = batch_folder(source_dir)
    if folder is not None:
        return folder
    if download_ok and is_online(URL):
        from torchvision.datasets import CIFAR10

        print(f"downloading CIFAR-10 ({URL}) into {source_dir / SUBDIR}")
        source_dir.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(source_dir), train=True, download=True)  # checks torchvision's md5
        return source_dir / SUBDIR
    raise DataError(
        f"CIFAR-10 batch files not found: looked for {', '.join(TRAIN_FILES)}, {TEST_FILE} in "
        f"{source_dir} and {source_dir / SUBDIR} (offline or --no-download, so not downloaded). "
        f"Unpack {URL} into {source_dir}, or point --data-root / VAE_SCALE_DATA at a folder "
        f"with cifar10/, or pass --source."
    )


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) int64 labels of one batch file."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except Exception as err:  # pickle raises many types for corrupt or truncated files
        raise DataError(f"{path}: not a readable CIFAR-10 batch file ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(
            f"{path}: b'data' is {getattr(data, 'dtype', type(data).__name__)} of shape "
            f"{getattr(data, 'shape', '?')}, expected uint8 (N, {CHANNELS * HEIGHT * WIDTH})"
        )
    if data.shape[1] != CHANNELS * HEIGHT * WIDTH:
        raise DataError(
            f"{path}: b'data' has shape {data.shape}, expected (N, {CHANNELS * HEIGHT * WIDTH})"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: b'labels' has shape {labels.shape} ({labels.dtype}), expected "
            f"{data.shape[0]} integers (one per image)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(
            f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}"
        )
    # Rows are channel planes: (N, 3, 32, 32) -> HWC for the shard writer.
    images = data.reshape(-1, CHANNELS, HEIGHT, WIDTH).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _samples(prefix: list[str], images: np.ndarray, labels: np.ndarray, order: np.ndarray):
    return [{"__key__": prefix[i], "npy": images[i], "cls": int(labels[i])} for i in order]


def prepare(source_dir: Path, seed: int, download_ok: bool = True) -> SourceData:
    folder = locate(Path(source_dir), download_ok)
    train_names = [n for n in TRAIN_FILES if (folder / n).is_file()]
    has_test = (folder / TEST_FILE).is_file()
    if not train_names:
        raise DataError(
            f"{folder}: no training batch ({', '.join(TRAIN_FILES)}) found; only "
            f"{TEST_FILE} is there, which cannot train a model"
        )
    used = train_names + ([TEST_FILE] if has_test else [])
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if n not in used]
    print(
        f"cifar10: using {', '.join(used)} from {folder}"
        + (f" (missing: {', '.join(missing)})" if missing else "")
    )

    loaded = [(name, *load_batch(folder / name)) for name in train_names]
    images = np.concatenate([imgs for _, imgs, _ in loaded])
    labels = np.concatenate([labs for _, _, labs in loaded])
    keys = [f"{name}_{i:05d}" for name, imgs, _ in loaded for i in range(len(imgs))]
    count = len(images)
    num_val = round(VAL_FRACTION * count)
    parts = seeded_split(count, {"train": count - num_val, "val": num_val}, seed)
    rng = np.random.default_rng([seed, 10])  # write order, independent of the split draw
    splits = {
        name: _samples(keys, images, labels, rng.permutation(idx)) for name, idx in parts.items()
    }
    if has_test:
        test_images, test_labels = load_batch(folder / TEST_FILE)
        test_keys = [f"{TEST_FILE}_{i:05d}" for i in range(len(test_images))]
        order = rng.permutation(len(test_images))
        splits["test"] = _samples(test_keys, test_images, test_labels, order)
    else:
        print(f"cifar10: warning: no {TEST_FILE}, so no test split (val only)")

    return SourceData(
        name="cifar10",
        image_shape=(CHANNELS, HEIGHT, WIDTH),
        splits=splits,
        source={"files": {name: sha256_file(folder / name) for name in used}, "url": URL},
        params={"seed": seed, "val_fraction": VAL_FRACTION, "write_order": "seeded shuffle"},
    )
