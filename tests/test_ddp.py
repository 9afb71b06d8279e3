"""DDP proven correct through the real `accelerate launch` command: 2 gloo processes on the CPU.

Three launches, shared by the tests below:
- tests/helpers/ddp_probe.py: the package's loader, model, loss and Accelerator on 2 ranks,
  recording the keys each rank read and its parameters after one epoch of steps;
- `vae-scale train` under tests/helpers/launch_audit.py: the real trainer with W&B offline,
  recording which process wrote which file;
- `vae-scale train` with more loader workers than shards: a clear error, not a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from vae_scale.config import DataConfig
from vae_scale.data.sourcing.base import SourceData
from vae_scale.data.sourcing.shards import load_index, write_dataset
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.data.streaming.order import EpochPlan, Topology, batches_for, global_order

pytestmark = pytest.mark.slow  # every test here launches real processes


CPU_2PROC = REPO / "launch" / "cpu_2proc.yaml"
SEED = 0
BATCH = 50  # per process
SHARD_SIZE = 50  # Frey: 35 full train shards + one of 15; val and test 2 shards each
EVEN_COUNTS = (8, 40)  # toy data: 8 shards x 40 samples
EVEN_BATCH = 20
LAUNCH_TIMEOUT_S = 240


def accelerate_command() -> list[str]:
    beside = Path(sys.executable).with_name("accelerate")
    return [str(beside) if beside.is_file() else shutil.which("accelerate") or "accelerate"]


def launch(args: list[str], home: Path, timeout: float = LAUNCH_TIMEOUT_S):
    """`accelerate launch --config_file launch/cpu_2proc.yaml ARGS` from the repo root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        HOME=str(home),  # W&B's ~/.cache and ~/.config stay out of the user's home
        WANDB_SILENT="true",
    )
    home.mkdir(parents=True, exist_ok=True)
    cmd = [*accelerate_command(), "launch", "--config_file", str(CPU_2PROC), *args]
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def explain(proc: subprocess.CompletedProcess) -> str:
    out, err = proc.stdout[-3000:], proc.stderr[-5000:]
    return f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


def shard_keys(shard_dir: Path, split: str) -> dict[str, list[str]]:
    """shard file name -> sample keys, read straight from the tar files."""
    out = {}
    for entry in load_index(shard_dir)["splits"][split]["shards"]:
        with tarfile.open(shard_dir / entry["name"]) as tar:
            names = [m.name.split(".", 1)[0] for m in tar.getmembers()]
        out[entry["name"]] = list(dict.fromkeys(names))
    return out


def plan_keys(
    shard_dir: Path, split: str, world: int, batch: int, workers: int, block: int
) -> tuple[list[list[str]], EpochPlan]:
    """[rank] -> the keys data/order.py assigns that rank in epoch 1, and the plan."""
    keys = [k for ks in shard_keys(shard_dir, split).values() for k in ks]
    counts = [e["num_samples"] for e in load_index(shard_dir)["splits"][split]["shards"]]
    topo = Topology(world, max(1, workers), batch)
    order = global_order(counts, SEED, 1, shuffle=True)
    plan = EpochPlan(order, topo, batches_for(len(order), topo, True), SEED, 1, 0, block)
    per_rank = [
        [keys[i] for w in range(topo.workers) for i in plan.worker_slice(r, w)]
        for r in range(world)
    ]
    return per_rank, plan


@pytest.fixture(scope="module")
def ddp_shards(frey_source, tmp_path_factory) -> Path:
    """shards/ with frey/ in small shards (each rank gets part of val) and toy/ (even)."""
    from vae_scale.data.sourcing import frey

    out = tmp_path_factory.mktemp("ddp_shards")
    write_dataset(frey.prepare(frey_source, seed=0, download_ok=False), out / "frey", SHARD_SIZE)
    num_shards, per_shard = EVEN_COUNTS
    samples = [
        {"__key__": f"toy_{i:04d}", "npy": np.full((4, 4, 1), i % 256, np.uint8)}
        for i in range(num_shards * per_shard)
    ]
    toy = SourceData("toy", (1, 4, 4), {"train": samples}, source={"synthetic": True})
    write_dataset(toy, out / "toy", shard_size=per_shard)
    return out


