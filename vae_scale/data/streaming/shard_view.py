"""A local shard read by position: verified once, then each image is one positioned read.

When index.json gives a shard's member table (data/members.py) and its sha256, the shard is
hashed (not with data.verify_shards=false) and its table checked against its own tar headers
(always: the header walk a reader would do anyway) once per content (`VerifiedShards`:
the process and the loader workers it forks share the result, so later epochs do not hash it
again), and its images are read where the table says: no header walk, no regrouping of
members, no per-image transpose (batches are collated as one array and transposed once). A
shard rewritten or truncated in place after it was verified is noticed at the latest when a
batch that read it is collated (`ShardView.unchanged`), before anything trains on it. Labels
and JSON are decoded only for splits that ask for them. Anything this path does not handle
(remote shards, no table or hash, images to be resized, a hash that differs, a member table
that is not the shard's) returns None, and the shard is read the checked way (reader.py),
which also reports what is wrong. Compressed members (png/jpg/webp: `vae-scale shard
--format`) are decoded one by one into the batch's array, in the loader's workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import warnings
from typing import Any

import numpy as np

from vae_scale.data.members import MemberTable, member_table_of
from vae_scale.data.streaming import remote
from vae_scale.data.streaming.catalog import ShardEntry
from vae_scale.data.streaming.decode import DecodeSpec, label_of, read_image
from vae_scale.errors import DataError


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
    """The samples of one verified local shard: `read_image(m, row)` copies sample m's pixels
    (H*W*C bytes, HWC) into `row`, `keys[m]` is its key, `labels_of(m)` its cls / json.

    A shard up to data.max_shard_mb_in_memory is read whole into memory when it is opened
    (the bytes that were verified: the file's size and times are the same before and after the
    read), and sliced from there: what happens to the file afterwards cannot reach training.
    A larger one is read by position (`pread`, which cannot fault, unlike a mapping of a file
    truncated under it), and `unchanged()`, checked after each batch's reads, says whether the
    file still has the size and times it had when verified; a shard rewritten or truncated in
    place is then never trained on (data.on_error decides what happens instead)."""

    def __init__(
        self,
        entry: ShardEntry,
        table: MemberTable,
        spec: DecodeSpec,
        fd: int,
        starts: list,
        data: np.ndarray | None = None,
        codec: str = "npy",
        sizes: list | None = None,
    ):
        self.entry, self.table, self.spec, self.fd = entry, table, spec, fd
        self.starts = starts  # per sample, the first byte of its pixels (or its png/jpg/webp)
        self.codec, self.sizes = codec, sizes  # compressed members: decoded, of these sizes
        self.keys = table.keys
        self.nbytes = int(np.prod(spec.image_hwc)) * np.dtype(spec.dtype).itemsize
        self.identity = _identity(os.fstat(fd))
        self.data = data  # the whole shard in memory (None: read by position)
        self.on_error = "raise"  # the split's data.on_error, set by the reader
        self.short_read = False
        if data is not None:  # nothing more to read from the file
            self.close()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @classmethod
    def open(
        cls,
        entry: ShardEntry,
        spec: DecodeSpec,
        verified: VerifiedShards,
        verify: bool,
        max_in_memory: int = 512 * 2**20,
    ) -> ShardView | None:
        if not (entry.members and (entry.sha256 or not verify) and remote.is_local(entry.url)):
            return None
        if spec.resize:
            return None
        try:
            table = MemberTable.decode(entry.members)
        except (ValueError, KeyError, TypeError):
            return None
        first_image = next((k for k in spec.image_keys if k in table.fields), None)
        if first_image is None or len(table.keys) != entry.num_samples or not table.keys:
            return None
        try:
            fd = os.open(remote.local_path(entry.url), os.O_RDONLY)
        except OSError:
            return None
        view = None
        try:
            view = cls._checked(
                entry, table, spec, fd, verified, max_in_memory, verify, first_image
            )
            return view
        finally:
            if view is None:
                os.close(fd)

    @classmethod
    def _checked(
        cls,
        entry: ShardEntry,
        table: MemberTable,
        spec: DecodeSpec,
        fd: int,
        verified: VerifiedShards,
        max_in_memory: int,
        verify: bool,
        codec: str,
    ) -> ShardView | None:
        """The view of an open shard whose bytes hash to index.json's sha256 (unless not
        `verify`: data.verify_shards=false) and whose member table is the shard's own, its tar
        headers walked (both checked once per content); None otherwise. `codec`: the
        table's image field (npy, or png/jpg/webp decoded when read)."""
        st = os.fstat(fd)
        if st.st_size == 0:
            return None
        data = _read_whole(fd, st.st_size) if st.st_size <= max_in_memory else None
        proof = f"{entry.sha256 if verify else 'unhashed'}:{_table_digest(entry.members)}"
        if not verified.has(st, proof):
            if verify and not _hash_matches(fd, entry.sha256, data):
                return None
            if not _table_matches(fd, entry, table):
                return None
            verified.add(st, proof)
        if _identity(os.fstat(fd)) != _identity(st):  # written while it was read or hashed
            return None
        offsets, sizes = table.column(codec)
        if codec != "npy":  # png/jpg/webp: each decoded when read
            if (sizes < 0).any() or (offsets + sizes).max() > st.st_size:
                return None
            return cls(entry, table, spec, fd, offsets.tolist(), data, codec, sizes.tolist())
        head = data[offsets[0] : offsets[0] + 256].tobytes() if data is not None else None
        header = _npy_header(head or os.pread(fd, 256, int(offsets[0])), spec)
        if header is None or offsets.max() + sizes.max() > st.st_size:
            return None
        n = int(np.prod(spec.image_hwc)) * np.dtype(spec.dtype).itemsize
        if not (sizes == len(header) + n).all():  # every image the index's shape and dtype
            return None
        return cls(entry, table, spec, fd, (offsets + len(header)).tolist(), data)

    def read_image(self, m: int, row: np.ndarray) -> None:
        """Sample m's array into `row` (flat, H*W*C of the spec's dtype); a short read (the file
        cut under us) leaves the view marked changed."""
        start = self.starts[m]
        if self.sizes is not None:
            self._decode_into(m, row)
        elif self.data is not None:
            row.view(np.uint8)[:] = self.data[start : start + self.nbytes]
        elif os.preadv(self.fd, [memoryview(row)], start) != self.nbytes:
            self.short_read = True

    def _decode_into(self, m: int, row: np.ndarray) -> None:
        """Sample m's png/jpg/webp member decoded into `row`. The bytes hashed as index.json
        says, so a member that does not decode to the index's image is a bad shard (named);
        one cut short or undecodable because the file changed is left to `unchanged()`."""
        data = self._bytes(self.starts[m], self.sizes[m])
        if len(data) != self.sizes[m]:
            self.short_read = True
            return
        try:
            image = read_image(data, self.codec, self.spec)
            if image.ndim == 2:
                image = image[..., None]
            if image.shape != tuple(self.spec.image_hwc):
                raise ValueError(f"shape {image.shape}, expected {tuple(self.spec.image_hwc)}")
        except Exception as err:
            if not self.unchanged():
                return
            raise DataError(
                f"shard {self.entry.url}, sample {self.keys[m]}: its {self.codec} member does "
                f"not decode to the index's image ({err})"
            ) from err
        row[:] = image.reshape(-1)

    def unchanged(self) -> bool:
        """Whether every read so far came from the verified bytes: the view holds them in
        memory, or the file still has the size and times it had when verified (a rewrite in
        place changes them)."""
        if self.data is not None:
            return True
        return not self.short_read and _identity(os.fstat(self.fd)) == self.identity

    def changed_error(self) -> DataError:
        return DataError(
            f"shard {self.entry.url} changed on disk while it was being read (its size or "
            f"modification time is no longer that of the verified file): the batch that read "
            f"it was discarded, nothing was trained on the new bytes. Restore the shard (or "
            f"re-shard with `vae-scale shard ... --force` between runs); with "
            f"data.on_error=skip its remaining samples are skipped and counted"
        )

    def labels_of(self, m: int) -> dict[str, Any]:
        """Sample m's `json` (decoded) and `cls` (data.label_key), as decode.py gives them."""
        member: dict[str, Any] = {}
        for field in ("cls", "json"):
            if field in self.table.fields:
                offsets, sizes = self.table.column(field)
                if sizes[m] >= 0:
                    member[field] = self._bytes(int(offsets[m]), int(sizes[m]))
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
        h, w, c = self.spec.image_hwc
        row = np.empty(int(np.prod(self.spec.image_hwc)), self.spec.dtype)
        self.read_image(m, row)
        if not self.unchanged():
            raise self.changed_error()
        out = {
            "key": self.keys[m],
            "image": np.ascontiguousarray(row.reshape(h, w, c).transpose(2, 0, 1)),
        }
        return {**out, **self.labels_of(m)} if self.spec.labels else out

    def _bytes(self, offset: int, size: int) -> bytes:
        if self.data is not None:
            return self.data[offset : offset + size].tobytes()
        return os.pread(self.fd, size, offset)


