"""File-system helpers shared by everything that writes "complete or invisible" outputs
(checkpoints, shards, downloads): a rename is only safe once the data and the folder entry are
on disk, and a checksum says the bytes are the ones written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
