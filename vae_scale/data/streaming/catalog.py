"""A split's shards: where each one is, and what index.json says of it (count, sha256).

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

from vae_scale.data.index import INDEX_NAME, check_index
from vae_scale.data.streaming import remote
from vae_scale.errors import DataError


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
