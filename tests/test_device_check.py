"""The prepared GPU check runs end to end here too (`--cpu --quick`), so it cannot rot before
a GPU is lent: every part runs, and what it writes says what it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_device_check_cpu_quick_runs_every_part(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--cpu", "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "device_check.json").read_text())
    assert result["skipped"] == []
    assert result["gpu_tests"]["returncode"] == 0 and "skipped" in result["gpu_tests"]["summary"]
    rows = result["throughput"]
    assert {r["config"] for r in rows} == {"cifar10_resnet", "cifar10_hvae", "celeba64_resnet"}
    assert all(r["img_per_s"] > 0 and r["gflop_per_image"] > 0 for r in rows)
    assert result["loader"]["img_per_s"] > 0
    run = result["real_run"]
    assert run["epochs"] == 2 and run["bpd_falls_every_epoch"], run
    section = (out / "RESULTS_section.md").read_text()
    assert section.startswith("## Device check: CPU") and "| cifar10_resnet | 8 | fp32 |" in section
