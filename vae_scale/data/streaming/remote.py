"""Where shards can live, and fetching them whole, checked, through every transport fault.

A shard location is one of:
- a local path (or ``file://`` URL);
- ``http://`` / ``https://`` (urllib; status codes decide what is retried);
- ``pipe:CMD``, a shell command that writes the shard to stdout, e.g.
  ``pipe:aws s3 cp s3://bucket/train-000001.tar -``;
- any other ``scheme://`` through fsspec (``s3://`` needs s3fs, ``gs://`` gcsfs installed).

Brace patterns (``train-{000000..000089}.tar``) expand with webdataset's `expand_urls`.

`fetch` treats every transport failure as transient and tries again with exponential backoff
(``data.retries``, ``data.retry_delay_s``): a body shorter than its Content-Length, a reset or
refused connection, a failed name lookup, no byte for ``data.read_timeout_s`` (a stalled
server or pipe), HTTP 5xx, 408 and 429 (waiting at least its Retry-After), a pipe command that
exits non-zero. A caller's `check` (sha256, a complete tar, the sample count) runs on every
body that arrived, and content it rejects is fetched again rather than trained on. After a
broken HTTP body the next attempt asks for the missing bytes only (a Range request guarded by
If-Range), so a fault at 90 % of a large shard does not start it over. Final answers (404,
403, a missing file) are not retried. Bodies above ``data.max_shard_mb_in_memory`` go to a
file on local disk instead of memory (the cache folder, else the temp folder), read member by
member. webdataset's own ``gopen`` streams through ``curl`` and cannot resume or report a
failed command's stderr, so the transports are ours.

With a cache folder, remote shards are kept on local disk (written under a temporary name,
renamed when complete and checked), the least recently used evicted above a size bound, so
later epochs and resumed runs read them locally.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import os
import select
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from vae_scale.errors import DataError
from vae_scale.utils.fsutil import sha256_file

#: HTTP statuses below 500 that are worth another try (timeout, too early, throttling).
RETRY_STATUS = {408, 425, 429}
CHUNK = 1 << 20
MAX_RETRY_AFTER_S = 300.0  # a server asking for more is not waited on for longer per attempt

T = TypeVar("T")


@dataclass(frozen=True)
class FetchPolicy:
    retries: int = 3  # further attempts after the first
    retry_delay_s: float = 1.0  # before the first retry; doubled each time
    timeout_s: float = 60.0  # connecting, and the longest wait for the next byte
    cache_dir: str | None = None
    cache_max_bytes: int = 50 * 2**30
    max_in_memory_bytes: int = 512 * 2**20  # larger bodies go to a local file


@dataclass
class TransferStats:
    """What the transports had to redo, counted where they run (a loader worker)."""

    retries: int = 0  # attempts after a failed one
    refetched_bytes: int = 0  # bytes received, then thrown away and fetched again

    def take(self) -> dict[str, int]:
        """The counts since the last take, reset."""
        out = {"retries": self.retries, "refetched_bytes": self.refetched_bytes}
        self.retries = self.refetched_bytes = 0
        return out


@dataclass(frozen=True)
class FileBody:
    """A body in a local file: a large local shard, a cached copy or a spilled download (a
    spill file is removed when `fetch` returns: `check` must open what it keeps)."""

    path: str
    size: int


Body = bytes | FileBody


class BadContent(Exception):
    """The bytes arrived but are wrong (checksum, truncated tar, sample count): a remote
    source is asked again; a local file is what it is. The message is a predicate of the
    shard ("has sha256 ..."); `samples` what could be read of it."""

    def __init__(self, message: str, samples: Any = None):
        super().__init__(message)
        self.samples = [] if samples is None else samples


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Final(Exception):
    """An error that another attempt cannot fix (404, 403, missing file)."""


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


def sha256_of(body: Body) -> str:
    if isinstance(body, bytes):
        return hashlib.sha256(body).hexdigest()
    return sha256_file(body.path)


def fetch(
    url: str,
    policy: FetchPolicy,
    stats: TransferStats | None = None,
    check: Callable[[Body], T] | None = None,
    what: str = "shard",
) -> T:
    """The body at `url` passed through `check` (which raises BadContent to reject it),
    retrying transient failures and rejected remote content; a DataError names the URL and
    every attempt. A rejected local file raises its BadContent."""
    stats = TransferStats() if stats is None else stats
    check = check or (lambda body: body)  # type: ignore[assignment,return-value]
    cached = _cache_path(url, policy)
    if cached is not None and cached.is_file():
        os.utime(cached)  # recently used: the last to be evicted
        try:
            return check(_local_body(str(cached), policy))
        except BadContent:
            cached.unlink(missing_ok=True)  # a damaged copy: fetch it again from the source
    download = _Download(policy, stats)
    attempts, delay, history = policy.retries + 1, policy.retry_delay_s, []
    try:
        for attempt in range(1, attempts + 1):
            wait = delay
            try:
                result = check(_read_once(url, policy, download))
                if cached is not None:
                    download.store(cached)
                return result
            except _Final as err:
                raise DataError(
                    f"{what} {url}: {err} (attempt {attempt} of {attempts}; not retried: "
                    f"another attempt cannot change this answer)"
                ) from None
            except BadContent as err:
                if is_local(url):
                    raise
                history.append(f"attempt {attempt}: the content {err}")
                download.restart()
            except _Transient as err:
                history.append(f"attempt {attempt}: {err}")
                wait = max(delay, min(err.retry_after or 0.0, MAX_RETRY_AFTER_S))
            except (OSError, http.client.HTTPException) as err:
                history.append(f"attempt {attempt}: {_describe(err, policy)}")
            if attempt < attempts:
                stats.retries += 1
                time.sleep(wait)
                delay *= 2
    finally:
        download.close()
    raise DataError(
        f"{what} {url}: still failing after {attempts} attempts (data.retries="
        f"{policy.retries}): " + "; ".join(history)
    )


def _describe(err: BaseException, policy: FetchPolicy) -> str:
    reason = getattr(err, "reason", None)  # urllib's URLError wraps the socket's error
    inner = reason if isinstance(reason, BaseException) else err
    if isinstance(inner, TimeoutError):
        return f"no data for {policy.timeout_s:g} s (data.read_timeout_s): timed out"
    if isinstance(inner, OSError) and inner.__class__.__name__ == "gaierror":
        return f"name lookup failed ({inner})"
    if isinstance(err, http.client.IncompleteRead):
        return f"connection closed early ({err!r})"
    return f"{type(inner).__name__}: {inner}"


def _read_once(url: str, policy: FetchPolicy, download: _Download) -> Body:
    if is_local(url):
        try:
            return _local_body(local_path(url), policy)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            raise _Final(f"cannot read the file ({err.strerror})") from err
    if url.startswith("pipe:"):
        return _read_pipe(url[5:], policy, download)
    if url.startswith(("http://", "https://")):
        return _read_http(url, policy, download)
    return _read_fsspec(url, download)


def _local_body(path: str, policy: FetchPolicy) -> Body:
    size = os.path.getsize(path)
    if size > policy.max_in_memory_bytes:
        return FileBody(path, size)
    with open(path, "rb") as f:
        return f.read()


def _read_http(url: str, policy: FetchPolicy, download: _Download) -> Body:
    headers = {"User-Agent": "vae_scale"}
    if download.size and download.validator:  # the rest of a broken body, if unchanged
        headers["Range"] = f"bytes={download.size}-"
        headers["If-Range"] = download.validator
    else:
        download.restart()
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=policy.timeout_s
        )
    except urllib.error.HTTPError as err:
        status = f"HTTP {err.code} {err.reason}"
        if err.code == 416:  # the range no longer fits the file: start over
            download.restart()
            raise _Transient(status) from None
        if err.code >= 500 or err.code in RETRY_STATUS:
            raise _Transient(status, _retry_after(err.headers.get("Retry-After"))) from None
        raise _Final(status) from None
    with response:
        offset = 0
        if response.status == 206:
            offset = _range_start(response.headers.get("Content-Range"))
            if offset != download.size:
                download.restart()
                raise _Transient(f"the server resumed at byte {offset}, not {download.size}")
        else:
            download.restart()  # a whole body (the file changed, or no range support)
        etag = response.headers.get("ETag")
        strong = etag if etag and not etag.startswith("W/") else None
        download.validator = strong or response.headers.get("Last-Modified")
        length = response.headers.get("Content-Length")
        total = None if length is None else offset + int(length)
        download.expect(total)
        while chunk := response.read1(CHUNK):
            download.write(chunk)
        if total is not None and download.size < total:
            raise _Transient(f"connection closed after {download.size} of {total} bytes")
    return download.body()


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _range_start(content_range: str | None) -> int:
    try:  # "bytes 1000-1999/2000"
        return int((content_range or "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _read_pipe(command: str, policy: FetchPolicy, download: _Download) -> Body:
    download.restart()  # a command's output cannot be resumed
    proc = subprocess.Popen(
        command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    errors: list[bytes] = []
    drain = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    drain.start()
    try:
        fd = proc.stdout.fileno()
        while True:
            if not select.select([fd], [], [], policy.timeout_s)[0]:
                raise _Transient(
                    f"`{command}` wrote nothing for {policy.timeout_s:g} s "
                    f"(data.read_timeout_s){_stderr_tail(proc, drain, errors)}"
                )
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            download.write(chunk)
        code = proc.wait()
        if code != 0:
            tail = _stderr_tail(proc, drain, errors)
            raise _Transient(f"`{command}` exited with status {code}{tail}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return download.body()


def _stderr_tail(proc: subprocess.Popen, drain: threading.Thread, errors: list[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
    drain.join(timeout=5)
    text = b"".join(errors).decode(errors="replace").strip()
    return f"; its stderr: {text[-2000:]}" if text else "; it wrote nothing to stderr"


def _read_fsspec(url: str, download: _Download) -> Body:
    try:
        import fsspec
    except ImportError as err:  # pragma: no cover - fsspec ships with torch
        raise _Final("fsspec is not installed") from err
    download.restart()
    try:
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(CHUNK):
                download.write(chunk)
    except (ImportError, ValueError) as err:
        scheme = urlparse(url).scheme
        raise _Final(
            f"no fsspec filesystem for {scheme}:// ({err}); install its package (s3fs, gcsfs) "
            f"or use a pipe: URL such as pipe:aws s3 cp {url} -"
        ) from err
    except (FileNotFoundError, PermissionError) as err:
        raise _Final(f"not found or not allowed ({err})") from err
    return download.body()


class _Download:
    """The bytes of one URL received so far, kept across attempts (in memory, or in a file
    once larger than the policy's bound), so that a retry can ask for the rest."""

    def __init__(self, policy: FetchPolicy, stats: TransferStats):
        self.limit, self.stats = policy.max_in_memory_bytes, stats
        self.cache_max_bytes = policy.cache_max_bytes
        self.spill_dir = policy.cache_dir  # a cached body is renamed into the cache
        self.buffer = bytearray()
        self.file: Any = None
        self.path: str | None = None
        self.size = 0
        self.validator: str | None = None  # ETag or Last-Modified of what `buffer` holds

    def expect(self, total: int | None) -> None:
        if total is not None and total > self.limit and self.file is None:
            self._to_file()

    def write(self, chunk: bytes) -> None:
        if self.file is None and self.size + len(chunk) > self.limit:
            self._to_file()
        if self.file is None:
            self.buffer += chunk
        else:
            self.file.write(chunk)
        self.size += len(chunk)

    def _to_file(self) -> None:
        if self.spill_dir:
            Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix=".vae_scale-", suffix=".part", dir=self.spill_dir)
        self.file = os.fdopen(fd, "w+b")
        self.file.write(self.buffer)
        self.buffer = bytearray()

    def restart(self) -> None:
        """Throw away what arrived (counted as refetched) and start the body again."""
        self.stats.refetched_bytes += self.size
        self.buffer, self.size, self.validator = bytearray(), 0, None
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()

    def body(self) -> Body:
        if self.file is None:
            return bytes(self.buffer)
        self.file.flush()
        return FileBody(str(self.path), self.size)

    def store(self, cached: Path) -> None:
        """Into the cache: the spill file renamed, or the bytes written atomically."""
        if self.file is not None:
            try:
                os.replace(str(self.path), cached)
                self.path = None
            except OSError:
                return
        else:
            _store(cached, bytes(self.buffer))
        _evict(cached, self.cache_max_bytes)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            if self.path is not None:  # a spill file (its reader holds it open)
                Path(self.path).unlink(missing_ok=True)


def _cache_path(url: str, policy: FetchPolicy) -> Path | None:
    if policy.cache_dir is None or is_local(url):
        return None
    digest = hashlib.sha256(url.encode()).hexdigest()[:24]
    return Path(policy.cache_dir) / f"{digest}-{Path(urlparse(url).path).name}"


def _store(path: Path, data: bytes) -> None:
    """Write atomically; a full cache disk must not stop training (it reads the source)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _evict(path: Path, max_bytes: int) -> None:
    """Remove the least recently used cached files above `max_bytes` (never `path`)."""
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