def _read_whole(fd: int, size: int) -> np.ndarray:
    """The file's `size` bytes, read into memory (a file cut meanwhile reads short: the
    identity check after the read refuses it)."""
    data = np.empty(size, np.uint8)
    view, done = memoryview(data), 0
    while done < size:
        got = os.preadv(fd, [view[done:]], done)
        if got == 0:
            break
        done += got
    return data


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_matches(fd: int, sha256: str, data: np.ndarray | None = None) -> bool:
    """Whether the shard's bytes (`data`, when read already, else the file in chunks: a read
    of a file truncated meanwhile ends short, it never faults) hash to `sha256`."""
    if data is not None:
        return hashlib.sha256(data).hexdigest() == sha256
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest() == sha256


def _table_digest(members: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(members, sort_keys=True).encode(), digest_size=8).hexdigest()


def _table_matches(fd: int, entry: ShardEntry, table: MemberTable) -> bool:
    """Whether index.json's member table is the shard's own: every sample key in order, and
    each of its members (offset, size) a tar member of that key and suffix, by one walk of
    the shard's headers. A table that lies (all offsets at one member: one image trained
    over and over) is said, naming the shard, and the shard is read the checked way."""
    try:
        actual = member_table_of(fd)
    except ValueError:
        return False
    same = actual.keys == table.keys and set(table.fields) <= set(actual.fields)
    for field in table.fields if same else ():
        offsets, sizes = table.column(field)
        true_offsets, true_sizes = actual.column(field)
        present = sizes >= 0
        same = bool((sizes == true_sizes).all()) and bool(
            (offsets[present] == true_offsets[present]).all()
        )
        if not same:
            break
    if not same:
        warnings.warn(
            f"{entry.url}: the member table in index.json does not match the shard's own "
            f"members (keys, offsets or sizes); reading it the checked way. Re-shard with "
            f"`vae-scale shard ... --force` to write a true index",
            stacklevel=2,
        )
    return same


def _npy_header(head: bytes, spec: DecodeSpec) -> bytes | None:
    """The npy header of a member starting with `head`, if it describes the index's image
    (its dtype, C order, (H, W, C))."""
    f = io.BytesIO(head)
    try:
        if np.lib.format.read_magic(f) != (1, 0):
            return None
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    except ValueError:
        return None
    if dtype != np.dtype(spec.dtype) or fortran_order or shape != tuple(spec.image_hwc):
        return None
    return head[: f.tell()]
