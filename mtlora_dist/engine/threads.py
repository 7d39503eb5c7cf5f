"""How many threads torch uses in each rank: by default the rank's share of the CPUs minus its
DataLoader workers, so ranks x (threads + workers) never exceeds the CPUs.

torch's default (one thread per core in every process) oversubscribes a machine as soon as it runs
DataLoader workers, several ranks, or anything else: the quickstart on a busy 2-core machine ran 5-6x
faster with one thread (13.6-14.6 img/s against 2.2-2.8, issue 26). ``OMP_NUM_THREADS``, when set (as
``slurm/launch.sh`` and torchrun do), is respected.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["choose_threads", "set_thread_count"]

log = logging.getLogger("mtlora_dist")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _local_ranks() -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def choose_threads(num_workers: int | None, cpus: int, local_ranks: int) -> int:
    """Threads per rank: its share of ``cpus`` less its DataLoader workers (``None``: sized from the CPUs,
    which leaves one CPU to the rank), at least 1."""
    per_rank = max(1, cpus // max(1, local_ranks))
    workers = max(1, per_rank - 1) if num_workers is None else max(0, num_workers)
    return max(1, per_rank - workers)


def set_thread_count(num_workers: int | None, *, announce: bool) -> int:
    """Set torch's intra-op threads for this rank (unless ``OMP_NUM_THREADS`` is set) and say so on one line."""
    cpus, local_ranks = _cpus(), _local_ranks()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads, why = torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    else:
        threads = choose_threads(num_workers, cpus, local_ranks)
        torch.set_num_threads(threads)
        why = f"{cpus} CPU(s), {local_ranks} rank(s) on this node, data.num_workers={num_workers}; OMP_NUM_THREADS overrides"
    if announce:
        log.info("torch threads per rank: %d (%s)", threads, why)
    return threads
