"""How many threads torch uses in each rank, from the rank's CPU budget (:func:`mtlora_dist.cpus.cpu_budget`),
which sizes torch's threads and the DataLoader workers together: ranks x (threads + workers) never
exceeds the CPUs.

torch's default (one thread per core in every process) oversubscribes a machine as soon as it runs
DataLoader workers, several ranks, or anything else: the quickstart on a busy 2-core machine ran 5-6x
faster with one thread (13.6-14.6 img/s against 2.2-2.8, issue 26). ``OMP_NUM_THREADS``, when set (as
``slurm/launch.sh`` and torchrun do), is respected. OpenMP's wait policy is passive
(``mtlora_dist.cpus.set_openmp_defaults``), so a busy neighbouring core costs at most 2x (issue 33).
"""

from __future__ import annotations

import logging

import torch

from mtlora_dist.cpus import CpuBudget, cpu_budget

__all__ = ["set_thread_count"]

log = logging.getLogger("mtlora_dist")


def set_thread_count(num_workers: int | None, *, announce: bool) -> CpuBudget:
    """Decide this rank's CPU budget for ``data.num_workers``, set torch's intra-op threads to it (unless
    ``OMP_NUM_THREADS`` is set) and say so on one line. The budget's ``workers`` is what the loaders use."""
    budget = cpu_budget(num_workers)
    if not budget.threads_from_env:
        torch.set_num_threads(budget.threads)
    if announce:
        log.info("CPU budget: %s", budget.describe())
    return budget
