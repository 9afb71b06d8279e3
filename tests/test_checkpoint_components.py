"""A checkpoint holds what the checkpointer is handed: each component's state dict under its
name (tensors as safetensors, the rest as JSON); checkpoints of the earlier layout (every
counter in train_state.json) still resume exactly."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_frey_config
from vae_scale.training import checkpoint
from vae_scale.training.loop import train
from vae_scale.training.networks import UpdateCounts
from vae_scale.utils.fsutil import sha256_file

pytestmark = pytest.mark.slow

# spikes skipped at every other update: every policy counter moves
SETTINGS = (
    "train.ema_decay=0.9", "train.skip_threshold=1e-3", "train.max_consecutive_skips=1",
    "train.checkpoint_every_steps=5", "train.keep_checkpoints=100",
)  # fmt: skip
ASYNC = "train.checkpoint_async=true"
# wall-clock fields of train_state.json legitimately differ between runs
CLOCK = re.compile(r'"(productive_s|started_at|seconds)": [0-9.e+-]+')


def rows(run, name):
    out = [json.loads(r) for r in (run / name).read_text().splitlines()]
    # wall-clock columns legitimately differ
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in out]


def to_older_layout(ckpt):
    """What vae_scale wrote before components saved their own files (commit 0efcf64): every
    counter in train_state.json, the EMA's weights alone in ema.safetensors."""
    record = checkpoint.read_train_state(ckpt)
    record.update(checkpoint.read_state(ckpt, "update_policy"))
    record["ema_updates"] = checkpoint.read_state(ckpt, "ema")["updates"]
    record["data_plan"] = checkpoint.read_state(ckpt, "train_data")["plan"]
    for name in ("update_policy.json", "train_data.json", "ema.json"):
        (ckpt / name).unlink()
    (ckpt / "train_state.json").write_text(json.dumps(record, indent=1))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(ckpt.iterdir())
        if p.name != "manifest.json"
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_components_save_their_own_state_and_older_checkpoints_resume_exactly(
    frey_shards, tmp_path
):
    full = train(tiny_frey_config(frey_shards, tmp_path / "a", *SETTINGS))
    saved = checkpoint.complete_checkpoints(full / "checkpoints")
    mid = [c for c in saved if checkpoint.read_train_state(c)["batch_in_epoch"] > 0]
    assert len(saved) == 8 and len(mid) == 6  # every 5 steps, and 2 epoch ends (17 steps each)

    ckpt = mid[-1]  # step 30: epoch 2, batch 13
    files = {p.name for p in ckpt.iterdir()}
    assert {"train_state.json", "update_policy.json", "train_data.json"} <= files
    assert {"ema.safetensors", "ema.json", "model.safetensors"} <= files
    state = checkpoint.read_train_state(ckpt)
    assert (state["opt_step"], state["epoch"], state["batch_in_epoch"]) == (30, 2, 13)
    counts = checkpoint.read_state(ckpt, "update_policy")
    assert set(counts) == set(UpdateCounts.__dataclass_fields__)
    assert counts["skipped_updates"] == 15 and counts["forced_updates"] == 15
    plan = checkpoint.read_state(ckpt, "train_data")["plan"]
    assert plan["epoch"] == 2 and plan["rank_batches"] == 13
    ema = checkpoint.read_state(ckpt, "ema")
    assert ema.pop("updates") == 30
    assert ema.keys() == load_file(ckpt / "model.safetensors").keys()  # a plain state dict
    # at an epoch's end nothing is mid-way: the next epoch starts from its own plan
    data_state = checkpoint.read_state(saved[-1], "train_data")
    assert data_state["plan"] is None
    # the shards the position counts into: name, count and hash of each (data/streaming/layout.py)
    assert [s[1] for s in data_state["layout"]] == [128] * 13 + [101]
    last = rows(full, "metrics.jsonl")[-1]
    assert last["train/skipped_updates"] == 17 and last["train/forced_updates"] == 17

    # train.checkpoint_async: the same checkpoints, file for file (the manifests hold every
    # file's sha256), only finished on a background thread
    later = train(tiny_frey_config(frey_shards, tmp_path / "async", *SETTINGS, ASYNC))
    finished = checkpoint.complete_checkpoints(later / "checkpoints")
    assert [c.name for c in finished] == [c.name for c in saved]
    assert all(checkpoint.is_complete(c, verify_hashes=True) for c in finished)
    for a, b in zip(finished, saved, strict=True):
        files = [json.loads((c / "manifest.json").read_text())["files"] for c in (a, b)]
        assert files[0].pop("train_state.json") != {}
        files[1].pop("train_state.json")
        assert files[0] == files[1], a.name
        states = [json.dumps(checkpoint.read_train_state(c), sort_keys=True) for c in (a, b)]
        assert [CLOCK.sub("", s) for s in states[:1]] == [CLOCK.sub("", states[1])], a.name
    assert not list((later / "checkpoints").glob(".tmp-*"))

    for layout in ("current", "older"):
        run = tmp_path / layout / full.name
        shutil.copytree(full, run)
        for later in checkpoint.complete_checkpoints(run / "checkpoints")[saved.index(ckpt) + 1 :]:
            shutil.rmtree(later)  # the run "died" after step 30
        if layout == "older":
            to_older_layout(checkpoint.latest_checkpoint(run / "checkpoints"))
        resumed = train(tiny_frey_config(frey_shards, tmp_path / layout, *SETTINGS))
        for name in ("metrics.jsonl", "steps.jsonl"):
            assert rows(resumed, name) == rows(full, name), (layout, name)
        a, b = checkpoint.latest_checkpoint(resumed / "checkpoints"), saved[-1]
        for name in ("model.safetensors", "ema.safetensors"):
            x, y = load_file(a / name), load_file(b / name)
            assert all(torch.equal(x[k], y[k]) for k in y), (layout, name)
        assert checkpoint.read_state(a, "update_policy") == checkpoint.read_state(
            b, "update_policy"
        )
