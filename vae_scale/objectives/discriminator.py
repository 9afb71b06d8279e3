"""The discriminator of a KL autoencoder (loss.discriminator): a PatchGAN network (pix2pix /
taming's NLayerDiscriminator), the GAN losses of both sides (hinge or non-saturating),
taming's adaptive weight and the LeCam regulariser (Tseng et al. 2021).

Two choices differ from taming on purpose:
- GroupNorm (or no norm) instead of BatchNorm: statistics that do not depend on the batch, so
  N processes, gradient accumulation and one process with the whole batch make the same
  update, and eval/train modes behave alike.
- The adaptive weight compares the gradient norms of the *global* batch of an optimizer step:
  the two gradients at the decoder's last layer are averaged over processes and accumulated
  batches first (taming uses each rank's own, per batch; adaptive.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from vae_scale.errors import ConfigError
from vae_scale.objectives.adaptive import AdaptiveTerm
from vae_scale.objectives.base import NetworkSpec
from vae_scale.schema import Betas, NonNegative, NonNegativeFloat, Positive, Section
from vae_scale.utils.compat import full_precision_forward


class DiscriminatorConfig(Section):
    """loss.discriminator: weight 0 = no discriminator at all."""

    weight: NonNegativeFloat = 0.5  # taming's disc_weight
    start_step: NonNegative = 5000  # optimizer step the discriminator starts at (disc_start)
    loss: Literal["hinge", "non_saturating"] = "hinge"
    adaptive_weight: bool = True  # ||grad rec|| / ||grad gan|| at the decoder's last layer
    max_adaptive_weight: Annotated[float, Field(gt=0)] = 1e4
    lecam_weight: NonNegativeFloat = 0.0  # 0 = off; ~0.001 in the LeCam paper
    lecam_decay: Annotated[float, Field(ge=0, lt=1)] = 0.99
    layers: Positive = 3  # strided conv layers (PatchGAN's n_layers)
    channels: Positive = 64  # first layer's width (doubling, at most x8)
    norm: Literal["group", "none"] = "group"
    # the discriminator's own optimizer (AdamW) and schedule, counted from start_step
    lr: Annotated[float, Field(gt=0)] = 1e-4
    betas: Betas = (0.5, 0.9)
    lr_schedule: Literal["constant", "cosine"] = "constant"


class PatchDiscriminator(nn.Module):
    """Logits per overlapping patch, (B, 1, h, w), for images in [-1, 1]."""

    def __init__(self, in_channels: int, cfg: DiscriminatorConfig):
        super().__init__()
        width, norm = cfg.channels, cfg.norm

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, 4, stride, 1, bias=norm == "none")
            groups = [nn.GroupNorm(min(32, c_out), c_out)] if norm == "group" else []
            return [conv, *groups, nn.LeakyReLU(0.2)]

        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, cfg.layers + 1):
            previous, mult = mult, min(2**n, 8)
            layers += block(width * previous, width * mult, 2 if n < cfg.layers else 1)
        layers.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def generator_loss(fake_logits: Tensor, kind: str, per_image: bool = False) -> Tensor:
    """The autoencoder's GAN loss: hinge's -D(G(x)) or -log sigmoid(D(G(x))), a scalar (or
    one value per image)."""
    fake_logits = fake_logits.float()
    if per_image:
        loss = -fake_logits if kind == "hinge" else F.softplus(-fake_logits)
        return loss.flatten(1).mean(1)
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def discriminator_loss(
    real_logits: Tensor, fake_logits: Tensor, kind: str, per_image: bool = False
) -> Tensor:
    """The discriminator's loss, halved as in taming: a scalar (or one value per image)."""
    real, fake = real_logits.float(), fake_logits.float()
    if per_image:
        if kind == "hinge":
            sides = F.relu(1.0 - real).flatten(1).mean(1), F.relu(1.0 + fake).flatten(1).mean(1)
        else:
            sides = F.softplus(-real).flatten(1).mean(1), F.softplus(fake).flatten(1).mean(1)
        return 0.5 * (sides[0] + sides[1])
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


class LeCam:
    """LeCam regulariser: exponential averages of the discriminator's mean logits on real and
    fake images, and the penalty pulling each side's logits towards the other's average.
    The averages move once per optimizer step, by the means over its global batch (every
    batch of the step and every process), so they are the same on every process, and the
    same for N processes, gradient accumulation or one process with the whole batch; they
    are checkpointed."""

    def __init__(self, decay: float, device: torch.device | str):
        self.decay = decay
        self.averages = torch.zeros(2, dtype=torch.float32, device=device)  # real, fake
        self.updates = 0
        self.pending: list[Tensor] = []  # this step's batch means so far

    def penalty(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """The penalty against the averages so far (the batch's means are kept for `step`)."""
        avg_real, avg_fake = self.averages.unbind()
        real, fake = real_logits.float(), fake_logits.float()
        penalty = F.relu(real - avg_fake).pow(2).mean() + F.relu(avg_real - fake).pow(2).mean()
        self.pending.append(torch.stack([real.mean(), fake.mean()]).detach())
        return penalty

    @torch.no_grad()
    def step(self, average: Any = None) -> None:
        """At the optimizer step: move the averages by the step's means (`average`: the mean
        over processes, None on one)."""
        if not self.pending:
            return
        means = self.pending[0] if len(self.pending) == 1 else torch.stack(self.pending).mean(0)
        self.pending = []
        if average is not None:
            means = average(means)
        weight = 1.0 if self.updates == 0 else 1.0 - self.decay
        self.averages.lerp_(means, weight)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"averages": self.averages.tolist(), "updates": self.updates}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        self.averages.copy_(torch.tensor(values["averages"], dtype=torch.float32))
        self.updates = int(values["updates"])


