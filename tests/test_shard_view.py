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


def test_unverified_shards_take_the_fast_path_with_their_headers_checked(
    rgb_shards, tmp_path, monkeypatch
):
    """data.verify_shards=false skips the hash, not the sliced reads: each shard's member
    table is still checked against its tar headers once (a lying table is not believed)."""
    import shutil

    walks = []
    real_walk = shard_view.member_table_of
    monkeypatch.setattr(shard_view, "member_table_of", lambda fd: walks.append(1) or real_walk(fd))
    monkeypatch.setattr(shard_view, "_hash_matches", lambda *a: pytest.fail("hashed"))
    monkeypatch.setattr(shard_view, "_VERIFIED", None)
    data = DataConfig(batch_size=6, verify_shards=False)
    split = ShardSplit(rgb_shards, "train", data)
    opened = []
    real_open = shard_view.ShardView.open
    monkeypatch.setattr(
        shard_view.ShardView,
        "open",
        lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1],
    )
    got = batches(split, train=False) + batches(split, train=False)
    assert opened and all(view is not None for view in opened)  # every shard sliced
    assert len(walks) == len(split.catalog.shards)  # headers walked once per shard
    truth = batches(without_tables(ShardSplit(rgb_shards, "train", data)), train=False)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, truth + truth))

    folder = tmp_path / "rgb"
    shutil.copytree(rgb_shards, folder)
    lying_index(folder)
    with pytest.warns(UserWarning, match="the member table in index"):
        lied = batches(ShardSplit(folder, "train", data), train=False)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(lied, truth))


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


def lying_index(folder) -> None:
    """Every offset of every shard's member table pointed at its first member, as the held-out
    audit did (the shard's bytes and sha256 untouched)."""
    path = folder / "index.json"
    index = json.loads(path.read_text())
    for split in index["splits"].values():
        for shard in split["shards"]:
            table = MemberTable.decode(shard["members"])
            offsets = np.repeat(table.offsets[:1], len(table.keys), axis=0)
            shard["members"] = dataclasses.replace(table, offsets=offsets).encode()
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_member_table_that_lies_is_not_believed(rgb_shards, tmp_path, workers):
    import shutil

    folder = tmp_path / "rgb"
    shutil.copytree(rgb_shards, folder)
    lying_index(folder)
    data = DataConfig(batch_size=6, num_workers=workers)
    lied = ShardSplit(folder, "train", data)
    lied.verified = shard_view.VerifiedShards()  # nothing verified yet in this process
    if workers:  # the warning comes from the worker processes' stderr
        got = batches(lied, train=False)
    else:
        with pytest.warns(UserWarning, match=r"train-000000\.tar: the member table in index"):
            got = batches(lied, train=False)
    truth = batches(without_tables(ShardSplit(rgb_shards, "train", data)), train=False)
    assert [b["key"] for b in got] == [b["key"] for b in truth]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, truth))
    assert len({bytes(x.numpy()) for b in got for x in b["image"]}) == 60  # not one image


@pytest.mark.parametrize("change", ["rewritten", "truncated"])
@pytest.mark.parametrize("held", ["in memory", "by position"])
def test_a_shard_changed_in_place_while_read_is_never_trained_on(
    rgb_shards, tmp_path, change, held
):
    """The file is changed (same inode, as `cp new.tar shard.tar` or `rsync --inplace` do)
    between two batches of one visit. Held in memory (the default up to
    data.max_shard_mb_in_memory), the visit goes on with the verified bytes and the next visit
    is refused naming the shard; read by position, the next batch that read it is refused
    naming the shard (never a SIGBUS), or with data.on_error=skip its samples are replaced and
    counted."""
    import shutil

    limit = {"in memory": 512.0, "by position": 0.001}[held]
    truth = {}
    for b in ShardSplit(rgb_shards, "train", DataConfig(batch_size=60)).eval_batches():
        truth.update(zip(b["key"], b["image"]))
    for on_error in ("raise", "skip"):
        folder = tmp_path / on_error / "rgb"
        shutil.copytree(rgb_shards, folder)
        (shard,) = [folder / "train-000000.tar"]
        data = DataConfig(batch_size=2, on_error=on_error, max_shard_mb_in_memory=limit)
        split = ShardSplit(folder, "train", data)
        split.verified = shard_view.VerifiedShards()
        stream = split.eval_batches()
        first = next(stream)  # shard 0 open, verified, 2 of its 8 samples read
        with open(shard, "r+b") as f:  # in place: same inode
            if change == "truncated":
                f.truncate(3000)
            else:
                f.seek(1024)
                f.write(b"\xff" * 2048)
        if held == "in memory":
            rest = list(stream)  # the visit goes on with the bytes that were verified
            for b in [first, *rest]:
                assert all(torch.equal(x, truth[k]) for k, x in zip(b["key"], b["image"]))
            if on_error == "raise":
                with pytest.raises(DataError, match=r"train-000000\.tar"):
                    list(split.eval_batches())  # the next visit: hashed again, refused
            continue
        if on_error == "raise":
            with pytest.raises(DataError, match=r"train-000000\.tar changed on disk"):
                next(stream)
            continue
        rest = list(stream)
        got = [first, *rest]
        keys = [k for b in got for k in b["key"]]
        assert keys[:2] == ["0000", "0001"] and "0002" not in keys and "0008" in keys
        assert sum(b["skipped"] for b in got) == 6  # the shard's other samples, counted
