"""How long training blocks per checkpoint (issue 44): the CelebA-64 autoencoder of
configs/celeba64_autoencoder.yaml (full size) with its discriminator and EMA, saved through the
run's own Checkpointer (Accelerate's save_state, our component states, sha256 manifest, fsync,
atomic rename), blocking and with train.checkpoint_async (the files written on the training
thread, fsync + sha256 + rename on a background one); beside them, a copy of every state to
host memory (the least any background writer would block for).

    python -m benchmarks.checkpoint_stall --work /tmp/stall [--saves 5]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_scale.config import load_config
from vae_scale.training.checkpoint import Checkpointer
from vae_scale.training.setup import build_training
from vae_scale.training.state import TrainState
from vae_scale.training.step import train_step
from vae_scale.utils.fsutil import sha256_file

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    cfg = load_config(
        REPO / "configs" / "celeba64_autoencoder.yaml",
        [f"run.dir={args.work}", "train.mixed_precision=no", "train.channels_last=false",
         "loss.perceptual.weight=0", "loss.discriminator.start_step=0", "wandb.mode=disabled",
         "train.keep_checkpoints=2"],
    )  # fmt: skip
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(0)
    objective, nets = build_training(cfg, accelerator, (3, 64, 64))
    state = TrainState()
    x = torch.rand(4, 3, 64, 64, device=accelerator.device)
    train_step(accelerator, objective, nets, x, state, 100)  # optimizer states exist
    components = {"train_state": state}
    for net in nets.values():
        components.update(net.components())
    components.update(objective.components())
    blocking, background, hashing, snapshots = {}, [], [], []
    for mode in ("blocking", "async"):  # alternating saves would share the page cache's state
        cfg.train.checkpoint_async = mode == "async"
        checkpointer = Checkpointer(accelerator, cfg.run_dir / mode, cfg.train)
        checkpointer.components = components
        blocking[mode] = []
        for i in range(args.saves):
            t0 = time.perf_counter()
            path = checkpointer.save(i + 1)
            blocking[mode].append(time.perf_counter() - t0)
            if mode == "async":
                t0 = time.perf_counter()
                checkpointer.wait()  # what the writer thread did meanwhile
                background.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                for p in path.iterdir():
                    if p.is_file():
                        sha256_file(p)
                hashing.append(time.perf_counter() - t0)
                snapshots.append(snapshot_s(accelerator, nets))
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    params = sum(p.numel() for net in nets.values() for p in net.unwrapped.parameters())
    sync, asyn = statistics.median(blocking["blocking"]), statistics.median(blocking["async"])
    snap = statistics.median(snapshots)
    print(f"device {accelerator.device}; {params:,} trained parameters (autoencoder +")
    print(f"discriminator), EMA kept; checkpoint {size / 2**20:.1f} MiB in {path.parent}")
    print(f"blocking save (median of {args.saves}): {sync:.3f} s")
    print(f"  of which sha256 of every file (re-measured): {statistics.median(hashing):.3f} s")
    print(f"train.checkpoint_async=true, training blocked: {asyn:.3f} s ({sync / asyn:.1f}x less)")
    print(f"  then finished on the thread (waited for): {statistics.median(background):.3f} s")
    print(f"host-memory snapshot (the least any background writer blocks): {snap:.3f} s")


def snapshot_s(accelerator: Accelerator, nets: dict) -> float:
    """Seconds to copy every network's weights and optimizer state to host memory."""
    t0 = time.perf_counter()
    snapshot = {
        name: (
            {k: v.detach().to("cpu", copy=True) for k, v in net.unwrapped.state_dict().items()},
            copy.deepcopy(net.optimizer.state_dict()),
        )
        for name, net in nets.items()
    }
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    del snapshot
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
