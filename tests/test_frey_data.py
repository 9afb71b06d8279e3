import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vae_scale.config import DataConfig
from vae_scale.data.sourcing import frey
from vae_scale.data.sourcing.shards import load_index, write_dataset
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import DataError


def read_all(shard_dir: Path, split: str) -> dict[str, bytes]:
    """key -> npy bytes, straight from the tar files (not through our loader)."""
    out = {}
    for tar_path in sorted(shard_dir.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "npy":
                    assert key not in out, f"{key} written twice"
                    out[key] = tar.extractfile(member).read()
    return out


def test_split_counts_and_index(frey_shards):
    index = load_index(frey_shards / "frey")
    assert {k: v["num_samples"] for k, v in index["splits"].items()} == {
        "train": 1765,
        "val": 100,
        "test": 100,
    }
    assert index["image_shape"] == [1, 28, 20]
    train = index["splits"]["train"]["shards"]
    assert sum(s["num_samples"] for s in train) == 1765 and len(train) == 14
    assert all(len(s["sha256"]) == 64 for s in train)
    assert len(index["source"]["files"]["frey_rawface.mat"]) == 64


def test_round_trip_every_sample_once_bytes_equal(frey_source, frey_shards):
    images = frey.load_images(frey_source / "frey_rawface.mat")
    shard_dir = frey_shards / "frey"
    keys = set()
    for split in ("train", "val", "test"):
        raw = read_all(shard_dir, split)
        data = ShardSplit(shard_dir, split, DataConfig(batch_size=64, verify_shards=True))
        seen = []
        for batch in data.eval_batches():
            for key, image in zip(batch["key"], batch["image"]):
                seen.append(key)
                expected = images[int(key.split("_")[1])]
                assert np.array_equal(image[0].numpy(), expected)
                assert np.array_equal(np.load(io.BytesIO(raw[key]))[..., 0], expected)
        assert sorted(seen) == sorted(raw), split  # each written sample read back once
        keys |= set(seen)
    assert len(keys) == 1965  # splits are disjoint and cover the file


def test_rerun_is_noop_and_force_rebuilds_identically(frey_source, tmp_path):
    data = frey.prepare(frey_source, seed=0, download_ok=False)
    first = write_dataset(data, tmp_path / "frey", shard_size=500)
    mtime = (tmp_path / "frey" / "train-000000.tar").stat().st_mtime_ns
    again = write_dataset(data, tmp_path / "frey", shard_size=500)
    assert again == first
    assert (tmp_path / "frey" / "train-000000.tar").stat().st_mtime_ns == mtime
    rebuilt = write_dataset(
        frey.prepare(frey_source, seed=0, download_ok=False),
        tmp_path / "frey",
        shard_size=500,
        force=True,
    )
    assert rebuilt["splits"] == first["splits"]  # same bytes: same sha256 for every shard
    other_seed = write_dataset(
        frey.prepare(frey_source, seed=1, download_ok=False), tmp_path / "frey", shard_size=500
    )
    assert other_seed["splits"] != first["splits"]
    assert not list(tmp_path.glob(".frey*")), "temporary build folders left behind"


def test_missing_file_offline_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        frey.locate(tmp_path / "nowhere", download_ok=False)
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "frey_rawface.mat") in msg and "cs.nyu.edu" in msg


def test_corrupt_and_wrong_shape_mat(tmp_path):
    from scipy.io import savemat

    bad = tmp_path / "frey_rawface.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file, this is not really one" * 10)
    with pytest.raises(DataError, match=str(bad)):
        frey.load_images(bad)
    savemat(bad, {"ff": np.zeros((560, 100), np.uint8)})
    with pytest.raises(DataError, match=r"\(560, 100\)"):
        frey.load_images(bad)
    savemat(bad, {"faces": np.zeros((560, 1965), np.uint8)})
    with pytest.raises(DataError, match="'ff' not found"):
        frey.load_images(bad)


def test_failed_rebuild_keeps_previous_shards(frey_source, tmp_path):
    data = frey.prepare(frey_source, seed=0, download_ok=False)
    write_dataset(data, tmp_path / "frey", shard_size=500)
    before = json.loads((tmp_path / "frey" / "index.json").read_text())
    data.splits["test"] = [{"__key__": "bad", "npy": np.zeros((5, 5, 1), np.uint8)}]
    with pytest.raises(DataError, match="image shape"):
        write_dataset(data, tmp_path / "frey", shard_size=500, force=True)
    assert json.loads((tmp_path / "frey" / "index.json").read_text()) == before
    ShardSplit(
        tmp_path / "frey", "train", DataConfig(batch_size=10, verify_shards=True)
    )  # still intact
