"""Where the training data comes from, and the loaders over it.

Shards are the configured ones, or synthetic data made on first use when the config asks for it
(``data=synthetic``, the quickstart's data) and names no shards; a recipe without shards is refused,
never silently trained on generated data. Every loader of a job (training, evaluation, the prediction
grid, ``launch/eval.py``) is made by :func:`make_loader` from the run config, so they all honour the
same ``data`` settings.
"""

from __future__ import annotations

import logging
import os

from mtlora_dist import comm
from mtlora_dist.config import DataConfig, TrainConfig, check_data
from mtlora_dist.data.config import BatchGeometry, DataWorld
from mtlora_dist.data.stream.loader import ShardLoader, build_loader
from mtlora_dist.engine.distributed import DistInfo

__all__ = ["batch_geometry", "data_world", "make_loader", "prepare_data"]

log = logging.getLogger("mtlora_dist")


def prepare_data(data: DataConfig, info: DistInfo) -> tuple[str, str]:
    """Return (train_url, val_url). Without URLs and with ``data.synthetic.enabled``, rank 0 generates the
    synthetic dataset and its shards under ``data.synthetic.root`` once; the other ranks wait for it."""
    check_data(data)  # the entry points checked it before importing torch; callers of the API get it here
    if data.train_url:
        return data.train_url, data.val_url
    from mtlora_dist.synthetic.datasets import synthetic_shards  # only generated data needs the generator

    syn = data.synthetic
    settings = dict(num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed, shard_size_mb=syn.shard_size_mb)
    if info.is_main:
        log.info("synthetic %s data under %s", data.dataset, os.path.abspath(syn.root))
        synthetic_shards(data.dataset, syn.root, **settings)
    comm.barrier()
    urls = synthetic_shards(data.dataset, syn.root, **settings, make=False)
    return urls["train"], urls["val"]


def data_world(info: DistInfo, num_workers: int) -> DataWorld:
    """This rank's place for the loaders; ``num_workers`` resolved by the CPU budget
    (``engine.threads.set_thread_count``)."""
    return DataWorld(rank=info.rank, world_size=info.world_size, num_workers=num_workers, device=info.device)


def batch_geometry(cfg: TrainConfig, world_size: int) -> BatchGeometry:
    """The run's training batch layout: ``data.batch_size`` per rank, ``deepspeed.gradient_accumulation_steps``."""
    return BatchGeometry(cfg.data.batch_size, cfg.deepspeed.gradient_accumulation_steps, world_size)


def make_loader(cfg: TrainConfig, url: str, split: str, world: DataWorld, geometry: BatchGeometry) -> ShardLoader:
    """The loader of ``split`` (``train`` or ``val``) over ``url`` for this run: the model's input size,
    the run's seed and its whole ``data`` config."""
    return build_loader(url, split, cfg.data, world, geometry, img_size=cfg.model.img_size, seed=cfg.seed)
