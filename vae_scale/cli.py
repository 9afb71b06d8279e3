"""`vae-scale` command line: shard datasets, train, evaluate, picture, compare, export."""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from vae_scale.errors import ConfigError, DataError
from vae_scale.training.signals import TrainingInterrupted, kill_stray_loader_workers
from vae_scale.training.signals import record_exit_status as _record_exit_status
from vae_scale.utils.progress import MODES as PROGRESS_MODES
from vae_scale.utils.progress import set_default_mode as set_progress_mode

# `shard` options of the image datasets (celeba, folder) only.
IMAGE_OPTIONS = (
    "--size",
    "--crop",
    "--workers",
    "--name",
    "--labels-from-subfolders",
    "--task-index",
    "--num-tasks",
    "--merge-index",
)


def cmd_shard(args: argparse.Namespace) -> None:
    from vae_scale.data.sourcing.fetch import resolve_data_root
    from vae_scale.data.sourcing.recipes import recipes, source_dir_for
    from vae_scale.data.sourcing.shards import write_dataset

    recipe = recipes()[args.dataset]
    if recipe.collect is not None:  # image files: the parallel, resumable writer
        _shard_images(args, recipe, resolve_data_root(args.data_root))
        return
    given = [opt for opt in IMAGE_OPTIONS if getattr(args, opt[2:].replace("-", "_"))]
    if given:
        raise DataError(f"{', '.join(given)}: only for image datasets (celeba, folder)")
    source = source_dir_for(args.dataset, resolve_data_root(args.data_root), args.source)
    data = recipe.prepare(source, seed=args.seed, download_ok=not args.no_download)
    out_dir = Path(args.out) / args.dataset
    print(f"sharding {args.dataset} from {source} -> {out_dir}")
    index = write_dataset(
        data, out_dir, args.shard_size or recipe.default_shard_size, args.force, _format(args)
    )
    counts = ", ".join(f"{k} {v['num_samples']}" for k, v in index["splits"].items())
    print(f"{out_dir}: {counts}")


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="a live bar (terminal), plain lines (files, Slurm, CI) or none; auto: by where "
        "the output goes",
    )


def count(minimum: int):
    """An argparse type: an integer >= `minimum` (a bad value is an argument error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _crop_option(text: str) -> str:
    from vae_scale.data.sourcing.folder_sharder import parse_crop

    try:
        return parse_crop(text)
    except ValueError as err:
        raise DataError(f"--crop: {err}") from None


def _format(args: argparse.Namespace) -> Any:
    """--format / --quality: how the shards store each image."""
    from vae_scale.data.image_format import LOSSY, ImageFormat

    if args.quality is not None and args.format not in LOSSY:
        raise DataError(f"--quality: only for --format jpg or webp (not {args.format})")
    return ImageFormat(args.format, 95 if args.quality is None else args.quality)


def _shard_images(args: argparse.Namespace, recipe: Any, data_root: Path) -> None:
    """`vae-scale shard celeba|folder ...`: image files through the parallel writer."""
    from vae_scale.data.sourcing import folder_sharder

    if not args.source and not recipe.default_subdir:
        raise DataError(f"`vae-scale shard {args.dataset}` needs --source DIR (the image folder)")
    source = Path(args.source) if args.source else data_root / recipe.default_subdir
    if args.crop:
        _crop_option(args.crop)  # fail before listing a large folder
    collection = recipe.collect(
        source, seed=args.seed, labels_from_subfolders=args.labels_from_subfolders
    )
    if args.name:
        collection.name = args.name
    crop = _crop_option(args.crop or collection.default_crop)
    size = 64 if args.size is None else args.size
    preprocess = folder_sharder.Preprocess(size=size, crop=crop, stored=_format(args))
    out_dir = Path(args.out) / collection.name
    shard_size = args.shard_size or recipe.default_shard_size
    if args.merge_index:
        if args.task_index is not None:
            raise DataError("--merge-index runs once after all tasks: drop --task-index")
        folder_sharder.merge_index_if_needed(collection, out_dir, preprocess, shard_size)
        return
    print(
        f"sharding {collection.name} from {source} -> {out_dir} "
        f"({size}x{size}, crop {crop}, {shard_size} per shard)"
    )
    folder_sharder.shard_collection(
        collection,
        out_dir,
        preprocess,
        shard_size,
        workers=args.workers,
        force=args.force,
        task_index=args.task_index or 0,
        num_tasks=args.num_tasks or 1,
    )


def cmd_train(args: argparse.Namespace) -> None:
    _train(args, args.config, args.overrides, ["train", args.config, *args.overrides])


def cmd_probe(args: argparse.Namespace) -> None:
    """`train` of the probe's config on the latent shards LATENTS (data.location)."""
    location = args.latents.rstrip("/")
    parent, _, name = location.rpartition("/")
    overrides = [
        f"data.shards_dir={parent or '.'}",
        f"data.dataset={name}",
        f"run.name=probe_{name}",
    ]
    if args.autoencoder:
        overrides.append(f"loss.probe.autoencoder={args.autoencoder}")
    words = ["probe", args.latents, *(["--config", args.config] * (args.config != PROBE_CONFIG))]
    words += [*(["--autoencoder", args.autoencoder] if args.autoencoder else []), *args.overrides]
    config = args.config
    if config == PROBE_CONFIG and not Path(config).is_file():  # outside the checkout's root
        config = str(Path(__file__).resolve().parents[1] / PROBE_CONFIG)
    _train(args, config, [*overrides, *args.overrides], words)


