"""Shards from anywhere: a real HTTP server on 127.0.0.1 (also a flaky one and one that keeps
failing a shard), pipe: commands, brace patterns, a local cache, and a WebDataset written by
another tool (webdataset.ShardWriter, .jpg of mixed sizes + .cls, no index.json)."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import tiny_frey_config
from helpers.http_shards import ShardServer
from vae_scale.config import DataConfig
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.errors import DataError

FAST_RETRY = dict(retries=3, retry_delay_s=0.01)


def epoch_keys(split: ShardSplit, epoch: int = 1) -> list[str]:
    return [k for b in split.train_batches(epoch) for k in b["key"]]


def frey_split(location, **data) -> ShardSplit:
    """The training split, `data` fields over a small batch and fast retries."""
    data = DataConfig(**{"batch_size": 50, "shuffle_buffer": 200, **FAST_RETRY, **data})
    return ShardSplit(location, "train", data, shuffle=True, seed=1)


def test_http_shards_read_exactly_what_the_local_folder_gives(frey_shards):
    local = frey_split(frey_shards / "frey")
    with ShardServer(frey_shards) as server:
        remote = frey_split(f"{server.url}/frey")
        assert remote.num_samples == local.num_samples == 1765
        for epoch in (1, 2):
            a, b = list(local.train_batches(epoch)), list(remote.train_batches(epoch))
            assert [x["key"] for x in a] == [x["key"] for x in b]
            assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
        evaluated = [k for batch in remote.eval_batches() for k in batch["key"]]
    assert len(evaluated) == len(set(evaluated)) == 1765
    assert server.requests["/frey/index.json"] >= 1


def test_flaky_server_is_retried_and_gives_the_same_samples(frey_shards):
    expected = epoch_keys(frey_split(frey_shards / "frey"))
    with ShardServer(frey_shards, fail_every=3) as server:
        assert epoch_keys(frey_split(f"{server.url}/frey")) == expected
    assert server.failures >= 4  # every third request failed, and the run did not notice


def test_a_shard_that_keeps_failing_is_an_error_naming_its_url(frey_shards):
    with ShardServer(frey_shards, always_fail="train-000003.tar") as server:
        split = frey_split(f"{server.url}/frey")
        with pytest.raises(DataError, match=r"/frey/train-000003.tar: still failing after 4"):
            epoch_keys(split)
        assert server.requests["/frey/train-000003.tar"] == 4  # 1 + data.retries
        skipping = frey_split(f"{server.url}/frey", on_error="skip")
        with pytest.warns(UserWarning, match="train-000003.tar"):
            batches = list(skipping.train_batches(1))
    # the run goes on: same steps, the lost shard's places taken by other samples and counted
    assert len(batches) == skipping.planner.batches_in_epoch()
    assert sum(b["skipped"] for b in batches) == 128


def test_pipe_urls_with_an_index_elsewhere(frey_shards):
    folder = frey_shards / "frey"
    index = json.loads((folder / "index.json").read_text())
    names = [s["name"] for s in index["splits"]["train"]["shards"]]
    urls = "::".join(f"pipe:cat {folder / n}" for n in names)
    piped = frey_split("", urls={"train": urls}, index_url=str(folder / "index.json"))
    assert piped.catalog.indexed and piped.num_samples == 1765
    assert epoch_keys(piped) == epoch_keys(frey_split(folder))


def test_brace_pattern_over_http_with_a_local_cache(frey_shards, tmp_path):
    cache = tmp_path / "cache"
    with ShardServer(frey_shards) as server:
        pattern = f"{server.url}/frey/train-{{000000..000013}}.tar"
        # index.json found beside them
        split = frey_split("", urls={"train": pattern}, retries=1, cache_dir=str(cache))
        assert split.catalog.indexed and split.num_samples == 1765
        first = epoch_keys(split, 1)
        served = sum(n for p, n in server.requests.items() if p.endswith(".tar"))
        second = epoch_keys(split, 2)
        again = sum(n for p, n in server.requests.items() if p.endswith(".tar"))
    assert served == 14 and again == served  # epoch 2 came from the cache
    assert len(list(cache.iterdir())) == 14
    assert len(set(first)) == len(set(second)) == 1750 and first != second  # 15 left out


def write_foreign_webdataset(folder, count=60, per_shard=20):
    """What most public image WebDatasets look like: JPEGs of any size with a .cls."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(folder / "part-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            yy, xx = np.mgrid[0:h, 0:w]
            pixels = (128 + 100 * np.sin(xx / (3 + i % 5) + yy / 7)).clip(0, 255)
            buf = io.BytesIO()
            Image.fromarray(np.stack([pixels] * 3, -1).astype(np.uint8)).save(buf, "JPEG")
            sink.write({"__key__": f"img{i:04d}", "jpg": buf.getvalue(), "cls": i % 3})
    return f"{folder}/part-{{0000..{count // per_shard - 1:04d}}}.tar"


