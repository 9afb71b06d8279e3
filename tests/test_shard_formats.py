"""Compressed image members (`vae-scale shard --format png|jpg|webp`): recorded in index.json,
read back through the sliced fast path (decoded in the loader's workers), png bit for bit the
npy images, jpg/webp close to them and smaller on disk; through the real CLI end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_overrides
from vae_scale.config import DataConfig
from vae_scale.data.image_format import ImageFormat
from vae_scale.data.sourcing.base import SourceData
from vae_scale.data.sourcing.shards import write_dataset
from vae_scale.data.streaming import shard_view
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import DataError


def smooth_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Photo-like RGB images (smooth blobs and gradients: what JPEG is made for)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        channels = []
        for _ in range(3):
            blob = (yy - rng.uniform()) ** 2 + (xx - rng.uniform()) ** 2
            blob = np.exp(-blob / rng.uniform(0.05, 0.3)) * rng.uniform(120, 220)
            channels.append(blob + xx * rng.uniform(0, 30))
        out.append(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same 40 RGB 64x64 images with a class each, 8 to a shard, in every format."""
    images = smooth_images(40, 64)
    samples = [{"__key__": f"{i:04d}", "npy": x, "cls": i % 3} for i, x in enumerate(images)]
    root = tmp_path_factory.mktemp("formats")
    for codec in ("npy", "png", "jpg", "webp"):
        data = SourceData("rgb", (3, 64, 64), {"train": samples}, {"x": 1})
        write_dataset(data, root / codec, shard_size=8, image_format=ImageFormat(codec))
    return root


def batches(folder, workers: int) -> list[dict]:
    data = DataConfig(batch_size=6, num_workers=workers, shuffle_buffer=5)
    return list(ShardSplit(folder, "train", data, shuffle=True, seed=3).train_batches(1))


@pytest.mark.parametrize("workers", [0, 2])
def test_every_format_is_read_through_the_fast_path(formats, workers, monkeypatch):
    decoded = []
    if workers == 0:  # in this process: count the members the sliced path decodes
        original = shard_view.ShardView._decode_into
        monkeypatch.setattr(
            shard_view.ShardView,
            "_decode_into",
            lambda self, m, row: (decoded.append(self.codec), original(self, m, row)),
        )
    raw = batches(formats / "npy", workers)
    for codec in ("png", "jpg", "webp"):
        index = json.loads((formats / codec / "index.json").read_text())
        assert index["encoding"] == f"{codec} uint8 HWC"
        assert index["params"]["format"] == codec
        assert index["splits"]["train"]["shards"][0]["members"]["fields"] == ["cls", codec]
        got = batches(formats / codec, workers)
        assert [b["key"] for b in got] == [b["key"] for b in raw]  # the same plan
        x = torch.cat([b["image"] for b in got]).float()
        y = torch.cat([b["image"] for b in raw]).float()
        assert x.shape == y.shape == (36, 3, 64, 64)  # 40 samples, 6 a batch, drop_last
        if codec == "png":
            assert torch.equal(x, y)  # lossless
        else:
            psnr = 10 * torch.log10(255**2 / (x - y).pow(2).mean())
            assert psnr > 33, (codec, psnr)  # quality 95
    if workers == 0:
        assert decoded.count("png") == decoded.count("jpg") == decoded.count("webp") == 36


def test_lossy_formats_are_smaller_on_disk(formats):
    codecs = ("npy", "png", "jpg", "webp")
    size = {c: sum(p.stat().st_size for p in (formats / c).glob("*.tar")) for c in codecs}
    assert size["jpg"] < 0.4 * size["npy"] and size["webp"] < 0.4 * size["npy"], size


def test_a_member_that_does_not_decode_names_its_shard_and_sample(formats, tmp_path):
    """A jpg member whose bytes hash as index.json says but do not decode (a writer bug, a
    foreign tool): one error naming the shard and the sample, not a traceback from PIL."""
    import shutil

    from vae_scale.data.members import MemberTable
    from vae_scale.utils.fsutil import sha256_file

    folder = tmp_path / "jpg"
    shutil.copytree(formats / "jpg", folder)
    index = json.loads((folder / "index.json").read_text())
    entry = index["splits"]["train"]["shards"][0]
    table = MemberTable.decode(entry["members"])
    offsets, sizes = table.column("jpg")
    shard = folder / entry["name"]
    data = bytearray(shard.read_bytes())
    start = int(offsets[0]) + 20  # past the JPEG header: the entropy-coded data
    data[start : int(offsets[0]) + int(sizes[0])] = bytes(int(sizes[0]) - 20)
    shard.write_bytes(bytes(data))
    entry["sha256"] = sha256_file(shard)
    (folder / "index.json").write_text(json.dumps(index))
    data = DataConfig(batch_size=8, num_workers=0)
    with pytest.raises(DataError, match=rf"{entry['name']}, sample 0000: its jpg member"):
        list(ShardSplit(folder, "train", data, shuffle=False, seed=0).eval_batches())


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vae_scale", *args], env=env, capture_output=True, text=True,
        timeout=300, cwd=REPO,
    )  # fmt: skip


@pytest.mark.slow
def test_shard_format_jpg_then_train_through_the_cli(frey_source, tmp_path):
    out = tmp_path / "shards"
    done = cli("shard", "frey", "--source", str(frey_source), "--out", str(out),
               "--format", "jpg", "--quality", "90")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    index = json.loads((out / "frey" / "index.json").read_text())
    assert index["encoding"] == "jpg uint8 HWC" and index["params"]["quality"] == 90
    again = cli("shard", "frey", "--source", str(frey_source), "--out", str(out),
                "--format", "jpg", "--quality", "90")  # fmt: skip
    assert "is up to date" in again.stdout  # the same format: nothing rewritten
    done = cli(
        "train", str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(out, tmp_path / "runs", "model.base_channels=8", "model.latent_dim=8",
                        "train.epochs=2", "data.batch_size=50", "eval.picture_epochs=[]",
                        "train.log_every_steps=5"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "runs" / "tiny" / "steps.jsonl").open()]
    first, last = rows[0]["train/step_neg_elbo"], rows[-1]["train/step_neg_elbo"]
    assert last < 0.8 * first  # it learns from the decoded images


def test_bad_format_options_are_one_line_errors(frey_source, tmp_path):
    done = cli("shard", "frey", "--source", str(frey_source), "--out", str(tmp_path),
               "--format", "png", "--quality", "80")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --quality: only for --format jpg or webp (not png)"
    done = cli("shard", "frey", "--source", str(frey_source), "--out", str(tmp_path),
               "--format", "jpg", "--quality", "101")  # fmt: skip
    assert done.returncode == 2 and "--quality 101: expected 1..100" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "frey").exists()
