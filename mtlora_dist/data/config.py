"""The data configuration (``data:`` of a run config) and the two runtime objects the loader is built from.

``data`` holds what every job needs (dataset, tasks, URLs, batch sizes, workers) and three sections, each
handed whole to the one part of the loader that uses it:

* ``data.order`` (:class:`OrderConfig`) -> the epoch plan (``stream/plan.py``): how samples are shuffled;
* ``data.read`` (:class:`ReadConfig`) -> the byte reader (``stream/reader.py``): checksums, cache, failures,
  how far it reads ahead;
* ``data.decode`` (:class:`DecodeConfig`) -> the transforms (``stream/transforms.py``): decoders,
  resampling, where augmentation runs.

Built once per job, from the config and the process group: :class:`DataWorld` (this rank's place: rank,
world size, DataLoader workers, device) and :class:`BatchGeometry` (micro-batch, accumulation, world size;
``global_batch``), which the DeepSpeed engine, the plan and the loader all read.

Torch-free: :mod:`mtlora_dist.config` re-exports these and is checked before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtlora_dist.choices import StrEnum
from mtlora_dist.data.ingest.format_spec import DatasetFormat
from mtlora_dist.storage.fs import StorageOptions

__all__ = [
    "DEFAULT_TASKS",
    "RENAMED_KEYS",
    "AugmentDevice",
    "BatchGeometry",
    "DataConfig",
    "DataWorld",
    "DecodeConfig",
    "EvalProtocol",
    "OnError",
    "OrderConfig",
    "ReadConfig",
    "SyntheticDataConfig",
    "migrate_data_keys",
    "renamed_key_error",
]

DEFAULT_TASKS = ["semseg", "human_parts", "sal", "normals"]

# skip: a corrupt sample or shard is counted and skipped; raise: it stops the run. (The functional form
# because ``raise`` is a keyword; OmegaConf takes a choice by its member name.)
OnError = StrEnum("OnError", {"skip": "skip", "raise": "raise"})


class AugmentDevice(StrEnum):
    worker = "worker"  # DataLoader workers decode and augment
    device = "device"  # workers decode; flip/rotation/scale/resize run batched on the training device


class EvalProtocol(StrEnum):
    original = "original"  # labels at their own size (the paper's numbers)
    official = "official"  # labels resized to the input, as the official code evaluates


@dataclass
class OrderConfig:
    """``data.order``: the training order (``docs/data.md``, "The training order"): a uniform shuffle of each
    epoch, cut into global batches, the same on any number of ranks and workers."""

    shuffle_buffer: int = 128  # evaluation loaders with shuffling only (tests, tools): a buffer shuffle
    sample_log: str | None = None  # a local folder: each rank appends every training batch's sample keys

    def __post_init__(self) -> None:
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.order: shuffle_buffer must be >= 1 (got {self.shuffle_buffer})")


@dataclass
class ReadConfig:
    """``data.read``: how a worker's byte reader reads shards (``stream/reader.py``)."""

    verify_checksums: bool = True  # each sample's digest (no index: each shard's sha256) checked as it is read
    cache_dir: str | None = None  # node-local cache of s3:// shards for later epochs; null = off
    cache_max_gb: float = 50.0  # size cap of cache_dir; least recently used shards are evicted first
    on_error: OnError = OnError.skip  # a corrupt sample or shard: skip it (counted) or stop
    max_consecutive_failures: int = 3  # shards in a row unreadable for storage errors: an error even when skipping
    prefetch_samples: int = 16  # samples the reader thread may queue ahead of the decoder
    # MiB a worker's reader may hold ahead of delivery (indexed shards; docs/data.md, "Memory and requests"):
    # 8 ranks x 8 workers x 256 MiB = 16 GiB a node, at any dataset size; larger lets a request carry more
    # storage neighbours (fewer requests), smaller holds less (down to one request per sample)
    buffer_mb: float = 256
    concurrency: int = 8  # ranged requests in flight per worker: hides object storage's per-request latency

    def __post_init__(self) -> None:
        if self.cache_dir is not None and self.cache_max_gb <= 0:
            raise ValueError(f"data.read.cache_max_gb must be > 0 with a cache_dir, got {self.cache_max_gb}")
        for key in ("max_consecutive_failures", "prefetch_samples", "concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.read.{key} is {getattr(self, key)}; pass 1 or more")
        if not self.buffer_mb > 0:
            raise ValueError(f"data.read.buffer_mb is {self.buffer_mb}; pass more than 0 (MiB, e.g. 256)")

    @property
    def cache_max_bytes(self) -> int:
        return int(self.cache_max_gb * 2**30) if self.cache_dir else 0

    @property
    def buffer_bytes(self) -> int:
        return int(self.buffer_mb * 2**20)


@dataclass
class DecodeConfig:
    """``data.decode``: how samples become tensors (``shards/encoding.py``, ``stream/transforms.py``). The
    defaults are the fastest measured; ``pil``/``pil``/``torch``/``bicubic``/``false`` is the baseline
    pipeline (``docs/performance-data.md``)."""

    jpeg: str = "simplejpeg"  # simplejpeg or pil (PIL is used when simplejpeg is not installed)
    png: str = "pyspng"  # pyspng or pil
    resampler: str = "opencv"  # opencv or torch
    normals_resampling: str = "bilinear"  # bilinear or bicubic
    reduced_decode: bool = True  # decode a JPEG at 1/2..1/8 size when the warp shrinks it that much anyway
    augment_device: AugmentDevice = AugmentDevice.worker  # training only; evaluation always runs in workers

    def __post_init__(self) -> None:
        for key, value, valid in (
            ("jpeg", self.jpeg, ("simplejpeg", "pil")),
            ("png", self.png, ("pyspng", "pil")),
            ("resampler", self.resampler, ("opencv", "torch")),
            ("normals_resampling", self.normals_resampling, ("bilinear", "bicubic")),
        ):
            if value not in valid:
                raise ValueError(f"data.decode.{key} is '{value}'; valid choices: {list(valid)}")


