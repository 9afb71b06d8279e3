"""The autoencoder objective's real training step on N processes (or one), for
tests/test_autoencoder.py: a fixed global batch each step, each rank its contiguous slice,
posterior means instead of draws (the one thing that legitimately differs per rank is the
reparameterization noise). Writes rank 0's final weights (autoencoder and discriminator) and
every step's terms as JSON.

    accelerate launch --config_file launch/cpu_2proc.yaml tests/helpers/autoencoder_probe.py \
        --out OUT.json --global-batch 8 --steps 5 [overrides...]
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_scale.config import config_from_dict
from vae_scale.models.base import VAE
from vae_scale.training.setup import build_models
from vae_scale.training.state import TrainState
from vae_scale.training.step import step_means, train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    VAE.reparameterize = staticmethod(lambda mu, logvar, eps=None: mu)  # no per-rank noise
    cfg = config_from_dict(
        {
            "model": {
                "name": "autoencoder_kl",
                "widths": [16, 16, 16],
                "groups": 8,
                "layers_per_block": 1,
                "latent_channels": 4,
            },
            "loss": {
                "objective": "autoencoder",
                "likelihood": "gaussian",
                "beta": 1e-6,
                "adversarial": {"start_step": 2, "layers": 2, "channels": 8, "lecam_weight": 0.01},
            },
            "train": {"cpu": True, "lr": 1e-3},
        },  # fmt: skip
        args.overrides,
    )
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    models = build_models(cfg, accelerator, (3, 16, 16))
    rank, world = accelerator.process_index, accelerator.num_processes
    share = args.global_batch // world
    data = torch.Generator().manual_seed(1)
    state, rows = TrainState(), []
    for _ in range(args.steps):
        images = torch.rand(args.global_batch, 3, 16, 16, generator=data)
        x = images[rank * share : (rank + 1) * share].to(accelerator.device)
        m = models
        out = train_step(
            accelerator, m.model, m.plain, m.optimizer, m.policy, x, cfg, state, args.steps,
            m.ema, m.perceptual, m.critic,
        )  # fmt: skip
        means = step_means(out)
        reduced = accelerator.reduce(torch.stack(list(means.values())), "mean").tolist()
        rows.append(dict(zip(means, reduced, strict=True)))
    if accelerator.is_main_process:
        record = {
            "num_processes": world,
            "rows": rows,
            "model": {k: v.tolist() for k, v in models.plain.state_dict().items()},
            "critic": {k: v.tolist() for k, v in models.critic.plain.state_dict().items()},
            "lecam": models.critic.lecam.state_dict(),
        }
        with open(args.out, "w") as f:
            json.dump(record, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
