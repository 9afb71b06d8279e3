"""Latent attribute arithmetic and interpolation (the classic CelebA VAE demo).

An attribute vector is the mean posterior mean of the images that have the attribute minus
that of the images that do not (White, 2016, "Sampling Generative Networks"). Moving a face's
latent along it by -2..+2 times adds or removes the attribute. Works for vector and spatial
latents alike: everything is per latent element.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from vae_scale.data.streaming.inputs import prepare_batch
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import DataError


def attribute_position(index: dict[str, Any], attribute: str) -> int:
    """Position of `attribute` in the samples' attr_vector (index.json params.attributes)."""
    names = index.get("params", {}).get("attributes")
    if not names:
        raise DataError(f"dataset {index.get('dataset')!r} has no attributes in index.json")
    if attribute not in names:
        raise DataError(f"unknown attribute {attribute!r}; the dataset has: {', '.join(names)}")
    return names.index(attribute)


@torch.no_grad()
def posterior_means(
    model: Any,
    batches: Iterable[dict[str, Any]],
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(posterior means (N, *latent_shape), attribute vectors (N, A) as 0/1 floats) of every
    sample of `batches` (from ShardSplit.eval_batches of an attribute dataset), or of the
    first `limit` of them."""
    means, attrs = [], []
    for batch in batches:
        if limit is not None and sum(len(m) for m in means) >= limit:
            break
        if "json" not in batch or any(m is None or "attr_vector" not in m for m in batch["json"]):
            raise DataError("samples carry no attr_vector: shard an attribute dataset (celeba)")
        mu, _ = model.encode(prepare_batch(batch["image"], device))
        means.append(mu.float().cpu())
        attrs.append(torch.tensor([m["attr_vector"] for m in batch["json"]], dtype=torch.float32))
    if not means:
        raise DataError("no samples to compute attribute vectors from")
    return torch.cat(means)[:limit], torch.cat(attrs)[:limit]


def attribute_vector(means: Tensor, has_attribute: Tensor) -> Tensor:
    """mean(means[has]) - mean(means[not has]); `has_attribute` is (N,) bool or 0/1."""
    has = has_attribute.bool()
    if has.shape != means.shape[:1]:
        raise ValueError(f"{tuple(has.shape)} attribute flags for {means.shape[0]} latents")
    if has.all() or not has.any():
        raise DataError(
            f"the attribute vector needs images with and without the attribute; got "
            f"{int(has.sum())} with and {int((~has).sum())} without"
        )
    return means[has].mean(dim=0) - means[~has].mean(dim=0)


def split_attribute_vector(
    model: Any, split: ShardSplit, attribute: str, limit: int | None = None
) -> Tensor:
    """The vector of `attribute` from the posterior means of `split` (its first `limit`
    images) and the attributes stored in its samples."""
    position = attribute_position(split.catalog.index, attribute)
    means, flags = posterior_means(model, split.eval_batches(), limit=limit)
    has = flags[:, position]
    print(
        f"{attribute}: vector from {len(has)} {split.split} images "
        f"({int(has.sum())} with, {len(has) - int(has.sum())} without)"
    )
    return attribute_vector(means, has)


def move_along(z: Tensor, direction: Tensor, steps: Sequence[float]) -> Tensor:
    """(B, *latent) -> (B, len(steps), *latent): z + s * direction for each step s."""
    scale = torch.as_tensor(list(steps), dtype=z.dtype, device=z.device)
    scale = scale.reshape(1, -1, *([1] * direction.dim()))
    return z.unsqueeze(1) + scale * direction.to(z).unsqueeze(0).unsqueeze(0)


def interpolate(z_from: Tensor, z_to: Tensor, steps: int) -> Tensor:
    """(B, *latent) pairs -> (B, steps, *latent): straight lines, both ends included."""
    if steps < 2:
        raise ValueError(f"interpolation needs at least 2 steps, got {steps}")
    t = torch.linspace(0, 1, steps, dtype=z_from.dtype, device=z_from.device)
    t = t.reshape(1, -1, *([1] * (z_from.dim() - 1)))
    return (1 - t) * z_from.unsqueeze(1) + t * z_to.unsqueeze(1)


def _decode_rows(model: Any, z: Tensor) -> Tensor:
    """(B, S, *latent) -> (B, S, C, H, W) decoded means."""
    images = model.likelihood.mean(model.decode(rearrange(z, "b s ... -> (b s) ...")))
    return rearrange(images, "(b s) c h w -> b s c h w", b=z.shape[0])


@torch.no_grad()
def edit_rows(model: Any, faces: Tensor, direction: Tensor, steps: Sequence[float]) -> Tensor:
    """(B, 1 + len(steps), C, H, W): each face, then its posterior mean moved by s * direction
    for each step s, decoded."""
    mu, _ = model.encode(faces)
    moved = _decode_rows(model, move_along(mu, direction, steps))
    return torch.cat([faces.unsqueeze(1).to(moved), moved], dim=1)


@torch.no_grad()
def interpolation_rows(model: Any, faces_from: Tensor, faces_to: Tensor, steps: int) -> Tensor:
    """(B, steps + 2, C, H, W): face A, decodes along the line between the posterior means of
    A and B (both ends included), face B."""
    mu_from, _ = model.encode(faces_from)
    mu_to, _ = model.encode(faces_to)
    line = _decode_rows(model, interpolate(mu_from, mu_to, steps))
    return torch.cat([faces_from.unsqueeze(1).to(line), line, faces_to.unsqueeze(1).to(line)], 1)
