"""Training-step throughput of a config's model on synthetic batches (no data loading).

    python benchmarks/train_throughput.py configs/cifar10_resnet.yaml [SECTION.KEY=VALUE ...]
        [--precisions no,bf16] [--channels-last config|both] [--steps 5] [--repeats 3]
        [--warmup 2] [--flops] [--peak-tflops 989]

One training step is what train.py does per batch: uint8 -> float, forward under the
precision's autocast, negative ELBO in float32, backward, gradient clipping (train.grad_clip),
Adam step. The model, likelihood, batch size (data.batch_size), channels_last and compile
settings come from the config and its overrides; the image shape from the shard index when it
exists, else from the dataset name.

Every variant (precision x channels_last) is built in this one process and timed round-robin:
after `--warmup` steps of each, every repeat times `--steps` steps of each variant in turn, so
a change in machine load hits all variants alike. The table shows the median repeat and
`vs first`, the median over repeats of (first variant's time / this variant's time): the
side-by-side ratio. `img/CPU-s` divides images by the process's CPU time (all threads).
Autocast is torch.autocast around the forward (what Accelerate's prepare() wraps it in), with
a GradScaler for fp16, so variants of different precision can share one Accelerator.
`--flops` counts one step's FLOPs with torch.utils.flop_counter (forward + backward, eager
fp32 graph); with `--peak-tflops` (the device's dense peak for the precision, e.g. 989 for
H100 SXM bf16) it also reports model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vae_scale.utils.compat import reset_accelerate_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.steps import count_flops_per_image  # noqa: E402
from vae_scale.config import Config, load_config  # noqa: E402
from vae_scale.data.streaming.inputs import images_to_float
from vae_scale.losses import build_likelihood, neg_elbo
from vae_scale.models import build_model
from vae_scale.training.loop import make_accelerator

SHAPES = {"frey": (1, 28, 20), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "celeba": (3, 64, 64)}


def image_shape(cfg: Config) -> tuple[int, int, int]:
    index = cfg.shard_dir / "index.json"
    if index.is_file():
        return tuple(json.loads(index.read_text())["image_shape"])
    if cfg.data.dataset not in SHAPES:
        raise SystemExit(f"no shards at {index.parent} and no known shape for {cfg.data.dataset}")
    return SHAPES[cfg.data.dataset]


AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_step(
    cfg: Config, shape: tuple[int, int, int], accelerator, precision: str, channels_last: bool
) -> Callable[[], None]:
    """One variant's model, optimizer and training step (see the module docstring)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    device = accelerator.device
    dtype = AUTOCAST_DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    images = torch.randint(0, 256, (cfg.data.batch_size, *shape), dtype=torch.uint8)
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")

    def step() -> None:
        x = images_to_float(images, device).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        loss = neg_elbo(
            core.likelihood, out.x_params, x, out.mu, out.logvar, kl_groups=out.kl_groups
        ).loss
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def measure(
    cfg: Config, shape: tuple[int, int, int], variants: list[tuple[str, bool]], args
) -> list[dict]:
    """Time every (precision, channels_last) variant round-robin; one result per variant."""
    base = load_config(args.config, [*args.overrides, "train.mixed_precision='no'"])
    accelerator = make_accelerator(base, "disabled")  # autocast is ours, per variant
    try:
        steps = [make_step(cfg, shape, accelerator, p, cl) for p, cl in variants]
        for step in steps:
            for _ in range(args.warmup):
                step()
        walls: list[list[float]] = [[] for _ in variants]
        cpus: list[list[float]] = [[] for _ in variants]
        for _ in range(args.repeats):
            for i, step in enumerate(steps):
                wall0, cpu0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    step()
                walls[i].append(time.perf_counter() - wall0)
                cpus[i].append(time.process_time() - cpu0)
        images = cfg.data.batch_size * args.steps
        results = []
        for i, (precision, channels_last) in enumerate(variants):
            wall = statistics.median(walls[i])
            ratios = [first / own for first, own in zip(walls[0], walls[i], strict=True)]
            results.append(
                {
                    "device": str(accelerator.device),
                    "precision": precision,
                    "channels_last": channels_last,
                    "batch": cfg.data.batch_size,
                    "img_per_s": images / wall,
                    "ms_per_step": 1000 * wall / args.steps,
                    "img_per_cpu_s": images / statistics.median(cpus[i]),
                    "vs_first": statistics.median(ratios),
                    "repeats_img_per_s": [round(images / w, 2) for w in walls[i]],
                }
            )
        return results
    finally:
        accelerator.end_training()
        reset_accelerate_state()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE")
    parser.add_argument(
        "--precisions", help="comma-separated train.mixed_precision values (default: config's)"
    )
    parser.add_argument(
        "--channels-last",
        choices=["config", "both"],
        default="config",
        help="'both': time every precision with channels_last on and off",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--flops", action="store_true", help="count FLOPs per image")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    precisions = args.precisions.split(",") if args.precisions else [cfg.train.mixed_precision]
    layouts = [True, False] if args.channels_last == "both" else [cfg.train.channels_last]
    variants = [(p, cl) for p in precisions for cl in layouts]
    shape = image_shape(cfg)
    flops = count_flops_per_image(cfg, shape) if args.flops else None
    params = sum(
        p.numel()
        for p in build_model(
            cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape)
        ).parameters()
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.config} {' '.join(args.overrides)}\n{params:,} parameters, images {shape}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}, load average {load:.1f}"
    )
    if flops:
        print(f"{flops / 1e9:.3f} GFLOP per image per training step (forward + backward)")
    results = measure(cfg, shape, variants, args)
    header = (
        "| device | precision | channels_last | compile | batch | img/s | ms/step | img/CPU-s "
        "| vs first |"
    )
    if flops and args.peak_tflops:
        header += " MFU |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        row = (
            f"| {r['device']} | {r['precision']} | {r['channels_last']} | {cfg.train.compile} "
            f"| {r['batch']} | {r['img_per_s']:.1f} | {r['ms_per_step']:.0f} "
            f"| {r['img_per_cpu_s']:.1f} | {r['vs_first']:.2f}x |"
        )
        if flops and args.peak_tflops:
            row += f" {100 * flops * r['img_per_s'] / (args.peak_tflops * 1e12):.1f}% |"
        print(row, f"repeats img/s {r['repeats_img_per_s']}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average after: {load:.1f}")


if __name__ == "__main__":
    main()
