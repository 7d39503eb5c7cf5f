"""Run a sweep's points: here, one after another (or ``local_jobs`` at once), or on SLURM as one job per
point (submitit).

Every point is a plain ``launch/train.py`` run in its own run_dir, so everything a single run does holds
for each point: it resumes from its newest checkpoint, it stops on a signal with a checkpoint (exit 3),
its config is checked before it starts. The sweep adds two files:

- ``<sweep_dir>/sweep.yaml``: the spec (recipe, shared overrides, grids), so ``launch/sweep.py
  --sweep-dir DIR`` continues a sweep and ``launch/compare.py DIR`` reports on it;
- ``<run_dir>/sweep_point.json``, written once the point's training has finished (exit 0): a rerun of the
  sweep skips those points. Nothing else is sweep state.

On SLURM each point is a submitit job whose callable is checkpointable: on submitit's preemption/time-limit
signal (USR2) it asks the training (which ignores USR2) to stop with SIGUSR1, waits for its checkpoint and
exit 3, and lets submitit requeue the job, which resumes the point.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mtlora_dist.study.grid import Point, SweepSpec, spec_yaml

__all__ = ["PointJob", "SweepRun", "DONE_FILE", "SPEC_FILE", "EXIT_PREEMPTED"]

log = logging.getLogger("mtlora_dist")

DONE_FILE = "sweep_point.json"
SPEC_FILE = "sweep.yaml"
EXIT_PREEMPTED = 3  # launch/train.py: stopped by a signal after a checkpoint
TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch", "train.py")


def _ignore_usr2() -> None:  # runs in the child before exec: submitit's signal is for the job, not the training
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass
class PointJob:
    """One point's training as a (picklable, checkpointable) callable: the command, its run_dir and log."""

    command: list[str]
    run_dir: str
    log_path: str
    stop_grace_s: float = 600.0  # how long a stop may take to write its checkpoint
    threads: int | None = None  # OMP_NUM_THREADS for the training (points sharing a machine), else its own budget

    def __call__(self) -> int:
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads)) if self.threads else None
        with open(self.log_path, "ab") as out:
            child = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_ignore_usr2
            )
            self._pid = child.pid
            status = child.wait()
        if status == 0:
            mark_done(self.run_dir, self.command)
        elif status != EXIT_PREEMPTED:
            raise RuntimeError(f"point {self.run_dir} failed with exit status {status}; see {self.log_path}")
        return status

    def checkpoint(self):
        """submitit's preemption hook: stop the training with a checkpoint, then requeue this same job."""
        import submitit

        pid = getattr(self, "_pid", None)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGUSR1)
                deadline = time.monotonic() + self.stop_grace_s
                while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
                    time.sleep(0.5)
            except (ProcessLookupError, ChildProcessError):
                pass  # already gone
        if is_done(self.run_dir):
            return None  # it finished meanwhile: nothing to requeue
        return submitit.helpers.DelayedSubmission(
            PointJob(self.command, self.run_dir, self.log_path, self.stop_grace_s, self.threads)
        )


def is_done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, DONE_FILE))


