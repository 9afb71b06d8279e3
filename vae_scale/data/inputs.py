"""Batches -> model inputs: uint8 images become float pixels in [0, 1] on the device.

The 4x smaller uint8 crosses process and PCIe boundaries; the conversion happens on arrival.
"""

from __future__ import annotations

import torch


def images_to_float(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def prepare_inputs(
    images: torch.Tensor,
    device: torch.device | str,
    binarize: str,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """uint8 batch -> float in [0, 1] on device; dynamic binarization samples x ~ Bernoulli
    (from the global RNG, or from one generator per sample)."""
    x = images_to_float(images, device)
    if binarize == "dynamic":
        if generators is None:
            x = torch.bernoulli(x)
        else:
            x = torch.stack(
                [
                    torch.bernoulli(xi.cpu(), generator=g)
                    for xi, g in zip(x, generators, strict=True)
                ]
            ).to(device)
    return x
