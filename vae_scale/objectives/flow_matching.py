"""The diffusion probe (`loss.objective: flow_matching`, `vae-scale probe`): how well does a
diffusion model learn an autoencoder's latents? A small DiT (models/dit.py) trained on latent
shards (`vae-scale encode`) by flow matching on the rectified-flow path (SiT; Lipman et al.
2023, Liu et al. 2023): x_t = (1 - t) * noise + t * z, the network predicting the velocity
z - noise, z = (latent - shift_factor) * scaling_factor as index.json records.

Reported: `train/fm_loss`; val/test's fm_loss and gFID come from its evaluator
(analysis/probe.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from vae_scale.models import build_model
from vae_scale.objectives.base import Loss, NetworkSpec, Objective, Trained
from vae_scale.schema import FieldError, NonNegative, Positive, Section
from vae_scale.utils.seeding import derive_seed


class ProbeConfig(Section):
    # the autoencoder that decodes the samples: a run folder or an export (the one the latent
    # shards were encoded with; '' = the one their index.json names)
    autoencoder: str = ""
    gfid_samples: NonNegative = 1000  # N of gFID at the last epoch (0: none)
    sample_steps: Positive = 50  # K Euler steps of the sampler
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"  # SiT: uniform; SD3: logit-normal
    reference: str = ""  # real images of gFID ('' = the latents' source dataset), test split
    sample_batch: Positive = 100  # samples decoded at once


class FlowMatchingObjective(Objective):
    name = "flow_matching"
    model_kind: ClassVar[str] = "denoiser"
    headline: ClassVar[str] = "fm_loss"
    evaluator: ClassVar[str] = "vae_scale.analysis.probe:ProbeEvaluation"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.train.trainable != "all":
            raise FieldError(
                "train.trainable", "expected 'all' with loss.objective 'flow_matching'"
            )

    def __init__(self, cfg: Any, image_shape: tuple[int, int, int], accelerator: Any):
        from vae_scale.data.sourcing.latents import latent_identity
        from vae_scale.data.sourcing.shards import load_index

        index = load_index(cfg.data.location)
        self.latents = latent_identity(index)
        self.channels = self.latents["channels"]
        self.moments = self.latents["content"] == "moments"
        self.scale = float(self.latents["scaling_factor"])
        self.shift = float(self.latents["shift_factor"])
        latent_shape = (self.channels, *image_shape[1:])
        super().__init__(cfg, latent_shape, accelerator)

    def build_vae(self) -> nn.Module:
        """The network it trains is the DiT of `model` (not a VAE), for latents of
        `image_shape`."""
        return build_model(self.cfg.model, self.image_shape, None)

    def networks(self) -> dict[str, NetworkSpec]:
        train = self.cfg.train
        return {"probe": NetworkSpec(self.vae, train, train.ema_decay)}

    # ------------------------------------------------------------------ training

    def latent(self, x: Tensor, noise: Tensor) -> Tensor:
        """The scaled latent z of a stored sample (moments: mean + std * noise)."""
        if self.moments:
            mean, std = x.chunk(2, dim=1)
            x = mean + std * noise
        return (x - self.shift) * self.scale

    def draw(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(posterior noise, path noise, times) of a batch, from the process's generator."""
        shape = (x.shape[0], self.channels, *x.shape[2:])
        eps, noise = torch.randn(shape, device=x.device), torch.randn(shape, device=x.device)
        if self.cfg.loss.probe.time_sampling == "logit_normal":
            t = torch.sigmoid(torch.randn(x.shape[0], device=x.device))
        else:
            t = torch.rand(x.shape[0], device=x.device)
        return eps, noise, t

    def flow_loss(
        self, model: nn.Module, x: Tensor, draws: tuple[Tensor, Tensor, Tensor]
    ) -> Tensor:
        """Per-sample mean squared error of the predicted velocity (B,)."""
        eps, noise, t = draws
        z = self.latent(x, eps)
        tt = t.view(-1, 1, 1, 1)
        predicted = model((1 - tt) * noise + tt * z, t)
        return (predicted.float() - (z - noise)).pow(2).flatten(1).mean(1)

    def loss(self, nets: Mapping[str, Trained], x: Tensor, step: int) -> Loss:
        per_sample = self.flow_loss(nets["probe"].model, x, self.draw(x))
        return Loss(per_sample.mean(), {"fm_loss": per_sample})

    # ------------------------------------------------------------------ evaluation

    def fixed_draws(self, x: Tensor, keys: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Draws that depend on the run's seed and each sample's key only."""
        shape = (self.channels, *x.shape[2:])
        rows = []
        for key in keys:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "probe-eval", key))
            rows.append((torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                         torch.rand((), generator=g)))  # fmt: skip
        eps, noise, t = (torch.stack(r).to(x.device) for r in zip(*rows, strict=True))
        return eps, noise, t
