"""The diffusion probe's real training step on N processes (or one), for
tests/test_latent_diffusion.py: the first GLOBAL stored latents of LATENTS every step, each
rank its contiguous slice, the draws (posterior noise, path noise, times) of the whole global
batch made once from a fixed seed and sliced the same way (the one thing that legitimately
differs per rank). Writes every optimizer step's mean loss and rank 0's final weights.

    accelerate launch --config_file launch/cpu_2proc.yaml tests/helpers/probe_step.py \
        --latents DIR --out OUT.json [--steps 4] [--global-batch 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_scale.config import DataConfig, config_from_dict
from vae_scale.data.streaming.inputs import prepare_batch
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.training.setup import build_training
from vae_scale.training.state import TrainState
from vae_scale.training.step import step_means, train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latents", type=Path, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    cfg = config_from_dict({
        "data": {"shards_dir": str(args.latents.parent), "dataset": args.latents.name},
        "model": {"name": "dit", "width": 32, "depth": 2, "heads": 2, "patch_size": 2},
        "loss": {"objective": "flow_matching", "probe": {"gfid_samples": 0}},
        "train": {"cpu": True, "lr": 1e-3, "grad_clip": 1.0},
    })  # fmt: skip
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    split = ShardSplit(
        args.latents, "train", DataConfig(batch_size=args.global_batch), world_size=world, rank=rank
    )
    x = prepare_batch(next(iter(split.range_batches(0, args.global_batch)))["image"], "cpu")
    set_seed(0)
    objective, nets = build_training(cfg, accelerator, tuple(x.shape[1:]))
    share = args.global_batch // world
    mine = slice(rank * share, (rank + 1) * share)
    generator = torch.Generator().manual_seed(1)
    state, rows, own_draw = TrainState(), [], objective.draw
    for _ in range(args.steps):
        draws = own_draw(x)  # shapes only: replaced by the global draws below
        draws = tuple(
            torch.randn(d.shape, generator=generator)
            if i < 2
            else torch.rand(d.shape, generator=generator)
            for i, d in enumerate(draws)
        )
        objective.draw = lambda _x, d=draws: tuple(t[mine] for t in d)
        out = train_step(accelerator, objective, nets, x[mine], state, args.steps)
        assert out.synced
        means = step_means(out)
        reduced = accelerator.reduce(torch.stack(list(means.values())), "mean").tolist()
        rows.append(dict(zip(means, reduced, strict=True)))
    if accelerator.is_main_process:
        weights = {k: v.tolist() for k, v in nets["probe"].unwrapped.state_dict().items()}
        record = {"num_processes": world, "rows": rows, "model": weights}
        Path(args.out).write_text(json.dumps(record))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
