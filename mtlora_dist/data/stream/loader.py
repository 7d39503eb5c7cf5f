"""The data loader the trainer uses: shards -> augmented batches, one epoch at a time, resumable.

Policies (details in ``docs/data.md``):

* **Equal batches on every rank.** ``len(loader)`` is derived from the manifest alone and is the same on
  every rank. Training drops fewer than one global batch (``batch_size * accumulation * world_size``)
  of samples per epoch (a different set each epoch; logged at start-up, a warning above 5%); evaluation pads ranks that are one sample short with a copy marked ``valid=False`` and
  may end with a smaller batch (the same size on every rank). A sample that cannot be read while
  skipping errors is replaced by a copy of a good one, also ``valid=False``, so the count never changes.
* **Exact, elastic resume.** The position is ``(epoch, global batches consumed)``; the training order of
  an epoch is a pure function of ``(seed, epoch, manifest, global batch)`` (``plan.py``),
  never of the number of ranks, workers or the micro-batch split, so a restored loader yields exactly
  the batches the interrupted run would have, on any world size with the same global batch. A restored
  position of another global batch (``new_global_batch``) continues the same epoch in batches of the new
  size, reading every sample not yet read once (``plan.epoch_order``'s switches). Resuming under another
  order is refused (``strict=True``) or restarts at the next epoch boundary (``strict=False``). Evaluation loaders order by rank and worker and are not checkpointed.
* **Epochs.** ``set_epoch(e)`` moves to epoch ``e`` (keeping the position if ``e`` is already the
  current epoch, so a restored loader resumes mid-epoch under the usual ``for epoch: set_epoch(epoch)``
  loop); iterating again after a finished epoch moves on to the next one by itself.
* **Workers.** One ``DataLoader`` per loader, made on first use, with persistent workers: they start
  once and stay alive across epochs. Each worker reads the position the loader sets before every
  iteration from shared memory (see :class:`~mtlora_dist.data.stream.streaming.ShardStream`), so epochs,
  ``set_epoch`` and ``load_state_dict`` reach workers that were started earlier. The worker count
  comes resolved in the :class:`DataWorld` (``mtlora_dist.cpus.cpu_budget`` sizes ``data.num_workers=null``
  together with torch's threads); batches are pinned when the device is
  CUDA (:func:`should_pin_memory`) so the trainer's ``non_blocking`` copies are asynchronous. Workers
  ignore SIGINT and SIGUSR1 and take SIGTERM only from their own process
  (:mod:`~mtlora_dist.data.stream.worker_signals`): a stop signal sent to the whole process group (Ctrl-C, a
  launcher terminating its process tree, SLURM's warning signal) is the main process's to handle, and
  torch's own shutdown of the workers still works.
* **Augmentation on the training device** (``data.decode.augment_device="device"``): workers only decode and
  draw each sample's warp (from ``(seed, epoch, sample)``, as on the CPU path, so resume stays exact);
  the loader's iterator moves each batch to ``device`` and warps it there in one batched pass
  (``transforms.warp_batch``), yielding the same batch format, already on the device. On a CPU-only
  machine the same code runs in the main process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtlora_dist.data.config import BatchGeometry, DataConfig, DataWorld
from mtlora_dist.data.errors import DataError
from mtlora_dist.data.shards.encoding import Decoders
from mtlora_dist.data.shards.manifest import Manifest, read_manifest
from mtlora_dist.data.stream.batch import LABELED
from mtlora_dist.data.stream.plan import batches_per_rank
from mtlora_dist.data.stream.streaming import ShardStream, StreamConfig, stat_keys
from mtlora_dist.data.stream.transforms import warp_batch
from mtlora_dist.data.stream.worker_signals import shield_worker_from_stop_signals
from mtlora_dist.tasks.registry import check_tasks, get_dataset

__all__ = ["STATE_VERSION", "ShardLoader", "build_loader", "should_pin_memory"]

log = logging.getLogger(__name__)
STATE_VERSION = 3  # 3: a uniform epoch sequence and global batch switches
UNUSED_WARN_FRACTION = 0.05  # drop_last leaving more of an epoch out than this is worth a warning


def should_pin_memory(device: torch.device | str | None = None) -> bool:
    """Whether batches are pinned: when they go to a CUDA device (``device``; ``None``: whenever CUDA is
    available, where the trainer trains). Pinned batches make the trainer's ``non_blocking`` copies
    asynchronous; on the CPU pinning would only cost time."""
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


class ShardLoader:
    """Iterable over the batches of one epoch for one rank; see the module docstring."""

    def __init__(self, cfg: StreamConfig, prefetch_batches: int = 2, pin_memory: bool = False) -> None:
        self.cfg = cfg
        self.prefetch_batches = prefetch_batches  # per worker (the DataLoader's prefetch_factor)
        self.pin_memory = bool(pin_memory)
        self._device = torch.device(cfg.world.device) if cfg.world.device is not None else None
        # training: a folder where rank<r>.jsonl gets the keys of every batch yielded
        self.sample_log = cfg.order.sample_log if cfg.drop_last else None
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
        return self.cfg.world.num_workers

    @property
    def geometry(self) -> BatchGeometry:
        """The batch layout this loader yields (evaluation: its batch size, no accumulation)."""
        return self.cfg.geometry

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
        """Batches of this rank in an epoch trained with one global batch throughout."""
        return batches_per_rank(self.cfg.manifest.num_samples, self.cfg.geometry, self.cfg.drop_last)

    def _epoch_length(self) -> int:
        """Batches of this rank in the current epoch (another count in an epoch whose global batch changed)."""
        return self._epoch_length_of(self._epoch)

    def _epoch_length_of(self, epoch: int) -> int:
        cfg = self.cfg
        if cfg.switch_epoch != epoch:
            return len(self)
        return batches_per_rank(cfg.manifest.num_samples, cfg.geometry, cfg.drop_last, cfg.switches)

    @property
    def global_batch(self) -> int:
        """Samples of one optimizer step over all ranks (:class:`BatchGeometry`)."""
        return self.cfg.geometry.global_batch

    @property
    def unused_per_epoch(self) -> int:
        """Training samples ``drop_last`` leaves out of every epoch (a different set each epoch)."""
        if not self.cfg.drop_last:
            return 0
        return self.cfg.manifest.num_samples - len(self) // self.cfg.geometry.accumulation * self.global_batch

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
            workers = self.cfg.world.num_workers
            extra = {"prefetch_factor": self.prefetch_batches, "persistent_workers": True} if workers > 0 else {}
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
        if self._consumed >= self._epoch_length():
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
        if self._consumed != self._epoch_length():
            raise DataError(
                f"rank {self.cfg.world.rank} yielded {self._consumed} of {self._epoch_length()} batches in epoch "
                f"{self._epoch}"
            )

    def _log_keys(self, keys: list[str]) -> None:
        """Append this batch's sample keys to ``sample_log`` (an audit of the data order)."""
        if self.sample_log is None:
            return
        os.makedirs(self.sample_log, exist_ok=True)
        record = {"epoch": self._epoch, "batch": self._consumed, "keys": list(keys)}
        with open(os.path.join(self.sample_log, f"rank{self.cfg.world.rank}.jsonl"), "a") as f:
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
            return {**common, "global_batch": self.global_batch}
        return {
            **common,
            "world_size": cfg.geometry.world_size,
            "num_workers": max(1, cfg.world.num_workers),
            "batch_size": cfg.geometry.micro_batch,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position and the order it is valid for; ints and strings only. ``batches_consumed`` counts
        global batches (optimizer steps), so it means the same on any number of ranks."""
        accumulation = self.cfg.geometry.accumulation
        if self._consumed % accumulation:
            raise ValueError(
                f"cannot save the data position in the middle of a gradient accumulation cycle "
                f"({self._consumed} micro-batches, accumulation {accumulation})"
            )
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches_consumed": self._consumed // accumulation,
            "split": self.cfg.manifest.split,
            "world_size": self.cfg.geometry.world_size,  # informative: the order does not depend on it
            # earlier global batches of this epoch, "G:step,G:step" (each global batch and the epoch step where
            # it was left); a string, so the state stays ints and strings
            "switches": _switches_text(self.cfg.switches) if self.cfg.switch_epoch == self._epoch else "",
            **self._order(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, new_global_batch: bool = False) -> None:
        """Resume at ``state``'s position, on any number of ranks and workers. Another global batch, with
        ``new_global_batch``: the same epoch continues in batches of the new size (each sample not yet
        read, once). A different order (seed, data; another global batch without ``new_global_batch``):
        with ``strict`` that is an error, otherwise the loader restarts at the next epoch boundary (with a
        warning)."""
        version = state.get("version")
        if version not in (1, 2, STATE_VERSION):
            raise ValueError(f"unknown data loader state version {version!r} (expected {STATE_VERSION})")
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        switches = _switches_of(state.get("switches", ""))
        if version != STATE_VERSION:  # an older order: nothing of it carries over
            mismatch = {"order": (f"version {version}", f"version {STATE_VERSION}")}
        else:
            mismatch = {k: (state.get(k), v) for k, v in self._order().items() if state.get(k) != v}
            saved_batch = int(state["global_batch"]) if self.cfg.drop_last else self.global_batch
            if new_global_batch and set(mismatch) == {"global_batch"}:
                mismatch = {}
            if not mismatch and saved_batch != self.global_batch and 0 < consumed:
                switches += ((saved_batch, consumed),)  # the rest of this epoch in batches of the new size
                log.info(
                    "data: epoch %d goes on from step %d in batches of %d instead of %d, each sample not yet read once",
                    epoch, consumed, self.global_batch, saved_batch,
                )  # fmt: skip
        if mismatch:
            what = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in mismatch.items())
            if strict and version == STATE_VERSION:
                raise ValueError(
                    f"cannot resume the data position exactly: {what}. Use the saved settings, or "
                    "load_state_dict(state, strict=False) to continue from the next epoch boundary"
                )
            log.warning("data order changed (%s): continuing from the start of the next epoch", what)
            epoch, consumed = (epoch + 1, 0) if consumed else (epoch, 0)
            switches = ()
        if (switches, epoch if switches else -1) != (self.cfg.switches, self.cfg.switch_epoch):
            self.cfg = dataclasses.replace(self.cfg, switches=switches, switch_epoch=epoch if switches else -1)
            self.close()  # workers started earlier hold the old config
        consumed *= self.cfg.geometry.accumulation
        if not 0 <= consumed <= self._epoch_length_of(epoch):
            raise ValueError(f"saved position {consumed} is outside the epoch's {self._epoch_length_of(epoch)} batches")
        self._epoch, self._consumed = epoch, consumed


def _switches_text(switches: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{batch}:{step}" for batch, step in switches)


def _switches_of(text: str) -> tuple[tuple[int, int], ...]:
    return tuple((int(b), int(s)) for b, s in (part.split(":") for part in text.split(",") if part))


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
        f"{len(loader) // loader.geometry.accumulation} global batches of {loader.global_batch} per epoch, "
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
    split: str,
    data: DataConfig,
    world: DataWorld,
    geometry: BatchGeometry,
    *,
    img_size: Sequence[int],
    seed: int = 0,
    shuffle: bool | None = None,
    augment: bool | None = None,
) -> ShardLoader:
    """A :class:`ShardLoader` over the shards at ``url`` (a folder or ``s3://`` prefix with ``manifest.json``).

    ``data``: the run's data config; its sections go whole to the part that uses them (``order`` to the
    plan, ``read`` to the byte reader, ``decode`` to the transforms; :mod:`mtlora_dist.data.config`).
    ``world``: this rank's place (rank, world size, resolved worker count, device). ``geometry``: the
    training batch layout, whose global batch (with ``seed`` and ``data.order``) fixes the training order
    on any number of ranks; an evaluation loader uses ``data.eval_batch_size`` on the same world, without
    accumulation. ``img_size``: the model's input size.

    ``split`` chooses the policy: ``"train"`` shuffles, augments and drops the remainder; ``"val"``
    keeps the file order, only resizes, and covers every sample exactly once (``valid`` marks padding).
    ``shuffle``/``augment`` override those defaults (tools and tests; a run never does). Batches are
    pinned when the device is CUDA (:func:`should_pin_memory`).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got '{split}'")
    if geometry.world_size != world.world_size:
        raise ValueError(f"the batch geometry is for {geometry.world_size} rank(s), the world has {world.world_size}")
    train = split == "train"
    if not train:
        geometry = BatchGeometry(data.eval_batch_size, 1, world.world_size)
    check_tasks(data.dataset, data.tasks)
    manifest = read_manifest(url, data.storage)
    if manifest.dataset != data.dataset:
        raise ValueError(f"{url} holds '{manifest.dataset}' shards, not '{data.dataset}'")
    absent = [t for t in data.tasks if t not in manifest.tasks]
    if absent:
        raise ValueError(f"{url} has no labels for task(s) {absent}; it stores {manifest.tasks}")
    _check_heads(url, manifest, data.dataset, data.tasks)
    if not manifest.indexed:
        _log_unindexed(url)
    cfg = StreamConfig(
        manifest=manifest,
        tasks=tuple(data.tasks),
        img_size=(int(img_size[0]), int(img_size[1])),
        world=world,
        geometry=geometry,
        seed=seed,
        shuffle=train if shuffle is None else shuffle,
        augment=train if augment is None else augment,
        drop_last=train,
        protocol=str(data.eval_protocol),
        storage=data.storage,
        order=data.order,
        read=data.read,
        decode=data.decode,
        decoders=usable_decoders(Decoders(data.decode.jpeg, data.decode.png)),
    )
    pin = should_pin_memory(world.device)
    loader = ShardLoader(cfg, prefetch_batches=data.prefetch_batches, pin_memory=pin)
    len(loader)  # fail now if the data cannot fill one batch per rank
    log.info(
        "%s loader, rank %d: %d worker process(es)%s, pinned memory %s, checksums %s%s%s",
        split,
        world.rank,
        world.num_workers,
        ", persistent" if world.num_workers > 0 else "",
        "on" if pin else "off",
        "on" if data.read.verify_checksums else "off",
        f", shard cache {data.read.cache_dir}" if data.read.cache_dir else "",
        f"; {_unused_note(loader)}" if train else "",
    )
    return loader
