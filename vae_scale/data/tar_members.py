"""Tar shard -> (name, bytes) members and samples, fast, in place of webdataset's tar expander.

Why: with one small tar member per image (the WebDataset convention), Python's `tarfile`
walk was the largest cost of reading a shard (benchmarks/RESULTS.md): it parses every header
field of every member through generic code. Our shards
are plain ustar archives of regular files (written by `wds.ShardWriter` / `tarfile`), so one
read of the whole shard plus a 512-byte header parse per member (name, size, checksum) does
the same job several times faster. Anything else in a header (pax or GNU long-name records,
base-256 sizes, links) hands the whole shard to webdataset's own `tarfile` reader, so every
valid tar still reads; a truncated shard or a header with a bad checksum raises
`tarfile.ReadError` after the members before the damage, as `tarfile` does.

`seek_samples` walks the headers of a local shard and reads only the samples it is asked
for, seeking past the others (a resumed epoch, the ends of a worker's slice).
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

BLOCK = 512
REGULAR = (b"0", b"\0")  # typeflags of a regular file (old tars use NUL)
SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: no data we read
META = re.compile(r"__[^/]*__($|/)")  # webdataset skips such names (e.g. __index__)


class _NotPlain(Exception):
    """A header this reader does not parse; the shard goes to `tarfile` instead."""


def _number(field: bytes) -> int:
    field = field.strip(b"\0 ")
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 encoding of a large number
        raise _NotPlain
    try:
        return int(field, 8) if field else 0
    except ValueError as err:
        raise tarfile.ReadError(f"invalid number field {field!r} in a tar header") from err


def _signed_sum(header: bytes) -> int:
    """The checksum as some old tars computed it (bytes as signed chars); tarfile accepts both."""
    signed = struct.unpack("148b8x356b", header)
    return sum(signed) + 256


def _plain_members(data: bytes) -> tuple[list[tuple[str, int, int]], Exception | None]:
    """(name, start, stop) of every regular member, and the error that ended the walk early
    (truncation, bad checksum) or None. Raises _NotPlain for headers left to tarfile."""
    members: list[tuple[str, int, int]] = []
    pos, end = 0, len(data)
    while pos < end:
        header = data[pos : pos + BLOCK]
        if len(header) < BLOCK:
            return members, tarfile.ReadError(f"unexpected end of data at byte {pos}")
        if header.count(0) == BLOCK:  # end-of-archive marker
            break
        # The checksum counts its own 8-byte field as spaces (8 * 32 = 256).
        stored = _number(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]) and stored != _signed_sum(header):
            return members, tarfile.ReadError(f"bad tar header checksum at byte {pos}")
        kind = header[156:157]
        if kind not in REGULAR and kind not in SKIPPED:
            raise _NotPlain
        size = _number(header[124:136])
        name = header[:100].split(b"\0", 1)[0]
        if header[345] != 0:  # ustar's path prefix (read as tarfile reads it, whatever the magic)
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        start = pos + BLOCK
        stop = start + size
        if stop > end:
            return members, tarfile.ReadError(
                f"unexpected end of data in member {name.decode(errors='replace')!r}"
            )
        if kind in REGULAR:
            try:
                members.append((name.decode("utf-8"), start, stop))
            except UnicodeDecodeError:
                raise _NotPlain from None  # tarfile knows the other encodings
        pos = start + -(-size // BLOCK) * BLOCK
    return members, None


def tar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular member, in archive order, skipping `__meta__` names."""
    try:
        members, error = _plain_members(data)
    except _NotPlain:
        for member in tar_file_iterator(io.BytesIO(data)):
            yield member["fname"], member["data"]
        return
    view = memoryview(data)
    for name, start, stop in members:
        if not META.match(name):
            yield name, bytes(view[start:stop])
    if error is not None:
        raise error


def _key_and_suffix(name: str) -> tuple[str | None, str]:
    prefix, suffix = base_plus_ext(name)
    return prefix, (suffix or "").lower()


def group_samples(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """(name, content) members -> samples {"__key__", "__url__", suffix: bytes}, grouped by
    webdataset's own `group_by_keys` (key: the name up to the basename's first dot)."""
    files = ({"fname": name, "data": content, "__url__": url} for name, content in members)
    return group_by_keys(files)


def seek_samples(path: str, wanted: set[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(sample number, sample) of the `wanted` sample numbers of a local plain tar, reading
    only their members: the others are skipped by their headers (a seek past the data, no
    read). Raises _NotPlain for headers this walk does not parse (the caller reads the
    whole shard instead) and tarfile.ReadError on truncation or a bad checksum."""
    last = max(wanted, default=-1)
    index, key = -1, None
    current: dict[str, Any] | None = None
    with open(path, "rb") as f:
        while True:
            pos = f.tell()
            header = f.read(BLOCK)
            if len(header) < BLOCK or header.count(0) == BLOCK:
                if len(header) and len(header) < BLOCK:
                    raise tarfile.ReadError(f"unexpected end of data at byte {pos}")
                break
            stored = _number(header[148:156])
            plain_sum = sum(header[:148]) + 256 + sum(header[156:])
            if stored != plain_sum and stored != _signed_sum(header):
                raise tarfile.ReadError(f"bad tar header checksum at byte {pos}")
            kind = header[156:157]
            if kind not in REGULAR and kind not in SKIPPED:
                raise _NotPlain
            size = _number(header[124:136])
            raw = header[:100].split(b"\0", 1)[0]
            if header[345] != 0:
                raw = header[345:500].split(b"\0", 1)[0] + b"/" + raw
            padded = -(-size // BLOCK) * BLOCK
            name = raw.decode("utf-8", errors="strict") if kind in REGULAR else ""
            prefix = None if not name or META.match(name) else _key_and_suffix(name)[0]
            if prefix is not None and prefix != key:
                if current is not None:
                    yield index, current
                    current = None
                index, key = index + 1, prefix
                if index > last:
                    return
                if index in wanted:
                    current = {"__key__": prefix, "__url__": path}
            if current is not None and prefix is not None:
                data = f.read(size)
                if len(data) < size:
                    raise tarfile.ReadError(f"unexpected end of data in member {name!r}")
                current[_key_and_suffix(name)[1]] = data
                f.seek(padded - size, 1)
            else:
                f.seek(padded, 1)
    if current is not None:
        yield index, current
