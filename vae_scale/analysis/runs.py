"""A finished (or running) run folder: its resolved config and its trained model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from vae_scale.config import SECTIONS, Config, config_from_dict
from vae_scale.errors import ConfigError
from vae_scale.losses import build_likelihood
from vae_scale.models import VAE, build_model
from vae_scale.training import checkpoint
from vae_scale.training.ema import EMA_FILE


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


def load_run_config(run_dir: Path) -> tuple[Config, dict]:
    """The config a run was trained with (from its config.json), and that whole file."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run_dir} is not a vae_scale run folder")
    raw = json.loads(path.read_text())
    sections = {name: raw[name] for name in (*SECTIONS, "model") if name in raw}
    return config_from_dict(sections), raw


def build_recorded_model(cfg: Config, record: dict) -> VAE:
    """The (untrained) model a config.json describes: its family, image shape, likelihood."""
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
    ckpt_path = (
        Path(ckpt)
        if ckpt
        else checkpoint.latest_checkpoint(run_dir / "checkpoints", verify_hashes=True)
    )
    if ckpt_path is None or not checkpoint.is_complete(ckpt_path):
        raise ConfigError(f"{run_dir}: no complete checkpoint to load")
    model = build_recorded_model(cfg, raw)
    weights_file = ckpt_path / EMA_FILE
    if weights == "raw" or not weights_file.is_file():
        weights_file = ckpt_path / "model.safetensors"
    model.load_state_dict(load_file(weights_file))
    model.to(device).eval()
    step = checkpoint.read_train_state(ckpt_path)["opt_step"]
    return TrainedRun(run_dir, cfg, model, ckpt_path, model.image_shape, step, weights_file, raw)
