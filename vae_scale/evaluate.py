"""Evaluation over a whole split: every sample counted once across all processes."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from vae_scale.data.loader import ShardSplit, derive_seed, images_to_float
from vae_scale.losses import bits_per_dim, neg_elbo
from vae_scale.models import VAE


def prepare_inputs(
    images: torch.Tensor,
    device: torch.device,
    binarize: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 batch -> float in [0, 1] on device; dynamic binarization samples x ~ Bernoulli."""
    x = images_to_float(images, device)
    if binarize == "dynamic":
        if generator is None:
            x = torch.bernoulli(x)
        else:  # CPU generator: the same binary images on any device
            x = torch.bernoulli(x.cpu(), generator=generator).to(device)
    return x


@torch.no_grad()
def evaluate_split(
    accelerator: Accelerator, model: VAE, data: ShardSplit, seed: int, binarize: str = "none"
) -> dict[str, float]:
    """Mean negative ELBO, recon and KL (nats per image) over all of `data`'s split.

    The noise is drawn from generators seeded by (seed, split, rank), so a given model and
    world size always give the same numbers. `model` is the unwrapped module: evaluation runs
    no collective until the final reduction, so ranks with fewer samples never block.
    """
    model.eval()
    device = accelerator.device
    gen = torch.Generator().manual_seed(
        derive_seed(seed, "eval", data.split, accelerator.process_index)
    )
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in data.eval_batches():
        x = prepare_inputs(batch["image"], device, binarize, gen)
        with accelerator.autocast():
            mu, logvar = model.encode(x)
            eps = torch.randn(mu.shape, generator=gen).to(device)
            x_params = model.decode(model.reparameterize(mu, logvar, eps))
        terms = neg_elbo(model.likelihood, x_params, x, mu, logvar)
        totals += torch.stack(
            [
                terms.neg_elbo.sum(),
                terms.recon.sum(),
                terms.kl.sum(),
                torch.tensor(float(x.shape[0]), device=device),
            ]
        ).double()
    totals = accelerator.reduce(totals, reduction="sum")
    count = totals[3].item()
    if count == 0:
        raise RuntimeError(f"split {data.split!r} produced no samples")
    metrics = {
        f"{data.split}/neg_elbo": totals[0].item() / count,
        f"{data.split}/recon": totals[1].item() / count,
        f"{data.split}/kl": totals[2].item() / count,
        f"{data.split}/num_samples": count,
    }
    if model.likelihood.discrete_8bit:
        dims = int(torch.tensor(data.image_shape).prod())
        metrics[f"{data.split}/bpd"] = bits_per_dim(metrics[f"{data.split}/neg_elbo"], dims)
    return metrics


def first_images(data: ShardSplit, n: int) -> torch.Tensor:
    """The first n images (uint8) of a split in its stored order: the fixed picture inputs."""
    got: list[torch.Tensor] = []
    for batch in data.eval_batches():
        got.append(batch["image"])
        if sum(len(b) for b in got) >= n:
            break
    return torch.cat(got)[:n]


def summarize(metrics: dict[str, Any]) -> str:
    keys = [k for k in metrics if k.endswith(("/neg_elbo", "/bpd"))]
    return "  ".join(f"{k} {metrics[k]:.2f}" for k in keys)
