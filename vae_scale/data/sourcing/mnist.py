"""MNIST: the four idx files (train 60,000 / test 10,000 grey 28x28 digits, labels 0-9).

The idx files are read directly (gzipped or not), from either the flat layout
(`<source>/train-images-idx3-ubyte.gz`, as in ../shared/data/mnist) or torchvision's
(`<source>/MNIST/raw/...`). The checks are on the uncompressed content (idx magic, counts,
28x28, md5), never on the .gz bytes: a recompressed .gz holds the same pixels but has another
md5, and torchvision's downloader would take it for corrupt and fetch it again.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from vae_scale.data.sourcing.base import SourceData, seeded_split
from vae_scale.errors import DataError
from vae_scale.utils.netutil import is_online

HEIGHT = WIDTH = 28
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# md5 of the UNCOMPRESSED files (the published ones; torchvision only lists the .gz md5s).
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
OFFICIAL_COUNTS = {"train": 60000, "test": 10000}
VAL_SIZE = 5000  # carved from train with a fixed seed, as in many MNIST VAE papers
MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's first mirror
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # uint8 data, 3 or 1 dimensions


def find_files(source_dir: Path) -> dict[str, Path | None]:
    """Each idx file's path (flat layout first, then torchvision's MNIST/raw), or None."""
    found: dict[str, Path | None] = {}
    for key, name in FILES.items():
        candidates = [
            folder / f"{name}{ext}"
            for folder in (source_dir, source_dir / "MNIST" / "raw")
            for ext in ("", ".gz")
        ]
        found[key] = next((p for p in candidates if p.is_file()), None)
    return found


def locate(source_dir: Path, download_ok: bool = True) -> dict[str, Path]:
    """The four idx files; downloaded with torchvision into `source_dir` only when missing."""
    found = find_files(source_dir)
    if all(found.values()):
        return found  # type: ignore[return-value]
    if download_ok and is_online(MIRROR):
        from torchvision.datasets import MNIST

        print(f"downloading MNIST with torchvision into {source_dir / 'MNIST' / 'raw'}")
        try:
            MNIST(str(source_dir), download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError
            raise DataError(f"downloading MNIST into {source_dir} failed: {err}") from err
        found = find_files(source_dir)
        if all(found.values()):
            return found  # type: ignore[return-value]
    missing = [FILES[k] + "[.gz]" for k, p in found.items() if p is None]
    raise DataError(
        f"MNIST files not found in {source_dir} or {source_dir / 'MNIST' / 'raw'}: missing "
        f"{', '.join(missing)} (offline or --no-download, so not downloaded). Put the four idx "
        f"files there, point --data-root / VAE_SCALE_DATA at a folder with mnist/, or pass "
        f"--source."
    )


def read_bytes(path: Path) -> bytes:
    """The uncompressed content of an idx file, gzipped (by content, not name) or not."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip file ({err})") from err


def parse_idx(data: bytes, path: Path, kind: str) -> np.ndarray:
    """idx bytes -> uint8 array: (N, 28, 28) for kind 'images', (N,) for 'labels'.

    Format: big-endian int32 magic (0x0803 images, 0x0801 labels), one int32 per dimension,
    then the uint8 values row-major.
    """
    ndim = 3 if kind == "images" else 1
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes, too short for an idx {kind} header")
    magic, *dims = (int(v) for v in np.frombuffer(data[:header], dtype=">i4"))
    if magic != IDX_MAGIC[kind]:
        raise DataError(
            f"{path}: idx magic number {magic:#010x}, expected {IDX_MAGIC[kind]:#010x} "
            f"(uint8 {kind}); not an MNIST {kind} file"
        )
    if kind == "images" and dims[1:] != [HEIGHT, WIDTH]:
        raise DataError(f"{path}: images of {dims[1]}x{dims[2]}, expected {HEIGHT}x{WIDTH}")
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: {len(data) - header} data bytes, expected {expected} for dimensions "
            f"{dims}: the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(images_path: Path, labels_path: Path, count: int | None) -> tuple:
    """(images (N, 28, 28), labels (N,), md5s) of one split, checked against each other."""
    md5s, arrays = {}, {}
    for kind, path in (("images", images_path), ("labels", labels_path)):
        data = read_bytes(path)
        md5s[path.name.removesuffix(".gz")] = hashlib.md5(data).hexdigest()
        arrays[kind] = parse_idx(data, path, kind)
    images, labels = arrays["images"], arrays["labels"]
    if count is not None and len(images) != count:
        raise DataError(f"{images_path}: {len(images)} images, expected {count}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {labels.max()} outside 0-9")
    return images, labels, md5s


def prepare(
    source_dir: Path,
    seed: int,
    download_ok: bool = True,
    counts: dict[str, int] | None = OFFICIAL_COUNTS,
    val_size: int = VAL_SIZE,
) -> SourceData:
    """Train 55,000 / val 5,000 (a fixed seeded carve from the 60,000) / test 10,000.

    `counts` (None: any) and `val_size` only change for small files in tests.
    """
    source_dir = Path(source_dir)
    paths = locate(source_dir, download_ok)
    counts = counts or {}
    train_x, train_y, md5_train = load_split(
        paths["train_images"], paths["train_labels"], counts.get("train")
    )
    test_x, test_y, md5_test = load_split(
        paths["test_images"], paths["test_labels"], counts.get("test")
    )
    md5s = {**md5_train, **md5_test}
    for name, md5 in md5s.items():
        official = OFFICIAL_MD5[name]
        if md5 != official and counts == OFFICIAL_COUNTS:  # e.g. Fashion-MNIST: same format
            print(f"warning: {name} (uncompressed) has md5 {md5}, not the official {official}")
    if not 0 < val_size < len(train_x):
        raise DataError(f"validation size {val_size} must be between 1 and {len(train_x) - 1}")
    order = seeded_split(len(train_x), {"train": len(train_x) - val_size, "val": val_size}, seed)

    def samples(prefix: str, images: np.ndarray, labels: np.ndarray, idx):
        for i in idx:
            yield {"__key__": f"{prefix}_{i:05d}", "npy": images[i][..., None], "cls": labels[i]}

    splits = {
        "train": samples("train", train_x, train_y, order["train"]),
        "val": samples("train", train_x, train_y, order["val"]),
        "test": samples("test", test_x, test_y, range(len(test_x))),
    }
    return SourceData(
        name="mnist",
        image_shape=(1, HEIGHT, WIDTH),
        splits=splits,
        source={"files_md5_uncompressed": md5s},
        params={"seed": seed, "val_size": val_size},
    )
