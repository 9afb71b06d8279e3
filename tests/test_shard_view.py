"""Sliced reads of verified local shards (data/streaming/shard_view.py): the same batches as
the header walk, each shard hashed once per content across epochs and loader workers, a shard
changed afterwards hashed again and reported, labels decoded only when asked for."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from vae_scale.config import DataConfig
from vae_scale.data.members import MemberTable, member_table
from vae_scale.data.sourcing.base import SourceData
from vae_scale.data.sourcing.shards import write_dataset
from vae_scale.data.streaming import shard_view
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import DataError


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory):
    """60 RGB 6x5 images with a class and a JSON record each, 8 to a shard."""
    rng = np.random.default_rng(0)
    samples = [
        {"__key__": f"{i:04d}", "npy": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
         "cls": i % 4, "json": {"attr_vector": [i % 2, i % 3], "n": i}}
        for i in range(60)
    ]  # fmt: skip
    data = SourceData("rgb", (3, 6, 5), {"train": samples, "test": samples[:20]}, {"x": 1})
    out = tmp_path_factory.mktemp("rgb") / "rgb"
    write_dataset(data, out, shard_size=8)
    return out


def without_tables(split: ShardSplit) -> ShardSplit:
    split.catalog.shards = [dataclasses.replace(e, members=None) for e in split.catalog.shards]
    return split


def batches(split: ShardSplit, train: bool) -> list[dict]:
    return list(split.train_batches(1) if train else split.eval_batches())


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sliced_reads_equal_the_header_walk(rgb_shards, workers, train):
    def split():
        data = DataConfig(batch_size=7, num_workers=workers, shuffle_buffer=5)
        return ShardSplit(rgb_shards, "train", data, shuffle=train, seed=4)

    sliced, walked = batches(split(), train), batches(without_tables(split()), train)
    assert len(sliced) == len(walked) > 0
    for a, b in zip(sliced, walked):
        assert a["key"] == b["key"] and a["json"] == b["json"]
        assert torch.equal(a["cls"], b["cls"])
        assert torch.equal(a["image"], b["image"]) and a["image"].stride() == b["image"].stride()


def test_the_index_holds_each_shards_member_table(rgb_shards):
    index = json.loads((rgb_shards / "index.json").read_text())
    for shard in index["splits"]["train"]["shards"]:
        table, walked = (
            MemberTable.decode(shard["members"]),
            member_table(rgb_shards / shard["name"]),
        )
        assert (table.fields, table.keys) == (walked.fields, walked.keys)
        assert np.array_equal(table.offsets, walked.offsets)
        assert np.array_equal(table.sizes, walked.sizes)
        assert set(table.fields) == {"npy", "cls", "json"}
        assert len(table.keys) == shard["num_samples"]
        offsets, sizes = table.column("npy")
        data = (rgb_shards / shard["name"]).read_bytes()
        first = np.load(io.BytesIO(data[offsets[0] : offsets[0] + sizes[0]]))
        assert first.shape == (6, 5, 3)


def test_training_reads_no_labels_when_none_is_asked_for(rgb_shards):
    split = ShardSplit(rgb_shards, "train", DataConfig(batch_size=10), labels=False)
    batch = next(iter(split.train_batches(1)))
    assert "cls" not in batch and "json" not in batch and batch["image"].shape == (10, 3, 6, 5)


def test_each_shard_is_hashed_once_per_content(rgb_shards, tmp_path, monkeypatch):
    calls = tmp_path / "hashes"
    real = shard_view.hashlib.sha256

    def counted(data=b""):
        with open(calls, "a") as f:  # loader workers are other processes
            f.write("x\n")
        return real(data)

    monkeypatch.setattr(shard_view.hashlib, "sha256", counted)
    monkeypatch.setattr(shard_view, "_VERIFIED", None)  # a process starting afresh
    split = ShardSplit(rgb_shards, "train", DataConfig(batch_size=7, num_workers=2), shuffle=True)
    hashes = []
    for epoch in (1, 2, 3):
        assert len(list(split.train_batches(epoch))) == 60 // 14 * 2
        hashes.append(len(calls.read_text().splitlines()))
    # Epoch 1 hashes each of the 8 shards; two workers opening one shard at the same moment
    # may both hash it (a shard at most once per worker). Later epochs hash nothing.
    assert len(split.catalog.shards) <= hashes[0] <= 2 * len(split.catalog.shards)
    assert hashes[2] == hashes[1] == hashes[0]


def test_a_shard_changed_after_it_was_verified_is_hashed_again_and_named(rgb_shards, tmp_path):
    import shutil

    folder = tmp_path / "rgb"
    shutil.copytree(rgb_shards, folder)
    split = ShardSplit(folder, "train", DataConfig(batch_size=6))
    assert len(list(split.train_batches(1))) == 10
    shard = folder / split.catalog.shards[0].name
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # a pixel of the first image
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard.name}.*sha256"):
        list(split.train_batches(2))
