"""Compare runs without W&B: a markdown table of the settings and run facts that differ and of
the final metrics, and the loss curves of all runs against training samples seen (the axis
that lines up runs of different global batch sizes and process counts).

Autoencoders are put side by side on what says how well diffusion will learn their latents
(rFID, iFID, PSNR/SSIM/LPIPS, the latent diagnostics) first; a diffusion-probe run among the
runs (`vae-scale probe`) joins the column of the autoencoder its latents came from, as
`probe <run name>: gfid` and `val fm_loss`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vae_scale.analysis.runs import final_metrics
from vae_scale.config import rename_old_keys
from vae_scale.errors import ConfigError
from vae_scale.run_files.logs import read_rows, read_run_record

#: Facts of a run (config.json beside its settings) that can tell two runs apart.
RUN_FACTS = (
    "num_processes",
    "num_machines",
    "global_batch_size",
    "git_commit",
    "git_dirty",
    "likelihood_convention",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _run_summary(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    if not (run_dir / "config.json").is_file():
        what = "does not exist" if not run_dir.exists() else "has no config.json"
        raise ConfigError(f"{run_dir} {what}: not a vae_scale run folder")
    config = read_run_record(run_dir)
    rename_old_keys(config)  # a run recorded before keys were renamed compares by today's
    sections = ("run", "data", "model", "loss", "train", "eval")
    flat = _flatten({k: config[k] for k in sections if k in config})
    flat.pop("run.dir", None)
    flat.update({key: config[key] for key in RUN_FACTS if key in config})
    rows = read_rows(run_dir)
    return flat, rows, final_metrics(run_dir, rows)


#: What says how well diffusion will learn an autoencoder's latents, in this order.
DIFFUSION_METRICS = (
    "test/rfid", "test/ifid", "test/psnr", "test/ssim", "test/lpips",
    "test/latent_high_freq_share", "test/image_high_freq_share", "test/scale_equivariance_psnr",
)  # fmt: skip


def _attach_probes(run_dirs: list[Path], summaries: list[tuple]) -> tuple[list[Path], list]:
    """Probe runs whose autoencoder is among the runs: their results added to its column
    (and no column of their own)."""
    from vae_scale.data.sourcing.shards import load_index

    columns = {Path(r).resolve(): i for i, r in enumerate(run_dirs)}
    kept = []
    for i, run in enumerate(run_dirs):
        flat, _, final = summaries[i]
        if flat.get("loss.objective") != "flow_matching":
            kept.append(i)
            continue
        location = f"{flat['data.shards_dir']}/{flat['data.dataset']}"
        try:
            made_by = load_index(location)["latents"]["autoencoder"]["path"]
        except (ConfigError, KeyError, OSError):
            made_by = None
        target = columns.get(Path(made_by).resolve()) if made_by else None
        if target is None:
            kept.append(i)
            continue
        name = Path(run).name
        extra = {f"probe {name}: gfid": final.get("test/gfid", "—")}
        extra[f"probe {name}: val fm_loss"] = final.get("val/fm_loss", "—")
        extra[f"probe {name}: epochs"] = final.get("epochs", "—")
        summaries[target][2].update(extra)
    return [run_dirs[i] for i in kept], [summaries[i] for i in kept]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def compare_runs(run_dirs: list[Path], out_md: Path, metric: str = "neg_elbo") -> Path:
    """Write `out_md` (table) and `out_md` with .png (curves of train/val/test `metric`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [_run_summary(Path(r)) for r in run_dirs]
    run_dirs, summaries = _attach_probes(list(run_dirs), summaries)
    names = [Path(r).name for r in run_dirs]
    keys = sorted(set().union(*(s[0] for s in summaries)))
    differing = [k for k in keys if len({json.dumps(s[0].get(k)) for s in summaries}) > 1]
    metric_keys = sorted(set().union(*(s[2] for s in summaries)))
    first = [k for k in DIFFUSION_METRICS if k in metric_keys]
    first += [k for k in metric_keys if k.startswith("probe ")]
    metric_keys = first + [k for k in metric_keys if k not in first]

    lines = ["# Run comparison", "", "## Settings and run facts that differ", ""]
    lines.append("| key | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for key in differing:
        lines.append(f"| {key} | " + " | ".join(_fmt(s[0].get(key, "—")) for s in summaries) + " |")
    lines += [
        "",
        "## Final metrics",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key in metric_keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(s[2].get(key, "—")) for s in summaries) + " |")
    plot_path = out_md.with_suffix(".png")
    lines += ["", f"![loss curves]({plot_path.name})", ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (_, rows, _) in zip(names, summaries, strict=True):
        for split, style in (("train", ":"), ("val", "--"), ("test", "-")):
            points = [
                (r["train/samples_seen"], r[f"{split}/{metric}"])
                for r in rows
                if f"{split}/{metric}" in r and "train/samples_seen" in r
            ]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{name} {split}")
    ax.set_xlabel("training samples seen (all processes)")
    ax.set_ylabel(f"{metric} (nats per image)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)
    return out_md
