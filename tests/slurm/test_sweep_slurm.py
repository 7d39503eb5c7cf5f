"""A sweep on the real SLURM test cluster (tests/slurm/conftest.py): ``launch/sweep.py --slurm`` submits one
submitit job per point; one point is preempted the way a time limit or preemption does it for submitit
(USR2 to the job's steps), stops with a checkpoint, is requeued by submitit and finishes from where it
stopped; a second submission skips the finished points; the report covers every point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.integration]

STEPS = 16
TINY = [
    "model.img_size=[64,64]",
    "model.backbone_kwargs.window_size=2",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "logging.progress_bar=false",
    "logging.log_every=1",
    "logging.wandb.enabled=false",
    "eval.every=0",
    "eval.max_batches=1",
    "eval.visual_samples=0",
    f"max_steps={STEPS}",
    "checkpoint.every=4",
]
# the data_root fixture's shards (tests/slurm/conftest.py): the same settings, so no point generates them again
SYNTHETIC = ["data.synthetic.num_train=48", "data.synthetic.num_val=8", "data.synthetic.shard_size_mb=0.2"]
TIMEOUT = 900  # a bound for a loaded machine; on a quiet one the whole test takes about a minute


def sweep(cluster, sweep_dir: Path, data_root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(cluster.env)
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"})
    cmd = [
        sys.executable,
        str(REPO / "launch" / "sweep.py"),
        "--sweep-dir",
        str(sweep_dir),
        "--slurm",
        "--slurm-time",
        "10",
    ]
    cmd += [*TINY, *SYNTHETIC, f"data.synthetic.root={data_root}", "seed=0,1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == "train"]


def wait_until(condition, what: str, timeout: float = TIMEOUT, describe=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{describe()}")


def test_sweep_runs_one_job_per_point_requeues_a_preempted_one_and_reports(slurm_cluster, data_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = sweep(slurm_cluster, sweep_dir, data_root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = json.loads((sweep_dir / "jobs.json").read_text())
    assert sorted(jobs) == ["seed-0", "seed-1"] and len(set(jobs.values())) == 2
    preempted = sweep_dir / "seed-0"

    def describe() -> str:
        logs = "".join(p.read_text(errors="replace")[-3000:] for p in sweep_dir.rglob("*.log"))
        return f"{slurm_cluster.job(int(jobs['seed-0']))}\n{logs}\n{slurm_cluster.logs_tail(1000)}"

    wait_until(lambda: len(train_steps(preempted)) >= 3, "step 3 of seed-0", describe=describe)
    slurm_cluster.run(["scancel", "--signal=USR2", jobs["seed-0"]])  # what --signal=USR2@delay sends
    wait_until(
        lambda: all((sweep_dir / name / "sweep_point.json").exists() for name in jobs),
        "both points to finish",
        describe=describe,
    )
    info = slurm_cluster.job(int(jobs["seed-0"]))
    assert info.get("Restarts") == "1", describe()
    log = (sweep_dir / "logs" / "seed-0.log").read_text()
    assert "resumed from step" in log, describe()
    assert train_steps(preempted) == list(range(1, STEPS + 1)), describe()  # each step logged once
    assert train_steps(sweep_dir / "seed-1") == list(range(1, STEPS + 1))

    again = sweep(slurm_cluster, sweep_dir, data_root)  # the sweep resumes: nothing left to submit
    assert again.returncode == 0 and "0 job(s) submitted" in again.stdout, again.stdout + again.stderr

    report = subprocess.run(
        [sys.executable, str(REPO / "launch" / "compare.py"), str(sweep_dir)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "| default | 2 |" in report.stdout
    assert (sweep_dir / "report" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((sweep_dir / "report" / "comparison.json").read_text())["rows"]
    assert rows[0]["seeds"] == [0, 1] and rows[0]["runs"] == 2
