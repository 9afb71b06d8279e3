"""A split's shards: where each one is, and what index.json says of it (count, sha256);
`SplitCatalog` is what one split holds.

Two kinds of source:
- a dataset location (a local folder or a URL) holding index.json and the shards it names,
  as `vae-scale shard` writes them: counts, hashes and the image shape come from the index;
- explicit shard URLs for a split (a brace pattern, several joined by '::', or pipe:
  commands), e.g. a WebDataset written by another tool. index.json is read beside them
  (or from an explicit location) when it exists; without one, counts are unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vae_scale.data.index import INDEX_NAME, check_index
from vae_scale.data.streaming import remote
from vae_scale.errors import DataError
from vae_scale.utils.fsutil import sha256_file


@dataclass(frozen=True)
class ShardEntry:
    url: str
    num_samples: int | None = None  # None: no index.json lists this shard
    sha256: str | None = None
    # its member table (data/members.py), when the index has one
    members: dict | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def read_index(location: str, policy: remote.FetchPolicy, required: bool = True) -> dict | None:
    """index.json at `location` (a dataset folder or URL, or the index file itself), checked
    for the fields the loader reads; None when absent and not `required`."""
    url = location if location.endswith(".json") else remote.join(location, INDEX_NAME)
    if remote.is_local(url):
        folder = Path(remote.local_path(url)).parent
        if not folder.is_dir():
            if not required:
                return None
            raise DataError(
                f"shard folder {folder} does not exist: run `vae-scale shard {folder.name}` "
                f"first (or set data.shards_dir)"
            )
        if not Path(remote.local_path(url)).is_file():
            if not required:
                return None
            tars = sorted(p.name for p in folder.glob("*.tar"))
            if tars:  # shards without our index: another tool's WebDataset
                raise DataError(
                    f"{url} is missing: {folder} holds {len(tars)} .tar shards ({tars[0]}, ...) "
                    f"but no index.json, e.g. a WebDataset written by another tool. Train on it "
                    f"with data.urls (e.g. \"data.urls={{train: '{folder}/{tars[0]}'}}\" or a "
                    f"brace pattern) and data.samples_per_epoch=N, data.image_size=S (README, "
                    f"'Data at scale'); if vae-scale wrote it and was stopped, re-run "
                    f"`vae-scale shard {folder.name} --force`"
                )
            raise DataError(
                f"{url} is missing: {folder} is not a complete shard folder; re-run "
                f"`vae-scale shard {folder.name} --force`"
            )
    try:
        quick = remote.FetchPolicy(policy.retries, policy.retry_delay_s, min(policy.timeout_s, 30))
        text = remote.fetch(url, quick, what="index")
    except DataError:
        if required:
            raise
        return None
    return check_index(url, text)


def indexed_entries(location: str, index: dict[str, Any], split: str) -> list[ShardEntry]:
    """The shards index.json lists for `split`, located beside it; local ones must exist."""
    if split not in index["splits"]:
        raise DataError(
            f"{remote.join(location, INDEX_NAME)}: no split {split!r} (has "
            f"{sorted(index['splits'])})"
        )
    entries = []
    for shard in index["splits"][split]["shards"]:
        url = remote.join(location, shard["name"])
        if remote.is_local(url) and not Path(remote.local_path(url)).is_file():
            raise DataError(f"shard {url} listed in {INDEX_NAME} is missing")
        entries.append(
            ShardEntry(url, shard["num_samples"], shard.get("sha256"), shard.get("members"))
        )
    if not entries:
        raise DataError(f"{location}: split {split!r} has no shards")
    return entries


def pattern_entries(pattern: str, index: dict[str, Any] | None) -> list[ShardEntry]:
    """The shards of a URL pattern, with counts and hashes where `index` lists their names."""
    urls = remote.expand(pattern)
    if not urls:
        raise DataError(f"data.urls: {pattern!r} names no shard")
    check_local_urls(urls)
    known: dict[str, dict[str, Any]] = {}
    for split in (index or {}).get("splits", {}).values():
        known.update({s["name"]: s for s in split["shards"]})
    entries = []
    for url in urls:
        meta = known.get(url.rsplit("/", 1)[-1])
        if url.startswith("pipe:"):  # the shard the command names, e.g. s3://b/train-01.tar
            words = url[5:].split()
            meta = next((m for n, m in known.items() if any(_names(w, n) for w in words)), None)
        if meta is None:
            entries.append(ShardEntry(url))
        else:
            entries.append(
                ShardEntry(url, meta["num_samples"], meta.get("sha256"), meta.get("members"))
            )
    return entries


def check_local_urls(urls: list[str]) -> None:
    """Local shards of data.urls exist and are files, before a run starts (a folder or a typo
    would otherwise fail in the middle of the first epoch)."""
    for url in urls:
        if not remote.is_local(url):
            continue
        path = Path(remote.local_path(url))
        if path.is_dir():
            tars = sorted(p.name for p in path.glob("*.tar"))
            first = next((t for t in tars if t.startswith("train")), tars[0] if tars else None)
            example = f"'{path}/{first or 'train-{000000..000009}.tar'}'"
            hint = (  # <data.shards_dir>/<data.dataset> is where a run finds such a folder
                f"; it holds {INDEX_NAME}, so it can also be read without data.urls as "
                f"data.shards_dir={path.parent} data.dataset={path.name}"
                if (path / INDEX_NAME).is_file()
                else ""
            )
            raise DataError(
                f"data.urls: {url} is a folder; name its shard files, e.g. {example} "
                f"(brace ranges like train-{{000000..000099}}.tar and '::' between patterns "
                f"work){hint}"
            )
        if not path.is_file():
            raise DataError(f"data.urls: shard {url} does not exist")


def _names(word: str, name: str) -> bool:
    return word == name or word.endswith("/" + name)


def index_location(pattern: str) -> str | None:
    """Where index.json would sit beside the shards of `pattern` (None for pipe: commands)."""
    first = remote.expand(pattern)[0]
    return None if first.startswith("pipe:") else remote.dirname(first)


class SplitCatalog:
    """What one split holds: its shards (from index.json, or a data.urls pattern), their
    sample counts and hashes, and the image shape. `location`: the dataset folder or URL
    holding index.json ('' when data.urls names the shards); `split`: a split of index.json,
    or several joined by "+" ("train+val") read as one."""

    def __init__(self, location: str | Path, split: str, data: Any, policy: remote.FetchPolicy):
        self.location, self.split, self.data = location, split, data
        parts = split.split("+")
        urls = data.urls
        self.urls = "::".join(urls[p] for p in parts) if all(p in urls for p in parts) else None
        self.index = self._open_index(policy)
        if self.urls:
            self.shards = pattern_entries(self.urls, self.index)
        else:
            self.shards = [e for p in parts for e in indexed_entries(str(location), self.index, p)]
        self._count_samples()
        c, h, w = self._stored_shape()
        self.stored_hwc = (h, w, c)  # as decoded from the shards
        self.image_shape = (c, h, w)  # as the model sees it
        if data.random_crop is not None:
            if data.random_crop > min(h, w):
                raise DataError(
                    f"data.random_crop: {data.random_crop} is larger than the {h}x{w} images "
                    f"of {location}"
                )
            self.image_shape = (c, data.random_crop, data.random_crop)

    def _count_samples(self) -> None:
        self.indexed = all(s.num_samples is not None for s in self.shards)
        if self.indexed:
            self.counts = [int(s.num_samples) for s in self.shards]
            self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
            self.num_samples = int(self.offsets[-1])
        else:
            self.num_samples = self.data.samples_per_epoch or 0

    def _open_index(self, policy: remote.FetchPolicy) -> dict | None:
        if self.data.index_url:
            return read_index(self.data.index_url, policy)
        if not self.urls:
            return read_index(str(self.location), policy)
        beside = index_location(self.urls)
        return None if beside is None else read_index(beside, policy, False)

    def _stored_shape(self) -> tuple[int, int, int]:
        size = self.data.image_size
        if size is not None:
            return (self.data.channels, size, size)
        if self.index is None:
            raise DataError(
                f"{self.urls}: no index.json beside these shards, so the image size is unknown: "
                f"set data.image_size (images are resized and centre-cropped to it)"
            )
        c, h, w = self.index["image_shape"]
        return (c, h, w)

    def has(self, name: str) -> bool:
        """Whether the dataset has split `name` too (in index.json, or in data.urls)."""
        if self.urls:
            return name in self.data.urls
        return self.index is not None and name in self.index["splits"]

    def damaged_local_shards(self, verified: Any) -> dict[str, str]:
        """Local shards whose bytes are not those index.json names (sha256), or missing:
        name -> what is wrong. Intact ones are added to `verified` (hashed once: their first
        read does not hash them again). Remote shards are checked as they arrive."""
        damaged = {}
        for entry in self.shards:
            if not remote.is_local(entry.url) or not entry.sha256:
                continue
            path = Path(remote.local_path(entry.url))
            if not path.is_file():
                damaged[entry.name] = "missing"
                continue
            before = path.stat()
            if sha256_file(path) != entry.sha256:
                damaged[entry.name] = "sha256 differs from index.json"
            elif path.stat() == before:
                verified.add(before, entry.sha256)
        return damaged

    def leave_out(self, names: set[str]) -> None:
        """Read the split without these shards (data.on_error=skip)."""
        self.shards = [s for s in self.shards if s.name not in names]
        self._count_samples()

    def check_enough_shards(self) -> None:
        """Index-less training resamples whole shards per (rank, worker): it needs a count."""
        if not self.indexed and self.data.samples_per_epoch is None:
            raise DataError(
                f"{self.urls}: no index.json gives these shards' sample counts; set "
                f"data.samples_per_epoch (the shards are then resampled, open_clip's "
                f"convention) or shard the data with `vae-scale shard`"
            )

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ids -> (shard number, sample number within the shard)."""
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]
