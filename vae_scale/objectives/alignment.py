"""Alignment of the latents to a frozen vision foundation model (`loss.alignment`): VA-VAE's
"VF loss" (Yao et al. 2025, arXiv 2501.01423; reference code hustvl/LightningDiT).

A trained 1x1 projection P maps each latent position (the posterior draw z) to the teacher's
feature dimension; the teacher's patch features f lie on the latent grid (teachers.py). Per
image, with cosines of unit vectors:

    cos term  = mean over positions of relu(1 - m1 - cos(P z_i, f_i))              (margin m1)
    dist term = mean over position pairs of relu(|cos(P z_i, P z_j) - cos(f_i, f_j)| - m2)
    VF loss   = cos_weight x cos term + distmat_weight x dist term

added at `weight` x (the schedule's factor) x the adaptive weight ||grad rec|| / ||grad VF|| at
the encoder's last layer, over the global batch of each optimizer step (adaptive.py, as the
GAN's). The projection is the objective's own trained network (checkpointed with the run,
from `start_step`); its gradient is that of the same weighted VF loss, averaged over processes
at the optimizer step. The teacher is frozen and not checkpointed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from vae_scale.objectives.adaptive import AdaptiveTerm
from vae_scale.objectives.base import NetworkSpec
from vae_scale.perception.teachers import TEACHERS, load_teacher
from vae_scale.schema import NonNegative, NonNegativeFloat, Section

Fraction = Annotated[float, Field(ge=0, le=1)]


class AlignmentConfig(Section):
    """loss.alignment (this file): `weight` 0 = off (VA-VAE's vf_weight, 0.1)."""

    weight: NonNegativeFloat = 0.0
    teacher: Literal[tuple(TEACHERS)] = "dinov2_vitl14"  # type: ignore[valid-type]
    teacher_path: str | None = None  # a weights file (or timm folder); else looked up
    margin_cos: Fraction = 0.5  # m1
    margin_distmat: Fraction = 0.25  # m2
    cos_weight: NonNegativeFloat = 1.0
    distmat_weight: NonNegativeFloat = 1.0
    adaptive_weight: bool = True
    max_adaptive_weight: Annotated[float, Field(gt=0)] = 1e4
    start_step: NonNegative = 0
    # strong early, lower later: the weight falls linearly from `weight` to
    # final_fraction x weight over schedule_steps optimizer steps after the start
    schedule: Literal["constant", "linear"] = "constant"
    schedule_steps: NonNegative = 0
    final_fraction: Fraction = 0.1

    def factor(self, step: int) -> float:
        """The schedule's factor at optimizer step `step` (from the start on)."""
        if self.schedule == "constant" or not self.schedule_steps:
            return 1.0
        progress = min(1.0, (step - self.start_step) / self.schedule_steps)
        return 1.0 - (1.0 - self.final_fraction) * progress


def vf_loss(projected: Tensor, features: Tensor, cfg: AlignmentConfig) -> tuple[Tensor, Tensor]:
    """Per image (B,): the margin cosine term and the margin distance-matrix term between
    projected latents and teacher features, both (B, D, h, w)."""
    z = F.normalize(projected.float().flatten(2), dim=1)  # (B, D, n), unit columns
    f = F.normalize(features.float().flatten(2), dim=1)
    cos = (z * f).sum(1)  # (B, n)
    cos_term = F.relu(1 - cfg.margin_cos - cos).mean(1)
    gram_z, gram_f = z.transpose(1, 2) @ z, f.transpose(1, 2) @ f  # (B, n, n)
    dist_term = F.relu((gram_z - gram_f).abs() - cfg.margin_distmat).flatten(1).mean(1)
    return cos_term, dist_term


class AlignmentTerm:
    """The alignment part of the autoencoder objective: the projection (a trained network),
    the frozen teacher and the VF loss's weighting."""

    def __init__(self, cfg: Any, latent_channels: int, accelerator: Any):
        a = cfg.loss.alignment
        self.cfg, self.accelerator = a, accelerator
        self.teacher = load_teacher(a.teacher, a.teacher_path, cfg.run.weights_dir).to(
            accelerator.device
        )
        self.projection = nn.Conv2d(latent_channels, self.teacher.dim, 1, bias=False)
        self.adaptive = AdaptiveTerm(
            accelerator, lambda vae: vae.last_encoder_layer(), a.adaptive_weight,
            a.max_adaptive_weight,
        )  # fmt: skip
        self.pending: list[Tensor] | None = None  # the step's projection gradients so far

    def spec(self, train: Any) -> NetworkSpec:
        """The projection: train's optimizer rules, no EMA, from the term's start."""
        return NetworkSpec(
            self.projection, train.model_copy(update={"ema_decay": 0.0}), 0.0, self.cfg.start_step
        )

    def terms(
        self, nets: Mapping[str, Any], x: Tensor, z: Tensor, rec_loss: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """This batch's share of the weighted VF loss for the autoencoder, and its terms;
        the projection's gradient is kept for `before_update`."""
        a, batch = self.cfg, len(x)
        if step < a.start_step:
            zero = torch.zeros(batch, device=x.device)
            return torch.zeros((), device=x.device), {"vf_cos": zero, "vf_distmat": zero}
        features = self.teacher(x, tuple(z.shape[-2:]))
        projection = nets["alignment_projection"].unwrapped
        weights = dict(projection.named_parameters())
        with self.accelerator.autocast():  # the autoencoder's view: the projection detached
            seen = functional_call(projection, {k: v.detach() for k, v in weights.items()}, (z,))
        cos_term, dist_term = vf_loss(seen, features, a)
        vf = (a.cos_weight * cos_term + a.distmat_weight * dist_term).mean()
        weight = a.weight * a.factor(step)
        weighted = self.adaptive.weighted(nets["vae"].unwrapped, rec_loss, vf, weight)
        # the projection's view: the latents detached; its gradient waits for the step's weight
        with self.accelerator.autocast():
            own = projection(z.detach())
        cos_p, dist_p = vf_loss(own, features, a)
        vf_p = (a.cos_weight * cos_p + a.distmat_weight * dist_p).mean()
        accum = self.accelerator.gradient_accumulation_steps
        grads = torch.autograd.grad(vf_p / accum, list(weights.values()))
        if self.pending is None:
            self.pending = [torch.zeros_like(g) for g in grads]
        for total, g in zip(self.pending, grads):
            total.add_(g)
        terms = {"vf_cos": cos_term.detach(), "vf_distmat": dist_term.detach()}
        return weighted, terms

    def before_update(self, nets: Mapping[str, Any], step: int) -> dict[str, Any]:
        """At the optimizer step: the autoencoder's VF gradient is weighted (adaptive.py) and
        the projection gets the same weighted VF loss's gradient, averaged over processes."""
        factor = self.adaptive.before_update(nets["vae"].unwrapped)
        pending, self.pending = self.pending, None
        if factor is None or pending is None:
            return {"alignment_weight": 0.0}
        scale = self.cfg.weight * self.cfg.factor(step) * factor
        flat = self.adaptive.mean(torch.cat([g.flatten() for g in pending]))
        params = list(nets["alignment_projection"].unwrapped.parameters())
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = (scale * g).view_as(p)
        return {"alignment_weight": float(factor)}
