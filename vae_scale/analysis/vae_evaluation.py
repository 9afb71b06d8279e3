"""The evaluation of VAEs and autoencoders (the default `Objective.evaluator`): val/test
metrics in float32 with the objective's own terms (rFID at the last epoch only), the latents'
diffusability at the last epoch, pictures at eval.picture_epochs and the last epoch, and the
latent statistics for diffusion once the last epoch is trained."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vae_scale.analysis.diffusability import DiffusabilityOptions, diffusability
from vae_scale.analysis.evaluate import EvalOptions, evaluate_split, first_images
from vae_scale.analysis.evaluator import Evaluator
from vae_scale.analysis.latents import LATENT_STATS_FILE, latent_statistics, write_latent_stats
from vae_scale.analysis.pictures import epoch_pictures, picture_files
from vae_scale.perception.networks import PerceptionNets, perception_networks


class VAEEvaluation(Evaluator):
    """Opening it loads the perception networks (LPIPS shared with the loss's)."""

    def __init__(self, cfg: Any, accelerator: Any, objective: Any):
        super().__init__(cfg, accelerator, objective)
        self.nets: PerceptionNets = perception_networks(
            cfg.eval.lpips,
            cfg.eval.rfid,
            objective.image_shape,
            cfg.run.weights_dir,
            accelerator.device,
            objective.frozen().get("lpips"),
        )
        for metric, why in self.nets.unavailable.items():
            accelerator.print(f"note: {metric} is not evaluated: {why}")
        self.picture_inputs: torch.Tensor | None = None

    def open(self, splits: Mapping[str, Any]) -> None:
        if self.accelerator.is_main_process and "test" in splits:
            self.picture_inputs = first_images(splits["test"], self.cfg.eval.recon_rows)

    def evaluate(
        self, model: nn.Module, splits: Mapping[str, Any], epoch: int, last: bool
    ) -> dict[str, Any]:
        """val and test metrics of `model` (rFID, Inception at 299 px on every image twice, at
        the last epoch only; posterior refinement, ~100 evaluations, on test at picture
        epochs only)."""
        cfg = self.cfg
        nets = self.nets if last else dataclasses.replace(self.nets, inception=None)
        metrics: dict[str, Any] = {}
        for name in ("val", "test"):
            if name in splits:
                refine = cfg.eval.refine_steps if name == "test" and self.pictures_due(epoch) else 0
                options = EvalOptions(
                    cfg.run.seed, cfg.data.binarize, refine_steps=refine, nets=nets,
                    objective=self.objective,
                )  # fmt: skip
                metrics.update(evaluate_split(self.accelerator, model, splits[name], options))
        split = splits.get("test") or splits.get("val")
        if last and split is not None and DiffusabilityOptions.applies(cfg, model):
            options = DiffusabilityOptions.from_config(cfg)
            metrics.update(diffusability(self.accelerator, model, split, nets.inception, options))
        return metrics

    def pictures_due(self, epoch: int) -> bool:
        return epoch in self.cfg.eval.picture_epochs or epoch == self.cfg.train.epochs

    def make_pictures(
        self, model: nn.Module, epoch: int, step: int, test: Any, metrics: dict | None = None
    ) -> None:
        if metrics is not None and step >= self.cfg.loss.kl_warmup_steps:  # judged on the ELBO
            warn_if_collapsed(metrics, model)
        epoch_pictures(self.accelerator, model, self.picture_inputs, epoch, self.cfg, step, test)

    def lacking(self, model: nn.Module, epoch: int, last: bool, has_test: bool) -> list[str]:
        cfg, lacking = self.cfg, []
        if self.pictures_due(epoch):
            files = picture_files(cfg.run_dir, epoch, model.latent_shape, has_test)
            if not all(f.is_file() for f in files):
                lacking.append("pictures")
        if last and self.measures_latents(model):
            if not (cfg.run_dir / LATENT_STATS_FILE).is_file():
                lacking.append("latent statistics")
        return lacking

    def measures_latents(self, model: nn.Module) -> bool:
        """Whether the network is an autoencoder whose latents diffusion will model."""
        return bool(self.cfg.eval.latent_stats_samples) and len(model.latent_shape) == 3

    def measure_latents(self, model: nn.Module, train: Any, step: int, weights: str) -> None:
        """The finished run's latent statistics for diffusion (analysis/latents.py)."""
        cfg, acc = self.cfg, self.accelerator
        if not self.measures_latents(model):
            return
        stats = latent_statistics(acc, model, train, cfg.run.seed, cfg.eval.latent_stats_samples)
        stats["checkpoint_step"] = step
        stats["weights"] = weights  # what they were measured on: "ema" or "raw"
        if acc.is_main_process:
            write_latent_stats(cfg.run_dir, stats)
            acc.print(
                f"latents: scaling_factor {stats['scaling_factor']:.5f}, shift_factor "
                f"{stats['shift_factor']:.5f} over {stats['samples']} training images "
                f"({LATENT_STATS_FILE})"
            )
        keys = ("scaling_factor", "shift_factor")
        acc.log({f"latents/{k}": stats[k] for k in keys}, step=step)


def warn_if_collapsed(metrics: dict[str, Any], model: torch.nn.Module) -> None:
    """Posterior collapse is silent in the loss: say so when under 10 % of the latent units
    carry information about the input."""
    dims = int(torch.tensor(model.latent_shape).prod())
    for split in ("test", "val"):
        active = metrics.get(f"{split}/active_units")
        if active is not None:
            break
    else:
        return
    if active >= 0.1 * dims:
        return
    ratio = metrics.get(f"{split}/recon_mse_ratio", float("nan"))
    print(
        f"warning: {active} of {dims} latent units are active on {split} (reconstruction "
        f"MSE {ratio:.2f} x the mean image's): the posterior is collapsing and the "
        f"reconstructions barely follow their inputs. Usual remedies: a likelihood that fits "
        f"the pixels (loss.likelihood=logistic or gaussian), a KL warm-up "
        f"(loss.kl_warmup_steps), free bits (loss.free_bits), a smaller KL weight "
        f"(loss.beta < 1, no longer an ELBO), or a lower train.lr"
    )