@dataclass
class SyntheticDataConfig:
    """Synthetic PASCAL-Context/NYUD-layout data made on first use, when ``enabled`` (``data=synthetic``,
    the quickstart's data) and no ``train_url``/``val_url`` is given."""

    enabled: bool = False
    root: str = "data/synthetic"
    num_train: int = 96
    num_val: int = 32
    seed: int = 0
    shard_size_mb: float = 1.0


@dataclass
class DataConfig:
    dataset: str = "pascal_context"
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    train_url: str | None = None  # webdataset shards (folder or s3:// prefix with manifest.json)
    val_url: str | None = None
    batch_size: int = 8  # per rank, per micro-step
    eval_batch_size: int = 8
    num_workers: int | None = None  # DataLoader workers per loader; null = from the CPUs (mtlora_dist/cpus.py)
    prefetch_batches: int = 2  # batches each worker prepares ahead (the DataLoader's prefetch_factor)
    eval_protocol: EvalProtocol = EvalProtocol.original
    order: OrderConfig = field(default_factory=OrderConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)
    # a dataset of your own: file patterns and label kinds (data/ingest/format_spec.py, docs/data.md); null for
    # the built-in pascal_context and nyud
    format: DatasetFormat | None = None


# data.<old key> (before the sections) -> its key now
RENAMED_KEYS = {
    "sample_log": "order.sample_log",
    "verify_checksums": "read.verify_checksums",
    "cache_dir": "read.cache_dir",
    "cache_max_gb": "read.cache_max_gb",
    "on_error": "read.on_error",
    "augment_device": "decode.augment_device",
}


# keys of the interleaved block order, gone with it (the order is a uniform shuffle): dropped from saved configs
RETIRED_KEYS = ("shuffle_block", "shuffle_interleave")


def renamed_key_error(key: str) -> str | None:
    """The one-line refusal for an old flat ``data.<key>`` (``None`` for any other key)."""
    name = key.lstrip("+~")
    if name.split("=")[0] in {f"data.{k}" for k in RETIRED_KEYS} | {f"data.order.{k}" for k in RETIRED_KEYS}:
        return (
            f"config key '{name.split('=')[0]}' was removed: the training order is a uniform shuffle of each epoch "
            "with no locality setting (docs/data.md, 'The training order'); drop it"
        )
    if name.startswith("data.") and name[len("data.") :] in RENAMED_KEYS:
        new = f"data.{RENAMED_KEYS[name[len('data.') :]]}"
        return f"config key '{name}' is now '{new}' (the data config has sections: docs/data.md); use {new}"
    return None


def migrate_data_keys(data: dict[str, Any]) -> list[str]:
    """Move the old flat keys of a ``data:`` mapping (a run's saved ``config.yaml`` from before the
    sections) to their sections, in place; returns ``["data.old -> data.new", ...]`` for what moved."""
    moved = []
    for old in RETIRED_KEYS:
        for where in (data, data.get("order") or {}):
            if old in where:
                del where[old]
                moved.append(f"data.{old} -> (removed)")
    for old, new in RENAMED_KEYS.items():
        if old in data:
            section, key = new.split(".")
            target = data.setdefault(section, {})
            if key not in target:
                target[key] = data[old]
            del data[old]
            moved.append(f"data.{old} -> data.{new}")
    return moved


@dataclass(frozen=True)
class DataWorld:
    """This process's place in the job, as the loader needs it: built once, from the process group and
    the CPU budget (:func:`mtlora_dist.cpus.cpu_budget`)."""

    rank: int = 0
    world_size: int = 1
    num_workers: int = 0  # DataLoader worker processes per loader (resolved: never null)
    device: Any = None  # a torch.device or its name; where batches are warped with augment_device=device

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.num_workers is None or self.num_workers < 0:
            raise ValueError(f"num_workers must be a resolved count >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's samples are laid out: ``micro_batch`` per rank per forward,
    ``accumulation`` forwards per step, ``world_size`` ranks. The global batch fixes the training order
    (``plan.py``), the DeepSpeed ``train_batch_size`` and the lr scaling."""

    micro_batch: int
    accumulation: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.accumulation < 1 or self.world_size < 1:
            raise ValueError(
                "micro-batch, gradient accumulation and world size must be >= 1 (got "
                f"{self.micro_batch}, {self.accumulation}, {self.world_size})"
            )

    @property
    def global_batch(self) -> int:
        """Samples of one optimizer step over all ranks."""
        return self.micro_batch * self.accumulation * self.world_size


def migrate_saved_config(path: str) -> list[str]:
    """Rewrite a run's saved ``config.yaml`` (a local copy at ``path``) from before the data sections with
    the keys moved (:func:`migrate_data_keys`), saying so on one line; returns what moved."""
    import logging

    import yaml

    with open(path) as f:
        saved = yaml.safe_load(f)
    data = saved.get("data") if isinstance(saved, dict) else None
    moved = migrate_data_keys(data) if isinstance(data, dict) else []
    if moved:
        with open(path, "w") as f:
            yaml.safe_dump(saved, f, sort_keys=False)
        logging.getLogger("mtlora_dist").warning(
            "the run's config.yaml predates the data config sections; read with %s", ", ".join(moved)
        )
    return moved
