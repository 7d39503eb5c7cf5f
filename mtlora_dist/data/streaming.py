"""Streaming shards into augmented batches inside one DataLoader worker (or the main process).

Each worker follows its :class:`~mtlora_dist.data.plan.WorkerPlan`: a background thread reads the
shards it needs in order through fsspec (so network reads overlap with decoding), and the worker
thread emits samples in the planned order, decodes, transforms and collates them. Samples before the
resume point are dropped as raw bytes, never decoded.

Failures (``on_error``):

* a network error is retried ``read_retries`` times with exponential backoff, resuming the shard at
  the first sample not yet delivered; then the shard fails as *unreachable*;
* a corrupt or truncated shard (including a tar that simply ends early: the count is compared with
  the manifest), a missing shard or a sample that does not decode or lacks a task's member fail
  without retry;
* ``"raise"``: the first failure is an error naming the shard (and sample) and the cause;
* ``"skip"``: the failure is counted in the stats (``samples_skipped``/``samples_missing``,
  ``shards_failed``), logged as a warning, and the sample's slot is filled with a copy of a good one
  marked ``valid=False`` so every rank still yields the same number of batches. ``max_consecutive_failures``
  shards in a row failing on storage errors (server gone) is an error even when skipping, as is a
  worker left without any readable sample.
"""

from __future__ import annotations

import logging
import queue
import tarfile
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

import mtlora_dist.storage.wds  # noqa: F401  (registers s3:// for webdataset in every worker)
from mtlora_dist.data.batch import collate
from mtlora_dist.data.encoding import decode_sample
from mtlora_dist.data.errors import DataError, SampleDecodeError, ShardError, TooManyFailuresError
from mtlora_dist.data.manifest import Manifest
from mtlora_dist.data.plan import WorkerPlan, locate, make_worker_plan, shard_order
from mtlora_dist.data.tarshards import iter_tar_samples
from mtlora_dist.data.transforms import AUGMENT, eval_transform, train_transform
from mtlora_dist.storage.fs import StorageOptions, cached_fs
from mtlora_dist.storage.retry import StorageUnavailableError, backoff_delays, is_transient, unreachable_message

__all__ = ["STAT_KEYS", "StreamConfig", "ShardStream"]

log = logging.getLogger(__name__)

STAT_KEYS = (
    "samples_read",           # raw samples read from shards
    "samples_yielded",        # samples placed in batches (padding copies included)
    "samples_skipped",        # read but unusable: corrupt member, missing task member
    "samples_missing",        # listed in the manifest but never read: failed or truncated shards
    "samples_padded",         # copies placed in batches (evaluation padding, stand-ins for failures)
    "samples_resume_skipped",  # consumed before a resume, skipped undecoded
    "shards_opened",
    "shards_failed",
    "retries",
)
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
    shuffle_buffer: int = 128
    prefetch_samples: int = 16
    max_consecutive_failures: int = 3


class _Stop(Exception):
    """The consumer went away; the reader thread ends quietly."""


