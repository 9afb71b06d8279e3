"""Remote shards through every transport fault, against real servers and real processes: a
loopback HTTP server that truncates bodies, resets connections, stalls, throttles with
Retry-After, corrupts or shortens bodies, and is killed and restarted mid-epoch; pipe:
commands that fail, stall or write short tars; failed name lookups. Each run reads exactly
the local folder's samples, or stops with an error naming the URL and every attempt."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_FREY, tiny_overrides
from helpers.http_shards import ShardServer
from vae_scale.config import DataConfig
from vae_scale.data.streaming import remote
from vae_scale.data.streaming.loader import ShardSplit
from vae_scale.data.streaming.remote import FetchPolicy, TransferStats
from vae_scale.errors import DataError
from vae_scale.run_files.wandb_records import read_runs

FAST = FetchPolicy(retries=3, retry_delay_s=0.01, timeout_s=0.3)
FAST_FIELDS = dict(retries=3, retry_delay_s=0.01, read_timeout_s=0.3)  # FAST as data fields


def frey_split(location, **data) -> ShardSplit:
    """The training split, `data` fields over a small batch and fast retries."""
    data = DataConfig(**{"batch_size": 50, "shuffle_buffer": 200, **FAST_FIELDS, **data})
    return ShardSplit(location, "train", data, shuffle=True, seed=1)


def read_epoch(split: ShardSplit) -> tuple[list[str], torch.Tensor, dict[str, int]]:
    batches = list(split.train_batches(1))
    transfers = {k: sum(b["transfers"][k] for b in batches) for k in ("retries", "refetched_bytes")}
    images = torch.cat([b["image"] for b in batches])
    return [k for b in batches for k in b["key"]], images, transfers


def train_shard_bytes(frey_shards: Path) -> list[int]:
    return [p.stat().st_size for p in sorted((frey_shards / "frey").glob("train-*.tar"))]


def test_retries_while_evaluating_are_counted_with_the_same_numbers(frey_shards):
    from accelerate import Accelerator

    from vae_scale.analysis.evaluate import EvalOptions, evaluate_split
    from vae_scale.losses import build_likelihood
    from vae_scale.models import build_model
    from vae_scale.models.mlp import MLPVAEConfig
    from vae_scale.utils.compat import reset_accelerate_state

    shape = (1, 28, 20)
    torch.manual_seed(0)
    model = build_model(MLPVAEConfig(hidden=[8]), shape, build_likelihood("bernoulli", shape))
    data = DataConfig(batch_size=50, **FAST_FIELDS)
    try:
        local = evaluate_split(
            Accelerator(cpu=True), model, ShardSplit(frey_shards / "frey", "val", data),
            EvalOptions(),
        )  # fmt: skip
        with ShardServer(frey_shards, faults=["reset"]) as srv:  # each shard's first request
            remote_split = ShardSplit(f"{srv.url}/frey", "val", data)
            served = evaluate_split(Accelerator(cpu=True), model, remote_split, EvalOptions())
    finally:
        reset_accelerate_state()
    assert served["val/neg_elbo"] == local["val/neg_elbo"]
    assert served["val/data_retries"] == srv.faults_done["reset"] == 1
    assert local["val/data_retries"] == 0


@pytest.mark.parametrize("fault", ["truncate", "reset", "stall", "refuse", "throttle", "corrupt"])
def test_every_transport_fault_is_retried_and_reads_the_local_samples(frey_shards, fault):
    keys, images, _ = read_epoch(frey_split(frey_shards / "frey"))
    # every other shard faults on its first request
    with ShardServer(frey_shards, faults=[fault, "ok"], stall_s=1.0, retry_after_s=0.05) as srv:
        got_keys, got_images, transfers = read_epoch(frey_split(f"{srv.url}/frey"))
    assert got_keys == keys and torch.equal(got_images, images)
    assert srv.faults_done[fault] == 7 and transfers["retries"] == 7
    if fault in ("truncate", "reset", "stall"):  # the rest of the body, not all of it again
        assert srv.range_requests == 7 and transfers["refetched_bytes"] == 0
    if fault == "corrupt":  # caught by its sha256 and fetched again, whole
        faulted = [p for p, kind in srv.schedule.items() if kind == fault and "/train-" in p]
        assert transfers["refetched_bytes"] == sum(
            (frey_shards / p.lstrip("/")).stat().st_size for p in faulted
        )


def test_without_range_support_a_broken_body_starts_over_and_counts_the_bytes(frey_shards):
    keys, _, _ = read_epoch(frey_split(frey_shards / "frey"))
    with ShardServer(frey_shards, faults=["truncate"], ranges=False) as srv:
        got, _, transfers = read_epoch(frey_split(f"{srv.url}/frey"))
    assert got == keys and srv.range_requests == 0
    assert transfers["refetched_bytes"] == sum(n // 2 for n in train_shard_bytes(frey_shards))


def test_a_short_tar_is_refetched_by_its_sample_count_when_not_hashed(frey_shards):
    keys, _, _ = read_epoch(frey_split(frey_shards / "frey"))
    with ShardServer(frey_shards, faults=["short"]) as srv:
        got, _, transfers = read_epoch(frey_split(f"{srv.url}/frey", verify_shards=False))
    assert got == keys and transfers["retries"] == 14 and transfers["refetched_bytes"] > 0


def test_throttling_waits_the_servers_retry_after(frey_shards):
    with ShardServer(frey_shards, faults=["throttle"], retry_after_s=0.8) as srv:
        stats = TransferStats()
        t0 = time.perf_counter()
        data = remote.fetch(f"{srv.url}/frey/test-000000.tar", FAST, stats)
        waited = time.perf_counter() - t0
    assert data == (frey_shards / "frey" / "test-000000.tar").read_bytes()
    assert stats.retries == 1 and waited >= 0.8  # not data.retry_delay_s (0.01)


@pytest.mark.parametrize("status", [403, 404])
def test_final_statuses_are_not_retried_and_name_the_url(frey_shards, status):
    with ShardServer(frey_shards, statuses={"train-000002.tar": status}) as srv:
        with pytest.raises(DataError) as err:
            read_epoch(frey_split(f"{srv.url}/frey"))
        assert srv.requests["/frey/train-000002.tar"] == 1
        skipping = frey_split(f"{srv.url}/frey", on_error="skip")
        with pytest.warns(UserWarning, match="train-000002.tar"):
            batches = list(skipping.train_batches(1))
    message = str(err.value)
    assert f"{srv.url}/frey/train-000002.tar: HTTP {status}" in message
    assert "attempt 1 of 4; not retried" in message
    assert len(batches) == skipping.planner.batches_in_epoch()
    assert sum(b["skipped"] for b in batches) == 128  # the whole shard's samples, counted


def test_retries_exhausted_lists_every_attempt(frey_shards):
    with ShardServer(frey_shards, always_fail="train-000001.tar") as srv:
        with pytest.raises(DataError) as err:
            read_epoch(frey_split(f"{srv.url}/frey"))
    message = str(err.value)
    assert "train-000001.tar: still failing after 4 attempts (data.retries=3)" in message
    assert all(f"attempt {i}: HTTP 500" in message for i in range(1, 5))


def test_refused_connections_and_failed_name_lookups_are_retried(frey_shards, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(DataError, match=r"still failing after 2 attempts.*refused"):
        remote.fetch(f"http://127.0.0.1:{closed}/x.tar", FetchPolicy(1, 0.01, 0.3))

    real = socket.getaddrinfo
    lookups = []

    def flaky_dns(host, *args, **kwargs):  # the resolver fails twice, then answers
        if host != "shards.example":
            return real(host, *args, **kwargs)
        lookups.append(host)
        if len(lookups) <= 2:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", flaky_dns)
    with ShardServer(frey_shards) as srv:
        port = srv.url.rsplit(":", 1)[1]
        stats = TransferStats()
        data = remote.fetch(f"http://shards.example:{port}/frey/test-000000.tar", FAST, stats)
        assert data == (frey_shards / "frey" / "test-000000.tar").read_bytes()
        assert stats.retries == 2 and len(lookups) == 3
        lookups.clear()
        with pytest.raises(DataError, match="attempt 2: name lookup failed"):
            remote.fetch(f"http://shards.example:{port}/x.tar", FetchPolicy(1, 0.01, 0.3))


def test_large_shards_go_through_a_file_member_by_member(tmp_path, monkeypatch):
    """Above data.max_shard_mb_in_memory a shard is spilled to local disk (resumed by Range
    after a fault) and read member by member: the same samples, a fraction of the memory."""
    import tempfile

    from test_loader import make_shards

    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    make_shards(tmp_path / "big", [800], shape=(64, 64, 3))  # one 10 MB shard
    size = (tmp_path / "big" / "train-000000.tar").stat().st_size
    in_memory = dict(read_timeout_s=2)
    on_disk = dict(read_timeout_s=2, max_shard_mb_in_memory=1)
    keys, images, _ = read_epoch(frey_split(tmp_path / "big", **in_memory))
    means = [b.double().mean().item() for b in images.split(50)]
    peaks = {}
    server, url = start_server(tmp_path, 0, tmp_path / "log", "truncate")  # its own process
    try:
        for name, policy in (("memory", in_memory), ("file", on_disk)):
            split = frey_split(f"{url}/big", **policy)
            tracemalloc.start()
            got_keys, got_means, redone = [], [], []
            for batch in split.train_batches(1):  # one batch at a time, as training holds them
                got_keys += batch["key"]
                got_means.append(batch["image"].double().mean().item())
                redone.append(batch["transfers"])
                del batch
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert got_keys == keys and got_means == means
            assert sum(r["retries"] for r in redone) == 1  # the truncated body: resumed
            assert sum(r["refetched_bytes"] for r in redone) == 0
    finally:
        server.kill()
        server.wait()
    assert peaks["memory"] > size and peaks["file"] < size / 3, (size, peaks)
    assert list(spill.iterdir()) == []  # the spill file is gone


# ---------------------------------------------------------------------------- pipe: sources

FLAKY_PIPE = """#!/bin/sh
# attempt 1: a failing command; 2: a short tar; 3: stalls; 4: the shard
n=$(cat "$COUNTER" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$COUNTER"
case $n in
  1) echo "An error occurred (SlowDown): please reduce your request rate" >&2; exit 1 ;;
  2) head -c "$SHORT" "$1"; exit 0 ;;
  3) sleep 3; cat "$1" ;;
  *) cat "$1" ;;
