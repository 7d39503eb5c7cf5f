"""The training order at scale, simulated with the plan's own functions (no I/O, no decoding).

    python benchmarks/data_order.py [--json out.json] [--block 32] [--cases NAME ...]

For each case (a dataset stored sorted by scene, as conversion stores Cityscapes city by city and
Taskonomy building by building; a number of ranks, workers per rank and micro-batch) it plans one
epoch exactly as the loader does (``plan.epoch_order`` + ``plan.rank_batch_positions`` +
``plan.worker_batches`` + ``plan.locate``) and reports:

* ``groups/batch``: mean number of storage groups (cities, buildings) in one rank's micro-batch, and
  the same for a uniform shuffle (exact expectation, sampling without replacement), and their ratio;
* ``shards/worker``: shards one worker reads in the epoch (max over workers), each opened once;
* ``opens/epoch``: shard opens of all workers together;
* ``bytes x``: bytes read per epoch relative to the dataset (equal-sized samples). With the manifest's
  per-sample index (every conversion writes it) a worker reads only its samples' byte ranges, one
  ranged read per run of consecutive samples: ``range reads`` counts those runs (all workers) and
  ``samples/read`` is their mean length. ``bytes x, no index``: a manifest without the index (or a
  remote cache being filled) makes every opened shard be read whole, which is opens / shards;
* ``open (peak)``: most shards whose samples one worker holds at once; ``held (peak)``: most raw
  samples one worker holds (those read and not yet emitted, plus the next shard being read);
* ``plan ms``: time to plan one worker's epoch (``make_worker_plan`` + ``locate``), median of 3.

The reader is modelled as the streaming code runs it: each needed shard opened once, in the order the
plan first needs it, its needed samples read (ranged) and handed on.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.data.stream.plan import (
    epoch_order,
    locate,
    make_worker_plan,
    rank_batch_positions,
    shard_order,
    worker_batches,
)


@dataclass(frozen=True)
class Case:
    name: str
    num_samples: int
    groups: int  # storage groups (cities, buildings), stored one after the other
    shard_samples: int
    ranks: int
    workers: int
    micro: int
    accumulation: int = 1


CASES = [
    Case("cityscapes 8x4 b8", 2975, 18, 100, 8, 4, 8),
    Case("cityscapes 2x2 b8", 2975, 18, 100, 2, 2, 8),
    Case("taskonomy 64x8 b16", 400_000, 500, 1000, 64, 8, 16),
    Case("pascal 64x8 b32", 4998, 10, 100, 64, 8, 32),  # global batch 2048: 18% of an epoch unused
    Case("taskonomy 64x8 b16, 100/shard", 400_000, 500, 100, 64, 8, 16),  # smaller shards: fewer bytes
]


def group_of_position(case: Case, order: np.ndarray) -> np.ndarray:
    """Storage group of every epoch position, given the epoch's shard order (sorted storage)."""
    counts = [case.shard_samples] * (case.num_samples // case.shard_samples)
    if case.num_samples % case.shard_samples:
        counts.append(case.num_samples % case.shard_samples)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    stored = np.concatenate([starts[s] + np.arange(counts[s]) for s in order])  # storage index of position
    return stored * case.groups // case.num_samples


def uniform_groups(case: Case, batch: int) -> float:
    """Expected distinct groups in ``batch`` samples drawn without replacement (equal-sized groups)."""
    n, size = case.num_samples, case.num_samples / case.groups
    miss = math.exp(
        math.lgamma(n - size + 1) + math.lgamma(n - batch + 1) - math.lgamma(n - size - batch + 1) - math.lgamma(n + 1)
    )
    return case.groups * (1 - miss)


def shard_counts(case: Case) -> list[int]:
    counts = [case.shard_samples] * (case.num_samples // case.shard_samples)
    return counts + ([case.num_samples % case.shard_samples] if case.num_samples % case.shard_samples else [])


def reader_peaks(slots: list[tuple[int, int]]) -> tuple[int, int, int]:
    """(shards read, peak samples held, peak shards held) of one worker emitting ``slots`` in order."""
    needed: dict[int, int] = {}
    for shard, _ in slots:
        needed[shard] = needed.get(shard, 0) + 1
    shards = list(needed)  # first-need order
    left = dict(needed)
    done: set[int] = set()
    read = held = holding = peak_held = peak_open = 0
    for shard, _ in slots:
        while shard not in done:
            done.add(shards[read])
            held += needed[shards[read]]
            holding += 1
            read += 1
        ahead = needed[shards[read]] if read < len(shards) else 0  # the next shard, being read
        peak_held = max(peak_held, held + ahead)
        peak_open = max(peak_open, holding + (1 if ahead else 0))
        held -= 1
        left[shard] -= 1
        holding -= left[shard] == 0
    return len(shards), peak_held, peak_open


def range_reads(slots: list[tuple[int, int]]) -> tuple[int, int]:
    """(ranged reads, samples read) of one worker: a read per run of consecutive needed samples of a shard."""
    needed: dict[int, set[int]] = {}
    for shard, idx in slots:
        needed.setdefault(shard, set()).add(idx)
    runs = sum(1 for idxs in needed.values() for i in idxs if i - 1 not in idxs)
    return runs, sum(len(idxs) for idxs in needed.values())


def run_case(case: Case, block: int, interleave: int, seed: int = 0, epoch: int = 0) -> dict:
    counts = shard_counts(case)
    order = shard_order(len(counts), seed, epoch, True)
    groups = group_of_position(case, order)
    global_batch = case.micro * case.accumulation * case.ranks
    positions = epoch_order(case.num_samples, global_batch, seed, epoch, True, block, interleave)
    rank_batches = positions.shape[0] * case.accumulation
    distinct, opens, per_worker, peaks_held, peaks_open, reads, read_samples = [], 0, 0, 0, 0, 0, 0
    workers = max(1, case.workers)
    for rank in range(case.ranks):
        batches = [rank_batch_positions(positions, case.ranks, rank, case.accumulation, i) for i in range(rank_batches)]
        distinct += [len(set(groups[b].tolist())) for b in batches]
        for worker in range(workers):
            if not worker_batches(rank_batches, workers, worker):
                continue  # more workers than batches: this one idles
            mine = np.concatenate([batches[i] for i in worker_batches(rank_batches, workers, worker)])
            slots = locate(mine, counts, order)
            shards, held, open_ = reader_peaks(slots)
            opens += shards
            per_worker, peaks_held, peaks_open = max(per_worker, shards), max(peaks_held, held), max(peaks_open, open_)
            runs, samples = range_reads(slots)
            reads, read_samples = reads + runs, read_samples + samples
    times = []
    for _ in range(3):
        tick = time.perf_counter()
        geometry = BatchGeometry(case.micro, case.accumulation, case.ranks)
        plan = make_worker_plan(case.num_samples, geometry, rank=case.ranks - 1, num_workers=workers,
                                worker=workers - 1, seed=seed, epoch=epoch, shuffle=True, drop_last=True,
                                block=block, interleave=interleave)  # fmt: skip
        locate(plan.positions, counts, order)
        times.append(time.perf_counter() - tick)
    uniform = uniform_groups(case, case.micro)
    mean = float(np.mean(distinct))
    return {
        **asdict(case),
        "block": block,
        "interleave": interleave,
        "shards": len(counts),
        "global_batch": global_batch,
        "unused_per_epoch": case.num_samples - positions.size,
        "groups_per_batch": round(mean, 2),
        "uniform_groups_per_batch": round(uniform, 2),
        "ratio": round(mean / uniform, 3),
        "shards_per_worker": per_worker,
        "opens_per_epoch": opens,
        "bytes_vs_dataset": round(read_samples / case.num_samples, 3),
        "range_reads_per_epoch": reads,
        "samples_per_read": round(read_samples / reads, 1),
        "bytes_vs_dataset_no_index": round(opens / len(counts), 2),
        "open_shards_peak": peaks_open,
        "held_samples_peak": peaks_held,
        "plan_ms": round(1000 * statistics.median(times), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, nargs="+", default=[0], help="shuffle_block values to compare")
    parser.add_argument("--interleave", type=int, nargs="+", default=[8], help="shuffle_interleave values")
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    rows = [run_case(c, b, i) for c in cases for b in args.block for i in args.interleave]
    head = ("case", "block", "interleave", "groups/batch", "uniform", "ratio", "shards/worker", "opens/epoch", "bytes x",
            "range reads", "samples/read", "bytes x, no index", "open (peak)", "held (peak)", "unused", "plan ms")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(v) for v in (
            r["name"], r["block"], r["interleave"], r["groups_per_batch"], r["uniform_groups_per_batch"], r["ratio"],
            r["shards_per_worker"], r["opens_per_epoch"], r["bytes_vs_dataset"], r["range_reads_per_epoch"],
            r["samples_per_read"], r["bytes_vs_dataset_no_index"], r["open_shards_peak"],
            r["held_samples_peak"], r["unused_per_epoch"], r["plan_ms"],
        )))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
