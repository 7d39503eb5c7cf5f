"""Streaming shards into augmented batches inside one DataLoader worker (or the main process).

Each worker follows its :class:`~mtlora_dist.data.stream.plan.WorkerPlan`: a background thread reads the
shards it needs, each once and sequentially, in the order the plan first needs them, through fsspec (so network reads overlap with decoding) and splits them
into samples with webdataset's tar iterators, and the worker thread emits samples in the planned
order, decodes, transforms and collates them. Samples before the resume point are dropped as raw
bytes, never decoded. With ``augment_on_device`` the worker only decodes (and draws each sample's
warp); the loader warps the batch on the training device (``transforms.warp_batch``).

Reading only what is needed: with the manifest's per-sample index (``ingest/shard_index``; every
conversion writes one) a worker reads just the byte ranges of the samples it needs, each run of
consecutive samples in one ranged read (in chunks of ``storage.block_size``), so however many workers
share a shard, the bytes read per epoch are those of the samples used (``docs/data.md``, "Bounds").

Integrity (``verify_checksums``, on by default): with the index, each sample's bytes are checked
against its digest before they are parsed, so a flipped byte costs that sample only (counted as
skipped, like an undecodable one). A manifest without the index (written before it existed; or a
remote shard being copied into the cache, which stores whole verified shards) falls back to whole
shards: every byte goes through sha256 while it streams, and the shard's samples are handed on only
once the digest and size match, so such a shard fails as a whole. That mode also means a worker reads
whole shards it needs only a part of (up to tens of times the dataset per epoch at high worker counts;
``launch/convert.py --index`` adds the index to an old conversion).

A worker holds, as raw bytes, the samples it still needs from the shards (or runs) it has read, plus
the one being read: at most its share of the epoch (bounds measured in ``docs/data.md``, "The
training order").

Shard cache (``cache_dir``): remote shards are stored, verified, in a node-local folder
(:class:`~mtlora_dist.storage.shard_cache.ShardCache`) and read from there in later epochs; a cached
copy that fails verification is dropped and the shard read from the store again.

Failures (``on_error``):

* a network error is retried ``read_retries`` times with exponential backoff, resuming the shard at
  the first sample not yet delivered; then the shard fails as *unreachable*;
* a corrupt or truncated shard (including a tar that simply ends early: the count is compared with
  the manifest; and a checksum mismatch), a missing shard or a sample that does not decode or lacks
  a task's member fail without retry;
* ``"raise"``: the first failure is an error naming the shard (and sample) and the cause;
* ``"skip"``: the failure is counted in the stats (``samples_skipped``/``samples_missing``,
  ``shards_failed``), logged as a warning, and the sample's slot is filled with a copy of a good one
  marked ``valid=False`` so every rank still yields the same number of batches. ``max_consecutive_failures``
  shards in a row failing on storage errors (server gone) is an error even when skipping, as is a
  worker left without any readable sample.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import queue
import tarfile
import threading
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

import mtlora_dist.storage.wds  # noqa: F401  (registers s3:// for webdataset in every worker)
from mtlora_dist.data.errors import DataError, SampleDecodeError, ShardError, TooManyFailuresError
from mtlora_dist.data.ingest.encoding import IMAGE_SUFFIX, Decoders, decode_sample, jpeg_size
from mtlora_dist.data.ingest.manifest import Manifest, ShardInfo
from mtlora_dist.data.ingest.shard_index import sample_digest
from mtlora_dist.data.ingest.tarshards import iter_tar_samples
from mtlora_dist.data.stream.batch import collate, collate_decoded
from mtlora_dist.data.stream.plan import WorkerPlan, locate, make_worker_plan, shard_order
from mtlora_dist.data.stream.transforms import (
    Resampling,
    Warp,
    augment_for,
    eval_transform,
    reduced_image_size,
    sample_warp,
    warp_sample,
)
from mtlora_dist.storage.fs import StorageOptions, is_remote, url_to_fs
from mtlora_dist.storage.retry import RetryBudget, StorageUnavailableError, is_transient
from mtlora_dist.storage.shard_cache import CacheEntryWriter, ShardCache

__all__ = ["STAT_KEYS", "StreamConfig", "ShardStream", "labels_missing_key", "stat_keys"]

log = logging.getLogger(__name__)

STAT_KEYS = (
    "samples_read",  # raw samples read from shards
    "samples_yielded",  # samples placed in batches (padding copies included)
    "samples_skipped",  # read but unusable: corrupt member, missing task member
    "samples_missing",  # listed in the manifest but never read: failed or truncated shards
    "samples_padded",  # copies placed in batches (evaluation padding, stand-ins for failures)
    "samples_resume_skipped",  # consumed before a resume, skipped undecoded
    "shards_opened",  # shards opened on their storage (cache hits not included)
    "bytes_read",  # bytes read from the shards' storage (cache hits not included)
    "shards_from_cache",  # shards read from the local shard cache
    "shards_failed",
    "retries",
)


def labels_missing_key(task: str) -> str:
    """The stats counter of samples that had no ``task`` label (partial labels)."""
    return f"labels_missing/{task}"


def stat_keys(tasks: Sequence[str]) -> tuple[str, ...]:
    """Every counter a loader over ``tasks`` reports (the same on every rank, so they can be summed)."""
    return STAT_KEYS + tuple(labels_missing_key(t) for t in tasks)


_DATA_ERRORS = (tarfile.TarError, ShardError, EOFError, zlib.error)


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to produce its batches; plain data, so it pickles into workers."""

    manifest: Manifest
    tasks: tuple[str, ...]
    img_size: tuple[int, int]
    batch_size: int
    world_size: int
    rank: int
    num_workers: int
    seed: int
    shuffle: bool
    augment: bool
    drop_last: bool
    protocol: str
    on_error: str
    storage: StorageOptions = field(default_factory=StorageOptions)
    shuffle_buffer: int = 128  # evaluation with shuffling only
    accumulation: int = 1  # gradient accumulation: global batch = batch_size * accumulation * world_size
    # training: the global batches epoch ``switch_epoch`` was trained with before this one (plan.epoch_order)
    switches: tuple[tuple[int, int], ...] = ()
    switch_epoch: int = -1
    prefetch_samples: int = 16
    max_consecutive_failures: int = 3
    verify_checksums: bool = True
    decoders: Decoders = field(default_factory=Decoders)
    resampling: Resampling = field(default_factory=Resampling)
    reduced_decode: bool = True  # decode the JPEG at 1/2..1/8 size when the warp shrinks it that much anyway
    augment_on_device: bool = False  # workers decode only; the loader warps batches on the training device
    cache_dir: str | None = None
    cache_max_bytes: int = 0

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


