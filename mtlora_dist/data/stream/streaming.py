"""Streaming shards into augmented batches inside one DataLoader worker (or the main process): the sample side.

Each worker follows its :class:`~mtlora_dist.data.stream.plan.WorkerPlan`: a
:class:`~mtlora_dist.data.stream.range_reader.RangeReader` fetches the samples it needs in delivery
order, at most ``read.buffer_mb`` ahead (indexed manifests; whole shards without the index:
:class:`~mtlora_dist.data.stream.reader.ShardReader`; checksums, retries, cache: see those modules), and
the worker thread emits samples in the planned order, decodes, transforms and collates them. Samples before the resume point are dropped as
raw bytes, never decoded. With ``decode.augment_device="device"`` the worker only decodes (and draws each sample's
warp); the loader warps the batch on the training device (``transforms.warp_batch``).

Memory: with the index a worker holds at most ``read.buffer_mb`` of raw samples ahead of delivery,
at any dataset size; reading whole shards, it holds the samples it still needs from the shards it has
read (up to its share of the epoch). ``stats["read_held_peak"]`` reports the peak (``docs/data.md``).

Counters travel with the batches; when a worker fails, what it counted up to the failure (retries,
missing samples) goes to the loader just before the error does.

Failures (``on_error``): a sample that does not decode or lacks a task's member is ``"raise"``: an error
naming the shard and sample; ``"skip"``: counted (``samples_skipped``), logged as a warning, and its
slot (like that of a sample the reader reported missing) is filled with a copy of a good one marked
``valid=False`` so every rank still yields the same number of batches. A worker left without any
readable sample is an error even when skipping.
"""

from __future__ import annotations

import logging
import queue
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mtlora_dist.data.config import BatchGeometry, DataWorld, DecodeConfig, OrderConfig, ReadConfig
from mtlora_dist.data.errors import DataError, SampleDecodeError, TooManyFailuresError
from mtlora_dist.data.shards.encoding import IMAGE_SUFFIX, Decoders, decode_sample, jpeg_size
from mtlora_dist.data.shards.manifest import Manifest
from mtlora_dist.data.stream.batch import collate, collate_decoded
from mtlora_dist.data.stream.plan import WorkerPlan, locate, make_worker_plan, shard_order
from mtlora_dist.data.stream.range_reader import RangeReader
from mtlora_dist.data.stream.reader import ReaderConfig, ShardReader, segments
from mtlora_dist.data.stream.stats import STAT_KEYS, labels_missing_key, stat_keys
from mtlora_dist.data.stream.transforms import (
    Resampling,
    Warp,
    augment_for,
    eval_transform,
    reduced_image_size,
    sample_warp,
    warp_sample,
)
from mtlora_dist.storage.fs import StorageOptions