esac
"""


def test_pipe_commands_that_fail_stall_or_write_short_tars_are_retried(tmp_path, monkeypatch):
    from test_loader import make_shards

    shard = make_shards(tmp_path / "toy", [60]) / "train-000000.tar"
    script = tmp_path / "flaky.sh"
    script.write_text(FLAKY_PIPE)
    with tarfile.open(shard) as tar:  # cut at a member boundary: a well-formed, short tar
        short = tar.getmembers()[40].offset
    monkeypatch.setenv("COUNTER", str(tmp_path / "count"))
    monkeypatch.setenv("SHORT", str(short))
    # no index: neither sha256 nor count; the missing end-of-archive marker tells
    url = f"pipe:sh {script} {shard}"
    data = DataConfig(batch_size=16, urls={"test": url}, image_size=4, channels=1, **FAST_FIELDS)
    split = ShardSplit("", "test", data)
    batches = list(split.eval_batches())
    assert (tmp_path / "count").read_text().strip() == "4"  # fail, short, stall, the shard
    assert sorted(k for b in batches for k in b["key"]) == [f"s{i:05d}" for i in range(60)]
    assert sum(b["transfers"]["retries"] for b in batches) == 3
    assert sum(b["transfers"]["refetched_bytes"] for b in batches) == short

    (tmp_path / "count").write_text("0")
    with pytest.raises(DataError) as err:
        remote.fetch(url, FetchPolicy(0, 0.01, 0.3))
    message = str(err.value)
    assert f"shard {url}: still failing after 1 attempts" in message
    assert "exited with status 1" in message and "(SlowDown): please reduce" in message


def test_a_pipe_that_stalls_is_killed_and_named(tmp_path):
    with pytest.raises(DataError, match=r"`sleep 30` wrote nothing for 0.3 s"):
        remote.fetch("pipe:sleep 30", FetchPolicy(1, 0.01, 0.3))


# ----------------------------------------------------------- the whole CLI, a server restart


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.Popen(
        [sys.executable, "-m", "vae_scale", *args],
        env={**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start_server(folder: Path, port: int, log: Path, faults: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "helpers" / "http_shards.py"), str(folder),
         "--port", str(port), "--faults", faults, "--stall-s", "2", "--retry-after-s", "0.5",
         "--log", str(log)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert line.startswith("ready "), line
    return proc, line.split()[1]


@pytest.mark.slow
def test_vae_scale_train_through_faults_and_a_server_restart_equals_the_local_run(
    frey_shards, tmp_path
):
    """`vae-scale train` on shards served by a real server process that truncates, resets,
    stalls, throttles and corrupts on a schedule, and is killed and restarted mid-epoch:
    the same samples at every step and the same metrics as the local-folder run; the
    retries in steps.jsonl and in W&B's own records."""
    log = tmp_path / "requests.log"
    faults = "ok,truncate,reset,stall,throttle,corrupt,refuse"
    server, url = start_server(frey_shards, 0, log, faults)
    port = int(url.rsplit(":", 1)[1])
    restarts: list[float] = []

    def restart_mid_epoch() -> None:  # after the 6th shard request of the first epoch
        nonlocal server
        deadline = time.time() + 120
        while time.time() < deadline:
            lines = log.read_text().splitlines() if log.exists() else []
            if sum("/frey/train-" in line for line in lines) >= 6:
                server.send_signal(signal.SIGKILL)
                server.wait()
                time.sleep(1.0)  # down: connections are refused
                server, _ = start_server(frey_shards, port, log, faults)
                restarts.append(time.time())
                return
            time.sleep(0.02)

    common = [
        "train", str(REPO / "configs" / "frey_conv.yaml"), *TINY_FREY, "train.epochs=2",
        "data.batch_size=25", "data.num_workers=2", "data.cache_in_memory=false",
        "train.log_every_steps=5", "train.log_sample_keys=true", "eval.picture_epochs=[]",
    ]  # fmt: skip
    env = {"HOME": str(tmp_path / "home")}
    watcher = threading.Thread(target=restart_mid_epoch, daemon=True)
    watcher.start()
    transport = [
        "data.retries=5", "data.retry_delay_s=0.2", "data.read_timeout_s=1",
    ]  # fmt: skip
    remote_run = run_cli(
        [*common, *tiny_overrides(url, tmp_path / "http", "wandb.mode=offline"),
         *transport],
        env,
    )  # fmt: skip
    local = run_cli([*common, *tiny_overrides(frey_shards, tmp_path / "local")], env)
    try:
        remote_out, _ = remote_run.communicate(timeout=300)
        local_out, _ = local.communicate(timeout=300)
    finally:
        watcher.join(timeout=5)
        server.kill()
        server.wait()
    assert remote_run.returncode == 0, remote_out[-3000:]
    assert local.returncode == 0, local_out[-3000:]
    assert restarts, "the server was never restarted"
    kinds = [line.split()[2] for line in log.read_text().splitlines()]
    assert {"truncate", "reset", "stall", "throttle", "corrupt", "refuse"} <= set(kinds)

    runs = {name: tmp_path / name / "tiny" for name in ("local", "http")}
    keys = {n: (r / "sample_keys" / "rank0.jsonl").read_text() for n, r in runs.items()}
    assert keys["http"] == keys["local"]  # every step trained the same samples
    metrics = {n: [json.loads(x) for x in (r / "metrics.jsonl").open()] for n, r in runs.items()}
    for a, b in zip(metrics["local"], metrics["http"], strict=True):
        for key in ("train/neg_elbo", "val/neg_elbo", "test/neg_elbo", "test/num_samples"):
            assert a[key] == b[key], key
    steps = [json.loads(x) for x in (runs["http"] / "steps.jsonl").open()]
    assert steps[-1]["data/retries"] >= 6 and steps[-1]["data/refetched_bytes"] > 0
    assert [s["data/retries"] for s in steps] == sorted(s["data/retries"] for s in steps)
    assert metrics["http"][-1]["data/retries"] >= steps[-1]["data/retries"]
    assert metrics["local"][-1]["data/retries"] == 0
    (record,) = read_runs(runs["http"])
    logged = [h["data/retries"] for h in record.history if "data/retries" in h]
    assert logged and logged[-1] == metrics["http"][-1]["data/retries"]


@pytest.mark.slow
def test_a_final_error_in_a_loader_worker_ends_vae_scale_train_with_one_line(frey_shards, tmp_path):
    """A 404 met by a loader worker: exit 2 at once with the URL and no traceback (the
    workers, which ignore SIGTERM, must not hold the process at exit)."""
    with ShardServer(frey_shards, statuses={"train-000005.tar": 404}) as srv:
        args = [
            "train", str(REPO / "configs" / "frey_conv.yaml"), *TINY_FREY,
            *tiny_overrides(srv.url, tmp_path), "data.num_workers=2",
            "data.cache_in_memory=false",
        ]  # fmt: skip
        proc = run_cli(args, {"HOME": str(tmp_path / "home")})
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out
    last = out.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"error: shard {srv.url}/frey/train-000005.tar: HTTP 404"), last
    assert srv.requests["/frey/train-000005.tar"] == 1
