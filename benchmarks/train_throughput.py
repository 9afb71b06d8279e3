"""Training-step throughput of a config's model on synthetic batches (no data loading).

    python benchmarks/train_throughput.py configs/cifar10_resnet.yaml [SECTION.KEY=VALUE ...]
        [--precisions no,bf16] [--steps 5] [--repeats 3] [--warmup 2] [--flops]
        [--peak-tflops 989]

One training step is what train.py does per batch: uint8 -> float, forward (under the
precision's autocast, through Accelerate), negative ELBO in float32, backward, gradient
clipping (train.grad_clip), Adam step. The model, likelihood, batch size (data.batch_size),
channels_last and compile settings come from the config and its overrides; the image shape
from the shard index when it exists, else from the dataset name. After `--warmup` steps, each
of `--repeats` repeats times `--steps` steps; the table shows the median. `img/CPU-s` divides
images by the process's CPU time (all threads): on a busy machine it is the fairer number.
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
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

from vae_scale.config import Config, load_config
from vae_scale.data.loader import images_to_float
from vae_scale.losses import build_likelihood, neg_elbo
from vae_scale.models import build_model
from vae_scale.train import make_accelerator

SHAPES = {"frey": (1, 28, 20), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "celeba": (3, 64, 64)}


def image_shape(cfg: Config) -> tuple[int, int, int]:
    index = Path(cfg.data.shards_dir) / cfg.data.dataset / "index.json"
    if index.is_file():
        return tuple(json.loads(index.read_text())["image_shape"])
    if cfg.data.dataset not in SHAPES:
        raise SystemExit(f"no shards at {index.parent} and no known shape for {cfg.data.dataset}")
    return SHAPES[cfg.data.dataset]


def count_step_flops(cfg: Config, shape: tuple[int, int, int]) -> float:
    """FLOPs of one training step's forward + backward (eager, fp32), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape))
    batch = 8
    x = torch.rand(batch, *shape)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        neg_elbo(model.likelihood, out.x_params, x, out.mu, out.logvar).loss.backward()
    return counter.get_total_flops() / batch


def measure(cfg: Config, shape: tuple[int, int, int], args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(cfg, "disabled")
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape))
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
        core = accelerator.unwrap_model(model)
        device = accelerator.device
        batch = cfg.data.batch_size
        images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")

        def step() -> None:
            x = images_to_float(images, device)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            terms = neg_elbo(core.likelihood, out.x_params, x, out.mu, out.logvar)
            accelerator.backward(terms.loss)
            accelerator.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(args.warmup):
            step()
        sync()
        walls, cpus = [], []
        for _ in range(args.repeats):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            sync()
            walls.append(time.perf_counter() - wall0)
            cpus.append(time.process_time() - cpu0)
        images_timed = batch * args.steps
        wall = statistics.median(walls)
        return {
            "device": str(device),
            "precision": cfg.train.mixed_precision,
            "batch": batch,
            "img_per_s": images_timed / wall,
            "ms_per_step": 1000 * wall / args.steps,
            "img_per_cpu_s": images_timed / statistics.median(cpus),
            "repeats_img_per_s": [round(images_timed / w, 1) for w in walls],
        }
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE")
    parser.add_argument(
        "--precisions", help="comma-separated train.mixed_precision values (default: config's)"
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
    base = load_config(args.config, args.overrides)
    precisions = args.precisions.split(",") if args.precisions else [base.train.mixed_precision]
    shape = image_shape(base)
    flops = count_step_flops(base, shape) if args.flops else None
    params = sum(
        p.numel()
        for p in build_model(
            base.model, shape, build_likelihood(base.loss.likelihood, shape)
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
    header = (
        "| device | precision | batch | channels_last | compile | img/s | ms/step | img/CPU-s |"
    )
    if flops and args.peak_tflops:
        header += " MFU |"
    rows = []
    for precision in precisions:
        cfg = load_config(args.config, [*args.overrides, f"train.mixed_precision='{precision}'"])
        result = measure(cfg, shape, args)
        print(f"  {precision}: repeats img/s {result['repeats_img_per_s']}", flush=True)
        row = (
            f"| {result['device']} | {precision} | {result['batch']} | {cfg.train.channels_last} "
            f"| {cfg.train.compile} | {result['img_per_s']:.1f} | {result['ms_per_step']:.0f} "
            f"| {result['img_per_cpu_s']:.1f} |"
        )
        if flops and args.peak_tflops:
            row += f" {100 * flops * result['img_per_s'] / (args.peak_tflops * 1e12):.1f}% |"
        rows.append(row)
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(rows))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average after: {load:.1f}")


if __name__ == "__main__":
    main()
