"""The byte side of a worker's stream, for whole shards: the thread that reads the shards it needs.

With the manifest's per-sample index (every conversion writes one) a worker reads only its samples, in
delivery order, within ``buffer_bytes``: :mod:`~mtlora_dist.data.stream.range_reader`. This module
reads **whole shards**, for manifests without the index (written before it existed; ``launch/convert.py
--index`` adds it) and for remote shards being copied into the cache (which stores whole verified
shards). :class:`ShardReader` reads the shards a worker needs, each once and sequentially, in the order
the plan first needs them, through fsspec (so network reads overlap with decoding), splits them into
samples with webdataset's tar iterators and hands them, as raw bytes, to the sample side
(:mod:`~mtlora_dist.data.stream.streaming`) through a bounded queue. A shard's samples arrive together,
so the sample side holds those it needs later until their turn: up to the worker's share of the epoch
(``docs/data.md``, "Bounds"), not bounded by ``buffer_bytes``.

Integrity (``verify_checksums``, on by default): every byte goes through sha256 while it streams, and
the shard's samples are handed on only once the digest and size match, so a damaged shard fails as a
whole. A worker reads whole shards it needs only a part of (up to tens of times the dataset per epoch at
high worker counts).

Shard cache (``cache_dir``): remote shards are stored, verified, in a node-local folder
(:class:`~mtlora_dist.storage.shard_cache.ShardCache`) and read from there in later epochs; a cached
copy that fails verification is dropped and the shard read from the store again.

Failures (``on_error``): a network error is retried ``read_retries`` times with exponential backoff,
resuming the shard at the first sample not yet delivered; then the shard fails as *unreachable*. A
corrupt or truncated shard (a tar that ends early: the count is compared with the manifest; a checksum
mismatch) or a missing shard fails without retry. ``"raise"``: the first failure is an error naming the
shard (and sample) and the cause; ``"skip"``: it is counted (``samples_missing``, ``shards_failed``),
logged, and one ``missing`` event per lost sample goes to the sample side.
``max_consecutive_failures`` shards in a row failing on storage errors (server gone) is an error even
when skipping.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import tarfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

import mtlora_dist.storage.wds  # noqa: F401  (registers s3:// for webdataset in every worker)
from mtlora_dist.data.config import ReadConfig
from mtlora_dist.data.errors import ShardError
from mtlora_dist.data.shards.manifest import Manifest
from mtlora_dist.data.shards.tarshards import iter_tar_samples
from mtlora_dist.data.stream.stats import STAT_KEYS
from mtlora_dist.storage.fs import StorageOptions, is_remote, url_to_fs
from mtlora_dist.storage.retry import RetryBudget, StorageUnavailableError, is_transient
from mtlora_dist.storage.shard_cache import CacheEntryWriter, ShardCache

__all__ = ["ReaderConfig", "ShardReader", "segments"]

log = logging.getLogger(__name__)

_DATA_ERRORS = (tarfile.TarError, ShardError, EOFError, zlib.error)


@dataclass(frozen=True)
class ReaderConfig:
    """What the byte reader needs (``data.read`` resolved, :meth:`of`); plain data, so it pickles into workers."""

    manifest: Manifest
    on_error: str
    storage: StorageOptions = field(default_factory=StorageOptions)
    prefetch_samples: int = 16
    max_consecutive_failures: int = 3
    verify_checksums: bool = True
    cache_dir: str | None = None
    cache_max_bytes: int = 0
    buffer_bytes: int = 256 * 2**20  # data.read.buffer_mb: bytes the reader may hold ahead of delivery
    concurrency: int = 8  # data.read.concurrency: ranged requests in flight per worker (range_reader.py)

    @classmethod
    def of(cls, manifest: Manifest, read: ReadConfig, storage: StorageOptions) -> ReaderConfig:
        """The reader's settings from the ``data.read`` section."""
        return cls(
            manifest=manifest,
            on_error=str(read.on_error),
            storage=storage,
            prefetch_samples=read.prefetch_samples,
            max_consecutive_failures=read.max_consecutive_failures,
            verify_checksums=read.verify_checksums,
            cache_dir=read.cache_dir,
            cache_max_bytes=read.cache_max_bytes,
            buffer_bytes=read.buffer_bytes,
            concurrency=read.concurrency,
        )

    @property
    def checks_shards(self) -> bool:
        """Whole shards are read and verified (when not range-read): asked for, or needed to fill the cache."""
        return self.verify_checksums or self.cache_dir is not None

    @property
    def range_reads(self) -> bool:
        """Only the needed samples' bytes are read: the manifest has the index and no remote cache is filled."""
        return self.manifest.indexed and not (self.cache_dir is not None and is_remote(self.manifest.base_url))


