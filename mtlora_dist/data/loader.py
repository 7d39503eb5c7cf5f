"""The data loader the trainer uses: shards -> augmented batches, one epoch at a time, resumable.

Policies (details in ``docs/data.md``):

* **Equal batches on every rank.** ``len(loader)`` is derived from the manifest alone and is the same on
  every rank. Training drops fewer than ``world_size * batch_size`` samples per epoch (a different set
  each epoch); evaluation pads ranks that are one sample short with a copy marked ``valid=False`` and
  may end with a smaller batch (the same size on every rank). A sample that cannot be read while
  skipping errors is replaced by a copy of a good one, also ``valid=False``, so the count never changes.
* **Exact resume.** The position is ``(epoch, batches consumed)``; the order of an epoch is a pure
  function of ``(seed, epoch, world_size, num_workers, batch_size)``, so a restored loader yields
  exactly the batches the interrupted one would have. Resuming under a different layout is refused
  (``strict=True``) or restarts at the next epoch boundary (``strict=False``).
* **Epochs.** ``set_epoch(e)`` moves to epoch ``e`` (keeping the position if ``e`` is already the
  current epoch, so a restored loader resumes mid-epoch under the usual ``for epoch: set_epoch(epoch)``
  loop); iterating again after a finished epoch moves on to the next one by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from mtlora_dist.data.errors import DataError
from mtlora_dist.data.manifest import Manifest, read_manifest
from mtlora_dist.data.plan import batches_per_rank
from mtlora_dist.data.streaming import STAT_KEYS, ShardStream, StreamConfig
from mtlora_dist.storage.fs import StorageOptions
from mtlora_dist.tasks.registry import check_tasks

__all__ = ["ShardLoader", "build_loader", "STATE_VERSION"]

log = logging.getLogger(__name__)
STATE_VERSION = 1
_LAYOUT_KEYS = ("seed", "world_size", "num_workers", "batch_size", "num_samples", "shuffle")


class ShardLoader:
    """Iterable over the batches of one epoch for one rank; see the module docstring."""

    def __init__(self, cfg: StreamConfig, prefetch_factor: int = 2) -> None:
        self.cfg = cfg
        self.prefetch_factor = prefetch_factor
        self._epoch = 0
        self._consumed = 0
        self._stats = dict.fromkeys(STAT_KEYS, 0)

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
        """Cumulative counters of this loader (see ``streaming.STAT_KEYS``); per rank, not reduced."""
        return dict(self._stats)

    def __len__(self) -> int:
        cfg = self.cfg
        return batches_per_rank(cfg.manifest.num_samples, cfg.world_size, cfg.batch_size, cfg.drop_last)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._consumed = int(epoch), 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._consumed >= len(self):
            self._epoch, self._consumed = self._epoch + 1, 0
        stream = ShardStream(self.cfg, self._epoch, self._consumed)
        if self.cfg.num_workers > 0:
            batches = iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                      prefetch_factor=self.prefetch_factor, persistent_workers=False))
        else:
            batches = iter(stream)
        for batch in batches:
            for key, value in batch.pop("__stats__").items():
                self._stats[key] += value
            self._consumed += 1
            yield batch
        if self._consumed != len(self):
            raise DataError(f"rank {self.cfg.rank} yielded {self._consumed} of {len(self)} batches in epoch {self._epoch}")

    # ------------------------------------------------------------------------------------- checkpoint

    def _layout(self) -> dict[str, int]:
        cfg = self.cfg
        return {"seed": cfg.seed, "world_size": cfg.world_size, "num_workers": max(1, cfg.num_workers),
                "batch_size": cfg.batch_size, "num_samples": cfg.manifest.num_samples, "shuffle": int(cfg.shuffle)}

    def state_dict(self) -> dict[str, Any]:
        """Position and the layout it is valid for; ints and strings only."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "batches_consumed": self._consumed,
                "split": self.cfg.manifest.split, **self._layout()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume at ``state``'s position. A different layout would change the order: with ``strict``
        that is an error, otherwise the loader restarts at the next epoch boundary (with a warning)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data loader state version {state.get('version')!r} (expected {STATE_VERSION})")
        mismatch = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if mismatch:
            what = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in mismatch.items())
            if strict:
                raise ValueError(
                    f"cannot resume the data position exactly: {what}. Use the saved settings, or "
                    "load_state_dict(state, strict=False) to continue from the next epoch boundary"
                )
            log.warning("data layout changed (%s): continuing from the start of the next epoch", what)
            epoch, consumed = (epoch + 1, 0) if consumed else (epoch, 0)
        if not 0 <= consumed <= len(self):
            raise ValueError(f"saved position {consumed} is outside the epoch's {len(self)} batches")
        self._epoch, self._consumed = epoch, consumed


def build_loader(
    url: str,
    *,
    dataset: str,
    tasks: list[str],
    split: str,
    img_size: tuple[int, int],
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    storage: StorageOptions | None = None,
    on_error: str = "skip",
    protocol: str = "original",
    augment: bool | None = None,
    shuffle: bool | None = None,
    shuffle_buffer: int = 128,
    prefetch_samples: int = 16,
    max_consecutive_failures: int = 3,
    prefetch_factor: int = 2,
) -> ShardLoader:
    """A :class:`ShardLoader` over the shards at ``url`` (a folder or ``s3://`` prefix with ``manifest.json``).

    ``split`` chooses the policy: ``"train"`` shuffles, augments and drops the remainder; ``"val"``
    keeps the file order, only resizes, and covers every sample exactly once (``valid`` marks padding).
    ``augment``/``shuffle`` override those defaults.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got '{split}'")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got '{on_error}'")
    if protocol not in ("original", "official"):
        raise ValueError(f"protocol must be 'original' or 'official', got '{protocol}'")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
    check_tasks(dataset, tasks)
    storage = storage or StorageOptions()
    manifest = read_manifest(url, storage)
    if manifest.dataset != dataset:
        raise ValueError(f"{url} holds '{manifest.dataset}' shards, not '{dataset}'")
    absent = [t for t in tasks if t not in manifest.tasks]
    if absent:
        raise ValueError(f"{url} has no labels for task(s) {absent}; it stores {manifest.tasks}")
    train = split == "train"
    cfg = StreamConfig(
        manifest=manifest, tasks=tuple(tasks), img_size=(int(img_size[0]), int(img_size[1])), batch_size=batch_size,
        world_size=world_size, rank=rank, num_workers=num_workers, seed=seed,
        shuffle=train if shuffle is None else shuffle, augment=train if augment is None else augment,
        drop_last=train, protocol=protocol, on_error=on_error, storage=storage, shuffle_buffer=shuffle_buffer,
        prefetch_samples=prefetch_samples, max_consecutive_failures=max_consecutive_failures,
    )
    loader = ShardLoader(cfg, prefetch_factor=prefetch_factor)
    len(loader)  # fail now if the data cannot fill one batch per rank
    return loader
