"""Batches -> model inputs: uint8 images become float pixels in [0, 1] on the device.

The 4x smaller uint8 crosses process and PCIe boundaries (from pinned memory, without
waiting); the conversion happens on arrival, on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def images_to_float(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1] on `device` (float16 latents: float32 as
    they are)."""
    x = images.to(device, non_blocking=True).float()
    return x.div_(255.0) if images.dtype == torch.uint8 else x


def binarize(
    x: torch.Tensor, mode: str, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """data.binarize: 'dynamic' samples x ~ Bernoulli(pixels) (from the global RNG, or from
    one generator per sample); 'none' returns the pixels."""
    if mode != "dynamic":
        return x
    if generators is None:
        return torch.bernoulli(x)
    return torch.stack(
        [torch.bernoulli(xi.cpu(), generator=g) for xi, g in zip(x, generators, strict=True)]
    ).to(x.device)


def prepare_batch(
    images: torch.Tensor,
    device: torch.device | str,
    mode: str = "none",
    generators: list[torch.Generator] | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """A loader batch's uint8 images -> the model's input: float in [0, 1] on `device`
    (channels_last if asked), binarized as data.binarize (`mode`) says. Training (through
    DeviceBatches), evaluation and the pictures all prepare their inputs here."""
    x = images_to_float(images, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return binarize(x, mode, generators)


class DeviceBatches:
    """(batch, its model input from `prepare_batch`) for each loader batch. On CUDA the next
    batch's copy and conversion are issued on a side stream before the current batch is
    handed out, so they overlap the step that trains it; elsewhere the conversion is inline.
    Random draws (binarization) stay with the step, on the main stream, in batch order."""

    def __init__(
        self,
        batches: Iterable[dict[str, Any]],
        device: torch.device,
        channels_last: bool,
        binarize_mode: str = "none",
    ):
        self.batches, self.device, self.channels_last = batches, torch.device(device), channels_last
        self.binarize_mode = binarize_mode

    def __iter__(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        if self.device.type != "cuda":
            for batch in self.batches:
                x = prepare_batch(
                    batch["image"], self.device, self.binarize_mode, None, self.channels_last
                )
                yield batch, x
            return
        copies = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        pending = None
        for batch in self.batches:
            with torch.cuda.stream(copies):  # copy and convert; no random draw here
                x = prepare_batch(batch["image"], self.device, "none", None, self.channels_last)
            if pending is not None:
                yield self._ready(pending, copies, main)
            pending = (batch, x)
        if pending is not None:
            yield self._ready(pending, copies, main)

    def _ready(self, pending: tuple, copies: Any, main: Any) -> tuple[dict[str, Any], torch.Tensor]:
        main.wait_stream(copies)
        batch, x = pending
        x.record_stream(main)  # its memory belongs to the main stream's work from here on
        return batch, binarize(x, self.binarize_mode)
