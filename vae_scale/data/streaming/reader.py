"""Reading the samples a worker needs from one shard, checked against index.json.

A shard a worker needs whole is fetched whole (data/remote.py: local file, or a remote one
through retries), and every body that arrives is checked before a sample of it is used: its
sha256 against index.json (`data.verify_shards`), a complete tar, its sample count. Remote
content that fails a check is fetched again; a local file that fails is reported. Shards above
`data.max_shard_mb_in_memory` stay in a local file and are read member by member. A local
shard needed in part (the ends of a worker's slice, the shard a resumed run stops in) is read
by a header walk that seeks past the members it does not need. Problems name the shard; with
on_error='skip' they are warned about and the affected samples come back as `BadSample`,
which the batcher replaces and counts.
"""

from __future__ import annotations

import os
import tarfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vae_scale.data.streaming import remote
from vae_scale.data.streaming.catalog import ShardEntry
from vae_scale.data.streaming.decode import DecodeSpec, decode_sample
from vae_scale.data.streaming.tar_members import (
    _NotPlain,
    archive_complete,
    file_members,
    group_samples,
    seek_samples,
    tar_members,
)
from vae_scale.errors import DataError


@dataclass(frozen=True)
class BadSample:
    reason: str


@dataclass(frozen=True)
class ReadOptions:
    spec: DecodeSpec
    on_error: str = "raise"
    verify: bool = True
    policy: remote.FetchPolicy = field(default_factory=remote.FetchPolicy)


def parse(data: bytes, url: str) -> tuple[list[dict[str, Any]], Exception | None]:
    """The samples of a whole shard in memory, and the error that cut the walk short."""
    members: list[tuple[str, bytes]] = []
    error = None
    try:
        for member in tar_members(data):
            members.append(member)
    except (tarfile.TarError, ValueError) as err:
        error = err
    try:
        return list(group_samples(members, url)), error
    except ValueError as err:  # a member name twice in one sample
        return [], err


class FileShard(Mapping):
    """The samples of a plain tar in a local file, read member by member on demand: sample
    number -> {"__key__", "__url__", suffix: bytes}. Holds the file open (a spill file may be
    removed at once) and only the members' offsets in memory."""

    def __init__(self, body: remote.FileBody, url: str):
        self.fd = os.open(body.path, os.O_RDONLY)
        members, self.error, self.complete = file_members(self.fd, body.size)
        try:
            self.samples = list(group_samples(members, url))
        except ValueError as err:
            self.samples, self.error = [], err

    def __getitem__(self, number: int) -> dict[str, Any]:
        if not 0 <= number < len(self.samples):
            raise KeyError(number)
        sample = self.samples[number]
        return {
            k: v if k.startswith("__") else os.pread(self.fd, v[1], v[0]) for k, v in sample.items()
        }

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.samples)))

    def __len__(self) -> int:
        return len(self.samples)

    def __del__(self) -> None:
        if hasattr(self, "fd"):
            os.close(self.fd)


def check_body(entry: ShardEntry, body: remote.Body, verify: bool) -> Mapping | list:
    """The samples of a shard's body once it passes every check (raises BadContent)."""
    verified = False
    if verify and entry.sha256:
        got = remote.sha256_of(body)
        if got != entry.sha256:
            raise remote.BadContent(
                f"has sha256 {got}, but index.json says {entry.sha256}: the file is corrupt "
                f"or was changed"
            )
        verified = True
    if isinstance(body, bytes):
        samples, error = parse(body, entry.url)
    else:  # FileShard walks pax and GNU headers too (tarfile, seeking past the data)
        samples = FileShard(body, entry.url)
        error = samples.error
    if error is not None:
        detail = error.args[0] if error.args else error
        raise remote.BadContent(
            f"is a corrupt or truncated tar ({type(error).__name__}: {detail})", samples
        )
    if entry.num_samples is not None and len(samples) != entry.num_samples:
        raise remote.BadContent(
            f"holds {len(samples)} samples but index.json says {entry.num_samples}: the "
            f"shard or the index is wrong",
            samples,
        )
    # A remote body not hashed may be cut short at a member boundary: the end marker tells
    # (another header walk, so only then; a local file is what it is).
    if not verified and not remote.is_local(entry.url) and not _reaches_end(body, samples):
        raise remote.BadContent("ends without the tar end-of-archive marker: cut short", samples)
    return samples


def _reaches_end(body: remote.Body, samples: Mapping | list) -> bool:
    return samples.complete if isinstance(samples, FileShard) else archive_complete(body)