PROBE_CONFIG = "configs/probe_celeba64.yaml"


def _train(args: argparse.Namespace, config: str, overrides: list[str], words: list[str]) -> None:
    from vae_scale.config import load_config
    from vae_scale.training.loop import TrainingDiverged, train

    cfg = load_config(config, overrides)
    trial = sweep_run_name(cfg, overrides)
    if trial:
        cfg = load_config(config, [*overrides, trial])
    flags = [*(["--resume", args.resume] if args.resume != "auto" else [])]
    flags += ["--from-another-run"] * args.from_another_run + [
        "--restart-epoch"
    ] * args.restart_epoch
    command = shlex.join(["vae-scale", *words, *flags])
    try:
        run_dir = train(
            cfg,
            resume=args.resume,
            command=command,
            from_another_run=args.from_another_run,
            restart_epoch=args.restart_epoch,
        )
    except TrainingDiverged as err:  # a message, not a traceback: the checkpoints are intact
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(_record_exit_status(2)) from None
    print(f"run folder: {run_dir}")


def sweep_run_name(cfg: Any, overrides: list[str]) -> str | None:
    """Under `wandb agent` every trial gets its own run folder, <run.name>-<the agent's run
    id>, unless the command line names one."""
    from vae_scale.training.tracking import sweep_run_id

    trial = sweep_run_id()
    if trial is None or any(o.startswith("run.name=") for o in overrides):
        return None
    return f"run.name={cfg.run.name}-{trial}"


def _log_pictures(run, paths: dict[str, Path]) -> None:
    if run is not None:
        import wandb

        run.log({f"pictures/{k}": wandb.Image(str(p)) for k, p in paths.items()})


def cmd_eval(args: argparse.Namespace) -> None:
    """Whole-split evaluation; under `accelerate launch` each sample is counted once."""

    import torch
    from accelerate import Accelerator

    from vae_scale.analysis.diffusability import DiffusabilityOptions, diffusability
    from vae_scale.analysis.evaluate import EvalOptions, full_evaluation
    from vae_scale.analysis.runs import load_run
    from vae_scale.data.streaming.loader import ShardSplit
    from vae_scale.losses import likelihood_convention
    from vae_scale.models.base import check_single_latent
    from vae_scale.perception.networks import perception_networks

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        run = load_run(args.run_dir, args.checkpoint, accelerator.device)
        cfg = run.cfg
        if args.refine_steps:
            check_single_latent(run.model, "--refine-steps", "posterior refinement")
        data = ShardSplit(
            cfg.shard_dir,
            args.split,
            cfg.data.model_copy(update={"batch_size": args.batch_size, "num_workers": 0}),
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
        )
        trained_on_split = args.split in cfg.data.train_splits
        if trained_on_split:
            accelerator.print(
                f"note: this run trained on the {args.split!r} split (data.train_splits "
                f"{cfg.data.train_splits}): these are training-set numbers"
            )
        nets = perception_networks(
            cfg.eval.lpips, cfg.eval.rfid, run.image_shape, cfg.run.weights_dir,
            accelerator.device,
        )  # fmt: skip
        options = EvalOptions(
            cfg.run.seed, cfg.data.binarize, args.iw_samples, args.refine_steps, progress=True,
            nets=nets,
        )  # fmt: skip
        metrics = full_evaluation(accelerator, run.model, data, options)
        if DiffusabilityOptions.applies(cfg, run.model):
            measures = DiffusabilityOptions.from_config(cfg)
            metrics.update(diffusability(accelerator, run.model, data, nets.inception, measures))
        # How this evaluation was made, under eval/<split>/: the run's own facts (its
        # num_processes, ...) stay those of its training in the W&B run.
        split = args.split
        metrics.update(
            {
                f"eval/{split}/checkpoint_step": run.opt_step,
                f"eval/{split}/iw_samples": args.iw_samples,
                f"eval/{split}/refine_steps": args.refine_steps,
                f"eval/{split}/num_processes": accelerator.num_processes,
                f"eval/{split}/trained_on_split": trained_on_split,
                "likelihood_convention": likelihood_convention(
                    cfg.loss.likelihood, cfg.data.binarize
                ),
            }
        )
        if accelerator.is_main_process:
            _report_evaluation(metrics, run, args.split)
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()


