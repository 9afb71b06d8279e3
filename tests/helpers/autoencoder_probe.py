"""The autoencoder objective's real training step on N processes (or one), for
tests/test_autoencoder.py: a fixed global batch each step, each rank its contiguous slice cut
into `--accum` accumulated batches, posterior means instead of draws (the one thing that
legitimately differs per rank is the reparameterization noise). Writes rank 0's final weights
(autoencoder and discriminator) and every optimizer step's terms as JSON.

    accelerate launch --config_file launch/cpu_2proc.yaml tests/helpers/autoencoder_probe.py \
        --out OUT.json --global-batch 8 --steps 5 [--accum 2] [overrides...]
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_scale.config import config_from_dict
from vae_scale.models.base import VAE
from vae_scale.training.setup import build_training
from vae_scale.training.state import TrainState
from vae_scale.training.step import step_means, train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument(
        "--grads", action="store_true", help="also record the first update's gradients"
    )
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
                "discriminator": {
                    "start_step": 2,
                    "layers": 2,
                    "channels": 8,
                    "lecam_weight": 0.01,
                },
            },
            "train": {"cpu": True, "lr": 1e-3, "grad_accum_batches": args.accum},
        },  # fmt: skip
        args.overrides,
    )
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accum)
    set_seed(0)
    objective, nets = build_training(cfg, accelerator, (3, 16, 16))
    grads: dict[str, list] = {}
    if args.grads:  # each network's gradients as its first update sees them (all terms in)
        for net in nets.values():
            update = net.update

            def recorded(*a, net=net, update=update):
                grads.setdefault(
                    net.name,
                    [
                        p.grad.flatten().tolist()
                        for p in net.unwrapped.parameters()
                        if p.grad is not None
                    ],
                )
                return update(*a)

            net.update = recorded
    rank, world = accelerator.process_index, accelerator.num_processes
    share = args.global_batch // world
    micro = share // args.accum
    data = torch.Generator().manual_seed(1)
    state, rows = TrainState(), []
    for _ in range(args.steps):
        images = torch.rand(args.global_batch, 3, 16, 16, generator=data)
        mine = images[rank * share : (rank + 1) * share].to(accelerator.device)
        means: dict[str, torch.Tensor] = {}
        for k in range(args.accum):
            out = train_step(
                accelerator, objective, nets, mine[k * micro : (k + 1) * micro], state, args.steps
            )
            for name, value in step_means(out).items():  # the step's mean over its batches
                means[name] = means.get(name, 0) + value / args.accum
        assert out.synced
        for key in ("adaptive_weight", "alignment_weight"):
            means[key] = torch.as_tensor(float(out.values.get(key, 0)))
        reduced = accelerator.reduce(torch.stack(list(means.values())), "mean").tolist()
        rows.append(dict(zip(means, reduced, strict=True)))
    if accelerator.is_main_process:
        record = {
            "num_processes": world,
            "rows": rows,
            "model": {k: v.tolist() for k, v in nets["vae"].unwrapped.state_dict().items()},
            "discriminator": {
                k: v.tolist()
                for net in nets.values()
                if net.name == "discriminator"
                for k, v in net.unwrapped.state_dict().items()
            },
            "networks": {
                f"{net.name}/{k}": v.tolist()
                for net in nets.values()
                if net.name != "vae"
                for k, v in net.unwrapped.state_dict().items()
            },
            "lecam": objective.gan.lecam.state_dict() if objective.gan else None,
            "grads": grads,
        }
        with open(args.out, "w") as f:
            json.dump(record, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
