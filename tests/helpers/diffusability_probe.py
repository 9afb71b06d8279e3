"""Diffusability measured by 1 process or by each rank of a real `accelerate launch`
(tests/test_diffusability.py): a seeded tiny autoencoder on the test split of SHARDS; the
main process writes the measures to OUT."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from vae_scale.analysis.diffusability import DiffusabilityOptions, diffusability
from vae_scale.config import DataConfig, config_from_dict
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.losses import build_likelihood
from vae_scale.models import build_model
from vae_scale.perception.networks import perception_networks


def tiny_autoencoder(shape: tuple[int, int, int]) -> torch.nn.Module:
    cfg = config_from_dict(
        {"model": {"name": "autoencoder_kl", "widths": [16, 16, 16], "groups": 8,
                   "layers_per_block": 1, "latent_channels": 4},
         "loss": {"objective": "autoencoder", "likelihood": "gaussian"}}
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg.model, shape, build_likelihood("gaussian", shape)).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--samples", type=int, default=12)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    split = ShardSplit(
        args.shards, "test", DataConfig(batch_size=5),
        world_size=accelerator.num_processes, rank=accelerator.process_index,
    )  # fmt: skip
    model = tiny_autoencoder(split.image_shape)
    inception = None
    if args.weights:
        nets = perception_networks("off", "on", split.image_shape, args.weights, "cpu")
        inception = nets.inception
    out = diffusability(
        accelerator, model, split, inception, DiffusabilityOptions(args.samples, 3, 7)
    )
    if accelerator.is_main_process:
        args.out.write_text(json.dumps({"num_processes": accelerator.num_processes, **out}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
