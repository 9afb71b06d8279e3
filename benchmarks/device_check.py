"""The one prepared GPU check (issue 21): one command, at most 8 minutes on an H200.

    bash benchmarks/device_check.sh --out OUT                # on the GPU machine
    bash benchmarks/device_check.sh --cpu --quick --out OUT  # here and in CI, CI-sized

It runs, in this order, each part only while the time budget (--budget-s) allows:
  1. the GPU tests (`pytest -m gpu tests/test_gpu.py`; skipped without CUDA);
  2. CIFAR-10 shards from the carried slice (.device_data/, else synthetic CIFAR-format files)
     and synthetic CelebA-64 shards;
  3. training images/s of cifar10_resnet, cifar10_hvae and celeba64_resnet at fp32/bf16/fp16
     x compile off/on (synthetic uint8 batches in pinned memory, the loop's own train_step),
     with MFU from the FLOP counter against the bf16 matmul rate measured in the same run,
     and torch.compile's modes for cifar10_resnet bf16;
  4. the loader alone on --workers workers: the images/s the host can feed;
  5. a real CIFAR-10 run of --run-s seconds: test bits/dim per epoch;
and writes OUT/device_check.json and OUT/RESULTS_section.md (paste into benchmarks/RESULTS.md).

Prepare what travels, here, once, from the repository root (both folders are git-ignored):
  python -m benchmarks.device_check --prepare   # a 27.6 MB CIFAR-10 slice -> .device_data/
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
      --platform manylinux2014_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7 \\
      pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
Then, with the device tool: run(command="bash benchmarks/device_check.sh --out $OUT",
carry=[".whl", ".device_data"], timeout_s=560).
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks import steps
from vae_scale.config import load_config
from vae_scale.training.tracking import git_commit

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO / ".device_data" / "cifar-10-batches-py"
SLICE_TRAIN, SLICE_TEST = 8000, 1000  # 9000 x 3072 bytes = 27.6 MB
CONFIGS = ("cifar10_resnet", "cifar10_hvae", "celeba64_resnet")
SHAPES = {"cifar10": (3, 32, 32), "celeba": (3, 64, 64)}
GPU_BATCH = {"cifar10_resnet": 512, "cifar10_hvae": 128, "celeba64_resnet": 256}
# --quick on a CPU: the same configs, shrunk so that every part runs in CI time
QUICK = {
    "cifar10_resnet": "model.widths=[8,16] model.blocks_per_stage=1 model.latent_channels=4 "
    "model.groups=4",
    "cifar10_hvae": "model.widths=[8,8,8,8,8] model.latent_groups=[1,2,1,0,0] "
    "model.encoder_blocks=[1,1,1,1,1] model.latent_channels=2 loss.likelihood=logistic",
    "celeba64_resnet": "model.widths=[8,8,8,8,8] model.blocks_per_stage=1 model.groups=4 "
    "model.latent_dim=8",
}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float, what: str, skipped: list[str]) -> bool:
        if self.left() >= seconds:
            return True
        skipped.append(f"{what}: not run, {self.left():.0f} s of the budget left")
        log(skipped[-1])
        return False


# ------------------------------------------------------------------------------------ data


def write_cifar_batches(folder: Path, train: tuple, test: tuple) -> None:
    """CIFAR-10's own file format (python pickles of rows of 3072 bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in (("data_batch_1", train), ("test_batch", test)):
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # HWC -> CHW rows
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [int(v) for v in labels]}, f)


def prepare_slice(shared: Path) -> Path:
    """The first images of the shared data_batch_1 and test_batch, as CIFAR-10 files."""
    from vae_scale.data.sourcing.cifar10 import load_batch

    source = shared / "cifar10" / "cifar-10-batches-py"
    if not source.is_dir():
        source = shared / "cifar10"
    train_images, train_labels = load_batch(source / "data_batch_1")
    test_images, test_labels = load_batch(source / "test_batch")
    write_cifar_batches(
        SLICE,
        (train_images[:SLICE_TRAIN], train_labels[:SLICE_TRAIN]),
        (test_images[:SLICE_TEST], test_labels[:SLICE_TEST]),
    )
    return SLICE


