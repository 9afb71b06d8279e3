"""Sharpness of the images in a sample grid written by vae-scale (8x8 tiles, 2 px padding):
the mean over tiles of the variance of the 4-neighbour Laplacian of the grey image, and the
mean absolute pixel-to-pixel difference, both on 0-255 values. Higher = more high-frequency
detail; compare grids of the same image size and upscaling only.

    python benchmarks/sharpness.py RUN/samples_epoch005.png [...] [--tile 64]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
from PIL import Image


def tiles(path: str, tile: int, per_row: int = 8, pad: int = 2) -> Iterator[np.ndarray]:
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    for i in range(per_row):
        for j in range(per_row):
            y, x = pad + i * (tile + pad), pad + j * (tile + pad)
            yield grey[y : y + tile, x : x + tile]


def sharpness(path: str, tile: int) -> tuple[float, float]:
    """(mean Laplacian variance, mean |gradient|) over the grid's tiles."""
    laplacian_vars, gradients = [], []
    for t in tiles(path, tile):
        lap = -4 * t[1:-1, 1:-1] + t[:-2, 1:-1] + t[2:, 1:-1] + t[1:-1, :-2] + t[1:-1, 2:]
        laplacian_vars.append(lap.var())
        gradients.append(np.abs(np.diff(t, axis=0)).mean() + np.abs(np.diff(t, axis=1)).mean())
    return float(np.mean(laplacian_vars)), float(np.mean(gradients))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+")
    parser.add_argument("--tile", type=int, default=64, help="tile side in pixels (32x32 -> 64)")
    args = parser.parse_args()
    for path in args.grids:
        lap, grad = sharpness(path, args.tile)
        print(f"{path}: Laplacian variance {lap:.1f}, mean |gradient| {grad:.2f}")


if __name__ == "__main__":
    main()