def _report_evaluation(metrics: dict[str, Any], run: Any, split: str) -> None:
    """Print an evaluation's numbers, then keep them: RUN/eval_<split>.json and the run's W&B
    summary (a read-only run folder keeps the printed numbers only, and says so)."""
    from vae_scale.training import tracking
    from vae_scale.utils.fsutil import write_json_atomic

    for key, value in metrics.items():
        if key.endswith("_unavailable") or isinstance(value, list):
            continue
        if value is None:
            print(f"{key:36s} unavailable: {metrics[key + '_unavailable']}")
        else:
            print(f"{key:36s} {value:.4f}" if isinstance(value, float) else f"{key:36s} {value}")
    out = run.run_dir / f"eval_{split}.json"
    try:  # the numbers are printed above whatever happens to the file
        write_json_atomic(out, metrics, indent=1)
        print(f"wrote {out}")
    except OSError as err:  # (the W&B run lives in the same folder)
        print(
            f"warning: could not write {out} ({err.strerror or err}); the numbers are "
            f"above. Copy the run folder somewhere writable to keep them with it",
            file=sys.stderr,
        )
        return
    with tracking.command_run(run.cfg, run.run_dir, out.stem) as wandb_run:
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in metrics.items() if not isinstance(v, list)})


def cmd_pictures(args: argparse.Namespace) -> None:
    """sample / reconstruct / traverse / edit / interpolate from a trained run."""
    import torch

    from vae_scale.analysis import attributes, pictures
    from vae_scale.analysis.evaluate import first_images
    from vae_scale.analysis.runs import load_run
    from vae_scale.data.streaming.inputs import prepare_batch
    from vae_scale.data.streaming.loader import ShardSplit
    from vae_scale.training import tracking
    from vae_scale.utils.seeding import derive_seed

    run = load_run(args.run_dir, args.checkpoint)
    model, cfg = run.model, run.cfg
    gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "cli", args.command))

    def split_of(name: str, batch_size: int) -> ShardSplit:
        return ShardSplit(
            cfg.shard_dir, name, cfg.data.model_copy(update={"batch_size": batch_size})
        )

    def test_images(n: int) -> torch.Tensor:
        return prepare_batch(first_images(split_of(args.split, max(n, 1)), n), "cpu", "none")

    key = args.command  # the W&B picture name
    with torch.no_grad():
        if args.command == "sample":
            grid = pictures.sample_grid(model.sample(args.n, gen, args.temperature))
            path = run.run_dir / f"sample_t{args.temperature:g}_n{args.n}.png"
        elif args.command == "reconstruct":
            x = test_images(args.n)
            grid = pictures.recon_grid(x, model.reconstruct(x))
            path = run.run_dir / f"reconstruct_{args.split}_n{args.n}.png"
        elif args.command == "edit":
            direction = attributes.split_attribute_vector(
                model,
                split_of(args.attr_split, 100),
                args.attribute,
                args.max_images or None,
            )
            steps = torch.linspace(-args.range, args.range, args.steps).tolist()
            rows = attributes.edit_rows(model, test_images(args.n), direction, steps)
            grid = pictures.rows_grid(rows)
            key = f"edit_{args.attribute}"
            path = run.run_dir / f"{key}_{args.split}_n{args.n}.png"
        elif args.command == "interpolate":
            faces = test_images(2 * args.n)  # pairs: (0, 1), (2, 3), ...
            if len(faces) < 2 * args.n:
                raise ConfigError(f"--n {args.n}: {args.split} has only {len(faces)} images")
            rows = attributes.interpolation_rows(model, faces[0::2], faces[1::2], args.steps)
            grid = pictures.rows_grid(rows)
            path = run.run_dir / f"interpolate_{args.split}_n{args.n}.png"
        else:  # traverse
            dims = int(torch.tensor(model.latent_shape).prod())
            if not 0 <= args.dim < dims:
                raise ConfigError(f"--dim: expected 0..{dims - 1}, got {args.dim}")
            mu, _ = model.encode(test_images(args.rows))
            values = torch.linspace(-args.range, args.range, args.steps)
            z = mu.flatten(1).repeat_interleave(args.steps, 0)
            z[:, args.dim] = values.repeat(args.rows)
            images = model.likelihood.mean(model.decode(z.view(-1, *model.latent_shape)))
            grid = pictures.sample_grid(images, nrow=args.steps)
            path = run.run_dir / f"traverse_dim{args.dim}.png"
    pictures.save_grid(grid, path)
    print(f"wrote {path}")
    with tracking.command_run(cfg, run.run_dir, path.stem) as wandb_run:
        _log_pictures(wandb_run, {key: path})


