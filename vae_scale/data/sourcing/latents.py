"""Latent shards (`vae-scale encode`): an autoencoder's latents of a shard dataset, written as
a shard dataset that the same streaming code reads (exact resume, remote shards, DDP), so a
diffusion model trains on cached latents.

Each sample is float16 (h, w, C') under its source key, with the source's label: `moments`
stores the posterior mean and standard deviation (C' = 2C, mean first; the diffusion model
draws z = mean + std * eps itself), `sample` one draw z (C' = C, noise seeded by the key).
index.json (encoding "npy float16 HWC") records the autoencoder (its path and a fingerprint
of its weights: a reader checks that latents and decoder belong together), the source
dataset, and the `scaling_factor` / `shift_factor` a diffusion model applies as
`(z - shift_factor) * scaling_factor`: the autoencoder's own when it recorded them
(latent_stats.json, an export's record), else measured on the first split's latents.

Work is divided by output shard: shard j of a split holds source samples
[j * shard_size, (j + 1) * shard_size), written by process j % N. A finished shard is renamed
into place with a record beside it (.encode/), so a killed or failed run resumes with the shards
it lacks, on any number of processes; index.json comes last, from the records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from accelerate import Accelerator

from vae_scale.data.config import DataConfig
from vae_scale.data.index import INDEX_NAME, make_index
from vae_scale.data.members import member_table
from vae_scale.data.sourcing.shards import encode_sample
from vae_scale.data.streaming.inputs import images_to_float
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import ConfigError
from vae_scale.utils.fsutil import fsync, sha256_file, write_json_atomic
from vae_scale.utils.seeding import derive_seed

LATENT_ENCODING = "npy float16 HWC"
PARTS = ".encode"  # records of finished shards, until index.json is written


@dataclass(frozen=True)
class EncodeOptions:
    content: Literal["moments", "sample"] = "moments"
    shard_size: int = 1000  # samples per output shard
    batch_size: int = 64
    splits: tuple[str, ...] | None = None  # None: every split of the source
    seed: int = 0  # the `sample` content's noise


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors (names, shapes, dtypes, bytes): equal for a run's weights
    and their export, whatever file holds them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_identity(index: dict[str, Any]) -> dict[str, Any]:
    """What latent shards' index.json says of the autoencoder that made them."""
    latents = index.get("latents")
    if not isinstance(latents, dict) or "autoencoder" not in latents:
        raise ConfigError(
            f"{index.get('dataset', '?')}: not latent shards (index.json has no 'latents'; "
            f"write them with `vae-scale encode RUN --out DIR`)"
        )
    return latents


