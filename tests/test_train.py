import json

import pytest
import torch

from conftest import tiny_frey_config
from vae_scale.errors import ConfigError
from vae_scale.training import checkpoint
from vae_scale.training.loop import TrainingDiverged, train


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_run_learns_and_writes_everything(frey_shards, tmp_path):
    cfg = tiny_frey_config(frey_shards, tmp_path, "train.epochs=3", "train.lr=3e-3")
    run = train(cfg)
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["test/neg_elbo"] < rows[0]["test/neg_elbo"] - 1.0
    assert rows[-1]["train/neg_elbo"] < rows[0]["train/neg_elbo"]
    for r in rows:
        assert r["test/neg_elbo"] == pytest.approx(r["test/recon"] + r["test/kl"])
        assert r["test/num_samples"] == 100 and r["val/num_samples"] == 100
        assert r["train/num_samples"] == 17 * 100  # 1765 samples -> 17 full batches
        assert 0 < r["test/recon_mse"] and 0 <= r["test/active_units"] <= 8
    # the ratio's denominator is the fixed test split's mean-image error: the same every epoch
    baselines = [r["test/recon_mse"] / r["test/recon_mse_ratio"] for r in rows]
    assert baselines == pytest.approx([baselines[0]] * 3, rel=1e-9) and 0 < baselines[0] < 0.25
    for name in ("recon_epoch001.png", "recon_epoch003.png", "samples_epoch003.png", "config.json"):
        assert (run / name).is_file(), name
    from PIL import Image

    width, height = Image.open(run / "recon_epoch001.png").size
    assert width < height  # two columns (original | recon), eight rows
    ckpts = checkpoint.complete_checkpoints(run / "checkpoints")
    assert len(ckpts) == 2  # keep_checkpoints
    assert checkpoint.read_train_state(ckpts[-1])["epoch"] == 4  # finished: next would be 4


@pytest.mark.slow
def test_bf16_on_cpu_trains(frey_shards, tmp_path):
    cfg = tiny_frey_config(
        frey_shards,
        tmp_path,
        "train.mixed_precision=bf16",
        "train.epochs=2",
        "train.lr=3e-3",
        "eval.picture_epochs=[]",
    )
    rows = metrics(train(cfg))
    assert all(torch.isfinite(torch.tensor(r["test/neg_elbo"])) for r in rows)
    assert rows[-1]["test/neg_elbo"] < rows[0]["test/neg_elbo"]


@pytest.mark.slow
def test_gradient_accumulation_counts_optimizer_steps(frey_shards, tmp_path):
    cfg = tiny_frey_config(
        frey_shards, tmp_path, "train.grad_accum_batches=4", "train.epochs=1", "data.batch_size=50"
    )
    rows = metrics(train(cfg))
    # 1765 // 50 = 35 batches -> 32 (whole cycles of 4) -> 8 optimizer steps
    assert rows[0]["global_step"] == 8 and rows[0]["train/num_samples"] == 32 * 50


@pytest.mark.slow
def test_several_posterior_draws_per_image_train_on_the_same_scale(frey_shards, tmp_path):
    rows = metrics(
        train(tiny_frey_config(frey_shards, tmp_path, "loss.z_samples=3", "train.lr=3e-3"))
    )
    assert rows[-1]["test/neg_elbo"] < rows[0]["test/neg_elbo"]
    for r in rows:
        # per image, averaged over the draws: images counted once, loss not 3x the test loss
        assert r["train/num_samples"] == 17 * 100
        assert 0.8 < r["train/neg_elbo"] / r["test/neg_elbo"] < 1.25
        assert r["train/neg_elbo"] == pytest.approx(r["train/recon"] + r["train/kl"])
    with pytest.raises(ConfigError, match=r"loss\.z_samples"):
        tiny_frey_config(frey_shards, tmp_path, "loss.z_samples=0")


@pytest.mark.slow
@pytest.mark.parametrize("fused", ["false", "true"])  # true: the GPU's device-side policy
def test_nan_loss_stops_and_keeps_last_good_checkpoint(frey_shards, tmp_path, monkeypatch, fused):
    fused_adamw = f"train.fused_adamw={fused}"
    cfg = tiny_frey_config(
        frey_shards, tmp_path, "train.epochs=2", "train.max_bad_steps=3", fused_adamw
    )
    run = train(cfg)  # a good run: checkpoint at the end of epoch 2
    good = checkpoint.latest_checkpoint(run / "checkpoints")
    from vae_scale.models.conv import ConvVAE

    original = ConvVAE.decode
    monkeypatch.setattr(ConvVAE, "decode", lambda self, z: original(self, z) * float("nan"))
    cfg = tiny_frey_config(
        frey_shards, tmp_path, "train.epochs=3", "train.max_bad_steps=3", fused_adamw
    )
    with pytest.raises(TrainingDiverged, match=r"\d+ optimizer steps in a row"):
        train(cfg)
    assert checkpoint.latest_checkpoint(run / "checkpoints") == good
    assert checkpoint.is_complete(good)


