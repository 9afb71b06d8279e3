"""A local shard read by slicing: verified once, then each image is a slice of the mapped file.

When index.json gives a shard's member table (data/members.py) and its sha256, the shard is
mapped into memory, hashed once per content (`VerifiedShards`: the process and the loader
workers it forks share the result, so later epochs do not hash it again), and its images are
sliced out where the table says: no header walk, no regrouping of members, no per-image
transpose (batches are collated as one array and transposed once). Labels and JSON are
decoded only for splits that ask for them. Anything this path does not handle (remote shards,
no table or hash, images that are not the index's npy, a hash that differs) returns None, and
the shard is read the checked way (reader.py), which also reports what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
from typing import Any

import numpy as np

from vae_scale.data.members import MemberTable
from vae_scale.data.streaming import remote
from vae_scale.data.streaming.catalog import ShardEntry
from vae_scale.data.streaming.decode import DecodeSpec, label_of


class VerifiedShards:
    """Shards whose bytes hashed to their index.json sha256, known by content identity
    (device, inode, size, mtime, ctime and the hash). The record is a table in anonymous
    shared memory that the process maps before it forks loader workers, so what one worker
    verified the parent and later workers know; nothing goes to disk and nothing outlives the
    processes. A file written or replaced since has another identity and is hashed again; a
    full table (or a spawned worker, which maps its own) only means hashing again."""

    DIGEST = 16  # bytes per slot
    PROBES = 8

    def __init__(self, slots: int = 1 << 16) -> None:
        self.slots = slots
        self.table = mmap.mmap(-1, slots * self.DIGEST)  # MAP_SHARED | MAP_ANONYMOUS

    def _identity(self, st: os.stat_result, sha256: str) -> bytes:
        who = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{sha256}"
        return hashlib.blake2b(who.encode(), digest_size=self.DIGEST).digest()

    def _slots(self, identity: bytes):
        first = int.from_bytes(identity[:8], "little") % self.slots
        for i in range(self.PROBES):
            at = (first + i) % self.slots * self.DIGEST
            yield at, self.table[at : at + self.DIGEST]

    def has(self, st: os.stat_result, sha256: str) -> bool:
        identity = self._identity(st, sha256)
        for _, held in self._slots(identity):
            if held == identity:
                return True
            if not any(held):
                return False
        return False

    def add(self, st: os.stat_result, sha256: str) -> None:
        # Two workers filling one empty slot at once: one record is lost, so that shard is
        # hashed again later; a torn slot never equals an identity.
        identity = self._identity(st, sha256)
        for at, held in self._slots(identity):
            if held == identity:
                return
            if not any(held):
                self.table[at : at + self.DIGEST] = identity
                return


_VERIFIED: VerifiedShards | None = None


def verified_shards() -> VerifiedShards:
    """This process's record (made on first use; a loader should call it before forking)."""
    global _VERIFIED
    if _VERIFIED is None:
        _VERIFIED = VerifiedShards()
    return _VERIFIED


class ShardView:
    """The samples of one verified local shard: `image_into(flat_row, m)` copies sample m's
    pixels (H*W*C bytes, HWC), `keys[m]` its key, `labels_of(m)` its cls / json."""

    def __init__(self, entry: ShardEntry, table: MemberTable, spec: DecodeSpec, view, starts):
        self.entry, self.table, self.spec = entry, table, spec
        self.buffer = view  # the mapped shard, as a uint8 array
        self.starts = starts  # per sample, the first byte of its pixels
        self.keys = table.keys
        self.nbytes = int(np.prod(spec.image_hwc))

    @classmethod
    def open(
        cls, entry: ShardEntry, spec: DecodeSpec, verified: VerifiedShards, verify: bool
    ) -> ShardView | None:
        if not (entry.members and entry.sha256 and verify and remote.is_local(entry.url)):
            return None
        if spec.resize or "npy" not in spec.image_keys:
            return None
        try:
            table = MemberTable.decode(entry.members)
        except (ValueError, KeyError, TypeError):
            return None
        first_image = next((k for k in spec.image_keys if k in table.fields), None)
        if first_image != "npy" or len(table.keys) != entry.num_samples or not table.keys:
            return None
        offsets, sizes = table.column("npy")
        try:
            with open(remote.local_path(entry.url), "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size == 0:
                    return None
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError:
            return None
        if not verified.has(st, entry.sha256):
            if hashlib.sha256(mapped).hexdigest() != entry.sha256:
                return None
            verified.add(st, entry.sha256)
        data = np.frombuffer(mapped, np.uint8)
        header = _npy_header(bytes(mapped[offsets[0] : offsets[0] + 256]), spec)
        if header is None or offsets.max() + sizes.max() > len(data):
            return None
        n = int(np.prod(spec.image_hwc))
        if not (sizes == len(header) + n).all():  # every image the index's shape and dtype
            return None
        # every member starts with the same npy header (one gather, once per shard)
        heads = data[offsets[:, None] + np.arange(len(header))]
        if not (heads == np.frombuffer(header, np.uint8)).all():
            return None
        return cls(entry, table, spec, data, (offsets + len(header)).tolist())

    def labels_of(self, m: int) -> dict[str, Any]:
        """Sample m's `json` (decoded) and `cls` (data.label_key), as decode.py gives them."""
        member: dict[str, Any] = {}
        for field in ("cls", "json"):
            if field in self.table.fields:
                offsets, sizes = self.table.column(field)
                if sizes[m] >= 0:
                    member[field] = self.buffer[offsets[m] : offsets[m] + sizes[m]].tobytes()
        out: dict[str, Any] = {}
        if "json" in member:
            out["json"] = json.loads(member["json"])
        label = label_of(member, out.get("json"), self.spec.label_key)
        if label is not None:
            out["cls"] = label
        return out

    def sample(self, m: int) -> dict[str, Any]:
        """Sample m as decode.py's decode_sample gives it (image CHW), for the batches that
        mix this path with the checked one."""
        start = self.starts[m]
        h, w, c = self.spec.image_hwc
        image = self.buffer[start : start + self.nbytes].reshape(h, w, c).transpose(2, 0, 1)
        out = {"key": self.keys[m], "image": np.ascontiguousarray(image)}
        return {**out, **self.labels_of(m)} if self.spec.labels else out


def _npy_header(head: bytes, spec: DecodeSpec) -> bytes | None:
    """The npy header of a member starting with `head`, if it describes the index's image
    (uint8, C order, (H, W, C))."""
    f = io.BytesIO(head)
    try:
        if np.lib.format.read_magic(f) != (1, 0):
            return None
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    except ValueError:
        return None
    if dtype != np.uint8 or fortran_order or shape != tuple(spec.image_hwc):
        return None
    return head[: f.tell()]
