"""benchmarks/data_order.py runs, and on the issue's cases shows batches as mixed as a uniform shuffle and
an epoch reading each used sample's bytes once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_order_benchmark_reports_every_bound_and_a_uniform_mix(tmp_path):
    out = tmp_path / "order.json"
    cases = ["cityscapes 8x4 b8", "cityscapes 2x2 b8", "pascal 64x8 b32"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "data_order.py"), "--json", str(out), "--cases", *cases]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == cases
    for row in rows:
        assert row["ratio"] >= 0.9, row
        assert row["shards_per_worker"] >= 1 and row["opens_per_epoch"] >= row["shards"]
        assert 0 < row["held_samples_peak"] <= row["num_samples"]
        used = (row["num_samples"] - row["unused_per_epoch"]) / row["num_samples"]
        assert row["bytes_vs_dataset"] == round(used, 3)  # ranged reads: each used sample once, nothing else
        assert row["range_reads_per_epoch"] >= row["opens_per_epoch"] and row["samples_per_read"] >= 1
        assert row["bytes_vs_dataset_no_index"] > 1  # whole shards, shared by workers
    pascal = rows[-1]
    assert pascal["global_batch"] == 2048 and pascal["unused_per_epoch"] == 4998 - 2 * 2048
