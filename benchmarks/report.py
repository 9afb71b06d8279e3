"""Benchmark results -> markdown tables -> one section of benchmarks/RESULTS.md.

Pure functions (no timing, no torch): `python -m benchmarks.run` hands them the measured rows,
and tests/test_benchmarks_report.py checks them on made-up numbers.

RESULTS.md layout: each device kind ("cpu", "cuda") owns one section between
`<!-- bench:KIND:begin -->` and `<!-- bench:KIND:end -->`; inside it every part (data, train,
flops, ddp) sits between `<!-- bench:KIND:PART -->` and `<!-- /bench:KIND:PART -->`, so a run
with `--only train` replaces the train table and keeps the others. Text outside the markers
(other people's sections) is never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PARTS = ("data", "train", "flops", "ddp")
OVERHEAD_TARGET_PCT = 5.0


@dataclass
class DataRow:
    """One dataset at one loader worker count: samples per pass and seconds per pass."""

    dataset: str
    baseline: str  # what a user would write instead, e.g. "torchvision MNIST + ToTensor"
    workers: int
    ours_per_s: float  # decoded samples/s, wall clock, median pass
    baseline_per_s: float
    ours_per_cpu_s: float  # samples per CPU-second (process + its loader workers)
    baseline_per_cpu_s: float
    cached: bool = False  # ours with data.cache_in_memory (shards decoded once, kept in RAM)


@dataclass
class TrainRow:
    """Training-step throughput of one model config in one setting."""

    config: str
    batch: int
    precision: str
    channels_last: bool | None  # None: not a conv net (MLP)
    compile: bool
    input: str  # "synthetic" or "pipeline"
    img_per_s: float | None  # None: not measured (reason in `note`)
    note: str = ""
    # images per CPU-second of the training process (its loader workers not included):
    # steadier than img/s when other jobs take the CPU
    img_per_cpu_s: float | None = None


@dataclass
class FlopsRow:
    config: str
    params: int
    flops_per_image: float  # forward + backward of one training step
    img_per_s: float | None  # the fastest measured setting
    peak_flops: float | None  # measured bf16 matmul FLOP/s (GPU only)


@dataclass
class DdpRow:
    label: str
    processes: int
    threads: int
    global_batch: int
    img_per_s: float
    img_per_cpu_s: float | None = None  # training images per CPU-second of the whole launch


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def data_table(rows: list[DataRow]) -> str:
    """Per dataset and worker count: ours vs baseline, wall and per CPU-second."""
    body = []
    for r in rows:
        per = max(1, r.workers)
        body.append(
            [
                r.dataset,
                r.baseline,
                f"{r.workers}, ours from RAM cache" if r.cached else str(r.workers),
                fmt_rate(r.ours_per_s),
                fmt_rate(r.ours_per_s / per),
                fmt_rate(r.baseline_per_s),
                fmt_rate(r.baseline_per_s / per),
                f"**{fmt_ratio(ratio(r.ours_per_s, r.baseline_per_s))}**",
                fmt_ratio(ratio(r.ours_per_cpu_s, r.baseline_per_cpu_s)),
            ]
        )
    header = [
        "dataset",
        "baseline",
        "loader workers",
        "ours samples/s",
        "ours per worker",
        "baseline samples/s",
        "baseline per worker",
        "ours/baseline (wall)",
        "ours/baseline (per CPU-s)",
    ]
    return md_table(header, body)


def data_headline(rows: list[DataRow]) -> dict[str, float | None]:
    """dataset -> ours/baseline wall ratio at the largest worker count measured (streaming)."""
    best: dict[str, DataRow] = {}
    for r in rows:
        if r.cached:
            continue
        if r.dataset not in best or r.workers > best[r.dataset].workers:
            best[r.dataset] = r
    return {d: ratio(r.ours_per_s, r.baseline_per_s) for d, r in best.items()}


def _setting(r: TrainRow) -> tuple:
    """Everything but the input source: a synthetic and a pipeline row with equal settings
    are a pair."""
    return (r.config, r.batch, r.precision, r.channels_last, r.compile)


def train_table(rows: list[TrainRow]) -> str:
    """Every setting, with its speed relative to the config's first (reference) row."""
    body, reference = [], {}
    for r in rows:
        reference.setdefault(r.config, r)
        ref = reference[r.config]
        cl = "n/a" if r.channels_last is None else ("on" if r.channels_last else "off")
        body.append(
            [
                r.config,
                str(r.batch),
                r.precision,
                cl,
                "on" if r.compile else "off",
                r.input,
                fmt_rate(r.img_per_s),
                "reference" if r is ref else fmt_ratio(ratio(r.img_per_s, ref.img_per_s)),
                fmt_rate(r.img_per_cpu_s),
                r.note,
            ]
        )
    header = ["config", "batch", "precision", "channels_last", "compile", "input"]
    header += ["img/s", "vs reference", "img/CPU-s (main process)", "note"]
    return md_table(header, body)


