"""Seeds derived from names, so every process computes the same seed for the same purpose."""

from __future__ import annotations

import random
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings, identical in every process."""
    rng = random.Random("/".join(str(p) for p in parts))
    return rng.getrandbits(63)
