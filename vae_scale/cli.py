"""`vae-scale` command line: shard datasets, train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vae_scale.config import ConfigError
from vae_scale.data.fetch import DataError


def cmd_shard(args: argparse.Namespace) -> None:
    from vae_scale.data.fetch import resolve_data_root
    from vae_scale.data.shards import write_dataset
    from vae_scale.data.sources import recipes, source_dir_for

    recipe = recipes()[args.dataset]
    source = source_dir_for(args.dataset, resolve_data_root(args.data_root), args.source)
    data = recipe.prepare(source, seed=args.seed, download_ok=not args.no_download)
    out_dir = Path(args.out) / args.dataset
    print(f"sharding {args.dataset} from {source} -> {out_dir}")
    index = write_dataset(
        data, out_dir, args.shard_size or recipe.default_shard_size, force=args.force
    )
    counts = ", ".join(f"{k} {v['num_samples']}" for k, v in index["splits"].items())
    print(f"{out_dir}: {counts}")


def cmd_train(args: argparse.Namespace) -> None:
    from vae_scale.config import load_config
    from vae_scale.train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, resume=args.resume)
    print(f"run folder: {run_dir}")


def build_parser() -> argparse.ArgumentParser:
    from vae_scale.data.sources import recipes

    parser = argparse.ArgumentParser(prog="vae-scale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    shard.add_argument("--shard-size", type=int, default=None, help="samples per shard")
    shard.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    shard.add_argument("--force", action="store_true", help="rebuild even if up to date")
    shard.add_argument("--no-download", action="store_true", help="never use the network")
    shard.set_defaults(func=cmd_shard)

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
    tr.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
