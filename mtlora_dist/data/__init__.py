"""Data: dataset readers, synthetic data, shard conversion, and streaming into batches.

The trainer needs :func:`build_loader` and :func:`normalize_image`; see ``docs/data.md``.
"""

from mtlora_dist.data.batch import collate, normalize_image
from mtlora_dist.data.loader import ShardLoader, build_loader

__all__ = ["ShardLoader", "build_loader", "collate", "normalize_image"]