def synthetic_cifar(folder: Path, train: int, test: int) -> Path:
    """Smooth random images (a learnable signal, not noise) in CIFAR-10's format."""
    rng = np.random.default_rng(0)

    def images(n: int) -> np.ndarray:
        coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
        return coarse.repeat(8, axis=1).repeat(8, axis=2)

    write_cifar_batches(
        folder,
        (images(train), rng.integers(0, 10, train)),
        (images(test), rng.integers(0, 10, test)),
    )
    return folder


def make_shards(work: Path, quick: bool) -> tuple[Path, str]:
    from vae_scale.cli import main as cli
    from vae_scale.data.sourcing.base import SourceData
    from vae_scale.data.sourcing.shards import write_dataset

    if (SLICE / "data_batch_1").is_file() and not quick:
        source, what = SLICE, f"real CIFAR-10 slice ({SLICE_TRAIN} train, {SLICE_TEST} test)"
    else:
        n = (600, 200) if quick else (SLICE_TRAIN, SLICE_TEST)
        source, what = synthetic_cifar(work / "cifar_src", *n), f"synthetic CIFAR-format {n}"
    shards = work / "shards"
    args = ["shard", "cifar10", "--source", str(source), "--out", str(shards), "--no-download"]
    if cli([*args, "--shard-size", "500"]) != 0:
        raise SystemExit("sharding the CIFAR-10 slice failed")
    rng = np.random.default_rng(1)
    faces = [
        {"__key__": f"f{i:05d}", "npy": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}
        for i in range(256)
    ]
    write_dataset(
        SourceData(
            "celeba", (3, 64, 64), {"train": faces, "val": faces[:64], "test": faces[:64]}, {}
        ),
        shards / "celeba",
        shard_size=128,
    )
    return shards, what


# ------------------------------------------------------------------------------ the parts