def test_foreign_webdataset_without_index_is_resized_and_resampled(tmp_path):
    pattern = write_foreign_webdataset(tmp_path / "foreign")
    with pytest.raises(DataError, match="data.image_size"):
        ShardSplit("", "train", DataConfig(batch_size=8, urls={"train": pattern}))
    train = ShardSplit(
        "", "train", DataConfig(batch_size=8, urls={"train": pattern}, image_size=16), shuffle=True
    )
    with pytest.raises(DataError, match="data.samples_per_epoch"):
        train.catalog.check_enough_shards()
    train = ShardSplit(
        "",
        "train",
        DataConfig(batch_size=8, urls={"train": pattern}, image_size=16, samples_per_epoch=40),
        shuffle=True,
    )
    batches = list(train.train_batches(1))
    assert len(batches) == train.planner.batches_in_epoch() == 5
    assert batches[0]["image"].shape == (8, 3, 16, 16) and batches[0]["image"].dtype == torch.uint8
    assert set(batches[0]["cls"].tolist()) <= {0, 1, 2}
    evaluation = ShardSplit(
        "", "test", DataConfig(batch_size=16, urls={"test": pattern}, image_size=16)
    )
    keys = [k for b in evaluation.eval_batches() for k in b["key"]]
    assert sorted(keys) == [f"img{i:04d}" for i in range(60)]  # index-less: every sample once


@pytest.mark.slow
def test_training_on_a_foreign_webdataset_learns(frey_shards, tmp_path):
    from vae_scale.training.loop import train

    pattern = write_foreign_webdataset(tmp_path / "foreign", count=120, per_shard=30)
    cfg = tiny_frey_config(
        frey_shards,
        tmp_path,
        f"data.urls={{train: '{pattern}', test: '{pattern}'}}",
        "data.image_size=16",
        "data.samples_per_epoch=240",
        "data.batch_size=24",
        "model.num_layers=3",
        "train.epochs=3",
        "train.lr=3e-3",
        "eval.picture_epochs=[]",
    )
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/num_samples"] for r in rows] == [240] * 3
    assert rows[-1]["test/num_samples"] == 120
    assert rows[-1]["test/neg_elbo"] < rows[0]["test/neg_elbo"]


@pytest.mark.slow
def test_a_run_from_http_equals_the_run_from_the_local_folder(frey_shards, tmp_path):
    from vae_scale.training.loop import train

    local = train(tiny_frey_config(frey_shards, tmp_path / "local", "train.epochs=1"))
    with ShardServer(frey_shards) as server:
        remote = train(
            tiny_frey_config(
                frey_shards, tmp_path / "http", f"data.shards_dir={server.url}", "train.epochs=1"
            )
        )
    rows = [
        json.loads((run / "metrics.jsonl").read_text().splitlines()[0]) for run in (local, remote)
    ]
    for key in ("train/neg_elbo", "val/neg_elbo", "test/neg_elbo", "train/num_samples"):
        assert rows[0][key] == rows[1][key], key
