"""The read schedule (pure): bytes held ahead of delivery stay within the buffer at any size, every
sample is read exactly once with its own bytes, and neighbours in storage coalesce into one request."""

from __future__ import annotations

import numpy as np
import pytest

from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.data.stream.plan import locate, make_worker_plan, shard_order
from mtlora_dist.data.stream.read_schedule import SampleRange, schedule_reads, storage_order_peak, window_ends


def sorted_set_ranges(num_shards: int, per_shard: int, sizes_seed: int = 0) -> dict[int, list[int]]:
    """Byte offsets of each shard's samples (sizes vary 50..150 kB)."""
    rng = np.random.default_rng(sizes_seed)
    return {s: [0, *np.cumsum(rng.integers(50_000, 150_000, per_shard)).tolist()] for s in range(num_shards)}


def worker_ranges(offsets, world, workers, worker, batch, accumulation=1, rank=0) -> list[SampleRange]:
    """One worker's training epoch, in delivery order, as the loader plans it."""
    counts = [len(o) - 1 for o in offsets.values()]
    plan = make_worker_plan(
        sum(counts), BatchGeometry(batch, accumulation, world), rank=rank, num_workers=workers, worker=worker, seed=3,
        epoch=1, shuffle=True, drop_last=True,
    )  # fmt: skip
    slots = locate(plan.positions, counts, shard_order(len(counts), 3, 1, True))
    return [SampleRange(s, i, offsets[s][i], offsets[s][i + 1]) for s, i in slots]


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 16), (2, 2, 8), (8, 4, 8)])
def test_peak_held_stays_within_the_buffer_where_storage_order_holds_the_epoch(world, workers, batch):
    offsets = sorted_set_ranges(30, 100)  # 3,000 samples of ~100 kB: ~300 MB
    ranges = worker_ranges(offsets, world, workers, 0, batch)
    buffer = 2_000_000
    schedule = schedule_reads(ranges, buffer)
    assert schedule.peak_held_bytes <= buffer
    assert storage_order_peak(ranges) > 2 * buffer  # what the bound replaces
    # every delivery served once, by a read of exactly its bytes: bytes read = bytes used
    served = sorted(e for r in schedule.reads for e in r.entries)
    assert served == list(range(len(ranges)))
    assert schedule.bytes == sum(r.size for r in ranges)
    for read in schedule.reads:
        got = [ranges[e] for e in read.entries]
        assert [(g.shard, g.index) for g in got] == [(read.shard, i) for i in range(read.first, read.last + 1)]
        assert read.start == got[0].start and read.end == got[-1].end
    assert schedule.requests_per_sample <= 1.0


def test_issue_points_keep_every_read_inside_the_window():
    ranges = worker_ranges(sorted_set_ranges(12, 50), 2, 2, 1, 8)
    sizes = [r.size for r in ranges]
    buffer = 800_000
    ends = window_ends(sizes, buffer)
    schedule = schedule_reads(ranges, buffer)
    issued = [r.issue_after for r in schedule.reads]
    assert issued == sorted(issued)
    for read in schedule.reads:
        assert all(read.issue_after <= e < ends[read.issue_after] for e in read.entries)
    for d in range(len(sizes)):
        assert sum(sizes[d : ends[d]]) <= buffer or ends[d] == d + 1


def test_neighbours_in_storage_coalesce_up_to_the_buffer():
    """Delivered in storage order (no shuffling): one request per buffer-full, not per sample."""
    offsets = [0, *range(100, 10_001, 100)]  # 100 samples of 100 bytes
    ranges = [SampleRange(7, i, offsets[i], offsets[i + 1]) for i in range(100)]
    schedule = schedule_reads(ranges, 1_000)  # a full buffer, then a refill every half buffer
    assert schedule.requests == 1 + 90 // 5 and schedule.peak_held_bytes == 1_000
    assert [r.size for r in schedule.reads[:3]] == [1_000, 500, 500]
    assert schedule_reads(ranges, 1_000, refill=1.0).requests == 10
    assert schedule_reads(ranges, 1_000, refill=0.01).requests == 1 + 90  # a sliding window: sample by sample
    assert schedule_reads(ranges, 1_000, max_request_bytes=200, refill=1.0).requests == 50
    assert schedule_reads(ranges, 100).requests == 100  # a one-sample buffer reads sample by sample


def test_a_sample_larger_than_the_buffer_is_read_alone_and_repeats_are_read_again():
    ranges = [SampleRange(0, 0, 0, 500), SampleRange(0, 1, 500, 600), SampleRange(0, 0, 0, 500)]
    schedule = schedule_reads(ranges, 200)
    assert schedule.peak_held_bytes == 500 and schedule.requests == 3 and schedule.bytes == 1_100
    with pytest.raises(ValueError, match="buffer must be > 0"):
        schedule_reads(ranges, 0)


def test_a_larger_buffer_trades_memory_for_fewer_requests():
    """An evaluation worker delivers a contiguous chunk: the bigger the buffer, the more neighbours one
    request covers (the training order is a uniform draw: one request per sample at any buffer)."""
    offsets = sorted_set_ranges(30, 100)
    counts = [100] * 30
    plan = make_worker_plan(
        3000, BatchGeometry(16), rank=0, num_workers=2, worker=1, seed=3, epoch=0, shuffle=False, drop_last=False
    )
    slots = locate(plan.positions, counts, shard_order(30, 3, 0, False))
    ranges = [SampleRange(s, i, offsets[s][i], offsets[s][i + 1]) for s, i in slots]
    small, large = schedule_reads(ranges, 1_000_000), schedule_reads(ranges, 20_000_000)
    assert small.peak_held_bytes <= 1_000_000 < large.peak_held_bytes <= 20_000_000
    assert large.requests < small.requests < len(ranges) / 2
    assert small.bytes == large.bytes == sum(r.size for r in ranges)
