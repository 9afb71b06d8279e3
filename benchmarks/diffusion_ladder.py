"""Does iFID (or rFID) predict how well a diffusion model learns an autoencoder's latents?

A ladder of autoencoders trained with equal budgets that differ in ways known to matter,
each then encoded (`vae-scale encode`) and probed (`vae-scale probe`) at a short and a long
budget (the long one 4x the short's epochs). For each rung: rFID, iFID, the latent
diagnostics, the probes' val loss and gFID; then Spearman rank correlations of the short
probe's gFID, of iFID and of rFID with the long probe's gFID. Everything through the real CLI,
so the numbers are what a user's runs report.

    python -m benchmarks.diffusion_ladder --work /tmp/ladder [--dataset frey] [--epochs 3]
        [--probe-epochs 3] [--gfid-samples 200]

Needs `vae-scale shard DATASET` done (shards/DATASET) and the FID Inception weights
($VAE_SCALE_WEIGHTS or run.weights_dir).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "celeba64_autoencoder.yaml"

# rung -> overrides of the autoencoder (the rest equal); small models for a CPU
RUNGS = {
    "c4": [],
    "c16": ["model.latent_channels=16"],
    "c4_kl1e-3": ["loss.beta=1e-3"],
    "c4_early": ["train.epochs=1"],  # the same recipe stopped at a third of the budget
}


def vae_scale(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "vae_scale", *args], capture_output=True, text=True, cwd=REPO
    )
    if done.returncode:
        raise SystemExit(f"vae-scale {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return done


def last_row(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dataset", default="frey")
    parser.add_argument("--shards", default=str(REPO / "shards"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--probe-epochs", type=int, default=3, help="the short budget")
    parser.add_argument("--gfid-samples", type=int, default=200)
    args = parser.parse_args()
    runs, latents = args.work / "runs", args.work / "latents"
    common = [
        f"data.shards_dir={args.shards}", f"data.dataset={args.dataset}", f"run.dir={runs}",
        "wandb.mode=disabled", "data.num_workers=0", "train.mixed_precision=no",
        "train.channels_last=false", "eval.picture_epochs=[]", "eval.every_epochs=100",
    ]  # fmt: skip
    autoencoder = [
        "model.widths=[32,64,64]", "model.layers_per_block=1", "loss.perceptual.weight=0",
        "loss.discriminator.weight=0", f"train.epochs={args.epochs}", "eval.rfid=on",
        f"eval.diffusability_samples={args.gfid_samples}",
    ]  # fmt: skip
    results = {}
    for rung, extra in RUNGS.items():
        t0 = time.perf_counter()
        vae_scale("train", str(CONFIG), *common, *autoencoder, f"run.name={rung}", *extra)
        trained = time.perf_counter() - t0
        row = last_row(runs / rung)
        vae_scale("encode", str(runs / rung), "--out", str(latents / rung))
        result = {
            "train_s": trained,
            **{k.removeprefix("test/"): v for k, v in row.items() if k.startswith("test/")},
        }
        for budget, epochs in (("short", args.probe_epochs), ("long", 4 * args.probe_epochs)):
            t0 = time.perf_counter()
            vae_scale(
                "probe", str(latents / rung), f"run.dir={runs}",
                f"run.name=probe_{rung}_{budget}", "wandb.mode=disabled",
                "data.num_workers=0", "train.mixed_precision=no", "model.patch_size=1",
                "model.width=64", f"train.epochs={epochs}",
                f"loss.probe.gfid_samples={args.gfid_samples}", "loss.probe.sample_steps=20",
            )  # fmt: skip
            probe = last_row(runs / f"probe_{rung}_{budget}")
            result[f"probe_{budget}_s"] = time.perf_counter() - t0
            result[f"probe_{budget}_val_fm_loss"] = probe["val/fm_loss"]
            result[f"probe_{budget}_gfid"] = probe["test/gfid"]
        results[rung] = result
        print(rung, json.dumps({k: round(v, 4) for k, v in result.items() if isinstance(v, float)}))
    long = [r["probe_long_gfid"] for r in results.values()]
    correlations = {
        f"{name} vs long-probe gFID": float(spearmanr([r[key] for r in results.values()], long)[0])
        for name, key in (("short-probe gFID", "probe_short_gfid"), ("iFID", "ifid"),
                          ("rFID", "rfid"))
    }  # fmt: skip
    (args.work / "ladder.json").write_text(json.dumps({"rungs": results, **correlations}, indent=1))
    columns = ["rfid", "ifid", "psnr", "latent_high_freq_share", "scale_equivariance_psnr",
               "probe_short_val_fm_loss", "probe_short_gfid", "probe_long_val_fm_loss",
               "probe_long_gfid"]  # fmt: skip
    print("| rung | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for rung, r in results.items():
        print(f"| {rung} | " + " | ".join(f"{r.get(c, float('nan')):.4g}" for c in columns) + " |")
    for name, rho in correlations.items():
        print(f"Spearman {name}: {rho:+.2f}")


if __name__ == "__main__":
    main()
