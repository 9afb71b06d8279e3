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
import os
import re
import struct
import tarfile
from collections.abc import Callable, Iterable, Iterator
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


def _parse_header(header: bytes, pos: int) -> tuple[bytes, bytes, int] | None:
    """(typeflag, name, size) of the 512-byte header at byte `pos`, None for the
    end-of-archive marker. Raises tarfile.ReadError (bad checksum), _NotPlain (left to
    tarfile)."""
    if header.count(0) == BLOCK:  # end-of-archive marker
        return None
    # The checksum counts its own 8-byte field as spaces (8 * 32 = 256).
    stored = _number(header[148:156])
    if stored != sum(header[:148]) + 256 + sum(header[156:]) and stored != _signed_sum(header):
        raise tarfile.ReadError(f"bad tar header checksum at byte {pos}")
    kind = header[156:157]
    if kind not in REGULAR and kind not in SKIPPED:
        raise _NotPlain
    name = header[:100].split(b"\0", 1)[0]
    if header[345] != 0:  # ustar's path prefix (read as tarfile reads it, whatever the magic)
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return kind, name, _number(header[124:136])


def _walk(
    read: Callable[[int, int], bytes], end: int
) -> tuple[list[tuple[str, int, int]], Exception | None, bool]:
    """(name, start, stop) of every regular member of an archive of `end` bytes that
    `read(offset, count)` reads, the error that ended the walk early (truncation, bad
    checksum) or None, and whether the end-of-archive marker was reached (an archive cut at a
    member boundary has none). Raises _NotPlain for headers left to tarfile."""
    members: list[tuple[str, int, int]] = []
    pos = 0
    while pos < end:
        header = read(pos, BLOCK)
        if len(header) < BLOCK:
            return members, tarfile.ReadError(f"unexpected end of data at byte {pos}"), False
        try:
            parsed = _parse_header(header, pos)
        except tarfile.ReadError as err:
            return members, err, False
        if parsed is None:
            return members, None, True
        kind, name, size = parsed
        start = pos + BLOCK
        stop = start + size
        if stop > end:
            return (
                members,
                tarfile.ReadError(
                    f"unexpected end of data in member {name.decode(errors='replace')!r}"
                ),
                False,
            )
        if kind in REGULAR:
            try:
                members.append((name.decode("utf-8"), start, stop))
            except UnicodeDecodeError:
                raise _NotPlain from None  # tarfile knows the other encodings
        pos = start + -(-size // BLOCK) * BLOCK
    return members, None, False


def _plain_members(data: bytes) -> tuple[list[tuple[str, int, int]], Exception | None]:
    members, error, _ = _walk(lambda pos, n: data[pos : pos + n], len(data))
    return members, error


def archive_complete(data: bytes) -> bool:
    """Whether a plain tar in memory reaches its end-of-archive marker (a body cut at a
    member boundary parses cleanly but has none). Other tars: the last 1 KiB is zeros."""
    try:
        return _walk(lambda pos, n: data[pos : pos + n], len(data))[2]
    except _NotPlain:
        return data[-2 * BLOCK :].count(0) == 2 * BLOCK


def file_members(
    fd: int, size: int
) -> tuple[list[tuple[str, tuple[int, int]]], Exception | None, bool]:
    """The members of a tar in an open file, as (name, (offset, size)) read by header
    walk only, the error that ended the walk, and whether the end marker was reached."""
    try:
        members, error, complete = _walk(lambda pos, n: os.pread(fd, n, pos), size)
    except _NotPlain:  # pax or GNU headers (webdataset's TarWriter writes pax): tarfile walks
        members, error, complete = _tarfile_walk(fd, size)
    found = [(n, (start, stop - start)) for n, start, stop in members if not META.match(n)]
    return found, error, complete


def _tarfile_walk(fd: int, size: int) -> tuple[list[tuple[str, int, int]], Exception | None, bool]:
    """`_walk` by tarfile, for the headers it alone parses (seeking past the data)."""
    members: list[tuple[str, int, int]] = []
    with os.fdopen(os.dup(fd), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        try:
            for info in tar:
                if info.offset_data + info.size > size:
                    return (
                        members,
                        tarfile.ReadError(f"unexpected end of data in {info.name!r}"),
                        False,
                    )
                if info.isreg():
                    members.append((info.name, info.offset_data, info.offset_data + info.size))
        except tarfile.TarError as err:
            return members, err, False
        end = os.pread(fd, 2 * BLOCK, tar.offset)
    return members, None, len(end) == 2 * BLOCK and end.count(0) == 2 * BLOCK


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
            if len(header) < BLOCK:
                if header:
                    raise tarfile.ReadError(f"unexpected end of data at byte {pos}")
                break
            parsed = _parse_header(header, pos)
            if parsed is None:
                break
            kind, raw, size = parsed
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
