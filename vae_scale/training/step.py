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
from vae_scale.losses import kl_weight, neg_elbo
from vae_scale.models import VAE
from vae_scale.objectives import Objective
from vae_scale.objectives.autoencoder import autoencoder_objective
from vae_scale.training.augment import encoder_augmentation_terms
from vae_scale.training.ema import EMA
from vae_scale.training.optim import UpdatePolicy
from vae_scale.training.setup import Critic
from vae_scale.training.state import TrainState


@dataclass
class StepOutput:
    terms: dict[str, torch.Tensor]  # the objective's terms (rows; see Objective)
    beta: float  # the KL weight this step used
    synced: bool  # an accumulation boundary: the optimizer was asked to step
    # Tensors (read on the host only at log steps): the norm before clipping and whether the
    # update was applied (a bool where the policy decided on the host); None when not synced.
    grad_norm: torch.Tensor | None
    applied: torch.Tensor | bool | None
    critic_grad_norm: torch.Tensor | None = None  # the discriminator's, once it trains


def training_objective(
    accelerator: Accelerator,
    model: nn.Module,
    plain: VAE,
    x: torch.Tensor,
    cfg: Config,
    beta: float,
) -> Objective:
    """The batch's neg. ELBO (KL weight `beta`, free bits), averaged over loss.z_samples
    posterior draws per image (its terms then have one row per draw, draw-major), and, with
    loss.encoder_aug.weight > 0, the encoder-only term on deformed copies of the batch
    (`encoder_aug_neg_elbo`). `model` is the prepared (DDP/compiled) model, `plain` the bare
    VAE inside it."""
    draws = cfg.loss.z_samples
    out = model(x, samples=draws)
    elbo = neg_elbo(
        plain.likelihood,
        out.x_params,
        x if draws == 1 else repeat(x, "b ... -> (k b) ...", k=draws),
        out.mu,
        out.logvar,
        beta,
        cfg.loss.free_bits,
        out.kl_groups,
    )
    terms = elbo.named()
    aug_cfg = cfg.loss.encoder_aug
    if not aug_cfg.weight:
        return Objective(elbo.loss, terms)
    # outside DDP's and compile's forward: the extra pass reaches the weights through autograd
    with accelerator.autocast():
        aug = encoder_augmentation_terms(
            plain, x, aug_cfg, beta, cfg.loss.free_bits, copies=aug_cfg.copies
        )
    terms["encoder_aug_neg_elbo"] = aug.neg_elbo.float()
    return Objective(elbo.loss + aug_cfg.weight * aug.loss, terms)


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
    ema: EMA | None = None,
    perceptual: nn.Module | None = None,
    critic: Critic | None = None,
) -> StepOutput:
    """Forward and backward of one batch `x` (float pixels on the device); at the end of an
    accumulation cycle, the update (`policy`) and the EMA of the weights, and the
    discriminator's own update once it has started (`critic`, the autoencoder objective).
    Nothing here reads a device value on the host when the policies decide on the device."""
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_norm = applied = critic_norm = None
    step = state.opt_step
    with accelerator.accumulate(model, *([critic.model] if critic else [])):
        loss = cfg.loss
        beta = kl_weight(step, loss.beta, loss.kl_warmup_steps, loss.beta_start)
        if loss.objective == "autoencoder":
            objective = autoencoder_objective(
                accelerator, model, plain, x, loss, beta, step, perceptual, critic
            )
        else:
            objective = training_objective(accelerator, model, plain, x, cfg, beta)
        # one backward: the two networks' losses reach disjoint weights (autoencoder.py)
        accelerator.backward(objective.loss)
        synced = accelerator.sync_gradients
        if synced:
            applied, grad_norm = policy.step(accelerator, model, optimizer, step, total_steps)
            if critic is not None and step >= critic.start_step:
                _, critic_norm = critic.policy.step(
                    accelerator, critic.model, critic.optimizer, step - critic.start_step,
                    total_steps - critic.start_step,
                )  # fmt: skip
            state.opt_step += 1
            if ema is not None:  # counts every step; a skipped one leaves the average as is
                ema.update(plain, applied)
    return StepOutput(objective.terms, beta, synced, grad_norm, applied, critic_norm)


def batch_sums(out: StepOutput, num_images: int) -> dict[str, torch.Tensor]:
    """The batch's contribution to the epoch sums: each term's rows summed and scaled to the
    batch's images (the mean over an image's draws or copies), and the number of images."""
    sums = {k: v.detach().sum() * (num_images / v.numel()) for k, v in out.terms.items()}
    # a fill kernel: torch.tensor(n, device=cuda) would copy from the host and wait
    count = torch.full((), float(num_images), device=out.terms["neg_elbo"].device)
    return {**sums, "count": count}


def step_means(out: StepOutput) -> dict[str, torch.Tensor]:
    """Each term's mean over the batch's rows (a steps.jsonl / W&B row's train/step_<term>)."""
    return {k: v.detach().float().mean() for k, v in out.terms.items()}
