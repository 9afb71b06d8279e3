"""Big image collections -> WebDataset shards: in parallel, resumable, bad files reported.

The writer for datasets of image files (CelebA, any folder of photos); small array datasets use
`shards.write_dataset`. The output is the same: `{split}-NNNNNN.tar` shards of npy uint8 HWC
samples and an `index.json` of format_version 1 that `loader.ShardSplit` reads.

How it stays correct when interrupted or spread over many processes:
- The plan is a pure function of the inputs: each split's items (sorted by key by the dataset
  recipe) are cut into chunks of `shard_size`; chunk i of split s is shard `s-00000i.tar`.
  A fresh run, a resumed run and a run spread over SLURM array tasks write identical shards.
- Each shard is written whole by one process to `NAME.tmp-PID`, fsynced and renamed. Only then
  is its sidecar `.parts/NAME.json` written (atomically): sample count, sha256, skipped files and
  a fingerprint of the shard's items and preprocessing. A shard counts as done only when its
  sidecar has the planned fingerprint and the tar has the recorded size, so a killed run
  redoes at most the shards that were in flight.
- Everything is built in a hidden sibling folder `.NAME.partial/`; `index.json` is written
  last (atomically) and the folder is then renamed into place, so a half-built dataset is
  never visible under the final name and a previous complete one survives until then.
- Tar members have a fixed mtime, so equal inputs give byte-identical shards (equal sha256).
- An image that cannot be read (truncated, not an image, too small for the crop) is skipped
  and reported by path with the error, in the index and on stderr; one bad file never stops
  the run. Shards holding bad files just have fewer samples; the index has the real counts.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vae_scale.data.image_format import NPY, ImageFormat
from vae_scale.data.index import (
    FORMAT_VERSION,
    INDEX_NAME,
    SHARD_PATTERN,
    index_matches,
    make_index,
    publish,
)
from vae_scale.data.members import member_table
from vae_scale.data.sourcing.base import SourceData
from vae_scale.errors import DataError
from vae_scale.utils.fsutil import fsync, sha256_file, write_json_atomic
from vae_scale.utils.progress import Progress

# Same names and format as data/shards.py (not imported from there at module level: that pulls
# in webdataset and torch, seconds of start-up for `vae-scale --help`).

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
PARTS_DIR = ".parts"  # per-shard sidecars inside the partial folder
RESAMPLE = "bilinear"  # PIL's antialiased bilinear, as torchvision's Resize on PIL images


@dataclass(frozen=True)
class ImageItem:
    """One image to shard. `attrs` is a 0/1 string, one character per attribute name of the
    collection (a string, not a dict: 200k dicts of 40 entries would cost ~400 MB)."""

    key: str  # unique within the collection; no dots (webdataset splits keys at the first dot)
    path: str  # relative to the collection root
    cls: int | None = None
    attrs: str | None = None


@dataclass
class ImageCollection:
    """What an image-dataset recipe hands to the parallel writer."""

    name: str
    root: Path
    splits: dict[str, list[ImageItem]]  # each sorted by key
    source: dict[str, Any]  # fingerprint of the inputs (compared for "up to date")
    params: dict[str, Any] = field(default_factory=dict)  # split rule, seed, classes, ...
    attr_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    default_crop: str = "square"
    notes: dict[str, Any] = field(default_factory=dict)  # reported in the index, not compared


# ---------------------------------------------------------------------------- preprocessing


def parse_crop(text: str) -> str:
    """Validate a crop spec and return it normalised. 'square': the largest centred square;
    'A/B' or a number <= 1: a square of that fraction of the image width (148/178 is the usual
    CelebA crop at any resolution); a number > 1: a square of that many pixels."""
    text = str(text).strip().lower()
    if text == "square":
        return text
    try:
        if "/" in text:
            num, den = (float(part) for part in text.split("/", 1))
            ok = num > 0 and den > 0 and num <= den
        else:
            ok = float(text) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"crop {text!r}: expected 'square', a fraction of the width like 148/178 or "
            f"0.83, or a size in pixels like 148"
        )
    return text


def crop_box(crop: str, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square crop in whole pixels, rounded as
    torchvision's CenterCrop rounds (so 148 of 178 x 218 is exactly the usual CelebA crop)."""
    if crop == "square":
        side = float(min(width, height))
    elif "/" in crop:
        num, den = (float(part) for part in crop.split("/", 1))
        side = width * num / den
    else:
        value = float(crop)
        side = width * value if value <= 1 else value
    side = int(round(side))
    if side > min(width, height) or side < 1:
        raise ValueError(f"crop {crop} ({side} px) does not fit the {width}x{height} image")
    left, top = int(round((width - side) / 2)), int(round((height - side) / 2))
    return (left, top, left + side, top + side)


