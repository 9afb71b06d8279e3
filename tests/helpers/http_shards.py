"""A real HTTP server on 127.0.0.1 serving a folder, optionally misbehaving: every n-th
request answered 503, or one file always 500. Counts requests per path."""

from __future__ import annotations

import functools
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    def __init__(self, folder: Path, fail_every: int = 0, always_fail: str | None = None):
        self.requests: Counter[str] = Counter()
        self.failures = 0
        self.fail_every, self.always_fail = fail_every, always_fail
        self._lock = threading.Lock()
        self._count = 0
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with server._lock:
                    server._count += 1
                    n = server._count
                    server.requests[self.path] += 1
                failing = server.always_fail and self.path.endswith(server.always_fail)
                if failing or (server.fail_every and n % server.fail_every == 0):
                    with server._lock:
                        server.failures += 1
                    self.send_error(503 if not failing else 500, "injected failure")
                    return
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
