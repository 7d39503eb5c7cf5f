"""Where the training data comes from: configured shards, or synthetic data made on first use when the
config asks for it (``data=synthetic``, the quickstart's data) and names no shards. A recipe without shards
is refused, never silently trained on generated data."""

from __future__ import annotations

import logging
import os

from mtlora_dist import comm
from mtlora_dist.data.convert import convert
from mtlora_dist.data.synthetic import generate
from mtlora_dist.engine.config import DataConfig, check_data
from mtlora_dist.engine.distributed import DistInfo

__all__ = ["prepare_data"]

log = logging.getLogger("mtlora_dist")


def prepare_data(data: DataConfig, info: DistInfo) -> tuple[str, str]:
    """Return (train_url, val_url). Without URLs and with ``data.synthetic.enabled``, rank 0 generates the synthetic dataset
    and its shards under ``data.synthetic.root`` once; the other ranks wait for it."""
    check_data(data)  # the entry points checked it before importing torch; callers of the API get it here
    if data.train_url:
        return data.train_url, data.val_url
    syn = data.synthetic
    root = os.path.abspath(os.path.join(syn.root, data.dataset))
    urls = {split: os.path.join(root, "shards", split) for split in ("train", "val")}
    if info.is_main and not all(os.path.exists(os.path.join(u, "manifest.json")) for u in urls.values()):
        log.info("generating synthetic %s data under %s (first use)", data.dataset, root)
        generate(data.dataset, os.path.join(root, "raw"), num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed)
        for split, url in urls.items():
            convert(data.dataset, os.path.join(root, "raw"), split, url, shard_size_mb=syn.shard_size_mb)
    comm.barrier()
    return urls["train"], urls["val"]
