"""Remote shards under each transport fault, side by side with a clean server: the samples
equal, the retries and refetched bytes, the time of one training epoch's reads; and the
memory of reading a large shard held in RAM vs spilled to a file (data.max_shard_mb_in_memory).

    python benchmarks/transport_faults.py --shards shards   # a folder holding frey/
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_loader import make_shards  # noqa: E402

from helpers.http_shards import ShardServer  # noqa: E402
from vae_scale.config import DataConfig  # noqa: E402
from vae_scale.data.streaming.loader import ShardSplit  # noqa: E402

FAULTS = ["ok", "truncate", "reset", "stall", "throttle", "refuse", "corrupt"]


def epoch(location: str, data: DataConfig) -> tuple[list[str], dict[str, int], float]:
    split = ShardSplit(location, "train", data, shuffle=True, seed=1)
    t0 = time.perf_counter()
    keys, redone = [], {"retries": 0, "refetched_bytes": 0}
    for batch in split.train_batches(1):
        keys += batch["key"]
        for k in redone:
            redone[k] += batch["transfers"][k]
    return keys, redone, time.perf_counter() - t0


def fault_rows(shards: Path) -> list[str]:
    policy = DataConfig(batch_size=50, retries=3, retry_delay_s=0.05, read_timeout_s=0.5)
    expected, _, _ = epoch(str(shards / "frey"), policy)
    rows = ["| fault (every train shard's first request) | same samples | retries | refetched "
            "bytes | Range requests | epoch reads (s) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for fault in FAULTS:
        faults = [] if fault == "ok" else [fault]
        with ShardServer(shards, faults=faults, stall_s=1.0, retry_after_s=0.2) as server:
            keys, redone, seconds = epoch(f"{server.url}/frey", policy)
        rows.append(
            f"| {fault} | {keys == expected} | {redone['retries']} | "
            f"{redone['refetched_bytes']:,} | {server.range_requests} | {seconds:.2f} |"
        )
    return rows


def memory_rows() -> list[str]:
    rows = ["| one 11.5 MB shard over HTTP (1 truncation) | peak traced memory (MB) | s |",
            "|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        make_shards(Path(tmp) / "big", [800], shape=(64, 64, 3))
        server = subprocess.Popen(
            [sys.executable, str(REPO / "tests/helpers/http_shards.py"), tmp, "--faults",
             "truncate"], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        url = server.stdout.readline().split()[1]
        try:
            for name, bound in (("in memory (default bound 512 MB)", 512 * 2**20),
                                ("spilled to a file (bound 1 MB)", 2**20)):  # fmt: skip
                policy = DataConfig(
                    batch_size=50, retries=3, retry_delay_s=0.01, read_timeout_s=2.0,
                    max_shard_mb_in_memory=bound / 2**20,
                )  # fmt: skip
                tracemalloc.start()
                _, _, seconds = epoch(f"{url}/big", policy)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                rows.append(f"| {name} | {peak / 1e6:.1f} | {seconds:.2f} |")
        finally:
            server.kill()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=Path, default=REPO / "shards")
    args = parser.parse_args()
    print("\n".join(fault_rows(args.shards)) + "\n\n" + "\n".join(memory_rows()))


if __name__ == "__main__":
    main()
