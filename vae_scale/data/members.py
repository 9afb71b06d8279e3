"""Where each sample's members lie inside a shard: the table `vae-scale shard` writes into
index.json beside each shard's count and sha256, so that a reader slices a verified shard
instead of walking its tar headers.

A shard's record: `fields` (the member suffixes, e.g. ["npy", "cls"]), `keys` (the sample
keys, newline-joined) and `table` (per sample and field the member's data offset and size in
bytes, size -1 where a sample lacks the field), each compressed (zlib, base64) so the index
stays small: offsets are stored as differences, which repeat for same-sized samples.
"""

from __future__ import annotations

import base64
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vae_scale.data.streaming.tar_members import _key_and_suffix, file_members


@dataclass(frozen=True)
class MemberTable:
    fields: tuple[str, ...]
    keys: list[str]
    offsets: np.ndarray  # (samples, fields) int64: first byte of each member's data
    sizes: np.ndarray  # (samples, fields) int64: its size, -1 where the sample lacks it

    def column(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        j = self.fields.index(field)
        return self.offsets[:, j], self.sizes[:, j]

    def encode(self) -> dict[str, Any]:
        flat = self.offsets.ravel()
        deltas = np.diff(flat, prepend=np.int64(0))
        payload = np.concatenate([deltas, self.sizes.ravel()]).astype("<i8").tobytes()
        return {
            "fields": list(self.fields),
            "keys": _pack("\n".join(self.keys).encode()),
            "table": _pack(payload),
        }

    @classmethod
    def decode(cls, record: dict[str, Any]) -> MemberTable:
        fields = tuple(record["fields"])
        text = _unpack(record["keys"]).decode()
        keys = text.split("\n") if text else []
        values = np.frombuffer(_unpack(record["table"]), "<i8")
        n, f = len(keys), len(fields)
        if len(values) != 2 * n * f:
            raise ValueError(f"a member table of {len(values)} numbers for {n} samples x {f}")
        offsets = np.cumsum(values[: n * f]).reshape(n, f)
        return cls(fields, keys, offsets, values[n * f :].reshape(n, f).copy())


def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 6)).decode()


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text))


def member_table(path: str | Path) -> MemberTable:
    """The table of a plain tar shard, by one walk of its headers (samples grouped as
    webdataset groups them: consecutive members sharing a key). Raises ValueError for a shard
    the walk does not read to its end."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return member_table_of(fd, str(path))
    finally:
        os.close(fd)


def member_table_of(fd: int, name: str = "shard") -> MemberTable:
    """`member_table` of a shard already open as `fd`."""
    members, error, _ = file_members(fd, os.fstat(fd).st_size)
    if error is not None:
        raise ValueError(f"{name}: {error}")
    keys: list[str] = []
    rows: list[dict[str, tuple[int, int]]] = []
    fields: dict[str, None] = {}
    for name, (offset, size) in members:
        key, suffix = _key_and_suffix(name)
        if key is None:
            continue
        if not keys or keys[-1] != key:
            keys.append(key)
            rows.append({})
        rows[-1][suffix] = (offset, size)
        fields.setdefault(suffix)
    names = tuple(fields)
    offsets = np.zeros((len(keys), len(names)), np.int64)
    sizes = np.full((len(keys), len(names)), -1, np.int64)
    for i, row in enumerate(rows):
        for j, field in enumerate(names):
            if field in row:
                offsets[i, j], sizes[i, j] = row[field]
            elif i:  # absent: the previous offset keeps the differences small
                offsets[i, j] = offsets[i - 1, j]
    return MemberTable(names, keys, offsets, sizes)
