"""The KL autoencoder's objective (latent diffusion's LPIPSWithDiscriminator, corrected):

    pixel (L1/L2, summed per image) + perceptual weight x LPIPS x pixels
    + loss.beta x KL (summed per image)
    + [from loss.adversarial.start_step] adversarial weight x adaptive weight x generator loss
    + the discriminator's own loss (on real images and *detached* reconstructions)
    + the likelihood's calibration: the Gaussian NLL of the *detached* reconstruction, which
      trains only the likelihood's learned scale, so neg. ELBO and bits/dim stay reported.

What the public trainers get wrong and this does not: LPIPS carries gradients (it is frozen,
not run under no_grad); the reconstruction reaches the discriminator's loss detached and the
generator's adversarial loss through the discriminator's *detached* weights (neither network's
gradients leak into the other's); the autoencoder runs through its DDP wrapper so its
gradients are all-reduced; the adaptive weight is the global batch's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from vae_scale.losses import kl_per_dim
from vae_scale.models import VAE
from vae_scale.objectives import Objective
from vae_scale.objectives.adversarial import (
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from vae_scale.objectives.reconstruction import pixel_error

#: the terms the discriminator adds, reported as 0 before it starts (every step reports the
#: same keys, so epoch sums and dashboards line up across the start)
CRITIC_TERMS = ("gan", "adaptive_weight", "disc_loss", "logits_real", "logits_fake")


def autoencoder_objective(
    accelerator: Any,
    model: nn.Module,
    plain: VAE,
    x: torch.Tensor,
    loss_cfg: Any,
    beta: float,
    step: int,
    perceptual: nn.Module | None,
    critic: Any | None,
) -> Objective:
    """`model` is the prepared (DDP) autoencoder, `plain` the bare one; `critic` the
    discriminator's training parts (training/setup.py's Critic: .model prepared, .plain,
    .lecam) or None; `step` the optimizer step (the discriminator starts at its start_step)."""
    out = model(x)
    batch = x.shape[0]
    target = x.float() * 2 - 1
    recon = out.x_params.float()  # the reconstruction's mean, [-1, 1] units
    error = pixel_error(recon, target, loss_cfg.pixel.kind)
    pixels = error[0].numel()
    rec_loss = loss_cfg.pixel.weight * error.flatten(1).sum(1)
    lpips = torch.zeros(batch, device=x.device)
    if perceptual is not None:
        with accelerator.autocast():
            lpips = perceptual(x, (recon + 1) / 2).float()
        rec_loss = rec_loss + loss_cfg.perceptual.weight * pixels * lpips
    nll_loss = rec_loss.mean()
    kl = kl_per_dim(out.mu, out.logvar).sum(1)
    calibration = plain.likelihood.nll(out.x_params.detach(), x)
    loss = nll_loss + beta * kl.mean() + calibration.mean()
    terms = {
        "neg_elbo": calibration + kl,
        "recon": calibration,
        "kl": kl,
        f"pixel_{loss_cfg.pixel.kind}": error.flatten(1).mean(1),
        "lpips": lpips,
    }
    adv = loss_cfg.adversarial
    if critic is None:
        return Objective(loss, terms)
    if step < adv.start_step:
        zero = torch.zeros(batch, device=x.device)
        return Objective(loss, {**terms, **dict.fromkeys(CRITIC_TERMS, zero)})
    average = mean_over_processes(accelerator)
    frozen = {name: p.detach() for name, p in critic.plain.named_parameters()}
    with accelerator.autocast():  # the generator's view: no gradient into the critic
        fake_for_generator = functional_call(critic.plain, frozen, (recon,))
    gan = generator_loss(fake_for_generator, adv.loss)
    weight = torch.ones((), device=x.device)
    if adv.adaptive_weight:
        last = plain.last_decoder_layer()
        weight = adaptive_weight(nll_loss, gan, last, adv.max_adaptive_weight, average)
    with accelerator.autocast():  # the critic's view, through its DDP wrapper
        logits = critic.model(torch.cat([target, recon.detach()]))
    real, fake = logits.float().chunk(2)
    disc = discriminator_loss(real, fake, adv.loss)
    if adv.lecam_weight:
        disc = disc + adv.lecam_weight * critic.lecam.penalty(real, fake, average)
    loss = loss + adv.weight * weight * gan + disc
    terms.update(
        gan=gan.detach().expand(batch),
        adaptive_weight=weight.expand(batch),
        disc_loss=disc.detach().expand(batch),
        logits_real=real.detach().flatten(1).mean(1),
        logits_fake=fake.detach().flatten(1).mean(1),
    )
    return Objective(loss, terms)


def mean_over_processes(accelerator: Any):
    """A tensor's mean over processes (None on one process: nothing to average)."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t, "mean")
