"""Which byte ranges a worker requests, and when: reading in delivery order within a memory bound.

Pure arithmetic on the samples' byte ranges, no I/O: the reader (``range_reader``) follows it, and the
benchmarks evaluate it at dataset shapes no test machine holds (``benchmarks/data_order.py``).

A worker delivers its samples in plan order, which visits a shard's samples far apart in time (the
order mixes every global batch over the whole epoch). Reading a shard's samples together, in storage
order, would hold each one until its turn: most of the worker's epoch share. Instead:

* **the window**: after ``d`` deliveries a worker may have fetched (or have in flight) only samples
  among the next ones to deliver, ``d .. h(d) - 1``, where ``h(d)`` is as far as their bytes together
  stay within ``buffer_bytes`` (at least the next sample, however large). So the bytes held ahead of
  delivery never exceed ``max(buffer_bytes, largest sample)``, at any dataset size;
* **one request per read**: the first sample not yet fetched is read as soon as it enters the window;
  the read extends over the samples that follow it in storage (the same shard, consecutive indices)
  while this worker needs them, they are in the window and not yet fetched, and the read stays within
  ``max_request_bytes``. Neighbours delivered together (a block of the order) cost one request; a
  larger buffer finds more of them (fewer requests per sample), at the price of the memory it allows;
* **bytes**: each read covers exactly the needed samples' bytes, so bytes read = bytes used.

``schedule_reads`` returns the reads in the order they are issued, with the number of deliveries
each waits for, and the resulting peak of bytes held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SampleRange", "Read", "ReadSchedule", "schedule_reads", "storage_order_peak", "window_ends"]


@dataclass(frozen=True)
class SampleRange:
    """Where one delivered sample's bytes are: ``shard`` (any hashable id), its ``index`` there and
    ``start``/``end`` byte offsets (``end`` exclusive)."""

    shard: int
    index: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Read:
    """One ranged request: bytes ``start .. end`` of ``shard`` hold its samples ``first .. last``, which
    serve the deliveries ``entries`` (in storage order). Issued once ``issue_after`` samples were
    delivered."""

    shard: int
    first: int
    last: int
    start: int
    end: int
    entries: tuple[int, ...]
    issue_after: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ReadSchedule:
    """The reads of one worker's epoch, in issue order, and what they cost."""

    reads: list[Read]
    samples: int
    buffer_bytes: int
    peak_held_bytes: int  # most bytes fetched (or in flight) ahead of delivery at any time

    @property
    def requests(self) -> int:
        return len(self.reads)

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.reads)

    @property
    def requests_per_sample(self) -> float:
        return self.requests / max(1, self.samples)


def window_ends(sizes: Sequence[int], buffer_bytes: int) -> list[int]:
    """``h(d)`` for ``d = 0 .. n``: the end of the window after ``d`` deliveries (see the module docstring)."""
    n = len(sizes)
    ends = [0] * (n + 1)
    h, total = 0, 0  # total: bytes of entries d .. h-1
    for d in range(n + 1):
        if d > 0:
            total -= sizes[d - 1] if h >= d else 0
        if h < d:
            h, total = d, 0
        while h < n and (total + sizes[h] <= buffer_bytes or h == d):
            total += sizes[h]
            h += 1
        ends[d] = h
    return ends


