"""A DDP probe run by tests/test_ddp.py under the real `accelerate launch` (2 gloo processes).

Every rank builds the package's own pieces (ShardSplit, build_model, neg_elbo, Accelerator,
accumulate) and records what it did into OUT/rank<r>.json and OUT/params_rank<r>.pt:
- its process index, the world size and the torch.distributed backend;
- the keys of every training batch it read, in order (one epoch of the Frey shards);
- the keys of the validation split it evaluated, and evaluate_split's reduced metrics;
- the keys a second, evenly sharded dataset gives it with 2 loader workers;
- the model parameters after one epoch of training steps.

The reparameterization noise of a sample is a function of (seed, sample key) only, so a
1-process run with gradient accumulation over the same samples in the same order
(`reference_train`, called in-process by the test) must reach the same parameters.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_scale.analysis.evaluate import EvalOptions, evaluate_split
from vae_scale.config import DataConfig
from vae_scale.data.streaming.inputs import images_to_float
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.losses import build_likelihood, neg_elbo
from vae_scale.models import build_model
from vae_scale.models.conv import ConvVAEConfig
from vae_scale.utils.seeding import derive_seed

LATENT_DIM = 4
LR = 1e-3


def tiny_model(image_shape: tuple[int, int, int], seed: int) -> torch.nn.Module:
    set_seed(seed)  # identical initial weights in every process
    cfg = ConvVAEConfig(latent_dim=LATENT_DIM, base_channels=4)
    return build_model(cfg, image_shape, build_likelihood("bernoulli", image_shape))


def noise_for(keys: Iterable[str], seed: int) -> torch.Tensor:
    """eps ~ N(0, I) per sample, seeded by (seed, key): the same draw in any process/batch."""
    return torch.stack(
        [
            torch.randn(LATENT_DIM, generator=torch.Generator().manual_seed(derive_seed(seed, k)))
            for k in keys
        ]
    )


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    keys: list[str],
    seed: int,
) -> None:
    """One micro-batch, as train.py does it: accumulate, backward, step on sync."""
    core = accelerator.unwrap_model(model)
    x = images_to_float(images, accelerator.device)
    with accelerator.accumulate(model):
        out = model(x, eps=noise_for(keys, seed).to(accelerator.device))
        terms = neg_elbo(core.likelihood, out.x_params, x, out.mu, out.logvar)
        accelerator.backward(terms.loss)
        if accelerator.sync_gradients:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR)


def reference_train(
    micro_batches: list[tuple[torch.Tensor, list[str]]],
    image_shape: tuple[int, int, int],
    seed: int,
    accum: int,
) -> dict[str, torch.Tensor]:
    """1 process, gradient accumulation `accum`, over the given micro-batches in order."""
    from vae_scale.utils.compat import reset_accelerate_state

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    try:
        model = tiny_model(image_shape, seed)
        optimizer = make_optimizer(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        for images, keys in micro_batches:
            train_step(accelerator, model, optimizer, images, keys, seed)
        return {
            k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()
        }
    finally:
        accelerator.end_training()
        reset_accelerate_state()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True, help="Frey shard folder (holds index.json)")
    parser.add_argument("--even-shards", required=True, help="evenly sharded toy folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--even-batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)

    # cpu=True: without it `--multi_gpu` on a CPU machine gives N processes of rank 0 of 1.
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    record: dict[str, Any] = {
        "rank": rank,
        "num_processes": world,
        "env_rank": os.environ.get("RANK"),
        "env_world_size": os.environ.get("WORLD_SIZE"),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
    }
    try:
        common = dict(seed=args.seed, world_size=world, rank=rank)
        data = DataConfig(batch_size=args.batch_size, shuffle_buffer=200)
        train_data = ShardSplit(args.shards, "train", data, shuffle=True, **common)
        train_data.catalog.check_enough_shards()
        model = tiny_model(train_data.image_shape, args.seed)
        optimizer = make_optimizer(model)
        model, optimizer = accelerator.prepare(model, optimizer)  # the loader is not prepared
        model.train()
        record["steps_in_epoch"] = train_data.planner.batches_in_epoch()
        record["train_batches"] = []
        for batch in train_data.train_batches(epoch=1):
            train_step(accelerator, model, optimizer, batch["image"], batch["key"], args.seed)
            record["train_batches"].append(batch["key"])

        val = ShardSplit(args.shards, "val", data, **common)
        record["val_keys"] = [k for b in val.eval_batches() for k in b["key"]]
        core = accelerator.unwrap_model(model)
        record["val_metrics"] = evaluate_split(accelerator, core, val, EvalOptions(args.seed))

        even_data = DataConfig(batch_size=args.even_batch_size, num_workers=2, shuffle_buffer=50)
        even = ShardSplit(args.even_shards, "train", even_data, shuffle=True, **common)
        even.catalog.check_enough_shards()
        record["even_steps_in_epoch"] = even.planner.batches_in_epoch()
        record["even_keys"] = [k for b in even.train_batches(epoch=1) for k in b["key"]]

        torch.save(core.state_dict(), out / f"params_rank{rank}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    main()
