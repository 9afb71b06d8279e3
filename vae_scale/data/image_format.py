"""How a shard stores each image (`vae-scale shard --format`): the codec and quality, the
member it writes, and what index.json records of it. Light on imports: the parallel folder
sharder's tasks carry it to their processes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from vae_scale.errors import DataError


@dataclass(frozen=True)
class ImageFormat:
    """How a shard stores each image: `npy` (raw uint8, the default: lossless, no decoding
    cost), `png` (lossless, compressed), `jpg` or `webp` (lossy, at `quality`): the member's
    suffix, recorded in index.json's `encoding` (and `params`, so a change re-shards)."""

    codec: str = "npy"
    quality: int = 95

    def __post_init__(self) -> None:
        if self.codec not in FORMATS:
            raise DataError(f"--format {self.codec}: expected one of {', '.join(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise DataError(f"--quality {self.quality}: expected 1..100")

    @property
    def encoding(self) -> str:
        return f"{self.codec} uint8 HWC"

    @property
    def params(self) -> dict[str, Any]:
        """What index.json's params record (nothing for npy: older indexes stay current)."""
        if self.codec == "npy":
            return {}
        lossy = self.codec in LOSSY
        return {"format": self.codec, **({"quality": self.quality} if lossy else {})}

    def encode(self, image: np.ndarray, dtype: type = np.uint8) -> bytes:
        """The member's bytes of one HWC image (npy: as `dtype`, float16 for latents)."""
        buf = io.BytesIO()
        if self.codec == "npy":
            np.save(buf, np.ascontiguousarray(image, dtype=dtype), allow_pickle=False)
            return buf.getvalue()
        from PIL import Image

        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if self.codec == "png":
            picture.save(buf, "PNG", compress_level=6)
        elif self.codec == "jpg":  # 4:4:4 at high quality: colour edges stay sharp
            subsampling = 0 if self.quality >= 90 else 2
            picture.save(buf, "JPEG", quality=self.quality, subsampling=subsampling)
        else:
            picture.save(buf, "WEBP", quality=self.quality, method=4)
        return buf.getvalue()


FORMATS = ("npy", "png", "jpg", "webp")
LOSSY = ("jpg", "webp")  # the formats `quality` applies to
NPY = ImageFormat()
