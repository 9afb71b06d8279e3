"""The perceptual KL autoencoder vs our ResNet VAE on CelebA 64x64 at equal wall time.

Each model trains for `--seconds` of wall time (then SIGTERM: the trainer checkpoints and
exits 3, the preemption path), is evaluated on the whole test split (`vae-scale eval`: PSNR,
SSIM, LPIPS, bits/dim), and its reconstructions of the first 64 test faces are scored for
sharpness: the variance of the Laplacian of the grey image, as a ratio to the originals'
(1.0 = as much fine detail as the inputs). Grids go to benchmarks/figures/.

    VAE_SCALE_DATA=../shared/data VAE_SCALE_WEIGHTS=../shared/weights \\
        python benchmarks/sharp_autoencoder.py --seconds 300 --work /tmp/sharp
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "benchmarks" / "figures"

COMMON = [
    "data.batch_size=32", "data.num_workers=1", "train.mixed_precision=no",
    "train.channels_last=false", "train.epochs=1000", "train.log_every_steps=20",
    "train.checkpoint_every_steps=0", "eval.every_epochs=1000", "eval.picture_epochs=[]",
    "wandb.mode=disabled", "train.progress=lines",
]  # fmt: skip
MODELS = {
    # the repo's CelebA ResNet VAE (vector latent, discretized logistic), narrower for a CPU
    "resnet_vae": ("celeba64_resnet", ["model.widths=[32,64,128,128,128]"]),
    # f8c4 KL autoencoder, narrower for a CPU; the discriminator starts after ~1/3 of the run
    "kl_autoencoder": (
        "celeba64_autoencoder",
        [
            "model.widths=[32,64,64,64]",
            "model.layers_per_block=1",
            "loss.adversarial.start_step=150",
            "train.lr=2e-4",
        ],
    ),  # fmt: skip
}


def shard_celeba(work: Path) -> Path:
    shards = work / "shards"
    if not (shards / "celeba" / "index.json").is_file():
        source = Path(os.environ.get("VAE_SCALE_DATA", "../shared/data")) / "celeba"
        subprocess.run(
            [sys.executable, "-m", "vae_scale", "shard", "celeba", "--source", str(source),
             "--out", str(shards), "--progress", "off"],
            check=True, cwd=REPO,
        )  # fmt: skip
    return shards


def train_for(name: str, config: str, overrides: list[str], seconds: float, work: Path) -> Path:
    run_dir = work / "runs"
    args = [sys.executable, "-m", "vae_scale", "train", str(REPO / "configs" / f"{config}.yaml"),
            f"data.shards_dir={work / 'shards'}", f"run.dir={run_dir}", f"run.name={name}",
            *COMMON, *overrides]  # fmt: skip
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(seconds)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=600)
    if code not in (0, 3):
        raise SystemExit(f"{name} failed ({code}); see {work / f'{name}.log'}")
    return run_dir / name


def laplacian_variance(images: torch.Tensor) -> float:
    grey = (images.float() * 255).mean(1)  # (B, H, W)
    lap = (
        -4 * grey[:, 1:-1, 1:-1] + grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
        + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:]
    )  # fmt: skip
    return lap.flatten(1).var(1).mean().item()


def score(name: str, run: Path, work: Path) -> dict:
    import vae_scale
    from vae_scale.analysis.evaluate import first_images
    from vae_scale.analysis.pictures import save_grid
    from vae_scale.analysis.runs import load_run_config
    from vae_scale.data.streaming.inputs import images_to_float
    from vae_scale.data.streaming.loader import ShardSplit

    done = subprocess.run(
        [sys.executable, "-m", "vae_scale", "eval", str(run), "--iw-samples", "0"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    metrics = json.loads((run / "eval_test.json").read_text())
    model = vae_scale.from_pretrained(run)
    cfg, _ = load_run_config(run)
    data = ShardSplit(work / "shards" / "celeba", "test", cfg.data)
    originals = images_to_float(first_images(data, 64), "cpu")
    recons = model.reconstruct(originals)
    import torchvision.utils as vutils

    pairs = torch.stack([originals[:32], recons[:32]], 1).flatten(0, 1)
    FIGURES.mkdir(exist_ok=True)
    save_grid(vutils.make_grid(pairs, nrow=8, padding=2), FIGURES / f"sharp_{name}.png")
    from vae_scale.run_files.checkpoints import latest_checkpoint, read_train_state

    step = read_train_state(latest_checkpoint(run / "checkpoints"))["opt_step"]
    return {
        "model": name,
        "steps": step,
        "psnr": metrics["test/psnr"],
        "ssim": metrics["test/ssim"],
        "lpips": metrics.get("test/lpips"),
        "bpd": metrics.get("test/bpd"),
        "sharpness": laplacian_variance(recons) / laplacian_variance(originals),
        "eval_stdout_tail": done.stdout.splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall time each")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sharp_autoencoder"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shard_celeba(args.work)
    rows = []
    for name, (config, overrides) in MODELS.items():
        run = train_for(name, config, overrides, args.seconds, args.work)
        rows.append(score(name, run, args.work))
    print(f"| model | steps in {args.seconds:.0f} s | test PSNR dB | SSIM | LPIPS | bits/dim "
          f"| sharpness (recon / original) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lp = f"{r['lpips']:.4f}" if r["lpips"] is not None else "n/a"
        bpd = f"{r['bpd']:.3f}" if r["bpd"] is not None else "n/a"
        print(f"| {r['model']} | {r['steps']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {lp} | "
              f"{bpd} | {r['sharpness']:.3f} |")  # fmt: skip
    print(json.dumps(rows, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