@dataclass(frozen=True)
class Preprocess:
    """How each image is prepared (crop, size) and stored (`vae-scale shard --format`)."""

    size: int = 64
    crop: str = "square"
    stored: ImageFormat = NPY

    def __call__(self, image: Any) -> np.ndarray:
        """PIL image -> (size, size, 3) uint8: centre crop, then antialiased resize. (Crop
        first: resizing with PIL's box= would blend in pixels from outside the crop.)"""
        from PIL import Image

        image = image.convert("RGB")  # decodes fully: truncated files raise here
        square = image.crop(crop_box(self.crop, *image.size))
        out = square.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(out, dtype=np.uint8)


def load_image(path: str | Path, preprocess: Preprocess) -> np.ndarray:
    """Read, orient (EXIF), crop and resize one image file; any failure raises."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        if image.getexif().get(0x0112, 1) != 1:  # phone photos: apply the EXIF orientation
            image = ImageOps.exif_transpose(image)
        return preprocess(image)


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ShardTask:
    """One shard: which items go into it and how; picklable for the process pool."""

    root: str
    work_dir: str
    split: str
    number: int
    items: tuple[ImageItem, ...]
    preprocess: Preprocess
    attr_names: tuple[str, ...]
    class_names: tuple[str, ...]
    fingerprint: str

    @property
    def name(self) -> str:
        return SHARD_PATTERN.format(split=self.split) % self.number


def _fingerprint(
    items: Iterable[ImageItem], preprocess: Preprocess, attr_names: tuple, class_names: tuple
) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "resample": RESAMPLE,
        "preprocess": asdict(preprocess),
        "attr_names": list(attr_names),
        "class_names": list(class_names),
        "items": [[i.key, i.path, i.cls, i.attrs] for i in items],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_shards(
    collection: ImageCollection, preprocess: Preprocess, shard_size: int, work_dir: Path
) -> list[ShardTask]:
    """Every shard of every split, in a fixed order (splits in collection order, then number)."""
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    tasks = []
    for split, items in collection.splits.items():
        if not items:
            raise DataError(f"{collection.name}: split {split!r} has no images")
        for number, start in enumerate(range(0, len(items), shard_size)):
            chunk = tuple(items[start : start + shard_size])
            tasks.append(
                ShardTask(
                    root=str(collection.root),
                    work_dir=str(work_dir),
                    split=split,
                    number=number,
                    items=chunk,
                    preprocess=preprocess,
                    attr_names=collection.attr_names,
                    class_names=collection.class_names,
                    fingerprint=_fingerprint(
                        chunk, preprocess, collection.attr_names, collection.class_names
                    ),
                )
            )
    return tasks


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.partial")


# ---------------------------------------------------------------------------- one shard


def sample_for(task: ShardTask, item: ImageItem, image: np.ndarray) -> dict[str, Any]:
    """The sample dict of one image: npy, json (path, attributes) and cls when labelled.

    Attributes are kept inside the json member both ways, `attrs` (name -> 0/1, for people)
    and `attr_vector` (0/1 list in the order of index.json's params.attributes, for code):
    the loader decodes one image member plus json/cls, so a separate array member would be
    dropped on reading.
    """
    meta: dict[str, Any] = {"path": item.path}
    if item.attrs is not None:
        vector = [int(c) for c in item.attrs]
        meta["attrs"] = dict(zip(task.attr_names, vector))
        meta["attr_vector"] = vector
    sample: dict[str, Any] = {"__key__": item.key, "npy": image, "json": meta}
    if item.cls is not None:
        sample["cls"] = item.cls
        meta["label"] = task.class_names[item.cls]
    return sample


def sidecar_path(task: ShardTask) -> Path:
    return Path(task.work_dir) / PARTS_DIR / f"{task.name}.json"


def completed(task: ShardTask) -> dict[str, Any] | None:
    """The sidecar of a finished shard, or None when the shard still has to be written."""
    try:
        sidecar = json.loads(sidecar_path(task).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if sidecar.get("fingerprint") != task.fingerprint:
        return None
    if sidecar["num_samples"] == 0:
        return sidecar
    tar = Path(task.work_dir) / task.name
    if not tar.is_file() or tar.stat().st_size != sidecar["bytes"]:
        return None
    return sidecar


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one whole shard (tmp name -> fsync -> rename), then its sidecar; return it."""
    import webdataset as wds

    from vae_scale.data.sourcing.shards import encode_sample

    work = Path(task.work_dir)
    final = work / task.name
    for stale in work.glob(f"{task.name}.tmp-*"):  # left by a killed run; this shard is ours
        stale.unlink(missing_ok=True)
    tmp = work / f"{task.name}.tmp-{os.getpid()}"
    skipped: list[dict[str, str]] = []
    count = 0
    try:
        with open(tmp, "wb") as stream:
            # mtime fixed: the same inputs give byte-identical shards (repeatable sha256).
            with wds.TarWriter(stream, encoder=False, mtime=0) as writer:
                for item in task.items:
                    try:
                        image = load_image(Path(task.root) / item.path, task.preprocess)
                    except Exception as err:  # any decoder failure: report the file, go on
                        skipped.append(
                            {
                                "path": item.path,
                                "split": task.split,
                                "error": f"{type(err).__name__}: {err}",
                            }
                        )
                        continue
                    sample = sample_for(task, item, image)
                    writer.write(encode_sample(sample, image_format=task.preprocess.stored))
                    count += 1
            stream.flush()
            os.fsync(stream.fileno())
        if count:
            os.replace(tmp, final)
            fsync(work)
        else:  # every image of this chunk was bad: no shard file, the index omits it
            tmp.unlink()
            final.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sidecar = {
        "name": task.name,
        "split": task.split,
        "num_samples": count,
        "sha256": sha256_file(final) if count else None,
        "bytes": final.stat().st_size if count else 0,
        "skipped": skipped,
        "fingerprint": task.fingerprint,
    }
    write_json_atomic(sidecar_path(task), sidecar)
    return sidecar


# ---------------------------------------------------------------------------- whole runs


def default_workers() -> int:
    """CPUs this process may use (respects SLURM/cgroup CPU sets, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run_tasks(tasks: list[ShardTask], workers: int, redo: bool = False) -> list[dict[str, Any]]:
    """Write the tasks' shards that are not complete yet (all of them when `redo`)."""
    todo = list(tasks) if redo else [t for t in tasks if completed(t) is None]
    print(
        f"{len(tasks) - len(todo)} of {len(tasks)} shards already complete; "
        f"writing {len(todo)} with {min(workers, max(1, len(todo)))} worker process(es)"
    )
    if not todo:
        return []
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    pool = None
    if workers > 1 and len(todo) > 1:
        pool = multiprocessing.get_context().Pool(min(workers, len(todo)))
        stream: Iterator[dict[str, Any]] = pool.imap_unordered(write_shard, todo)
    else:
        stream = map(write_shard, todo)
    try:
        for sidecar in Progress(stream, total=len(todo), desc="sharding", unit="shard"):
            for bad in sidecar["skipped"]:
                print(f"skipped unreadable image {bad['path']}: {bad['error']}", file=sys.stderr)
            results.append(sidecar)
    finally:
        if pool is not None:
            pool.terminate()  # on Ctrl-C: stop workers now; their tmp files are redone later
            pool.join()
    images = sum(len(t.items) for t in todo)
    seconds = time.perf_counter() - start
    print(
        f"wrote {len(todo)} shards ({images} images) in {seconds:.1f} s: "
        f"{images / max(seconds, 1e-9):.0f} images/s"
    )
    return results


def expected_params(collection: ImageCollection, preprocess: Preprocess) -> dict[str, Any]:
    return {
        **collection.params,
        "size": preprocess.size,
        "crop": preprocess.crop,
        "resample": RESAMPLE,
        **preprocess.stored.params,
        **({"attributes": list(collection.attr_names)} if collection.attr_names else {}),
        **({"classes": list(collection.class_names)} if collection.class_names else {}),
    }


def _as_source_data(collection: ImageCollection, preprocess: Preprocess) -> SourceData:
    """The fields `shards.index_matches` compares."""
    return SourceData(
        name=collection.name,
        image_shape=(3, preprocess.size, preprocess.size),
        splits={},
        source=collection.source,
        params=expected_params(collection, preprocess),
    )


def _check_replaceable(out_dir: Path) -> None:
    """Never swap away a folder that is not ours (a typo in --out must not delete data)."""
    if out_dir.exists() and not (out_dir / INDEX_NAME).is_file() and any(out_dir.iterdir()):
        raise DataError(
            f"{out_dir} exists and is not a shard folder (no {INDEX_NAME}); "
            f"move it away or choose another --out/--name"
        )


def merge_index(
    collection: ImageCollection, out_dir: Path, preprocess: Preprocess, shard_size: int
) -> dict[str, Any]:
    """Check that every planned shard is complete, write index.json last and move the folder
    into place. Fails (naming the missing shards) when any task has not finished."""
    out_dir = Path(out_dir)
    work = partial_dir(out_dir)
    tasks = plan_shards(collection, preprocess, shard_size, work)
    sidecars = [completed(t) for t in tasks]
    missing = [t.name for t, s in zip(tasks, sidecars) if s is None]
    if missing:
        raise DataError(
            f"{work}: {len(missing)} of {len(tasks)} shards are not complete (first: "
            f"{', '.join(missing[:5])}); run the sharding again (it resumes), then merge"
        )
    _check_replaceable(out_dir)
    splits: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    for split, items in collection.splits.items():
        parts = [s for t, s in zip(tasks, sidecars) if t.split == split]
        shards = [
            {
                "name": s["name"], "num_samples": s["num_samples"], "sha256": s["sha256"],
                "members": member_table(work / s["name"]).encode(),  # one header walk
            }
            for s in parts
            if s["num_samples"] > 0
        ]  # fmt: skip
        bad = [b for s in parts for b in s["skipped"]]
        if not shards:
            raise DataError(
                f"split {split!r}: none of its {len(items)} images could be read "
                f"(first error: {bad[0]['path']}: {bad[0]['error']})"
            )
        splits[split] = {
            "num_samples": sum(s["num_samples"] for s in shards),
            "num_skipped": len(bad),
            "shards": shards,
        }
        skipped += bad
    index = make_index(
        collection.name, [3, preprocess.size, preprocess.size], splits, collection.source,
        {**expected_params(collection, preprocess), "shard_size": shard_size},
        preprocess.stored.encoding, skipped={"count": len(skipped), "files": skipped},
        **collection.notes,
    )  # fmt: skip
    for stray in work.glob("*.tmp-*"):
        stray.unlink(missing_ok=True)
    publish(work, out_dir, index)
    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
    counts = ", ".join(f"{k} {v['num_samples']}" for k, v in splits.items())
    print(
        f"{out_dir}: {counts}; {len(skipped)} unreadable image(s) skipped"
        + (" (listed in index.json 'skipped')" if skipped else "")
    )
    return index


def shard_collection(
    collection: ImageCollection,
    out_dir: Path,
    preprocess: Preprocess,
    shard_size: int,
    workers: int | None = None,
    force: bool = False,
    task_index: int = 0,
    num_tasks: int = 1,
) -> dict[str, Any] | None:
    """Shard `collection` into `out_dir`; returns the index, or None for one task of several
    (`task_index` of `num_tasks`: that task writes shards task_index, task_index + num_tasks,
    ...; `merge_index` runs once all are done).

    A no-op when `out_dir` already holds shards of the same inputs and settings, unless
    `force`, which rewrites this task's shards even if a partial run finished them.
    """
    out_dir = Path(out_dir)
    if not 0 <= task_index < num_tasks:
        raise DataError(f"task index {task_index} is not in [0, {num_tasks})")
    data = _as_source_data(collection, preprocess)
    if not force and index_matches(out_dir, data, shard_size):
        print(f"{out_dir} is up to date ({INDEX_NAME} matches the source); --force rebuilds")
        return json.loads((out_dir / INDEX_NAME).read_text())
    _check_replaceable(out_dir)
    work = partial_dir(out_dir)
    (work / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    tasks = plan_shards(collection, preprocess, shard_size, work)
    mine = tasks[task_index::num_tasks]  # round robin: disjoint, balanced slices
    if num_tasks > 1:
        print(f"task {task_index} of {num_tasks}: {len(mine)} of {len(tasks)} shards")
    run_tasks(mine, workers or default_workers(), redo=force)
    if num_tasks > 1:
        print(
            f"task {task_index} done; once every task is, run the same command with "
            f"--merge-index (no --task-index) to write {out_dir / INDEX_NAME}"
        )
        return None
    return merge_index(collection, out_dir, preprocess, shard_size)


def merge_index_if_needed(
    collection: ImageCollection, out_dir: Path, preprocess: Preprocess, shard_size: int
) -> dict[str, Any]:
    """After every task of a sharding array: the index, unless an identical one exists."""
    if index_matches(out_dir, _as_source_data(collection, preprocess), shard_size):
        print(f"{out_dir} is up to date ({INDEX_NAME} matches the source)")
        return json.loads((out_dir / INDEX_NAME).read_text())
    return merge_index(collection, out_dir, preprocess, shard_size)