class _ShardReader(threading.Thread):
    """Reads the needed samples of a list of shard segments, in order, into a bounded queue.

    Delivers exactly one event per needed sample: ``("sample", shard, idx, key, members)`` or
    ``("missing", shard, idx, reason)``; when whole shards are verified, the samples of a shard come
    together as ``("bundle", [sample events])`` once it checked out. Or ``("error", exc)`` and stops.
    Ends with ``("done",)``.
    """

    def __init__(self, cfg: StreamConfig, segments: list[tuple[int, list[int]]]) -> None:
        super().__init__(daemon=True, name="mtlora-shard-reader")
        self.cfg = cfg
        self.segments = segments
        self.ranged = cfg.range_reads
        bundles = cfg.checks_shards and not self.ranged  # one ("bundle", events) per shard: one waits at most
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
                if isinstance(exc, FileNotFoundError):
                    message, error = f"shard {url} listed in the manifest does not exist ({exc})", ShardError
                elif is_transient(exc):
                    message, error = str(budget.unavailable(exc)), StorageUnavailableError
                else:
                    message = (
                        f"cannot read shard {url}: {type(exc).__name__}: {exc}; check the credentials and "
                        "the bucket's permissions"
                    )
                    error = StorageUnavailableError
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
        if self.ranged:
            return self._read_ranges(shard, url, idxs, progress)
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

    def _read_ranges(self, shard: int, url: str, idxs: list[int], progress: list[int]) -> None:
        """Read just the samples ``idxs[progress:]`` of an indexed shard: one ranged read per run of
        consecutive samples (in chunks), each sample checked against its digest, then parsed alone."""
        info = self.cfg.manifest.shards[shard]
        fs, path = url_to_fs(url, self.cfg.storage)
        with fs.open(path, "rb", block_size=self.cfg.storage.block_size, cache_type="none") as f:
            self.stats["shards_opened"] += 1
            for first, last in _runs(idxs[progress[0] :]):
                for idx, data in self._run_bytes(f, url, info, first, last):
                    self.stats["samples_read"] += 1
                    event = self._parse(shard, url, info, idx, data)
                    progress[0] += 1  # before the put: a retry resumes after this sample
                    self._put(event)

    def _run_bytes(self, f: IO[bytes], url: str, info: ShardInfo, first: int, last: int) -> Iterator[tuple[int, bytes]]:
        """``(index, bytes)`` of samples ``first..last``, read from storage in chunks of at most ``block_size``."""
        offsets, chunk = info.offsets, max(1, self.cfg.storage.block_size)
        end = offsets[last + 1]
        f.seek(offsets[first])
        pos, buf, at = offsets[first], b"", 0
        for idx in range(first, last + 1):
            need = offsets[idx + 1] - offsets[idx]
            while len(buf) - at < need:
                data = f.read(min(chunk, end - pos))
                if not data:
                    raise self._truncated(url, info)
                self.stats["bytes_read"] += len(data)
                pos += len(data)
                buf, at = buf[at:] + data, 0
            yield idx, buf[at : at + need]
            at += need

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
            self.stats["samples_skipped"] += 1
            log.warning("skipping a bad sample: %s", message)
            return ("missing", shard, idx, message)
        key, members = samples[0]
        return ("sample", shard, idx, key, members)

    def _truncated(self, url: str, info: ShardInfo) -> ShardError:
        size = self._size(url)
        whole = bisect.bisect_right(info.offsets, size) - 1  # samples whose bytes are all there
        return ShardError(
            f"shard {url} is truncated: the tar ended after {max(0, whole)} sample(s) but the manifest lists "
            f"{info.num_samples} (the object is {size} bytes, the manifest says {info.bytes})"
        )

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


