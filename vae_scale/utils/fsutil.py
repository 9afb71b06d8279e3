"""File-system helpers shared by everything that writes "complete or invisible" outputs
(checkpoints, shards, downloads): a rename is only safe once the data and the folder entry are
on disk, and a checksum says the bytes are the ones written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def fsync(path: Path) -> None:
    """Flush a file's contents, or a folder's entries (new names, renames), to disk."""
    fd = os.open(path, os.O_RDONLY)  # read-only fds fsync both files and folders on POSIX
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(
    path: Path, payload: Any, indent: int | None = None, default: Any = None
) -> None:
    """`payload` as JSON at `path`, complete or not at all (temporary name, fsync, rename;
    a failed write leaves the old file and no temporary one)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=indent, default=default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def swap_folder(new: Path, dest: Path) -> None:
    """Put the complete folder `new` in place of `dest` (which may not exist): the old one is
    renamed aside first and removed only once the new one is in place."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    fsync(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
