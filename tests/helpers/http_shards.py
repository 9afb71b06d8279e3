"""A real HTTP server on 127.0.0.1 serving a folder, with Range requests (206, ETag,
Last-Modified, If-Range) as object stores and CDNs answer them, and faults on a schedule.

Faults: every n-th request answered 503 (`fail_every`), one file always 500 (`always_fail`),
fixed statuses for some files (`statuses`: name -> 403/404/...), and `faults`, a list of fault
kinds dealt to the `.tar` files in name order (file i gets faults[i % len(faults)], "ok" for
none) on their 1st, 3rd, 5th ... request, so every retry of a fault succeeds whatever the
order of requests from several workers:
- truncate: the full Content-Length promised, half the body sent, the connection closed;
- reset: half the body, then a TCP reset (SO_LINGER 0);
- stall: a quarter of the body, then nothing for `stall_s`, then closed;
- throttle: 429 with Retry-After: `retry_after_s`;
- refuse: the connection closed before any answer (as a server going down does);
- corrupt: the whole body with one byte changed (the client must notice by the checksum);
- short: the tar cut after its first half of members, sent complete with that length (a
  well-formed response of a short tar: only its sample count or checksum tells).

Run as a process (`python tests/helpers/http_shards.py FOLDER --port P --faults ...`), it
prints `ready <url>` and appends one line per request to `--log`: a server that can be killed
and restarted on the same port.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import socket
import struct
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("ok", "truncate", "reset", "stall", "throttle", "refuse", "corrupt", "short")


class ShardServer:
    def __init__(
        self,
        folder: Path,
        fail_every: int = 0,
        always_fail: str | None = None,
        faults: list[str] | None = None,
        statuses: dict[str, int] | None = None,
        stall_s: float = 3.0,
        retry_after_s: float = 1.0,
        port: int = 0,
        log: Path | None = None,
        ranges: bool = True,
    ):
        self.folder = Path(folder)
        self.requests: Counter[str] = Counter()
        self.faults_done: Counter[str] = Counter()
        self.failures = 0
        self.range_requests = 0
        self.fail_every, self.always_fail = fail_every, always_fail
        self.statuses = statuses or {}
        self.stall_s, self.retry_after_s, self.ranges = stall_s, retry_after_s, ranges
        self.log = log
        self._lock = threading.Lock()
        self._count = 0
        tars = sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*.tar"))
        kinds = faults or []
        self.schedule = (
            {f"/{t}": kinds[i % len(kinds)] for i, t in enumerate(tars)} if kinds else {}
        )
        for kind in self.schedule.values():
            assert kind in FAULTS, kind
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------ one request

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self._count += 1
            n = self._count
            nth = self.requests[path]  # requests for this path before this one
            self.requests[path] += 1
        kind = self.schedule.get(path, "ok") if nth % 2 == 0 else "ok"
        failing = self.always_fail and path.endswith(self.always_fail)
        if failing or (self.fail_every and n % self.fail_every == 0):
            kind = "status500" if failing else "status503"
        elif path.rsplit("/", 1)[-1] in self.statuses:
            kind = f"status{self.statuses[path.rsplit('/', 1)[-1]]}"
        self._log(f"{h.command} {path} {kind} {h.headers.get('Range') or '-'}")
        if kind != "ok":
            with self._lock:
                self.failures += 1
                self.faults_done[kind] += 1
        if kind.startswith("status"):
            return self._status(h, int(kind[6:]))
        if kind == "throttle":
            return self._status(h, 429, {"Retry-After": f"{self.retry_after_s:g}"})
        if kind == "refuse":
            return self._reset(h)
        file = self.folder / path.lstrip("/")
        if not file.is_file():
            return self._status(h, 404)
        data = file.read_bytes()
        stat = file.stat()
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        start = self._range_start(h, etag)
        if start is not None and start >= len(data):
            return self._status(h, 416, {"Content-Range": f"bytes */{len(data)}"})
        body = data if start is None else data[start:]
        if kind == "corrupt":
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        elif kind == "short" and start is None:
            body = body[: _member_boundary(file)]
        h.send_response(200 if start is None else 206)
        h.send_header("Content-Type", "application/x-tar")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", etag)
        h.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        if self.ranges:
            h.send_header("Accept-Ranges", "bytes")
        if start is not None:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        try:
            if kind == "truncate":
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
            elif kind == "reset":
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                self._reset(h)
            elif kind == "stall":
                h.wfile.write(body[: len(body) // 4])
                h.wfile.flush()
                time.sleep(self.stall_s)
                h.close_connection = True
            else:
                h.wfile.write(body)
        except OSError:  # the client gave up first
            h.close_connection = True

    def _range_start(self, h: BaseHTTPRequestHandler, etag: str) -> int | None:
        wanted = h.headers.get("Range")
        if not (self.ranges and wanted and wanted.startswith("bytes=") and wanted.endswith("-")):
            return None
        if_range = h.headers.get("If-Range")
        if if_range is not None and if_range != etag:
            return None  # changed since: the whole file
        with self._lock:
            self.range_requests += 1
        return int(wanted[6:-1])

    def _status(self, h: BaseHTTPRequestHandler, code: int, headers: dict | None = None) -> None:
        body = f"injected {code}\n".encode()
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()

    def _log(self, line: str) -> None:
        if self.log is not None:
            with self._lock, open(self.log, "a") as f:
                f.write(line + "\n")


def _member_boundary(file: Path) -> int:
    """The byte offset of the header of the middle member of a tar."""
    with tarfile.open(file) as tar:
        members = tar.getmembers()
    return members[len(members) // 2].offset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--faults", default="")
    parser.add_argument("--stall-s", type=float, default=3.0)
    parser.add_argument("--retry-after-s", type=float, default=1.0)
    parser.add_argument("--log", type=Path)
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    server = ShardServer(
        args.folder, faults=faults, stall_s=args.stall_s, retry_after_s=args.retry_after_s,
        port=args.port, log=args.log,
    )  # fmt: skip
    print(f"ready {server.url}", flush=True)
    sys.stdout.close()
    os.close(1)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