__all__ = ["STAT_KEYS", "ShardStream", "StreamConfig", "labels_missing_key", "stat_keys"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to produce its batches; plain data, so it pickles into workers.

    ``geometry`` is the batch layout this loader yields (evaluation: its batch size, no accumulation);
    ``order``, ``read`` and ``decode`` are the ``data`` config's sections, as configured."""

    manifest: Manifest
    tasks: tuple[str, ...]
    img_size: tuple[int, int]
    world: DataWorld
    geometry: BatchGeometry
    seed: int
    shuffle: bool
    augment: bool
    drop_last: bool
    protocol: str
    storage: StorageOptions = field(default_factory=StorageOptions)
    order: OrderConfig = field(default_factory=OrderConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    decoders: Decoders = field(default_factory=Decoders)  # decode.jpeg/png, with PIL for what is not installed
    # training: the global batches epoch ``switch_epoch`` was trained with before this one (plan.epoch_order)
    switches: tuple[tuple[int, int], ...] = ()
    switch_epoch: int = -1

    @property
    def resampling(self) -> Resampling:
        return Resampling(self.decode.resampler, self.decode.normals_resampling)

    @property
    def augment_on_device(self) -> bool:
        """Workers decode only; the loader warps batches on the training device (training only)."""
        return self.augment and self.decode.augment_device == "device"

    def reader_config(self) -> ReaderConfig:
        """The byte reader's part of this config."""
        return ReaderConfig.of(self.manifest, self.read, self.storage)


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
        self._held_peak = 0  # the most bytes this worker's reader held ahead of delivery, over its epochs
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
            cfg.geometry,
            rank=cfg.world.rank,
            num_workers=max(1, cfg.world.num_workers),
            worker=worker,
            seed=cfg.seed,
            epoch=now_epoch if epoch is None else epoch,
            shuffle=cfg.shuffle,
            drop_last=cfg.drop_last,
            shuffle_buffer=cfg.order.shuffle_buffer,
            batches_consumed=now_consumed if batches_consumed is None else batches_consumed,
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
        if not (self.cfg.decode.reduced_decode and self.cfg.decoders.jpeg == "simplejpeg"):
            return None
        full = jpeg_size(members.get(IMAGE_SUFFIX, b""))
        return reduced_image_size(full, self.cfg.img_size, warp) if full else None

    def _samples(
        self,
        plan: WorkerPlan,
        events: RangeReader | _Pending,
        slots: list[tuple[int, int]],
        stats: Counter[str],
        epoch: int,
    ) -> Iterator[dict[str, Any]]:
        """Transformed samples in plan order; a lost one is replaced by a marked copy of a good one."""
        good: tuple | None = None  # the last event that decoded
        owed = 0  # failures before the first good sample: filled once one arrives
        for slot, valid in zip(slots, plan.valid, strict=True):
            event = events.take(slot)
            out = None
            if event[0] == "sample":
                try:
                    out = self._prepare(event, valid, epoch)
                except SampleDecodeError as exc:  # names the shard and the sample
                    if self.cfg.read.on_error == "raise":
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
                f"rank {self.cfg.world.rank}: no sample of this worker's share of epoch {epoch} could be read; "
                "see the warnings above for the shards and causes"
            )

    def _batches(self, plan: WorkerPlan, epoch: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        order = shard_order(len(cfg.manifest.shards), cfg.seed, epoch, cfg.shuffle)
        slots = locate(plan.positions, [s.num_samples for s in cfg.manifest.shards], order)
        reader_cfg = cfg.reader_config()
        if reader_cfg.range_reads:  # in delivery order, within the read buffer
            reader: RangeReader | ShardReader = RangeReader(reader_cfg, slots, dict.fromkeys(STAT_KEYS, 0))
            events: RangeReader | _Pending = reader
        else:  # whole shards, each once, in the order first needed; samples held until their turn
            reader = ShardReader(reader_cfg, segments(slots))
            events = _Pending(reader, slots)
        reader.start()
        stats: Counter[str] = Counter(samples_resume_skipped=plan.skipped)
        reported: Counter[str] = Counter()
        held_before = self._held_peak

        def unreported() -> dict[str, int]:
            self._held_peak = max(self._held_peak, events.peak_held)
            stats["read_held_peak"] = self._held_peak - held_before  # a worker's peak over all its epochs
            delta = {k: int(stats[k] + reader.stats.get(k, 0) - reported[k]) for k in stat_keys(cfg.tasks)}
            reported.update(delta)
            return delta

        try:
            samples = self._samples(plan, events, slots, stats, epoch)
            for size in plan.batch_sizes:
                items = [next(samples) for _ in range(size)]
                stats["samples_yielded"] += size
                stats["samples_padded"] += sum(1 for s in items if not s["valid"])
                for task in cfg.tasks:  # real samples only: padding copies are not data
                    stats[labels_missing_key(task)] += sum(1 for s in items if s["valid"] and not s["labeled"][task])
                batch = (collate_decoded if cfg.augment and cfg.augment_on_device else collate)(items, cfg.tasks)
                batch["__stats__"] = unreported()  # the loader adds these up in the main process
                yield batch
        except Exception:
            # the counters up to the failure (retries, missing samples) reach the loader before the error
            # does: they otherwise travel only with delivered batches
            yield {"__stats__": unreported(), "__failing__": True}
            raise
        finally:
            reader.stop()


class _Pending:
    """Reader events kept until every slot that needs them (padding may repeat one) was served.

    Whole-shard reading only: a shard's samples arrive together, so this holds every sample still needed
    from the shards read so far (up to the worker's share of the epoch); ``peak_held`` counts their bytes.
    """

    def __init__(self, reader: ShardReader, slots: list[tuple[int, int]]) -> None:
        self.reader = reader
        self.uses = Counter(slots)
        self.events: dict[tuple[int, int], tuple] = {}
        self.held = 0
        self.peak_held = 0

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
                self.held += _event_bytes(item)
            self.peak_held = max(self.peak_held, self.held)
        self.uses[slot] -= 1
        if self.uses[slot]:
            return self.events[slot]
        event = self.events.pop(slot)
        self.held -= _event_bytes(event)
        return event


def _event_bytes(event: tuple) -> int:
    """Bytes of a sample event's members (a ``missing`` event holds none)."""
    return sum(len(v) for v in event[4].values()) if event[0] == "sample" else 0
