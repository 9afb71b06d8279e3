"""The private APIs of our dependencies that vae_scale still needs, in one place.

Each wrapper says why the public API does not do, so an upgrade that breaks one breaks here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so a second `Accelerator` in the same
    process (tests, notebooks, sweeps, benchmarks) can choose its own precision and device.
    Accelerate has no public reset."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has bf16 kernels for this CPU (AVX-512 or newer, e.g. AMX). torch has
    no public query."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: assume fast rather than nag
        return True


def uncompiled(module: nn.Module) -> nn.Module:
    """The module inside a `torch.compile` wrapper (itself when not compiled): evaluation runs
    other shapes than training and must not trigger recompilation."""
    return getattr(module, "_orig_mod", module)


def seeded_shuffle(samples: Any, bufsize: int, rng: Any) -> Any:
    """webdataset's shuffle buffer with our RNG: the public `wds.shuffle` stage seeds itself
    from the clock or a fixed seed, never from (seed, epoch, rank, worker)."""
    import webdataset as wds

    return wds.filters._shuffle(samples, bufsize=bufsize, initial=bufsize, rng=rng)


@contextmanager
def skip_step_if(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> Iterator[None]:
    """Within: a fused Adam/AdamW `step()` leaves weights, moments and step count unchanged
    where `skip` (a 0-dim bool tensor on the device) is true, decided on the device. This is
    the protocol GradScaler uses (`found_inf` / `grad_scale` attributes the fused kernels
    read); torch has no public way to skip a step without reading the flag on the host."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
    inner.found_inf, inner.grad_scale = skip.float(), None
    try:
        yield
    finally:
        del inner.found_inf, inner.grad_scale


def worker_deaths_found_by_the_loader() -> None:
    """DataLoader's SIGCHLD handler raises "worker ... is killed" in the main thread at
    whatever line it runs, in the middle of an optimizer step as readily as between batches,
    so nothing can tell whether the weights are in a state to checkpoint. Without it (this
    marks it as installed), the iterator finds a dead worker itself while it waits for a
    batch (every few seconds), at a batch boundary. torch has no public switch."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True


def loader_workers(iterator: Any) -> list[Any]:
    """A DataLoader iterator's worker processes (multiprocessing.Process), in worker order
    ([] without workers). The iterator keeps them privately."""
    return list(getattr(iterator, "_workers", ()))


def shut_down_loader_workers(iterator: Any) -> None:
    """Stop a DataLoader iterator's worker processes now. An error raised through the loop
    can keep the iterator alive (its frame in the traceback) until interpreter exit, where
    multiprocessing joins the workers after SIGTERM, which our workers ignore (they finish
    their batch on a preemption signal): the process would hang. The iterator's own shutdown
    (a sentinel on each worker's queue) is private."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    # Its fallback, terminate(), is a SIGTERM, which our workers ignore; a worker it could not
    # join (a queue lock held by a killed peer) would then hang the exit that joins it.
    for worker in loader_workers(iterator):
        if worker.is_alive():
            worker.kill()
            worker.join(5)


def full_precision_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`module`'s forward without Accelerate's mixed-precision wrapper: `prepare` puts an
    autocast around the *instance's* forward (kept by `unwrap_model`, shared with the DDP
    module), so evaluation runs the class's forward to compute in float32."""
    return type(module).forward(module, *args, **kwargs)


def set_process_group_timeout(timeout: Any) -> None:
    """The default process group's timeout for later collectives (`torch.distributed.
    set_timeout` where torch has it, `_set_pg_timeout` in older releases)."""
    import torch.distributed as dist

    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    setter(timeout)
