"""Where raw data lives, and downloads that are verified and never half-written."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from vae_scale.errors import DataError
from vae_scale.utils.fsutil import sha256_file


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """--data-root, else $VAE_SCALE_DATA, else ./data."""
    if data_root:
        return Path(data_root)
    return Path(os.environ.get("VAE_SCALE_DATA") or "data")


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
