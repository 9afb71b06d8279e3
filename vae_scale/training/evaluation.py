"""What happens at the end of an epoch, and when: its metrics row (the epoch's training sums
and, every eval.every_epochs and at the last epoch, val/test evaluation in float32 with the
objective's own terms), pictures at eval.picture_epochs and the last epoch, rFID at the last
epoch, and the latent statistics once the last epoch is trained."""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from vae_scale.analysis.diffusability import DiffusabilityOptions, diffusability
from vae_scale.analysis.evaluate import EvalOptions, evaluate_split, first_images, summarize
from vae_scale.analysis.latents import LATENT_STATS_FILE, latent_statistics, write_latent_stats
from vae_scale.analysis.pictures import epoch_pictures, picture_files
from vae_scale.config import Config
from vae_scale.objectives import Objective
from vae_scale.perception.networks import PerceptionNets, perception_networks
from vae_scale.run_files.logs import METRICS_FILE, append_row, read_rows
from vae_scale.training import tracking
from vae_scale.training.networks import TrainedNetwork
from vae_scale.training.state import TrainState


class EpochEvaluation:
    """The end of every epoch of a run (`end_of_epoch`); it decides its own cadence."""

    def __init__(
        self, cfg: Config, accelerator: Accelerator, splits: dict[str, Any], objective: Objective
    ):
        self.cfg, self.accelerator, self.splits = cfg, accelerator, splits
        self.objective = objective
        self.nets = PerceptionNets()
        self.picture_inputs: torch.Tensor | None = None
        self.own: Any = None  # the objective's own evaluation (Objective.evaluator)

    def open_networks(self) -> None:
        """The perception networks evaluation uses (LPIPS shared with the loss's) and the
        fixed test images of the pictures."""
        cfg, acc = self.cfg, self.accelerator
        if self.objective.evaluator:  # it opens the frozen networks it needs
            module, name = self.objective.evaluator.split(":")
            self.own = getattr(importlib.import_module(module), name)(cfg, acc, self.objective)
            return
        # (before a checkpoint restores the random generators: building the networks draws
        # initial weights from them, which would shift a resumed run's noise)
        self.nets = self._networks()
        for metric, why in self.nets.unavailable.items():
            acc.print(f"note: {metric} is not evaluated: {why}")
        if acc.is_main_process and "test" in self.splits:
            self.picture_inputs = first_images(self.splits["test"], cfg.eval.recon_rows)

    def _networks(self) -> PerceptionNets:
        cfg, acc = self.cfg, self.accelerator
        return perception_networks(
            cfg.eval.lpips,
            cfg.eval.rfid,
            self.splits["train"].image_shape,
            cfg.run.weights_dir,
            acc.device,
            self.objective.frozen().get("lpips"),
        )

    def evaluates(self, epoch: int) -> bool:
        return epoch % self.cfg.eval.every_epochs == 0 or epoch == self.cfg.train.epochs

    def pictures(self, epoch: int) -> bool:
        if self.objective.evaluator:  # of a VAE: reconstructions, samples
            return False
        return epoch in self.cfg.eval.picture_epochs or epoch == self.cfg.train.epochs

    def end_of_epoch(
        self,
        state: TrainState,
        vae: TrainedNetwork,
        epoch: int,
        totals: dict[str, torch.Tensor],
        seconds: float,
    ) -> dict[str, Any]:
        """The epoch's metrics row (train sums, val/test evaluation of `vae`'s evaluated
        weights), logged everywhere, and the pictures at picture epochs."""
        cfg, acc = self.cfg, self.accelerator
        counts = vae.policy.counts
        n = totals["count"].item()
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "global_step": state.opt_step,
            **{f"train/{k}": v.item() / n for k, v in totals.items() if k != "count"},
            "train/num_samples": n,
            "train/samples_seen": state.samples_seen,
            "train/bad_steps": counts.bad_steps,
            "train/skipped_updates": counts.skipped_updates,
            "train/forced_updates": counts.forced_updates,
            "train/skipped_samples": state.skipped_samples,
            **transfer_metrics(state),
            **goodput_metrics(state),
            "time/epoch_s": seconds,
            "throughput/train_img_per_s": n / max(seconds, 1e-9),
        }
        eval_model = vae.for_eval
        if self.evaluates(epoch):
            metrics.update(self.evaluate(eval_model, epoch))
        for name in ("val", "test"):  # the run's transport totals count evaluation's reads too
            state.data_retries += metrics.get(f"{name}/data_retries", 0)
            state.data_refetched_bytes += metrics.get(f"{name}/data_refetched_bytes", 0)
        metrics.update(transfer_metrics(state))
        headline = self.objective.headline
        metrics.update(tracking.best_so_far(state, metrics, headline))
        if acc.is_main_process:
            append_row(cfg.run_dir, METRICS_FILE, metrics)
            acc.print(
                f"epoch {epoch}: train/{headline} {metrics[f'train/{headline}']:.4g}  "
                f"{summarize({k: v for k, v in metrics.items() if 'train' not in k}, headline)}"
                f"  ({seconds:.1f}s)"
            )
            if self.pictures(epoch):
                if state.opt_step >= cfg.loss.kl_warmup_steps:  # judged on the ELBO
                    warn_if_collapsed(metrics, eval_model)
                epoch_pictures(
                    acc,
                    eval_model,
                    self.picture_inputs,
                    epoch,
                    cfg,
                    state.opt_step,
                    self.splits.get("test"),
                )
        acc.log(metrics, step=state.opt_step)
        return metrics

    def evaluate(self, model: torch.nn.Module, epoch: int) -> dict[str, Any]:
        """val and test metrics of `model` (rFID, Inception at 299 px on every image twice, at
        the last epoch only; posterior refinement, ~100 evaluations, on test at picture
        epochs only)."""
        cfg = self.cfg
        if self.own is not None:
            return self.own.evaluate(model, self.splits, epoch, epoch == cfg.train.epochs)
        nets = self.nets
        if epoch != cfg.train.epochs:
            nets = dataclasses.replace(nets, inception=None)
        metrics: dict[str, Any] = {}
        for name in ("val", "test"):
            if name in self.splits:
                refine = cfg.eval.refine_steps if name == "test" and self.pictures(epoch) else 0
                options = EvalOptions(
                    cfg.run.seed,
                    cfg.data.binarize,
                    refine_steps=refine,
                    nets=nets,
                    objective=self.objective,
                )
                metrics.update(evaluate_split(self.accelerator, model, self.splits[name], options))
        if epoch == cfg.train.epochs:
            metrics.update(self.diffusability(model, nets))
        return metrics

    def diffusability(self, model: torch.nn.Module, nets: PerceptionNets) -> dict[str, Any]:
        """The latents' diffusability on the test split (else val): spatial latents only."""
        split = self.splits.get("test") or self.splits.get("val")
        if split is None or not DiffusabilityOptions.applies(self.cfg, model):
            return {}
        options = DiffusabilityOptions.from_config(self.cfg)
        return diffusability(self.accelerator, model, split, nets.inception, options)

    def missing(self, state: TrainState, vae: TrainedNetwork) -> list[str]:
        """What the epoch the latest (epoch-end) checkpoint ended lacks of its end, when a
        kill came after its metrics row: its pictures, and after the last epoch the latent
        statistics. They are made from the checkpoint's weights, the epoch's own."""
        epoch, cfg = state.epoch - 1, self.cfg
        if state.batch_in_epoch or state.unevaluated or epoch < 1:
            return []
        lacking = []
        if self.pictures(epoch):
            has_test = "test" in self.splits
            files = picture_files(cfg.run_dir, epoch, vae.for_eval.latent_shape, has_test)
            if not all(f.is_file() for f in files):
                lacking.append("pictures")
        spatial = self.measures_latents(vae)
        if (
            epoch == cfg.train.epochs
            and spatial
            and not (cfg.run_dir / LATENT_STATS_FILE).is_file()
        ):
            lacking.append("latent statistics")
        return lacking

    def catch_up(self, state: TrainState, vae: TrainedNetwork, lacking: list[str]) -> None:
        """Make what `missing` found (a collective: every rank calls it)."""
        epoch, acc = state.epoch - 1, self.accelerator
        what = " and ".join(lacking)
        acc.print(f"epoch {epoch} lacks its {what} (stopped before them): making them now")
        if "pictures" in lacking and acc.is_main_process:
            epoch_pictures(
                acc, vae.for_eval, self.picture_inputs, epoch, self.cfg, state.opt_step,
                self.splits.get("test"),
            )  # fmt: skip
        if "latent statistics" in lacking:
            self.measure_latents(state, vae)

    def settle(self, run_dir: Path, state: TrainState) -> None:
        """A checkpoint taken before its epoch's evaluation: when `run_dir`'s metrics.jsonl
        holds that evaluation's row (it finished before the process stopped), take what the
        evaluation changed from it (the best value so far, the transport counters) and
        consider it done."""
        epoch = state.unevaluated["epoch"]
        rows = read_rows(run_dir, METRICS_FILE)
        row = next(
            (r for r in rows if r.get("epoch") == epoch and r.get("global_step") == state.opt_step),
            None,
        )
        if row is None:
            return
        tracking.best_so_far(state, row, self.objective.headline)
        state.data_retries = row.get("data/retries", state.data_retries)
        state.data_refetched_bytes = row.get("data/refetched_bytes", state.data_refetched_bytes)
        state.unevaluated = {}

    def measures_latents(self, vae: TrainedNetwork) -> bool:
        """Whether the run's network is an autoencoder whose latents diffusion will model."""
        if self.objective.evaluator or not self.cfg.eval.latent_stats_samples:
            return False
        return len(vae.for_eval.latent_shape) == 3

    def measure_latents(self, state: TrainState, vae: TrainedNetwork) -> None:
        """The finished run's latent statistics for diffusion (analysis/latents.py)."""
        cfg, acc, model = self.cfg, self.accelerator, vae.for_eval
        if not self.measures_latents(vae):
            return
        stats = latent_statistics(
            acc, model, self.splits["train"], cfg.run.seed, cfg.eval.latent_stats_samples
        )
        stats["checkpoint_step"] = state.opt_step
        stats["weights"] = "ema" if vae.ema is not None else "raw"  # what they were measured on
        if acc.is_main_process:
            write_latent_stats(cfg.run_dir, stats)
            acc.print(
                f"latents: scaling_factor {stats['scaling_factor']:.5f}, shift_factor "
                f"{stats['shift_factor']:.5f} over {stats['samples']} training images "
                f"({LATENT_STATS_FILE})"
            )
        keys = ("scaling_factor", "shift_factor")
        acc.log({f"latents/{k}": stats[k] for k in keys}, step=state.opt_step)


def goodput_metrics(state: TrainState) -> dict[str, float]:
    """Productive training seconds, wall seconds since the run first started (restarts and
    time down included), and their ratio: the run's goodput."""
    wall = max(time.time() - state.started_at, 1e-9)
    return {
        "time/productive_s": state.productive_s,
        "time/wall_s": wall,
        "time/goodput": state.productive_s / wall,
    }


def transfer_metrics(state: TrainState) -> dict[str, int]:
    return {"data/retries": state.data_retries, "data/refetched_bytes": state.data_refetched_bytes}


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
