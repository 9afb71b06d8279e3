"""Never lose a run, part 4: what a kill, a damaged record or a trainer pruning under a reader
does to a run folder, through the real CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, TINY_FREY, tiny_overrides
from vae_scale.cli import main
from vae_scale.run_files.checkpoints import PREFIX, complete_checkpoints
from vae_scale.training import checkpoint
from vae_scale.training.signals import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow  # real runs


def train_args(shards: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "train", str(REPO / "configs" / "frey_conv.yaml"),
        *tiny_overrides(shards, runs, *TINY_FREY), "data.batch_size=50",
        "eval.picture_epochs=[]", "train.epochs=1", *extra,
    ]  # fmt: skip


def cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(
    frey_shards, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "tiny"
    assert cli(train_args(frey_shards, tmp_path, "train.keep_checkpoints=1"), capsys)[0] == 0
    (first,) = complete_checkpoints(run / "checkpoints")
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):  # pruning removes one file, then the process dies
        if not Path(path).name.startswith(".tmp-del-"):
            return real_rmtree(path, *a, **k)
        files = sorted(p for p in Path(path).iterdir() if p.is_file())
        files[0].unlink()
        raise KeyboardInterrupt("SIGKILL while deleting")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        main(train_args(frey_shards, tmp_path, "train.keep_checkpoints=1", "train.epochs=2"))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    # the old checkpoint was renamed before its files went: no step_* folder is half deleted
    assert not (run / "checkpoints" / first.name).exists()
    assert list((run / "checkpoints").glob(f".tmp-del-{first.name}"))
    for folder in (run / "checkpoints").glob(f"{PREFIX}*"):
        assert checkpoint.is_complete(folder, verify_hashes=True), folder
    # a half-deleted step folder older than the newest complete one (what earlier versions
    # left) is swept at the next start, silently, with the temporary one
    stale = run / "checkpoints" / f"{PREFIX}00000001"
    stale.mkdir()
    (stale / "manifest.json").write_text(
        json.dumps({"step": 1, "files": {"model.safetensors": {"size": 1, "sha256": "x"}}})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "ignoring incomplete checkpoint" would fail here
        code, err = cli(
            train_args(frey_shards, tmp_path, "train.keep_checkpoints=1", "train.epochs=3"), capsys
        )
    assert code == 0, err
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == [complete_checkpoints(run / "checkpoints")[-1].name]
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").open()] == [1, 2, 3]


@pytest.mark.parametrize("command", ["eval", "sample", "export", "compare"])
def test_a_damaged_config_json_is_one_line_for_every_reader(frey_shards, tmp_path, capsys, command):
    run = tmp_path / "tiny"
    assert cli(train_args(frey_shards, tmp_path), capsys)[0] == 0
    (run / "config.json").write_text('{"run": {"name": "tin')  # cut off mid-write
    args = {
        "eval": ["eval", str(run)],
        "sample": ["sample", str(run)],
        "export": ["export", str(run), str(tmp_path / "out")],
        "compare": ["compare", str(run), "--out", str(tmp_path / "r.md")],
    }[command]
    code, err = cli(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert "config.json is damaged" in err and str(run) in err


def test_a_reader_retries_when_the_trainer_prunes_its_checkpoint(
    frey_shards, tmp_path, capsys, monkeypatch
):
    """`vae-scale sample` picks the newest checkpoint; the trainer prunes it before its weights
    are read: the reader chooses again and succeeds."""
    from vae_scale.analysis import runs

    run = tmp_path / "tiny"
    assert (
        cli(
            train_args(frey_shards, tmp_path, "train.keep_checkpoints=3", "train.epochs=2"), capsys
        )[0]
        == 0
    )
    newest = complete_checkpoints(run / "checkpoints")[-1]
    real_load = runs.load_file
    pruned = []

    def pruned_first(path, *a, **k):
        if not pruned:  # the trainer renames it away between the choice and the read
            pruned.append(newest)
            newest.rename(newest.with_name(".tmp-del-x"))
        return real_load(path, *a, **k)

    monkeypatch.setattr(runs, "load_file", pruned_first)
    code, err = cli(["sample", str(run)], capsys)
    assert code == 0, err
    assert pruned and list(run.glob("sample_*.png"))


@pytest.fixture(scope="module")
def one_shard_frey(frey_source, tmp_path_factory) -> Path:
    """Frey with the whole training split in one shard: one visit spans the epoch."""
    from vae_scale.data.sourcing import frey
    from vae_scale.data.sourcing.shards import write_dataset

    out = tmp_path_factory.mktemp("one_shard")
    write_dataset(frey.prepare(frey_source, 0, download_ok=False), out / "frey", shard_size=4000)
    return out


def popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "vae_scale", *args], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, workers, held",
    [
        ("rewritten", 0, "by position"),
        ("truncated", 2, "by position"),
        ("truncated", 0, "in memory"),
    ],
)
def test_a_shard_changed_in_place_under_a_running_job_stops_it_naming_the_shard(
    one_shard_frey, tmp_path, change, workers, held
):
    """Read by position (shards over data.max_shard_mb_in_memory), the first batch read
    after the change is refused; held in memory (smaller shards: read whole and verified when
    opened), the epoch trains on the verified bytes and the next visit is refused."""
    shards = tmp_path / "shards"
    shutil.copytree(one_shard_frey, shards)
    shard = shards / "frey" / "train-000000.tar"
    limit = {"by position": 0.1, "in memory": 512}[held]
    args = train_args(
        shards, tmp_path, "data.cache_in_memory=false", f"data.num_workers={workers}",
        "data.batch_size=5", "train.log_every_steps=1", "train.checkpoint_every_steps=5",
        "train.keep_checkpoints=100", "train.epochs=2", f"data.max_shard_mb_in_memory={limit}",
    )  # fmt: skip
    proc = popen(args)
    steps = tmp_path / "tiny" / "steps.jsonl"
    deadline = time.time() + 120
    while not (steps.is_file() and len(steps.read_text().splitlines()) >= 12):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    with open(shard, "r+b") as f:  # in place, same inode: what `cp new.tar shard.tar` does
        if change == "truncated":
            f.truncate(os.fstat(f.fileno()).st_size // 3)
        else:
            f.seek(4096)
            f.write(b"\xff" * (os.fstat(f.fileno()).st_size - 8192))  # all-white images
        changed_at = len(steps.read_text().splitlines())
    code, err = proc.wait(timeout=300), proc.stderr.read()
    assert code == 2, err[-3000:]  # not -7 (SIGBUS), not a hang
    assert "Traceback" not in err and "shared memory" not in err
    rows = [json.loads(r) for r in steps.read_text().splitlines()]
    latest = checkpoint.latest_checkpoint(tmp_path / "tiny" / "checkpoints", verify_hashes=True)
    if held == "in memory":  # epoch 1 trained on the verified bytes, epoch 2 refused them
        assert f"{shard} has sha256" in err and "was changed" in err, err[-2000:]
        assert {r["epoch"] for r in rows} == {1} and len(rows) == 1765 // 5
        assert checkpoint.read_train_state(latest)["epoch"] == 2  # the end of epoch 1
        return
    assert f"{shard} changed on disk while it was being read" in err
    # batches read before the change (up to the workers' prefetch, 4 each) are the verified
    # bytes and may still train and be checkpointed; none read after it trains
    in_flight = 4 * workers + 1
    assert latest is not None and checkpoint.checkpoint_step(latest) <= changed_at + in_flight
    assert len(rows) <= changed_at + in_flight


def test_a_lying_member_table_trains_on_the_true_images(one_shard_frey, tmp_path, capsys):
    """All offsets of the shard's member table pointed at its first image: the table is
    checked against the shard when it is hashed, and the run trains exactly what an honest
    index trains, saying which shard's table lied."""
    import numpy as np

    from vae_scale.data.members import MemberTable

    for name in ("honest", "lying"):
        shards = tmp_path / name / "shards"
        shutil.copytree(one_shard_frey, shards)
        if name == "lying":
            index = json.loads((shards / "frey" / "index.json").read_text())
            shard = index["splits"]["train"]["shards"][0]
            table = MemberTable.decode(shard["members"])
            offsets = np.repeat(table.offsets[:1], len(table.keys), axis=0)
            shard["members"] = MemberTable(table.fields, table.keys, offsets, table.sizes).encode()
            (shards / "frey" / "index.json").write_text(json.dumps(index))
        args = train_args(
            shards, tmp_path / name, "data.cache_in_memory=false", "train.log_every_steps=1"
        )
        if name == "honest":
            assert cli(args, capsys)[0] == 0
            continue
        with pytest.warns(UserWarning, match="train-000000.tar: the member table in index.json"):
            assert cli(args, capsys)[0] == 0
    honest, lying = (
        (tmp_path / n / "tiny" / "steps.jsonl").read_text() for n in ("honest", "lying")
    )
    assert honest == lying