class _ShardReader(threading.Thread):
    """Reads the needed samples of a list of shard segments, in order, into a bounded queue.

    Puts exactly one event per needed sample: ``("sample", shard, idx, key, members)`` or
    ``("missing", shard, idx, reason)``; or ``("error", exc)`` and stops. Ends with ``("done",)``.
    """

    def __init__(self, cfg: StreamConfig, segments: list[tuple[int, list[int]]]) -> None:
        super().__init__(daemon=True, name="mtlora-shard-reader")
        self.cfg = cfg
        self.segments = segments
        self.events: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch_samples))
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
        delays = backoff_delays(self.cfg.storage.read_retries, self.cfg.storage.retry_delay_s)
        progress = [0]  # how many of idxs were delivered: a retry resumes there
        attempt, progress_at_failure = 0, 0
        while True:
            try:
                self._stream(shard, url, idxs, progress)
                self._consecutive_failures = 0
                return
            except _Stop:
                raise
            except _DATA_ERRORS as exc:
                message = str(exc) if isinstance(exc, ShardError) else f"corrupt shard {url}: {type(exc).__name__}: {exc}"
                return self._fail(shard, idxs, progress[0], message, ShardError, storage=False)
            except Exception as exc:  # noqa: BLE001 - classified: transient is retried, the rest fails
                if progress[0] > progress_at_failure:  # it got further this time: a fresh set of retries
                    attempt, progress_at_failure = 0, progress[0]
                if is_transient(exc) and attempt < len(delays):
                    self.stats["retries"] += 1
                    log.warning("reading %s failed (%s: %s); retry %d/%d in %.1f s", url, type(exc).__name__, exc,
                                attempt + 1, len(delays), delays[attempt])
                    if self.stopping.wait(delays[attempt]):
                        raise _Stop from None
                    attempt += 1
                    continue
                if isinstance(exc, FileNotFoundError):
                    message, error = f"shard {url} listed in the manifest does not exist ({exc})", ShardError
                elif is_transient(exc):
                    message, error = unreachable_message(url, exc, attempt + 1, self.cfg.storage), StorageUnavailableError
                else:
                    message = (f"cannot read shard {url}: {type(exc).__name__}: {exc}; check the credentials and "
                               "the bucket's permissions")
                    error = StorageUnavailableError
                return self._fail(shard, idxs, progress[0], message, error, storage=True)

    def _stream(self, shard: int, url: str, idxs: list[int], progress: list[int]) -> None:
        info = self.cfg.manifest.shards[shard]
        fs, path = cached_fs(url, self.cfg.storage)
        seen = 0
        with fs.open(path, "rb", block_size=self.cfg.storage.block_size) as f:
            self.stats["shards_opened"] += 1
            for i, (key, members) in enumerate(iter_tar_samples(f)):
                seen = i + 1
                if progress[0] == len(idxs):
                    raise ShardError(
                        f"shard {url} holds more than the {info.num_samples} samples its manifest lists: the "
                        "manifest is stale; re-run the conversion"
                    )
                if i < idxs[progress[0]]:
                    continue  # not ours, or consumed before a resume: dropped undecoded
                self._put(("sample", shard, i, key, members))
                self.stats["samples_read"] += 1
                progress[0] += 1
                if progress[0] == len(idxs) and idxs[-1] != info.num_samples - 1:
                    return  # the rest of the shard is someone else's
            if progress[0] < len(idxs):
                size = fs.size(path)
                detail = (f"the object is {size} bytes, the manifest says {info.bytes}" if size != info.bytes
                          else "the tar ends early: corrupt content")
                raise ShardError(
                    f"shard {url} is truncated: the tar ended after {seen} sample(s) but the manifest lists "
                    f"{info.num_samples} ({detail})"
                )

    def _fail(self, shard: int, idxs: list[int], done: int, message: str, error: type[Exception], storage: bool) -> None:
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
    torch.set_num_threads(1)
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
            cfg.manifest.num_samples, world_size=cfg.world_size, rank=cfg.rank,
            num_workers=max(1, cfg.num_workers), worker=worker, batch_size=cfg.batch_size, seed=cfg.seed,
            epoch=now_epoch if epoch is None else epoch, shuffle=cfg.shuffle, drop_last=cfg.drop_last,
            shuffle_buffer=cfg.shuffle_buffer,
            batches_consumed=now_consumed if batches_consumed is None else batches_consumed,
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
        sample = decode_sample(key, members, cfg.tasks)
        with _one_thread():
            if cfg.augment:
                rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, epoch, shard, idx, 0xA06]))
                out = train_transform(sample, cfg.tasks, cfg.img_size, AUGMENT[cfg.manifest.dataset], rng)
            else:
                out = eval_transform(sample, cfg.tasks, cfg.img_size, cfg.protocol)
        out["valid"] = valid
        return out

    def _samples(self, plan: WorkerPlan, reader: _ShardReader, slots: list[tuple[int, int]],
                 stats: Counter[str], epoch: int) -> Iterator[dict[str, Any]]:
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
                except SampleDecodeError as exc:
                    url = self.cfg.manifest.shard_url(slot[0])
                    if self.cfg.on_error == "raise":
                        raise DataError(f"bad sample in shard {url}: {exc}") from exc
                    stats["samples_skipped"] += 1
                    log.warning("skipping a sample of shard %s: %s", url, exc)
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
        reader = _ShardReader(cfg, _segments(slots, order))
        reader.start()
        stats: Counter[str] = Counter(samples_resume_skipped=plan.skipped)
        reported: Counter[str] = Counter()
        try:
            samples = self._samples(plan, reader, slots, stats, epoch)
            for size in plan.batch_sizes:
                items = [next(samples) for _ in range(size)]
                stats["samples_yielded"] += size
                stats["samples_padded"] += sum(1 for s in items if not s["valid"])
                batch = collate(items, cfg.tasks)
                delta = {k: int(stats[k] + reader.stats[k] - reported[k]) for k in STAT_KEYS}
                reported.update(delta)
                batch["__stats__"] = delta  # the loader adds these up in the main process
                yield batch
        finally:
            reader.stop()


def _segments(slots: list[tuple[int, int]], order: np.ndarray) -> list[tuple[int, list[int]]]:
    """``(shard, sorted indices)`` to read, in the epoch's shard order (each sample once)."""
    rank_of = {int(s): r for r, s in enumerate(order)}
    segments: list[tuple[int, list[int]]] = []
    for shard, idx in sorted(set(slots), key=lambda si: (rank_of[si[0]], si[1])):
        if not segments or segments[-1][0] != shard:
            segments.append((shard, []))
        segments[-1][1].append(idx)
    return segments


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
            self.events[(event[1], event[2])] = event
        self.uses[slot] -= 1
        return self.events[slot] if self.uses[slot] else self.events.pop(slot)
