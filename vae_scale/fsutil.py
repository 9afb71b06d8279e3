"""Durability helpers shared by everything that writes "complete or invisible" outputs
(checkpoints, shards): a rename is only safe once the data and the folder entry are on disk."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's contents, or a folder's entries (new names, renames), to disk."""
    fd = os.open(path, os.O_RDONLY)  # read-only fds fsync both files and folders on POSIX
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
