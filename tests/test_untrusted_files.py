"""Never lose a run, part 4 (item 1): nothing in a run folder runs code when it is read. A
checkpoint file planted to run code on unpickling is refused through the real CLI, naming it,
and the code does not run; the same holds for every pickle-based file Accelerate restores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_FREY, tiny_overrides
from vae_scale.run_files.checkpoints import MANIFEST, latest_checkpoint
from vae_scale.utils.fsutil import sha256_file

pytestmark = pytest.mark.slow  # real runs


class Planted:
    """Pickles as `os.system(command)`: what a crafted checkpoint file would run."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def vae_scale(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "vae_scale", *args], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def train(shards: Path, runs: Path, epochs: int) -> subprocess.CompletedProcess:
    return vae_scale(
        "train", str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(shards, runs, *TINY_FREY), f"train.epochs={epochs}",
        "eval.picture_epochs=[]", "data.batch_size=50",
    )  # fmt: skip


def plant(checkpoint: Path, name: str, payload: object) -> None:
    """Replace `name` with a torch.save of `payload` and update the manifest to match, as
    someone able to write into the run folder could."""
    torch.save(payload, checkpoint / name)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    file = checkpoint / name
    manifest["files"][name] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_a_checkpoint_file_that_would_run_code_is_refused_and_runs_nothing(
    frey_shards, tmp_path, name
):
    done = train(frey_shards, tmp_path, epochs=1)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "tiny"
    checkpoint = latest_checkpoint(run / "checkpoints")
    marker = tmp_path / "code-ran"
    if name == "random_states_0.pkl":  # the RNG states, with one object that runs a command
        payload = {**torch.load(checkpoint / name, weights_only=False)}
        payload["random_state"] = Planted(f"touch {marker}")
    else:
        payload = {"state": {}, "param_groups": [], "x": Planted(f"touch {marker}")}
    plant(checkpoint, name, payload)
    before = sorted(p.name for p in run.rglob("*"))

    resumed = train(frey_shards, tmp_path, epochs=2)

    assert not marker.exists()  # the planted code never ran
    assert resumed.returncode == 2, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert f"{name} is not plain saved data" in resumed.stderr and str(checkpoint) in resumed.stderr
    assert "refusing to unpickle it" in resumed.stderr
    # nothing trained, nothing of the run lost or added
    assert sorted(p.name for p in run.rglob("*")) == before
    epochs = [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").open()]
    assert epochs == [1]
    # the same planted file is refused when named explicitly too
    explicit = vae_scale(
        "train", str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(frey_shards, tmp_path, *TINY_FREY), "train.epochs=2",
        "data.batch_size=50", "--resume", str(checkpoint),
    )  # fmt: skip
    assert explicit.returncode == 2 and "is not plain saved data" in explicit.stderr
    assert not marker.exists()


def test_every_file_accelerate_restores_loads_as_plain_data(frey_shards, tmp_path):
    """A real checkpoint passes the check; its only pickle-based files are Accelerate's
    optimizer and RNG states, and they read back with weights_only=True."""
    from vae_scale.run_files.checkpoints import check_plain_data, load_plain

    done = train(frey_shards, tmp_path, epochs=1)
    assert done.returncode == 0, done.stderr
    checkpoint = latest_checkpoint(tmp_path / "tiny" / "checkpoints")
    check_plain_data(checkpoint)  # raises on anything but plain data
    pickled = sorted(
        p.name for p in checkpoint.iterdir() if p.suffix not in (".safetensors", ".json")
    )
    assert pickled == ["optimizer.bin", "random_states_0.pkl"]
    states = load_plain(checkpoint / "random_states_0.pkl")
    assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states)
    assert load_plain(checkpoint / "optimizer.bin")["state"]  # Adam's moments, as tensors
