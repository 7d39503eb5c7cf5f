"""The real ``slurm/train_swinb.sh`` on a real two-node SLURM cluster (tests/slurm/conftest.py).

The script is submitted unchanged; only sbatch flags and MTLORA_* variables make it a CPU job with the
tiny model: 2 "nodes" x 1 task, gloo, a few dozen steps. What is checked:

- a job trains, checkpoints and finishes (one srun task per node);
- the same job preempted by USR1 on the batch shell (what ``--signal=B:USR1@grace`` sends) checkpoints,
  exits 3, requeues itself, resumes and finishes with every step logged once and the same losses as
  the uninterrupted run, in the same wandb run; the DeepSpeed-launcher mode the same way;
- a job that fails for a real error, is preempted once more than MTLORA_MAX_RESTARTS allows, or is
  cancelled (scancel: the trainer still checkpoints) is not requeued.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train_swinb.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.integration]

STEPS = 24  # long enough to signal a job mid-training (~0.3 s a step on 2 cores), short enough to be cheap
TINY = (
    "model.img_size=[64,64] model.backbone_kwargs.window_size=2 data.batch_size=4 data.eval_batch_size=4 "
    "data.num_workers=1 logging.progress_bar=false logging.log_every=1 eval.every=0 eval.max_batches=1 "
    f"max_steps={STEPS} checkpoint.every=8 optim.warmup_fraction=0.2"
)
# a CPU allocation instead of the script's GPU defaults: 2 nodes x 1 task, no GPUs
SBATCH_CPU = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
JOB_TIMEOUT = 240


# ------------------------------------------------------------------------------------------ fixtures
class Job:
    """One submission of the recipe script, with its run directory and output file."""

    def __init__(
        self,
        cluster,
        workdir: Path,
        data_root: Path,
        name: str,
        *,
        launcher: str = "srun",
        extra_env: dict[str, str] | None = None,
        overrides: str = "",
    ) -> None:
        self.cluster = cluster
        self.run_dir = workdir / name
        self.final: dict[str, str] = {}  # scontrol's view once it has ended
        self.output = workdir / f"{name}.out"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SLURM_")
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(cluster.env)
        env.update(
            {
                "WANDB_MODE": "offline",
                "DS_ACCELERATOR": "cpu",
                "PYTHONUNBUFFERED": "1",
                "MTLORA_PYTHON": sys.executable,
                "MTLORA_CONFIG": "configs/quickstart.yaml",  # relative: the script finds it in the checkout
                "MTLORA_RUN_DIR": str(self.run_dir),
                "MTLORA_LAUNCHER": launcher,
                "MTLORA_OVERRIDES": f"{TINY} data.synthetic.root={data_root} {overrides}".strip(),
            }
        )
        env.update(extra_env or {})
        self.id = cluster.sbatch(
            [*SBATCH_CPU, f"--job-name=t-{name}", f"--output={self.output}", str(SCRIPT)], env=env, cwd=workdir
        )

    def info(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else "(no output file)"

    def describe(self) -> str:
        return f"job {self.id}: {self.info()}\n--- job output ---\n{self.text()[-6000:]}"

    def wait(
        self,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
        timeout: float = JOB_TIMEOUT,
        restarts: int | None = None,
    ) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (after ``restarts`` requeues, when given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in states:
                if restarts is None or int(info.get("Restarts", 0)) >= restarts:
                    return info
                # the script requeues before it ends, so an ended job with fewer restarts stays ended
                raise AssertionError(f"the job ended without being requeued {restarts} time(s)\n{self.describe()}")
            time.sleep(1)
        self.cluster.run(["scancel", str(self.id)], check=False)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {states}\n{self.describe()}\n{self.cluster.logs_tail(1500)}"
        )

    def wait_for_step(self, step: int, timeout: float = JOB_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if max(train_steps(self.run_dir), default=0) >= step:
                return
            if self.info().get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
                raise AssertionError(f"the job ended before step {step}\n{self.describe()}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for step {step}\n{self.describe()}")

    def preempt(self) -> None:
        """What ``--signal=B:USR1@grace`` does near the time limit: USR1 to the batch shell only."""
        self.cluster.run(["scancel", "--signal=USR1", "--batch", str(self.id)])


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("split") == "train"]


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in train_records(run_dir)]


def wandb_run_ids(run_dir: Path) -> set[str]:
    """Offline wandb runs are folders ``offline-run-<time>-<run id>``, one per job start."""
    return {p.name.rsplit("-", 1)[1] for p in run_dir.rglob("offline-run-*") if p.is_dir()}


def assert_finished(job: Job, info: dict[str, str], restarts: int) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert int(info["Restarts"]) == restarts, job.describe()
    assert train_steps(job.run_dir) == list(range(1, STEPS + 1)), (
        f"every step 1..{STEPS} must be logged exactly once, got {train_steps(job.run_dir)}\n{job.describe()}"
    )
    final = job.run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE.json"
    assert final.exists(), f"no complete final checkpoint: {sorted(job.run_dir.rglob('*'))}"
    assert (job.run_dir / "checkpoints" / "latest").read_text().strip().endswith(f"step_{STEPS:08d}")


def assert_resumed_exactly(job: Job, reference: Job) -> None:
    """The preempted-and-requeued run logs the same loss at every step as the uninterrupted one."""
    out = job.text()
    assert "restart count 1" in out, f"SLURM_RESTART_COUNT=1 not logged\n{job.describe()}"
    resumed = re.search(r"resumed from step (\d+)", out)
    assert resumed and 0 < int(resumed.group(1)) < STEPS, f"the requeued job did not resume\n{job.describe()}"
    ours = {r["step"]: r["loss"] for r in train_records(job.run_dir)}
    theirs = {r["step"]: r["loss"] for r in train_records(reference.run_dir)}
    for step in range(1, STEPS + 1):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4, abs=1e-6), (
            f"step {step}: loss {ours[step]} after preemption/resume vs {theirs[step]} uninterrupted "
            f"(resumed from step {resumed.group(1)})"
        )
    ids = wandb_run_ids(job.run_dir)
    assert len(ids) == 1, f"the requeued job must continue the wandb run, found runs {ids}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-jobs")


@pytest.fixture(scope="module")
def reference(slurm_cluster, workdir, data_root) -> Job:
    """An uninterrupted srun-mode job: the baseline the preempted runs are compared with."""
    job = Job(slurm_cluster, workdir, data_root, "straight")
    job.final = job.wait()
    return job


# ------------------------------------------------------------------------------------------ tests
def test_two_node_job_trains_checkpoints_and_finishes(reference):
    assert_finished(reference, reference.final, restarts=0)
    out = reference.text()
    assert "on 2 node(s) [n1 n2 ]" in out and "| 2 rank(s) |" in out, reference.describe()
    assert "training finished (status 0)" in out
    # periodic checkpoints too (quickstart keeps the last 2)
    assert (reference.run_dir / "checkpoints" / "step_00000016" / "COMPLETE.json").exists()


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_preempted_job_requeues_resumes_and_finishes(slurm_cluster, workdir, data_root, reference, launcher):
    job = Job(slurm_cluster, workdir, data_root, f"preempted-{launcher}", launcher=launcher)
    job.wait_for_step(3)
    job.preempt()
    # the batch script requeues the job itself; the test cluster holds a requeued job ~5 s (cred_expire)
    info = job.wait(restarts=1)
    out = job.text()
    assert "received USR1" in out and "requeuing job" in out, job.describe()
    assert_finished(job, info, restarts=1)
    assert_resumed_exactly(job, reference)
    if launcher == "deepspeed":  # one DeepSpeed launcher on each of the two nodes, no ssh
        assert "nnodes=2, num_local_procs=1, node_rank=1" in out, job.describe()


def test_failed_job_is_not_requeued(slurm_cluster, workdir, data_root):
    job = Job(slurm_cluster, workdir, data_root, "bad-config", overrides="optim.no_such_key=1")
    info = job.wait()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", job.describe()
    time.sleep(2)  # a requeue would show by now
    info = job.info()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", job.describe()
    out = job.text()
    assert "no_such_key" in out and "not requeuing" in out, job.describe()


def test_preemption_beyond_max_restarts_is_not_requeued(slurm_cluster, workdir, data_root):
    job = Job(slurm_cluster, workdir, data_root, "no-restarts", extra_env={"MTLORA_MAX_RESTARTS": "0"})
    job.wait_for_step(2)
    job.preempt()
    info = job.wait()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "0", job.describe()
    assert "MTLORA_MAX_RESTARTS=0" in job.text(), job.describe()
    steps = train_steps(job.run_dir)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < STEPS
    assert (job.run_dir / "checkpoints" / f"step_{steps[-1]:08d}" / "COMPLETE.json").exists(), job.describe()


def test_cancelled_job_is_not_requeued(slurm_cluster, workdir, data_root):
    """``scancel`` sends TERM: the trainer still checkpoints and exits 3, but a person asked the job to
    end, so the script must not requeue it. (wandb off: its service process dies of the TERM.)"""
    job = Job(slurm_cluster, workdir, data_root, "cancelled", overrides="logging.wandb.enabled=false")
    job.wait_for_step(2)
    slurm_cluster.run(["scancel", str(job.id)])
    info = job.wait()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", job.describe()
    out = job.text()
    assert "received TERM" in out and "Slurm is ending the job (state COMPLETING" in out, job.describe()
    steps = train_steps(job.run_dir)
    assert (job.run_dir / "checkpoints" / f"step_{steps[-1]:08d}" / "COMPLETE.json").exists(), job.describe()