@pytest.fixture(scope="module")
def probe(ddp_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("probe")
    proc = launch(
        [
            "tests/helpers/ddp_probe.py",
            f"--shards={ddp_shards / 'frey'}",
            f"--even-shards={ddp_shards / 'toy'}",
            f"--out={out}",
            f"--batch-size={BATCH}",
            f"--even-batch-size={EVEN_BATCH}",
            f"--seed={SEED}",
        ],
        home=out / "home",
    )
    assert proc.returncode == 0, explain(proc)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    params = [torch.load(out / f"params_rank{r}.pt") for r in range(2)]
    return {"ranks": ranks, "params": params}


@pytest.fixture(scope="module")
def cli_run(ddp_shards, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("cli")
    audit = base / "audit"
    audit.mkdir()
    proc = launch(
        [
            "tests/helpers/launch_audit.py",
            str(audit),
            "train",
            "configs/frey_conv.yaml",
            f"data.shards_dir={ddp_shards}",
            f"run.dir={base / 'runs'}",
            "run.name=ddp",
            "model.base_channels=4",
            "model.latent_dim=4",
            f"data.batch_size={BATCH}",
            "data.shuffle_buffer=200",
            "train.epochs=1",
            "loss.encoder_aug.weight=1",  # its second, encoder-only pass must work under DDP
            "train.log_every_steps=5",
            "wandb.mode=offline",
        ],
        home=base / "home",
    )
    assert proc.returncode == 0, explain(proc)
    audits = {}
    for path in audit.glob("audit_rank*.json"):
        record = json.loads(path.read_text())
        audits[record["rank"]] = record
    return {"run_dir": base / "runs" / "ddp", "audits": audits}


def test_two_distinct_gloo_ranks(probe, cli_run):
    ranks = probe["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["num_processes"] == 2 and r["backend"] == "gloo"
        assert (r["env_rank"], r["env_world_size"]) == (str(r["rank"]), "2")
    audits = cli_run["audits"]
    assert sorted(audits) == [0, 1]
    assert all(a["num_processes"] == 2 and a["exit_status"] == 0 for a in audits.values())
    config = json.loads((cli_run["run_dir"] / "config.json").read_text())
    assert config["num_processes"] == 2 and config["global_batch_size"] == 2 * BATCH
    assert config["num_machines"] == 1


def test_two_process_run_in_wandb_and_compare(cli_run, ddp_shards, tmp_path, monkeypatch):
    """W&B's records of the 2-process run: its facts, and samples seen = 2 x batch a step;
    `compare` tells it from a 1-process run of the same per-process batch."""
    from vae_scale.analysis.compare import compare_runs
    from vae_scale.config import load_config
    from vae_scale.run_files.wandb_records import read_runs
    from vae_scale.training.loop import train

    (record,) = read_runs(cli_run["run_dir"])  # rank 0 alone logs
    assert record.config["num_processes"] == 2 and record.config["num_machines"] == 1
    assert record.config["global_batch_size"] == 2 * BATCH
    steps = [h for h in record.history if "train/samples_seen" in h]
    assert steps and all(h["train/samples_seen"] == 2 * BATCH * h["global_step"] for h in steps)

    monkeypatch.setenv("WANDB_MODE", "disabled")
    single = train(
        load_config(
            REPO / "configs" / "frey_conv.yaml",
            [
                f"data.shards_dir={ddp_shards}", f"run.dir={tmp_path}", "run.name=single",
                "model.base_channels=4", "model.latent_dim=4", f"data.batch_size={BATCH}",
                "data.shuffle_buffer=200", "train.epochs=1", "loss.encoder_aug.weight=1",
            ],
        )
    )  # fmt: skip
    text = compare_runs([cli_run["run_dir"], single], tmp_path / "report.md").read_text()
    assert "| num_processes | 2 | 1 |" in text
    assert f"| global_batch_size | {2 * BATCH} | {BATCH} |" in text
    assert "data.batch_size" not in text  # the same per-process batch


def test_two_processes_equal_one_process_with_accumulation(probe, ddp_shards):
    """2 ranks x batch B == 1 process x batch B x accumulation 2 over the same samples, in
    the same order (rank 0's batch k, then rank 1's batch k), with the same noise per sample."""
    from helpers.ddp_probe import reference_train

    r0, r1 = (r["train_batches"] for r in probe["ranks"])
    assert len(r0) == len(r1) > 5
    full = ShardSplit(ddp_shards / "frey", "train", DataConfig(batch_size=256))
    images = {k: im for b in full.eval_batches() for k, im in zip(b["key"], b["image"])}
    micro_batches = [
        (torch.stack([images[k] for k in keys]), keys) for pair in zip(r0, r1) for keys in pair
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: extra threads only wait on a busy CPU
    try:
        reference = reference_train(micro_batches, full.image_shape, SEED, accum=2)
    finally:
        torch.set_num_threads(threads)
    ddp = probe["params"][0]
    assert reference.keys() == ddp.keys()
    from helpers.ddp_probe import tiny_model

    initial = tiny_model(full.image_shape, SEED).state_dict()
    moved = max((ddp[k] - initial[k]).abs().max().item() for k in ddp)
    assert moved > 1e-3  # training changed the weights, so equality below means something
    for name in ddp:
        torch.testing.assert_close(ddp[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_parameters_identical_on_both_ranks(probe):
    p0, p1 = probe["params"]
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name


def test_even_shards_every_sample_exactly_once(probe, ddp_shards):
    """8 equal shards, 2 ranks x 2 loader workers, batch divides each worker's share."""
    toy = ddp_shards / "toy"
    keys = shard_keys(toy, "train")
    seen = [r["even_keys"] for r in probe["ranks"]]
    everything = [k for ks in keys.values() for k in ks]
    assert sorted(seen[0] + seen[1]) == sorted(everything)  # each sample exactly once
    expected, _ = plan_keys(toy, "train", world=2, batch=EVEN_BATCH, workers=2, block=50)
    for rank in range(2):
        assert sorted(seen[rank]) == sorted(expected[rank])
    num_shards, per_shard = EVEN_COUNTS
    assert all(
        r["even_steps_in_epoch"] == num_shards * per_shard // 2 // EVEN_BATCH
        for r in probe["ranks"]
    )


def test_uneven_shards_follow_the_documented_rule(probe, ddp_shards):
    """Loader docstring: each rank reads its contiguous slice of the epoch's global order,
    every rank runs the same number of full batches, and the epoch leaves out less than one
    global batch (Frey's 1,765 training faces in uneven shards)."""
    frey_dir = ddp_shards / "frey"
    expected, plan = plan_keys(frey_dir, "train", world=2, batch=BATCH, workers=0, block=200)
    total = sum(len(k) for k in shard_keys(frey_dir, "train").values())
    assert total % (2 * BATCH)  # the case is really uneven
    steps = total // (2 * BATCH)
    for rank, record in enumerate(probe["ranks"]):
        seen = [k for batch in record["train_batches"] for k in batch]
        assert record["steps_in_epoch"] == len(record["train_batches"]) == steps == plan.batches
        assert all(len(batch) == BATCH for batch in record["train_batches"])
        assert len(seen) == len(set(seen)) == steps * BATCH
        assert sorted(seen) == sorted(expected[rank])
    seen0, seen1 = ({k for b in r["train_batches"] for k in b} for r in probe["ranks"])
    assert not seen0 & seen1
    assert total - len(seen0) - len(seen1) == plan.dropped < 2 * BATCH


def test_validation_split_read_exactly_once_across_ranks(probe, ddp_shards):
    val_keys = [k for ks in shard_keys(ddp_shards / "frey", "val").values() for k in ks]
    seen = [r["val_keys"] for r in probe["ranks"]]
    assert seen[0] and seen[1]  # both ranks evaluate part of the split
    assert sorted(seen[0] + seen[1]) == sorted(val_keys)
    assert probe["ranks"][0]["val_metrics"]["val/num_samples"] == len(val_keys)


def test_only_rank0_writes_the_run_folder_and_wandb(cli_run):
    run_dir = cli_run["run_dir"].resolve()
    rank0, rank1 = cli_run["audits"][0], cli_run["audits"][1]
    assert rank0["wandb_init_calls"] == 1 and rank1["wandb_init_calls"] == 0
    assert not rank1["programs"]  # no wandb-core, not even git
    assert not rank1["mkdirs"] and not rank1["renames"]
    # Rank 1's only file: its own RNG state, written by accelerator.save_state on every rank.
    rank1_files = {Path(p).name for p in rank1["writes"]}
    assert rank1_files == {"random_states_1.pkl"}, rank1["writes"]
    assert all(Path(p).parent.name.startswith(".tmp-step_") for p in rank1["writes"])

    def final(path: str) -> Path:  # checkpoints are written into .tmp-step_X, then renamed
        p = Path(path)
        return p.parent.with_name(p.parent.name.removeprefix(".tmp-")) / p.name

    # a file written under a temporary name and renamed (config.json, logs) is the renamer's
    written = {
        r: {final(p) for p in audit["writes"] + audit["renames"]}
        for r, audit in ((0, rank0), (1, rank1))
    }
    for path in run_dir.rglob("*"):
        if path.is_file() and "wandb" not in path.relative_to(run_dir).parts:
            owners = [r for r in (0, 1) if path in written[r]]
            expected = [1] if path.name == "random_states_1.pkl" else [0]
            assert owners == expected, (path, owners)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert runs[0].name.endswith((run_dir / "wandb_run_id.txt").read_text().strip())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # one row per epoch, not one per rank


def test_encoder_augmentation_trains_under_ddp(cli_run):
    """The encoder-only term runs outside DDP's forward; one backward must still give every
    parameter exactly one gradient per step (DDP raises otherwise) and log its loss."""
    steps = [json.loads(r) for r in (cli_run["run_dir"] / "steps.jsonl").read_text().splitlines()]
    aug = [r["train/step_encoder_aug_neg_elbo"] for r in steps]
    assert len(aug) >= 3 and all(np.isfinite(aug)) and min(aug) > 0
    assert aug[-1] < aug[0]  # the encoder (and the decoder it is scored by) learned


def test_logged_validation_is_over_the_whole_split_once(cli_run, ddp_shards):
    """metrics.jsonl under 2 processes: every val/test sample counted once, and the same
    value a single process computes for the saved model."""
    from accelerate import Accelerator

    from vae_scale.analysis.evaluate import EvalOptions, evaluate_split
    from vae_scale.analysis.runs import load_run
    from vae_scale.utils.compat import reset_accelerate_state

    run_dir = cli_run["run_dir"]
    index = load_index(ddp_shards / "frey")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    total = index["splits"]["train"]["num_samples"]
    assert rows[0]["train/num_samples"] == total // (2 * BATCH) * 2 * BATCH
    for row in rows:
        for split in ("val", "test"):
            assert row[f"{split}/num_samples"] == index["splits"][split]["num_samples"]

    model = load_run(run_dir).model  # the run's own config and latest checkpoint
    accelerator = Accelerator(cpu=True)
    try:
        val = ShardSplit(ddp_shards / "frey", "val", DataConfig(batch_size=BATCH))
        one = evaluate_split(accelerator, model, val, EvalOptions(SEED))
    finally:
        accelerator.end_training()
        reset_accelerate_state()
    logged = rows[-1]
    assert one["val/num_samples"] == logged["val/num_samples"]
    # KL uses no noise: equal up to summation order. The reconstruction term uses each
    # rank's own noise stream, so it agrees up to Monte Carlo error only.
    assert logged["val/kl"] == pytest.approx(one["val/kl"], rel=1e-5)
    assert logged["val/neg_elbo"] == pytest.approx(one["val/neg_elbo"], rel=2e-3)


def test_fewer_shards_than_ranks_times_workers_still_reads_every_sample(ddp_shards, tmp_path):
    """Ranks and workers split the epoch by sample ranges, not whole shards: more loader
    workers than shards per rank train as well (no hang, no error, same sample count)."""
    num_train_shards = len(load_index(ddp_shards / "frey")["splits"]["train"]["shards"])
    workers = num_train_shards // 2 + 1  # 2 ranks x workers > shards
    try:
        proc = launch(
            [
                "-m",
                "vae_scale.cli",
                "train",
                "configs/frey_conv.yaml",
                f"data.shards_dir={ddp_shards}",
                f"run.dir={tmp_path}",
                "run.name=many_workers",
                f"data.num_workers={workers}",
                f"data.batch_size={BATCH}",
                "model.base_channels=4",
                "train.epochs=1",
                "eval.picture_epochs=[]",
                "wandb.mode=disabled",
            ],
            home=tmp_path / "home",
            timeout=240,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("more workers than shards made the 2-process launch hang")
    assert proc.returncode == 0, explain(proc)
    (row,) = [json.loads(r) for r in (tmp_path / "many_workers" / "metrics.jsonl").open()]
    total = sum(len(k) for k in shard_keys(ddp_shards / "frey", "train").values())
    assert row["train/num_samples"] == total // (2 * BATCH) * 2 * BATCH