#: the terms the discriminator adds, reported as 0 before it starts (every step reports the
#: same keys, so epoch sums and dashboards line up across the start)
DISCRIMINATOR_TERMS = ("gan", "discriminator_loss", "logits_real", "logits_fake")


class GanTerm:
    """The discriminator's part of an objective: its network (trained from its start_step
    with its own optimizer), the GAN loss of the autoencoder weighted by the adaptive weight
    of each optimizer step's global batch, the discriminator's own loss and LeCam.

    The GAN loss's adaptive weighting, with or without accumulation, is adaptive.py's."""

    def __init__(self, cfg: DiscriminatorConfig, image_shape: tuple[int, ...], accelerator: Any):
        side = min(image_shape[1:])
        if side // 2**cfg.layers < 3:  # then two stride-1 4x4 convs leave no patch
            raise ConfigError(
                f"loss.discriminator.layers: {cfg.layers} halvings leave no patch of a "
                f"{side}-pixel image; use at most {max(1, (side // 3).bit_length() - 1)}"
            )
        self.cfg, self.accelerator = cfg, accelerator
        self.network = PatchDiscriminator(image_shape[0], cfg)
        self.lecam = LeCam(cfg.lecam_decay, accelerator.device)
        self.adaptive = AdaptiveTerm(
            accelerator, lambda vae: vae.last_decoder_layer(), cfg.adaptive_weight,
            cfg.max_adaptive_weight,
        )  # fmt: skip

    def spec(self, train: Any) -> NetworkSpec:
        """What the objective declares: the network, AdamW with loss.discriminator's lr,
        betas and schedule (train's clipping and skip rules), from its start_step."""
        d = self.cfg
        rules = train.model_copy(
            update={
                "lr": d.lr,
                "betas": d.betas,
                "weight_decay": 0.0,
                "lr_schedule": d.lr_schedule,
                "warmup_steps": 0,
                "ema_decay": 0.0,
            }
        )
        return NetworkSpec(self.network, rules, 0.0, d.start_step)

    def terms(
        self, nets: Mapping[str, Any], target: Tensor, recon: Tensor, rec_loss: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """This batch's share of the loss: the weighted GAN loss and the discriminator's loss,
        and its terms. `target`, `recon`: images and reconstructions in [-1, 1]; `rec_loss` the
        reconstruction loss the adaptive weight balances against."""
        d, acc, batch = self.cfg, self.accelerator, target.shape[0]
        frozen = {name: p.detach() for name, p in self.network.named_parameters()}
        with acc.autocast():  # the autoencoder's view: no gradient into the discriminator
            fake_for_vae = functional_call(self.network, frozen, (recon,))
        gan = generator_loss(fake_for_vae, d.loss)
        with acc.autocast():  # the discriminator's view, through its DDP wrapper
            logits = nets["discriminator"].model(torch.cat([target, recon.detach()]))
        real, fake = logits.float().chunk(2)
        disc = discriminator_loss(real, fake, d.loss)
        if d.lecam_weight:
            disc = disc + d.lecam_weight * self.lecam.penalty(real, fake)
        weighted = self.adaptive.weighted(nets["vae"].unwrapped, rec_loss, gan, d.weight)
        terms = {
            "gan": gan.detach().expand(batch),
            "discriminator_loss": disc.detach().expand(batch),
            "logits_real": real.detach().flatten(1).mean(1),
            "logits_fake": fake.detach().flatten(1).mean(1),
        }
        return weighted, disc, terms

    def before_update(self, nets: Mapping[str, Any]) -> dict[str, Any]:
        """At the optimizer step: LeCam's averages move by the step's means, and the GAN
        term's weighting ends (adaptive.py). Returns the adaptive weight (0 before the
        start)."""
        self.lecam.step(self.adaptive.mean if self.accelerator.num_processes > 1 else None)
        weight = self.adaptive.before_update(nets["vae"].unwrapped)
        return {"adaptive_weight": 0.0 if weight is None else weight}

    @torch.no_grad()
    def eval_terms(self, target: Tensor, recon: Tensor) -> dict[str, Tensor]:
        """Per image: the GAN terms of images and reconstructions in [-1, 1], in float32."""
        logits = full_precision_forward(self.network, torch.cat([target, recon]))
        real, fake = logits.float().chunk(2)
        kind = self.cfg.loss
        return {
            "gan": generator_loss(fake, kind, per_image=True),
            "discriminator_loss": discriminator_loss(real, fake, kind, per_image=True),
            "logits_real": real.flatten(1).mean(1),
            "logits_fake": fake.flatten(1).mean(1),
        }
