"""Reading one worker's samples in delivery order, within a memory bound (indexed manifests).

The worker's samples, in the order it delivers them, go through :func:`read_schedule.schedule_reads`:
each read is one ranged request (``fs.cat_file(path, start, end)``: an HTTP range GET on S3, with the
size from the manifest, so no HEAD), issued once the samples before it were delivered far enough that
its bytes fit in ``buffer_bytes`` ahead of delivery; up to ``concurrency`` reads are in flight at
once (so a 50 ms request latency is hidden, ``docs/performance-data.md``). Each sample's bytes are
checked against the manifest's digest and parsed on the fetching thread; the worker takes the samples in
order with :meth:`RangeReader.take`.

Failures keep the stream's rules (``streaming`` module docstring): a transient error is retried
``read_retries`` times with backoff, resuming at the read that failed (the samples before it are
delivered or held); then the shard counts as failed and its remaining samples as missing without
further requests; a cut object, a bad digest or an unparseable sample cost the samples concerned.
"""

from __future__ import annotations

import bisect
import io
import logging
import tarfile
import threading
import zlib
from typing import TYPE_CHECKING, Any

from mtlora_dist.data.errors import ShardError
from mtlora_dist.data.shards.shard_index import sample_digest
from mtlora_dist.data.shards.tarshards import iter_tar_samples
from mtlora_dist.data.stream.read_schedule import Read, SampleRange, schedule_reads
from mtlora_dist.data.stream.reader import storage_failure
from mtlora_dist.storage.fs import url_to_fs
from mtlora_dist.storage.retry import RetryBudget, StorageUnavailableError

if TYPE_CHECKING:
    from mtlora_dist.data.shards.manifest import ShardInfo
    from mtlora_dist.data.stream.reader import ReaderConfig

__all__ = ["RangeReader"]

log = logging.getLogger(__name__)

_DATA_ERRORS = (tarfile.TarError, ShardError, EOFError, zlib.error)


class _Stop(Exception):
    """The consumer went away."""


