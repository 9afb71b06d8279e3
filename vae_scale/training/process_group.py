"""Joining the process group: bounded on its own (train.connect_timeout_s), and isolated per
torchrun restart.

torchrun's c10d rendezvous shares one TCP store with its workers across restarts
(`TORCH_DISABLE_SHARE_RDZV_TCP_STORE` unset), and `init_process_group(init_method="env://")`
adds no per-restart prefix to it: a restarted group reads the addresses its killed
predecessor published under the same keys, and gloo connects to dead ports (refused) or waits
for ever (both seen on this CPU within a few restarts). Under torchrun after a restart the
group is therefore joined here, through a store prefixed with the restart count; Accelerate
then finds it joined and uses it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from vae_scale.training.signals import TrainingInterrupted
from vae_scale.utils.compat import set_process_group_timeout

T = TypeVar("T")


def join(make: Callable[[], T], use_cpu: bool, connect_s: float, collective_s: float) -> T:
    """`make()` (which builds the Accelerator, and with it joins the process group) with the
    join bounded by `connect_s`; collectives then wait up to `collective_s`. A join that fails
    or times out is exit 3 (TrainingInterrupted), which torchrun and Slurm retry."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        if world > 1 and dist.is_available() and not dist.is_initialized():
            _join_restarted(use_cpu, timedelta(seconds=connect_s))
        made = make()
    except RuntimeError as err:  # connect or store timeouts, refused connections
        if world < 2:
            raise
        raise TrainingInterrupted(
            f"process {os.environ.get('RANK', '?')}: could not join the other {world - 1} "
            f"process(es) within train.connect_timeout_s={connect_s:g} s "
            f"({str(err).splitlines()[0][:200]}); nothing was trained: a restart (torchrun, "
            f"Slurm requeue) or the same command retries"
        ) from err
    if dist.is_available() and dist.is_initialized():
        set_process_group_timeout(timedelta(seconds=collective_s))
    return made


def _join_restarted(use_cpu: bool, timeout: timedelta) -> None:
    """Under torchrun's shared store after a restart: join through keys of this attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or attempt == "0" or not (use_cpu or torch.cuda.is_available()):
        return  # a fresh store: nothing stale (Accelerate joins as usual)
    if not use_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
        timeout=timeout,
    )  # fmt: skip
    dist.init_process_group(
        "gloo" if use_cpu else "nccl",
        store=dist.PrefixStore(f"/vae_scale/attempt_{attempt}", store),
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