class ShardReader:
    """Loads (and decodes) chosen samples of shards. With a `cache` dict (data.cache_in_memory)
    every shard is read whole once and its decoded samples kept: url -> list. `stats` counts
    what the transports redid (data/retries, data/refetched_bytes)."""

    def __init__(
        self,
        options: ReadOptions,
        cache: dict[str, list[Any]] | None = None,
        stats: remote.TransferStats | None = None,
    ):
        self.options, self.cache = options, cache
        self.stats = remote.TransferStats() if stats is None else stats

    def load(self, entry: ShardEntry, wanted: list[int] | None = None) -> Mapping[int, Any]:
        """Sample number -> decoded sample (or BadSample) for `wanted` (None: all)."""
        if self.cache is not None and entry.url in self.cache:
            cached = self.cache[entry.url]
            return dict(enumerate(cached)) if wanted is None else {m: cached[m] for m in wanted}
        whole = wanted is None or len(wanted) == entry.num_samples
        if not whole and remote.is_local(entry.url) and self.cache is None:
            try:
                return self._decode(entry, dict(self._seek(entry, wanted)), wanted)
            except _NotPlain:
                pass  # pax or GNU headers: tarfile reads the whole shard below
        raw, problem = self._read(entry)
        if problem is not None:
            self._problem(problem)
        if self.cache is None:
            return self._decode(entry, raw, wanted)
        decoded = self._decode(entry, raw, None)  # the cache keeps all
        if problem is None and not _any_bad(decoded):
            self.cache[entry.url] = [decoded[i] for i in range(len(raw))]
        return (
            decoded if wanted is None else {m: decoded.get(m, _missing(entry, m)) for m in wanted}
        )

    def _read(self, entry: ShardEntry) -> tuple[Mapping[int, dict[str, Any]], str | None]:
        """The shard's samples, and what is wrong with it (None: nothing)."""
        verify = self.options.verify

        def check(body: remote.Body) -> Mapping | list:
            return check_body(entry, body, verify)

        try:
            samples = remote.fetch(entry.url, self.options.policy, self.stats, check)
        except remote.BadContent as err:  # a local file is what it is: keep what reads
            return _numbered(err.samples), f"shard {entry.url} {err}"
        except DataError as err:
            return {}, str(err)
        return _numbered(samples), None

    def _seek(self, entry: ShardEntry, wanted: list[int]) -> list[tuple[int, dict[str, Any]]]:
        try:
            return list(seek_samples(remote.local_path(entry.url), set(wanted)))
        except (tarfile.TarError, ValueError, OSError) as err:
            self._problem(f"shard {entry.url} is a corrupt or truncated tar ({err})")
            return []

    def _problem(self, message: str) -> None:
        if self.options.on_error != "skip":
            raise DataError(message)
        warnings.warn(f"skipping rest of {message}", stacklevel=3)

    def _decode(
        self, entry: ShardEntry, raw: Mapping[int, dict[str, Any]], wanted: list[int] | None
    ) -> Mapping[int, Any]:
        numbers = sorted(raw) if wanted is None else wanted
        if isinstance(raw, FileShard):  # decoded as the batcher reaches each sample
            return _LazyDecoded(self, entry, raw, numbers)
        return {m: self.decode_one(entry, raw, m) for m in numbers}

    def decode_one(self, entry: ShardEntry, raw: Mapping[int, dict[str, Any]], m: int) -> Any:
        if m not in raw:
            missing = _missing(entry, m)
            if self.options.on_error != "skip":
                raise DataError(missing.reason)
            return missing
        try:
            return decode_sample(raw[m], self.options.spec)
        except DataError as err:
            if self.options.on_error != "skip":
                raise
            warnings.warn(f"skipping: {err}", stacklevel=2)
            return BadSample(str(err))


class _LazyDecoded(Mapping):
    """Sample number -> decoded sample of a FileShard, decoded when asked for."""

    def __init__(self, reader: ShardReader, entry: ShardEntry, raw: FileShard, numbers: list):
        self.reader, self.entry, self.raw, self.numbers = reader, entry, raw, numbers

    def __getitem__(self, number: int) -> Any:
        return self.reader.decode_one(self.entry, self.raw, number)

    def __iter__(self) -> Iterator[int]:
        return iter(self.numbers)

    def __len__(self) -> int:
        return len(self.numbers)


def _numbered(samples: Mapping | list) -> Mapping[int, dict[str, Any]]:
    return samples if isinstance(samples, Mapping) else dict(enumerate(samples))


def _any_bad(decoded: Mapping[int, Any]) -> bool:
    return any(isinstance(v, BadSample) for v in decoded.values())


def _missing(entry: ShardEntry, number: int) -> BadSample:
    return BadSample(
        f"shard {entry.url}: sample number {number} is missing (index.json says "
        f"{entry.num_samples} samples)"
    )
