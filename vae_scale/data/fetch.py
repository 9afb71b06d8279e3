"""Where raw data lives, and downloads that are verified and never half-written."""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlparse


class DataError(RuntimeError):
    """Raw data or shards are missing, corrupt or of the wrong shape; the message says which."""


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """--data-root, else $VAE_SCALE_DATA, else ./data."""
    if data_root:
        return Path(data_root)
    return Path(os.environ.get("VAE_SCALE_DATA") or "data")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_online(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the URL's host can be opened within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` via a temporary file; verify the checksum before renaming."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        if sha256 is not None and (got := sha256_file(tmp)) != sha256:
            raise DataError(f"downloaded {url} has sha256 {got}, expected {sha256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
