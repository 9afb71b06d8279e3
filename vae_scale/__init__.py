"""vae_scale: train Variational Autoencoders at scale.

From Python: `vae_scale.from_pretrained(path)` loads a trained model (an exported folder, a
run folder or a Hub repository id); see vae_scale/hub/.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["from_pretrained"]


def __getattr__(name: str) -> Any:
    # torch loads only when a model is asked for, not for `vae-scale --help`
    if name == "from_pretrained":
        from vae_scale.hub.pretrained import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'vae_scale' has no attribute {name!r}")
