"""Network helpers: is a host reachable (without hanging when it is not)."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def is_online(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the URL's host can be opened within `timeout` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
