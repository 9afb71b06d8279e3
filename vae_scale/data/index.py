"""index.json, the one description of a shard folder that writers (data/sourcing) make and
readers (data/streaming) check: its format, how it is built and written, and the atomic swap
that puts a finished dataset folder in place."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vae_scale.errors import DataError
from vae_scale.utils.fsutil import sha256_file, swap_folder, write_json_atomic

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
ENCODING = "npy uint8 HWC"  # images
# what `encoding` may say, and the array dtype it stores (latent shards: float16; images
# stored compressed: `vae-scale shard --format`)
ENCODINGS = {
    "npy uint8 HWC": "uint8",
    "npy float16 HWC": "float16",
    **{f"{codec} uint8 HWC": "uint8" for codec in ("png", "jpg", "webp")},
}
SHARD_PATTERN = "{split}-%06d.tar"  # shard names: train-000000.tar, ...


def make_index(
    dataset: str,
    image_shape: tuple[int, int, int] | list[int],
    splits: dict[str, dict[str, Any]],
    source: dict[str, Any],
    params: dict[str, Any],
    encoding: str = ENCODING,
    **extra: Any,
) -> dict[str, Any]:
    """The index of a dataset: `splits` maps each split to its num_samples and shards (name,
    num_samples, sha256); `source` and `params` are what index_matches compares later."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "image_shape": list(image_shape),
        "encoding": encoding,
        "splits": splits,
        "source": source,
        "params": params,
        **extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def publish(work: Path, out_dir: Path, index: dict[str, Any]) -> None:
    """Write `index` into the finished folder `work` (last, atomically), then swap `work` into
    the place of `out_dir`: readers see the old dataset or the new one, never a mix."""
    write_json_atomic(work / INDEX_NAME, index, indent=1)
    swap_folder(work, out_dir)


def index_matches(out_dir: Path, data: Any, shard_size: int) -> bool:
    """True when `out_dir` already holds shards made from the same inputs and settings
    (`data`: a SourceData, or anything with its `source` and `params`), each shard's bytes
    still those its sha256 in the index names (a damaged shard is rewritten, not called up to
    date; hashing a dataset's shards costs about what reading them once does)."""
    path = out_dir / INDEX_NAME
    if not path.is_file():
        return False
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return (
        index.get("format_version") == FORMAT_VERSION
        and index.get("source") == data.source
        and index.get("params") == {**data.params, "shard_size": shard_size}
        and all(
            (out_dir / s["name"]).is_file()
            and "members" in s  # older indexes lack the table readers slice by: rebuilt
            and ("sha256" not in s or sha256_file(out_dir / s["name"]) == s["sha256"])
            for split in index["splits"].values()
            for s in split["shards"]
        )
    )


def stored_dtype(index: dict[str, Any] | None) -> str:
    """The dtype of the arrays an index's shards store ("uint8" images without one)."""
    return ENCODINGS[(index or {}).get("encoding", ENCODING)]


def check_index(url: str, text: bytes | str) -> dict[str, Any]:
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{url}: not valid JSON ({err})") from err
    if not isinstance(index, dict):
        raise DataError(f"{url}: expected a JSON object, got {type(index).__name__}")
    if index.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{url}: format_version {index.get('format_version')!r}, expected "
            f"{FORMAT_VERSION}; re-shard with `vae-scale shard ... --force`"
        )
    splits = index.get("splits")
    shape = index.get("image_shape")
    if not isinstance(splits, dict) or not (isinstance(shape, list) and len(shape) == 3):
        raise DataError(f"{url}: expected 'splits' (an object) and 'image_shape' ([C, H, W])")
    if index.get("encoding", ENCODING) not in ENCODINGS:
        raise DataError(
            f"{url}: encoding {index.get('encoding')!r}, expected one of {sorted(ENCODINGS)}"
        )
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and _count_ok(s) for s in shards
        ):
            raise DataError(
                f"{url}: split {name!r}: expected 'shards', a list of objects with 'name' and "
                f"'num_samples' (an integer >= 0)"
            )
    return index


def _count_ok(entry: dict[str, Any]) -> bool:
    n = entry.get("num_samples")
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
