"""CelebA (aligned faces, 40 binary attributes) -> an ImageCollection for the parallel sharder.

Accepted layouts, in SOURCE or SOURCE/celeba (torchvision's root layout):
  img_align_celeba/*.jpg (official, 178x218) or img_align_celeba_89x109/*.jpg (our half-size
  sample), list_attr_celeba.txt, and optionally list_eval_partition.txt.
The split: the partition file when present; else the official index ranges when the images
fall into all three of them; else a seeded 80/10/10 split. The rule used is printed and
recorded in index.json (params.partition). Images listed in the attribute file but absent on
disk are reported (index.json `missing`) and left out; image files without an attribute row are
reported under `ignored`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vae_scale.data.sourcing.folder import TEST_FRACTION, VAL_FRACTION, seeded_fraction_split
from vae_scale.data.sourcing.folder_sharder import ImageCollection, ImageItem
from vae_scale.errors import DataError
from vae_scale.utils.fsutil import sha256_file

IMAGE_DIRS = ("img_align_celeba", "img_align_celeba_89x109")
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
NUM_ATTRIBUTES = 40
SPLIT_NAMES = ("train", "val", "test")  # partition file codes 0, 1, 2
# Official partition by image number (what list_eval_partition.txt says for 202,599 images).
OFFICIAL_RANGES = {"train": (1, 162770), "val": (162771, 182637), "test": (182638, 202599)}
# The usual CelebA-64 crop: 148 px of the 178 px wide aligned images, relative so that it
# fits any resolution of them (74 px of the 89 px wide half-size sample).
DEFAULT_CROP = "148/178"
PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


def locate(source_dir: Path) -> tuple[Path, Path]:
    """(folder with the list files, image folder) in the official or torchvision layout."""
    source_dir = Path(source_dir)
    for base in (source_dir, source_dir / "celeba"):
        image_dir = next((base / d for d in IMAGE_DIRS if (base / d).is_dir()), None)
        if image_dir is not None and (base / ATTR_FILE).is_file():
            return base, image_dir
    raise DataError(
        f"CelebA not found in {source_dir}: expected {source_dir}/img_align_celeba/*.jpg and "
        f"{source_dir}/{ATTR_FILE} (and ideally {PARTITION_FILE}), or the same inside "
        f"{source_dir}/celeba/ (torchvision's layout). CelebA is on Google Drive and cannot be "
        f"downloaded automatically: get img_align_celeba.zip and the Anno/Eval text files from "
        f"{PAGE}, unzip them there, or pass --source / set VAE_SCALE_DATA."
    )


def read_attributes(path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """(attribute names, {image file name: 0/1 string}) from list_attr_celeba.txt
    (a count line, a line of 40 names, then `NNNNNN.jpg` and 40 values of -1/1 per line)."""
    lines = path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"{path}: expected a count line and a line of attribute names first")
    count, names = int(lines[0]), tuple(lines[1].split())
    if len(names) != NUM_ATTRIBUTES:
        raise DataError(f"{path}, line 2: {len(names)} attribute names, expected {NUM_ATTRIBUTES}")
    rows: dict[str, str] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        values = fields[1:]
        if len(values) != NUM_ATTRIBUTES or not set(values) <= {"-1", "1"}:
            raise DataError(
                f"{path}, line {number}: expected an image name and "
                f"{NUM_ATTRIBUTES} values of -1 or 1, got {line[:80]!r}"
            )
        rows[fields[0]] = "".join("1" if v == "1" else "0" for v in values)
    if len(rows) != count:
        raise DataError(
            f"{path}: the first line says {count} images, but {len(rows)} rows "
            f"follow (truncated file?)"
        )
    return names, rows


def read_partition(path: Path) -> dict[str, str]:
    """{image file name: 'train'|'val'|'test'} from list_eval_partition.txt (`name 0|1|2`)."""
    parts: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(
                f"{path}, line {number}: expected `NNNNNN.jpg 0|1|2`, got {line[:80]!r}"
            )
        parts[fields[0]] = SPLIT_NAMES[int(fields[1])]
    return parts


def choose_partition(
    names: list[str], partition: dict[str, str] | None, seed: int
) -> tuple[dict[str, list[str]], str]:
    """Split image file names into train/val/test; returns the parts and the rule used."""
    if partition is not None:
        unlisted = [n for n in names if n not in partition]
        if unlisted:
            raise DataError(
                f"{PARTITION_FILE}: {len(unlisted)} image(s) are not listed (e.g. {unlisted[0]})"
            )
        parts = {s: sorted(n for n in names if partition[n] == s) for s in SPLIT_NAMES}
        if all(parts.values()):
            return parts, f"official {PARTITION_FILE}"
        # A subset of the images (e.g. the first 10,000) can leave val/test empty.

    def official(name: str) -> str | None:
        number = int(Path(name).stem) if Path(name).stem.isdigit() else -1
        return next((s for s, (lo, hi) in OFFICIAL_RANGES.items() if lo <= number <= hi), None)

    by_range = {s: sorted(n for n in names if official(n) == s) for s in SPLIT_NAMES}
    outside = sum(official(n) is None for n in names)
    if partition is None and outside == 0 and all(by_range.values()):
        return by_range, f"official index ranges (no {PARTITION_FILE})"
    why = (
        f"{PARTITION_FILE} leaves a split empty for these images"
        if partition is not None
        else f"no {PARTITION_FILE}, and the images do not span the official train/val/test "
        f"index ranges"
    )
    rule = (
        f"seeded {1 - VAL_FRACTION - TEST_FRACTION:.0%}/{VAL_FRACTION:.0%}/"
        f"{TEST_FRACTION:.0%} split, seed {seed} ({why})"
    )
    return seeded_fraction_split(names, seed), rule


def collect(source_dir: Path, seed: int, labels_from_subfolders: bool = False) -> ImageCollection:
    if labels_from_subfolders:
        raise DataError(
            "celeba has 40 attributes per image, not sub-folder labels; "
            "drop --labels-from-subfolders"
        )
    base, image_dir = locate(source_dir)
    attr_names, attrs = read_attributes(base / ATTR_FILE)
    on_disk = {e.name for e in os.scandir(image_dir) if e.is_file()}
    present = sorted(n for n in attrs if n in on_disk)
    missing = sorted(n for n in attrs if n not in on_disk)
    unlisted = sorted(on_disk - set(attrs))
    if not present:
        raise DataError(f"{image_dir}: none of the {len(attrs)} images of {ATTR_FILE} is there")
    partition_path = base / PARTITION_FILE
    partition = read_partition(partition_path) if partition_path.is_file() else None
    parts, rule = choose_partition(present, partition, seed)
    print(f"celeba: {len(present)} images in {image_dir}; split: {rule}")
    if missing:
        print(
            f"warning: {len(missing)} image(s) of {ATTR_FILE} are not in {image_dir} "
            f"(e.g. {missing[0]}); left out, listed in index.json 'missing'"
        )
    splits = {
        split: [ImageItem(key=Path(n).stem, path=n, attrs=attrs[n]) for n in names]
        for split, names in parts.items()
    }
    files = {ATTR_FILE: sha256_file(base / ATTR_FILE)}
    if partition is not None:
        files[PARTITION_FILE] = sha256_file(partition_path)
    listing = hashlib.sha256("\n".join(present).encode()).hexdigest()
    return ImageCollection(
        name="celeba",
        root=image_dir,
        splits=splits,
        source={
            "files": files,
            "images": {"folder": image_dir.name, "count": len(present), "listing_sha256": listing},
        },
        params={"partition": rule, **({"seed": seed} if "seeded" in rule else {})},
        attr_names=attr_names,
        default_crop=DEFAULT_CROP,
        notes={
            "missing": {
                "count": len(missing),
                "files": missing[:1000],
                "reason": f"in {ATTR_FILE} but not in {image_dir.name}/",
            },
            "ignored": {
                "count": len(unlisted),
                "files": unlisted[:1000],
                "reason": f"in {image_dir.name}/ but not in {ATTR_FILE}",
            },
        },
    )