def cmd_export(args: argparse.Namespace) -> None:
    from vae_scale.hub.export import export_run, push_to_hub

    out = export_run(args.run_dir, args.out_dir, args.checkpoint, args.weights)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"published {url}")


def cmd_encode(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator

    from vae_scale.analysis.latents import recorded_scaling
    from vae_scale.analysis.runs import config_of_record
    from vae_scale.data.sourcing.latents import EncodeOptions, encode_dataset
    from vae_scale.hub.pretrained import from_pretrained

    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    vae = from_pretrained(args.model, device=accelerator.device, weights=args.weights)
    cfg = config_of_record(vae.record)
    data = cfg.data.model_copy(update={"num_workers": args.num_workers})
    splits = tuple(args.splits.split(",")) if args.splits else None
    options = EncodeOptions(args.content, args.shard_size, args.batch_size, splits, cfg.run.seed)
    # local paths recorded absolute: the probe finds the autoencoder and the images from
    # wherever it runs
    source, origin = (
        p if "://" in str(p) or not Path(p).exists() else str(Path(p).resolve())
        for p in (args.data or data.location, args.model)
    )
    scaling = recorded_scaling(vae.record, origin)
    index = encode_dataset(
        accelerator, vae, origin, source, data, Path(args.out), options, scaling, args.force
    )
    if index is not None:
        latents = index["latents"]
        print(
            f"wrote {args.out}: latents of {args.model} ({index['image_shape']} float16, "
            f"{latents['content']}), scaling_factor {latents['scaling_factor']:.4g}, "
            f"shift_factor {latents['shift_factor']:.4g} ({latents['scaling_from']})"
        )


def cmd_compare(args: argparse.Namespace) -> None:
    from vae_scale.analysis.compare import compare_runs

    out = compare_runs([Path(r) for r in args.run_dirs], Path(args.out), args.metric)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-scale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_shard_command(sub)
    _add_train_and_eval_commands(sub)
    _add_picture_commands(sub)
    _add_encode_command(sub)
    cmp_ = sub.add_parser("compare", help="markdown table + loss-curve plot of several runs")
    cmp_.add_argument("run_dirs", nargs="+")
    cmp_.add_argument("--out", default="report.md")
    cmp_.add_argument("--metric", default="neg_elbo")
    cmp_.set_defaults(func=cmd_compare)
    ex = sub.add_parser(
        "export", help="a run's model as a portable folder (Hugging Face Hub layout)"
    )
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--checkpoint", help="checkpoint folder (default: the latest complete)")
    add_weights_flag(ex)
    ex.add_argument("--push-to-hub", metavar="REPO_ID", help="then publish it (owner/name)")
    ex.add_argument("--private", action="store_true", help="a private Hub repository")
    ex.set_defaults(func=cmd_export)
    return parser


def add_weights_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default="ema",
        help="the EMA of the weights when the run kept one (default), or the raw weights",
    )


