"""Which samples each rank and DataLoader worker reads in an epoch, and in what order.

Pure index arithmetic over the manifest's per-shard counts -- no I/O -- so it is the same on every
rank and in every worker, and a resumed run can recompute exactly where it was.

**Shard order.** A permutation of the shards from ``(seed, epoch)`` (identity without shuffling).
Concatenating the shards in that order numbers the epoch's samples ``0..N-1`` ("positions").

**Training order** (``drop_last``): a function of ``(seed, epoch, num_samples, global batch G)`` only
-- never of the number of ranks, workers, or the micro-batch split -- so it is the same on any number
of GPUs and a run resumes mid-epoch on another world size (:func:`epoch_order`).

1. The epoch's *sequence* is a uniform random permutation of the positions ``0..N-1`` from
   ``(seed, epoch)`` (the identity without shuffling); global batch ``b`` is its ``b``-th run of ``G``.
   The epoch has ``nb = floor(N / G)`` global batches; the last ``N - nb * G`` positions of the sequence
   are not used (different samples each epoch). Every global batch, every rank's micro-batch and every
   window of a rank's consecutive batches is a uniform draw: nothing comes back periodically. Storage
   locality is not the order's job: the reader reads each sample by its byte range, in delivery order.
2. A run whose global batch changed mid-epoch (``switches``: each earlier global batch and the epoch
   step where it was left) reads the rest of the same sequence in runs of the new ``G``: every sample
   not yet read this epoch is read exactly once, except fewer than ``G`` at the end (as ``drop_last``
   leaves out every epoch). Steps before the last switch are marked ``-1`` (already trained).
3. Global batch ``b`` is cut into ``W * A`` micro-batches of ``m = G / (W * A)`` slots (world size
   ``W``, gradient accumulation ``A``); rank ``r`` takes micro-batches ``r*A .. r*A + A - 1`` as its
   batches ``b*A .. b*A + A - 1``, and its batch ``i`` is produced by DataLoader worker ``i % K``.

**Evaluation order** (no ``drop_last``): rank ``r`` takes a contiguous run of ``ceil(N / W)`` slots;
ranks that get one sample fewer pad with a copy of their last sample marked ``valid=False``, so every
sample is evaluated exactly once; the last batch may be smaller (the same size on every rank). Each
worker takes a contiguous chunk of the rank's slots (as many as its batches hold), optionally
emitted through a shuffle buffer.

A resumed run that already consumed ``c`` batches of the rank drops each worker's batches below ``c``;
those samples are skipped raw (never decoded), and shards not needed any more are not opened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtlora_dist.data.config import BatchGeometry

__all__ = [
    "global_batches",
    "epoch_order",
    "epoch_sequence",
    "epoch_steps",
    "rank_batch_positions",
    "batches_per_rank",
    "shard_order",
    "rank_slots",
    "worker_batches",
    "buffer_shuffle",
    "WorkerPlan",
    "Switches",
    "make_worker_plan",
    "locate",
]


Switches = tuple[tuple[int, int], ...]  # ((global batch, epoch step where it was left), ...)


def global_batches(num_samples: int, global_batch: int) -> int:
    """Global batches of a training epoch (``drop_last``): ``floor(num_samples / global_batch)``."""
    if num_samples <= 0:
        raise ValueError("the manifest lists no samples")
    n = num_samples // global_batch
    if n == 0:
        raise ValueError(
            f"{num_samples} training samples cannot fill one global batch of {global_batch} (micro-batch x "
            "gradient accumulation x ranks); lower the batch size or use more data"
        )
    return n


def batches_per_rank(num_samples: int, geometry: BatchGeometry, drop_last: bool, switches: Switches = ()) -> int:
    """Batches (micro-batches) every rank yields per epoch (identical on all ranks), counting those of steps
    trained before a global batch switch (``switches``, :func:`epoch_order`)."""
    if drop_last:
        return geometry.accumulation * epoch_steps(num_samples, geometry.global_batch, switches)
    if num_samples <= 0:
        raise ValueError("the manifest lists no samples")
    return math.ceil(math.ceil(num_samples / geometry.world_size) / geometry.micro_batch)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order in which the epoch visits the shards."""
    if not shuffle:
        return np.arange(num_shards)
    return _rng(seed, epoch, 0x5A4D).permutation(num_shards)


