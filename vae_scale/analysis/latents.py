"""Latents ready for a diffusion model: their per-channel statistics on the training split,
the global `scaling_factor` / `shift_factor` diffusers applies as
`(z - shift_factor) * scaling_factor` (unit variance, zero mean), and an fp16 check of the
network's activations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from vae_scale.analysis.evaluate import SampleNoise
from vae_scale.data.streaming.inputs import prepare_batch
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.models import VAE

LATENT_STATS_FILE = "latent_stats.json"
FP16_MAX = 65504.0


@torch.no_grad()
def latent_statistics(
    accelerator: Accelerator, model: VAE, data: ShardSplit, seed: int, max_samples: int
) -> dict[str, Any]:
    """Mean and std per latent channel of z ~ q(z | x) over the first `max_samples` images of
    `data` (each rank its share, in stored order; noise seeded per sample key), summed over
    processes; and the global scale and shift. Spatial latents (C, h, w) only."""
    channels = model.latent_shape[0]
    sums = torch.zeros(3, channels, dtype=torch.float64, device=accelerator.device)
    share = -(-max_samples // data.world_size)
    seen = 0
    model.eval()
    for batch in data.eval_batches():
        keys = batch["key"][: share - seen]
        noise = SampleNoise(keys, seed, "latent_stats")
        x = prepare_batch(batch["image"][: len(keys)], accelerator.device, "none")
        with accelerator.autocast():
            mu, logvar = model.encode(x)
        z = model.reparameterize(
            mu.float(), logvar.float(), noise.normal(model.latent_shape, x.device)
        )
        per_channel = z.double().transpose(0, 1).flatten(1)  # (C, B*h*w)
        sums += torch.stack(
            [
                per_channel.sum(1),
                per_channel.pow(2).sum(1),
                torch.full_like(sums[0], per_channel.shape[1]),
            ]
        )
        seen += len(keys)
        if seen >= share:
            break
    total, total_sq, count = accelerator.reduce(sums, "sum").unbind()
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
    all_mean = total.sum() / count.sum()
    all_std = (total_sq.sum() / count.sum() - all_mean.pow(2)).clamp_min(0).sqrt()
    return {
        "samples": int(count[0].item() // (model.latent_shape[1] * model.latent_shape[2])),
        "latents_mean": mean.tolist(),
        "latents_std": std.tolist(),
        "shift_factor": all_mean.item(),
        "scaling_factor": 1.0 / max(all_std.item(), 1e-12),
    }


def write_latent_stats(run_dir: Path, stats: dict[str, Any]) -> Path:
    path = Path(run_dir) / LATENT_STATS_FILE
    path.write_text(json.dumps(stats, indent=1))
    return path


def read_latent_stats(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / LATENT_STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_scaling(record: dict[str, Any], origin: str) -> dict[str, float] | None:
    """The scaling/shift an autoencoder recorded: an export's, or a run's latent_stats.json."""
    stats = record.get("export", {}).get("latent_stats")
    if stats is None and Path(origin).is_dir():
        stats = read_latent_stats(Path(origin))
    if not stats or "scaling_factor" not in stats:
        return None
    return {"scaling_factor": stats["scaling_factor"], "shift_factor": stats["shift_factor"]}


@torch.no_grad()
def activation_peak(model: nn.Module, images: torch.Tensor) -> float:
    """The largest |activation| of any layer while encoding `images` (float pixels) and
    decoding their posterior means in float32: above fp16's 65504 the model overflows in fp16."""
    peak = torch.zeros(())

    def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal peak
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            peak = torch.maximum(peak, output.detach().abs().max().float().cpu())

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        mu, _ = model.encode(images)
        model.decode(mu)
    finally:
        for handle in handles:
            handle.remove()
    return peak.item()
