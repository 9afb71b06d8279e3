"""Never lose a run, part 4: what a kill, a damaged record or a trainer pruning under a reader
does to a run folder, through the real CLI."""

import json
import shutil
import warnings
from pathlib import Path

import pytest

from conftest import REPO, TINY_FREY, tiny_overrides
from vae_scale.cli import main
from vae_scale.run_files.checkpoints import PREFIX, complete_checkpoints
from vae_scale.training import checkpoint

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