def gpu_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    proc = subprocess.run([*cmd, "tests/test_gpu.py"], cwd=REPO, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    log(f"GPU tests: {summary}")
    return {"returncode": proc.returncode, "summary": summary, "tail": proc.stdout[-3000:]}


def throughput(shards: Path, quick: bool, on_gpu: bool, budget: Budget, skipped: list) -> list:
    rows = []
    peak = steps.bf16_matmul_peak(torch.device("cuda")) if on_gpu else None
    precisions = ("no", "bf16", "fp16") if on_gpu else ("no",)
    compiles = (False, True) if on_gpu else (False,)
    warmup, repeats, block_s = (1, 1, 0.3) if quick else (3, 3, 2.0)
    for name in CONFIGS:
        path = REPO / "configs" / f"{name}.yaml"
        batch = GPU_BATCH[name] if on_gpu else 8
        overrides = [f"data.shards_dir={shards}", f"data.batch_size={batch}", "wandb.mode=disabled"]
        overrides += QUICK[name].split() if quick else []
        cfg = load_config(path, overrides)
        shape = SHAPES[cfg.data.dataset]
        flops = steps.count_flops_per_image(cfg, shape)
        settings = [(p, c, "default") for c in compiles for p in precisions]
        if on_gpu and name == "cifar10_resnet":
            settings += [("bf16", True, mode) for mode in COMPILE_MODES[1:]]
        for precision, compiled, mode in settings:
            what = f"{name} {precision} compile={compiled} {mode}"
            if not budget.allows(90 if compiled else 20, what, skipped):
                continue
            setting = steps.Setting(precision, True, compiled, ("synthetic",))
            run_cfg = steps.config_for(path, [*overrides, f"train.compile_mode={mode}"], setting)
            start = time.perf_counter()
            rates, warm_s = steps.measure_setting(
                run_cfg, ("synthetic",), shape, shards / cfg.data.dataset, warmup, repeats, block_s
            )
            img_s = rates["synthetic"][0]
            row = {
                "config": name, "batch": batch,
                "precision": "fp32" if precision == "no" else precision,
                "compile": compiled, "mode": mode if compiled else "", "img_per_s": img_s,
                "s_per_50k_epoch": 50_000 / img_s, "gflop_per_image": flops / 1e9,
                "mfu": img_s * flops / peak if peak else None, "warmup_s": warm_s,
            }  # fmt: skip
            rows.append(row)
            log(
                f"{what}: {img_s:,.0f} img/s (warm-up {warm_s:.0f} s, "
                f"{time.perf_counter() - start:.0f} s)"
            )
    return rows, peak


def loader_alone(shards: Path, workers: int, seconds: float) -> dict:
    """Images/s of the training stream with no model: what the host can feed."""
    cfg = load_config(
        REPO / "configs" / "cifar10_resnet.yaml",
        [f"data.shards_dir={shards}", f"data.num_workers={workers}", "data.batch_size=256"],
    )
    stream = steps.training_stream(cfg, shards / "cifar10")
    start = time.perf_counter()
    next(stream)
    first_s = time.perf_counter() - start
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += len(next(stream)["image"])
    rate = images / (time.perf_counter() - start)
    log(f"loader alone, {workers} workers: {rate:,.0f} img/s (first batch {first_s:.2f} s)")
    return {"workers": workers, "img_per_s": rate, "first_batch_s": first_s}


def real_run(
    work: Path, shards: Path, seconds: float, quick: bool, on_gpu: bool, workers: int
) -> dict:
    run_dir = work / "runs"
    overrides = [
        f"data.shards_dir={shards}", f"run.dir={run_dir}", "run.name=real", "wandb.mode=disabled",
        "eval.picture_epochs=[]", "train.epochs=200", f"data.num_workers={workers}",
        "train.log_every_steps=50", f"train.mixed_precision={'bf16' if on_gpu else 'no'}",
    ]  # fmt: skip
    if on_gpu:
        overrides.append(f"data.batch_size={GPU_BATCH['cifar10_resnet']}")
    if quick:
        overrides += [*QUICK["cifar10_resnet"].split(), "train.epochs=2", "data.batch_size=16"]
    cmd = [sys.executable, "-m", "vae_scale", "train", "configs/cifar10_resnet.yaml", *overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds)
        status = f"finished, exit {proc.returncode}"
        tail = proc.stderr[-1500:]
    except subprocess.TimeoutExpired as err:  # the time limit is the plan: rows so far count
        status, tail = f"stopped after {seconds:.0f} s", str(err.stderr or "")[-1500:]
    rows = []
    metrics = run_dir / "real" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    bpd = [r.get("test/bpd") for r in rows]
    falls = len(bpd) >= 2 and all(b < a for a, b in zip(bpd, bpd[1:]))
    log(f"real run: {status}, {len(rows)} epochs, test bpd {[round(b, 3) for b in bpd]}")
    return {
        "status": status, "seconds": time.perf_counter() - start, "epochs": len(rows),
        "test_bpd": bpd, "bpd_falls_every_epoch": falls,
        "epoch_s": [r.get("time/epoch_s") for r in rows],
        "train_img_per_s": [r.get("throughput/train_img_per_s") for r in rows],
        "stderr_tail": tail if not rows else "",
    }  # fmt: skip


# ---------------------------------------------------------------------------------- report


def results_section(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"## Device check: {env['device']} ({result['date']})",
        "",
        f"Command: `{result['command']}` at commit `{result['commit']}`; torch {env['torch']}; "
        f"data: {result['data']}; budget {result['budget_s']:.0f} s, used "
        f"{result['seconds']:.0f} s.",
        "",
        f"GPU tests: {result['gpu_tests']['summary']}",
        "",
    ]
    peak = result.get("bf16_peak_tflops")
    lines += [
        f"Training images/s (synthetic uint8 batches; bf16 matmul peak measured: "
        f"{peak:.0f} TFLOP/s)"
        if peak
        else "Training images/s (synthetic uint8 batches)",
        "",
        "| config | batch | precision | compile | img/s | s per 50k | GFLOP/img | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["throughput"]:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] else "—"
        compiled = r["mode"] if r["compile"] else "off"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['precision']} | {compiled} | "
            f"{r['img_per_s']:,.0f} | {r['s_per_50k_epoch']:.2f} | "
            f"{r['gflop_per_image']:.2f} | {mfu} |"
        )
    loader = result.get("loader")
    if loader:
        lines += ["", f"Loader alone, {loader['workers']} workers: "
                  f"{loader['img_per_s']:,.0f} img/s "
                  f"(first batch {loader['first_batch_s']:.2f} s)."]  # fmt: skip
    run = result.get("real_run")
    if run:
        bpd = ", ".join(f"{b:.3f}" for b in run["test_bpd"] if b is not None)
        lines += ["", f"Real CIFAR-10 run ({run['status']}): {run['epochs']} epochs, test bpd "
                  f"{bpd}; falls every epoch: {run['bpd_falls_every_epoch']}."]  # fmt: skip
    if result["skipped"]:
        lines += ["", "Not run: " + "; ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for device_check.json and the section")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (no GPU expected)")
    parser.add_argument("--quick", action="store_true", help="CI-sized: shrunk models, tiny data")
    parser.add_argument("--budget-s", type=float, default=None, help="default 450 (GPU), 240 (CPU)")
    parser.add_argument(
        "--workers", type=int, default=None, help="loader workers (default 14 on GPU)"
    )
    parser.add_argument("--run-s", type=float, default=None, help="real run seconds (default 180)")
    parser.add_argument("--prepare", action="store_true", help="write .device_data/ and exit")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args(argv)
    if args.prepare:
        log(f"wrote {prepare_slice(args.shared)}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu and not args.cpu:
        parser.error("no CUDA GPU here: pass --cpu to run the check on the CPU")
    budget_s = args.budget_s or (450.0 if on_gpu else 240.0)
    budget, skipped, t0 = Budget(budget_s), [], time.perf_counter()
    workers = args.workers if args.workers is not None else (14 if on_gpu else 2)
    run_s = args.run_s or (180.0 if on_gpu else 120.0)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    device = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    result: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": git_commit() or "unknown",
        "command": "bash benchmarks/device_check.sh " + " ".join(argv or sys.argv[1:]),
        "environment": {
            "device": device, "torch": torch.__version__, "python": sys.version.split()[0],
        },
        "budget_s": budget_s,
        "skipped": skipped,
    }  # fmt: skip
    log(f"{device}, torch {torch.__version__}, budget {budget_s:.0f} s")
    result["gpu_tests"] = gpu_tests()
    shards, result["data"] = make_shards(work, args.quick)
    result["throughput"], peak = throughput(shards, args.quick, on_gpu, budget, skipped)
    result["bf16_peak_tflops"] = peak / 1e12 if peak else None
    if budget.allows(15, "loader alone", skipped):
        result["loader"] = loader_alone(shards, workers, 2.0 if args.quick else 8.0)
    run_s = min(run_s, max(0.0, budget.left() - 5))
    if budget.allows(20, "real run", skipped):
        result["real_run"] = real_run(work, shards, run_s, args.quick, on_gpu, workers)
    result["seconds"] = time.perf_counter() - t0
    (args.out / "device_check.json").write_text(json.dumps(result, indent=1))
    (args.out / "RESULTS_section.md").write_text(results_section(result))
    log(
        f"wrote {args.out / 'device_check.json'} and RESULTS_section.md in "
        f"{result['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