def epoch_sequence(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's positions in reading order: a uniform permutation (the identity without shuffling)."""
    if not shuffle:
        return np.arange(num_samples)
    return _rng(seed, epoch, 0x0DE3).permutation(num_samples)


def _switch_offset(switches: Switches) -> tuple[int, int]:
    """(epoch step, sequence offset) where the current global batch took over."""
    step = offset = 0
    for batch, until in switches:
        if until < step:
            raise ValueError(f"global batch switches must be in epoch order, got {switches}")
        offset += (until - step) * batch
        step = until
    return step, offset


def epoch_steps(num_samples: int, global_batch: int, switches: Switches = ()) -> int:
    """Global batches (optimizer steps) of an epoch, counting those trained before the last switch."""
    if not switches:
        return global_batches(num_samples, global_batch)
    step, offset = _switch_offset(switches)
    if offset > num_samples:
        raise ValueError(f"global batch switches {switches} read more than the epoch's {num_samples} samples")
    return step + (num_samples - offset) // global_batch


def epoch_order(
    num_samples: int, global_batch: int, seed: int, epoch: int, shuffle: bool, switches: Switches = ()
) -> np.ndarray:
    """``(steps, G)`` array: the epoch position of slot ``p`` of global batch ``b`` (see the module
    docstring); rows before the last of ``switches`` are ``-1`` (trained under an earlier global batch)."""
    steps = epoch_steps(num_samples, global_batch, switches)
    first, offset = _switch_offset(switches)
    sequence = epoch_sequence(num_samples, seed, epoch, shuffle)
    rest = sequence[offset : offset + (steps - first) * global_batch].reshape(steps - first, global_batch)
    return np.concatenate([np.full((first, global_batch), -1, dtype=rest.dtype), rest])


def rank_batch_positions(
    order: np.ndarray, world_size: int, rank: int, accumulation: int, batch_index: int
) -> np.ndarray:
    """Positions of ``rank``'s batch ``batch_index``: micro-batch ``rank * A + batch_index % A`` of global
    batch ``batch_index // A``."""
    global_batch = order.shape[1]
    micro = global_batch // (world_size * accumulation)
    b, a = divmod(batch_index, accumulation)
    start = (rank * accumulation + a) * micro
    return order[b, start : start + micro]


def rank_slots(
    num_samples: int, world_size: int, rank: int, batch_size: int
) -> tuple[list[int], list[bool], list[int]]:
    """Evaluation ``(positions, valid, batch_sizes)`` of ``rank``: see the module docstring."""
    nb = batches_per_rank(num_samples, BatchGeometry(batch_size, 1, world_size), drop_last=False)
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
    geometry: BatchGeometry,
    *,
    rank: int,
    num_workers: int,
    worker: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    drop_last: bool,
    shuffle_buffer: int = 128,
    batches_consumed: int = 0,
    switches: Switches = (),
) -> WorkerPlan:
    """Plan of ``worker`` on ``rank`` for ``epoch``; see the module docstring. ``shuffle_buffer`` applies
    to evaluation with shuffling only; ``switches`` (global batches this epoch was trained with before,
    :func:`epoch_order`) and the geometry's accumulation to training only."""
    if drop_last:
        return _train_plan(num_samples, geometry, rank, num_workers, worker, seed, epoch, shuffle, switches,
                           batches_consumed)  # fmt: skip
    return _eval_plan(
        num_samples, geometry.world_size, rank, num_workers, worker, geometry.micro_batch, seed, epoch, shuffle,
        shuffle_buffer, batches_consumed,
    )  # fmt: skip


def _train_plan(
    num_samples: int,
    geometry: BatchGeometry,
    rank: int,
    num_workers: int,
    worker: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    switches: Switches,
    batches_consumed: int,
) -> WorkerPlan:
    world_size, accumulation, batch_size = geometry.world_size, geometry.accumulation, geometry.micro_batch
    order = epoch_order(num_samples, geometry.global_batch, seed, epoch, shuffle, switches)
    if batches_consumed < accumulation * _switch_offset(switches)[0]:
        raise ValueError(f"position {batches_consumed} lies before the last global batch switch {switches}")
    mine = worker_batches(order.shape[0] * accumulation, num_workers, worker)
    todo = [j for j in mine if j >= batches_consumed]
    positions = [int(x) for j in todo for x in rank_batch_positions(order, world_size, rank, accumulation, j)]
    return WorkerPlan(
        positions=positions,
        valid=[True] * len(positions),
        batch_sizes=[batch_size] * len(todo),
        batch_indices=todo,
        skipped=batch_size * (len(mine) - len(todo)),
    )


def _eval_plan(
    num_samples: int,
    world_size: int,
    rank: int,
    num_workers: int,
    worker: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    shuffle_buffer: int,
    batches_consumed: int,
) -> WorkerPlan:
    positions, valid, sizes = rank_slots(num_samples, world_size, rank, batch_size)
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
