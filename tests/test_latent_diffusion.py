"""Latent shards and the diffusion probe through the real CLI: `vae-scale encode` (every latent
the autoencoder's, labels carried, resumable after SIGKILL, 2 processes write the bytes 1
does, a damaged shard rewritten, refusals) and `vae-scale probe` (it learns, reports gFID,
resumes bitwise after SIGKILL, 2 processes equal 1 on the same global batch, refusals)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_autoencoder import blobs, cli

from helpers.processes import command, kill_after_rows, one_and_two
from vae_scale.config import DataConfig
from vae_scale.data.streaming.inputs import prepare_batch
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_WEIGHTS = REPO.parent / "shared" / "weights"
HAVE_FID = (SHARED_WEIGHTS / "pt_inception-2015-12-05.safetensors").is_file()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A labelled RGB dataset: 256 train, 12 val and 12 test blobs of 16x16."""
    from vae_scale.data.sourcing.base import SourceData
    from vae_scale.data.sourcing.shards import write_dataset

    def labelled(n: int, seed: int):
        return [{**s, "cls": i % 3} for i, s in enumerate(blobs(n, seed))]

    out = tmp_path_factory.mktemp("shards")
    splits = {"train": labelled(256, 0), "val": labelled(12, 1), "test": labelled(12, 2)}
    write_dataset(SourceData("blobs", (3, 16, 16), splits, {"synthetic": True}), out / "blobs", 64)
    return out / "blobs"


