"""A finished (or running) run folder: its resolved config, its final metrics and its trained
model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from vae_scale.config import SECTIONS, Config, config_from_dict
from vae_scale.errors import ConfigError
from vae_scale.losses import build_likelihood
from vae_scale.models import VAE, build_model
from vae_scale.run_files import checkpoints as checkpoint
from vae_scale.run_files.checkpoints import EMA_FILE
from vae_scale.run_files.logs import read_rows, read_run_record


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: Config
    model: VAE
    checkpoint: Path
    image_shape: tuple[int, int, int]
    opt_step: int
    weights_file: Path  # the safetensors file the weights came from (EMA or raw)
    record: dict  # the run's config.json: config sections and the facts of the run


def load_run_config(run_dir: Path, name: str = "config.json") -> tuple[Config, dict]:
    """The config a run was trained with (from its config.json, or an export's record file
    `name`), and that whole file."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run_dir} is not a vae_scale run folder")
    raw = read_run_record(run_dir, name)
    return config_of_record(raw), raw


def config_of_record(raw: dict[str, Any]) -> Config:
    """The config sections of a run record (config.json, an export's record)."""
    return config_from_dict({name: raw[name] for name in (*SECTIONS, "model") if name in raw})


def final_metrics(run_dir: Path, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a run ended with: the last epoch's val/test/best entries and its epoch count, then
    the scalars of every `vae-scale eval` result (eval_<split>.json; later names win).
    `rows`: the run's metrics.jsonl rows when the caller has read them already."""
    rows = read_rows(run_dir) if rows is None else rows  # none yet: stopped in epoch 1
    final: dict[str, Any] = {}
    if rows:
        final = {k: v for k, v in rows[-1].items() if k.startswith(("val/", "test/", "best/"))}
        final["epochs"] = rows[-1]["epoch"]
    for path in sorted(Path(run_dir).glob("eval_*.json")):
        evaluation = json.loads(path.read_text())
        final.update({k: v for k, v in evaluation.items() if not isinstance(v, (list, dict))})
    return final


# `vae-scale export`'s folder: the model's config (diffusers' for autoencoder_kl, then the run
# record in RECORD_FILE) and its weights
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "vae_scale.json"


def load_model(
    path: str | Path, device: torch.device | str = "cpu", weights: Literal["ema", "raw"] = "ema"
) -> tuple[VAE, dict[str, Any]]:
    """The trained VAE (eval mode) and run record of a run folder (its latest complete
    checkpoint; `weights`: the EMA when the run kept one, or the raw weights) or of an
    exported folder."""
    folder = Path(path)
    if (folder / "checkpoints").is_dir():
        run = load_run(folder, device=device, weights=weights)
        return run.model, run.record
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(
            f"{path}: not a vae_scale model: expected an exported folder ({CONFIG_FILE} + "
            f"{WEIGHTS_FILE}, from `vae-scale export`), a run folder (checkpoints/) or a Hub "
            f"repository id"
        )
    record_file = RECORD_FILE if (folder / RECORD_FILE).is_file() else CONFIG_FILE
    cfg, record = load_run_config(folder, record_file)
    vae = build_recorded_model(cfg, record)
    vae.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return vae.to(device).eval(), record


def build_recorded_model(cfg: Config, record: dict) -> VAE:
    """The (untrained) model a config.json describes: its family, image shape, likelihood."""
    from vae_scale.models import FAMILIES

    if FAMILIES[cfg.model.name].kind != "vae":
        raise ConfigError(
            f"{cfg.run_dir}: a {cfg.loss.objective} run (model.name {cfg.model.name}), not a "
            f"VAE; its metrics are in its metrics.jsonl and W&B (this command takes VAE runs)"
        )
    image_shape = tuple(record["dataset_index"]["image_shape"])
    likelihood = build_likelihood(cfg.loss.likelihood, image_shape)
    return build_model(cfg.model, image_shape, likelihood)


def load_run(
    run_dir: str | Path,
    ckpt: str | Path | None = None,
    device: torch.device | str = "cpu",
    weights: Literal["ema", "raw"] = "ema",
) -> TrainedRun:
    """Rebuild the model of `run_dir` and load its latest complete checkpoint (or `ckpt`).

    Weights come from `ema.safetensors` when the run kept an EMA of its weights (what its
    evaluation and pictures used) and `weights` is 'ema', else from `model.safetensors`:
    loading never unpickles anything.
    """
    run_dir = Path(run_dir)
    cfg, raw = load_run_config(run_dir)
    model = build_recorded_model(cfg, raw)
    # A trainer may prune the newest checkpoint of a moment ago while we read it: choose again.
    for attempt in range(5):
        ckpt_path = (
            Path(ckpt)
            if ckpt
            else checkpoint.latest_checkpoint(run_dir / "checkpoints", verify_hashes=True)
        )
        if ckpt_path is None or not checkpoint.is_complete(ckpt_path):
            raise ConfigError(f"{run_dir}: no complete checkpoint to load")
        weights_file = ckpt_path / EMA_FILE
        if weights == "raw" or not weights_file.is_file():
            weights_file = ckpt_path / "model.safetensors"
        try:
            model.load_state_dict(load_file(weights_file))
            step = checkpoint.read_train_state(ckpt_path)["opt_step"]
            break
        except (FileNotFoundError, NotADirectoryError):
            if ckpt or attempt == 4:
                raise ConfigError(f"{ckpt_path} vanished while it was read") from None
    model.to(device).eval()
    return TrainedRun(run_dir, cfg, model, ckpt_path, model.image_shape, step, weights_file, raw)
