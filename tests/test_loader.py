import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from vae_scale.config import DataConfig
from vae_scale.data.sourcing.shards import encode_sample
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import DataError
from vae_scale.utils.fsutil import sha256_file


def make_shards(folder: Path, counts: list[int], shape=(4, 4, 1), mutate=None) -> Path:
    """A shard folder with `counts[i]` samples in shard i and a matching index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, n = [], 0
    for i, count in enumerate(counts):
        path = folder / f"train-{i:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as tar:
            for _ in range(count):
                sample = encode_sample(
                    {"__key__": f"s{n:05d}", "npy": np.full(shape, n % 256, np.uint8)}
                )
                if mutate:
                    sample = mutate(n, sample)
                tar.write(sample)
                n += 1
        shards.append({"name": path.name, "num_samples": count, "sha256": sha256_file(path)})
    index = {
        "format_version": 1,
        "dataset": "toy",
        "image_shape": [shape[2], *shape[:2]],
        "splits": {"train": {"num_samples": n, "shards": shards}},
    }
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def keys_of(split: ShardSplit, epoch: int) -> list[str]:
    return [k for batch in split.train_batches(epoch) for k in batch["key"]]


def test_epoch_order_changes_per_epoch_and_is_reproducible(tmp_path):
    split = ShardSplit(
        make_shards(tmp_path / "d", [10] * 8),
        "train",
        DataConfig(batch_size=5, shuffle_buffer=20),
        shuffle=True,
        seed=3,
    )
    e1, e1_again, e2 = keys_of(split, 1), keys_of(split, 1), keys_of(split, 2)
    assert e1 == e1_again
    assert e1 != e2 and sorted(e1) == sorted(e2)
    assert len(e1) == 80 and len(set(e1)) == 80


def test_ranks_read_disjoint_shards_and_same_step_count(tmp_path, monkeypatch):
    folder = make_shards(tmp_path / "d", [7, 13, 5, 20, 9, 11])  # uneven on purpose
    seen, steps = {}, {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        split = ShardSplit(
            folder, "train", DataConfig(batch_size=4), shuffle=True, seed=0, world_size=2, rank=rank
        )
        batches = list(split.train_batches(epoch=1))
        steps[rank] = len(batches)
        seen[rank] = {k for b in batches for k in b["key"]}
        assert steps[rank] == split.planner.batches_in_epoch()
    assert steps[0] == steps[1] > 0  # no rank waits for another at epoch end
    assert not seen[0] & seen[1]


def test_even_shards_every_sample_exactly_once_across_ranks(tmp_path, monkeypatch):
    folder = make_shards(tmp_path / "d", [8] * 4)
    keys = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        split = ShardSplit(
            folder, "train", DataConfig(batch_size=4), shuffle=True, world_size=2, rank=rank
        )
        keys += keys_of(split, 1)
    assert sorted(keys) == [f"s{i:05d}" for i in range(32)]


def test_more_workers_than_shards_read_every_sample_once(tmp_path):
    """Workers split an epoch by sample ranges: 2 workers on 1 shard both get work."""
    split = ShardSplit(
        make_shards(tmp_path / "d", [30]),
        "train",
        DataConfig(batch_size=2, num_workers=2, shuffle_buffer=4),
        shuffle=True,
    )
    split.catalog.check_enough_shards()  # indexed: nothing to check
    keys = keys_of(split, 1)
    assert sorted(keys) == [f"s{i:05d}" for i in range(30)]
    assert split.planner.batches_in_epoch() == 15


def test_wrong_distributed_view_is_caught(tmp_path, monkeypatch):
    # Two processes that each think they are rank 0 of 1 would read the same data.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="not one distributed job"):
        ShardSplit(make_shards(tmp_path / "d", [4]), "train", DataConfig(batch_size=2))


def test_missing_or_empty_shard_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*vae-scale shard"):
        ShardSplit(tmp_path / "nothing", "train", DataConfig(batch_size=2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"index.json is missing"):
        ShardSplit(tmp_path / "empty", "train", DataConfig(batch_size=2))
    folder = make_shards(tmp_path / "d", [4, 4])
    os.remove(folder / "train-000001.tar")
    with pytest.raises(DataError, match="train-000001.tar.*missing"):
        ShardSplit(folder, "train", DataConfig(batch_size=2))


def test_changed_shard_fails_checksum(tmp_path):
    folder = make_shards(tmp_path / "d", [4, 4])
    with open(folder / "train-000001.tar", "r+b") as f:
        f.seek(600)
        f.write(b"\x01")
    split = ShardSplit(
        folder, "train", DataConfig(batch_size=2, verify_shards=True)
    )  # nothing hashed up front
    with pytest.raises(DataError, match="train-000001.tar has sha256"):
        keys_of(split, 1)  # ... but while the shard streams
    assert (
        len(keys_of(ShardSplit(folder, "train", DataConfig(batch_size=2, verify_shards=False)), 1))
        == 8
    )


def test_truncated_tar_names_the_shard(tmp_path):
    folder = make_shards(tmp_path / "d", [6, 6])
    data = (folder / "train-000001.tar").read_bytes()
    (folder / "train-000001.tar").write_bytes(data[:1500])
    split = ShardSplit(folder, "train", DataConfig(batch_size=2))
    with pytest.raises(DataError, match="train-000001.tar"):
        list(split.eval_batches())


def test_pickle_member_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def add_pickle(n, sample):
        return {**sample, "pickle": pickle.dumps(Exploit())} if n == 2 else sample

    split = ShardSplit(
        make_shards(tmp_path / "d", [4], mutate=add_pickle), "train", DataConfig(batch_size=2)
    )
    with pytest.raises(DataError, match=r"train-000000.tar, sample s00002: refusing"):
        list(split.eval_batches())
    assert not marker.exists()


def test_bad_samples_raise_or_are_skipped_and_counted(tmp_path):
    def break_some(n, sample):
        if n == 1:  # wrong image size
            buf = io.BytesIO()
            np.save(buf, np.zeros((3, 3, 1), np.uint8))
            return {**sample, "npy": buf.getvalue()}
        if n == 5:  # no image at all
            return {"__key__": sample["__key__"], "cls": b"1"}
        return sample

    folder = make_shards(tmp_path / "d", [8], mutate=break_some)
    with pytest.raises(DataError, match=r"sample s00001: image of shape \(3, 3, 1\)"):
        list(ShardSplit(folder, "train", DataConfig(batch_size=8)).eval_batches())
    split = ShardSplit(folder, "train", DataConfig(batch_size=8, on_error="skip"))
    with pytest.warns(UserWarning, match="skipping"):
        batches = list(split.eval_batches())
    assert sum(len(b["key"]) for b in batches) == 6
    assert sum(b["skipped"] for b in batches) == 2


def test_fast_npy_reader_equals_np_load_and_rejects_truncated_payloads():
    from vae_scale.data.streaming.decode import load_npy

    rng = np.random.default_rng(0)
    for shape in [(28, 28, 1), (28, 28, 1), (32, 32, 3), (28, 20, 1)]:  # 2nd: cached header
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        buf = io.BytesIO()
        np.save(buf, array)
        assert np.array_equal(load_npy(buf.getvalue()), array)
    with pytest.raises(ValueError, match="npy payload"):
        load_npy(buf.getvalue()[:-5])


def test_in_memory_cache_gives_the_same_batches_and_reads_each_shard_once(tmp_path, monkeypatch):
    from vae_scale.data.streaming import remote

    folder = make_shards(tmp_path / "d", [10, 7, 12, 9])
    data = DataConfig(batch_size=4, shuffle_buffer=8)
    plain = ShardSplit(folder, "train", data, shuffle=True, seed=5)
    cached_data = data.model_copy(update={"cache_in_memory": True})
    cached = ShardSplit(folder, "train", cached_data, shuffle=True, seed=5)
    reads = []
    real_fetch = remote.fetch

    def counting_fetch(*args, **kwargs):
        reads.append(1)
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(remote, "fetch", counting_fetch)
    for epoch in (1, 2, 3):
        a, b = list(plain.train_batches(epoch)), list(cached.train_batches(epoch))
        assert [x["key"] for x in a] == [x["key"] for x in b]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert len(reads) == 3 * 4 + 4  # plain: every shard every epoch; cached: each shard once
    assert sorted(k for b in cached.eval_batches() for k in b["key"]) == [
        f"s{i:05d}" for i in range(38)
    ]
    assert len(reads) == 3 * 4 + 4  # evaluation of the cached split reads no file either


def test_in_memory_cache_does_not_keep_a_damaged_shard(tmp_path):
    folder = make_shards(tmp_path / "d", [6, 6])
    data = (folder / "train-000001.tar").read_bytes()
    (folder / "train-000001.tar").write_bytes(data[:1500])
    split = ShardSplit(
        folder, "train", DataConfig(batch_size=2, on_error="skip", cache_in_memory=True)
    )
    for _ in range(2):  # the damage is reported on every pass, not hidden by the cache
        with pytest.warns(UserWarning, match="train-000001.tar"):
            keys = [k for b in split.eval_batches() for k in b["key"]]
        assert keys[:6] == [f"s{i:05d}" for i in range(6)] and len(keys) < 12
    assert list(split._cache) == [str(folder / "train-000000.tar")]


def test_in_memory_cache_with_loader_workers_reads_no_file_after_the_first_fill(tmp_path):
    folder = make_shards(tmp_path / "d", [10, 7, 12, 9])
    data = DataConfig(batch_size=4, shuffle_buffer=8, num_workers=2)
    plain = ShardSplit(folder, "train", data, shuffle=True, seed=5)
    expected = {e: [b["key"] for b in plain.train_batches(e)] for e in (1, 2)}
    cached_data = data.model_copy(update={"cache_in_memory": True})
    cached = ShardSplit(folder, "train", cached_data, shuffle=True, seed=5)
    assert [b["key"] for b in cached.train_batches(1)] == expected[1]
    for shard in folder.glob("*.tar"):  # from now on only the cache can serve the samples
        shard.unlink()
    assert [b["key"] for b in cached.train_batches(2)] == expected[2]
    assert sorted(k for b in cached.eval_batches() for k in b["key"]) == [
        f"s{i:05d}" for i in range(38)
    ]