@pytest.fixture(scope="module")
def autoencoder(shards, tmp_path_factory) -> Path:
    """A KL autoencoder (16x16x3 -> 4x4x4) trained 1 epoch, with an EMA and latent stats."""
    runs = tmp_path_factory.mktemp("runs")
    done = cli(
        "train", str(REPO / "configs" / "celeba64_autoencoder.yaml"),
        f"data.shards_dir={shards.parent}", "data.dataset=blobs", "data.batch_size=16",
        "data.num_workers=0", f"run.dir={runs}", "run.name=ae", "wandb.mode=disabled",
        "model.widths=[16,16,16]", "model.groups=8", "model.layers_per_block=1",
        "loss.perceptual.weight=0", "loss.discriminator.weight=0", "train.epochs=1",
        "train.mixed_precision=no", "train.channels_last=false", "train.lr=1e-3",
        "train.ema_decay=0.9", "eval.picture_epochs=[]", "eval.rfid=off", "eval.lpips=off",
        "eval.diffusability=off", "eval.latent_stats_samples=64",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "ae"


@pytest.fixture(scope="module")
def latents(autoencoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "ae"
    done = cli("encode", str(autoencoder), "--out", str(out), "--shard-size", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def shard_hashes(folder: Path) -> dict[str, str]:
    index = json.loads((folder / "index.json").read_text())
    return {s["name"]: s["sha256"] for split in index["splits"].values() for s in split["shards"]}


# ------------------------------------------------------------------------- encode


def test_encode_writes_the_autoencoders_latents_with_labels_and_scaling(
    autoencoder, shards, latents
):
    from vae_scale.hub.pretrained import from_pretrained

    index = json.loads((latents / "index.json").read_text())
    assert index["image_shape"] == [8, 4, 4] and index["encoding"] == "npy float16 HWC"
    assert {k: v["num_samples"] for k, v in index["splits"].items()} == {
        "train": 256, "val": 12, "test": 12,
    }  # fmt: skip
    assert [len(v["shards"]) for v in index["splits"].values()] == [3, 1, 1]
    info = index["latents"]
    stats = json.loads((autoencoder / "latent_stats.json").read_text())
    assert info["scaling_factor"] == stats["scaling_factor"]  # the autoencoder's own
    assert info["scaling_from"] == "autoencoder" and info["content"] == "moments"
    assert info["source"]["location"] == str(shards.resolve())
    vae = from_pretrained(autoencoder)
    for split in ("train", "test"):
        stored = ShardSplit(latents, split, DataConfig(batch_size=64))
        source = ShardSplit(shards, split, DataConfig(batch_size=64))
        for mine, theirs in zip(stored.eval_batches(), source.eval_batches(), strict=True):
            assert mine["key"] == theirs["key"] and torch.equal(mine["cls"], theirs["cls"])
            posterior = vae.encode(theirs["image"])
            x = prepare_batch(mine["image"], "cpu")
            mean, std = x.chunk(2, dim=1)
            assert torch.allclose(mean, posterior.mean, rtol=2e-3, atol=2e-3)
            assert torch.allclose(std, torch.exp(0.5 * posterior.log_var), rtol=2e-3, atol=1e-4)
    # the same command again: nothing to do
    before = {p.name: p.stat().st_mtime_ns for p in latents.glob("*.tar")}
    again = cli("encode", str(autoencoder), "--out", str(latents), "--shard-size", "100")
    assert again.returncode == 0 and "up to date" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in latents.glob("*.tar")} == before


def test_a_damaged_latent_shard_is_named_and_written_again(autoencoder, latents, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(latents), str(copy)], check=True)
    hashes = shard_hashes(copy)
    with open(copy / "train-000001.tar", "r+b") as f:
        f.seek(5000)
        f.write(b"\xff" * 64)
    with pytest.raises(DataError, match="train-000001.tar"):
        for _ in ShardSplit(copy, "train", DataConfig(batch_size=64)).eval_batches():
            pass
    done = cli("encode", str(autoencoder), "--out", str(copy), "--shard-size", "100")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train-000001.tar" in done.stdout and "writing them again" in done.stdout
    assert shard_hashes(copy) == hashes  # the same bytes as before the damage


def test_encode_resumes_after_sigkill_and_two_processes_write_the_same_bytes(autoencoder, tmp_path):
    # small shards, so that the kill lands among them even when this process is slow to look
    args = ["encode", str(autoencoder), "--shard-size", "4", "--batch-size", "4"]
    whole = cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = shard_hashes(tmp_path / "whole")
    assert len(expected) == 64 + 3 + 3
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_scale", *args, "--out", str(killed)], env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    wanted = random.Random(os.getpid()).randint(1, 6)
    while len(list((killed / ".encode").glob("train-*.json"))) < wanted:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "index.json").exists()
    done = cli(*args, "--out", str(killed))
    assert done.returncode == 0, done.stderr[-2000:]
    assert shard_hashes(killed) == expected
    assert not list(killed.glob(".*tmp*")) and not (killed / ".encode").exists()
    two = subprocess.run(
        [*command(2), *args, "--out", str(tmp_path / "two")],
        env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
        cwd=REPO,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert shard_hashes(tmp_path / "two") == expected


def test_encode_refuses_other_latents_and_models_without_spatial_latents(
    autoencoder, latents, shards, tmp_path
):
    # the raw weights of the same run are another autoencoder than its EMA
    other = cli("encode", str(autoencoder), "--weights", "raw", "--out", str(latents))
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert f"{latents} holds latents of {autoencoder}" in other.stderr
    assert "other weights" in other.stderr
    mlp = cli(
        "train", str(REPO / "configs" / "mnist_mlp_z2.yaml"), f"data.shards_dir={shards.parent}",
        "data.dataset=blobs", "data.binarize=none", "data.num_workers=0", f"run.dir={tmp_path}",
        "run.name=mlp", "wandb.mode=disabled", "train.epochs=1", "eval.picture_epochs=[]",
    )  # fmt: skip
    assert mlp.returncode == 0, mlp.stderr[-2000:]
    refused = cli("encode", str(tmp_path / "mlp"), "--out", str(tmp_path / "mlp_latents"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "needs an autoencoder with spatial latents" in refused.stderr
    assert not (tmp_path / "mlp_latents").exists()


# ------------------------------------------------------------------------- probe


def probe_args(latents: Path, run_dir: Path, name: str, *extra: str) -> list[str]:
    gfid = [f"run.weights_dir={SHARED_WEIGHTS}", "loss.probe.gfid_samples=12"]
    return [
        "probe", str(latents), f"run.dir={run_dir}", f"run.name={name}", "wandb.mode=disabled",
        "model.width=32", "model.depth=2", "model.heads=2", "model.patch_size=1",
        "data.batch_size=32", "data.num_workers=0", "train.epochs=3", "train.lr=2e-3",
        "train.mixed_precision=no", "train.ema_decay=0.9", "train.log_every_steps=1",
        "train.checkpoint_every_steps=4", "train.keep_checkpoints=100",
        "loss.probe.sample_steps=4", *(gfid if HAVE_FID else ["loss.probe.gfid_samples=0"]),
        *extra,
    ]  # fmt: skip


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def probed(latents, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("probes")
    done = cli(*probe_args(latents, runs, "ref"))
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "ref"


def test_probe_learns_the_latents_and_reports_gfid(probed):
    metrics = rows(probed / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["val/fm_loss"] < 0.95 * metrics[0]["val/fm_loss"]
    assert metrics[-1]["train/fm_loss"] < metrics[0]["train/fm_loss"]
    assert ("test/gfid" in metrics[-1]) == HAVE_FID
    assert all("test/gfid" not in m for m in metrics[:-1])
    if HAVE_FID:
        assert metrics[-1]["test/gfid"] > 0 and metrics[-1]["test/gfid_samples"] == 12
    steps = rows(probed / "steps.jsonl")
    assert len(steps) == 24 and all(np.isfinite(s["train/step_fm_loss"]) for s in steps)
    record = json.loads((probed / "config.json").read_text())
    assert record["command"].startswith("vae-scale probe ")
    refused = cli("eval", str(probed))  # a VAE's evaluation has nothing to say of it
    assert refused.returncode == 2 and "not a VAE" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_compare_puts_the_probe_beside_its_autoencoder(autoencoder, probed, tmp_path):
    report = tmp_path / "report.md"
    done = cli("compare", str(autoencoder), str(probed), "--out", str(report))
    assert done.returncode == 0, done.stderr[-2000:]
    table = report.read_text().split("## Final metrics")[1]
    assert table.splitlines()[2] == "| metric | ae |"  # the probe has no column of its own
    probe = rows(probed / "metrics.jsonl")[-1]
    line = next(row for row in table.splitlines() if row.startswith("| probe ref: val fm_loss"))
    assert line == f"| probe ref: val fm_loss | {probe['val/fm_loss']:.4g} |"
    ordered = [row.split(" | ")[0][2:] for row in table.splitlines()[4:]]
    assert ordered.index("test/psnr") < ordered.index("probe ref: epochs") < ordered.index("epochs")


def test_probe_resumes_bitwise_after_sigkill(latents, probed, tmp_path):
    args = probe_args(latents, tmp_path, "killed")
    log = tmp_path / "killed" / "steps.jsonl"
    kill_after = random.Random(os.getpid()).randint(5, 18)
    kill_after_rows(args, log, kill_after)
    time.sleep(3)  # time down: goodput counts it
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    # goodput: productive training seconds over wall seconds since the first start
    mine, ref = rows(log.parent / "metrics.jsonl")[-1], rows(probed / "metrics.jsonl")[-1]
    for row in (mine, ref):
        assert 0 < row["time/productive_s"] < row["time/wall_s"]
        assert row["time/goodput"] == pytest.approx(row["time/productive_s"] / row["time/wall_s"])
    assert (
        mine["time/wall_s"] > ref["time/wall_s"] + 3 and mine["time/goodput"] < ref["time/goodput"]
    )
    assert rows(log) == rows(probed / "steps.jsonl")
    untimed = [
        [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))} for row in r]
        for r in (rows(log.parent / "metrics.jsonl"), rows(probed / "metrics.jsonl"))
    ]
    assert untimed[0] == untimed[1]  # fm_loss of every split, gFID: bitwise
    final = "checkpoints/step_00000024"
    for name in ("model.safetensors", "ema.safetensors"):
        mine, ref = (load_file(r / final / name) for r in (log.parent, probed))
        assert mine.keys() == ref.keys()
        assert all(torch.equal(mine[k], ref[k]) for k in mine), name


def test_probe_two_processes_equal_one_on_the_same_global_batch(latents, tmp_path):
    one, two = one_and_two("probe_step.py", ["--latents", str(latents)], tmp_path)
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert b["fm_loss"] == pytest.approx(a["fm_loss"], rel=1e-5)
    assert one["rows"][0]["fm_loss"] != one["rows"][-1]["fm_loss"]  # it trained
    for key, value in one["model"].items():
        assert np.allclose(value, two["model"][key], atol=1e-6), key


def test_probe_refuses_another_decoder_missing_inception_and_image_shards(
    autoencoder, latents, shards, tmp_path
):
    raw = tmp_path / "raw_export"
    exported = cli("export", str(autoencoder), str(raw), "--weights", "raw")
    assert exported.returncode == 0, exported.stderr[-2000:]
    cases = {  # (later overrides win)
        "decoder": (
            ["loss.probe.gfid_samples=8", f"loss.probe.autoencoder={raw}"],
            [f"holds latents of the autoencoder {autoencoder}", str(raw)],
        ),
        "inception": (
            [f"run.weights_dir={tmp_path / 'empty'}", "loss.probe.gfid_samples=8"],
            ["pt_inception-2015-12-05"],
        ),
    }
    env = {"TORCH_HOME": str(tmp_path / "torch"), "VAE_SCALE_WEIGHTS": ""}
    for name, (extra, said) in cases.items():
        done = cli(*probe_args(latents, tmp_path, name), *extra, env=env)
        assert done.returncode == 2, (name, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
        for text in said:
            assert text in done.stderr, (name, done.stderr)
        assert not (tmp_path / name).exists()  # no run folder left behind
    images = cli(*probe_args(shards, tmp_path, "images"))
    assert images.returncode == 2 and "not latent shards" in images.stderr
    assert "vae-scale encode" in images.stderr and not (tmp_path / "images").exists()
