"""The pictures people look at: originals beside reconstructions, and prior samples; for a
2-D latent also the latent manifold and the scatter of posterior means by label."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.utils import make_grid, save_image


def _upscale(images: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour upscale by an integer factor so tiny images (28x20) stay visible."""
    factor = max(1, min_side // min(images.shape[-2:]))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def recon_grid(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Grid with originals in the first column and their reconstructions in the second."""
    pairs = rearrange(torch.stack([originals, recons]), "two b c h w -> (b two) c h w")
    return make_grid(_upscale(pairs.float().cpu()), nrow=2, padding=2, pad_value=1.0)


def sample_grid(samples: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    return make_grid(_upscale(samples.float().cpu()), nrow=nrow, padding=2, pad_value=1.0)


def rows_grid(rows: torch.Tensor) -> torch.Tensor:
    """(rows, columns, C, H, W) -> grid with one picture row per entry (edits, paths)."""
    return sample_grid(rearrange(rows, "r k c h w -> (r k) c h w"), nrow=rows.shape[1])


def save_grid(grid: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


def manifold_latents(n: int = 20, low: float = 0.05, high: float = 0.95) -> torch.Tensor:
    """(n*n, 2) latents at Normal quantiles in [low, high]: row-major, z1 grows to the right,
    z2 grows upwards (first row = highest z2), as in Kingma & Welling's figure."""
    from scipy.stats import norm

    q = torch.tensor(norm.ppf(np.linspace(low, high, n)), dtype=torch.float32)
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")
    return torch.stack([z1, z2], dim=-1).reshape(-1, 2)


@torch.no_grad()
def manifold_grid(model: Any, n: int = 20) -> torch.Tensor:
    """Decoded images of `manifold_latents(n)` tiled n x n (the learned 2-D manifold)."""
    device = next(model.parameters()).device
    images = model.likelihood.mean(model.decode(manifold_latents(n).to(device)))
    return make_grid(images.float().cpu(), nrow=n, padding=0)


@torch.no_grad()
def posterior_means(model: Any, split: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Posterior means mu(x) of every image in `split` (this rank's share), and labels."""
    from vae_scale.data.streaming.inputs import prepare_batch

    device = next(model.parameters()).device
    mus, labels = [], []
    for batch in split.eval_batches():
        mu, _ = model.encode(prepare_batch(batch["image"], device))
        mus.append(mu.float().cpu())
        if "cls" in batch:
            labels.append(batch["cls"])
    mu = torch.cat(mus).numpy()
    return mu, (torch.cat(labels).numpy() if len(labels) == len(mus) else None)


def latent_scatter(mu: np.ndarray, labels: np.ndarray | None, path: Path, title: str) -> Path:
    """Scatter of 2-D posterior means coloured by label, saved as PNG (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.6), dpi=100)
    ax = fig.subplots()
    if labels is None:
        ax.scatter(mu[:, 0], mu[:, 1], s=2, alpha=0.5)
    else:
        points = ax.scatter(
            mu[:, 0], mu[:, 1], c=labels, s=2, alpha=0.6, cmap="tab10", vmin=-0.5, vmax=9.5
        )
        fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set(xlabel="$z_1$ (posterior mean)", ylabel="$z_2$ (posterior mean)", title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def latent_pictures(model: Any, split: Any, run_dir: Path, epoch: int) -> dict[str, Path]:
    """For a 2-D latent: the 20x20 latent manifold and the scatter of `split`'s posterior
    means (None split: the manifold only). Returns name -> PNG path, {} for other latents."""
    if tuple(model.latent_shape) != (2,):
        return {}
    was_training = model.training
    model.eval()
    images = {
        "manifold": save_grid(manifold_grid(model), run_dir / f"manifold_epoch{epoch:03d}.png")
    }
    if split is not None:
        mu, labels = posterior_means(model, split)
        images["latent"] = latent_scatter(
            mu,
            labels,
            run_dir / f"latent_epoch{epoch:03d}.png",
            f"{split.split} posterior means, epoch {epoch}",
        )
    model.train(was_training)
    return images


def picture_files(
    run_dir: Path, epoch: int, latent_shape: tuple[int, ...], has_test: bool
) -> list[Path]:
    """The files `epoch_pictures` writes for `epoch` (what a run killed before them lacks)."""
    names = ["samples"] + (["recon"] if has_test else [])
    if tuple(latent_shape) == (2,):
        names += ["manifold"] + (["latent"] if has_test else [])
    return [Path(run_dir) / f"{name}_epoch{epoch:03d}.png" for name in names]


def epoch_pictures(
    accelerator: Any,
    model: Any,
    inputs: torch.Tensor | None,
    epoch: int,
    cfg: Any,
    step: int,
    test_split: Any = None,
) -> dict[str, Path]:
    """The training loop's pictures of `epoch` (main process): originals | reconstructions of
    the fixed test images, prior samples, and the 2-D latent pictures; also to W&B."""
    from vae_scale.data.streaming.inputs import prepare_batch
    from vae_scale.utils.seeding import derive_seed

    run_dir = cfg.run_dir
    model.eval()
    images = {}
    with torch.no_grad(), accelerator.autocast():
        if inputs is not None:
            x = prepare_batch(inputs, accelerator.device, "none")
            grid = recon_grid(x, model.reconstruct(x))
            images["recon"] = save_grid(grid, run_dir / f"recon_epoch{epoch:03d}.png")
        gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "samples"))
        grid = sample_grid(model.sample(cfg.eval.num_samples, gen))
        images["samples"] = save_grid(grid, run_dir / f"samples_epoch{epoch:03d}.png")
        # 2-D latents only: the latent manifold and the test set's posterior means by label
        images.update(latent_pictures(model, test_split, run_dir, epoch))
    if accelerator.trackers:
        from PIL import Image

        accelerator.get_tracker("wandb").log_images(
            {f"pictures/{k}": [Image.open(p)] for k, p in images.items()}, step=step
        )
    return images