@contextmanager
def _one_thread() -> Iterator[None]:
    """Decode/augment on one thread in the main process (workers already are single-threaded)."""
    if get_worker_info() is not None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenCV always runs on one thread (see transforms)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class ShardStream(IterableDataset):
    """Batches of one epoch for one rank; each DataLoader worker yields its share (see ``plan``).

    The position (epoch, batches consumed) lives in a shared-memory tensor: a persistent DataLoader
    worker keeps the copy of this object it started with, so attributes set in the main process after
    that would never reach it, but the tensor's storage is shared. The loader sets the position before
    each ``iter(DataLoader)``; every worker reads it once per ``__iter__`` (the DataLoader calls that in
    each worker when a new iteration starts) and uses that snapshot for the whole epoch.
    """

    def __init__(self, cfg: StreamConfig, epoch: int = 0, batches_consumed: int = 0) -> None:
        self.cfg = cfg
        self._position = torch.tensor([int(epoch), int(batches_consumed)], dtype=torch.int64).share_memory_()

    def set_position(self, epoch: int, batches_consumed: int) -> None:
        """Where the next ``__iter__`` (in this process or in any worker) starts."""
        self._position.copy_(torch.tensor([int(epoch), int(batches_consumed)], dtype=torch.int64))

    @property
    def position(self) -> tuple[int, int]:
        epoch, consumed = self._position.tolist()
        return int(epoch), int(consumed)

    @property
    def epoch(self) -> int:
        return self.position[0]

    @property
    def batches_consumed(self) -> int:
        return self.position[1]

    def plan(self, worker: int, epoch: int | None = None, batches_consumed: int | None = None) -> WorkerPlan:
        cfg = self.cfg
        now_epoch, now_consumed = self.position
        return make_worker_plan(
            cfg.manifest.num_samples,
            world_size=cfg.world_size,
            rank=cfg.rank,
            num_workers=max(1, cfg.num_workers),
            worker=worker,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            epoch=now_epoch if epoch is None else epoch,
            shuffle=cfg.shuffle,
            drop_last=cfg.drop_last,
            shuffle_buffer=cfg.shuffle_buffer,
            batches_consumed=now_consumed if batches_consumed is None else batches_consumed,
            accumulation=cfg.accumulation,
            switches=cfg.switches if (now_epoch if epoch is None else epoch) == cfg.switch_epoch else (),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, consumed = self.position  # one snapshot for the whole epoch
        info = get_worker_info()
        if info is None:
            return self._batches(self.plan(0, epoch, consumed), epoch)
        # The DataLoader collects round robin starting at its worker 0, but the next batch of a resumed
        # epoch (number c) belongs to plan worker c % K: rotate so that DataLoader worker 0 plays it.
        return self._batches(self.plan((info.id + consumed) % info.num_workers, epoch, consumed), epoch)

    # ------------------------------------------------------------------------------------------ worker

    def _prepare(self, event: tuple, valid: bool, epoch: int) -> dict[str, Any]:
        _, shard, idx, key, members = event
        cfg = self.cfg
        url = cfg.manifest.shard_url(shard)
        optional = cfg.manifest.optional_tasks
        if not cfg.augment:
            sample = decode_sample(key, members, cfg.tasks, shard=url, decoders=cfg.decoders, optional=optional)
            with _one_thread():
                out = eval_transform(sample, cfg.tasks, cfg.img_size, cfg.protocol, cfg.resampling)
            out.update(valid=valid, labeled=sample["labeled"])
            return out
        # the warp depends only on (seed, epoch, sample), wherever it is applied: resumes stay exact
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, epoch, shard, idx, 0xA06]))
        warp = sample_warp(augment_for(cfg.manifest.dataset), rng)
        sample = decode_sample(
            key,
            members,
            cfg.tasks,
            shard=url,
            decoders=cfg.decoders,
            image_min_hw=self._reduced_size(members, warp),
            optional=optional,
        )
        if cfg.augment_on_device:
            sample.update(warp=warp, valid=valid)
            return sample
        with _one_thread():
            out = warp_sample(sample, cfg.tasks, cfg.img_size, warp, cfg.resampling)
        out.update(valid=valid, labeled=sample["labeled"])
        return out

    def _reduced_size(self, members: dict[str, bytes], warp: Warp) -> tuple[int, int] | None:
        """How small the JPEG may be decoded: only when the warp shrinks it 2x or more anyway."""
        if not (self.cfg.reduced_decode and self.cfg.decoders.jpeg == "simplejpeg"):
            return None
        full = jpeg_size(members.get(IMAGE_SUFFIX, b""))
        return reduced_image_size(full, self.cfg.img_size, warp) if full else None

    def _samples(
        self, plan: WorkerPlan, reader: _ShardReader, slots: list[tuple[int, int]], stats: Counter[str], epoch: int
    ) -> Iterator[dict[str, Any]]:
        """Transformed samples in plan order; a lost one is replaced by a marked copy of a good one."""
        events = _Pending(reader, slots)
        good: tuple | None = None  # the last event that decoded
        owed = 0  # failures before the first good sample: filled once one arrives
        for slot, valid in zip(slots, plan.valid, strict=True):
            event = events.take(slot)
            out = None
            if event[0] == "sample":
                try:
                    out = self._prepare(event, valid, epoch)
                except SampleDecodeError as exc:  # names the shard and the sample
                    if self.cfg.on_error == "raise":
                        raise DataError(f"bad sample: {exc}") from exc
                    stats["samples_skipped"] += 1
                    log.warning("skipping a bad sample: %s", exc)
            if out is not None:
                good = event
                yield out
                for _ in range(owed):
                    yield self._prepare(good, False, epoch)
                owed = 0
            elif good is not None:
                yield self._prepare(good, False, epoch)
            else:
                owed += 1
        if owed:
            raise TooManyFailuresError(
                f"rank {self.cfg.rank}: no sample of this worker's share of epoch {epoch} could be read; "
                "see the warnings above for the shards and causes"
            )

    def _batches(self, plan: WorkerPlan, epoch: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        order = shard_order(len(cfg.manifest.shards), cfg.seed, epoch, cfg.shuffle)
        slots = locate(plan.positions, [s.num_samples for s in cfg.manifest.shards], order)
        reader = _ShardReader(cfg, _segments(slots))
        reader.start()
        stats: Counter[str] = Counter(samples_resume_skipped=plan.skipped)
        reported: Counter[str] = Counter()
        try:
            samples = self._samples(plan, reader, slots, stats, epoch)
            for size in plan.batch_sizes:
                items = [next(samples) for _ in range(size)]
                stats["samples_yielded"] += size
                stats["samples_padded"] += sum(1 for s in items if not s["valid"])
                for task in cfg.tasks:  # real samples only: padding copies are not data
                    stats[labels_missing_key(task)] += sum(1 for s in items if s["valid"] and not s["labeled"][task])
                batch = (collate_decoded if cfg.augment and cfg.augment_on_device else collate)(items, cfg.tasks)
                delta = {k: int(stats[k] + reader.stats.get(k, 0) - reported[k]) for k in stat_keys(cfg.tasks)}
                reported.update(delta)
                batch["__stats__"] = delta  # the loader adds these up in the main process
                yield batch
        finally:
            reader.stop()


def _runs(idxs: list[int]) -> Iterator[tuple[int, int]]:
    """``(first, last)`` of each run of consecutive indices in the sorted ``idxs``."""
    start = 0
    for i in range(1, len(idxs) + 1):
        if i == len(idxs) or idxs[i] != idxs[i - 1] + 1:
            yield idxs[start], idxs[i - 1]
            start = i


def _segments(slots: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """``(shard, sorted indices)`` to read: each shard once, in the order the plan first needs it."""
    needed: dict[int, set[int]] = {}
    for shard, idx in slots:
        needed.setdefault(shard, set()).add(idx)
    return [(shard, sorted(idxs)) for shard, idxs in needed.items()]


class _Pending:
    """Reader events kept until every slot that needs them (padding may repeat one) was served."""

    def __init__(self, reader: _ShardReader, slots: list[tuple[int, int]]) -> None:
        self.reader = reader
        self.uses = Counter(slots)
        self.events: dict[tuple[int, int], tuple] = {}

    def take(self, slot: tuple[int, int]) -> tuple:
        while slot not in self.events:
            try:
                event = self.reader.events.get(timeout=1.0)
            except queue.Empty:
                if not self.reader.is_alive():
                    raise DataError("the shard reader thread ended without a reason") from None
                continue
            if event[0] == "error":
                raise event[1]
            if event[0] == "done":
                raise DataError(f"the shard reader finished without sample {slot} (planning bug)")
            for item in event[1] if event[0] == "bundle" else (event,):
                self.events[(item[1], item[2])] = item
        self.uses[slot] -= 1
        return self.events[slot] if self.uses[slot] else self.events.pop(slot)
