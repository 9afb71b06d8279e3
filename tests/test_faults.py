"""Never lose a run, part 2: each fault a user can cause, reproduced through the real CLI
(real signals, a real second process, a real full tmpfs), and what must happen instead."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_FREY, tiny_overrides
from vae_scale.cli import main
from vae_scale.training import checkpoint
from vae_scale.training.signals import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow  # real runs


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(shards, run_dir, *TINY_FREY),
        "data.batch_size=25",
        "train.epochs=2",
        "train.log_every_steps=1",
        "eval.picture_epochs=[]",
        *extra,
    ]


def popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "vae_scale", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal or a scheduler has
    )


def wait_for_rows(proc: subprocess.Popen, path: Path, rows: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {rows} rows (exit {proc.poll()})")


def cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    return code, capsys.readouterr().err


def steps_of(run: Path) -> list[int]:
    return [json.loads(r)["global_step"] for r in (run / "steps.jsonl").read_text().splitlines()]


def test_1_kill_before_the_first_checkpoint_leaves_no_rows_behind(frey_shards, tmp_path):
    run = tmp_path / "tiny"
    proc = popen(train_args(frey_shards, tmp_path))
    wait_for_rows(proc, run / "steps.jsonl", 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not checkpoint.complete_checkpoints(run / "checkpoints")
    proc = popen(train_args(frey_shards, tmp_path, "train.epochs=1"))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    steps = steps_of(run)
    assert steps == sorted(set(steps)) and steps[0] == 1  # one run's rows, once each


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_2_3_signal_to_the_whole_group_with_workers_checkpoints_and_exits_3(
    frey_shards, tmp_path, sig
):
    run = tmp_path / "tiny"
    proc = popen(train_args(frey_shards, tmp_path, "data.num_workers=2"))
    wait_for_rows(proc, run / "steps.jsonl", 5)
    os.killpg(proc.pid, sig)  # what a scheduler's time limit, or a terminal's Ctrl-C, does
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert code == REQUEUE_EXIT_CODE, err
    assert "Traceback" not in err and "killed by signal" not in err
    state = checkpoint.read_train_state(checkpoint.latest_checkpoint(run / "checkpoints"))
    assert state["batch_in_epoch"] > 0 or state["epoch"] > 1  # the steps since were kept


def test_4_a_second_trainer_on_the_same_run_folder_is_refused(frey_shards, tmp_path, capsys):
    run = tmp_path / "tiny"
    first = popen(train_args(frey_shards, tmp_path, "train.epochs=3"))
    wait_for_rows(first, run / "steps.jsonl", 2)
    code, err = cli(train_args(frey_shards, tmp_path, "train.epochs=3"), capsys)
    assert code == 2 and f"in use by process {first.pid}" in err
    assert first.wait(timeout=300) == 0
    rows = [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]  # the first run's log, not doubled
    assert len(list(run.glob("wandb*"))) <= 1


def test_5_when_no_checkpoint_verifies_auto_resume_refuses(frey_shards, tmp_path, capsys):
    assert cli(train_args(frey_shards, tmp_path), capsys)[0] == 0
    run = tmp_path / "tiny"
    for ckpt in checkpoint.complete_checkpoints(run / "checkpoints"):
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (ckpt / "model.safetensors").write_bytes(bytes(data))
    code, err = cli(train_args(frey_shards, tmp_path, "train.epochs=3"), capsys)
    assert code == 2 and "none verifies" in err and "--resume none" in err
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").open()] == [1, 2]


def test_6_7_resuming_with_other_settings_is_refused_naming_them(frey_shards, tmp_path, capsys):
    assert cli(train_args(frey_shards, tmp_path), capsys)[0] == 0
    config = (tmp_path / "tiny" / "config.json").read_text()
    code, err = cli(train_args(frey_shards, tmp_path, "train.lr=3e-4"), capsys)
    assert code == 2 and "train.lr: 0.001 -> 0.0003" in err
    code, err = cli(train_args(frey_shards, tmp_path, "model.latent_dim=4"), capsys)
    assert code == 2 and "model.latent_dim: 8 -> 4" in err and "Traceback" not in err
    assert (tmp_path / "tiny" / "config.json").read_text() == config
    # what may change: the length of the run (a finished run asked for fewer epochs says so)
    assert cli(train_args(frey_shards, tmp_path, "train.epochs=3"), capsys)[0] == 0
    code = main(train_args(frey_shards, tmp_path, "train.epochs=1"))
    assert code == 0 and "already trained 3 epochs" in capsys.readouterr().out
    # a failed start of a new run leaves no empty run folder
    code, err = cli(train_args(tmp_path / "nowhere", tmp_path, "run.name=new"), capsys)
    assert code == 2 and not (tmp_path / "new").exists()


def test_8_full_disk_during_a_checkpoint_is_a_clear_error_and_resumable(frey_shards, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        args = train_args(frey_shards, disk, "train.keep_checkpoints=3", "train.epochs=3")
        proc = popen(args)
        code, err = proc.wait(timeout=300), proc.stderr.read()
        assert code == 2 and "error: disk full" in err and "Traceback" not in err, err
        run = disk / "tiny"
        assert not list((run / "checkpoints").glob(".tmp-*"))
        latest = checkpoint.latest_checkpoint(run / "checkpoints", verify_hashes=True)
        assert latest is not None and f"{latest} is intact" in err
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = popen(args)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        epochs = [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").open()]
        assert epochs == [1, 2, 3]
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def copy_shards(frey_shards: Path, tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    shutil.copytree(frey_shards / "frey", shards / "frey")
    return shards


def test_9_changed_pixels_in_a_test_shard_are_caught(frey_shards, tmp_path, capsys):
    shards = copy_shards(frey_shards, tmp_path)
    (test_shard,) = sorted((shards / "frey").glob("test-*.tar"))
    data = bytearray(test_shard.read_bytes())
    data[1500] ^= 0x01  # one pixel value inside a sample
    test_shard.write_bytes(bytes(data))
    code, err = cli(train_args(shards, tmp_path, "train.epochs=1"), capsys)
    assert code == 2 and f"{test_shard.name} has sha256" in err


def test_10_11_bad_index_files_are_clear_errors(frey_shards, tmp_path, capsys):
    shards = copy_shards(frey_shards, tmp_path)
    index_path = shards / "frey" / "index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text("[]")
    code, err = cli(train_args(shards, tmp_path, "run.name=a"), capsys)
    assert code == 2 and "index.json: expected a JSON object" in err
    index["splits"]["train"]["shards"][2]["num_samples"] += 59  # overstated
    index_path.write_text(json.dumps(index))
    code, err = cli(train_args(shards, tmp_path, "run.name=b", "train.epochs=1"), capsys)
    name = index["splits"]["train"]["shards"][2]["name"]
    assert code == 2 and name in err and "index.json says 187" in err, err


def test_12_non_finite_settings_are_refused_and_divergence_names_no_ghost(
    frey_shards, tmp_path, capsys, monkeypatch
):
    for override in ("train.lr=.inf", "loss.beta=.inf", "train.lr=.nan"):
        code, err = cli(train_args(frey_shards, tmp_path, override), capsys)
        assert code == 2 and override.split("=")[0] in err, override
    from vae_scale.models.conv import ConvVAE

    original = ConvVAE.decode
    monkeypatch.setattr(ConvVAE, "decode", lambda self, z: original(self, z) * float("nan"))
    code, err = cli(train_args(frey_shards, tmp_path, "train.max_bad_steps=3"), capsys)
    assert code == 2 and "no checkpoint was written yet" in err


def test_13_14_bad_command_line_values_name_the_flag(frey_shards, tmp_path, capsys):
    assert cli(train_args(frey_shards, tmp_path, "train.epochs=1"), capsys)[0] == 0
    run = str(tmp_path / "tiny")
    for args, flag in [
        (["eval", run, "--iw-samples", "-5"], "--iw-samples"),
        (["eval", run, "--batch-size", "0"], "--batch-size"),
        (["sample", run, "--n", "0"], "--n"),
    ]:
        code, err = cli(args, capsys)
        assert code == 2 and f"argument {flag}: expected an integer" in err, err
    code, err = cli(["compare", str(tmp_path / "nonexistent"), run], capsys)
    assert code == 2 and "nonexistent does not exist" in err and "Traceback" not in err


def test_a_run_written_before_a_config_key_existed_resumes(frey_shards, tmp_path, capsys):
    """Upgrading vae_scale adds config keys: a run whose config.json predates a key resumes
    (the key's default stands for what the run did), unless it is set to another value."""
    assert cli(train_args(frey_shards, tmp_path), capsys)[0] == 0
    path = tmp_path / "tiny" / "config.json"
    recorded = json.loads(path.read_text())
    del recorded["eval"]["refine_steps"], recorded["loss"]["free_bits"]  # not yet invented
    path.write_text(json.dumps(recorded))
    code, err = cli(train_args(frey_shards, tmp_path, "eval.refine_steps=5"), capsys)
    assert code == 2 and "eval.refine_steps: 0 -> 5" in err  # the default it ran with
    assert cli(train_args(frey_shards, tmp_path, "train.epochs=3"), capsys)[0] == 0
    assert len((tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()) == 3
