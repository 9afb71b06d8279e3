"""All benchmarks in one run, written to benchmarks/RESULTS.md.

    python -m benchmarks.run [--only data,train,flops,ddp] [--quick] [--threads N] [--no-write]

Parts (device auto-detected: CUDA when available, else CPU):
  data   decoded samples/s of our shard reader vs the loader a user would write (torchvision
         MNIST/CIFAR10, TensorDataset of the Frey .mat, ImageFolder + crop/resize for CelebA),
         0/1/2 loader workers, median of repeated passes after a warm-up pass
  train  training-step images/s per model config: fp32/bf16 (+fp16 on GPU), channels_last
         off/on, torch.compile, synthetic in-memory batches vs the real data pipeline
  flops  FLOPs per image (forward + backward, FlopCounterMode); MFU against the measured
         bf16 matmul rate on a GPU
  ddp    1 vs 2 DDP processes (gloo, CPU) through `accelerate launch ... vae-scale train`

Shards are read from shards/DATASET, else from --fallback-shards (built there with
`vae-scale shard` when missing). Raw files for the baselines: --data-root / $VAE_SCALE_DATA.
The device's section of RESULTS.md (one for CPU, one for CUDA) is rewritten; parts not run
this time are kept. On a shared machine run it niced, and with `--threads 1` when the load
exceeds the cores: `nice -n 10 python -m benchmarks.run --threads 1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.report import Budget, DataRow, DdpRow, FlopsRow, TrainRow

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"


@dataclass(frozen=True)
class Model:
    name: str
    config: str  # relative to the repository
    dataset: str
    # A ResNet: on a CPU it runs at a reduced batch, uncompiled (inductor needs minutes here)
    # and without bf16 unless the CPU has bf16 hardware.
    heavy: bool


MODELS = (
    Model("frey conv", "configs/frey_conv.yaml", "frey", False),
    Model("mnist mlp", "configs/mnist_mlp_z20.yaml", "mnist", False),
    Model("cifar10 resnet", "configs/cifar10_resnet.yaml", "cifar10", True),
    Model("celeba64 resnet", "configs/celeba64_resnet.yaml", "celeba", True),
)


FULL = Budget(
    data_samples={"frey": 1765, "mnist": 3200, "cifar10": 2000, "celeba": 2000},
    data_repeats=3,
    data_workers=(0, 1, 2),
    cpu_resnet_batch=8,
    warmup=2,
    repeats=5,
    block_s=1.0,
    ddp_epochs=3,
    ddp_runs=3,
)
QUICK = dataclasses.replace(
    FULL,
    data_samples={"frey": 1765, "mnist": 1600, "cifar10": 1000, "celeba": 2000},
    cpu_resnet_batch=4,
    warmup=1,
    repeats=3,
    block_s=0.3,
    ddp_epochs=2,
    ddp_runs=2,
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def versions() -> str:
    names = ("torch", "torchvision", "accelerate", "webdataset")
    return ", ".join(f"{n} {version(n)}" for n in names) + f", python {platform.python_version()}"


def shard_dir(dataset: str, fallback: Path) -> Path:
    """shards/DATASET when built, else FALLBACK/DATASET (built now if missing)."""
    for root in (REPO / "shards", fallback):
        if (root / dataset / "index.json").is_file():
            return root / dataset
    log(f"building {dataset} shards into {fallback} ...")
    cmd = [sys.executable, "-m", "vae_scale", "shard", dataset, "--out", str(fallback)]
    subprocess.run([*cmd, "--no-download"], cwd=REPO, check=True)
    return fallback / dataset


# ---------------------------------------------------------------------------- parts


def run_data(budget: Budget, shards: dict[str, Path], data_root: Path, work: Path) -> list[DataRow]:
    from benchmarks.data_pipeline import timed_passes
    from benchmarks.loaders import build_pairs

    rows = []
    pairs = build_pairs(shards, data_root, budget.data_samples, batch_size=100, work=work)
    for pair in pairs:
        # the RAM cache is for datasets that fit in memory
        settings = [(w, False) for w in budget.data_workers]
        if pair.dataset in budget.data_cached:
            settings += [(w, True) for w in budget.data_workers]
        for workers, cached in settings:
            ours = timed_passes(pair.ours(workers, cached), budget.data_repeats)
            base = timed_passes(pair.baseline(workers), budget.data_repeats)
            assert ours[2] == base[2] == pair.samples, (ours[2], base[2], pair.samples)
            row = DataRow(
                pair.dataset,
                pair.baseline_name,
                workers,
                ours[2] / ours[0],
                base[2] / base[0],
                ours[2] / ours[1],
                base[2] / base[1],
                cached=cached,
            )
            log(
                f"  data {pair.dataset} workers={workers}{' cached' if cached else ''}: "
                f"ours {row.ours_per_s:.0f}/s, baseline {row.baseline_per_s:.0f}/s"
            )
            rows.append(row)
    return rows


def model_overrides(model: Model, shards: Path, budget: Budget, on_gpu: bool) -> list[str]:
    overrides = [f"data.shards_dir={shards.parent}", "wandb.mode=disabled"]
    if model.heavy and not on_gpu:
        overrides.append(f"data.batch_size={budget.cpu_resnet_batch}")
    return overrides


def run_train(budget: Budget, shards: dict[str, Path], on_gpu: bool) -> list[TrainRow]:
    from benchmarks.steps import measure_config, settings_for
    from vae_scale.config import load_config

    rows = []
    for model in MODELS:
        path = REPO / model.config
        overrides = model_overrides(model, shards[model.dataset], budget, on_gpu)
        cfg = load_config(path, overrides)
        shape = image_shape(shards[model.dataset])
        heavy = model.heavy and not on_gpu
        settings = settings_for(cfg, on_gpu, compile_ok=not heavy, heavy=heavy)
        rows += measure_config(
            model.name,
            path,
            overrides,
            shape,
            shards[model.dataset],
            settings,
            budget.warmup,
            budget.repeats,
            budget.block_s,
            log,
        )
    return rows


def image_shape(shards: Path) -> tuple[int, int, int]:
    from vae_scale.data.sourcing.shards import load_index

    c, h, w = load_index(shards)["image_shape"]
    return (c, h, w)


def run_flops(shards: dict[str, Path], train_rows: list[TrainRow]) -> list[FlopsRow]:
    from benchmarks.steps import bf16_matmul_peak, count_flops_per_image
    from vae_scale.config import load_config
    from vae_scale.losses import build_likelihood
    from vae_scale.models import build_model

    device = torch.device(device_kind())
    peak = bf16_matmul_peak(device)
    rows = []
    for model in MODELS:
        cfg = load_config(REPO / model.config)
        shape = image_shape(shards[model.dataset])
        net = build_model(cfg.model, shape, build_likelihood(cfg.loss.likelihood, shape))
        measured = [r.img_per_s for r in train_rows if r.config == model.name and r.img_per_s]
        rows.append(
            FlopsRow(
                model.name,
                sum(p.numel() for p in net.parameters()),
                count_flops_per_image(cfg, shape),
                max(measured) if measured else None,
                peak,
            )
        )
        log(f"  flops {model.name}: {rows[-1].flops_per_image / 1e9:.3f} GFLOP/image")
    return rows


def run_ddp(budget: Budget, threads: int) -> list[DdpRow]:
    """1 process with `threads` threads vs 2 processes with half of them each (at least 1)."""
    from benchmarks import ddp_throughput as ddp

    per_proc = max(1, threads // 2)
    config, batch = "configs/frey_conv.yaml", 32
    # train.cpu: gloo on the CPU also on a GPU machine (this part measures CPU DDP).
    common = [f"train.epochs={budget.ddp_epochs}", f"eval.every_epochs={budget.ddp_epochs}"]
    common += ["eval.picture_epochs=[]", "train.cpu=true"]
    runs = [
        (
            "1 process",
            ["--num_processes", "1", "--num_cpu_threads_per_process", str(threads)],
            threads,
            batch,
        ),
        (
            "2 processes, same global batch",
            ["--config_file", "launch/cpu_2proc.yaml"],
            per_proc,
            batch // 2,
        ),
        (
            "2 processes, batch per process unchanged",
            ["--config_file", "launch/cpu_2proc.yaml"],
            per_proc,
            batch,
        ),
    ][: budget.ddp_runs]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        for i, (label, launch, n_threads, b) in enumerate(runs):
            r = ddp.run(
                f"r{i}", launch, n_threads, config, [*common, f"data.batch_size={b}"], Path(tmp)
            )
            rows.append(
                DdpRow(
                    label,
                    r["processes"],
                    n_threads,
                    r["global_batch"],
                    r["img_per_s"],
                    r["img_per_cpu_s"],
                )
            )
    return rows


# ---------------------------------------------------------------------------- RESULTS.md


def section_header(kind: str, command: str, text: str) -> str:
    title = "GPU (CUDA)" if kind == "cuda" else "CPU"
    lines = [
        f"## `python -m benchmarks.run` on {title}",
        f"Device: {device_name()}. Versions: {versions()}. Commit: "
        f"{_git_commit()}. Reproduce: `VAE_SCALE_DATA=../shared/data nice -n 10 {command}` "
        f"(each part names the command that measured it).",
    ]
    if kind == "cpu" and report._begin("cuda") not in text:
        lines.append(
            "GPU rows (fp16, MFU, the 10 s CIFAR-10 epoch target): pending, no GPU run yet; "
            "`python -m benchmarks.run` on a GPU machine adds its own section."
        )
    return "\n\n".join(lines)


def _git_commit() -> str:
    """Short commit, marked when the working tree has uncommitted changes."""
    from vae_scale.training.tracking import git_commit

    commit = (git_commit() or "?")[:12]
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return commit + (" + uncommitted changes" if status.stdout.strip() else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(report.PARTS), help="comma-separated parts")
    parser.add_argument("--quick", action="store_true", help="fewer samples and steps")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--fallback-shards", type=Path, default=Path("/tmp/bench_shards"))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(report.PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {sorted(unknown)}; choose from {report.PARTS}")

    from vae_scale.data.sourcing.fetch import resolve_data_root

    if args.threads:
        torch.set_num_threads(args.threads)
    cores = os.cpu_count() or 1
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > cores and torch.get_num_threads() > 1:
        # Measured here: with the cores oversubscribed, every parallel region waits for a
        # descheduled thread; the MNIST MLP step ran 6-7x slower with 2 threads than with 1.
        log(
            f"warning: load average {os.getloadavg()[0]:.1f} > {cores} cores with "
            f"{torch.get_num_threads()} torch threads: CPU timings will be dominated by thread "
            f"waits; consider --threads 1"
        )
    budget = QUICK if args.quick else FULL
    on_gpu = device_kind() == "cuda"
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.run", *map(shlex.quote, given)])
    data_root = args.data_root or resolve_data_root()
    shards = {}
    if set(parts) & {"data", "train", "flops"}:
        shards = {m.dataset: shard_dir(m.dataset, args.fallback_shards) for m in MODELS}
    log(f"{device_name()}; {versions()}; load average {load_average()}")

    results, blocks = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        for part in (p for p in report.PARTS if p in parts):
            started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            load_before, t0 = load_average(), time.perf_counter()
            log(f"{part} ...")
            if part == "data":
                results[part] = run_data(budget, shards, data_root, Path(tmp))
            elif part == "train":
                results[part] = run_train(budget, shards, on_gpu)
            elif part == "flops":
                results[part] = run_flops(shards, results.get("train", []))
            else:
                results[part] = run_ddp(budget, torch.get_num_threads())
            stamp = report.Stamp(started, load_before, load_average(), command)
            blocks[part] = report.part_markdown(part, results[part], budget, stamp)
            print(blocks[part] + "\n", flush=True)
            log(f"{part}: {time.perf_counter() - t0:.0f} s")
            if not args.no_write:  # after every part: a later failure keeps what was measured
                write_results(args.results, command, {part: blocks[part]})


def write_results(path: Path, command: str, blocks: dict[str, str]) -> None:
    """Rewrite this device's section of RESULTS.md (re-read just before: a shared file)."""
    text = path.read_text() if path.is_file() else "# vae_scale benchmark results\n"
    header = section_header(device_kind(), command, text)
    path.write_text(report.upsert_section(text, device_kind(), header, blocks))
    log(f"wrote {', '.join(blocks)} to the {device_kind()} section of {path}")


if __name__ == "__main__":
    main()
