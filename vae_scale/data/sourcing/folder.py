"""Any folder of images (searched recursively) -> an ImageCollection for the parallel sharder.

Files with an image extension are sharded (unreadable ones are reported and skipped by the
writer); other files are listed in the index under `ignored`. With labels from sub-folders, the
first-level folder name is the class (classes sorted by name, as torchvision's ImageFolder).
The split is a seeded 80/10/10 partition of the sorted file list.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from vae_scale.data.sourcing.folder_sharder import IMAGE_EXTENSIONS, ImageCollection, ImageItem
from vae_scale.errors import DataError

VAL_FRACTION = TEST_FRACTION = 0.1
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


def seeded_fraction_split(
    keys: list[str],
    seed: int,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> dict[str, list[str]]:
    """A fixed random train/val/test partition of `keys` (each part sorted); val and test get
    at least one key each."""
    count = len(keys)
    if count < 3:
        raise DataError(f"{count} image(s): a train/val/test split needs at least 3")
    n_val = max(1, round(count * val_fraction))
    n_test = max(1, round(count * test_fraction))
    perm = np.random.default_rng(seed).permutation(count)
    ordered = sorted(keys)
    parts = {
        "train": perm[n_val + n_test :],
        "val": perm[:n_val],
        "test": perm[n_val : n_val + n_test],
    }
    return {name: sorted(ordered[i] for i in idx) for name, idx in parts.items()}


def list_files(root: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under `root`, as sorted relative POSIX paths; hidden files
    and folders (names starting with '.') are left out."""
    images, others = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            rel = Path(folder, name).relative_to(root).as_posix()
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(rel)
    return sorted(images), sorted(others)


def key_for(rel_path: str) -> str:
    """'cats/img.001.jpg' -> 'cats/img_001': webdataset keys end at the first dot."""
    stem = rel_path.rsplit(".", 1)[0]
    return _KEY_UNSAFE.sub("_", stem)


def listing_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def collect(source_dir: Path, seed: int, labels_from_subfolders: bool = False) -> ImageCollection:
    root = Path(source_dir)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (pass --source DIR)")
    images, others = list_files(root)
    if not images:
        raise DataError(
            f"{root}: no image files found (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    by_key: dict[str, str] = {}
    for rel in images:
        key = key_for(rel)
        if key in by_key:
            raise DataError(
                f"{root}: {by_key[key]!r} and {rel!r} would get the same sample "
                f"key {key!r}; rename one of them"
            )
        by_key[key] = rel
    class_names: tuple[str, ...] = ()
    labels: dict[str, int] = {}
    if labels_from_subfolders:
        top_level = [rel for rel in images if "/" not in rel]
        if top_level:
            raise DataError(
                f"{root}: --labels-from-subfolders, but {len(top_level)} image(s) "
                f"are not in a class sub-folder (e.g. {top_level[0]!r})"
            )
        class_names = tuple(sorted({rel.split("/", 1)[0] for rel in images}))
        class_index = {name: i for i, name in enumerate(class_names)}
        labels = {key: class_index[rel.split("/", 1)[0]] for key, rel in by_key.items()}
    parts = seeded_fraction_split(list(by_key), seed)
    splits = {
        name: [ImageItem(key=k, path=by_key[k], cls=labels.get(k)) for k in keys]
        for name, keys in parts.items()
    }
    rule = (
        f"seeded {1 - VAL_FRACTION - TEST_FRACTION:.0%}/{VAL_FRACTION:.0%}/"
        f"{TEST_FRACTION:.0%} split (seed {seed})"
    )
    print(f"{root}: {len(images)} image files, {len(others)} other files ignored; {rule}")
    return ImageCollection(
        name=root.name,
        root=root,
        splits=splits,
        source={"images": {"count": len(images), "listing_sha256": listing_digest(images)}},
        params={
            "partition": rule,
            "seed": seed,
            "labels": "sub-folders" if labels_from_subfolders else "none",
        },
        class_names=class_names,
        notes={
            "ignored": {
                "count": len(others),
                "files": others[:1000],
                "reason": "no image file extension",
            }
        },
    )
