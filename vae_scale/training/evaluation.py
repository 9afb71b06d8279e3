"""What happens at the end of an epoch, and when: its metrics row (the epoch's training sums
and, every eval.every_epochs and at the last epoch, the evaluator's val/test metrics), its
pictures when the evaluator makes them, and the latent statistics once the last epoch is
trained; a resumed run makes what a kill after a metrics row left unmade."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from vae_scale.analysis.evaluate import summarize
from vae_scale.analysis.evaluator import Evaluator
from vae_scale.analysis.vae_evaluation import VAEEvaluation
from vae_scale.config import Config
from vae_scale.objectives import Objective
from vae_scale.run_files.logs import METRICS_FILE, append_row, read_rows
from vae_scale.training import tracking
from vae_scale.training.networks import TrainedNetwork
from vae_scale.training.state import TrainState


class EpochEvaluation:
    """The end of every epoch of a run (`end_of_epoch`); it decides its own cadence, the
    objective's evaluator (analysis/evaluator.py) what is measured."""

    def __init__(
        self, cfg: Config, accelerator: Accelerator, splits: dict[str, Any], objective: Objective
    ):
        self.cfg, self.accelerator, self.splits = cfg, accelerator, splits
        self.objective = objective
        self.own: Evaluator = Evaluator(cfg, accelerator, objective)

    def open_networks(self) -> None:
        """The evaluator and the frozen networks it opens (before a checkpoint restores the
        random generators: building networks draws initial weights from them, which would
        shift a resumed run's noise)."""
        cfg, acc = self.cfg, self.accelerator
        evaluator: type[Evaluator] = VAEEvaluation
        if self.objective.evaluator:
            module, name = self.objective.evaluator.split(":")
            evaluator = getattr(importlib.import_module(module), name)
        self.own = evaluator(cfg, acc, self.objective)
        self.own.open(self.splits)

    def evaluates(self, epoch: int) -> bool:
        return epoch % self.cfg.eval.every_epochs == 0 or epoch == self.cfg.train.epochs

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
            last = epoch == cfg.train.epochs
            metrics.update(self.own.evaluate(eval_model, self.splits, epoch, last))
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
            if self.own.pictures_due(epoch):
                test = self.splits.get("test")
                self.own.make_pictures(eval_model, epoch, state.opt_step, test, metrics)
        acc.log(metrics, step=state.opt_step)
        return metrics

    def missing(self, state: TrainState, vae: TrainedNetwork) -> list[str]:
        """What the epoch the latest (epoch-end) checkpoint ended lacks of its end, when a
        kill came after its metrics row: its pictures, and after the last epoch the latent
        statistics. They are made from the checkpoint's weights, the epoch's own."""
        epoch = state.epoch - 1
        if state.batch_in_epoch or state.unevaluated or epoch < 1:
            return []
        last, has_test = epoch == self.cfg.train.epochs, "test" in self.splits
        return self.own.lacking(vae.for_eval, epoch, last, has_test)

    def catch_up(self, state: TrainState, vae: TrainedNetwork, lacking: list[str]) -> None:
        """Make what `missing` found (a collective: every rank calls it)."""
        epoch, acc = state.epoch - 1, self.accelerator
        what = " and ".join(lacking)
        acc.print(f"epoch {epoch} lacks its {what} (stopped before them): making them now")
        if "pictures" in lacking and acc.is_main_process:
            self.own.make_pictures(vae.for_eval, epoch, state.opt_step, self.splits.get("test"))
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

    def measure_latents(self, state: TrainState, vae: TrainedNetwork) -> None:
        """The finished run's latent statistics (its evaluator's; VAEs only)."""
        weights = "ema" if vae.ema is not None else "raw"
        self.own.measure_latents(vae.for_eval, self.splits["train"], state.opt_step, weights)


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
