"""W&B sweep recipes (configs/sweeps/*.yaml): every parameter is a real config key with
values it accepts, and one trial runs through wandb's own agent code and command template."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_FREY
from vae_scale.config import load_config
from vae_scale.run_files.wandb_records import read_runs

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def candidate_values(spec: dict) -> list:
    """Every value a parameter spec can produce at its edges: values, value, min and max."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def trained_config(sweep: dict) -> Path:
    command = sweep["command"]
    assert command[-1] == "${args_no_hyphens}"  # trial values arrive as KEY=VALUE overrides
    train_at = command.index("train")
    assert command[train_at - 1] == "vae-scale"
    return REPO / command[train_at + 1]


def test_sweeps_exist():
    assert {p.stem for p in SWEEPS} >= {"frey_conv", "cifar10_resnet"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_parameter_is_a_config_key_with_accepted_values(path):
    sweep = yaml.safe_load(path.read_text())
    config = trained_config(sweep)
    assert config.is_file(), config
    load_config(config)
    assert sweep["metric"]["name"] in ("best/val_neg_elbo", "best/test_neg_elbo")
    for key, spec in sweep["parameters"].items():
        section, _, field = key.partition(".")
        assert field, f"{path.name}: {key} is not SECTION.KEY"
        for value in candidate_values(spec):
            cfg = load_config(config, [f"{key}={value}"])  # unknown keys and bad values raise
            got = getattr(getattr(cfg, section), field.split(".")[0])
            assert got == value or pytest.approx(got) == value, (key, value, got)


@pytest.mark.slow
def test_one_trial_through_the_agent_command_template(frey_shards, tmp_path, monkeypatch):
    """wandb's Agent builds the command from the sweep file and a trial's values and starts it
    as the agent would (environment, sweep parameter file, run id); the trial trains into its
    own run folder and logs to the run the sweep knows."""
    from wandb.wandb_agent import Agent

    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / "frey_conv.yaml").read_text())
    trial = {key: {"value": candidate_values(spec)[0]} for key, spec in sweep["parameters"].items()}
    tiny = [o.split("=", 1) for o in TINY_FREY if not o.startswith("model.latent_dim")]
    trial.update({k: {"value": v} for k, v in tiny})
    trial.update(
        {
            "data.shards_dir": {"value": str(frey_shards)},
            "run.dir": {"value": str(tmp_path / "runs")},
            "train.epochs": {"value": 1},
            "wandb.mode": {"value": "offline"},
        }
    )
    monkeypatch.chdir(REPO)  # the sweep's command names configs/frey_conv.yaml
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep0001")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "agent"))
    monkeypatch.setenv("WANDB_RUN_ID", "")  # the agent sets it per trial
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "agent").mkdir()
    agent = Agent(api=None, queue=None, sweep_id="sweep0001")
    agent._sweep_command = sweep["command"]
    agent._command_run({"run_id": "trial0001", "program": sweep["program"], "args": trial})
    assert agent._run_processes["trial0001"].wait(timeout=300) == 0

    run_dir = tmp_path / "runs" / "frey_conv-trial0001"  # <run.name>-<trial id>
    (record,) = read_runs(run_dir)
    assert record.run.run_id == "trial0001" and record.run.run_group == "sweep-frey_conv"
    lr = trial["train.lr"]["value"]
    assert record.config["train"]["lr"] == pytest.approx(lr)
    assert record.summary["best/val_neg_elbo"] > 0  # the sweep's metric is there