@pytest.mark.slow
def test_resume_none_refuses_to_overwrite(frey_shards, tmp_path):
    cfg = tiny_frey_config(frey_shards, tmp_path, "train.epochs=1")
    train(cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg, resume="none")


@pytest.mark.slow
@pytest.mark.parametrize("fused", ["false", "true"])  # true: the GPU's device-side policy
def test_resume_continues_where_it_stopped(frey_shards, tmp_path, fused):
    def config(*overrides):
        return tiny_frey_config(frey_shards, tmp_path, f"train.fused_adamw={fused}", *overrides)

    full = train(config("run.name=full", "train.epochs=3", "train.ema_decay=0.9"))
    train(config("run.name=split", "train.epochs=1", "train.ema_decay=0.9"))
    part = train(config("run.name=split", "train.epochs=3", "train.ema_decay=0.9"))
    a, b = metrics(full), metrics(part)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("train/neg_elbo", "val/neg_elbo", "test/neg_elbo"):
            assert ra[key] == rb[key], (ra["epoch"], key)  # bitwise on CPU fp32


@pytest.mark.slow
def test_fp16_on_cpu_is_a_clear_error(frey_shards, tmp_path):
    cfg = tiny_frey_config(frey_shards, tmp_path, "train.mixed_precision=fp16")
    with pytest.raises(ConfigError, match="fp16.*needs a GPU"):
        train(cfg)


@pytest.mark.slow
def test_wandb_offline_run_in_run_folder(frey_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc key
    cfg = tiny_frey_config(frey_shards, tmp_path, "train.epochs=1", "wandb.mode=auto")
    run = train(cfg)
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_training_on_train_and_val_reads_both_and_evaluates_test_only(frey_shards, tmp_path):
    from vae_scale.config import DataConfig
    from vae_scale.data.streaming.loader import ShardSplit

    both = ShardSplit(frey_shards / "frey", "train+val", DataConfig(batch_size=100))
    keys = [k for batch in both.eval_batches() for k in batch["key"]]
    parts = [
        ShardSplit(frey_shards / "frey", s, DataConfig(batch_size=100)) for s in ("train", "val")
    ]
    part_keys = [k for split in parts for batch in split.eval_batches() for k in batch["key"]]
    assert len(keys) == len(set(keys)) == 1765 + 100 and set(keys) == set(part_keys)

    run = train(tiny_frey_config(frey_shards, tmp_path, "data.train_splits=[train,val]"))
    for r in metrics(run):
        assert r["train/num_samples"] == 18 * 100  # 1865 samples -> 18 full batches (not 17)
        assert r["test/num_samples"] == 100
        assert not any(k.startswith("val/") for k in r)  # val is training data now
    from vae_scale.cli import main

    for split, trained_on in (("val", True), ("test", False)):
        assert main(["eval", str(run), "--split", split, "--iw-samples", "0"]) == 0
        result = json.loads((run / f"eval_{split}.json").read_text())
        assert result[f"eval/{split}/trained_on_split"] is trained_on


@pytest.mark.parametrize("splits", ["[train,test]", "[]", "[train,train]"])
def test_test_split_is_never_trained_on(splits, frey_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train_splits"):
        tiny_frey_config(frey_shards, tmp_path, f"data.train_splits={splits}")


@pytest.mark.slow
def test_pictures_at_every_picture_epoch_collapse_warning_only_after_warmup(
    frey_shards, tmp_path, capsys
):
    """Epoch 1 falls inside the KL warm-up (17 of 25 steps): its pictures are drawn (the
    newcomer's first picture) but not judged; epoch 2 is past it and this 2-epoch model has
    no active unit, so the warning comes then, once."""
    cfg = tiny_frey_config(frey_shards, tmp_path, "loss.kl_warmup_steps=25")
    run = train(cfg)
    assert (run / "recon_epoch001.png").is_file() and (run / "samples_epoch001.png").is_file()
    assert (run / "recon_epoch002.png").is_file()
    rows = metrics(run)
    assert rows[0]["global_step"] < 25 <= rows[1]["global_step"]
    assert rows[1]["test/active_units"] < 0.1 * 8
    out = capsys.readouterr().out
    assert out.count("the posterior is collapsing") == 1
    assert out.index("the posterior is collapsing") > out.index("epoch 2:")


@pytest.mark.slow
def test_a_bf16_runs_epoch_metrics_are_float32_like_vae_scale_eval(frey_shards, tmp_path):
    """Training in bf16, its per-epoch val/test numbers are computed in float32: they equal
    what `vae-scale eval` (float32) reports for the same checkpoint."""
    from vae_scale.cli import main

    cfg = tiny_frey_config(
        frey_shards, tmp_path, "train.mixed_precision=bf16", "train.epochs=1",
        "eval.picture_epochs=[]", "model.base_channels=4",
    )  # fmt: skip
    run = train(cfg)
    epoch = metrics(run)[-1]
    assert main(["eval", str(run), "--iw-samples", "0", "--batch-size", "100"]) == 0
    evaluated = json.loads((run / "eval_test.json").read_text())
    for key in ("test/neg_elbo", "test/recon", "test/kl", "test/psnr"):
        assert epoch[key] == pytest.approx(evaluated[key], rel=1e-6), key
