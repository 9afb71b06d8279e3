"""Evaluation of the diffusion probe (objectives/flow_matching.py), each epoch: its loss on val
and test with draws fixed by the run's seed and each sample's key (epochs compare); at the last
epoch gFID: N latents sampled from noise by K Euler steps of the learned velocity, decoded by
the frozen autoencoder the latents came from, against N real test images of its dataset (the
first of the split; pytorch-fid's Inception, as rFID), features summed in float64 over
processes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vae_scale.analysis.evaluator import Evaluator
from vae_scale.analysis.runs import config_of_record, load_model
from vae_scale.data.streaming.inputs import prepare_batch
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import ConfigError
from vae_scale.perception.fid import (
    SUMS,
    InceptionFeatures,
    Unavailable,
    feature_sums,
    fid_from_sums,
)
from vae_scale.utils.seeding import derive_seed


@torch.no_grad()
def euler_sample(model: Any, noise: Tensor, steps: int) -> Tensor:
    """Integrate dx/dt = model(x, t) from t = 0 (noise) to t = 1 in `steps` equal steps."""
    x = noise
    for k in range(steps):
        t = torch.full((len(x),), k / steps, device=x.device)
        x = x + model(x, t).float() / steps
    return x


def _share(n: int, rank: int, world: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


class ProbeEvaluation(Evaluator):
    """The probe's val/test metrics (`objective.evaluator` names this class). Opening it loads
    the frozen decoder (refused when it is not the autoencoder the latents came from) and the
    Inception network, before the run starts: a missing one ends the start with one line."""

    def __init__(self, cfg: Any, accelerator: Any, objective: Any):
        super().__init__(cfg, accelerator, objective)
        self.decoder: nn.Module | None = None
        self.inception: nn.Module | None = None
        self.record: dict[str, Any] = {}  # the autoencoder's run record
        if cfg.loss.probe.gfid_samples:
            self.decoder = self._open_decoder()
            self.inception = self._open_inception()

    def _open_decoder(self) -> nn.Module:
        from vae_scale.data.sourcing.latents import weights_fingerprint

        cfg, made_by = self.cfg, self.objective.latents["autoencoder"]
        path = cfg.loss.probe.autoencoder or made_by["path"]
        vae, self.record = load_model(path, device=self.accelerator.device)
        fingerprint = weights_fingerprint(vae)
        if fingerprint != made_by["fingerprint"]:
            raise ConfigError(
                f"{cfg.data.location} holds latents of the autoencoder {made_by['path']} "
                f"(weights {made_by['fingerprint'][:12]}), but loss.probe.autoencoder is {path} "
                f"(weights {fingerprint[:12]}): its decoder would not decode them; name the "
                f"autoencoder they were encoded with, or encode with this one"
            )
        return vae.requires_grad_(False)

    def _open_inception(self) -> nn.Module:
        cfg = self.cfg
        try:
            net = InceptionFeatures.pretrained(cfg.run.weights_dir, download=cfg.eval.rfid == "on")
        except Unavailable as why:
            raise ConfigError(f"loss.probe.gfid_samples: gFID needs {why}") from None
        return net.to(self.accelerator.device)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, splits: Mapping[str, ShardSplit], epoch: int, last: bool
    ) -> dict[str, Any]:
        """val/test fm_loss with fixed draws; at the last epoch test/gfid."""
        acc, objective = self.accelerator, self.objective
        model.eval()
        out: dict[str, Any] = {}
        for name in ("val", "test"):
            if name not in splits:
                continue
            total = torch.zeros(2, dtype=torch.float64, device=acc.device)
            for batch in splits[name].eval_batches():
                x = prepare_batch(batch["image"], acc.device)
                draws = objective.fixed_draws(x, batch["key"])
                losses = objective.flow_loss(model, x, draws).double()
                total += torch.stack([losses.sum(), losses.new_tensor(float(len(x)))])
            total = acc.reduce(total, "sum")
            out[f"{name}/fm_loss"] = (total[0] / total[1].clamp_min(1)).item()
        if last and self.decoder is not None:
            out["test/gfid"] = self.gfid(model)
            out["test/gfid_samples"] = self.cfg.loss.probe.gfid_samples
        return out

    @torch.no_grad()
    def gfid(self, model: nn.Module) -> float:
        cfg, probe, objective = self.cfg, self.cfg.loss.probe, self.objective
        acc = self.accelerator
        device, rank, world = acc.device, acc.process_index, acc.num_processes
        model.eval()
        fake = torch.zeros(SUMS, dtype=torch.float64, device=device)
        mine = list(_share(probe.gfid_samples, rank, world))
        for start in range(0, len(mine), probe.sample_batch):
            ids = mine[start : start + probe.sample_batch]
            noise = torch.stack([
                torch.randn(objective.image_shape, generator=torch.Generator().manual_seed(
                    derive_seed(cfg.run.seed, "gfid", i)))
                for i in ids
            ]).to(device)  # fmt: skip
            z = euler_sample(model, noise, probe.sample_steps)
            images = self.decoder.likelihood.mean(
                self.decoder.decode(z / objective.scale + objective.shift)
            )
            fake += feature_sums(self.inception(images.float().clamp(0, 1)))
        # the real images read as the autoencoder's run read them
        data = config_of_record(self.record).data.model_copy(update={"batch_size": 100})
        location = probe.reference or objective.latents["source"]["location"]
        reference = ShardSplit(location, "test", data, world_size=world, rank=rank, labels=False)
        real = torch.zeros_like(fake)
        part = _share(min(probe.gfid_samples, reference.num_samples), rank, world)
        for batch in reference.range_batches(part.start, part.stop):
            real += feature_sums(self.inception(prepare_batch(batch["image"], device)))
        return fid_from_sums(acc.reduce(real, "sum"), acc.reduce(fake, "sum"))
