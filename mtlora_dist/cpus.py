"""How many CPUs a rank gets, and how it splits them between torch's threads and its DataLoader workers.

One decision (:func:`cpu_budget`) for both, so they never disagree: the rank's share of the CPUs it may
run on (its affinity mask, divided by the ranks on the node) goes first to the DataLoader workers
(``data.num_workers``; ``None``: the share less one, at most :data:`MAX_AUTO_WORKERS`), the rest, at least
one, to torch's intra-op threads. ``OMP_NUM_THREADS``, when set (as ``slurm/launch.sh`` and torchrun do),
fixes the threads.

OpenMP waits passively (:func:`set_openmp_defaults`, run when ``mtlora_dist`` is imported, before torch
loads its OpenMP runtime): with the default policy, threads spin at every barrier, and with one busy
process on one of the rank's cores the quickstart collapsed from 71 to 2.8 img/s (issue 33: a thread that
shares its core with the neighbour holds every parallel region, while the others spin and keep the
scheduler from moving it). Passive threads sleep, the scheduler moves the late one to the idle core, and
one busy neighbour costs at most 2x (``benchmarks/cpu_threads.py``, docs/performance-data.md). Torch-free:
configs and entry points use it before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "MAX_AUTO_WORKERS",
    "OPENMP_DEFAULTS",
    "CpuBudget",
    "available_cpus",
    "cpu_budget",
    "local_world_size",
    "set_openmp_defaults",
]

MAX_AUTO_WORKERS = 8
# set unless the environment says otherwise; libgomp reads them once, when torch loads it
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
LOCAL_RANK_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def set_openmp_defaults() -> None:
    """Put :data:`OPENMP_DEFAULTS` into the environment where unset (this process and its children)."""
    for name, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what SLURM and cgroup cpusets restrict) where
    the platform has one, else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Ranks sharing this machine's CPUs: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` (the deepspeed
    launcher), ``SLURM_NTASKS_PER_NODE`` (srun), else 1."""
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


@dataclass(frozen=True)
class CpuBudget:
    """This rank's CPUs and how they are used; ``describe()`` is the line the trainer logs."""

    cpus: int  # CPUs this process may run on
    local_ranks: int  # ranks sharing them
    workers: int  # DataLoader worker processes per loader
    threads: int  # torch intra-op threads
    auto_workers: bool  # the worker count was derived here (data.num_workers=null)
    threads_from_env: bool  # OMP_NUM_THREADS fixed the threads

    @property
    def per_rank(self) -> int:
        return max(1, self.cpus // self.local_ranks)

    def describe(self) -> str:
        workers = f"data.num_workers={self.workers}" + (" (automatic)" if self.auto_workers else "")
        threads = f"OMP_NUM_THREADS={self.threads}" if self.threads_from_env else f"{self.threads} torch thread(s)"
        wait = os.environ.get("OMP_WAIT_POLICY", "default")
        return (
            f"{threads} + {workers} per rank ({self.cpus} CPU(s), {self.local_ranks} rank(s) on this node; "
            f"OMP_WAIT_POLICY={wait}; OMP_NUM_THREADS overrides the threads)"
        )


def cpu_budget(
    num_workers: int | None,
    *,
    cpus: int | None = None,
    local_ranks: int | None = None,
    omp_threads: int | None = None,
) -> CpuBudget:
    """Workers and threads of one rank (see the module docstring). ``cpus``, ``local_ranks`` and
    ``omp_threads`` default to :func:`available_cpus`, :func:`local_world_size` and ``OMP_NUM_THREADS``."""
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"data.num_workers is {num_workers}; pass 0 (no workers), a positive count, or null")
    cpus = available_cpus() if cpus is None else max(1, int(cpus))
    local_ranks = local_world_size() if local_ranks is None else max(1, int(local_ranks))
    if omp_threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        omp_threads = int(env) if env.isdigit() and int(env) > 0 else None
    per_rank = max(1, cpus // local_ranks)
    workers = min(MAX_AUTO_WORKERS, max(1, per_rank - 1)) if num_workers is None else int(num_workers)
    threads = omp_threads if omp_threads is not None else max(1, per_rank - workers)
    return CpuBudget(cpus, local_ranks, workers, threads, num_workers is None, omp_threads is not None)
