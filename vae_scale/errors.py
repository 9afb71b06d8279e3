"""The errors a user can cause. The CLI prints them as one line (no traceback) and exits 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, override or command-line value is invalid; the message names the key."""


class DataError(RuntimeError):
    """Raw data or shards are missing, corrupt or of the wrong shape; the message says which."""