def overhead_pct(synthetic: float | None, pipeline: float | None) -> float | None:
    """Input-pipeline overhead: how much slower the loop is with real batches, in %."""
    if synthetic is None or pipeline is None or not synthetic:
        return None
    return 100.0 * (synthetic - pipeline) / synthetic


def setting_label(r: TrainRow) -> str:
    cl = "" if r.channels_last is None else f", channels_last {'on' if r.channels_last else 'off'}"
    return f"{r.precision}{cl}, compile {'on' if r.compile else 'off'}"


def overhead_rows(rows: list[TrainRow]) -> list[tuple[str, str, float, float, float]]:
    """(config, setting, synthetic img/s, pipeline img/s, overhead %) for every measured
    pipeline row, paired with the synthetic row of the same settings."""
    synthetic = {_setting(r): r for r in rows if r.input == "synthetic" and r.img_per_s}
    out = []
    for r in rows:
        twin = synthetic.get(_setting(r))
        if r.input == "pipeline" and r.img_per_s and twin is not None:
            pct = overhead_pct(twin.img_per_s, r.img_per_s)
            out.append((r.config, setting_label(r), twin.img_per_s, r.img_per_s, pct))
    return out


def overhead_table(rows: list[TrainRow]) -> str:
    body = [
        [
            config,
            setting,
            fmt_rate(syn),
            fmt_rate(pipe),
            f"{pct:.1f}%",
            "yes" if pct <= OVERHEAD_TARGET_PCT else "**no**",
        ]
        for config, setting, syn, pipe, pct in overhead_rows(rows)
    ]
    header = ["config", "setting", "synthetic img/s", "pipeline img/s", "overhead", "<= 5%"]
    return md_table(header, body)


def flops_table(rows: list[FlopsRow]) -> str:
    body = []
    for r in rows:
        achieved = r.flops_per_image * r.img_per_s if r.img_per_s else None
        mfu = ratio(achieved, r.peak_flops)
        body.append(
            [
                r.config,
                f"{r.params / 1e6:.2f} M",
                f"{r.flops_per_image / 1e9:.3f}",
                fmt_rate(r.img_per_s),
                "n/a" if achieved is None else f"{achieved / 1e12:.3f}",
                "n/a" if r.peak_flops is None else f"{r.peak_flops / 1e12:.0f}",
                "n/a (CPU)" if mfu is None else f"{100 * mfu:.1f}%",
                "n/a" if not r.img_per_s else f"{50_000 / r.img_per_s:,.1f}",
            ]
        )
    header = [
        "config",
        "params",
        "GFLOP/image (fwd+bwd)",
        "img/s (fastest setting)",
        "achieved TFLOP/s",
        "bf16 matmul peak TFLOP/s (measured)",
        "MFU",
        "s per 50,000 images",
    ]
    return md_table(header, body)


def ddp_table(rows: list[DdpRow]) -> str:
    base = rows[0].img_per_s if rows else None
    base_cpu = rows[0].img_per_cpu_s if rows else None
    body = [
        [
            r.label,
            f"{r.processes} x {r.threads}",
            str(r.global_batch),
            fmt_rate(r.img_per_s),
            fmt_ratio(ratio(r.img_per_s, base)),
            fmt_rate(r.img_per_cpu_s),
            fmt_ratio(ratio(r.img_per_cpu_s, base_cpu)),
        ]
        for r in rows
    ]
    header = ["run", "processes x threads", "global batch", "train img/s", "scaling vs 1 process"]
    header += ["train images per CPU-s (whole launch)", "vs 1 process"]
    return md_table(header, body)


# ---------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Budget:
    """How much to measure: --quick shrinks everything."""

    data_samples: dict[str, int]  # samples per pass (rounded up to whole shards)
    data_repeats: int
    data_workers: tuple[int, ...]
    cpu_resnet_batch: int  # the ResNets' batch on CPU (the configs' 128 is for GPUs)
    warmup: int
    repeats: int
    block_s: float  # seconds per timed block of steps
    ddp_epochs: int
    ddp_runs: int  # 2: 1 proc vs 2 procs (same global batch); 3: + 2 procs at batch B each
    # datasets also measured with our RAM cache (fit in memory; CelebA's full set does not)
    data_cached: tuple[str, ...] = ("frey", "mnist", "cifar10")