def test_a_killed_loader_worker_ends_the_run_retryably_with_a_checkpoint(frey_shards, tmp_path):
    """What the OOM killer does to a loader worker: the run ends in bounded time naming the
    worker, the likely cause and its memory, checkpointed, exit 3; the same command resumes."""
    run = tmp_path / "tiny"
    args = train_args(
        frey_shards, tmp_path, "data.cache_in_memory=false", "data.num_workers=2",
        "data.batch_size=5", "train.log_every_steps=1", "train.epochs=2",
    )  # fmt: skip
    proc = popen(args)
    steps = run / "steps.jsonl"
    deadline = time.time() + 120
    while not (steps.is_file() and len(steps.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    workers = [
        int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ]
    os.kill(workers[0], signal.SIGKILL)
    started = time.time()
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert time.time() - started < 60
    assert code == REQUEUE_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err
    assert f"loader worker 0 (pid {workers[0]}) of process 0 was killed by SIGKILL" in err
    assert "out-of-memory killer" in err and " MB at last look" in err
    step = int(err.split("checkpointed at step ")[1].split()[0])
    latest = checkpoint.latest_checkpoint(run / "checkpoints", verify_hashes=True)
    assert checkpoint.checkpoint_step(latest) == step > 0
    resumed = popen(args)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").open()] == [1, 2]


def test_a_kill_after_the_last_metrics_row_is_made_good_by_the_same_command(
    frey_shards, tmp_path, monkeypatch
):
    """SIGKILL between the last epoch's metrics row and its pictures, with W&B's offline
    file not yet written (the state such a kill leaves, made exactly): the same command
    does not just say "nothing to do" but replays W&B's missing rows and makes the pictures."""
    from test_faults import wandb_curve

    from vae_scale.run_files.wandb_records import HEADER, run_files

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = train_args(
        frey_shards, tmp_path, "wandb.mode=offline", "train.epochs=2", "eval.picture_epochs=[1]"
    )
    args = [a for a in args if a != "wandb.mode=disabled"]
    run = tmp_path / "tiny"
    proc = popen(args)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    pictures = sorted(run.glob("*_epoch002.png"))
    assert pictures
    for path in pictures:
        path.unlink()
    (newest,) = run_files(run)
    newest.write_bytes(newest.read_bytes()[:HEADER])  # W&B had written nothing yet
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    again = subprocess.run(
        [sys.executable, "-m", "vae_scale", *args], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 2 lacks its pictures (stopped before them): making them now" in again.stdout
    assert "rows replayed" in again.stdout or "nothing to do" in again.stdout
    assert all(p.is_file() for p in pictures)
    local = {}
    for name in ("steps.jsonl", "metrics.jsonl"):
        for row in (json.loads(r) for r in (run / name).open()):
            local.setdefault(row["global_step"], {}).update(row)
    curve = wandb_curve(run)
    assert sorted(curve) == sorted(local)
    # the pictures of epoch 1 were there: nothing more to make; a third run opens nothing
    folders = sorted(run.glob("wandb/offline-run-*"))
    proc = popen(args)
    assert proc.wait(timeout=300) == 0 and sorted(run.glob("wandb/offline-run-*")) == folders


@contextmanager
def read_only_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs, filled by the caller, then remounted read-only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_unwritable_places_are_one_line_errors(frey_shards, frey_source, tmp_path, capsys):
    with read_only_tmpfs(tmp_path) as disk:
        data_root = frey_source.parent
        code, err = cli(
            ["shard", "frey", "--out", str(disk), "--data-root", str(data_root)], capsys
        )
        assert code == 0, err
        index = (disk / "frey" / "index.json").read_text()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, err = cli(
            ["shard", "frey", "--out", str(disk), "--data-root", str(data_root), "--force"], capsys
        )
        assert code == 2 and "cannot write" in err and "Read-only file system" in err, err
        assert "Traceback" not in err and (disk / "frey" / "index.json").read_text() == index
        code, err = cli(train_args(frey_shards, disk / "runs"), capsys)
        assert code == 2 and "Read-only file system" in err and str(disk) in err, err
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    code, err = cli(train_args(frey_shards, a_file), capsys)
    assert code == 2 and "Not a directory" in err and "Traceback" not in err, err


def test_a_warm_start_is_recorded_with_its_flags(frey_shards, tmp_path, capsys):
    assert cli(train_args(frey_shards, tmp_path), capsys)[0] == 0
    source = checkpoint.latest_checkpoint(tmp_path / "tiny" / "checkpoints")
    args = [*train_args(frey_shards, tmp_path, "run.name=warm", "train.epochs=2")]
    code, err = cli([*args, "--resume", str(source), "--from-another-run"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert record["warm_start"] == {
        "checkpoint": str(source.resolve()),
        "step": checkpoint.checkpoint_step(source),
    }
    assert record["command"].endswith(f"--resume {source} --from-another-run")
    # a later start of the warm run keeps the record; data.on_error may change on resume
    code, err = cli([*args[:-1], "train.epochs=3", "data.on_error=skip"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert record["warm_start"]["checkpoint"] == str(source.resolve())


def test_a_copied_run_folder_logs_to_a_wandb_run_of_its_own(
    frey_shards, tmp_path, capsys, monkeypatch
):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    offline = [a for a in train_args(frey_shards, tmp_path) if a != "wandb.mode=disabled"]
    assert cli([*offline, "wandb.mode=offline"], capsys)[0] == 0
    original = (tmp_path / "tiny" / "wandb_run_id.txt").read_text().strip()
    shutil.copytree(tmp_path / "tiny", tmp_path / "copy", symlinks=True)  # cp -a
    args = [*offline, "wandb.mode=offline", "run.name=copy", "train.epochs=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    copied = (tmp_path / "copy" / "wandb_run_id.txt").read_text().strip()
    assert copied != original and f"is a copy of the run folder {tmp_path / 'tiny'}" in out
    assert (tmp_path / "tiny" / "wandb_run_id.txt").read_text().strip() == original
    # a renamed folder is the same run: it keeps its id
    (tmp_path / "tiny").rename(tmp_path / "renamed")
    args = [*offline, "wandb.mode=offline", "run.name=renamed", "train.epochs=2"]
    assert main(args) == 0 and "is a copy" not in capsys.readouterr().out
    assert (tmp_path / "renamed" / "wandb_run_id.txt").read_text().strip() == original