def mark_done(run_dir: str, command: Sequence[str]) -> None:
    from mtlora_dist.storage.atomic import atomic_write_text

    record = {"status": "done", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": list(command[1:])}
    atomic_write_text(os.path.join(run_dir, DONE_FILE), json.dumps(record, indent=1) + "\n")


@dataclass
class SweepRun:
    """A sweep's points in ``sweep_dir`` (local or a shared filesystem: SLURM jobs write there)."""

    spec: SweepSpec
    sweep_dir: str
    points: list[Point]
    ranks: int = 1  # training processes per point (torchrun on one node when > 1)

    def run_dir(self, point: Point) -> str:
        return os.path.join(self.sweep_dir, point.name)

    def command(self, point: Point) -> list[str]:
        config = self.spec.config_path()
        launcher = [sys.executable]
        if self.ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.ranks}"]
        args = launcher + [TRAIN] + (["--config", config] if config else [])
        return args + list(point.overrides) + [f"run_dir={self.run_dir(point)}"]

    def job(self, point: Point, threads: int | None = None) -> PointJob:
        return PointJob(
            self.command(point),
            self.run_dir(point),
            os.path.join(self.sweep_dir, "logs", f"{point.name}.log"),
            threads=threads,
        )

    def local_threads(self) -> int | None:
        """Threads per training process when ``spec.local_jobs`` points share this machine: its CPUs split
        evenly (at least one each); None for one point at a time (the training sizes its own budget) or
        when ``OMP_NUM_THREADS`` is set already (it wins, as for a single run)."""
        from mtlora_dist.cpus import available_cpus

        if self.spec.local_jobs <= 1 or os.environ.get("OMP_NUM_THREADS"):
            return None
        return max(1, available_cpus() // (self.spec.local_jobs * self.ranks))

    def save_spec(self) -> None:
        from mtlora_dist.storage.atomic import atomic_write_text

        atomic_write_text(os.path.join(self.sweep_dir, SPEC_FILE), spec_yaml(self.spec))

    def prepare_data(self) -> None:
        """Generated data that several points share is made once, here, before any point starts: points
        running at once (SLURM) would otherwise each generate it into the same folder."""
        import torch

        from mtlora_dist.config import load_config
        from mtlora_dist.engine.data_setup import prepare_data
        from mtlora_dist.engine.distributed import DistInfo

        seen = set()
        for point in self.pending():
            data = load_config(self.spec.config_path(), list(point.overrides)).data
            key = (data.dataset, data.synthetic)
            if data.train_url or not data.synthetic.enabled or repr(key) in seen:
                continue
            seen.add(repr(key))
            prepare_data(data, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))

    def pending(self) -> list[Point]:
        return [p for p in self.points if not is_done(self.run_dir(p))]

    def run_local(self, say: Callable[[str], None] = print) -> int:
        """Every pending point, ``spec.local_jobs`` at a time (one after another by default). Returns 0, or 3
        when a signal stopped a point (its checkpoint is written; rerun the same command; no new point
        starts), or 1 when some point failed (the others ran)."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        self.save_spec()
        self.prepare_data()
        todo = self.pending()
        jobs = max(1, min(self.spec.local_jobs, len(todo)))
        threads = self.local_threads()
        at_once = f"; {jobs} at a time, {threads or 'own'} thread(s) each" if jobs > 1 else ""
        say(
            f"sweep {self.sweep_dir}: {len(self.points)} point(s), {len(self.points) - len(todo)} already done{at_once}"
        )
        failed, stopped = [], False
        queue = list(enumerate(todo, 1))
        running: dict = {}
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while queue or running:
                while queue and len(running) < jobs and not stopped:
                    i, point = queue.pop(0)
                    job = self.job(point, threads)
                    say(f"[{i}/{len(todo)}] {point.name} (log: {job.log_path})")
                    running[pool.submit(job)] = (point, time.monotonic())
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    point, start = running.pop(future)
                    try:
                        status = future.result()
                    except RuntimeError as err:
                        failed.append(point.name)
                        say(f"  {point.name} failed: {err}")
                        continue
                    if status == EXIT_PREEMPTED:
                        stopped = True
                        say(f"  {point.name} stopped by a signal with a checkpoint; rerun the same command to continue")
                    else:
                        say(f"  {point.name} done in {time.monotonic() - start:.0f} s")
        if stopped:
            return EXIT_PREEMPTED
        if failed:
            say(f"{len(failed)} point(s) failed: {', '.join(failed)}; rerun the same command to retry them")
            return 1
        return 0

    def submit_slurm(self, executor_params: dict, say: Callable[[str], None] = print) -> list:
        """One submitit job per pending point that has no live job; returns the jobs submitted."""
        import submitit

        self.save_spec()
        self.prepare_data()
        params = dict(executor_params)
        executor = submitit.AutoExecutor(
            folder=os.path.join(self.sweep_dir, ".submitit", "%j"),
            cluster="slurm",
            slurm_max_num_timeout=params.pop("slurm_max_num_timeout", 20),  # requeues per point
        )
        executor.update_parameters(**params)
        live = _live_jobs(self.sweep_dir)
        jobs = []
        for point in self.pending():
            if point.name in live:
                say(f"{point.name}: job {live[point.name]} still queued or running, not submitted again")
                continue
            executor.update_parameters(name=f"sweep-{point.name}"[:120])
            job = executor.submit(self.job(point))
            jobs.append((point.name, job))
            say(f"{point.name}: submitted job {job.job_id}")
        _record_jobs(self.sweep_dir, {name: job.job_id for name, job in jobs})
        return [job for _, job in jobs]


def _jobs_file(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, "jobs.json")


def _record_jobs(sweep_dir: str, new: dict[str, str]) -> None:
    from mtlora_dist.storage.atomic import atomic_write_text

    jobs = _read_jobs(sweep_dir)
    jobs.update(new)
    atomic_write_text(_jobs_file(sweep_dir), json.dumps(jobs, indent=1) + "\n")


def _read_jobs(sweep_dir: str) -> dict[str, str]:
    try:
        with open(_jobs_file(sweep_dir)) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return {}


def _live_jobs(sweep_dir: str) -> dict[str, str]:
    """Points whose recorded job is still known to the scheduler (pending, running, requeued)."""
    jobs = _read_jobs(sweep_dir)
    if not jobs:
        return {}
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs.values())], capture_output=True, text=True)
    alive = set(out.stdout.split())
    return {name: job_id for name, job_id in jobs.items() if job_id in alive}
