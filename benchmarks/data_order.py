"""The training order at the issue's dataset shapes, simulated with the plan's own functions (no I/O).

    python benchmarks/data_order.py [--json out.json] [--cases NAME ...] [--buffer-mb 256]

For each case (a dataset stored sorted by group -- cities, buildings, classes -- as conversion stores
it; ranks x workers per rank, micro-batch ``B``) it plans one epoch exactly as the loader does
(``plan.epoch_order`` + ``plan.rank_batch_positions`` + ``plan.worker_batches`` + ``plan.locate``) and
reports, each against a uniform shuffle (exact expectations of distinct groups in a draw without
replacement):

* ``global/batch``: distinct groups in a global batch, over uniform;
* ``rank/batch``: distinct groups in one rank's micro-batch, over uniform;
* ``rank/16``: distinct groups in 16 consecutive micro-batches of one rank (non-overlapping windows),
  over uniform; the periodic orders before this one reached 0.73-0.88 here;
* ``same slot +8``: how often a rank's slot holds a sample of the same group 8 batches later (uniform:
  sum of squared group shares; the interleaved order before: 0.59-0.998);
* ``held MiB``, ``req/sample``, ``bytes x``: the reader's peak bytes held ahead of delivery, ranged
  requests per sample and bytes read over the samples' bytes, for one worker (the last rank's last)
  reading its epoch in delivery order within ``--buffer-mb`` (``read_schedule.schedule_reads``;
  ``pending`` where that module is not there yet); samples of the case's typical size;
* ``plan ms``: time to plan that worker's epoch (``make_worker_plan`` + ``locate``), median of 3.
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
from mtlora_dist.data.stream.plan import epoch_order, locate, make_worker_plan, shard_order, worker_batches

try:  # the delivery-order reader's schedule (bounded memory); absent on trees without it
    from mtlora_dist.data.stream.read_schedule import SampleRange, schedule_reads
except ImportError:  # pragma: no cover - depends on the tree
    schedule_reads = None

WINDOW = 16


@dataclass(frozen=True)
class Case:
    name: str
    num_samples: int
    groups: int  # storage groups (cities, buildings, classes), stored one after the other
    shards: int
    ranks: int
    workers: int
    micro: int
    sample_mb: float  # a typical sample's size (image and labels)
    accumulation: int = 1


CASES = [
    Case("cityscapes 8x4 B4", 2975, 18, 30, 8, 4, 4, 2.5),
    Case("taskonomy 64x8 B32", 4_000_000, 500, 20_000, 64, 8, 32, 1.3),
    Case("taskonomy 8x8 B32", 4_000_000, 500, 20_000, 8, 8, 32, 1.3),
    Case("imagenet 256x8 B128", 1_281_167, 1000, 1000, 256, 8, 128, 0.11),
]


def shard_counts(case: Case) -> list[int]:
    base, extra = divmod(case.num_samples, case.shards)
    return [base + (1 if s < extra else 0) for s in range(case.shards)]


def group_of_position(case: Case, order: np.ndarray) -> np.ndarray:
    """Storage group of every epoch position, given the epoch's shard order (sorted storage)."""
    counts = np.asarray(shard_counts(case))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    stored = np.concatenate([starts[s] + np.arange(counts[s]) for s in order])  # storage index of position
    return stored * case.groups // case.num_samples


def uniform_groups(case: Case, draw: int) -> float:
    """Expected distinct groups in ``draw`` samples drawn without replacement (equal-sized groups)."""
    n, size = case.num_samples, case.num_samples / case.groups
    if draw > n - size:
        return float(case.groups)
    miss = math.exp(
        math.lgamma(n - size + 1) + math.lgamma(n - draw + 1) - math.lgamma(n - size - draw + 1) - math.lgamma(n + 1)
    )
    return case.groups * (1 - miss)


def distinct_rows(groups: np.ndarray) -> np.ndarray:
    """Distinct values in each row."""
    ordered = np.sort(groups, axis=-1)
    return 1 + (np.diff(ordered, axis=-1) != 0).sum(axis=-1)


