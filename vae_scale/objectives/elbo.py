"""The negative ELBO of a likelihood VAE (`loss.objective: elbo`): KL weight (warm-up, free
bits), loss.z_samples posterior draws per image, and the optional encoder augmentation term
(encoder_aug.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from einops import repeat
from torch import Tensor

from vae_scale.losses import kl_weight, neg_elbo
from vae_scale.models.base import check_single_latent
from vae_scale.objectives.base import Loss, Objective, Trained
from vae_scale.objectives.encoder_aug import encoder_augmentation_terms
from vae_scale.schema import FieldError


class ElboObjective(Objective):
    name = "elbo"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        for term in ("equivariance", "alignment"):
            if getattr(cfg.loss, term).weight:
                raise FieldError(
                    f"loss.{term}.weight",
                    "a term of the KL autoencoder; use loss.objective 'autoencoder'",
                )

    def __init__(self, cfg: Any, image_shape: tuple[int, int, int], accelerator: Any):
        super().__init__(cfg, image_shape, accelerator)
        loss = cfg.loss
        if loss.encoder_aug.weight:
            check_single_latent(self.vae, "loss.encoder_aug.weight", "encoder augmentation")
        if loss.z_samples > 1:
            check_single_latent(self.vae, "loss.z_samples", "several posterior draws per image")

    def loss(self, nets: Mapping[str, Trained], x: Tensor, step: int) -> Loss:
        """The batch's neg. ELBO, averaged over loss.z_samples draws per image (its terms then
        have one row per draw, draw-major), and with loss.encoder_aug.weight > 0 the
        encoder-only term on deformed copies of the batch (`encoder_aug_neg_elbo`)."""
        cfg, vae = self.cfg.loss, nets["vae"]
        beta = kl_weight(step, cfg.beta, cfg.kl_warmup_steps, cfg.beta_start)
        draws = cfg.z_samples
        out = vae.model(x, samples=draws)
        elbo = neg_elbo(
            vae.unwrapped.likelihood,
            out.x_params,
            x if draws == 1 else repeat(x, "b ... -> (k b) ...", k=draws),
            out.mu,
            out.logvar,
            beta,
            cfg.free_bits,
            out.kl_groups,
        )
        terms, aug_cfg = dict(elbo.named), cfg.encoder_aug
        if not aug_cfg.weight:
            return Loss(elbo.loss, terms, {"kl_weight": beta})
        # outside DDP's and compile's forward: the extra pass reaches the weights by autograd
        with self.accelerator.autocast():
            aug = encoder_augmentation_terms(
                vae.unwrapped, x, aug_cfg, beta, cfg.free_bits, copies=aug_cfg.copies
            )
        terms["encoder_aug_neg_elbo"] = aug.neg_elbo.float()
        return Loss(elbo.loss + aug_cfg.weight * aug.loss, terms, {"kl_weight": beta})
