"""Evaluation over a whole split: every sample counted once across all processes.

Noise (reparameterization, importance samples, dynamic binarization) is drawn from a generator
per sample, seeded by (run seed, sample key): a model gives the same numbers on 1 process or N,
whatever the batch size and shard order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from vae_scale.data.streaming.inputs import prepare_batch
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.losses import bits_per_dim, elbo_term_names, kl_per_dim, neg_elbo
from vae_scale.metrics import MetricSums
from vae_scale.models import VAE
from vae_scale.models.base import check_single_latent
from vae_scale.perception.fid import SUMS, feature_sums, fid_from_sums
from vae_scale.perception.image_metrics import psnr, ssim
from vae_scale.perception.networks import PerceptionNets
from vae_scale.utils.compat import full_precision_forward
from vae_scale.utils.progress import Progress
from vae_scale.utils.seeding import derive_seed

NOISE_BLOCK = 16


class SampleNoise:
    """One generator per sample of a batch, seeded by (seed, tag, key)."""

    def __init__(self, keys: list[str], seed: int, tag: str):
        self.generators = [
            torch.Generator().manual_seed(derive_seed(seed, tag, key)) for key in keys
        ]

    def normal(self, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """(B, *shape) standard normal draws, row b from sample b's generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device)

    def normal_blocks(
        self, count: int, shape: tuple[int, ...], device: torch.device | str
    ) -> torch.Tensor:
        """(B, count, *shape) draws made in fixed blocks of NOISE_BLOCK, so the values do not
        depend on how a caller splits its draws (as long as it splits at block multiples)."""
        blocks = -(-count // NOISE_BLOCK)
        return torch.stack(
            [
                torch.cat([torch.randn((NOISE_BLOCK, *shape), generator=g) for _ in range(blocks)])
                for g in self.generators
            ]
        )[:, :count].to(device)


@torch.no_grad()
def iwae_nll(
    model: VAE, x: torch.Tensor, k: int, noise: SampleNoise, max_decode: int = 4096
) -> torch.Tensor:
    """Importance-weighted bound on -log p(x) per image (Burda et al. 2016), shape (B,).

    log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x); the weights come from
    `model.log_weights` (so hierarchical posteriors work too); the K samples are decoded in
    chunks of at most `max_decode` images and combined with a running logsumexp, so K = 5000
    fits in memory. Densities are float32.
    """
    batch = x.shape[0]
    chunk = max(NOISE_BLOCK, max_decode // batch // NOISE_BLOCK * NOISE_BLOCK)
    acc = torch.full((batch,), float("-inf"), device=x.device)
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = noise.normal_blocks(n, tuple(model.latent_shape), x.device).transpose(0, 1)
        log_w = model.log_weights(x, eps)
        acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
    return -(acc - math.log(k))


def refined_neg_elbo(
    model: VAE,
    x: torch.Tensor,
    eps: torch.Tensor,
    noise: SampleNoise,
    steps: int,
    lr: float = 3e-2,
    samples: int = 4,
) -> torch.Tensor:
    """Negative ELBO per image (B,) with q(z|x) refined per image: start from the encoder's
    (mu, log_var) and take `steps` Adam steps on each image's own ELBO (semi-amortized
    inference, Kim et al. 2018), `samples` reparameterized draws per step from `noise`.

    The generative model is unchanged, so this is still a lower bound on log p(x); its distance
    to the amortized negative ELBO is the part of the amortization gap (Cremer et al. 2018)
    that refinement closes. The final estimate uses `eps`, the draw the amortized estimate
    used, so the two differ only by the posterior. Float32, weights frozen.
    """
    check_single_latent(model, "refine_steps", "posterior refinement")
    with torch.no_grad():
        mu0, logvar0 = model.encode(x)
    mu = mu0.detach().float().clone().requires_grad_(True)
    logvar = logvar0.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mu, logvar], lr=lr)
    latent = tuple(model.latent_shape)
    with torch.enable_grad():
        for _ in range(steps):
            draws = noise.normal((samples, *latent), x.device)  # (B, samples, *latent)
            z = mu.unsqueeze(1) + draws * torch.exp(0.5 * logvar).unsqueeze(1)
            params = model.decode(z.flatten(0, 1))
            recon = model.likelihood.nll(params, x.repeat_interleave(samples, dim=0))
            # Each image's ELBO depends only on its own (mu, log_var): the sum's gradient is
            # every image's own gradient, and Adam scales each coordinate separately.
            loss = recon.sum() / samples + kl_per_dim(mu, logvar).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=[mu, logvar])
            optimizer.step()
    with torch.no_grad():
        z = model.reparameterize(mu, logvar, eps)
        return neg_elbo(model.likelihood, model.decode(z), x, mu, logvar).neg_elbo.float()