def read_costs(case: Case, slots: list[tuple[int, int]], buffer_bytes: int) -> dict:
    """Peak bytes held, requests and bytes of one worker reading ``slots`` in delivery order."""
    if schedule_reads is None:
        return {"peak_held_mib": "pending", "requests_per_sample": "pending", "bytes_vs_used": "pending"}
    size = int(case.sample_mb * 2**20)
    ranges = [SampleRange(shard, index, index * size, (index + 1) * size) for shard, index in slots]
    schedule = schedule_reads(ranges, buffer_bytes)
    return {
        "peak_held_mib": round(schedule.peak_held_bytes / 2**20, 1),
        "requests_per_sample": round(schedule.requests / len(slots), 3),
        "bytes_vs_used": round(schedule.bytes / (len(slots) * size), 3),
    }


def run_case(case: Case, buffer_mb: float = 256, seed: int = 0, epoch: int = 0) -> dict:
    counts = shard_counts(case)
    order = shard_order(len(counts), seed, epoch, True)
    groups = group_of_position(case, order)
    global_batch = case.micro * case.accumulation * case.ranks
    positions = epoch_order(case.num_samples, global_batch, seed, epoch, True)
    nb = positions.shape[0]
    by_group = groups[positions]  # (nb, G)
    global_ratio = distinct_rows(by_group).mean() / uniform_groups(case, global_batch)
    ranks = by_group.reshape(nb * case.accumulation, case.ranks, case.micro)  # [rank batch, rank, slot]
    rank_ratio = distinct_rows(ranks).mean() / uniform_groups(case, case.micro)
    windows = (nb * case.accumulation) // WINDOW
    win = ranks[: windows * WINDOW].reshape(windows, WINDOW, case.ranks, case.micro).transpose(0, 2, 1, 3)
    window_ratio = distinct_rows(win.reshape(windows, case.ranks, -1)).mean() / uniform_groups(
        case, WINDOW * case.micro
    )
    repeat = float((ranks[8:] == ranks[:-8]).mean())
    sizes = np.bincount(groups, minlength=case.groups) / case.num_samples
    rank, worker, workers = case.ranks - 1, case.workers - 1, max(1, case.workers)
    times = []
    for _ in range(3):
        tick = time.perf_counter()
        geometry = BatchGeometry(case.micro, case.accumulation, case.ranks)
        plan = make_worker_plan(case.num_samples, geometry, rank=rank, num_workers=workers, worker=worker, seed=seed,
                                epoch=epoch, shuffle=True, drop_last=True)  # fmt: skip
        slots = locate(plan.positions, counts, order)
        times.append(time.perf_counter() - tick)
    assert len(worker_batches(nb * case.accumulation, workers, worker)) * case.micro == len(slots)
    return {
        **asdict(case),
        "global_batch": global_batch,
        "unused_per_epoch": case.num_samples - positions.size,
        "global_batch_ratio": round(float(global_ratio), 3),
        "rank_batch_ratio": round(float(rank_ratio), 3),
        "rank_window_ratio": round(float(window_ratio), 3),
        "same_slot_8_later": round(repeat, 4),
        "same_slot_8_later_uniform": round(float((sizes**2).sum()), 4),
        "worker_samples": len(slots),
        **read_costs(case, slots, int(buffer_mb * 2**20)),
        "buffer_mb": buffer_mb,
        "plan_ms": round(1000 * statistics.median(times), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--buffer-mb", type=float, default=256, help="the reader's look-ahead bound per worker")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    unknown = set(args.cases or []) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; known: {[c.name for c in CASES]}")
    rows = [run_case(c, args.buffer_mb) for c in cases]
    head = ("case", "global batch", "global/batch", "rank/batch", f"rank/{WINDOW}", "same slot +8", "(uniform)",
            "worker samples", "held MiB", "req/sample", "bytes x", "plan ms")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(v) for v in (
            r["name"], r["global_batch"], r["global_batch_ratio"], r["rank_batch_ratio"], r["rank_window_ratio"],
            r["same_slot_8_later"], r["same_slot_8_later_uniform"], r["worker_samples"], r["peak_held_mib"],
            r["requests_per_sample"], r["bytes_vs_used"], r["plan_ms"],
        )))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