def _add_encode_command(sub: Any) -> None:
    enc = sub.add_parser(
        "encode",
        help="an autoencoder's latents of its dataset as WebDataset shards (works under "
        "accelerate launch; resumable)",
    )
    enc.add_argument("model", help="a run folder or an export (`vae-scale export`)")
    enc.add_argument("--out", required=True, help="folder for the latent shards and index.json")
    enc.add_argument("--data", help="the dataset to encode (default: the run's data location)")
    enc.add_argument("--splits", help="comma-separated splits (default: every split)")
    enc.add_argument(
        "--content",
        choices=("moments", "sample"),
        default="moments",
        help="moments: posterior mean and std (default; z is drawn when read); sample: one z",
    )
    enc.add_argument("--shard-size", type=count(1), default=1000, help="latents per shard")
    enc.add_argument("--batch-size", type=count(1), default=64)
    enc.add_argument("--num-workers", type=count(0), default=0, help="loader workers")
    add_weights_flag(enc)
    enc.add_argument("--cpu", action="store_true", help="encode on the CPU even with a GPU")
    enc.add_argument("--force", action="store_true", help="replace what --out holds")
    enc.set_defaults(func=cmd_encode)


def _add_shard_command(sub: Any) -> None:
    from vae_scale.data.sourcing.recipes import recipes

    shard = sub.add_parser("shard", help="convert a dataset into WebDataset shards (once)")
    shard.add_argument("dataset", choices=sorted(recipes()))
    shard.add_argument(
        "--data-root", help="folder of raw datasets (default: $VAE_SCALE_DATA, else ./data)"
    )
    shard.add_argument(
        "--source",
        help="folder holding the publisher's files (default: "
        "<data root>/<dataset folder>, e.g. data/freyface)",
    )
    shard.add_argument("--out", default="shards", help="shards go to OUT/DATASET (default: shards)")
    shard.add_argument("--shard-size", type=count(1), default=None, help="samples per shard")
    shard.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    shard.add_argument("--force", action="store_true", help="rebuild even if up to date")
    shard.add_argument("--no-download", action="store_true", help="never use the network")
    shard.add_argument(
        "--format",
        choices=("npy", "png", "jpg", "webp"),
        default="npy",
        help="how each image is stored: npy (raw, the default: fastest to read), png "
        "(lossless, compressed), jpg or webp (lossy, smallest; for web-scale datasets)",
    )
    shard.add_argument("--quality", type=count(1), help="jpg/webp quality, 1-100 (default 95)")
    add_progress_flag(shard)
    images = shard.add_argument_group("image datasets (celeba, folder)")
    images.add_argument("--size", type=count(1), help="output images are SIZE x SIZE (default 64)")
    images.add_argument(
        "--crop",
        help="centre square crop before resizing: 'square' (largest), a fraction of the width "
        "like 148/178 (celeba's default) or 0.8, or pixels like 148 (folder default: square)",
    )
    images.add_argument("--workers", type=count(1), help="writer processes (default: all CPUs)")
    images.add_argument("--name", help="shards go to OUT/NAME (folder default: its name)")
    images.add_argument(
        "--labels-from-subfolders", action="store_true", help="class = first sub-folder name"
    )
    images.add_argument("--task-index", type=count(0), help="this task's slice (SLURM array)")
    images.add_argument("--num-tasks", type=count(1), help="number of slices (SLURM array)")
    images.add_argument(
        "--merge-index", action="store_true", help="after all tasks: check shards, write index"
    )
    shard.set_defaults(func=cmd_shard)