class RangeReader:
    """Fetches ``slots`` (``(shard, index)`` in delivery order) with bounded look-ahead.

    ``take(slot)`` returns the events in order: ``("sample", shard, idx, key, members)`` or
    ``("missing", shard, idx, reason)``. ``stats`` holds the stream's counters (``streaming.STAT_KEYS``)
    plus ``read_requests``; ``peak_held`` the most bytes fetched or in flight ahead of delivery.
    """

    def __init__(self, cfg: ReaderConfig, slots: list[tuple[int, int]], stats: dict[str, int]) -> None:
        self.cfg, self.slots, self.stats = cfg, slots, stats
        shards = cfg.manifest.shards
        ranges = [SampleRange(s, i, shards[s].offsets[i], shards[s].offsets[i + 1]) for s, i in slots]
        self.sizes = [r.size for r in ranges]
        self.schedule = schedule_reads(ranges, cfg.buffer_bytes)
        self._cond = threading.Condition()
        self._ready: dict[int, tuple] = {}
        self._next_read = 0
        self._delivered = 0
        self._held = 0
        self.peak_held = 0
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._failed: dict[int, str] = {}  # shard -> why it cannot be read (storage failures: no more requests)
        self._counted_failed: set[int] = set()
        self._opened: set[int] = set()
        self._consecutive_failures = 0
        self._fs: dict[int, tuple[Any, str]] = {}  # made on this thread, shared: fsspec's sync calls are thread-safe
        for shard in {s for s, _ in slots}:
            url = cfg.manifest.shard_url(shard)
            self._fs[shard] = url_to_fs(url, cfg.storage)
        self._threads = [
            threading.Thread(target=self._loop, daemon=True, name=f"mtlora-range-read-{i}")
            for i in range(max(1, min(cfg.concurrency, len(self.schedule.reads))))
        ]

    # ------------------------------------------------------------------------------------ consumer

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def take(self, slot: tuple[int, int]) -> tuple:
        """The event of the next delivery, which must be ``slot``."""
        entry = self._delivered
        if entry >= len(self.slots) or self.slots[entry] != slot:
            raise ShardError(f"range reader asked for {slot} at delivery {entry} (planning bug)")
        with self._cond:
            while entry not in self._ready:
                if self._error is not None:
                    raise self._error
                if not any(t.is_alive() for t in self._threads):
                    raise ShardError("the range reader's threads ended without a reason")
                self._cond.wait(1.0)
            event = self._ready.pop(entry)
            self._delivered += 1
            self._held -= self.sizes[entry]
            self._cond.notify_all()
        return event

    # ------------------------------------------------------------------------------------- fetchers

    def _loop(self) -> None:
        reads = self.schedule.reads
        try:
            while True:
                with self._cond:
                    while not self._stopping.is_set() and self._next_read < len(reads):
                        if reads[self._next_read].issue_after <= self._delivered:
                            break
                        self._cond.wait(0.5)
                    if self._stopping.is_set() or self._next_read >= len(reads):
                        return
                    read = reads[self._next_read]
                    self._next_read += 1
                    self._held += read.size
                    self.peak_held = max(self.peak_held, self._held)
                events = self._fetch(read)
                with self._cond:
                    self._ready.update(events)
                    self._cond.notify_all()
        except _Stop:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()

    def _count(self, **counts: int) -> None:
        with self._cond:
            for key, n in counts.items():
                self.stats[key] = self.stats.get(key, 0) + n

    def _missing(self, read: Read, message: str) -> dict[int, tuple]:
        self._count(samples_missing=len(read.entries))
        return {e: ("missing", read.shard, read.first + k, message) for k, e in enumerate(read.entries)}

    def _fetch(self, read: Read) -> dict[int, tuple]:
        """The events of ``read``'s deliveries: its bytes requested (with retries), checked and parsed."""
        cfg = self.cfg
        shard = read.shard
        if shard in self._failed:
            return self._missing(read, self._failed[shard])
        url = cfg.manifest.shard_url(shard)
        info = cfg.manifest.shards[shard]
        fs, path = self._fs[shard]
        budget = RetryBudget(url, cfg.storage)
        while True:
            try:
                self._count(read_requests=1)
                data = fs.cat_file(path, start=read.start, end=read.end)
                self._count(bytes_read=len(data))
                if len(data) != read.size:
                    raise self._truncated(url, info)
                break
            except _DATA_ERRORS as exc:
                message = str(exc) if isinstance(exc, ShardError) else f"corrupt shard {url}: {exc}"
                return self._fail(read, message, ShardError, storage=False)
            except Exception as exc:  # noqa: BLE001 - classified: transient is retried, the rest fails
                delay = budget.next_delay(exc)
                if delay is not None:
                    self._count(retries=1)
                    if self._stopping.wait(delay):
                        raise _Stop from None
                    continue
                message, error = storage_failure(url, exc, budget)
                return self._fail(read, message, error, storage=True)
        with self._cond:
            self._consecutive_failures = 0
            if shard not in self._opened:
                self._opened.add(shard)
                self.stats["shards_opened"] += 1
        events = {}
        offsets = info.offsets
        for k, entry in enumerate(read.entries):
            idx = read.first + k
            chunk = data[offsets[idx] - read.start : offsets[idx + 1] - read.start]
            events[entry] = self._parse(shard, url, info, idx, chunk)
        self._count(samples_read=len(read.entries))
        return events

    def _fail(self, read: Read, message: str, error: type[Exception], storage: bool) -> dict[int, tuple]:
        """``read``'s samples are lost: an error (``on_error="raise"``), or counted and marked missing."""
        if self.cfg.on_error == "raise":
            raise error(message)
        shard = read.shard
        with self._cond:
            first_failure = shard not in self._counted_failed
            self._counted_failed.add(shard)
            if first_failure:
                self.stats["shards_failed"] += 1
            if storage:
                self._failed[shard] = message  # its other samples are not requested again
                self._consecutive_failures += first_failure
                consecutive = self._consecutive_failures
        log.warning("skipping %d sample(s): %s", len(read.entries), message)
        events = self._missing(read, message)
        if storage and consecutive >= self.cfg.max_consecutive_failures:
            raise StorageUnavailableError(
                f"{self.cfg.max_consecutive_failures} shards in a row could not be read; giving up instead of skipping the rest of "
                f"the epoch. Last error: {message}"
            )
        return events

    def _parse(self, shard: int, url: str, info: ShardInfo, idx: int, data: bytes) -> tuple:
        """The sample event, or a ``missing`` one for bytes that fail their digest or do not parse."""
        try:
            if self.cfg.verify_checksums and sample_digest(data) != info.sample_digest(idx):
                start, stop = info.offsets[idx], info.offsets[idx + 1]
                raise ShardError(
                    f"shard {url} does not match its manifest: sample {idx} (bytes {start}..{stop}) has sha256 "
                    f"{sample_digest(data)}..., the manifest says {info.sample_digest(idx)}... (corrupt or replaced "
                    "content; re-run the conversion or restore the shard)"
                )
            samples = list(iter_tar_samples(io.BytesIO(data), url))
            if len(samples) != 1:
                raise ShardError(f"shard {url}: the bytes of sample {idx} hold {len(samples)} samples (stale index)")
        except _DATA_ERRORS as exc:
            message = str(exc) if isinstance(exc, ShardError) else f"corrupt shard {url}: sample {idx}: {exc}"
            if self.cfg.on_error == "raise":
                raise ShardError(message) from None
            self._count(samples_skipped=1)
            log.warning("skipping a bad sample: %s", message)
            return ("missing", shard, idx, message)
        key, members = samples[0]
        return ("sample", shard, idx, key, members)

    def _truncated(self, url: str, info: ShardInfo) -> ShardError:
        fs, path = url_to_fs(url, self.cfg.storage)
        size = fs.size(path)  # the error path only: the object is shorter than the manifest says
        whole = bisect.bisect_right(info.offsets, size) - 1  # samples whose bytes are all there
        return ShardError(
            f"shard {url} is truncated: the tar ended after {max(0, whole)} sample(s) but the manifest lists "
            f"{info.num_samples} (the object is {size} bytes, the manifest says {info.bytes})"
        )
