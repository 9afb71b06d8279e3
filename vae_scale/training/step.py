"""One training step: what it minimises (`training_objective`) and the step itself
(`train_step`: forward, backward, and at accumulation boundaries the optimizer update).
`benchmarks/steps.py` times exactly this function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from einops import repeat
from torch import nn

from vae_scale.config import Config
from vae_scale.losses import ELBOTerms, kl_weight, neg_elbo
from vae_scale.models import VAE
from vae_scale.training.augment import encoder_augmentation_terms
from vae_scale.training.ema import update_ema
from vae_scale.training.optim import UpdatePolicy
from vae_scale.training.state import TrainState


@dataclass
class StepOutput:
    terms: ELBOTerms  # the batch's per-image terms (one row per posterior draw)
    aug: ELBOTerms | None  # the encoder augmentation's terms, when it is on
    beta: float  # the KL weight this step used
    synced: bool  # an accumulation boundary: the optimizer was asked to step
    # Tensors (read on the host only at log steps): the norm before clipping and whether the
    # update was applied (a bool where the policy decided on the host); None when not synced.
    grad_norm: torch.Tensor | None
    applied: torch.Tensor | bool | None


def training_objective(
    accelerator: Accelerator,
    model: nn.Module,
    plain: VAE,
    x: torch.Tensor,
    cfg: Config,
    beta: float,
) -> tuple[ELBOTerms, ELBOTerms | None, torch.Tensor]:
    """What one step minimises: the batch's neg. ELBO (KL weight `beta`, free bits), averaged
    over loss.z_samples posterior draws per image (the terms then have one row per draw,
    draw-major), and, with loss.encoder_aug.weight > 0, the encoder-only term on deformed
    copies of the batch. `model` is the prepared (DDP/compiled) model, `plain` the bare VAE
    inside it. Returns (the batch's terms, the augmented terms or None, the scalar to
    backpropagate)."""
    draws = cfg.loss.z_samples
    out = model(x, samples=draws)
    terms = neg_elbo(
        plain.likelihood,
        out.x_params,
        x if draws == 1 else repeat(x, "b ... -> (k b) ...", k=draws),
        out.mu,
        out.logvar,
        beta,
        cfg.loss.free_bits,
        out.kl_groups,
    )
    aug_cfg = cfg.loss.encoder_aug
    if not aug_cfg.weight:
        return terms, None, terms.loss
    # outside DDP's and compile's forward: the extra pass reaches the weights through autograd
    with accelerator.autocast():
        aug = encoder_augmentation_terms(
            plain, x, aug_cfg, beta, cfg.loss.free_bits, copies=aug_cfg.copies
        )
    return terms, aug, terms.loss + aug_cfg.weight * aug.loss


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    plain: VAE,
    optimizer: torch.optim.Optimizer,
    policy: UpdatePolicy,
    x: torch.Tensor,
    cfg: Config,
    state: TrainState,
    total_steps: int,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> StepOutput:
    """Forward and backward of one batch `x` (float pixels on the device); at the end of an
    accumulation cycle, the update (`policy`) and the EMA of the weights. Nothing here reads
    a device value on the host when the policy decides on the device."""
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_norm = applied = None
    with accelerator.accumulate(model):
        loss = cfg.loss
        beta = kl_weight(state.opt_step, loss.beta, loss.kl_warmup_steps, loss.beta_start)
        terms, aug, objective = training_objective(accelerator, model, plain, x, cfg, beta)
        accelerator.backward(objective)
        synced = accelerator.sync_gradients
        if synced:
            applied, grad_norm = policy.step(accelerator, model, optimizer, state, total_steps)
            if ema is not None:  # counts every step; a skipped one leaves the average as is
                mask = applied if isinstance(applied, torch.Tensor) else None
                if applied is not False:
                    update_ema(ema, plain, state.ema_updates, cfg.train.ema_decay, mask)
                else:
                    ema.n_averaged += 1
                state.ema_updates += 1
    return StepOutput(terms, aug, beta, synced, grad_norm, applied)


def epoch_sum_names(groups: list[str]) -> list[str]:
    """What an epoch sums per image (`batch_sums`), in order."""
    return ["neg_elbo", "recon", "kl", "count", *(f"kl_{g}" for g in groups)]


def batch_sums(out: StepOutput, num_images: int, groups: list[str], draws: int) -> dict:
    """The batch's contribution to the epoch sums: per-image terms summed (the mean over the
    `draws` rows of each image), and the number of images."""
    terms = out.terms
    return {
        "neg_elbo": terms.neg_elbo.detach().sum() / draws,
        "recon": terms.recon.detach().sum() / draws,
        "kl": terms.kl.detach().sum() / draws,
        # a fill kernel: torch.tensor(n, device=cuda) would copy from the host and wait
        "count": torch.full((), float(num_images), device=terms.kl.device),
        **{f"kl_{g}": terms.kl_groups[g].detach().sum() for g in groups},
    }
