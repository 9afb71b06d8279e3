"""The benchmark entry point's table builder and RESULTS.md section writer, on made-up
numbers (nothing is timed here)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package beside vae_scale/
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.report import DataRow, DdpRow, FlopsRow, TrainRow  # noqa: E402


def rows_of(table: str) -> list[list[str]]:
    """Markdown table -> cell rows (header and separator dropped)."""
    lines = table.strip().splitlines()
    assert lines[1].startswith("|---")
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_data_table_ratios_per_worker_and_headline():
    rows = [
        DataRow("mnist", "torchvision MNIST", 0, 3000.0, 1500.0, 3000.0, 1000.0),
        DataRow("mnist", "torchvision MNIST", 2, 4000.0, 5000.0, 2000.0, 2000.0),
        DataRow("celeba", "ImageFolder", 2, 900.0, 300.0, 600.0, 200.0),
        DataRow("mnist", "torchvision MNIST", 0, 9000.0, 1500.0, 9000.0, 1000.0, cached=True),
    ]
    cells = rows_of(report.data_table(rows))
    assert len(cells) == 4
    assert cells[3][2:4] == ["0, ours from RAM cache", "9,000"]
    assert cells[0][:3] == ["mnist", "torchvision MNIST", "0"]
    assert cells[0][3:] == ["3,000", "3,000", "1,500", "1,500", "**2.00x**", "3.00x"]
    # per worker: all-worker rate / worker count
    assert cells[1][3:7] == ["4,000", "2,000", "5,000", "2,500"]
    assert cells[1][7] == "**0.80x**" and cells[1][8] == "1.00x"
    # the headline is the streaming ratio at the largest worker count of each dataset
    assert report.data_headline(rows) == {"mnist": 0.8, "celeba": 3.0}


def test_train_and_overhead_tables_pair_pipeline_with_synthetic():
    rows = [
        TrainRow("cifar", 32, "fp32", False, False, "synthetic", 100.0, img_per_cpu_s=60.0),
        TrainRow("cifar", 32, "bf16", True, False, "synthetic", 250.0),
        TrainRow("cifar", 32, "bf16", True, False, "pipeline", 240.0),
        TrainRow("cifar", 32, "bf16", True, True, "synthetic", None, "not run on CPU"),
        TrainRow("mlp", 100, "fp32", None, False, "synthetic", 10000.0),
        TrainRow("mlp", 100, "fp32", None, False, "pipeline", 8000.0),
    ]
    cells = rows_of(report.train_table(rows))
    assert [c[7] for c in cells] == ["reference", "2.50x", "2.40x", "n/a", "reference", "0.80x"]
    assert cells[0][8] == "60.0" and cells[1][8] == "n/a"
    assert cells[3][6] == "n/a" and cells[3][9] == "not run on CPU"
    assert cells[4][3] == "n/a"  # no channels_last for an MLP

    pairs = report.overhead_rows(rows)
    assert [(c, s, p) for c, _, s, p, _ in pairs] == [
        ("cifar", 250.0, 240.0),
        ("mlp", 10000.0, 8000.0),
    ]
    assert [label for _, label, *_ in pairs] == [
        "bf16, channels_last on, compile off",
        "fp32, compile off",
    ]
    assert [round(pct, 6) for *_, pct in pairs] == [4.0, 20.0]
    over = rows_of(report.overhead_table(rows))
    assert over == [
        ["cifar", "bf16, channels_last on, compile off", "250", "240", "4.0%", "yes"],
        ["mlp", "fp32, compile off", "10,000", "8,000", "20.0%", "**no**"],
    ]


def test_flops_mfu_only_with_a_peak_and_ddp_scaling():
    flops = rows_of(
        report.flops_table(
            [
                FlopsRow("cpu model", 2_000_000, 3e9, 100.0, None),
                FlopsRow("gpu model", 2_000_000, 3e9, 50_000.0, 600e12),
                FlopsRow("unmeasured", 1_000_000, 1e9, None, None),
            ]
        )
    )
    assert flops[0][1:4] == ["2.00 M", "3.000", "100"]
    assert flops[0][4] == "0.300" and flops[0][6] == "n/a (CPU)" and flops[0][7] == "500.0"
    assert flops[1][4] == "150.000" and flops[1][6] == "25.0%" and flops[1][7] == "1.0"
    assert flops[2][3:] == ["n/a", "n/a", "n/a", "n/a (CPU)", "n/a"]

    ddp = rows_of(
        report.ddp_table(
            [DdpRow("1 process", 1, 2, 32, 200.0, 100.0), DdpRow("2 processes", 2, 1, 32, 150.0)]
        )
    )
    assert ddp == [
        ["1 process", "1 x 2", "32", "200", "1.00x", "100", "1.00x"],
        ["2 processes", "2 x 1", "32", "150", "0.75x", "n/a", "n/a"],
    ]


def test_upsert_section_replaces_only_its_parts_and_keeps_other_text():
    text = "# Results\n\n## CelebA section by someone else\n\nkeep me\n"
    first = report.upsert_section(text, "cpu", "## CPU run 1", {"data": "D1", "train": "T1"})
    assert first.startswith(text.rstrip("\n"))
    assert "keep me" in first and "## CPU run 1" in first
    assert report.parts_in(first, "cpu") == {"data": "D1", "train": "T1"}

    # a later --only train run: train replaced, data kept, header updated, no duplicate
    second = report.upsert_section(
        first + "\ntrailing text\n", "cpu", "## CPU run 2", {"train": "T2"}
    )
    assert report.parts_in(second, "cpu") == {"data": "D1", "train": "T2"}
    assert "## CPU run 1" not in second and second.count("<!-- bench:cpu:begin -->") == 1
    assert second.rstrip().endswith("trailing text")

    # another device gets its own section beside it
    third = report.upsert_section(second, "cuda", "## GPU", {"flops": "F"})
    assert report.parts_in(third, "cpu") == {"data": "D1", "train": "T2"}
    assert report.parts_in(third, "cuda") == {"flops": "F"}
    assert third.index("<!-- bench:cpu:end -->") < third.index("<!-- bench:cuda:begin -->")


def test_part_blocks_hold_their_tables():
    budget = report.Budget({"frey": 1765}, 2, (0, 1, 2), 16, 1, 3, 0.3, 2, 2)
    stamp = report.Stamp("2026-01-01 00:00 UTC", "1.0", "2.0", "python -m benchmarks.run")
    results = {
        "data": [DataRow("frey", "TensorDataset", 0, 2000.0, 1000.0, 2000.0, 1000.0)],
        "train": [
            TrainRow("frey conv", 32, "fp32", False, False, "synthetic", 500.0),
            TrainRow("frey conv", 32, "fp32", False, False, "pipeline", 490.0),
        ],
        "flops": [FlopsRow("frey conv", 10, 1e6, 500.0, None)],
        "ddp": [DdpRow("1 process", 1, 2, 32, 200.0)],
    }
    blocks = {
        part: report.part_markdown(part, rows, budget, stamp) for part, rows in results.items()
    }
    for block in blocks.values():
        assert block.startswith("### ") and "`python -m benchmarks.run`" in block
        assert "| frey conv |" in block or "| frey |" in block or "| 1 process |" in block
    assert "first frey: 1765 samples" in blocks["data"]
    assert "Headline (ours/baseline, wall, most workers): frey 2.00x" in blocks["data"]
    assert (
        "| frey conv | fp32, channels_last off, compile off | 500 | 490 | 2.0% | yes |"
        in (blocks["train"])
    )
