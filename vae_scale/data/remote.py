"""Where shards can live, and reading them whole with retries and an optional local cache.

A shard location is one of:
- a local path (or ``file://`` URL);
- ``http://`` / ``https://`` (urllib: status codes decide what is retried);
- ``pipe:CMD``, a shell command that writes the shard to stdout (webdataset's ``gopen``),
  e.g. ``pipe:aws s3 cp s3://bucket/train-000001.tar -``;
- any other ``scheme://`` through fsspec (``s3://`` needs s3fs, ``gs://`` gcsfs installed).

Brace patterns (``train-{000000..000089}.tar``) expand with webdataset's `expand_urls`.
Transient errors are retried with exponential backoff; a shard that keeps failing is a
`DataError` naming its URL. With a cache folder, remote shards are kept on local disk (written
under a temporary name, renamed when complete), the least recently used evicted above a size
bound, so later epochs and resumed runs read them locally.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vae_scale.errors import DataError

#: HTTP statuses that are worth another try (throttling, server trouble); others are final.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class FetchPolicy:
    retries: int = 3  # further attempts after the first
    retry_delay_s: float = 1.0  # before the first retry; doubled each time
    timeout_s: float = 60.0
    cache_dir: str | None = None
    cache_max_bytes: int = 50 * 2**30


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    """`base` folder or URL + a relative name."""
    if is_local(base) and not base.startswith("file://"):
        return str(Path(base) / name)
    return base.rstrip("/") + "/" + name


def dirname(url: str) -> str:
    if is_local(url) and not url.startswith("file://"):
        return str(Path(url).parent)
    return url.rsplit("/", 1)[0]


def expand(pattern: str) -> list[str]:
    """Brace patterns, and several patterns separated by '::', into a list of URLs."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


class _Final(Exception):
    """An error that another attempt cannot fix (404, 403, missing file)."""


def _read_once(url: str, timeout: float) -> bytes:
    if is_local(url):
        try:
            with open(local_path(url), "rb") as f:
                return f.read()
        except FileNotFoundError as err:
            raise _Final(f"no such file ({err.strerror})") from err
    if url.startswith("pipe:"):
        import webdataset as wds

        stream = wds.gopen(url, "rb")
        try:
            data = stream.read()
        finally:
            stream.close()  # raises when the command failed
        return data
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
                expected = response.headers.get("Content-Length")
        except urllib.error.HTTPError as err:
            if err.code in RETRY_STATUS:
                raise OSError(f"HTTP {err.code} {err.reason}") from err
            raise _Final(f"HTTP {err.code} {err.reason}") from err
        if expected is not None and int(expected) != len(data):
            raise OSError(f"got {len(data)} of {expected} bytes")
        return data
    try:
        import fsspec
    except ImportError as err:  # pragma: no cover - fsspec ships with torch
        raise _Final("fsspec is not installed") from err
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except (ImportError, ValueError) as err:
        scheme = urlparse(url).scheme
        raise _Final(
            f"no fsspec filesystem for {scheme}:// ({err}); install its package (s3fs, gcsfs) "
            f"or use a pipe: URL such as pipe:aws s3 cp {url} -"
        ) from err
    except FileNotFoundError as err:
        raise _Final(f"not found ({err})") from err


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The whole shard at `url`, retrying transient errors; a DataError names the URL."""
    cached = _cache_path(url, policy)
    if cached is not None and cached.is_file():
        os.utime(cached)  # recently used: the last to be evicted
        return cached.read_bytes()
    delay, attempts = policy.retry_delay_s, policy.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            data = _read_once(url, policy.timeout_s)
            break
        except _Final as err:
            raise DataError(f"shard {url}: {err}") from None
        except (OSError, ValueError) as err:  # connection, timeout, truncation, pipe status
            if attempt == attempts:
                raise DataError(
                    f"shard {url}: still failing after {attempts} attempts "
                    f"(data.retries={policy.retries}): {err}"
                ) from None
            time.sleep(delay)
            delay *= 2
    if cached is not None:
        _store(cached, data, policy.cache_max_bytes)
    return data


def _cache_path(url: str, policy: FetchPolicy) -> Path | None:
    if policy.cache_dir is None or is_local(url):
        return None
    digest = hashlib.sha256(url.encode()).hexdigest()[:24]
    return Path(policy.cache_dir) / f"{digest}-{Path(urlparse(url).path).name}"


def _store(path: Path, data: bytes, max_bytes: int) -> None:
    """Write atomically, then evict the least recently used files above `max_bytes`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:  # a full cache disk must not stop training: read from the source
        tmp.unlink(missing_ok=True)
        return
    files = sorted(
        (p for p in path.parent.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    total = sum(p.stat().st_size for p in files)
    for old in files:
        if total <= max_bytes or old == path:
            break
        total -= old.stat().st_size
        old.unlink(missing_ok=True)
