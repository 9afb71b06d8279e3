"""How well will a diffusion model learn these latents? Cheap measures of an autoencoder's
latent space (spatial latents: (C, h, w)), computed on the first `samples` images of a split:

- iFID (interpolated FID): for each image, the latent mean is spherically interpolated
  halfway (slerp, t = 0.5) towards the latent mean of one of its `neighbours` nearest
  neighbours among the `samples` images (Euclidean, chosen by a generator seeded by the run's
  seed and the image's key), decoded, and the decodes' Inception features compared with the
  real images' (FID). Latent spaces whose neighbourhoods decode to images hold up under
  interpolation; the iFID paper (arXiv 2603.05630) found it to follow a diffusion model's
  generation FID (correlation ~0.85) where rFID does not.
- the latents' spectrum: the share of energy in the upper half of DCT frequencies (2-D DCT-II
  of each channel, a frequency (u, v) of an h x w map counting as high when u >= h/2 or
  v >= w/2), per channel and averaged, beside the images' own share (EQ-VAE, arXiv 2502.09509,
  and Skorokhodov et al. 2025 relate high-frequency latents to worse diffusion).
- scale equivariance: PSNR (dB) of the decode of the 2x-downsampled latent mean against the
  2x-downsampled image (bilinear, antialiased): how far the decoder commutes with downscaling
  (Skorokhodov et al. 2025's "scale equivariance").
- per-channel mean and standard deviation of the latent means.

Distributed: each process encodes its share of the images; the latent means are gathered so
every process finds the same neighbours; the interpolants' Inception features are summed in
float64 over processes (the same number on 1 process or N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from scipy.fft import dctn
from torch import Tensor

from vae_scale.data.streaming.inputs import prepare_batch
from vae_scale.objectives.equivariance import downscale
from vae_scale.perception.fid import feature_sums, fid_from_sums
from vae_scale.perception.image_metrics import psnr
from vae_scale.utils.seeding import derive_seed


@dataclass(frozen=True)
class DiffusabilityOptions:
    samples: int = 1000  # images measured (the first of the split)
    neighbours: int = 10  # k of iFID's nearest neighbours
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> DiffusabilityOptions:
        return cls(cfg.eval.diffusability_samples, cfg.eval.ifid_neighbours, cfg.run.seed)

    @staticmethod
    def applies(cfg: Any, model: Any) -> bool:
        """Spatial latents, and not switched off."""
        return cfg.eval.diffusability != "off" and len(model.latent_shape) == 3


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation between rows of `a` and `b` (flattened vectors) at `t`; rows
    whose angle is ~0 fall back to the linear interpolation."""
    a_flat, b_flat = a.flatten(1).double(), b.flatten(1).double()
    cos = (a_flat * b_flat).sum(1) / (a_flat.norm(dim=1) * b_flat.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    linear = sin < 1e-6
    safe = torch.where(linear, torch.ones_like(sin), sin)
    wa = torch.where(linear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(linear, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    out = wa[:, None] * a_flat + wb[:, None] * b_flat
    return out.to(a.dtype).view_as(a)


def high_frequency_share(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high-band energy, total energy) per channel of (N, C, h, w) maps, summed over N."""
    coeffs = dctn(maps.astype(np.float64), axes=(-2, -1), norm="ortho") ** 2
    h, w = maps.shape[-2:]
    high = np.zeros((h, w), bool)
    high[(h + 1) // 2 :, :] = True
    high[:, (w + 1) // 2 :] = True
    return coeffs[..., high].sum(axis=(0, -1)), coeffs.sum(axis=(0, -2, -1))


def _first_images(data: Any, share: int, device: torch.device) -> tuple[Tensor, list[str]]:
    """This process's first `share` images of its part of the split, and their keys."""
    images, keys = [], []
    for batch in data.eval_batches():
        images.append(batch["image"])
        keys += batch["key"]
        if len(keys) >= share:
            break
    x = torch.cat(images)[:share] if images else torch.zeros(0, *data.image_shape)
    return prepare_batch(x, device, "none"), keys[:share]


@torch.no_grad()
def diffusability(
    accelerator: Accelerator,
    model: Any,
    data: Any,
    inception: Any | None,
    options: DiffusabilityOptions,
) -> dict[str, Any]:
    """The measures of the module docstring for `model` on split `data` (`inception`: the
    rFID network, None: no iFID)."""
    model.eval()
    device, world = accelerator.device, accelerator.num_processes
    share = -(-min(options.samples, data.num_samples) // world)
    x, keys = _first_images(data, share, device)
    means = [model.encode(x[i : i + 64])[0].float() for i in range(0, len(x), 64)]
    mu = torch.cat(means) if means else torch.zeros(0, *model.latent_shape, device=device)
    split, out = data.split, {}
    # every process holds every latent mean (padded to equal shares), so all find the same
    # neighbours; keys identify the rows
    count = torch.tensor([len(x)], device=device)
    counts = accelerator.gather(count).tolist()
    padded = torch.zeros(share, *mu.shape[1:], device=device)
    padded[: len(mu)] = mu
    gathered = accelerator.gather(padded).view(world, share, *mu.shape[1:])
    every = torch.cat([gathered[r, : counts[r]] for r in range(world)])
    offset = sum(counts[: accelerator.process_index])
    n = len(every)
    if inception is not None and n > 1:
        partners = _neighbours(every, keys, offset, options)
        fakes = []
        for i in range(0, len(mu), 64):
            mid = slerp(mu[i : i + 64], every[partners[i : i + 64]], 0.5)
            fakes.append(model.likelihood.mean(model.decode(mid)).float().clamp(0, 1))
        fake = torch.cat(fakes) if fakes else x
        sums = accelerator.reduce(
            torch.cat([feature_sums(inception(x)), feature_sums(inception(fake))]), "sum"
        )
        real, fake_sums = sums.chunk(2)
        out[f"{split}/ifid"] = fid_from_sums(real, fake_sums)
    out.update(_spectrum_and_stats(accelerator, mu, x, split))
    out.update(_scale_equivariance(accelerator, model, mu, x, split))
    out[f"{split}/diffusability_samples"] = n
    return out


def _neighbours(every: Tensor, keys: list[str], offset: int, options: Any) -> Tensor:
    """For this process's rows (`offset` on), one of each row's k nearest other rows."""
    flat = every.flatten(1).double()
    k = min(options.neighbours, len(flat) - 1)
    mine = flat[offset : offset + len(keys)]
    distances = torch.cdist(mine, flat)
    distances[torch.arange(len(mine)), torch.arange(offset, offset + len(mine))] = math.inf
    nearest = distances.topk(k, largest=False).indices
    picks = [
        torch.randint(k, (1,), generator=torch.Generator().manual_seed(
            derive_seed(options.seed, "ifid", key))).item()
        for key in keys
    ]  # fmt: skip
    return nearest[torch.arange(len(mine)), torch.tensor(picks, dtype=torch.long)]


def _spectrum_and_stats(accelerator: Accelerator, mu: Tensor, x: Tensor, split: str) -> dict:
    """High-frequency energy shares of the latents (per channel) and the images, and the
    latents' per-channel mean and std, summed over processes."""
    lat_high, lat_total = high_frequency_share(mu.cpu().numpy())
    img_high, img_total = high_frequency_share(x.cpu().numpy())
    per_channel = mu.double().transpose(0, 1).flatten(1)
    moments = torch.stack([per_channel.sum(1), per_channel.pow(2).sum(1)])
    energies = np.concatenate([lat_high, lat_total, [img_high.sum(), img_total.sum()]])
    packed = torch.cat(
        [torch.from_numpy(energies).to(mu.device), moments.flatten(),
         torch.tensor([per_channel.shape[1]], dtype=torch.float64, device=mu.device)]
    )  # fmt: skip
    total = accelerator.reduce(packed, "sum").cpu().numpy()
    c = mu.shape[1]
    lat_high, lat_total, img = total[:c], total[c : 2 * c], total[2 * c : 2 * c + 2]
    sums, squares, count = total[2 * c + 2 : 3 * c + 2], total[3 * c + 2 : 4 * c + 2], total[-1]
    shares = lat_high / np.maximum(lat_total, 1e-30)
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0))
    out = {
        f"{split}/latent_high_freq_share": float(shares.mean()),
        f"{split}/image_high_freq_share": float(img[0] / max(img[1], 1e-30)),
    }
    for i in range(c):
        out[f"{split}/latent_high_freq_share_c{i}"] = float(shares[i])
        out[f"{split}/latent_mean_c{i}"] = float(mean[i])
        out[f"{split}/latent_std_c{i}"] = float(std[i])
    return out


def _scale_equivariance(
    accelerator: Accelerator, model: Any, mu: Tensor, x: Tensor, split: str
) -> dict[str, float]:
    """PSNR of decode(downsample(mu)) against downsample(x), both by 2x (a decoder that
    cannot take the smaller latent reports nothing)."""
    if min(mu.shape[-2:]) < 2:
        return {}
    try:
        small = downscale(mu, (mu.shape[-2] // 2, mu.shape[-1] // 2))
        decoded = model.likelihood.mean(model.decode(small)).float().clamp(0, 1)
    except RuntimeError:
        return {}
    target = downscale(x, decoded.shape[-2:])
    packed = torch.stack([psnr(decoded, target).double().sum(), torch.tensor(
        float(len(x)), dtype=torch.float64, device=x.device)])  # fmt: skip
    total, count = accelerator.reduce(packed, "sum").tolist()
    return {f"{split}/scale_equivariance_psnr": total / max(count, 1)}