class _BadCacheEntry(Exception):
    """A cached shard failed verification: drop it and read the shard from its store."""


class _Source:
    """A shard's bytes, read once: hashed and counted as they pass, copied into the cache if filling it."""

    def __init__(
        self, f: IO[bytes], name: str, entry: CacheEntryWriter | None = None, stats: dict[str, int] | None = None
    ) -> None:
        self.f, self.name, self.entry, self.stats = f, name, entry, stats
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        self.nbytes += len(data)
        if self.stats is not None:
            self.stats["bytes_read"] += len(data)
        if self.entry is not None:
            self.entry.write(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest of the object."""
        while self.read(1 << 20):
            pass

    def __repr__(self) -> str:  # webdataset appends the stream to error messages: name the shard
        return self.name


class _Stop(Exception):
    """The consumer went away; the reader thread ends quietly."""


class ShardReader(threading.Thread):
    """Reads the needed samples of a list of shard segments, in order, into a bounded queue.

    Delivers exactly one event per needed sample: ``("sample", shard, idx, key, members)`` or
    ``("missing", shard, idx, reason)``; when whole shards are verified, the samples of a shard come
    together as ``("bundle", [sample events])`` once it checked out. Or ``("error", exc)`` and stops.
    Ends with ``("done",)``.
    """

    def __init__(self, cfg: ReaderConfig, segments: list[tuple[int, list[int]]]) -> None:
        super().__init__(daemon=True, name="mtlora-shard-reader")
        self.cfg = cfg
        self.segments = segments
        bundles = cfg.checks_shards  # one ("bundle", events) per shard: one waits at most
        self.events: queue.Queue = queue.Queue(maxsize=1 if bundles else max(1, cfg.prefetch_samples))
        self.cache = ShardCache(cfg.cache_dir, cfg.cache_max_bytes) if cfg.cache_dir else None
        self.stopping = threading.Event()
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)  # fixed keys: read from the other thread
        self._consecutive_failures = 0

    def stop(self) -> None:
        self.stopping.set()

    def _put(self, event: tuple) -> None:
        while not self.stopping.is_set():
            try:
                self.events.put(event, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def run(self) -> None:
        try:
            for shard, idxs in self.segments:
                self._read_segment(shard, idxs)
            self._put(("done",))
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            try:
                self._put(("error", exc))
            except _Stop:
                pass

    def _read_segment(self, shard: int, idxs: list[int]) -> None:
        url = self.cfg.manifest.shard_url(shard)
        budget = RetryBudget(url, self.cfg.storage)
        progress = [0]  # how many of idxs were delivered: a retry resumes there
        progress_at_failure = 0
        use_cache = self.cache is not None and is_remote(url)
        bad_copies = 0
        while True:
            try:
                self._stream(shard, url, idxs, progress, use_cache)
                self._consecutive_failures = 0
                return
            except _Stop:
                raise
            except _BadCacheEntry as exc:
                log.warning("cached copy of %s is corrupt (%s); reading it from the store", url, exc.__cause__)
                self.cache.discard(self.cfg.manifest.shards[shard].sha256)
                bad_copies += 1
                use_cache = bad_copies < 2  # re-read from the store, storing a fresh copy (once)
                continue
            except _DATA_ERRORS as exc:
                message = (
                    str(exc) if isinstance(exc, ShardError) else f"corrupt shard {url}: {type(exc).__name__}: {exc}"
                )
                return self._fail(shard, idxs, progress[0], message, ShardError, storage=False)
            except Exception as exc:  # noqa: BLE001 - classified: transient is retried, the rest fails
                if progress[0] > progress_at_failure:  # it got further this time: a fresh set of retries
                    budget.reset()
                    progress_at_failure = progress[0]
                delay = budget.next_delay(exc)
                if delay is not None:
                    self.stats["retries"] += 1
                    if self.stopping.wait(delay):
                        raise _Stop from None
                    continue
                message, error = storage_failure(url, exc, budget)
                return self._fail(shard, idxs, progress[0], message, error, storage=True)

    @contextmanager
    def _open(self, shard: int, url: str, use_cache: bool) -> Iterator[_Source]:
        """The shard's bytes: from the cache when it holds them, else from storage (filling the cache)."""
        info = self.cfg.manifest.shards[shard]
        cached = self.cache.open(info.sha256) if use_cache else None
        if cached is not None:
            self.stats["shards_from_cache"] += 1
            with cached:
                yield _Source(cached, f"{url} (cached as {cached.name})")
            return
        fs, path = url_to_fs(url, self.cfg.storage)
        with fs.open(path, "rb", block_size=self.cfg.storage.block_size) as f:
            self.stats["shards_opened"] += 1
            entry = self.cache.new_entry(info.sha256) if use_cache else None
            try:
                yield _Source(f, url, entry, self.stats)
            finally:
                if entry is not None:
                    entry.abort()  # no-op once committed

    def _stream(self, shard: int, url: str, idxs: list[int], progress: list[int], use_cache: bool) -> None:
        with self._open(shard, url, use_cache) as source:
            try:
                held = self._read_samples(shard, url, idxs, progress, source)
            except _DATA_ERRORS as exc:
                if source.name != url:  # a cached copy
                    raise _BadCacheEntry from exc
                raise
            if source.entry is not None:
                source.entry.commit()
        if held:
            self._put(("bundle", held))
            self.stats["samples_read"] += len(held)
            progress[0] += len(held)

    def _read_samples(self, shard: int, url: str, idxs: list[int], progress: list[int], source: _Source) -> list[tuple]:
        """Put (or, when verifying, return) the needed samples of one shard; check it against the manifest."""
        info = self.cfg.manifest.shards[shard]
        checking = self.cfg.checks_shards
        held: list[tuple] = []
        seen = 0
        for i, (key, members) in enumerate(iter_tar_samples(source, url)):
            seen = i + 1
            if i >= info.num_samples:
                raise ShardError(
                    f"shard {url} holds more than the {info.num_samples} samples its manifest lists: the "
                    "manifest is stale; re-run the conversion"
                )
            at = progress[0] + len(held)
            if at < len(idxs) and i == idxs[at]:
                event = ("sample", shard, i, key, members)
                if checking:
                    held.append(event)  # handed on once the whole shard checks out
                else:
                    self._put(event)
                    self.stats["samples_read"] += 1
                    progress[0] += 1
                    if progress[0] == len(idxs) and idxs[-1] != info.num_samples - 1:
                        return held  # the rest of the shard is someone else's
        if checking:
            source.drain()
        if seen < info.num_samples:
            size = source.nbytes if checking else self._size(url)
            detail = (
                f"the object is {size} bytes, the manifest says {info.bytes}"
                if size != info.bytes
                else "the tar ends early: corrupt content"
            )
            raise ShardError(
                f"shard {url} is truncated: the tar ended after {seen} sample(s) but the manifest lists "
                f"{info.num_samples} ({detail})"
            )
        if checking and (source.nbytes != info.bytes or source.digest.hexdigest() != info.sha256):
            raise ShardError(
                f"shard {url} does not match its manifest: {source.nbytes} bytes with sha256 "
                f"{source.digest.hexdigest()[:16]}..., the manifest says {info.bytes} bytes with sha256 "
                f"{info.sha256[:16]}... (corrupt or replaced content; re-run the conversion or restore the shard)"
            )
        return held

    def _size(self, url: str) -> int:
        fs, path = url_to_fs(url, self.cfg.storage)
        return fs.size(path)

    def _fail(
        self, shard: int, idxs: list[int], done: int, message: str, error: type[Exception], storage: bool
    ) -> None:
        if self.cfg.on_error == "raise":
            raise error(message)
        lost = len(idxs) - done
        self.stats["shards_failed"] += 1
        self.stats["samples_missing"] += lost
        log.warning("skipping %d sample(s): %s", lost, message)
        if storage:
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.cfg.max_consecutive_failures:
                raise StorageUnavailableError(
                    f"{self._consecutive_failures} shards in a row could not be read; giving up instead of "
                    f"skipping the rest of the epoch. Last error: {message}"
                )
        for idx in idxs[done:]:
            self._put(("missing", shard, idx, message))


def storage_failure(url: str, exc: BaseException, budget: RetryBudget) -> tuple[str, type[Exception]]:
    """The message and error of a shard read that failed for good (retries spent or not retryable):
    both readers (whole shards here, ranged reads in ``range_reader``) say the same thing."""
    if isinstance(exc, FileNotFoundError):
        return f"shard {url} listed in the manifest does not exist ({exc})", ShardError
    if is_transient(exc):
        return str(budget.unavailable(exc)), StorageUnavailableError
    message = (
        f"cannot read shard {url}: {type(exc).__name__}: {exc}; check the credentials and the bucket's permissions"
    )
    return message, StorageUnavailableError


def segments(slots: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """``(shard, sorted indices)`` to read: each shard once, in the order the plan first needs it."""
    needed: dict[int, set[int]] = {}
    for shard, idx in slots:
        needed.setdefault(shard, set()).add(idx)
    return [(shard, sorted(idxs)) for shard, idxs in needed.items()]
