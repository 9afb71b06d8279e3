"""W&B dashboards, checked in wandb's own offline records (tests/helpers/wandb_records.py):
the axes (define_metric), group / job_type / notes, the run facts in the config, the
best-so-far summary, and `vae-scale eval` adding to the run under the training's names."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, tiny_frey_config
from vae_scale.config import load_config
from vae_scale.run_files.logs import read_rows
from vae_scale.run_files.wandb_records import read_run, read_runs, run_files
from vae_scale.training import tracking
from vae_scale.training.state import TrainState


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.mark.slow
def test_offline_records_axes_group_facts_best_and_eval(frey_shards, tmp_path, offline_wandb):
    from vae_scale.cli import main
    from vae_scale.training.loop import train

    overrides = ("wandb.mode=offline", "wandb.notes=lr ablation", "train.log_every_steps=5")
    run_dir = train(tiny_frey_config(frey_shards, tmp_path, *overrides), command="vae-scale x")
    (first,) = read_runs(run_dir)

    assert first.run.run_group == "frey_conv"  # the config file's stem
    assert (first.run.job_type, first.run.notes) == ("train", "lr ablation")
    facts = first.config
    assert facts["num_processes"] == facts["num_machines"] == 1
    assert facts["global_batch_size"] == 100 and facts["slurm_job_id"] is None
    assert isinstance(facts["git_dirty"], bool) and len(facts["git_commit"]) == 40
    assert facts["likelihood_convention"] == "bce_grey" and facts["command"] == "vae-scale x"
    assert facts["model"]["latent_dim"] == 8  # nested sections stay dashboard columns

    assert first.metrics["*"]["step_metric"] == "global_step"
    assert first.metrics["train/samples_seen"]["step_metric"] == "global_step"
    rows = [h for h in first.history if "global_step" in h]
    assert len(rows) == len(first.history) >= 2 + 34 // 5  # step rows and epoch rows
    for row in rows:  # 1 process, batch 100, no accumulation: 100 samples a step
        assert row["train/samples_seen"] == 100 * row["global_step"]

    epochs = read_rows(run_dir)
    best = min(epochs, key=lambda r: r["val/neg_elbo"])
    assert first.summary["best/val_neg_elbo"] == pytest.approx(best["val/neg_elbo"])
    assert first.summary["best/val_neg_elbo_step"] == best["global_step"]
    assert first.summary["best/val_neg_elbo_samples_seen"] == best["train/samples_seen"]

    # Resumed for one more epoch: the same W&B run, the best so far carried by the checkpoint.
    train(tiny_frey_config(frey_shards, tmp_path, *overrides, "train.epochs=3"))
    runs = read_runs(run_dir)
    assert len(runs) == 2 and runs[1].run.run_id == first.run.run_id
    epochs = read_rows(run_dir)
    best = min(epochs, key=lambda r: r["val/neg_elbo"])
    assert len(epochs) == 3
    assert runs[1].summary["best/val_neg_elbo"] == pytest.approx(best["val/neg_elbo"])
    assert runs[1].summary["best/val_neg_elbo_epoch"] == best["epoch"]

    assert main(["eval", str(run_dir), "--iw-samples", "0"]) == 0
    evaluation = read_runs(run_dir)[-1]
    assert evaluation.run.run_id == first.run.run_id
    summary = evaluation.summary
    # one name per quantity: eval's number lands on the training's column, same checkpoint
    assert summary["test/neg_elbo"] == pytest.approx(epochs[-1]["test/neg_elbo"], rel=1e-5)
    assert not [k for k in summary if "bce" in k]
    assert "num_processes" not in summary and summary["eval/test/num_processes"] == 1
    result = json.loads((run_dir / "eval_test.json").read_text())
    assert result["likelihood_convention"] == "bce_grey"

    # offline, a command's record is one folder per kind of output, the latest of that kind
    # (a repeated command supersedes its numbers or picture): not one folder per command
    assert main(["eval", str(run_dir), "--iw-samples", "0"]) == 0
    for _ in range(2):
        assert main(["sample", str(run_dir), "--n", "4"]) == 0
    assert main(["reconstruct", str(run_dir), "--n", "2"]) == 0
    run_id = first.run.run_id
    wandb_dir = run_dir / "wandb"
    folders = sorted(p.name for p in wandb_dir.iterdir() if p.is_dir() and not p.is_symlink())
    kinds = ("eval_test", "reconstruct_test_n2", "sample_t1_n4")
    commands = [f"offline-{kind}-{run_id}" for kind in kinds]
    assert [f for f in folders if not f.startswith("offline-run-")] == commands
    assert len(folders) == 2 + 3  # the training's two starts, and one per kind
    assert (wandb_dir / "latest-run").resolve().name == commands[1]  # the last command's
    runs = {p.parent.name: read_run(p) for p in run_files(run_dir)}
    assert {r.run.run_id for r in runs.values()} == {run_id}
    assert runs[commands[0]].summary["test/neg_elbo"] == summary["test/neg_elbo"]
    (picture,) = runs[commands[2]].history
    assert picture["pictures/sample/_type"] == "image-file"
    image = wandb_dir / commands[2] / "files" / picture["pictures/sample/path"]
    assert image.stat().st_size == picture["pictures/sample/size"]


def test_best_so_far_keeps_the_lowest_and_where_it_came():
    state = TrainState()
    seen = []
    for epoch, value in enumerate([50.0, 40.0, 45.0, 39.0, 60.0], start=1):
        state.samples_seen = 1000 * epoch
        row = {"epoch": epoch, "global_step": 10 * epoch, "val/neg_elbo": value}
        row["test/neg_elbo"] = 1.0  # val wins when there is one
        seen.append(tracking.best_so_far(state, row))
    assert [s["best/val_neg_elbo"] for s in seen] == [50.0, 40.0, 40.0, 39.0, 39.0]
    assert seen[-1]["best/val_neg_elbo_step"] == 40
    assert seen[-1]["best/val_neg_elbo_samples_seen"] == 4000
    assert tracking.best_so_far(TrainState(), {"epoch": 1, "global_step": 1}) == {}
    only_test = tracking.best_so_far(
        TrainState(), {"epoch": 1, "global_step": 3, "test/neg_elbo": 7}
    )
    assert only_test == {
        "best/test_neg_elbo": 7,
        "best/test_neg_elbo_step": 3,
        "best/test_neg_elbo_epoch": 1,
        "best/test_neg_elbo_samples_seen": 0,
    }


def test_cluster_facts_count_machines_and_name_the_slurm_job(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert tracking.cluster_facts(1) == {"num_machines": 1, "slurm_job_id": None}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 processes on each machine
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert tracking.cluster_facts(32) == {"num_machines": 4, "slurm_job_id": "4242"}
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert tracking.cluster_facts(8)["slurm_job_id"] == "4200_3"


def test_group_defaults_to_the_config_file_and_can_be_overridden():
    path = REPO / "configs" / "mnist_mlp_z2.yaml"
    assert load_config(path).wandb.group == "mnist_mlp_z2"
    assert load_config(path, ["wandb.group=ablation-7"]).wandb.group == "ablation-7"
    cfg = load_config(path, ["wandb.job_type=eval", "wandb.notes=n"])
    assert (cfg.wandb.job_type, cfg.wandb.notes) == ("eval", "n")
