"""`vae-scale export RUN OUT_DIR`: a run's model as a portable folder — config.json,
model.safetensors, samples.png and a README.md model card — the layout
`huggingface_hub.upload_folder` publishes as is (`--push-to-hub REPO_ID`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import torch

from vae_scale.analysis import pictures
from vae_scale.analysis.latents import FP16_MAX, activation_peak, read_latent_stats
from vae_scale.analysis.runs import (
    CONFIG_FILE,
    RECORD_FILE,
    WEIGHTS_FILE,
    TrainedRun,
    final_metrics,
    load_run,
)
from vae_scale.errors import ConfigError
from vae_scale.run_files.checkpoints import EMA_FILE
from vae_scale.utils.netutil import is_online
from vae_scale.utils.seeding import derive_seed

SAMPLES_FILE = "samples.png"
CARD_FILE = "README.md"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
EXPORTED = (CONFIG_FILE, WEIGHTS_FILE, SAMPLES_FILE, CARD_FILE, RECORD_FILE, DIFFUSERS_WEIGHTS)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    weights: Literal["ema", "raw"] = "ema",
) -> Path:
    """Write the export folder; files are written beside it first and moved in at the end,
    so a failed export leaves an earlier one intact. Refuses a folder holding other files."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORTED)
        if foreign:
            raise ConfigError(
                f"{out_dir} already holds files that are not an export ({', '.join(foreign[:5])}"
                f"): choose an empty or new folder"
            )
    run = load_run(run_dir, checkpoint, "cpu", weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-") as tmp:
        staging = Path(tmp)
        record = export_record(run, weights)
        generator = torch.Generator().manual_seed(derive_seed(run.cfg.run.seed, "export"))
        samples = run.model.sample(64, generator)
        written = [WEIGHTS_FILE, SAMPLES_FILE, CARD_FILE]
        if hasattr(run.model, "to_diffusers"):
            # diffusers' own layout (config.json + diffusion_pytorch_model.safetensors) beside
            # ours; our run record moves to vae_scale.json
            record["export"]["fp16"] = fp16_check(run.model, *validation_images(run, samples))
            stats = exported_latent_stats(run)
            record["export"]["latent_stats"] = stats
            run.model.to_diffusers(stats).save_pretrained(staging, safe_serialization=True)
            written += [CONFIG_FILE, DIFFUSERS_WEIGHTS, RECORD_FILE]
            record_file = RECORD_FILE
        else:
            written.append(CONFIG_FILE)
            record_file = CONFIG_FILE
        (staging / record_file).write_text(json.dumps(record, indent=1, default=str))
        shutil.copyfile(run.weights_file, staging / WEIGHTS_FILE)  # the checkpoint's bytes
        pictures.save_grid(pictures.sample_grid(samples), staging / SAMPLES_FILE)
        (staging / CARD_FILE).write_text(model_card(run, record))
        for name in EXPORTED:  # a stale file of another layout goes too
            if name not in written:
                (out_dir / name).unlink(missing_ok=True)
        for name in written:
            os.replace(staging / name, out_dir / name)
    return out_dir


def exported_latent_stats(run: TrainedRun) -> dict[str, Any] | None:
    """The latent statistics of the weights exported: the run's own (latent_stats.json) when
    they were measured on these weights (that checkpoint, EMA or raw as exported), else
    measured now on the training split; None when its shards are out of reach."""
    stats = read_latent_stats(run.run_dir)
    weights = "ema" if run.weights_file.name.startswith("ema") else "raw"
    has_ema = (run.checkpoint / EMA_FILE).is_file()
    measured_on = stats and (
        stats.get("checkpoint_step"),
        stats.get("weights", "ema" if has_ema else "raw"),
    )
    if measured_on == (run.opt_step, weights):
        return stats
    from accelerate import Accelerator

    from vae_scale.analysis.latents import latent_statistics
    from vae_scale.data.streaming.loader import ShardSplit

    cfg = run.cfg
    try:
        train = ShardSplit(cfg.shard_dir, "+".join(cfg.data.train_splits), cfg.data)
    except (ConfigError, OSError, KeyError, ValueError):
        return None
    samples = cfg.eval.latent_stats_samples or 4096
    stats = latent_statistics(Accelerator(cpu=True), run.model, train, cfg.run.seed, samples)
    return {**stats, "checkpoint_step": run.opt_step, "weights": weights}


def validation_images(run: TrainedRun, fallback: torch.Tensor) -> tuple[torch.Tensor, str]:
    """16 images of the run's val (else test) split, when its shards are reachable; else the
    model's own samples (an export may be made far from the data)."""
    from vae_scale.analysis.evaluate import first_images
    from vae_scale.data.streaming.inputs import images_to_float
    from vae_scale.data.streaming.loader import ShardSplit

    for split in ("val", "test"):
        try:
            data = ShardSplit(run.cfg.shard_dir, split, run.cfg.data)
            return images_to_float(first_images(data, 16), "cpu"), split
        except (ConfigError, OSError, KeyError, ValueError):
            continue
    return fallback[:16], "samples"


def fp16_check(model: torch.nn.Module, images: torch.Tensor, source: str) -> dict[str, Any]:
    """Whether the network's activations fit fp16 on these images (encode + decode): safe
    with a 2x margin below fp16's largest number."""
    peak = activation_peak(model, images)
    return {
        "max_abs_activation": peak, "fp16_max": FP16_MAX, "safe": peak < FP16_MAX / 2,
        "images": source,
    }  # fmt: skip


def export_record(run: TrainedRun, weights: str) -> dict[str, Any]:
    """The run's config.json (so one loader reads run folders and exports) plus where the
    weights came from."""
    return {
        **run.record,
        "export": {
            "vae_scale_version": version("vae_scale"),
            "run_dir": str(Path(run.run_dir).resolve()),
            "checkpoint": run.checkpoint.name,
            "checkpoint_step": run.opt_step,
            "weights": "ema" if run.weights_file.name.startswith("ema") else "raw",
            "weights_asked": weights,
            "image_shape": list(run.image_shape),
            "latent_shape": list(run.model.latent_shape),
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(run: TrainedRun, record: dict[str, Any]) -> str:
    cfg, export = run.cfg, record["export"]
    metrics = final_metrics(run.run_dir)
    shape = "x".join(map(str, run.image_shape))
    latent = "x".join(map(str, run.model.latent_shape))
    tags = ["vae", "variational-autoencoder", "vae_scale", cfg.data.dataset, cfg.model.name]
    lines = [
        "---",
        "library_name: vae_scale",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {cfg.run.name}: a {cfg.model.name} VAE trained on {cfg.data.dataset}",
        "",
        f"![64 samples from z ~ N(0, I)]({SAMPLES_FILE})",
        "",
        "## Model",
        "",
        f"- family `{cfg.model.name}`, {record.get('num_parameters', 0):,} parameters, "
        f"images {shape} (C x H x W), latent {latent}",
        f"- likelihood `{cfg.loss.likelihood}` (nats measure "
        f"`{record.get('likelihood_convention', cfg.loss.likelihood)}`), "
        f"data.binarize `{cfg.data.binarize}`",
        f"- weights: {export['weights']} of checkpoint `{export['checkpoint']}` "
        f"(optimizer step {export['checkpoint_step']})",
        "",
        *diffusers_lines(export),
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No evaluation recorded (run `vae-scale eval RUN` before exporting).")
    commit = record.get("git_commit") or "unknown"
    dirty = " (with uncommitted changes)" if record.get("git_dirty") else ""
    lines += [
        "",
        "## Training",
        "",
        "```bash",
        record.get("command") or f"vae-scale train <config> # run {cfg.run.name}",
        "```",
        "",
        f"- {record.get('num_processes', 1)} process(es) on {record.get('num_machines', 1)} "
        f"machine(s), global batch {record.get('global_batch_size')}, "
        f"{cfg.train.epochs} epochs, lr {cfg.train.lr}, mixed precision "
        f"`{cfg.train.mixed_precision}`",
        f"- vae_scale commit `{commit}`{dirty}; the whole configuration is in `{CONFIG_FILE}`",
        *origin_lines(record),
        "",
        "## Use",
        "",
        "```python",
        "import vae_scale",
        "",
        'vae = vae_scale.from_pretrained("THIS_FOLDER_OR_REPO_ID")',
        "images = vae.sample(16, temperature=0.8)  # floats in [0, 1]",
        "posterior = vae.encode(images)  # .mean, .log_var",
        "recons = vae.reconstruct(images)  # uint8 or float images in",
        "```",
        "",
    ]
    return "\n".join(lines)


def origin_lines(record: dict[str, Any]) -> list[str]:
    """Where the run's first weights came from: another autoencoder (model.init_from) or
    another run's checkpoint (--from-run)."""
    lines = []
    if origin := record.get("init_from"):
        lines.append(
            f"- fine-tuned from the {origin['format']} autoencoder `{origin['path']}` "
            f"(weights sha256 `{origin['sha256'][:16]}`)"
        )
    if warm := record.get("warm_start"):
        lines.append(f"- started from checkpoint `{warm['checkpoint']}` (step {warm['step']})")
    return lines


def diffusers_lines(export: dict[str, Any]) -> list[str]:
    """The model card's diffusers section (autoencoder_kl exports)."""
    if "fp16" not in export:
        return []
    stats, fp16 = export.get("latent_stats"), export["fp16"]
    scale = (
        f"`scaling_factor` {stats['scaling_factor']:.5f}, `shift_factor` "
        f"{stats['shift_factor']:.5f} (measured on {stats['samples']} training images; "
        f"latents for diffusion are `(z - shift_factor) * scaling_factor`)"
        if stats
        else "no latent statistics were measured (diffusers' defaults stand)"
    )
    return [
        "## diffusers",
        "",
        "```python",
        "from diffusers import AutoencoderKL",
        "",
        'vae = AutoencoderKL.from_pretrained("THIS_FOLDER_OR_REPO_ID")',
        "```",
        "",
        f"- latents: {scale}",
        f"- fp16: largest activation {fp16['max_abs_activation']:.4g} on {fp16['images']} "
        f"images ({'safe' if fp16['safe'] else 'NOT safe: use bf16 or fp32'} in fp16, "
        f"max {fp16['fp16_max']:.0f})",
        "",
    ]


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Publish an export folder as a Hub model repository; a clear error when that cannot
    work here (offline, no token), with the folder left as it is."""
    from huggingface_hub import constants, create_repo, get_token, upload_folder

    later = (
        f"the exported folder {folder} is complete: publish it from a machine that is online "
        f"with `huggingface_hub.upload_folder(repo_id={repo_id!r}, folder_path=...)` or "
        f"`hf upload {repo_id} {folder}`"
    )
    # the environment as it is now (huggingface_hub read it when first imported)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; {later}")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if not is_online(endpoint, timeout=5.0):
        raise ConfigError(
            f"--push-to-hub {repo_id}: {endpoint} cannot be reached from this machine; {later}"
        )
    if not get_token():
        raise ConfigError(
            f"--push-to-hub {repo_id}: no Hugging Face token (set HF_TOKEN or run "
            f"`hf auth login`); {later}"
        )
    url = create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model")
    return str(url)
