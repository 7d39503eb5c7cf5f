"""A local sweep end to end on the tiny model: every point trained in its own run_dir, the report
written, a second run of the same command skips the finished points, and the report over the same
sweep copied to S3 (a server on loopback) is the local one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from runs import TINY_RUN

from mtlora_dist.storage.fs import url_to_fs

REPO = Path(__file__).resolve().parents[2]
TINY = [*TINY_RUN, "max_steps=2", "eval.max_batches=1", "eval.visual_samples=0", "logging.wandb.enabled=false"]


def sweep(sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "sweep.py"), "--sweep-dir", str(sweep_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp_path = tmp_path_factory.mktemp("sweep")
    sweep_dir = tmp_path / "sweep"
    data = [f"data.synthetic.root={tmp_path / 'data'}", "data.synthetic.num_train=16", "data.synthetic.num_val=8"]
    grid = [*TINY, *data, "seed=0,1", "--grid", "data.tasks=[semseg],[sal]"]  # shared overrides: every grid
    first = sweep(sweep_dir, "--jobs", "2", *grid)
    assert first.returncode == 0, first.stdout + first.stderr
    return sweep_dir, first


def test_local_sweep_trains_each_point_reports_and_skips_done_points(swept):
    sweep_dir, first = swept
    names = ["seed-0", "seed-1"]
    for name in names:
        done = json.loads((sweep_dir / name / "sweep_point.json").read_text())
        assert done["status"] == "done" and f"seed={name[-1]}" in done["command"]
        assert (sweep_dir / name / "checkpoints" / "latest").exists()
    lines = first.stdout.splitlines()
    started = [i for i, x in enumerate(lines) if x.startswith("[")]
    finished = [i for i, x in enumerate(lines) if " done in " in x]
    assert len(started) == len(finished) == 4 and started[1] < finished[0]  # two points at a time
    assert "| default | 2 |" in first.stdout and "| single_task | 1 |" in first.stdout
    assert "this comparison's single-task runs" in first.stdout
    assert (sweep_dir / "report" / "comparison.csv").exists() and (sweep_dir / "report" / "pareto.png").exists()

    logs = {p: p.stat().st_mtime for p in (sweep_dir / "logs").iterdir()}
    again = sweep(sweep_dir, "--no-report")  # the saved sweep.yaml: same points, all done
    assert again.returncode == 0, again.stderr
    assert "4 point(s), 4 already done" in again.stdout
    assert {p: p.stat().st_mtime for p in (sweep_dir / "logs").iterdir()} == logs  # nothing ran again


def test_the_report_reads_a_sweep_on_s3_as_it_reads_it_on_disk(swept, s3_bucket, tmp_path):
    sweep_dir, _ = swept
    url = f"s3://{s3_bucket}/sweeps/demo"
    fs, root = url_to_fs(url)
    for file in sweep_dir.rglob("*"):  # what a report reads: sweep.yaml, each point's config and metrics
        rel = file.relative_to(sweep_dir)
        if file.is_file() and rel.parts[0] not in ("report", "logs") and "checkpoints" not in rel.parts:
            fs.put_file(str(file), f"{root}/{rel.as_posix()}")
    cmd = [sys.executable, str(REPO / "launch" / "compare.py"), url, "--out", str(tmp_path / "report")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    remote = (tmp_path / "report" / "comparison.csv").read_text()
    local = (sweep_dir / "report" / "comparison.csv").read_text()
    assert remote.count("\n") == local.count("\n") >= 3 and remote == local
