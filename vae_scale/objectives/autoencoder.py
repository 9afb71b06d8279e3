"""The KL autoencoder's objective (latent diffusion's LPIPSWithDiscriminator, corrected):

    pixel (L1/L2, summed per image) + perceptual weight x LPIPS x pixels
    + loss.beta x KL (summed per image)
    + [from loss.discriminator.start_step] its weight x adaptive weight x the GAN loss
    + the discriminator's own loss (on real images and *detached* reconstructions)
    + the likelihood's calibration: the Gaussian NLL of the *detached* reconstruction, which
      trains only the likelihood's learned scale, so neg. ELBO and bits/dim stay reported.

What the public trainers get wrong and this does not: LPIPS carries gradients (it is frozen,
not run under no_grad); the reconstruction reaches the discriminator's loss detached and the
autoencoder's GAN loss through the discriminator's *detached* weights (neither network's
gradients leak into the other's); the autoencoder runs through its DDP wrapper so its
gradients are all-reduced; the adaptive weight is that of the optimizer step's global batch:
with gradient accumulation the GAN loss's gradient is accumulated apart (one more backward
through the autoencoder per batch, once the discriminator trains) and weighted at the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from vae_scale.errors import ConfigError
from vae_scale.losses import kl_per_dim, kl_weight
from vae_scale.models import VAE
from vae_scale.objectives.base import Loss, NetworkSpec, Objective, Trained
from vae_scale.objectives.discriminator import (
    LeCam,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    last_layer_grads,
)
from vae_scale.objectives.reconstruction import pixel_error
from vae_scale.perception.lpips import LPIPS, MIN_SIDE
from vae_scale.schema import FieldError
from vae_scale.utils.compat import full_precision_forward

#: the discriminator's terms, reported as 0 before it starts (every step reports the same
#: keys, so epoch sums and dashboards line up across the start)
DISCRIMINATOR_TERMS = ("gan", "discriminator_loss", "logits_real", "logits_fake")


class AutoencoderObjective(Objective):
    name = "autoencoder"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        loss = cfg.loss
        if loss.likelihood != "gaussian":
            raise FieldError(
                "loss.likelihood",
                "expected 'gaussian' with loss.objective 'autoencoder' (the decoder predicts "
                "the image; a learned per-pixel scale around it gives its bits/dim)",
            )
        if loss.discriminator.weight and cfg.train.mixed_precision == "fp16":
            raise FieldError(
                "train.mixed_precision",
                "'fp16' with a discriminator (two optimizers under one grad scaler) is not "
                "supported; use 'bf16' (or loss.discriminator.weight=0)",
            )
        unsupported = {
            "loss.encoder_aug.weight": loss.encoder_aug.weight,
            "loss.z_samples": loss.z_samples > 1,
            "loss.free_bits": loss.free_bits,
        }
        for key, asked in unsupported.items():
            if asked:
                raise FieldError(
                    key, "an ELBO setting; loss.objective 'autoencoder' has no use for it"
                )

    def __init__(self, cfg: Any, image_shape: tuple[int, int, int], accelerator: Any):
        super().__init__(cfg, image_shape, accelerator)
        loss, side = cfg.loss, min(self.image_shape[1:])
        d = loss.discriminator
        self.discriminator = self.lecam = None
        if d.weight:
            if side // 2**d.layers < 3:  # then two stride-1 4x4 convs leave no patch
                raise ConfigError(
                    f"loss.discriminator.layers: {d.layers} halvings leave no patch of a "
                    f"{side}-pixel image; use at most {max(1, (side // 3).bit_length() - 1)}"
                )
            self.discriminator = PatchDiscriminator(self.image_shape[0], d)
            self.lecam = LeCam(d.lecam_decay, accelerator.device)
        self.lpips = None
        if loss.perceptual.weight:
            if side < MIN_SIDE:
                raise ConfigError(
                    f"loss.perceptual.weight: LPIPS-VGG needs images of at least {MIN_SIDE}x"
                    f"{MIN_SIDE}; these are {self.image_shape[1]}x{self.image_shape[2]} (set "
                    f"it to 0)"
                )
            self.lpips = LPIPS.pretrained(cfg.run.weights_dir).to(accelerator.device)
        self.pending: dict[str, Any] | None = None  # the step's accumulated GAN gradients

    def networks(self) -> dict[str, NetworkSpec]:
        nets = super().networks()
        if self.discriminator is not None:
            d = self.cfg.loss.discriminator
            rules = self.cfg.train.model_copy(
                update={"lr": d.lr, "betas": d.betas, "weight_decay": 0.0,
                        "lr_schedule": d.lr_schedule, "warmup_steps": 0, "ema_decay": 0.0}
            )  # fmt: skip
            nets["discriminator"] = NetworkSpec(self.discriminator, rules)
        return nets

    def frozen(self) -> dict[str, nn.Module]:
        return {"lpips": self.lpips} if self.lpips is not None else {}

    def components(self) -> dict[str, Any]:
        return {"lecam": self.lecam} if self.lecam is not None else {}

    def start_step(self, name: str) -> int:
        return self.cfg.loss.discriminator.start_step if name == "discriminator" else 0

    def loss(self, nets: Mapping[str, Trained], x: Tensor, step: int) -> Loss:
        cfg, vae, acc = self.cfg.loss, nets["vae"], self.accelerator
        out = vae.model(x)
        batch, target = x.shape[0], x.float() * 2 - 1
        recon = out.x_params.float()  # the reconstruction's mean, [-1, 1] units
        error = pixel_error(recon, target, cfg.pixel.kind)
        rec_loss = cfg.pixel.weight * error.flatten(1).sum(1)
        lpips = torch.zeros(batch, device=x.device)
        if self.lpips is not None:
            with acc.autocast():
                lpips = self.lpips(x, (recon + 1) / 2).float()
            rec_loss = rec_loss + cfg.perceptual.weight * error[0].numel() * lpips
        nll_loss = rec_loss.mean()
        beta = kl_weight(step, cfg.beta, cfg.kl_warmup_steps, cfg.beta_start)
        kl = kl_per_dim(out.mu, out.logvar).sum(1)
        calibration = vae.unwrapped.likelihood.nll(out.x_params.detach(), x)
        loss = nll_loss + beta * kl.mean() + calibration.mean()
        terms = {
            "neg_elbo": calibration + kl,
            "recon": calibration,
            "kl": kl,
            f"pixel_{cfg.pixel.kind}": error.flatten(1).mean(1),
            "lpips": lpips,
        }
        values = {"kl_weight": beta}
        if self.discriminator is None:
            return Loss(loss, terms, values)
        if step < self.start_step("discriminator"):
            zero = torch.zeros(batch, device=x.device)
            return Loss(loss, {**terms, **dict.fromkeys(DISCRIMINATOR_TERMS, zero)}, values)
        gan, disc, real, fake = self._gan_terms(nets, target, recon)
        loss = loss + self._weighted_gan(vae.unwrapped, nll_loss, gan) + disc
        terms.update(
            gan=gan.detach().expand(batch),
            discriminator_loss=disc.detach().expand(batch),
            logits_real=real.detach().flatten(1).mean(1),
            logits_fake=fake.detach().flatten(1).mean(1),
        )
        return Loss(loss, terms, values)

    def _gan_terms(
        self, nets: Mapping[str, Trained], target: Tensor, recon: Tensor
    ) -> tuple[Tensor, ...]:
        """The autoencoder's GAN loss (through the discriminator's detached weights), and the
        discriminator's loss with LeCam (through its DDP wrapper, on the detached
        reconstruction), with the logits on real and fake images."""
        d, acc = self.cfg.loss.discriminator, self.accelerator
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        with acc.autocast():  # the autoencoder's view: no gradient into the discriminator
            fake_for_vae = functional_call(self.discriminator, frozen, (recon,))
        gan = generator_loss(fake_for_vae, d.loss)
        with acc.autocast():  # the discriminator's view, through its DDP wrapper
            logits = nets["discriminator"].model(torch.cat([target, recon.detach()]))
        real, fake = logits.float().chunk(2)
        disc = discriminator_loss(real, fake, d.loss)
        if d.lecam_weight:
            disc = disc + d.lecam_weight * self.lecam.penalty(real, fake)
        return gan, disc, real, fake

    def _weighted_gan(self, vae: VAE, nll_loss: Tensor, gan: Tensor) -> Tensor:
        """The GAN loss's share of this batch's loss. One batch per optimizer step: weighted
        now by the adaptive weight of the global batch. Several (accumulation): nothing now;
        its gradient and the last-layer gradients are accumulated apart and weighted in
        `before_update`, once the whole step's batches are in."""
        d, acc = self.cfg.loss.discriminator, self.accelerator
        grads = None
        if d.adaptive_weight:
            grads = last_layer_grads(nll_loss, gan, vae.last_decoder_layer())
        accum = acc.gradient_accumulation_steps
        if accum == 1:
            weight = torch.ones((), device=gan.device)
            if grads is not None:
                average = self._average()
                grads = average(grads) if average else grads
                weight = adaptive_weight(grads, d.max_adaptive_weight)
            self.pending = {"weight": weight}
            return d.weight * weight * gan
        params = [p for p in vae.parameters() if p.requires_grad]
        gan_grads = torch.autograd.grad(gan / accum, params, retain_graph=True, allow_unused=True)
        if self.pending is None or "gan_grads" not in self.pending:
            self.pending = {"gan_grads": [torch.zeros_like(p) for p in params], "last": None}
        for total, g in zip(self.pending["gan_grads"], gan_grads):
            if g is not None:
                total.add_(g)
        if grads is not None:
            last = self.pending["last"]
            self.pending["last"] = grads / accum if last is None else last + grads / accum
        return torch.zeros((), device=gan.device)

    def before_update(self, nets: Mapping[str, Trained], step: int) -> dict[str, float]:
        """The LeCam averages move by the step's means; with accumulation, the step's GAN
        gradient, averaged over processes, weighted by the adaptive weight of the global
        batch, is added to the autoencoder's gradients."""
        pending, self.pending = self.pending, None
        if self.lecam is not None:
            self.lecam.step(self._average())
        if pending is None:  # the discriminator has not started (or there is none)
            return {} if self.discriminator is None else {"adaptive_weight": 0.0}
        if "gan_grads" in pending:
            d, average = self.cfg.loss.discriminator, self._average()
            weight = torch.ones((), device=pending["gan_grads"][0].device)
            if pending["last"] is not None:
                last = average(pending["last"]) if average else pending["last"]
                weight = adaptive_weight(last, d.max_adaptive_weight)
            vae = nets["vae"].unwrapped
            params = [p for p in vae.parameters() if p.requires_grad]
            flat = torch.cat([g.flatten() for g in pending["gan_grads"]])
            flat = average(flat) if average else flat
            scale = d.weight * weight
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                update = scale * g.view_as(p)
                p.grad = update if p.grad is None else p.grad.add_(update)
            pending["weight"] = weight
        return {"adaptive_weight": pending["weight"]}

    def _average(self):
        """A tensor's mean over processes (None on one process: nothing to average)."""
        acc = self.accelerator
        return None if acc.num_processes == 1 else (lambda t: acc.reduce(t, "mean"))

    def eval_term_names(self) -> list[str]:
        names = [f"pixel_{self.cfg.loss.pixel.kind}"]
        return names + (list(DISCRIMINATOR_TERMS) if self.discriminator is not None else [])

    @torch.no_grad()
    def eval_terms(self, vae: VAE, x: Tensor, x_params: Tensor) -> dict[str, Tensor]:
        """The pixel term and, with a discriminator, the GAN terms of val/test images."""
        cfg = self.cfg.loss
        target, recon = x.float() * 2 - 1, x_params.float()
        terms = {f"pixel_{cfg.pixel.kind}": pixel_error(recon, target, cfg.pixel.kind)}
        terms = {k: v.flatten(1).mean(1) for k, v in terms.items()}
        if self.discriminator is not None:
            logits = full_precision_forward(self.discriminator, torch.cat([target, recon]))
            real, fake = logits.float().chunk(2)
            kind = cfg.discriminator.loss
            terms["gan"] = generator_loss(fake, kind, per_image=True)
            terms["discriminator_loss"] = discriminator_loss(real, fake, kind, per_image=True)
            terms["logits_real"] = real.flatten(1).mean(1)
            terms["logits_fake"] = fake.flatten(1).mean(1)
        return terms
