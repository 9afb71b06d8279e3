"""Latents that diffuse well (issue 42): fine-tune one trained autoencoder with equal budgets
(a) plain, (b) + equivariance (EQ-VAE), (c) + scale equivariance, (d) + alignment to the VGG16
teacher; for each: PSNR, rFID, iFID, the latents' high-frequency share, the scale-equivariance
PSNR, and a diffusion probe at a fixed budget on its latents. And the step-time overhead of each
term, timed side by side in one process (alternating rounds on one batch).

    VAE_SCALE_WEIGHTS=../shared/weights OMP_NUM_THREADS=1 python -m benchmarks.latent_terms \\
        --work /tmp/terms --from RUN_OR_EXPORT --shards SHARDS [--dataset frey] [--epochs 1]
    python -m benchmarks.latent_terms --timing-only

Everything but the timing goes through the real CLI (`vae-scale train` with model.init_from,
`encode`, `probe`), so the numbers are what a user's runs report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.diffusion_ladder import CONFIG, last_row, vae_scale

VARIANTS = {
    "plain": [],
    "eq_vae": ["loss.equivariance.weight=1", "loss.equivariance.variant=eq_vae"],
    "scale_eq": ["loss.equivariance.weight=1", "loss.equivariance.variant=scale"],
    "align_vgg16": ["loss.alignment.weight=0.1", "loss.alignment.teacher=vgg16"],
}


def timing(rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per optimizer step of each variant on a CelebA-64-shaped f8c4
    autoencoder (LPIPS on, no discriminator), batch 8, alternating rounds."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from vae_scale.config import load_config
    from vae_scale.training.setup import build_training
    from vae_scale.training.state import TrainState
    from vae_scale.training.step import train_step

    weights = os.environ.get("VAE_SCALE_WEIGHTS", "")
    base = [
        "model.widths=[32,64,64,64]", "model.layers_per_block=1", "train.mixed_precision=no",
        "train.channels_last=false", "loss.discriminator.weight=0", "wandb.mode=disabled",
        f"run.weights_dir={weights}",
    ]  # fmt: skip
    built = {}
    for name, extra in VARIANTS.items():
        cfg = load_config(CONFIG, [*base, *extra])
        accelerator = Accelerator(cpu=True)
        set_seed(0)
        built[name] = (accelerator, *build_training(cfg, accelerator, (3, 64, 64)))
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    states = {name: TrainState() for name in VARIANTS}
    for _ in range(rounds):
        for name, (accelerator, objective, nets) in built.items():
            train_step(accelerator, objective, nets, x, states[name], 10**6)  # warm
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(accelerator, objective, nets, x, states[name], 10**6)
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path)
    parser.add_argument("--from", dest="origin", help="the trained autoencoder to fine-tune")
    parser.add_argument("--shards")
    parser.add_argument("--dataset", default="frey")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    seconds = timing(args.rounds, 3)
    plain = seconds["plain"]
    print("step time (s) and ratio to plain, CelebA-64 f8c4 (widths 32-64-64-64), batch 8:")
    for name, s in seconds.items():
        print(f"  {name}: {s:.3f} s  x{s / plain:.3f}")
    if args.timing_only:
        return
    runs, latents = args.work / "runs", args.work / "latents"
    common = [
        f"data.shards_dir={args.shards}", f"data.dataset={args.dataset}", f"run.dir={runs}",
        "wandb.mode=disabled", "data.num_workers=0", "train.mixed_precision=no",
        "train.channels_last=false", "eval.picture_epochs=[]", "eval.every_epochs=100",
        "model.widths=[32,64,64]", "model.layers_per_block=1", "loss.perceptual.weight=0",
        "loss.discriminator.weight=0", f"train.epochs={args.epochs}", "train.lr=1e-4",
        "eval.rfid=on", f"eval.diffusability_samples={args.samples}",
        f"model.init_from={Path(args.origin).resolve()}",
    ]  # fmt: skip
    results = {"step_seconds": seconds}
    for name, extra in VARIANTS.items():
        t0 = time.perf_counter()
        vae_scale("train", str(CONFIG), *common, f"run.name={name}", *extra)
        row = last_row(runs / name)
        result = {"train_s": time.perf_counter() - t0}
        result.update({k.removeprefix("test/"): v for k, v in row.items() if k.startswith("test/")})
        vae_scale("encode", str(runs / name), "--out", str(latents / name))
        vae_scale(
            "probe", str(latents / name), f"run.dir={runs}", f"run.name=probe_{name}",
            "wandb.mode=disabled", "data.num_workers=0", "train.mixed_precision=no",
            "model.patch_size=1", "model.width=64", f"train.epochs={args.probe_epochs}",
            f"loss.probe.gfid_samples={args.samples}", "loss.probe.sample_steps=20",
        )  # fmt: skip
        probe = last_row(runs / f"probe_{name}")
        result["probe_val_fm_loss"], result["probe_gfid"] = probe["val/fm_loss"], probe["test/gfid"]
        results[name] = result
        print(name, json.dumps({k: round(v, 4) for k, v in result.items() if isinstance(v, float)}))
    (args.work / "latent_terms.json").write_text(json.dumps(results, indent=1))
    columns = ["psnr", "rfid", "ifid", "latent_high_freq_share", "scale_equivariance_psnr",
               "probe_val_fm_loss", "probe_gfid"]  # fmt: skip
    print("| variant | " + " | ".join(columns) + " | step time x plain |")
    print("|---" * (len(columns) + 2) + "|")
    for name in VARIANTS:
        r = results[name]
        cells = " | ".join(f"{r.get(c, float('nan')):.4g}" for c in columns)
        print(f"| {name} | {cells} | {seconds[name] / plain:.3f} |")


if __name__ == "__main__":
    main()
