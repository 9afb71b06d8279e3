"""Reading the samples a worker needs from one shard, checked against index.json.

A shard a worker needs whole is read whole (local file or remote fetch), its sha256 compared
with index.json while it is in memory (`data.verify_shards`) and its sample count checked.
A local shard needed in part (the ends of a worker's slice, the shard a resumed run stops in)
is read by a header walk that seeks past the members it does not need. Problems name the shard;
with on_error='skip' they are warned about and the affected samples come back as `BadSample`,
which the batcher replaces and counts.
"""

from __future__ import annotations

import hashlib
import tarfile
import warnings
from dataclasses import dataclass
from typing import Any

from vae_scale.data import remote
from vae_scale.data.catalog import ShardEntry
from vae_scale.data.decode import DecodeSpec, decode_sample
from vae_scale.data.tar_members import _NotPlain, group_samples, seek_samples, tar_members
from vae_scale.errors import DataError


@dataclass(frozen=True)
class BadSample:
    reason: str


@dataclass(frozen=True)
class ReadOptions:
    spec: DecodeSpec
    on_error: str = "raise"
    verify: bool = True
    policy: remote.FetchPolicy = remote.FetchPolicy()


def read_whole(entry: ShardEntry, policy: remote.FetchPolicy) -> bytes:
    return remote.fetch(entry.url, policy)


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


class ShardReader:
    """Loads (and decodes) chosen samples of shards. With a `cache` dict (data.cache_in_memory)
    every shard is read whole once and its decoded samples kept: url -> list."""

    def __init__(self, options: ReadOptions, cache: dict[str, list[Any]] | None = None):
        self.options, self.cache = options, cache

    def load(self, entry: ShardEntry, wanted: list[int] | None = None) -> dict[int, Any]:
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
        if problem is None and entry.num_samples is not None and len(raw) != entry.num_samples:
            problem = (
                f"shard {entry.url} holds {len(raw)} samples but index.json says "
                f"{entry.num_samples}: the shard or the index is wrong"
            )
        if problem is not None:
            self._problem(problem)
        if self.cache is None:
            return self._decode(entry, dict(enumerate(raw)), wanted)
        decoded = self._decode(entry, dict(enumerate(raw)), None)  # the cache keeps all
        if problem is None and not _any_bad(decoded):
            self.cache[entry.url] = [decoded[i] for i in range(len(raw))]
        return (
            decoded if wanted is None else {m: decoded.get(m, _missing(entry, m)) for m in wanted}
        )

    def _read(self, entry: ShardEntry) -> tuple[list[dict[str, Any]], str | None]:
        try:
            data = read_whole(entry, self.options.policy)
        except DataError as err:
            return [], str(err)
        if self.options.verify and entry.sha256:
            got = hashlib.sha256(data).hexdigest()
            if got != entry.sha256:
                return [], (
                    f"shard {entry.url} has sha256 {got}, but index.json says {entry.sha256}: "
                    f"the file is corrupt or was changed"
                )
        raw, error = parse(data, entry.url)
        if error is None:
            return raw, None
        detail = error.args[0] if error.args else error
        return (
            raw,
            f"shard {entry.url}: corrupt or truncated tar ({type(error).__name__}: {detail})",
        )

    def _seek(self, entry: ShardEntry, wanted: list[int]) -> list[tuple[int, dict[str, Any]]]:
        try:
            return list(seek_samples(remote.local_path(entry.url), set(wanted)))
        except (tarfile.TarError, ValueError, OSError) as err:
            self._problem(f"shard {entry.url}: corrupt or truncated tar ({err})")
            return []

    def _problem(self, message: str) -> None:
        if self.options.on_error != "skip":
            raise DataError(message)
        warnings.warn(f"skipping rest of {message}", stacklevel=3)

    def _decode(
        self, entry: ShardEntry, raw: dict[int, dict[str, Any]], wanted: list[int] | None
    ) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for m in sorted(raw) if wanted is None else wanted:
            if m not in raw:
                out[m] = _missing(entry, m)
                if self.options.on_error != "skip":
                    raise DataError(out[m].reason)
                continue
            try:
                out[m] = decode_sample(raw[m], self.options.spec)
            except DataError as err:
                if self.options.on_error != "skip":
                    raise
                warnings.warn(f"skipping: {err}", stacklevel=2)
                out[m] = BadSample(str(err))
        return out


def _any_bad(decoded: dict[int, Any]) -> bool:
    return any(isinstance(v, BadSample) for v in decoded.values())


def _missing(entry: ShardEntry, number: int) -> BadSample:
    return BadSample(
        f"shard {entry.url}: sample number {number} is missing (index.json says "
        f"{entry.num_samples} samples)"
    )
