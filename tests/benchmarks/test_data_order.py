"""benchmarks/data_order.py runs, and at the Cityscapes shape shows batches and a rank's 16-batch windows as
mixed as a uniform shuffle, with no period, and the reader's bounds where its schedule is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_order_benchmark_reports_uniform_mixing_and_the_read_bounds(tmp_path):
    out = tmp_path / "order.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "data_order.py"), "--json", str(out), "--cases",
           "cityscapes 8x4 B4", "--buffer-mb", "16"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads(out.read_text())
    assert row["name"] in proc.stdout and row["global_batch"] == 32
    assert row["unused_per_epoch"] == 2975 % 32
    for key in ("global_batch_ratio", "rank_batch_ratio"):
        assert row[key] >= 0.97, row
    assert row["rank_window_ratio"] >= 0.95, row  # the interleaved order before: 0.73-0.88
    assert row["same_slot_8_later"] < 2 * row["same_slot_8_later_uniform"], row  # before: 0.93
    assert row["worker_samples"] == 4 * len(range(3, 2975 // 32, 4))  # the last worker: batches 3, 7, ...
    if row["peak_held_mib"] != "pending":  # the delivery-order reader's schedule
        assert row["peak_held_mib"] <= 16 + 2.5, row  # the buffer, or one sample larger than it
        assert row["requests_per_sample"] <= 1.1 and row["bytes_vs_used"] == 1.0, row