def schedule_reads(
    ranges: Sequence[SampleRange], buffer_bytes: int, max_request_bytes: int | None = None, refill: float = 0.5
) -> ReadSchedule:
    """The reads that deliver ``ranges`` (one per delivered sample, in delivery order; a sample may appear
    twice, e.g. evaluation padding: it is then read twice) within ``buffer_bytes`` held ahead of delivery.

    Reads are issued in rounds: a round fetches everything in the window not yet fetched, and the next
    round starts once the bytes still held ahead have dropped to ``(1 - refill) * buffer_bytes`` (so a
    round's reads cover about ``refill`` of the buffer and neighbours within it coalesce; with
    ``refill`` near 0 the window slides sample by sample). ``max_request_bytes`` caps a coalesced read
    (default: the buffer). Raises ``ValueError`` for a non-positive buffer or a refill outside (0, 1].
    """
    if buffer_bytes <= 0:
        raise ValueError(f"the read buffer must be > 0 bytes, got {buffer_bytes}")
    if not 0 < refill <= 1:
        raise ValueError(f"refill must be in (0, 1], got {refill}")
    cap = buffer_bytes if max_request_bytes is None else max_request_bytes
    n = len(ranges)
    sizes = [r.size for r in ranges]
    ends = window_ends(sizes, buffer_bytes)
    # where each (shard, index) is delivered, in delivery order: a coalesced read takes the next unfetched one
    where: dict[tuple[int, int], list[int]] = {}
    for e, r in enumerate(ranges):
        where.setdefault((r.shard, r.index), []).append(e)
    taken = dict.fromkeys(where, 0)  # how many of its deliveries were fetched (they are fetched in order)
    fetched = [False] * n
    reads: list[Read] = []
    low_water = buffer_bytes - refill * buffer_bytes
    d = h = held = 0  # round at d deliveries; entries below h were fetched; held = bytes of d .. h-1
    while h < n:
        while ends[d] <= h:  # the next sample does not fit yet: wait for more deliveries
            held -= sizes[d]
            d += 1
        limit = ends[d]
        for e in range(h, limit):
            if not fetched[e]:
                reads.append(_coalesced(ranges, e, limit, cap, where, taken, fetched, d))
        held += sum(sizes[h:limit])
        h = limit
        while d < h and held > low_water:
            held -= sizes[d]
            d += 1
    return ReadSchedule(reads, n, buffer_bytes, _peak_held(reads, sizes))


def _coalesced(
    ranges: Sequence[SampleRange],
    e: int,
    limit: int,
    cap: int,
    where: dict[tuple[int, int], list[int]],
    taken: dict[tuple[int, int], int],
    fetched: list[bool],
    issue: int,
) -> Read:
    """The read that starts at delivery ``e`` and runs on over the samples next to it in storage that are
    delivered before ``limit`` and not fetched yet, up to ``cap`` bytes."""
    head = last = ranges[e]
    entries, size = [e], head.size
    fetched[e] = True
    taken[(head.shard, head.index)] += 1
    while True:
        key = (head.shard, last.index + 1)
        uses = where.get(key)
        if not uses or taken[key] >= len(uses):
            break
        nxt = uses[taken[key]]
        r = ranges[nxt]
        if fetched[nxt] or nxt >= limit or r.start != last.end or size + r.size > cap:
            break
        entries.append(nxt)
        fetched[nxt] = True
        taken[key] += 1
        size += r.size
        last = r
    return Read(head.shard, head.index, last.index, head.start, last.end, tuple(entries), issue)


def _peak_held(reads: Sequence[Read], sizes: Sequence[int]) -> int:
    """Most bytes fetched ahead of delivery, when every read is issued as early as allowed and arrives at
    once (the most memory the schedule can hold; slower reads only hold less)."""
    add = [0] * (len(sizes) + 1)  # bytes added when d deliveries are done
    for r in reads:
        add[r.issue_after] += r.size
    return _sweep_peak(add, sizes)


def storage_order_peak(ranges: Sequence[SampleRange]) -> int:
    """Peak bytes held by the whole-shard reader over the same deliveries: each needed shard read once,
    when its first sample is due, and its samples kept until their turn. What the buffer bound replaces
    (the benchmark and the tests compare with it)."""
    first: dict[int, int] = {}
    for e, r in enumerate(ranges):
        first.setdefault(r.shard, e)
    add = [0] * (len(ranges) + 1)
    for r in ranges:
        add[first[r.shard]] += r.size
    return _sweep_peak(add, [r.size for r in ranges])


def _sweep_peak(add: Sequence[int], sizes: Sequence[int]) -> int:
    """The peak of bytes held when ``add[d]`` arrive once ``d`` samples are delivered and each delivery
    frees its own ``sizes[d]``."""
    held = peak = 0
    for d, size in enumerate(sizes):
        held += add[d]
        peak = max(peak, held)
        held -= size
    return peak