@dataclass
class Stamp:
    """When and how a part was measured."""

    started: str
    load_before: str
    load_after: str
    command: str


def part_markdown(part: str, result: list, budget: Budget, stamp: Stamp) -> str:
    """One part's block: title, when/how measured, what was measured, table(s)."""
    when = (
        f"_Measured {stamp.started}, load average (1, 5, 15 min) {stamp.load_before} before "
        f"and {stamp.load_after} after; `{stamp.command}`._"
    )
    if part == "data":
        head = data_headline(result)
        sizes = ", ".join(f"{k}: {v}" for k, v in budget.data_samples.items())
        lines = [
            "### Data pipeline: decoded samples/s, ours vs the loader a user would write",
            when,
            f"Train split, first {sizes} samples (whole shards), batch 100, same "
            f"DataLoader worker count / prefetch / "
            f"pinning on both sides; median of {budget.data_repeats} passes after a warm-up "
            f"pass. Per CPU-s: samples per CPU-second of the process and its workers (fairer "
            f"on a loaded machine). Target: ours >= baseline everywhere, >= 3x for CelebA-64.",
            data_table(result),
            "Headline (ours/baseline, wall, most workers): "
            + ", ".join(f"{d} {fmt_ratio(r)}" for d, r in head.items()),
        ]
    elif part == "train":
        lines = [
            "### Training step throughput (images/s)",
            when,
            f"Median of {budget.repeats} timed blocks (~{budget.block_s:g} s each) after "
            f"{budget.warmup} warm-up steps; `vs reference` is against the config's first row. "
            "On CPU the ResNets run at a reduced batch (see the column); fp16 and MFU only on "
            "GPU.",
            train_table(result),
            "Input-pipeline overhead (data pipeline in the loop vs synthetic in-memory "
            "batches, same settings; target <= 5%):",
            overhead_table(result),
        ]
    elif part == "flops":
        lines = [
            "### Model FLOPs per image and utilisation",
            when,
            "FlopCounterMode over one eager fp32 forward + backward (matmuls and "
            "convolutions); img/s: the fastest setting of this run's train part (n/a when "
            "run without it); MFU = FLOPs/image x img/s / measured dense bf16 matmul rate.",
            flops_table(result),
        ]
    else:
        lines = [
            "### DDP overhead: 1 vs 2 processes (gloo, CPU)",
            when,
            f"Frey conv config, {budget.ddp_epochs} epochs, through `accelerate launch "
            f"-m vae_scale.cli train`; train img/s is the median of epochs 2..N "
            f"(`throughput/train_img_per_s`, all ranks); images per CPU-s: all training "
            f"images over the CPU time of the launcher and its ranks (start-up and evaluation "
            f"included), steadier when other jobs share the CPU.",
            ddp_table(result),
        ]
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------- RESULTS.md


def _begin(kind: str) -> str:
    return f"<!-- bench:{kind}:begin -->"


def _end(kind: str) -> str:
    return f"<!-- bench:{kind}:end -->"


def _part(kind: str, part: str, body: str) -> str:
    return f"<!-- bench:{kind}:{part} -->\n{body.strip()}\n<!-- /bench:{kind}:{part} -->"


def parts_in(section: str, kind: str) -> dict[str, str]:
    """part name -> its body, as found inside a section."""
    out = {}
    for part in PARTS:
        m = re.search(
            rf"<!-- bench:{kind}:{part} -->\n(.*?)\n<!-- /bench:{kind}:{part} -->", section, re.S
        )
        if m:
            out[part] = m.group(1)
    return out


def upsert_section(text: str, kind: str, header: str, parts: dict[str, str]) -> str:
    """RESULTS.md text with device `kind`'s section rewritten: the new header, the given parts
    replaced, the parts this run did not measure kept from before; appended if absent."""
    begin, end = _begin(kind), _end(kind)
    old = ""
    start = text.find(begin)
    stop = text.find(end, start)
    if start >= 0 and stop >= 0:
        old = text[start : stop + len(end)]
    merged = {**parts_in(old, kind), **parts}
    body = [begin, header.strip()]
    body += [_part(kind, p, merged[p]) for p in PARTS if p in merged]
    body.append(end)
    section = "\n\n".join(body)
    if old:
        return text.replace(old, section)
    return text.rstrip("\n") + "\n\n" + section + "\n"
