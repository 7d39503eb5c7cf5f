"""Where the training data comes from: configured shards, or synthetic data made on first use when the
config asks for it (``data=synthetic``, the quickstart's data) and names no shards. A recipe without shards
is refused, never silently trained on generated data."""

from __future__ import annotations

import logging
import os

from mtlora_dist import comm
from mtlora_dist.config import DataConfig, check_data
from mtlora_dist.engine.distributed import DistInfo

__all__ = ["prepare_data"]

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