def encode_dataset(
    accelerator: Accelerator,
    vae: Any,
    origin: str,
    source: str,
    data: DataConfig,
    out_dir: Path,
    options: EncodeOptions,
    scaling: dict[str, float] | None = None,
    force: bool = False,
) -> dict[str, Any] | None:
    """Write the latents of `vae` (a PretrainedVAE loaded from `origin`) for the dataset at
    `source` into `out_dir`; the index on the main process (None elsewhere). `scaling`: the
    autoencoder's own scaling_factor and shift_factor (None: measured on the latents)."""
    if len(vae.latent_shape) != 3:
        raise ConfigError(
            f"{origin}: a {vae.record.get('model', {}).get('name', '?')} model with latents of "
            f"shape {tuple(vae.latent_shape)}; `vae-scale encode` needs an autoencoder with "
            f"spatial latents (C, h, w), e.g. model.name: autoencoder_kl"
        )
    out_dir = Path(out_dir)
    data = data.model_copy(update={"batch_size": options.batch_size})
    rank, world = accelerator.process_index, accelerator.num_processes
    probe = ShardSplit(source, _first_split(source, options), data, world_size=world, rank=rank)
    identity = {
        "autoencoder": {
            "path": origin,
            "fingerprint": weights_fingerprint(vae.vae),
            "latent_shape": list(vae.latent_shape),
        },
        "content": options.content,
        "seed": options.seed,
        "source": {
            "location": str(source),
            "splits": hashlib.sha256(
                json.dumps(probe.catalog.index["splits"], sort_keys=True).encode()
            ).hexdigest(),
        },
        "shard_size": options.shard_size,
    }
    if accelerator.is_main_process:
        done = _prepare(out_dir, identity, force)
    else:
        done = None
    done = _broadcast(accelerator, done)
    if done:
        main = accelerator.is_main_process
        return json.loads((out_dir / INDEX_NAME).read_text()) if main else None
    splits = options.splits or tuple(probe.catalog.index["splits"])
    for split_name in splits:
        split = ShardSplit(source, split_name, data, world_size=world, rank=rank)
        chunks = -(-split.num_samples // options.shard_size)
        for j in range(rank, chunks, world):
            _encode_shard(vae, split, j, out_dir, options, accelerator.device)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    return _write_index(vae, out_dir, splits, identity, probe, options, scaling)


def _first_split(source: str, options: EncodeOptions) -> str:
    if options.splits:
        return options.splits[0]
    from vae_scale.data.sourcing.shards import load_index

    return next(iter(load_index(source)["splits"]))


def _broadcast(accelerator: Accelerator, value: bool | None) -> bool:
    flag = torch.tensor([1 if value else 0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    return bool(flag.item())


def _prepare(out_dir: Path, identity: dict[str, Any], force: bool) -> bool:
    """Whether `out_dir` already holds these latents, whole (True: nothing to do); refuses a
    folder of other latents or other files unless `force`, which empties it."""
    parts, index_file = out_dir / PARTS, out_dir / INDEX_NAME
    recorded = None
    if index_file.is_file():
        recorded = json.loads(index_file.read_text()).get("latents", {}).get("identity")
    elif (parts / "identity.json").is_file():
        recorded = json.loads((parts / "identity.json").read_text())
    elif out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(
            f"{out_dir} exists and holds other files; name a new or empty --out (or --force "
            f"to empty it)"
        )
    if recorded is not None and recorded != identity and not force:
        mine, theirs = identity["autoencoder"]["path"], recorded["autoencoder"]["path"]
        raise ConfigError(
            f"{out_dir} holds latents of {theirs} ({_difference(recorded, identity)}), not of "
            f"{mine} with these options; name another --out, or --force to replace them"
        )
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    elif recorded is not None and index_file.is_file():
        parts.mkdir(exist_ok=True)
        if not _reopen_damaged(out_dir, json.loads(index_file.read_text())):
            shutil.rmtree(parts)
            print(f"{out_dir} is up to date (index.json holds these latents); --force rewrites")
            return True
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(parts / "identity.json", identity)
    for stale in out_dir.glob(".*.tar.tmp-*"):  # a killed run's shard in the making
        stale.unlink(missing_ok=True)
    return False


def _reopen_damaged(out_dir: Path, index: dict[str, Any]) -> bool:
    """Whether any shard of a finished folder is missing or differs from its sha256: then
    the sound ones become records again, index.json goes, and the damaged are written anew."""
    entries = [e for split in index["splits"].values() for e in split["shards"]]
    damaged = [
        e["name"] for e in entries
        if "sums" not in e or not (out_dir / e["name"]).is_file()
        or sha256_file(out_dir / e["name"]) != e["sha256"]
    ]  # fmt: skip
    if not damaged:
        return False
    print(f"{out_dir}: {', '.join(damaged)} missing or damaged (sha256); writing them again")
    for entry in entries:
        if entry["name"] not in damaged:
            write_json_atomic(out_dir / PARTS / entry["name"].replace(".tar", ".json"), entry)
    (out_dir / INDEX_NAME).unlink()
    return True


def _difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in a if a[k] != b.get(k)]
    if "autoencoder" in keys and a["autoencoder"]["fingerprint"] != b["autoencoder"]["fingerprint"]:
        return "other weights"
    return "other " + ", ".join(keys)


def _encode_shard(
    vae: Any, split: ShardSplit, j: int, out_dir: Path, options: EncodeOptions, device: Any
) -> None:
    name = f"{split.split}-{j:06d}"
    record, shard = out_dir / PARTS / f"{name}.json", out_dir / f"{name}.tar"
    if record.is_file() and shard.is_file():
        entry = json.loads(record.read_text())
        if "sums" in entry and sha256_file(shard) == entry["sha256"]:
            return  # written by an earlier run
        print(f"{shard}: damaged (sha256 differs from its record); writing it again")
    start = j * options.shard_size
    stop = min(start + options.shard_size, split.num_samples)
    sums = np.zeros((3, vae.latent_shape[0]), np.float64)  # sum, sum of squares, count
    temp = out_dir / f".{name}.tar.tmp-{os.getpid()}"
    with wds.TarWriter(str(temp), encoder=False, mtime=0) as writer:
        for batch in split.range_batches(start, stop):
            z, moments = _latents(vae, batch, options, device)
            sums += moments
            for i, key in enumerate(batch["key"]):
                sample: dict[str, Any] = {"__key__": key, "npy": z[i]}
                if "cls" in batch:
                    sample["cls"] = batch["cls"][i]
                writer.write(encode_sample(sample, np.float16))
    fsync(temp)
    os.replace(temp, shard)
    entry = {
        "name": shard.name, "num_samples": stop - start, "sha256": sha256_file(shard),
        "members": member_table(shard).encode(), "sums": sums.tolist(),
    }  # fmt: skip
    write_json_atomic(record, entry)


@torch.no_grad()
def _latents(
    vae: Any, batch: dict[str, Any], options: EncodeOptions, device: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(B, h, w, C') float16 latents of a batch, and per channel of z: the sums of E[z],
    E[z^2] and the count (for the scaling factors)."""
    posterior = vae.encode(images_to_float(batch["image"], device))
    mean, std = posterior.mean.double(), torch.exp(0.5 * posterior.log_var.double())
    if options.content == "sample":
        eps = torch.stack([
            torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(
                derive_seed(options.seed, "encode", key)), dtype=torch.float64)
            for key in batch["key"]
        ]).to(mean.device)  # fmt: skip
        z = mean + std * eps
        stored, square = z, z**2
    else:
        stored, square = torch.cat([mean, std], 1), mean**2 + std**2
        z = mean
    count = z[:, 0].numel()
    counts = torch.full_like(z[0, :, 0, 0], count)
    moments = torch.stack([z.sum((0, 2, 3)), square.sum((0, 2, 3)), counts])
    hwc = stored.permute(0, 2, 3, 1).to(torch.float16).cpu().numpy()
    return np.ascontiguousarray(hwc), moments.cpu().numpy()


def _write_index(
    vae: Any,
    out_dir: Path,
    splits: tuple[str, ...],
    identity: dict[str, Any],
    probe: ShardSplit,
    options: EncodeOptions,
    own: dict[str, float] | None,
) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    sums = None
    for split_name in splits:
        records = sorted((out_dir / PARTS).glob(f"{split_name}-*.json"))
        shards = [json.loads(r.read_text()) for r in records]
        if sums is None and shards:
            sums = np.sum([s["sums"] for s in shards], axis=0)
        count = sum(s["num_samples"] for s in shards)
        entries[split_name] = {"num_samples": count, "shards": shards}
        print(f"  {split_name}: {entries[split_name]['num_samples']} latents, {len(shards)} shards")
    total, squares, count = (np.zeros((3, 1)) if sums is None else sums).sum(axis=1)
    mean = total / max(count, 1)
    std = float(np.sqrt(max(squares / max(count, 1) - mean**2, 1e-24)))
    measured = {"scaling_factor": 1.0 / std, "shift_factor": float(mean)}
    c, h, w = vae.latent_shape
    channels = 2 * c if options.content == "moments" else c
    latents = {
        "autoencoder": identity["autoencoder"],
        "content": options.content,
        "channels": c,
        **(own or measured),
        "scaling_from": "autoencoder" if own else f"measured on {splits[0]}",
        "measured": measured,
        "source": identity["source"],
        "identity": identity,  # what a re-run compares
    }
    index = make_index(
        f"{probe.catalog.index.get('dataset', 'dataset')}-latents",
        [channels, h, w],
        entries,
        {"autoencoder": identity["autoencoder"], "dataset": identity["source"]},
        {k: v for k, v in asdict(options).items() if k != "splits"},
        encoding=LATENT_ENCODING,
        latents=latents,
    )
    write_json_atomic(out_dir / INDEX_NAME, index, indent=1)
    shutil.rmtree(out_dir / PARTS, ignore_errors=True)
    return index
