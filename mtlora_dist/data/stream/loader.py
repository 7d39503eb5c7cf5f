"""The data loader the trainer uses: shards -> augmented batches, one epoch at a time, resumable.

Policies (details in ``docs/data.md``):

* **Equal batches on every rank.** ``len(loader)`` is derived from the manifest alone and is the same on
  every rank. Training drops fewer than one global batch (``batch_size * accumulation * world_size``)
  of samples per epoch (a different set each epoch; logged at start-up, a warning above 5%); evaluation pads ranks that are one sample short with a copy marked ``valid=False`` and
  may end with a smaller batch (the same size on every rank). A sample that cannot be read while
  skipping errors is replaced by a copy of a good one, also ``valid=False``, so the count never changes.
* **Exact, elastic resume.** The position is ``(epoch, global batches consumed)``; the training order of
  an epoch is a pure function of ``(seed, epoch, manifest, global batch, shuffle_block, shuffle_interleave)`` (``plan.py``),
  never of the number of ranks, workers or the micro-batch split, so a restored loader yields exactly
  the batches the interrupted run would have, on any world size with the same global batch. Resuming
  under another order is refused (``strict=True``) or restarts at the next epoch boundary
  (``strict=False``). Evaluation loaders order by rank and worker and are not checkpointed.
* **Epochs.** ``set_epoch(e)`` moves to epoch ``e`` (keeping the position if ``e`` is already the
  current epoch, so a restored loader resumes mid-epoch under the usual ``for epoch: set_epoch(epoch)``
  loop); iterating again after a finished epoch moves on to the next one by itself.
* **Workers.** One ``DataLoader`` per loader, made on first use, with persistent workers: they start
  once and stay alive across epochs. Each worker reads the position the loader sets before every
  iteration from shared memory (see :class:`~mtlora_dist.data.stream.streaming.ShardStream`), so epochs,
  ``set_epoch`` and ``load_state_dict`` reach workers that were started earlier. ``num_workers=None``
  sizes the count from the CPUs (:func:`default_num_workers`); batches are pinned when the device is
  CUDA (:func:`should_pin_memory`) so the trainer's ``non_blocking`` copies are asynchronous. Workers
  ignore SIGINT and SIGUSR1 and take SIGTERM only from their own process
  (:mod:`~mtlora_dist.data.stream.worker_signals`): a stop signal sent to the whole process group (Ctrl-C, a
  launcher terminating its process tree, SLURM's warning signal) is the main process's to handle, and
  torch's own shutdown of the workers still works.
* **Augmentation on the training device** (``augment_device="device"``): workers only decode and
  draw each sample's warp (from ``(seed, epoch, sample)``, as on the CPU path, so resume stays exact);
  the loader's iterator moves each batch to ``device`` and warps it there in one batched pass
  (``transforms.warp_batch``), yielding the same batch format, already on the device. On a CPU-only
  machine the same code runs in the main process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtlora_dist.data.errors import DataError
from mtlora_dist.data.shards.encoding import Decoders
from mtlora_dist.data.shards.manifest import Manifest, read_manifest
from mtlora_dist.data.stream.batch import LABELED
from mtlora_dist.data.stream.plan import batches_per_rank
from mtlora_dist.data.stream.streaming import ShardStream, StreamConfig, stat_keys
from mtlora_dist.data.stream.transforms import Resampling, warp_batch
from mtlora_dist.data.stream.worker_signals import shield_worker_from_stop_signals
from mtlora_dist.storage.fs import StorageOptions
from mtlora_dist.tasks.registry import check_tasks, get_dataset

__all__ = [
    "ShardLoader",
    "build_loader",
    "STATE_VERSION",
    "available_cpus",
    "local_world_size",
    "default_num_workers",
    "should_pin_memory",
]

log = logging.getLogger(__name__)
STATE_VERSION = 2
MAX_AUTO_WORKERS = 8
UNUSED_WARN_FRACTION = 0.05  # drop_last leaving more of an epoch out than this is worth a warning


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what SLURM and cgroup cpusets restrict) where
    the platform has one, else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Ranks sharing this machine's CPUs: ``LOCAL_WORLD_SIZE`` (torchrun), else ``LOCAL_SIZE`` (the
    deepspeed launcher sets only that one), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


def default_num_workers(cpus: int | None = None, local_ranks: int | None = None) -> int:
    """Workers per loader when ``num_workers`` is automatic: the CPUs of one rank minus one for the
    training process, at least 1 and at most ``MAX_AUTO_WORKERS``, and never more than the CPUs this
    rank has (``cpus``: :func:`available_cpus`; ``local_ranks``: :func:`local_world_size`)."""
    cpus = available_cpus() if cpus is None else max(1, int(cpus))
    local_ranks = local_world_size() if local_ranks is None else max(1, int(local_ranks))
    per_rank = max(1, cpus // local_ranks)
    return max(1, min(MAX_AUTO_WORKERS, per_rank - 1))


def should_pin_memory(pin_memory: bool | None = None) -> bool:
    """Whether batches are pinned: ``pin_memory`` when given, else whether CUDA is available (the
    trainer trains on CUDA whenever it is, and pinned batches make its ``non_blocking`` copies
    asynchronous; on the CPU pinning would only cost time)."""
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)


class ShardLoader:
    """Iterable over the batches of one epoch for one rank; see the module docstring."""

    def __init__(
        self,
        cfg: StreamConfig,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        auto_workers: bool = False,
        device: torch.device | str | None = None,
        sample_log: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.prefetch_factor = prefetch_factor
        self.pin_memory = bool(pin_memory)
        self.auto_workers = auto_workers  # the worker count was chosen for this machine, not by the user
        self._device = torch.device(device) if device is not None else None
        self.sample_log = sample_log  # a folder: rank<r>.jsonl gets the keys of every batch yielded
        self._epoch = 0
        self._consumed = 0
        self._stats = dict.fromkeys(stat_keys(cfg.tasks), 0)
        self._stream: ShardStream | None = None
        self._loader: DataLoader | None = None

    @property
    def device(self) -> torch.device:
        """Where batches are warped with ``augment_device="device"``: as given, else the current CUDA
        device, else the CPU (resolved on first use)."""
        if self._device is None:
            self._device = _default_device()
        return self._device

    @property
    def num_workers(self) -> int:
        return self.cfg.num_workers

    @property
    def manifest(self) -> Manifest:
        return self.cfg.manifest

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counters of this loader (``streaming.STAT_KEYS``, and ``labels_missing/<task>``: samples
        without that task's label); per rank, not reduced."""
        return dict(self._stats)

    def __len__(self) -> int:
        cfg = self.cfg
        return batches_per_rank(
            cfg.manifest.num_samples, cfg.world_size, cfg.batch_size, cfg.drop_last, cfg.accumulation
        )

    @property
    def global_batch(self) -> int:
        """Samples of one optimizer step over all ranks: micro-batch x accumulation x world size."""
        return self.cfg.batch_size * self.cfg.accumulation * self.cfg.world_size

    @property
    def unused_per_epoch(self) -> int:
        """Training samples ``drop_last`` leaves out of every epoch (a different set each epoch)."""
        if not self.cfg.drop_last:
            return 0
        return self.cfg.manifest.num_samples - len(self) // self.cfg.accumulation * self.global_batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._consumed = int(epoch), 0

    def rewind(self) -> None:
        """Start the current epoch again at its first batch: an evaluation that stopped after
        ``eval.max_batches`` must not make the next one begin where it stopped."""
        self._consumed = 0

    def _dataloader(self) -> DataLoader:
        """The one DataLoader of this loader; its workers, once started, serve every later epoch."""
        if self._loader is None:
            self._stream = ShardStream(self.cfg, self._epoch, self._consumed)
            workers = self.cfg.num_workers
            extra = {"prefetch_factor": self.prefetch_factor, "persistent_workers": True} if workers > 0 else {}
            # a private generator: the DataLoader draws its worker base seed from it, not from the global
            # torch RNG that the training loop checkpoints (the data order never depends on it)
            self._loader = DataLoader(
                self._stream,
                batch_size=None,
                num_workers=workers,
                pin_memory=self.pin_memory,
                generator=torch.Generator(),
                worker_init_fn=shield_worker_from_stop_signals if workers else None,
                **extra,
            )

        return self._loader

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        loader, self._loader, self._stream = self._loader, None, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._consumed >= len(self):
            self._epoch, self._consumed = self._epoch + 1, 0
        loader = self._dataloader()
        assert self._stream is not None
        # before iter(): the workers read it when the DataLoader tells them a new iteration starts
        self._stream.set_position(self._epoch, self._consumed)
        batches = iter(loader)
        for batch in batches:
            for key, value in batch.pop("__stats__").items():
                self._stats[key] += value
            if batch.get("__failing__"):  # the counters of a worker that fails next: its error follows
                continue
            self._log_keys(batch["__key__"])
            self._consumed += 1
            yield self._warp_on_device(batch) if "warp" in batch else batch
        if self._consumed != len(self):
            raise DataError(
                f"rank {self.cfg.rank} yielded {self._consumed} of {len(self)} batches in epoch {self._epoch}"
            )

    def _log_keys(self, keys: list[str]) -> None:
        """Append this batch's sample keys to ``sample_log`` (an audit of the data order)."""
        if self.sample_log is None:
            return
        os.makedirs(self.sample_log, exist_ok=True)
        record = {"epoch": self._epoch, "batch": self._consumed, "keys": list(keys)}
        with open(os.path.join(self.sample_log, f"rank{self.cfg.rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _warp_on_device(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A decoded batch from the workers -> the training batch, warped on ``self.device``."""
        cfg = self.cfg
        moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
        batch = warp_batch(moved, cfg.tasks, cfg.img_size, cfg.resampling)
        size = len(raw["__key__"])
        batch["label_size"] = torch.tensor([cfg.img_size] * size, dtype=torch.int64, device=self.device)
        batch["valid"] = moved["valid"]
        batch.update({k: v for k, v in moved.items() if k.startswith(LABELED)})
        batch["__key__"] = raw["__key__"]
        return batch

    # ------------------------------------------------------------------------------------- checkpoint

    def _order(self) -> dict[str, int]:
        """What the order of an epoch depends on (training: not the world size, workers or micro-batch)."""
        cfg = self.cfg
        common = {"seed": cfg.seed, "num_samples": cfg.manifest.num_samples, "shuffle": int(cfg.shuffle)}
        if cfg.drop_last:
            return {
                **common,
                "global_batch": self.global_batch,
                "shuffle_block": cfg.shuffle_block,
                "shuffle_interleave": cfg.shuffle_interleave,
            }
        return {
            **common,
            "world_size": cfg.world_size,
            "num_workers": max(1, cfg.num_workers),
            "batch_size": cfg.batch_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position and the order it is valid for; ints and strings only. ``batches_consumed`` counts
        global batches (optimizer steps), so it means the same on any number of ranks."""
        if self._consumed % self.cfg.accumulation:
            raise ValueError(
                f"cannot save the data position in the middle of a gradient accumulation cycle "
                f"({self._consumed} micro-batches, accumulation {self.cfg.accumulation})"
            )
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches_consumed": self._consumed // self.cfg.accumulation,
            "split": self.cfg.manifest.split,
            "world_size": self.cfg.world_size,  # informative: the order does not depend on it
            **self._order(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume at ``state``'s position, on any number of ranks and workers. A different order (seed,
        global batch, data, ``shuffle_block``, ``shuffle_interleave``): with ``strict`` that is an error, otherwise the loader
        restarts at the next epoch boundary (with a warning)."""
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"unknown data loader state version {version!r} (expected {STATE_VERSION})")
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if version == 1:  # an older order: nothing of it carries over
            mismatch = {"order": ("version 1", f"version {STATE_VERSION}")}
        else:
            mismatch = {k: (state.get(k), v) for k, v in self._order().items() if state.get(k) != v}
        if mismatch:
            what = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in mismatch.items())
            if strict and version == STATE_VERSION:
                raise ValueError(
                    f"cannot resume the data position exactly: {what}. Use the saved settings, or "
                    "load_state_dict(state, strict=False) to continue from the next epoch boundary"
                )
            log.warning("data order changed (%s): continuing from the start of the next epoch", what)
            epoch, consumed = (epoch + 1, 0) if consumed else (epoch, 0)
        consumed *= self.cfg.accumulation
        if not 0 <= consumed <= len(self):
            raise ValueError(f"saved position {consumed} is outside the epoch's {len(self)} batches")
        self._epoch, self._consumed = epoch, consumed


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _check_heads(url: str, manifest: Manifest, dataset: str, tasks: list[str]) -> None:
    """Shards and model must agree on each task's outputs (a declared format edited after converting)."""
    declared = get_dataset(dataset).num_outputs
    differ = {
        t: (manifest.num_outputs.get(t), declared[t]) for t in tasks if manifest.num_outputs.get(t) != declared[t]
    }
    if differ:
        detail = ", ".join(f"{t}: {stored} in the shards, {now} now" for t, (stored, now) in differ.items())
        raise ValueError(
            f"{url} was converted with other outputs per task than dataset '{dataset}' declares ({detail}); "
            "convert the dataset again with this declaration, or restore the one it was converted with"
        )


def _unused_note(loader: ShardLoader) -> str:
    """How much of each epoch ``drop_last`` leaves out; a warning above ``UNUSED_WARN_FRACTION``."""
    unused, total = loader.unused_per_epoch, loader.manifest.num_samples
    note = (
        f"{len(loader) // loader.cfg.accumulation} global batches of {loader.global_batch} per epoch, "
        f"{unused} of {total} samples ({100 * unused / total:.1f}%) unused (drop_last; a different set each epoch)"
    )
    if unused > UNUSED_WARN_FRACTION * total:
        log.warning(
            "%s: more than %d%% of every epoch is left out; lower the global batch (batch size x gradient "
            "accumulation x ranks) to train on more of it",
            note,
            round(100 * UNUSED_WARN_FRACTION),
        )
    return note


@functools.cache
def _log_unindexed(url: str) -> None:
    log.warning(
        "%s: manifest.json has no per-sample index (converted before it existed), so every worker reads whole "
        "shards, up to tens of times the dataset per epoch with many workers; add it in place with "
        "`python launch/convert.py --index --out %s`",
        url,
        url,
    )


def usable_decoders(wanted: Decoders) -> Decoders:
    """``wanted`` with PIL for each library that is not installed, saying so once per process."""
    usable = wanted.available()
    if usable != wanted:
        _log_substitution(wanted, usable)
    return usable


@functools.cache
def _log_substitution(wanted: Decoders, usable: Decoders) -> None:
    missing = [lib for lib, now in ((wanted.jpeg, usable.jpeg), (wanted.png, usable.png)) if lib != now]
    log.warning(
        "%s not installed: decoding with PIL instead (same pixels, slower; pip install %s)",
        " and ".join(missing),
        " ".join(missing),
    )


def build_loader(
    url: str,
    *,
    dataset: str,
    tasks: list[str],
    split: str,
    img_size: tuple[int, int],
    batch_size: int,
    num_workers: int | None = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    storage: StorageOptions | None = None,
    on_error: str = "skip",
    protocol: str = "original",
    augment: bool | None = None,
    shuffle: bool | None = None,
    shuffle_buffer: int = 128,
    accumulation: int = 1,
    shuffle_block: int = 0,
    shuffle_interleave: int = 8,
    sample_log: str | None = None,
    prefetch_samples: int = 16,
    max_consecutive_failures: int = 3,
    prefetch_factor: int = 2,
    pin_memory: bool | None = None,
    verify_checksums: bool = True,
    augment_device: str = "worker",
    device: torch.device | str | None = None,
    cache_dir: str | None = None,
    cache_max_gb: float = 50.0,
    jpeg_decoder: str = "simplejpeg",
    png_decoder: str = "pyspng",
    resampler: str = "opencv",
    normals_resampling: str = "bilinear",
    reduced_decode: bool = True,
    read_buffer_mb: float = 256,
    read_concurrency: int = 8,
) -> ShardLoader:
    """A :class:`ShardLoader` over the shards at ``url`` (a folder or ``s3://`` prefix with ``manifest.json``).

    ``split`` chooses the policy: ``"train"`` shuffles, augments and drops the remainder; ``"val"``
    keeps the file order, only resizes, and covers every sample exactly once (``valid`` marks padding).
    ``augment``/``shuffle`` override those defaults.

    ``accumulation``: gradient accumulation steps; with ``batch_size`` and ``world_size`` it makes the
    global batch, which (with ``seed`` and ``shuffle_block``) fixes the training order on any number of
    ranks. ``shuffle_block``/``shuffle_interleave``: slot ``p`` of global batch ``b`` reads from its
    stream ``b % shuffle_interleave``, whose samples come in contiguous blocks of ``shuffle_block``
    (``plan.py``, ``docs/data.md``: larger blocks read fewer shards and hold more samples; worker counts
    dividing ``shuffle_interleave * accumulation`` never read the same block).
    ``shuffle_buffer``: evaluation with ``shuffle=True`` only. ``sample_log``: a local folder where
    each rank appends the sample keys of every batch it yields (``rank<r>.jsonl``; null: off).

    ``num_workers``: worker processes (0: decode in this process); ``None`` sizes it from the CPUs
    (:func:`default_num_workers`). ``pin_memory``: pin batches for fast, asynchronous host-to-GPU
    copies; ``None`` means "when CUDA is available" (:func:`should_pin_memory`).

    ``verify_checksums``: check each sample's bytes against the manifest's per-sample digest (a mismatch
    is a bad sample under ``on_error``); for a manifest without the index, each shard's sha256 while it
    streams (a mismatch is a corrupt shard). With the index a worker reads only its samples' bytes. ``augment_device``: ``"worker"`` (workers decode and warp)
    or ``"device"`` (workers decode; the warp runs batched on ``device``, default the current CUDA
    device, else the CPU; training only). ``cache_dir``/``cache_max_gb``: a node-local cache of remote
    shards (``storage/shard_cache.py``). The remaining options choose the implementation of each step
    (the defaults are the fastest measured; ``"pil"``/``"pil"``/``"torch"``/``"bicubic"``/``False`` is
    the baseline pipeline, see ``docs/performance-data.md``).

    ``read_buffer_mb``: the most bytes a worker reads ahead of delivery (indexed manifests; whole-shard
    reading holds more, ``docs/data.md``); ``read_concurrency``: ranged requests in flight per worker.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got '{split}'")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got '{on_error}'")
    if protocol not in ("original", "official"):
        raise ValueError(f"protocol must be 'original' or 'official', got '{protocol}'")
    if augment_device not in ("worker", "device"):
        raise ValueError(f"augment_device must be 'worker' or 'device', got '{augment_device}'")
    if cache_dir is not None and cache_max_gb <= 0:
        raise ValueError(f"cache_max_gb must be > 0 with a cache_dir, got {cache_max_gb}")
    if read_buffer_mb <= 0 or read_concurrency < 1:
        raise ValueError(
            f"read_buffer_mb must be > 0 and read_concurrency must be >= 1 (got {read_buffer_mb}, {read_concurrency})"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    auto_workers = num_workers is None
    if auto_workers:
        num_workers = default_num_workers()
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
    if accumulation < 1 or shuffle_block < 0 or shuffle_interleave < 1:
        raise ValueError(
            "accumulation and shuffle_interleave must be >= 1 and shuffle_block >= 0 (got "
            f"{accumulation}, {shuffle_interleave}, {shuffle_block})"
        )
    check_tasks(dataset, tasks)
    storage = storage or StorageOptions()
    manifest = read_manifest(url, storage)
    if manifest.dataset != dataset:
        raise ValueError(f"{url} holds '{manifest.dataset}' shards, not '{dataset}'")
    absent = [t for t in tasks if t not in manifest.tasks]
    if absent:
        raise ValueError(f"{url} has no labels for task(s) {absent}; it stores {manifest.tasks}")
    _check_heads(url, manifest, dataset, tasks)
    if not manifest.indexed:
        _log_unindexed(url)
    train = split == "train"
    cfg = StreamConfig(
        manifest=manifest,
        tasks=tuple(tasks),
        img_size=(int(img_size[0]), int(img_size[1])),
        batch_size=batch_size,
        world_size=world_size,
        rank=rank,
        num_workers=num_workers,
        seed=seed,
        shuffle=train if shuffle is None else shuffle,
        augment=train if augment is None else augment,
        drop_last=train,
        protocol=protocol,
        on_error=on_error,
        storage=storage,
        shuffle_buffer=shuffle_buffer,
        accumulation=accumulation if train else 1,
        shuffle_block=shuffle_block,
        shuffle_interleave=shuffle_interleave,
        prefetch_samples=prefetch_samples,
        max_consecutive_failures=max_consecutive_failures,
        verify_checksums=verify_checksums,
        decoders=usable_decoders(Decoders(jpeg_decoder, png_decoder)),
        resampling=Resampling(resampler, normals_resampling),
        reduced_decode=reduced_decode,
        augment_on_device=augment_device == "device",
        cache_dir=cache_dir,
        cache_max_bytes=int(cache_max_gb * 2**30) if cache_dir else 0,
        read_buffer_bytes=int(read_buffer_mb * 2**20),
        read_concurrency=read_concurrency,
    )
    pin = should_pin_memory(pin_memory)
    loader = ShardLoader(
        cfg,
        prefetch_factor=prefetch_factor,
        pin_memory=pin,
        auto_workers=auto_workers,
        device=device,
        sample_log=sample_log,
    )
    len(loader)  # fail now if the data cannot fill one batch per rank
    log.info(
        "%s loader, rank %d: %d worker process(es)%s%s, pinned memory %s%s",
        split,
        rank,
        num_workers,
        f" (automatic: {available_cpus()} CPUs, {local_world_size()} local rank(s))" if auto_workers else "",
        ", persistent" if num_workers > 0 else "",
        "on" if pin else "off",
        f"; {_unused_note(loader)}" if train else "",
    )
    return loader
