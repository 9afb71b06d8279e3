"""Training-step throughput of a config in several settings, FLOPs per image, matmul peak.

One step is the training loop's own `training.step.train_step` on the loop's own model,
optimizer and EMA (`training.setup.build_training`): uint8 batch -> float on the device
(+ channels_last), forward under Accelerate's autocast, the training objective (neg. ELBO, plus
the encoder augmentation term where the config turns it on), backward, the update policy
(clipping, skips) and the AdamW step.
Its input is either one synthetic uint8 batch kept in memory, or the real training stream
(`ShardSplit.train_batches` with the config's loader workers, shuffle buffer, pinning and RAM
cache; a cached stream is filled first, so it is timed as from epoch 2 on): the difference
between the two is the input-pipeline overhead.

Timing: `warmup` untimed steps (compilation happens there), then `repeats` blocks of `steps`
steps each, with a device synchronisation before the clock is read; the median block counts.
Settings of equal precision/channels_last/compile share one model and Accelerator; the
synthetic blocks run before the pipeline blocks so the loader's prefetch queue cannot be
filled while the clock is stopped.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.report import TrainRow
from vae_scale.config import Config, load_config
from vae_scale.data.streaming.inputs import prepare_batch
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.losses import build_likelihood, neg_elbo
from vae_scale.models import build_model
from vae_scale.training.setup import build_training, make_accelerator
from vae_scale.training.state import TrainState
from vae_scale.training.step import train_step
from vae_scale.utils.compat import cpu_has_fast_bf16, reset_accelerate_state


@dataclass(frozen=True)
class Setting:
    precision: str  # train.mixed_precision: "no", "bf16", "fp16"
    channels_last: bool | None  # None: MLP (no memory format)
    compile: bool
    inputs: tuple[str, ...]  # "synthetic" and/or "pipeline"
    skip: str = ""  # why this setting is listed but not measured on this device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_stream(cfg: Config, shard_dir: Path) -> Iterator[dict]:
    """Training batches for ever (epoch after epoch), as train.py reads them."""
    split = ShardSplit(str(shard_dir), "train", cfg.data, seed=cfg.run.seed, shuffle=True)
    split.catalog.check_enough_shards()
    if cfg.data.cache_in_memory:
        split.fill_cache()  # time the steady state (epoch >= 2)
    return itertools.chain.from_iterable(split.train_batches(e) for e in itertools.count(1))


def config_for(path: Path, overrides: list[str], setting: Setting) -> Config:
    """The config with the setting's precision, memory format and compile flag (validated)."""
    return load_config(
        path,
        [
            *overrides,
            f"train.mixed_precision='{setting.precision}'",
            f"train.channels_last={str(bool(setting.channels_last)).lower()}",
            f"train.compile={str(setting.compile).lower()}",
        ],
    )


def measure_setting(
    cfg: Config,
    inputs: tuple[str, ...],
    shape: tuple[int, int, int],
    shard_dir: Path,
    warmup: int,
    repeats: int,
    block_s: float,
) -> tuple[dict[str, tuple[float, float]], float]:
    """(input -> (median images/s, median images per CPU-second of this process), seconds of
    the first warm-up) for one setting (one model, one Accelerator); with compile on, the
    warm-up holds the compilation."""
    accelerator = make_accelerator(cfg, "disabled")
    try:
        torch.manual_seed(0)
        objective, nets = build_training(cfg, accelerator, shape)
        device = accelerator.device
        state = TrainState()

        def step(images: torch.Tensor) -> None:
            x = prepare_batch(images, device, cfg.data.binarize, None, cfg.train.channels_last)
            train_step(accelerator, objective, nets, x, state, 10**9)

        synthetic = torch.randint(0, 256, (cfg.data.batch_size, *shape), dtype=torch.uint8)
        if torch.cuda.is_available():
            synthetic = synthetic.pin_memory()  # as the loader's batches are
        sources = {
            "synthetic": lambda: itertools.repeat(synthetic),
            "pipeline": lambda: (b["image"] for b in training_stream(cfg, shard_dir)),
        }
        # Without loader workers nothing runs between blocks, so the two inputs alternate
        # block by block (load drift on a shared machine hits both alike); with workers the
        # pipeline's blocks run last, else its prefetch queue would fill while synthetic
        # blocks hold the clock.
        interleave = cfg.data.num_workers == 0
        streams: dict[str, Iterator[torch.Tensor]] = {}
        walls: dict[str, list[float]] = {name: [] for name in inputs}
        cpus: dict[str, list[float]] = {name: [] for name in inputs}
        steps, warmup_s = 0, 0.0  # block length: chosen from the first input's warm-up

        def warm(name: str) -> None:
            nonlocal steps, warmup_s
            streams[name] = batches = sources[name]()
            start = time.perf_counter()
            for _ in range(warmup):
                step(next(batches))
            sync(device)
            if not steps:
                warmup_s = time.perf_counter() - start
                per_step = warmup_s / max(1, warmup)
                if cfg.train.compile:  # the warm-up timed compilation: time one more step
                    start = time.perf_counter()
                    step(next(batches))
                    sync(device)
                    per_step = time.perf_counter() - start
                steps = max(1, min(200, round(block_s / max(per_step, 1e-6))))

        def block(name: str) -> None:
            if name not in streams:
                warm(name)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(next(streams[name]))
            sync(device)
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)

        if interleave:
            for name in inputs:
                warm(name)
            order = [name for _ in range(repeats) for name in inputs]
        else:
            order = [name for name in inputs for _ in range(repeats)]
        for name in order:
            block(name)
        streams.clear()  # shuts the loader workers down
        images = cfg.data.batch_size * steps
        results = {
            name: (images / statistics.median(walls[name]), images / statistics.median(cpus[name]))
            for name in inputs
        }
        return results, warmup_s
    finally:
        accelerator.end_training()
        reset_accelerate_state()


