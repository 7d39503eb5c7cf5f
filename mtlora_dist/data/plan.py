"""Which samples each rank and DataLoader worker reads in an epoch, and in what order.

Pure index arithmetic over the manifest's per-shard counts -- no I/O -- so it is the same on every
rank and in every worker, and a resumed run can recompute exactly where it was.

An epoch is planned in four steps:

1. **Shard order**: a permutation of the shards from ``(seed, epoch)`` (identity without shuffling).
   Concatenating the shards in that order numbers the epoch's samples ``0..N-1`` ("positions").
2. **Rank slice**: rank ``r`` takes a contiguous run of positions, the same length on every rank.
   Training (``drop_last``): ``B * floor(N / (W * B))`` positions per rank, fewer than ``W * B``
   samples of the epoch are left out (different ones every epoch, as the shard order changes).
   Evaluation: ``ceil(N / W)`` slots per rank; ranks that get one sample fewer pad with a copy of their
   last sample marked ``valid=False``, so every sample is evaluated exactly once; the last batch may be
   smaller than ``B`` (the same size on every rank).
3. **Worker chunks**: the rank's batch ``j`` is produced by worker ``j % K`` (the order in which a
   ``DataLoader`` collects from its workers); each worker takes a contiguous chunk of the rank's slots,
   as many as its batches hold, so it reads few shards.
4. **Emission order**: within its chunk a worker emits samples through a shuffle buffer, simulated
   here on indices from ``(seed, epoch, rank, worker)``; memory stays bounded by the buffer size
   because the reader streams shards in order and holds only samples not yet emitted.

A resumed run that already consumed ``c`` batches of the epoch drops, per worker, the samples of its
first ``ceil((c - k) / K)`` batches from the emission order; those samples are skipped raw (never
decoded), and shards not needed any more are not opened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "batches_per_rank",
    "shard_order",
    "rank_slots",
    "worker_batches",
    "buffer_shuffle",
    "WorkerPlan",
    "make_worker_plan",
    "locate",
]


def batches_per_rank(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches every rank yields per epoch (identical on all ranks)."""
    if num_samples <= 0:
        raise ValueError("the manifest lists no samples")
    if drop_last:
        n = num_samples // (world_size * batch_size)
        if n == 0:
            raise ValueError(
                f"{num_samples} training samples cannot fill one batch of {batch_size} on each of {world_size} "
                "rank(s); lower the batch size or use more data"
            )
        return n
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order in which the epoch visits the shards."""
    if not shuffle:
        return np.arange(num_shards)
    return _rng(seed, epoch, 0x5A4D).permutation(num_shards)


def rank_slots(
    num_samples: int, world_size: int, rank: int, batch_size: int, drop_last: bool
) -> tuple[list[int], list[bool], list[int]]:
    """``(positions, valid, batch_sizes)`` of ``rank``: see step 2 of the module docstring."""
    nb = batches_per_rank(num_samples, world_size, batch_size, drop_last)
    if drop_last:
        per_rank = nb * batch_size
        positions = list(range(rank * per_rank, (rank + 1) * per_rank))
        return positions, [True] * per_rank, [batch_size] * nb
    per_rank = math.ceil(num_samples / world_size)
    base, rem = divmod(num_samples, world_size)
    start = rank * base + min(rank, rem)
    real = base + (1 if rank < rem else 0)
    positions = list(range(start, start + real))
    pad_source = positions[-1] if positions else 0  # a rank with no sample repeats sample 0
    positions += [pad_source] * (per_rank - real)
    valid = [True] * real + [False] * (per_rank - real)
    sizes = [batch_size] * (nb - 1) + [per_rank - batch_size * (nb - 1)]
    return positions, valid, sizes


def worker_batches(num_batches: int, num_workers: int, worker: int) -> list[int]:
    """Rank batch indices produced by ``worker`` (round robin, as the DataLoader collects them)."""
    return list(range(worker, num_batches, num_workers))


def buffer_shuffle(n: int, buffer_size: int, rng: np.random.Generator) -> list[int]:
    """Emission order of inputs ``0..n-1`` streamed through a shuffle buffer of ``buffer_size``.

    An input is emitted only after it was read, and at most ``buffer_size`` inputs wait at any time.
    """
    draws = rng.random(n)
    buf: list[int] = []
    out: list[int] = []
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer_size:
            j = int(draws[i] * len(buf))
            out.append(buf[j])
            buf[j] = buf[-1]
            buf.pop()
    out.extend(buf[k] for k in rng.permutation(len(buf)))
    return out


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker of one rank emits this epoch, after skipping what a resumed run consumed."""

    positions: list[int]  # epoch positions in emission order (repeats allowed: evaluation padding)
    valid: list[bool]  # False for padding copies
    batch_sizes: list[int]  # sizes of the batches still to yield
    batch_indices: list[int]  # their indices among the rank's batches
    skipped: int  # samples dropped because a resumed run had consumed them


def make_worker_plan(
    num_samples: int,
    *,
    world_size: int,
    rank: int,
    num_workers: int,
    worker: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    drop_last: bool,
    shuffle_buffer: int,
    batches_consumed: int = 0,
) -> WorkerPlan:
    """Plan of ``worker`` on ``rank`` for ``epoch``; see the module docstring."""
    positions, valid, sizes = rank_slots(num_samples, world_size, rank, batch_size, drop_last)
    mine = worker_batches(len(sizes), num_workers, worker)
    # Contiguous chunk: the slots of the batches of workers 0..worker-1 come first.
    start = sum(sizes[j] for w in range(worker) for j in worker_batches(len(sizes), num_workers, w))
    length = sum(sizes[j] for j in mine)
    chunk = list(range(start, start + length))
    if shuffle:
        order = buffer_shuffle(length, shuffle_buffer, _rng(seed, epoch, rank, worker, 0xB0F))
        chunk = [chunk[i] for i in order]
    done = len([j for j in mine if j < batches_consumed])
    skipped = sum(sizes[j] for j in mine[:done])
    return WorkerPlan(
        positions=[positions[i] for i in chunk[skipped:]],
        valid=[valid[i] for i in chunk[skipped:]],
        batch_sizes=[sizes[j] for j in mine[done:]],
        batch_indices=mine[done:],
        skipped=skipped,
    )


def locate(positions: Sequence[int], shard_counts: Sequence[int], order: np.ndarray) -> list[tuple[int, int]]:
    """``(shard, index in shard)`` of each epoch position, given the epoch's shard order."""
    counts = np.asarray(shard_counts, dtype=np.int64)[order]
    ends = np.cumsum(counts)
    pos = np.asarray(positions, dtype=np.int64)
    slot = np.searchsorted(ends, pos, side="right")
    starts = ends - counts
    return [(int(order[s]), int(p - starts[s])) for p, s in zip(pos, slot, strict=True)]
