"""The KL autoencoder's objective (latent diffusion's LPIPSWithDiscriminator, corrected):

    pixel (L1/L2, summed per image) + perceptual weight x LPIPS x pixels
    + loss.beta x KL (summed per image)
    + [from loss.discriminator.start_step] its weight x adaptive weight x the GAN loss
    + the discriminator's own loss (on real images and *detached* reconstructions)
    + [loss.equivariance] its weight x the pixel + perceptual error of decode(tau(z)) against
      tau(x) for a transform tau drawn per step (equivariance.py)
    + [loss.alignment] its weight x adaptive weight x VA-VAE's VF loss of the projected latents
      against a frozen teacher's patch features (alignment.py)
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

from vae_scale.errors import ConfigError
from vae_scale.losses import kl_per_dim, kl_weight
from vae_scale.objectives.alignment import AlignmentTerm
from vae_scale.objectives.base import Loss, NetworkSpec, Objective, Trained
from vae_scale.objectives.discriminator import DISCRIMINATOR_TERMS, GanTerm
from vae_scale.objectives.equivariance import draw
from vae_scale.objectives.reconstruction import pixel_error
from vae_scale.perception.lpips import LPIPS, MIN_SIDE
from vae_scale.schema import FieldError


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
        loss = cfg.loss
        # after the VAE: its weights draw from the seeded generator first
        self.gan = (
            GanTerm(loss.discriminator, self.image_shape, accelerator)
            if loss.discriminator.weight
            else None
        )
        self.lpips = None
        if loss.perceptual.weight:
            if min(self.image_shape[1:]) < MIN_SIDE:
                raise ConfigError(
                    f"loss.perceptual.weight: LPIPS-VGG needs images of at least {MIN_SIDE}x"
                    f"{MIN_SIDE}; these are {self.image_shape[1]}x{self.image_shape[2]} (set "
                    f"it to 0)"
                )
            self.lpips = LPIPS.pretrained(cfg.run.weights_dir).to(accelerator.device)
        self.alignment = None
        if loss.alignment.weight:
            if len(self.vae.latent_shape) != 3:
                raise ConfigError(
                    f"loss.alignment.weight: needs spatial latents (C, h, w); "
                    f"{cfg.model.name} has {tuple(self.vae.latent_shape)}"
                )
            if not self.vae.last_encoder_layer().requires_grad:
                raise ConfigError(
                    "loss.alignment.weight: the term trains the encoder, whose last layer is "
                    "frozen here (train.trainable / train.freeze); unfreeze it or set it to 0"
                )
            self.alignment = AlignmentTerm(cfg, self.vae.latent_shape[0], accelerator)

    def networks(self) -> dict[str, NetworkSpec]:
        nets = super().networks()
        if self.gan is not None:
            nets["discriminator"] = self.gan.spec(self.cfg.train)
        if self.alignment is not None:
            nets["alignment_projection"] = self.alignment.spec(self.cfg.train)
        return nets

    def frozen(self) -> dict[str, nn.Module]:
        frozen = {"lpips": self.lpips} if self.lpips is not None else {}
        if self.alignment is not None:
            frozen["teacher"] = self.alignment.teacher
        return frozen

    def components(self) -> dict[str, Any]:
        return {"lecam": self.gan.lecam} if self.gan is not None else {}

    def start_step(self, name: str) -> int:
        return self.cfg.loss.discriminator.start_step if name == "discriminator" else 0

    def loss(self, nets: Mapping[str, Trained], x: Tensor, step: int) -> Loss:
        cfg, vae = self.cfg.loss, nets["vae"]
        out = vae.model(x)
        batch, target = x.shape[0], x.float() * 2 - 1
        recon = out.x_params.float()  # the reconstruction's mean, [-1, 1] units
        rec_loss, error, lpips = self._reconstruction(recon, x)
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
        if cfg.equivariance.weight:
            eq = self._equivariance(vae, out.z, x, step)
            terms["equivariance"] = eq
            loss = loss + cfg.equivariance.weight * eq.mean()
        if self.alignment is not None:
            weighted_vf, vf_terms = self.alignment.terms(nets, x, out.z, nll_loss, step)
            loss = loss + weighted_vf
            terms.update(vf_terms)
        if self.gan is None:
            return Loss(loss, terms, values)
        if step < self.start_step("discriminator"):
            zero = torch.zeros(batch, device=x.device)
            return Loss(loss, {**terms, **dict.fromkeys(DISCRIMINATOR_TERMS, zero)}, values)
        weighted_gan, disc, gan_terms = self.gan.terms(nets, target, recon, nll_loss)
        return Loss(loss + weighted_gan + disc, {**terms, **gan_terms}, values)

    def _reconstruction(self, recon: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image: the weighted pixel + perceptual loss of `recon` ([-1, 1] units) against
        the image `x` ([0, 1]), the pixel error map and LPIPS (zeros without it, or for
        images too small for it)."""
        cfg = self.cfg.loss
        error = pixel_error(recon, x.float() * 2 - 1, cfg.pixel.kind)
        rec_loss = cfg.pixel.weight * error.flatten(1).sum(1)
        lpips = torch.zeros(len(recon), device=recon.device)
        if self.lpips is not None and min(recon.shape[-2:]) >= MIN_SIDE:
            with self.accelerator.autocast():
                lpips = self.lpips(x, (recon + 1) / 2).float()
            rec_loss = rec_loss + cfg.perceptual.weight * error[0].numel() * lpips
        return rec_loss, error, lpips

    def _equivariance(self, vae: Trained, z: Tensor, x: Tensor, step: int) -> Tensor:
        """Per image: the reconstruction loss of decode(tau(z)) against tau(x) (zeros on a
        prior-preservation step)."""
        tau = draw(self.cfg.loss.equivariance, self.cfg.run.seed, step)
        if tau is None:
            return torch.zeros(len(z), device=z.device)
        # outside DDP's and compile's forward: the extra decode reaches the weights by autograd
        with self.accelerator.autocast():
            decoded = vae.unwrapped.decode(tau.latent(z)).float()
        return self._reconstruction(decoded, tau.image(x.float(), decoded.shape[-2:]))[0]

    def before_update(self, nets: Mapping[str, Trained], step: int) -> dict[str, Any]:
        values = {} if self.gan is None else self.gan.before_update(nets)
        if self.alignment is not None:
            values.update(self.alignment.before_update(nets, step))
        return values

    def eval_term_names(self) -> list[str]:
        names = [f"pixel_{self.cfg.loss.pixel.kind}"]
        return names + (list(DISCRIMINATOR_TERMS) if self.gan is not None else [])

    @torch.no_grad()
    def eval_terms(self, vae: Any, x: Tensor, x_params: Tensor) -> dict[str, Tensor]:
        """The pixel term and, with a discriminator, the GAN terms of val/test images."""
        kind = self.cfg.loss.pixel.kind
        target, recon = x.float() * 2 - 1, x_params.float()
        terms = {f"pixel_{kind}": pixel_error(recon, target, kind).flatten(1).mean(1)}
        if self.gan is not None:
            terms.update(self.gan.eval_terms(target, recon))
        return terms