def settings_for(cfg: Config, on_gpu: bool, compile_ok: bool, heavy: bool) -> list[Setting]:
    """fp32/bf16(/fp16 on GPU) x channels_last off/on (conv nets) on synthetic batches; the
    reference setting (the config's precision + channels_last; fp32 on a CPU that emulates
    bf16) also with the data pipeline, and compiled (synthetic and pipeline) if `compile_ok`.
    `heavy` (a ResNet on a CPU without fast bf16): the bf16 settings are listed, not run."""
    conv = cfg.model.name != "mlp"
    precisions = ["no", "bf16", "fp16"] if on_gpu else ["no", "bf16"]
    layouts = [False, True] if conv else [None]
    fast_bf16 = on_gpu or cpu_has_fast_bf16()
    precision = cfg.train.mixed_precision if fast_bf16 else "no"
    reference = (precision, cfg.train.channels_last if conv else None)
    emulated = "not run: no oneDNN bf16 kernels on this CPU, bf16 is emulated (slower than fp32)"
    out = []
    for setting in itertools.product(precisions, layouts):
        inputs = ("synthetic", "pipeline") if setting == reference else ("synthetic",)
        skip = emulated if heavy and setting[0] == "bf16" and not fast_bf16 else ""
        out.append(Setting(*setting, False, inputs, skip))
    out.sort(key=lambda s: (s.precision, s.channels_last) != reference)  # reference first
    both = ("synthetic", "pipeline")
    if compile_ok:
        out.append(Setting(*reference, True, both))
    else:
        out.append(
            Setting(
                *reference,
                True,
                both[:1],
                "not run on CPU (time budget)",
            )
        )
    return out


def measure_config(
    name: str,
    path: Path,
    overrides: list[str],
    shape: tuple[int, int, int],
    shard_dir: Path,
    settings: list[Setting],
    warmup: int,
    repeats: int,
    block_s: float,
    log=print,
) -> list[TrainRow]:
    rows = []
    for s in settings:
        cfg = config_for(path, overrides, s)
        precision = "fp32" if s.precision == "no" else s.precision
        row = dict(config=name, batch=cfg.data.batch_size, precision=precision)
        row.update(channels_last=s.channels_last, compile=s.compile)
        if s.skip:
            rows += [TrainRow(**row, input=i, img_per_s=None, note=s.skip) for i in s.inputs]
            continue
        start = time.perf_counter()
        rates, warmup_s = measure_setting(cfg, s.inputs, shape, shard_dir, warmup, repeats, block_s)
        log(
            f"  {name} {precision} channels_last={s.channels_last} compile={s.compile}: "
            + ", ".join(f"{k} {v[0]:.1f} img/s ({v[1]:.1f}/CPU-s)" for k, v in rates.items())
            + f" (warm-up {warmup_s:.0f} s, total {time.perf_counter() - start:.0f} s)"
        )
        note = f"warm-up incl. compile {warmup_s:.0f} s" if s.compile else ""
        rows += [
            TrainRow(**row, input=i, img_per_s=r, img_per_cpu_s=c, note=note)
            for i, (r, c) in rates.items()
        ]
    return rows


def count_flops_per_image(cfg: Config, shape: tuple[int, int, int], batch: int = 8) -> float:
    """FLOPs of one training step's forward + backward per image (eager fp32;
    FlopCounterMode counts matmuls and convolutions, the MFU convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape))
    x = torch.rand(batch, *shape)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        terms = neg_elbo(
            model.likelihood, out.x_params, x, out.mu, out.logvar, kl_groups=out.kl_groups
        )
        terms.loss.backward()
    return counter.get_total_flops() / batch


def bf16_matmul_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float | None:
    """Measured dense bf16 matmul FLOP/s on a GPU (the MFU denominator); None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / iters)
    return 2 * n**3 / statistics.median(times)