def _add_train_and_eval_commands(sub: Any) -> None:
    tr = sub.add_parser("train", help="train a config (works under `accelerate launch`)")
    tr.add_argument("config", help="YAML config, e.g. configs/frey_conv.yaml")
    tr.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE, e.g. train.lr=3e-4")
    tr.add_argument(
        "--resume",
        default="auto",
        help="'auto' (default: continue from the "
        "latest complete checkpoint in the run folder, if any), 'none', or a "
        "checkpoint folder",
    )
    tr.add_argument(
        "--from-another-run",
        action="store_true",
        help="with --resume PATH: PATH may be a checkpoint of another run folder (its weights, "
        "optimizer and position start this run; refused without this flag)",
    )
    tr.add_argument(
        "--restart-epoch",
        action="store_true",
        help="when the training shards changed since a checkpoint taken inside an epoch, in "
        "a way its position cannot be mapped onto: start that epoch over (refused without it)",
    )
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser(
        "probe",
        help="train a small diffusion model on latent shards (vae-scale encode) and report "
        "its loss and gFID (works under accelerate launch)",
    )
    pr.add_argument("latents", help="latent shards folder (or URL) that vae-scale encode wrote")
    pr.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE, e.g. model.depth=6")
    pr.add_argument("--config", default=PROBE_CONFIG, help=f"YAML config (default {PROBE_CONFIG})")
    pr.add_argument(
        "--autoencoder", help="decoder of the samples (default: the one the latents name)"
    )
    for flag in ("--resume", "--from-another-run", "--restart-epoch"):
        pr._add_action(next(a for a in tr._actions if flag in a.option_strings))
    pr.set_defaults(func=cmd_probe)

    ev = sub.add_parser(
        "eval",
        help="evaluate a run on a split (works under accelerate "
        "launch): neg. ELBO, IWAE NLL, bits/dim, active units, KL per dim",
    )
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test")
    ev.add_argument(
        "--iw-samples",
        type=count(0),
        default=1000,
        help="K of the importance-weighted bound (0: skip; the MNIST literature uses 5000)",
    )
    ev.add_argument(
        "--refine-steps",
        type=count(0),
        default=0,
        help="also report the neg. ELBO with each test image's posterior refined by this many "
        "Adam steps from the encoder's (semi-amortized; 100 closes most of the gap; 0: skip)",
    )
    ev.add_argument("--batch-size", type=count(1), default=100)
    add_progress_flag(ev)
    ev.add_argument("--checkpoint", help="checkpoint folder (default: the latest complete)")
    ev.set_defaults(func=cmd_eval)


def _add_picture_commands(sub: Any) -> None:
    for name, text in (
        ("sample", "decode z ~ N(0, t^2 I) into a grid"),
        ("reconstruct", "originals | reconstructions of the first test images"),
        ("traverse", "vary one latent dimension around test images' means"),
        ("edit", "move test faces along an attribute vector (--attribute Smiling; celeba)"),
        ("interpolate", "decode straight latent lines between pairs of test images"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir")
        p.add_argument("--checkpoint", help="checkpoint folder (default: the latest complete)")
        p.add_argument("--split", default="test")
        p.add_argument("--n", type=count(1), default=64 if name == "sample" else 8)
        p.add_argument("--temperature", type=non_negative_number, default=1.0)
        p.add_argument("--dim", type=count(0), default=0)
        p.add_argument("--rows", type=count(1), default=4)
        p.add_argument("--steps", type=count(1), default=9)
        p.add_argument("--range", type=float, default=3.0)
        if name == "edit":
            p.add_argument("--attribute", required=True, help="e.g. Smiling, Eyeglasses, Male")
            p.add_argument("--attr-split", default="train", help="split the vector comes from")
            p.add_argument(
                "--max-images", type=count(0), default=5000, help="images of --attr-split (0: all)"
            )
        # edit: rows = faces, steps -2..+2; interpolate: rows = pairs, steps = latent points
        defaults = {"edit": {"steps": 5, "range": 2.0}, "interpolate": {"n": 6, "steps": 8}}
        p.set_defaults(func=cmd_pictures, **defaults.get(name, {}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A log handler that cannot write (W&B's, on a full disk) stays silent instead of printing
    # a traceback per record; the failure that matters is reported once, below.
    logging.raiseExceptions = False
    set_progress_mode(getattr(args, "progress", "auto"))
    try:
        args.func(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return _record_exit_status(2)
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
            # a read-only file system, a folder we may not write, a file where a folder goes
            where = err.filename or "a file"
            print(f"error: cannot write {where}: {err.strerror}", file=sys.stderr)
            return _record_exit_status(2)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: disk full: {err.strerror}", file=sys.stderr)  # names what is intact
        return _record_exit_status(2)
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return _record_exit_status(err.exit_code)
    finally:  # whatever ended the command, no loader worker outlives it (or hangs its exit)
        kill_stray_loader_workers()
    return _record_exit_status(0)


if __name__ == "__main__":
    sys.exit(main())
