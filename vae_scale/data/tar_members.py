"""Tar shard -> (name, bytes) members, fast, as a drop-in for webdataset's tar expander.

Why: with one small tar member per image (the WebDataset convention), Python's `tarfile`
walk was the largest cost of reading a shard (benchmarks/RESULTS.md): it parses every header
field of every member through generic code. Our shards
are plain ustar archives of regular files (written by `wds.ShardWriter` / `tarfile`), so one
read of the whole shard plus a 512-byte header parse per member (name, size, checksum) does
the same job several times faster. Anything else in a header (pax or GNU long-name records,
base-256 sizes, links) hands the whole shard to webdataset's own `tarfile` reader, so every
valid tar still reads; a truncated shard or a header with a bad checksum raises
`tarfile.ReadError` after the members before the damage, as `tarfile` does.

`tar_samples` has the signature of `wds.tarfile_to_samples`'s function (url_opener -> this ->
group_by_keys, exceptions with the shard url appended and passed to the handler).
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_iterator, url_opener

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


def _expand(
    sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    for source in sources:
        url, stream = source["url"], source["stream"]
        try:
            for name, content in tar_members(stream.read()):
                yield {"fname": name, "data": content, "__url__": url}
        except Exception as exn:
            exn.args = exn.args + (url,)
            if not handler(exn):
                break
        finally:
            stream.close()
        yield {}  # end of shard: samples of different shards never merge


def tar_samples(
    src: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    """Shard urls -> samples {"__key__", "__url__", suffix: bytes, ...}."""
    return group_by_keys(_expand(url_opener(src, handler=handler), handler), handler=handler)
