"""A local sweep end to end on the tiny model: every point trained in its own run_dir, the report
written, and a second run of the same command skips the finished points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from runs import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
TINY = [*TINY_RUN, "max_steps=2", "eval.max_batches=1", "eval.visual_samples=0", "logging.wandb.enabled=false"]


def sweep(sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "sweep.py"), "--sweep-dir", str(sweep_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_local_sweep_trains_each_point_reports_and_skips_done_points(tmp_path):
    sweep_dir = tmp_path / "sweep"
    data = [f"data.synthetic.root={tmp_path / 'data'}", "data.synthetic.num_train=16", "data.synthetic.num_val=8"]
    grid = [*TINY, *data, "seed=0,1", "--grid", "data.tasks=[semseg],[sal]"]  # shared overrides: every grid
    first = sweep(sweep_dir, *grid)
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["seed-0", "seed-1"]
    for name in names:
        done = json.loads((sweep_dir / name / "sweep_point.json").read_text())
        assert done["status"] == "done" and f"seed={name[-1]}" in done["command"]
        assert (sweep_dir / name / "checkpoints" / "latest").exists()
    assert "| default | 2 |" in first.stdout and "| single_task | 1 |" in first.stdout
    assert "this comparison's single-task runs" in first.stdout
    assert (sweep_dir / "report" / "comparison.csv").exists() and (sweep_dir / "report" / "pareto.png").exists()

    logs = {p: p.stat().st_mtime for p in (sweep_dir / "logs").iterdir()}
    again = sweep(sweep_dir, "--no-report")  # the saved sweep.yaml: same points, all done
    assert again.returncode == 0, again.stderr
    assert "4 point(s), 4 already done" in again.stdout
    assert {p: p.stat().st_mtime for p in (sweep_dir / "logs").iterdir()} == logs  # nothing ran again