@dataclass(frozen=True)
class EvalOptions:
    """How a split is evaluated: the run's seed (noise per sample key) and binarization, and
    the optional extras: the IWAE bound's K and posterior-refinement steps (0 = off)."""

    seed: int = 0
    binarize: str = "none"
    iw_samples: int = 0
    refine_steps: int = 0
    progress: bool = False  # show the split's progress (`vae-scale eval`; training's are short)
    nets: PerceptionNets | None = None  # LPIPS / rFID networks (PSNR and SSIM always)
    objective: Any = None  # its own terms (objectives/base.py's eval_terms) are reported too


@torch.no_grad()
def split_statistics(
    accelerator: Accelerator, model: VAE, data: ShardSplit, options: EvalOptions
) -> dict[str, torch.Tensor]:
    """Sums over the whole split, reduced over processes: neg_elbo, recon, kl, iwae, count,
    per latent dimension the sums of E_q[z] (mu), E_q[z]^2 (mu_sq) and KL (kl_dim), each
    latent group's KL (kl_<group>, hierarchical models), with `refine_steps` the negative ELBO
    under refined posteriors (refined), and the objective's own terms (`term/<name>`).
    Float32 whatever the training precision: the numbers of a bf16 run compare with
    `vae-scale eval`'s."""
    seed, binarize = options.seed, options.binarize
    iw_samples, refine_steps = options.iw_samples, options.refine_steps
    nets = options.nets or PerceptionNets()
    objective_terms = options.objective.eval_term_names() if options.objective else []
    model.eval()
    device = accelerator.device
    dims = int(torch.tensor(model.latent_shape).prod())
    groups = model.latent_group_names
    pixels = int(torch.tensor(data.image_shape).prod())
    sums = MetricSums(
        {
            **dict.fromkeys(elbo_term_names(groups), 1),
            **dict.fromkeys(["iwae", "count"], 1),
            **{"mu": dims, "mu_sq": dims, "kl_dim": dims},
            "refined": 1,
            **{f"term/{name}": 1 for name in objective_terms},
            # what the shard transports redid (retries, bytes fetched again) reading the split
            "retries": 1,
            "refetched_bytes": 1,
            # reconstruction error of the decoder mean at the posterior mean, and the split's
            # pixel sums (its mean image, the collapsed model's best guess)
            "sq_err": 1,
            "x": pixels,
            "x_sq": pixels,
            "psnr": 1,
            "ssim": 1,
            "lpips": 1,
            # rFID: images' and reconstructions' Inception feature sums
            **(dict.fromkeys(["fid_real", "fid_fake"], SUMS) if nets.inception is not None else {}),
        },
        device,
    )
    share = -(-data.num_samples // data.world_size) if data.catalog.indexed else 0
    batches = Progress(
        data.eval_batches(), total=-(-share // data.batch_size) or None,
        desc=f"evaluating {data.split}", unit="batch",
        disable=not (options.progress and accelerator.is_main_process),
    )  # fmt: skip
    for batch in batches:
        noise = SampleNoise(batch["key"], seed, f"eval/{data.split}")
        x = prepare_batch(batch["image"], device, binarize, noise.generators)
        eps = noise.normal(tuple(model.latent_shape), device)
        out = full_precision_forward(model, x, eps)
        iw = iwae_nll(model, x, iw_samples, noise) if iw_samples else torch.zeros(len(x))
        refined = torch.zeros(())
        if refine_steps:
            refine_noise = SampleNoise(batch["key"], seed, f"refine/{data.split}")
            refined = refined_neg_elbo(model, x, eps, refine_noise, refine_steps).sum()
        terms = neg_elbo(
            model.likelihood, out.x_params, x, out.mu, out.logvar, kl_groups=out.kl_groups
        )
        mu_flat = out.mu.float().flatten(1).double()
        x_flat = x.float().flatten(1).double()
        recon_images = model.reconstruct(x).float()
        recon = recon_images.flatten(1).double()
        sums.add(**perception_sums(nets, x.float(), recon_images.clamp(0, 1)))
        if objective_terms:
            own = options.objective.eval_terms(model, x, out.x_params)
            sums.add(**{f"term/{k}": v.double().sum() for k, v in own.items()})
        sums.add(
            sq_err=(recon - x_flat).pow(2).mean(1).sum(),
            x=x_flat.sum(0),
            x_sq=x_flat.pow(2).sum(0),
            **{k: v.sum() for k, v in terms.named.items()},
            iwae=iw.to(device).sum(),
            count=torch.tensor(float(len(x)), device=device),
            mu=mu_flat.sum(0),
            mu_sq=mu_flat.pow(2).sum(0),
            kl_dim=kl_per_dim(out.mu, out.logvar, out.kl_groups).double().sum(0),
            refined=refined.to(device),
            **{k: torch.tensor(float(v), device=device) for k, v in batch["transfers"].items()},
        )
    totals = sums.reduce(accelerator)
    if totals["count"].item() == 0:
        raise RuntimeError(f"split {data.split!r} produced no samples")
    return totals


def perception_sums(
    nets: PerceptionNets, x: torch.Tensor, recon: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A batch's PSNR, SSIM (and LPIPS, rFID statistics when their networks are here)."""
    sums = {"psnr": psnr(recon, x).double().sum(), "ssim": ssim(recon, x).double().sum()}
    if nets.lpips is not None:
        sums["lpips"] = nets.lpips(x, recon).double().sum()
    if nets.inception is not None:
        sums["fid_real"] = feature_sums(nets.inception(x))
        sums["fid_fake"] = feature_sums(nets.inception(recon))
    return sums


def perception_metrics(
    sums: dict[str, torch.Tensor], split: str, nets: PerceptionNets | None
) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM per image, LPIPS and rFID where their networks ran."""
    n = sums["count"].item()
    nets = nets or PerceptionNets()
    metrics = {f"{split}/psnr": sums["psnr"].item() / n, f"{split}/ssim": sums["ssim"].item() / n}
    if nets.lpips is not None:
        metrics[f"{split}/lpips"] = sums["lpips"].item() / n
    if nets.inception is not None:
        metrics[f"{split}/rfid"] = fid_from_sums(sums["fid_real"], sums["fid_fake"])
    return metrics


def evaluate_split(
    accelerator: Accelerator, model: VAE, data: ShardSplit, options: EvalOptions
) -> dict[str, float]:
    """Per-epoch metrics: mean negative ELBO, recon and KL (nats per image), bits/dim, the
    reconstruction error and active units, and with `refine_steps` the refined-posterior neg.
    ELBO and the amortization gap it closes."""
    sums = split_statistics(accelerator, model, data, options)
    return {
        **split_metrics(model, data, sums, options.refine_steps),
        **perception_metrics(sums, data.split, options.nets),
    }


def split_metrics(
    model: VAE,
    data: ShardSplit,
    sums: dict[str, torch.Tensor],
    refine_steps: int,
    active_threshold: float = 0.01,
) -> dict[str, Any]:
    """The metrics training and `vae-scale eval` both report, under the same names (what
    their nats measure is the run's `likelihood_convention`)."""
    n, split = sums["count"].item(), data.split
    terms = elbo_term_names(model.latent_group_names)
    metrics = {
        **{f"{split}/{k}": sums[k].item() / n for k in terms},
        f"{split}/num_samples": int(n),
        f"{split}/data_retries": int(sums["retries"].item()),
        f"{split}/data_refetched_bytes": int(sums["refetched_bytes"].item()),
        **refined_metrics(sums, split, refine_steps),
        **reconstruction_metrics(sums, split, active_threshold),
        **{f"{split}/{k[5:]}": v.item() / n for k, v in sums.items() if k.startswith("term/")},
    }
    if model.likelihood.discrete_8bit:
        dims = int(torch.tensor(data.image_shape).prod())
        metrics[f"{split}/bpd"] = bits_per_dim(metrics[f"{split}/neg_elbo"], dims)
    return metrics


def reconstruction_metrics(
    sums: dict[str, torch.Tensor], split: str, threshold: float = 0.01
) -> dict[str, float]:
    """A posterior-collapse detector that works for every likelihood: the mean squared error
    of reconstructions (decoder mean at the posterior mean, pixels in [0, 1]), its ratio to
    the error of predicting the split's mean image for every input (1: the reconstructions
    carry nothing of the input), and the active units (Cov_x(E_q[z|x]) > threshold)."""
    n = sums["count"].item()
    mse = sums["sq_err"].item() / n
    mean_image_mse = (sums["x_sq"] / n - (sums["x"] / n).pow(2)).mean().item()
    mu_var = sums["mu_sq"] / n - (sums["mu"] / n).pow(2)
    return {
        f"{split}/recon_mse": mse,
        f"{split}/recon_mse_ratio": mse / max(mean_image_mse, 1e-12),
        f"{split}/active_units": int((mu_var > threshold).sum().item()),
    }


def refined_metrics(
    sums: dict[str, torch.Tensor], split: str, refine_steps: int
) -> dict[str, float]:
    """Mean refined-posterior neg. ELBO and its distance to the amortized one ({} if off)."""
    if not refine_steps:
        return {}
    n = sums["count"].item()
    refined = sums["refined"].item() / n
    return {
        f"{split}/neg_elbo_refined": refined,
        f"{split}/amortization_gap": sums["neg_elbo"].item() / n - refined,
    }


def full_evaluation(
    accelerator: Accelerator,
    model: VAE,
    data: ShardSplit,
    options: EvalOptions,
    active_threshold: float = 0.01,
) -> dict[str, Any]:
    """`vae-scale eval`: the per-epoch metrics (same names), the IWAE NLL bound and its
    bits/dim, and the per-dimension KL profile."""
    sums = split_statistics(accelerator, model, data, options)
    out = split_metrics(model, data, sums, options.refine_steps, active_threshold)
    out.update(perception_metrics(sums, data.split, options.nets))
    for metric, why in (options.nets.unavailable if options.nets else {}).items():
        out[f"{data.split}/{metric}"] = None
        out[f"{data.split}/{metric}_unavailable"] = why
    n, split, k = sums["count"].item(), data.split, options.iw_samples
    out[f"{split}/latent_dims"] = int(sums["kl_dim"].numel())
    out[f"{split}/kl_per_dim"] = [round(v, 6) for v in (sums["kl_dim"] / n).tolist()]
    if k:
        out[f"{split}/nll_iw{k}_nats"] = sums["iwae"].item() / n
        if model.likelihood.discrete_8bit:
            dims = int(torch.tensor(data.image_shape).prod())
            out[f"{split}/bpd_iw{k}"] = bits_per_dim(out[f"{split}/nll_iw{k}_nats"], dims)
    return out


def first_images(data: ShardSplit, n: int) -> torch.Tensor:
    """The first n images (uint8) of a split in its stored order: the fixed picture inputs."""
    got: list[torch.Tensor] = []
    for batch in data.eval_batches():
        got.append(batch["image"])
        if sum(len(b) for b in got) >= n:
            break
    return torch.cat(got)[:n]


def summarize(metrics: dict[str, Any], headline: str = "neg_elbo") -> str:
    keys = [k for k in metrics if k.endswith((f"/{headline}", "/neg_elbo_refined", "/bpd"))]
    keys += [k for k in ("test/recon_mse_ratio", "test/active_units") if k in metrics]
    keys += [k for k in metrics if k.startswith("test/") and k.endswith(("psnr", "ssim", "lpips"))]
    keys += [k for k in metrics if k.endswith(("/rfid", "/ifid", "/scale_equivariance_psnr"))]
    keys += [k for k in metrics if k.endswith("/gfid")]
    return "  ".join(
        f"{k} {metrics[k]:.2f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
        for k in dict.fromkeys(keys)
    )
